"""Strategies beyond plain FedAvg, each a small class on the one loop (see :mod:`fedbench.fl.strategy`).

- ``ffa_lora``: FFA-LoRA (Sun et al., ICLR 2024): A stays at its (shared, seeded) initialisation, only B trains
  and travels, so the server's average of B is the exact average of the products B A. Half the bytes of
  FedIT and, under DP-SGD, half the noise dimension.

- ``task_clients``: task arithmetic read as FedAvg (Tao et al. 2024, arXiv 2411.18607): client t holds task t's
  data, the classifier head is frozen (each task's rows a linear probe fitted on theta_0, never trained, never
  sent), so an update is the change of the shared encoder only: a task vector. Per-client local steps
  (training heterogeneity) come from ``client_steps``.

- ``autofednlp``: AutoFedNLP / FedAdapter's progressive (depth, width) configurator with trial groups and
  equal-time periods (:mod:`fedbench.fl.configurator`).

FL-TAC and its baselines live in :mod:`fedbench.fl.task_clusters`, the continual protocol and LoRM in
:mod:`fedbench.fl.continual` (each imported at the bottom).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

from dataclasses import dataclass

from fedbench.errors import ConfigError
from fedbench.options import Options, check_per_client
from fedbench.fl.strategy import FedAvg, GlobalModel, check_lora_semantics, has_lora_factors
from fedbench.registry import STRATEGIES


def _needs_lora(name: str):
    def check(cfg) -> None:
        if not has_lora_factors(cfg.peft.method):
            raise ConfigError("fl.strategy", name, f"a LoRA tuner (peft.method={cfg.peft.method!r} has no factors)")
        if cfg.fl.lora_aggregation != "factors":
            raise ConfigError("fl.lora_aggregation", cfg.fl.lora_aggregation,
                              f"'factors' with fl.strategy={name!r} (it fixes which factor travels)")
        check_lora_semantics(cfg)
    return check


@STRATEGIES.register("ffa_lora", check=_needs_lora("ffa_lora"))
class FFALoRA(FedAvg):
    """FFA-LoRA: A fixed at its seeded initialisation (never sent); B and the head train and travel."""

    def initial_model(self, model):
        gm = super().initial_model(model)
        # every client builds the same initial model from the config's seed, so A needs no transfer
        self.frozen_a = OrderedDict((m.a_key, gm.state[m.a_key].clone()) for m in self.lora.modules)
        return gm

    def configure_round(self, round_idx, clients, global_model):
        keys = tuple(k for k in global_model.state if k not in self.frozen_a)
        down = OrderedDict((k, global_model.state[k]) for k in keys)
        return [self.instruction(int(c), round_idx, GlobalModel(down, global_model.base_delta),
                                 train_keys=keys, send_keys=keys) for c in clients]

    def client_update(self, run, ins, store):
        ins.state = OrderedDict((k, ins.state[k] if k in ins.state else self.frozen_a[k])
                                for k in [*ins.state, *self.frozen_a])
        return super().client_update(run, ins, store)


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


# the continual protocol (fresh factors per task, running mean of the tasks' products) and LoRM
from fedbench.fl import continual  # noqa: E402,F401  (registers continual, lorm, regmean)
# FL-TAC: per-task adapters clustered on the server, and its baselines
from fedbench.fl import task_clusters  # noqa: E402,F401  (registers fl_tac, fl_tac_oracle, fl_tac_local, fedit_tasks)
# AutoFedNLP's progressive configurator (trial groups, equal-time periods)
from fedbench.fl import configurator  # noqa: E402,F401  (registers autofednlp)
