"""Byzantine-robust aggregation rules: Krum, Multi-Krum and Bulyan as small pure functions.

Same conventions as :mod:`fedbench.merging.aggregators`: each rule takes the clients' states (dicts with
the same keys and shapes) and optionally their weights, and returns a new ``OrderedDict`` with the
keys and dtypes of ``states[0]``. Distances, medians and means are computed in float64. Inputs are
never modified.

Reference implementation: Flower 1.41 ``flwr.server.strategy.aggregate`` (``aggregate_krum``,
``aggregate_bulyan``). On valid inputs the results agree with Flower's to float rounding
(tests/test_robust.py). Where Flower and the papers differ, or Flower is silent:

* Neighbours. Krum scores client i by the sum of squared L2 distances (over all parameters
  flattened together) to its n - f - 2 nearest other clients (Blanchard et al., 2017). Flower
  uses ``max(1, n - f - 2)`` and never checks n. For ``krum``/``multi_krum`` we require
  n >= 2f + 3 (the paper's n > 2f + 2), so the ``max`` never applies there. Inside Bulyan the
  iterated Krum runs on a shrinking set, down to 2f + 1 clients, where n' - f - 2 can be < 1. The
  paper does not say what happens then, so we do what Flower does: ``max(1, n' - f - 2)``
  neighbours, with f fixed.
* Weights. Krum and Bulyan ignore ``weights`` (Flower and the papers agree). Multi-Krum in
  Flower averages the selected clients weighted by ``num_examples``; the paper takes a plain
  mean. Here ``multi_krum`` weights by ``weights`` when given (Flower) and takes the plain mean
  when ``weights`` is None (the paper).
* Ties. Krum picks the lowest index among equal scores (``np.argmin``, as Flower). Multi-Krum
  ranks with a stable sort, so equal scores go to the lower index. Flower's ``np.argsort`` does
  the same for n <= 16 (numpy uses insertion sort there); above that its choice is not specified.
  For Bulyan's "beta values closest to the median" we also break ties by lower position with a
  stable sort. Flower's ``np.argpartition`` breaks them arbitrarily. This only matters for
  values that tie exactly at the cut.
* Precision. Flower computes distances in the input dtype as ``norm(delta) ** 2``. We use a
  float64 sum of squares, so on near ties of float32 inputs the two can pick different clients.
* Purity. Flower's ``aggregate_bulyan`` pops the selected clients from the caller's list. These
  functions leave their inputs alone. ``krum`` returns a copy of the selected state.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch

State = "OrderedDict[str, torch.Tensor]"


# -- validation -------------------------------------------------------------------------------------

def _check_int(name: str, value, low: int, high: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be an integer")
    value = int(value)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value} must be {allowed}{why}")
    return value


def _check_states(states: Sequence[dict], weights: Sequence[float] | None) -> int:
    if len(states) == 0:
        raise ValueError("states is empty: robust aggregation needs at least one client state")
    ref = states[0]
    for i, s in enumerate(states[1:], start=1):
        if list(s) != list(ref):
            raise ValueError(f"states[{i}] has keys {list(s)}, states[0] has {list(ref)}")
        for k in ref:
            if tuple(s[k].shape) != tuple(ref[k].shape):
                raise ValueError(f"states[{i}][{k!r}] has shape {tuple(s[k].shape)}, "
                                 f"states[0] has {tuple(ref[k].shape)}")
    if weights is not None and len(weights) != len(states):
        raise ValueError(f"weights has {len(weights)} entries for {len(states)} states")
    return len(states)


def _check_n(n: int, num_malicious, rule: str, k: int, source: str) -> int:
    """f = num_malicious, checked against a rule that needs n >= k f + 3 clients (k = 2 Krum, 4 Bulyan)."""
    f = _check_int("num_malicious", num_malicious, 0)
    if n < k * f + 3:
        raise ValueError(f"{rule} needs n >= {k} * num_malicious + 3 clients ({source}); "
                         f"got n={n} with num_malicious={f}, so num_malicious must be <= {max((n - 3) // k, 0)}"
                         + ("" if n >= 3 else " and n >= 3"))
    return f


def _check_krum_n(n: int, num_malicious, rule: str) -> int:
    return _check_n(n, num_malicious, rule, 2, "Blanchard et al. 2017: n > 2f + 2")


def _check_bulyan_n(n: int, num_malicious) -> int:
    return _check_n(n, num_malicious, "bulyan", 4, "El Mhamdi et al. 2018")


# -- Krum scores ------------------------------------------------------------------------------------

def _pairwise_sq_distances(states: Sequence[dict]) -> torch.Tensor:
    """n x n float64 matrix of squared L2 distances over all parameters flattened together.

    Explicit differences, one key at a time. The Gram form |x|^2 + |y|^2 - 2<x, y> loses all
    precision when the states are nearly equal (fine-tuned copies of one model are).
    """
    n = len(states)
    dist = None
    for key in states[0]:
        x = torch.stack([s[key].detach().reshape(-1).to(torch.float64) for s in states])
        if dist is None:
            dist = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        for i in range(n - 1):
            diff = x[i + 1:] - x[i]
            dist[i, i + 1:] += (diff * diff).sum(dim=1)
    if dist is None:  # states without keys
        dist = torch.zeros(n, n, dtype=torch.float64)
    dist = dist + dist.T
    return dist.cpu()


def _scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Score of each client: sum of its max(1, n - f - 2) smallest distances to other clients.

    As in Flower, take the sorted row minus its first entry. Distances are >= 0 and d(i, i) = 0,
    so the first entry is 0, whether it belongs to i itself or to an exact duplicate of i.
    """
    n = dist.shape[0]
    k = min(max(1, n - f - 2), n - 1)
    return torch.sort(dist, dim=1).values[:, 1:k + 1].sum(dim=1)


def _ranking(scores: torch.Tensor) -> list[int]:
    return np.argsort(scores.numpy(), kind="stable").tolist()


def krum_scores(states: Sequence[dict], num_malicious: int) -> torch.Tensor:
    """Krum score of each client (float64 tensor of shape (n,)). Lower means more central.

    score_i = sum of squared L2 distances from client i to its n - f - 2 nearest other clients,
    over all parameters flattened together (Blanchard et al., 2017). Needs n >= 2f + 3.
    """
    n = _check_states(states, None)
    f = _check_krum_n(n, num_malicious, "krum_scores")
    return _scores(_pairwise_sq_distances(states), f)


# -- rules ------------------------------------------------------------------------------------------

def _copy(state: dict) -> State:
    return OrderedDict((k, v.detach().clone()) for k, v in state.items())


def _mean(states: Sequence[dict], weights: Sequence[float] | None) -> State:
    n = len(states)
    if weights is None:
        p = [1.0 / n] * n
    else:
        total = float(sum(float(w) for w in weights))
        if not total > 0:
            raise ValueError(f"weights of the selected clients must sum to > 0, got {list(weights)}")
        p = [float(w) / total for w in weights]
    out = OrderedDict()
    for key in states[0]:
        acc = sum(pi * s[key].double() for pi, s in zip(p, states))
        out[key] = acc.to(states[0][key].dtype)
    return out


def krum(states: Sequence[dict], weights: Sequence[float] | None = None, *, num_malicious: int) -> State:
    """Krum (Blanchard et al., 2017): return (a copy of) the state with the lowest Krum score.

    score_i = sum of squared L2 distances (all parameters flattened together) to the n - f - 2
    nearest other clients. Needs n >= 2f + 3. ``weights`` is ignored, as in the paper and in
    Flower's ``aggregate_krum(..., to_keep=0)``. If scores tie, the lowest index wins (np.argmin).
    """
    n = _check_states(states, weights)
    f = _check_krum_n(n, num_malicious, "krum")
    best = int(np.argmin(_scores(_pairwise_sq_distances(states), f).numpy()))
    return _copy(states[best])


def multi_krum(states: Sequence[dict], weights: Sequence[float] | None = None, *, num_malicious: int,
               num_selected: int | None = None) -> State:
    """Multi-Krum (Blanchard et al., 2017): average the m states with the lowest Krum scores.

    With ``weights`` (sample counts) the selected states are averaged weighted by their weights,
    renormalised over the selection. That is Flower's ``aggregate_krum(results, f, to_keep=m)``,
    which weights by ``num_examples``. With ``weights=None`` it is the plain mean of the paper.
    ``num_selected`` (m) defaults to n - f and must be in [1, n]. m = 1 is Krum and m = n is
    FedAvg. Needs n >= 2f + 3. Equal scores are ranked by lower index (stable sort).
    """
    n = _check_states(states, weights)
    f = _check_krum_n(n, num_malicious, "multi_krum")
    m = n - f if num_selected is None else _check_int("num_selected", num_selected, 1, n,
                                                      f" (number of clients n={n})")
    chosen = _ranking(_scores(_pairwise_sq_distances(states), f))[:m]
    return _mean([states[i] for i in chosen], None if weights is None else [weights[i] for i in chosen])


def bulyan_selection(states: Sequence[dict], num_malicious: int) -> list[int]:
    """Bulyan's first step: indices (into ``states``) of the theta = n - 2f clients that iterated
    Krum selects, in the order they are picked.

    Each pass runs Krum on the clients not yet picked, with f fixed and max(1, n' - f - 2)
    neighbours (Flower's rule) on the n' that remain, and moves the winner to the selection.
    Distances are computed once. Each pass uses the submatrix of the remaining clients, which
    gives the same scores as recomputing them. Needs n >= 4f + 3.
    """
    n = _check_states(states, None)
    f = _check_bulyan_n(n, num_malicious)
    dist = _pairwise_sq_distances(states)
    remaining, selected = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = dist[remaining][:, remaining]
        best = int(np.argmin(_scores(sub, f).numpy()))
        selected.append(remaining.pop(best))
    return selected


def bulyan(states: Sequence[dict], weights: Sequence[float] | None = None, *, num_malicious: int) -> State:
    """Bulyan (El Mhamdi et al., 2018) with Krum as the inner rule (the only one Flower supports).

    1. Select theta = n - 2f states by iterated Krum (see :func:`bulyan_selection`).
    2. For each coordinate, take the median of the theta selected values (for even theta, the
       mean of the two middle values, as ``np.median`` does). Average the beta = theta - 2f
       values closest to it; ties at the cut go to the earlier-selected client.

    Needs n >= 4f + 3. ``weights`` is ignored (unweighted, as in the paper and in Flower's
    ``aggregate_bulyan``).
    """
    n = _check_states(states, weights)
    f = _check_bulyan_n(n, num_malicious)
    chosen = bulyan_selection(states, f)
    theta = len(chosen)
    beta = theta - 2 * f
    out = OrderedDict()
    for key in states[0]:
        x = torch.stack([states[i][key].detach().to(torch.float64) for i in chosen])
        srt = torch.sort(x, dim=0).values
        med = srt[theta // 2] if theta % 2 else 0.5 * (srt[theta // 2 - 1] + srt[theta // 2])
        closest = torch.argsort((x - med).abs(), dim=0, stable=True)[:beta]
        out[key] = torch.gather(x, 0, closest).mean(dim=0).to(states[0][key].dtype)
    return out


ROBUST_RULES: dict[str, Callable[..., State]] = {"krum": krum, "multi_krum": multi_krum, "bulyan": bulyan}


def selected_clients(rule: str | Callable, states: Sequence[dict], weights: Sequence[float] | None = None,
                     **params) -> list[int]:
    """Indices of the clients that ``rule`` (a name in ROBUST_RULES or one of these functions)
    keeps with these parameters. Use it to log which clients were kept.

    krum: [argmin score]. multi_krum: the m lowest scores, best first. bulyan: the theta clients
    of its first step, in the order they are picked (step 2 mixes them coordinate by coordinate).
    """
    name = rule if isinstance(rule, str) else next((k for k, v in ROBUST_RULES.items() if v is rule), None)
    if name not in ROBUST_RULES:
        raise ValueError(f"rule={rule!r} is not a robust rule; allowed: {sorted(ROBUST_RULES)}")
    n = _check_states(states, weights)
    unknown = set(params) - ({"num_malicious", "num_selected"} if name == "multi_krum" else {"num_malicious"})
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for rule {name!r}")
    if "num_malicious" not in params:
        raise ValueError(f"rule {name!r} needs the parameter num_malicious")
    f = params["num_malicious"]
    if name == "bulyan":
        return bulyan_selection(states, f)
    f = _check_krum_n(n, f, name)
    ranking = _ranking(_scores(_pairwise_sq_distances(states), f))
    if name == "krum":
        return ranking[:1]
    m = params.get("num_selected")
    m = n - f if m is None else _check_int("num_selected", m, 1, n, f" (number of clients n={n})")
    return ranking[:m]
