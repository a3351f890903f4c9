"""Editing-preference benchmark metrics on hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.preference import (
    EditScoreAccuracy,
    MMRB2Accuracy,
    PreferenceMetrics,
    RankingAccuracy,
    accuracy_without_ties,
    canonical_task,
    group_correct,
    kendall_tau_b,
    ndcg,
    pair_relations,
    pair_stats,
    scalar_judgement,
    tie_calibrated_accuracy,
    top1_correct,
)

H = torch.tensor([1.0, -1.0, 0.0, 1.0])
M = torch.tensor([0.5, 0.2, 0.1, -0.3], dtype=torch.float64)


def test_pair_stats_count_each_cell():
    # eps 0.1: pair 1 agrees (C), pair 2 disagrees (D), pair 3 is a joint tie (T_hm), pair 4 disagrees (D)
    assert pair_stats(H, M, 0.1) == (1, 2, 0, 0, 1)
    # eps 0.2: pair 2 becomes a model-only tie (T_m)
    assert pair_stats(H, M, 0.2) == (1, 1, 0, 1, 1)


def test_tie_calibration_picks_the_smallest_best_epsilon():
    # acc(eps) = (C + T_hm) / 4: eps 0 -> 1/4, 0.1 -> 2/4, 0.2 -> 2/4, 0.3 -> 2/4, 0.5 -> 1/4
    acc, eps = tie_calibrated_accuracy(H, M)
    assert acc == pytest.approx(0.5) and eps == pytest.approx(0.1)


def test_accuracy_without_ties_leaves_human_ties_out_and_counts_model_ties_wrong():
    # eps = -1: C = 1, D = 2 (the human tie is left out) -> 1/3
    assert accuracy_without_ties(H, M) == pytest.approx(1 / 3)
    h, m = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert accuracy_without_ties(h, m) == pytest.approx(0.5)  # a score tie on a strict pair is wrong


def test_pair_relations_follow_tiers_and_put_unscored_last():
    h, m = pair_relations(torch.tensor([3.0, 1.0, 2.0]), [0, 2, 1])
    assert h.tolist() == [1.0, 1.0, -1.0] and m.tolist() == [2.0, 1.0, -1.0]
    h, m = pair_relations(torch.tensor([math.nan, 1.0, math.nan]), [1, 0, 1])
    assert h.tolist() == [-1.0, 0.0, 1.0]
    assert m[0] == -math.inf and m[1] == 0.0 and m[2] == math.inf  # two unscored candidates tie


def test_item_rules_on_a_perfect_and_a_wrong_item():
    perfect, wrong = torch.tensor([3.0, 1.0, 2.0]), torch.tensor([2.0, 1.0, 3.0])
    assert group_correct(perfect, [0, 2, 1], 0.0)
    assert kendall_tau_b(perfect, [0, 2, 1]) == pytest.approx(1.0)
    assert top1_correct(perfect, [0, 2, 1]) and ndcg(perfect, [0, 2, 1]) == pytest.approx(1.0)
    # wrong, tiers [0, 1, 2]: pairs C, D, D -> tau = (1 - 2) / sqrt(3 * 3) = -1/3; argmax is the worst
    assert not group_correct(wrong, [0, 1, 2], 0.0)
    assert kendall_tau_b(wrong, [0, 1, 2]) == pytest.approx(-1 / 3)
    assert not top1_correct(wrong, [0, 1, 2])
    # gains 2^rel - 1 = [3, 1, 0]; model order 2, 0, 1: DCG = 0 + 3/log2(3) + 1/log2(4) = 2.3927893,
    # IDCG = 3 + 1/log2(3) = 3.6309298
    assert ndcg(wrong, [0, 1, 2]) == pytest.approx(2.3927893 / 3.6309298, abs=1e-6)


def test_a_human_tie_is_right_only_within_epsilon():
    assert group_correct(torch.tensor([1.0, 2.0]), [0, 0], 1.0)
    assert not group_correct(torch.tensor([1.0, 2.0]), [0, 0], 0.5)
    assert not group_correct(torch.tensor([2.0, 2.0]), [0, 1], -1.0)  # exact match: a score tie is wrong


def test_ranking_accuracy_metric_over_items_and_per_k():
    metric = RankingAccuracy()
    metric.update([torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 2.0])], [[0, 2, 1], [0, 0]])
    out = metric.compute()
    # pairs: three right strict pairs + one human tie with |m| = 1: eps* = 1 makes it a joint tie, but
    # also turns the strict pairs with |m| = 1 into model ties: acc(0) = 3/4, acc(1) = (1 + 1) / 4
    assert out["pair_accuracy"].item() == pytest.approx(0.75) and out["epsilon"].item() == 0.0
    assert out["group_accuracy"].item() == pytest.approx(0.5)  # the tied pair is outside eps* = 0
    assert out["k3/group_accuracy"].item() == 1.0 and out["k2/items"].item() == 1.0
    assert out["unscored"].item() == 0


def test_canonical_task_names():
    assert canonical_task("Color_Alter") == "color"
    assert canonical_task("subject-add") == "subject_add"
    assert canonical_task("Subject Replace") == "subject_replace"
    assert canonical_task("ps_human") == "ps_human"
    with pytest.raises(ValueError, match="13"):
        canonical_task("rotate")


def test_editscore_macro_per_task_with_ties_wrong():
    metric = EditScoreAccuracy()
    scores = [
        torch.tensor([2.0, 1.0]),
        torch.tensor([1.0, 1.0]),
        torch.tensor([3.0, 0.0]),
        torch.tensor([0.0, 1.0]),
    ]
    tiers = [[0, 1], [0, 1], [0, 1], [0, 1]]
    tasks = ["color", "color", "style", "style"]
    dims = ["prompt_following", "prompt_following", "prompt_following", "consistency"]
    metric.update(scores, tiers, tasks, dims)
    out = {k: float(v) for k, v in metric.compute().items()}
    # prompt_following: color 1/2 (the tie is wrong), style 1/1 -> macro 0.75; consistency: style 0/1
    assert out["prompt_following/color"] == 0.5 and out["prompt_following/style"] == 1.0
    assert out["prompt_following/macro"] == pytest.approx(0.75)
    assert out["prompt_following/group/appearance"] == pytest.approx(0.75)
    assert out["consistency/macro"] == 0.0 and out["macro"] == pytest.approx(0.375)


def test_mmrb2_counts_both_orders():
    metric = MMRB2Accuracy()
    # pair 1: forward A (right); swapped judge says its A (= original B) -> flipped B (wrong)
    # pair 2: forward tie (evaluated, wrong), reverse missing
    metric.update(["A", "tie"], ["A", None], ["A", "B"])
    out = metric.compute()
    assert out["accuracy"].item() == pytest.approx(1 / 3)
    assert out["evaluated"].item() == 3 and out["missing"].item() == 1
    assert scalar_judgement(1.0, 1.0) == "tie" and scalar_judgement(math.nan, 0.0) == "B"


def test_preference_metrics_route_by_benchmark_and_render_a_table():
    metrics = PreferenceMetrics()
    metrics.update(
        [torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])],
        [[0, 1], [0, 1], [1, 0]],
        [
            {"benchmark": "editscore_bench", "task_type": "color", "dimension": "overall"},
            {"benchmark": "mmrb2"},
            {"benchmark": "mer_bench"},
        ],
    )
    values, table = metrics.compute()
    assert values["pair_accuracy"] == pytest.approx(2 / 3)
    assert values["editscore/overall/color"] == 1.0
    assert values["mmrb2/accuracy"] == 0.0 and values["mmrb2/evaluated"] == 2
    assert values["mer_bench/exact_match"] == 1.0
    assert "### mer_bench" in table and "### editscore_bench" in table and "MMRB2" in table
    assert "synth" not in values and "synth/items" not in values
