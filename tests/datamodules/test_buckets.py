"""Aspect-ratio buckets (MultiRefDataModule `aspect_buckets`): each training batch holds targets of one bucket, at
the bucket's size, in an order that is deterministic and that a resumed stream continues exactly."""

from __future__ import annotations

import itertools

import pytest
import torch

from datamodules.multiref import MultiRefDataModule, cover_crop, nearest_bucket
from datamodules.synth import synthesize
from datamodules.webdataset import bucketed_batches

BUCKETS = [[64, 64], [64, 48], [48, 64]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiref")
    synthesize("multiref", root, samples={"train": 24, "val": 2, "test": 2}, shard_size=12)
    return root


def datamodule(shards, **kw) -> MultiRefDataModule:
    args = dict(budget=64, target_budget=64, multiple=16, min_side=16, batch_size=2, batches_per_epoch=5)
    return MultiRefDataModule(data_dir=str(shards), **{**args, "aspect_buckets": BUCKETS, **kw})


def test_nearest_bucket_and_cover_crop_by_hand():
    buckets = ((64, 64), (64, 32), (32, 64))
    assert nearest_bucket(100, 50, buckets) == 1  # 2:1 is the 64x32 bucket
    assert nearest_bucket(40, 90, buckets) == 2
    assert nearest_bucket(70, 64, buckets) == 0
    x = torch.linspace(-1, 1, 3 * 40 * 100).view(3, 40, 100)
    out = cover_crop(x, (64, 32))  # 100x40 scaled by 0.8 -> 80x32, centre 64 columns
    assert out.shape == (3, 32, 64)


def test_grouping_keeps_the_stream_order_within_a_bucket():
    stream = iter([{"bucket": b, "i": i} for i, b in enumerate([0, 1, 0, 1, 1, 0, 2, 0])])
    batches = list(itertools.islice(bucketed_batches([stream], 1, 2), 3))
    assert [[e["i"] for e in b] for b in batches] == [[0, 2], [1, 3], [5, 7]]


def test_each_batch_is_one_bucket_and_a_resumed_stream_continues_exactly(shards):
    dm = datamodule(shards)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    for batch in batches:
        (bucket,) = set(batch["bucket"])
        w, h = BUCKETS[bucket]
        assert all(tuple(t.shape) == (3, h, w) for t in batch["target"])
    assert len({b["bucket"][0] for b in batches}) > 1  # the generated targets fall in several buckets
    again = datamodule(shards)
    again.setup("fit")
    loader = again.train_dataloader()
    loader.resume_at(0, 2)
    resumed = list(loader)
    assert [b["__key__"] for b in resumed] == [b["__key__"] for b in batches[2:]]
    for a, b in zip(resumed, batches[2:]):
        assert all(torch.equal(x, y) for x, y in zip(a["target"], b["target"]))


def test_buckets_must_be_on_the_grid(shards):
    with pytest.raises(ValueError, match="aspect_buckets: 50x64"):
        datamodule(shards, aspect_buckets=[[50, 64]])
