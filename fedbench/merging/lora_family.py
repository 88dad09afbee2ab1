"""The federated-LoRA family's server math: small pure functions over dicts of tensors.

Factors follow peft's layout: A is (r x d_in), B is (d_out x r), the update is s B A. ``pairs`` is a list of
(a_key, b_key) naming one LoRA layer's factors in a state. Clients of different ranks hold the leading r_k rows
of A and columns of B (HetLoRA's and FlexLoRA's truncation); the server zero-pads them back to its rank.
Nothing here knows about rounds, models or clients (the strategies in :mod:`fedbench.strategies.lora_family`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch


def factor_rank(state: dict, a_key: str) -> int:
    """The LoRA rank a state holds (its A's rows)."""
    return int(state[a_key].shape[0])


def truncate_factors(state: dict, pairs, rank: int) -> "OrderedDict[str, torch.Tensor]":
    """A[:rank] and B[:, :rank] of every pair (contiguous copies: they travel); other keys as they are."""
    out = OrderedDict(state)
    for a_key, b_key in pairs:
        if a_key in out:
            out[a_key] = out[a_key][:rank].contiguous()
        if b_key in out:
            out[b_key] = out[b_key][:, :rank].contiguous()
    return out


def pad_factors(state: dict, pairs, rank: int) -> "OrderedDict[str, torch.Tensor]":
    """Zero-pad every pair's factors to `rank` (HetLoRA's zero-padding): A gets zero rows, B zero columns, so
    B A is unchanged; other keys as they are."""
    out = OrderedDict(state)
    for a_key, b_key in pairs:
        if a_key in out and out[a_key].shape[0] < rank:
            a = out[a_key]
            out[a_key] = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0)
        if b_key in out and out[b_key].shape[1] < rank:
            b = out[b_key]
            out[b_key] = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return out


def products(state: dict, pairs, scalings: Sequence[float] | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Each pair's dense product B A in float64 (times its scaling if given), keyed by the pair's A key."""
    scalings = scalings or [1.0] * len(pairs)
    return OrderedDict((a_key, s * (state[b_key].double() @ state[a_key].double()))
                       for (a_key, b_key), s in zip(pairs, scalings))


def fedex_residual(mean_product: torch.Tensor, b_avg: torch.Tensor, a_avg: torch.Tensor) -> torch.Tensor:
    """FedEx-LoRA's residual: mean_i(B_i A_i) - mean(B) mean(A), what factor averaging leaves out (float64)."""
    return mean_product.double() - b_avg.double() @ a_avg.double()


def sparsity_weights(states: Sequence[dict], pairs) -> list[float]:
    """HetLoRA's aggregation weights: S_k = ||Delta W_k||_F, the Frobenius norm of client k's reconstructed update
    (every layer's B_k A_k together), normalised to sum 1. Equal weights if every update is zero."""
    norms = [math.sqrt(sum(float((s[b].double() @ s[a].double()).pow(2).sum()) for a, b in pairs)) for s in states]
    total = sum(norms)
    return [1.0 / len(states)] * len(states) if total == 0 else [n / total for n in norms]


def tail_norm(state: dict, pairs, start: int, end: int) -> torch.Tensor:
    """sum over layers of ||B[:, start:end] A[start:end]||_F (HetLoRA's rank self-pruning term); differentiable."""
    total = None
    for a_key, b_key in pairs:
        term = torch.linalg.matrix_norm(state[b_key][:, start:end] @ state[a_key][start:end])
        total = term if total is None else total + term
    return total


def svd_factors(dense: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U_r S_r, V_r^T) of the truncated SVD of a dense update: B A is its best rank-r approximation
    (Eckart-Young) and A has orthonormal rows (FlexLoRA's and FedSVD's split: the singular values go to B)."""
    u, sv, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    return u[:, :rank] * sv[:rank], vh[:rank]


def svd_refactor(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSVD's re-factorisation of B A (inner dimension r, so exact): (U_r S_r, V_r^T) from the QR factors of B
    and A^T and the SVD of their small r x r core, never forming the dense d_out x d_in product (as
    :func:`fedbench.merging.aggregators.svd_of_product`, with the singular values in B, not split)."""
    q1, r1 = torch.linalg.qr(b.double())
    q2, r2 = torch.linalg.qr(a.double().T)
    u, sv, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    k = min(rank, sv.shape[0])
    new_b, new_a = (q1 @ u[:, :k]) * sv[:k], vh[:k] @ q2.T
    if k < rank:    # fewer singular directions than the rank (a thin layer): pad with zeros, B A unchanged
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], rank - k)], dim=1)
        new_a = torch.cat([new_a, new_a.new_zeros(rank - k, new_a.shape[1])], dim=0)
    return new_b, new_a
