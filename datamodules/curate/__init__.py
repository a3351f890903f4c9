"""`omnilab data curate <step>`: MICo's curation pipeline as resumable steps, parallel over shards.

MICo (docs/methods/mico.md) curates source images, composes them into multi-image samples, filters the results
for quality and identity consistency (a human in the loop, in the paper), and builds De&Re samples by
decomposing real images into components and recomposing them. The steps here (docs/methods/mico.md):

- `collect`: image files (folders, globs, or a JSONL of {"image", "role"?, "caption"?}) -> `images` shards
  (`<key>.<jpg|png>` as the bytes were, `<key>.json` {"source", "width", "height", "role", "caption"});
- `filter`: any shards with an image -> the kept samples, with a per-sample `curation` record in the json
  (resolution and aspect, a 64-bit perceptual hash and its near-duplicate verdict, and optionally the judge's
  PQ sub-scores and a per-reference identity-consistency score); what is dropped is counted per reason;
- `compose`: `images` shards -> multiref / mico samples (2-`max_refs` sources, an instruction from the
  sources' roles, a collage target laid out exactly);
- `dere`: samples with a component label map -> De&Re samples (each component cut out with its mask as a
  source, the original image as the target).

Every step maps input shard i to output shard i: it is written to a temporary file and renamed into place,
so a rerun (or a run resumed after a crash) skips the shards already written and redoes only the rest;
shards run `--workers` at a time. Each step writes `index.json` (kind, shards, counts) and `report.json`
(per-reason counts, merged over shards). A step module defines `add_arguments(parser)` and `run(args) -> Path`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.progress import Progress

from datamodules.webdataset import ShardWriter, expand_shards, write_index

STEPS: dict[str, str] = {
    "collect": "datamodules.curate.collect",
    "filter": "datamodules.curate.filter",
    "compose": "datamodules.curate.compose",
    "dere": "datamodules.curate.dere",
}
ShardFn = Callable[[int, str | list[str], ShardWriter], Counter]


def step(name: str) -> Any:
    """Import the module of a curation step."""
    if name not in STEPS:
        raise KeyError(f"unknown curation step {name!r}; choose from {', '.join(sorted(STEPS))}")
    return importlib.import_module(STEPS[name])


def shard_name(split: str, index: int) -> str:
    """The output shard of input i: `<split>-NNNNNN.tar`."""
    return f"{split}-{index:06d}.tar"


def run_sharded(
    inputs: list[Any],
    out: str | Path,
    fn: ShardFn,
    kind: str,
    split: str = "train",
    workers: int = 2,
    options: dict[str, Any] | None = None,
    description: str = "curate",
) -> Path:
    """Map input i to `<out>/<split>-i.tar` with `fn(i, input, writer) -> Counter`, skipping finished shards.

    A shard is finished when its tar and its `<tar>.json` report exist (both renamed into place after the
    shard is complete). Returns index.json, which lists every shard with its sample count.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> Counter:
        target = out / shard_name(split, i)
        report = target.with_suffix(".tar.json")
        if target.is_file() and report.is_file():
            return Counter(json.loads(report.read_text()))
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=out))
        try:
            with ShardWriter(tmp, split, max_count=1 << 30) as writer:
                counts = fn(i, inputs[i], writer)
            written = tmp / shard_name(split, 0)
            if not written.exists():  # nothing kept: an empty (valid) tar
                tarfile.open(written, "w", format=tarfile.USTAR_FORMAT).close()
            counts["samples"] = sum(n for _, n in writer.shards)
            os.replace(written, target)
            _write_text(report, json.dumps(dict(counts)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return counts

    totals: Counter = Counter()
    counts: list[Counter] = [Counter()] * len(inputs)
    with Progress(transient=True) as progress, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        task = progress.add_task(f"{description} ({len(inputs)} shards)", total=len(inputs))
        futures = {pool.submit(one, i): i for i in range(len(inputs))}
        for future in futures:
            counts[futures[future]] = future.result()
            progress.advance(task)
    for c in counts:
        totals.update(c)
    shards = [shard_name(split, i) for i in range(len(inputs))]
    _write_text(out / "report.json", json.dumps({"totals": dict(totals), "options": options or {}}, indent=1))
    return write_index(
        out,
        kind=kind,
        splits={
            split: {"shards": shards, "counts": [c["samples"] for c in counts], "samples": totals["samples"]}
        },
        source="curate",
        options=options or {},
    )


def input_shards(spec: str | list[str]) -> list[str]:
    """The input shards of a step: a folder (its *.tar), a brace pattern, a glob or a list."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        path = Path(s)
        urls.extend(sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else expand_shards(s))
    if not urls:
        raise FileNotFoundError(f"no input shards in {spec}")
    return urls


def _write_text(path: Path, text: str) -> None:
    """Write a file atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
