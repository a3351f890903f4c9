"""MICo's curation steps: collect, filter (resolution, near-duplicates, judged quality kept per sample), compose,
De&Re; resumable per shard and parallel over shards; and `omnilab data synth mico`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.curate.collect import collect
from datamodules.curate.dere import decompose
from datamodules.curate.filter import NearDuplicates, filter_shards, hamming, phash
from datamodules.mico import CATEGORIES, MICoDataModule
from datamodules.synth.photos import photo
from datamodules.webdataset import iter_raw_samples
from omnilab.chat import ChatClient, decode_image, message_parts
from omnilab.cli import main
from tests.chat_server import ChatServer, Reply


def crop(name: str, x: int, y: int, size: int = 96) -> np.ndarray:
    return np.ascontiguousarray(photo(name)[y : y + size, x : x + size])


def test_phash_is_stable_under_small_changes_and_far_between_photos():
    a = Image.fromarray(crop("astronaut", 100, 50))
    brighter = Image.fromarray(np.clip(np.asarray(a).astype(int) + 6, 0, 255).astype(np.uint8))
    other = Image.fromarray(crop("coffee", 200, 100))
    assert hamming(phash(a), phash(a)) == 0
    assert hamming(phash(a), phash(brighter)) <= 4 < hamming(phash(a), phash(other))
    seen = NearDuplicates(4)
    assert [seen.seen(phash(x)) for x in (a, other, brighter)] == [False, False, True]


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    sources = {
        "a.png": crop("astronaut", 100, 50), "b.jpg": crop("coffee", 200, 100), "c.png": crop("chelsea", 50, 20),
        "d.png": crop("rocket", 150, 100), "e.png": np.full((96, 96, 3), 250, np.uint8),  # a washed-out image
        "f.png": crop("astronaut", 100, 50), "g.png": crop("cat", 10, 10, 24),  # a duplicate, a tiny one
    }  # fmt: skip
    for name, array in sources.items():
        Image.fromarray(array).save(folder / name)
    (folder / "h.png").write_bytes(b"not an image")


def quality_judge(body, n):
    texts, urls = message_parts(body["messages"][0])
    mean = np.asarray(decode_image(urls[-1])).mean()
    if texts[0].startswith("Given two images"):
        return Reply("yes")
    return Reply("[2, 3]" if mean > 240 else "[8, 7]")  # the washed-out image scores low


def test_collect_then_filter_keeps_scores_counts_drops_and_resumes(tmp_path):
    write_images(tmp_path / "images")
    index = collect([str(tmp_path / "images")], tmp_path / "collected", shard_size=3, workers=2)
    collected = json.loads(index.read_text())
    assert collected["splits"]["train"]["samples"] == 7 and len(collected["splits"]["train"]["shards"]) == 3
    assert json.loads((tmp_path / "collected/report.json").read_text())["totals"]["unreadable_image"] == 1
    with ChatServer(quality_judge) as server:
        judge = ChatClient(server.base_url, "judge", retries=0, cache_dir=tmp_path / "cache")
        filter_shards(
            str(tmp_path / "collected"), tmp_path / "filtered", min_side=64, judge=judge, min_quality=4.0
        )
        calls = server.count
        before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "filtered").glob("*.tar")}
        (tmp_path / "filtered/train-000001.tar").unlink()  # a crash lost one shard: only it is redone
        judge = ChatClient(server.base_url, "judge", retries=0, cache_dir=tmp_path / "cache")
        filter_shards(
            str(tmp_path / "collected"), tmp_path / "filtered", min_side=64, judge=judge, min_quality=4.0
        )
        assert server.count == calls  # its answers came from the cache
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "filtered").glob("*.tar")}
    assert (
        after["train-000000.tar"] == before["train-000000.tar"]
        and after["train-000002.tar"] == before["train-000002.tar"]
    )
    totals = json.loads((tmp_path / "filtered/report.json").read_text())["totals"]
    assert (totals["kept"], totals["near_duplicate"], totals["too_small"], totals["low_quality"]) == (
        4,
        1,
        1,
        1,
    )
    kept = [
        json.loads(s["json"])
        for u in sorted((tmp_path / "filtered").glob("*.tar"))
        for s in iter_raw_samples(str(u))
    ]
    assert all(m["curation"]["quality"] == pytest.approx(np.sqrt(56)) for m in kept)
    assert all(len(m["curation"]["phash"]) == 16 and m["curation"]["judge"] == "judge" for m in kept)


def test_compose_makes_exact_collages_of_the_sources(tmp_path):
    write_images(tmp_path / "images")
    collect([str(tmp_path / "images")], tmp_path / "collected", shard_size=8)
    main(["data", "curate", "compose", "--inputs", str(tmp_path / "collected"), "--out", str(tmp_path / "comp"),
          "--min-refs", "2", "--max-refs", "3", "--size", "96"])  # fmt: skip
    samples = list(iter_raw_samples(str(tmp_path / "comp/train-000000.tar")))
    assert samples and all(2 <= json.loads(s["json"])["n_refs"] <= 3 for s in samples)
    meta = json.loads(samples[0]["json"])
    assert meta["category"] == "multi_object" and meta["instruction"].startswith("Put the object from image")
    place = meta["program"][0]
    x, y, w, h = place["box"]
    target = np.asarray(Image.open(__import__("io").BytesIO(samples[0]["target.png"])))
    assert target[y + h // 2, x + w // 2].tolist() != [245, 245, 245]  # the source was pasted there


def test_decompose_cuts_components_with_masks_that_recompose_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    labels = np.zeros((40, 60), np.int64)
    labels[5:15, 10:30] = 1
    labels[20:35, 40:55] = 2
    sources, masks = decompose(image, labels)
    assert len(sources) == 3 and masks[0] is None
    recomposed = sources[0].copy()
    for label, (source, mask) in enumerate(zip(sources[1:], masks[1:]), start=1):
        ys, xs = np.nonzero(labels == label)
        y0, x0 = max(0, ys.min() - 4), max(0, xs.min() - 4)
        inside = mask > 0
        recomposed[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][inside] = source[inside]
    assert np.array_equal(recomposed, image)
    # the background fills the components with the mean colour of the rest (not a copy of them)
    assert not np.array_equal(sources[0][labels > 0], image[labels > 0])


def test_synth_mico_writes_every_category_and_the_data_kind_reads_it(tmp_path):
    main(
        ["data", "synth", "mico", "--out", str(tmp_path / "mico"), "--samples", "train=0", "val=0", "test=8"]
    )
    samples = list(iter_raw_samples(str(tmp_path / "mico/test-000000.tar")))
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["category"] for m in metas] == list(CATEGORIES)
    dere = samples[-1]
    assert "mask1.png" in dere and "mask0.png" not in dere and metas[-1]["ref_roles"][0] == "scene"
    assert metas[2]["human_indices"] == list(range(len(metas[2]["ref_roles"])))  # multi_person: all people
    dm = MICoDataModule(data_dir=str(tmp_path / "mico"), budget=128, target_budget=128, multiple=16, min_side=16,
                        max_refs=6, batch_size=8, category_mix={"dere": 1.0})  # fmt: skip
    batch = next(iter(dm.test_dataloader()))
    assert [m["category"] for m in batch["meta"]] == list(CATEGORIES)  # evaluation is never thinned
