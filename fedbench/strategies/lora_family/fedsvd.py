"""FedSVD (arXiv 2505.12805; reference code seanie12/fed-svd): clients train only B (A frozen, as FFA-LoRA, so
DP-SGD's noise enters one factor and is not amplified through the product of two noisy factors); the server
averages B and then re-factorises the product by SVD, B A = U S V^T -> B = U_r S_r, A = V_r^T, every ``period``
rounds. B A is unchanged (its inner dimension is r, so the factorisation is exact); A moves to the orthonormal
principal directions of the update, and travels down with B. (FedLLM-Factory's ``alg/fedsvd.py`` takes
``V[:r, :]`` of ``torch.svd``, whose V is not transposed: rows of V, not of V^T; the paper's V_r^T is used here.)
"""
from __future__ import annotations

from dataclasses import dataclass

from fedbench.fl.strategy import GlobalModel
from fedbench.merging.lora_family import svd_refactor
from fedbench.options import check_int
from fedbench.registry import STRATEGIES
from fedbench.strategies.lora_family.ranks import RankOptions, RankTiered, check_family


@dataclass(frozen=True)
class FedSVDOptions(RankOptions):
    """Rank tiers plus ``period``: re-factorise every this many rounds."""
    period: int = 1

    def validate(self, prefix):
        super().validate(prefix)
        check_int(f"{prefix}.period", self.period, 1)


@STRATEGIES.register("fedsvd", check=check_family("fedsvd"), options=FedSVDOptions)
class FedSVD(RankTiered):
    """FedSVD: B trains and is averaged; the server re-factorises B A by SVD (A = V_r^T, B = U_r S_r)."""

    def configure_round(self, round_idx, clients, global_model):
        a_keys = {m.a_key for m in self.lora.modules}
        keys = tuple(k for k in global_model.state if k not in a_keys)
        return [self.send(int(c), round_idx, global_model, train_keys=keys, send_keys=keys) for c in clients]

    def combine(self, global_model, updates, round_idx):
        new = super().combine(global_model, updates, round_idx)
        if new is global_model or int(round_idx) % self.options.period:
            return new
        state = new.state
        for m in self.lora.modules:
            b, a = svd_refactor(state[m.b_key], state[m.a_key], self.rank)
            state[m.b_key], state[m.a_key] = b.to(state[m.b_key].dtype), a.to(state[m.a_key].dtype)
        return GlobalModel(state, dict(new.base_delta))
