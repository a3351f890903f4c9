"""`omnilab data synth <kind>`: the registry of generators that write the embedded shards.

A generator module defines `DEFAULT_SAMPLES` ({split: count}) and
`samples(split, count, seed) -> Iterator[dict]` yielding samples (`__key__` + one value per member,
encoded by extension). `synthesize` writes them as shards plus an index JSON (counts, keys, seed);
the same seed gives the same bytes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from rich.progress import Progress

from datamodules.webdataset import ShardWriter, write_index

GENERATORS: dict[str, str] = {
    "correspondence": "datamodules.synth.correspondence",
    "mico": "datamodules.synth.mico",
    "multiref": "datamodules.synth.multiref",
    "preference": "datamodules.synth.preference",
    "restoration": "datamodules.synth.restoration",
    "scenes": "datamodules.synth.scenes",
}


def generator(kind: str) -> Any:
    """Import the generator module of a data kind."""
    if kind not in GENERATORS:
        raise KeyError(f"unknown synth kind {kind!r}; choose from {', '.join(sorted(GENERATORS))}")
    return importlib.import_module(GENERATORS[kind])


def synthesize(
    kind: str,
    out_dir: str | Path,
    samples: dict[str, int] | None = None,
    seed: int = 0,
    shard_size: int = 64,
) -> Path:
    """Write the shards of every split of `kind` into `out_dir`; return the index path."""
    gen = generator(kind)
    counts = {**gen.DEFAULT_SAMPLES, **(samples or {})}
    out_dir = Path(out_dir)
    splits: dict[str, Any] = {}
    keys: set[str] = set()
    with Progress(transient=True) as progress:
        for split, count in counts.items():
            task = progress.add_task(f"synth {kind}/{split}", total=count)
            with ShardWriter(out_dir, split, max_count=shard_size) as writer:
                for sample in gen.samples(split, count, seed):
                    keys.update(k for k in sample if not k.startswith("__"))
                    writer.write(sample)
                    progress.advance(task)
            shards = writer.shards
            splits[split] = {
                "shards": [name for name, _ in shards],
                "counts": [n for _, n in shards],
                "samples": sum(n for _, n in shards),
            }
    return write_index(out_dir, kind=kind, seed=seed, keys=sorted(keys), splits=splits, source="synth")
