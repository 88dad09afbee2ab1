"""Byzantine clients as pure functions.

An attack changes what an attacking client sends to the server (kind "update"), or the labels it
trains on (kind "data", label flipping). An update attack maps the state the client would honestly
send, ``sent``, and the global state it started from, ``global_state``, to the state it actually
sends. It is written in terms of the update Delta = sent - global. Every update attack takes
``(sent, global_state, generator=None, **params)``, so the loop can call
``spec.fn(sent, global_state, generator=g, **params)`` the same way for all of them.

Conventions: a new ``OrderedDict`` comes back with the keys and dtypes of ``sent``. The arithmetic is
done in float64. Inputs are never modified. Non-floating entries (integer counters such as
BatchNorm's ``num_batches_tracked``, boolean masks) are copied unchanged. Attacking a counter has no
meaning, and noise cannot be added to one.

Which clients attack is fixed for a run: :func:`select_attackers`.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

State = "OrderedDict[str, torch.Tensor]"


def select_attackers(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """The ids of the Byzantine clients: round(fraction * num_clients) distinct ids in
    [0, num_clients), sorted (int64), drawn without replacement from ``np.random.default_rng(seed)``.

    The caller passes a seed derived from the config, so the set is fixed for the whole run.
    ``round`` is Python's, which rounds halves to even (round(2.5) == 2).
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 0:
        raise ValueError(f"num_clients={num_clients!r} must be an integer >= 0")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be a number in [0, 1]")
    k = round(float(fraction) * int(num_clients))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(int(num_clients), size=k, replace=False)).astype(np.int64)


def _check_pair(sent: dict, global_state: dict) -> None:
    missing = [k for k in sent if k not in global_state]
    if missing:
        raise KeyError(f"keys of sent missing from global_state: {missing}")
    for k, v in sent.items():
        if tuple(v.shape) != tuple(global_state[k].shape):
            raise ValueError(f"sent[{k!r}] has shape {tuple(v.shape)}, global_state has {tuple(global_state[k].shape)}")


def _map_update(sent: dict, global_state: dict, new_delta: Callable[[str, torch.Tensor], torch.Tensor]) -> State:
    """global + new_delta(key, Delta) for floating entries (float64 arithmetic), copies otherwise."""
    _check_pair(sent, global_state)
    out = OrderedDict()
    for k, v in sent.items():
        if not v.is_floating_point():
            out[k] = v.detach().clone()
            continue
        g = global_state[k].detach().to(device=v.device, dtype=torch.float64)
        delta = v.detach().to(torch.float64) - g
        out[k] = (g + new_delta(k, delta)).to(v.dtype)
    return out


def no_attack(sent: dict, global_state: dict, generator: torch.Generator | None = None, **_) -> State:
    """The honest client: sends what it trained (a copy)."""
    _check_pair(sent, global_state)
    return OrderedDict((k, v.detach().clone()) for k, v in sent.items())


def nan_update(sent: dict, global_state: dict, generator: torch.Generator | None = None, **_) -> State:
    """A diverged client (a fault, not an attack): every floating value it sends is NaN."""
    _check_pair(sent, global_state)
    return OrderedDict((k, torch.full_like(v, float("nan")) if v.is_floating_point() else v.detach().clone())
                       for k, v in sent.items())


def sign_flip(sent: dict, global_state: dict, generator: torch.Generator | None = None, **_) -> State:
    """Sign flipping: sends global - Delta = 2 global - sent, the update reversed."""
    return _map_update(sent, global_state, lambda k, d: -d)


def scale(sent: dict, global_state: dict, generator: torch.Generator | None = None, factor: float = 10.0,
          **_) -> State:
    """Scaling (boosting) attack: sends global + factor * Delta. factor = -1 is sign flipping;
    factor = n_clients / server_lr is the model-replacement boost of Bagdasaryan et al. (2020)."""
    factor = float(factor)
    return _map_update(sent, global_state, lambda k, d: factor * d)


def gaussian(sent: dict, global_state: dict, generator: torch.Generator, sigma: float = 1.0, **_) -> State:
    """Gaussian attack: throws away the update and sends global + noise, with noise ~ N(0, sigma^2 I).

    This is the zero-mean, fixed-sigma form of the "Gaussian attack" baseline used in
    Byzantine-robustness papers and Flower baselines. Papers differ on the details: some draw
    sigma (or a per-coordinate mean and std) from the benign updates. Set ``sigma`` to the scale of
    real updates, or the attack is trivially detected (or trivially harmless).

    The noise comes only from ``generator``. It is drawn in float64 on ``generator.device``, one
    key after another in the order of ``sent``, so a fixed generator seed gives the same noise
    whatever the parameters' dtype or device.
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator={generator!r} must be a torch.Generator (the noise is drawn only from it)")
    sigma = float(sigma)
    if not sigma >= 0:
        raise ValueError(f"sigma={sigma} must be >= 0")

    def noise(k, d):
        z = torch.randn(d.shape, generator=generator, dtype=torch.float64, device=generator.device)
        return sigma * z.to(d.device)
    return _map_update(sent, global_state, noise)


def label_flip(labels, num_classes: int):
    """Label flipping: y -> num_classes - 1 - y. Returns a new array or tensor of the same type,
    dtype and device. Applying it twice gives back the input.

    Negative labels (ignore indices such as -100) are kept as they are. Labels >= num_classes
    raise ValueError.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 1")
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
        if labels.numel() and int(labels.max()) >= num_classes:
            raise ValueError(f"labels contain {int(labels.max())} >= num_classes={num_classes}")
        return torch.where(labels < 0, labels, num_classes - 1 - labels)
    if isinstance(labels, np.ndarray):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
        if labels.size and int(labels.max()) >= num_classes:
            raise ValueError(f"labels contain {int(labels.max())} >= num_classes={num_classes}")
        return np.where(labels < 0, labels, num_classes - 1 - labels).astype(labels.dtype, copy=False)
    raise TypeError(f"labels must be a torch.Tensor or np.ndarray, got {type(labels).__name__}")


@dataclass(frozen=True)
class AttackSpec:
    """An attack's name, its kind ("update": changes what is sent; "data": changes the training
    labels), its function, and its parameters as ((name, default), ...)."""
    name: str
    kind: str
    fn: Callable
    params: tuple[tuple[str, object], ...] = ()

    def resolve(self, **given) -> dict:
        """The parameters with ``given`` over the defaults. Raises ValueError for unknown names."""
        names = [p for p, _ in self.params]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for attack {self.name!r}; allowed: {names}")
        return {**dict(self.params), **given}


ATTACKS: dict[str, AttackSpec] = {
    "none": AttackSpec("none", "update", no_attack),
    "nan": AttackSpec("nan", "update", nan_update),
    "sign_flip": AttackSpec("sign_flip", "update", sign_flip),
    "scale": AttackSpec("scale", "update", scale, (("factor", 10.0),)),
    "gaussian": AttackSpec("gaussian", "update", gaussian, (("sigma", 1.0),)),
    # num_classes comes from the task, not the attack config: call fn(labels, num_classes)
    "label_flip": AttackSpec("label_flip", "data", label_flip),
}


# -- the registry: fl.attack names; `kind` says whether the attack changes what is sent or the labels -----
from fedbench.registry import ATTACKS as _REGISTRY, first_sentence  # noqa: E402

for _spec in ATTACKS.values():
    _REGISTRY.register(_spec.name, _spec.fn, kind=_spec.kind, params=tuple(p for p, _ in _spec.params),
                       doc=first_sentence(_spec.fn.__doc__) or _spec.name)
