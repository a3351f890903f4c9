"""VIEScore and MICo's Weighted-Ref-VIEScore: the score formulas, their versions, and a grouped aggregator.

VIEScore (Ku et al., ACL 2024; the TIGER-AI-Lab/VIEScore code, which GEdit-Bench's evaluation uses with
its "tie" prompts): a multimodal judge rates semantic consistency (SC) and perceptual quality (PQ) on a
0-10 scale, each as a list of sub-scores, and

    SC = min(SC sub-scores),  PQ = min(naturalness, artifacts),  O = sqrt(SC * PQ)      (0-10).

For editing the SC list is [editing success, over-editing]; for text-to-image [prompt following]. GEdit-Bench
reports G_SC, G_PQ, G_O as the mean over its 11 task groups of each group's per-case mean.

Weighted-Ref-VIEScore (MICo, docs/methods/mico.md; the A113N-W3I/MICo-150K `MICo-Bench/eval_score.py` and
`compute_weights.py`): the judge sees [human-verified reference, output] and the prompt, and the output alone:

    SC = sqrt(prompt following * resemblance),  PQ = sqrt(naturalness * artifacts),
    W = (1/N) sum_i s_i over the N source images,  final = W * SC * PQ               (0-100)

with s_i the face score of a human source (ArcFace cosine mapped to a grade, below) or 1/0 from a VLM's
yes/no ("does the element from image 1 appear in image 2?"). Each task reports the mean of its cases;
"overall" is the mean over all cases (not the mean of the task means). The definition changed twice after
the release; `VERSIONS` names them, and every result records the one it used:

- "v3" (commit 7529a82, current): final = W SC PQ on 0-100; faces graded: cos >= 0.45 -> 1, >= 0.30 -> 0.7,
  >= 0.15 -> 0.5, >= 0.05 -> 0.2, else 0.
- "v2" (commit f58070c): final = W SC PQ on 0-100; faces binary (1 if cos >= 0.50 for Human-Centric cases,
  >= 0.45 otherwise).
- "v1" (the release, 1e0ab5d; the paper-era leaderboard): final = W sqrt(SC PQ) on 0-10; faces binary.

Scores on the two scales must never be mixed: `final_scale(version)` says which one a result is on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

SCORE_RANGE = (0.0, 10.0)
VERSIONS: dict[str, dict[str, Any]] = {
    "v3": {"commit": "7529a82", "final": "W*SC*PQ", "scale": 100.0, "faces": "graded"},
    "v2": {"commit": "f58070c", "final": "W*SC*PQ", "scale": 100.0, "faces": "binary"},
    "v1": {"commit": "1e0ab5d", "final": "W*sqrt(SC*PQ)", "scale": 10.0, "faces": "binary"},
}
CURRENT_VERSION = "v3"
FACE_GRADES = ((0.45, 1.0), (0.30, 0.7), (0.15, 0.5), (0.05, 0.2))  # (lower bound of cosine, score), v3
FACE_THRESHOLD_HUMAN_CENTRIC = 0.50  # v1 / v2 binary threshold for Human-Centric cases
FACE_THRESHOLD = 0.45  # v1 / v2 binary threshold for every other task


class ScoreError(ValueError):
    """A judge's scores that cannot be used (wrong count, out of range, not finite)."""


def check_scores(scores: Sequence[float], count: int | None = None, name: str = "scores") -> list[float]:
    """The scores as floats, checked to be `count` finite numbers in 0..10; ScoreError otherwise."""
    values = [float(s) for s in scores]
    if count is not None and len(values) != count:
        raise ScoreError(f"{name}: expected {count} scores, got {len(values)} ({values})")
    if not values:
        raise ScoreError(f"{name}: no scores")
    lo, hi = SCORE_RANGE
    for v in values:
        if not math.isfinite(v) or not lo <= v <= hi:
            raise ScoreError(f"{name}: score {v} is outside {lo:g}..{hi:g}")
    return values


# --------------------------------------------------------------------------- VIEScore


@dataclass(frozen=True)
class VIEScores:
    """One case's VIEScore: SC, PQ and O = sqrt(SC PQ), all on 0-10."""

    sc: float
    pq: float
    o: float


def viescore(sc_scores: Sequence[float], pq_scores: Sequence[float]) -> VIEScores:
    """SC = min(SC sub-scores), PQ = min(PQ sub-scores), O = sqrt(SC * PQ) (VIEScore's `evaluate`)."""
    sc = min(check_scores(sc_scores, name="SC"))
    pq = min(check_scores(pq_scores, name="PQ"))
    return VIEScores(sc=sc, pq=pq, o=math.sqrt(sc * pq))


# --------------------------------------------------------------------------- Weighted-Ref-VIEScore


def check_version(version: str) -> str:
    """`version` if it is one of VERSIONS, else ValueError naming them."""
    if version not in VERSIONS:
        raise ValueError(f"Weighted-Ref-VIEScore version {version!r} is not one of {', '.join(VERSIONS)}")
    return version


def final_scale(version: str) -> float:
    """The top of the final score's scale under `version`: 100 (v2, v3) or 10 (v1)."""
    return float(VERSIONS[check_version(version)]["scale"])


def weighted_ref_sc(prompt_following: float, resemblance: float) -> float:
    """SC = sqrt(PF * SR), the geometric mean of MICo's two SC sub-scores (0-10)."""
    pf, sr = check_scores([prompt_following, resemblance], 2, "SC")
    return math.sqrt(pf * sr)


def weighted_ref_pq(naturalness: float, artifacts: float) -> float:
    """PQ = sqrt(naturalness * artifacts): VIEScore's PQ prompt, combined by a geometric mean (0-10)."""
    nat, art = check_scores([naturalness, artifacts], 2, "PQ")
    return math.sqrt(nat * art)


def face_score(similarity: float, version: str = CURRENT_VERSION, human_centric: bool = False) -> float:
    """A human source's score from the ArcFace cosine of its best-matched output face.

    v3: graded (>= 0.45 -> 1, >= 0.30 -> 0.7, >= 0.15 -> 0.5, >= 0.05 -> 0.2, else 0). v1 / v2: binary,
    1 at or above 0.50 for Human-Centric cases and 0.45 otherwise.
    """
    if VERSIONS[check_version(version)]["faces"] == "binary":
        return (
            1.0 if similarity >= (FACE_THRESHOLD_HUMAN_CENTRIC if human_centric else FACE_THRESHOLD) else 0.0
        )
    for bound, score in FACE_GRADES:
        if similarity >= bound:
            return score
    return 0.0


def preservation_weight(element_scores: Sequence[float]) -> float:
    """W = (1/N) sum_i s_i over the case's N source images (each s_i in [0, 1])."""
    if not element_scores:
        raise ScoreError("W needs at least one source image")
    for s in element_scores:
        if not 0.0 <= float(s) <= 1.0:
            raise ScoreError(f"an element score {s} is outside [0, 1]")
    return float(sum(element_scores)) / len(element_scores)


def weighted_ref_final(weight: float, sc: float, pq: float, version: str = CURRENT_VERSION) -> float:
    """final = W * SC * PQ (v2, v3; 0-100) or W * sqrt(SC * PQ) (v1; 0-10)."""
    if VERSIONS[check_version(version)]["final"] == "W*SC*PQ":
        return weight * sc * pq
    return weight * math.sqrt(sc * pq)


@dataclass(frozen=True)
class WeightedRefScores:
    """One case's Weighted-Ref-VIEScore with its parts and the version it was computed under."""

    weight: float
    sc: float
    pq: float
    final: float
    version: str


def weighted_ref_viescore(
    prompt_following: float,
    resemblance: float,
    naturalness: float,
    artifacts: float,
    element_scores: Sequence[float],
    version: str = CURRENT_VERSION,
) -> WeightedRefScores:
    """The whole Weighted-Ref-VIEScore of one case from the judge's four sub-scores and the element scores."""
    sc = weighted_ref_sc(prompt_following, resemblance)
    pq = weighted_ref_pq(naturalness, artifacts)
    weight = preservation_weight(element_scores)
    return WeightedRefScores(weight, sc, pq, weighted_ref_final(weight, sc, pq, version), version)


# --------------------------------------------------------------------------- aggregation


class GroupedScores(Metric):
    """Per-case scores of a benchmark, kept per group and status; `compute` gives every mean the papers report.

    `update(groups, values, statuses)`: `groups` [N] group indices (into `groups`), `values` [N, K] the K
    named scores of each case (NaN where a case has none: it failed), `statuses` [N] indices into
    `statuses` ("ok" first). `compute()` returns, for each score name k:
    - `<group>/<k>`: the mean over the group's scored cases;
    - `cases/<k>`: the mean over all scored cases (MICo's "overall");
    - `groups/<k>`: the mean of the group means over groups with a scored case (GEdit's G_SC, G_PQ, G_O);
    and counts: `<group>/count`, `count` (scored cases) and `status/<status>` (cases per status, failures
    included). States are concatenated across processes, so DDP ranks add up.
    """

    full_state_update = False

    def __init__(self, groups: Sequence[str], names: Sequence[str], statuses: Sequence[str]) -> None:
        super().__init__()
        if not groups or not names or not statuses or statuses[0] != "ok":
            raise ValueError("GroupedScores needs groups, score names and statuses starting with 'ok'")
        self.groups, self.names, self.statuses = list(groups), list(names), list(statuses)
        self.add_state("group_ids", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("status_ids", default=[], dist_reduce_fx="cat")

    def update(self, groups: Tensor, values: Tensor, statuses: Tensor) -> None:
        """Add N cases: group index [N], scores [N, K] (NaN: none), status index [N]."""
        values = values.to(torch.float64).reshape(len(groups), len(self.names))
        self.group_ids.append(groups.long().reshape(-1))
        self.values.append(values)
        self.status_ids.append(statuses.long().reshape(-1))

    def compute(self) -> dict[str, float]:
        """The group means, the per-case and per-group means, and the counts (see the class docstring)."""
        if not self.group_ids:
            return {"count": 0.0, **{f"status/{s}": 0.0 for s in self.statuses}}
        groups = dim_zero_cat(self.group_ids).cpu()
        values = dim_zero_cat(self.values).cpu().reshape(-1, len(self.names))
        statuses = dim_zero_cat(self.status_ids).cpu()
        scored = (statuses == 0) & ~torch.isnan(values).any(1)
        out: dict[str, float] = {"count": float(scored.sum())}
        for i, status in enumerate(self.statuses):
            out[f"status/{status}"] = float((statuses == i).sum())
        for k, name in enumerate(self.names):
            means = []
            for g, group in enumerate(self.groups):
                mask = scored & (groups == g)
                if mask.any():
                    means.append(float(values[mask, k].mean()))
                    out[f"{group}/{name}"] = means[-1]
            if scored.any():
                out[f"cases/{name}"] = float(values[scored, k].mean())
                out[f"groups/{name}"] = sum(means) / len(means)
        for g, group in enumerate(self.groups):
            out[f"{group}/count"] = float((scored & (groups == g)).sum())
        return out
