"""LoRM (Salami et al., 2024, arXiv 2410.17961) in federated class-incremental learning, on the shared loop.

Every federated method is a strategy of :mod:`fedbench.strategies.continual` run by :class:`fedbench.fl.FederatedRun`,
so sampling (``fl.clients_per_round``), dropout, DP-SGD (``train.dp``), attacks and the update guard reach
LoRM by configuration: ``fedbench run configs/lorm/quick.yaml --set fl.dropout=0.3``.

The package: :mod:`~fedbench.experiments.lorm.plan` (the task sequence, the settings, the methods as one table
of facts, each run's config), :mod:`~fedbench.experiments.lorm.runs` (one run as tables, through the table run
store), :mod:`~fedbench.experiments.lorm.analysis` (metrics, tables, claims, figures) and
:mod:`~fedbench.experiments.lorm.protocol` (PROTOCOL.md, filled from the run).

Methods (:data:`METHODS`): ``lorm`` (served by LoRM's cross-task merge); ``lorm_mean`` (the same LoRM runs served
by the running mean of the task products instead: read off LoRM's runs, which score both); ``lorm_avg`` (LoRM's
B/A schedule at LoRM's lr with the trained factor averaged: only the closed-form solve differs); ``fedit``
(factor averaging); ``fedit_lorm_lr`` (FedIT at the lr LoRM chose); ``product_svd`` (exact product average
re-factorised at rank r); ``regmean_svd`` (RegMean of the dense products re-factorised at rank r); the
rank-growing variants ``product_stack`` and ``regmean_dense`` (folded into the base every round, labelled as
such); ``full_top`` (full fine-tuning of the top layer + head, FedAvg, sequential over the tasks); ``joint``
(centralised LoRA on every task's pooled data at once: the upper bound).

Learning rate: per method with a search of its own, each value of ``lr_grid`` is run on the first seed and the
one with the best final average accuracy on the validation split is used for every seed (ties: the smaller lr;
:func:`fedbench.bench.select_lr`); ``lr_extend`` > 0 scores one grid step beyond a choice at an end of the
values scored, up to that many times (``extension`` rows of lr_selection.csv). A method with ``lr_from`` takes
that method's lr (``grid_scored``: its grid is scored on the first seed as well).

Seeds: the primary methods (``Method.primary``) run every seed of ``seeds``; the others the first
``exploratory_seeds`` of them (0: every seed).
"""
from __future__ import annotations

import pandas as pd

from fedbench.bench import check_method, chosen_lr, no_lr, output_dir, select_lr, write_outputs
from fedbench.config import ExperimentConfig
from fedbench.experiments.lorm.analysis import (COMPARISONS, PAPER, PRIMARY_CLAIM, LormResult, accuracy_matrix,
                                                cl_metrics, compute_claims, make_figures, tables, val_accuracy)
from fedbench.experiments.lorm.plan import (EXPERIMENT, LABELS, METHODS, PRIMARY, LormSettings, Method,
                                            check_method_table, federation, method_seeds, run_config, settings_for)
from fedbench.experiments.lorm.protocol import protocol
from fedbench.experiments.lorm.runs import (ACC_COLS, MERGE_COLS, STORE, all_logits, masked_argmax, run_getter,
                                            run_joint, run_key, run_one, shared_caches, view)

__all__ = ["ACC_COLS", "COMPARISONS", "EXPERIMENT", "LABELS", "MERGE_COLS", "METHODS", "METRIC", "PAPER", "PRIMARY",
           "PRIMARY_CLAIM", "STORE", "LormResult", "LormSettings", "Method", "accuracy_matrix", "all_logits",
           "check_method_table", "cl_metrics", "compute_claims", "control_grid", "export", "federation",
           "make_figures", "masked_argmax", "method_seeds", "protocol", "run", "run_config", "run_getter",
           "run_joint", "run_key", "run_one", "settings_for", "shared_caches", "tables", "val_accuracy", "val_score",
           "view"]

METRIC = "val_final_avg_accuracy"       # the lr_selection column: what the search maximises


def export(profile: str = "quick", path=None, method: str = "lorm", seed: int = 0, lr: float | None = None,
           **overrides) -> ExperimentConfig:
    """One reported federated run as a config that runs alone (``fedbench export``): `method` at `seed`, at `lr` or
    the lr the profile chose on validation. A centralised method (joint) is not a federated run."""
    s, base = settings_for(profile, path, **overrides)
    check_method(method, tuple(m for m, facts in METHODS.items() if not facts.centralised))
    lr = lr if lr is not None else chosen_lr(EXPERIMENT, profile, path, method=METHODS[method].lr_from or method)
    if lr is None:
        raise no_lr(profile, method)
    return run_config(s, base, method, int(seed), float(lr))


def val_score(res: dict, run_hash: str) -> tuple[float, dict]:
    """A run's score for :func:`fedbench.bench.select_lr`: the final average accuracy on the validation split of
    its served model, with the run's hash as the lr_selection row's ``run``."""
    return val_accuracy(view(res)["accuracy"]), {"run": run_hash}


def control_grid(s: LormSettings, method: str, used: float, get) -> list[dict]:
    """A control that takes another method's lr, scored on the first seed's validation at every grid value too
    (what it would have chosen: does it degrade where that method does?); ``chosen`` marks the lr its reported
    runs use, ``lr_from`` whose choice that is."""
    rows = []
    for lr in sorted(set(s.lr_grid) | {used}):
        score, extra = val_score(*get(method, s.seeds[0], lr))
        rows.append({"method": method, "lr": lr, METRIC: score, **extra, "chosen": lr == used,
                     "chosen_at_grid_edge": False, "extension": 0, "lr_from": METHODS[method].lr_from})
    return rows


def run(profile: str = "quick", progress: bool = True, path=None, **overrides) -> LormResult:
    """Every (method, seed) run (lr chosen on validation), then the CSVs, claims, figures, PROTOCOL.md and the
    report."""
    s, base = settings_for(profile, path, **overrides)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    get = run_getter(s, base, progress)
    per_run, lr_rows, chosen, raw = {}, [], {}, {}
    for method in s.methods:
        m = METHODS[method]
        if m.read_off:             # read off the runs of the method it is an ablation of (its seeds: free)
            src, rule = m.read_off
            for seed in method_seeds(s, src):
                res = view(raw[(src, seed)], rule)
                res["merge_error"] = res["merge_error"].iloc[0:0]       # the diagnostic belongs to the source
                per_run[(method, seed)] = (res, *per_run[(src, seed)][1:])
            continue
        if m.lr_from:
            best = chosen[m.lr_from]
            if m.grid_scored:
                lr_rows += control_grid(s, method, best, get)
        else:
            best, rows = select_lr(method, s.lr_grid, lambda lr: val_score(*get(method, s.seeds[0], lr)),
                                   metric=METRIC, extend=s.lr_extend)
            lr_rows += rows
        chosen[method] = best
        for seed in method_seeds(s, method):
            raw[(method, seed)], h = get(method, seed, best)
            per_run[(method, seed)] = (view(raw[(method, seed)]), h, best)
    result = tables(s, base, per_run, pd.DataFrame(lr_rows))
    result.out = out
    result.protocol = protocol(s, base, result.lr_selection)
    result.figures = make_figures(result)
    names = ("summary", "per_task", "merge_error", "lr_selection", "claims", "runs")
    outs = {name: getattr(result, name) for name in names} | {"avg_accuracy": result.avg_curve}
    paths = write_outputs(EXPERIMENT, out, outs, result.figures, result.protocol)
    result.figures = {name: paths[f"{name}.png"] for name in result.figures}
    return result
