"""Each released preference layout, written small, converts to items the data module reads; bad records are counted."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datamodules.convert import converter
from datamodules.preference import PreferenceDataModule
from omnilab.cli import main


def png_bytes(value: int, size: tuple[int, int] = (20, 24)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def save(path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(value))
    return path.name


def items(out, split="test") -> list[dict]:
    dm = PreferenceDataModule(
        data_dir=str(out), eval_batch_size=16, synth=False, test_shards=f"{out}/{split}-*.tar"
    )
    return [
        {
            "tiers": t,
            "meta": m,
            "n": len(c),
            "value": [round(float(x.mean()), 3) for x in c],
            "sources": len(s),
        }
        for b in dm.test_dataloader()
        for t, m, c, s in zip(b["tiers"], b["meta"], b["candidates"], b["sources"])
    ]


def level(value: int) -> float:
    return round(value / 127.5 - 1, 3)


def convert(name: str, *args: str) -> dict:
    main(["data", "convert", name, *args])
    return json.loads((__import__("pathlib").Path(args[args.index("--out") + 1]) / "index.json").read_text())


def test_editreward_data_pairs_rank_by_summed_dimensions(tmp_path):
    for name, v in (("src.png", 10), ("a.png", 60), ("b.png", 120)):
        save(tmp_path / "img" / name, v)
    rows = [
        {"prompt": "red", "path_src": "img/src.png", "path1": "img/a.png", "path2": "img/b.png", "model1_dim1_score": 4, "model2_dim1_score": 2, "model1_dim2_score": 1, "model2_dim2_score": 4},
        {"prompt": "tie", "path_src": "img/src.png", "path1": "img/a.png", "path2": "img/b.png", "model1_dim1_score": 3, "model2_dim1_score": 3},
        {"prompt": "gone", "path_src": "img/src.png", "path1": "img/missing.png", "path2": "img/b.png", "model1_dim1_score": 3, "model2_dim1_score": 1},
        {"prompt": "bad", "path_src": "img/src.png", "path1": "img/a.png", "path2": "img/b.png", "model1_dim1_score": "4"},
    ]  # fmt: skip
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    index = convert(
        "editreward_data",
        "--input",
        str(tmp_path / "pairs.json"),
        "--out",
        str(tmp_path / "out"),
        "--split",
        "test",
    )
    assert index["splits"]["test"]["samples"] == 2
    assert index["skipped"]["test"] == {"bad_record": 1, "missing_image": 1}
    got = items(tmp_path / "out")
    # 4 + 1 = 5 < 2 + 4 = 6: B is preferred; 3 = 3: a tie
    assert got[0]["tiers"] == [1, 0] and got[0]["meta"]["human_scores"] == [5.0, 6.0]
    assert got[1]["tiers"] == [0, 0] and got[0]["value"] == [level(60), level(120)]


def test_editreward_bench_items_keep_their_k_and_rankings(tmp_path):
    for name, v in (("s.png", 5), ("c0.png", 50), ("c1.png", 100), ("c2.png", 150)):
        save(tmp_path / name, v)
    rows = [
        {"prompt": "p3", "path_src": "s.png", "paths_generated": ["c0.png", "c1.png", "c2.png"], "human_vote": {"ranking": "C>A>B"}},
        {"prompt": "p2", "path_src": "s.png", "paths_generated": ["c0.png", "c1.png"], "human_vote": {"ranking": "A=B=Good"}},
        {"prompt": "bad", "path_src": "s.png", "paths_generated": ["c0.png", "c1.png"], "human_vote": {"ranking": "A>C"}},
    ]  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    index = convert(
        "editreward_bench", "--input", str(tmp_path / "bench.json"), "--out", str(tmp_path / "out")
    )
    assert index["splits"]["test"]["subsets"] == {"2pair": 1, "3pair": 1}
    assert index["skipped"]["test"] == {"bad_ranking": 1}
    got = items(tmp_path / "out")
    assert got[0]["tiers"] == [1, 2, 0] and got[0]["meta"]["benchmark"] == "editreward_bench"
    assert got[1]["tiers"] == [0, 0] and got[1]["meta"]["ranking"] == "A=B=Good"


def struct(value: int) -> dict:
    return {"bytes": png_bytes(value), "path": None}


def test_editscore_bench_parquet_rows_become_first_preferred_pairs(tmp_path):
    table = pa.Table.from_pylist(
        [
            {"key": ["k1", "k2"], "instruction": "make it blue", "input_image": struct(0), "output_images": [struct(40), struct(80)], "task_type": "color_alter", "dimension": "prompt_following"},
            {"key": ["k3", "k4"], "instruction": "x", "input_image": struct(0), "output_images": [struct(40), struct(80)], "task_type": "rotate", "dimension": "overall"},
        ]
    )  # fmt: skip
    pq.write_table(table, tmp_path / "bench.parquet")
    index = convert(
        "editscore_bench", "--input", str(tmp_path / "bench.parquet"), "--out", str(tmp_path / "out")
    )
    assert index["skipped"]["test"] == {"unknown_task_type": 1}
    (got,) = items(tmp_path / "out")
    assert got["tiers"] == [0, 1] and got["value"] == [level(40), level(80)]
    assert got["meta"]["task_type"] == "color" and got["meta"]["dimension"] == "prompt_following"


def test_mmrb2_pairs_keep_multiple_inputs_and_skip_non_image_responses(tmp_path):
    for name, v in (("in/a.jpg", 10), ("in/b.jpg", 20), ("out/r0.jpg", 60), ("out/r1.jpg", 90)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), v, np.uint8)).save(tmp_path / name, format="JPEG", quality=100)
    image = lambda p: {"model_name": "m", "response_content": [["image", p]]}  # noqa: E731
    pairs = [
        {"id": "p1", "prompt_content": [["image", "in/a.jpg"], ["image", "in/b.jpg"], ["text", "combine them"]], "response_a": image("out/r0.jpg"), "response_b": image("out/r1.jpg"), "chosen": "B", "human_annotations": [1, 2, 1]},
        {"id": "p2", "prompt_content": [["text", "a cat"]], "response_a": image("out/r0.jpg"), "response_b": {"response_content": [["text", "hi"], ["image", "out/r1.jpg"]]}, "chosen": "A"},
    ]  # fmt: skip
    (tmp_path / "edit.json").write_text(json.dumps({"pairs": pairs}))
    index = convert("mmrb2", "--input", str(tmp_path / "edit.json"), "--out", str(tmp_path / "out"))
    assert index["skipped"]["test"] == {"not_single_image": 1}
    (got,) = items(tmp_path / "out")
    assert got["tiers"] == [1, 0] and got["sources"] == 2 and got["meta"]["benchmark"] == "mmrb2"


def test_mer_bench_orders_candidates_best_first(tmp_path):
    row = {"pair_id": "x", "instruction": "add a hat", "original_image": struct(0), "edited_images": [struct(30), struct(60), struct(90), struct(120)], "label": "add", "sample_id": "s"}  # fmt: skip
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "4pair.parquet")
    convert("mer_bench", "--input", str(tmp_path / "4pair.parquet"), "--out", str(tmp_path / "out"))
    (got,) = items(tmp_path / "out")
    assert (
        got["tiers"] == [0, 1, 2, 3]
        and got["meta"]["ranking"] == "A>B>C>D"
        and got["meta"]["subset"] == "4pair"
    )


def test_converting_into_a_folder_of_another_kind_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.json").write_text(json.dumps({"kind": "multiref"}))
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match="kind 'multiref'"):
        convert("mer_bench", "--input", str(tmp_path / "x.json"), "--out", str(tmp_path / "out"))
    assert converter("mmrb2").__name__ == "datamodules.convert.mmrb2"
