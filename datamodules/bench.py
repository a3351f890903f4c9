"""Editing benchmarks as evaluation data: MICo-Bench and GEdit-Bench in their released layouts, and generated cases.

One case is a dict: "case_id", "group" (what a table row reports: MICo's task file, GEdit's task group),
"category" (MICo's seven categories + "dere", datamodules/mico.py), "language" ("en" / "cn"),
"instruction", "sources" (the input images), "reference" (MICo's human-verified reference, or a generated
case's exact target; None for GEdit), "human" (indices of human sources), "human_centric", "intersection"
(GEdit's Intersection_exist), "meta" (the generated data's exact ground truth, or the released record).
Batches keep images as [3, H, W] tensors in [-1, 1] at their original sizes (None for a missing file: the
case is scored as "missing_image", never dropped silently).

Layouts:
- MICo-Bench (A113N-W3I/MICo-150K `MICo-Bench/`, docs/methods/mico.md): `<root>/mico_bench_{object_centric,
  human_centric,hoi,dere}.jsonl`, one record per line {"idx" | "ed_idx", "input": [paths], "reference": path,
  "Task", "editing_type", "prompt", "refined_prompt" (De&Re), "human_indices", "original_idx"}; paths are
  relative to `<root>` (`{task}/{id}/{0..n}.png`, `{task}/{id}/reference.jpg`). De&Re is judged on its
  refined prompt, as the official script does.
- GEdit-Bench (stepfun-ai/GEdit-Bench): `omnilab data convert gedit_bench` turns the released parquet into
  `<root>/cases.jsonl` ({"key", "task_type", "instruction", "instruction_language", "intersection_exist",
  "source"}) and the official folder layout `<root>/fullset/{task_type}/{language}/{key}_SRCIMG.png`.
- Generated (`benchmark: shards`): the test split of multiref / mico shards (`omnilab data synth multiref`
  or `mico`), whose json holds the exact ground truth; the target is the reference.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.mico import category_of
from datamodules.webdataset import expand_shards, iter_raw_samples, synth_wanted

MICO_TASKS = {
    "mico_bench_object_centric": "Object-Centric",
    "mico_bench_human_centric": "Human-Centric",
    "mico_bench_hoi": "HOI",
    "mico_bench_dere": "De&Re",
}
GEDIT_GROUPS = (
    "background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
    "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer",
)  # fmt: skip
GEDIT_LANGUAGES = ("en", "cn")
Benchmark = Literal["mico", "gedit", "shards"]


# --------------------------------------------------------------------------- readers


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file (blank lines skipped); ValueError naming the line that is not JSON."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise ValueError(f"{path}:{number} is not JSON: {err}") from err
    return records


def mico_bench_cases(root: str | Path, tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """MICo-Bench's cases from its released JSONL files under `root` (every task file present, or `tasks`)."""
    root = Path(root)
    names = tasks or [t for t in MICO_TASKS if (root / f"{t}.jsonl").is_file()]
    unknown = [t for t in names if t not in MICO_TASKS]
    if unknown:
        raise ValueError(f"unknown MICo-Bench task(s) {unknown}; choose from {', '.join(MICO_TASKS)}")
    if not names:
        raise FileNotFoundError(f"no mico_bench_*.jsonl under {root} (the MICo-Bench folder of MICo-150K)")
    cases = []
    for task in names:
        path = root / f"{task}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        for number, record in enumerate(read_jsonl(path), start=1):
            case_id = record.get("idx", record.get("ed_idx"))
            inputs, prompt = record.get("input"), record.get("refined_prompt") or record.get("prompt")
            if case_id is None or not isinstance(inputs, list) or not isinstance(prompt, str):
                raise ValueError(f"{path}:{number}: a case needs idx / ed_idx, input (list) and prompt")
            meta = {"task": record.get("Task", MICO_TASKS[task]), "editing_type": record.get("editing_type")}
            cases.append(
                {
                    "case_id": str(case_id),
                    "group": task,
                    "category": category_of(meta),
                    "language": "en",
                    "instruction": prompt,
                    "sources": [str(root / p) for p in inputs],
                    "reference": str(root / record["reference"]) if record.get("reference") else None,
                    "human": [int(i) for i in record.get("human_indices") or []],
                    "human_centric": task == "mico_bench_human_centric",
                    "intersection": None,
                    "meta": record,
                }
            )
    return cases


def gedit_bench_cases(
    root: str | Path, languages: list[str] | None = None, groups: list[str] | None = None
) -> list[dict[str, Any]]:
    """GEdit-Bench's cases from `<root>/cases.jsonl` (written by `omnilab data convert gedit_bench`)."""
    root = Path(root)
    path = root / "cases.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: convert the released parquet first "
            f"(omnilab data convert gedit_bench --parquet <GEdit-Bench>/data --out {root})"
        )
    wanted_langs, wanted_groups = set(languages or GEDIT_LANGUAGES), set(groups or GEDIT_GROUPS)
    cases = []
    for record in read_jsonl(path):
        language, group = record["instruction_language"], record["task_type"]
        if language not in wanted_langs or group not in wanted_groups:
            continue
        cases.append(
            {
                "case_id": str(record["key"]),
                "group": group,
                "category": None,
                "language": language,
                "instruction": record["instruction"],
                "sources": [str(root / record["source"])],
                "reference": None,
                "human": [],
                "human_centric": False,
                "intersection": bool(record.get("intersection_exist")),
                "meta": record,
            }
        )
    return cases


def shard_group(meta: dict[str, Any]) -> str:
    """A generated case's group: its MICo category when it has one, else its task (edits: task/op)."""
    category = category_of(meta)
    if category != "unknown":
        return category
    task = str(meta.get("task", "case"))
    program = meta.get("program") or []
    if task == "edit" and program:
        return f"edit_{program[0].get('op', 'op')}"
    return task


def shard_cases(spec: str | list[str], tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """Cases from multiref-kind shards: refK -> sources, target -> reference, json -> meta (images as bytes)."""
    cases = []
    for url in expand_shards(spec):
        for raw in iter_raw_samples(url):
            meta = json.loads(raw["json"])
            if tasks is not None and meta.get("task") not in tasks and category_of(meta) not in tasks:
                continue
            refs = sorted(
                (k for k in raw if k.startswith("ref") and k.split(".")[0][3:].isdigit()),
                key=lambda k: int(k.split(".")[0][3:]),
            )
            target = next((k for k in raw if k.startswith("target.")), None)
            roles = meta.get("ref_roles") or []
            cases.append(
                {
                    "case_id": raw["__key__"],
                    "group": shard_group(meta),
                    "category": category_of(meta),
                    "language": "en",
                    "instruction": meta["instruction"],
                    "sources": [raw[k] for k in refs],
                    "reference": raw[target] if target else None,
                    "human": meta.get("human_indices") or [i for i, r in enumerate(roles) if r == "human"],
                    "human_centric": category_of(meta) in ("multi_person", "person_scene"),
                    "intersection": None,
                    "meta": meta,
                }
            )
    return cases


# --------------------------------------------------------------------------- loading


def load_image(source: str | bytes | None) -> torch.Tensor | None:
    """A path or encoded bytes -> [3, H, W] float in [-1, 1]; None when the file is missing or unreadable."""
    if source is None:
        return None
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            array = np.array(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0


class BenchCases(Dataset):
    """A map-style dataset of cases; images are read when a case is fetched."""

    def __init__(self, cases: list[dict[str, Any]]) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = dict(self.cases[index])
        case["source_paths"] = [s if isinstance(s, str) else None for s in case["sources"]]
        case["sources"] = [load_image(s) for s in case["sources"]]
        case["reference"] = load_image(case["reference"])
        return case


def collate_cases(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Cases -> a batch of lists (images keep their sizes)."""
    return {key: [c[key] for c in cases] for key in cases[0]}


class EditBenchDataModule(L.LightningDataModule):
    """An editing benchmark's cases for `omnilab test` (split over ranks by Lightning's distributed sampler).

    Args:
        benchmark: "mico" (MICo-Bench), "gedit" (GEdit-Bench) or "shards" (generated or converted shards).
        data_dir: The benchmark's folder: MICo-Bench's (with the JSONL files and image folders), the
            converted GEdit-Bench's, or the shard set's (its test split is read).
        tasks: MICo-Bench task files (e.g. [mico_bench_hoi]); for shards, the tasks or categories kept.
        groups: GEdit-Bench task groups to keep (default all 11).
        languages: GEdit-Bench languages ("en", "cn"; default both).
        limit: Keep the first `limit` cases (after the filters; quick runs).
        batch_size: Cases per batch (the judge answers a batch's requests concurrently).
        num_workers: DataLoader workers (image decoding).
        synth: Generate the shard set (`shards` only) when data_dir has none: as WebDataModule's `synth`
            (default: only into the suite's own `data/<synth_kind>`; a missing data_dir elsewhere is an error).
        synth_kind: The generator for `synth` ("multiref" or "mico").
        synth_samples: Samples per split to generate, e.g. {test: 32}.
        seed: Seed of the generated shards.
    """

    def __init__(
        self,
        benchmark: Benchmark = "mico",
        data_dir: str | None = None,
        tasks: list[str] | None = None,
        groups: list[str] | None = None,
        languages: list[str] | None = None,
        limit: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        synth: bool | None = None,
        synth_kind: str = "multiref",
        synth_samples: dict[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if benchmark not in ("mico", "gedit", "shards"):
            raise ValueError(f"data.benchmark {benchmark!r}: choose mico, gedit or shards")
        if data_dir is None:
            raise ValueError("data.data_dir is required: the benchmark's folder")
        self.benchmark, self.data_dir, self.tasks, self.groups_filter = benchmark, data_dir, tasks, groups
        self.languages, self.limit, self.batch_size, self.num_workers = (
            languages,
            limit,
            batch_size,
            num_workers,
        )
        self.synth, self.synth_kind, self.synth_samples, self.seed = synth, synth_kind, synth_samples, seed
        self._cases: list[dict[str, Any]] | None = None

    def prepare_data(self) -> None:
        """Generate the shard set of a `shards` benchmark when it is absent and `synth` is on."""
        asked = self.synth_samples is not None
        if self.benchmark == "shards" and synth_wanted(self.data_dir, self.synth_kind, self.synth, asked):
            from datamodules.synth import synthesize

            synthesize(self.synth_kind, self.data_dir, samples=self.synth_samples, seed=self.seed)

    def cases(self) -> list[dict[str, Any]]:
        """The benchmark's cases (read once), filtered and limited."""
        if self._cases is None:
            if self.benchmark == "mico":
                cases = mico_bench_cases(self.data_dir, self.tasks)
            elif self.benchmark == "gedit":
                cases = gedit_bench_cases(self.data_dir, self.languages, self.groups_filter)
            else:
                cases = shard_cases(str(Path(self.data_dir) / "test-*.tar"), self.tasks)
            self._cases = cases[: self.limit] if self.limit is not None else cases
        return self._cases

    @property
    def groups(self) -> list[str]:
        """The reporting groups, in a fixed order: the benchmark's own, then any other the cases have."""
        known = (
            list(MICO_TASKS)
            if self.benchmark == "mico"
            else list(GEDIT_GROUPS)
            if self.benchmark == "gedit"
            else []
        )
        seen = sorted({c["group"] for c in self.cases()} - set(known))
        if self.benchmark == "gedit":
            return [f"{g}/{lang}" for lang in GEDIT_LANGUAGES for g in known] + seen
        return known + seen

    def has_split(self, split: str) -> bool:
        """Benchmarks have a test split only."""
        return split in ("test", "predict")

    def test_dataloader(self) -> DataLoader:
        """The cases, in order."""
        return DataLoader(
            BenchCases(self.cases()),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_cases,
            shuffle=False,
        )

    def predict_dataloader(self) -> DataLoader:
        """The same cases (predict writes the outputs only)."""
        return self.test_dataloader()
