"""The server's step: from the clients' updates to the next global model.

:class:`Strategy` holds what a server keeps between rounds (server-optimizer moments, the dense
updates folded into the frozen base) and applies the configured rule from
:mod:`fedbench.fl.aggregators`. It does not drive rounds; the in-process loop or Flower's ServerApp
calls :meth:`Strategy.aggregate`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from fedbench.fl import aggregators as agg
from fedbench.models.state import state_nbytes


@dataclass
class GlobalModel:
    """What every client starts a round from."""
    state: "OrderedDict[str, torch.Tensor]"               # trainable tensors
    base_delta: dict = field(default_factory=dict)       # dense updates folded into frozen base weights


@dataclass
class LoraLayout:
    """Where the LoRA factors sit in a state (from :func:`fedbench.models.lora_modules`)."""
    modules: list                    # list of LoraModuleInfo

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(m.a_key, m.b_key) for m in self.modules]

    @property
    def factor_keys(self) -> set[str]:
        return {k for m in self.modules for k in (m.a_key, m.b_key)}


class Strategy:
    """Aggregation rule + LoRA semantics + server optimizer, as configured by a FLConfig."""

    def __init__(self, fl_cfg, lora: LoraLayout | None = None, lora_rank: int | None = None, seed: int = 0):
        self.cfg, self.lora, self.rank, self.seed = fl_cfg, lora, lora_rank, seed
        self.optimizer = None
        if fl_cfg.aggregator == "fedavgm":
            self.optimizer = agg.FedAvgM(fl_cfg.server_lr, fl_cfg.server_momentum)
        elif fl_cfg.aggregator == "fedadam":
            self.optimizer = agg.FedAdam(fl_cfg.server_lr, fl_cfg.server_momentum, fl_cfg.server_beta2,
                                         fl_cfg.server_eps)

    def combine(self, states: list[dict], weights: list[float]) -> OrderedDict:
        """The plain aggregate of the states (before any server optimizer)."""
        if self.cfg.aggregator == "median":
            return agg.coordinate_median(states)
        if self.cfg.aggregator == "trimmed_mean":
            return agg.trimmed_mean(states, trim_ratio=self.cfg.trim_ratio)
        return agg.fedavg(states, weights)

    def aggregate(self, global_model: GlobalModel, updates: list, round_idx: int) -> tuple[GlobalModel, int]:
        """New global model and the bytes the server sends each client next round."""
        if not updates:   # every sampled client dropped out: nothing changes
            return global_model, state_nbytes(global_model.state)
        states = [u.state for u in updates]
        weights = [u.num_samples for u in updates]
        semantics = self.cfg.lora_aggregation if self.lora and self.lora.modules else "factors"
        new_state = self.combine(states, weights)
        if self.optimizer is not None:
            new_state = self.optimizer.step(global_model.state, new_state)
        base_delta = dict(global_model.base_delta)
        down_bytes = state_nbytes(new_state)
        if semantics == "svd":
            new_state.update(agg.lora_svd(states, weights, self.lora.pairs, self.rank))
        elif semantics == "stack":
            stacked = agg.lora_stack(states, weights, self.lora.pairs)
            down_bytes = sum(t.numel() * t.element_size() for k, t in new_state.items()
                             if k not in self.lora.factor_keys)
            for i, m in enumerate(self.lora.modules):
                b_stack, a_stack = stacked[m.a_key]
                down_bytes += state_nbytes({"a": a_stack, "b": b_stack})
                dense = m.scaling * (b_stack @ a_stack)
                base_delta[m.base_key] = base_delta.get(m.base_key, 0) + dense
                # the product now lives in the base weight: restart the factors as peft initialises them
                new_state[m.a_key], new_state[m.b_key] = self._fresh_factors(global_model.state, m, i, round_idx)
        return GlobalModel(new_state, base_delta), down_bytes

    def _fresh_factors(self, state, m, module_idx, round_idx):
        from fedbench.fl.seeding import derive_seed
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "server", round_idx, module_idx))
        a = torch.empty_like(state[m.a_key])
        # peft's default: kaiming_uniform_(a=sqrt(5)) for A, zeros for B
        bound = 1.0 / math.sqrt(a.shape[1])
        a.uniform_(-bound, bound, generator=gen)
        return a, torch.zeros_like(state[m.b_key])
