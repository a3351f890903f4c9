"""Edit / composition JSONL -> multiref shards: `omnilab data convert edit_jsonl`.

Implements the data side of docs/methods/uniref.md for the JSONL layouts: UniPic-3 SFT
(`{"input_images": [paths], "output_image": path, "instruction": str}`, batch inference adds "id"),
OmniGen2 (the same plus "task_type") and MICo's BLIP3o adapter (the same fields; a `.json` file holding one
list of records is read too). Writes the sample format of `datamodules/multiref.py`: `json`, `ref0..refN-1`
and `target`, each image's bytes copied as they are when PNG or JPEG (the extension follows the bytes:
`ref0.png` or `ref0.jpg`), any other image format re-encoded as PNG.

Image paths are relative to `--image-root` when given, else to the JSONL file's folder (absolute paths
stay). Each record becomes one sample, or a counted skip (reasons in SKIP_REASONS, with one example each
in the summary); `index.json` (merged when converting several splits or sources into one folder) holds
kind "multiref", splits.<split> = {shards, counts, samples, tasks, n_refs, source}, skipped.<split> =
{reason: records}. The task is the record's "task_type" when it has one, else by input count: "t2i"
(0), "edit" (1), "compose" (2+). Optional "id", "editing_type", "refined_instruction",
"human_indices", "ref_roles" carry over into the json.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.multiref import MAX_REFS, mentioned_images
from datamodules.webdataset import ShardWriter, read_index, write_index

SKIP_REASONS = (
    "bad_record",  # not a JSON object with instruction (str), input_images (list), output_image (str)
    "missing_image",  # an input or output path that does not exist
    "unreadable_image",  # a file (or image bytes) that is not a readable image
    "too_many_inputs",  # more input images than --max-refs (UniPic-3: 6)
    "no_images",  # (parquet) an empty image list: no target
    "names_missing_image",  # the instruction names "image k" with k > the number of inputs
)
PASS_THROUGH = ("editing_type", "refined_instruction", "human_indices", "ref_roles")
RECORD_KEYS = ("input_images", "output_image", "instruction", "task_type", "id", *PASS_THROUGH)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


class SkipRecord(ValueError):
    """A record that cannot become a sample; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class UnknownKey(ValueError):
    """A record key the converter does not know (a misspelt field would otherwise be silently dropped)."""


def check_keys(
    record: Any,
    known: Iterable[str],
    where: str,
    ignored: Iterable[str] = (),
    escape: str | None = "--ignore-keys",
) -> None:
    """UnknownKey naming `where`, the first unknown key of a dict record and the known key it is closest to.

    Every converter checks its records with this (one place); `escape` names the option that drops such keys
    (None: there is none, e.g. a prompt file).
    """
    if not isinstance(record, dict):
        return
    known = set(known)
    unknown = sorted(set(record) - known - set(ignored))
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        tail = f" ({escape} {' '.join(unknown)} converts such records without them)" if escape else ""
        raise UnknownKey(
            f"{where}: unknown key {unknown[0]!r}{hint} in a record; known keys: {', '.join(sorted(known))}{tail}"
        )


def add_ignore_keys(parser: argparse.ArgumentParser) -> None:
    """The --ignore-keys option every converter has: record keys (or columns) to drop instead of refusing."""
    parser.add_argument(
        "--ignore-keys",
        nargs="*",
        default=[],
        metavar="KEY",
        help="record keys (columns) to drop; any other unknown key is an error",
    )


def default_task(n_refs: int) -> str:
    """The task of a record without one: "t2i" (no input), "edit" (one), "compose" (two or more)."""
    return "t2i" if n_refs == 0 else "edit" if n_refs == 1 else "compose"


def image_member(data: bytes, what: str) -> tuple[str, bytes, tuple[int, int]]:
    """(extension, bytes, (w, h)) of an image: PNG / JPEG bytes kept as they are, any other format -> PNG."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            img.verify()
        if data.startswith(PNG_MAGIC):
            return "png", data, size
        if data.startswith(JPEG_MAGIC):
            return "jpg", data, size
        with Image.open(io.BytesIO(data)) as img:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
        return "png", buf.getvalue(), size
    except Exception as err:
        raise SkipRecord("unreadable_image", f"{what}: {type(err).__name__}: {err}") from err


@dataclass
class Report:
    """What one conversion wrote and skipped (record counts)."""

    name: str
    split: str
    index: Path | None = None
    tasks: Counter = field(default_factory=Counter)
    n_refs: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        """Samples written."""
        return sum(self.tasks.values())

    def skip(self, where: str, err: SkipRecord) -> None:
        """Count a skipped record, keeping the first example of each reason."""
        self.skipped[err.reason] += 1
        self.examples.setdefault(err.reason, f"{where}: {err}")

    def summary(self) -> str:
        """A few lines for the terminal: samples per task, skips per reason with one example each."""
        lines = [
            f"{self.name}/{self.split}: wrote {self.samples} samples -> {self.index}",
            "  tasks: " + ", ".join(f"{t}: {n}" for t, n in sorted(self.tasks.items())),
        ]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count} ({reason}), e.g. {self.examples[reason]}")
        return "\n".join(lines)


class MultiRefShards:
    """Writes multiref samples of one split into `out` and merges its entry into index.json on close."""

    def __init__(self, out: str | Path, split: str, source: str, shard_size: int = 200) -> None:
        if not re.fullmatch(r"\w+", split):
            raise ValueError(f"split name {split!r} must be letters, digits or '_'")
        self.out, self.split, self.source = Path(out), split, source
        kind = (read_index(self.out) or {"kind": "multiref"}).get("kind")
        if kind != "multiref":
            raise ValueError(f"{self.out / 'index.json'} is of kind {kind!r}; convert into another folder")
        for stale in self.out.glob(f"{split}-*.tar"):  # a previous conversion of this split: replaced
            if re.fullmatch(rf"{split}-\d{{6}}\.tar", stale.name):
                stale.unlink()
        self.report = Report(source, split)
        self.writer = ShardWriter(self.out, split, max_count=shard_size)
        self.keys: set[str] = set()

    def write(
        self,
        refs: list[tuple[str, bytes, tuple[int, int]]],
        target: tuple[str, bytes, tuple[int, int]],
        instruction: str,
        task: str,
        orig_id: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write one sample from image members (ext, bytes, size); raises SkipRecord on a bad instruction."""
        beyond = [k for k in mentioned_images(instruction) if not 1 <= k <= len(refs)]
        if beyond:
            raise SkipRecord(
                "names_missing_image", f"instruction names image {beyond[0]}, {len(refs)} input(s)"
            )
        meta = {
            "instruction": instruction,
            "task": task,
            "n_refs": len(refs),
            "source": self.source,
            "orig_id": orig_id,
            "ref_sizes": [list(size) for _, _, size in refs],
            "target_size": list(target[2]),
            **(extra or {}),
        }
        sample: dict[str, Any] = {"__key__": f"{self.split}_{self.report.samples:08d}", "json": meta}
        for k, (ext, data, _) in enumerate(refs):
            sample[f"ref{k}.{ext}"] = data
        sample[f"target.{target[0]}"] = target[1]
        self.keys.update(k for k in sample if not k.startswith("__"))
        self.writer.write(sample)
        self.report.tasks[task] += 1
        self.report.n_refs[len(refs)] += 1

    def close(self, options: dict[str, Any]) -> Report:
        """Close the shards and merge this split into index.json; return the report."""
        shards = self.writer.close()
        index = read_index(self.out) or {"kind": "multiref", "splits": {}, "skipped": {}}
        entry = {
            "shards": [name for name, _ in shards],
            "counts": [n for _, n in shards],
            "samples": self.report.samples,
            "source": self.source,
            "tasks": dict(sorted(self.report.tasks.items())),
            "n_refs": {str(n): c for n, c in sorted(self.report.n_refs.items())},
            "options": options,
        }
        self.report.index = write_index(
            self.out,
            kind="multiref",
            seed=index.get("seed", 0),
            keys=sorted(set(index.get("keys", [])) | self.keys),
            splits={**index.get("splits", {}), self.split: entry},
            skipped={**index.get("skipped", {}), self.split: dict(sorted(self.report.skipped.items()))},
            source=self.source if index.get("source", self.source) == self.source else "mixed",
        )
        return self.report


# --------------------------------------------------------------------------- JSONL records


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or the raw line when it is not JSON) of a JSONL file or a JSON list."""
    if path.suffix == ".json":
        text = path.read_text()
        if text.lstrip().startswith("["):
            yield from enumerate(json.loads(text), start=1)
            return
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError:
                yield number, line


def read_image(path_text: str, root: Path) -> tuple[str, bytes, tuple[int, int]]:
    """The image member of a path (relative to `root` unless absolute); raises SkipRecord."""
    path = Path(path_text)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise SkipRecord("missing_image", str(path))
    return image_member(path.read_bytes(), str(path))


def convert_record(record: Any, root: Path, max_refs: int) -> tuple[list, tuple, str, str, dict[str, Any]]:
    """(refs, target, instruction, task, extra json fields) of one record; raises SkipRecord."""
    if not isinstance(record, dict):
        raise SkipRecord("bad_record", f"not a JSON object: {str(record)[:80]!r}")
    inputs, output, instruction = (
        record.get("input_images"),
        record.get("output_image"),
        record.get("instruction"),
    )
    if isinstance(inputs, str):
        inputs = [inputs]
    if inputs is None:
        inputs = []
    if not (isinstance(inputs, list) and all(isinstance(p, str) for p in inputs)):
        raise SkipRecord("bad_record", f"input_images must be a list of paths, got {inputs!r:.80}")
    if not isinstance(output, str) or not isinstance(instruction, str):
        raise SkipRecord("bad_record", "output_image and instruction must be strings")
    if len(inputs) > max_refs:
        raise SkipRecord("too_many_inputs", f"{len(inputs)} input images > --max-refs {max_refs}")
    refs = [read_image(p, root) for p in inputs]
    target = read_image(output, root)
    task = record.get("task_type") if isinstance(record.get("task_type"), str) else default_task(len(refs))
    extra = {k: record[k] for k in PASS_THROUGH if k in record}
    return refs, target, instruction, task, extra


def convert_jsonl(
    jsonl: list[str | Path],
    out: str | Path,
    split: str = "train",
    image_root: str | Path | None = None,
    source: str = "edit_jsonl",
    max_refs: int = MAX_REFS,
    shard_size: int = 200,
    ignore_keys: Iterable[str] = (),
) -> Report:
    """Convert JSONL record files into `<out>/<split>-NNNNNN.tar` + index.json; return what was written.

    A record key outside RECORD_KEYS (and `ignore_keys`) stops the conversion with UnknownKey before anything
    is written: `inputs` for `input_images` would otherwise make every record a text-to-image sample.
    """
    files = [Path(p) for p in jsonl]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"JSONL file not found: {path}")
    for path in files:
        for number, record in iter_records(path):
            check_keys(record, RECORD_KEYS, f"{path}:{number}", ignore_keys)
    shards = MultiRefShards(out, split, source, shard_size)
    for path in files:
        root = Path(image_root) if image_root is not None else path.parent
        for number, record in iter_records(path):
            where = f"{path.name}:{number}"
            try:
                refs, target, instruction, task, extra = convert_record(record, root, max_refs)
                orig = record.get("id", where) if isinstance(record, dict) else where
                shards.write(refs, target, instruction, task, str(orig), extra)
            except SkipRecord as err:
                shards.report.skip(where, err)
    options = {"files": [p.name for p in files], "max_refs": max_refs, "image_root": str(image_root or "")}
    return shards.close(options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's command-line options."""
    parser.add_argument("--jsonl", type=Path, nargs="+", required=True, help="JSONL files (or a .json list)")
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (an index.json there is merged)"
    )
    parser.add_argument("--split", default="train", help="output split name")
    parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="folder relative paths start from (default: the JSONL's)",
    )
    parser.add_argument("--source", default="edit_jsonl", help="json 'source' field, e.g. unipic3, omnigen2")
    parser.add_argument("--max-refs", type=int, default=MAX_REFS, help="records with more inputs are skipped")
    parser.add_argument("--shard-size", type=int, default=200, help="samples per shard")
    add_ignore_keys(parser)


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion the parsed arguments describe, print its summary and return the index path."""
    report = convert_jsonl(
        args.jsonl,
        args.out,
        split=args.split,
        image_root=args.image_root,
        source=args.source,
        max_refs=args.max_refs,
        shard_size=args.shard_size,
        ignore_keys=args.ignore_keys,
    )
    print(report.summary())
    assert report.index is not None
    return report.index
