"""FedEx-LoRA (Singhal et al., ACL 2025, arXiv 2410.09432): FedIT's factor averages plus the residual
s (mean_i B_i A_i - mean(B) mean(A)) folded into the frozen weight, so the global model's update is the exact
average of the clients' products while the factors keep rank r.

The residual's "mean" is the configured rule over the clients' dense products (FedAvg: the sample-weighted mean,
so the aggregate is exact; a robust rule: that rule over the products). What travels down each round is the
factors plus that round's dense residual (d_out x d_in per layer, float32), counted in the bytes; the in-process
simulation hands each client the running sum of residuals as the global model's base update (as FLoRA's stack
does), which is what a client that received every round's residual holds.
"""
from __future__ import annotations

from fedbench.fl.strategy import GlobalModel
from fedbench.merging.lora_family import fedex_residual, products
from fedbench.models.state import state_nbytes
from fedbench.registry import STRATEGIES
from fedbench.strategies.lora_family.ranks import RankOptions, RankTiered, check_family


@STRATEGIES.register("fedex_lora", check=check_family("fedex_lora"), options=RankOptions)
class FedExLoRA(RankTiered):
    """FedEx-LoRA: averaged factors plus the residual of the product average folded into the frozen weight."""

    def combine(self, global_model, updates, round_idx):
        new = super().combine(global_model, updates, round_idx)
        if new is global_model:        # nothing to aggregate (every client dropped, or too few for the rule)
            return global_model
        pairs = self.lora.pairs
        mean = self.rule([products(u.state, pairs) for u in updates], [u.num_samples for u in updates], self.fl)
        base_delta, residual_bytes = dict(new.base_delta), 0
        for m in self.lora.modules:
            res = m.scaling * fedex_residual(mean[m.a_key], new.state[m.b_key], new.state[m.a_key])
            res = res.to(new.state[m.a_key].dtype)
            base_delta[m.base_key] = base_delta.get(m.base_key, 0) + res
            residual_bytes += state_nbytes({"r": res})
        return GlobalModel(new.state, base_delta, state_nbytes(new.state) + residual_bytes)
