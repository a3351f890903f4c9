"""The layout data kind: generated scenes agree with their plans, bad plans are counted skips, converters."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from datamodules.convert.caption_boxes import convert_file, interleave
from datamodules.layout import LayoutDataModule
from datamodules.synth import synthesize
from datamodules.synth.layout import make_sample
from datamodules.webdataset import BadSample, iter_raw_samples, read_index
from lightning_modules.components.layout import Region, parse_layout

TINY = {"budget": 32, "target_budget": 32, "min_side": 16, "multiple": 16, "synth": False}


def test_generated_samples_are_deterministic_and_their_plan_is_the_instruction():
    first, again = make_sample("train", 3, 0), make_sample("train", 3, 0)
    assert first["target.png"] == again["target.png"] and first["json"] == again["json"]
    for index in range(16):
        meta = make_sample("test", index, 0)["json"]
        assert parse_layout(meta["instruction"], repair=False).to_json() == meta["layout"]
        if meta["task"] == "t2i":  # the held-out test split: position and counting prompts only
            assert meta["geneval"]["tag"] in ("position", "counting") and meta["prompt"].startswith(
                "a photo of"
            )
        else:
            assert meta["n_refs"] == 1 and meta["edit"]["op"] in ("add", "remove", "recolour")


def test_an_edit_changes_only_its_box():
    for index in range(40):
        sample = make_sample("train", index, 0)
        meta = sample["json"]
        if meta["task"] != "edit":
            continue
        source = np.asarray(Image.open(io.BytesIO(sample["ref0.png"])).convert("RGB")).astype(int)
        target = np.asarray(Image.open(io.BytesIO(sample["target.png"])).convert("RGB")).astype(int)
        x0, y0, x1, y1 = (round(v * 128 / 1000) for v in meta["edit"]["box"])
        changed = np.abs(source - target).sum(-1) > 0
        assert changed.any()
        ys, xs = np.nonzero(changed)
        assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
        return
    pytest.fail("no edit among the first 40 samples")


def raw(instruction: str, layout=None) -> dict:
    png = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png, format="PNG")
    meta = {"instruction": instruction, "task": "t2i", "n_refs": 0, "source": "test", "orig_id": "k",
            "layout": layout if layout is not None else parse_layout(instruction).to_json()}  # fmt: skip
    return {"__key__": "k", "json": meta, "target.png": np.zeros((32, 32, 3), np.uint8)}


@pytest.mark.parametrize(
    "instruction, layout, reason",
    [
        ("a cat [300, 10, 100, 200]", [], "inverted"),
        ("a cat [0, 0, 10, 10] and a cat [0, 0, 10, 10]", [], "twice"),
        ("a cat [0, 0, 10, 10]", [{"phrase": "a cat", "box": [0, 0, 10, 1200]}], "layout"),
    ],
)
def test_a_bad_plan_in_a_sample_is_a_bad_sample_naming_it(instruction, layout, reason):
    transform = LayoutDataModule(**TINY).transform(train=True)
    with pytest.raises(BadSample, match=reason):
        transform(raw(instruction, layout), np.random.default_rng(0))


def test_batches_from_generated_shards_carry_the_plan(tmp_path):
    synthesize("layout", tmp_path, samples={"train": 12, "val": 4, "test": 4}, seed=0)
    dm = LayoutDataModule(**{**TINY, "data_dir": str(tmp_path), "batch_size": 4, "task_mix": {"t2i": 1.0}})
    batches = list(dm.train_dataloader())
    assert batches and all(t == "t2i" for b in batches for t in b["task"])
    for batch in batches:
        for target, meta, text in zip(batch["target"], batch["meta"], batch["instruction"]):
            assert tuple(target.shape) == (3, 32, 32) and text == meta["instruction"] and meta["layout"]


def test_interleave_puts_boxes_after_their_phrases_and_appends_the_rest():
    regions = [Region("a dog", (0, 0, 500, 500)), Region("a ball", (600, 600, 700, 700))]
    assert (
        interleave("A dog plays.", regions)
        == "A dog [0, 0, 500, 500] plays, with a ball [600, 600, 700, 700]"
    )


def write_image(path, w, h):
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


@pytest.mark.parametrize("fmt", ["layoutgpt", "gligen"])
def test_caption_box_converters_write_layout_shards_and_count_skips(tmp_path, fmt):
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "1.png", 200, 100)
    if fmt == "layoutgpt":
        records = [
            {
                "id": 1,
                "prompt": "a dog left of a cat",
                "object_list": [["dog", [0.1, 0.2, 0.3, 0.5]], ["cat", [0.6, 0.2, 0.3, 0.5]]],
            },
            {"id": 2, "prompt": "a bird", "object_list": [["bird", [0.1, 0.1, 0.2, 0.2]]]},  # no image 2
            {"id": 1, "prompt": "broken", "object_list": [["x", [1, 2]]]},
        ]
    else:
        records = [
            {
                "file_name": "1.png",
                "prompt": "a dog left of a cat",
                "phrases": ["dog", "cat"],
                "locations": [[0.1, 0.2, 0.4, 0.7], [0.6, 0.2, 0.9, 0.7]],
            },
            {
                "file_name": "2.png",
                "prompt": "a bird",
                "phrases": ["bird"],
                "locations": [[0.1, 0.1, 0.3, 0.3]],
            },
            {"file_name": "1.png", "prompt": "broken", "phrases": ["x", "y"], "locations": [[0, 0, 1, 1]]},
        ]
    (tmp_path / "boxes.json").write_text(json.dumps(records))
    report = convert_file(tmp_path / "boxes.json", images, tmp_path / "out", fmt, split="train")
    assert report.samples == 1 and report.skipped == {"missing_image": 1, "bad_record": 1}
    index = read_index(tmp_path / "out")
    (sample,) = list(iter_raw_samples(str(tmp_path / "out" / index["splits"]["train"]["shards"][0])))
    meta = json.loads(sample["json"])
    assert meta["instruction"] == "a dog [100, 200, 400, 700] left of a cat [600, 200, 900, 700]"
    # the layout is the plan as the format reads it back (the phrase runs from the clause start)
    assert meta["layout"] == [{"phrase": "a dog", "box": [100, 200, 400, 700]}, {"phrase": "a cat", "box": [600, 200, 900, 700]}]  # fmt: skip
    assert meta["caption"] == "a dog left of a cat" and meta["task"] == "t2i" and meta["n_refs"] == 0
