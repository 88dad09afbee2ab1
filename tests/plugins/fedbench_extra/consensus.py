"""Consensus merging (Wang et al., ICML 2024, "Localizing Task Information for Improved Model Merging and
Compression"): keep only the weights that at least ``k`` tasks find important.

    tau_MTL = sum_t tau_t
    m_t     = |tau_t| >= tall_lambda * |tau_MTL - tau_t|        (the TALL mask of task t, per coordinate)
    tau     = lam * 1[sum_t m_t >= k] * tau_MTL
"""
from __future__ import annotations

import math

import torch

from fedbench.errors import ConfigError
from fedbench.merging import flatten, unflatten
from fedbench.registry import MERGES


def consensus(tvs, k: int = 2, tall_lambda: float = 0.4, lam: float = 1.0):
    """Consensus merging: task arithmetic restricted to the weights that >= k tasks' TALL masks keep."""
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= len(tvs)):
        raise ConfigError("k", k, f"an integer in [1, {len(tvs)}] (the number of task vectors)")
    for name, value in (("tall_lambda", tall_lambda), ("lam", lam)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf):
            raise ConfigError(name, value, "a number >= 0")
    flat = torch.stack([flatten(tv).double() for tv in tvs])            # T x n
    mtl = flat.sum(0)
    masks = flat.abs() >= tall_lambda * (mtl - flat).abs()
    keep = masks.sum(0) >= k
    return unflatten(lam * torch.where(keep, mtl, 0.0), tvs[0])


MERGES.register("consensus", consensus, scale="sum", search=None)
