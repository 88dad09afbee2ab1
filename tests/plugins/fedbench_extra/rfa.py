"""RFA: robust federated aggregation by the geometric median (Pillutla, Kakade & Harchaoui, IEEE TSP 2022).

    v* = argmin_v  sum_i alpha_i ||v - w_i||          (the states flattened into one vector each)

computed by the smoothed Weiszfeld algorithm: v_0 = sum_i alpha_i w_i, then ``iterations`` times

    beta_i = alpha_i / max(eps, ||v - w_i||),    v <- sum_i beta_i w_i / sum_i beta_i.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from fedbench.options import Options, check_int, check_number
from fedbench.registry import AGGREGATORS


@dataclass(frozen=True)
class RFAOptions(Options):
    """RFA's settings: Weiszfeld iterations (the paper uses 3) and the smoothing eps (no division by ~0)."""
    iterations: int = 3
    eps: float = 1e-6

    def validate(self, prefix):
        check_int(f"{prefix}.iterations", self.iterations, 1)
        check_number(f"{prefix}.eps", self.eps, 0, math.inf, low_open=True, high_open=True)


def geometric_median(states, weights, iterations: int, eps: float) -> "OrderedDict[str, torch.Tensor]":
    """The smoothed Weiszfeld estimate of the weighted geometric median of `states` (float64 inside)."""
    keys = list(states[0])
    points = torch.stack([torch.cat([s[k].double().reshape(-1) for k in keys]) for s in states])   # n x d
    alpha = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    alpha = alpha / alpha.sum()
    v = alpha @ points
    for _ in range(iterations):
        beta = alpha / torch.linalg.vector_norm(points - v, dim=1).clamp(min=eps)
        v = (beta @ points) / beta.sum()
    out, pos = OrderedDict(), 0
    for k in keys:
        like = states[0][k]
        out[k] = v[pos:pos + like.numel()].reshape(like.shape).to(like.dtype)
        pos += like.numel()
    return out


@AGGREGATORS.register("rfa", weighted=True, robust=True, options=RFAOptions)
def rfa_rule(states, weights, fl_cfg, *, options: RFAOptions):
    """RFA: the weighted geometric median of the states (smoothed Weiszfeld)."""
    return geometric_median(states, weights, options.iterations, options.eps)
