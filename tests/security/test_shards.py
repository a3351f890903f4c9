"""A shard cannot run code, hide a loss or exhaust memory (issue 9 items 2, 4, 5, 12 and what held before).

Shards are written by hand here (tarfile, truncation, crafted PNG headers): each test builds the smallest
shard that shows the attack or fault and checks that it is refused or counted, sample by sample.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.webdataset import (
    DataError,
    EvalStream,
    StreamLoader,
    TrainStream,
    decode_image,
    encode_member,
    expand_shards,
    iter_raw_samples,
)
from tests.toy import ToyData, ToyTransform, toy_sample, write_toy_shards

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("x.npy", "json")


class Payload:
    """Unpickling this creates a file: the proof that something was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def sample_members(i: int, key: str | None = None) -> list[tuple[str, bytes]]:
    s = toy_sample(i)
    key = key or s["__key__"]
    return [
        (f"{key}.json", encode_member("json", s["json"])),
        (f"{key}.x.npy", encode_member("npy", s["x.npy"])),
    ]


def eval_counts(shards: list[str], counts: dict[str, int] | None = None, fraction: float = 1.0):
    """(samples read, (seen, skipped)) of one finite pass over `shards`."""
    stream = EvalStream(shards, ToyTransform(), REQUIRED, batch_size=4, seed=0, max_skip_fraction=fraction,
                        counts=counts)  # fmt: skip
    loader = StreamLoader(stream)
    read = sum(len(b["__key__"]) for b in loader)
    return read, loader.totals()


# --- item 2: pipe: URLs, as webdataset parses them, never by `assert`


@pytest.mark.parametrize("url", ["pipe:touch {m}", " pipe:touch {m}", "PIPE:touch {m}", "Pipe:touch {m}",
                                 "\tpipe:touch {m}", "\x00pipe:touch {m}", " PiPe:touch {m}"])  # fmt: skip
def test_pipe_urls_in_any_case_or_spacing_are_refused(in_tmp, monkeypatch, url):
    monkeypatch.delenv("OMNILAB_ALLOW_PIPE", raising=False)
    marker = in_tmp / "PWNED-pipe"
    url = url.format(m=marker)
    with pytest.raises(DataError, match="OMNILAB_ALLOW_PIPE"):
        expand_shards(url)
    with pytest.raises(DataError, match="pipe"):
        list(iter_raw_samples(url))
    assert not marker.exists()


def test_a_rewrite_into_a_pipe_is_refused(in_tmp, monkeypatch):
    monkeypatch.delenv("OMNILAB_ALLOW_PIPE", raising=False)
    marker = in_tmp / "PWNED-rewrite"
    monkeypatch.setenv("GOPEN_REWRITE", f"data/=pipe:touch {marker} ")
    with pytest.raises(DataError, match="pipe"):
        expand_shards("data/train-0.tar")
    assert not marker.exists()


def test_the_pipe_handler_is_never_reached_whatever_asserts_do(in_tmp, monkeypatch):
    # webdataset's own `assert url.startswith("pipe:")` is all that stops " PIPE:" at its handler, and
    # PYTHONOPTIMIZE removes it: the refusal must come before the handler is chosen
    from webdataset.gopen import gopen_schemes

    monkeypatch.delenv("OMNILAB_ALLOW_PIPE", raising=False)
    called = []
    monkeypatch.setitem(gopen_schemes, "pipe", lambda url, *a, **k: called.append(url))
    for url in (" PIPE:true", "pipe:true", "\tPipe:true"):
        with pytest.raises(DataError):
            list(iter_raw_samples(url))
    assert called == []


@pytest.mark.slow
def test_pipe_refusal_holds_under_python_optimize(in_tmp):
    marker = in_tmp / "PWNED-optimized"
    code = (
        "from datamodules.webdataset import iter_raw_samples, DataError\n"
        f"try:\n    list(iter_raw_samples(' PIPE:touch {marker}'))\n"
        "except DataError as err:\n    print('refused', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMNILAB_ALLOW_PIPE"}
    env.update(PYTHONOPTIMIZE="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "refused" in out.stdout, out.stderr[-2000:]
    assert not marker.exists()


# --- what held before and must keep holding: nothing is unpickled, unsafe names and bad images are counted


def test_pickle_bearing_members_in_any_case_are_refused_counted_and_never_run(in_tmp):
    marker = in_tmp / "PWNED-pickle"
    pth = io.BytesIO()
    torch.save(Payload(str(marker)), pth)
    obj_npy = io.BytesIO()
    np.save(obj_npy, np.array([Payload(str(marker))], dtype=object), allow_pickle=True)
    shard = in_tmp / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (ext, data) in enumerate([("pyd", pickle.dumps(Payload(str(marker)))), ("PTH", pth.getvalue()),
                                         ("pickle", pickle.dumps(Payload(str(marker)))), ("Pyd", b"x")]):  # fmt: skip
            for name, member in sample_members(i, f"p{i}"):
                add(tar, name, member)
            add(tar, f"p{i}.{ext}", data)
        for name, member in sample_members(9, "objnpy"):
            add(
                tar,
                name if name.endswith("json") else "objnpy.x.npy",
                member if name.endswith("json") else obj_npy.getvalue(),
            )
    read, (seen, skipped) = eval_counts([str(shard)])
    assert (read, seen, skipped) == (0, 5, 5)
    assert not marker.exists()


def test_traversal_and_absolute_member_names_are_skipped_and_counted(in_tmp):
    shard = in_tmp / "names.tar"
    with tarfile.open(shard, "w") as tar:
        for i, key in enumerate(["../../evil/s1", "/etc/s2", "ok/../../s3", "good"]):
            for name, member in sample_members(i, key):
                add(tar, name, member)
    read, (seen, skipped) = eval_counts([str(shard)])
    assert (read, seen, skipped) == (1, 4, 3)


def png_bytes(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height (all black): tiny on disk, width*height bytes once decoded."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over a one-row image body (a decompression-bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 9))
        + chunk(b"IEND", b"")
    )


def test_an_image_beyond_the_pixel_limit_is_refused_before_decoding(in_tmp):
    big = png_bytes(12000, 12000)  # 144 Mpx, a few KB: Pillow alone decodes it with a warning
    assert len(big) < 100_000
    with pytest.raises(ValueError, match=r"12000x12000|144000000 pixels"):
        decode_image(big)
    with pytest.raises(ValueError, match=r"7000x7000 pixels is larger than the 37748736 pixels"):
        decode_image(png_bytes(7000, 7000))  # 49 Mpx: under Pillow's limit, over the default 6144²
    shard = in_tmp / "bombs.tar"
    with tarfile.open(shard, "w") as tar:
        for i, image in enumerate([big, png_header_only(30000, 30000), b"\xff\xd8\xff\xe0 not a jpeg"]):
            for name, member in sample_members(i, f"b{i}"):
                add(tar, name, member)
            add(tar, f"b{i}.view.png", image)
        for name, member in sample_members(5, "fine"):
            add(tar, name, member)
        add(tar, "fine.view.png", png_bytes(64, 48))
    read, (seen, skipped) = eval_counts([str(shard)])
    assert (read, seen, skipped) == (1, 4, 3)


def test_the_pixel_limit_follows_the_data_kind_and_the_config(in_tmp):
    class SmallImages(ToyData):
        max_image_side = 256

    assert SmallImages(data_dir=str(in_tmp)).max_image_pixels == 256 * 256
    assert ToyData(data_dir=str(in_tmp), max_image_pixels=10).max_image_pixels == 10


# --- item 4: shards shorter than the index says count every missing sample


def short_shards(root: Path) -> tuple[list[str], dict[str, int]]:
    """Four 16-sample shards as the index lists them, then broken: empty, not a tar, cut at a member
    boundary after 8 samples, cut in the middle of sample 5's second member. 64 listed, 8 + 5 readable."""
    index = write_toy_shards(root, {"train": [16, 16, 16, 16]})
    shards = [root / f"train-00000{i}.tar" for i in range(4)]
    shards[0].write_bytes(b"")
    shards[1].write_bytes(b"this is not a tar file " * 100)
    raw = shards[2].read_bytes()
    members = []
    with tarfile.open(shards[2]) as tar:
        members = [m.offset for m in tar.getmembers()]
    shards[2].write_bytes(raw[: members[16]])  # 8 samples of 2 members each
    raw3 = shards[3].read_bytes()
    with tarfile.open(shards[3]) as tar:
        fifth = tar.getmembers()[11]  # sample 5's second member
    shards[3].write_bytes(raw3[: fifth.offset_data + 10])
    data = ToyData(data_dir=str(root))
    assert index.exists()
    return [str(s) for s in shards], data.shard_counts()


def test_missing_samples_of_short_shards_are_all_counted(in_tmp):
    shards, counts = short_shards(in_tmp)
    read, (seen, skipped) = eval_counts(shards, counts)
    assert read == 8 + 5
    assert skipped == 16 + 16 + 8 + 11 and seen == 64


def test_short_shards_without_an_index_count_one_loss_each(in_tmp):
    shards, _ = short_shards(in_tmp)
    read, (_, skipped) = eval_counts(shards)
    assert read == 13 and skipped == 4  # each broken shard at least once (empty and cut tars included)


def test_max_skip_fraction_applies_to_missing_samples(in_tmp):
    shards, counts = short_shards(in_tmp)
    stream = TrainStream(shards, ToyTransform(), REQUIRED, batch_size=2, seed=0, max_skip_fraction=0.5,
                         batches_per_epoch=20, shuffle_buffer=4, num_streams=None, counts=counts)  # fmt: skip
    with pytest.raises(DataError, match=r"of \d+ samples skipped .*index\.json"):
        list(StreamLoader(stream))


# --- item 12: batch sizes no epoch can fill or no memory can hold


def test_a_batch_larger_than_the_data_is_refused_with_the_reason(in_tmp):
    write_toy_shards(in_tmp, {"train": [10, 6], "val": [4]})
    with pytest.raises(ValueError, match=r"data\.batch_size=1000000000 .* 16 samples \(index\.json\)"):
        ToyData(data_dir=str(in_tmp), batch_size=10**9).setup("fit")
    ToyData(data_dir=str(in_tmp), batch_size=16).setup("fit")  # exactly the data: fine


def test_a_batch_no_memory_can_hold_is_refused_without_an_index(in_tmp):
    write_toy_shards(in_tmp, {"train": [10]})
    (in_tmp / "index.json").unlink()
    data = ToyData(data_dir=str(in_tmp), batch_size=10**12, batches_per_epoch=1)
    with pytest.raises(ValueError, match=r"data\.batch_size=1000000000000: one batch holds at least .* GiB"):
        data.setup("fit")
    test = ToyData(data_dir=str(in_tmp), eval_batch_size=10**12, test_shards=str(in_tmp / "train-*.tar"))
    with pytest.raises(ValueError, match=r"data\.eval_batch_size=1000000000000: one batch"):
        test.setup("test")
    with pytest.raises(ValueError, match=r"data\.batch_size=0"):
        ToyData(data_dir=str(in_tmp), batch_size=0)
