"""FL-TAC (Ping et al., 2024, arXiv 2404.15384) on the shared loop: per-task adapters clustered on the server.

Every method is a strategy of :mod:`fedbench.strategies.fl_tac` run by :func:`fedbench.fl.server.run_cached`,
so sampling, dropout, DP-SGD, robust rules and the Flower engine reach it by configuration
(``fedbench run configs/fl_tac/quick.yaml --set fl.dropout=0.3``).

Setting (the paper arm, the official code's protocol): binary tasks only, one 2-class head, no task id at
inference, no class mask. Each task's training subsample (``max_train_per_task``, fixed by ``data_seed``) is
split over ``data.num_clients`` clients by Dirichlet(``data.alpha``), shares under ``min_share`` zeroed (per
seed); ``val_per_task`` further training rows per task are a validation split (never trained on) that picks
the learning rate; ``max_test_per_task`` test rows per task are scored.

Methods (:data:`METHODS`): ``fl_tac`` (k-means, k = T, on the flattened adapters; the silhouette k is recorded
beside it every round), ``fl_tac_update`` (diagnostic: k-means on the round's updates), ``fedit`` (one adapter
per client, ``local_steps // n_tasks`` steps per task in turn), ``oracle`` (per-task FedAvg with the true
labels), ``local``. An adapter is everything trainable (LoRA factors + the 2-class head), as the official
``get_adapter_state`` sends it.

The task-head arm (labelled ``arm = "task heads"``): ``fedit_heads`` and ``fl_tac_heads`` are FedIT and FL-TAC
with one classifier head per task (each task's own label count, a class mask per example; the test rows of
task t are scored with head t), the heads FedAvg'd per task over the clients holding it, never per cluster
(:mod:`fedbench.strategies.fl_tac`). The same schedule as the paper arm: only the heads differ, so the two arms
side by side show what task identity in the heads is worth to FedIT's one adapter.

The fourth binary task, ``tweet_polarity``, is made here from the offline ``tweet_sentiment`` (negative vs
positive; neutral rows dropped; label 0 = negative, 1 = positive).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedbench.bench.report import write_report
from fedbench.config import ConfigError, ExperimentConfig
from fedbench.fl.federations import BINARY, binary_tasks
from fedbench.bench import (Settings, check_list, check_method, check_seeds, check_subset, chosen_lr,
                                         is_int, is_number, no_lr, output_dir, resolve_profile, runs_root,
                                         save_figure, save_table, select_lr)
from fedbench.fl.seeding import derive_seed

EXPERIMENT = "fl_tac"
METHODS = ("fl_tac", "fl_tac_update", "fedit", "fedit_matched", "oracle", "local", "fedit_heads", "fl_tac_heads")
STRATEGY = {"fl_tac": "fl_tac", "fl_tac_update": "fl_tac", "fedit": "fedit_tasks", "fedit_matched": "fedit_tasks",
            "oracle": "fl_tac_oracle", "local": "fl_tac_local", "fedit_heads": "fedit_tasks", "fl_tac_heads": "fl_tac"}
LABELS = {"fl_tac": "FL-TAC (k-means, k = T)", "fl_tac_update": "FL-TAC clustering updates (diagnostic)",
          "fedit": "FedIT (one adapter, local_steps // n_tasks per task)",
          "fedit_matched": "FedIT, compute-matched (one adapter, local_steps per task)",
          "oracle": "oracle per-task FedAvg", "local": "local only", "fedit_heads": "FedIT + task heads",
          "fl_tac_heads": "FL-TAC + task heads"}
# FedIT's local budget (fedit_tasks' fl.options.steps_per_task): the official split, or FL-TAC's steps per task
FEDIT_STEPS = {"fedit": "split", "fedit_heads": "split", "fedit_matched": "matched"}
HEADS = ("fedit_heads", "fl_tac_heads")             # the task-head arm; every other method: one shared head
ARM = {m: "task heads" if m in HEADS else "shared head" for m in METHODS}
# the methods that train per-task adapters exactly as FL-TAC does take its lr (chosen on validation), to save a
# grid each; local chooses its own (a side of a primary claim; in calibration at quick's 64 rows per task its
# validation preferred 2e-3 where the oracle's preferred 4e-3)
LR_FROM = {"fl_tac_update": "fl_tac", "oracle": "fl_tac", "fedit_heads": "fedit", "fl_tac_heads": "fl_tac"}


@dataclass
class FlTacSettings(Settings):
    tasks: tuple[str, ...] = BINARY
    data_seed: int = 0
    max_train_per_task: int = 600
    val_per_task: int = 200
    max_test_per_task: int = 1000
    min_share: float = 0.01
    k: int | None = None              # None: the number of tasks
    k_max: int | None = None          # silhouette search up to this k (None: 2 x tasks)
    n_init: int = 10
    silhouette_n_init: int | None = None   # k-means restarts for the recorded silhouette k (None: n_init)
    embedding: str = "auto"                # adapter-evolution figure: auto (UMAP if umap-learn imports) | umap | pca
    lr_grid: tuple[float, ...] = (5e-4, 1e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("fl_tac", "fedit", "oracle", "local")
    evolution_panels: int = 4
    seeds_per_method: dict = field(default_factory=dict)   # method -> run on the first n seeds (exploratory arms)
    lr_extend: int = 0               # validation's choice at a grid edge: score up to this many steps beyond it
    lr_grids: dict = field(default_factory=dict)           # method -> its own lr grid (else lr_grid)

    def validate(self) -> None:
        ok = binary_tasks()
        check_list("tasks", self.tasks, lambda t: t in ok, f"at least 2 distinct binary offline text tasks from {ok}")
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError("tasks", self.tasks, f"at least 2 distinct binary offline text tasks from {ok}")
        for key, low in [("data_seed", 0), ("max_train_per_task", 2), ("val_per_task", 2), ("max_test_per_task", 1),
                         ("n_init", 1), ("evolution_panels", 1)]:
            if not is_int(getattr(self, key)) or getattr(self, key) < low:
                raise ConfigError(key, getattr(self, key), f"an integer >= {low}")
        if self.silhouette_n_init is not None and (not is_int(self.silhouette_n_init) or self.silhouette_n_init < 1):
            raise ConfigError("silhouette_n_init", self.silhouette_n_init, "None (= n_init) or an integer >= 1")
        from fedbench.strategies.clustering import EMBEDDINGS
        if self.embedding not in EMBEDDINGS:
            raise ConfigError("embedding", self.embedding, f"one of {list(EMBEDDINGS)}")
        if not is_number(self.min_share) or not 0 <= self.min_share < 1:
            raise ConfigError("min_share", self.min_share, "a number in [0, 1/num_clients]")
        if self.k is not None and (not is_int(self.k) or self.k < 1):
            raise ConfigError("k", self.k, "None (= the number of tasks) or an integer >= 1")
        if self.k_max is not None and (not is_int(self.k_max) or self.k_max < 2):
            raise ConfigError("k_max", self.k_max, "None (= 2 x the number of tasks) or an integer >= 2")
        check_list("lr_grid", self.lr_grid, lambda x: is_number(x) and x > 0, "a non-empty list of numbers > 0")
        self.seeds = check_seeds("seeds", self.seeds)
        self.methods = check_subset("methods", self.methods, METHODS)
        if not is_int(self.lr_extend) or self.lr_extend < 0:
            raise ConfigError("lr_extend", self.lr_extend, "an integer >= 0")
        if self.lr_extend and len(self.lr_grid) < 2:
            raise ConfigError("lr_grid", self.lr_grid, "at least 2 values with lr_extend > 0 (the step is their ratio)")
        grids = self.lr_grids
        if not isinstance(grids, dict) or any(
                m not in METHODS or not isinstance(g, (list, tuple)) or len(g) < (2 if self.lr_extend else 1)
                or not all(is_number(x) and x > 0 for x in g) for m, g in grids.items()):
            raise ConfigError("lr_grids", grids, f"a mapping of methods {list(METHODS)} to lists of numbers > 0 "
                                                 f"(at least 2 with lr_extend > 0)")
        self.lr_grids = {m: tuple(sorted(float(x) for x in g)) for m, g in grids.items()}
        spm = self.seeds_per_method
        if not isinstance(spm, dict) or any(m not in METHODS or not is_int(n) or not 1 <= n <= len(self.seeds)
                                            for m, n in spm.items()):
            raise ConfigError("seeds_per_method", spm, f"a mapping of methods {list(METHODS)} to a number of seeds "
                                                       f"in [1, {len(self.seeds)}] (the first n of seeds)")
        self.lr_grid = tuple(sorted(float(x) for x in self.lr_grid))
        self.tasks = tuple(self.tasks)

    def seeds_of(self, method: str) -> tuple[int, ...]:
        """The seeds `method` runs on: the first ``seeds_per_method[method]`` of ``seeds``, else all of them."""
        return self.seeds[:self.seeds_per_method.get(method, len(self.seeds))]


def settings_for(profile: str = "quick", path=None, **overrides):
    """(settings, base config) of the profile with `overrides` (dotted keys change the base)."""
    from fedbench.models.checks import check_against_backbone
    prof = resolve_profile(EXPERIMENT, profile, overrides, FlTacSettings, path=path)
    if prof.base is None:
        raise ConfigError("base", None, "a base run config in the profile")
    s, base = prof.settings, prof.base
    if not s.min_share <= 1 / base.data.num_clients:
        raise ConfigError("min_share", s.min_share, f"a number in [0, 1/num_clients] = [0, {1 / base.data.num_clients:.4g}]")
    if base.peft.method != "lora":
        raise ConfigError("peft.method", base.peft.method, "'lora' (FL-TAC clusters LoRA adapters)")
    check_against_backbone(base)
    return s, base


def federation(s: FlTacSettings, method: str, validate: bool) -> dict:
    """The run's data: the multitask federation of the profile's tasks (``data.federation_options``)."""
    return {"tasks": list(s.tasks), "data_seed": s.data_seed, "max_train_per_task": s.max_train_per_task,
            "val_per_task": s.val_per_task, "max_test_per_task": s.max_test_per_task, "min_share": s.min_share,
            "heads": method in HEADS, "validation": bool(validate)}


def run_config(s: FlTacSettings, base: ExperimentConfig, method: str, seed: int, lr: float,
               validate: bool = True) -> ExperimentConfig:
    """The run of `method` at `seed` and `lr`, whole: its data (the multitask federation), the strategy and its
    clustering options. `validate`: it also scores the validation split (the runs that choose a learning rate)."""
    from fedbench.options import option_fields
    from fedbench.registry import STRATEGIES
    from fedbench.strategies.clustering import embedding_method
    strategy = STRATEGY[method]
    clustering = {"k": s.k, "k_max": s.k_max, "n_init": s.n_init, "silhouette_n_init": s.silhouette_n_init,
                  "cluster_on": "update" if method == "fl_tac_update" else "adapter", "silhouette": True,
                  "embedding": embedding_method(s.embedding)}
    # the server's clustering, for the strategies that cluster (part of the run config)
    every = {**clustering, "steps_per_task": FEDIT_STEPS.get(method, "split")}
    options = {k: v for k, v in every.items() if k in option_fields(STRATEGIES, strategy)}
    return base.replace(**{"seed": int(seed), "name": f"fl_tac-{method}", "train.lr": float(lr),
                           "fl.strategy": strategy, "fl.options": options, "data.task": s.tasks[0],
                           "data.federation": "multitask", "data.federation_options": federation(s, method, validate)})


def pool_of(s: FlTacSettings, base: ExperimentConfig, caches: bool = False):
    """The profile's pool (every task's subsample, tokenized), with its prefilled activation caches if asked."""
    from fedbench.fl.federations import MultiTaskOptions, multitask_pool, pool_caches
    o = MultiTaskOptions.from_dict(federation(s, "fl_tac", True), "data.federation_options")
    pool = multitask_pool(o, base.model.backbone, base.data.max_length)
    if caches:
        pool_caches(pool, base.model, base.peft.depth)
    return pool


def export(profile: str = "quick", path=None, method: str = "fl_tac", seed: int = 0, lr: float | None = None,
           **overrides) -> ExperimentConfig:
    """One reported run as a config that runs alone (``fedbench export``): `method` at `seed`, at `lr` or the lr
    the profile chose on validation (its ``lr_selection.csv``)."""
    s, base = settings_for(profile, path, **overrides)
    check_method(method, METHODS)
    lr = lr if lr is not None else chosen_lr(EXPERIMENT, profile, path, method=LR_FROM.get(method, method))
    if lr is None:
        raise no_lr(profile, method)
    return run_config(s, base, method, int(seed), float(lr), validate=int(seed) == s.seeds[0])


class _Runner:
    def __init__(self, s, base, progress):
        self.s, self.base, self.progress = s, base, progress

    def get(self, method: str, seed: int, lr: float, validate: bool = True):
        from fedbench.fl.data import build_data
        from fedbench.fl.server import run_cached
        from fedbench.results import load_run, run_key
        cfg = run_config(self.s, self.base, method, seed, lr, validate)
        t0 = time.perf_counter()
        done = load_run(run_key(cfg), runs_root())
        if done is None:
            # the run's data from its config alone; the pool and its caches are shared by every run of the profile
            caches = pool_of(self.s, self.base, caches=True).caches
            done = run_cached(cfg, build_data(cfg), root=runs_root(), caches=caches)
            if self.progress:
                print(f"[fl_tac] {method:<14} seed {seed} lr {lr:g}: {time.perf_counter() - t0:.0f} s, "
                      f"test acc {done.summary['final_accuracy']:.3f}, val {val_accuracy(done):.3f}", flush=True)
        return done, run_key(cfg)


def val_accuracy(res) -> float:
    v = res.summary["fl_tac"]["val_predictions"]
    return float(np.mean(np.asarray(v["label"]) == np.asarray(v["prediction"]))) if v else float("nan")


# -- the experiment -----------------------------------------------------------------------------------------------

@dataclass
class FlTacResult:
    settings: FlTacSettings
    base: ExperimentConfig
    summary: pd.DataFrame
    clustering: pd.DataFrame
    ari_rounds: pd.DataFrame
    accuracy_rounds: pd.DataFrame
    embedding: pd.DataFrame
    partition: pd.DataFrame
    lr_selection: pd.DataFrame
    claims: pd.DataFrame
    runs: pd.DataFrame
    correct: dict = field(default_factory=dict)      # method -> (n_seeds, n_test) 0/1
    seeds: dict = field(default_factory=dict)        # method -> the seeds of correct's rows
    out: Path = None
    figures: dict = field(default_factory=dict)


def run(profile: str = "quick", progress: bool = True, path=None, **overrides) -> FlTacResult:
    """Every (method, seed) run (lr chosen per method on validation, first seed), then CSVs, claims, figures."""
    s, base = settings_for(profile, path, **overrides)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    runner = _Runner(s, base, progress)
    per_run, lr_rows = {}, []
    chosen = {}
    for method in s.methods:
        src = LR_FROM.get(method)
        if src in s.methods:        # the same per-task adapter training as FL-TAC: its lr (chosen first)
            chosen[method] = chosen[src]
            for seed in s.seeds_of(method):     # the first seed also scores validation (reported, chooses nothing)
                per_run[(method, seed)] = (*runner.get(method, seed, chosen[src], validate=seed == s.seeds[0]),
                                           chosen[src])
            first = per_run[(method, s.seeds[0])]
            lr_rows.append({"method": method, "lr": chosen[src], "val_accuracy": val_accuracy(first[0]),
                            "run": f"from {src}", "chosen": True})
            continue
        best, rows = choose_lr(s, method, runner.get)
        chosen[method] = best
        lr_rows += rows
        for seed in s.seeds_of(method):   # only the first seed's runs score the validation split (they chose the lr)
            per_run[(method, seed)] = (*runner.get(method, seed, best, validate=seed == s.seeds[0]), best)
    result = tables(s, base, per_run, pd.DataFrame(lr_rows), pool_of(s, base))
    result.out = out
    for name in ("summary", "clustering", "ari_rounds", "accuracy_rounds", "partition", "lr_selection", "claims",
                 "runs"):
        save_table(getattr(result, name), out, f"{name}.csv")
    save_table(result.embedding, out, "adapter_embedding.csv")
    from fedbench.results import atomic_write_text
    atomic_write_text(out / "PROTOCOL.md", "# FL-TAC: protocol (paper / official code / ours)\n\n" + PROTOCOL)
    result.figures = {name: save_figure(fig, out, f"{name}.png") for name, fig in make_figures(result).items()}
    write_report(EXPERIMENT, out)
    return result


def choose_lr(s: FlTacSettings, method: str, get) -> tuple[float, list[dict]]:
    """`method`'s lr: the best validation accuracy of its runs on the first seed (``get(method, seed, lr)`` ->
    (result, run key)) over ``lr_grids[method]`` or ``lr_grid``; a choice at an end of the values scored scores one grid step beyond it,
    at most ``lr_extend`` times (rows with ``extension`` > 0), so the choice is bracketed where the budget allows."""
    def score(lr):
        res, h = get(method, s.seeds[0], lr)
        return val_accuracy(res), {"run": h}
    return select_lr(method, s.lr_grids.get(method, s.lr_grid), score, metric="val_accuracy", extend=s.lr_extend)


def tables(s, base, per_run, lr_selection, pool) -> FlTacResult:
    summary, clu, acc, emb, runs, correct, part, seeds = [], [], [], [], [], {}, [], {}
    task_of = np.concatenate([np.full(len(r), t) for t, r in enumerate(pool.task_test)])
    for (m, seed), (res, h, lr) in per_run.items():
        x = res.summary["fl_tac"]
        c = res.correct.astype(float)           # ordered by test index = the pool's task order
        correct.setdefault(m, []).append(c)
        seeds.setdefault(m, []).append(seed)
        for t, name in enumerate(s.tasks):
            summary.append({"method": m, "arm": ARM[m], "task": name, "seed": seed,
                            "accuracy": float(c[task_of == t].mean()), "lr": lr})
        summary.append({"method": m, "arm": ARM[m], "task": "mean", "seed": seed,
                        "accuracy": float(np.mean([c[task_of == t].mean() for t in range(len(s.tasks))])), "lr": lr})
        for r in x["clustering"]:
            clu.append({"method": m, "seed": seed, **r})
        for r in x["accuracy"]:
            acc.append({"method": m, "seed": seed, "round": r["round"], "task": s.tasks[r["task"]],
                        "accuracy": r["accuracy"]})
        for r in x["embedding"]:
            emb.append({"method": m, "seed": seed, **r, "task": s.tasks[r["task"]]})
        rounds = res.rounds
        runs.append({"method": m, "arm": ARM[m], "seed": seed, "lr": lr, "bytes_up_per_round": float(rounds["bytes_up"].mean()),
                     "bytes_down_per_round": float(rounds["bytes_down"].mean()),
                     "local_steps_per_round": float(rounds["local_steps"].mean()),
                     "wall_s": round(res.summary["wall_s"], 1), "run": h})
    for seed in s.seeds:
        from fedbench.data import partition_per_task
        parts = partition_per_task([len(r) for r in pool.task_train], base.data.num_clients, base.data.alpha,
                                   seed=derive_seed(seed, "partition"), min_share=s.min_share)
        for t, name in enumerate(s.tasks):
            part += [{"seed": seed, "client": c, "task": name, "samples": len(p)} for c, p in enumerate(parts[t])]
    cols = ["method", "seed", "round", "adapters", "k", "k_silhouette", "ari", "hungarian_accuracy", "changed_clusters"]
    clu = pd.DataFrame(clu).reindex(columns=cols) if clu else pd.DataFrame(columns=cols)
    correct = {m: np.stack(v) for m, v in correct.items()}
    summary = pd.DataFrame(summary)
    return FlTacResult(s, base, summary, clu, ari_rounds(clu),
                       pd.DataFrame(acc, columns=["method", "seed", "round", "task", "accuracy"]),
                       pd.DataFrame(emb), pd.DataFrame(part), lr_selection,
                       compute_claims(s, summary, clu, correct, task_of, seeds), pd.DataFrame(runs), correct, seeds)


def ari_rounds(clu: pd.DataFrame) -> pd.DataFrame:
    """ARI of the server's clusters against the true tasks, per method and round: the mean over seeds and its
    Student t interval (fedbench.claims.t_interval, the intervals of every claim and figure)."""
    from fedbench.claims import t_interval
    rows = []
    for (m, r), g in clu.groupby(["method", "round"], sort=True):
        v = g.sort_values("seed")["ari"].to_numpy(float)
        est, lo, hi = t_interval(v)
        rows.append({"method": m, "round": int(r), "n_seeds": len(v), "ari_mean": est, "ci_low": lo, "ci_high": hi,
                     "hungarian_accuracy_mean": float(g["hungarian_accuracy"].mean()),
                     "changed_clusters_mean": float(g["changed_clusters"].mean()) if g["changed_clusters"].notna().any()
                     else np.nan})
    return pd.DataFrame(rows, columns=["method", "round", "n_seeds", "ari_mean", "ci_low", "ci_high",
                                       "hungarian_accuracy_mean", "changed_clusters_mean"])


# -- claims ------------------------------------------------------------------------------------------------------

PAPER = ("FedIT -> FL-TAC, BERT on GLUE: SST-2 .652 -> .874, QNLI .670 -> .787, QQP .510 -> .807, MRPC .520 -> "
         ".673, RTE .524 -> .532 (higher on every task)")


# the pre-stated primary family (Holm over these; every other row is exploratory): FL-TAC against the FedIT
# that trains as many optimiser steps per task (so the difference is what clustering and per-task adapters
# add, not compute), and against local-only training in a regime where federating is the point
PRIMARY = ("FL-TAC beats compute-matched FedIT (mean over tasks)", "FL-TAC beats local-only training (mean over tasks)")


def compute_claims(s, summary, clu, correct, task_of, seeds: dict | None = None) -> pd.DataFrame:
    """The claims table. `correct`: method -> (n_seeds, n_test) 0/1 rows over `seeds[method]` (None: every
    method on the same seeds); each comparison pairs the seeds both of its sides ran."""
    from fedbench import claims as C
    seeds = seeds or {m: list(range(len(v))) for m, v in correct.items()}

    def pair(a: str, b: str, sel=slice(None)):
        common = [sd for sd in seeds[a] if sd in seeds[b]]
        return tuple(correct[m][[seeds[m].index(sd) for sd in common]][:, sel] for m in (a, b))

    def diff(a, b, claim, paper, comparison=None, **kw):
        return C.paired_accuracy_difference(*pair(a, b), claim, paper,
                                            comparison=comparison or f"{a} - {b}, every test example", **kw)
    out = []
    have = set(correct)
    if {"fl_tac", "fedit_matched"} <= have:
        out.append(diff("fl_tac", "fedit_matched", PRIMARY[0], PAPER + "; FedIT given FL-TAC's optimiser steps per "
                        "task (the official FedIT trains 1 / n_tasks of them)"))
    if {"fl_tac", "local"} <= have:
        out.append(diff("fl_tac", "local", PRIMARY[1], "per-task adapters shared through clustering beat training "
                        "each client's adapters alone (the reason to federate)"))
    if {"fl_tac", "fedit_matched"} <= have:
        for t, name in enumerate(s.tasks):
            out.append(C.paired_accuracy_difference(*pair("fl_tac", "fedit_matched", task_of == t),
                                                    f"FL-TAC beats compute-matched FedIT on {name}", PAPER,
                                                    comparison=f"fl_tac - fedit_matched on {name}"))
    if {"fl_tac", "fedit"} <= have:
        out.append(diff("fl_tac", "fedit", "FL-TAC beats FedIT with the official split of steps (mean over tasks)",
                        PAPER))
    if {"fedit_matched", "fedit"} <= have:
        out.append(diff("fedit_matched", "fedit", "compute: FedIT with FL-TAC's steps per task beats the official "
                        "FedIT", "(control) how much of FL-TAC's margin over the official FedIT is its n_tasks x "
                        "compute"))
    assay = ""          # "as good as the oracle" means something only if the oracle beats FedIT
    ref = "fedit_matched" if "fedit_matched" in have else "fedit"
    ref_name = {"fedit_matched": "compute-matched FedIT", "fedit": "FedIT"}[ref]
    if {"oracle", ref} <= have:
        out.append(diff("oracle", ref, f"task-wise aggregation (oracle clusters) beats {ref_name}",
                        "FL-TAC > FedIT with clusters that match the tasks"))
        assay = C.assay_gate(out[-1], ref_name)
    if {"fl_tac", "oracle"} <= have:
        out.append(C.gate(diff("fl_tac", "oracle", "FL-TAC is as good as perfect clustering (within 0.02)",
                               "clusters match the tasks, so FL-TAC ~ per-task FedAvg", threshold=-0.02,
                               comparison="fl_tac - oracle"), assay))
    if {"oracle", "local"} <= have:
        out.append(diff("oracle", "local", "federation: per-task FedAvg (oracle clusters) beats local-only training",
                        "(control) what federating is worth with perfect clusters at this data size"))
    if {"fedit_heads", "fedit"} <= have:
        out.append(diff("fedit_heads", "fedit", "FedIT + task heads beats FedIT with the shared head",
                        "task identity in per-task heads lets FedIT's one adapter serve every task (why the two "
                        "arms differ)"))
    if {"fl_tac", "fedit_heads"} <= have:
        out.append(diff("fl_tac", "fedit_heads", "FL-TAC (shared head) beats FedIT + task heads", PAPER))
    if {"fl_tac_heads", "fedit_heads"} <= have:
        out.append(diff("fl_tac_heads", "fedit_heads", "FL-TAC beats FedIT, both with task heads", PAPER))
    f = clu[clu["method"] == "fl_tac"] if len(clu) else clu
    u = clu[clu["method"] == "fl_tac_update"] if len(clu) else clu
    if len(u):
        last = u[u["round"] == u["round"].max()].sort_values("seed")
        out.append(C.seed_mean(last["ari"].to_numpy(), "k-means on the round's updates recovers the tasks "
                               "(diagnostic, final-round ARI > 0.5)", "clustering updates rather than states lets "
                               "the clusters recover", threshold=0.5, comparison="ARI, last round, fl_tac_update"))
    if len(f):
        last = f[f["round"] == f["round"].max()].sort_values("seed")
        out.append(C.seed_mean(last["ari"].to_numpy(), "k-means (k = T) on the adapters recovers the tasks "
                               "(final-round ARI > 0.5)", "server clusters = tasks (Hungarian-matched clustering "
                               "accuracy; UMAP figure)", threshold=0.5, comparison="ARI, last round"))
        first = f[f["round"] == f["round"].min()].sort_values("seed")
        out.append(C.paired_seed_difference(last["ari"].to_numpy(), first["ari"].to_numpy(),
                                            "task clusters separate as training goes on",
                                            "adapter-evolution figure: clusters by task become distinct over rounds",
                                            comparison="ARI last round - ARI round 1"))
    return C.claims_table(out, primary=PRIMARY)


# -- figures (fedbench.plots) ------------------------------------------------------------------------------------

def make_figures(res: FlTacResult) -> dict:
    from fedbench import plots
    order = [m for m in METHODS if m in set(res.summary["method"])]
    # bars from 0 (an axis from 0.35 made small differences look large), chance as a line
    figs = {"accuracy_by_method": plots.bars(res.summary, x="task", y="accuracy", hue="method", order=order,
                                             baseline=0.0, ylabel="test accuracy (final round)",
                                             title="shared 2-class head, no task id"
                                             + ("; *_heads: one head per task" if set(order) & set(HEADS) else ""))}
    figs["accuracy_by_method"].axes[0].axhline(0.5, color="0.35", linestyle="--", linewidth=1.0)
    figs["accuracy_by_method"].axes[0].annotate("chance 0.5", (0.0, 0.5), xycoords=("axes fraction", "data"),
                                                xytext=(2, 2), textcoords="offset points", fontsize=7, color="0.35")
    if res.accuracy_rounds["round"].nunique() > 1:
        a = res.accuracy_rounds.groupby(["method", "seed", "round"], as_index=False)["accuracy"].mean()
        figs["accuracy_vs_rounds"] = plots.curves(a, x="round", y="accuracy", hue="method", order=order,
                                                  ylabel="mean test accuracy over tasks", baseline=0.5)
    if len(res.clustering):
        c = res.clustering.melt(id_vars=["method", "seed", "round"], value_vars=["ari", "hungarian_accuracy"],
                                var_name="metric", value_name="value")
        figs["ari_vs_round"] = plots.curves(c, x="round", y="value", hue="method", facet="metric",
                                            ylabel="clusters vs true tasks")
        figs["changed_clusters"] = plots.curves(res.clustering.dropna(subset=["changed_clusters"]), x="round",
                                                y="changed_clusters", hue="method",
                                                ylabel="adapters that changed cluster")
    if len(res.embedding):
        e = res.embedding[(res.embedding["method"] == "fl_tac") if "fl_tac" in set(res.embedding["method"])
                          else slice(None)]
        e = e[e["seed"] == res.settings.seeds[0]]
        rounds = sorted(e["round"].unique())
        n = min(res.settings.evolution_panels, len(rounds))
        for r in sorted({rounds[int(round(i))] for i in np.linspace(0, len(rounds) - 1, n)}):
            er = e[e["round"] == r]
            how = "/".join(sorted(set(er["embedding"]))).upper()
            figs[f"adapter_evolution_round{r:02d}"] = plots.scatter(
                er, x="dim1", y="dim2", hue="task", marker="cluster", xlabel=f"{how} 1", ylabel=f"{how} 2",
                title=f"round {r}: adapters the server saw ({how})")
    return figs


# -- the protocol table (results/fl_tac/PROTOCOL.md; the notebook shows it) ----------------------------------------

PROTOCOL = """\
| aspect | paper (arXiv 2404.15384) | official code (siqi2000/FL-TAC, `configs/glue_bert.yaml`) | ours (quick; full) | why ours differs |
|---|---|---|---|---|
| backbone | BERT-base (GLUE), ViT (CIFAR), LLaMA (Dolly) | `bert-base-uncased`, `num_labels=2` | MiniLM-L6 (bundled, offline) | CPU-only, offline benchmark |
| tasks | GLUE: SST-2, QNLI, QQP, MRPC, RTE (all binary) | same, `max_len` 128 | 4 binary offline tasks: rt_sentiment, subjectivity, sms_spam, tweet_polarity (tweet_sentiment without neutral, made here); quick: 64 train / 200 validation / 1,000 test rows per task, max_length 32; full: 4,000 train rows per task | offline; GLUE needs the hub; quick's 64 rows: the data-starved regime (next rows) |
| head | one per model | one 2-class head (`num_labels=2`) for every task; no task id | one 2-class head, no task id, no class mask | - |
| what an adapter is / what travels | LoRA adapters | `get_adapter_state`: every trainable parameter, i.e. LoRA A, B **and the 2-class head**, per task (FL-TAC) or one per client (FedIT) | the same: LoRA factors + head per (client, task); clustered and averaged together | - (the issue's "only lora_ keys" reading does not match the code, whose docstring says the head is federated too) |
| clients, partition | 10 clients per task, Dirichlet(0.5) | `n_clients` 10, `dirichlet_alpha` 0.5, shares < 1% zeroed | 10 clients, Dirichlet(0.5) per task, shares < 1% zeroed (`data.num_clients`, `data.alpha`, `min_share`) | - |
| data per client (regime) | GLUE-sized: thousands of rows per client and task | the whole GLUE training sets split over 10 clients | quick: 64 rows per task, ~6 per client per task on average (`partition.csv`), chosen so that local-only training is below federated training: at 600 rows (the previous quick) local-only beat FL-TAC on test (0.738 vs 0.696), and at 160 rows (calibration, 3 x 8 steps, first seed, validation only) it still led: local 0.755, oracle 0.780, FL-TAC 0.686, compute-matched FedIT 0.691 (lr 2e-3); at 64 rows (calibration, 3 x 6 steps, first seed, validation only): local 0.756 at lr 2e-3 (0.719 at 4e-3), oracle 0.779 at 4e-3 (0.757 at 2e-3), FL-TAC 0.743 at 4e-3 (0.709 at 2e-3), compute-matched FedIT 0.679 at 2e-3: only the oracle clears local-only (+0.023), so 64 rows was kept as the most starved of the sizes tried. Measured on test (quick, `claims.csv`): oracle - local +0.080 [0.028, 0.132] (3 seeds), FL-TAC - local +0.024 [-0.004, 0.052] (5 seeds, the 97.5% Holm-level interval; primary, inconclusive, Holm p 0.078); full: 4,000 rows per task | with MiniLM's features a client's few dozen rows of one task train a good local adapter; the paper's question (does sharing through clusters help?) needs clients that cannot learn alone |
| participation | full | full (`sel = range(n_clients)`) | full (`fl.clients_per_round` 1.0; sampling/dropout by config) | - |
| rounds x local steps | 20 rounds | 20 rounds x 50 steps per (client, task) adapter (FL-TAC); FedIT `max(1, local_steps // n_tasks)` per task, i.e. ~50 per client: FL-TAC gets n_tasks x FedIT's compute | quick: 3 rounds x 6 steps per (client, task) adapter (few rounds of several steps, as the official 20 x 50; the previous quick ran 6 x 4), so adapters move before the first k-means; the official FedIT (`fedit`) 1-6 steps per task per round (6 // n_tasks); the compute-matched FedIT (`fedit_matched`, `fl.options.steps_per_task: matched`) 6 per task per round: the same optimiser steps as FL-TAC (`local_steps_per_round` in `runs.csv`); full 20 x 50 (`configs/fl_tac/full.yaml`, not run) | CPU budget: quick's cold run took 731 s on 2 cores with 5 seeds on the primaries (the bar is 12 min; the next cut, 3 x 5 steps, is in the profile's comment) |
| budget (optimizer steps per seed, all clients) | - | official: FL-TAC ~31 adapters x 20 x 50 = ~31,000 steps of batch 32 (~1.0 M examples); FedIT 10 clients x 20 x ~50 = ~10,000 steps | quick: FL-TAC, the oracle, local and the compute-matched FedIT 522-630 steps of batch 8 per seed (`local_steps_per_round` x 3 in `runs.csv`), the official FedIT 150-168: ~50x fewer steps than official; full = the official budget (not run) | the quick bar |
| LoRA | r = 4 | r 4, alpha 16, dropout 0.05, query/value of every layer | r 4, alpha 16, no dropout, query/value of the top 2 layers (quick; every layer in full), the frozen prefix cached | CPU cost |
| optimizer, lr | lr 5e-4 (BERT) | AdamW (wd 0.01 default), lr 5e-4, batch 32; a fresh optimizer per (client, task, round) | AdamW (wd 0), fresh per (client, task, round), batch 8 (quick); lr chosen on a validation split carved from the training data (first seed) from {1e-3, 2e-3, 4e-3} for FL-TAC, the compute-matched FedIT, the official FedIT and local (`lr_grids` sets a method's own grid); a choice at a grid edge scores one grid step beyond it (`lr_extend` 1; `extension` rows in `lr_selection.csv`): FL-TAC and both FedITs took the extension, 8e-3, and stay at the edge (validation +0.004 / +0.004 / +0.010 over 4e-3), local chose 2e-3 inside its grid; the oracle takes FL-TAC's (its first-seed validation accuracy is reported) | never chosen on test; higher lrs than the official 5e-4 because quick trains 18 steps per adapter, not 1,000; a second extension did not fit the bar |
| server | k-means, k = tasks, FedAvg per cluster | sklearn KMeans(n_init=10, random_state=seed) on the flattened adapters; FedAvg by samples per cluster; each (client, task) gets its cluster's aggregate | the same (`fedbench.strategies.fl_tac`); k-means seed derived per round; silhouette k (k = 2..2T) recorded beside k = T (quick: 3 restarts for the silhouette's k-means, `silhouette_n_init`); ARI of the clusters against the true tasks every round (`clustering.csv` per seed, `ari_rounds.csv` mean and t interval, `ari_vs_round.png`); a diagnostic (`fl_tac_update`) clusters the round's updates (adapter - what was sent): smoke, quick-complete and full | CPU budget |
| adapter-evolution figure | UMAP of the adapters over rounds, colour = task | - | UMAP (umap-learn, `random_state` derived from the run's seed and the round, n_neighbors min(15, n - 1)) of what the server clustered, every round; PCA when umap-learn is absent (or < 5 adapters; smoke uses PCA); `adapter_embedding.csv` holds the plotted coordinates and which embedding | umap-learn is optional (the dev extra); its first fit JIT-compiles for ~15 s |
| FedIT | one adapter, FedAvg | one shared adapter, tasks in turn, `max(1, local_steps // n_tasks)` steps each | the official one (`fedit`: `fedit_tasks`, `steps_per_task: split`) and the compute-matched one (`fedit_matched`: `steps_per_task: matched`, `local_steps` on each task in turn) | the official FedIT trains a quarter of FL-TAC's steps per task with 4 tasks: only the matched one isolates what clustering adds |
| evaluation | per task | task t scored with the first client's copy of the adapter for t | each test row of task t scored by the adapter of one client holding t, drawn with probability proportional to its samples (the same owners for every method of a seed); the validation split is scored only by the first seed's runs | every client's adapter counts, at the cost of one pass over the test set |
| task-head arm | - | - | "FedIT + task heads" (`fedit_heads`) and "FL-TAC + task heads" (`fl_tac_heads`): smoke, quick-complete (`configs/fl_tac/quick-complete.yaml`, 3 seeds, extends quick) and full: one classifier head per task (each task its own label count, a class mask per example), task t scored with head t; heads FedAvg'd per task over the clients holding t, weighted by their samples of t, never per cluster; k-means on the LoRA factors only; otherwise the paper arm's schedule | moved out of quick for time (issue 29: 5 seeds on the primaries) |
| statistics | one run | one seed (42) | quick: 5 seeds (partition, init, batches, scoring owners) for FL-TAC, the compute-matched FedIT and local (the primary claims: FL-TAC vs compute-matched FedIT, FL-TAC vs local-only; Holm over the two, intervals at the Holm level), 3 seeds for the official FedIT and the oracle (exploratory rows, paired on the seeds both sides ran); the same test rows; claims via `fedbench.claims` (seeds x test examples; t interval for ARI) | - |
"""
