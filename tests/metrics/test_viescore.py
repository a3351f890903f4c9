"""VIEScore and Weighted-Ref-VIEScore against values worked by hand from the formulas (MICo-Bench README example)."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.viescore import (
    GroupedScores,
    ScoreError,
    face_score,
    final_scale,
    preservation_weight,
    viescore,
    weighted_ref_final,
    weighted_ref_viescore,
)


def test_viescore_takes_the_min_of_each_list_and_the_geometric_mean():
    # SC = min(7, 9) = 7, PQ = min(8, 6) = 6, O = sqrt(42) = 6.4807...
    s = viescore([7, 9], [8, 6])
    assert (s.sc, s.pq) == (7, 6)
    assert s.o == pytest.approx(6.480740698, abs=1e-8)


def test_viescore_refuses_scores_outside_zero_to_ten():
    with pytest.raises(ScoreError, match="outside"):
        viescore([11, 3], [5, 5])
    with pytest.raises(ScoreError, match="outside"):
        viescore([3], [float("nan"), 5])


def test_weighted_ref_viescore_matches_the_readme_case_on_the_current_scale():
    # README per-case example: W 0.75, PF 9, SR 6 -> SC = sqrt(54) = 7.348; nat 8, art 7 -> PQ = sqrt(56) = 7.483;
    # final = 0.75 * sqrt(54 * 56) = 0.75 * 54.99091 = 41.2432 (the README's 41.23 rounds SC and PQ first)
    s = weighted_ref_viescore(9, 6, 8, 7, [1, 1, 1, 0], version="v3")
    assert s.weight == 0.75
    assert s.sc == pytest.approx(7.348469, abs=1e-6)
    assert s.pq == pytest.approx(7.483315, abs=1e-6)
    assert s.final == pytest.approx(41.24318, abs=1e-4)
    assert s.version == "v3" and final_scale("v3") == 100


def test_the_release_version_takes_one_more_square_root_on_a_0_to_10_scale():
    # v1: 0.75 * sqrt(sqrt(54) * sqrt(56)) = 0.75 * 3024 ** 0.25 = 0.75 * 7.415585 = 5.561689
    assert weighted_ref_final(0.75, math.sqrt(54), math.sqrt(56), "v1") == pytest.approx(5.561689, abs=1e-5)
    assert final_scale("v1") == 10
    with pytest.raises(ValueError, match="not one of"):
        weighted_ref_final(1, 1, 1, "v9")


@pytest.mark.parametrize(
    ("cosine", "grade"),
    [(0.9, 1.0), (0.45, 1.0), (0.449, 0.7), (0.35, 0.7), (0.30, 0.7), (0.2, 0.5), (0.15, 0.5), (0.1, 0.2),
     (0.05, 0.2), (0.0499, 0.0), (-0.3, 0.0)],
)  # fmt: skip
def test_face_score_grades_the_arcface_cosine(cosine, grade):
    assert face_score(cosine, "v3") == grade


def test_face_score_was_binary_before_7529a82_with_a_stricter_human_centric_threshold():
    assert face_score(0.47, "v2", human_centric=True) == 0.0
    assert face_score(0.47, "v2", human_centric=False) == 1.0
    assert face_score(0.50, "v1", human_centric=True) == 1.0
    assert face_score(0.44, "v1") == 0.0


def test_preservation_weight_is_the_mean_element_score_as_in_the_readme():
    # 1 face at cosine 0.35 (-> 0.7), 2 objects found, 1 clothing found, 1 not: (0.7 + 1 + 1 + 1 + 0) / 5 = 0.74
    assert preservation_weight([face_score(0.35), 1, 1, 1, 0]) == pytest.approx(0.74)
    with pytest.raises(ScoreError):
        preservation_weight([])
    with pytest.raises(ScoreError):
        preservation_weight([1.5])


def test_grouped_scores_give_case_mean_group_mean_and_failure_counts():
    metric = GroupedScores(["a", "b"], ["final"], ["ok", "timeout", "bad_answer"])
    metric.update(torch.tensor([0, 0, 1]), torch.tensor([[2.0], [4.0], [9.0]]), torch.tensor([0, 0, 0]))
    metric.update(torch.tensor([1, 1]), torch.tensor([[math.nan], [math.nan]]), torch.tensor([1, 2]))
    out = metric.compute()
    assert out["a/final"] == 3.0 and out["b/final"] == 9.0
    assert out["cases/final"] == 5.0  # (2 + 4 + 9) / 3: MICo's overall
    assert out["groups/final"] == 6.0  # (3 + 9) / 2: GEdit's mean of group means
    assert out["count"] == 3 and out["b/count"] == 1
    assert (out["status/ok"], out["status/timeout"], out["status/bad_answer"]) == (3, 1, 1)
