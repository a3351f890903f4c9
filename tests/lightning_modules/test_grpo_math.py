"""Flow-GRPO math: every function against values worked by hand from the notes' formulas (docs/methods/flow_grpo.md)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.components.flow import euler_step
from lightning_modules.components.grpo import (
    aggregate_rewards,
    clipped_policy_loss,
    group_advantages,
    group_z,
    kl_to_reference,
    msgrpo_reward,
    sde_step_with_logprob,
    trained_step_indices,
    zero_advantage_groups,
)
from rewards.base import CombinedReward

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
EPS = 1e-4


def one(values):
    """A batch of one sample whose latent holds `values` ([1, len])."""
    return torch.tensor([values], dtype=torch.float32)


# --------------------------------------------------------------------------- the SDE step


def test_flow_grpo_step_by_hand():
    # sigma .5 -> .25, a = .5: std_t = .5 sqrt(.5/.5) = .5, Delta = -.25
    # mu = x (1 + .25 (-.25) / 1) + v (1 + .25 .5 / 1)(-.25) = .9375 x - .28125 v
    # x = [1, 0], v = [2, 0] -> mu = [.375, 0]; transition std = .5 sqrt(.25) = .25
    x, v = one([1.0, 0.0]), one([2.0, 0.0])
    prev = one([0.625, 0.0])  # one transition std above the mean, then exactly at the mean
    out, logp, mean, std = sde_step_with_logprob(x, v, 0.5, 0.25, 0.5, prev_sample=prev)
    assert mean[0].tolist() == pytest.approx([0.375, 0.0])
    assert std.tolist() == pytest.approx([0.5])  # the code's std_t, without sqrt|Delta|
    assert torch.equal(out, prev)
    # log pi = -1/2 - log .25 - ½log 2pi and -log .25 - ½log 2pi, AVERAGED (not summed) over elements
    by_hand = ((-0.5 + math.log(4) - HALF_LOG_2PI) + (math.log(4) - HALF_LOG_2PI)) / 2
    assert logp.tolist() == pytest.approx([by_hand], rel=1e-6)  # 0.21735...


def test_flow_grpo_sigma_one_uses_sigma_next_in_the_denominator():
    # sigma = 1 -> .75, a = .5: std_t = .5 sqrt(1 / (1 - .75)) = 1; mu = x (1 - .25/2) + v (1 + 0)(-.25)
    _, _, mean, std = sde_step_with_logprob(one([1.0]), one([2.0]), 1.0, 0.75, 0.5)
    assert std.item() == pytest.approx(1.0)
    assert mean.item() == pytest.approx(0.875 * 1 - 0.25 * 2)  # .375
    assert math.isfinite(mean.item())


def test_flow_grpo_draw_is_mean_plus_scaled_noise():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out, _, mean, std = sde_step_with_logprob(
        x, v, 0.5, 0.25, 0.5, generator=torch.Generator().manual_seed(3)
    )
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    # x' = mu + std_t sqrt(-Delta) eps, std_t = .5
    assert torch.allclose(out, mean + 0.5 * 0.5 * eps, atol=1e-6)
    assert std.shape == (2,)


def test_cps_step_by_hand():
    # a = .5: std = .25 sin(pi/4) = sqrt2/8; sqrt(.25² - std²) = .25 cos(pi/4) = sqrt2/8
    # x = 1, v = 2, sigma .5: x0^ = 1 - .5·2 = 0, x1^ = 1 + .5·2 = 2 -> mu = .75·0 + sqrt2/8·2 = sqrt2/4
    x, v = one([1.0, 0.0]), one([2.0, 0.0])
    mu = math.sqrt(2) / 4
    prev = one([mu + 0.5, 0.0])
    _, logp, mean, std = sde_step_with_logprob(x, v, 0.5, 0.25, 0.5, kind="cps", prev_sample=prev)
    assert mean[0].tolist() == pytest.approx([mu, 0.0], rel=1e-6)
    assert std.item() == pytest.approx(math.sqrt(2) / 8)
    # log pi = -mean (x' - mu)² = -(.25 + 0) / 2: no 1/(2 std²), no constants
    assert logp.item() == pytest.approx(-0.125, rel=1e-5)


def test_dance_step_by_hand():
    # eta = .3, sigma .5 -> .25, x = 1, v = 2: x0^ = 0, s^ = -(1 - .5·0)/.25 = -4
    # mu = 1 + (-.25)(2 - ½ .09 (-4)) = 1 - .25 · 2.18 = .455; std = .3 sqrt(.25) = .15
    prev = one([0.455 + 0.15])
    _, logp, mean, std = sde_step_with_logprob(
        one([1.0]), one([2.0]), 0.5, 0.25, 0.3, kind="dance", prev_sample=prev
    )
    assert mean.item() == pytest.approx(0.455, rel=1e-6)
    assert std.item() == pytest.approx(0.15)
    assert logp.item() == pytest.approx(-0.5 - math.log(0.15) - HALF_LOG_2PI, rel=1e-5)  # 0.47818


@pytest.mark.parametrize("kind", ["flow_grpo", "cps", "dance"])
def test_noise_level_zero_is_the_euler_ode_step(kind):
    # a = 0: flow_grpo mu = x (1 + 0) + v (1 + 0) Delta and dance mu = x + Delta (v - 0) are x + Delta v
    # term for term; CPS's (1 - s') (x - s v) + s' (x + (1 - s) v) equals it up to rounding
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.3, 0.0])
    out, _, mean, _ = sde_step_with_logprob(x, v, sigma, sigma_next, 0.0, kind=kind, generator=g)
    expected = euler_step(x, v, sigma, sigma_next)
    if kind == "cps":
        assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(mean, expected, atol=1e-6)
    else:
        assert torch.equal(out, expected) and torch.equal(mean, expected)


@pytest.mark.parametrize("kind", ["flow_grpo", "cps", "dance"])
def test_on_policy_ratio_is_exactly_one(kind):
    x, v = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    sigma = torch.tensor([1.0, 0.9, 0.5, 0.2])
    sample, old, _, _ = sde_step_with_logprob(
        x, v, sigma, sigma - 0.1, 0.7, kind=kind, generator=torch.Generator().manual_seed(1)
    )
    _, new, _, _ = sde_step_with_logprob(x, v, sigma, sigma - 0.1, 0.7, kind=kind, prev_sample=sample)
    assert torch.equal(torch.exp(new - old), torch.ones(4))


def test_step_is_fp32_whatever_the_input_dtype():
    x, v = torch.randn(2, 4, 4, 4).bfloat16(), torch.randn(2, 4, 4, 4).bfloat16()
    out, logp, mean, std = sde_step_with_logprob(
        x, v, 0.5, 0.4, 0.7, generator=torch.Generator().manual_seed(0)
    )
    assert {t.dtype for t in (out, logp, mean, std)} == {torch.float32}
    assert logp.shape == (2,)


def test_step_rejects_bad_input():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="deterministic"):
        sde_step_with_logprob(x, x, 0.5, 0.25, 0.0, prev_sample=x)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step_with_logprob(x, x, 0.25, 0.5, 0.7)
    with pytest.raises(ValueError, match="kind"):
        sde_step_with_logprob(x, x, 0.5, 0.25, 0.7, kind="ddim")


def test_kl_to_reference_by_hand():
    # diffs [1, 2] -> mean square 2.5; std .5: 2.5 / (2 · .25) = 5; the exact Gaussian KL (|Delta| = .25) is 20
    mean, ref = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    assert kl_to_reference(mean, ref, 0.5).tolist() == pytest.approx([5.0])
    assert kl_to_reference(mean, ref, torch.tensor([0.5]), dt=-0.25).tolist() == pytest.approx([20.0])
    assert kl_to_reference(mean, mean, 0.5).tolist() == [0.0]


# --------------------------------------------------------------------------- advantages


REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 7.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 2])


def test_group_advantages_per_group_std():
    # group 0: mean 2, population std sqrt(2/3); group 1 equal rewards -> 0; group 2 is one sample -> 0
    a = 1 / (math.sqrt(2 / 3) + EPS)  # 1.22459
    assert group_advantages(REWARDS, GROUPS).tolist() == pytest.approx([-a, 0, a, 0, 0, 0], rel=1e-5)


def test_group_advantages_batch_std_and_none():
    # batch population std of [1,2,3,4,4,7]: mean 3.5, squares 6.25+2.25+.25+.25+.25+12.25 = 21.5 -> sqrt(21.5/6)
    b = 1 / (math.sqrt(21.5 / 6) + EPS)  # 0.52824
    assert group_advantages(REWARDS, GROUPS, "batch").tolist() == pytest.approx([-b, 0, b, 0, 0, 0], rel=1e-5)
    assert group_advantages(REWARDS, GROUPS, "none").tolist() == pytest.approx([-1, 0, 1, 0, 0, 0])


def test_group_advantages_unbiased_std():
    # group 0 with ddof 1: std = sqrt(2/2) = 1
    adv = group_advantages(REWARDS, GROUPS, unbiased=True)
    assert adv[:3].tolist() == pytest.approx([-1 / (1 + EPS), 0, 1 / (1 + EPS)], rel=1e-6)
    assert adv[5].item() == 0.0  # a group of one stays 0 (its unbiased std would be 0/0)


def test_group_advantages_clip():
    # 49 zeros and a one: mean .02, std sqrt(.02 · .98) = .14 -> A = .98 / .1401 = 6.995 clipped to 5
    rewards = torch.zeros(50)
    rewards[7] = 1.0
    adv = group_advantages(rewards, torch.zeros(50, dtype=torch.long))
    assert adv[7].item() == 5.0
    assert adv[0].item() == pytest.approx(-0.02 / (0.14 + EPS), rel=1e-4)
    assert group_advantages(rewards, torch.zeros(50, dtype=torch.long), clip=None)[7].item() == pytest.approx(
        0.98 / (0.14 + EPS), rel=1e-4
    )


def test_group_advantages_refuse_nan_rewards():
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]))


def test_zero_advantage_groups_marks_equal_and_single_groups():
    adv = group_advantages(REWARDS, GROUPS)
    assert zero_advantage_groups(adv, GROUPS).tolist() == [False, False, False, True, True, True]


# --------------------------------------------------------------------------- combining rewards


def test_aggregate_sum_then_normalize_by_hand():
    a, b = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    got = aggregate_rewards({"a": a, "b": b, "log_only": a * 100}, {"a": 1.0, "b": 2.0}, groups)
    assert got.tolist() == pytest.approx([1.0, 2.0, 1.0, 3.0])  # a + 2b, raw


def test_aggregate_normalize_then_sum_by_hand():
    # group 0: z(a) = [c, -c], z(b) = [-c, c]; group 1: z(a) = 0 (equal), z(b) = [-c, c]; c = .5 / (.5 + eps)
    # s = z(a) + 2 z(b) = [-c, c, -2c, 2c]: batch mean 0, population std c sqrt(10/4)
    a, b = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    c = 0.5 / (0.5 + EPS)
    k = c / (c * math.sqrt(2.5) + EPS)
    got = aggregate_rewards(
        {"a": a, "b": b}, {"a": 1.0, "b": 2.0}, torch.tensor([0, 0, 1, 1]), "normalize_then_sum"
    )
    assert got.tolist() == pytest.approx([-k, k, -2 * k, 2 * k], rel=1e-5)


def test_aggregate_nan_means_not_applicable():
    # b does not apply to group 1: it counts as the group mean (sum rule) / z = 0 (normalize rule)
    a, b = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, math.nan, math.nan])
    groups = torch.tensor([0, 0, 1, 1])
    assert aggregate_rewards({"a": a, "b": b}, {"a": 1, "b": 1}, groups).tolist() == [1.0, 1.0, 1.0, 0.0]
    mixed = torch.tensor([2.0, math.nan, 0.0, 0.0])  # one applicable sample in group 0: it is the mean
    assert aggregate_rewards({"m": mixed}, {"m": 1}, groups).tolist() == [2.0, 2.0, 0.0, 0.0]
    c = 0.5 / (0.5 + EPS)
    got = aggregate_rewards({"a": a, "b": b}, {"a": 1, "b": 1}, groups, "normalize_then_sum")
    # s = [c - c, -c + c, c, -c] = [0, 0, c, -c]: population std c / sqrt2
    k = c / (c / math.sqrt(2) + EPS)
    assert got.tolist() == pytest.approx([0, 0, k, -k], abs=1e-5)


def test_aggregate_rejects_unknown_weight():
    with pytest.raises(KeyError, match="absent"):
        aggregate_rewards({"a": torch.zeros(2)}, {"b": 1.0}, torch.tensor([0, 0]))


def test_group_z_group_of_one_and_nan_are_zero():
    assert group_z(torch.tensor([3.0, 1.0, math.nan]), torch.tensor([0, 1, 1])).tolist() == [0.0, 0.0, 0.0]


def test_msgrpo_reward_by_hand():
    # group 0 (two refs): z(instr) = [c, -c], z(ref0) = [c, -c], z(ref1) = [-c, c] -> mean over refs [0, 0]
    # group 1 (one ref): z(instr) = 0, z(ref0) = [c, -c] -> mean [c, -c]
    instr = torch.tensor([1.0, 0.0, 0.0, 0.0])
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, math.nan], [0.0, math.nan]])
    groups = torch.tensor([0, 0, 1, 1])
    c = 0.5 / (0.5 + EPS)
    # without min: s = [c, -c, c, -c], batch std c
    k = c / (c + EPS)
    assert msgrpo_reward(instr, refs, groups).tolist() == pytest.approx([k, -k, k, -k], rel=1e-5)
    # with min: + [-c, -c, c, -c] -> s = [0, -2c, 2c, -2c], mean -c/2, deviations [.5, -1.5, 2.5, -1.5] c,
    # population std c sqrt(11/4)
    m = c / (c * math.sqrt(11 / 4) + EPS)
    got = msgrpo_reward(instr, refs, groups, use_min=True)
    assert got.tolist() == pytest.approx([0.5 * m, -1.5 * m, 2.5 * m, -1.5 * m], rel=1e-5)


def test_msgrpo_instruction_weight_weighs_against_consistency_by_hand():
    # Groups [0, 0, 1, 1]. Instruction [1, 3, 2, 2]: group 0 mean 2, std 1 -> z = [-1, 1] / (1 + eps);
    # group 1 std 0 -> z = 0. One reference [0, 0, 1, 5]: group 0 -> 0; group 1 mean 3, std 2 ->
    # z = [-2, 2] / (2 + eps). With w_instruction = 0.25, w_consistency = 1:
    # s = [-0.25 a, 0.25 a, -b, b] with a = 1 / (1 + eps), b = 2 / (2 + eps); mean 0; population
    # std sqrt((0.0625 a² + b²) / 2); the advantage (std scope "none", group means 0) is s / (std + eps).
    instr = torch.tensor([1.0, 3.0, 2.0, 2.0])
    refs = torch.tensor([[0.0], [0.0], [1.0], [5.0]])
    groups = torch.tensor([0, 0, 1, 1])
    a, b = 1 / (1 + EPS), 2 / (2 + EPS)
    s = [-0.25 * a, 0.25 * a, -b, b]
    std = math.sqrt((0.0625 * a**2 + b**2) / 2)
    expected = [v / (std + EPS) for v in s]
    got = msgrpo_reward({"judge": instr}, refs, groups, {"judge": 0.25, "consistency": 1.0})
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    advantages = group_advantages(got, groups, "none", clip=None)
    assert advantages.tolist() == pytest.approx(expected, rel=1e-5)
    # a weight that weighs: w = 0.1, 0.8, 5.0 give three different advantage vectors
    outs = [msgrpo_reward({"judge": instr}, refs, groups, {"judge": w}) for w in (0.1, 0.8, 5.0)]
    assert not torch.allclose(outs[0], outs[1], atol=1e-3) and not torch.allclose(outs[1], outs[2], atol=1e-3)


def test_combined_reward_msgrpo_weights_each_instruction_score_once():
    # rewards/base.py used to z-score the weighted instruction sum and msgrpo_reward z-scored it again,
    # so the instruction weight cancelled. Through CombinedReward.aggregate the weight must weigh.
    instr = torch.tensor([1.0, 3.0, 2.0, 2.0])
    scores = {"judge/score": instr, "consistency/ref0": torch.tensor([0.0, 0.0, 1.0, 5.0])}
    groups = torch.tensor([0, 0, 1, 1])
    reward = lambda w: CombinedReward(  # noqa: E731
        {"judge": lambda *a: {}, "consistency": lambda *a: {}},
        {"judge": w, "consistency": 1.0},
        rule="msgrpo",
    )
    got = reward(0.25).aggregate(scores, groups)
    refs = torch.tensor([[0.0], [0.0], [1.0], [5.0]])
    assert torch.allclose(got, msgrpo_reward({"judge": instr}, refs, groups, {"judge": 0.25}), atol=1e-6)
    a, b = 1 / (1 + EPS), 2 / (2 + EPS)
    std = math.sqrt((0.0625 * a**2 + b**2) / 2)
    assert got[1].item() == pytest.approx(0.25 * a / (std + EPS), rel=1e-5)
    assert not torch.allclose(
        reward(0.1).aggregate(scores, groups), reward(5.0).aggregate(scores, groups), atol=1e-3
    )


def test_msgrpo_weights_and_no_references():
    # only the instruction (consistency weight 0); t2i samples (no refs) get 0 from both reference terms
    instr = torch.tensor([1.0, 0.0])
    refs = torch.full((2, 3), math.nan)
    c = 0.5 / (0.5 + EPS)
    k = c / (c + EPS)
    got = msgrpo_reward(instr, refs, torch.tensor([0, 0]), {"consistency": 0.0}, use_min=True)
    assert got.tolist() == pytest.approx([k, -k], rel=1e-5)
    with pytest.raises(KeyError, match="not among"):
        msgrpo_reward(instr, refs, torch.tensor([0, 0]), {"refs": 1.0})
    with pytest.raises(ValueError, match="reserved"):
        msgrpo_reward({"min": instr}, refs, torch.tensor([0, 0]))


# --------------------------------------------------------------------------- the loss


def test_clipped_policy_loss_by_hand():
    # eps .2; rho = [1.5, .5, 1], A = [1, -1, 2]
    # s0: max(-1.5, -1.2) = -1.2 (clipped); s1: max(.5, .8) = .8 (clipped); s2: -2 -> loss (-1.2 + .8 - 2)/3 = -.8
    logp = torch.tensor([math.log(1.5), math.log(0.5), 0.0], requires_grad=True)
    loss, stats = clipped_policy_loss(logp, torch.zeros(3), torch.tensor([1.0, -1.0, 2.0]), 0.2)
    assert loss.item() == pytest.approx(-0.8, rel=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    assert [stats[k].item() for k in ("ratio_mean", "ratio_min", "ratio_max")] == pytest.approx(
        [1.0, 0.5, 1.5]
    )
    # k3 = mean((rho - 1) - log rho) = ((.5 - log 1.5) + (-.5 - log .5) + 0) / 3
    assert stats["approx_kl"].item() == pytest.approx(
        (0.5 - math.log(1.5) - 0.5 - math.log(0.5)) / 3, rel=1e-5
    )
    assert stats["approx_kl_k2"].item() == pytest.approx(
        (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 6, rel=1e-5
    )
    loss.backward()
    # clipped samples carry no gradient; d/dlogp (-A rho / 3) = -2 · 1 / 3 for the third
    assert logp.grad.tolist() == pytest.approx([0.0, 0.0, -2 / 3])


def test_clipped_policy_loss_asymmetric_range_and_steps():
    # eps_low .1, eps_high .3: rho 1.25 is inside for A > 0 -> -1.25; [N, T] log-probs broadcast A [N]
    logp = torch.full((1, 2), math.log(1.25))
    loss, stats = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), (0.1, 0.3))
    assert loss.item() == pytest.approx(-1.25) and stats["clip_fraction"].item() == 0.0


def test_clipped_policy_loss_clamps_the_log_ratio():
    loss, stats = clipped_policy_loss(
        torch.tensor([100.0]), torch.tensor([0.0]), torch.tensor([-1.0]), 1e-4, 20.0
    )
    assert math.isfinite(loss.item())
    assert stats["ratio_max"].item() == pytest.approx(math.exp(20), rel=1e-5)
    assert loss.item() == pytest.approx(math.exp(20), rel=1e-5)  # max(-A rho, -A clip) = rho


# --------------------------------------------------------------------------- trained steps


def test_trained_steps_fraction_skips_the_last():
    assert trained_step_indices(10, "fraction", 0.99) == list(range(9))  # int(9.9) = 9
    assert trained_step_indices(4) == [0, 1, 2, 3]


def test_trained_steps_window_inside_its_range():
    starts = set()
    for seed in range(200):
        steps = trained_step_indices(
            10, "window", window_size=2, generator=torch.Generator().manual_seed(seed)
        )
        assert steps == [steps[0], steps[0] + 1]
        starts.add(steps[0])
    assert starts == {0, 1, 2, 3}  # randint(0, 5 - 2), both ends included
    again = trained_step_indices(10, "window", generator=torch.Generator().manual_seed(7))
    assert again == trained_step_indices(10, "window", generator=torch.Generator().manual_seed(7))


def test_trained_steps_random_and_errors():
    steps = trained_step_indices(10, "random", 0.6, generator=torch.Generator().manual_seed(0))
    assert len(steps) == 6 and len(set(steps)) == 6 and all(0 <= s < 10 for s in steps)
    with pytest.raises(ValueError, match="Generator"):
        trained_step_indices(10, "window")
    with pytest.raises(ValueError, match="does not fit"):
        trained_step_indices(10, "window", window=(0, 3), window_size=4, generator=torch.Generator())
