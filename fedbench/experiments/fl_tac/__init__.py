"""FL-TAC (Ping et al., 2024, arXiv 2404.15384) on the shared loop: per-task adapters clustered on the server.

Every method is a strategy of :mod:`fedbench.strategies.fl_tac` run through :class:`fedbench.bench.Runner` (the run
store, keyed by each run's config), so sampling, dropout, DP-SGD, robust rules and the Flower engine reach it by
configuration (``fedbench run configs/fl_tac/quick.yaml --set fl.dropout=0.3``). The package: :mod:`.plan` (the
methods as a table of facts, the settings, each run's config and the runner's data/caches providers),
:mod:`.analysis` (tables, claims, figures), :mod:`.protocol` (PROTOCOL.md, filled from the outputs).

Setting (the paper arm, the official code's protocol): binary tasks only, one 2-class head, no task id at
inference, no class mask. Each task's training subsample (``max_train_per_task``, fixed by ``data_seed``) is
split over ``data.num_clients`` clients by Dirichlet(``data.alpha``), shares under ``min_share`` zeroed (per
seed); ``val_per_task`` further training rows per task are a validation split (never trained on) that picks
the learning rate; ``max_test_per_task`` test rows per task are scored.

Methods (:data:`METHODS`, a table of per-method facts in :mod:`.plan`): ``fl_tac`` (k-means, k = T, on the
flattened adapters; the silhouette k is recorded beside it every round), ``fl_tac_update`` (diagnostic: k-means on
the round's updates), ``fedit`` (one adapter per client, ``local_steps // n_tasks`` steps per task in turn),
``fedit_matched`` (the same with ``local_steps`` per task: FL-TAC's compute), ``oracle`` (per-task FedAvg with the
true labels), ``local``. An adapter is everything trainable (LoRA factors + the 2-class head), as the official
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

import pandas as pd

from fedbench.bench import check_method, chosen_lr, no_lr, output_dir, select_lr, write_outputs
from fedbench.config import ExperimentConfig
from fedbench.experiments.fl_tac.analysis import (PAPER, PRIMARY, FlTacResult, ari_rounds, compute_claims,
                                                  make_figures, tables, val_accuracy)
from fedbench.experiments.fl_tac.plan import (ARM, EXPERIMENT, HEADS, LABELS, LR_FROM, METHODS, FlTacSettings,
                                              Method, check_methods, federation, pool_of, run_config, runner,
                                              settings_for)
from fedbench.experiments.fl_tac.protocol import render as protocol

__all__ = ["ARM", "EXPERIMENT", "HEADS", "LABELS", "LR_FROM", "METHODS", "PAPER", "PRIMARY", "FlTacResult",
           "FlTacSettings", "Method", "ari_rounds", "check_methods", "choose_lr", "compute_claims", "export",
           "federation", "make_figures", "pool_of", "protocol", "run", "run_config", "settings_for", "tables",
           "val_accuracy"]

# the tables of the output folder, by file name (without .csv) -> FlTacResult attribute
OUTPUT_TABLES = {"summary": "summary", "clustering": "clustering", "ari_rounds": "ari_rounds",
                 "accuracy_rounds": "accuracy_rounds", "partition": "partition", "lr_selection": "lr_selection",
                 "claims": "claims", "runs": "runs", "adapter_embedding": "embedding"}


def export(profile: str = "quick", path=None, method: str = "fl_tac", seed: int = 0, lr: float | None = None,
           **overrides) -> ExperimentConfig:
    """One reported run as a config that runs alone (``fedbench export``): `method` at `seed`, at `lr` or the lr
    the profile chose on validation (its ``lr_selection.csv``)."""
    s, base = settings_for(profile, path, **overrides)
    check_method(method, METHODS)
    lr = lr if lr is not None else chosen_lr(EXPERIMENT, profile, path, method=METHODS[method].lr_from or method)
    if lr is None:
        raise no_lr(profile, method)
    return run_config(s, base, method, int(seed), float(lr), validate=int(seed) == s.seeds[0])


def run(profile: str = "quick", progress: bool = True, path=None, **overrides) -> FlTacResult:
    """Every (method, seed) run (lr chosen per method on validation, first seed), then CSVs, claims, figures,
    PROTOCOL.md and REPORT.md (``bench.write_outputs``)."""
    from fedbench.results import run_key
    s, base = settings_for(profile, path, **overrides)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    bench = runner(s, base, progress)

    def get(method: str, seed: int, lr: float, validate: bool = True):
        cfg = run_config(s, base, method, seed, lr, validate)
        return bench.get(cfg), run_key(cfg)
    per_run, lr_rows, chosen = {}, [], {}
    for method in s.methods:
        src = METHODS[method].lr_from
        if src in s.methods:        # the same per-task adapter training as its source: that lr (chosen first)
            chosen[method] = chosen[src]
            for seed in s.seeds_of(method):     # the first seed also scores validation (reported, chooses nothing)
                per_run[(method, seed)] = (*get(method, seed, chosen[src], validate=seed == s.seeds[0]), chosen[src])
            first = per_run[(method, s.seeds[0])]
            lr_rows.append({"method": method, "lr": chosen[src], "val_accuracy": val_accuracy(first[0]),
                            "run": f"from {src}", "chosen": True})
            continue
        best, rows = choose_lr(s, method, get)
        chosen[method] = best
        lr_rows += rows
        for seed in s.seeds_of(method):   # only the first seed's runs score the validation split (they chose the lr)
            per_run[(method, seed)] = (*get(method, seed, best, validate=seed == s.seeds[0]), best)
    result = tables(s, base, per_run, pd.DataFrame(lr_rows), pool_of(s, base))
    result.out = out
    result.protocol = protocol(s, base, profile, result.lr_selection, result.claims, result.runs)
    paths = write_outputs(EXPERIMENT, out, {name: getattr(result, attr) for name, attr in OUTPUT_TABLES.items()},
                          make_figures(result), result.protocol)
    result.figures = {p.stem: p for name, p in paths.items() if name.endswith(".png")}
    return result


def choose_lr(s: FlTacSettings, method: str, get) -> tuple[float, list[dict]]:
    """`method`'s lr: the best validation accuracy of its runs on the first seed (``get(method, seed, lr)`` ->
    (result, run key)) over its grid (``s.grid_of``); a choice at an end of the values scored scores one grid step
    beyond it, at most ``lr_extend`` times (rows with ``extension`` > 0), so the choice is bracketed where the
    budget allows."""
    def score(lr):
        res, h = get(method, s.seeds[0], lr)
        return val_accuracy(res), {"run": h}
    return select_lr(method, s.grid_of(method), score, metric="val_accuracy", extend=s.lr_extend)
