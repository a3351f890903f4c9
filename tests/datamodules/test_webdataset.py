"""The WebDataset base: decoding safety, bad-sample accounting, world-size invariance, resume, eval splits."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.webdataset import (
    DataError,
    EvalStream,
    ShardWriter,
    StreamLoader,
    TrainStream,
    decode_member,
    expand_shards,
    iter_raw_samples,
    iter_tar_members,
    write_index,
)
from tests.toy import ToyData, ToyModule, ToyTransform, toy_sample, write_toy_shards

REQUIRED = ("x.npy", "json")


def train_stream(shards, batch_size, num_streams=None, epoch_batches=6, buffer=8):
    return TrainStream(
        shards,
        ToyTransform(),
        REQUIRED,
        batch_size=batch_size,
        seed=0,
        max_skip_fraction=0.5,
        batches_per_epoch=epoch_batches,
        shuffle_buffer=buffer,
        num_streams=num_streams,
    )


def keys(batches):
    return [list(b["__key__"]) for b in batches]


@pytest.fixture
def toy_dir(tmp_path):
    write_toy_shards(tmp_path, {"train": [10, 7, 3], "val": [5, 4, 2], "test": [6]})
    return tmp_path


class Payload:
    """Unpickling this creates a file: the proof that something was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_global_batch_is_the_same_for_one_and_two_ranks(toy_dir):
    shards = expand_shards(str(toy_dir / "train-*.tar"))
    one = train_stream(shards, batch_size=4, num_streams=2)
    one.place(0, 1, 0)
    ranks = [train_stream(shards, batch_size=2, num_streams=2) for _ in range(2)]
    for r, stream in enumerate(ranks):
        stream.place(r, 2, 0)
    together = keys(one)
    apart = [a + b for a, b in zip(keys(ranks[0]), keys(ranks[1]))]
    assert together == apart
    assert len(together) == 6 and all(len(k) == 4 for k in together)


def test_resumed_stream_replays_nothing_and_skips_nothing(toy_dir):
    shards = expand_shards(str(toy_dir / "train-*.tar"))
    for workers in (0, 2):
        full = StreamLoader(train_stream(shards, batch_size=3), num_workers=workers)
        expected = keys(full)
        resumed = StreamLoader(train_stream(shards, batch_size=3), num_workers=workers)
        resumed.resume_at(0, 4)
        assert keys(resumed) == expected[4:], f"workers={workers}"


def test_epochs_differ_and_the_same_seed_repeats(toy_dir):
    shards = expand_shards(str(toy_dir / "train-*.tar"))
    stream = train_stream(shards, batch_size=4, epoch_batches=5)
    stream.place(0, 1, 0)
    first = keys(stream)
    assert keys(stream) == first  # same (seed, epoch): same order
    stream.set_position(1, 0)
    assert keys(stream) != first
    # one epoch of 20 samples over the 20-sample set: every sample exactly once, despite uneven shards
    assert sorted(k for b in first for k in b) == [f"s{i:05d}" for i in range(20)]


def test_eval_split_reads_every_sample_once_with_uneven_shards(toy_dir):
    shards = expand_shards(str(toy_dir / "val-*.tar"))  # 3 shards of 5, 4, 2 over 2 ranks
    for workers in (0, 2):
        seen, per_rank = [], []
        for rank in range(2):
            stream = EvalStream(shards, ToyTransform(), REQUIRED, batch_size=2, seed=0, max_skip_fraction=0.1)
            loader = StreamLoader(stream, num_workers=workers, placement=lambda r=rank: (r, 2))
            got = [k for b in loader for k in b["__key__"]]
            per_rank.append(len(got))
            seen += got
        assert sorted(seen) == [f"s{i:05d}" for i in range(20, 31)], f"workers={workers}"
        assert len(set(seen)) == len(seen)
        assert per_rank[0] != per_rank[1]  # uneven, and nothing hangs or pads


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_bad_shard(path: Path, marker: Path) -> None:
    """Four bad samples: a .pyd and a .pth whose unpickling would create `marker`, a missing member, a bad JPEG."""
    x = npy_bytes(toy_sample(100)["x.npy"])
    pth = io.BytesIO()
    torch.save(Payload(str(marker)), pth)
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("bad1.x.npy", x),
            ("bad1.json", b'{"y": [0, 0]}'),
            ("bad1.pyd", pickle.dumps(Payload(str(marker)))),
            ("bad2.x.npy", x),
            ("bad2.json", b'{"y": [0, 0]}'),
            ("bad2.pth", pth.getvalue()),
            ("bad3.json", b'{"y": [0, 0]}'),
            ("bad4.json", b'{"y": [0, 0]}'),
            ("bad4.x.npy", x),
            ("bad4.view.jpg", b"\xff\xd8\xff\xe0 not a jpeg"),
        ]:
            add_member(tar, name, data)


def test_refused_and_corrupt_samples_are_counted_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "data"
    write_toy_shards(out, {"train": [12], "val": [4]})
    write_bad_shard(out / "train-000001.tar", marker)
    write_bad_shard(out / "val-000001.tar", marker)
    data = ToyData(
        data_dir=str(out), batch_size=4, batches_per_epoch=4, max_skip_fraction=0.5, shuffle_buffer=4
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ToyModule(), datamodule=data)
    assert not marker.exists()
    assert data.loaders["val"].totals() == (8, 4)  # one finite pass: 4 good, 4 bad, each counted once
    assert data.loaders["train"].totals()[1] >= 4
    assert decode_member("npy", npy_bytes(np.ones(2))).tolist() == [1, 1]


def test_too_many_bad_samples_stop_the_run_naming_shard_and_key(tmp_path):
    out = tmp_path / "data"
    write_toy_shards(out, {"train": [4]})
    with ShardWriter(out, "broken") as writer:
        for i in range(30):
            writer.write({"__key__": f"b{i}", "json": {"y": [0, 0]}})  # no x.npy
    stream = train_stream(expand_shards(str(out / "*.tar")), batch_size=2, buffer=2)
    stream.max_skip_fraction = 0.1
    with pytest.raises(DataError, match=r"broken-000000\.tar key b\d+: missing member\(s\) \.x\.npy"):
        list(stream)


def test_pipe_shards_need_the_flag(monkeypatch):
    monkeypatch.delenv("OMNILAB_ALLOW_PIPE", raising=False)
    with pytest.raises(DataError, match="OMNILAB_ALLOW_PIPE"):
        expand_shards("pipe:cat /tmp/x-{0..1}.tar")
    monkeypatch.setenv("OMNILAB_ALLOW_PIPE", "1")
    assert expand_shards("pipe:cat /tmp/x-{0..1}.tar") == ["pipe:cat /tmp/x-0.tar", "pipe:cat /tmp/x-1.tar"]


def test_same_samples_give_the_same_shard_bytes(tmp_path):
    for name in ("a", "b"):
        write_toy_shards(tmp_path / name, {"train": [5, 5]})
    for shard in ("train-000000.tar", "train-000001.tar"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_layout_errors_name_the_keys(toy_dir):
    stream = train_stream(expand_shards(str(toy_dir / "train-*.tar")), batch_size=3, num_streams=3)
    stream.place(0, 2, 0)
    with pytest.raises(ValueError, match=r"data\.num_streams=3"):
        stream.layout()
    stream.num_streams = 4
    with pytest.raises(ValueError, match=r"data\.batch_size=3"):
        stream.layout()


def test_missing_index_needs_batches_per_epoch(tmp_path):
    write_toy_shards(tmp_path, {"train": [4]})
    (tmp_path / "index.json").unlink()
    with pytest.raises(ValueError, match=r"data\.batches_per_epoch"):
        ToyData(data_dir=str(tmp_path)).train_dataloader()
    write_index(tmp_path, splits={"train": {"samples": 40}})
    assert len(ToyData(data_dir=str(tmp_path), batch_size=4).train_dataloader()) == 10


def _tar(path, members, fmt):
    """Write (name, bytes | None for a directory) members with tarfile in format `fmt`."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", ["USTAR_FORMAT", "GNU_FORMAT", "PAX_FORMAT"])
def test_tar_reader_reads_what_tarfile_writes(tmp_path, fmt):
    deep = "d/" + "x" * 120 + "/sample1"  # a name past ustar's 100 bytes: prefix, GNU long name or pax path
    members = [
        ("dir", None),
        ("sample0.JSON", b"{}"),
        ("sample0.png", b"\x89PNG" * 200),
        (f"{deep}.txt", b""),
    ]
    members.append(("__meta__.txt", b"skipped"))
    path = tmp_path / "s.tar"
    _tar(path, members, getattr(tarfile, fmt))
    with open(path, "rb") as f:
        got = list(iter_tar_members(f))
    assert got == [(n, d) for n, d in members if d is not None]
    samples = list(iter_raw_samples(str(path)))
    assert [s["__key__"] for s in samples] == ["sample0", deep]
    assert samples[0]["json"] == b"{}" and samples[1]["txt"] == b""  # extensions lower-cased


def test_tar_reader_refuses_a_bad_checksum_a_truncation_and_a_repeated_member(tmp_path):
    path = tmp_path / "s.tar"
    _tar(path, [("a.txt", b"hello" * 300)], tarfile.USTAR_FORMAT)
    raw = path.read_bytes()
    for broken, why in [(raw[:10] + b"Z" + raw[11:], "checksum"), (raw[:900], "truncated")]:
        with pytest.raises(tarfile.ReadError, match=why):
            list(iter_tar_members(io.BytesIO(broken)))
    _tar(path, [("a.txt", b"1"), ("a.TXT", b"2")], tarfile.USTAR_FORMAT)
    with pytest.raises(ValueError, match=r"duplicate member \.txt"):
        list(iter_raw_samples(str(path)))
