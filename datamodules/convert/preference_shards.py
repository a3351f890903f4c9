"""What the preference converters share: the shard writer, record readers (JSON, JSONL, parquet), image fields.

Each converter (`editreward_data`, `editreward_bench`, `editscore_bench`, `mmrb2`, `mer_bench`) turns one
released layout into the item format of `datamodules/preference.py` with `convert_records`: every record
becomes one item or a counted skip (reasons in SKIP_REASONS, one example each in the summary), and
`index.json` (kind "preference", merged when several splits or sources go into one folder) records
splits.<split> = {shards, counts, samples, subsets, source, benchmark} and skipped.<split>.

Each converter names the keys its records may hold (`RECORD_KEYS`); a record with another key (a parquet
column, a JSON field) stops the conversion before anything is written, naming the file, the record and the
nearest known key (`edit_jsonl.check_keys`); `--ignore-keys` drops such keys instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from datamodules.convert.edit_jsonl import Report, SkipRecord, add_ignore_keys, check_keys, image_member
from datamodules.preference import MAX_CANDIDATES, MAX_SOURCES, parse_ranking
from datamodules.webdataset import BadSample, ShardWriter, read_index, write_index

SKIP_REASONS = (
    "bad_record",  # a field missing or of the wrong type
    "missing_image",  # an image path that does not exist
    "unreadable_image",  # bytes that are not an image
    "bad_ranking",  # a ranking that does not parse or does not name every candidate once
    "too_many_images",  # more sources / candidates than the item format holds
    "unknown_task_type",  # (EditScore) a task type that is none of the 13
    "not_single_image",  # (MMRB2) a response that is not exactly one image
)
Member = tuple[str, bytes, tuple[int, int]]


def letters(k: int) -> list[str]:
    """["A", "B", ...] for K candidates."""
    return [chr(ord("A") + i) for i in range(k)]


def image_at(path_text: Any, root: Path) -> Member:
    """The image member of a path (relative to `root` unless absolute); SkipRecord when missing or unreadable."""
    if not isinstance(path_text, str) or not path_text:
        raise SkipRecord("bad_record", f"an image path is {path_text!r}")
    path = Path(path_text)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise SkipRecord("missing_image", str(path))
    return image_member(path.read_bytes(), str(path))


def image_field(value: Any, root: Path, what: str) -> Member:
    """An image given as bytes, a Hugging Face image struct {"bytes", "path"} or a path string."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, bytes | bytearray) and data:
            return image_member(bytes(data), what)
        return image_at(value.get("path"), root)
    if isinstance(value, bytes | bytearray):
        return image_member(bytes(value), what)
    if isinstance(value, str):
        return image_at(value, root)
    raise SkipRecord("bad_record", f"{what} is {type(value).__name__}, not an image")


def iter_records(path: Path, batch_size: int = 16) -> Iterator[tuple[str, Any]]:
    """(where, record) of a JSON list, a JSON object holding a list ({"pairs": [...]}), JSONL, or parquet."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        file, row = pq.ParquetFile(path), 0
        for batch in file.iter_batches(batch_size=batch_size):
            for record in batch.to_pylist():
                yield f"{path.name}:{row}", record
                row += 1
        return
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(
                    f"{path}: a JSON object must hold exactly one list of records (e.g. 'pairs')"
                )
            data = lists[0]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        for i, record in enumerate(data):
            yield f"{path.name}:{i}", record
        return
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"{path.name}:{number}", json.loads(line)
                except json.JSONDecodeError:
                    yield f"{path.name}:{number}", line


class PreferenceShards:
    """Writes preference items of one split into `out` and merges its entry into index.json on close."""

    def __init__(
        self, out: str | Path, split: str, source: str, benchmark: str, shard_size: int = 200
    ) -> None:
        if not re.fullmatch(r"\w+", split):
            raise ValueError(f"split name {split!r} must be letters, digits or '_'")
        self.out, self.split, self.source, self.benchmark = Path(out), split, source, benchmark
        kind = (read_index(self.out) or {"kind": "preference"}).get("kind")
        if kind != "preference":
            raise ValueError(f"{self.out / 'index.json'} is of kind {kind!r}; convert into another folder")
        for stale in self.out.glob(f"{split}-*.tar"):
            if re.fullmatch(rf"{split}-\d{{6}}\.tar", stale.name):
                stale.unlink()
        self.report = Report(source, split)
        self.writer = ShardWriter(self.out, split, max_count=shard_size)
        self.keys: set[str] = set()

    def write(
        self,
        sources: list[Member],
        candidates: list[Member],
        instruction: str,
        ranking: str,
        orig_id: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write one item; SkipRecord when its ranking does not parse or it holds too many images."""
        if len(sources) > MAX_SOURCES or not 2 <= len(candidates) <= MAX_CANDIDATES:
            raise SkipRecord(
                "too_many_images",
                f"{len(sources)} sources (max {MAX_SOURCES}), {len(candidates)} candidates (2-{MAX_CANDIDATES})",
            )
        try:
            parse_ranking(ranking, len(candidates))
        except BadSample as err:
            raise SkipRecord("bad_ranking", str(err)) from err
        extra = dict(extra or {})
        subset = extra.setdefault("subset", f"{len(candidates)}pair")
        meta = {
            "instruction": instruction,
            "n_sources": len(sources),
            "n_candidates": len(candidates),
            "ranking": ranking,
            "source": self.source,
            "benchmark": self.benchmark,
            "orig_id": orig_id,
            **extra,
        }
        sample: dict[str, Any] = {"__key__": f"{self.split}_{self.report.samples:08d}", "json": meta}
        for k, (ext, data, _) in enumerate(sources):
            sample[f"src{k}.{ext}"] = data
        for k, (ext, data, _) in enumerate(candidates):
            sample[f"cand{k}.{ext}"] = data
        self.keys.update(k for k in sample if not k.startswith("__"))
        self.writer.write(sample)
        self.report.tasks[subset] += 1

    def close(self, options: dict[str, Any]) -> Report:
        """Close the shards and merge this split into index.json; return the report."""
        shards = self.writer.close()
        index = read_index(self.out) or {"kind": "preference", "splits": {}, "skipped": {}}
        entry = {
            "shards": [name for name, _ in shards],
            "counts": [n for _, n in shards],
            "samples": self.report.samples,
            "source": self.source,
            "benchmark": self.benchmark,
            "subsets": dict(sorted(self.report.tasks.items())),
            "options": options,
        }
        self.report.index = write_index(
            self.out,
            kind="preference",
            seed=index.get("seed", 0),
            keys=sorted(set(index.get("keys", [])) | self.keys),
            splits={**index.get("splits", {}), self.split: entry},
            skipped={**index.get("skipped", {}), self.split: dict(sorted(self.report.skipped.items()))},
            source=self.source if index.get("source", self.source) == self.source else "mixed",
        )
        return self.report


Item = tuple[list[Member], list[Member], str, str, str, dict[str, Any]]


def convert_records(
    files: list[str | Path],
    out: str | Path,
    split: str,
    source: str,
    benchmark: str,
    convert_one: Callable[[Any, Path, str], Item],
    image_root: str | Path | None = None,
    shard_size: int = 200,
    keys: Iterable[str] | None = None,
    ignore_keys: Iterable[str] = (),
) -> Report:
    """Run `convert_one(record, image root, where) -> (sources, candidates, instruction, ranking, orig_id,
    extra)` over every record of `files`; write the items, count the skips; return the report.

    `keys`: the keys a record may hold (None: any); another one is an UnknownKey before anything is written.
    """
    paths = [Path(p) for p in files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
    if keys is not None:
        for path in paths:
            check_file_keys(path, keys, ignore_keys)
    shards = PreferenceShards(out, split, source, benchmark, shard_size)
    for path in paths:
        root = Path(image_root) if image_root is not None else path.parent
        for where, record in iter_records(path):
            try:
                if not isinstance(record, dict):
                    raise SkipRecord("bad_record", f"not a JSON object: {str(record)[:80]!r}")
                shards.write(*convert_one(record, root, where))
            except SkipRecord as err:
                shards.report.skip(where, err)
    return shards.close({"files": [p.name for p in paths], "image_root": str(image_root or "")})


def check_file_keys(path: Path, keys: Iterable[str], ignore_keys: Iterable[str] = ()) -> None:
    """UnknownKey for the first record of `path` with a key outside `keys` (parquet: its columns, checked once)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.ParquetFile(path).schema_arrow.names
        check_keys(dict.fromkeys(names), keys, f"{path} (columns)", ignore_keys)
        return
    for where, record in iter_records(path):
        check_keys(record, keys, str(path.parent / where), ignore_keys)


def add_common_arguments(parser: Any, what: str, default_source: str) -> None:
    """--input, --out, --split, --image-root, --source, --shard-size, --ignore-keys."""
    parser.add_argument("--input", type=Path, nargs="+", required=True, help=what)
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (an index.json there is merged)"
    )
    parser.add_argument("--split", default="test", help="output split name")
    parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="folder relative image paths start from (default: the input file's)",
    )
    parser.add_argument("--source", default=default_source, help="json 'source' field")
    parser.add_argument("--shard-size", type=int, default=200, help="items per shard")
    add_ignore_keys(parser)


def run(
    args: Any,
    benchmark: str,
    convert_one: Callable[[Any, Path, str], Item],
    keys: Iterable[str] | None = None,
) -> Path:
    """Convert what the parsed arguments name (records may hold `keys`); print the summary; return the index."""
    report = convert_records(
        args.input,
        args.out,
        args.split,
        args.source,
        benchmark,
        convert_one,
        args.image_root,
        args.shard_size,
        keys,
        getattr(args, "ignore_keys", ()),
    )
    print(report.summary())
    assert report.index is not None
    return report.index


def field(record: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """record[name] when it has the type, else SkipRecord("bad_record") naming the field."""
    value = record.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise SkipRecord(
            "bad_record",
            f"field {name!r} is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}",
        )
    return value
