"""MICo-Bench (released JSONL + image folders) -> multiref evaluation shards: `omnilab data convert mico_bench`.

The benchmark itself is read in place by `datamodules.bench.mico_bench_cases` (its layout is described
there). This converter writes its cases as shards of the multiref / MICo data kind, the human-verified
reference as the target (evaluation shards), so a training run can validate on MICo-Bench: json
{"instruction" (the refined prompt for De&Re), "task": "compose", "category" (datamodules/mico.py),
"editing_type", "human_indices", "ref_roles" ("human" for the human sources, "source" for the others),
"orig_id": "<task>/<id>", "bench_task"}. Cases with more sources than `--max-refs` (MICo-Bench has up to 10)
or a missing image are skipped and counted per reason in index.json. A case record with a key outside
RECORD_KEYS stops the conversion before anything is written, naming the file's task and case and the nearest
known key (`--ignore-keys` drops such keys).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datamodules.bench import MICO_TASKS, mico_bench_cases
from datamodules.convert.edit_jsonl import (
    MultiRefShards,
    Report,
    SkipRecord,
    add_ignore_keys,
    check_keys,
    read_image,
)

MAX_SOURCES = 10
# what a MICo-Bench case record may hold (datamodules.bench.mico_bench_cases reads it); others are refused
RECORD_KEYS = ("idx", "ed_idx", "original_idx", "input", "prompt", "refined_prompt", "reference", "Task", "editing_type", "human_indices")  # fmt: skip


def convert_bench(
    root: str | Path,
    out: str | Path,
    split: str = "test",
    max_refs: int = MAX_SOURCES,
    shard_size: int = 200,
    ignore_keys: list[str] | tuple[str, ...] = (),
) -> Report:
    """Convert every MICo-Bench task file under `root` into `<out>/<split>-NNNNNN.tar` + index.json."""
    cases = mico_bench_cases(root)
    for case in cases:
        check_keys(case["meta"], RECORD_KEYS, f"{case['group']}.jsonl: case {case['case_id']}", ignore_keys)
    shards = MultiRefShards(out, split, "mico_bench", shard_size)
    for case in cases:
        where = f"{case['group']}/{case['case_id']}"
        try:
            if len(case["sources"]) > max_refs:
                raise SkipRecord("too_many_inputs", f"{len(case['sources'])} sources > --max-refs {max_refs}")
            refs = [read_image(p, Path(root)) for p in case["sources"]]
            if case["reference"] is None:
                raise SkipRecord("missing_image", "no reference")
            target = read_image(case["reference"], Path(root))
            human = case["human"]
            extra = {
                "category": case["category"],
                "editing_type": case["meta"].get("editing_type"),
                "human_indices": human,
                "ref_roles": ["human" if i in human else "source" for i in range(len(refs))],
                "bench_task": case["group"],
            }
            shards.write(refs, target, case["instruction"], "compose", where, extra)
        except SkipRecord as err:
            shards.report.skip(where, err)
    return shards.close({"root": str(root), "max_refs": max_refs, "tasks": list(MICO_TASKS)})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    parser.add_argument(
        "--root", type=Path, required=True, help="the MICo-Bench folder (JSONL + image folders)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (an index.json there is merged)"
    )
    parser.add_argument("--split", default="test", help="output split name")
    parser.add_argument(
        "--max-refs", type=int, default=MAX_SOURCES, help="cases with more sources are skipped"
    )
    parser.add_argument("--shard-size", type=int, default=200, help="samples per shard")
    add_ignore_keys(parser)


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion, print its summary and return the index path."""
    report = convert_bench(
        args.root, args.out, args.split, args.max_refs, args.shard_size, getattr(args, "ignore_keys", ())
    )
    print(report.summary())
    assert report.index is not None
    return report.index
