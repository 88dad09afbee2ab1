"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): clients of different ranks; the server averages the
full products s B_k A_k (the configured rule; FedAvg: weighted by sample counts, as the paper) and re-factorises
the average by SVD, B = U S, A = V^T at the global rank; each client receives the truncation to its own rank,
which is the best rank-r_k approximation of the average (Eckart-Young)."""
from __future__ import annotations

from fedbench.fl.strategy import GlobalModel
from fedbench.merging.lora_family import products, svd_factors
from fedbench.registry import STRATEGIES
from fedbench.strategies.lora_family.ranks import RankOptions, RankTiered, check_family


@STRATEGIES.register("flexlora", check=check_family("flexlora"), options=RankOptions)
class FlexLoRA(RankTiered):
    """FlexLoRA: the average of the full products, SVD-truncated to each client's rank."""

    def combine(self, global_model, updates, round_idx):
        new = super().combine(global_model, updates, round_idx)      # the head (factors replaced below)
        if new is global_model:
            return global_model
        pairs = self.lora.pairs
        mean = self.rule([products(u.state, pairs) for u in updates], [u.num_samples for u in updates], self.fl)
        state = new.state
        for m in self.lora.modules:
            b, a = svd_factors(mean[m.a_key], self.rank)
            state[m.b_key], state[m.a_key] = b.to(state[m.b_key].dtype), a.to(state[m.a_key].dtype)
        return GlobalModel(state, dict(global_model.base_delta))
