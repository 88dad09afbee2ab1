"""Task arithmetic is one-shot FedAvg (Tao et al., 2024, arXiv 2411.18607), on MiniLM and offline text tasks.

The shared MiniLM encoder is fine-tuned separately on T text tasks from the same start theta_0 (same
LoRA init; each task keeps its own classifier head, since class counts differ: heads are never merged).
The task vectors tau_t = theta_t - theta_0 live on the shared trainable part: with LoRA, the dense update
``s B_t A_t`` of every wrapped base weight (:func:`fedbench.merging.lora_task_vector`); with full
fine-tuning (``tunings`` containing "full"), every encoder parameter. A merged model is theta_0 + tau
with tau from one of the merges of :mod:`fedbench.merging`, evaluated on each task with that task's head.

What runs, per tuning and seed (every training and every evaluation table cached by a config hash under
``runs_root()/task_arithmetic``, so an interrupted run resumes):

- ``homogeneous``: every task fine-tuned for `steps` steps at `lr`. Merges: task arithmetic (lam), FedNova,
  FedGMA (rho), coordinate median, CCLIP (rho), TIES, DARE -- each with lam (and rho) chosen on a
  validation split carved (seeded) from each task's train subsample, by the mean over tasks of
  validation accuracy / the individually fine-tuned model's validation accuracy (the authors' criterion);
  plus ``fedavg``: one FedAvg round with one client per task run through the core
  (:class:`fedbench.fl.Strategy`), and ``fedit``: the same round with LoRA factors averaged.
- equivalence: task arithmetic with lam = 1/T against that FedAvg round (equal weights: every task has
  the same number of training samples). Which FedAvg: with LoRA, averaging A and B separately (FedIT)
  gives mean(B) mean(A), not the mean of the task vectors s B_t A_t, so the statement "task arithmetic =
  one-shot FedAvg" is exact only for the FedAvg of the dense updates. That is the core's ``stack``
  semantics (``fl.lora_aggregation="stack"``, FLoRA): the server stacks the factors, folds the exact
  product average into the base weights and restarts the factors with B = 0. With full fine-tuning
  FedAvg is plainly linear in the parameters. The table shows the largest absolute difference of the two
  models' effective parameters (<= 1e-6) and the two models' test accuracies (identical); FedIT is
  reported beside it as a method of its own, since that is what naive LoRA FL does.
- ``hetero_training``: the same tasks trained for steps x `hetero_steps[t]` (and lr x `hetero_lr[t]`);
  FedNova reweights each tau_t by (mean steps / steps_t) / T as in the authors' code.
- pairs (data heterogeneity): every pair of tasks merged by task arithmetic (lam on validation), against
  the cosine similarity of their task vectors.
- rounds: FedAvg over the T task-clients for R rounds with `steps` / R local steps per round (the same
  total training as the one-shot merge; stack semantics; heads stay local), for R in `rounds`.

Normalised accuracy = merged model's test accuracy / the individually fine-tuned model's test accuracy
on that task (same setting, same seed).
"""
from __future__ import annotations

import io
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedbench import merging
from fedbench.config import (ConfigError, DataConfig, ExperimentConfig, FLConfig, ModelConfig, PeftConfig,
                             TrainConfig, config_hash)
from fedbench.experiments.common import (Claim, claims_table, is_int, is_number, load_profiles, mean_std, output_dir,
                                         profile_settings, runs_root, save_figure, save_table)
from fedbench.fl.seeding import derive_seed, rng_for

EXPERIMENT = "task_arithmetic"
STORE_VERSION = 1        # bump when a cached unit's computation changes
TUNINGS = ("lora", "full")
# merges with hyperparameters chosen on validation; fedavg / fedit are one FedAvg round (no hyperparameter)
TUNED = ("task_arithmetic", "fednova", "fedgma", "median", "cclip", "ties", "dare")
METHODS = ("task_arithmetic", "fedavg", "fedit", "fednova", "fedgma", "median", "cclip", "ties", "dare")
LABELS = {"individual": "individual fine-tuning", "pretrained": "theta_0 + own heads", "fedavg": "FedAvg, 1 round",
          "fedit": "FedIT (factor avg), 1 round", "task_arithmetic": "task arithmetic", "fednova": "FedNova",
          "fedgma": "FedGMA", "median": "median", "cclip": "CCLIP", "ties": "TIES", "dare": "DARE"}
FL_INSPIRED = ("fednova", "fedgma", "median", "cclip")
QUICK_TASKS = ("rt_sentiment", "tweet_sentiment", "subjectivity", "wordnet_verb")
SUMMARY_COLUMNS = ["method", "lambda", "rho", "setting", "task", "accuracy", "normalized_accuracy", "seed", "tuning"]

# the profiles live in configs/task_arithmetic/{smoke,quick,full}.yaml
DEFAULTS = load_profiles(EXPERIMENT)


# -- parameters --------------------------------------------------------------------------------------

def _tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else x


def _check_numbers(s, key, ok, allowed, allow_empty=False):
    v = s[key]
    if not isinstance(v, tuple) or (not v and not allow_empty) or not all(is_number(x) and ok(x) for x in v):
        raise ConfigError(key, v, allowed)


def settings_for(profile: str = "quick", **overrides) -> dict:
    """The profile's settings with `overrides` on top, every value checked (ConfigError otherwise)."""
    from fedbench.data import list_tasks
    s = profile_settings(DEFAULTS, profile, overrides)
    for key in ("tasks", "seeds", "tunings", "lambdas", "gma_rhos", "ties_densities", "dare_drops", "hetero_steps",
                "hetero_lr", "methods", "hetero_methods", "rounds"):
        s[key] = _tuple(s[key])
    text_tasks = [t.name for t in list_tasks() if t.offline and t.modality == "text"]
    if (not isinstance(s["tasks"], tuple) or len(s["tasks"]) < 2 or len(set(s["tasks"])) != len(s["tasks"])
            or any(t not in text_tasks for t in s["tasks"])):
        raise ConfigError("tasks", s["tasks"], f"at least 2 distinct offline text tasks from {text_tasks}")
    T = len(s["tasks"])
    if is_int(s["seeds"]):
        s["seeds"] = (int(s["seeds"]),)
    if (not isinstance(s["seeds"], tuple) or not s["seeds"] or len(set(s["seeds"])) != len(s["seeds"])
            or any(not is_int(x) or x < 0 for x in s["seeds"])):
        raise ConfigError("seeds", s["seeds"], "a non-empty list of distinct integers >= 0")
    if not isinstance(s["tunings"], tuple) or not s["tunings"] or any(t not in TUNINGS for t in s["tunings"]):
        raise ConfigError("tunings", s["tunings"], f"a non-empty subset of {list(TUNINGS)}")
    for key, low in [("rank", 1), ("max_length", 8), ("batch_size", 1), ("train_samples", 2), ("val_samples", 1),
                     ("test_samples", 1), ("steps", 1), ("cclip_rhos", 1), ("rounds_seeds", 0)]:
        if not is_int(s[key]) or s[key] < low:
            raise ConfigError(key, s[key], f"an integer >= {low}")
    if s["depth"] is not None and (not is_int(s["depth"]) or s["depth"] < 1):
        raise ConfigError("depth", s["depth"], "None (every layer) or an integer >= 1")
    for key in ("lr", "full_lr", "lora_alpha"):
        if not is_number(s[key]) or not s[key] > 0:
            raise ConfigError(key, s[key], "a number > 0")
    _check_numbers(s, "lambdas", lambda x: x >= 0, "a non-empty list of numbers >= 0")
    _check_numbers(s, "gma_rhos", lambda x: 0 <= x <= 1, "a non-empty list of numbers in [0, 1]")
    _check_numbers(s, "ties_densities", lambda x: 0 < x <= 1, "a non-empty list of numbers in (0, 1]")
    _check_numbers(s, "dare_drops", lambda x: 0 <= x < 1, "a non-empty list of numbers in [0, 1)")
    _check_numbers(s, "hetero_steps", lambda x: x > 0, f"one step multiplier > 0 per task ({T})", allow_empty=True)
    if len(s["hetero_steps"]) not in (0, T):
        raise ConfigError("hetero_steps", s["hetero_steps"], f"one step multiplier > 0 per task ({T}), or () for none")
    if s["hetero_lr"] is not None:
        _check_numbers(s, "hetero_lr", lambda x: x > 0, f"None or one lr multiplier > 0 per task ({T})")
        if len(s["hetero_lr"]) != T or not s["hetero_steps"]:
            raise ConfigError("hetero_lr", s["hetero_lr"],
                              f"None or one lr multiplier > 0 per task ({T}), with hetero_steps given")
    for key in ("methods", "hetero_methods"):
        if not isinstance(s[key], tuple) or any(m not in METHODS for m in s[key]):
            raise ConfigError(key, s[key], f"a subset of {list(METHODS)}")
    if not isinstance(s["rounds"], tuple) or any(not is_int(r) or not 1 <= r <= s["steps"] for r in s["rounds"]):
        raise ConfigError("rounds", s["rounds"], f"a list of integers in [1, steps={s['steps']}] (or empty)")
    if not isinstance(s["pairs"], bool):
        raise ConfigError("pairs", s["pairs"], "True or False")
    return s


# -- one task: data, model, caches --------------------------------------------------------------------

class TaskContext:
    """One task under one (tuning, seed): its data (train / validation / test), its model (shared encoder
    + its own head) and the frozen-prefix activation caches. One model per task, loaded with whatever
    state is being trained or evaluated."""

    def __init__(self, cfg: ExperimentConfig, index: int, val_samples: int):
        from fedbench.fl import prepare_data
        from fedbench.fl.server import LoraBase
        from fedbench.models import build_model, lora_modules, trainable_state
        from fedbench.models.inputs import ActivationCache
        self.cfg, self.index, self.name = cfg, index, cfg.data.task
        self.data = prepare_data(cfg)
        idx = np.asarray(self.data.client_indices[0])
        # the validation split: a seeded carve of the train subsample, never the test split
        perm = rng_for(cfg.seed, "subsample", 2).permutation(idx)
        self.val_idx, self.train_idx = np.sort(perm[:val_samples]), np.sort(perm[val_samples:])
        # the same init seed for every task: theta_0 (and the LoRA A init) is shared; heads differ in shape
        self.model = build_model(cfg.model, cfg.peft, self.data.num_labels, seed=derive_seed(cfg.seed, "init"))
        self.init_state = trainable_state(self.model)
        self.head_keys = [k for k in self.init_state if k.startswith("classifier.")]
        self.shared_keys = [k for k in self.init_state if k not in self.head_keys]
        self.modules = lora_modules(self.model) if cfg.peft.method == "lora" else []
        self.base = LoraBase(self.model)
        self.train_cache = ActivationCache(self.data.train, self.data.pad_id)
        self.test_cache = ActivationCache(self.data.test, self.data.pad_id)
        self._zero = {m.base_key: torch.zeros_like(self.model.get_parameter(m.base_key)) for m in self.modules}
        self.set_base({})

    def shared(self, state: dict) -> dict:
        return {k: state[k] for k in self.shared_keys}

    def head(self, state: dict) -> dict:
        return {k: state[k] for k in self.head_keys}

    def set_base(self, base_delta: dict) -> None:
        """Frozen base weights = W_0 + base_delta (every LoRA-wrapped weight set, missing keys to W_0)."""
        self.base.load({k: base_delta.get(k, z) for k, z in self._zero.items()})

    def load(self, base_delta: dict, shared: dict, head: dict) -> None:
        from fedbench.models import load_trainable_state
        self.set_base(base_delta)
        load_trainable_state(self.model, {**shared, **head})

    def load_merged(self, tv: dict, head: dict) -> None:
        """theta_0 + tv with this task's `head`: a delta on a trainable parameter (full fine-tuning) is added
        to it; a delta on a frozen base weight (LoRA) goes into the base, the factors restart at init (B = 0)."""
        shared, base = self.shared(self.init_state), {}
        for k, v in tv.items():
            if k in shared:
                shared[k] = shared[k] + v
            else:
                base[k] = v
        self.load(base, shared, head)

    def evaluate(self, split: str) -> float:
        from fedbench.fl import evaluate
        # batches of 64: on a 2-core CPU ~30 % faster than the default 256 (smaller activations stay in cache)
        if split == "val":
            ev = evaluate(self.model, self.data.train, self.val_idx, batch_size=64, cache=self.train_cache,
                          pad_id=self.data.pad_id)
        else:
            ev = evaluate(self.model, self.data.test, self.data.test_indices, batch_size=64, cache=self.test_cache,
                          pad_id=self.data.pad_id)
        return float(ev["accuracy"])

    def effective_parameters(self) -> dict:
        """What the loaded model computes with, on the shared part: W + s B A per LoRA layer, or the
        shared parameters themselves (full fine-tuning)."""
        params = dict(self.model.named_parameters())
        if self.modules:
            return {m.base_key: params[m.base_key].detach() + m.scaling * (params[m.b_key] @ params[m.a_key]).detach()
                    for m in self.modules}
        return {k: params[k].detach().clone() for k in self.shared_keys}

    def task_vector(self, state: dict) -> dict:
        if self.modules:
            return merging.lora_task_vector(state, self.modules, self.init_state)
        return merging.state_task_vector(state, self.init_state, self.shared_keys)


@dataclass
class FineTune:
    """One task trained from theta_0: its trainable state (shared part + head) and how it was trained."""
    key: str
    state: dict
    num_steps: int
    train_loss: float


# -- cached units ---------------------------------------------------------------------------------------

def _store() -> Path:
    return runs_root() / EXPERIMENT


def _cached_table(kind: str, key: dict, compute) -> pd.DataFrame:
    """A DataFrame keyed by `key`: loaded if stored, else computed and written atomically (always returned
    as read back from disk, so a first run and a rerun give byte-identical tables)."""
    from fedbench.results import atomic_write_csv, atomic_write_json
    d = _store() / kind / config_hash({"version": STORE_VERSION, **key})
    path = d / "table.csv"
    if not path.exists():
        df = compute()
        atomic_write_json(d / "key.json", key)
        atomic_write_csv(path, df)
    return pd.read_csv(path)


class Suite:
    """Every task of one (tuning, seed): lazily built contexts and cached fine-tunes."""

    def __init__(self, s: dict, tuning: str, seed: int, log=print):
        self.s, self.tuning, self.seed, self.log = s, tuning, seed, log
        self.tasks = list(s["tasks"])
        self._ctx: dict[int, TaskContext] = {}
        self._finetunes: dict[str, FineTune] = {}
        self._acc: dict[tuple, float] = {}
        self._rounds: dict[tuple, object] = {}

    @property
    def lr(self) -> float:
        return self.s["full_lr"] if self.tuning == "full" else self.s["lr"]

    def task_config(self, t: int, steps: int | None = None, lr: float | None = None) -> ExperimentConfig:
        s = self.s
        return ExperimentConfig(
            name=EXPERIMENT, seed=self.seed,
            data=DataConfig(task=self.tasks[t], num_clients=1, partition="iid",
                            max_train_samples=s["train_samples"] + s["val_samples"],
                            max_test_samples=s["test_samples"], max_length=s["max_length"]),
            model=ModelConfig(),
            peft=PeftConfig(method=self.tuning, rank=s["rank"], lora_alpha=float(s["lora_alpha"]),
                            depth=s["depth"] if self.tuning == "lora" else None),
            train=TrainConfig(local_steps=int(steps or s["steps"]), batch_size=s["batch_size"],
                              lr=float(lr or self.lr)),
            fl=FLConfig(rounds=1))

    def ctx(self, t: int) -> TaskContext:
        if t not in self._ctx:
            self._ctx[t] = TaskContext(self.task_config(t), t, self.s["val_samples"])
        return self._ctx[t]

    def any_ctx(self) -> TaskContext:
        return self._ctx[min(self._ctx)] if self._ctx else self.ctx(0)

    # training
    def finetune_key(self, t: int, steps: int, lr: float) -> str:
        return config_hash({"version": STORE_VERSION, "kind": "finetune", "task_index": t,
                            "val_samples": self.s["val_samples"], "config": self.task_config(t, steps, lr).to_dict()})

    def finetune(self, t: int, steps: int, lr: float | None = None) -> FineTune:
        """Task t trained from theta_0 for `steps` steps (the client seed of round 1: this is also what a
        task-client does in the first FedAvg round). Cached on disk by its config hash."""
        from fedbench.fl import train_client
        from fedbench.results import atomic_write_bytes, atomic_write_json
        lr = float(lr or self.lr)
        key = self.finetune_key(t, steps, lr)
        if key in self._finetunes:
            return self._finetunes[key]
        d = _store() / "finetune" / key
        if (d / "info.json").exists():
            info = json.loads((d / "info.json").read_text())
            state = torch.load(d / "state.pt", weights_only=True)
        else:
            ctx = self.ctx(t)
            start = time.perf_counter()
            ctx.set_base({})
            u = train_client(ctx.model, ctx.init_state, ctx.data.train, ctx.train_idx,
                             self.task_config(t, steps, lr).train, seed=derive_seed(self.seed, "client", 1, t),
                             client_id=t, cache=ctx.train_cache, pad_id=ctx.data.pad_id)
            state = u.state
            buf = io.BytesIO()
            torch.save(dict(state), buf)
            atomic_write_bytes(d / "state.pt", buf.getvalue())
            info = {"task": self.tasks[t], "num_steps": u.num_steps, "train_loss": u.train_loss,
                    "config": self.task_config(t, steps, lr).to_dict()}
            atomic_write_json(d / "info.json", info)     # last: marks the fine-tune finished
            self.log(f"  [{self.tuning} seed {self.seed}] fine-tuned {self.tasks[t]}: {u.num_steps} steps, "
                     f"lr {lr:g}, loss {u.train_loss:.3f} ({time.perf_counter() - start:.0f} s)")
        ft = FineTune(key, state, int(info["num_steps"]), float(info["train_loss"]))
        self._finetunes[key] = ft
        return ft

    # evaluation
    def accuracy(self, t: int, split: str, tv: dict | None = None, head: dict | None = None,
                 model: tuple | None = None) -> float:
        """Accuracy of task t's model: theta_0 + tv with `head`, or `model` = (base_delta, shared, head)."""
        ctx = self.ctx(t)
        if model is not None:
            ctx.load(*model)
        else:
            ctx.load_merged(tv, head)
        return ctx.evaluate(split)

    def individual_accuracy(self, t: int, ft: FineTune, split: str) -> float:
        k = (ft.key, split)
        if k not in self._acc:
            ctx = self.ctx(t)
            self._acc[k] = self.accuracy(t, split, model=({}, ctx.shared(ft.state), ctx.head(ft.state)))
        return self._acc[k]

    def task_vectors(self, ids, fts) -> list[dict]:
        return [self.ctx(t).task_vector(ft.state) for t, ft in zip(ids, fts)]

    # the core's FedAvg round
    def strategy(self, lora_aggregation: str, rounds: int = 1):
        from fedbench.fl import LoraLayout, Strategy
        ctx = self.any_ctx()
        semantics = lora_aggregation if ctx.modules else "factors"
        return Strategy(FLConfig(rounds=rounds, aggregator="fedavg", lora_aggregation=semantics),
                        LoraLayout(ctx.modules), self.s["rank"], seed=self.seed)

    def fedavg_round(self, ids, fts, lora_aggregation: str = "stack"):
        """One FedAvg round of the core (:meth:`Strategy.aggregate`) with one client per task, each client
        reporting its fine-tuned shared state; weights = sample counts (equal here)."""
        from fedbench.fl import ClientUpdate, GlobalModel
        memo = (lora_aggregation, tuple(ids), tuple(ft.key for ft in fts))
        if memo in self._rounds:
            return self._rounds[memo]
        ctx = self.any_ctx()
        g0 = GlobalModel(ctx.shared(ctx.init_state))
        updates = [ClientUpdate(client_id=t, state=ctx.shared(ft.state), num_samples=len(self.ctx(t).train_idx),
                                num_steps=ft.num_steps, train_loss=ft.train_loss, wall_s=0.0)
                   for t, ft in zip(ids, fts)]
        g1, _ = self.strategy(lora_aggregation).aggregate(g0, updates, round_idx=1)
        self._rounds[memo] = g1
        return g1

    def round_accuracy(self, ids, fts, lora_aggregation: str, t: int, head: dict) -> float:
        """Test accuracy on task t of the one-round FedAvg model (memoised: the merge table and the
        equivalence table both need it)."""
        k = ("round", lora_aggregation, tuple(ids), tuple(ft.key for ft in fts), t)
        if k not in self._acc:
            g = self.fedavg_round(ids, fts, lora_aggregation)
            self._acc[k] = self.accuracy(t, "test", model=(g.base_delta, g.state, head))
        return self._acc[k]


# -- merges ---------------------------------------------------------------------------------------------

def _grid(method: str, s: dict, tvs) -> list[tuple[float, float]]:
    """(lambda, rho) pairs searched on validation; rho = the method's second hyperparameter (FedGMA
    threshold, CCLIP radius, TIES density, DARE drop rate) or NaN."""
    lams = [float(x) for x in s["lambdas"]]
    if method == "fedgma":
        rhos = [float(x) for x in s["gma_rhos"]]
    elif method == "cclip":       # the authors' range: linspace(min ||tau_t||, max ||tau_t||), endpoint excluded
        norms = [merging.norm(tv) for tv in tvs]
        rhos = [float(x) for x in np.linspace(min(norms), max(norms), s["cclip_rhos"], endpoint=False)]
    elif method == "ties":
        rhos = [float(x) for x in s["ties_densities"]]
    elif method == "dare":
        rhos = [float(x) for x in s["dare_drops"]]
    else:
        rhos = [float("nan")]
    return [(lam, rho) for rho in rhos for lam in lams]


def merge(method: str, tvs, lam: float, rho: float, steps, seed: int) -> dict:
    """The merged task vector of `method` (see :mod:`fedbench.merging.task_vectors` for the formulas)."""
    if method == "task_arithmetic":
        return merging.task_arithmetic(tvs, lam)
    if method == "fednova":
        return merging.fednova(tvs, list(steps), lam)
    if method == "fedgma":
        return merging.fedgma(tvs, rho, lam)
    if method == "median":
        return merging.median(tvs, lam)
    if method == "cclip":
        return merging.cclip(tvs, rho, lam)
    if method == "ties":
        return merging.ties(tvs, rho, lam)
    if method == "dare":
        return merging.dare(tvs, rho, lam, seed=derive_seed(seed, "merge", 0))
    raise ConfigError("method", method, f"one of {list(TUNED)}")


def merge_setting(suite: Suite, setting: str, ids, steps, lrs, methods) -> pd.DataFrame:
    """Every method of `methods` on the tasks `ids` fine-tuned with `steps` / `lrs`: validation accuracy of
    every grid point, test accuracy of the selected one. Rows: method, lambda, rho, split, task, accuracy
    (+ selected). Cached by the fine-tunes' keys and the grids."""
    s = suite.s
    if suite.tuning == "full":
        methods = [m for m in methods if m != "fedit"]
    fts = [suite.finetune(t, st, lr) for t, st, lr in zip(ids, steps, lrs)]
    key = {"kind": "merge", "setting": setting, "finetunes": [ft.key for ft in fts], "methods": list(methods),
           "grids": {k: s[k] for k in ("lambdas", "gma_rhos", "cclip_rhos", "ties_densities", "dare_drops")},
           "pretrained": setting == "homogeneous"}

    def compute() -> pd.DataFrame:
        start = time.perf_counter()
        rows = []

        def add(method, lam, rho, split, t, acc, selected=True):
            rows.append({"method": method, "lambda": lam, "rho": rho, "split": split, "task": suite.tasks[t],
                         "accuracy": acc, "selected": selected})

        nan = float("nan")
        tvs = suite.task_vectors(ids, fts)
        heads = [suite.ctx(t).head(ft.state) for t, ft in zip(ids, fts)]
        individual = {(t, sp): suite.individual_accuracy(t, ft, sp)
                      for t, ft in zip(ids, fts) for sp in ("val", "test")}
        for (t, sp), acc in individual.items():
            add("individual", nan, nan, sp, t, acc)
        zero = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
        if key["pretrained"]:
            for t, h in zip(ids, heads):
                add("pretrained", 0.0, nan, "test", t, suite.accuracy(t, "test", zero, h))
        num_steps = [ft.num_steps for ft in fts]
        for method in methods:
            if method in ("fedavg", "fedit"):
                semantics = "stack" if method == "fedavg" else "factors"
                for t, h in zip(ids, heads):
                    add(method, 1.0 / len(ids) if method == "fedavg" else nan, nan, "test", t,
                        suite.round_accuracy(ids, fts, semantics, t, h))
                continue
            grid = _grid(method, s, tvs)
            scores = []
            for lam, rho in grid:
                tv = merge(method, tvs, lam, rho, num_steps, suite.seed)
                accs = [suite.accuracy(t, "val", tv, h) for t, h in zip(ids, heads)]
                for t, acc in zip(ids, accs):
                    add(method, lam, rho, "val", t, acc, selected=False)
                scores.append(np.mean([a / max(individual[(t, "val")], 1e-12) for t, a in zip(ids, accs)]))
            best = int(np.argmax(scores))       # first best in grid order
            lam, rho = grid[best]
            for r in rows:
                if r["method"] == method and r["split"] == "val" and r["lambda"] == lam and (
                        r["rho"] == rho or (math.isnan(r["rho"]) and math.isnan(rho))):
                    r["selected"] = True
            tv = merge(method, tvs, lam, rho, num_steps, suite.seed)
            for t, h in zip(ids, heads):
                add(method, lam, rho, "test", t, suite.accuracy(t, "test", tv, h))
        suite.log(f"  [{suite.tuning} seed {suite.seed}] merged '{setting}' ({', '.join(methods)}): "
                  f"{time.perf_counter() - start:.0f} s")
        return pd.DataFrame(rows)

    return _cached_table("merge", key, compute)


def equivalence(suite: Suite, ids) -> pd.DataFrame:
    """Task arithmetic with lam = p_t (= 1/T: equal sample counts) vs one FedAvg round of the core with one
    client per task; FedIT (factor averaging) beside it. Per task: the largest absolute difference of the
    effective shared parameters, and the test accuracies."""
    s = suite.s
    fts = [suite.finetune(t, s["steps"]) for t in ids]
    key = {"kind": "equivalence", "finetunes": [ft.key for ft in fts]}

    def compute() -> pd.DataFrame:
        tvs = suite.task_vectors(ids, fts)
        n = [len(suite.ctx(t).train_idx) for t in ids]
        p = [x / sum(n) for x in n]
        ta = merging.weighted_sum(tvs, p)                   # = task_arithmetic(tvs, 1/T) when sizes are equal
        if len(set(n)) == 1:
            ta = merging.task_arithmetic(tvs, 1.0 / len(ids))
        fa = suite.fedavg_round(ids, fts, "stack")
        rows = []
        ctx0 = suite.ctx(ids[0])
        fa_tv = _global_task_vector(ctx0, fa)
        fit = suite.fedavg_round(ids, fts, "factors") if ctx0.modules else None
        for t, ft in zip(ids, fts):
            ctx, head = suite.ctx(t), suite.ctx(t).head(ft.state)
            ctx.load_merged(ta, head)
            w_ta, acc_ta = ctx.effective_parameters(), ctx.evaluate("test")
            ctx.load(fa.base_delta, fa.state, head)
            w_fa, acc_fa = ctx.effective_parameters(), suite.round_accuracy(ids, fts, "stack", t, head)
            row = {"task": suite.tasks[t], "lambda": 1.0 / len(ids),
                   "max_abs_param_diff": max(float((w_ta[k] - w_fa[k]).abs().max()) for k in w_ta),
                   "max_abs_delta_diff": max(float((ta[k] - fa_tv[k]).abs().max()) for k in ta),
                   "accuracy_task_arithmetic": acc_ta, "accuracy_fedavg": acc_fa,
                   "same_accuracy": acc_ta == acc_fa}
            if fit is not None:
                fit_tv = _global_task_vector(ctx, fit)
                num = math.sqrt(sum(float((fit_tv[k] - fa_tv[k]).double().pow(2).sum()) for k in fa_tv))
                row.update(fedit_max_abs_delta_diff=max(float((fit_tv[k] - fa_tv[k]).abs().max()) for k in fa_tv),
                           fedit_rel_delta_diff=num / max(merging.norm(fa_tv), 1e-30),
                           accuracy_fedit=suite.round_accuracy(ids, fts, "factors", t, head))
            rows.append(row)
        return pd.DataFrame(rows)

    return _cached_table("equivalence", key, compute)


def geometry(suite: Suite, ids) -> pd.DataFrame:
    """Cosine similarity of every pair of task vectors (homogeneous fine-tunes) and their norms."""
    fts = [suite.finetune(t, suite.s["steps"]) for t in ids]

    def compute() -> pd.DataFrame:
        tvs = suite.task_vectors(ids, fts)
        cm, norms = merging.cosine_matrix(tvs), [merging.norm(tv) for tv in tvs]
        return pd.DataFrame([{"a": a, "b": b, "cosine": float(cm[i, j]), "norm_a": norms[i]}
                             for i, a in enumerate(ids) for j, b in enumerate(ids)])

    return _cached_table("geometry", {"kind": "geometry", "finetunes": [ft.key for ft in fts]}, compute)


def _global_task_vector(ctx: TaskContext, g) -> dict:
    """The dense task vector a global model carries: base delta + s (B A - B_0 A_0) per LoRA layer, or
    state - theta_0 (full fine-tuning)."""
    from fedbench.models import lora_delta
    if ctx.modules:
        return {m.base_key: g.base_delta.get(m.base_key, 0) + lora_delta(g.state, m) - lora_delta(ctx.init_state, m)
                for m in ctx.modules}
    return {k: g.state[k] - ctx.init_state[k] for k in ctx.shared_keys}


def federated_rounds(suite: Suite, ids, rounds: int) -> pd.DataFrame:
    """FedAvg across the task-clients for `rounds` rounds of steps // rounds local steps each (heads stay
    on their clients, the shared part is aggregated by the core's Strategy, stack semantics for LoRA).
    Round 1 from theta_0 is exactly a fine-tune (same seed), so it comes from the fine-tune cache."""
    from fedbench.fl import ClientUpdate, GlobalModel, train_client
    s = suite.s
    per_round = max(1, s["steps"] // rounds)
    key = {"kind": "rounds", "rounds": rounds, "first": [suite.finetune_key(t, per_round, suite.lr) for t in ids]}

    def compute() -> pd.DataFrame:
        start = time.perf_counter()
        ctx0 = suite.any_ctx()
        strategy = suite.strategy("stack", rounds)
        g = GlobalModel(ctx0.shared(ctx0.init_state))
        heads = {}
        for r in range(1, rounds + 1):
            updates = []
            for t in ids:
                ctx = suite.ctx(t)
                if r == 1:
                    ft = suite.finetune(t, per_round)
                    state, steps, loss = ft.state, ft.num_steps, ft.train_loss
                else:
                    ctx.set_base(g.base_delta)
                    u = train_client(ctx.model, {**g.state, **heads[t]}, ctx.data.train, ctx.train_idx,
                                     suite.task_config(t, per_round).train,
                                     seed=derive_seed(suite.seed, "client", r, t), client_id=t,
                                     cache=ctx.train_cache, pad_id=ctx.data.pad_id)
                    state, steps, loss = u.state, u.num_steps, u.train_loss
                heads[t] = ctx.head(state)
                updates.append(ClientUpdate(client_id=t, state=ctx.shared(state), num_samples=len(ctx.train_idx),
                                            num_steps=steps, train_loss=loss, wall_s=0.0))
            g, _ = strategy.aggregate(g, updates, round_idx=r)
        rows = [{"rounds": rounds, "steps_per_round": per_round, "task": suite.tasks[t],
                 "accuracy": suite.accuracy(t, "test", model=(g.base_delta, g.state, heads[t]))} for t in ids]
        suite.log(f"  [{suite.tuning} seed {suite.seed}] FedAvg {rounds} rounds x {per_round} steps: "
                  f"{time.perf_counter() - start:.0f} s")
        return pd.DataFrame(rows)

    return _cached_table("rounds", key, compute)


# -- the experiment -------------------------------------------------------------------------------------

@dataclass
class TaskArithmeticResult:
    settings: dict
    summary: pd.DataFrame          # one row per (method, lambda, rho, setting, task, seed, tuning): test accuracy
    equivalence: pd.DataFrame
    cosine: pd.DataFrame
    pairs: pd.DataFrame
    rounds: pd.DataFrame
    validation: pd.DataFrame
    claims: pd.DataFrame
    out_dir: Path
    wall_s: float

    def table(self) -> pd.DataFrame:
        """Mean (std over seeds) of the task-averaged accuracy and normalised accuracy, per method and setting."""
        return method_table(self.summary)


def method_table(summary: pd.DataFrame) -> pd.DataFrame:
    per_seed = (summary.groupby(["tuning", "setting", "method", "seed"], sort=False)
                [["accuracy", "normalized_accuracy", "lambda", "rho"]].mean().reset_index())
    g = per_seed.groupby(["tuning", "setting", "method"], sort=False)
    out = g.agg(accuracy=("accuracy", "mean"), normalized=("normalized_accuracy", "mean"),
                normalized_std=("normalized_accuracy", "std"), mean_lambda=("lambda", "mean"),
                mean_rho=("rho", "mean"), seeds=("seed", "count")).reset_index()
    return out


def run(profile: str = "quick", verbose: bool = True, **overrides) -> TaskArithmeticResult:
    """Run (or load) every unit of the experiment, write the tables, figures and claims, return them."""
    s = settings_for(profile, **overrides)
    log = print if verbose else (lambda *a, **k: None)
    out = output_dir(EXPERIMENT, profile)
    start = time.perf_counter()
    T = len(s["tasks"])
    ids = list(range(T))
    summary, eq, cos, pairs, rounds_rows, val = [], [], [], [], [], []
    for tuning in s["tunings"]:
        for si, seed in enumerate(s["seeds"]):
            suite = Suite(s, tuning, seed, log)
            lr = suite.lr
            settings = [("homogeneous", ids, [s["steps"]] * T, [lr] * T, s["methods"])]
            if s["hetero_steps"]:
                steps = [max(1, int(round(s["steps"] * m))) for m in s["hetero_steps"]]
                lrs = [lr * m for m in (s["hetero_lr"] or [1.0] * T)]
                settings.append(("hetero_training", ids, steps, lrs, s["hetero_methods"]))
            if s["pairs"]:
                for a, b in itertools.combinations(ids, 2):
                    settings.append((f"pair:{s['tasks'][a]}+{s['tasks'][b]}", [a, b], [s["steps"]] * 2, [lr] * 2,
                                     ("task_arithmetic",)))
            tables = {}
            for name, sub, steps, lrs, methods in settings:
                df = merge_setting(suite, name, sub, steps, lrs, methods)
                tables[name] = df
                for r in df[df["split"] == "val"].to_dict("records"):
                    val.append({"tuning": tuning, "seed": seed, "setting": name, "method": r["method"],
                                "lambda": r["lambda"], "rho": r["rho"], "task": r["task"], "accuracy": r["accuracy"],
                                "selected": bool(r["selected"])})
                test = df[df["split"] == "test"]
                ind = test[test["method"] == "individual"].set_index("task")["accuracy"]
                for r in test.to_dict("records"):
                    summary.append({"method": r["method"], "lambda": r["lambda"], "rho": r["rho"], "setting": name,
                                    "task": r["task"], "accuracy": r["accuracy"],
                                    "normalized_accuracy": r["accuracy"] / ind[r["task"]], "seed": seed,
                                    "tuning": tuning})
            e = equivalence(suite, ids)
            e.insert(0, "seed", seed)
            e.insert(0, "tuning", tuning)
            eq.append(e)
            # task-vector geometry of the homogeneous fine-tunes
            g = geometry(suite, ids)
            cm = g.pivot(index="a", columns="b", values="cosine").values
            for r in g.to_dict("records"):
                cos.append({"tuning": tuning, "seed": seed, "task_a": s["tasks"][r["a"]], "task_b": s["tasks"][r["b"]],
                            "cosine": r["cosine"], "norm_a": r["norm_a"]})
            for a, b in itertools.combinations(ids, 2):
                name = f"pair:{s['tasks'][a]}+{s['tasks'][b]}"
                if name in tables:
                    rows = [r for r in summary if r["setting"] == name and r["seed"] == seed and r["tuning"] == tuning
                            and r["method"] == "task_arithmetic"]
                    pairs.append({"tuning": tuning, "seed": seed, "task_a": s["tasks"][a], "task_b": s["tasks"][b],
                                  "cosine": float(cm[a, b]), "lambda": rows[0]["lambda"],
                                  "accuracy": float(np.mean([r["accuracy"] for r in rows])),
                                  "normalized_accuracy": float(np.mean([r["normalized_accuracy"] for r in rows]))})
            if si < s["rounds_seeds"]:
                ind = {r["task"]: r["accuracy"] for r in summary if r["setting"] == "homogeneous"
                       and r["seed"] == seed and r["tuning"] == tuning and r["method"] == "individual"}
                for R in s["rounds"]:
                    df = federated_rounds(suite, ids, R)
                    for r in df.to_dict("records"):
                        norm_acc = r["accuracy"] / ind[r["task"]]
                        rounds_rows.append({"tuning": tuning, "seed": seed, "rounds": R,
                                            "steps_per_round": r["steps_per_round"], "task": r["task"],
                                            "accuracy": r["accuracy"], "normalized_accuracy": norm_acc})
                        summary.append({"method": "fedavg", "lambda": 1.0 / T, "rho": float("nan"),
                                        "setting": f"rounds:{R}", "task": r["task"], "accuracy": r["accuracy"],
                                        "normalized_accuracy": norm_acc, "seed": seed, "tuning": tuning})
            del suite
    summary_df = pd.DataFrame(summary, columns=SUMMARY_COLUMNS)
    eq_df = pd.concat(eq, ignore_index=True)
    cos_df, pairs_df = pd.DataFrame(cos), pd.DataFrame(pairs)
    rounds_df, val_df = pd.DataFrame(rounds_rows), pd.DataFrame(val)
    claims = make_claims(summary_df, eq_df, pairs_df, rounds_df, s)
    for df, name in [(summary_df, "summary.csv"), (eq_df, "equivalence.csv"), (cos_df, "cosine.csv"),
                     (pairs_df, "pairs.csv"), (rounds_df, "rounds.csv"), (val_df, "validation.csv"),
                     (claims, "claims.csv")]:
        save_table(df, out, name)
    make_figures(summary_df, cos_df, pairs_df, rounds_df, s, out)
    wall = time.perf_counter() - start
    log(f"task_arithmetic [{profile}]: {wall:.0f} s -> {out}")
    return TaskArithmeticResult(s, summary_df, eq_df, cos_df, pairs_df, rounds_df, val_df, claims, out, wall)


# -- claims ---------------------------------------------------------------------------------------------

def _per_seed(summary: pd.DataFrame, tuning: str, setting: str, method: str, seeds=None) -> pd.Series:
    """Normalised accuracy averaged over tasks, per seed."""
    d = summary[(summary["tuning"] == tuning) & (summary["setting"] == setting) & (summary["method"] == method)]
    if seeds is not None:
        d = d[d["seed"].isin(list(seeds))]
    return d.groupby("seed")["normalized_accuracy"].mean()


def _task_mean(summary: pd.DataFrame, tuning: str, setting: str, method: str, seeds=None) -> float:
    """Normalised accuracy averaged over tasks, then over seeds."""
    v = _per_seed(summary, tuning, setting, method, seeds)
    return float(v.mean()) if len(v) else float("nan")


def _fmt(summary, tuning, setting, method, seeds=None) -> str:
    """'mean +- std over seeds' of the task-averaged normalised accuracy."""
    v = _per_seed(summary, tuning, setting, method, seeds)
    return f"{v.mean():.3f}" + (f" +- {v.std():.3f}" if len(v) > 1 else "")


def make_claims(summary, eq, pairs, rounds, s) -> pd.DataFrame:
    claims = []
    for tuning in s["tunings"]:
        tag = f" [{tuning}]" if len(s["tunings"]) > 1 else ""
        e = eq[eq["tuning"] == tuning]
        worst = float(e["max_abs_param_diff"].max())
        same = bool(e["same_accuracy"].all())
        claims.append(Claim(
            f"Task arithmetic with lambda = 1/T is one round of FedAvg{tag}",
            "theta_0 + (1/T) sum_t tau_t = FedAvg of the T task-clients: equal to floating-point precision",
            f"max |parameter difference| = {worst:.2e} over {len(e)} (task, seed); test accuracies identical: "
            f"{'yes' if same else 'no'}", worst <= 1e-6 and same))
        if "fedit_rel_delta_diff" in e and e["fedit_rel_delta_diff"].notna().any():
            rel = float(e["fedit_rel_delta_diff"].mean())
            fit = _task_mean(summary, tuning, "homogeneous", "fedit")
            fa = _task_mean(summary, tuning, "homogeneous", "fedavg")
            claims.append(Claim(
                f"Averaging LoRA factors (FedIT) is not FedAvg of the task vectors{tag}",
                "mean(B_t) mean(A_t) != mean(B_t A_t) (papers.md, LoRA aggregation)",
                f"||dW_FedIT - dW_FedAvg|| / ||dW_FedAvg|| = {rel:.3f}; normalised accuracy FedIT {fit:.3f} vs "
                f"FedAvg {fa:.3f}", rel > 1e-3))
        p = pairs[pairs["tuning"] == tuning] if len(pairs) else pairs
        if len(p) >= 3:
            pm = p.groupby(["task_a", "task_b"], sort=False)[["cosine", "normalized_accuracy"]].mean()
            r = (float(np.corrcoef(pm["cosine"], pm["normalized_accuracy"])[0, 1]) if pm["cosine"].std() > 0
                 else float("nan"))
            best, worst_pair = pm["cosine"].idxmax(), pm["cosine"].idxmin()
            claims.append(Claim(
                f"Data heterogeneity hurts the merge{tag}",
                "tasks whose updates point in different directions merge worse (dissimilar tasks lose more)",
                f"Pearson r(cosine of task vectors, pair normalised accuracy) = {r:.2f} over {len(pm)} pairs; most "
                f"similar {'+'.join(best)} (cos {pm['cosine'].max():.3f}): {pm.loc[best, 'normalized_accuracy']:.3f}; "
                f"least similar {'+'.join(worst_pair)} (cos {pm['cosine'].min():.3f}): "
                f"{pm.loc[worst_pair, 'normalized_accuracy']:.3f}", bool(r > 0)))
        homo = _task_mean(summary, tuning, "homogeneous", "task_arithmetic")
        het = _task_mean(summary, tuning, "hetero_training", "task_arithmetic")
        if not math.isnan(het):
            claims.append(Claim(
                f"Training heterogeneity hurts task arithmetic{tag}",
                "tasks trained with different numbers of steps / learning rates merge worse",
                f"task arithmetic normalised accuracy (mean +- std over seeds): homogeneous "
                f"{_fmt(summary, tuning, 'homogeneous', 'task_arithmetic')}, heterogeneous steps "
                f"{list(s['hetero_steps'])}: {_fmt(summary, tuning, 'hetero_training', 'task_arithmetic')}",
                het < homo))
            nova = _task_mean(summary, tuning, "hetero_training", "fednova")
            fa_het = _task_mean(summary, tuning, "hetero_training", "fedavg")
            if not math.isnan(nova):
                claims.append(Claim(
                    f"FedNova recovers from training heterogeneity{tag}",
                    "reweighting tau_t by (mean steps / steps_t) / T (FedNova) beats plain task arithmetic there",
                    f"heterogeneous setting: FedNova {_fmt(summary, tuning, 'hetero_training', 'fednova')} vs task "
                    f"arithmetic {_fmt(summary, tuning, 'hetero_training', 'task_arithmetic')} (FedAvg 1/T: "
                    f"{fa_het:.3f})", nova > het))
        ro = rounds[rounds["tuning"] == tuning] if len(rounds) else rounds
        if len(ro) and ro["rounds"].nunique() > 1:
            per = ro.groupby(["rounds", "seed"])["normalized_accuracy"].mean().groupby("rounds").mean()
            seeds = sorted(set(ro["seed"]))
            ta_same = _task_mean(summary, tuning, "homogeneous", "task_arithmetic", seeds)
            claims.append(Claim(
                f"More communication rounds close the gap{tag}",
                "several FedAvg rounds across the tasks beat the one-shot merge (same total local steps)",
                f"normalised accuracy by rounds (seeds {seeds}): "
                + ", ".join(f"R={int(k)}: {v:.3f}" for k, v in per.items())
                + f"; one-shot task arithmetic with tuned lambda, same seeds: {ta_same:.3f}",
                bool(per.iloc[-1] > per.iloc[0])))
        fl_methods = [m for m in FL_INSPIRED if m in s["methods"]]
        if fl_methods and "task_arithmetic" in s["methods"]:
            scores = {m: _task_mean(summary, tuning, "homogeneous", m) for m in fl_methods + ["ties", "dare"]
                      if m in s["methods"]}
            ta_seed = _per_seed(summary, tuning, "homogeneous", "task_arithmetic")
            # "beats" = higher task-averaged normalised accuracy in every seed (paired by seed), not just on average
            better = [m for m in fl_methods
                      if bool((_per_seed(summary, tuning, "homogeneous", m) - ta_seed).dropna().gt(0).all())]
            claims.append(Claim(
                f"FL-inspired merges can beat plain task arithmetic{tag}",
                "FedNova / FedGMA / median / CCLIP improve on task arithmetic (authors: in heterogeneous settings)",
                "homogeneous, normalised accuracy: task arithmetic "
                f"{_fmt(summary, tuning, 'homogeneous', 'task_arithmetic')}; "
                + ", ".join(f"{m} {_fmt(summary, tuning, 'homogeneous', m)}" for m in scores)
                + f". Better than task arithmetic in every seed: {', '.join(better) if better else 'none'}",
                bool(better)))
    return claims_table(claims)


# -- figures --------------------------------------------------------------------------------------------

def make_figures(summary, cos, pairs, rounds, s, out) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for tuning in s["tunings"]:
        sfx = "" if tuning == s["tunings"][0] else f"_{tuning}"
        d = summary[summary["tuning"] == tuning]
        # 1. normalised accuracy per method (bars over seeds)
        per_seed = (d.groupby(["setting", "method", "seed"], sort=False)["normalized_accuracy"].mean().reset_index())
        order = ["pretrained", "fedavg", "fedit", "task_arithmetic", "fednova", "fedgma", "median", "cclip", "ties",
                 "dare"]
        settings = [x for x in ("homogeneous", "hetero_training") if x in set(per_seed["setting"])]
        methods = [m for m in order if m in set(per_seed["method"])]
        fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(methods) + 1.5), 3.6))
        width = 0.8 / max(1, len(settings))
        for i, st in enumerate(settings):
            ms = mean_std(per_seed[per_seed["setting"] == st], ["method"], "normalized_accuracy").set_index("method")
            x = [j for j, m in enumerate(methods) if m in ms.index]
            vals = [ms.loc[m, "mean"] for m in methods if m in ms.index]
            err = [0 if np.isnan(ms.loc[m, "std"]) else ms.loc[m, "std"] for m in methods if m in ms.index]
            ax.bar(np.array(x) + (i - (len(settings) - 1) / 2) * width, vals, width, yerr=err, capsize=2,
                   label=st.replace("_", " "))
        ax.axhline(1.0, color="gray", ls="--", lw=1, label="individual fine-tuning")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([LABELS[m] for m in methods], rotation=35, ha="right", fontsize=8)
        lo = float(per_seed[per_seed["method"].isin(methods)]["normalized_accuracy"].min())
        ax.set_ylim(max(0.0, min(0.9, lo - 0.05)), 1.05)
        ax.set_ylabel("normalised accuracy\n(merged / individual)")
        ax.set_title(f"Merges of {len(s['tasks'])} task vectors ({tuning}); bars: std over seeds", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(axis="y", alpha=0.3)
        save_figure(fig, out, f"normalized_accuracy{sfx}.png")
        plt.close(fig)
        # 2. cosine similarity heatmap
        c = cos[cos["tuning"] == tuning].groupby(["task_a", "task_b"], sort=False)["cosine"].mean().unstack()
        c = c.loc[list(s["tasks"]), list(s["tasks"])]
        fig, ax = plt.subplots(figsize=(1.1 * len(c) + 1.5, 0.9 * len(c) + 1))
        off = c.values[~np.eye(len(c), dtype=bool)]
        vmin, vmax = min(0.0, off.min()), max(off.max(), 1e-6)
        im = ax.imshow(np.where(np.eye(len(c), dtype=bool), np.nan, c.values), cmap="viridis", vmin=vmin, vmax=vmax)
        for i in range(len(c)):
            for j in range(len(c)):
                light = i == j or (c.values[i, j] - vmin) / (vmax - vmin) > 0.6     # viridis is light at the top
                ax.text(j, i, f"{c.values[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        color="black" if light else "white")
        ax.set_xticks(range(len(c)))
        ax.set_xticklabels(c.columns, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(c)))
        ax.set_yticklabels(c.index, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, label="cosine (off-diagonal)")
        ax.set_title(f"Cosine similarity of task vectors ({tuning})", fontsize=9)
        save_figure(fig, out, f"cosine_similarity{sfx}.png")
        plt.close(fig)
        # 3. merged accuracy vs similarity (pairs)
        p = pairs[pairs["tuning"] == tuning] if len(pairs) else pairs
        if len(p):
            pm = p.groupby(["task_a", "task_b"], sort=False)[["cosine", "normalized_accuracy"]].agg(["mean", "std"])
            fig, ax = plt.subplots(figsize=(5.2, 3.6))
            ax.errorbar(pm[("cosine", "mean")], pm[("normalized_accuracy", "mean")],
                        yerr=pm[("normalized_accuracy", "std")].fillna(0), fmt="o", capsize=2)
            for (a, b), row in pm.iterrows():
                ax.annotate(f"{a}+{b}", (row[("cosine", "mean")], row[("normalized_accuracy", "mean")]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel("cosine similarity of the two task vectors")
            ax.set_ylabel("normalised accuracy of the pair merge")
            ax.set_title(f"Pairs merged by task arithmetic ({tuning})", fontsize=9)
            ax.grid(alpha=0.3)
            save_figure(fig, out, f"similarity_vs_accuracy{sfx}.png")
            plt.close(fig)
        # 4. accuracy vs number of rounds
        ro = rounds[rounds["tuning"] == tuning] if len(rounds) else rounds
        if len(ro):
            per = ro.groupby(["rounds", "seed"])["normalized_accuracy"].mean().reset_index()
            ms = mean_std(per, ["rounds"], "normalized_accuracy")
            fig, ax = plt.subplots(figsize=(5, 3.4))
            ax.errorbar(ms["rounds"], ms["mean"], yerr=ms["std"].fillna(0), marker="o", capsize=2,
                        label=f"FedAvg, R rounds x {s['steps']}/R steps")
            seeds = sorted(set(ro["seed"]))
            ta = _task_mean(summary, tuning, "homogeneous", "task_arithmetic", seeds)
            pre = _task_mean(summary, tuning, "homogeneous", "pretrained", seeds)
            ax.axhline(ta, color="C1", ls=":", label=f"one-shot task arithmetic, tuned lambda ({ta:.3f})")
            if not math.isnan(pre):
                ax.axhline(pre, color="C2", ls="-.", lw=1, label=f"theta_0 + own heads ({pre:.3f})")
            ax.axhline(1.0, color="gray", ls="--", lw=1, label="individual fine-tuning")
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(ms["rounds"]))
            ax.set_xticklabels([str(int(r)) for r in ms["rounds"]])
            ax.set_xlabel("communication rounds (same total local steps)")
            ax.set_ylabel("normalised accuracy")
            ax.set_title(f"More rounds vs the one-shot merge ({tuning}; seeds {seeds})", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            save_figure(fig, out, f"accuracy_vs_rounds{sfx}.png")
            plt.close(fig)
