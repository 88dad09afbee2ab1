"""FedSA-LoRA (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in Federated Learning"):
the A factors learn what is general and are shared (sent, averaged); the B factors learn what is client-specific
and stay on the client (kept in its client store between rounds, never sent). Everything else that trains (the
classifier head) is shared like A. The global model's B stays at its initialisation; evaluation is personalised,
as in the paper: every client scores the test examples with the shared A and head and its own B
(``FederatedRun.evaluate_clients``, on the client's node under Flower), and the record is the mean over clients.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

from fedbench.errors import ConfigError
from fedbench.fl import FedAvg, GlobalModel
from fedbench.fl.strategy import check_lora_semantics, has_lora_factors
from fedbench.registry import STRATEGIES

STORE_KEY = "fedsa_b"       # each client's own B factors in its store


def check_fedsa(cfg) -> None:
    if not has_lora_factors(cfg.peft.method):
        raise ConfigError("fl.strategy", "fedsa_lora", f"a LoRA tuner (peft.method={cfg.peft.method!r} has no factors)")
    if cfg.fl.lora_aggregation != "factors":
        raise ConfigError("fl.lora_aggregation", cfg.fl.lora_aggregation,
                          "'factors' with fl.strategy='fedsa_lora' (only A is averaged; B never travels)")
    check_lora_semantics(cfg)


@STRATEGIES.register("fedsa_lora", check=check_fedsa)
class FedSALoRA(FedAvg):
    """FedSA-LoRA: A (and the head) shared and averaged; each client's B private, kept in its store."""

    def initial_model(self, model):
        gm = super().initial_model(model)
        # a client's B before its first round: the seeded initialisation every client builds from the config
        self.initial_b = OrderedDict((m.b_key, gm.state[m.b_key].clone()) for m in self.lora.modules)
        return gm

    def configure_round(self, round_idx, clients, global_model):
        shared = tuple(k for k in global_model.state if k not in self.initial_b)
        down = GlobalModel(OrderedDict((k, global_model.state[k]) for k in shared), global_model.base_delta)
        return [self.instruction(int(c), round_idx, down, send_keys=shared) for c in clients]

    def client_update(self, run, ins, store):
        private = store.get(STORE_KEY) or self.initial_b
        full = OrderedDict(ins.state)
        full.update((k, private[k]) for k in self.initial_b)
        # train everything with the client's own B, keep the trained B, send only the shared keys
        update = super().client_update(run, dataclasses.replace(ins, state=full, send_keys=None), store)
        store[STORE_KEY] = OrderedDict((k, update.state[k]) for k in self.initial_b)
        update.state = OrderedDict((k, update.state[k]) for k in ins.send_keys)
        return update

    def evaluate(self, run, global_model, predictions: bool = False):
        return run.evaluate_clients(global_model)

    def client_evaluate(self, run, client_id, global_model, store):
        """The shared part of the global model with this client's own B (the initial B before its first round)."""
        private = store.get(STORE_KEY) or self.initial_b
        state = OrderedDict((k, private[k] if k in self.initial_b else v) for k, v in global_model.state.items())
        return run.evaluate_model(GlobalModel(state, global_model.base_delta))
