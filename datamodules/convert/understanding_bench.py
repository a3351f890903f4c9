"""Public understanding benchmarks -> scene-format evaluation shards: `omnilab data convert understanding_bench`.

The benchmarks UniMRG reports (docs/methods/unimrg.md), read in their released layouts and written as
`datamodules/scenes.py` samples (`image.png` + `json` with one `qa` item carrying its closed `options`), so
`omnilab test` of a unified model logs `test/accuracy` (the option it scores highest) on them:

- `mmbench`: the TSV (`index, question, hint, A, B, C, D, answer, category, image` with the image in base64);
  the hint, when present, precedes the question; options are the non-empty A-D texts, the answer is the text of
  the answer letter.
- `mmvp`: `Questions.csv` (`Index, Question, Options, Correct Answer`, options written "(a) Open (b) Closed", the
  answer "(a)") beside the folder `MMVP Images/<Index>.jpg`.
- `hallusionbench`: `HallusionBench.json` (a list of {category, subcategory, set_id, figure_id, question_id,
  question, gt_answer "1"/"0", filename "./hallusion_bench/..."}); items without a figure (`visual_input` "0" or no
  filename) are skipped and counted; options yes/no.
- `realworldqa`: the parquet files (`image` {bytes}, `question`, `answer`); a question listing lettered choices
  ("A. ...") gets those letters as options, a free-form one none (counted, not scored by option).
- `vsr`: the JSON lines ({image, caption, label 1/0, relation}) beside the COCO image folder; the question is
  "Is this statement true: <caption>?" with options yes/no.

Records whose image is missing or unreadable are skipped and counted per reason in index.json. A column or
record key outside the format's RECORD_KEYS stops the conversion before anything is written, naming the file,
the record and the nearest known key (`--ignore-keys` drops such keys).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from datamodules.convert.edit_jsonl import add_ignore_keys, check_keys
from datamodules.convert.restoration import sample_key
from datamodules.webdataset import ShardWriter, split_entry, write_index

FORMATS = ("mmbench", "mmvp", "hallusionbench", "realworldqa", "vsr")
# the columns / keys of each released layout; any other is refused (--ignore-keys)
RECORD_KEYS = {
    "mmbench": (
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "l2-category",
        "image",
        "source",
        "comment",
        "split",
    ),
    "mmvp": ("Index", "Question", "Options", "Correct Answer"),
    "hallusionbench": (
        "category",
        "subcategory",
        "visual_input",
        "set_id",
        "figure_id",
        "sample_note",
        "question_id",
        "question",
        "gt_answer_details",
        "gt_answer",
        "filename",
    ),
    "realworldqa": ("image", "question", "answer"),
    "vsr": (
        "image",
        "image_link",
        "caption",
        "label",
        "relation",
        "subj",
        "obj",
        "annotator_id",
        "vote_true_validator_id",
        "vote_false_validator_id",
    ),
}
LETTERED = re.compile(r"^\s*([A-F])[.)]\s", re.MULTILINE)


class Skip(ValueError):
    """A record that cannot become a sample; the message starts with its reason."""


def png(data: bytes) -> bytes:
    """Any image bytes -> RGB PNG bytes (Skip when they do not decode)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
    except (OSError, ValueError) as err:
        raise Skip(f"unreadable_image: {err}") from None
    return buf.getvalue()


def read_file(path: Path) -> bytes:
    """The bytes of an image file (Skip when it is missing)."""
    if not path.is_file():
        raise Skip(f"missing_image: {path}")
    return path.read_bytes()


def item(
    key: str, image: bytes, question: str, answer: str, options: list[str], kind: str, source: str
) -> dict:
    """One scene-format sample."""
    qa = {"question": question, "answer": answer, "options": options, "type": kind}
    return {
        "__key__": key,
        "image.png": png(image),
        "json": {"caption": "", "edit": "", "qa": [qa], "source": source},
    }


def mmbench(root: Path) -> Iterator[dict[str, Any] | Skip]:
    """Samples of an MMBench TSV (`root` is the .tsv file)."""
    csv.field_size_limit(1 << 30)
    with root.open(newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            letters = [c for c in "ABCD" if (row.get(c) or "").strip() and row.get(c) != "nan"]
            hint = (row.get("hint") or "").strip()
            question = f"{hint}\n{row['question']}" if hint and hint != "nan" else row["question"]
            answer = row["answer"].strip()
            if answer not in letters:
                yield Skip(f"bad_answer: answer {answer!r} is not one of {letters}")
                continue
            options = [row[c].strip() for c in letters]
            yield {
                "key": f"mmbench_{row['index']}",
                "image": base64.b64decode(row["image"]),
                "question": question,
                "answer": row[answer].strip(),
                "options": options,
                "type": row.get("category") or "mmbench",
            }


def mmvp(root: Path) -> Iterator[dict[str, Any] | Skip]:
    """Samples of MMVP (`root` holds Questions.csv and `MMVP Images/`)."""
    with (root / "Questions.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            parts = re.findall(r"\(([a-z])\)\s*([^()]+)", row["Options"])
            options = {letter: text.strip() for letter, text in parts}
            letter = row["Correct Answer"].strip().strip("()")
            if letter not in options:
                yield Skip(f"bad_answer: {row['Correct Answer']!r} is not one of {row['Options']!r}")
                continue
            yield {
                "key": f"mmvp_{row['Index']}",
                "image": root / "MMVP Images" / f"{row['Index']}.jpg",
                "question": row["Question"],
                "answer": options[letter],
                "options": list(options.values()),
                "type": "mmvp",
            }


def hallusionbench(root: Path) -> Iterator[dict[str, Any] | Skip]:
    """Samples of HallusionBench (`root` holds HallusionBench.json and the images its filenames name)."""
    for row in json.loads((root / "HallusionBench.json").read_text()):
        if str(row.get("visual_input", "1")) == "0" or not row.get("filename"):
            yield Skip("no_figure: a question without an image")
            continue
        ids = "_".join(
            str(row.get(k, "")) for k in ("category", "subcategory", "set_id", "figure_id", "question_id")
        )
        yield {
            "key": f"hallusion_{ids}",
            "image": root / str(row["filename"]).removeprefix("./"),
            "question": row["question"],
            "answer": "yes" if str(row["gt_answer"]) == "1" else "no",
            "options": ["yes", "no"],
            "type": str(row.get("category", "hallusionbench")),
        }


def realworldqa(root: Path) -> Iterator[dict[str, Any] | Skip]:
    """Samples of RealWorldQA (`root` is a parquet file or a folder of them)."""
    import pyarrow.parquet as pq

    files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
    n = 0
    for file in files:
        for row in pq.read_table(file).to_pylist():
            letters = LETTERED.findall(row["question"])
            answer = str(row["answer"]).strip()
            yield {
                "key": f"realworldqa_{n:05d}",
                "image": row["image"]["bytes"],
                "question": row["question"],
                "answer": answer,
                "options": letters if answer in letters else [],
                "type": "realworldqa",
            }
            n += 1


def vsr(root: Path, images: Path) -> Iterator[dict[str, Any] | Skip]:
    """Samples of VSR (`root` is the .jsonl file, `images` the COCO image folder)."""
    for n, line in enumerate(root.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        yield {
            "key": f"vsr_{n:05d}",
            "image": images / row["image"],
            "question": f"Is this statement true: {row['caption']}?",
            "answer": "yes" if int(row["label"]) == 1 else "no",
            "options": ["yes", "no"],
            "type": str(row.get("relation", "vsr")),
        }


def check_format_keys(fmt: str, root: Path, ignore_keys: list[str] | tuple[str, ...] = ()) -> None:
    """UnknownKey when a column (TSV, CSV, parquet: its header) or a record (JSON, JSON lines) of the benchmark
    holds a key outside RECORD_KEYS[fmt]."""
    known = RECORD_KEYS[fmt]

    def check(keys: Any, where: str) -> None:
        check_keys(dict.fromkeys(keys), known, where, ignore_keys)

    if fmt in ("mmbench", "mmvp"):
        path = root if fmt == "mmbench" else root / "Questions.csv"
        csv.field_size_limit(1 << 30)
        with path.open(newline="") as f:
            check(next(csv.reader(f, delimiter="\t" if fmt == "mmbench" else ",")), f"{path} (columns)")
    elif fmt == "realworldqa":
        import pyarrow.parquet as pq

        for file in sorted(root.glob("*.parquet")) if root.is_dir() else [root]:
            check(pq.ParquetFile(file).schema_arrow.names, f"{file} (columns)")
    elif fmt == "hallusionbench":
        path = root / "HallusionBench.json"
        for i, row in enumerate(json.loads(path.read_text())):
            check(row if isinstance(row, dict) else {}, f"{path}: record {i}")
    else:
        for n, line in enumerate(root.read_text().splitlines(), start=1):
            if line.strip():
                row = json.loads(line)
                check(row if isinstance(row, dict) else {}, f"{root}:{n}")


def records(
    fmt: str, root: Path, images: Path | None, ignore_keys: list[str] | tuple[str, ...] = ()
) -> Iterator[dict[str, Any] | Skip]:
    """The records of a benchmark ({key, image (bytes or a file path), question, answer, options, type}) or Skips.

    The benchmark's columns / record keys are checked first (`check_format_keys`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not root.exists():
        raise FileNotFoundError(f"--root {root}: no such file or folder")
    check_format_keys(fmt, root, ignore_keys)
    if fmt == "vsr":
        if images is None:
            raise ValueError("--format vsr needs --images (the COCO image folder)")
        return vsr(root, images)
    return {"mmbench": mmbench, "mmvp": mmvp, "hallusionbench": hallusionbench, "realworldqa": realworldqa}[
        fmt
    ](root)


def convert_bench(
    fmt: str,
    root: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    split: str = "test",
    ignore_keys: list[str] | tuple[str, ...] = (),
) -> tuple[Path, int, Counter]:
    """Write the benchmark as one evaluation split; return (index path, samples written, skips per reason)."""
    skipped: Counter = Counter()
    keys: set[str] = set()
    written = 0
    stream = records(fmt, Path(root), Path(images) if images else None, ignore_keys)
    with ShardWriter(out, split, max_count=500) as writer:
        for rec in stream:
            try:
                if isinstance(rec, Skip):
                    raise rec
                image = read_file(rec["image"]) if isinstance(rec["image"], Path) else rec["image"]
                writer.write(
                    item(
                        sample_key(rec["key"], keys), image, rec["question"], rec["answer"],
                        rec["options"], rec["type"], fmt,
                    )
                )  # fmt: skip
            except Skip as err:
                skipped[str(err).split(":", 1)[0]] += 1
                continue
            written += 1
            if not rec["options"]:
                skipped["free_form_kept_unscored"] += 1
        shards = writer.shards
    index = write_index(
        out,
        kind="scenes",
        splits={split: split_entry(shards, written)},
        skipped=dict(skipped),
    )
    return index, written, skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's options."""
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--root", required=True, help="the benchmark's file or folder (see the module docstring)"
    )
    parser.add_argument("--images", default=None, help="VSR: the COCO image folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="test")
    add_ignore_keys(parser)


def convert(args: argparse.Namespace) -> Path:
    """Convert one benchmark."""
    path, written, skipped = convert_bench(
        args.format, args.root, args.out, args.images, args.split, getattr(args, "ignore_keys", ())
    )
    print(f"{args.format}/{args.split}: wrote {written} samples -> {path}")
    for reason, count in sorted(skipped.items()):
        print(f"  {reason}: {count}")
    return path
