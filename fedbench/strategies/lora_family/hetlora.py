"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): clients of different ranks, as the paper defines its
three steps (no public reference code; the paper's description is followed):

1. distribution by truncation: client k receives the leading r_k ranks of the global factors;
2. rank self-pruning in local training: the loss gets lambda * ||B_k[:, g:r_k] A_k[g:r_k]||_F (the tail of the
   client's ranks, g = floor(gamma r_k)); if training left that tail's norm below the one received, the client
   prunes its rank to g (never below 1) and sends back only the leading g ranks; the server reads the client's
   rank off what it sent and truncates to it from then on;
3. sparsity-weighted aggregation: the zero-padded factors averaged with weights ||B_k A_k||_F / Z (the norm of
   each client's reconstructed update, all layers together), in place of sample counts.
The pruning term is a loss term, which the DP-SGD path does not run: HetLoRA refuses DP (``dp_compatible``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from fedbench.fl.client import TrainingHook
from fedbench.fl.strategy import FedAvg
from fedbench.merging.lora_family import factor_rank, sparsity_weights, tail_norm, truncate_factors
from fedbench.options import check_number
from fedbench.registry import STRATEGIES
from fedbench.strategies.lora_family.ranks import RankOptions, RankTiered, check_family


@dataclass(frozen=True)
class HetLoRAOptions(RankOptions):
    """Rank tiers plus the pruning term's weight ``reg`` (lambda) and ``gamma`` (the kept fraction when pruning)."""
    reg: float = 0.01
    gamma: float = 0.75

    def validate(self, prefix):
        super().validate(prefix)
        check_number(f"{prefix}.reg", self.reg, 0, float("inf"))
        check_number(f"{prefix}.gamma", self.gamma, 0, 1, low_open=True)


class TailPenalty(TrainingHook):
    """loss + lambda * sum over layers of ||B[:, g:r] A[g:r]||_F on the model's own (trainable) factors."""

    def __init__(self, pairs, start: int, end: int, reg: float):
        self.pairs, self.start, self.end, self.reg = pairs, start, end, reg

    def loss(self, model, loss):
        params = dict(model.named_parameters())
        return loss + self.reg * tail_norm(params, self.pairs, self.start, self.end)


@STRATEGIES.register("hetlora", check=check_family("hetlora"), options=HetLoRAOptions, dp_compatible=False)
class HetLoRA(RankTiered):
    """HetLoRA: truncation to each client's rank, rank self-pruning, sparsity-weighted zero-padded averaging."""

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.pruned: dict[int, int] = {}       # the ranks clients pruned to (read off what they sent)

    def rank_of(self, client_id):
        return min(self.client_ranks[int(client_id)], self.pruned.get(int(client_id), self.rank))

    def keep(self, r: int) -> int:
        return max(1, math.floor(self.options.gamma * r))

    def training_hook(self, run, ins, store):
        r = int(ins.options["rank"])     # ins.state is zero-padded by now: the rank the server sent at
        return TailPenalty(self.lora.pairs, self.keep(r), r, self.options.reg) if self.options.reg > 0 else None

    def send(self, client_id, round_idx, gm, keys=None, **kw):
        return super().send(client_id, round_idx, gm, keys, options={"rank": self.rank_of(client_id)}, **kw)

    def client_update(self, run, ins, store):
        r = self.received_rank(ins.state)
        g = self.keep(r)
        with torch.no_grad():
            before = float(tail_norm(ins.state, self.lora.pairs, g, r))
        update = super().client_update(run, ins, store)
        with torch.no_grad():
            after = float(tail_norm(update.state, self.lora.pairs, g, r))
        if g < r and after < before:            # the tail shrank: prune it
            update.state = truncate_factors(update.state, self.lora.pairs, g)
        return update

    def aggregate(self, global_model, updates, round_idx):
        for u in updates:      # the rank each client sent at is its rank from now on
            r = factor_rank(u.state, self.lora.pairs[0][0]) if self.lora.pairs[0][0] in u.state else self.rank
            if r < self.client_ranks[int(u.client_id)]:
                self.pruned[int(u.client_id)] = r
        return super().aggregate(global_model, updates, round_idx)

    def combine(self, global_model, updates, round_idx):
        weights = sparsity_weights([u.state for u in updates], self.lora.pairs)
        updates = [dataclasses.replace(u, num_samples=w) for u, w in zip(updates, weights)]
        return FedAvg.aggregate(self, global_model, updates, round_idx)

    def state_dict(self):
        tensors, meta = super().state_dict()
        meta["pruned"] = {str(c): r for c, r in sorted(self.pruned.items())}
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        super().load_state_dict(tensors, meta)
        self.pruned = {int(c): int(r) for c, r in (meta.get("pruned") or {}).items()}
