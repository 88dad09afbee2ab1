"""Every random stream is derived from the config's seed and a name, never from global state."""
from __future__ import annotations

import numpy as np

STREAMS = {"partition": 1, "sampling": 2, "dropout": 3, "client": 4, "init": 5, "subsample": 6, "server": 7,
           "merge": 8,
           "attack": 9, "client_ranks": 10}


def derive_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed for (`stream`, keys...) that depends on nothing but its arguments."""
    ss = np.random.SeedSequence([int(seed), STREAMS[stream], *[int(k) for k in keys]])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64)
               % np.uint64(2**63 - 1))


def rng_for(seed: int, stream: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, stream, *keys))
