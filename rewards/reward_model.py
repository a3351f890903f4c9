"""Reward models as batch rewards for the RL callbacks: a trained or released VLM judge, and image similarity.

- `RewardModelReward`: one of `lightning_modules.reward_models` (the EditReward-style baseline, JRM or
  SpatialReward; docs/methods/jrm.md, docs/methods/spatialreward.md) scoring each generated image against
  its source image(s) (the sample's references) and its instruction: {"score": [N]} (the head's μ, or
  SpatialReward's SC^0.8 PQ^0.2 / 10). Built from a Lightning checkpoint of `omnilab fit` (its saved
  hyperparameters rebuild the module, `init_args` override them: e.g. the backbone's `load: {dtype}`), or
  without a checkpoint from `init_args` alone: a VLM judge from a weights path, e.g. SpatialReward's
  released Qwen3-VL weights (`backbone: {family: qwen3_vl, pretrained: <dir>}`). A generative judge's
  answer that does not parse is NaN ("not applicable": neutral in the group advantage) and counted
  (`stats()`); past `max_failure_fraction` of a batch the batch fails with a RewardError naming the items.
- `ImageSimilarity`: per-reference consistency, the cosine similarity of image embeddings (a vision
  encoder from a weights path: DINOv2, CLIP or SigLIP through transformers) between the output and each
  reference: "ref0", "ref1", ... (NaN beyond a sample's references): Flow-GRPO's `image_similarity`
  reward for editing, and MSGRPO's per-reference consistency term (rewards/base.py).

Both run where they are built (`device`: "auto" = CUDA when present); `omnilab serve reward` serves them
over HTTP on their own GPUs (rewards/serving.py).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from omnilab.allowlist import check_import_path
from rewards.base import Reward, RewardError, check_batch

REWARD_MODELS = "lightning_modules.reward_models"


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_reward_model(
    class_path: str = f"{REWARD_MODELS}.PreferenceRewardModel",
    checkpoint: str | None = None,
    init_args: dict[str, Any] | None = None,
) -> Any:
    """A reward-model module, built and (with a checkpoint) loaded with its trained weights (weights_only).

    The checkpoint's `hyper_parameters` are the constructor's arguments, updated with `init_args`.
    """
    check_import_path(class_path)
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    hparams: dict[str, Any] = {}
    state = None
    if checkpoint is not None:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if "state_dict" not in ckpt:
            raise ValueError(f"{checkpoint} is not a Lightning checkpoint (no state_dict)")
        hparams, state = dict(ckpt.get("hyper_parameters") or {}), ckpt["state_dict"]
    hparams = {k: v for k, v in {**hparams, **(init_args or {})}.items() if not k.startswith("_")}
    if "backbone" not in hparams:
        raise ValueError(f"{class_path}: give `checkpoint` or `init_args` with a `backbone`")
    model = cls(**hparams)
    model.configure_model()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "metrics" not in k]
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not fit {class_path}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model


class RewardModelReward(Reward):
    """A reward model (`lightning_modules.reward_models`) as a reward: {"score": [N]} per generated image.

    Args:
        class_path: The module class (PreferenceRewardModel, JointRewardModel, SpatialRewardModel).
        checkpoint: A Lightning checkpoint of that class (None: build from `init_args` alone, e.g. a judge
            whose `backbone` is `pretrained` weights).
        init_args: Constructor arguments (updating the checkpoint's saved ones).
        output: Which of the model's scores to return as "score" ("score"; SpatialReward also "sc", "pq").
        batch_size: Images scored per forward pass.
        device: "auto" (CUDA when present), "cpu", "cuda:1", ...
        max_failure_fraction: A batch where more than this share of the judge's answers do not parse fails
            (RewardError naming them); below it they are NaN and counted.
        name: The reward's name.
    """

    def __init__(
        self,
        class_path: str = f"{REWARD_MODELS}.PreferenceRewardModel",
        checkpoint: str | None = None,
        init_args: dict[str, Any] | None = None,
        output: str = "score",
        batch_size: int = 8,
        device: str = "auto",
        max_failure_fraction: float = 0.5,
        name: str = "reward_model",
    ) -> None:
        self._setup(
            load_reward_model(class_path, checkpoint, init_args),
            output,
            batch_size,
            device,
            max_failure_fraction,
            name,
        )

    @classmethod
    def from_module(cls, module: Any, **kwargs: Any) -> RewardModelReward:
        """A reward around an already built (e.g. just trained) reward-model module."""
        reward = cls.__new__(cls)
        reward._setup(module, **kwargs)
        return reward

    def _setup(
        self,
        model: Any,
        output: str = "score",
        batch_size: int = 8,
        device: str = "auto",
        max_failure_fraction: float = 0.5,
        name: str = "reward_model",
    ) -> None:
        if batch_size < 1 or not 0 <= max_failure_fraction <= 1:
            raise ValueError("batch_size must be >= 1 and max_failure_fraction in [0, 1]")
        self.model = model.eval()
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.output, self.batch_size, self.max_failure_fraction = output, batch_size, max_failure_fraction
        self.name = name
        self.generative = hasattr(self.model, "judge")
        self.nan_ok = self.generative
        self.scored = self.failed = 0

    def stats(self) -> dict[str, int]:
        """Images scored and judge answers that did not parse, since start."""
        return {"scored": self.scored, "unparsed": self.failed}

    @torch.no_grad()
    def __call__(
        self,
        images: list[Tensor],
        prompts: list[str],
        references: list[list[Tensor]],
        meta: list[dict[str, Any]],
    ) -> dict[str, Tensor]:
        """Score each image against its references (the source images) and instruction."""
        n = check_batch(images, prompts, references, meta)
        out = []
        for lo in range(0, n, self.batch_size):
            hi = min(n, lo + self.batch_size)
            sources = [[r.to(self.device) for r in refs] for refs in references[lo:hi]]
            scores = self.model.score_edits(
                sources, prompts[lo:hi], [x.to(self.device) for x in images[lo:hi]]
            )
            if self.output not in scores:
                raise RewardError(
                    f"reward {self.name!r}: the model gives {sorted(scores)}, not {self.output!r}"
                )
            out.append(scores[self.output].float().cpu())
        score = torch.cat(out)
        bad = torch.isnan(score)
        self.scored += n
        self.failed += int(bad.sum())
        if bool(bad.any()) and (not self.generative or float(bad.float().mean()) > self.max_failure_fraction):
            items = torch.nonzero(bad).flatten().tolist()
            raise RewardError(
                f"reward {self.name!r}: {len(items)} of {n} images got no score (the judge's answer did not parse: "
                f"items {items[:8]}, prompt {prompts[items[0]]!r:.80}); limit max_failure_fraction={self.max_failure_fraction}"
            )
        return {"score": score}


EMBEDDINGS: dict[str, tuple[str, tuple[float, ...], tuple[float, ...]]] = {
    "dino": ("Dinov2Model", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": (
        "CLIPVisionModelWithProjection",
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
    ),
    "siglip": ("SiglipVisionModel", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class ImageSimilarity(Reward):
    """Per-reference consistency: cosine similarity of the output's and each reference's image embeddings.

    Args:
        pretrained: Weights (hub id or dir) of the vision encoder; or `config` (random init, tests).
        config: The encoder's config kwargs.
        kind: "dino" (Dinov2Model, the CLS token), "clip" (CLIPVisionModelWithProjection, image_embeds)
            or "siglip" (SiglipVisionModel, pooler_output); sets the normalisation.
        size: Images are resized (bicubic, antialiased) to size x size.
        device: "auto", "cpu", "cuda:1", ...
        name: The reward's name.
    """

    nan_ok = True

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        kind: Literal["dino", "clip", "siglip"] = "dino",
        size: int = 224,
        device: str = "auto",
        name: str = "consistency",
    ) -> None:
        import transformers

        from lightning_modules.components.backbones import build_backbone

        if kind not in EMBEDDINGS:
            raise ValueError(f"kind {kind!r}: choose one of {', '.join(EMBEDDINGS)}")
        cls_name, mean, std = EMBEDDINGS[kind]
        self.kind, self.size, self.name = kind, size, name
        self.device = resolve_device(device)
        self.encoder = (
            build_backbone(getattr(transformers, cls_name), pretrained, config).eval().to(self.device)
        )
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def embed(self, images: Sequence[Tensor]) -> Tensor:
        """Unit-norm embeddings [N, D] of [3, H, W] images in [-1, 1]."""
        x = torch.stack(
            [
                F.interpolate(im[None].float(), size=(self.size, self.size), mode="bicubic", antialias=True)[
                    0
                ]
                for im in images
            ]
        ).to(self.device)
        x = ((x.clamp(-1, 1) + 1) / 2 - self.mean) / self.std
        out = self.encoder(pixel_values=x.to(next(self.encoder.parameters()).dtype))
        if self.kind == "clip":
            emb = out.image_embeds
        elif self.kind == "dino":
            emb = out.last_hidden_state[:, 0]
        else:
            emb = out.pooler_output
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def __call__(
        self,
        images: list[Tensor],
        prompts: list[str],
        references: list[list[Tensor]],
        meta: list[dict[str, Any]],
    ) -> dict[str, Tensor]:
        """{"ref0": [N], "ref1": [N], ...}: cos(output, reference k); NaN where a sample has no reference k."""
        n = check_batch(images, prompts, references, meta)
        most = max((len(r) for r in references), default=0)
        if most == 0:
            raise RewardError(f"reward {self.name!r} compares outputs with references, and no sample has one")
        outputs = self.embed(images)
        flat = [r for refs in references for r in refs]
        refs = self.embed(flat)
        scores = torch.full((n, most), math.nan)
        pos = 0
        for i, rs in enumerate(references):
            for k in range(len(rs)):
                scores[i, k] = float(outputs[i] @ refs[pos])
                pos += 1
        return {f"ref{k}": scores[:, k] for k in range(most)}
