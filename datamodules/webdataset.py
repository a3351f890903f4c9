"""The WebDataset base DataModule: deterministic, resumable, DDP-safe shard streams (README "Data").

Shards are tar files in the WebDataset layout: members `<key>.<ext>`, grouped by key. A data kind
subclasses `WebDataModule`, lists its `required` members, and supplies a picklable `transform(train)`
that turns one decoded sample into tensors (raising `BadSample` when it cannot).

Decoding never unpickles: only images, `.json`, `.txt`, `.npy` (allow_pickle=False) and `.cls` are
read. A sample with any other member (`.pyd`, `.pth`, `.pickle`, ...), a missing member, a corrupt
image or a failed transform is skipped and counted; past `max_skip_fraction` the run stops with the
shard and key named.

The training stream (why resume is exact and DDP parity holds):
- There are S = `num_streams` virtual streams. Stream v reads shard slots v, v+S, v+2S, ...; slot k is
  shard `perm(seed, epoch, k // n)[k % n]`, a fresh permutation of the n shards every cycle. Samples pass
  a shuffle buffer seeded from (seed, epoch, v) that drains at the end of each cycle, so one stream
  never repeats a sample within a pass; augmentation draws from (seed, epoch, v, index).
- Stream v belongs to worker slot `v % W` of rank `(v // W) % R`. Rank-local batch b is made by worker
  slot `b % W` from c = B*R*W/S consecutive samples of each of the slot's streams. So with the same S and
  global batch, the global batch at every step holds the same samples on 1 process or on R processes.
- An epoch is `batches_per_epoch` batches per rank, and each epoch re-seeds every stream.
- The position is (epoch, batches the trainer finished in the epoch): read from the trainer's loop
  progress, identical on every rank, saved in the checkpoint as the DataModule's `state_dict`. The
  DataModule's state is restored before `configure_optimizers` runs, so reading
  `trainer.estimated_stepping_batches` there (which makes the train iterator before the loops are restored,
  and drops a dataloader's own state: Lightning issue 20550) still resumes exactly. On resume each stream
  replays the samples it had already delivered (decoded and discarded), then continues.
Evaluation streams are finite: shard i goes to global worker i mod (R*W), read in order, never repeated.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import os
import re
import tarfile
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen, gopen_pipe, gopen_schemes, rewrite_url

from omnilab.seeding import numpy_rng

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"})
ALLOW_PIPE_ENV = "OMNILAB_ALLOW_PIPE"
MIN_SKIP_DENOMINATOR = 20  # the skip fraction is judged against at least this many samples
MAX_IMAGE_SIDE = 6144  # default largest image side: 4K/5K video frames, 24 MP photos (6000 x 4000)
Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


class BadSample(ValueError):
    """A sample that cannot be used: it is skipped and counted, never trained on."""


class SkipSample(Exception):
    """A sample a data kind leaves out on purpose (e.g. a pair of another setting): dropped, not counted."""


class DataError(RuntimeError):
    """The data stream cannot go on (too many bad samples, no readable shards)."""


# --------------------------------------------------------------------------- members: decode / encode


def member_kind(ext: str) -> str:
    """The last extension of a member name: `src.mask.png` -> `png`."""
    return ext.rsplit(".", 1)[-1].lower()


def decode_image(data: bytes, max_pixels: int | None = MAX_IMAGE_SIDE**2) -> np.ndarray:
    """Decode image bytes to HxWx3 uint8 (colour), HxW uint8 (grey) or HxW uint16/int32/float32.

    An image of more than `max_pixels` pixels is refused (BadSample) from its header, before decoding: a
    12000² PNG of a few hundred KB would otherwise cost gigabytes (Pillow alone only warns below 179 Mpx).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise BadSample(f"image refused before decoding: {err}") from None
    with img:
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise BadSample(
                f"image of {width}x{height} pixels is larger than the {max_pixels} pixels this data allows "
                "(data.max_image_pixels); refused before decoding"
            )
        img.load()
        if img.mode in ("L", "RGB", "I;16", "I", "F"):
            arr = np.asarray(img)
        elif img.mode in ("1", "LA"):
            arr = np.asarray(img.convert("L"))
        else:
            arr = np.asarray(img.convert("RGB"))
    return np.array(arr)  # own, writable memory


def decode_member(ext: str, data: bytes, max_pixels: int | None = MAX_IMAGE_SIDE**2) -> Any:
    """Decode one member by its extension; any extension not listed here is refused, never executed."""
    kind = member_kind(ext)
    if kind in IMAGE_EXTS:
        return decode_image(data, max_pixels)
    if kind == "json":
        return json.loads(data)
    if kind == "txt":
        return data.decode("utf-8")
    if kind == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if kind in ("cls", "idx"):
        return int(data)
    raise BadSample(
        f"member .{ext} refused: only images, json, txt, npy and cls are decoded (nothing is unpickled)"
    )


def encode_member(ext: str, value: Any) -> bytes:
    """Encode one member by its extension (the inverse of `decode_member`)."""
    kind = member_kind(ext)
    if isinstance(value, bytes):
        return value
    if kind in IMAGE_EXTS:
        buf = io.BytesIO()
        img = Image.fromarray(np.asarray(value))
        if kind in ("jpg", "jpeg"):
            img.save(buf, format="JPEG", quality=95)
        else:
            img.save(buf, format="PNG" if kind == "png" else kind.upper())
        return buf.getvalue()
    if kind == "json":
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    if kind == "txt":
        return str(value).encode()
    if kind == "npy":
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        return buf.getvalue()
    if kind in ("cls", "idx"):
        return str(int(value)).encode()
    raise ValueError(f"cannot encode member .{ext}: use an image, json, txt, npy or cls extension")


def decode_sample(
    raw: dict[str, Any], required: Collection[str], max_pixels: int | None = MAX_IMAGE_SIDE**2
) -> dict[str, Any]:
    """Decode every member of a raw sample; raise BadSample on a missing, refused, oversized or corrupt member."""
    if "__bad__" in raw:
        raise BadSample(raw["__bad__"])
    missing = [k for k in required if k not in raw]
    if missing:
        raise BadSample(f"missing member(s) {', '.join('.' + m for m in missing)}")
    out: dict[str, Any] = {"__key__": raw["__key__"], "__url__": raw.get("__url__", "")}
    for ext, data in raw.items():
        if ext.startswith("__"):
            continue
        try:
            out[ext] = decode_member(ext, data, max_pixels)
        except BadSample:
            raise
        except Exception as err:
            raise BadSample(f"member .{ext} does not decode: {type(err).__name__}: {err}") from err
    return out


# --------------------------------------------------------------------------- shards: write / index / read


class ShardWriter:
    """Writes samples to `<out_dir>/<split>-NNNNNN.tar`; same samples in, same bytes out."""

    def __init__(self, out_dir: str | Path, split: str, max_count: int = 100) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split, self.max_count = split, max_count
        self.shards: list[tuple[str, int]] = []
        self._tar: tarfile.TarFile | None = None

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in close())
        self.shards.append((name, 0))

    def write(self, sample: dict[str, Any]) -> None:
        """Write one sample: `__key__` plus one value per member extension (encoded by extension)."""
        key = sample["__key__"]
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None or self.shards[-1][1] >= self.max_count:
            self._open_next()
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = encode_member(ext, sample[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "omnilab"
            self._tar.addfile(info, io.BytesIO(data))
        name, count = self.shards[-1]
        self.shards[-1] = (name, count + 1)

    def close(self) -> list[tuple[str, int]]:
        """Close the open shard; return [(shard name, sample count)]."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


INDEX_NAME = "index.json"


def write_index(out_dir: str | Path, **fields: Any) -> Path:
    """Write `<out_dir>/index.json` (kind, seed, keys, splits: {split: {shards, counts, samples}}, ...)."""
    path = Path(out_dir) / INDEX_NAME
    path.write_text(json.dumps(fields, indent=1, sort_keys=True) + "\n")
    return path


def split_entry(shards: list[tuple[str, int]], samples: int) -> dict[str, Any]:
    """One split of an index: {shards, counts, samples} from a ShardWriter's [(name, count), ...]."""
    return {
        "shards": [name for name, _ in shards],
        "counts": [count for _, count in shards],
        "samples": samples,
    }


def read_index(data_dir: str | Path | None) -> dict[str, Any] | None:
    """The index JSON written beside a shard set, or None when there is none."""
    if data_dir is None:
        return None
    path = Path(data_dir) / INDEX_NAME
    return json.loads(path.read_text()) if path.exists() else None


DATA_ROOT = "data"  # the suite's own data folder: `omnilab data synth KIND` writes data/KIND


def synth_wanted(
    data_dir: str | Path | None, kind: str | None, synth: bool | None, asked: bool = False
) -> bool:
    """Whether to generate `kind`'s shards into `data_dir`; FileNotFoundError naming a data_dir that is missing.

    Nothing is generated where an index.json exists. Otherwise `synth: true` (or `asked`, e.g. sample counts
    given) generates, `synth: false` never does, and the default (None) generates only into the suite's own
    folder `data/<kind>`, so a mistyped path is an error instead of a new synthetic data set.
    """
    if data_dir is None or kind is None or read_index(data_dir) is not None:
        return False
    default = Path(DATA_ROOT, kind).resolve() == Path(data_dir).resolve()
    if synth or (synth is None and (asked or default)):
        return True
    if not Path(data_dir).exists():
        how = (
            "synth: false"
            if synth is False
            else f"the suite generates only into {DATA_ROOT}/{kind} unless asked"
        )
        raise FileNotFoundError(
            f"data.data_dir {str(data_dir)!r} does not exist ({how}; set data.synth=true to generate "
            f"{kind} shards there, or `omnilab data synth {kind} --out {data_dir}`)"
        )
    return False


def shard_scheme(url: str) -> str:
    """The URL scheme webdataset's `gopen` dispatches on: `urlparse` of the GOPEN_REWRITE'd URL (so lower-cased,
    with leading spaces and control characters dropped: ` PIPE:cmd` is a pipe)."""
    return urlparse(rewrite_url(url)).scheme


def check_shard_url(url: str) -> None:
    """Refuse (DataError) a shard URL that webdataset would run as a shell command, unless OMNILAB_ALLOW_PIPE=1."""
    scheme = shard_scheme(url)
    handler = gopen_schemes.get(scheme, gopen_schemes["__default__"])
    if (scheme == "pipe" or handler is gopen_pipe) and os.environ.get(ALLOW_PIPE_ENV) != "1":
        raise DataError(
            f"shard {url!r} is a pipe: URL, a shell command webdataset would run; "
            f"set {ALLOW_PIPE_ENV}=1 to allow pipe: shards"
        )


def expand_shards(spec: str | list[str]) -> list[str]:
    """Expand a shard spec (brace pattern, `::` list, local glob, URL) to a list of shard URLs.

    A `pipe:` URL (in any case or spacing webdataset accepts) is refused unless OMNILAB_ALLOW_PIPE=1.
    """
    urls: list[str] = []
    for part in [spec] if isinstance(spec, str) else spec:
        for url in wds.shardlists.expand_urls(str(part)):
            check_shard_url(url)
            if shard_scheme(url) == "" and any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return urls


TAR_BLOCK = 512
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key / extension split


class TarCutAtMember(tarfile.ReadError):
    """A tar stream that ends between two members, without the end-of-archive block."""


def _read_exact(stream: Any, n: int, name: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise tarfile.ReadError(f"truncated tar: {name!r} needs {n} bytes, got {len(data)}")
    return data


def iter_tar_members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar stream, in order: a plain ustar/pax/GNU reader.

    Python's tarfile (under webdataset's tar iterator) parses every header field into a TarInfo; reading only
    what a shard needs (name, size, type; pax `path` and GNU long names; the header checksum) is ~6x faster:
    0.06 vs 0.37 ms per 5-member correspondence sample on this CPU, before decoding (which costs ~6 ms).
    A bad checksum, a short read, or a stream that ends without the end-of-archive block (a zero-byte file,
    a tar cut at a member boundary) raises tarfile.ReadError.
    """
    long_name: str | None = None
    while True:
        header = stream.read(TAR_BLOCK)
        if header == bytes(TAR_BLOCK):
            return  # the end-of-archive blocks
        if not header:
            raise TarCutAtMember("truncated tar: it ends without the end-of-archive block")
        if len(header) < TAR_BLOCK:
            raise tarfile.ReadError("truncated tar header")
        stored = header[148:156].split(b"\0", 1)[0].strip()
        checksum = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if not stored or int(stored, 8) != checksum:
            raise tarfile.ReadError("tar header checksum mismatch")
        size_field = header[124:136]
        if size_field[0] & 0x80:  # GNU base-256 size
            size = int.from_bytes(size_field[1:], "big")
        else:
            size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar" and prefix:
            name = f"{prefix}/{name}"
        data = _read_exact(stream, size, name)
        _read_exact(stream, -size % TAR_BLOCK, name)
        if kind == b"x":  # pax extended header: "<len> key=value\n" records
            for record in data.decode("utf-8", "surrogateescape").splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
            continue
        if kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind in (b"0", b"\0", b"7"):
            yield (long_name or name), data
        long_name = None  # directories, links, global headers: skipped


def iter_raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of one shard: `{"__key__", "__url__", ext: bytes, ...}`.

    Adjacent members that share a key (the name up to the first dot of its basename) form a sample, as
    webdataset groups them; extensions are lower-cased; "__"-prefixed top-level files are skipped; a
    repeated extension within a sample is a ValueError. A sample with an absolute or `..` member name is
    marked `__bad__` (then skipped and counted), so a key can never point outside a folder it is written to.
    """
    check_shard_url(url)
    sample: dict[str, Any] | None = None
    with gopen(url) as stream:
        members = iter_tar_members(stream)
        while True:
            try:
                name, data = next(members)
            except StopIteration:
                break
            except TarCutAtMember:
                if sample is not None:
                    yield sample  # complete up to where the tar was cut; a missing member is caught by `required`
                raise
            if "/" not in name and name.startswith("__"):
                continue
            match = MEMBER_NAME.match(name)
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if ext in sample:
                raise ValueError(f"{url}: {name}: duplicate member .{ext} in sample {key!r}")
            if name.startswith("/") or ".." in name.split("/"):
                sample["__bad__"] = f"unsafe member name {name!r} (absolute or with ..)"
            sample[ext] = data
    if sample is not None:
        yield sample


def shuffled(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A shuffle buffer of `size` items drawing from `rng`; drains in random order at the end."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = item
    for i in rng.permutation(len(buf)):
        yield buf[i]


def collate_examples(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape, tensorize numbers, keep everything else as a list."""
    out: dict[str, Any] = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        if isinstance(vals[0], torch.Tensor) and all(v.shape == vals[0].shape for v in vals):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], bool | int | float):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


# --------------------------------------------------------------------------- streams


class SkipCounter:
    """Counts good and bad samples of one worker into its row of a shared tensor; stops past `max_fraction`."""

    def __init__(self, max_fraction: float, totals: torch.Tensor | None = None) -> None:
        self.max_fraction, self.seen, self.skipped = max_fraction, 0, 0
        self.totals = totals  # [2] = (seen, skipped), shared with the main process

    def good(self) -> None:
        """Count a usable sample."""
        self.seen += 1
        if self.totals is not None:
            self.totals[0] += 1

    def bad(self, url: str, key: str, reason: str, count: int = 1) -> None:
        """Count `count` skipped (or lost) samples and stop if too many were skipped."""
        self.seen += count
        self.skipped += count
        if self.totals is not None:
            self.totals += count
        if self.skipped - count < 10:
            log.warning(
                "skipped %s in %s: %s", f"sample {key}" if count == 1 else f"{count} samples", url, reason
            )
        if self.skipped > self.max_fraction * max(self.seen, MIN_SKIP_DENOMINATOR):
            raise DataError(
                f"{self.skipped} of {self.seen} samples skipped (> max_skip_fraction={self.max_fraction}); "
                f"last: shard {url} key {key}: {reason}"
            )


class _Stream(IterableDataset):
    """What train and eval streams share: shards, transform, placement and skip accounting."""

    def __init__(
        self,
        shards: list[str],
        transform: Transform,
        required: Collection[str],
        batch_size: int,
        seed: int,
        max_skip_fraction: float,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate_examples,
        counts: Mapping[str, int] | None = None,
        max_pixels: int | None = MAX_IMAGE_SIDE**2,
    ) -> None:
        self.shards, self.transform, self.required = shards, transform, tuple(required)
        self.counts = dict(counts or {})  # shard path -> samples the index says it holds
        self.max_pixels = max_pixels
        self.batch_size, self.seed, self.max_skip_fraction, self.collate = (
            batch_size,
            seed,
            max_skip_fraction,
            collate,
        )
        self.rank, self.world, self.num_workers = 0, 1, 0
        self.stats = torch.zeros(1, 2, dtype=torch.int64)

    def place(self, rank: int, world: int, num_workers: int) -> None:
        """Tell the stream where it runs (called in the main process before workers start)."""
        self.rank, self.world, self.num_workers = rank, world, num_workers
        if len(self.stats) != max(num_workers, 1):
            self.stats = torch.zeros(max(num_workers, 1), 2, dtype=torch.int64)
        self.stats.share_memory_()

    def counter(self, worker: int) -> SkipCounter:
        """A skip counter writing into this worker's row of the shared totals."""
        return SkipCounter(self.max_skip_fraction, self.stats[worker])

    def totals(self) -> tuple[int, int]:
        """(samples seen, samples skipped) over all workers and iterations so far."""
        seen, skipped = self.stats.sum(0).tolist()
        return seen, skipped

    def read_shard(self, url: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """The raw samples of one shard; what it lacks is counted: every sample short of the index's count
        (a zero-byte, non-tar or truncated shard), or one when the shard breaks and there is no count."""
        read, error = 0, None
        try:
            for sample in iter_raw_samples(url):
                read += 1
                yield sample
        except (OSError, tarfile.TarError, ValueError) as err:
            error = f"unreadable shard: {type(err).__name__}: {err}"
        expected = self.counts.get(os.path.abspath(url)) if shard_scheme(url) == "" else None
        missing = expected - read if expected is not None else 0
        if missing > 0:
            why = error or "the shard ends early"
            counter.bad(url, "-", f"{why}: {read} of the {expected} samples index.json lists", missing)
        elif error is not None and expected is None:
            counter.bad(url, "-", error)

    def _example(self, raw: dict[str, Any], rng: np.random.Generator, counter: SkipCounter) -> dict | None:
        url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
        try:
            example = self.transform(decode_sample(raw, self.required, self.max_pixels), rng)
        except SkipSample:
            return None
        except BadSample as err:
            counter.bad(url, key, str(err))
            return None
        counter.good()
        example.setdefault("__key__", key)
        return example


class TrainStream(_Stream):
    """Endless, reseeded-per-epoch training stream of `batches_per_epoch` batches per rank (see module doc)."""

    def __init__(
        self, *args: Any, batches_per_epoch: int, shuffle_buffer: int, num_streams: int | None, **kw: Any
    ):
        super().__init__(*args, **kw)
        self.batches_per_epoch, self.shuffle_buffer, self.num_streams = (
            batches_per_epoch,
            shuffle_buffer,
            num_streams,
        )
        self.epoch, self.start_batch = 0, 0
        # set by the DataModule: batches of one `bucket` (datamodules.multiref aspect buckets)
        self.bucketed = False

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Start the next iteration at batch `start_batch` of `epoch`."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def layout(self) -> tuple[int, int, int]:
        """(worker slots W, streams S, samples per stream per batch c), checked for divisibility."""
        workers = max(self.num_workers, 1)
        streams = self.num_streams or self.world * workers
        if streams % (self.world * workers):
            raise ValueError(
                f"data.num_streams={streams} must be a multiple of world size x workers = {self.world} x {workers}"
            )
        per_rank = streams // self.world
        if (self.batch_size * workers) % per_rank:
            raise ValueError(
                f"data.batch_size={self.batch_size} x workers {workers} must be a multiple of the "
                f"{per_rank} streams each rank reads (data.num_streams={streams}, world size {self.world})"
            )
        return workers, streams, self.batch_size * workers // per_rank

    def _cycle(self, v: int, streams: int, cycle: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Raw samples of stream v in one cycle: its slots of this cycle's shard permutation."""
        n = len(self.shards)
        perm = numpy_rng(self.seed, "shards", self.epoch, cycle).permutation(n)
        for slot in range(cycle * n + (v - cycle * n) % streams, (cycle + 1) * n, streams):
            yield from self.read_shard(self.shards[perm[slot - cycle * n]], counter)

    def _stream(self, v: int, streams: int, skip: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Examples of stream v: cycle after cycle, each shuffled within itself, the first `skip` dropped."""
        shuffle_rng = numpy_rng(self.seed, "shuffle", self.epoch, v)
        index, barren = 0, 0
        for cycle in itertools.count():
            usable = 0
            for sample in shuffled(self._cycle(v, streams, cycle, counter), self.shuffle_buffer, shuffle_rng):
                example = self._example(sample, numpy_rng(self.seed, "sample", self.epoch, v, index), counter)
                if example is None:
                    continue
                usable += 1
                index += 1
                if index > skip:
                    yield example
            barren = 0 if usable else barren + 1
            if barren > streams + 1:
                raise DataError(
                    f"no usable samples in {len(self.shards)} shard(s) (e.g. {self.shards[0]}): "
                    "all unreadable, bad or filtered out"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info else 0
        workers, streams, per_stream = self.layout()
        first = self.start_batch + worker
        if first >= self.batches_per_epoch:
            return
        slot = first % workers
        mine = [v for v in range(streams) if v % workers == slot and (v // workers) % self.world == self.rank]
        done = max(0, -(-(self.start_batch - slot) // workers))  # batches of this slot already delivered
        counter = self.counter(worker)
        if self.bucketed:  # batches of one bucket: replayed from the epoch's start, the first `done` dropped
            its = [self._stream(v, streams, 0, counter) for v in mine]
            batches = itertools.islice(bucketed_batches(its, per_stream, self.batch_size), done, None)
            for _, examples in zip(range(first, self.batches_per_epoch, workers), batches):
                yield self.collate(examples)
            return
        its = [self._stream(v, streams, done * per_stream, counter) for v in mine]
        for _ in range(first, self.batches_per_epoch, workers):
            yield self.collate([ex for it in its for ex in itertools.islice(it, per_stream)])


def bucketed_batches(
    streams: list[Iterator[dict[str, Any]]], per_stream: int, batch_size: int
) -> Iterator[list[dict[str, Any]]]:
    """Batches whose examples share `example["bucket"]`: the streams are read in the unbucketed order (`per_stream`
    from each in turn) into one queue per bucket, and a queue that reaches `batch_size` is a batch.

    Deterministic (a function of the streams' order), so a resumed run that replays the epoch from its start and
    drops the batches already made continues exactly; examples left in unfilled queues at the epoch's end are not
    trained on (as a last partial batch is dropped).
    """
    queues: dict[Any, list[dict[str, Any]]] = {}
    while True:
        for it in streams:
            taken = 0
            for example in itertools.islice(it, per_stream):
                taken += 1
                queue = queues.setdefault(example.get("bucket"), [])
                queue.append(example)
                if len(queue) == batch_size:
                    yield queue
                    queues[example.get("bucket")] = []
            if taken < per_stream:
                return


class EvalStream(_Stream):
    """Finite stream: shard i to global worker i mod (R*W), read once, in order."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info else 0
        workers = max(self.num_workers, 1)
        me = self.rank * workers + worker
        counter, batch = self.counter(worker), []
        for url in self.shards[me :: self.world * workers]:
            for raw in self.read_shard(url, counter):
                rng = numpy_rng(self.seed, "eval", raw.get("__key__", ""))
                example = self._example(raw, rng, counter)
                if example is not None:
                    batch.append(example)
                if len(batch) == self.batch_size:
                    yield self.collate(batch)
                    batch = []
        if batch:
            yield self.collate(batch)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.5)


def exit_with_parent() -> None:
    """Make this (worker) process exit as soon as its parent dies, even by kill -9.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); elsewhere, and as a
    fallback, a daemon thread polls the parent pid. A worker busy decoding would otherwise run on for seconds.
    """
    parent = os.getppid()
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="exit-with-parent").start()


class WorkerInit:
    """A DataLoader `worker_init_fn`: `exit_with_parent`, then the one it wraps (e.g. Lightning's seeding)."""

    def __init__(self, chained: Callable[[int], None] | None = None) -> None:
        self.chained = chained

    def __call__(self, worker_id: int) -> None:
        """Set up worker `worker_id`."""
        exit_with_parent()
        if self.chained is not None:
            self.chained(worker_id)


class StreamLoader(DataLoader):
    """A DataLoader over a stream that starts at a position (epoch, batches done): `resume_at`, else the trainer's."""

    def __init__(
        self,
        stream: _Stream,
        num_workers: int = 0,
        position: Callable[[], tuple[int, int]] = lambda: (0, 0),
        placement: Callable[[], tuple[int, int]] = lambda: (0, 1),
        **kwargs: Any,
    ) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, **kwargs)
        self.position, self.placement = position, placement
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self.dataset
        stream.place(*self.placement(), self.num_workers)
        if isinstance(stream, TrainStream):
            # Lightning restores its loop progress before it creates the iterator; a saved state wins.
            epoch, start = (
                self.position() if self._resume is None else (self._resume["epoch"], self._resume["batches"])
            )
            if start >= len(stream):  # saved at the end of an epoch: go on with the next one
                epoch, start = epoch + 1, 0
            self._resume = None
            stream.set_position(epoch, start)
        chained = self.worker_init_fn  # None, or what Lightning set (its worker seeding)
        if self.num_workers and not isinstance(chained, WorkerInit):
            self.worker_init_fn = WorkerInit(chained)
        try:
            return super().__iter__()  # starts the workers
        finally:
            self.worker_init_fn = chained

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start the next iteration at this position (a checkpoint's) instead of the trainer's progress."""
        self._resume = {"epoch": int(epoch), "batches": int(batches)}

    def totals(self) -> tuple[int, int]:
        """(samples seen, samples skipped) summed over this loader's workers."""
        return self.dataset.totals()


# --------------------------------------------------------------------------- the base DataModule


class WebDataModule(L.LightningDataModule):
    """Base DataModule over WebDataset shards; a data kind sets `required`, `synth_kind` and `transform`.

    Args:
        data_dir: Folder of the shard set (`<split>-NNNNNN.tar` + index.json). Shard specs default to it.
        train_shards: Training shards (brace pattern, glob, URL; `pipe:` only with OMNILAB_ALLOW_PIPE=1).
        val_shards: Validation shards (finite, split by rank and worker).
        test_shards: Test shards.
        predict_shards: Prediction shards (defaults to the test shards).
        batch_size: Training batch size per rank.
        eval_batch_size: Evaluation batch size per rank (defaults to batch_size).
        num_workers: DataLoader workers per rank.
        batches_per_epoch: Training batches per rank per epoch (default: one pass, from index.json).
        shuffle_buffer: Samples held by each stream's shuffle buffer.
        num_streams: Virtual training streams; fix it to keep the data order across world sizes.
        seed: Seed of every data random stream (shards, shuffle, augmentation).
        max_skip_fraction: Stop when more than this fraction of samples is bad (judged on >= 20 samples).
        synth: Generate the embedded shards into data_dir when they are absent: true generates anywhere, false
            never; the default generates only into the suite's own `data/<kind>` (a data_dir elsewhere that
            does not exist is an error naming it).
        synth_samples: Samples per split to generate, e.g. {train: 256, val: 32, test: 32}; giving it asks
            for generation (as synth: true does, unless synth is false).
        max_image_pixels: Refuse (skip and count) an image of more pixels than this, before decoding it
            (default: the data kind's `max_image_side` squared).
    """

    required: ClassVar[tuple[str, ...]] = ()
    synth_kind: ClassVar[str | None] = None
    max_image_side: ClassVar[int] = MAX_IMAGE_SIDE  # the largest image side the kind's source data has

    def __init__(
        self,
        data_dir: str | None = None,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        predict_shards: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 256,
        num_streams: int | None = None,
        seed: int = 0,
        max_skip_fraction: float = 0.05,
        synth: bool | None = None,
        synth_samples: dict[str, int] | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name}={value!r}: give a whole number >= 1")
        self.data_dir = data_dir
        self.specs = {
            "train": train_shards,
            "val": val_shards,
            "test": test_shards,
            "predict": predict_shards,
        }
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.shuffle_buffer, self.num_streams, self.seed = shuffle_buffer, num_streams, seed
        self.max_skip_fraction, self.synth, self.synth_samples = max_skip_fraction, synth, synth_samples
        self.max_image_pixels = max_image_pixels or self.max_image_side**2
        self.loaders: dict[str, StreamLoader] = {}
        self._resume: tuple[int, int] | None = (
            None  # a checkpoint's training position, until a loader takes it
        )

    # -- what a data kind supplies
    def transform(self, train: bool) -> Transform:
        """A picklable callable (decoded sample, rng) -> example dict of tensors; raises BadSample."""
        raise NotImplementedError(f"{type(self).__name__} must define transform(train)")

    def collate(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """The (picklable) function that turns a list of examples into a batch."""
        return collate_examples

    # -- shards
    def shard_spec(self, split: str) -> str | None:
        """The shard spec of a split: explicit, else `<data_dir>/<split>-*.tar` when such files exist."""
        spec = self.specs.get(split)
        if split == "predict" and spec is None:
            spec = self.specs["test"]
            split = "test"
        if spec is None and self.data_dir is not None:
            pattern = str(Path(self.data_dir) / f"{split}-*.tar")
            spec = pattern if glob.glob(pattern) else None
        return spec

    def prepare_data(self) -> None:
        """Generate the embedded shards when the shard set is absent and generation is wanted (`synth_wanted`)."""
        if not synth_wanted(self.data_dir, self.synth_kind, self.synth, asked=self.synth_samples is not None):
            return
        from datamodules.synth import synthesize

        synthesize(self.synth_kind, self.data_dir, samples=self.synth_samples, seed=self.seed)

    def _placement(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _position(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _epoch_batches(self) -> int:
        if self.batches_per_epoch:
            return self.batches_per_epoch
        index = read_index(self.data_dir)
        count = (index or {}).get("splits", {}).get("train", {}).get("samples")
        if not count:
            raise ValueError(
                "data.batches_per_epoch is required when the shard set has no index.json with counts"
            )
        return max(1, count // (self.batch_size * self._placement()[1]))

    def shard_counts(self) -> dict[str, int]:
        """{absolute shard path: samples} of every shard index.json lists (empty without an index)."""
        index = read_index(self.data_dir) or {}
        counts = {}
        for info in (index.get("splits") or {}).values():
            for name, count in zip(info.get("shards") or [], info.get("counts") or []):
                counts[os.path.abspath(Path(self.data_dir) / name)] = int(count)
        return counts

    def check_batch_size(self, split: str) -> None:
        """Refuse (ValueError, with the reason) a batch no epoch of `split` can fill or no memory can hold.

        Fill: the training batch of all ranks against the samples index.json counts for the split's shards.
        Memory: a batch holds at least its samples' stored bytes (index.json: the shard files' bytes per
        sample; without one, a tar header block per member); more than half the machine's memory is refused.
        """
        spec = self.shard_spec(split)
        if spec is None:
            return
        train = split == "train"
        key, batch = ("batch_size", self.batch_size) if train else ("eval_batch_size", self.eval_batch_size)
        shards = [u for u in expand_shards(spec) if shard_scheme(u) == ""]
        counts = self.shard_counts()
        known = [counts.get(os.path.abspath(u)) for u in shards]
        samples = sum(known) if shards and None not in known else None
        world = self._placement()[1]
        if train and samples is not None and batch * world > samples:
            raise ValueError(
                f"data.{key}={batch} x {world} rank(s) = {batch * world} samples per step, but the {split} "
                f"split has {samples} samples (index.json): an epoch cannot fill one batch"
            )
        if samples:
            per_sample = sum(os.path.getsize(u) for u in shards) / samples
        else:
            per_sample = float(TAR_BLOCK * max(1, len(self.required)))
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        if batch * per_sample > memory / 2:
            raise ValueError(
                f"data.{key}={batch}: one batch holds at least {batch * per_sample / 2**30:.1f} GiB "
                f"({per_sample / 1024:.1f} KiB stored per sample, before decoding), more than half of this "
                f"machine's {memory / 2**30:.1f} GiB of memory"
            )

    def setup(self, stage: str) -> None:
        """Check the batch sizes of the stage's splits before any work (`check_batch_size`)."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in splits.get(stage, ()):
            self.check_batch_size(split)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position (epoch, batches the trainer finished in it), for the checkpoint."""
        epoch, batches = self._position()
        return {"train_position": {"epoch": epoch, "batches": batches}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the training stream at a checkpoint's position (Lightning calls this before fitting)."""
        position = state.get("train_position")
        if position is None:
            return
        self._resume = (int(position["epoch"]), int(position["batches"]))
        if "train" in self.loaders:
            self.loaders["train"].resume_at(*self._resume)
            self._resume = None

    def _loader(self, split: str) -> StreamLoader:
        spec = self.shard_spec(split)
        if spec is None:
            raise FileNotFoundError(
                f"no {split} shards: set data.{split}_shards or data.data_dir (looked for {split}-*.tar)"
            )
        train = split == "train"
        common = dict(
            shards=expand_shards(spec),
            transform=self.transform(train),
            required=self.required,
            batch_size=self.batch_size if train else self.eval_batch_size,
            seed=self.seed,
            max_skip_fraction=self.max_skip_fraction,
            collate=self.collate(),
            counts=self.shard_counts(),
            max_pixels=self.max_image_pixels,
        )
        if train:
            stream: _Stream = TrainStream(
                **common,
                batches_per_epoch=self._epoch_batches(),
                shuffle_buffer=self.shuffle_buffer,
                num_streams=self.num_streams,
            )
            stream.bucketed = bool(getattr(self, "bucketed", False))
        else:
            stream = EvalStream(**common)
        loader = StreamLoader(stream, self.num_workers, position=self._position, placement=self._placement)
        if train and self._resume is not None:
            loader.resume_at(*self._resume)
            self._resume = None
        self.loaders[split] = loader
        return loader

    def has_split(self, split: str) -> bool:
        """Whether shards for a split are configured or present."""
        return self.shard_spec(split) is not None

    def train_dataloader(self) -> StreamLoader:
        """The resumable training stream."""
        return self._loader("train")

    def val_dataloader(self) -> StreamLoader | list:
        """The finite validation stream (none when no validation shards exist)."""
        return self._loader("val") if self.has_split("val") else []

    def test_dataloader(self) -> StreamLoader:
        """The finite test stream."""
        return self._loader("test")

    def predict_dataloader(self) -> StreamLoader:
        """The finite prediction stream (the test shards unless predict_shards is set)."""
        return self._loader("predict")

    def data_stats(self) -> dict[str, int]:
        """Samples seen and skipped so far, summed over splits and workers."""
        seen = sum(loader.totals()[0] for loader in self.loaders.values())
        skipped = sum(loader.totals()[1] for loader in self.loaders.values())
        return {"seen": seen, "skipped": skipped}
