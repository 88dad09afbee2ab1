"""SCAFFOLD (Karimireddy et al., ICML 2020), option II, on fedbench's loop.

Server: the state x and a control variate c (one tensor per trainable tensor, zeros at first). Client i keeps
its own c_i (zeros at first) in its client store. A round:

1. the server sends x and c (c through the instruction's ``extras``: a down channel beside the state);
2. client i runs K local SGD steps y <- y - lr (g_i(y) + c - c_i) (the correction is a :class:`TrainingHook`
   on the gradient), then c_i+ = c_i - c + (x - y) / (K lr), and sends y and delta c_i = c_i+ - c_i (the
   update's ``extras``);
3. the server takes x <- x + eta_g (rule(y_i) - x) (the configured rule, FedAvg by default, with SCAFFOLD's
   own server learning rate eta_g = ``fl.options.server_lr``) and c <- c + (1/N) sum_{i in S} delta c_i.

Plain SGD only (the c_i+ formula assumes it), and no DP-SGD (its per-sample clipping would clip the corrected
gradient's task part only and the noise would swamp the control variates: ``dp_compatible=False``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from fedbench.errors import ConfigError
from fedbench.fl import FedAvg, GlobalModel
from fedbench.fl.client import TrainingHook
from fedbench.fl.strategy import check_lora_semantics
from fedbench.options import Options, check_number
from fedbench.registry import AGGREGATORS, STRATEGIES

STORE_KEY = "scaffold_c"     # each client's control variate c_i in its store


@dataclass(frozen=True)
class ScaffoldOptions(Options):
    """SCAFFOLD's global (server) learning rate eta_g (1: the rule's output is the next state)."""
    server_lr: float = 1.0

    def validate(self, prefix):
        check_number(f"{prefix}.server_lr", self.server_lr, 0, math.inf, low_open=True, high_open=True)


def check_scaffold(cfg) -> None:
    check_lora_semantics(cfg)
    if cfg.train.optimizer != "sgd" or cfg.train.momentum != 0:
        raise ConfigError("train.optimizer", cfg.train.optimizer, "'sgd' with train.momentum=0 when "
                          "fl.strategy='scaffold' (c_i+ = c_i - c + (x - y) / (K lr) assumes plain SGD steps)")
    if cfg.fl.lora_aggregation != "factors":
        raise ConfigError("fl.lora_aggregation", cfg.fl.lora_aggregation, "'factors' with fl.strategy='scaffold'")
    if AGGREGATORS.entry(cfg.fl.aggregator).facts.get("server_optimizer") is not None:
        raise ConfigError("fl.aggregator", cfg.fl.aggregator, "a rule without a server optimizer with "
                          "fl.strategy='scaffold' (its server step is fl.options.server_lr)")


class ControlVariateCorrection(TrainingHook):
    """g <- g + c - c_i on every trainable tensor (SCAFFOLD's corrected local gradient)."""

    def __init__(self, c: dict, c_i: dict):
        self.correction = {k: c[k] - c_i[k] for k in c}

    def grad(self, model) -> None:
        for name, p in model.named_parameters():
            if p.grad is not None and name in self.correction:
                p.grad.add_(self.correction[name])


@STRATEGIES.register("scaffold", check=check_scaffold, options=ScaffoldOptions, sends_extras=True,
                     dp_compatible=False, requires={"train.optimizer": "sgd"})
class Scaffold(FedAvg):
    """SCAFFOLD: control variates (down channel) correct each client's drift (training hook)."""

    def initial_model(self, model):
        gm = super().initial_model(model)
        self.c = OrderedDict((k, torch.zeros_like(v)) for k, v in gm.state.items())
        return gm

    def configure_round(self, round_idx, clients, global_model):
        return [self.instruction(int(c), round_idx, global_model, extras=self.c) for c in clients]

    # -- client side ------------------------------------------------------------------------------
    def client_control(self, ins, store) -> dict:
        return store.get(STORE_KEY) or OrderedDict((k, torch.zeros_like(v)) for k, v in ins.extras.items())

    def training_hook(self, run, ins, store):
        return ControlVariateCorrection(ins.extras, self.client_control(ins, store))

    def client_update(self, run, ins, store):
        c_i = self.client_control(ins, store)
        update = super().client_update(run, ins, store)
        c, lr, steps = ins.extras, self.train_config(run, ins).lr, update.num_steps
        c_new = OrderedDict((k, c_i[k] - c[k] + (ins.state[k] - update.state[k]) / (steps * lr)) for k in c)
        update.extras = OrderedDict((k, c_new[k] - c_i[k]) for k in c)
        store[STORE_KEY] = c_new
        return update

    # -- server side ------------------------------------------------------------------------------
    def aggregate(self, global_model, updates, round_idx):
        if not updates:
            return global_model
        combined = super().aggregate(global_model, updates, round_idx)
        eta = self.options.server_lr
        state = OrderedDict((k, x + eta * (combined.state[k] - x)) for k, x in global_model.state.items())
        n = self.cfg.data.num_clients
        self.c = OrderedDict((k, v + sum(u.extras[k] for u in updates) / n) for k, v in self.c.items())
        return GlobalModel(state, combined.base_delta, combined.down_bytes)

    def state_dict(self):
        tensors, meta = super().state_dict()
        tensors.update({f"scaffold_c/{k}": v for k, v in self.c.items()})
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        super().load_state_dict(tensors, meta)
        self.c = OrderedDict((k, tensors[f"scaffold_c/{k}"]) for k in self.c)
