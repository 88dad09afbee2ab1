"""AutoFedNLP / FedAdapter (Cai et al., arXiv 2205.10162): pick adapter depth and width while training.

A configuration is (depth d, width w): bottleneck adapters (Houlsby placement) in the top d MiniLM layers
with bottleneck w (or, with ``tuner="lora"``, LoRA of rank w on the top d layers). Methods, on the same
clients, data and seed:

- ``autofednlp``: the progressive configurator. Training runs in periods of `period` rounds. In a period
  the sampled clients of every round are split (seeded, round-robin) into trial groups that train the
  current (d, w), a deeper (d + depth_step, w) and a wider (d, w + width_step) configuration; each group
  FedAvgs its own clients. At the period's end the group with the best *validation* accuracy wins (a
  split carved from the training data, never the test split); the next period's groups all start from
  the winner's weights, grown into the larger layouts so that no training is lost
  (:func:`fedbench.models.tuners.adapter.grow_adapter_state`: the grown model computes the same function).
  Clients cache the output of the frozen bottom L - d layers of their samples (ActivationCache) and reuse
  it until d grows.
- ``autofednlp_nocache``: the same configurator, every step running the whole stack (same decisions).
- ``full_ft``: vanilla FedAvg full fine-tuning (FedNLP), every parameter trained and sent.
- ``fixed_d{d}_w{w}``: one fixed configuration for the whole run (with caching), for each grid point.
- ``oracle_fixed``: the grid's best fixed configuration chosen in hindsight (fastest to the target).

Simulated clock (:class:`DeviceProfile`, :func:`client_round_seconds`): a round lasts as long as its
slowest client: max over clients of compute(FLOPs of its work / device FLOP/s) + upload(bytes / uplink).
Real wall-clock of the clients' training is recorded beside it (``wall_*`` columns).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedbench.config import ConfigError, ModelConfig, PeftConfig, TrainConfig, config_hash
from fedbench.experiments.common import (Claim, claims_table, is_int, is_number, load_profiles, output_dir, profile_settings,
                                         runs_root, save_figure, save_table)
from fedbench.fl.seeding import derive_seed, rng_for

EXPERIMENT = "autofednlp"
STORE_VERSION = 1       # bump when a run's computation changes: cached runs are keyed by it
TASKS = ("ng20", "wordnet_noun")
TUNERS = ("adapter", "lora")
NUM_LAYERS = 6          # the bundled MiniLM


# -- simulated clock -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceProfile:
    """A client device for the simulated clock. The numbers are *stated* (assumed), not measured here.

    flops_per_s: sustained FLOP/s of training a transformer layer on the device.
    uplink_bps: upload bandwidth in bits per second.
    """
    name: str
    flops_per_s: float
    uplink_bps: float


DEVICES = {
    # a low-end phone CPU (~2 GFLOP/s sustained in fp32 training) on a slow cellular uplink (1 Mbit/s)
    "slow_phone": DeviceProfile("slow_phone", flops_per_s=2e9, uplink_bps=1e6),
    # an edge accelerator (Jetson-class, ~20 GFLOP/s sustained fp32 training) on a 20 Mbit/s uplink
    "fast_edge": DeviceProfile("fast_edge", flops_per_s=20e9, uplink_bps=20e6),
}


@dataclass(frozen=True)
class ModelCost:
    """FLOPs of one transformer layer's forward pass, per sample of n tokens: n * 2P + 4 h n^2
    (2 FLOPs per weight per token for the P dense weights; Q K^T and attention x V, 2 h n^2 each).

    A backward pass costs `backward_ratio` forwards: 1 for frozen layers that carry adapters (gradients
    flow to the activations only; the adapters' own FLOPs are negligible), 2 for full fine-tuning
    (activation and weight gradients)."""
    layer_params: int
    hidden: int
    num_layers: int = NUM_LAYERS
    backward_ratio_peft: float = 1.0
    backward_ratio_full: float = 2.0

    def layer_flops(self, lengths: np.ndarray) -> float:
        n = np.asarray(lengths, dtype=np.float64)
        return float((n * 2 * self.layer_params + 4 * self.hidden * n ** 2).sum())


def model_cost(model) -> ModelCost:
    layer = model.layers[0]
    dense = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    return ModelCost(layer_params=int(dense), hidden=int(model.encoder.config.hidden_size),
                     num_layers=model.num_layers)


def client_round_seconds(cost: ModelCost, device: DeviceProfile, depth: int | None, step_lengths: np.ndarray,
                         fill_lengths: np.ndarray | None, upload_bytes: int) -> dict:
    """Simulated seconds of one client's round.

    depth: layers that train (None = full fine-tuning, every layer with weight gradients).
    step_lengths: token counts of every sample the client's local steps process (repeats included).
    fill_lengths: samples whose frozen-prefix output the client computes this round (caching: only the
    ones not cached yet at this depth); None = no cache, the bottom layers run at every step.

    compute = [prefix_layers * F(fill) + depth * (1 + backward_ratio) * F(steps)] / flops_per_s
    upload  = 8 * upload_bytes / uplink_bps
    """
    if depth is None:
        top, ratio = cost.num_layers, cost.backward_ratio_full
    else:
        top, ratio = depth, cost.backward_ratio_peft
    prefix = cost.num_layers - top
    bottom = step_lengths if fill_lengths is None else fill_lengths
    flops = prefix * cost.layer_flops(bottom) + top * (1 + ratio) * cost.layer_flops(step_lengths)
    compute = flops / device.flops_per_s
    upload = 8.0 * upload_bytes / device.uplink_bps
    return {"compute_s": compute, "upload_s": upload, "total_s": compute + upload}


# -- parameters ----------------------------------------------------------------------------------------

# the profiles live in configs/autofednlp/{smoke,quick,full}.yaml
DEFAULTS = load_profiles(EXPERIMENT)


def settings_for(profile: str = "quick", **overrides) -> dict:
    """The profile's settings with `overrides` on top, every value checked (ConfigError otherwise)."""
    s = profile_settings(DEFAULTS, profile, overrides)
    if s["task"] not in TASKS:
        raise ConfigError("task", s["task"], f"one of {list(TASKS)}")
    if s["tuner"] not in TUNERS:
        raise ConfigError("tuner", s["tuner"], f"one of {list(TUNERS)} (width = bottleneck size or LoRA rank)")
    if s["device"] not in DEVICES:
        raise ConfigError("device", s["device"], f"one of {list(DEVICES)}")
    for key, low in [("max_train", 8), ("val_size", 1), ("max_test", 1), ("clients", 1), ("clients_per_round", 3),
                     ("rounds", 1), ("full_ft_rounds", 1), ("period", 1), ("local_steps", 1), ("batch_size", 1), ("eval_every", 1),
                     ("max_length", 8), ("start_depth", 1), ("start_width", 1), ("depth_step", 1),
                     ("width_step", 1), ("max_width", 1)]:
        if not is_int(s[key]) or s[key] < low:
            raise ConfigError(key, s[key], f"an integer >= {low}" + (
                " (one client per trial group: current, deeper, wider)" if key == "clients_per_round" else ""))
    if s["clients_per_round"] > s["clients"]:
        raise ConfigError("clients_per_round", s["clients_per_round"], f"at most clients={s['clients']}")
    if s["val_size"] + s["clients"] > s["max_train"]:
        raise ConfigError("val_size", s["val_size"], f"at most max_train - clients = {s['max_train'] - s['clients']}")
    if s["start_depth"] > NUM_LAYERS:
        raise ConfigError("start_depth", s["start_depth"], f"1..{NUM_LAYERS} (MiniLM's layers)")
    if s["start_width"] > s["max_width"]:
        raise ConfigError("start_width", s["start_width"], f"at most max_width={s['max_width']}")
    if not is_number(s["alpha"]) or not 0 < s["alpha"] < float("inf"):
        raise ConfigError("alpha", s["alpha"], "a number > 0 (Dirichlet concentration)")
    for key in ("lr", "lr_full"):
        if not is_number(s[key]) or not 0 < s[key] <= 1:
            raise ConfigError(key, s[key], "a number in (0, 1]")
    if s["target_accuracy"] is not None and (not is_number(s["target_accuracy"]) or not 0 < s["target_accuracy"] <= 1):
        raise ConfigError("target_accuracy", s["target_accuracy"], "None (use target_fraction) or a number in (0, 1]")
    if not is_number(s["target_fraction"]) or not 0 < s["target_fraction"] <= 1:
        raise ConfigError("target_fraction", s["target_fraction"], "a number in (0, 1]")
    grid = s["grid"]
    if (not isinstance(grid, (list, tuple)) or len(grid) == 0
            or any(not isinstance(g, (list, tuple)) or len(g) != 2 for g in grid)
            or any(not is_int(d) or not 1 <= d <= NUM_LAYERS or not is_int(w) or w < 1 for d, w in grid)):
        raise ConfigError("grid", grid, f"a non-empty list of (depth 1..{NUM_LAYERS}, width >= 1) pairs")
    s["grid"] = tuple(dict.fromkeys((int(d), int(w)) for d, w in grid))
    s["seeds"] = (s["seeds"],) if is_int(s["seeds"]) else tuple(s["seeds"])
    if len(s["seeds"]) == 0 or len(set(s["seeds"])) != len(s["seeds"]) or any(
            not is_int(x) or x < 0 for x in s["seeds"]):
        raise ConfigError("seeds", s["seeds"], "a non-empty list of distinct integers >= 0")
    return s


def methods_for(s: dict) -> list[str]:
    """Every run of the experiment (oracle_fixed is picked from the fixed runs afterwards)."""
    return ["autofednlp", "autofednlp_nocache", "full_ft"] + [fixed_name(d, w) for d, w in s["grid"]]


def fixed_name(d: int, w: int) -> str:
    return f"fixed_d{d}_w{w}"


def run_key(s: dict, method: str, seed: int) -> dict:
    """Everything one (method, seed) run depends on; its hash names the run in the store."""
    keep = ["task", "tuner", "alpha", "max_length", "max_train", "val_size", "max_test", "clients",
            "clients_per_round", "local_steps", "batch_size", "eval_every"]
    if method == "full_ft":
        keep += ["full_ft_rounds", "lr_full"]
    else:
        keep += ["rounds", "lr"]
    if method.startswith("autofednlp"):
        keep += ["start_depth", "start_width", "depth_step", "width_step", "max_width", "period"]
    return {"experiment": EXPERIMENT, "version": STORE_VERSION, "method": method, "seed": int(seed),
            **{k: s[k] for k in keep}}


# -- data ----------------------------------------------------------------------------------------------

@dataclass
class Data:
    train: object               # TokenizedSplit: the training subsample (clients' data + the validation rows)
    test: object
    client_indices: list[np.ndarray]
    val_indices: np.ndarray     # carved from the training subsample; never given to a client
    test_indices: np.ndarray
    num_labels: int
    pad_id: int


def prepare_data(s: dict, seed: int) -> Data:
    """Subsample the task (seeded), carve the validation rows, Dirichlet-partition the rest over clients."""
    from fedbench.data import load_task, partition_dirichlet
    from fedbench.models import load_tokenizer
    from fedbench.models.inputs import tokenize_split
    ds = load_task(s["task"])
    n_train, n_test = len(ds["train"]), len(ds["test"])
    train_idx = np.sort(rng_for(seed, "subsample", 0).choice(n_train, size=min(s["max_train"], n_train), replace=False))
    test_idx = np.sort(rng_for(seed, "subsample", 1).choice(n_test, size=min(s["max_test"], n_test), replace=False))
    tok = load_tokenizer(ModelConfig().backbone)
    train = tokenize_split(ds["train"].select(train_idx), tok, s["max_length"])
    test = tokenize_split(ds["test"].select(test_idx), tok, s["max_length"])
    order = rng_for(seed, "subsample", 2).permutation(len(train))
    val, pool = np.sort(order[: s["val_size"]]), np.sort(order[s["val_size"]:])
    parts = partition_dirichlet(train.labels[pool].numpy(), s["clients"], alpha=s["alpha"],
                                seed=derive_seed(seed, "partition"))
    return Data(train=train, test=test, client_indices=[pool[np.asarray(p, dtype=np.int64)] for p in parts],
                val_indices=val, test_indices=np.arange(len(test)),
                num_labels=len(ds["train"].features["label"].names), pad_id=tok.pad_token_id or 0)


# -- models and evaluation -----------------------------------------------------------------------------

class Models:
    """One model per configuration (built once per seed, same head init for all), and evaluation caches
    shared by every run: each depth's frozen-prefix outputs of the validation and test rows are computed
    in one fixed batch order, so a cached value never depends on which run asked first."""

    def __init__(self, s: dict, seed: int, data: Data):
        from fedbench.models.inputs import ActivationCache
        self.s, self.seed, self.data = s, seed, data
        self.models: dict = {}
        self.init: dict = {}
        self.val_cache = ActivationCache(data.train, data.pad_id)
        self.test_cache = ActivationCache(data.test, data.pad_id)

    def peft(self, config) -> PeftConfig:
        if config is None:
            return PeftConfig(method="full")
        d, w = config
        if self.s["tuner"] == "lora":
            return PeftConfig(method="lora", rank=w, lora_alpha=float(2 * self.s["start_width"]), depth=d)
        return PeftConfig(method="adapter", adapter_width=w, depth=d)

    def get(self, config):
        """The model of `config` ((d, w), or None = full fine-tuning) and its initial trainable state."""
        if config not in self.models:
            from fedbench.models import build_model, trainable_state
            model = build_model(ModelConfig(), self.peft(config), self.data.num_labels,
                                seed=derive_seed(self.seed, "init"))
            self.models[config], self.init[config] = model, trainable_state(model)
        return self.models[config], self.init[config]

    def grow(self, state: dict, to_config) -> OrderedDict:
        """`state` carried into `to_config`'s layout; the grown model computes the same function."""
        from fedbench.models.tuners.adapter import grow_adapter_state
        from fedbench.models.tuners.lora import grow_lora_state
        _, template = self.get(to_config)
        grow = grow_lora_state if self.s["tuner"] == "lora" else grow_adapter_state
        return grow(state, template)

    @staticmethod
    def _filled(cache, model, split, indices):
        """`cache` holding the frozen-prefix output of every row in `indices` at `model`'s prefix, computed
        in a fixed length-sorted batch order the first time that prefix is asked for."""
        from fedbench.models.inputs import batch_order
        cache.ensure(model.frozen_prefix)
        if not cache.hidden:
            for batch in batch_order(np.asarray(indices), split.lengths, 64, None, shuffle=False):
                cache.get(model, batch)
        return cache

    def accuracy(self, config, state: dict, which: str) -> float:
        from fedbench.fl.client import evaluate
        from fedbench.models import load_trainable_state
        model, _ = self.get(config)
        load_trainable_state(model, state)
        d = self.data
        split, idx, cache = (d.train, d.val_indices, self.val_cache) if which == "val" else \
            (d.test, d.test_indices, self.test_cache)
        cache = self._filled(cache, model, split, idx) if model.frozen_prefix > 0 else None
        return evaluate(model, split, idx, batch_size=64, cache=cache, pad_id=d.pad_id)["accuracy"]


# -- one (method, seed) run ----------------------------------------------------------------------------

@dataclass
class Group:
    """A trial group: a configuration and the global state its clients share."""
    config: tuple[int, int]
    state: OrderedDict


class Run:
    """The round loop shared by every method: a round trains groups of clients (one group for a fixed
    configuration or full FT, up to three trial groups for the configurator), FedAvgs each group, and
    advances the simulated clocks by the slowest client of the round."""

    def __init__(self, s: dict, seed: int, data: Data, models: Models, method: str):
        from fedbench.models.inputs import ActivationCache
        self.s, self.seed, self.data, self.models, self.method = s, seed, data, models, method
        self.use_cache = method != "autofednlp_nocache"
        self.train_cache = ActivationCache(data.train, data.pad_id) if self.use_cache else None
        self.cached: dict[int, set] = {}          # prefix -> sample indices whose prefix output a client holds
        self.full = method == "full_ft"
        self.rounds = s["full_ft_rounds"] if self.full else s["rounds"]
        self.train_cfg = TrainConfig(local_steps=s["local_steps"], batch_size=s["batch_size"],
                                     lr=float(s["lr_full"] if self.full else s["lr"]))

    # configurations ---------------------------------------------------------------------------------
    def upgrades(self, config) -> list:
        """The trial configurations of a period: current, deeper, wider (those within bounds)."""
        d, w = config
        out = [config]
        if d + self.s["depth_step"] <= NUM_LAYERS:
            out.append((d + self.s["depth_step"], w))
        if w + self.s["width_step"] <= self.s["max_width"]:
            out.append((d, w + self.s["width_step"]))
        return out

    def initial_groups(self) -> list[Group]:
        if self.full:
            return [Group(None, self.models.get(None)[1])]
        if self.method.startswith("fixed_"):
            d, w = (int(x[1:]) for x in self.method.split("_")[1:])
            return [Group((d, w), self.models.get((d, w))[1])]
        start = (self.s["start_depth"], self.s["start_width"])
        return self.trial_groups(start, self.models.get(start)[1])

    def trial_groups(self, winner, state) -> list[Group]:
        return [Group(c, state if c == winner else self.models.grow(state, c)) for c in self.upgrades(winner)]

    # one client ---------------------------------------------------------------------------------------
    def client(self, group: Group, client_id: int, round_idx: int, device_costs) -> tuple:
        from fedbench.fl.client import local_batches, train_client
        from fedbench.models import state_nbytes
        model, _ = self.models.get(group.config)
        idx = self.data.client_indices[client_id]
        seed = derive_seed(self.seed, "client", round_idx, client_id)
        # the batches train_client will draw (same seed, same generator), for the clock's token counts
        batches = local_batches(idx, self.data.train.lengths, self.train_cfg, np.random.default_rng(seed))
        t0 = time.perf_counter()
        u = train_client(model, group.state, self.data.train, idx, self.train_cfg, seed=seed, client_id=client_id,
                         cache=self.train_cache, pad_id=self.data.pad_id)
        wall = time.perf_counter() - t0
        lengths = self.data.train.lengths
        touched = np.concatenate(batches)
        fill = None
        if self.use_cache and not self.full:
            prefix = model.frozen_prefix
            have = self.cached.setdefault(prefix, set())
            new = sorted({int(i) for i in touched} - have)
            have.update(new)
            fill = lengths[np.asarray(new, dtype=np.int64)]
        up = state_nbytes(u.state)
        depth = None if self.full else group.config[0]
        sim = {name: client_round_seconds(cost, dev, depth, lengths[touched], fill, up)["total_s"]
               for name, (cost, dev) in device_costs.items()}
        return u, wall, sim, up

    # the run -----------------------------------------------------------------------------------------
    def run(self) -> pd.DataFrame:
        from fedbench.fl.aggregators import fedavg
        from fedbench.fl.server import sample_clients
        from fedbench.models import state_nbytes
        s = self.s
        groups = self.initial_groups()
        cost = model_cost(self.models.get(groups[0].config)[0])
        device_costs = {name: (cost, dev) for name, dev in DEVICES.items()}
        clocks = {name: 0.0 for name in DEVICES}
        wall_total, bytes_total, rows = 0.0, 0, []
        for r in range(1, self.rounds + 1):
            t_round = time.perf_counter()
            sampled = sample_clients(s["clients"], s["clients_per_round"], rng_for(self.seed, "sampling", r))
            # trial groups: a seeded shuffle of the round's clients dealt round-robin over the groups
            order = rng_for(self.seed, "server", r).permutation(sampled)
            members = [sorted(int(c) for c in order[g::len(groups)]) for g in range(len(groups))]
            round_sim = {name: 0.0 for name in DEVICES}
            train_wall, bytes_up, bytes_down = 0.0, 0, 0
            for g, group in enumerate(groups):
                updates = []
                for c in members[g]:
                    u, wall, sim, up = self.client(group, c, r, device_costs)
                    updates.append(u)
                    train_wall += wall
                    bytes_up += up
                    bytes_down += state_nbytes(group.state)
                    round_sim = {n: max(round_sim[n], sim[n]) for n in DEVICES}   # the slowest client
                if updates:
                    group.state = fedavg([u.state for u in updates], [u.num_samples for u in updates])
            # the period's end: every trial group is scored on the validation rows and the best one wins
            decide = len(groups) > 1 and r % s["period"] == 0
            val = [self.models.accuracy(gr.config, gr.state, "val") for gr in groups] if decide else [np.nan]
            lead = groups[int(np.argmax(val))] if decide else groups[0]   # ties: the current configuration
            due = r % s["eval_every"] == 0 or r == self.rounds or decide
            test = self.models.accuracy(lead.config, lead.state, "test") if due else np.nan
            for n in DEVICES:
                clocks[n] += round_sim[n]
            wall_total += train_wall
            bytes_total += bytes_up + bytes_down
            rows.append({"round": r, "depth": NUM_LAYERS if lead.config is None else lead.config[0],
                         "width": 0 if lead.config is None else lead.config[1],
                         "groups": "|".join("full" if gr.config is None else f"{gr.config[0]}x{gr.config[1]}"
                                            for gr in groups),
                         "val_accuracy": float(max(val)), "accuracy": test,
                         "sim_round_s": round_sim[s["device"]], "sim_s": clocks[s["device"]],
                         **{f"sim_s_{n}": clocks[n] for n in DEVICES},
                         "bytes_up": bytes_up, "bytes_down": bytes_down, "bytes_total": bytes_total,
                         "wall_train_round_s": train_wall, "wall_train_s": wall_total,
                         "wall_round_s": time.perf_counter() - t_round})
            if decide:     # the other groups adopt the winner's weights (grown into their layouts)
                groups = self.trial_groups(lead.config, lead.state)
        return pd.DataFrame(rows)


# -- the run store: one folder per run key, trace.csv written last ----------------------------------------

def _run_dir(key: dict) -> Path:
    return runs_root() / EXPERIMENT / config_hash(key)


def load_cached(key: dict) -> pd.DataFrame | None:
    path = _run_dir(key) / "trace.csv"
    return pd.read_csv(path) if path.exists() else None


def save_cached(key: dict, trace: pd.DataFrame) -> None:
    from fedbench.results import atomic_write_csv, atomic_write_json
    d = _run_dir(key)
    atomic_write_json(d / "key.json", key)
    atomic_write_csv(d / "trace.csv", trace)     # last: marks the run finished


# -- the experiment ------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["method", "depth", "width", "target_accuracy", "time_to_target_sim_s", "time_to_target_wall_s",
                   "final_accuracy", "bytes_total", "seed"]
WALL_COLUMNS = ("time_to_target_wall_s", "wall_train_round_s", "wall_train_s", "wall_round_s", "wall_train_per_round_s")


@dataclass
class AutoFedNlpResult:
    settings: dict
    summary: pd.DataFrame        # per (method, seed)
    trace: pd.DataFrame          # per (method, seed, round)
    claims: pd.DataFrame
    out: Path = None
    figures: dict = field(default_factory=dict)


def run(profile: str = "quick", progress: bool = True, **overrides) -> AutoFedNlpResult:
    """Every (method, seed) run (loaded from the store when finished), then the CSVs, figures, claims."""
    s = settings_for(profile, **overrides)
    out = output_dir(EXPERIMENT, profile)
    traces = []
    for seed in s["seeds"]:
        data = models = None
        for m in methods_for(s):
            key = run_key(s, m, seed)
            trace = load_cached(key)
            if trace is None:
                if data is None:         # data, models and evaluation caches: once per seed
                    data = prepare_data(s, seed)
                    models = Models(s, seed, data)
                t0 = time.perf_counter()
                trace = Run(s, seed, data, models, m).run()
                save_cached(key, trace)
                trace = load_cached(key)   # the stored values exactly (a resumed run reads the same)
                if progress:
                    print(f"[autofednlp] {m:<20} seed {seed}: {time.perf_counter() - t0:5.1f} s, final accuracy "
                          f"{trace['accuracy'].iloc[-1]:.3f}, simulated {trace['sim_s'].iloc[-1]:.0f} s", flush=True)
            traces.append(trace.assign(method=m, seed=seed))
    trace = pd.concat(traces, ignore_index=True)
    lead = ["method", "seed", "round", "depth", "width", "groups", "accuracy", "val_accuracy"]
    trace = trace[lead + [c for c in trace.columns if c not in lead]]
    summary = summarize(trace, s)
    res = AutoFedNlpResult(settings=s, summary=summary, trace=trace, claims=compute_claims(summary, trace, s), out=out)
    save_table(summary, out, "summary.csv")
    save_table(trace, out, "trace.csv")
    save_table(res.claims, out, "claims.csv")
    res.figures = make_figures(res, out)
    return res


def target_for(trace: pd.DataFrame, s: dict) -> float:
    """The target accuracy of a seed: `target_accuracy` if given, else target_fraction x the lower of the
    best test accuracies of AutoFedNLP and of full fine-tuning (a level both reach, so the headline
    speed-up is a ratio of two measured times; a fixed configuration may never reach it)."""
    if s["target_accuracy"] is not None:
        return float(s["target_accuracy"])
    best = trace.groupby("method")["accuracy"].max()
    ref = [best[m] for m in ("autofednlp", "full_ft") if m in best.index] or [best.max()]
    return float(s["target_fraction"] * min(ref))


def time_to_target(g: pd.DataFrame, target: float, column: str) -> float:
    """`column` (a cumulative clock) at the first round whose accuracy reaches `target`; NaN if none does."""
    hit = g[g["accuracy"] >= target - 1e-12]
    return float(hit[column].iloc[0]) if len(hit) else float("nan")


def summarize(trace: pd.DataFrame, s: dict) -> pd.DataFrame:
    rows = []
    for seed, ts in trace.groupby("seed", sort=False):
        target = target_for(ts, s)
        for m, g in ts.groupby("method", sort=False):
            last = g.iloc[-1]     # the last round is always evaluated
            row = {"method": m, "depth": int(last["depth"]), "width": int(last["width"]), "target_accuracy": target,
                   "time_to_target_sim_s": time_to_target(g, target, "sim_s"),
                   "time_to_target_wall_s": time_to_target(g, target, "wall_train_s"),
                   "final_accuracy": float(last["accuracy"]), "bytes_total": int(last["bytes_total"]), "seed": seed}
            for n in DEVICES:
                row[f"time_to_target_sim_s_{n}"] = time_to_target(g, target, f"sim_s_{n}")
            row["total_sim_s"] = float(last["sim_s"])
            for n in DEVICES:
                row[f"total_sim_s_{n}"] = float(last[f"sim_s_{n}"])
            row["rounds"] = int(last["round"])
            row["best_accuracy"] = float(g["accuracy"].max())
            row["wall_train_per_round_s"] = float(g["wall_train_round_s"].mean())
            rows.append(row)
        fixed = [r for r in rows if r["seed"] == seed and r["method"].startswith("fixed_")]
        if fixed:   # the grid's best in hindsight: fastest to the target, else the most accurate at the end
            best = min(fixed, key=lambda r: (np.isnan(r["time_to_target_sim_s"]),
                                             np.nan_to_num(r["time_to_target_sim_s"], nan=0.0), -r["final_accuracy"]))
            rows.append(dict(best, method="oracle_fixed", picked=best["method"]))
    df = pd.DataFrame(rows)
    if "picked" not in df:
        df["picked"] = np.nan
    extra = [c for c in df.columns if c not in SUMMARY_COLUMNS]
    return df[SUMMARY_COLUMNS + extra]


# -- claims --------------------------------------------------------------------------------------------

def _speedup(s_row: pd.Series, base_row: pd.Series, col: str = "time_to_target_sim_s") -> tuple[float, str]:
    """(speed-up of `s_row` over `base_row` to the target, its text). A baseline that never reaches the
    target gives a lower bound: its whole simulated run / our time to target."""
    ours, base = s_row[col], base_row[col]
    if np.isnan(ours):
        return float("nan"), "autofednlp did not reach the target"
    if np.isnan(base):
        total = base_row[col.replace("time_to_target_sim_s", "total_sim_s")]
        return total / ours, f">= {total / ours:.1f}x ({base_row['method']} not at the target after {int(base_row['rounds'])} rounds)"
    return base / ours, f"{base / ours:.1f}x ({base:.0f} s vs {ours:.0f} s simulated)"


def compute_claims(summary: pd.DataFrame, trace: pd.DataFrame, s: dict) -> pd.DataFrame:
    claims = []
    for seed, g in summary.groupby("seed", sort=False):
        by = g.set_index("method")
        if "autofednlp" not in by.index:
            continue
        a = by.loc["autofednlp"]
        tag = f"seed {seed}, target accuracy {a['target_accuracy']:.3f}, device {s['device']}"
        if "full_ft" in by.index:
            x, text = _speedup(a, by.loc["full_ft"])
            claims.append(Claim(f"faster to the target than vanilla full fine-tuning ({tag})",
                                "up to 155.5x faster than vanilla FedNLP (BERT-base, AG News, their devices)",
                                text, bool(x > 1)))
        if "oracle_fixed" in by.index:
            o = by.loc["oracle_fixed"]
            x, text = _speedup(a, o)
            claims.append(Claim(f"faster than the best fixed configuration chosen in hindsight ({tag})",
                                "up to 48x faster than strong fixed-configuration baselines",
                                f"{text}; best fixed = {o['picked']}", bool(x > 1)))
            fixed = g[g["method"].str.startswith("fixed_")]
            ups = [_speedup(a, r)[0] for _, r in fixed.iterrows()]
            beaten = sum(u > 1 for u in ups if not np.isnan(u))
            claims.append(Claim(f"faster than fixed configurations on the grid ({tag})",
                                "faster than every fixed configuration",
                                f"faster than {beaten} of {len(ups)}; speed-ups " + ", ".join(
                                    f"{m}: {u:.2f}x" for m, u in zip(fixed["method"], ups)),
                                bool(beaten == len(ups))))
        for n in DEVICES:
            if n == s["device"] or "full_ft" not in by.index:
                continue
            x, text = _speedup(a, by.loc["full_ft"], f"time_to_target_sim_s_{n}")
            claims.append(Claim(f"faster than full fine-tuning on the {n} profile (seed {seed})",
                                "the speed-up holds across device profiles", text, bool(x > 1)))
        if "autofednlp_nocache" in by.index:
            t = trace[trace["seed"] == seed]
            c = t[t["method"] == "autofednlp"].reset_index(drop=True)
            nc = t[t["method"] == "autofednlp_nocache"].reset_index(drop=True)
            wall = nc["wall_train_round_s"].sum() / c["wall_train_round_s"].sum()
            sim = nc["sim_s"].iloc[-1] / c["sim_s"].iloc[-1]
            same_path = bool((c["groups"] == nc["groups"]).all())
            gap = float((c["accuracy"] - nc["accuracy"]).abs().max())
            claims.append(Claim(f"activation caching speeds up client training (seed {seed})",
                                "caching the frozen bottom layers' outputs saves client compute",
                                f"measured on this CPU: {wall:.2f}x less client training wall time over "
                                f"{len(c)} rounds ({nc['wall_train_round_s'].mean():.2f} -> "
                                f"{c['wall_train_round_s'].mean():.2f} s per round); simulated: {sim:.2f}x; "
                                f"same configuration path: {'yes' if same_path else 'no'}, max accuracy "
                                f"difference {gap:.4f}", bool(wall > 1)))
    return claims_table(claims)


# -- figures -------------------------------------------------------------------------------------------

def _label(m: str) -> str:
    return {"autofednlp": "AutoFedNLP", "autofednlp_nocache": "AutoFedNLP (no cache)", "full_ft": "full FT (FedNLP)"
            }.get(m, m.replace("fixed_d", "fixed d=").replace("_w", ", w="))


def make_figures(res: AutoFedNlpResult, out: Path) -> dict:
    import matplotlib
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    matplotlib.rcParams.update({"font.size": 9})
    s, figs = res.settings, {}
    seed = s["seeds"][0]
    tr = res.trace[res.trace["seed"] == seed]
    target = float(res.summary.loc[res.summary["seed"] == seed, "target_accuracy"].iloc[0])
    methods = list(dict.fromkeys(tr["method"]))
    colors = {m: matplotlib.colormaps["tab10"](i % 10) for i, m in enumerate(methods)}

    # 1. accuracy vs simulated time, one panel per device profile (the paper's main plot)
    fig, axes = plt.subplots(1, len(DEVICES), figsize=(5.2 * len(DEVICES), 3.6), squeeze=False)
    for ax, n in zip(axes[0], DEVICES):
        for m in methods:
            g = tr[tr["method"] == m].dropna(subset=["accuracy"])
            ls = "--" if m == "autofednlp_nocache" else "-"
            lw = 2.2 if m == "autofednlp" else 1.2
            ax.plot(g[f"sim_s_{n}"] / 3600, g["accuracy"], ls, lw=lw, marker="o", ms=2.5, color=colors[m],
                    label=_label(m))
        ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:.3f}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # decade labels only
        ax.set_xlabel(f"simulated time on {n} (hours, log)")
        ax.set_title(f"{s['task']}: accuracy vs simulated time ({n})")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy")
    axes[0, -1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    figs["accuracy_vs_sim_time"] = save_figure(fig, out, "accuracy_vs_sim_time.png")
    plt.close(fig)

    # 2. the configurator's (d, w) path over simulated time
    g = tr[tr["method"] == "autofednlp"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = g["sim_s"] / 3600
    ax.step(x, g["depth"], where="post", color="tab:blue", label="depth d (adapter layers)")
    ax.set_ylabel("depth d", color="tab:blue")
    ax.set_ylim(0, NUM_LAYERS + 0.5)
    ax2 = ax.twinx()
    ax2.step(x, g["width"], where="post", color="tab:orange", label="width w")
    ax2.set_ylabel("width w (bottleneck)" if s["tuner"] == "adapter" else "LoRA rank", color="tab:orange")
    ax2.set_ylim(0, s["max_width"] + 4)
    ax.set_xlabel(f"simulated time on {s['device']} (hours)")
    ax.set_title("AutoFedNLP: configuration in use (the winner at each period's end)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figs["config_path"] = save_figure(fig, out, "config_path.png")
    plt.close(fig)

    # 3. speed-up to the target of AutoFedNLP over each baseline (simulated, main device)
    sm = res.summary[res.summary["seed"] == seed].set_index("method")
    if "autofednlp" in sm.index:
        base = [m for m in sm.index if m not in ("autofednlp", "autofednlp_nocache")]
        ups = [_speedup(sm.loc["autofednlp"], sm.loc[m]) for m in base]
        fig, ax = plt.subplots(figsize=(6.5, 0.5 + 0.35 * len(base)))
        vals = [u[0] for u in ups]
        bars = ax.barh(range(len(base)), np.nan_to_num(vals, nan=0.0),
                       color=["tab:red" if m == "full_ft" else "tab:green" if m == "oracle_fixed" else "tab:gray"
                              for m in base])
        for i, (v, (_, text)) in enumerate(zip(vals, ups)):
            ax.text(v if v == v else 0, i, " " + (text.split(" (")[0] if v == v else "n/a"), va="center", fontsize=7)
        ax.set_yticks(range(len(base)), [_label(m) for m in base])
        ax.axvline(1, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"speed-up of AutoFedNLP to accuracy {target:.3f} (simulated, {s['device']})")
        fig.tight_layout()
        figs["speedup"] = save_figure(fig, out, "speedup.png")
        plt.close(fig)
    return figs
