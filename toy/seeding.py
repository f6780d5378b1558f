"""Where the toy's randomness comes from: one generator per (seed, phase name), so that a phase draws the same
numbers whatever ran before it, in which process, or whether other methods were selected."""

from __future__ import annotations

import zlib

import torch


def generator_for(seed: int, name: str) -> torch.Generator:
    """A generator that depends only on the seed and a phase name (crc32 is stable across runs and platforms)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
