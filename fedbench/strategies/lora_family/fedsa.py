"""FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463): A learns what is general and is shared (sent and
averaged, zero-padded across rank tiers); each client's B learns what is client-specific and stays in its client
store at the client's own rank (never sent). The head is shared like A. Evaluation is personalised, as in the
paper: each client scores the test examples with the shared A and head and its own B, and the record is the mean
over clients. (The same idea as the test plugin ``fedsa_lora`` in tests/plugins/fedbench_extra, which stays an
example of outside code; this one lives in core and takes rank tiers; the two agree at equal ranks.)
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

from fedbench.fl.strategy import GlobalModel
from fedbench.merging.lora_family import pad_factors, truncate_factors
from fedbench.registry import STRATEGIES
from fedbench.strategies.lora_family.ranks import RankOptions, RankTiered, check_family

STORE_KEY = "fedsa_b"       # the client's own B factors (at its rank) in its store


# evaluation: what the experiments report as its accuracy (personalised: the mean over clients' own models)
@STRATEGIES.register("fedsa", check=check_family("fedsa"), options=RankOptions, evaluation="personalised")
class FedSA(RankTiered):
    """FedSA-LoRA: A (and the head) shared and averaged; each client's B private, kept in its store."""

    def initial_model(self, model):
        gm = super().initial_model(model)
        # a client's B before its first round: the seeded initialisation every client builds from the config
        self.initial_b = OrderedDict((m.b_key, gm.state[m.b_key].clone()) for m in self.lora.modules)
        return gm

    def shared_keys(self, state) -> tuple:
        return tuple(k for k in state if k not in self.initial_b)

    def configure_round(self, round_idx, clients, global_model):
        keys = self.shared_keys(global_model.state)
        return [self.send(int(c), round_idx, global_model, keys=keys, send_keys=keys) for c in clients]

    def own_b(self, store, rank: int) -> dict:
        """This client's B (the initial B at its rank before its first round)."""
        return store.get(STORE_KEY) or truncate_factors(self.initial_b, self.lora.pairs, rank)

    def client_update(self, run, ins, store):
        r = self.received_rank(ins.state)
        full = OrderedDict(ins.state)
        full.update(self.own_b(store, r))
        full = pad_factors(full, self.lora.pairs, self.rank)
        # train everything with the client's own B, keep the trained B, send only the shared keys
        update = self.train(run, dataclasses.replace(ins, state=full, send_keys=None), store)
        trained = truncate_factors(update.state, self.lora.pairs, r)
        store[STORE_KEY] = OrderedDict((k, trained[k]) for k in self.initial_b)
        update.state = OrderedDict((k, trained[k]) for k in ins.send_keys)
        return update

    def evaluate(self, run, global_model, predictions: bool = False):
        return run.evaluate_clients(global_model)

    def client_evaluate(self, run, client_id, global_model, store):
        """The shared part of the global model with this client's own B, zero-padded to the global rank."""
        own = pad_factors(self.own_b(store, self.rank_of(client_id)), self.lora.pairs, self.rank)
        state = OrderedDict((k, own[k] if k in self.initial_b else v) for k, v in global_model.state.items())
        return run.evaluate_model(GlobalModel(state, global_model.base_delta))
