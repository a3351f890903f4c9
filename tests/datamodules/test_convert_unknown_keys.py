"""Every converter refuses a record key it does not know, before writing anything, naming the file, the record
and the nearest known key (`datamodules.convert.edit_jsonl.check_keys`, the one helper); `--ignore-keys` is an
option of every converter. One bad record per converter kind (edit_jsonl's and mico150k's are in
test_convert_multiref.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules.convert import CONVERTERS, converter
from datamodules.convert.edit_jsonl import UnknownKey


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_every_converter_has_the_ignore_keys_option(name):
    parser = argparse.ArgumentParser()
    converter(name).add_arguments(parser)
    assert "--ignore-keys" in parser.format_help()


PREFERENCE = {  # converter: (a record with one misspelt key, the misspelling, the key meant)
    "editreward_bench": (
        {"prompt": "p", "path_scr": "s.png", "paths_generated": [], "human_vote": {}},
        "path_scr",
        "path_src",
    ),
    "editreward_data": (
        {"prompt": "p", "path_src": "s.png", "path1": "a.png", "path2": "b.png", "model1_dim1_scor": 3},
        "model1_dim1_scor",
        "model1_dim1_score",
    ),
    "editscore_bench": (
        {"key": ["a", "b"], "instruction": "i", "output_image": []},
        "output_image",
        "output_images",
    ),
    "mer_bench": ({"pair_id": 1, "instruction": "i", "edited_image": []}, "edited_image", "edited_images"),
    "mmrb2": ({"id": 1, "prompt_content": [], "respons_a": {}, "chosen": "A"}, "respons_a", "response_a"),
}


@pytest.mark.parametrize("name", sorted(PREFERENCE))
def test_preference_converters_refuse_an_unknown_key(tmp_path, name):
    record, bad, meant = PREFERENCE[name]
    path = tmp_path / "items.json"
    good = {k: v for k, v in record.items() if k != bad}
    payload = [good, record] if name != "mmrb2" else {"pairs": [good, record]}
    path.write_text(json.dumps(payload))
    args = argparse.Namespace(
        input=[path],
        out=tmp_path / "out",
        split="test",
        image_root=None,
        source=name,
        shard_size=10,
        ignore_keys=[],
    )
    with pytest.raises(UnknownKey, match=rf"items.json:1: unknown key '{bad}' \(did you mean '{meant}'\?\)"):
        converter(name).convert(args)
    assert nothing_written(tmp_path / "out")
    args.ignore_keys = [bad]  # asked: the key is dropped and the records convert (as counted skips here)
    converter(name).convert(args)
    assert (tmp_path / "out" / "index.json").is_file()


def test_a_parquet_preference_file_is_checked_by_its_columns(tmp_path):
    pq.write_table(pa.table({"key": [["a", "b"]], "instruction": ["i"], "dimensions": ["overall"]}), tmp_path / "b.parquet")  # fmt: skip
    args = argparse.Namespace(
        input=[tmp_path / "b.parquet"], out=tmp_path / "out", split="test", image_root=None, source="s",
        shard_size=10, ignore_keys=[],
    )  # fmt: skip
    with pytest.raises(UnknownKey, match=r"b.parquet \(columns\): unknown key 'dimensions' \(did you mean 'dimension'\?\)"):  # fmt: skip
        converter("editscore_bench").convert(args)


@pytest.mark.parametrize(
    ("fmt", "record", "bad", "meant"),
    [
        (
            "layoutgpt",
            {"id": 1, "prompt": "a cat", "objects_list": [["cat", [0, 0, 1, 1]]]},
            "objects_list",
            "object_list",
        ),
        (
            "gligen",
            {"file_name": "a.png", "prompt": "a cat", "phrases": ["cat"], "location": [[0, 0, 1, 1]]},
            "location",
            "locations",
        ),
    ],
)
def test_caption_box_converters_refuse_an_unknown_key(tmp_path, fmt, record, bad, meant):
    from datamodules.convert.caption_boxes import convert_file

    (tmp_path / "boxes.json").write_text(json.dumps([record]))
    with pytest.raises(UnknownKey, match=rf"boxes.json: record 0: unknown key '{bad}' \(did you mean '{meant}'\?\)"):  # fmt: skip
        convert_file(tmp_path / "boxes.json", tmp_path, tmp_path / "out", fmt)
    assert nothing_written(tmp_path / "out")


def test_mico_bench_refuses_an_unknown_key(tmp_path):
    from datamodules.convert.mico_bench import convert_bench

    record = {"idx": 0, "input": ["a.png"], "prompt": "p", "refined_promt": "r", "reference": "r.png"}
    (tmp_path / "mico_bench_hoi.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(UnknownKey, match=r"mico_bench_hoi.jsonl: case 0: unknown key 'refined_promt' \(did you mean 'refined_prompt'\?\)"):  # fmt: skip
        convert_bench(tmp_path, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_gedit_bench_refuses_an_unknown_column(tmp_path):
    from datamodules.convert.gedit_bench import COLUMNS, convert_parquet

    columns = {c: ["x"] for c in COLUMNS} | {"input_img_raw": ["x"]}
    pq.write_table(pa.table(columns), tmp_path / "g.parquet")
    with pytest.raises(UnknownKey, match=r"g.parquet \(columns\): unknown key 'input_img_raw' \(did you mean 'input_image_raw'\?\)"):  # fmt: skip
        convert_parquet([tmp_path / "g.parquet"], tmp_path / "out")
    assert nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    ("take", "match"),
    [
        (
            {"take_name": "t", "object_mask": {}},
            r"annotations.take1: unknown key 'object_mask' \(did you mean 'object_masks'\?\)",
        ),
        (
            {"take_name": "t", "object_masks": {"cup": {"cam01": {"annotated_frame": [], "annotation": {}}}}},
            r"annotations.take1.object_masks.cup.cam01: unknown key 'annotated_frame' \(did you mean 'annotated_frames'\?\)",
        ),
    ],
)
def test_egoexo4d_refuses_an_unknown_key_in_a_take_or_camera_entry(tmp_path, take, match):
    from datamodules.convert.egoexo4d import convert_split

    (tmp_path / "relations_val.json").write_text(json.dumps({"annotations": {"take1": take}}))
    (tmp_path / "frames").mkdir()
    with pytest.raises(UnknownKey, match=match):
        convert_split(tmp_path / "relations_val.json", tmp_path / "frames", tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_handalx_refuses_an_unknown_key(tmp_path):
    from datamodules.convert.handalx import convert_split

    record = {
        "image": "b.jpg",
        "anns": [],
        "first_frame_image": "a.jpg",
        "first_frame_anns": [],
        "video_nam": "v",
    }
    (tmp_path / "pairs.json").write_text(json.dumps([record]))
    with pytest.raises(UnknownKey, match=r"pairs.json: record 0: unknown key 'video_nam' \(did you mean 'video_name'\?\)"):  # fmt: skip
        convert_split(tmp_path / "out", "test", tmp_path, tmp_path / "pairs.json")
    assert nothing_written(tmp_path / "out")


def test_restoration_captions_refuse_an_unknown_key(tmp_path):
    from PIL import Image

    from datamodules.convert.restoration import convert_folders

    (tmp_path / "hq").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "hq" / "a.png")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a.png", "captoin": "a dark image"}) + "\n")
    with pytest.raises(UnknownKey, match=r"captions.jsonl: caption row 1: unknown key 'captoin' \(did you mean 'caption'\?\)"):  # fmt: skip
        convert_folders(tmp_path / "out", [str(tmp_path / "hq")], captions=str(tmp_path / "captions.jsonl"))
    assert nothing_written(tmp_path / "out")


def test_teacher_records_are_checked_before_a_teacher_loads(tmp_path):
    from datamodules.convert import teachers

    record = {"id": "1", "image": "a.png", "conversation": []}
    (tmp_path / "llava.json").write_text(json.dumps([record]))
    args = argparse.Namespace(
        records=str(tmp_path / "llava.json"), image_root=str(tmp_path), out=str(tmp_path / "out"),
        depth_model=str(tmp_path / "no-depth-model"), sam_model=str(tmp_path / "no-sam"), split="train",
        points_per_side=2, iou_threshold=0.88, shard_size=10, limit=None, ignore_keys=[],
    )  # fmt: skip
    # the teachers' folders do not exist: the key error comes first, so nothing is loaded for a bad file
    with pytest.raises(UnknownKey, match=r"llava.json: record 1: unknown key 'conversation' \(did you mean 'conversations'\?\)"):  # fmt: skip
        teachers.convert(args)
    assert nothing_written(tmp_path / "out")


def _write_benchmark(tmp_path: Path, fmt: str) -> Path:
    """A one-record benchmark file of `fmt` with one misspelt column / key."""
    if fmt == "mmbench":
        path = tmp_path / "mmbench.tsv"
        path.write_text("index\tquestion\thnit\tA\tB\tanswer\timage\n0\tq\th\ta\tb\tA\t\n")
    elif fmt == "mmvp":
        path = tmp_path
        (path / "Questions.csv").write_text("Index,Question,Options,Correct answer\n1,q,(a) x (b) y,(a)\n")
    elif fmt == "hallusionbench":
        path = tmp_path
        (path / "HallusionBench.json").write_text(json.dumps([{"question": "q", "gt_answr": "1", "filename": "f.png"}]))  # fmt: skip
    elif fmt == "realworldqa":
        path = tmp_path / "rwqa.parquet"
        pq.write_table(pa.table({"image": [{"bytes": b""}], "questions": ["q"], "answer": ["A"]}), path)
    else:
        path = tmp_path / "vsr.jsonl"
        path.write_text(json.dumps({"image": "a.jpg", "captions": "c", "label": 1}) + "\n")
    return path


@pytest.mark.parametrize(
    ("fmt", "bad", "meant"),
    [
        ("mmbench", "hnit", "hint"),
        ("mmvp", "Correct answer", "Correct Answer"),
        ("hallusionbench", "gt_answr", "gt_answer"),
        ("realworldqa", "questions", "question"),
        ("vsr", "captions", "caption"),
    ],
)
def test_understanding_benchmarks_refuse_an_unknown_column_or_key(tmp_path, fmt, bad, meant):
    from datamodules.convert.understanding_bench import convert_bench

    root = _write_benchmark(tmp_path, fmt)
    with pytest.raises(UnknownKey, match=rf"unknown key '{bad}' \(did you mean '{meant}'\?\)"):
        convert_bench(fmt, root, tmp_path / "out", images=tmp_path)
    assert nothing_written(tmp_path / "out")
