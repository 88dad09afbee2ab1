"""Server aggregation rules: small pure functions over dicts of tensors.

Every function takes the clients' states (dicts with the same keys and shapes) and, where it weighs
them, their weights (usually sample counts), and returns a new dict. Nothing here knows about
rounds, models or clients: the round loop (:mod:`fedbench.fl.server`) or an engine such as Flower
calls them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch

State = "OrderedDict[str, torch.Tensor]"


def _normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to > 0, got {list(weights)}")
    return [float(w) / total for w in weights]


def fedavg(states: Sequence[dict], weights: Sequence[float] | None = None) -> State:
    """FedAvg (McMahan et al., 2017):  x = sum_i p_i x_i,  p_i = n_i / sum_j n_j."""
    p = _normalised(weights, len(states))
    out = OrderedDict()
    for key in states[0]:
        # accumulate in float64 so the weighted sum does not depend on client order beyond fp64 rounding
        acc = sum(pi * s[key].double() for pi, s in zip(p, states))
        out[key] = acc.to(states[0][key].dtype)
    return out


def coordinate_median(states: Sequence[dict], weights=None) -> State:
    """Coordinate-wise median (Yin et al., 2018): x[k] = median_i x_i[k]. Unweighted.

    For an even number of clients it is the mean of the two middle values (numpy's convention),
    not torch.median's lower middle value.
    """
    return OrderedDict((k, _median0(torch.stack([s[k].double() for s in states])).to(states[0][k].dtype))
                       for k in states[0])


def _median0(stack: torch.Tensor) -> torch.Tensor:
    """torch.quantile(stack, 0.5, dim=0), bit for bit (the same sort and lerp; tested), at half its time: quantile
    also validates and sorts a copy, seconds on a full-model task vector."""
    n = stack.shape[0]
    srt = stack.sort(dim=0).values
    return srt[n // 2] if n % 2 else torch.lerp(srt[n // 2 - 1], srt[n // 2], 0.5)


def trimmed_mean(states: Sequence[dict], weights=None, trim_ratio: float = 0.1) -> State:
    """Coordinate-wise trimmed mean (Yin et al., 2018): per coordinate, drop the floor(beta * n)
    largest and smallest values and average the rest. Unweighted."""
    n = len(states)
    cut = int(trim_ratio * n)
    if n - 2 * cut < 1:
        raise ValueError(f"trim_ratio={trim_ratio} leaves no value to average among {n} clients")
    out = OrderedDict()
    for k in states[0]:
        sorted_vals = torch.stack([s[k].double() for s in states]).sort(dim=0).values
        out[k] = sorted_vals[cut:n - cut].mean(dim=0).to(states[0][k].dtype)
    return out


# -- LoRA: which average do you mean? ---------------------------------------------------------------
# Averaging A and B separately (FedIT) gives mean(B) mean(A), which is not the average of the products
# mean(B_i A_i). `stack` and `svd` give the exact average of products. Each takes `modules`: pairs of
# (a_key, b_key) naming the factors of one LoRA layer in the states.

def lora_factor_average(states, weights=None, modules=None) -> State:
    """FedIT / peft 'linear': A = sum p_i A_i and B = sum p_i B_i (so B A != sum p_i B_i A_i)."""
    return fedavg(states, weights)


def lora_stack(states, weights, modules) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact product average by stacking (FLoRA; peft 'cat'): the rank grows to sum_i r_i.

    For each module returns (B_stack, A_stack) with B_stack = [p_1 B_1 | ... | p_N B_N] (d_out x sum r)
    and A_stack = [A_1; ...; A_N] (sum r x d_in), so that B_stack A_stack = sum_i p_i B_i A_i exactly.
    """
    p = _normalised(weights, len(states))
    out = {}
    for a_key, b_key in modules:
        b_stack = torch.cat([pi * s[b_key] for pi, s in zip(p, states)], dim=1)
        a_stack = torch.cat([s[a_key] for s in states], dim=0)
        out[a_key] = (b_stack, a_stack)
    return out


def lora_svd(states, weights, modules, rank: int) -> State:
    """Exact product average re-factorised at `rank` by truncated SVD (peft 'svd').

    Dense D = sum_i p_i B_i A_i = U S V^T; returns B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T, so that
    B A is the best rank-r approximation of D (Eckart-Young), and equals D when rank(D) <= r.
    D is kept as its stacked factors (as :func:`lora_stack`, in float64) and decomposed by
    :func:`svd_of_product`, never formed densely. Only the factor keys are returned.
    """
    p = _normalised(weights, len(states))
    out = OrderedDict()
    for a_key, b_key in modules:
        b_stack = torch.cat([pi * s[b_key].double() for pi, s in zip(p, states)], dim=1)
        a_stack = torch.cat([s[a_key].double() for s in states], dim=0)
        b, a = svd_of_product(b_stack, a_stack, rank)
        out[b_key] = b.to(states[0][b_key].dtype)
        out[a_key] = a.to(states[0][a_key].dtype)
    return out


def svd_of_product(U: torch.Tensor, V: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U_r S_r^(1/2), S_r^(1/2) V_r^T) of the truncated SVD of D = U V (d_out x k times k x d_in,
    k small) from QR factors U = Q1 R1, V^T = Q2 R2 and the SVD of the small core R1 R2^T: D's singular
    values and vectors without forming or decomposing the dense d_out x d_in matrix (the same
    decomposition up to rounding and the sign of each singular pair, which B A does not see)."""
    q1, r1 = torch.linalg.qr(U)
    q2, r2 = torch.linalg.qr(V.T)
    u, sv, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    root = sv[:rank].sqrt()
    return (q1 @ u[:, :rank]) * root, root[:, None] * (vh[:rank] @ q2.T)


# -- server optimizers (Reddi et al., 2021): treat Delta = aggregate - global as a pseudo-gradient ---

class FedAvgM:
    """Server momentum (Hsu et al., 2019): v = beta v + Delta;  x = x + lr v."""

    def __init__(self, lr: float = 1.0, momentum: float = 0.9):
        self.lr, self.momentum, self.velocity = lr, momentum, None

    def step(self, global_state: dict, aggregate: dict) -> State:
        delta = {k: aggregate[k] - global_state[k] for k in global_state}
        if self.velocity is None:
            self.velocity = {k: torch.zeros_like(v) for k, v in delta.items()}
        out = OrderedDict()
        for k in global_state:
            self.velocity[k] = self.momentum * self.velocity[k] + delta[k]
            out[k] = global_state[k] + self.lr * self.velocity[k]
        return out


class FedAdam:
    """FedAdam (Reddi et al., 2021): m = b1 m + (1-b1) Delta;  v = b2 v + (1-b2) Delta^2;
    x = x + lr m / (sqrt(v) + tau). No bias correction, as in the paper."""

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m = self.v = None

    def step(self, global_state: dict, aggregate: dict) -> State:
        delta = {k: aggregate[k] - global_state[k] for k in global_state}
        if self.m is None:
            self.m = {k: torch.zeros_like(d) for k, d in delta.items()}
            self.v = {k: torch.zeros_like(d) for k, d in delta.items()}
        out = OrderedDict()
        for k in global_state:
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * delta[k]
            self.v[k] = self.beta2 * self.v[k] + (1 - self.beta2) * delta[k] ** 2
            out[k] = global_state[k] + self.lr * self.m[k] / (self.v[k].sqrt() + self.tau)
        return out


# -- the registry: fl.aggregator names -> a rule `(states, weights, fl_cfg) -> state` --------------------
# Facts: `server_optimizer` (fl_cfg -> optimizer applied to the rule's output, or absent), `robust` (the rule
# bounds the influence of a few arbitrary states), `weighted` (it uses the sample counts).
from fedbench.registry import AGGREGATORS  # noqa: E402


@AGGREGATORS.register("fedavg", weighted=True, robust=False)
def fedavg_rule(states, weights, fl_cfg):
    """FedAvg: the sample-weighted mean of the states."""
    return fedavg(states, weights)


AGGREGATORS.register("fedavgm", fedavg_rule, weighted=True, robust=False,
                     server_optimizer=lambda fl: FedAvgM(fl.server_lr, fl.server_momentum),
                     doc="FedAvgM: FedAvg then server momentum on the pseudo-gradient (Hsu et al. 2019)")
AGGREGATORS.register("fedadam", fedavg_rule, weighted=True, robust=False,
                     server_optimizer=lambda fl: FedAdam(fl.server_lr, fl.server_momentum, fl.server_beta2,
                                                         fl.server_eps),
                     doc="FedAdam: FedAvg then Adam on the pseudo-gradient (Reddi et al. 2021)")


@AGGREGATORS.register("median", weighted=False, robust=True)
def median_rule(states, weights, fl_cfg):
    """Coordinate-wise median (Yin et al. 2018), unweighted."""
    return coordinate_median(states)


@AGGREGATORS.register("trimmed_mean", weighted=False, robust=True)
def trimmed_mean_rule(states, weights, fl_cfg):
    """Coordinate-wise trimmed mean cutting fl.trim_ratio at each end (Yin et al. 2018), unweighted."""
    return trimmed_mean(states, trim_ratio=fl_cfg.trim_ratio)


# Byzantine-robust rules (fedbench.merging.robust): they need f = fl.num_malicious and enough clients per round
from fedbench.merging import robust as _robust  # noqa: E402


class TooFewUpdates(ValueError):
    """A robust rule got fewer updates than it needs for its f (dropout or the guard thinned the round)."""


def _enough(rule: str, states, f: int, minimum: int) -> None:
    if len(states) < minimum:
        raise TooFewUpdates(f"{rule} needs >= {minimum} updates for fl.num_malicious={f}, the round has {len(states)}")


def _check_byzantine(rule: str, minimum: Callable[[int], int]):
    def check(cfg) -> None:
        from fedbench.errors import ConfigError
        n, f = cfg.cohort_size(), cfg.fl.num_malicious
        if n < minimum(f):
            raise ConfigError("fl.num_malicious", f, f"a value with at least {minimum(f)} clients per round for "
                              f"fl.aggregator={rule!r} (the round samples {n}); lower it or sample more clients")
    return check


@AGGREGATORS.register("krum", weighted=False, robust=True, check=_check_byzantine("krum", lambda f: 2 * f + 3))
def krum_rule(states, weights, fl_cfg):
    """Krum (Blanchard et al. 2017): the state closest to its n - f - 2 nearest neighbours."""
    _enough("krum", states, fl_cfg.num_malicious, 2 * fl_cfg.num_malicious + 3)
    return _robust.krum(states, num_malicious=fl_cfg.num_malicious)


def _check_multi_krum(cfg) -> None:
    _check_byzantine("multi_krum", lambda f: 2 * f + 3)(cfg)
    keep, n = cfg.fl.multi_krum_keep, cfg.cohort_size()
    if keep is not None and keep > n:      # averaging more states than a round has would silently keep all
        from fedbench.errors import ConfigError
        raise ConfigError("fl.multi_krum_keep", keep, f"at most the {n} clients a round samples (or null for n - f)")


@AGGREGATORS.register("multi_krum", weighted=True, robust=True, check=_check_multi_krum)
def multi_krum_rule(states, weights, fl_cfg):
    """Multi-Krum: the sample-weighted mean of the m best Krum scores (m = fl.multi_krum_keep, or n - f)."""
    keep = fl_cfg.multi_krum_keep
    _enough("multi_krum", states, fl_cfg.num_malicious, 2 * fl_cfg.num_malicious + 3)
    return _robust.multi_krum(states, weights, num_malicious=fl_cfg.num_malicious,
                              num_selected=None if keep is None else min(keep, len(states)))


@AGGREGATORS.register("bulyan", weighted=False, robust=True, check=_check_byzantine("bulyan", lambda f: 4 * f + 3))
def bulyan_rule(states, weights, fl_cfg):
    """Bulyan (El Mhamdi et al. 2018): iterated Krum, then a coordinate-wise trimmed mean around the median."""
    _enough("bulyan", states, fl_cfg.num_malicious, 4 * fl_cfg.num_malicious + 3)
    return _robust.bulyan(states, num_malicious=fl_cfg.num_malicious)
