"""The multiref converters: UniPic-3 / OmniGen2 / BLIP3o JSONL and MICo-150K parquet -> shards."""

from __future__ import annotations

import argparse
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datamodules.convert import converter
from datamodules.convert.edit_jsonl import UnknownKey, convert_jsonl
from datamodules.convert.mico150k import convert_parquet
from datamodules.multiref import MultiRefDataModule
from datamodules.webdataset import decode_sample, iter_raw_samples
from omnilab.cli import main


def encoded(fmt, w=40, h=36, value=0):
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = value
    img[::3, ::2, 1] = 200  # some structure, so a re-encode would show
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue(), img


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def decoded(out, split="train"):
    return [decode_sample(raw, ("json",)) for raw in iter_raw_samples(str(out / f"{split}-000000.tar"))]


def transform():
    return MultiRefDataModule(budget=64, target_budget=64, min_side=32, multiple=32, synth=False).transform(
        False
    )


# --------------------------------------------------------------------------- JSONL


@pytest.fixture
def jsonl_set(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    files = {
        "a.png": encoded("PNG", value=10),
        "b.jpg": encoded("JPEG", value=20),
        "c.bmp": encoded("BMP", value=30),
        "t.jpg": encoded("JPEG", 48, 40, value=40),
    }
    for name, (data, _) in files.items():
        (images / name).write_bytes(data)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    records = [
        {
            "input_images": ["images/a.png"],
            "output_image": "images/t.jpg",
            "instruction": "Make image 1 red",
            "id": "e1",
        },
        {
            "task_type": "in_context_generation",
            "instruction": "Put the object from image 2 into image 1",
            "input_images": ["images/b.jpg", "images/c.bmp"],
            "output_image": "images/t.jpg",
            "editing_type": "multi-object",
        },
        {"input_images": [], "output_image": "images/t.jpg", "instruction": "a red star"},
        {"input_images": ["images/missing.png"], "output_image": "images/t.jpg", "instruction": "x"},
        {"input_images": ["images/a.png"] * 7, "output_image": "images/t.jpg", "instruction": "x"},
        {
            "input_images": ["images/a.png"],
            "output_image": "images/t.jpg",
            "instruction": "Put image 2 on image 1",
        },
        {"input_images": ["images/broken.png"], "output_image": "images/t.jpg", "instruction": "x"},
        {"input_images": ["images/a.png"], "instruction": "no output"},
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in records] + ["{not json"]) + "\n")
    return path, files


def test_jsonl_records_become_samples_and_bad_ones_are_counted(jsonl_set, tmp_path):
    path, files = jsonl_set
    report = convert_jsonl([path], tmp_path / "out", source="unipic3")
    assert report.samples == 3
    assert dict(report.skipped) == {
        "missing_image": 1,
        "too_many_inputs": 1,
        "names_missing_image": 1,
        "unreadable_image": 1,
        "bad_record": 2,  # no output_image; a line that is not JSON
    }
    index = json.loads(report.index.read_text())
    assert index["kind"] == "multiref" and index["splits"]["train"]["samples"] == 3
    assert index["skipped"]["train"]["too_many_inputs"] == 1
    assert index["splits"]["train"]["n_refs"] == {"0": 1, "1": 1, "2": 1}
    assert index["splits"]["train"]["tasks"] == {"edit": 1, "in_context_generation": 1, "t2i": 1}

    raw = members(tmp_path / "out" / "train-000000.tar")
    # PNG and JPEG bytes are copied as they are, with the extension their bytes say; BMP becomes PNG
    assert raw["train_00000000.ref0.png"] == files["a.png"][0]
    assert raw["train_00000000.target.jpg"] == files["t.jpg"][0]
    assert raw["train_00000001.ref0.jpg"] == files["b.jpg"][0]
    edit, compose, t2i = decoded(tmp_path / "out")
    assert np.array_equal(compose["ref1.png"], files["c.bmp"][1])  # lossless re-encode
    assert (
        edit["json"]["orig_id"] == "e1"
        and edit["json"]["source"] == "unipic3"
        and edit["json"]["task"] == "edit"
    )
    assert compose["json"]["editing_type"] == "multi-object" and compose["json"]["ref_sizes"] == [
        [40, 36],
        [40, 36],
    ]
    assert compose["json"]["target_size"] == [48, 40]
    assert t2i["json"]["n_refs"] == 0 and t2i["json"]["task"] == "t2i"
    for s in (edit, compose, t2i):  # the data kind reads them
        out = transform()(s, np.random.default_rng(0))
        assert len(out["refs"]) == s["json"]["n_refs"]


def test_image_root_and_a_json_list_as_blip3o_writes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "x.png").write_bytes(encoded("PNG")[0])
    (root / "y.png").write_bytes(encoded("PNG", value=99)[0])
    listing = tmp_path / "meta" / "blip3o.json"
    listing.parent.mkdir()
    listing.write_text(
        json.dumps([{"input_images": ["x.png"], "output_image": "y.png", "instruction": "edit"}])
    )
    parser = argparse.ArgumentParser()
    module = converter("edit_jsonl")
    module.add_arguments(parser)
    args = parser.parse_args(
        ["--jsonl", str(listing), "--image-root", str(root), "--out", str(tmp_path / "o")]
    )
    index = json.loads(module.convert(args).read_text())
    assert index["splits"]["train"]["samples"] == 1 and index["skipped"]["train"] == {}


def test_converting_a_second_split_merges_the_index(jsonl_set, tmp_path):
    path, _ = jsonl_set
    convert_jsonl([path], tmp_path / "out", split="train")
    report = convert_jsonl([path], tmp_path / "out", split="val")
    index = json.loads(report.index.read_text())
    assert set(index["splits"]) == {"train", "val"} and set(index["skipped"]) == {"train", "val"}


# --------------------------------------------------------------------------- MICo-150K parquet


def test_mico_parquet_rows_are_read_in_record_batches(tmp_path):
    png1, png2, jpg = encoded("PNG", value=1)[0], encoded("PNG", value=2)[0], encoded("JPEG", value=3)[0]
    table = pa.table(
        {
            "image_list": [[png1, png2, jpg], [png1] * 8, [], [png1, b"garbage"], [png2, jpg]],
            "instruction": ["Put image 2 next to image 1", "x", "x", "x", "Make image 1 blue"],
        }
    )
    folder = tmp_path / "mico"
    folder.mkdir()
    pq.write_table(table, folder / "part-000.parquet", row_group_size=2)  # three row groups
    hf = pa.table(  # the Hugging Face image struct layout
        {
            "image_list": [[{"bytes": png2, "path": None}, {"bytes": jpg, "path": "t.jpg"}]],
            "instruction": ["Edit image 1"],
            "id": ["hf-7"],
        }
    )
    pq.write_table(hf, folder / "part-001.parquet")

    report = convert_parquet([folder], tmp_path / "out", batch_size=1)
    assert report.samples == 3
    assert dict(report.skipped) == {"too_many_inputs": 1, "no_images": 1, "unreadable_image": 1}
    raw = members(tmp_path / "out" / "train-000000.tar")
    assert raw["train_00000000.ref0.png"] == png1 and raw["train_00000000.ref1.png"] == png2
    assert raw["train_00000000.target.jpg"] == jpg  # the LAST image is the target, bytes kept
    first, second, third = decoded(tmp_path / "out")
    assert first["json"]["task"] == "compose" and first["json"]["n_refs"] == 2
    assert first["json"]["orig_id"] == "part-000.parquet:0" and first["json"]["source"] == "mico150k"
    assert second["json"]["task"] == "edit" and second["json"]["orig_id"] == "part-000.parquet:4"
    assert third["json"]["orig_id"] == "hf-7"
    index = json.loads(report.index.read_text())
    assert index["skipped"]["train"]["too_many_inputs"] == 1
    for s in (first, second, third):
        assert len(transform()(s, np.random.default_rng(0))["refs"]) == s["json"]["n_refs"]


def test_a_parquet_without_the_bagel_columns_is_refused(tmp_path):
    pq.write_table(pa.table({"images": [[b"x"]]}), tmp_path / "bad.parquet")
    with pytest.raises(
        UnknownKey, match=r"bad.parquet \(columns\): unknown key 'images' \(did you mean 'image_list'\?\)"
    ):
        convert_parquet([tmp_path / "bad.parquet"], tmp_path / "out")
    with pytest.raises(ValueError, match="no column"):  # the misspelt column dropped: image_list is missing
        convert_parquet([tmp_path / "bad.parquet"], tmp_path / "out", ignore_keys=["images"])
    assert not (tmp_path / "out" / "index.json").exists()  # refused before anything was written


def test_converting_into_a_folder_of_another_kind_is_refused_before_touching_it(jsonl_set, tmp_path):
    path, _ = jsonl_set
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"kind": "correspondence"}))
    (out / "train-000000.tar").write_bytes(b"other data")
    with pytest.raises(ValueError, match="of kind 'correspondence'"):
        convert_jsonl([path], out)
    assert (out / "train-000000.tar").read_bytes() == b"other data"


def test_an_unknown_record_key_stops_the_conversion_naming_it(tmp_path):
    """`inputs` for `input_images` would make every record a text-to-image sample: refused, nothing written."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "edits.jsonl"
    record = {"inputs": ["a.png"], "output_image": "a.png", "instruction": "make it red"}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(
        UnknownKey, match=r"edits.jsonl:1: unknown key 'inputs' \(did you mean 'input_images'\?\)"
    ):
        convert_jsonl([path], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = convert_jsonl([path], tmp_path / "out", ignore_keys=["inputs"])  # asked: the key is dropped
    assert report.samples == 1


def test_a_converter_help_shows_its_own_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["data", "convert", "edit_jsonl", "--help"])
    out = capsys.readouterr().out
    assert "omnilab data convert edit_jsonl" in out and "--jsonl" in out and "--ignore-keys" in out
