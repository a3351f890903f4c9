"""Editing benchmarks as `omnilab test`: any trained editing checkpoint, judged by VIEScore or Weighted-Ref-VIEScore.

`EditBench` wraps an editor (a `FlowEdit`-like module with `sample(refs, instructions, size, steps, guidance,
generator)`) and a judge (rewards/judges.py). For each batch of benchmark cases (datamodules/bench.py) it
resizes the sources under the editor's reference budget, generates the outputs, saves them in the
benchmark's official layout, and hands the batch to a background thread that asks the judge (all of the
batch's requests at once, `judge.concurrency` in flight) and writes one JSON per case; generation of the
next batch overlaps the judging. At the end it aggregates (metrics/viescore.py `GroupedScores`), logs the
means, writes `summary.json` and `summary.md`, and logs them and a sample grid per group to MLflow.

- MICo-Bench (`metric: weighted_ref`, docs/methods/mico.md): per task file and per category the mean of
  the cases' final scores; "cases" = the mean over all cases (the paper's overall); the version of the
  Weighted-Ref-VIEScore definition is recorded in every case and the summary.
- GEdit-Bench (`metric: viescore`): per language and task group the means of SC, PQ, O; "groups" = the mean
  of the group means (G_SC, G_PQ, G_O as Step1X-Edit's `calculate_statistics.py` computes them), also on the
  intersection subset.

Where the editor comes from (first that applies): `--ckpt_path` (`make eval EXP=mico/bench CKPT=...`: the
editor is rebuilt from the checkpoint's own hyperparameters, so any trained FlowEdit checkpoint works),
`init_checkpoint` (trained first with `init_experiment` when missing), `editor` (an experiment name such as
"unipic2/kontext_tiny" or a {class_path, init_args} dict; random init unless its config loads weights),
or `outputs_dir` (images generated elsewhere, in the benchmark's layout: no editor at all).

Resuming: every judge answer is cached on disk by the judge (`cache_dir`), so a rerun after a crash (or a
rerun of the same outputs) asks the judge nothing it answered before: generation is deterministic per case
(noise seeded by (seed, case id)), so the same requests come back. Point `outputs_dir` at a previous run's
`<out_dir>/outputs` to skip generation too. Failures (a missing image, a judge timeout, an unreadable or
out-of-range answer, a face model error) are recorded per case and counted in the summary.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import yaml
from torch import Tensor

from callbacks.images import make_grid, to_pil
from datamodules.bench import GEDIT_GROUPS, MICO_TASKS
from datamodules.budget import BudgetError, fit_to_budget
from datamodules.mico import CATEGORIES
from datamodules.multiref import resize_image
from metrics.viescore import CURRENT_VERSION, GroupedScores, check_version
from omnilab.allowlist import check_import_path
from omnilab.chat import ChatClient
from omnilab.seeding import torch_generator
from rewards.faces import FaceMatcher
from rewards.judges import LocalVLMJudge
from rewards.viescore import Case, EditScorer, WeightedRefScorer

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
STATUSES = (
    "ok", "missing_image", "generation_failed", "timeout", "http_error", "connection", "bad_response",
    "judge_error", "not_json", "wrong_count", "out_of_range", "bad_answer", "face_error",
)  # fmt: skip
NAMES = {"viescore": ("sc", "pq", "o"), "weighted_ref": ("weight", "sc", "pq", "final")}


# --------------------------------------------------------------------------- building the editor


def experiment_model(name: str) -> dict[str, Any]:
    """The `model:` section of experiments/<name>.yaml after its `defaults` fragments (dicts merged deeply)."""
    from omnilab.cli import expand_defaults

    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"editor experiment {name!r}: {path} does not exist")
    model: dict[str, Any] = {}
    for config in expand_defaults(["--config", str(path)])[1::2]:
        section = (yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}
        model = _merge(model, section)
    if "class_path" not in model:
        raise ValueError(f"editor experiment {name!r} has no model class_path")
    return model


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def build_editor(spec: dict[str, Any]) -> L.LightningModule:
    """An editing module from {class_path, init_args} (the class path must be allowlisted), weights built."""
    class_path = spec.get("class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise ValueError(f"editor spec needs a class_path, got {spec!r:.120}")
    check_import_path(class_path)
    module, _, name = class_path.rpartition(".")
    editor = getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))
    if not callable(getattr(editor, "sample", None)):
        raise TypeError(f"{class_path} has no sample(refs, instructions, ...): it cannot be benchmarked")
    editor.configure_model()
    return editor


def editor_from_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The {class_path, init_args} of the module a Lightning checkpoint was saved from (its hyperparameters)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path")
    if not isinstance(class_path, str):
        raise ValueError(
            "the checkpoint does not name its module class (hyper_parameters._class_path, which `omnilab fit` "
            "saves): give the editor's config as model.init_args.editor"
        )
    init_args = {k: v for k, v in hparams.items() if not k.startswith("_")}
    return {"class_path": class_path, "init_args": init_args}


def load_editor_weights(editor: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Load a checkpoint's state dict into the editor (its own `on_load_checkpoint` first, as Lightning does)."""
    checkpoint = {**checkpoint, "state_dict": dict(checkpoint.get("state_dict") or {})}
    editor.on_load_checkpoint(checkpoint)
    editor.load_state_dict(checkpoint["state_dict"], strict=True)


# --------------------------------------------------------------------------- the module


class EditBench(L.LightningModule):
    """Benchmark an editing model with a judge (`omnilab test` only; see the module docstring).

    Args:
        judge: The judge: `omnilab.chat.ChatClient` (any OpenAI-compatible server) or
            `rewards.judges.LocalVLMJudge` (in process). Required to test.
        metric: "weighted_ref" (MICo-Bench) or "viescore" (GEdit-Bench, edits of generated data).
        editor: The editing model: an experiment name ("unipic2/kontext_tiny") or a {class_path, init_args}
            dict. A `--ckpt_path` replaces it with the checkpoint's own module (its saved hyperparameters).
        init_checkpoint: A Lightning checkpoint of the editor to load (its architecture from `editor`, else
            from the checkpoint's hyperparameters).
        init_experiment: The experiment whose fit writes `init_checkpoint` when it is missing.
        outputs_dir: Read the outputs from here (the benchmark's layout) instead of generating them.
        faces: The face model of MICo's weight (`rewards.faces.FaceMatcher`); None: cases with human
            sources are recorded as "face_error" unless `weight` is "vlm" or "one".
        element_judge: The judge of MICo's yes/no element checks (officially a local Qwen3-VL-30B-A3B);
            None: `judge`.
        version: The Weighted-Ref-VIEScore definition ("v3" current, "v2", "v1"; metrics/viescore.py).
        weight: MICo's W: "official" (faces + VLM yes/no), "vlm" (yes/no for every source) or "one".
        max_side: Images sent to the judge are downscaled to this longer side (None: as they are).
        budget: The editor's joint reference budget B (B² pixels for all sources), `datamodules.budget`.
        target_budget: The output's budget; the output takes the first source's aspect.
        budget_mode: How the sources share the budget ("joint", "equal", "independent", "table").
        multiple: Every side is a multiple of this (the editor's pixels per token, or a multiple of it).
        steps: Sampling steps (None: the editor's default).
        guidance: Guidance scale (None: the editor's default).
        seed: Seed of the per-case noise.
        out_dir: Where outputs, per-case JSON and the summary go (default `<default_root_dir>/bench`).
        grid_k: Cases per group in the logged sample grids (0: none).
    """

    test_only = True

    def __init__(
        self,
        judge: ChatClient | LocalVLMJudge | None = None,
        metric: Literal["weighted_ref", "viescore"] = "weighted_ref",
        editor: str | dict[str, Any] | None = None,
        init_checkpoint: str | None = None,
        init_experiment: str | None = None,
        outputs_dir: str | None = None,
        faces: FaceMatcher | None = None,
        element_judge: ChatClient | LocalVLMJudge | None = None,
        version: str = CURRENT_VERSION,
        weight: Literal["official", "vlm", "one"] = "official",
        max_side: int | None = 1024,
        budget: int = 1024,
        target_budget: int = 1024,
        budget_mode: str = "joint",
        multiple: int = 32,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        out_dir: str | None = None,
        grid_k: int = 4,
    ) -> None:
        super().__init__()
        if metric not in NAMES:
            raise ValueError(f"metric {metric!r}: choose weighted_ref or viescore")
        self.save_hyperparameters(ignore=["judge", "faces", "element_judge"])
        self.element_judge = element_judge
        self.judge, self.faces, self.metric, self.version = judge, faces, metric, check_version(version)
        self.editor_spec, self.init_checkpoint, self.init_experiment = (
            editor,
            init_checkpoint,
            init_experiment,
        )
        self.outputs_dir, self.weight, self.max_side = outputs_dir, weight, max_side
        self.budget, self.target_budget, self.budget_mode, self.multiple = (
            budget,
            target_budget,
            budget_mode,
            multiple,
        )
        self.steps, self.guidance, self.seed, self.out_dir_arg, self.grid_k = (
            steps,
            guidance,
            seed,
            out_dir,
            grid_k,
        )
        self.editor: L.LightningModule | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    # --- building ----------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the editor from `init_checkpoint` or `editor` (a `--ckpt_path` editor is built on load)."""
        if self.editor is not None or self.outputs_dir is not None:
            return
        if self.init_checkpoint is not None:
            from lightning_modules.flow_grpo import ensure_init_checkpoint
            from omnilab.runs import resolve_latest

            trainer = self._trainer
            if trainer is None or trainer.is_global_zero:
                ensure_init_checkpoint(self.init_checkpoint, self.init_experiment, ["--trainer.logger=false"])
            if trainer is not None:
                trainer.strategy.barrier("edit_bench_init_checkpoint")
            path = resolve_latest(self.init_checkpoint)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            spec = self._spec() if self.editor_spec is not None else editor_from_checkpoint(checkpoint)
            self.editor = build_editor(spec)
            load_editor_weights(self.editor, checkpoint)
        elif self.editor_spec is not None:
            self.editor = build_editor(self._spec())

    def _spec(self) -> dict[str, Any]:
        spec = self.editor_spec
        return experiment_model(spec) if isinstance(spec, str) else dict(spec or {})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """`--ckpt_path` of an editing run: build the editor from the checkpoint and load its weights into it."""
        state = checkpoint.get("state_dict") or {}
        if any(k.startswith("editor.") for k in state):
            return  # a checkpoint of this module itself
        hparams = checkpoint.get("hyper_parameters") or {}
        if "_class_path" in hparams or self.editor is None:
            self.editor = build_editor(editor_from_checkpoint(checkpoint))
        sub = {**checkpoint, "state_dict": dict(state)}
        self.editor.on_load_checkpoint(sub)
        checkpoint["state_dict"] = {f"editor.{k}": v for k, v in sub["state_dict"].items()}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Not trainable: a benchmark only tests."""
        raise RuntimeError("EditBench only tests: run `omnilab test` / `make eval EXP=... CKPT=...`")

    def configure_optimizers(self) -> Any:
        """None (a benchmark only tests)."""
        return None

    # --- paths -------------------------------------------------------------------------------------------

    @property
    def out_dir(self) -> Path:
        """Where the outputs, per-case JSON and the summary go."""
        root = self._trainer.default_root_dir if self._trainer is not None else "."
        return Path(self.out_dir_arg or Path(root) / "bench")

    def output_path(self, case: dict[str, Any], root: Path) -> Path:
        """A case's output image in the benchmark's layout (MICo: <task>/<id>.png; GEdit: fullset/...)."""
        cid = str(case["case_id"]).replace("/", "_")
        if self._benchmark == "gedit":
            return root / "fullset" / case["group"] / case["language"] / f"{cid}.png"
        return root / case["group"] / f"{cid}.png"

    def case_path(self, case: dict[str, Any]) -> Path:
        """The per-case JSON of a case."""
        cid = str(case["case_id"]).replace("/", "_")
        lang = [case["language"]] if self._benchmark == "gedit" else []
        return self.out_dir.joinpath("cases", case["group"], *lang, f"{cid}.json")

    # --- testing -----------------------------------------------------------------------------------------

    def on_test_start(self) -> None:
        """Check there is an editor or outputs; set up the aggregators and the judging thread."""
        datamodule = self.trainer.datamodule
        self._benchmark = getattr(datamodule, "benchmark", "shards")
        if self.judge is None:
            raise ValueError("EditBench needs a judge (model.init_args.judge: a ChatClient or LocalVLMJudge)")
        if self.editor is None and self.outputs_dir is None:
            raise ValueError(
                "EditBench has no editor: give --ckpt_path (make eval CKPT=...), model.init_args.init_checkpoint, "
                "model.init_args.editor or model.init_args.outputs_dir"
            )
        groups = list(getattr(datamodule, "groups", []) or ["all"])
        names = NAMES[self.metric]
        if self._benchmark == "gedit":
            partitions = {p: list(GEDIT_GROUPS) for p in ("en", "cn", "en_intersection", "cn_intersection")}
        elif self._benchmark == "mico":
            partitions = {"task": list(MICO_TASKS), "category": list(CATEGORIES)}
        else:
            partitions = {"all": groups}
        self.metrics = {p: GroupedScores(g, names, STATUSES) for p, g in partitions.items()}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
        self._pending = []
        if self.metric == "weighted_ref":
            self.scorer: Any = WeightedRefScorer(
                self.judge, self.faces, self.version, self.weight, self.max_side
            )
        else:
            self.scorer = EditScorer(self.judge, self.max_side)

    def _partitions(self, case: dict[str, Any]) -> list[tuple[str, str]]:
        """(partition, group) pairs a case counts in."""
        if self._benchmark == "gedit":
            out = [(case["language"], case["group"])]
            return out + (
                [(f"{case['language']}_intersection", case["group"])] if case.get("intersection") else []
            )
        if self._benchmark == "mico":
            return [("task", case["group"]), ("category", case["category"])]
        return [("all", case["group"])]

    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> tuple[list[Tensor | None], list[str | None]]:
        """(output or None, failure reason or None) per case: read from `outputs_dir` or sampled by the editor."""
        n = len(batch["case_id"])
        cases = [{k: batch[k][i] for k in batch} for i in range(n)]
        if self.outputs_dir is not None:
            from datamodules.bench import load_image

            outputs = [load_image(str(self.output_path(c, Path(self.outputs_dir)))) for c in cases]
            return outputs, [None if o is not None else "output image not found" for o in outputs]
        assert self.editor is not None
        todo = [i for i, c in enumerate(cases) if c["sources"] and all(s is not None for s in c["sources"])]
        outputs: list[Tensor | None] = [None] * n
        errors: list[str | None] = ["a source image is missing"] * n
        refs, sizes, prompts, generators, keep = [], [], [], [], []
        for i in todo:
            c = cases[i]
            src_sizes = [(s.shape[-1], s.shape[-2]) for s in c["sources"]]
            try:
                ref_sizes = fit_to_budget(
                    src_sizes, self.budget, self.budget_mode, self.multiple, self.multiple, True, "round"
                )
                (out_w, out_h), *_ = fit_to_budget(
                    src_sizes[:1], self.target_budget, "joint", self.multiple, self.multiple, True, "round"
                )
            except (BudgetError, ValueError) as err:
                errors[i] = f"sources do not fit the budget: {err}"
                continue
            refs.append([resize_image(s, size).to(self.device) for s, size in zip(c["sources"], ref_sizes)])
            sizes.append((out_h, out_w))
            prompts.append(c["instruction"])
            generators.append(torch_generator(self.seed, "bench", str(c["case_id"])))
            keep.append(i)
        if keep:
            try:
                images = self.editor.sample(
                    refs, prompts, size=sizes, steps=self.steps, guidance=self.guidance, generator=generators
                )
            except (RuntimeError, ValueError) as err:
                for i in keep:
                    errors[i] = f"generation failed: {type(err).__name__}: {err}"
                return outputs, errors
            for i, image in zip(keep, images):
                outputs[i], errors[i] = image.float().cpu(), None
        return outputs, errors

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Generate the batch's outputs, save them, and queue their judging (runs while the next batch generates)."""
        outputs, errors = self.generate(batch)
        n = len(batch["case_id"])
        cases = [{k: batch[k][i] for k in batch} for i in range(n)]
        for case, output in zip(cases, outputs):
            if output is not None and self.outputs_dir is None:
                path = self.output_path(case, self.out_dir / "outputs")
                path.parent.mkdir(parents=True, exist_ok=True)
                to_pil(output).save(path)
        self._pending.append(self._pool.submit(self._judge, cases, outputs, errors))

    def _judge(
        self, cases: list[dict[str, Any]], outputs: list[Tensor | None], errors: list[str | None]
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Judge the cases that have an output, write each case's JSON, return (case, record) pairs."""
        scored = [i for i, e in enumerate(errors) if e is None]
        judged = self.scorer.score(
            [
                Case(
                    case_id=str(cases[i]["case_id"]),
                    instruction=cases[i]["instruction"],
                    sources=cases[i]["sources"],
                    output=outputs[i],
                    reference=cases[i]["reference"],
                    human=list(cases[i]["human"] or []),
                    human_centric=bool(cases[i]["human_centric"]),
                )
                for i in scored
            ]
        )
        records: list[dict[str, Any]] = []
        for i, case in enumerate(cases):
            if i in scored:
                record = judged[scored.index(i)]
            elif errors[i] and "missing" in errors[i]:
                record = {"status": "missing_image", "error": errors[i]}
            else:
                record = {"status": "generation_failed", "error": errors[i]}
            record = {
                "case_id": str(case["case_id"]),
                "group": case["group"],
                "category": case["category"],
                "language": case["language"],
                "instruction": case["instruction"],
                "metric": self.metric,
                "judge": getattr(self.judge, "model_id", type(self.judge).__name__),
                **({"version": self.version} if self.metric == "weighted_ref" else {}),
                **record,
            }
            path = self.case_path(case)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(path, record)
            records.append(record)
        return list(zip(cases, records))

    def _collect(self) -> None:
        """Wait for the queued judging and feed the aggregators."""
        names = NAMES[self.metric]
        for future in self._pending:
            for case, record in future.result():
                status = (
                    STATUSES.index(record["status"])
                    if record["status"] in STATUSES
                    else STATUSES.index("judge_error")
                )
                values = [record.get(k, math.nan) if record["status"] == "ok" else math.nan for k in names]
                for partition, group in self._partitions(case):
                    metric = self.metrics[partition]
                    if group not in metric.groups:
                        continue
                    metric.update(
                        torch.tensor([metric.groups.index(group)]),
                        torch.tensor([values], dtype=torch.float64),
                        torch.tensor([status]),
                    )
        self._pending = []

    def on_test_epoch_end(self) -> None:
        """Aggregate over ranks, log the means, write summary.json / summary.md and log them with the grids."""
        self._collect()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        summary = {
            "benchmark": self._benchmark,
            "metric": self.metric,
            **({"version": self.version} if self.metric == "weighted_ref" else {}),
            "judge": getattr(self.judge, "model_id", type(self.judge).__name__),
            "judge_stats": dict(getattr(self.judge, "stats", {})),
            "partitions": {},
        }
        for partition, metric in self.metrics.items():
            values = metric.compute()
            summary["partitions"][partition] = values
            for key, value in values.items():
                if math.isfinite(value):
                    self.log(f"test/{partition}/{key}", value, sync_dist=False, rank_zero_only=True)
        if self.trainer.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.out_dir / "summary.json", summary)
            (self.out_dir / "summary.md").write_text(summary_table(summary))
            print(summary_table(summary), flush=True)
            self._log_artifacts()

    def _log_artifacts(self) -> None:
        """The summary and one grid per group (sources | reference | output) as MLflow artifacts."""
        from lightning.pytorch.loggers import MLFlowLogger

        grids = self._grid_images()
        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                for name in ("summary.json", "summary.md"):
                    logger.experiment.log_artifact(logger.run_id, str(self.out_dir / name), "bench")
                for path in grids:
                    logger.experiment.log_artifact(logger.run_id, str(path), "bench/grids")

    def _grid_images(self) -> list[Path]:
        """Draw the sample grids of the first `grid_k` scored cases of each group from the saved outputs."""
        paths: list[Path] = []
        if self.grid_k <= 0:
            return paths
        from datamodules.bench import load_image

        out_root = Path(self.outputs_dir) if self.outputs_dir is not None else self.out_dir / "outputs"
        datamodule = self.trainer.datamodule
        by_group: dict[str, list[tuple[list[Tensor], Tensor, Tensor]]] = {}
        for case in datamodule.cases():
            rows = by_group.setdefault(case["group"], [])
            if len(rows) >= self.grid_k:
                continue
            output = load_image(str(self.output_path(case, out_root)))
            sources = [load_image(s) for s in case["sources"]]
            if output is None or any(s is None for s in sources) or not sources:
                continue
            reference = load_image(case["reference"]) if case["reference"] is not None else sources[0]
            rows.append((sources, reference if reference is not None else sources[0], output))
        for group, rows in by_group.items():
            if rows:
                path = self.out_dir / "grids" / f"{group.replace('/', '_')}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                to_pil(make_grid(rows, cell=128)).save(path)
                paths.append(path)
        return paths

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        """Generate and save the outputs only (no judging): the paths written."""
        outputs, _ = self.generate(batch)
        written = []
        for i, output in enumerate(outputs):
            if output is not None:
                path = self.output_path({k: batch[k][i] for k in batch}, self.out_dir / "outputs")
                path.parent.mkdir(parents=True, exist_ok=True)
                to_pil(output).save(path)
                written.append(str(path))
        return written


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file beside it, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False, default=str)
    os.replace(tmp, path)


def summary_table(summary: dict[str, Any]) -> str:
    """A markdown table per partition: group, scored cases, the means; then the status counts."""
    names = NAMES[summary["metric"]]
    lines = [
        f"# {summary['benchmark']} with {summary['metric']}"
        + (f" ({summary['version']})" if "version" in summary else "")
        + f", judge {summary['judge']}",
        "",
    ]
    for partition, values in summary["partitions"].items():
        lines += [
            f"## {partition}",
            "",
            "| group | cases | " + " | ".join(names) + " |",
            "|---" * (len(names) + 2) + "|",
        ]
        groups = sorted({k.rsplit("/", 1)[0] for k in values if k.endswith("/count") and values[k] > 0})
        for group in [*groups, "cases", "groups"]:
            cells = [f"{values[f'{group}/{n}']:.3f}" if f"{group}/{n}" in values else "" for n in names]
            count = values.get(f"{group}/count", values.get("count", 0.0))
            label = {"cases": "all cases (mean of cases)", "groups": "mean of group means"}.get(group, group)
            lines.append(f"| {label} | {int(count)} | " + " | ".join(cells) + " |")
        statuses = {k.split("/", 1)[1]: int(v) for k, v in values.items() if k.startswith("status/") and v}
        lines += ["", "cases by status: " + ", ".join(f"{k} {v}" for k, v in statuses.items()), ""]
    stats = summary.get("judge_stats") or {}
    if stats:
        lines.append("judge: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    return "\n".join(lines) + "\n"
