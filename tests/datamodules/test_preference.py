"""Preference items: ranking parsing, pairs, bad items counted and named, the generated items' exact ground truth."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.preference import PreferenceDataModule, item_pairs, parse_ranking
from datamodules.synth import preference as synth
from datamodules.webdataset import BadSample, ShardWriter, SkipSample, decode_sample, write_index
from lightning_modules.reward_models import Verdict, format_verdict, parse_verdict


def png(value: int, size: tuple[int, int] = (24, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def item(key: str, ranking: str = "B>A>C", k: int = 3, **extra) -> dict:
    meta = {
        "instruction": "Make the star red.",
        "n_sources": 1,
        "n_candidates": k,
        "ranking": ranking,
        **extra,
    }
    sample = {"__key__": key, "json": meta, "src0.png": png(10)}
    for c in range(k):
        sample[f"cand{c}.png"] = png(50 * c)
    return sample


def test_parse_ranking_reads_tiers_ties_labels_and_reversed_order():
    assert parse_ranking("C>A>B", 3) == ([1, 2, 0], None)
    assert parse_ranking("A=B=Good", 2) == ([0, 0], "Good")
    assert parse_ranking("A<B", 2) == ([1, 0], None)
    assert parse_ranking("A > B=C", 3) == ([0, 1, 1], None)


@pytest.mark.parametrize(
    ("ranking", "k", "match"),
    [("A>B>B", 3, "does not parse"), ("A>C", 3, "does not parse"), ("A=B=Good", 3, "does not parse"),
     ("A>B=Bad", 2, "label needs all"), ("", 2, "non-empty"), (None, 2, "non-empty"), ("A>b", 2, "does not parse")],
)  # fmt: skip
def test_a_ranking_that_does_not_parse_is_a_bad_sample_naming_it(ranking, k, match):
    with pytest.raises(BadSample, match=match):
        parse_ranking(ranking, k)


def test_item_pairs_orient_better_first_and_flag_ties():
    assert item_pairs([1, 2, 0]) == [(0, 1, False), (2, 0, False), (2, 1, False)]
    assert item_pairs([0, 0, 1]) == [(0, 1, True), (0, 2, False), (1, 2, False)]
    assert item_pairs([0, 0, 1], keep_ties=False) == [(0, 2, False), (1, 2, False)]


def raw(sample: dict) -> dict:
    """A sample as a shard holds it (the json encoded), decoded by the data stack."""
    return decode_sample(
        {k: json.dumps(v).encode() if k == "json" else v for k, v in sample.items()}, ["json"]
    )


def _transform(train: bool, **kw):
    return PreferenceDataModule(**kw).transform(train)


def test_training_examples_are_pairs_chosen_above_rejected():
    example = _transform(True)(raw(item("k")), np.random.default_rng(0))
    pairs = example["pairs"]
    assert len(pairs) == 3 and not any(p["tie"] for p in pairs)
    # B (cand1, value 50) > A (cand0, 0) > C (cand2, 100): each chosen image is the better one
    levels = {0: -1.0, 50: 50 / 127.5 - 1, 100: 100 / 127.5 - 1}
    got = [(round(float(p["chosen"].mean()), 4), round(float(p["rejected"].mean()), 4)) for p in pairs]
    want = [(levels[50], levels[0]), (levels[0], levels[100]), (levels[50], levels[100])]
    assert sorted(got) == sorted((round(a, 4), round(b, 4)) for a, b in want)
    limited = _transform(True, max_pairs_per_item=2)(raw(item("k")), np.random.default_rng(0))
    assert len(limited["pairs"]) == 2


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.pop("cand1.png"), r"candidate 1 \(B, .cand1.png\) is missing"),
        (lambda s: s["json"].update(ranking="A>B>B"), "ranking 'A>B>B' does not parse"),
        (lambda s: s["json"].update(boxes=[[[0, 0, 10, 10]], [[5, 5, 1200, 20]], []]), r"candidate 1 box 0 \[5, 5, 1200, 20\] is outside"),
        (lambda s: s["json"].update(rationales=["a", "b"]), "'rationales' must be a list of 3"),
        (lambda s: s["json"].update(n_candidates=1), "at least 2"),
        (lambda s: s["json"].update(verdicts=[None, {"sc": {"edit_region": [], "reasoning": "x", "score": [30, 1]}, "pq": {"reasoning": "y", "score": [1, 2]}}, None]), "candidate 1: sc verdict is invalid.*outside"),
    ],
)  # fmt: skip
def test_a_bad_item_is_a_bad_sample_whose_reason_names_the_item_part(change, match):
    sample = item("bad")
    change(sample)
    with pytest.raises(BadSample, match=match):
        _transform(False)(raw(sample), np.random.default_rng(0))


def test_bad_items_in_shards_are_counted_skips_and_good_ones_load(tmp_path):
    with ShardWriter(tmp_path, "val") as writer:
        for i in range(4):
            writer.write(item(f"good{i}"))
        broken = item("nocand")
        broken.pop("cand2.png")
        writer.write(broken)
        writer.write(item("badrank", ranking="A>A>C"))
    write_index(tmp_path, kind="preference", splits={})
    dm = PreferenceDataModule(data_dir=str(tmp_path), eval_batch_size=8, synth=False, max_skip_fraction=0.5)
    batches = list(dm.val_dataloader())
    assert [k for b in batches for k in b["__key__"]] == [f"good{i}" for i in range(4)]
    assert dm.data_stats() == {"seen": 6, "skipped": 2}
    batch = batches[0]
    assert (
        batch["tiers"][0] == [1, 0, 2] and len(batch["candidates"][0]) == 3 and len(batch["sources"][0]) == 1
    )


def test_an_all_tied_item_without_keep_ties_is_left_out_not_counted_bad(tmp_path):
    with ShardWriter(tmp_path, "train") as writer:
        for i in range(3):
            writer.write(item(f"tied{i}", ranking="A=B=C"))
        writer.write(item("ranked"))
    write_index(tmp_path, kind="preference", splits={})
    with pytest.raises(SkipSample, match="no usable pair"):
        _transform(True, keep_ties=False)(raw(item("t", ranking="A=B=C")), np.random.default_rng(0))
    dm = PreferenceDataModule(
        data_dir=str(tmp_path), batch_size=4, synth=False, keep_ties=False, batches_per_epoch=1
    )
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())  # 3 of 4 items left out: no DataError (max_skip_fraction 0.05)
    assert len(batch["chosen"]) == 4 * 3 and not any(batch["tie"])  # 4 items, each the ranked one (3 pairs)
    assert dm.data_stats()["skipped"] == 0


def test_max_side_caps_the_longer_side():
    example = _transform(False, max_side=16)(raw(item("k")), np.random.default_rng(0))
    assert example["candidates"][0].shape == (3, 12, 16)


# --- the generated items ----------------------------------------------------------------------------------


def _decode(sample: dict) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    images = {
        k: np.asarray(Image.open(io.BytesIO(v)).convert("RGB"))
        for k, v in sample.items()
        if k.endswith(".png")
    }
    k = sample["json"]["n_candidates"]
    return sample["json"], images["src0.png"], [images[f"cand{c}.png"] for c in range(k)]


def test_generated_items_are_deterministic_and_their_ranking_follows_the_rewards():
    a, b = synth.make_sample("val", 3, 0), synth.make_sample("val", 3, 0)
    assert a["json"] == b["json"] and a["cand0.png"] == b["cand0.png"]
    for index in range(12):
        meta = synth.make_sample("train", index, 1)["json"]
        tiers, _ = parse_ranking(meta["ranking"], meta["n_candidates"])
        rewards = meta["rewards"]
        for i in range(len(tiers)):
            for j in range(len(tiers)):
                if tiers[i] < tiers[j]:
                    assert rewards[i] > rewards[j]
                if tiers[i] == tiers[j]:
                    assert rewards[i] == rewards[j]
        assert set(meta["quality"]) <= set(synth.KINDS)
        assert meta["local_error"] == [q in synth.LOCAL_ERRORS for q in meta["quality"]]


def test_generated_candidates_differ_from_the_source_only_inside_their_ground_truth_boxes():
    checked = set()
    for index in range(40):
        meta, source, candidates = _decode(synth.make_sample("test", index, 2))
        for c, (kind, boxes) in enumerate(zip(meta["quality"], meta["boxes"])):
            h, w = source.shape[:2]
            inside = np.zeros((h, w), bool)
            for x1, y1, x2, y2 in boxes:
                pad = 8  # the artifact patch reaches 4 px past its object's box; rounding to the grid
                inside[
                    max(0, y1 * h // 1000 - pad) : y2 * h // 1000 + pad,
                    max(0, x1 * w // 1000 - pad) : x2 * w // 1000 + pad,
                ] = True
            changed = np.abs(candidates[c].astype(int) - source.astype(int)).max(-1) > 3
            if kind == "no_edit":
                assert not changed.any() and boxes == []
            else:
                assert changed.any() and not (changed & ~inside).any(), (index, c, kind)
            checked.add(kind)
            verdict = meta["verdicts"][c]
            assert isinstance(parse_verdict(format_verdict(verdict["sc"]), "sc"), Verdict)
            assert [r["bbox_2d"] for r in verdict["sc"]["edit_region"]] == boxes
    assert checked == set(synth.KINDS)


def test_the_datamodule_reads_generated_shards(tmp_path):
    dm = PreferenceDataModule(data_dir=str(tmp_path / "pref"), batch_size=2, eval_batch_size=2, synth_samples={"train": 6, "val": 2, "test": 2}, max_side=48)  # fmt: skip
    dm.prepare_data()
    index = json.loads((tmp_path / "pref" / "index.json").read_text())
    assert index["kind"] == "preference" and index["splits"]["train"]["samples"] == 6
    train = next(iter(dm.train_dataloader()))
    assert train["tie"].dtype == torch.bool and len(train["chosen"]) == len(train["rejected"]) >= 2
    assert all(r is None or isinstance(r, str) for r in train["chosen_rationale"])
    val = next(iter(dm.val_dataloader()))
    assert len(val["candidates"]) == 2 and max(val["candidates"][0][0].shape[-2:]) <= 48
