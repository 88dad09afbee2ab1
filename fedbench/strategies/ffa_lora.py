"""FFA-LoRA (Sun et al., ICLR 2024) on the one loop: A stays at its (shared, seeded) initialisation, only B trains
and travels, so the server's average of B is the exact average of the products B A. Half the bytes of FedIT
and, under DP-SGD, half the noise dimension."""
from __future__ import annotations

from collections import OrderedDict

from fedbench.fl.strategy import FedAvg, GlobalModel, check_lora_factor_strategy
from fedbench.registry import STRATEGIES


def _needs_lora(name: str):
    return lambda cfg: check_lora_factor_strategy(cfg, name, "it fixes which factor travels")


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
