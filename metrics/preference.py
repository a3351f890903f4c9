"""Editing-preference benchmark metrics as torchmetrics Metrics (docs/methods/jrm.md "Benchmarks").

The scoring rules of the benchmarks the reward-model papers report (a model gives each candidate a
scalar score s; h is the human relation of a pair, +1 when the first candidate is preferred, -1 when
the second is, 0 for a tie; m = s_first - s_second):

- TIGER EditReward-Bench (items of K = 2, 3, 4 candidates with a ranking; ties only at K = 2), as its
  evaluation script computes them:
  - pairwise accuracy with tie calibration (Deutsch et al. 2023): the model calls a pair a tie when
    |m| <= eps; with C / D the pairs where model and human agree / disagree on a strict preference,
    T_h human-only ties, T_m model-only ties and T_hm joint ties,
    acc(eps) = (C + T_hm) / (C + D + T_h + T_m + T_hm), maximised over eps in {0} ∪ {|m|}; the
    maximiser is eps*;
  - pairwise accuracy without ties: C / (C + D + T_m) at eps = -1 (human ties left out; a model score
    tie m = 0 on a strict pair counts as disagreement);
  - strict (group) accuracy: an item counts when every one of its pairs is right: strict pairs with
    h·m > 0, tied pairs with |m| <= eps* (the model's order equals the human order exactly).
- MultiEditReward-Bench (MER): candidates ordered best first, exact-match ranking accuracy with score
  ties counted wrong (the group rule at eps = -1), Kendall tau-b between scores and human order, top-1
  (the model's best is in the human top tier) and NDCG with gains 2^rel - 1, rel = (last tier) - tier,
  discount 1 / log2(rank + 1) (the exact gain MER uses is not in our notes; this is the common form).
- EditScore's EditReward-Bench: pairs (the first preferred) tagged with a dimension (prompt_following,
  consistency, overall) and one of 13 task types; accuracy 1[s1 > s2] (a tie counts wrong), averaged
  within each task type and then macro-averaged over task types, per dimension; also per group of task
  types (object, appearance, scene, advanced: our grouping, not EditScore's published one).
- MMRB2: pairs with `chosen` A or B, judged in both orders; each order counts (correct / evaluated). A
  scalar model judges A when s_A > s_B, B when s_B > s_A, and a tie is evaluated and wrong (the rule
  SpatialReward's script uses for scalar reward models).

A candidate whose score is NaN (a judge answer that did not parse) scores below every other candidate
and two such candidates tie; the number of such candidates is reported (`unscored`).

`PreferenceMetrics` routes each evaluated item to the metrics of its benchmark (the json's "benchmark")
and renders the results as a markdown table.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

BENCHMARKS = ("synth", "editreward_bench", "editscore_bench", "mmrb2", "mer_bench", "other")
EDITSCORE_TASKS = (
    "subject_add", "subject_remove", "subject_replace", "color", "material", "style", "tone",
    "background", "extract", "motion", "ps_human", "text", "compose",
)  # fmt: skip
EDITSCORE_DIMENSIONS = ("prompt_following", "consistency", "overall")
EDITSCORE_GROUPS = {  # our grouping of the 13 task types (assumption: the paper's groups are not in our notes)
    "object": ("subject_add", "subject_remove", "subject_replace", "extract"),
    "appearance": ("color", "material", "style", "tone"),
    "scene": ("background", "compose"),
    "advanced": ("motion", "ps_human", "text"),
}


# --- the per-pair and per-item rules ------------------------------------------------------------------------


def _clean(scores: Tensor) -> Tensor:
    """Scores as fp64 with NaN (unscored) below every real score."""
    scores = scores.double()
    return torch.where(torch.isnan(scores), -math.inf, scores)


def pair_relations(scores: Tensor, tiers: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(h, m) for every pair i < j of one item: h = +1 / -1 / 0 (i better / j better / tie), m = s_i - s_j.

    Two unscored candidates (both -inf) give m = 0.
    """
    s = _clean(scores)
    h, m = [], []
    for i, j in itertools.combinations(range(len(tiers)), 2):
        h.append(float((tiers[i] < tiers[j]) - (tiers[i] > tiers[j])))
        d = s[i] - s[j]
        m.append(0.0 if torch.isnan(d) else float(d))
    return torch.tensor(h, dtype=torch.float64), torch.tensor(m, dtype=torch.float64)


def pair_stats(h: Tensor, m: Tensor, eps: float) -> tuple[int, int, int, int, int]:
    """(C, D, T_h, T_m, T_hm) of human relations h and model differences m at tie threshold eps."""
    human_tie, model_tie = h == 0, m.abs() <= eps
    thm = int((human_tie & model_tie).sum())
    th = int((human_tie & ~model_tie).sum())
    strict = ~human_tie
    tm = int((strict & model_tie).sum())
    c = int((strict & ~model_tie & (h * m > 0)).sum())
    d = int((strict & ~model_tie & (h * m <= 0)).sum())
    return c, d, th, tm, thm


def tie_calibrated_accuracy(h: Tensor, m: Tensor) -> tuple[float, float]:
    """(max over eps of (C + T_hm) / (C + D + T_h + T_m + T_hm), the smallest maximising eps); eps in {0} ∪ |m|."""
    if len(h) == 0:
        return math.nan, 0.0
    best, best_eps = -1.0, 0.0
    for eps in [0.0, *sorted(set(m.abs().tolist()))]:
        c, d, th, tm, thm = pair_stats(h, m, eps)
        acc = (c + thm) / (c + d + th + tm + thm)
        if acc > best:
            best, best_eps = acc, eps
    return best, best_eps


def accuracy_without_ties(h: Tensor, m: Tensor) -> float:
    """C / (C + D + T_m) at eps = -1: human ties left out, a model tie on a strict pair counts wrong."""
    c, d, _, tm, _ = pair_stats(h, m, -1.0)
    return c / (c + d + tm) if c + d + tm else math.nan


def group_correct(scores: Tensor, tiers: Sequence[int], eps: float) -> bool:
    """Whether every pair of the item is right: strict pairs h·m > 0, tied pairs |m| <= eps."""
    h, m = pair_relations(scores, tiers)
    strict_ok = (h * m > 0) | (h == 0)
    tie_ok = (m.abs() <= eps) | (h != 0)
    return bool((strict_ok & tie_ok).all())


def kendall_tau_b(scores: Tensor, tiers: Sequence[int]) -> float:
    """Kendall tau-b between the scores and the human order (-tier): (n_c - n_d) / sqrt((n0 - n1)(n0 - n2)).

    n0 = pairs, n1 = pairs tied in score, n2 = pairs tied by the human; NaN when either side is all ties.
    """
    h, m = pair_relations(scores, tiers)
    sign = torch.sign(m)
    nc, nd = int(((h * sign) > 0).sum()), int(((h * sign) < 0).sum())
    n0 = len(h)
    n1, n2 = int((sign == 0).sum()), int((h == 0).sum())
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return (nc - nd) / denom if denom > 0 else math.nan


def top1_correct(scores: Tensor, tiers: Sequence[int]) -> bool:
    """Whether the model's highest-scored candidate (the first of equals) is in the human top tier."""
    return tiers[int(torch.argmax(_clean(scores)))] == min(tiers)


def ndcg(scores: Tensor, tiers: Sequence[int]) -> float:
    """NDCG = DCG / IDCG, DCG = Σ_rank (2^rel - 1) / log2(rank + 1), rel = max(tier) - tier, model order by score."""
    rel = torch.tensor([max(tiers) - t for t in tiers], dtype=torch.float64)
    gains = 2**rel - 1
    discount = 1 / torch.log2(torch.arange(len(tiers), dtype=torch.float64) + 2)
    order = torch.argsort(_clean(scores), descending=True, stable=True)
    ideal = torch.sort(gains, descending=True).values
    idcg = float((ideal * discount).sum())
    return float((gains[order] * discount).sum()) / idcg if idcg > 0 else math.nan


def scalar_judgement(score_a: float, score_b: float) -> str:
    """A scalar model's pairwise judgement: "A", "B", or "tie" (NaN scores below real ones)."""
    a, b = (-math.inf if math.isnan(x) else x for x in (score_a, score_b))
    return "A" if a > b else "B" if b > a else "tie"


# --- the metrics --------------------------------------------------------------------------------------------


class RankingAccuracy(Metric):
    """TIGER EditReward-Bench / MER-Bench metrics over items of K candidates (see the module doc).

    `update(scores, tiers)`: per item a score Tensor [K] and the human tiers (0 = best). `compute()`:
    {"pair_accuracy", "epsilon", "pair_accuracy_no_ties", "group_accuracy", "exact_match", "kendall_tau",
    "top1", "ndcg", "items", "unscored"} over all items, and the same per K as "k<K>/<name>".
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("tiers", default=[], dist_reduce_fx="cat")
        self.add_state("sizes", default=[], dist_reduce_fx="cat")

    def update(self, scores: Sequence[Tensor], tiers: Sequence[Sequence[int]]) -> None:
        """Add items: their candidates' scores and human tiers."""
        for s, t in zip(scores, tiers):
            if len(s) != len(t) or len(t) < 2:
                raise ValueError(f"an item has {len(s)} scores for {len(t)} candidates (need >= 2, equal)")
            self.scores.append(torch.as_tensor(s, dtype=torch.float32, device=self.device).reshape(-1))
            self.tiers.append(torch.as_tensor(list(t), dtype=torch.float32, device=self.device))
            self.sizes.append(torch.tensor([float(len(t))], device=self.device))

    def items(self) -> list[tuple[Tensor, list[int]]]:
        """The (scores, tiers) of every item seen (all ranks, after a sync)."""
        if not self.sizes or (isinstance(self.sizes, list) and not len(self.sizes)):
            return []
        sizes = dim_zero_cat(self.sizes).long().tolist()
        scores, tiers = dim_zero_cat(self.scores).cpu(), dim_zero_cat(self.tiers).long().cpu()
        out, pos = [], 0
        for k in sizes:
            out.append((scores[pos : pos + k], tiers[pos : pos + k].tolist()))
            pos += k
        return out

    def compute(self) -> dict[str, Tensor]:
        """The metrics over all items and per K."""
        items = self.items()
        out = _ranking_values(items)
        for k in sorted({len(t) for _, t in items}):
            out.update(
                {
                    f"k{k}/{name}": v
                    for name, v in _ranking_values([x for x in items if len(x[1]) == k]).items()
                }
            )
        return {name: torch.tensor(v, dtype=torch.float64) for name, v in out.items()}


def _ranking_values(items: list[tuple[Tensor, list[int]]]) -> dict[str, float]:
    """The RankingAccuracy numbers of a list of items."""
    if not items:
        return {"items": 0.0}
    relations = [pair_relations(s, t) for s, t in items]
    h = torch.cat([r[0] for r in relations])
    m = torch.cat([r[1] for r in relations])
    acc, eps = tie_calibrated_accuracy(h, m)
    taus = [kendall_tau_b(s, t) for s, t in items]
    taus = [x for x in taus if not math.isnan(x)]
    return {
        "pair_accuracy": acc,
        "epsilon": eps,
        "pair_accuracy_no_ties": accuracy_without_ties(h, m),
        "group_accuracy": sum(group_correct(s, t, eps) for s, t in items) / len(items),
        "exact_match": sum(group_correct(s, t, -1.0) for s, t in items) / len(items),
        "kendall_tau": sum(taus) / len(taus) if taus else math.nan,
        "top1": sum(top1_correct(s, t) for s, t in items) / len(items),
        "ndcg": sum(ndcg(s, t) for s, t in items) / len(items),
        "items": float(len(items)),
        "unscored": float(sum(int(torch.isnan(s).sum()) for s, _ in items)),
    }


def canonical_task(task: str) -> str:
    """One of EDITSCORE_TASKS for a task-type string ("Color_Alter", "subject-add", ...); ValueError if none fits."""
    norm = task.strip().lower().replace("-", "_").replace(" ", "_")
    if norm in EDITSCORE_TASKS:
        return norm
    for name in EDITSCORE_TASKS:
        stem = name.split("_")[-1] if name.startswith("subject_") else name
        if name.startswith("subject_") and "subject" in norm and stem in norm:
            return name
        if not name.startswith("subject_") and norm.startswith(stem):
            return name
    raise ValueError(f"task type {task!r} is not one of EditScore's 13: {', '.join(EDITSCORE_TASKS)}")


class EditScoreAccuracy(Metric):
    """EditScore EditReward-Bench: 1[s1 > s2] per pair, mean per task type, macro over task types, per dimension.

    `update(scores, tiers, task_types, dimensions)`: items of 2 candidates with the first preferred
    (tiers [0, 1]; [1, 0] is read the other way round). `compute()`: "<dimension>/macro",
    "<dimension>/<task>", "<dimension>/group/<group>" and "macro" (the mean of the dimensions' macros).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("task", default=[], dist_reduce_fx="cat")
        self.add_state("dimension", default=[], dist_reduce_fx="cat")

    def update(
        self,
        scores: Sequence[Tensor],
        tiers: Sequence[Sequence[int]],
        task_types: Sequence[str],
        dimensions: Sequence[str],
    ) -> None:
        """Add pairs with their task types and dimensions."""
        for s, t, task, dim in zip(scores, tiers, task_types, dimensions):
            if len(t) != 2 or t[0] == t[1]:
                raise ValueError(f"EditScore items are strict pairs, got tiers {list(t)}")
            if dim not in EDITSCORE_DIMENSIONS:
                raise ValueError(f"dimension {dim!r} is not one of {', '.join(EDITSCORE_DIMENSIONS)}")
            first, second = (0, 1) if t[0] < t[1] else (1, 0)
            good, bad = _clean(torch.as_tensor(s))[[first, second]]
            self.correct.append(torch.tensor([float(good > bad)], device=self.device))
            self.task.append(
                torch.tensor([float(EDITSCORE_TASKS.index(canonical_task(task)))], device=self.device)
            )
            self.dimension.append(torch.tensor([float(EDITSCORE_DIMENSIONS.index(dim))], device=self.device))

    def compute(self) -> dict[str, Tensor]:
        """Per-task accuracies, their macro average per dimension, group averages."""
        if not self.correct or (isinstance(self.correct, list) and not len(self.correct)):
            return {}
        correct = dim_zero_cat(self.correct).cpu().double()
        task, dim = dim_zero_cat(self.task).long().cpu(), dim_zero_cat(self.dimension).long().cpu()
        out: dict[str, float] = {}
        macros = []
        for d, dim_name in enumerate(EDITSCORE_DIMENSIONS):
            per_task = {}
            for k, name in enumerate(EDITSCORE_TASKS):
                sel = (dim == d) & (task == k)
                if bool(sel.any()):
                    per_task[name] = float(correct[sel].mean())
            if not per_task:
                continue
            for name, value in per_task.items():
                out[f"{dim_name}/{name}"] = value
            out[f"{dim_name}/macro"] = sum(per_task.values()) / len(per_task)
            macros.append(out[f"{dim_name}/macro"])
            for group, members in EDITSCORE_GROUPS.items():
                values = [per_task[t] for t in members if t in per_task]
                if values:
                    out[f"{dim_name}/group/{group}"] = sum(values) / len(values)
        if macros:
            out["macro"] = sum(macros) / len(macros)
        return {name: torch.tensor(v, dtype=torch.float64) for name, v in out.items()}


class MMRB2Accuracy(Metric):
    """MMRB2: correct / evaluated over both orders of each pair (a "tie" judgement is evaluated and wrong).

    `update(forward, reverse, chosen)`: per pair the judgement with A shown first, the judgement with the
    two swapped (in the swapped naming: "A" = the original B), and the human choice "A" or "B"; a None
    judgement (no answer) is not evaluated and counts as `missing`.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("evaluated", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("missing", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(
        self, forward: Sequence[str | None], reverse: Sequence[str | None], chosen: Sequence[str]
    ) -> None:
        """Add pairs' judgements in both orders."""
        flip = {"A": "B", "B": "A", "tie": "tie"}
        for fwd, rev, gold in zip(forward, reverse, chosen):
            if gold not in ("A", "B"):
                raise ValueError(f"MMRB2 chosen must be 'A' or 'B', got {gold!r}")
            for judgement in (fwd, None if rev is None else flip[rev]):
                if judgement is None:
                    self.missing += 1
                    continue
                if judgement not in flip:
                    raise ValueError(f"an MMRB2 judgement must be A, B, tie or None, got {judgement!r}")
                self.evaluated += 1
                self.correct += float(judgement == gold)

    def compute(self) -> dict[str, Tensor]:
        """{"accuracy", "evaluated", "missing"}."""
        acc = self.correct / self.evaluated if self.evaluated > 0 else torch.tensor(math.nan)
        return {
            "accuracy": acc.double(),
            "evaluated": self.evaluated.double(),
            "missing": self.missing.double(),
        }


class PreferenceMetrics(nn.Module):
    """The metrics of every benchmark, fed item by item and routed by the item json's "benchmark".

    Every item enters `ranking["all"]` and the RankingAccuracy of its benchmark; EditScore items
    (benchmark "editscore_bench", with task_type and dimension) also EditScoreAccuracy, MMRB2 items
    (K = 2) MMRB2Accuracy in both orders from the scalar scores. `compute()` returns flat values
    ({"pair_accuracy": ..., "editreward_bench/k3/group_accuracy": ..., "editscore/prompt_following/macro":
    ..., "mmrb2/accuracy": ...}) and a markdown table of the benchmarks that received items.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ranking = nn.ModuleDict({name: RankingAccuracy() for name in ("all", *BENCHMARKS)})
        self.editscore = EditScoreAccuracy()
        self.mmrb2 = MMRB2Accuracy()

    def update(
        self, scores: Sequence[Tensor], tiers: Sequence[Sequence[int]], metas: Sequence[dict[str, Any]]
    ) -> None:
        """Route each item to its benchmark's metrics."""
        for s, t, meta in zip(scores, tiers, metas):
            bench = meta.get("benchmark") if meta.get("benchmark") in BENCHMARKS else "other"
            self.ranking["all"].update([s], [t])
            self.ranking[bench].update([s], [t])
            if bench == "editscore_bench":
                self.editscore.update([s], [t], [meta["task_type"]], [meta["dimension"]])
            if bench == "mmrb2":
                a, b = float(s[0]), float(s[1])
                chosen = "A" if t[0] < t[1] else "B"
                self.mmrb2.update([scalar_judgement(a, b)], [scalar_judgement(b, a)], [chosen])

    def reset(self) -> None:
        """Forget every item."""
        for metric in (*self.ranking.values(), self.editscore, self.mmrb2):
            metric.reset()

    def compute(self) -> tuple[dict[str, float], str]:
        """(flat values, markdown table); every metric computes on every rank (their syncs must match)."""
        values: dict[str, float] = {}
        sections = []
        with warnings.catch_warnings():  # every rank computes every metric, fed or not (torchmetrics warns)
            warnings.filterwarnings("ignore", message=".*compute.*before the ``update``")
            results = {name: metric.compute() for name, metric in self.ranking.items()}
            editscore_result, mmrb2_result = self.editscore.compute(), self.mmrb2.compute()
        for name, result in results.items():
            result = {k: float(v) for k, v in result.items()}
            if not result.get("items"):
                continue
            prefix = "" if name == "all" else f"{name}/"
            values.update({f"{prefix}{k}": v for k, v in result.items()})
            if name != "all":
                sections.append(_ranking_table(name, result))
        editscore = {k: float(v) for k, v in editscore_result.items()}
        if editscore:
            values.update({f"editscore/{k}": v for k, v in editscore.items()})
            sections.append(_editscore_table(editscore))
        mmrb2 = {k: float(v) for k, v in mmrb2_result.items()}
        if mmrb2["evaluated"] > 0:
            values.update({f"mmrb2/{k}": v for k, v in mmrb2.items()})
            sections.append(
                f"MMRB2 (both orders): accuracy {mmrb2['accuracy']:.4f} over {int(mmrb2['evaluated'])} judgements"
            )
        return values, "\n\n".join(sections)


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _ranking_table(name: str, result: dict[str, float]) -> str:
    """Markdown rows of one benchmark's RankingAccuracy: overall and per K."""
    cols = (
        "pair_accuracy",
        "pair_accuracy_no_ties",
        "group_accuracy",
        "exact_match",
        "kendall_tau",
        "top1",
        "ndcg",
        "items",
    )
    lines = [f"### {name}", "", "| K | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    ks = sorted({key.split("/")[0] for key in result if re.match(r"k\d+/", key)}, key=lambda k: int(k[1:]))
    for label, prefix in [("all", ""), *((k[1:], f"{k}/") for k in ks)]:
        row = [
            _fmt(result.get(f"{prefix}{c}", math.nan))
            if c != "items"
            else str(int(result.get(f"{prefix}{c}", 0)))
            for c in cols
        ]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    if result.get("unscored"):
        lines.append(f"\n{int(result['unscored'])} candidate(s) unscored (the judge's answer did not parse).")
    return "\n".join(lines)


def _editscore_table(result: dict[str, float]) -> str:
    """Markdown rows of EditScore accuracy: per dimension, macro and groups."""
    lines = [
        "### editscore_bench",
        "",
        "| dimension | macro | " + " | ".join(EDITSCORE_GROUPS) + " |",
        "|---" * (len(EDITSCORE_GROUPS) + 2) + "|",
    ]
    for dim in EDITSCORE_DIMENSIONS:
        if f"{dim}/macro" in result:
            groups = [_fmt(result.get(f"{dim}/group/{g}", math.nan)) for g in EDITSCORE_GROUPS]
            lines.append(f"| {dim} | {_fmt(result[f'{dim}/macro'])} | " + " | ".join(groups) + " |")
    return "\n".join(lines)
