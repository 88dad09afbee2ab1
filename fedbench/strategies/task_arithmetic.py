"""Task arithmetic read as FedAvg (Tao et al. 2024, arXiv 2411.18607) on the one loop: ``task_clients``.

Client t holds task t's data, the classifier head is frozen (each task's rows a linear probe fitted on theta_0,
never trained, never sent), so an update is the change of the shared encoder only: a task vector. Per-client
local steps and learning rates (training heterogeneity, the lr search) are the strategy's options
(:class:`TaskClientsOptions`).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

from fedbench.errors import ConfigError
from fedbench.fl.strategy import FedAvg, GlobalModel, check_lora_semantics
from fedbench.options import Options, check_per_client
from fedbench.registry import STRATEGIES

HEAD_PREFIX = "classifier."


@dataclass(frozen=True)
class TaskClientsOptions(Options):
    """Per-client overrides, one entry per client (None: the run's ``train.local_steps`` / ``train.lr``): the
    training-heterogeneity settings of task arithmetic (tasks fine-tuned for different numbers of steps or at
    different learning rates) and its learning-rate search."""
    client_steps: tuple | None = None
    client_lrs: tuple | None = None

    def validate(self, prefix):
        check_per_client(f"{prefix}.client_steps", self.client_steps,
                         lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
        check_per_client(f"{prefix}.client_lrs", self.client_lrs,
                         lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 10,
                         "a learning rate in (0, 10]")


def _check_task_clients(cfg) -> None:
    check_lora_semantics(cfg)
    for key in ("client_steps", "client_lrs"):
        v = cfg.fl.options.get(key)
        if v is not None and len(v) != cfg.data.num_clients:
            raise ConfigError(f"fl.options.{key}", v, f"one entry per client (data.num_clients="
                                                      f"{cfg.data.num_clients})")


@STRATEGIES.register("task_clients", check=_check_task_clients, options=TaskClientsOptions)
class TaskClients(FedAvg):
    """One client per task, heads frozen: only the shared encoder's trainable tensors train and travel.

    ``fl.options.client_steps`` / ``client_lrs`` (:class:`TaskClientsOptions`) override ``train.local_steps`` /
    ``train.lr`` per client; the lr travels in the instruction's ``options``.
    """

    def encoder_keys(self, global_model) -> tuple[str, ...]:
        return tuple(k for k in global_model.state if not k.startswith(HEAD_PREFIX))

    def configure_round(self, round_idx, clients, global_model):
        keys = self.encoder_keys(global_model)
        down = GlobalModel(OrderedDict((k, global_model.state[k]) for k in keys), global_model.base_delta)
        steps, lrs = self.options.client_steps, self.options.client_lrs
        return [self.instruction(int(c), round_idx, down, train_keys=keys, send_keys=keys,
                                 local_steps=None if steps is None else steps[int(c)],
                                 options={} if lrs is None or lrs[int(c)] is None else {"lr": float(lrs[int(c)])})
                for c in clients]

    def train_config(self, run, ins):
        cfg = super().train_config(run, ins)
        lr = ins.options.get("lr")
        return cfg if lr is None else dataclasses.replace(cfg, lr=float(lr))
