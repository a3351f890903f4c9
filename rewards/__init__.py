"""Reward functions for online RL: plain callables over images + text (see rewards/base.py for the interface).

`base`: the interface, `RewardError` and `CombinedReward`; `scene`: checks of the generated data's exact
ground truth (colour, position, count, per-reference consistency) and JPEG compressibility; `remote`: a
reward served over HTTP from another process (large reward models); `viescore`, `judges`, `faces`: VIEScore /
Weighted-Ref-VIEScore with a VLM judge (the chat client of omnilab/chat.py or one in process) and ArcFace;
`reward_model`: trained reward models
(EditReward-style, JRM, SpatialReward) and image similarity as rewards; `geneval`: GenEval's detector checks;
`serving`: `omnilab serve reward`.
"""

from rewards.base import CombinedReward, Reward, RewardError, RewardFn, per_reference

__all__ = ["CombinedReward", "Reward", "RewardError", "RewardFn", "per_reference"]
