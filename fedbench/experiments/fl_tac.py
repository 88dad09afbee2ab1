"""FL-TAC (Ping et al., 2024, arXiv 2404.15384): one LoRA adapter per (client, task), clustered on the server.

A multi-task federation: every task is split over the clients by Dirichlet(alpha) with shares under
`min_share` dropped (:func:`fedbench.data.partition_per_task`), so clients hold several tasks in
different amounts. Methods, all on the same data, the same model and the same compute:

- ``fl_tac``: each client trains one LoRA adapter (+ that task's head) per task it holds; the server
  sees only the adapters, clusters them with k-means (k = T), FedAvgs inside each cluster and sends each
  adapter its cluster's aggregate (:func:`fedbench.fl.clustering.server_step`).
- ``fl_tac_auto``: the same, with k chosen every round by the silhouette score (k unknown).
- ``fedit``: one adapter per client trained on all its tasks (mixed batches, one head per task),
  factors averaged over clients: the paper's baseline (FedIT, Zhang et al. 2024).
- ``oracle``: per-task FedAvg, grouping adapters by their true task id (what perfect clustering gives).
- ``local``: every (client, task) adapter trains alone; nothing is communicated.

Budget: every (client, task) adapter takes `local_steps` steps per round; a FedIT client takes
`local_steps` x (number of tasks it holds) steps on its one adapter, so both see the same number of
samples and do the same work.

Heads. Each task has its own head (class counts differ). All heads are rows of one classifier matrix
over the union of the tasks' label spaces, and a per-example class mask restricts each softmax to its
own task's rows (``TokenizedSplit.class_mask``), which is exactly one head per task in one shared model.
FL-TAC aggregates a head with the heads whose *adapters* fell in the same cluster, among those of the
same shape: the server's decision comes from the adapters alone, and heads of different shapes cannot
be averaged at all. That shape is a leak worth stating: a head's shape reveals its task's class count,
so tasks with distinct class counts could be told apart from the heads without any clustering. The
adapter decision never looks at heads (only LoRA factors are clustered); tasks that share a class
count (here the binary ones) remain indistinguishable by shape. FedIT's client holds one head per task
by construction (its model has T heads), so its server averages each head over the clients holding it.

Accuracy of a task = the sample-weighted mean, over the clients holding it, of the test accuracy of the
model that client holds for that task after the round's aggregation.
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
from fedbench.experiments.common import (Claim, TableRunStore, claims_table, is_int, is_number, load_profiles, mean_std,
                                         method_colors, output_dir, profile_settings, save_figure, save_table)
from fedbench.fl import clustering
from fedbench.fl.seeding import derive_seed, rng_for

EXPERIMENT = "fl_tac"
STORE_VERSION = 3       # bump when a run's computation changes: cached runs are keyed by it
METHODS = ("fl_tac", "fl_tac_auto", "fedit", "oracle", "local")
LABELS = {"fl_tac": "FL-TAC (k = T)", "fl_tac_auto": "FL-TAC (k by silhouette)", "fedit": "FedIT",
          "oracle": "oracle per-task FedAvg", "local": "local only"}
EMBEDDINGS = ("pca", "umap", "tsne")
QUICK_TASKS = ("rt_sentiment", "subjectivity", "tweet_sentiment", "wordnet_verb")

# the profiles live in configs/fl_tac/{smoke,quick,full}.yaml
DEFAULTS = load_profiles(EXPERIMENT)


# -- parameters --------------------------------------------------------------------------------------

def settings_for(profile: str = "quick", **overrides) -> dict:
    """The profile's settings with `overrides` on top, every value checked (ConfigError otherwise)."""
    from fedbench.data import list_tasks
    s = profile_settings(DEFAULTS, profile, overrides)
    text_tasks = [t.name for t in list_tasks() if t.offline and t.modality == "text"]
    s["tasks"] = tuple(s["tasks"]) if isinstance(s["tasks"], (list, tuple)) else s["tasks"]
    if (not isinstance(s["tasks"], tuple) or len(s["tasks"]) < 2 or len(set(s["tasks"])) != len(s["tasks"])
            or any(t not in text_tasks for t in s["tasks"])):
        raise ConfigError("tasks", s["tasks"], f"at least 2 distinct offline text tasks from {text_tasks}")
    for key, low in [("clients", 2), ("rank", 1), ("max_length", 8), ("rounds", 1), ("local_steps", 1),
                     ("batch_size", 1), ("n_init", 1), ("eval_every", 1), ("evolution_panels", 1),
                     ("max_train_per_task", 1), ("max_test_per_task", 1)]:
        if not is_int(s[key]) or s[key] < low:
            raise ConfigError(key, s[key], f"an integer >= {low}")
    if s["max_train_per_task"] < s["clients"]:
        raise ConfigError("max_train_per_task", s["max_train_per_task"], f"at least clients={s['clients']}")
    if s["depth"] is not None and (not is_int(s["depth"]) or s["depth"] < 1):
        raise ConfigError("depth", s["depth"], "None (every layer) or an integer >= 1")
    if not is_number(s["alpha"]) or not 0 < s["alpha"] < float("inf"):
        raise ConfigError("alpha", s["alpha"], "a number > 0")
    if not is_number(s["min_share"]) or not 0 <= s["min_share"] <= 1 / s["clients"]:
        raise ConfigError("min_share", s["min_share"], f"a number in [0, 1/clients] = [0, {1 / s['clients']:.4g}]")
    for key in ("lr", "lora_alpha"):
        if not is_number(s[key]) or not s[key] > 0:
            raise ConfigError(key, s[key], "a number > 0")
    if s["k"] is not None and (not is_int(s["k"]) or s["k"] < 1):
        raise ConfigError("k", s["k"], "None (= the number of tasks) or an integer >= 1")
    if s["k_max"] is not None and (not is_int(s["k_max"]) or s["k_max"] < 2):
        raise ConfigError("k_max", s["k_max"], "None (= 2 x the number of tasks) or an integer >= 2")
    if s["cluster_on"] not in ("adapter", "update"):
        raise ConfigError("cluster_on", s["cluster_on"], "'adapter' (the paper) or 'update' (adapter - what was sent)")
    if s["embedding"] not in EMBEDDINGS:
        raise ConfigError("embedding", s["embedding"], f"one of {list(EMBEDDINGS)} (PCA is always drawn)")
    s["seeds"] = (s["seeds"],) if is_int(s["seeds"]) else tuple(s["seeds"])
    if len(s["seeds"]) == 0 or len(set(s["seeds"])) != len(s["seeds"]) or any(
            not is_int(x) or x < 0 for x in s["seeds"]):
        raise ConfigError("seeds", s["seeds"], "a non-empty list of distinct integers >= 0")
    s["methods"] = (s["methods"],) if isinstance(s["methods"], str) else tuple(s["methods"])
    if len(s["methods"]) == 0 or any(m not in METHODS for m in s["methods"]):
        raise ConfigError("methods", s["methods"], f"a non-empty subset of {list(METHODS)}")
    s["methods"] = tuple(m for m in METHODS if m in s["methods"])     # canonical order
    return s


def run_key(s: dict, method: str, seed: int) -> dict:
    """Everything one (method, seed) run depends on; its hash names the run in the store."""
    keep = ("tasks", "clients", "alpha", "min_share", "max_train_per_task", "max_test_per_task", "max_length",
            "rank", "lora_alpha", "depth", "rounds", "local_steps", "batch_size", "lr", "eval_every")
    key = {k: s[k] for k in keep}
    if method in ("fl_tac", "fl_tac_auto"):
        key.update(n_init=s["n_init"], k_max=s["k_max"], cluster_on=s["cluster_on"])
    if method == "fl_tac":
        key["k"] = s["k"]
    return {"experiment": EXPERIMENT, "version": STORE_VERSION, "method": method, "seed": int(seed),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in key.items()}}


# -- data ---------------------------------------------------------------------------------------------

@dataclass
class MultiTaskData:
    """T tasks in one joint train and one joint test split (labels offset into the union label space,
    a class mask per example), and the (client, task) pairs of the partition."""
    tasks: list[str]
    num_classes: list[int]
    offsets: list[int]
    train: object                       # TokenizedSplit over every task's train subsample
    test: object
    pairs: list[tuple[int, int]]        # (client, task index), sorted; only non-empty shares
    pair_indices: list[np.ndarray]      # joint train indices of each pair
    test_indices: list[np.ndarray]      # joint test indices of each task
    pad_id: int

    @property
    def num_labels(self) -> int:
        return int(sum(self.num_classes))

    def rows(self, t: int) -> slice:
        return slice(self.offsets[t], self.offsets[t] + self.num_classes[t])


def task_sizes(s: dict) -> dict[str, int]:
    from fedbench.data import list_tasks
    n = {t.name: t.n_train for t in list_tasks()}
    return {t: min(n[t], s["max_train_per_task"]) for t in s["tasks"]}


def partition(s: dict, seed: int) -> dict[str, list[np.ndarray]]:
    """{task: [indices into the task's train subsample, one array per client]} (seeded)."""
    from fedbench.data import partition_per_task
    return partition_per_task(task_sizes(s), s["clients"], s["alpha"], seed=derive_seed(seed, "partition"),
                              min_share=s["min_share"])


def partition_table(s: dict, seeds) -> pd.DataFrame:
    """Samples of each task held by each client, per seed (long format)."""
    rows = []
    for seed in seeds:
        for task, parts in partition(s, seed).items():
            rows += [{"seed": seed, "client": c, "task": task, "samples": len(p)} for c, p in enumerate(parts)]
    return pd.DataFrame(rows)


def _subsample(n: int, k: int, rng) -> np.ndarray:
    return np.arange(n) if k >= n else np.sort(rng.choice(n, size=k, replace=False))


def prepare_data(s: dict, seed: int) -> MultiTaskData:
    from fedbench.data import load_task
    from fedbench.models import load_tokenizer
    from fedbench.models.inputs import TokenizedSplit, tokenize_split
    tok = load_tokenizer(ModelConfig().backbone)
    parts = partition(s, seed)
    train_parts, test_parts, num_classes = [], [], []
    for t, name in enumerate(s["tasks"]):
        ds = load_task(name)
        tr = _subsample(len(ds["train"]), s["max_train_per_task"], rng_for(seed, "subsample", t, 0))
        te = _subsample(len(ds["test"]), s["max_test_per_task"], rng_for(seed, "subsample", t, 1))
        train_parts.append(tokenize_split(ds["train"].select(tr), tok, s["max_length"]))
        test_parts.append(tokenize_split(ds["test"].select(te), tok, s["max_length"]))
        num_classes.append(len(ds["train"].features["label"].names))
    offsets = np.concatenate([[0], np.cumsum(num_classes)[:-1]]).astype(int).tolist()

    def joint(splits):
        mask = torch.zeros((sum(len(x) for x in splits), sum(num_classes)), dtype=torch.bool)
        start, ids, labels, starts = 0, [], [], []
        for t, x in enumerate(splits):
            mask[start:start + len(x), offsets[t]:offsets[t] + num_classes[t]] = True
            ids += list(x.input_ids)
            labels.append(x.labels + offsets[t])
            starts.append(start)
            start += len(x)
        return TokenizedSplit(ids, torch.cat(labels), class_mask=mask), starts

    train, train_starts = joint(train_parts)
    test, test_starts = joint(test_parts)
    pairs, pair_indices = [], []
    for c in range(s["clients"]):
        for t, name in enumerate(s["tasks"]):
            if len(parts[name][c]):
                pairs.append((c, t))
                pair_indices.append(train_starts[t] + parts[name][c])
    test_indices = [test_starts[t] + np.arange(len(x)) for t, x in enumerate(test_parts)]
    return MultiTaskData(list(s["tasks"]), num_classes, offsets, train, test, pairs, pair_indices, test_indices,
                         tok.pad_token_id or 0)


# -- one (method, seed) run -----------------------------------------------------------------------------

HEAD_W, HEAD_B = "head.weight", "head.bias"


class MultiTaskRun:
    """One shared model; every adapter and head lives as a state dict and is loaded in and out of it.

    ``MultiTaskRun(s, seed, data, like=other)`` reuses `other`'s model, activation caches and initial
    state (the seeded init, taken when the model was built: the model's parameters themselves hold
    whatever was loaded last), so every method of a seed starts from the same adapters and heads.
    """

    def __init__(self, s: dict, seed: int, data: MultiTaskData, like: "MultiTaskRun | None" = None):
        from fedbench.models import build_model, trainable_state
        self.s, self.seed, self.data = s, seed, data
        if like is None:
            self.model = build_model(
                ModelConfig(), PeftConfig(method="lora", rank=s["rank"], lora_alpha=float(s["lora_alpha"]),
                                          depth=s["depth"]), data.num_labels, seed=derive_seed(seed, "init"))
            self.init = trainable_state(self.model)
            self.caches = self.filled_caches()
        else:
            self.model, self.init, self.caches = like.model, like.init, like.caches
        init = self.init
        self.lora_keys = [k for k in init if ".lora_A." in k or ".lora_B." in k]
        self.init_w, self.init_b = init["classifier.weight"], init["classifier.bias"]
        self.init_lora = OrderedDict((k, init[k]) for k in self.lora_keys)
        self.train_cfg = TrainConfig(local_steps=s["local_steps"], batch_size=s["batch_size"], lr=float(s["lr"]))

    def filled_caches(self):
        """Frozen-prefix activations of every train and test example, computed up front in a fixed
        (length-sorted) batch order: a cached value then never depends on which run touched it first."""
        from fedbench.models.inputs import ActivationCache, batch_order
        caches = []
        for split in (self.data.train, self.data.test):
            cache = ActivationCache(split, self.data.pad_id)
            if self.model.frozen_prefix > 0:
                cache.ensure(self.model.frozen_prefix)
                for batch in batch_order(np.arange(len(split)), split.lengths, 64, None, shuffle=False):
                    cache.get(self.model, batch)
            caches.append(cache)
        return tuple(caches)

    # states ------------------------------------------------------------------------------------------
    def head(self, t: int, w=None, b=None) -> OrderedDict:
        rows = self.data.rows(t)
        w = self.init_w if w is None else w
        b = self.init_b if b is None else b
        return OrderedDict([(HEAD_W, w[rows].clone()), (HEAD_B, b[rows].clone())])

    def full_state(self, lora: dict, heads: dict[int, dict]) -> OrderedDict:
        """The model's trainable state: `lora` + a classifier whose task-t rows are heads[t]."""
        w, b = self.init_w.clone(), self.init_b.clone()
        for t, h in heads.items():
            w[self.data.rows(t)], b[self.data.rows(t)] = h[HEAD_W], h[HEAD_B]
        out = OrderedDict((k, lora[k]) for k in self.lora_keys)
        out["classifier.weight"], out["classifier.bias"] = w, b
        return out

    def split_state(self, full: dict, t: int) -> OrderedDict:
        """A per-task state: the LoRA factors + task t's head rows."""
        out = OrderedDict((k, full[k]) for k in self.lora_keys)
        out.update(self.head(t, full["classifier.weight"], full["classifier.bias"]))
        return out

    def train(self, full: dict, indices, steps: int, seed: int):
        from fedbench.fl.client import train_client
        cfg = self.train_cfg if steps == self.s["local_steps"] else TrainConfig(
            local_steps=steps, batch_size=self.s["batch_size"], lr=float(self.s["lr"]))
        return train_client(self.model, full, self.data.train, indices, cfg, seed=seed, cache=self.caches[0],
                            pad_id=self.data.pad_id)

    def accuracy(self, full: dict, t: int) -> float:
        from fedbench.fl.client import evaluate
        from fedbench.models import load_trainable_state
        load_trainable_state(self.model, full)
        return evaluate(self.model, self.data.test, self.data.test_indices[t], batch_size=64,
                        cache=self.caches[1], pad_id=self.data.pad_id)["accuracy"]

    def eval_due(self, r: int) -> bool:
        return r % self.s["eval_every"] == 0 or r == self.s["rounds"]

    # per-task methods: fl_tac, fl_tac_auto, oracle, local --------------------------------------------
    def run_per_task(self, method: str) -> dict:
        from fedbench.models import state_nbytes
        d, s = self.data, self.s
        n_pairs = len(d.pairs)
        true_task = np.array([t for _, t in d.pairs])
        weights = [len(i) for i in d.pair_indices]
        states = [OrderedDict(list(self.init_lora.items()) + list(self.head(t).items())) for _, t in d.pairs]
        k_fixed = min(s["k"] or len(d.tasks), n_pairs)
        k_max = s["k_max"] or 2 * len(d.tasks)
        acc_rows, clu_rows, emb_rows, round_rows = [], [], [], []
        for r in range(1, s["rounds"] + 1):
            t0 = time.perf_counter()
            updates, losses = [], []
            for i, (c, t) in enumerate(d.pairs):
                u = self.train(self.full_state(states[i], {t: states[i]}), d.pair_indices[i], s["local_steps"],
                               seed=derive_seed(self.seed, "client", r, c, t))
                updates.append(self.split_state(u.state, t))
                losses.append(u.train_loss)
            adapters = [OrderedDict((k, u[k]) for k in self.lora_keys) for u in updates]
            sent = [OrderedDict((k, st[k]) for k in self.lora_keys) for st in states] \
                if s["cluster_on"] == "update" else None
            heads = [OrderedDict((k, u[k]) for k in (HEAD_W, HEAD_B)) for u in updates]
            bytes_up = 0 if method == "local" else sum(state_nbytes(u) for u in updates)
            if method == "local":
                states = updates
            else:
                if method == "oracle":
                    groups = true_task.tolist()
                else:
                    server_seed = derive_seed(self.seed, "server", r) % 2**32
                    step = clustering.server_step(adapters, weights, k_fixed if method == "fl_tac" else "auto",
                                                  seed=server_seed, n_init=s["n_init"], k_max=k_max, sent=sent)
                    groups = step.labels.tolist()
                    x = clustering.server_features(adapters, sent)
                    clu_rows.append(self._clustering_row(r, "fixed" if method == "fl_tac" else "silhouette",
                                                         step.k, true_task, step.labels))
                    if method == "fl_tac":   # what k = 'auto' would pick from the same adapters (not used)
                        k_auto, _ = clustering.choose_k_silhouette(x, server_seed, k_max=k_max, n_init=s["n_init"])
                        probe = clustering.kmeans_labels(x, k_auto, server_seed, s["n_init"]) if k_auto > 1 \
                            else np.zeros(n_pairs, dtype=np.int64)
                        clu_rows.append(self._clustering_row(r, "silhouette_probe", k_auto, true_task, probe))
                    emb_rows += self._embedding_rows(r, x, step.labels)
                # heads: within the adapter's group, among heads of one shape (see the module docstring)
                head_groups = [(g, tuple(h[HEAD_W].shape)) for g, h in zip(groups, heads)]
                agg_adapters = clustering.groupwise_fedavg(adapters, weights, groups)
                agg_heads = clustering.groupwise_fedavg(heads, weights, head_groups)
                combined = {hg: OrderedDict(list(agg_adapters[hg[0]].items()) + list(agg_heads[hg].items()))
                            for hg in agg_heads}
                states = [combined[hg] for hg in head_groups]     # members of a group share one object
            if self.eval_due(r) and (method != "local" or r == s["rounds"]):
                acc_rows += self._evaluate_pairs(r, states, weights)
            round_rows.append({"round": r, "train_loss": float(np.mean(losses)), "bytes_up": bytes_up,
                               "wall_s": time.perf_counter() - t0})
        lora_numel = sum(v.numel() for v in self.init_lora.values())
        per_client = [sum(lora_numel + d.num_classes[t] * (self.init_w.shape[1] + 1) for cc, t in d.pairs if cc == c)
                      for c in sorted({c for c, _ in d.pairs})]
        return self._result(acc_rows, clu_rows, emb_rows, round_rows, float(np.mean(per_client)))

    def _evaluate_pairs(self, r: int, states: list, weights: list) -> list[dict]:
        # pairs that received one state object (one cluster, one head shape) share one evaluation per task;
        # a cluster may hold pairs of several tasks, so the task is part of the key
        rows, seen = [], {}
        for t in range(len(self.data.tasks)):
            num = den = 0.0
            for i, (_, tt) in enumerate(self.data.pairs):
                if tt != t:
                    continue
                key = (id(states[i]), t)
                if key not in seen:
                    seen[key] = self.accuracy(self.full_state(states[i], {t: states[i]}), t)
                num += weights[i] * seen[key]
                den += weights[i]
            rows.append({"round": r, "task": self.data.tasks[t], "accuracy": num / den})
        return rows

    @staticmethod
    def _clustering_row(r, mode, k, true_task, labels) -> dict:
        return {"round": r, "ari": clustering.adjusted_rand(true_task, labels),
                "hungarian_accuracy": clustering.hungarian_accuracy(true_task, labels), "k": int(k), "k_mode": mode}

    def _embedding_rows(self, r: int, x: np.ndarray, labels) -> list[dict]:
        """PCA scores of the adapters (all n-1 components: every Euclidean distance is kept, so UMAP or
        t-SNE can be drawn from them later without the adapters)."""
        from sklearn.decomposition import PCA
        m = max(1, min(len(x) - 1, x.shape[1]))
        z = PCA(n_components=m, svd_solver="full").fit_transform(x)
        return [{"round": r, "client": c, "task": self.data.tasks[t], "cluster": int(labels[i]),
                 **{f"pc{j + 1}": float(z[i, j]) for j in range(m)}} for i, (c, t) in enumerate(self.data.pairs)]

    # FedIT ---------------------------------------------------------------------------------------------
    def run_fedit(self) -> dict:
        from fedbench.fl.aggregators import fedavg
        from fedbench.models import state_nbytes
        d, s = self.data, self.s
        clients = sorted({c for c, _ in d.pairs})
        held = {c: [t for cc, t in d.pairs if cc == c] for c in clients}
        idx = {c: np.concatenate([d.pair_indices[i] for i, (cc, _) in enumerate(d.pairs) if cc == c])
               for c in clients}
        n_ct = {(c, t): len(d.pair_indices[i]) for i, (c, t) in enumerate(d.pairs)}
        lora = OrderedDict(self.init_lora)
        heads = {t: self.head(t) for t in range(len(d.tasks))}
        acc_rows, round_rows = [], []
        for r in range(1, s["rounds"] + 1):
            t0 = time.perf_counter()
            ups, losses, bytes_up = {}, [], 0
            for c in clients:
                u = self.train(self.full_state(lora, heads), idx[c], s["local_steps"] * len(held[c]),
                               seed=derive_seed(self.seed, "client", r, c))
                ups[c] = u.state
                losses.append(u.train_loss)
                # up: the adapter + the heads of the tasks this client holds
                bytes_up += state_nbytes({k: u.state[k] for k in self.lora_keys}) + sum(
                    state_nbytes(self.head(t, u.state["classifier.weight"], u.state["classifier.bias"]))
                    for t in held[c])
            lora = fedavg([OrderedDict((k, ups[c][k]) for k in self.lora_keys) for c in clients],
                          [len(idx[c]) for c in clients])
            for t in range(len(d.tasks)):
                holders = [c for c in clients if t in held[c]]
                heads[t] = fedavg([self.head(t, ups[c]["classifier.weight"], ups[c]["classifier.bias"])
                                   for c in holders], [n_ct[(c, t)] for c in holders])
            if self.eval_due(r):
                full = self.full_state(lora, heads)
                acc_rows += [{"round": r, "task": name, "accuracy": self.accuracy(full, t)}
                             for t, name in enumerate(d.tasks)]
            round_rows.append({"round": r, "train_loss": float(np.mean(losses)), "bytes_up": bytes_up,
                               "wall_s": time.perf_counter() - t0})
        lora_numel = sum(v.numel() for v in self.init_lora.values())
        per_client = [lora_numel + sum(d.num_classes[t] * (self.init_w.shape[1] + 1) for t in held[c])
                      for c in clients]
        return self._result(acc_rows, [], [], round_rows, float(np.mean(per_client)))

    def _result(self, acc_rows, clu_rows, emb_rows, round_rows, params_per_client) -> dict:
        rounds = pd.DataFrame(round_rows)
        return {"accuracy": pd.DataFrame(acc_rows, columns=["round", "task", "accuracy"]),
                "clustering": pd.DataFrame(clu_rows, columns=["round", "ari", "hungarian_accuracy", "k", "k_mode"]),
                "embedding": pd.DataFrame(emb_rows),
                "rounds": rounds,
                "summary": {"trainable_params_per_client": params_per_client,
                            "bytes_up_per_round": float(rounds["bytes_up"].mean()),
                            "pairs": len(self.data.pairs), "wall_s": float(rounds["wall_s"].sum())}}

    def run(self, method: str) -> dict:
        return self.run_fedit() if method == "fedit" else self.run_per_task(method)


# -- the run store: one folder per run key, summary.json written last ----------------------------------

STORE = TableRunStore(EXPERIMENT, ("accuracy", "clustering", "embedding", "rounds"))
load_cached, save_cached = STORE.load, STORE.save


# -- the experiment -------------------------------------------------------------------------------------

@dataclass
class FlTacResult:
    settings: dict
    summary: pd.DataFrame           # per (method, task, seed)
    clustering: pd.DataFrame        # per (method, seed, round, k_mode)
    accuracy_rounds: pd.DataFrame   # per (method, seed, round, task)
    embedding: pd.DataFrame         # PCA scores of every adapter the FL-TAC server saw, per round
    partition: pd.DataFrame
    claims: pd.DataFrame
    runs: pd.DataFrame              # per (method, seed): wall-clock, pairs, run key hash
    out: Path = None
    figures: dict = field(default_factory=dict)


def run(profile: str = "quick", progress: bool = True, **overrides) -> FlTacResult:
    """Every (method, seed) run (loaded from the store when finished), then the CSVs, figures, claims."""
    s = settings_for(profile, **overrides)
    out = output_dir(EXPERIMENT, profile)
    per_run = {}
    for seed in s["seeds"]:
        keys = {m: run_key(s, m, seed) for m in s["methods"]}
        todo = [m for m in s["methods"] if load_cached(keys[m]) is None]
        first = None
        for m in s["methods"]:
            res = load_cached(keys[m])
            if res is None:
                if first is None:        # data, model, initial state, activation caches: once per seed
                    first = MultiTaskRun(s, seed, prepare_data(s, seed))
                res = MultiTaskRun(s, seed, first.data, like=first).run(m)
                save_cached(keys[m], res)
                if progress:
                    acc = res["accuracy"]
                    mean_acc = acc.loc[acc["round"] == s["rounds"], "accuracy"].mean()
                    print(f"[fl_tac] {m:<12} seed {seed}: {res['summary']['wall_s']:.0f} s, "
                          f"final mean accuracy {mean_acc:.3f}  ({len(todo)} run(s) to compute for this seed)",
                          flush=True)
            per_run[(m, seed)] = (res, config_hash(keys[m]))
    result = _tables(s, per_run)
    result.out = out
    save_table(result.summary, out, "summary.csv")
    save_table(result.clustering, out, "clustering.csv")
    save_table(result.accuracy_rounds, out, "accuracy_rounds.csv")
    save_table(result.partition, out, "partition.csv")
    if len(result.embedding):   # the 2-D PCA of every adapter the server saw, every round
        cols = ["method", "seed", "round", "client", "task", "cluster", "pc1", "pc2"]
        save_table(result.embedding.reindex(columns=cols), out, "adapter_embedding.csv")
    save_table(result.claims, out, "claims.csv")
    save_table(result.runs, out, "runs.csv")
    result.figures = make_figures(result, out)
    return result


def _tables(s: dict, per_run: dict) -> FlTacResult:
    summary, clu, acc, emb, runs = [], [], [], [], []
    for (m, seed), (res, h) in per_run.items():
        final = res["accuracy"][res["accuracy"]["round"] == s["rounds"]]
        for task in s["tasks"]:
            summary.append({"method": m, "task": task,
                            "accuracy": float(final.loc[final["task"] == task, "accuracy"].iloc[0]),
                            "trainable_params_per_client": res["summary"]["trainable_params_per_client"],
                            "bytes_up_per_round": res["summary"]["bytes_up_per_round"], "seed": seed})
        if len(res["clustering"]):
            clu.append(res["clustering"].assign(method=m, seed=seed))
        acc.append(res["accuracy"].assign(method=m, seed=seed))
        if len(res["embedding"]):
            emb.append(res["embedding"].assign(method=m, seed=seed))
        runs.append({"method": m, "seed": seed, "pairs": res["summary"]["pairs"],
                     "wall_s": round(res["summary"]["wall_s"], 1), "run": h})
    summary = pd.DataFrame(summary, columns=["method", "task", "accuracy", "trainable_params_per_client",
                                             "bytes_up_per_round", "seed"])
    clu = (pd.concat(clu, ignore_index=True)[["round", "ari", "hungarian_accuracy", "k", "method", "k_mode", "seed"]]
           if clu else pd.DataFrame(columns=["round", "ari", "hungarian_accuracy", "k", "method", "k_mode", "seed"]))
    acc = pd.concat(acc, ignore_index=True)[["method", "seed", "round", "task", "accuracy"]]
    emb = pd.concat(emb, ignore_index=True) if emb else pd.DataFrame()
    part = partition_table(s, s["seeds"])
    return FlTacResult(settings=s, summary=summary, clustering=clu, accuracy_rounds=acc, embedding=emb,
                       partition=part, claims=compute_claims(summary, clu, s, acc), runs=pd.DataFrame(runs))


# -- claims -------------------------------------------------------------------------------------------

PAPER_FLTAC_VS_FEDIT = ("FedIT -> FL-TAC, BERT on GLUE: SST-2 .652 -> .874, QNLI .670 -> .787, QQP .510 -> .807, "
                        "MRPC .520 -> .673, RTE .524 -> .532 (higher on every task)")


def compute_claims(summary: pd.DataFrame, clu: pd.DataFrame, s: dict,
                   accuracy_rounds: pd.DataFrame | None = None) -> pd.DataFrame:
    claims = []
    methods = set(summary["method"])
    if {"fl_tac", "fedit"} <= methods:
        ms = mean_std(summary[summary["method"].isin(["fl_tac", "fedit"])], ["method", "task"], "accuracy")
        mean = ms.set_index(["method", "task"])["mean"]
        n_seeds = summary["seed"].nunique()
        wins = 0
        for task in s["tasks"]:
            a, b = mean[("fedit", task)], mean[("fl_tac", task)]
            wins += b > a
            claims.append(Claim(f"FL-TAC beats FedIT on {task}", "FL-TAC > FedIT on every task (see the average row)",
                                f"FedIT {a:.3f} -> FL-TAC {b:.3f} ({b - a:+.3f}; mean of {n_seeds} seeds)", b > a))
        a = summary[summary["method"] == "fedit"]["accuracy"].mean()
        b = summary[summary["method"] == "fl_tac"]["accuracy"].mean()
        claims.append(Claim("FL-TAC beats FedIT on average over tasks", PAPER_FLTAC_VS_FEDIT,
                            f"FedIT {a:.3f} -> FL-TAC {b:.3f} ({b - a:+.3f}); FL-TAC higher on {wins} of "
                            f"{len(s['tasks'])} tasks", b > a))
    if {"oracle", "fedit"} <= methods:
        # FL-TAC's best case: clusters = tasks (the oracle groups by the true task)
        a = summary[summary["method"] == "fedit"]["accuracy"].mean()
        b = summary[summary["method"] == "oracle"]["accuracy"].mean()
        ours = f"FedIT {a:.3f} -> oracle {b:.3f} ({b - a:+.3f}) after {s['rounds']} rounds"
        if accuracy_rounds is not None:
            fed = accuracy_rounds[accuracy_rounds["method"].isin(["fedit", "oracle"])]
            per_round = fed.groupby(["method", "round"])["accuracy"].mean().unstack(0)
            ours += (f"; oracle ahead in {int((per_round['oracle'] > per_round['fedit']).sum())} of "
                     f"{len(per_round)} evaluated rounds")
        claims.append(Claim("task-wise aggregation (FL-TAC with clusters = tasks, i.e. the oracle) beats FedIT",
                            "FL-TAC > FedIT, with clusters that match the tasks", ours, b > a))
    fixed = clu[clu["k_mode"] == "fixed"] if len(clu) else clu
    if len(fixed):
        firsts = {seed: clustering.first_stable_round(g["round"], g["ari"]) for seed, g in fixed.groupby("seed")}
        last = fixed[fixed["round"] == fixed["round"].max()]
        first = fixed[fixed["round"] == fixed["round"].min()]
        where = ", ".join(f"seed {sd}: {'round ' + str(r) if r is not None else 'never'}" for sd, r in firsts.items())
        claims.append(Claim(
            "k-means (k = T) on the adapters alone recovers the tasks",
            "server clusters = tasks (Hungarian-matched clusters vs task labels; adapters of a task cluster "
            "together in the UMAP figure)",
            f"ARI = 1 from {where}; last round ARI {last['ari'].mean():.3f}, Hungarian accuracy "
            f"{last['hungarian_accuracy'].mean():.3f}",
            all(r is not None for r in firsts.values())))
        claims.append(Claim(
            "task clusters separate as training goes on",
            "adapter-evolution figure: clusters by task become distinct over the rounds",
            f"ARI round {int(first['round'].iloc[0])} {first['ari'].mean():.3f} -> round "
            f"{int(last['round'].iloc[0])} {last['ari'].mean():.3f} (mean over seeds)",
            bool(last["ari"].mean() > first["ari"].mean() + 1e-9 or last["ari"].mean() >= 1 - 1e-9)))
    return claims_table(claims)


# -- figures -----------------------------------------------------------------------------------------

def make_figures(res: FlTacResult, out: Path) -> dict:
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    matplotlib.rcParams.update({"font.size": 9})
    s, figs = res.settings, {}
    methods = [m for m in METHODS if m in set(res.summary["method"])]
    colors = method_colors(METHODS, methods)

    # 1. per-task accuracy by method: grouped bars, error bars = std over seeds
    ms = mean_std(res.summary, ["method", "task"], "accuracy")
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(s["tasks"]), 3.4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        g = ms[ms["method"] == m].set_index("task").reindex(list(s["tasks"]))
        ax.bar(np.arange(len(s["tasks"])) + (j - (len(methods) - 1) / 2) * width, g["mean"], width,
               yerr=g["std"].fillna(0), capsize=2, color=colors[m], label=LABELS[m])
    ax.set_xticks(np.arange(len(s["tasks"])), s["tasks"])
    ax.set_ylabel(f"test accuracy after {s['rounds']} rounds")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.set_title(f"per-task accuracy (mean ± std over {len(s['seeds'])} seeds)")
    ax.grid(axis="y", alpha=0.3)
    figs["accuracy_by_method"] = save_figure(fig, out, "accuracy_by_method.png")
    plt.close(fig)

    # 2. clustering quality vs round
    if len(res.clustering):
        fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.2))
        styles = {"fixed": "-", "silhouette": "--", "silhouette_probe": ":"}
        for (m, mode), g in res.clustering.groupby(["method", "k_mode"], sort=False):
            lab = f"{LABELS[m]}" + (" · silhouette k on these adapters" if mode == "silhouette_probe" else "")
            for ax, col in zip(axes, ["ari", "hungarian_accuracy"]):
                gm = g.groupby("round")[col].agg(["mean", "min", "max"])
                ax.plot(gm.index, gm["mean"], styles[mode], marker="o", color=colors[m], label=lab)
                ax.fill_between(gm.index, gm["min"], gm["max"], color=colors[m], alpha=0.12)
        for ax, title in zip(axes, ["adjusted Rand index", "Hungarian accuracy"]):
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{title} (clusters vs true tasks)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        figs["ari_vs_round"] = save_figure(fig, out, "ari_vs_round.png")
        plt.close(fig)

    # 3. adapter evolution: a 2-D embedding per selected round, coloured by true task
    if len(res.embedding):
        figs["adapter_evolution"] = _evolution_figure(res, out)

    # 4. accuracy vs rounds (per task + mean over tasks), mean over seeds; local only at its last round
    acc = res.accuracy_rounds
    panels = list(s["tasks"]) + ["mean over tasks"]
    ncol = min(len(panels), 3)
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.5 * nrow), squeeze=False)
    for p, ax in zip(panels, axes.flat):
        for m in methods:
            g = acc[acc["method"] == m]
            g = (g.groupby(["seed", "round"])["accuracy"].mean().reset_index() if p == "mean over tasks"
                 else g[g["task"] == p])
            gm = g.groupby("round")["accuracy"].mean()
            if len(gm) == 1:
                ax.axhline(gm.iloc[0], color=colors[m], ls="--", lw=1, label=f"{LABELS[m]} (last round)")
            else:
                ax.plot(gm.index, gm.values, marker="o", ms=3, color=colors[m], label=LABELS[m])
        ax.set_title(p)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("test accuracy")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    figs["accuracy_vs_rounds"] = save_figure(fig, out, "accuracy_vs_rounds.png")
    plt.close(fig)
    return figs


def embed_2d(scores: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates of adapters from their PCA scores: 'pca' (first two components), 'umap', 'tsne'."""
    if method == "pca" or len(scores) < 4:
        z = scores[:, :2]
        return z if z.shape[1] == 2 else np.column_stack([z[:, 0], np.zeros(len(z))])
    if method == "umap":
        import umap
        return umap.UMAP(n_components=2, n_neighbors=min(15, len(scores) - 1), random_state=seed,
                         init="random").fit_transform(scores)
    if method == "tsne":
        from sklearn.manifold import TSNE
        return TSNE(n_components=2, perplexity=min(30.0, (len(scores) - 1) / 3), random_state=seed,
                    init="pca").fit_transform(scores)
    raise ConfigError("embedding", method, f"one of {list(EMBEDDINGS)}")


def _evolution_figure(res: FlTacResult, out: Path) -> Path:
    import matplotlib.pyplot as plt
    s = res.settings
    emb = res.embedding
    m = "fl_tac" if "fl_tac" in set(emb["method"]) else emb["method"].iloc[0]
    seed = s["seeds"][0]
    e = emb[(emb["method"] == m) & (emb["seed"] == seed)]
    all_rounds = sorted(e["round"].unique())
    n = min(s["evolution_panels"], len(all_rounds))
    picked = sorted({all_rounds[int(round(i))] for i in np.linspace(0, len(all_rounds) - 1, n)})
    kinds = ["pca"] + ([s["embedding"]] if s["embedding"] != "pca" else [])
    fig, axes = plt.subplots(len(kinds), len(picked), figsize=(2.6 * len(picked), 2.5 * len(kinds)), squeeze=False)
    task_colors = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(s["tasks"])}
    markers = "osD^vP*Xh<>p"
    clu = res.clustering
    for col, r in enumerate(picked):
        er = e[e["round"] == r]
        scores = er[[c for c in er.columns if c.startswith("pc")]].dropna(axis=1).to_numpy()
        row_ari = clu[(clu["method"] == m) & (clu["seed"] == seed) & (clu["round"] == r)
                      & (clu["k_mode"] != "silhouette_probe")]
        for row, kind in enumerate(kinds):
            ax = axes[row, col]
            z = embed_2d(scores, kind, seed)
            for t in s["tasks"]:
                for cl in sorted(er["cluster"].unique()):
                    sel = ((er["task"] == t) & (er["cluster"] == cl)).to_numpy()
                    if sel.any():
                        ax.scatter(z[sel, 0], z[sel, 1], s=22, color=task_colors[t],
                                   marker=markers[int(cl) % len(markers)], edgecolors="k", linewidths=0.3)
            ari = f", ARI {row_ari['ari'].iloc[0]:.2f}" if len(row_ari) else ""
            ax.set_title(f"round {r}{ari}" if row == 0 else f"round {r} ({kind})", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(kind.upper())
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=t) for t, c in task_colors.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(f"{LABELS[m]}: every client adapter the server sees (colour = true task, marker = cluster; "
                 f"seed {seed})", fontsize=8)
    fig.tight_layout()
    path = save_figure(fig, out, "adapter_evolution.png")
    plt.close(fig)
    return path
