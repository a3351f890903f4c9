"""The understanding benchmarks UniMRG reports, each converted from a small file in its released layout."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from datamodules.convert.understanding_bench import convert_bench
from datamodules.scenes import SceneDataModule


def jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((20, 24, 3)) * 255).astype(np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def read(out, n):
    dm = SceneDataModule(image_size=16, need=["qa"], data_dir=str(out), synth=False, eval_batch_size=n)
    return next(iter(dm.test_dataloader()))


def test_mmbench_tsv_gives_option_texts_and_the_answer_letter_s_text(tmp_path):
    image = base64.b64encode(jpeg()).decode()
    rows = [
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage",
        f"7\tWhat is shown?\tnan\ta cat\ta dog\ta cow\t\tB\tobject\t{image}",
        f"8\tWhich side?\tLook left.\tleft\tright\t\t\tZ\tspatial\t{image}",  # bad answer: skipped
    ]
    (tmp_path / "mmbench.tsv").write_text("\n".join(rows))
    _, written, skipped = convert_bench("mmbench", tmp_path / "mmbench.tsv", tmp_path / "out")
    assert written == 1 and skipped == {"bad_answer": 1}
    batch = read(tmp_path / "out", 1)
    assert batch["options"] == [["a cat", "a dog", "a cow"]] and batch["answer"] == ["a dog"]
    assert batch["qa_type"] == ["object"] and batch["image"].shape == (1, 3, 16, 16)


def test_mmvp_csv_parses_lettered_options(tmp_path):
    (tmp_path / "MMVP Images").mkdir()
    (tmp_path / "MMVP Images" / "1.jpg").write_bytes(jpeg())
    (tmp_path / "Questions.csv").write_text(
        "Index,Question,Options,Correct Answer\n1,Is the door open?,(a) Open (b) Closed,(b)\n"
        "2,Missing image?,(a) Yes (b) No,(a)\n"
    )
    _, written, skipped = convert_bench("mmvp", tmp_path, tmp_path / "out")
    assert written == 1 and skipped == {"missing_image": 1}
    batch = read(tmp_path / "out", 1)
    assert batch["options"] == [["Open", "Closed"]] and batch["answer"] == ["Closed"]


def test_hallusionbench_json_yes_no_and_figureless_questions_are_counted(tmp_path):
    (tmp_path / "hallusion_bench" / "VD").mkdir(parents=True)
    (tmp_path / "hallusion_bench" / "VD" / "0_0.png").write_bytes(jpeg())
    rows = [
        {"category": "VD", "subcategory": "illusion", "set_id": "0", "figure_id": "0", "question_id": "0",
         "question": "Is the line longer?", "gt_answer": "0", "visual_input": "1",
         "filename": "./hallusion_bench/VD/0_0.png"},
        {"category": "VS", "subcategory": "chart", "set_id": "1", "figure_id": "0", "question_id": "0",
         "question": "Was it 1990?", "gt_answer": "1", "visual_input": "0", "filename": None},
    ]  # fmt: skip
    (tmp_path / "HallusionBench.json").write_text(json.dumps(rows))
    _, written, skipped = convert_bench("hallusionbench", tmp_path, tmp_path / "out")
    assert written == 1 and skipped == {"no_figure": 1}
    batch = read(tmp_path / "out", 1)
    assert batch["answer"] == ["no"] and batch["options"] == [["yes", "no"]]


def test_realworldqa_parquet_letters_become_options(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "image": [{"bytes": jpeg(0), "path": None}, {"bytes": jpeg(1), "path": None}],
            "question": ["How many cars?\nA. 1\nB. 2\nC. 3", "What colour is the car?"],
            "answer": ["B", "Red"],
        }
    )
    pq.write_table(table, tmp_path / "test.parquet")
    _, written, skipped = convert_bench("realworldqa", tmp_path, tmp_path / "out")
    assert written == 2 and skipped == {"free_form_kept_unscored": 1}
    batch = read(tmp_path / "out", 2)
    assert sorted(map(tuple, batch["options"])) == [(), ("A", "B", "C")]


def test_vsr_jsonl_asks_whether_the_caption_is_true(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "0001.jpg").write_bytes(jpeg())
    row = {"image": "0001.jpg", "caption": "The cat is left of the dog.", "label": 1, "relation": "left of"}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    _, written, _ = convert_bench("vsr", tmp_path / "test.jsonl", tmp_path / "out", images=tmp_path / "coco")
    batch = read(tmp_path / "out", 1)
    assert written == 1 and batch["question"] == ["Is this statement true: The cat is left of the dog.?"]
    assert batch["answer"] == ["yes"] and batch["qa_type"] == ["left of"]
    with pytest.raises(ValueError, match="--images"):
        convert_bench("vsr", tmp_path / "test.jsonl", tmp_path / "out2")
