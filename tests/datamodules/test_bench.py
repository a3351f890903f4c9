"""Benchmark layouts: MICo-Bench's released JSONL + folders, GEdit-Bench's parquet, the MICo categories."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datamodules.bench import EditBenchDataModule, gedit_bench_cases, mico_bench_cases
from datamodules.convert.gedit_bench import convert_parquet
from datamodules.convert.mico_bench import convert_bench
from datamodules.mico import category_of
from datamodules.webdataset import iter_raw_samples


def png(value: int, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_mico_bench(root: Path) -> Path:
    """A MICo-Bench folder in the released layout: two HOI cases (one source missing) and one De&Re case."""
    hoi = [
        {"idx": 0, "original_idx": 49, "input": ["mico_bench_hoi/0/0.jpg", "mico_bench_hoi/0/1.png"],
         "Task": "HOI", "editing_type": "1 Human + 1 Object", "prompt": "a man in image 1 on a chair in image 2",
         "reference": "mico_bench_hoi/0/reference.jpg", "human_indices": [0]},
        {"idx": 1, "original_idx": 50, "input": ["mico_bench_hoi/1/0.jpg", "mico_bench_hoi/1/1.png"],
         "Task": "HOI", "editing_type": "Human + 2 Clothes + 1 Object", "prompt": "try on",
         "reference": "mico_bench_hoi/1/reference.jpg", "human_indices": [0]},
    ]  # fmt: skip
    dere = [
        {"ed_idx": 2, "input": [f"mico_bench_dere/2/{i}.png" for i in range(3)], "Task": "DeRe",
         "prompt": "short", "refined_prompt": "the refined prompt", "reference": "mico_bench_dere/2/reference.jpg",
         "human_indices": []},
    ]  # fmt: skip
    for name, records in (("mico_bench_hoi", hoi), ("mico_bench_dere", dere)):
        (root / f"{name}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        for r in records:
            for k, path in enumerate([*r["input"], r["reference"]]):
                if path == "mico_bench_hoi/1/1.png":
                    continue  # a missing source image
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_bytes(png(20 * k + 10))
    return root


@pytest.mark.parametrize(
    ("editing_type", "category"),
    [("3 Objects", "multi_object"), ("2 Object + Scene", "object_scene"), ("Object + Scene", "object_scene"),
     ("2 Persons", "multi_person"), ("3 female characters", "multi_person"),
     ("2 male characters and 1 female character", "multi_person"), ("1 Human + Scene", "person_scene"),
     ("2 Human + 2 Object", "human_object"), ("Human + 4 Clothes", "human_clothes"),
     ("Human + 1 Clothes + 2 Object", "human_clothes_object")],
)  # fmt: skip
def test_every_mico_bench_editing_type_maps_to_its_category(editing_type, category):
    assert category_of({"editing_type": editing_type}) == category


def test_category_from_roles_and_de_re():
    assert category_of({"Task": "DeRe"}) == "dere"
    assert category_of({"task": "compose", "ref_roles": ["human", "clothes", "clothes"]}) == "human_clothes"
    assert category_of({"task": "edit", "ref_roles": ["scene"]}) == "unknown"


def test_mico_bench_cases_read_the_released_layout(tmp_path):
    root = write_mico_bench(tmp_path / "MICo-Bench")
    cases = mico_bench_cases(root)
    assert [(c["group"], c["case_id"]) for c in cases] == [
        ("mico_bench_hoi", "0"), ("mico_bench_hoi", "1"), ("mico_bench_dere", "2")
    ]  # fmt: skip
    assert [c["category"] for c in cases] == ["human_object", "human_clothes_object", "dere"]
    assert cases[2]["instruction"] == "the refined prompt"  # De&Re is judged on its refined prompt
    assert cases[0]["human"] == [0] and cases[0]["reference"].endswith("mico_bench_hoi/0/reference.jpg")
    dm = EditBenchDataModule(benchmark="mico", data_dir=str(root), batch_size=3)
    batch = next(iter(dm.test_dataloader()))
    assert batch["sources"][0][0].shape == (3, 16, 24) and batch["sources"][1][1] is None  # missing: None
    assert dm.groups[:4] == ["mico_bench_object_centric", "mico_bench_human_centric", "mico_bench_hoi",
                             "mico_bench_dere"]  # fmt: skip


def test_mico_bench_converts_to_eval_shards_with_the_reference_as_target(tmp_path):
    root = write_mico_bench(tmp_path / "MICo-Bench")
    report = convert_bench(root, tmp_path / "shards", max_refs=2)
    assert report.samples == 1 and report.skipped == {"missing_image": 1, "too_many_inputs": 1}
    (sample,) = list(iter_raw_samples(str(tmp_path / "shards" / "test-000000.tar")))
    meta = json.loads(sample["json"])
    assert meta["category"] == "human_object" and meta["ref_roles"] == ["human", "source"]
    assert meta["orig_id"] == "mico_bench_hoi/0" and "target.png" in sample


def test_gedit_bench_parquet_converts_to_the_official_layout(tmp_path):
    rows = {
        "task_type": ["color_alter", "subject-add", "not_a_group"],
        "key": ["k1", "k2", "k3"],
        "instruction": ["make it blue", "加一只猫", "x"],
        "instruction_language": ["en", "cn", "en"],
        "input_image": [
            {"bytes": png(50), "path": None},
            {"bytes": png(90), "path": None},
            {"bytes": png(1)},
        ],
        "input_image_raw": [{"bytes": png(50)}, {"bytes": png(90)}, {"bytes": png(1)}],
        "Intersection_exist": [True, False, True],
    }
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "data" / "train-00000-of-00001.parquet")
    report = convert_parquet([tmp_path / "data"], tmp_path / "gedit")
    assert report["cases"] == 2 and report["skipped"] == {"bad_record": 1}
    assert (tmp_path / "gedit/fullset/color_alter/en/k1_SRCIMG.png").is_file()
    cases = gedit_bench_cases(tmp_path / "gedit")
    assert [(c["group"], c["language"], c["intersection"]) for c in cases] == [
        ("color_alter", "en", True), ("subject-add", "cn", False)
    ]  # fmt: skip
    assert [c["case_id"] for c in gedit_bench_cases(tmp_path / "gedit", languages=["cn"])] == ["k2"]
    with pytest.raises(FileNotFoundError, match="convert the released parquet"):
        gedit_bench_cases(tmp_path / "nowhere")
