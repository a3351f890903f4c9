"""MICo mini-replication: do VIEScore and Weighted-Ref-VIEScore with a small local judge rank editors as the
exact quality does?

MICo (docs/methods/mico.md) introduces Weighted-Ref-VIEScore to score multi-image compositions. Here the
generated compositions of `omnilab data synth multiref` have exact targets, so quality is known:
- three "checkpoints" of different quality are simulated editors that return the exact target corrupted
  by a draw from their own distribution: each placed object dropped (its box painted with the clean
  background) with probability p, Gaussian blur of std b px, Gaussian noise of std s (good: p 0.05,
  b 0-0.3, s 2-8; medium: p 0.3, b 0.3-1, s 8-20; poor: p 0.6, b 0.8-1.6, s 18-40). They are simulated, not
  trained models: tiny editors trained on CPU all produce noise, which ranks nothing;
- the exact metric of an output is its PSNR against the exact target;
- the judge is a small Qwen2.5-VL (random init, 2 layers of width 64, offline tokenizer) trained a little
  (teacher forcing, `--steps` steps) on outputs of held-out cases at random corruption levels, to answer
  MICo-Bench's SC prompt with [prompt following, resemblance], its PQ prompt with [naturalness, artifacts]
  and its element prompt with yes/no, where the labels follow from the corruption (pf = 10 x kept share,
  sr = pf x the noise and blur factor, naturalness from blur, artifacts from noise; yes iff kept);
- both metrics read the same judge answers on the test outputs: Weighted-Ref-VIEScore = W sqrt(pf sr)
  sqrt(nat art) (v3, W = share of "yes"), VIEScore's aggregation = sqrt(min(pf, sr) min(nat, art)) (no W).
Reported per seed: the share of answers that parse, Spearman's rho of each metric with PSNR over all
outputs, the checkpoint order (Kendall's tau of the three checkpoint means against the PSNR means), the
same for the untrained judge (the trivial baseline: random answers), for the trained judge shown a flat
grey image instead of each output ("blind": does it use its inputs?), and for the labels themselves
(an oracle judge: the best these sub-scores can do).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats

from benchmarks.common import record
from datamodules.synth.multiref import background, make_compose
from metrics.viescore import weighted_ref_final
from omnilab.chat import user_message
from omnilab.seeding import numpy_rng
from rewards.judges import LocalVLMJudge
from rewards.viescore import (
    MICO_ELEMENT_PROMPT,
    MICO_PQ_PROMPT,
    MICO_SC_PROMPT,
    AnswerError,
    parse_scores,
    parse_yes_no,
)

CHECKPOINTS = {
    "good": {"drop": 0.05, "blur": (0.0, 0.3), "noise": (2.0, 8.0)},
    "medium": {"drop": 0.3, "blur": (0.3, 1.0), "noise": (8.0, 20.0)},
    "poor": {"drop": 0.6, "blur": (0.8, 1.6), "noise": (18.0, 40.0)},
}
JUDGE = {
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
    "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4},
}  # fmt: skip
SIDE = 112  # images reach the judge at most 112 px a side (8x8 patches of 14 px)


def make_case(seed: int, split: str, index: int) -> dict[str, Any]:
    """A generated composition (2-3 references) with its exact target and clean background."""
    rng = numpy_rng(seed, "mico-judge", split, index)
    instruction, refs, target, fields = make_compose(rng, int(rng.integers(2, 4)))
    h, w = target.shape[:2]
    placed = [o for o in fields["objects"] if o["source"].startswith("image ") and o["bbox"]]
    return {"instruction": instruction, "refs": refs, "target": target, "placed": placed,
            "clean": background(fields["background"], w, h)}  # fmt: skip


def corrupt(case: dict[str, Any], level: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """An editor's output: the exact target with objects dropped, blurred, noised; and what was done."""
    out = case["target"].astype(np.float64)
    kept = []
    for obj in case["placed"]:
        keep = bool(rng.random() >= level["drop"])
        if not keep:
            x0, y0, x1, y1 = obj["bbox"]
            out[y0:y1, x0:x1] = case["clean"][y0:y1, x0:x1]
        kept.append(keep)
    blur, noise = float(rng.uniform(*level["blur"])), float(rng.uniform(*level["noise"]))
    if blur > 0:
        out = ndimage.gaussian_filter(out, sigma=(blur, blur, 0))
    out = np.clip(out + rng.normal(0, noise, out.shape), 0, 255).round().astype(np.uint8)
    mse = float(((out.astype(np.float64) - case["target"]) ** 2).mean())
    return out, {"kept": kept, "blur": blur, "noise": noise, "psnr": 10 * math.log10(255**2 / max(mse, 1e-6))}


def labels(info: dict[str, Any]) -> dict[str, Any]:
    """The sub-scores an ideal judge would give (0-10 integers) and the element answers."""
    share = sum(info["kept"]) / max(1, len(info["kept"]))
    clarity = max(0.0, 1 - info["noise"] / 50 - info["blur"] / 3)
    pf = round(10 * share)
    return {"pf": pf, "sr": round(pf * clarity), "nat": round(10 * max(0.0, 1 - info["blur"] / 2)),
            "art": round(10 * math.exp(-info["noise"] / 25)), "kept": info["kept"]}  # fmt: skip


def requests(case: dict[str, Any], output: np.ndarray) -> list[list[dict[str, Any]]]:
    """MICo-Bench's SC, PQ and one element request per placed object's reference."""
    sc = [
        user_message(
            MICO_SC_PROMPT.format(prompt=case["instruction"]), [case["target"], output], max_side=SIDE
        )
    ]
    pq = [user_message(MICO_PQ_PROMPT, [output], max_side=SIDE)]
    refs = [case["refs"][int(o["source"].split()[1]) - 1] for o in case["placed"]]
    return [sc, pq, *([user_message(MICO_ELEMENT_PROMPT, [r, output], max_side=SIDE)] for r in refs)]


def answers(label: dict[str, Any]) -> list[str]:
    """The training answers of one output's requests."""
    return [f"[{label['pf']}, {label['sr']}]", f"[{label['nat']}, {label['art']}]",
            *("yes" if k else "no" for k in label["kept"])]  # fmt: skip


def train_judge(judge: LocalVLMJudge, seed: int, steps: int, pairs: int, lr: float) -> float:
    """Teacher-force the judge on held-out outputs at random corruption levels; returns the last losses' mean."""
    rng = numpy_rng(seed, "mico-judge", "train-levels")
    examples = []
    for i in range(pairs):
        case = make_case(seed, "train", i)
        level = CHECKPOINTS[str(rng.choice(list(CHECKPOINTS)))]
        output, info = corrupt(case, level, rng)
        examples.extend(zip(requests(case, output), answers(labels(info))))
    model = judge.load().model.train()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps)
    )
    losses = []
    for _ in range(steps):
        messages, answer = examples[int(rng.integers(len(examples)))]
        loss = model(**judge.encode(messages, answer)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return float(np.mean(losses[-50:]))


def judged(
    judge: Any, case: dict[str, Any], output: np.ndarray, blind: bool = False
) -> dict[str, float] | None:
    """VIEScore's and Weighted-Ref-VIEScore's values of one output from the judge's answers (None: unparsed)."""
    shown = np.full_like(output, 128) if blind else output
    results = judge.complete_many(requests(case, shown))
    try:
        pf, sr = parse_scores(results[0].text, 2)
        nat, art = parse_scores(results[1].text, 2)
        found = [parse_yes_no(r.text) for r in results[2:]]
    except (AnswerError, AttributeError):
        return None
    return scores(pf, sr, nat, art, found)


def scores(pf: float, sr: float, nat: float, art: float, found: list[bool]) -> dict[str, float]:
    """The two metrics from four sub-scores and the element answers."""
    w = sum(found) / max(1, len(found))
    return {"viescore": math.sqrt(min(pf, sr) * min(nat, art)),
            "weighted_ref": weighted_ref_final(w, math.sqrt(pf * sr), math.sqrt(nat * art), "v3")}  # fmt: skip


def agreement(rows: list[dict[str, Any]], key: str) -> tuple[float, float, int]:
    """(Spearman rho with PSNR over outputs, Kendall tau of the checkpoint means, outputs scored)."""
    scored = [r for r in rows if r.get(key) is not None]
    if len(scored) < 3:
        return math.nan, math.nan, len(scored)
    rho = stats.spearmanr([r[key] for r in scored], [r["psnr"] for r in scored]).statistic
    means = [np.mean([r[key] for r in scored if r["ckpt"] == c] or [math.nan]) for c in CHECKPOINTS]
    exact = [np.mean([r["psnr"] for r in rows if r["ckpt"] == c]) for c in CHECKPOINTS]
    tau = stats.kendalltau(means, exact).statistic if not any(map(math.isnan, means)) else math.nan
    return float(rho), float(tau), len(scored)


def run_seed(
    seed: int, cases: int, steps: int, pairs: int, lr: float, blind_cases: int = 8
) -> dict[str, Any]:
    """One seed: train the judge, score the three checkpoints' outputs, compare with PSNR."""
    torch.manual_seed(seed)
    rng = numpy_rng(seed, "mico-judge", "checkpoints")
    test = [make_case(seed, "test", i) for i in range(cases)]
    outputs = [
        (c, name, *corrupt(case, level, rng))
        for c, case in enumerate(test)
        for name, level in CHECKPOINTS.items()
    ]
    judge = LocalVLMJudge(config=JUDGE, tokenizer={"vocab_size": 512}, max_new_tokens=8, device="cpu",
                          max_pixels=SIDE * SIDE)  # fmt: skip
    baseline = [
        judged(judge, test[c], out) for c, _, out, _ in outputs[:12]
    ]  # untrained: the trivial baseline
    start = time.perf_counter()
    loss = train_judge(judge, seed, steps, pairs, lr)
    train_s = time.perf_counter() - start
    rows = []
    for c, name, out, info in outputs:
        lab = labels(info)
        row: dict[str, Any] = {"ckpt": name, "psnr": info["psnr"]}
        got = judged(judge, test[c], out)
        blind = judged(judge, test[c], out, blind=True) if c < blind_cases else None
        oracle = scores(lab["pf"], lab["sr"], lab["nat"], lab["art"], lab["kept"])
        for key in ("viescore", "weighted_ref"):
            row[key] = got[key] if got else None
            row[f"blind_{key}"] = blind[key] if blind else None
            row[f"oracle_{key}"] = oracle[key]
        rows.append(row)
    out: dict[str, Any] = {"seed": seed, "loss": loss, "train_s": train_s,
                           "baseline_parsed": sum(b is not None for b in baseline) / len(baseline)}  # fmt: skip
    for key in ("viescore", "weighted_ref", "blind_viescore", "blind_weighted_ref", "oracle_viescore",
                "oracle_weighted_ref"):  # fmt: skip
        out[f"{key}_rho"], out[f"{key}_tau"], out[f"{key}_n"] = agreement(rows, key)
    out["parsed"] = out["weighted_ref_n"] / len(rows)
    out["psnr_means"] = {c: float(np.mean([r["psnr"] for r in rows if r["ckpt"] == c])) for c in CHECKPOINTS}
    return out


def mean_sd(values: list[float]) -> str:
    """'mean ± sd' over seeds (NaN-aware)."""
    v = np.array([x for x in values if not math.isnan(x)])
    return f"{v.mean():.3f} ± {v.std():.3f} (n={len(v)})" if len(v) else "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnilab bench mico_judge_replication")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cases", type=int, default=16, help="test compositions per seed (x 3 checkpoints)")
    parser.add_argument("--blind-cases", type=int, default=8, help="test compositions also judged blind")
    parser.add_argument("--steps", type=int, default=2000, help="judge training steps")
    parser.add_argument("--pairs", type=int, default=200, help="training outputs (held-out cases)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning on a busy CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        result = run_seed(seed, args.cases, args.steps, args.pairs, args.lr, args.blind_cases)
        print({k: v for k, v in result.items()}, flush=True)
        results.append(result)
    rows = []
    for label, key in [("Weighted-Ref-VIEScore, trained judge", "weighted_ref"), ("VIEScore, trained judge", "viescore"),
                       ("Weighted-Ref-VIEScore, blind trained judge", "blind_weighted_ref"),
                       ("VIEScore, blind trained judge", "blind_viescore"),
                       ("Weighted-Ref-VIEScore, oracle sub-scores", "oracle_weighted_ref"),
                       ("VIEScore, oracle sub-scores", "oracle_viescore")]:  # fmt: skip
        rows.append({"metric (judge)": label,
                     "Spearman rho vs PSNR": mean_sd([r[f"{key}_rho"] for r in results]),
                     "checkpoint order, Kendall tau": mean_sd([r[f"{key}_tau"] for r in results]),
                     "outputs scored": mean_sd([float(r[f"{key}_n"]) for r in results])})  # fmt: skip
    psnr = {c: np.mean([r["psnr_means"][c] for r in results]) for c in CHECKPOINTS}
    notes = (
        f"Seeds {args.seeds}; per seed {args.cases} test compositions x 3 simulated checkpoints (blind: the "
        f"first {args.blind_cases}); the judge "
        f"trained {args.steps} steps on {args.pairs} held-out outputs (lr {args.lr}). Mean PSNR of the checkpoints: "
        + ", ".join(f"{c} {v:.1f} dB" for c, v in psnr.items())
        + ". Share of answers the trained judge gave that parse (all of an output's answers): "
        + mean_sd([r["parsed"] for r in results])
        + "; untrained judge (the trivial baseline): "
        + mean_sd([r["baseline_parsed"] for r in results])
        + ". Final training loss: "
        + mean_sd([r["loss"] for r in results])
        + ". Blind: the same trained judge shown a flat grey image instead of each output, so a metric that "
        "ranks no better blind than with the image says the judge does not use the image. Oracle: the metrics "
        "computed from the training labels themselves (what a perfect judge of these sub-scores would give)."
    )
    metrics = {
        f"{k}_rho": float(np.nanmean([r[f"{k}_rho"] for r in results])) for k in ("weighted_ref", "viescore")
    }
    record(
        "mico_judge_replication",
        "MICo mini-replication: judged metrics vs exact quality",
        rows,
        notes,
        metrics,
    )
