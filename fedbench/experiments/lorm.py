"""LoRM (Salami et al., 2024, arXiv 2410.17961): closed-form LoRA merging for federated class-incremental
learning (FCIL), against the usual LoRA aggregations, on MiniLM and a many-class offline text task.

Setting. The classes of `dataset` (default ng20, 20 classes) are cut into `num_tasks` groups (seeded
shuffle of the classes, :func:`fedbench.data.class_incremental_tasks`); the tasks arrive in order. The
class order and each task's train/test subsamples are fixed by `data_seed` (FCIL benchmarks fix their
class order); each seed draws its own partition, held-out inputs, init and training. Each task's
training subsample is split over `clients` clients by Dirichlet(`alpha`) on its labels (>= 2 each). For every
task the federation runs `rounds_per_task` rounds (every client, `local_steps` local steps), then the
model is evaluated on the test examples of every task seen so far: a[t, j] = accuracy on task j after
task t. The model has one head over all classes. While task t trains, the logits of every class outside
task t are masked (-inf; the usual FCIL choice of prompt/LoRA continual learners, so old heads are not
pushed down by data that never shows them); at evaluation after task t the prediction is the argmax over
all classes seen so far (classes of tasks 0..t; the task id is never given).

Metrics (from a): avg accuracy after t = mean_{j<=t} a[t, j]; final = that at t = T-1; average
incremental accuracy = mean over t of avg accuracy after t; forgetting = mean_{j<T-1} (max_{j<=t<T-1}
a[t, j] - a[T-1, j]).

Methods (same data, same model init, same LoRA rank/depth, same rounds and local steps):

- ``lorm``: clients train one LoRA factor per task, alternating, starting with B (task 0: B, A frozen at
  its init; task 1: A, B frozen; ...). Each client also sends, per LoRA-wrapped layer, the Gram matrix
  G_i = X_i^T X_i of that layer's inputs over its non-padding tokens (float64; counted as its upper
  triangle). The server solves the trained factor in closed form (:func:`fedbench.merging.lorm.solve_B` /
  ``solve_A``, float64, relative ridge `ridge` towards the factor average) and FedAvgs the head by
  sample count.
- ``fedavg_factors``: both factors trained, A and B FedAvg'd separately (FedIT).
- ``fedavg_products``: both factors trained, the exact average of the products s B_i A_i (core
  ``stack`` semantics, :class:`fedbench.fl.Strategy`: folded into the base weight, factors restarted).
- ``regmean``: both factors trained; the dense deltas s B_i A_i merged by RegMean with the clients'
  Gram matrices, folded into the base weight like ``stack``.
- ``full_topk``: full fine-tuning of the top `depth` layers (+ head), FedAvg.
- ``joint``: the upper bound: one centralised LoRA model trained on every task's pooled training data at
  once (all classes unmasked), for as many steps as all clients of a federated method take together;
  its a[t, j] is the final model evaluated over the classes seen after task t.

Merge check (``merge_error.csv``): at every aggregation, for every LoRA-wrapped layer, the
response-matching error sum_i ||X_i (dW_merged - dW_i)^T||^2 of several merge rules applied to the same
client updates, on the inputs the clients' Gram matrices came from (``fit``) and on held-out inputs of
each client (``heldout``: unused training examples of the dataset drawn with the client's own class
counts x `heldout_fraction`). ``rel_error`` divides by the error of keeping the previous global model.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedbench.config import ConfigError, FLConfig, ModelConfig, PeftConfig, TrainConfig, config_hash
from fedbench.experiments.common import (Claim, TableRunStore, claims_table, is_int, is_number, load_profiles, mean_std,
                                         method_colors, output_dir, profile_settings, save_figure,
                                         save_table)
from fedbench.fl.seeding import derive_seed, rng_for
from fedbench.merging import lorm as L

EXPERIMENT = "lorm"
STORE_VERSION = 1        # bump when a run's computation changes: cached runs are keyed by it
METHODS = ("lorm", "fedavg_factors", "fedavg_products", "regmean", "full_topk", "joint")
LABELS = {"lorm": "LoRM (closed-form factor)", "fedavg_factors": "FedAvg of factors (FedIT)",
          "fedavg_products": "exact product average (stack)", "regmean": "RegMean (dense deltas)",
          "full_topk": "full FT of top layers, FedAvg", "joint": "joint (centralised upper bound)"}
FEDERATED = METHODS[:-1]
HEAD_KEYS = ("classifier.weight", "classifier.bias")

# the profiles live in configs/lorm/{smoke,quick,full}.yaml
DEFAULTS = load_profiles(EXPERIMENT)


# -- parameters --------------------------------------------------------------------------------------

def settings_for(profile: str = "quick", **overrides) -> dict:
    """The profile's settings with `overrides` on top, every value checked (ConfigError otherwise)."""
    from fedbench.data import list_tasks
    s = profile_settings(DEFAULTS, profile, overrides)
    info = {t.name: t for t in list_tasks() if t.offline}
    text = sorted(n for n, t in info.items() if t.modality == "text" and t.num_classes >= 4)
    if s["dataset"] not in text:
        why = " (an image task: the benchmark's backbone is the MiniLM text encoder)" \
            if s["dataset"] in info and info[s["dataset"]].modality != "text" else ""
        raise ConfigError("dataset", s["dataset"], f"an offline text task with >= 4 classes{why}: {text}")
    for key, low in [("data_seed", 0), ("num_tasks", 2), ("clients", 1), ("rank", 1), ("depth", 1), ("max_length", 8),
                     ("batch_size", 1), ("rounds_per_task", 1), ("local_steps", 1), ("max_train_per_task", 1),
                     ("max_test_per_task", 1)]:
        if not is_int(s[key]) or s[key] < low:
            raise ConfigError(key, s[key], f"an integer >= {low}")
    n_classes = info[s["dataset"]].num_classes
    if s["num_tasks"] > n_classes:
        raise ConfigError("num_tasks", s["num_tasks"], f"at most the {n_classes} classes of {s['dataset']}")
    if s["depth"] > 6:
        raise ConfigError("depth", s["depth"], "at most MiniLM's 6 layers")
    if s["max_train_per_task"] < 2 * s["clients"]:
        raise ConfigError("max_train_per_task", s["max_train_per_task"],
                          f"at least 2 x clients = {2 * s['clients']} (every client gets >= 2 examples of a task)")
    for key in ("alpha", "lr", "lora_alpha"):
        if not is_number(s[key]) or not 0 < s[key] < float("inf"):
            raise ConfigError(key, s[key], "a number > 0")
    if not is_number(s["ridge"]) or not 0 <= s["ridge"] < float("inf"):
        raise ConfigError("ridge", s["ridge"], "a number >= 0 (relative to the mean eigenvalue; 0 = pseudo-inverse)")
    if not is_number(s["heldout_fraction"]) or not 0 < s["heldout_fraction"] <= 1:
        raise ConfigError("heldout_fraction", s["heldout_fraction"], "a number in (0, 1]")
    if not isinstance(s["shuffle_classes"], bool):
        raise ConfigError("shuffle_classes", s["shuffle_classes"], "True or False")
    s["seeds"] = (s["seeds"],) if is_int(s["seeds"]) else tuple(s["seeds"])
    if len(s["seeds"]) == 0 or len(set(s["seeds"])) != len(s["seeds"]) or any(
            not is_int(x) or x < 0 for x in s["seeds"]):
        raise ConfigError("seeds", s["seeds"], "a non-empty list of distinct integers >= 0")
    s["seeds"] = tuple(int(x) for x in s["seeds"])
    s["methods"] = (s["methods"],) if isinstance(s["methods"], str) else tuple(s["methods"])
    if len(s["methods"]) == 0 or any(m not in METHODS for m in s["methods"]):
        raise ConfigError("methods", s["methods"], f"a non-empty subset of {list(METHODS)}")
    s["methods"] = tuple(m for m in METHODS if m in s["methods"])     # canonical order
    return s


def run_key(s: dict, method: str, seed: int) -> dict:
    """Everything one (method, seed) run depends on; its hash names the run in the store."""
    keep = ("dataset", "data_seed", "num_tasks", "clients", "alpha", "shuffle_classes", "rank", "lora_alpha", "depth",
            "max_length", "batch_size", "lr", "max_train_per_task", "max_test_per_task", "rounds_per_task",
            "local_steps", "heldout_fraction")
    key = {k: s[k] for k in keep}
    if method in ("lorm", "regmean"):
        key["ridge"] = s["ridge"]
    return {"experiment": EXPERIMENT, "version": STORE_VERSION, "method": method, "seed": int(seed), **key}


# -- data ---------------------------------------------------------------------------------------------

@dataclass
class FcilData:
    """The task sequence: one train split (every task's subsample; class mask = the example's own task),
    one held-out split (per client and task) and one test split, all with the dataset's own label ids."""
    class_groups: list[list[int]]          # classes of each task, in task order
    num_labels: int
    train: object                          # TokenizedSplit
    heldout: object
    test: object
    client_indices: list[list[np.ndarray]]   # [task][client] -> rows of train
    heldout_indices: list[list[np.ndarray]]  # [task][client] -> rows of heldout
    test_indices: list[np.ndarray]           # [task] -> rows of test
    pad_id: int

    @property
    def num_tasks(self) -> int:
        return len(self.class_groups)

    def seen_mask(self, t: int) -> torch.Tensor:
        """(num_labels,) bool: the classes of tasks 0..t."""
        mask = torch.zeros(self.num_labels, dtype=torch.bool)
        mask[[c for g in self.class_groups[:t + 1] for c in g]] = True
        return mask

    def stage_test(self, t: int):
        """The test split scored over the classes seen after task t (the argmax runs over those only)."""
        from fedbench.models.inputs import TokenizedSplit
        return TokenizedSplit(self.test.input_ids, self.test.labels,
                              class_mask=self.seen_mask(t).expand(len(self.test), -1))

    def unmasked_train(self):
        """The train split with every class allowed (the joint upper bound)."""
        from fedbench.models.inputs import TokenizedSplit
        return TokenizedSplit(self.train.input_ids, self.train.labels)


def _subsample(pool: np.ndarray, k: int, rng) -> np.ndarray:
    return np.sort(pool) if k >= len(pool) else np.sort(rng.choice(pool, size=k, replace=False))


@dataclass
class TaskSequence:
    """What `data_seed` fixes for every seed (as FCIL benchmarks fix their class order): the classes of each
    task, each task's training subsample and test examples, tokenized."""
    class_groups: list[list[int]]
    num_labels: int
    train_rows: list[np.ndarray]         # dataset train rows of each task's subsample
    train: object                        # TokenizedSplit of them (class mask = the example's own task)
    test: object
    test_indices: list[np.ndarray]


def _tokenizer():
    from fedbench.models import load_tokenizer
    return load_tokenizer(ModelConfig().backbone)


def prepare_tasks(s: dict) -> TaskSequence:
    from fedbench.data import class_incremental_tasks, load_task
    from fedbench.models.inputs import TokenizedSplit, tokenize_split
    ds = load_task(s["dataset"])
    tr_labels = ds["train"].with_format("numpy")["label"][:]
    te_labels = ds["test"].with_format("numpy")["label"][:]
    num_labels = len(ds["train"].features["label"].names)
    ds_seed = s["data_seed"]
    tasks = class_incremental_tasks(tr_labels, s["num_tasks"], seed=derive_seed(ds_seed, "partition", 0),
                                    shuffle_classes=s["shuffle_classes"])
    train_rows, test_rows = [], []
    for t, task in enumerate(tasks):
        train_rows.append(_subsample(task["indices"], s["max_train_per_task"], rng_for(ds_seed, "subsample", t, 0)))
        test_rows.append(_subsample(np.flatnonzero(np.isin(te_labels, task["classes"])), s["max_test_per_task"],
                                    rng_for(ds_seed, "subsample", t, 1)))
    tok = _tokenizer()
    train = tokenize_split(ds["train"].select(np.concatenate(train_rows).tolist()), tok, s["max_length"])
    own = torch.zeros((len(train), num_labels), dtype=torch.bool)       # training: the example's own task only
    start = 0
    for rows, task in zip(train_rows, tasks):
        own[start:start + len(rows), task["classes"]] = True
        start += len(rows)
    train = TokenizedSplit(train.input_ids, train.labels, class_mask=own)
    test = tokenize_split(ds["test"].select(np.concatenate(test_rows).tolist()), tok, s["max_length"])
    offsets = np.cumsum([0] + [len(x) for x in test_rows])
    return TaskSequence([list(task["classes"]) for task in tasks], num_labels, train_rows, train, test,
                        [offsets[t] + np.arange(len(x)) for t, x in enumerate(test_rows)])


def prepare_data(s: dict, seed: int, tasks: TaskSequence | None = None) -> FcilData:
    """The task sequence (`tasks`, or built from `data_seed`) split over the clients for `seed`:
    Dirichlet(alpha) on each task's labels, and each client's held-out inputs."""
    from fedbench.data import load_task, partition_dirichlet
    from fedbench.models.inputs import tokenize_split
    tasks = tasks or prepare_tasks(s)
    ds = load_task(s["dataset"])
    tr_labels = ds["train"].with_format("numpy")["label"][:]
    client_pos, heldout_pos, heldout_rows = [], [], []
    start = 0
    for t, (sub, classes) in enumerate(zip(tasks.train_rows, tasks.class_groups)):
        parts = partition_dirichlet(tr_labels[sub], s["clients"], s["alpha"],
                                    seed=derive_seed(seed, "partition", 1, t), min_size=2)
        client_pos.append([start + p for p in parts])
        start += len(sub)
        # held-out inputs of each client: unused train examples of its classes, drawn with its class counts
        unused = np.setdiff1d(np.flatnonzero(np.isin(tr_labels, classes)), sub)
        rng = rng_for(seed, "subsample", t, 2)
        pools = {c: list(rng.permutation(unused[tr_labels[unused] == c])) for c in classes}
        first = sum(len(x) for x in heldout_rows)
        mine = []
        for p in parts:
            rows = []
            for c, n in zip(*np.unique(tr_labels[sub[p]], return_counts=True)):
                k = max(1, int(round(s["heldout_fraction"] * n)))
                rows += [pools[int(c)].pop() for _ in range(min(k, len(pools[int(c)])))]
            mine.append(np.asarray(rows, dtype=np.int64))
        heldout_pos.append([first + sum(len(m) for m in mine[:i]) + np.arange(len(m)) for i, m in enumerate(mine)])
        heldout_rows.append(np.concatenate(mine))
    tok = _tokenizer()
    heldout = tokenize_split(ds["train"].select(np.concatenate(heldout_rows).tolist()), tok, s["max_length"])
    return FcilData(tasks.class_groups, tasks.num_labels, tasks.train, heldout, tasks.test, client_pos, heldout_pos,
                    tasks.test_indices, tok.pad_token_id or 0)


# -- models -------------------------------------------------------------------------------------------

def _peft(s: dict, method: str) -> PeftConfig:
    if method == "full_topk":     # nothing added; the top `depth` layers are unfrozen below
        return PeftConfig(method="head")
    return PeftConfig(method="lora", rank=s["rank"], lora_alpha=float(s["lora_alpha"]), depth=s["depth"])


def build(s: dict, seed: int, method: str, num_labels: int):
    """The method's model; every method of a seed starts from the same head (and LoRA) init."""
    from fedbench.models import build_model
    from fedbench.models.tuners import _frozen_prefix
    model = build_model(ModelConfig(), _peft(s, method), num_labels, seed=derive_seed(seed, "init"))
    if method == "full_topk":
        for layer in model.layers[model.num_layers - s["depth"]:]:
            layer.requires_grad_(True)
        model.frozen_prefix = _frozen_prefix(model)
    return model


@torch.no_grad()
def load_full(model, state: dict) -> None:
    """Copy `state` into the model's parameters, trainable or not (LoRM's frozen factor)."""
    params = dict(model.named_parameters())
    for k, v in state.items():
        params[k].copy_(v)


# -- one (method, seed) run -----------------------------------------------------------------------------

class FcilRun:
    """The task sequence for one method and seed. ``FcilRun(s, seed, data, like=other)`` reuses `other`'s
    activation caches (the frozen backbone's outputs below the top `depth` layers: the same for every
    method) and LoRA layer list; for another seed's data over the same task sequence, its train and test
    caches."""

    def __init__(self, s: dict, seed: int, data: FcilData, like: "FcilRun | None" = None):
        from fedbench.models import lora_modules
        self.s, self.seed, self.data = s, seed, data
        template = build(s, seed, "lorm", data.num_labels) if like is None or like.data is not data else None
        self.modules = lora_modules(template) if like is None else like.modules
        if like is not None and like.data is data:
            self.caches = like.caches
        else:       # another seed of the same task sequence: only the held-out split is new
            reuse = {name: like.caches[name] for name in ("train", "test")
                     if like is not None and getattr(like.data, name) is getattr(data, name)}
            self.caches = self._filled_caches(template, reuse)
        self.layer_names = [m.name for m in self.modules]
        self.train_cfg = TrainConfig(local_steps=s["local_steps"], batch_size=s["batch_size"], lr=float(s["lr"]))

    def _filled_caches(self, model, reuse: dict) -> dict:
        """Frozen-prefix activations of every example, computed up front in a fixed (length-sorted) order
        (a cached value then never depends on which run touched it first)."""
        from fedbench.models.inputs import ActivationCache, batch_order
        caches = dict(reuse)
        for name in ("train", "heldout", "test"):
            if name in caches:
                continue
            split = getattr(self.data, name)
            cache = ActivationCache(split, self.data.pad_id)
            cache.ensure(model.frozen_prefix)
            for batch in batch_order(np.arange(len(split)), split.lengths, 64, None, shuffle=False):
                cache.get(model, batch)
            caches[name] = cache
        return caches

    # pieces ------------------------------------------------------------------------------------------
    def evaluate_stage(self, model, t: int) -> list[float]:
        """a[t, j] for j <= t: accuracy on task j's test examples, argmax over the classes seen so far."""
        from fedbench.fl.client import evaluate
        view = self.data.stage_test(t)
        return [evaluate(model, view, self.data.test_indices[j], batch_size=128, cache=self.caches["test"],
                         pad_id=self.data.pad_id)["accuracy"] for j in range(t + 1)]

    def grams(self, model, names, split: str, indices) -> dict:
        return L.layer_input_grams(model, names, getattr(self.data, split), indices, cache=self.caches[split],
                                   pad_id=self.data.pad_id)

    def _train(self, model, state_in: dict, indices, seed: int, split=None, steps: int | None = None):
        from fedbench.fl.client import train_client
        cfg = self.train_cfg if steps is None else TrainConfig(local_steps=steps, batch_size=self.s["batch_size"],
                                                               lr=float(self.s["lr"]))
        return train_client(model, state_in, split or self.data.train, indices, cfg, seed=seed,
                            cache=self.caches["train"], pad_id=self.data.pad_id)

    # the federated methods -----------------------------------------------------------------------------
    def run_federated(self, method: str) -> dict:
        from fedbench.fl.aggregators import fedavg
        from fedbench.fl.client import ClientUpdate
        from fedbench.fl.server import LoraBase
        from fedbench.fl.strategy import GlobalModel, LoraLayout, Strategy
        from fedbench.models import state_nbytes, trainable_state
        s, d = self.s, self.data
        model = build(s, self.seed, method, d.num_labels)
        lora = method != "full_topk"
        names = self.layer_names if lora else [n for n in self.layer_names]
        # the weight each layer name merges: LoRA's base weight, or the plain linear weight (full FT)
        weight_key = {m.name: (m.base_key if lora else f"{m.name}.weight") for m in self.modules}
        base = LoraBase(model)
        g = GlobalModel(trainable_state(model), {})
        strategy = None
        if method in ("fedavg_products", "regmean"):
            strategy = Strategy(FLConfig(lora_aggregation="stack"), LoraLayout(self.modules), s["rank"],
                                seed=self.seed)
        sends_grams = method in ("lorm", "regmean")
        gram_bytes = sum(L.gram_nbytes(model.get_submodule(n).in_features
                                       if hasattr(model.get_submodule(n), "in_features")
                                       else model.get_submodule(n).base_layer.in_features) for n in names)
        acc_rows, err_rows, round_rows = [], [], []
        bytes_total = 0
        for t in range(d.num_tasks):
            factor = ("B" if t % 2 == 0 else "A") if method == "lorm" else None
            if factor is not None:          # LoRM: only this task's factor (and the head) trains
                for m in self.modules:
                    model.get_parameter(m.b_key).requires_grad_(factor == "B")
                    model.get_parameter(m.a_key).requires_grad_(factor == "A")
            train_keys = [k for k, p in model.named_parameters() if p.requires_grad]
            for r in range(s["rounds_per_task"]):
                t0 = time.perf_counter()
                gr = t * s["rounds_per_task"] + r
                ups, fit, held, losses = [], [], [], []
                for c in range(s["clients"]):
                    idx = d.client_indices[t][c]
                    base.load(g.base_delta)
                    load_full(model, g.state)
                    u = self._train(model, OrderedDict((k, g.state[k]) for k in train_keys), idx,
                                    seed=derive_seed(self.seed, "client", t, r, c))
                    client_state = OrderedDict(g.state)
                    client_state.update(u.state)
                    ups.append(ClientUpdate(c, client_state, u.num_samples, u.num_steps, u.train_loss, u.wall_s))
                    losses.append(u.train_loss)
                    fit.append(self.grams(model, names, "train", idx))     # the model the client holds now
                    held.append(self.grams(model, names, "heldout", d.heldout_indices[t][c]))
                    bytes_total += state_nbytes(u.state) + (gram_bytes if sends_grams else 0)
                weights = [u.num_samples for u in ups]
                if method == "lorm":
                    new = OrderedDict(g.state)
                    new.update(fedavg([{k: u.state[k] for k in HEAD_KEYS} for u in ups], weights))
                    for m in self.modules:
                        G = [f[m.name] for f in fit]
                        if factor == "B":
                            solved = L.solve_B([u.state[m.b_key] for u in ups], g.state[m.a_key], G, weights,
                                               s["ridge"])
                            new[m.b_key] = solved.to(g.state[m.b_key].dtype)
                        else:
                            solved = L.solve_A([u.state[m.a_key] for u in ups], G, weights, s["ridge"])
                            new[m.a_key] = solved.to(g.state[m.a_key].dtype)
                    new_g = GlobalModel(new, dict(g.base_delta))
                elif method in ("fedavg_factors", "full_topk"):
                    new_g = GlobalModel(fedavg([u.state for u in ups], weights), dict(g.base_delta))
                else:
                    new_g, _ = strategy.aggregate(g, ups, gr)
                    if method == "regmean":      # replace the folded product average by RegMean of the deltas
                        for m in self.modules:
                            deltas = [m.scaling * u.state[m.b_key].double() @ u.state[m.a_key].double() for u in ups]
                            merged = L.regmean(deltas, [f[m.name] for f in fit], weights, s["ridge"])
                            new_g.base_delta[m.base_key] = (g.base_delta.get(m.base_key, 0) + merged).float()
                err_rows += self._merge_errors(method, t, r, g, new_g, ups, weights, fit, held, weight_key, factor)
                g = new_g
                round_rows.append({"task": t, "round": r, "train_loss": float(np.mean(losses)),
                                   "wall_s": time.perf_counter() - t0})
            base.load(g.base_delta)
            load_full(model, g.state)
            acc_rows += [{"after_task": t, "task": j, "accuracy": a} for j, a in enumerate(self.evaluate_stage(model, t))]
        return self._result(acc_rows, err_rows, round_rows, bytes_total)

    def _merge_errors(self, method, t, r, g, new_g, ups, weights, fit, held, weight_key, factor) -> list[dict]:
        """Response-matching error of the applied merge and of the alternatives, on the same client updates."""
        rows = []
        for m in self.modules:
            if method == "full_topk":
                key = weight_key[m.name]
                before = g.state[key].double()
                deltas = [u.state[key].double() - before for u in ups]
                rules = {"weight_average": new_g.state[key].double() - before}
                applied = "weight_average"
                prev = torch.zeros_like(before)
            else:
                def prod(st):
                    return m.scaling * st[m.b_key].double() @ st[m.a_key].double()
                deltas = [prod(u.state) for u in ups]
                prev = prod(g.state)
                # the merged model's LoRA delta, relative to the base the clients trained on
                merged = prod(new_g.state) + (new_g.base_delta.get(m.base_key, 0) - g.base_delta.get(m.base_key, 0))
                b_avg = L.factor_average([u.state[m.b_key] for u in ups], weights)
                a_avg = L.factor_average([u.state[m.a_key] for u in ups], weights)
                rules = {"factor_average": m.scaling * b_avg @ a_avg,
                         "product_average": L.factor_average(deltas, weights),
                         "regmean": L.regmean(deltas, [f[m.name] for f in fit], weights, self.s["ridge"])}
                applied = {"lorm": "lorm", "fedavg_factors": "factor_average", "fedavg_products": "product_average",
                           "regmean": "regmean"}[method]
                if method == "lorm":
                    rules["lorm"] = merged
                else:   # the applied rule is what the server really did (checks the bookkeeping above)
                    assert torch.allclose(rules[applied], merged, atol=1e-5, rtol=1e-4), (method, m.name)
                    rules[applied] = merged
            for split, grams in (("fit", fit), ("heldout", held)):
                G = [x[m.name] for x in grams]
                keep = L.response_error(prev, deltas, G)
                for rule, dw in rules.items():
                    e = L.response_error(dw, deltas, G)
                    rows.append({"task": t, "round": r, "layer": _short(m.name), "factor": factor or "",
                                 "rule": rule, "applied": rule == applied, "split": split, "error": e,
                                 "rel_error": e / keep if keep > 0 else float("nan")})
        return rows

    # the upper bound -----------------------------------------------------------------------------------
    def run_joint(self) -> dict:
        from fedbench.models import trainable_state
        s, d = self.s, self.data
        model = build(s, self.seed, "joint", d.num_labels)
        every = np.concatenate([idx for task in d.client_indices for idx in task])
        steps = d.num_tasks * s["rounds_per_task"] * s["clients"] * s["local_steps"]
        t0 = time.perf_counter()
        u = self._train(model, trainable_state(model), every, seed=derive_seed(self.seed, "client", 10**6),
                        split=d.unmasked_train(), steps=steps)
        load_full(model, u.state)
        acc_rows = [{"after_task": t, "task": j, "accuracy": a}
                    for t in range(d.num_tasks) for j, a in enumerate(self.evaluate_stage(model, t))]
        rounds = [{"task": -1, "round": -1, "train_loss": u.train_loss, "wall_s": time.perf_counter() - t0}]
        return self._result(acc_rows, [], rounds, 0)

    def _result(self, acc_rows, err_rows, round_rows, bytes_total) -> dict:
        rounds = pd.DataFrame(round_rows, columns=["task", "round", "train_loss", "wall_s"])
        return {"per_task": pd.DataFrame(acc_rows, columns=["after_task", "task", "accuracy"]),
                "merge_error": pd.DataFrame(err_rows, columns=["task", "round", "layer", "factor", "rule", "applied",
                                                               "split", "error", "rel_error"]),
                "rounds": rounds,
                "summary": {"bytes_up_total": int(bytes_total), "wall_s": float(rounds["wall_s"].sum())}}

    def run(self, method: str) -> dict:
        return self.run_joint() if method == "joint" else self.run_federated(method)


def _short(name: str) -> str:
    """encoder.encoder.layer.5.attention.self.query -> layer5.query"""
    parts = name.split(".")
    i = parts.index("layer") if "layer" in parts else 0
    return f"layer{parts[i + 1]}.{parts[-1]}" if i else name


# -- metrics --------------------------------------------------------------------------------------------

def accuracy_matrix(per_task: pd.DataFrame, T: int) -> np.ndarray:
    """a[t, j] (NaN for j > t)."""
    a = np.full((T, T), np.nan)
    for r in per_task.itertuples():
        a[int(r.after_task), int(r.task)] = r.accuracy
    return a


def cl_metrics(a: np.ndarray) -> dict:
    """Average accuracy after each task, final, average incremental accuracy, forgetting (see module doc)."""
    T = a.shape[0]
    avg = [float(np.mean(a[t, :t + 1])) for t in range(T)]
    forgetting = float(np.mean([np.max(a[j:T - 1, j]) - a[T - 1, j] for j in range(T - 1)])) if T > 1 else 0.0
    return {"avg_after_task": avg, "final_avg_accuracy": avg[-1], "avg_incremental_accuracy": float(np.mean(avg)),
            "forgetting": forgetting}


# -- the run store: one folder per run key, summary.json written last ----------------------------------

STORE = TableRunStore(EXPERIMENT, ("per_task", "merge_error", "rounds"), read_csv_kwargs={"dtype": {"factor": str}})
save_cached = STORE.save


def load_cached(key: dict) -> dict | None:
    out = STORE.load(key)
    if out is not None:
        out["merge_error"]["factor"] = out["merge_error"]["factor"].fillna("")      # "" = both factors / full FT
    return out


# -- the experiment -------------------------------------------------------------------------------------

@dataclass
class LormResult:
    settings: dict
    summary: pd.DataFrame        # per (method, seed)
    per_task: pd.DataFrame       # per (method, seed, after_task, task)
    avg_curve: pd.DataFrame      # per (method, seed, after_task): avg accuracy over seen tasks
    merge_error: pd.DataFrame    # per (method, seed, task, round, layer, rule, split)
    claims: pd.DataFrame
    runs: pd.DataFrame           # per (method, seed): wall-clock, run key hash
    out: Path = None
    figures: dict = field(default_factory=dict)


def run(profile: str = "quick", progress: bool = True, **overrides) -> LormResult:
    """Every (method, seed) run (loaded from the store when finished), then the CSVs, figures, claims."""
    s = settings_for(profile, **overrides)
    out = output_dir(EXPERIMENT, profile)
    per_run = {}
    tasks, previous = None, None
    for seed in s["seeds"]:
        keys = {m: run_key(s, m, seed) for m in s["methods"]}
        first = None
        for m in s["methods"]:
            res = load_cached(keys[m])
            if res is None:
                if first is None:        # data, caches, LoRA layout: once per seed (train/test once per run)
                    tasks = tasks or prepare_tasks(s)
                    first = previous = FcilRun(s, seed, prepare_data(s, seed, tasks), like=previous)
                res = FcilRun(s, seed, first.data, like=first).run(m)
                save_cached(keys[m], res)
                if progress:
                    fin = cl_metrics(accuracy_matrix(res["per_task"], s["num_tasks"]))["final_avg_accuracy"]
                    print(f"[lorm] {m:<16} seed {seed}: {res['summary']['wall_s']:.0f} s, final avg accuracy "
                          f"{fin:.3f}", flush=True)
            per_run[(m, seed)] = (res, config_hash(keys[m]))
    result = _tables(s, per_run)
    result.out = out
    save_table(result.summary, out, "summary.csv")
    save_table(result.per_task, out, "per_task.csv")
    save_table(result.avg_curve, out, "avg_accuracy.csv")
    save_table(result.merge_error, out, "merge_error.csv")
    save_table(result.claims, out, "claims.csv")
    save_table(result.runs, out, "runs.csv")
    result.figures = make_figures(result, out)
    return result


def _tables(s: dict, per_run: dict) -> LormResult:
    summary, per_task, curve, errs, runs = [], [], [], [], []
    for (m, seed), (res, h) in per_run.items():
        met = cl_metrics(accuracy_matrix(res["per_task"], s["num_tasks"]))
        summary.append({"method": m, "final_avg_accuracy": met["final_avg_accuracy"],
                        "avg_incremental_accuracy": met["avg_incremental_accuracy"], "forgetting": met["forgetting"],
                        "bytes_up_total": int(res["summary"]["bytes_up_total"]), "seed": seed})
        per_task.append(res["per_task"].assign(method=m, seed=seed))
        curve += [{"method": m, "seed": seed, "after_task": t, "avg_accuracy": v}
                  for t, v in enumerate(met["avg_after_task"])]
        if len(res["merge_error"]):
            errs.append(res["merge_error"].assign(method=m, seed=seed))
        runs.append({"method": m, "seed": seed, "wall_s": round(res["summary"]["wall_s"], 1), "run": h})
    summary = pd.DataFrame(summary, columns=["method", "final_avg_accuracy", "avg_incremental_accuracy", "forgetting",
                                             "bytes_up_total", "seed"])
    per_task = pd.concat(per_task, ignore_index=True)[["method", "seed", "after_task", "task", "accuracy"]]
    cols = ["method", "seed", "task", "round", "layer", "factor", "rule", "applied", "split", "error", "rel_error"]
    errs = pd.concat(errs, ignore_index=True)[cols] if errs else pd.DataFrame(columns=cols)
    return LormResult(settings=s, summary=summary, per_task=per_task, avg_curve=pd.DataFrame(curve), merge_error=errs,
                      claims=compute_claims(summary, errs), runs=pd.DataFrame(runs))


# -- claims -------------------------------------------------------------------------------------------

PAPER_LORM = ("LoRM beats FedAvg-style LoRA aggregation and merging baselines in FCIL (ViT-B/16, CIFAR-100, "
              "ImageNet-R, ...: higher final average accuracy)")


def _pm(df: pd.DataFrame, m: str, col: str) -> tuple[float, str]:
    v = df.loc[df["method"] == m, col]
    sd = f" ± {v.std():.3f}" if len(v) > 1 else ""
    return float(v.mean()), f"{v.mean():.3f}{sd}"


def compute_claims(summary: pd.DataFrame, errs: pd.DataFrame) -> pd.DataFrame:
    claims = []
    methods = set(summary["method"])
    n = summary["seed"].nunique()
    if "lorm" in methods:
        lo, lo_s = _pm(summary, "lorm", "final_avg_accuracy")
        for other in ("fedavg_factors", "fedavg_products", "regmean", "full_topk"):
            if other in methods:
                b, b_s = _pm(summary, other, "final_avg_accuracy")
                wins = int(sum(summary[(summary["method"] == "lorm")].set_index("seed")["final_avg_accuracy"]
                               > summary[(summary["method"] == other)].set_index("seed")["final_avg_accuracy"]))
                claims.append(Claim(f"LoRM beats {LABELS[other]} (final avg accuracy)",
                                    PAPER_LORM if other == "fedavg_factors" else "LoRM > this baseline",
                                    f"{LABELS[other]} {b_s} -> LoRM {lo_s} ({lo - b:+.3f}; LoRM higher in {wins} of "
                                    f"{n} seeds)", lo > b))
        if "fedavg_factors" in methods:
            a, a_s = _pm(summary, "fedavg_factors", "forgetting")
            b, b_s = _pm(summary, "lorm", "forgetting")
            claims.append(Claim("LoRM forgets less than FedAvg of factors", "(not a headline of the paper)",
                                f"forgetting FedAvg of factors {a_s} -> LoRM {b_s}", b < a))
        le = errs[(errs["method"] == "lorm")] if len(errs) else errs
        for split, what in (("fit", "on the inputs of the Gram matrices (guaranteed: least squares)"),
                            ("heldout", "on held-out inputs of each client")):
            e = le[le["split"] == split] if len(le) else le
            if len(e):
                piv = e.pivot_table(index=["seed", "task", "round", "layer"], columns="rule", values="rel_error")
                lower = int((piv["lorm"] <= piv["factor_average"] * (1 + 1e-9)).sum())
                claims.append(Claim(
                    f"LoRM's merge matches client responses better than averaging the trained factor, {what}",
                    "closed form = least-squares optimum of sum_i ||X_i (B A)^T - X_i (B_i A_i)^T||^2 for the factor "
                    "it solves",
                    f"relative error (vs keeping the old model) LoRM {piv['lorm'].mean():.4f} vs factor average "
                    f"{piv['factor_average'].mean():.4f}; LoRM lower or equal in {lower} of {len(piv)} "
                    f"(seed, task, round, layer) merges",
                    # on the fit inputs it must hold merge by merge; on new inputs, on average
                    lower == len(piv) if split == "fit" else piv["lorm"].mean() < piv["factor_average"].mean()))
        if "fedavg_factors" in methods:
            a = summary.loc[summary["method"] == "fedavg_factors", "bytes_up_total"].mean()
            b = summary.loc[summary["method"] == "lorm", "bytes_up_total"].mean()
            claims.append(Claim("LoRM's upload is dominated by the Gram matrices",
                                "clients send G_i = X_i^T X_i (d_in x d_in) per LoRA layer besides one factor",
                                f"bytes up: LoRM {b / 1e6:.1f} MB vs FedAvg of factors {a / 1e6:.1f} MB "
                                f"({b / a:.1f}x)", b > a))
    if "joint" in methods and len(methods) > 1:
        j, j_s = _pm(summary, "joint", "final_avg_accuracy")
        best = max(methods - {"joint"}, key=lambda m: _pm(summary, m, "final_avg_accuracy")[0])
        b, b_s = _pm(summary, best, "final_avg_accuracy")
        claims.append(Claim("joint training is an upper bound", "joint (centralised, all tasks at once) >= every "
                            "FCIL method", f"joint {j_s} vs best federated ({LABELS[best]}) {b_s}", j >= b))
    return claims_table(claims)


# -- figures -----------------------------------------------------------------------------------------

def make_figures(res: LormResult, out: Path) -> dict:
    import matplotlib
    import matplotlib.pyplot as plt
    matplotlib.rcParams.update({"font.size": 9})
    s, figs = res.settings, {}
    methods = [m for m in METHODS if m in set(res.summary["method"])]
    colors = method_colors(METHODS, methods)
    T = s["num_tasks"]
    nseeds = len(s["seeds"])

    # 1. average accuracy over the seen classes after each task
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for m in methods:
        g = res.avg_curve[res.avg_curve["method"] == m].groupby("after_task")["avg_accuracy"]
        mean, sd = g.mean(), g.std().fillna(0)
        ax.plot(mean.index + 1, mean.values, marker="o", ms=3, color=colors[m], label=LABELS[m],
                ls="--" if m == "joint" else "-")
        ax.fill_between(mean.index + 1, mean - sd, mean + sd, color=colors[m], alpha=0.12)
    ax.set_xlabel("after task")
    ax.set_xticks(range(1, T + 1))
    ax.set_ylabel("avg accuracy over seen tasks")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{s['dataset']}: {T} tasks, {s['clients']} clients (mean ± std, {nseeds} seeds)")
    figs["avg_accuracy"] = save_figure(fig, out, "avg_accuracy.png")
    plt.close(fig)

    # 2. forgetting (and final accuracy) per method
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.2))
    for ax, col, title in zip(axes, ["final_avg_accuracy", "forgetting"], ["final avg accuracy", "forgetting"]):
        ms = mean_std(res.summary, ["method"], col).set_index("method").reindex(methods)
        ax.bar(range(len(methods)), ms["mean"], yerr=ms["std"].fillna(0), capsize=3,
               color=[colors[m] for m in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    figs["forgetting"] = save_figure(fig, out, "forgetting.png")
    plt.close(fig)

    # 3. accuracy matrices for LoRM and FedAvg of factors (mean over seeds)
    shown = [m for m in ("lorm", "fedavg_factors") if m in methods]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.2), squeeze=False)
        for ax, m in zip(axes[0], shown):
            pt = res.per_task[res.per_task["method"] == m]
            a = np.mean([accuracy_matrix(g, T) for _, g in pt.groupby("seed")], axis=0)   # NaN above the diagonal
            im = ax.imshow(a, vmin=0, vmax=1, cmap="viridis")
            for t in range(T):
                for j in range(t + 1):
                    ax.text(j, t, f"{a[t, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="w" if a[t, j] < 0.6 else "k")
            ax.set_xticks(range(T), range(1, T + 1))
            ax.set_yticks(range(T), range(1, T + 1))
            ax.set_xlabel("evaluated on task")
            ax.set_ylabel("after task")
            ax.set_title(LABELS[m], fontsize=8)
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
        figs["accuracy_matrix"] = save_figure(fig, out, "accuracy_matrix.png")
        plt.close(fig)

    # 4. merge error of each rule on LoRM's client updates (held-out and fit inputs)
    e = res.merge_error[res.merge_error["method"] == "lorm"] if len(res.merge_error) else res.merge_error
    if len(e):
        rules = ["factor_average", "product_average", "regmean", "lorm"]
        fig, ax = plt.subplots(figsize=(5.6, 3.2))
        for k, split in enumerate(["fit", "heldout"]):
            g = e[e["split"] == split].groupby("rule")["rel_error"].mean().reindex(rules)
            ax.bar(np.arange(len(rules)) + (k - 0.5) * 0.38, g.values, 0.38, label=split)
        ax.set_xticks(range(len(rules)), rules)
        ax.set_ylabel("response error / error of no merge")
        ax.set_title("merging LoRM's client updates (mean over layers, rounds, seeds)", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        figs["merge_error"] = save_figure(fig, out, "merge_error.png")
        plt.close(fig)
    return figs
