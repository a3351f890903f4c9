"""Deterministic random streams: every seed in the suite derives from (seed, epoch or step, worker, ...).

docs/architecture.md: resume is exact because no random stream depends on global state,
a pid or the clock. One function turns any tuple of integers and strings into a 63-bit seed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """Return a 63-bit seed that depends on every part (order matters) and on nothing else."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def numpy_rng(*parts: int | str) -> np.random.Generator:
    """A NumPy generator seeded from `derive_seed(*parts)`."""
    return np.random.default_rng(derive_seed(*parts))


def torch_generator(*parts: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded from `derive_seed(*parts)`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen
