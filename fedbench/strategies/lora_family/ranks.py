"""Heterogeneous client ranks, the base of the federated-LoRA family, and the two naive baselines.

A run's clients are cut into rank tiers by the strategy's options (``fl.options.ranks``, e.g. [4, 8, 16], with
``assignment``: ``seeded`` = balanced tiers over a permutation seeded from the config, ``cyclic`` = client c
gets ranks[c % len(ranks)]); no ranks = every client at ``peft.rank``. The model (and the global state) keeps
rank ``peft.rank`` = R; a rank-r client is simulated exactly:

- what travels down is the leading r rows of A and columns of B (counted at rank r);
- the client zero-pads them into its model and trains; the padded rows and columns start at zero, so their
  gradients are zero and they stay zero (peft's LoRA forward: dB[:, j] needs A[j], dA[j] needs B[:, j]);
  under DP-SGD they receive noise during local steps, which is then discarded (a deviation: a real rank-r
  client has no such parameters); the LoRA scaling stays alpha / R for every tier;
- it sends back its leading r (counted at rank r); the server zero-pads every update to R and aggregates.

With every client at R this is FedAvg exactly (tests/test_lora_family.py). Baselines (``fl.strategy``):
``fedit_zero_pad`` (FedIT over zero-padded factors, HetLoRA without its pruning and weighting) and
``fedit_truncate`` (every client trains at the smallest tier's rank).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

from fedbench.errors import ConfigError
from fedbench.fl.seeding import rng_for
from fedbench.fl.strategy import ClientInstruction, FedAvg, GlobalModel, check_lora_factor_strategy
from fedbench.merging.lora_family import factor_rank, pad_factors, truncate_factors
from fedbench.models.state import state_nbytes
from fedbench.options import Options, check_choice
from fedbench.registry import STRATEGIES

ASSIGNMENTS = ("seeded", "cyclic")


@dataclass(frozen=True)
class RankOptions(Options):
    """Client rank tiers: ``ranks`` (null: every client at peft.rank) assigned by ``assignment``."""
    ranks: tuple | None = None
    assignment: str = "seeded"

    def validate(self, prefix):
        if self.ranks is not None and not (
                isinstance(self.ranks, tuple) and self.ranks
                and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.ranks)):
            raise ConfigError(f"{prefix}.ranks", self.ranks, "null or a non-empty list of integers >= 1")
        check_choice(f"{prefix}.assignment", self.assignment, ASSIGNMENTS)


def assign_ranks(options: RankOptions, num_clients: int, rank: int, seed: int) -> list[int]:
    """Each client's LoRA rank: balanced tiers (``seeded``: over a permutation from the config's seed;
    ``cyclic``: by client id), or `rank` for everyone without tiers."""
    if options.ranks is None:
        return [int(rank)] * num_clients
    k = len(options.ranks)
    if options.assignment == "cyclic":
        return [int(options.ranks[c % k]) for c in range(num_clients)]
    perm = rng_for(seed, "client_ranks").permutation(num_clients)
    return [int(options.ranks[int(perm[c]) % k]) for c in range(num_clients)]


def check_family(name: str):
    """The family's config check: LoRA factors, its own semantics ('factors'), tiers within peft.rank."""
    def check(cfg) -> None:
        check_lora_factor_strategy(cfg, name, "the strategy decides what the factors mean")
        ranks = (cfg.fl.options or {}).get("ranks")
        if ranks is not None and isinstance(ranks, (list, tuple)) and any(
                isinstance(r, int) and r > cfg.peft.rank for r in ranks):
            raise ConfigError("fl.options.ranks", list(ranks), f"ranks <= peft.rank={cfg.peft.rank} (the "
                                                               "global model's rank, the largest tier)")
    return check


class RankTiered(FedAvg):
    """FedAvg over clients of different LoRA ranks (zero-padding); the family's strategies subclass it and
    override :meth:`combine` (the server step over zero-padded updates) and what travels."""

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.client_ranks = assign_ranks(self.options, cfg.data.num_clients, cfg.peft.rank, cfg.seed)

    def rank_of(self, client_id: int) -> int:
        """The rank client `client_id` trains at this round."""
        return self.client_ranks[int(client_id)]

    # -- server side ----------------------------------------------------------------------------------
    def configure_round(self, round_idx, clients, global_model):
        return [self.send(int(c), round_idx, global_model) for c in clients]

    def send(self, client_id: int, round_idx: int, gm: GlobalModel, keys=None, **kw) -> ClientInstruction:
        """The instruction carrying `gm`'s `keys` (all by default) at the client's rank; bytes at that rank plus
        whatever the global model sends beside its state (e.g. FedEx-LoRA's residual)."""
        r = self.rank_of(client_id)
        if keys is None and r == self.rank:
            return self.instruction(client_id, round_idx, gm, **kw)
        state = OrderedDict((k, gm.state[k]) for k in (keys if keys is not None else gm.state))
        state = truncate_factors(state, self.lora.pairs, r)
        beside = gm.nbytes_down() - state_nbytes(gm.state)
        return ClientInstruction(client_id, round_idx, state, gm.base_delta, state_nbytes(state) + beside, **kw)

    def aggregate(self, global_model, updates, round_idx):
        padded = [dataclasses.replace(u, state=pad_factors(u.state, self.lora.pairs, self.rank)) for u in updates]
        return self.combine(global_model, padded, round_idx)

    def combine(self, global_model: GlobalModel, updates: list, round_idx: int) -> GlobalModel:
        """The server step over updates zero-padded to the global rank: FedAvg's (rule, server optimizer)."""
        return FedAvg.aggregate(self, global_model, updates, round_idx)

    # -- client side ----------------------------------------------------------------------------------
    def client_update(self, run, ins, store):
        """Train at the received rank (zero-padded into the model), send back the leading ranks."""
        r = self.received_rank(ins.state)
        full = pad_factors(ins.state, self.lora.pairs, self.rank)
        update = self.train(run, dataclasses.replace(ins, state=full), store)
        update.state = truncate_factors(update.state, self.lora.pairs, r)
        return update

    def train(self, run, ins, store):
        """Local training of a full-rank instruction (FedAvg's client step; a subclass adds to it)."""
        return FedAvg.client_update(self, run, ins, store)

    def received_rank(self, state: dict) -> int:
        for a_key, b_key in self.lora.pairs:
            if a_key in state:
                return factor_rank(state, a_key)
            if b_key in state:
                return int(state[b_key].shape[1])
        return self.rank


# needs_tiers: without rank tiers the baseline is FedAvg itself (a baseline of heterogeneous ranks only)
@STRATEGIES.register("fedit_zero_pad", check=check_family("fedit_zero_pad"), options=RankOptions, needs_tiers=True)
class FedITZeroPad(RankTiered):
    """FedIT over clients of different ranks: factors zero-padded to the largest rank and averaged (baseline)."""


@STRATEGIES.register("fedit_truncate", check=check_family("fedit_truncate"), options=RankOptions, needs_tiers=True)
class FedITTruncate(RankTiered):
    """FedIT with every client at the smallest tier's rank (baseline: the weakest device sets the rank)."""

    def rank_of(self, client_id):
        return min(self.client_ranks)
