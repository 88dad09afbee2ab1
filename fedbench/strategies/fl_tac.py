"""FL-TAC (Ping et al., 2024, arXiv 2404.15384) and its baselines as strategies on the one loop.

A multi-task federation (:class:`MultiTaskData`): every task is split over the clients, so a client holds
several tasks in different amounts. As in the official code (siqi2000/FL-TAC, ``fltac/trainer.py``) the
model has one 2-class head for every task and no task id reaches it; what a client trains and sends for a
task is its whole trainable state (the LoRA factors and that head: ``get_adapter_state`` returns every
trainable parameter), called an *adapter* here. Strategies (``fl.strategy``):

- ``fl_tac``: one adapter per (client, task), kept in the client's store between rounds; each round the
  client trains ``train.local_steps`` steps on each of its tasks, starting from the adapter the server sent
  for that task, and sends every adapter up, unlabelled. The server flattens them, runs k-means (k = the
  number of tasks; sklearn, ``n_init`` 10, seeded; ``k="auto"``: silhouette), FedAvgs inside each cluster
  weighted by samples (with the configured rule), and sends each (client, task) its cluster's aggregate.
  ``cluster_on="update"`` clusters the round's updates (adapter - what was sent for it) instead.
- ``fl_tac_oracle``: the same, grouped by the true task (perfect clustering).
- ``fl_tac_local``: every (client, task) adapter is its own group: local training (nothing is averaged).
- ``fedit_tasks``: FedIT as the official code runs it: one adapter per client trained on its tasks in turn,
  ``train.local_steps // n_tasks`` steps each (n_tasks = the tasks the client holds), FedAvg over clients.
  ``fl.options.steps_per_task="matched"`` trains ``train.local_steps`` steps on each task instead: the same
  optimiser steps per (client, task) as FL-TAC, the control that separates FL-TAC's clustering from its compute.

Task heads (``MultiTaskData.head_rows`` set; the "task-head arm"): the classifier holds one head per task (task
t's rows ``head_rows[t]``, each task its own label count; a class mask keeps every example's softmax on its
task's rows), so the heads carry task identity. The heads are aggregated per task, never per cluster: after the
grouping's average, task t's rows of every slot are replaced by the FedAvg (the configured rule) of the task-t
rows sent by the clients holding t, weighted by their samples of t (``fl_tac_local`` keeps its own heads).
The server clusters the LoRA factors only (a task's head rows alone would give its task away).

Server state (checkpointed by ``state_dict``): the aggregates, named slots of ``GlobalModel.state``
(``"<slot>/<parameter>"``), and which slot each (client, task) receives next (``assign``). Task labels are
known to the server only to score the clustering (ARI, Hungarian accuracy), never to decide it.

Evaluation (:meth:`TaskClusters.evaluate`): each task is scored with the adapter a client holding it would
use: every test example of task t is scored by the adapter of one client holding t, drawn once per seed with
probability proportional to that client's samples of t (``MultiTaskData.test_owner``), so every method is
scored on the same examples with the same owners (the per-example predictions pair for the claims).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from fedbench.errors import ConfigError
from fedbench.strategies import clustering as CL
from fedbench.merging.aggregators import TooFewUpdates, fedavg
from fedbench.fl.seeding import derive_seed
from fedbench.fl.federations import MultiTaskData, as_multitask
from fedbench.fl.strategy import FedAvg, GlobalModel
from fedbench.options import Options, check_bool, check_choice, check_int
from fedbench.registry import AGGREGATORS, STRATEGIES

log = logging.getLogger("fedbench.fl")


def _check(name: str):
    def check(cfg) -> None:
        if cfg.fl.lora_aggregation != "factors":
            raise ConfigError("fl.lora_aggregation", cfg.fl.lora_aggregation,
                              f"'factors' with fl.strategy={name!r} (adapters are averaged as they are)")
        if AGGREGATORS.entry(cfg.fl.aggregator).facts.get("server_optimizer") is not None:
            raise ConfigError("fl.aggregator", cfg.fl.aggregator,
                              f"a rule without a server optimizer with fl.strategy={name!r} (the aggregates are "
                              "per cluster and change identity every round)")
    return check


HEAD_PREFIX = "classifier."      # the model's classifier (fedbench.models.backbone): one head, or one per task


def _pair(c: int, t: int) -> str:
    return f"{int(c)}:{int(t)}"


class TaskClusters(FedAvg):
    """The shared machinery; :meth:`groups` (each subclass's one rule) decides whose adapters are averaged."""

    shared_adapter = False       # FedIT: one adapter per client, trained on its tasks in turn
    average_heads = True         # task heads FedAvg'd per task over its holders (local training keeps its own)

    def groups(self, gm: GlobalModel, subs: list, round_idx: int) -> list[str]:
        """The group of each (client, task, adapter, samples) of `subs`: adapters of a group are averaged."""
        raise NotImplementedError

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.assign: dict[str, str] = {}        # "client:task" -> slot it receives next
        self.prev_labels: dict[str, int] = {}   # last round's cluster of each (client, task)
        self.cluster_rows: list[dict] = []
        self.embedding_rows: list[dict] = []
        self.acc_rows: list[dict] = []
        self.val_predictions: dict | None = None
        self.data: MultiTaskData | None = None
        self.last_round = 0

    def attach(self, data) -> None:
        self.data = as_multitask(data, self.cfg.seed)

    @property
    def n_tasks(self) -> int:
        return len(self.data.tasks)

    @property
    def task_heads(self) -> bool:
        return bool(self.data.head_rows)

    def tasks_of(self, c: int) -> list[int]:
        return [t for t in range(self.n_tasks) if len(self.data.task_clients[t][c])]

    # -- server side --------------------------------------------------------------------------------
    def initial_model(self, model) -> GlobalModel:
        gm = super().initial_model(model)
        self.keys = list(gm.state)
        self.head_keys = [k for k in self.keys if k.startswith(HEAD_PREFIX)]
        # what k-means sees: everything sent, or with task heads the LoRA factors only
        self.cluster_keys = [k for k in self.keys if k not in self.head_keys] if self.task_heads else self.keys
        if self.task_heads and not self.head_keys:
            raise ValueError(f"task heads need the classifier's parameters ({HEAD_PREFIX}*) among the trainable keys")
        return GlobalModel(OrderedDict((f"init/{k}", v) for k, v in gm.state.items()))

    def slot(self, gm: GlobalModel, name: str) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, gm.state[f"{name}/{k}"]) for k in self.keys)

    def slot_of(self, c: int, t: int) -> str:
        return self.assign.get(_pair(c, t), "init")

    def configure_round(self, round_idx, clients, global_model):
        """Each client receives every distinct aggregate its tasks are assigned to (once), which slot each task
        starts from (``options['slots']``) and the names its adapters travel back under (``send_keys``)."""
        out = []
        for c in clients:
            c = int(c)
            tasks = self.tasks_of(c)
            if self.shared_adapter:
                slots, names = {"shared": self.slot_of(c, 0)}, ["shared"]
            else:
                slots, names = {f"task{t}": self.slot_of(c, t) for t in tasks}, [f"task{t}" for t in tasks]
            down = OrderedDict()
            for s in dict.fromkeys(slots.values()):
                down.update((f"{s}/{k}", global_model.state[f"{s}/{k}"]) for k in self.keys)
            send = tuple(f"{n}/{k}" for n in names for k in self.keys)
            out.append(self.instruction(c, round_idx, GlobalModel(down), send_keys=send,
                                        options={"tasks": tasks, "slots": slots}))
        return out

    def reference(self, ins):
        """Each task's adapter travels up as ``task<t>/<key>`` but started from its slot ``<slot>/<key>``: the
        guard's norm and an update attack measure it against that start, not from zero."""
        return OrderedDict((f"{name}/{k}", ins.state[f"{slot}/{k}"]) for name, slot in ins.options["slots"].items()
                           for k in self.keys)

    def aggregate(self, global_model, updates, round_idx):
        self.last_round = int(round_idx)
        if not updates:
            return global_model
        subs = []              # (client, task, adapter, samples)
        for u in updates:
            for t, st, n in self._unpack(u):
                subs.append((u.client_id, t, st, n))
        states, weights = [s[2] for s in subs], [float(s[3]) for s in subs]
        groups = self.groups(global_model, subs, round_idx)
        aggregates = self._group_average(states, weights, groups, round_idx)
        for (c, t, _, _), g in zip(subs, groups):
            if self.shared_adapter:
                for tt in range(self.n_tasks):
                    self.assign[_pair(c, tt)] = g
            else:
                self.assign[_pair(c, t)] = g
        if self.shared_adapter:              # every client (reporting or not) receives the new average
            self.assign = {p: "shared" for p in self.assign}
        state = OrderedDict((k, v) for k, v in global_model.state.items() if k.startswith("init/"))
        live = set(self.assign.values())
        for k, v in global_model.state.items():         # slots still held by clients that did not report
            name = k.split("/", 1)[0]
            if name in live and name not in aggregates and name != "init":
                state[k] = v
        for g, agg in aggregates.items():
            state.update((f"{g}/{k}", agg[k]) for k in self.keys)
        if self.task_heads and self.average_heads:
            heads = self._task_heads(global_model, updates, round_idx)
            for name in dict.fromkeys(k.split("/", 1)[0] for k in state):     # every slot, init included
                state.update((f"{name}/{k}", heads[k]) for k in self.head_keys)
        return GlobalModel(state)

    def _task_heads(self, gm, updates, round_idx) -> "OrderedDict[str, torch.Tensor]":
        """The classifier with task t's rows = the FedAvg of the task-t rows the clients holding t sent (weighted
        by their samples of t); a task nobody sent keeps its rows. Never grouped by cluster."""
        rows, weights, groups = [], [], []
        for u in updates:
            for t, st, n in self._unpack(u):
                for tt in (self.tasks_of(u.client_id) if t == -1 else [t]):   # FedIT's one adapter: every task
                    a, b = self.data.head_rows[tt]
                    rows.append(OrderedDict((k, st[k][a:b]) for k in self.head_keys))
                    weights.append(float(u.extras[f"n/task{tt}"].item()) if t == -1 else float(n))
                    groups.append(tt)
        heads = OrderedDict((k, gm.state[f"init/{k}"].clone()) for k in self.head_keys)
        for t, agg in self._group_average(rows, weights, groups, round_idx).items():
            a, b = self.data.head_rows[t]
            for k in self.head_keys:
                heads[k][a:b] = agg[k]
        return heads

    def _group_average(self, states, weights, groups, round_idx) -> dict:
        members: dict = OrderedDict()
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        out = {}
        for g, idx in members.items():
            ss, ws = [states[i] for i in idx], [weights[i] for i in idx]
            try:
                out[g] = self.rule(ss, ws, self.fl)
            except TooFewUpdates as e:       # a robust rule on a small cluster: fall back to FedAvg there
                log.warning("round %d, group %s: %s; FedAvg instead", round_idx, g, e)
                out[g] = fedavg(ss, ws)
        return out

    def _features(self, gm, subs) -> np.ndarray:
        keys = self.cluster_keys
        x = CL.flatten_adapters([s[2] for s in subs], keys=keys)
        if self.options.cluster_on == "update":
            x = x - CL.flatten_adapters([self.slot(gm, self.slot_of(c, t)) for c, t, _, _ in subs], keys=keys)
        return x

    def _embed(self, x, subs, labels, round_idx, method: str) -> None:
        """2-D coordinates of what the server clustered this round (UMAP seeded from the run's seed, or PCA)."""
        z, used = CL.embed_2d(x, method, derive_seed(self.cfg.seed, "server", round_idx, 1))
        for (c, t, _, _), lab, (a, b) in zip(subs, labels, z):
            self.embedding_rows.append({"round": int(round_idx), "client": int(c), "task": int(t),
                                        "cluster": int(lab), "embedding": used, "dim1": float(a), "dim2": float(b)})

    # -- client side --------------------------------------------------------------------------------
    def _unpack(self, u) -> list[tuple[int, dict, int]]:
        """[(task, adapter state, samples)] of an update (FedIT: task -1, one shared adapter)."""
        out = []
        names = sorted({k.split("/", 1)[0] for k in u.state}, key=lambda s: (len(s), s))
        for name in names:
            st = OrderedDict((k, u.state[f"{name}/{k}"]) for k in self.keys)
            n = int(u.extras[f"n/{name}"].item()) if f"n/{name}" in u.extras else int(u.num_samples)
            out.append((-1 if name == "shared" else int(name[len("task"):]), st, n))
        return out

    def client_update(self, run, ins, store):
        from fedbench.fl.client import ClientUpdate, train_client
        data, c = self.data, ins.client_id
        tasks = [int(t) for t in ins.options.get("tasks", self.tasks_of(c))]
        adapters = store.setdefault("adapters", {})
        base = run.cfg.train if ins.local_steps is None else run.cfg.train.with_steps(ins.local_steps)
        shared = self.shared_adapter
        split = shared and self.options.steps_per_task == "split"     # FedIT: the official split of the steps
        steps = max(1, (base.local_steps or 1) // max(1, len(tasks))) if split else base.local_steps
        cfg = base.with_steps(steps) if steps else base
        state_out, extras, losses, n_steps, n_all, eps = OrderedDict(), {}, [], 0, 0, []
        cur = self._received(ins, "shared") if shared else None
        for t in tasks:
            start = cur if shared else self._received(ins, f"task{t}")
            start = OrderedDict((k, v.clone()) for k, v in start.items())
            rows = data.task_clients[t][c]
            run.load(GlobalModel(start))
            dp = store.setdefault("dp_tasks", {}).setdefault(f"t{t}", {})
            u = train_client(run.model, start, run.client_split(c), rows, cfg,
                             seed=derive_seed(run.cfg.seed, "client", ins.round_idx, c, t), client_id=c,
                             cache=run.train_cache, pad_id=data.pad_id, dp_state=dp, dp_total_rounds=run.cfg.fl.rounds)
            losses.append((u.train_loss, u.num_steps))
            n_steps += u.num_steps
            n_all += len(rows)
            if "dp_epsilon" in u.metrics:
                eps.append(float(u.metrics["dp_epsilon"]))
            if shared:
                cur = OrderedDict((k, u.state[k]) for k in self.keys)
            else:
                adapters[f"t{t}"] = OrderedDict((k, u.state[k].clone()) for k in self.keys)
                state_out.update((f"task{t}/{k}", u.state[k]) for k in self.keys)
            if not shared or self.task_heads:   # FedIT with task heads: each head weighted by its task's samples
                extras[f"n/task{t}"] = torch.tensor([len(rows)], dtype=torch.int64)
        if shared:
            adapters["shared"] = OrderedDict((k, v.clone()) for k, v in cur.items())
            state_out.update((f"shared/{k}", v) for k, v in cur.items())
        metrics = {}
        if eps:      # disjoint data per task: parallel composition, the client spends the largest
            metrics["dp_epsilon"] = max(eps)
            store.setdefault("dp", {})["epsilon"] = max(store.get("dp", {}).get("epsilon", 0.0), max(eps))
        total = sum(s for _, s in losses)
        loss = float(sum(l * s for l, s in losses) / total) if total else float("nan")
        return ClientUpdate(client_id=c, state=state_out, num_samples=n_all, num_steps=n_steps, train_loss=loss,
                            wall_s=0.0, metrics=metrics, extras=extras)

    def _received(self, ins, name: str) -> "OrderedDict[str, torch.Tensor]":
        slot = ins.options["slots"][name]
        return OrderedDict((k, ins.state[f"{slot}/{k}"]) for k in self.keys)

    # -- evaluation ---------------------------------------------------------------------------------
    def _score(self, run, gm, split, rows_per_task, owners, cache) -> dict:
        from fedbench.fl.client import evaluate
        idx, lab, pred, losses = [], [], [], []
        for t, (rows, own) in enumerate(zip(rows_per_task, owners)):
            slots = np.array([self.slot_of(int(c), 0 if self.shared_adapter else t) for c in own])
            for s in sorted(set(slots.tolist())):
                sel = np.asarray(rows)[slots == s]
                run.load(GlobalModel(self.slot(gm, s)))
                out = evaluate(run.model, split, sel, cache=cache, pad_id=self.data.pad_id, return_predictions=True)
                p = out["predictions"]
                idx.append(np.asarray(p["test_index"]))
                lab.append(np.asarray(p["label"]))
                pred.append(np.asarray(p["prediction"]))
                losses.append((out["loss"], len(sel)))
        idx, lab, pred = (np.concatenate(a).astype(np.int64) for a in (idx, lab, pred))
        order = np.argsort(idx, kind="stable")
        n = sum(m for _, m in losses)
        return {"accuracy": float(np.mean(lab == pred)), "loss": float(sum(l * m for l, m in losses) / n),
                "predictions": {"test_index": idx[order], "label": lab[order], "prediction": pred[order]}}

    def evaluate(self, run, global_model, predictions: bool = False) -> dict:
        d = self.data
        out = self._score(run, global_model, d.test, d.task_test, d.test_owner, run.test_cache)
        correct = dict(zip(out["predictions"]["test_index"].tolist(),
                           (out["predictions"]["label"] == out["predictions"]["prediction"]).tolist()))
        r = self.last_round
        for t, rows in enumerate(d.task_test):
            self.acc_rows.append({"round": r, "task": t,
                                  "accuracy": float(np.mean([correct[int(i)] for i in rows])) if len(rows) else np.nan})
        if r == self.cfg.fl.rounds and d.task_val:
            v = self._score(run, global_model, d.train, d.task_val, d.val_owner, run.train_cache)
            self.val_predictions = {k: np.asarray(x).tolist() for k, x in v["predictions"].items()}
        if not predictions:
            out.pop("predictions")
        return out

    def result_extras(self) -> dict:
        """What the loop adds to a run's summary (JSON): the per-round clustering, per-task accuracy,
        adapter embedding and validation predictions."""
        return {"fl_tac": {"clustering": self.cluster_rows, "accuracy": self.acc_rows,
                           "embedding": self.embedding_rows, "val_predictions": self.val_predictions}}

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self):
        tensors, meta = super().state_dict()
        meta.update(assign=self.assign, prev_labels=self.prev_labels, last_round=self.last_round,
                    **self.result_extras()["fl_tac"])
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        super().load_state_dict(tensors, meta)
        self.assign, self.prev_labels = dict(meta["assign"]), {k: int(v) for k, v in meta["prev_labels"].items()}
        self.last_round = int(meta["last_round"])
        self.cluster_rows, self.acc_rows = list(meta["clustering"]), list(meta["accuracy"])
        self.embedding_rows, self.val_predictions = list(meta["embedding"]), meta["val_predictions"]


def changed_count(prev: list, cur: list) -> int:
    """Adapters whose cluster changed between two rounds, after matching last round's clusters to this
    round's (Hungarian on the contingency table: k-means numbers its clusters arbitrarily each round)."""
    from scipy.optimize import linear_sum_assignment
    _, a = np.unique(np.asarray(prev), return_inverse=True)
    _, b = np.unique(np.asarray(cur), return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    r, cidx = linear_sum_assignment(table, maximize=True)
    return int(len(prev) - table[r, cidx].sum())


@dataclass(frozen=True)
class ClusterOptions(Options):
    """The FL-TAC server's clustering: ``k`` (None = the number of tasks, an integer, or "auto" = the silhouette's
    choice up to ``k_max``, None = 2 x tasks), k-means restarts ``n_init`` (``silhouette_n_init`` for the
    silhouette's, None = n_init), ``cluster_on`` what is clustered ("adapter": the adapters, "update": adapter -
    what was sent for it), ``silhouette`` (also record the silhouette's k every round), ``embedding`` (record
    2-D coordinates of every adapter every round: "umap", "pca" or "none"; see
    :func:`fedbench.strategies.clustering.embed_2d`)."""
    k: int | str | None = None
    k_max: int | None = None
    n_init: int = 10
    silhouette_n_init: int | None = None
    cluster_on: str = "adapter"
    silhouette: bool = False
    embedding: str = "pca"

    def validate(self, prefix):
        if not (self.k is None or self.k == "auto" or (isinstance(self.k, int) and not isinstance(self.k, bool)
                                                       and self.k >= 1)):
            raise ConfigError(f"{prefix}.k", self.k, "null (= the number of tasks), an integer >= 1 or 'auto'")
        for key in ("k_max", "silhouette_n_init"):
            if getattr(self, key) is not None:
                check_int(f"{prefix}.{key}", getattr(self, key), 2 if key == "k_max" else 1)
        check_int(f"{prefix}.n_init", self.n_init, 1)
        check_choice(f"{prefix}.cluster_on", self.cluster_on, ("adapter", "update"))
        check_bool(f"{prefix}.silhouette", self.silhouette)
        check_choice(f"{prefix}.embedding", self.embedding, ("none", "pca", "umap"))


@STRATEGIES.register("fl_tac", check=_check("fl_tac"), options=ClusterOptions)
class FLTAC(TaskClusters):
    """FL-TAC: per-task adapters, k-means on the server, FedAvg per cluster."""

    def groups(self, gm, subs, round_idx):
        """k-means over the adapters (or their updates), k = the number of tasks by default (ClusterOptions);
        each round's clustering is scored against the true tasks (ARI, Hungarian accuracy, changed clusters)."""
        true = [t for _, t, _, _ in subs]
        row = {"round": int(round_idx), "adapters": len(subs)}
        x = self._features(gm, subs)
        opts = self.options
        k = opts.k or self.n_tasks
        n_init = int(opts.n_init)
        k_max = opts.k_max or 2 * self.n_tasks
        seed = derive_seed(self.cfg.seed, "server", round_idx) % 2**32
        sil_k = None
        if k == "auto" or opts.silhouette:
            sil_k, _ = CL.choose_k_silhouette(x, seed, k_max=int(k_max), n_init=int(opts.silhouette_n_init or n_init))
        k = sil_k if k == "auto" else min(int(k), len(subs))
        labels = CL.kmeans_labels(x, k, seed, n_init).tolist()
        row.update(k=int(k), k_silhouette=sil_k,
                   ari=CL.adjusted_rand(true, labels), hungarian_accuracy=CL.hungarian_accuracy(true, labels))
        if opts.embedding != "none":
            self._embed(x, subs, labels, round_idx, opts.embedding)
        pairs = [_pair(c, t) for c, t, _, _ in subs]
        cur = dict(zip(pairs, labels))
        common = [p for p in pairs if p in self.prev_labels]
        row["changed_clusters"] = (changed_count([self.prev_labels[p] for p in common], [cur[p] for p in common])
                                   if common else None)
        self.prev_labels = cur
        self.cluster_rows.append(row)
        return [f"r{round_idx}c{j}" for j in labels]


@STRATEGIES.register("fl_tac_oracle", check=_check("fl_tac_oracle"))
class TaskOracle(TaskClusters):
    """Per-task FedAvg with the true task labels (what perfect clustering gives)."""

    def groups(self, gm, subs, round_idx):
        return [f"task{t}" for _, t, _, _ in subs]


@STRATEGIES.register("fl_tac_local", check=_check("fl_tac_local"))
class TaskLocal(TaskClusters):
    """Every (client, task) adapter trains alone; the server returns it unchanged."""
    average_heads = False

    def groups(self, gm, subs, round_idx):
        return [f"pair{c}_{t}" for c, t, _, _ in subs]


@dataclass(frozen=True)
class FedITOptions(Options):
    """FedIT's local budget: ``steps_per_task`` "split" (the official code: ``max(1, local_steps // n_tasks)``
    steps on each of the client's n_tasks tasks, so FedIT trains 1 / n_tasks of FL-TAC's steps) or "matched"
    (``local_steps`` steps on each task: FL-TAC's optimiser steps per (client, task), compute-matched)."""
    steps_per_task: str = "split"

    def validate(self, prefix):
        check_choice(f"{prefix}.steps_per_task", self.steps_per_task, ("split", "matched"))


@STRATEGIES.register("fedit_tasks", check=_check("fedit_tasks"), options=FedITOptions)
class FedITTasks(TaskClusters):
    """FedIT as in the official code: one adapter per client, local_steps // n_tasks steps on each task in turn
    (``steps_per_task="matched"``: local_steps on each task)."""
    shared_adapter = True

    def groups(self, gm, subs, round_idx):
        return ["shared"] * len(subs)
