"""Bottleneck adapters (Houlsby et al., 2019), written here rather than taken from AdapterHub.

Why not the `adapters` package: adapters 1.3 pins transformers ~=4.57, while fedbench uses
transformers 5.x with peft 0.21 (and peft has no bottleneck adapter). The module is small:
x -> x + up(act(down(x))), with `up` initialised to zero so a new adapter starts as the identity.
It is placed after the attention output projection and/or after the FFN output projection of the
top `depth` layers, before the residual LayerNorm, as Houlsby et al. place it.
"""
from __future__ import annotations

import torch
from torch import nn


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class LinearWithAdapter(nn.Module):
    """A frozen projection followed by its adapter: y = adapter(dense(x))."""

    def __init__(self, dense: nn.Linear, width: int):
        super().__init__()
        self.dense = dense
        self.adapter = BottleneckAdapter(dense.out_features, width)

    def forward(self, x):
        return self.adapter(self.dense(x))


def apply(model, cfg) -> None:
    from fedbench.models.tuners import top_layers
    for i in top_layers(model.num_layers, cfg.depth):
        for position, (parent, attr) in model.adapter_sites(model.layers[i]).items():
            if position in cfg.adapter_positions:
                setattr(parent, attr, LinearWithAdapter(getattr(parent, attr), cfg.adapter_width))
    for name, p in model.named_parameters():
        p.requires_grad_(".adapter." in name)


def grow_adapter_state(state: dict, template: dict):
    """Carry an adapter state into a deeper and/or wider configuration without changing its function.

    `template` is the larger configuration's initial trainable state. Deeper: adapters of the new layers
    keep their init, whose up-projection is zero (identity). Wider: the w trained bottleneck units become
    the first w of the new width (down rows, down bias, up columns); the new units' down rows keep their
    random init and their up columns are zero, so they add nothing until trained.
    """
    from fedbench.models.state import grow_state
    return grow_state(state, template, {"adapter.up.weight": (1,)})
