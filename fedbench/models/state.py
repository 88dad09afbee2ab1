"""The trainable state of a client: a flat, ordered dict of tensors, and its exact size on the wire."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def trainable_state(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """Detached copies of every trainable parameter, in the model's parameter order."""
    return OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad)


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
