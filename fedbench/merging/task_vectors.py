"""Task vectors and the merges that federated learning reads into them.

A *task vector* is the change fine-tuning made to the shared part of a model (Ilharco et al., 2023):
``tau_t = theta_t - theta_0``, a dict ``{parameter key: tensor}``. With LoRA the shared part is the dense
update ``s * B A`` that each adapter adds to its frozen base weight, keyed by that base weight
(:func:`lora_task_vector`); with full fine-tuning it is the difference of the parameters themselves
(:func:`state_task_vector`).

Every merge below is a small pure function of the task vectors (and its hyperparameters) that returns the
merged task vector ``tau``; the merged model is ``theta_0 + tau``. Tao et al. (2024, arXiv 2411.18607) read
task arithmetic as one round of FedAvg (every "client" is a task trained from theta_0) and carry FL's fixes
over, per coordinate, as in their code:

==================  ==================================================================================
task_arithmetic     tau = lam * sum_t tau_t                          (FedAvg, one round: lam = p_t = 1/T)
weighted_sum        tau = sum_t w_t tau_t
fednova             tau = lam * sum_t ((mean_s steps_s / steps_t) / T) tau_t
fedgma              m = |(1/T) sum_t sign(tau_t)|, m := 1 where m >= rho;  tau = lam * m * sum_t tau_t
median              tau = lam * median_t tau_t                       (coordinate-wise)
cclip               tau = lam * sum_t min(1, rho / ||tau_t||) tau_t  (||.|| over the whole task vector)
ties                trim each tau_t to its top-`density` magnitudes, elect sign(sum_t trimmed_t), mean the
                    agreeing non-zero entries;  tau = lam * that      (Yadav et al., 2023)
dare                drop each entry with probability p, rescale by 1/(1-p); tau = lam * sum_t tau_t'
                    (Yu et al., 2024)
==================  ==================================================================================

Sums accumulate in float64 (as :func:`fedbench.merging.aggregators.fedavg` does) and are cast back, so a merge
with weights 1/T and one FedAvg round of the same vectors agree to float32 rounding.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch

from fedbench.errors import ConfigError
from fedbench.merging import aggregators as agg

TaskVector = "OrderedDict[str, torch.Tensor]"


# -- task vectors from trainable states ------------------------------------------------------------

def lora_task_vector(state: dict, modules, init_state: dict | None = None) -> TaskVector:
    """Dense LoRA task vector: ``{base_key: s (B A - B_0 A_0)}`` for every LoRA-wrapped layer.

    `modules` is :func:`fedbench.models.lora_modules` of the model. peft starts B at zero, so without
    `init_state` (or with the usual init) this is the product ``s B A`` that the adapter adds to W_0.
    """
    from fedbench.models import lora_delta
    out = OrderedDict()
    for m in modules:
        delta = lora_delta(state, m)
        if init_state is not None:
            delta = delta - lora_delta(init_state, m)
        out[m.base_key] = delta
    return out


def state_task_vector(state: dict, init_state: dict, keys: Sequence[str] | None = None) -> TaskVector:
    """``{k: state[k] - init_state[k]}`` over `keys` (default: every key of `init_state`)."""
    keys = list(init_state) if keys is None else list(keys)
    return OrderedDict((k, state[k] - init_state[k]) for k in keys)


# -- geometry --------------------------------------------------------------------------------------

def _check_vectors(tvs: Sequence[dict]) -> list[str]:
    if len(tvs) == 0:
        raise ConfigError("task_vectors", tvs, "at least one task vector")
    keys = list(tvs[0])
    for i, tv in enumerate(tvs[1:], start=1):
        if list(tv) != keys or any(tv[k].shape != tvs[0][k].shape for k in keys):
            raise ConfigError(f"task_vectors[{i}]", sorted(tv)[:3],
                              f"the same keys and shapes as task_vectors[0]: {keys[:3]}...")
    return keys


def flatten(tv: dict) -> torch.Tensor:
    """All entries of a task vector as one 1-D tensor, in key order."""
    return torch.cat([v.reshape(-1) for v in tv.values()])


def unflatten(vec: torch.Tensor, like: dict) -> TaskVector:
    out, pos = OrderedDict(), 0
    for k, v in like.items():
        out[k] = vec[pos:pos + v.numel()].reshape(v.shape).to(v.dtype)
        pos += v.numel()
    return out


def norm(tv: dict) -> float:
    """Euclidean norm of the whole task vector (all keys together)."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in tv.values()))


def cosine_similarity(a: dict, b: dict) -> float:
    """cos(tau_a, tau_b) over the whole flattened task vectors (float64)."""
    _check_vectors([a, b])
    fa, fb = flatten(a).double(), flatten(b).double()
    denom = fa.norm() * fb.norm()
    return float(fa @ fb / denom) if denom > 0 else float("nan")


def cosine_matrix(tvs: Sequence[dict]):
    """T x T numpy array of pairwise cosine similarities."""
    import numpy as np
    _check_vectors(tvs)
    flat = torch.stack([flatten(tv).double() for tv in tvs])
    unit = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-300)
    return (unit @ unit.T).numpy().astype(np.float64)


# -- merges ----------------------------------------------------------------------------------------

def _check_number(name: str, value, low: float, high: float, low_open=False, high_open=False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(name, value, f"a number in {lo}{low}, {high}{hi}")
    return float(value)


def _lam(lam) -> float:
    return _check_number("lam", lam, 0, math.inf, high_open=True)


def weighted_sum(tvs: Sequence[dict], weights: Sequence[float]) -> TaskVector:
    """tau = sum_t w_t tau_t (float64 accumulation)."""
    keys = _check_vectors(tvs)
    if len(weights) != len(tvs):
        raise ConfigError("weights", list(weights), f"one weight per task vector ({len(tvs)})")
    out = OrderedDict()
    for k in keys:
        acc = sum(float(w) * tv[k].double() for w, tv in zip(weights, tvs))
        out[k] = acc.to(tvs[0][k].dtype)
    return out


def task_arithmetic(tvs: Sequence[dict], lam: float) -> TaskVector:
    """Task arithmetic (Ilharco et al., 2023): tau = lam * sum_t tau_t.

    With lam = 1/T this is one FedAvg round with equal weights (each task a client trained from theta_0).
    """
    lam = _lam(lam)
    return weighted_sum(tvs, [lam] * len(tvs))


def fednova(tvs: Sequence[dict], steps: Sequence[int], lam: float = 1.0) -> TaskVector:
    """FedNova as a merge (Wang et al., 2020; Tao et al.'s code): tau = lam * sum_t a_t tau_t with
    a_t = (mean(steps) / steps_t) / T, so a task trained twice as long counts half as much."""
    lam = _lam(lam)
    if len(steps) != len(tvs) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps):
        raise ConfigError("steps", list(steps), f"one integer >= 1 per task vector ({len(tvs)})")
    mean = sum(steps) / len(steps)
    return weighted_sum(tvs, [lam * (mean / s) / len(tvs) for s in steps])


def fedgma(tvs: Sequence[dict], rho: float, lam: float = 1.0) -> TaskVector:
    """FedGMA (Tenison et al., 2022) as a merge: sign-agreement mask on the summed task vectors.

    m = |(1/T) sum_t sign(tau_t)| per coordinate; where m >= rho it is set to 1; tau = lam * m * sum_t tau_t.
    rho = 0 gives task arithmetic; rho = 1 keeps the raw agreement m as the mask.
    """
    rho, lam = _check_number("rho", rho, 0, 1), _lam(lam)
    keys = _check_vectors(tvs)
    out = OrderedDict()
    for k in keys:
        stack = torch.stack([tv[k].double() for tv in tvs])
        mask = torch.sign(stack).mean(0).abs()
        mask = torch.where(mask >= rho, torch.ones_like(mask), mask)
        out[k] = (lam * mask * stack.sum(0)).to(tvs[0][k].dtype)
    return out


def median(tvs: Sequence[dict], lam: float = 1.0) -> TaskVector:
    """Coordinate-wise median of the task vectors (Yin et al., 2018), scaled: tau = lam * median_t tau_t.

    Uses :func:`fedbench.merging.aggregators.coordinate_median`: for an even number of tasks the mean of the
    two middle values (Tao et al.'s code takes torch.median, the lower one).
    """
    lam = _lam(lam)
    _check_vectors(tvs)
    med = agg.coordinate_median(tvs)
    return OrderedDict((k, (lam * v.double()).to(v.dtype)) for k, v in med.items())


def cclip(tvs: Sequence[dict], rho: float, lam: float = 1.0) -> TaskVector:
    """Centered clipping (Karimireddy et al., 2021) around theta_0, one step, as in Tao et al.'s code:
    tau = lam * sum_t min(1, rho / ||tau_t||) tau_t, the norm taken over the whole task vector."""
    rho, lam = _check_number("rho", rho, 0, math.inf, low_open=True, high_open=True), _lam(lam)
    _check_vectors(tvs)
    norms = [norm(tv) for tv in tvs]
    return weighted_sum(tvs, [lam * (min(1.0, rho / n) if n > 0 else 1.0) for n in norms])


def ties(tvs: Sequence[dict], density: float = 0.2, lam: float = 1.0) -> TaskVector:
    """TIES-merging (Yadav et al., 2023).

    1. trim: keep the k = round(density * n) largest-magnitude entries of each tau_t (over the whole
       flattened vector), zero the rest;
    2. elect: gamma = sign(sum_t trimmed_t) per coordinate;
    3. disjoint mean: average, per coordinate, the trimmed entries whose sign equals gamma (non-zero);
    tau = lam * that.
    """
    density, lam = _check_number("density", density, 0, 1, low_open=True), _lam(lam)
    _check_vectors(tvs)
    flat = torch.stack([flatten(tv) for tv in tvs])            # T x n, the vectors' dtype
    k = max(1, int(round(density * flat.shape[1])))
    trimmed = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        idx = flat[t].abs().topk(k, sorted=False).indices
        trimmed[t, idx] = flat[t, idx]
    # task by task, so that a full-model merge never holds a T x n float64 copy
    elected = torch.sign(sum(row.double() for row in trimmed))
    total = torch.zeros(flat.shape[1], dtype=torch.float64)
    count = torch.zeros(flat.shape[1], dtype=torch.float64)
    for row in trimmed:
        agree = (torch.sign(row) == elected) & (row != 0)
        total += torch.where(agree, row.double(), 0.0)
        count += agree
    merged = total / count.clamp(min=1)
    return unflatten(lam * merged, tvs[0])


def dare(tvs: Sequence[dict], drop: float = 0.5, lam: float = 1.0, seed: int = 0) -> TaskVector:
    """DARE (Yu et al., 2024) + task arithmetic: each entry of each tau_t is dropped with probability
    `drop` and the survivors rescaled by 1 / (1 - drop), so E[tau_t'] = tau_t; tau = lam * sum_t tau_t'.
    The masks come from a private generator seeded by `seed` (task by task, key by key)."""
    drop, lam = _check_number("drop", drop, 0, 1, high_open=True), _lam(lam)
    keys = _check_vectors(tvs)
    gen = torch.Generator().manual_seed(int(seed))
    rescaled = []
    for tv in tvs:
        out = OrderedDict()
        for k in keys:
            keep = torch.rand(tv[k].shape, generator=gen, dtype=torch.float64) >= drop
            out[k] = (tv[k].double() * keep / (1.0 - drop)).to(tv[k].dtype)
        rescaled.append(out)
    return task_arithmetic(rescaled, lam)


# -- the registry: merge names -> functions; `search` names the hyper-parameter besides the scale lambda -----
from fedbench.registry import MERGES  # noqa: E402

MERGES.register("task_arithmetic", task_arithmetic, scale="sum", search=None)
MERGES.register("fednova", fednova, scale="mean", search=None)
MERGES.register("fedgma", fedgma, scale="sum", search="rho")
MERGES.register("median", median, scale="mean", search=None)
MERGES.register("cclip", cclip, scale="sum", search="rho")
MERGES.register("ties", ties, scale="mean", search="density")
MERGES.register("dare", dare, scale="sum", search="drop")
