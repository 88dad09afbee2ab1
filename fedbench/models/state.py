"""The trainable state of a client: a flat, ordered dict of tensors, and its exact size on the wire."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def trainable_state(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Detached CPU copies of every trainable parameter, in the model's parameter order (a model on a GPU hands
    its state to the CPU side: aggregation, the client store, checkpoints, engines)."""
    return OrderedDict((n, p.detach().to("cpu", copy=True)) for n, p in model.named_parameters() if p.requires_grad)


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict) -> None:
    """Copy `state` into the model's trainable parameters; every key must be one of them."""
    params = dict(model.named_parameters())
    missing = [k for k, p in params.items() if p.requires_grad and k not in state]
    unknown = [k for k in state if k not in params]
    if unknown or missing:
        raise KeyError(f"state does not match the model's trainable parameters: unknown={unknown[:3]}, "
                       f"missing={missing[:3]}")
    for k, v in state.items():
        params[k].copy_(v)


def state_nbytes(state: dict) -> int:
    """Exact bytes of the tensors' payload (what travels; framing overhead excluded)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def state_numel(state: dict) -> int:
    return int(sum(t.numel() for t in state.values()))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def embed_leading(small: torch.Tensor, template: torch.Tensor, zero_new_dims: tuple[int, ...] = ()) -> torch.Tensor:
    """`template` with `small` written into its leading block (``out[:a, :b] = small``).

    Growing a bottleneck (or a LoRA rank) keeps the trained units as the first ones. Along the dimensions
    listed in `zero_new_dims` the new entries are set to zero (rather than kept from the template): those
    are the ones through which the new units reach the output, so the grown module computes exactly the
    same function as the small one.
    """
    if small.dim() != template.dim() or any(s > t for s, t in zip(small.shape, template.shape)):
        raise ValueError(f"cannot embed a tensor of shape {tuple(small.shape)} into {tuple(template.shape)}")
    out = template.detach().clone()
    for dim in zero_new_dims:
        out.narrow(dim, small.shape[dim], out.shape[dim] - small.shape[dim]).zero_()
    out[tuple(slice(0, s) for s in small.shape)] = small
    return out


def grow_state(state: dict, template: dict, zero_new: dict[str, tuple[int, ...]]) -> "OrderedDict[str, torch.Tensor]":
    """A trainable state in the layout of `template` (a larger configuration's initial state) carrying `state`.

    Keys only in `template` (new layers) keep their initial values; keys in both are embedded with
    :func:`embed_leading`, zeroing the new entries along ``zero_new[suffix]`` for keys ending in ``suffix``.
    Every key of `state` must be in `template` (a configuration only grows).
    """
    lost = [k for k in state if k not in template]
    if lost:
        raise KeyError(f"the larger configuration lacks {lost[:3]}: states only grow")
    out = OrderedDict()
    for key, init in template.items():
        if key not in state:
            out[key] = init.detach().clone()
            continue
        dims = next((d for suffix, d in zero_new.items() if key.endswith(suffix)), ())
        out[key] = embed_leading(state[key], init, dims)
    return out
