"""Strategies: what a round asks of each client, what the client does, and how the server combines it.

In the spirit of Flower's ``configure_train`` / ``aggregate_train``, a strategy has three hooks, and the one
round loop (:class:`fedbench.fl.server.FederatedRun`, or Flower's ServerApp/ClientApp in
:mod:`fedbench.engines.flower`) calls nothing else:

- :meth:`FedAvg.configure_round` (server): one :class:`ClientInstruction` per sampled client: the tensors that
  travel down, which trainable parameters train (``train_keys``), which travel back (``send_keys``), local
  steps, and JSON-able options (a task, a trial configuration, ...).
- :meth:`FedAvg.client_update` (client): local training from an instruction, with the client's own
  persistent store (:class:`fedbench.fl.store.ClientStore`: its DP ledger, private factors, per-task adapters;
  never sent). Returns a :class:`ClientUpdate`: the state that travels up and any tensor ``extras``.
- :meth:`FedAvg.aggregate` (server): the next :class:`GlobalModel` from the updates.

Every condition of the core applies to every strategy by configuration, because the loop and the default
hooks provide it: sampling and dropout (the loop), DP-SGD and FedProx (``train_client``), the aggregation
rule and server optimizer (:data:`fedbench.registry.AGGREGATORS`), LoRA semantics
(:data:`fedbench.registry.LORA_SEMANTICS`), the update guard and Byzantine attacks (the loop), the engine.

Adding a strategy: subclass :class:`FedAvg` in :mod:`fedbench.strategies`, override what differs and
register it with ``@STRATEGIES.register("name", check=...)``; ``check(cfg)`` raises a ConfigError for a
combination the strategy cannot run.
"""
from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fedbench.errors import ConfigError
from fedbench.merging import aggregators as agg
from fedbench.merging.aggregators import TooFewUpdates
from fedbench.fl.seeding import derive_seed
from fedbench.models.state import state_nbytes
from fedbench.options import options_of
from fedbench.registry import AGGREGATORS, LORA_SEMANTICS, STRATEGIES


@dataclass
class GlobalModel:
    """What every client starts a round from."""
    state: "OrderedDict[str, torch.Tensor]"               # trainable tensors
    base_delta: dict = field(default_factory=dict)       # dense updates folded into frozen base weights
    down_bytes: int | None = None                        # exact bytes one client receives (None: the state's)

    def nbytes_down(self) -> int:
        return state_nbytes(self.state) if self.down_bytes is None else int(self.down_bytes)


@dataclass
class ClientInstruction:
    """What the server asks of one client in one round (what travels down is ``state``/``base_delta``)."""
    client_id: int
    round_idx: int
    state: dict                                   # global trainable tensors the client loads
    base_delta: dict = field(default_factory=dict)
    down_bytes: int = 0                           # exact bytes of what travels down to this client
    train_keys: tuple[str, ...] | None = None     # trainable tensors that train (None: all)
    send_keys: tuple[str, ...] | None = None      # trained tensors that travel up (None: all that trained)
    local_steps: int | None = None                # overrides train.local_steps for this client
    options: dict = field(default_factory=dict)   # JSON-able, strategy-specific
    # tensors sent besides the state (e.g. SCAFFOLD's server control variate), counted in down_bytes; only a
    # strategy registered with the fact sends_extras=True sends any (the test matrix holds the others to none)
    extras: dict = field(default_factory=dict)

    def header(self) -> dict:
        """Everything but the tensors, JSON-able (what Flower's ConfigRecord carries)."""
        return {"client_id": self.client_id, "round_idx": self.round_idx, "down_bytes": self.down_bytes,
                "train_keys": None if self.train_keys is None else list(self.train_keys),
                "send_keys": None if self.send_keys is None else list(self.send_keys),
                "local_steps": self.local_steps, "options": self.options}

    @classmethod
    def from_header(cls, header: dict, state: dict, base_delta: dict, extras: dict | None = None
                    ) -> "ClientInstruction":
        h = dict(header)
        for k in ("train_keys", "send_keys"):
            h[k] = None if h[k] is None else tuple(h[k])
        return cls(state=state, base_delta=base_delta, extras=dict(extras or {}), **h)


@dataclass
class LoraLayout:
    """Where the LoRA factors sit in a state (from :func:`fedbench.models.lora_modules`)."""
    modules: list                    # list of LoraModuleInfo

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(m.a_key, m.b_key) for m in self.modules]

    @property
    def factor_keys(self) -> set[str]:
        return {k for m in self.modules for k in (m.a_key, m.b_key)}


@contextmanager
def train_only(model, keys):
    """Within the block only the trainable parameters named in `keys` train (None: all of them)."""
    if keys is None:
        yield
        return
    keys = set(keys)
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in keys]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


# -- LoRA semantics: what the server does with the factors after the rule ------------------------------
# Each is `(strategy, global_model, states, weights, new_state, round_idx) -> GlobalModel`; `new_state` is the
# rule's (and server optimizer's) output over every sent key, factors included.

@LORA_SEMANTICS.register("factors")
def factors_semantics(strategy, global_model, states, weights, new_state, round_idx):
    """FedIT: average A and B separately (mean(B) mean(A), not the mean of the products)."""
    return GlobalModel(new_state, dict(global_model.base_delta))


@LORA_SEMANTICS.register("svd")
def svd_semantics(strategy, global_model, states, weights, new_state, round_idx):
    """Exact product average re-factorised at rank r by truncated SVD (best rank-r approximation)."""
    new_state.update(agg.lora_svd(states, weights, strategy.lora.pairs, strategy.rank))
    return GlobalModel(new_state, dict(global_model.base_delta))


@LORA_SEMANTICS.register("stack")
def stack_semantics(strategy, global_model, states, weights, new_state, round_idx):
    """Exact product average by stacking (FLoRA): folded into the base weight, factors restarted; the stacked
    factors (rank sum r_i) are what travels down."""
    lora = strategy.lora
    base_delta = dict(global_model.base_delta)
    stacked = agg.lora_stack(states, weights, lora.pairs)
    down_bytes = sum(t.numel() * t.element_size() for k, t in new_state.items() if k not in lora.factor_keys)
    for i, m in enumerate(lora.modules):
        b_stack, a_stack = stacked[m.a_key]
        down_bytes += state_nbytes({"a": a_stack, "b": b_stack})
        dense = m.scaling * (b_stack @ a_stack)
        base_delta[m.base_key] = base_delta.get(m.base_key, 0) + dense
        # the product now lives in the base weight: restart the factors as peft initialises them
        new_state[m.a_key], new_state[m.b_key] = strategy.fresh_factors(global_model.state, m, i, round_idx)
    return GlobalModel(new_state, base_delta, down_bytes)


# -- the default strategy -------------------------------------------------------------------------------

def check_lora_factor_strategy(cfg, name: str, why: str) -> None:
    """A strategy that decides what the LoRA factors mean (`name`, `why` it does): a tuner with factors and the
    plain 'factors' semantics, so the two never both rewrite the factors."""
    if not has_lora_factors(cfg.peft.method):
        raise ConfigError("fl.strategy", name, f"a LoRA tuner (peft.method={cfg.peft.method!r} has no factors)")
    if cfg.fl.lora_aggregation != "factors":
        raise ConfigError("fl.lora_aggregation", cfg.fl.lora_aggregation,
                          f"'factors' with fl.strategy={name!r} ({why})")
    check_lora_semantics(cfg)


def check_lora_semantics(cfg) -> None:
    """LoRA semantics other than 'factors' act on LoRA factors: meaningless for a tuner without them."""
    if cfg.fl.lora_aggregation != "factors" and not has_lora_factors(cfg.peft.method):
        raise ConfigError("fl.lora_aggregation", cfg.fl.lora_aggregation,
                          f"'factors' for peft.method={cfg.peft.method!r} (it has no LoRA factors)")


@STRATEGIES.register("fedavg", check=check_lora_semantics)
class FedAvg:
    """FedAvg (McMahan et al. 2017) with the configured rule, server optimizer and LoRA semantics."""

    def __init__(self, cfg, model):
        from fedbench.models import lora_modules
        self.cfg = cfg
        # the strategy's own settings (None when it registers no options class): read here, never set from outside
        self.options = options_of(STRATEGIES, cfg.fl.strategy, cfg.fl.options, "fl.options")
        self._server_step(cfg.fl, LoraLayout(lora_modules(model) if has_lora_factors(cfg.peft.method) else []),
                          cfg.peft.rank, cfg.seed)

    def _server_step(self, fl_cfg, lora: LoraLayout, rank, seed) -> None:
        """The server's step as configured: the rule, its server optimizer, the LoRA semantics."""
        self.fl, self.lora, self.rank, self.seed = fl_cfg, lora, rank, seed
        spec = AGGREGATORS.entry(fl_cfg.aggregator)
        # a rule registered with an options class gets its typed options (fl.aggregator_options) as a keyword;
        # the others keep the (states, weights, fl_cfg) call
        rule_options = options_of(AGGREGATORS, fl_cfg.aggregator, fl_cfg.aggregator_options, "fl.aggregator_options")
        self.rule = spec.obj if rule_options is None else functools.partial(spec.obj, options=rule_options)
        make_opt = spec.facts.get("server_optimizer")
        self.optimizer = make_opt(fl_cfg) if make_opt is not None else None
        self.semantics = LORA_SEMANTICS.get(fl_cfg.lora_aggregation if lora.modules else "factors")

    # -- optional hooks (no-op here; a strategy overrides what it needs, the loop calls every one) --------------
    def attach(self, data) -> None:
        """Called once with the run's data before :meth:`initial_model` (e.g. a task schedule read off it)."""

    def round_record(self, round_idx: int) -> dict:
        """The strategy's own columns of round `round_idx`'s record (e.g. its simulated clock)."""
        return {}

    def result_extras(self) -> dict:
        """The strategy's own tables (JSON-able), added to the run's summary."""
        return {}

    def cache_depths(self, model) -> list[int]:
        """The frozen-prefix depths whose outputs the run's clients read from the activation caches (what a
        prefilled federation fills up front): the model's frozen prefix."""
        return [model.frozen_prefix]

    # -- server side ----------------------------------------------------------------------------------
    def initial_model(self, model) -> GlobalModel:
        from fedbench.models import trainable_state
        return GlobalModel(trainable_state(model))

    def configure_round(self, round_idx: int, clients, global_model: GlobalModel) -> list[ClientInstruction]:
        """Every sampled client gets the global model and trains everything the tuner makes trainable."""
        return [self.instruction(int(c), round_idx, global_model) for c in clients]

    def instruction(self, client_id: int, round_idx: int, global_model: GlobalModel, **kw) -> ClientInstruction:
        """Client `client_id`'s instruction to train `global_model`; ``extras=`` tensors travel (and count) too."""
        down = global_model.nbytes_down() + state_nbytes(kw.get("extras", {}))
        return ClientInstruction(client_id, round_idx, global_model.state, global_model.base_delta, down, **kw)

    def aggregate(self, global_model: GlobalModel, updates: list, round_idx: int) -> GlobalModel:
        """The rule over the sent keys (the others keep their global value), the server optimizer on top,
        then the LoRA semantics."""
        if not updates:   # every sampled client dropped out (or was rejected): nothing changes
            return global_model
        states = [u.state for u in updates]
        keys = list(states[0])
        if any(list(s) != keys for s in states[1:]):
            raise ValueError(f"round {round_idx}: clients sent different keys; a strategy's updates must agree")
        weights = [u.num_samples for u in updates]
        try:
            combined = self.rule(states, weights, self.fl)
        except TooFewUpdates as e:      # dropout or the guard left too few for the rule's f: skip, not crash
            logging.getLogger("fedbench.fl").warning("round %d: model unchanged: %s", round_idx, e)
            return global_model
        if self.optimizer is not None:
            combined = self.optimizer.step(OrderedDict((k, global_model.state[k]) for k in keys), combined)
        new_state = OrderedDict((k, combined[k] if k in combined else v) for k, v in global_model.state.items())
        return self.semantics(self, global_model, states, weights, new_state, round_idx)

    def evaluate(self, run, global_model: GlobalModel, predictions: bool = False) -> dict:
        """Central evaluation of the global model on the test examples (the loop's records); a personalised
        strategy returns ``run.evaluate_clients(global_model)`` instead (its clients score the models they keep)."""
        return run.evaluate_model(global_model, predictions=predictions)

    def client_evaluate(self, run, client_id: int, global_model: GlobalModel, store: dict) -> dict:
        """Client-side evaluation: what client `client_id` scores with the model it would use, from the global
        model and its store (``{"accuracy", "loss", "n"}``). Here the global model itself; a personalised strategy
        (FedSA-LoRA's own B factors) overrides it. Runs where the client's store is: in-process, or on its
        Flower SuperNode."""
        return run.evaluate_model(global_model)

    # -- client side ----------------------------------------------------------------------------------
    def training_hook(self, run, ins: ClientInstruction, store: dict):
        """A :class:`fedbench.fl.client.TrainingHook` for this client's local training (a gradient correction, a
        loss term), or None (plain training). A strategy that returns one registers ``dp_compatible=False``
        unless its hook keeps its meaning under DP-SGD (the DP path runs no hook)."""
        return None

    def train_config(self, run, ins: ClientInstruction):
        """The TrainConfig this client trains with: the run's, with the instruction's local steps if set."""
        return run.cfg.train if ins.local_steps is None else run.cfg.train.with_steps(ins.local_steps)

    def client_update(self, run, ins: ClientInstruction, store: dict):
        """Train the received state on the client's data; send back what ``ins.send_keys`` names."""
        from fedbench.fl.client import train_client
        run.load(GlobalModel(ins.state, ins.base_delta))
        train_cfg = self.train_config(run, ins)
        with train_only(run.model, ins.train_keys):
            start = {k: v for k, v in ins.state.items() if ins.train_keys is None or k in ins.train_keys}
            update = train_client(
                run.model, start, run.client_split(ins.client_id), self.local_indices(run, ins),
                train_cfg, seed=run.client_seed(ins.round_idx, ins.client_id), client_id=ins.client_id,
                cache=run.train_cache, pad_id=run.data.pad_id, dp_state=store.setdefault("dp", {}),
                dp_total_rounds=run.cfg.fl.rounds, hook=self.training_hook(run, ins, store))
        if ins.send_keys is not None:
            update.state = OrderedDict((k, update.state[k]) for k in ins.send_keys)
        return update

    def finished(self, round_idx: int) -> bool:
        """Whether the run ends after round `round_idx` (checked once the round is aggregated), before
        ``fl.rounds``: a strategy with its own clock (AutoFedNLP's simulated-time horizon) ends the run there;
        ``fl.rounds`` stays the cap. The round it returns True on is the last one: evaluated with predictions,
        and every engine stops there (the in-process loop; Flower's ServerApp sends nothing more)."""
        return False

    def reference(self, ins: ClientInstruction) -> dict:
        """What each tensor a client sends back is measured against (the update guard's norm, an update
        attack's direction): the state it received, under the names it sends back (a strategy that renames
        what travels up, such as FL-TAC's per-task adapters, maps the names)."""
        return ins.state

    def local_indices(self, run, ins: ClientInstruction):
        """The rows of the training split client ``ins.client_id`` trains on this round (a continual strategy
        picks the instruction's task)."""
        return run.data.client_indices[ins.client_id]

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """(tensors, JSON) of what the server keeps between rounds (server-optimizer moments)."""
        tensors, meta = {}, {"optimizer": None}
        if self.optimizer is not None:
            for name in ("velocity", "m", "v"):
                moments = getattr(self.optimizer, name, None)
                if moments is not None:
                    tensors.update({f"{name}/{k}": t for k, t in moments.items()})
            meta["optimizer"] = type(self.optimizer).__name__
        return tensors, meta

    def load_state_dict(self, tensors: dict, meta: dict) -> None:
        if self.optimizer is None:
            return
        for name in ("velocity", "m", "v"):
            if hasattr(self.optimizer, name):
                moments = OrderedDict((k.split("/", 1)[1], t) for k, t in tensors.items() if k.startswith(name + "/"))
                setattr(self.optimizer, name, moments or None)

    # -- helpers --------------------------------------------------------------------------------------
    def fresh_factors(self, state, m, module_idx, round_idx):
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "server", round_idx, module_idx))
        a = torch.empty_like(state[m.a_key])
        # peft's default: kaiming_uniform_(a=sqrt(5)) for A, zeros for B
        bound = 1.0 / math.sqrt(a.shape[1])
        a.uniform_(-bound, bound, generator=gen)
        return a, torch.zeros_like(state[m.b_key])


def has_lora_factors(method: str) -> bool:
    """Whether `method`'s modules are LoRA factors (the tuner registry's fact)."""
    from fedbench.registry import TUNERS
    return bool(TUNERS.entry(method).facts.get("has_lora_factors", False))


class ServerStep(FedAvg):
    """FedAvg's server step alone, without a model or a run: the configured rule, server optimizer and LoRA
    semantics over given updates (tests and offline merging use it). ``aggregate`` returns ``(global model,
    bytes one client receives next)``; ``combine`` is the bare rule."""

    def __init__(self, fl_cfg, lora: LoraLayout | None = None, lora_rank: int | None = None, seed: int = 0):
        self.cfg = None
        self._server_step(fl_cfg, lora or LoraLayout([]), lora_rank, seed)

    def combine(self, states: list[dict], weights: list[float]) -> OrderedDict:
        return self.rule(states, weights, self.fl)

    def aggregate(self, global_model: GlobalModel, updates: list, round_idx: int) -> tuple[GlobalModel, int]:
        new = super().aggregate(global_model, updates, round_idx)
        return new, new.nbytes_down()


