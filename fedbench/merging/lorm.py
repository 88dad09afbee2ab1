"""LoRM (Salami et al., 2024, arXiv 2410.17961): closed-form merging of LoRA factors, RegMean, and the
response-matching error they minimise.

A linear layer maps its inputs X (n x d_in, one row per non-padding token) to X W^T. Client i holds a
LoRA update dW_i = s B_i A_i (B_i: d_out x r, A_i: r x d_in, s = alpha / r) and the Gram matrix
G_i = X_i^T X_i (d_in x d_in) of the layer's inputs on its data. A merge should answer like every
client does on that client's inputs:

    E(dW) = sum_i || X_i (dW - dW_i)^T ||_F^2 = sum_i tr((dW - dW_i) G_i (dW - dW_i)^T)   (response_error)

With both factors unknown the minimiser of E over products B A is not unique; with one factor fixed and
shared it is a plain least-squares problem (normal equations, G = sum_i G_i):

    A shared, solve B:   B A G A^T = sum_i B_i A G_i A^T  =>  B = (sum_i B_i A G_i) A^T pinv(A G A^T)
    B shared, solve A:   B^T B (A G - sum_i A_i G_i) = 0  =>  A = (sum_i A_i G_i) pinv(G)   (B^T B invertible)
    RegMean (dense):     W G = sum_i W_i G_i              =>  W = (sum_i W_i G_i) pinv(G)

(Solving A is RegMean applied to the A_i: B cancels.) Everything is computed in float64.

Ridge. ``ridge = lam > 0`` adds lam' ||X - X_avg||_F^2 to the objective, with lam' = lam * tr(M) / dim(M)
(M the matrix that is inverted, so lam is relative to its mean eigenvalue) and X_avg the weighted average
of the clients' factors (or dense deltas):  B = (sum_i B_i A G_i A^T + lam' B_avg) (A G A^T + lam' I)^-1
and likewise for A and W. lam -> 0 gives the least-squares solution (pinv: the minimum-norm one when M is
singular); lam -> inf gives plain averaging. Its error therefore never exceeds averaging's:
E(X_lam) + lam' ||X_lam - X_avg||^2 <= E(X_avg).
"""
from __future__ import annotations

from typing import Sequence

import torch

from fedbench.errors import ConfigError


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def _weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n or any(float(w) < 0 for w in weights) or float(sum(weights)) <= 0:
        raise ConfigError("weights", list(weights), f"{n} non-negative numbers with a positive sum")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _check_ridge(ridge) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < float("inf"):
        raise ConfigError("ridge", ridge, "a number >= 0 (relative to the mean eigenvalue; 0 = pseudo-inverse)")
    return float(ridge)


def _solve_right(rhs: torch.Tensor, m: torch.Tensor, average: torch.Tensor, ridge: float) -> torch.Tensor:
    """X = rhs pinv(m) (ridge 0), or X = (rhs + lam' average) (m + lam' I)^-1 with lam' = ridge tr(m)/dim."""
    if ridge == 0:
        return rhs @ torch.linalg.pinv(m, hermitian=True)
    lam = ridge * float(torch.trace(m)) / m.shape[0]
    if lam == 0:          # m == 0: no client input at all; the regulariser alone decides
        return average.clone()
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    # (m + lam I) is symmetric positive definite: solve X (m + lam I) = rhs' as (m + lam I) X^T = rhs'^T
    return torch.linalg.solve(m + lam * eye, (rhs + lam * average).T).T


def solve_B(B_list: Sequence, A, G_list: Sequence, weights=None, ridge: float = 0.0) -> torch.Tensor:
    """LoRM's B step (A shared and frozen): B = (sum_i B_i A G_i) A^T pinv(A (sum_i G_i) A^T).

    `weights` only set the average that a ridge pulls towards (the Gram matrices already weigh clients by
    their number of input rows). Returns float64 (d_out x r).
    """
    ridge = _check_ridge(ridge)
    a = _f64(A)
    p = _weights(weights, len(B_list))
    g_total = sum(_f64(g) for g in G_list)
    m = a @ g_total @ a.T                                              # r x r
    rhs = sum(_f64(b) @ (a @ _f64(g) @ a.T) for b, g in zip(B_list, G_list))   # d_out x r
    average = sum(pi * _f64(b) for pi, b in zip(p, B_list))
    return _solve_right(rhs, m, average, ridge)


def solve_A(A_list: Sequence, G_list: Sequence, weights=None, ridge: float = 0.0) -> torch.Tensor:
    """LoRM's A step (B shared and frozen): A = (sum_i A_i G_i) pinv(sum_i G_i).

    The least-squares A for the products B A_i whenever B has full column rank (B cancels from the
    normal equations). Returns float64 (r x d_in).
    """
    return regmean(A_list, G_list, weights=weights, ridge=ridge)


def regmean(W_list: Sequence, G_list: Sequence, weights=None, ridge: float = 0.0) -> torch.Tensor:
    """RegMean (Jin et al., 2023) on dense matrices: W = (sum_i W_i G_i) pinv(sum_i G_i). float64."""
    ridge = _check_ridge(ridge)
    if len(W_list) != len(G_list) or len(W_list) == 0:
        raise ConfigError("G_list", len(G_list), f"one Gram matrix per client ({len(W_list)})")
    p = _weights(weights, len(W_list))
    g_total = sum(_f64(g) for g in G_list)
    rhs = sum(_f64(w) @ _f64(g) for w, g in zip(W_list, G_list))
    average = sum(pi * _f64(w) for pi, w in zip(p, W_list))
    return _solve_right(rhs, g_total, average, ridge)


def cross_task_merge(products: Sequence, grams: Sequence, ridge: float = 0.0) -> torch.Tensor:
    """LoRM's cross-task merge (official code: ``end_task_server``): the tasks' dense products D_t merged by
    RegMean over tasks, W = (sum_t D_t G_t) pinv(sum_t G_t), G_t the clients' summed Gram matrices of task t;
    a ridge pulls towards the running mean of the D_t (lam -> inf: the running mean). float64. The continual
    strategy keeps the sums (:func:`merge_from_sums`) instead of every task's matrices."""
    return regmean(products, grams, weights=None, ridge=ridge)


def merge_from_sums(dg_sum, g_sum, d_mean, ridge: float = 0.0) -> torch.Tensor:
    """:func:`cross_task_merge` from running sums: dg_sum = sum_t D_t G_t, g_sum = sum_t G_t and d_mean = the
    mean of the D_t (what a ridge pulls towards). float64."""
    return _solve_right(_f64(dg_sum), _f64(g_sum), _f64(d_mean), _check_ridge(ridge))


def regmean_factored(B_list: Sequence, A_list: Sequence, G_list: Sequence, weights=None,
                     ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`regmean` of low-rank updates W_i = B_i A_i, as factors (U, V) with U V = the dense RegMean merge:
    (sum_i B_i A_i G_i + lam' sum_i p_i B_i A_i) (G + lam' I)^-1 = [B_1 .. B_n] Z with the rows of Z the
    solves of A_i G_i + lam' p_i A_i (ridge 0: pinv(G)). U: d_out x (sum of ranks). Equal to the dense merge
    up to float64 rounding, at O(rank d_in^2) instead of O(d_out d_in^2). float64."""
    ridge = _check_ridge(ridge)
    if not (len(B_list) == len(A_list) == len(G_list)) or len(B_list) == 0:
        raise ConfigError("G_list", len(G_list), f"one Gram matrix per client ({len(B_list)})")
    p = _weights(weights, len(B_list))
    Gs, As = [_f64(g) for g in G_list], [_f64(a) for a in A_list]
    g_total = sum(Gs)
    U = torch.cat([_f64(b) for b in B_list], 1)
    if ridge == 0:
        return U, torch.cat([a @ g for a, g in zip(As, Gs)], 0) @ torch.linalg.pinv(g_total, hermitian=True)
    lam = ridge * float(torch.trace(g_total)) / g_total.shape[0]
    if lam == 0:          # no client input at all: the average
        return torch.cat([pi * _f64(b) for pi, b in zip(p, B_list)], 1), torch.cat(As, 0)
    rhs = torch.cat([a @ g + lam * pi * a for a, g, pi in zip(As, Gs, p)], 0)
    eye = torch.eye(g_total.shape[0], dtype=g_total.dtype)
    return U, torch.linalg.solve(g_total + lam * eye, rhs.T).T


def factor_average(factors: Sequence, weights=None) -> torch.Tensor:
    """Plain (FedAvg) average of one factor, float64: the merge LoRM replaces."""
    p = _weights(weights, len(factors))
    return sum(pi * _f64(f) for pi, f in zip(p, factors))


def gram(x) -> torch.Tensor:
    """G = X^T X in float64 for input rows X (n x d_in)."""
    x = _f64(x)
    return x.T @ x


def response_error(dW, dW_list: Sequence, G_list: Sequence) -> float:
    """sum_i ||X_i (dW - dW_i)^T||_F^2 = sum_i tr((dW - dW_i) G_i (dW - dW_i)^T), from the Gram matrices
    (pass gram(X_i) to use inputs directly, e.g. held-out ones)."""
    if len(dW_list) != len(G_list):
        raise ConfigError("G_list", len(G_list), f"one Gram matrix per client ({len(dW_list)})")
    w = _f64(dW)
    total = 0.0
    for wi, g in zip(dW_list, G_list):
        d = w - _f64(wi)
        total += float(torch.sum((d @ _f64(g)) * d))
    return total


def factored_response_error(uv, factors_list: Sequence, G_list: Sequence) -> float:
    """:func:`response_error` of dW = U V against client updates dW_i = B_i A_i given as factors (uv = (U, V),
    factors_list = [(B_i, A_i)]): dW - dW_i = [U, -B_i] [V; A_i], and tr(D G D^T) = sum((P^T P) * (Q G Q^T))
    for D = P Q. Exact; O(k d_in^2) for k = columns of P instead of O(d_out d_in^2). float64."""
    if len(factors_list) != len(G_list):
        raise ConfigError("G_list", len(G_list), f"one Gram matrix per client ({len(factors_list)})")
    u, v = _f64(uv[0]), _f64(uv[1])
    total = 0.0
    for (b, a), g in zip(factors_list, G_list):
        P = torch.cat([u, -_f64(b)], 1)
        Q = torch.cat([v, _f64(a)], 0)
        total += float(torch.sum((P.T @ P) * (Q @ _f64(g) @ Q.T)))
    return total


def normalized_weights(weights, n: int) -> list[float]:
    """The weights as :func:`factor_average` uses them (summing to one; None = uniform)."""
    return _weights(weights, n)


def gram_nbytes(d_in: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one Gram matrix on the wire: its upper triangle (it is symmetric), in the dtype it travels in
    (float32, as the official code's ``gram_dtype='32'``; the server solves in float64)."""
    return d_in * (d_in + 1) // 2 * torch.empty((), dtype=dtype).element_size()
