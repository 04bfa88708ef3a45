"""Seeded randomness: one root seed per run, split deterministically by purpose, round and client.

Every random draw in fedloom comes from a generator made here, never from a global RNG, so a run is a
pure function of its seed (and resuming at round r re-creates exactly the generators round r would use).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for (seed, *keys); distinct keys give independent streams."""
    words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    for k in keys:
        if isinstance(k, str):
            words.append(int.from_bytes(hashlib.blake2b(k.encode(), digest_size=4).digest(), "little"))
        else:
            words.extend([int(k) & 0xFFFFFFFF, (int(k) >> 32) & 0xFFFFFFFF])
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_rng(seed: int, *keys: int | str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *keys))
    return g
