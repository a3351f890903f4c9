"""Loader throughput: WebDataset shards vs a plain map-style Dataset over the same loose files.

Both decode with the same decoder and apply the same CCMP training transform and collate, with the
same batch size and workers; only the storage (tar shards read sequentially vs one file per member)
and the sampling (resumable streams vs a shuffled index) differ. Runs alternate; medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from benchmarks.common import interleaved, record
from datamodules.correspondence import CorrespondenceDataModule
from datamodules.synth import synthesize
from datamodules.webdataset import collate_examples, decode_sample, expand_shards, iter_raw_samples
from omnilab.seeding import numpy_rng


class LooseFiles(Dataset):
    """One file per member (`<key>.<ext>`), decoded and transformed like the shard stream."""

    def __init__(self, root: Path, keys: list[str], transform, required) -> None:
        self.root, self.keys, self.transform, self.required = root, keys, transform, required
        self.members = {k: sorted(p.name[len(k) + 1 :] for p in root.glob(f"{k}.*")) for k in keys}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        key = self.keys[i]
        raw = {
            "__key__": key,
            **{ext: (self.root / f"{key}.{ext}").read_bytes() for ext in self.members[key]},
        }
        example = self.transform(decode_sample(raw, self.required), numpy_rng(0, i))
        example.setdefault("__key__", key)  # as the stream does
        return example


def main(argv: list[str] | None = None) -> None:
    """Measure samples/s of both loaders and write the ratio."""
    parser = argparse.ArgumentParser(prog="omnilab bench loader")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize("correspondence", root / "shards", samples={"train": args.samples, "val": 0, "test": 0})
        loose = root / "loose"
        loose.mkdir()
        keys = []
        for url in expand_shards(str(root / "shards" / "train-*.tar")):
            for raw in iter_raw_samples(url):
                keys.append(raw["__key__"])
                for ext, data in raw.items():
                    if not ext.startswith("__"):
                        (loose / f"{raw['__key__']}.{ext}").write_bytes(data)
        data = CorrespondenceDataModule(
            data_dir=str(root / "shards"),
            image_size=args.image_size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            batches_per_epoch=args.samples // args.batch_size,
            synth=False,
        )
        shards = data.train_dataloader()
        plain = DataLoader(
            LooseFiles(loose, keys, data.transform(True), data.required),
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            collate_fn=collate_examples,
        )

        def epoch(loader):
            def run() -> float:
                start, n = time.perf_counter(), 0
                for batch in loader:
                    n += len(batch["__key__"])
                return n / (time.perf_counter() - start)  # samples/s, returned as the "time"

            return run

        rates = interleaved({"shards": epoch(shards), "loose files": epoch(plain)}, args.repeats)
    shard_rate, file_rate = (statistics.median(rates[k][1:] or rates[k]) for k in ("shards", "loose files"))
    rows = [
        {"loader": "WebDataset shards (StreamLoader)", "samples/s": shard_rate},
        {"loader": "plain Dataset over loose files", "samples/s": file_rate},
        {"loader": "ratio shards / loose", "samples/s": shard_rate / file_rate},
    ]
    notes = (
        f"{args.samples} synthetic correspondence pairs (5 members each), CCMP training transform at "
        f"{args.image_size} px, batch {args.batch_size}, {args.workers} workers; median of {args.repeats - 1} "
        "epochs after a warm-up epoch, runs alternating. Target: ratio >= 1.0."
    )
    record(
        "loader",
        "Loader throughput: shards vs loose files",
        rows,
        notes,
        {"shard_over_loose": shard_rate / file_rate},
    )


if __name__ == "__main__":
    main()
