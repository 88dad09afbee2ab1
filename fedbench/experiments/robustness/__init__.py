"""Reliability under faults and attacks: robust aggregation rules against Byzantine clients, and the update guard.

The grid: every aggregation rule in ``settings.aggregators`` (FedAvg, coordinate median, trimmed mean, Krum,
Multi-Krum, Bulyan) x every attack in ``settings.attacks`` (sign_flip, scale, gaussian, label_flip) x every
attacker fraction in ``settings.fractions`` (0 = the clean run, once per rule) x ``settings.seeds``, each run
one :class:`fedbench.config.ExperimentConfig` (the profile's ``base`` with the cell's ``fl.*`` fields) through
:func:`fedbench.fl.run_cached`. Plus the NaN arm: a fraction of the clients sends NaN (``fl.attack="nan"``, a
fault rather than an attack); the loop's update guard must reject every such update (``clients_rejected``)
and the accuracy must stay that of the clean run.

Protocol (what a cell sets, beyond the base):

* attackers: ``fl.attack`` and ``fl.attack_fraction``; the loop picks round(fraction * data.num_clients) clients
  (a seeded set, fixed for the run) that attack every round they take part in;
* f, what the rule is built to survive: the number of attackers expected in a round's cohort,
  round(fraction * cohort). Without attackers the rules keep the f of the smallest attacker fraction of the
  grid (``settings.clean_num_malicious`` overrides it), so the clean column shows what robustness costs.
  Krum, Multi-Krum (``fl.num_malicious`` = f, Multi-Krum averaging n - f) and Bulyan use it; the trimmed mean
  cuts f / n at each end (``fl.trim_ratio``); FedAvg and the median take no parameter;
* a rule that cannot run at a setting (Krum / Multi-Krum need n >= 2f + 3, Bulyan n >= 4f + 3, so Bulyan
  never covers 30% attackers whatever n) is recorded as not applicable, with the reason, and not run;
* the NaN arm runs each rule of ``settings.nan_aggregators`` with the clean run's config and
  ``fl.attack="nan"``: the comparison is clean - NaN on the same seeds and test examples.

Outputs (``results/robustness[/<profile>]/``): ``summary.csv`` (one row per run or not-applicable cell),
``rounds.csv`` (per round), ``robustness.csv`` (mean and 95% t interval over seeds per rule, attack and
fraction), ``robustness_wide.csv`` (the same as one readable grid), ``nan_arm.csv`` (rejections per run),
``claims.csv`` (:mod:`fedbench.claims`) and the figures of :func:`make_figures`.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedbench.bench import Runner, output_dir, runs_root, write_outputs
from fedbench.config import ExperimentConfig
from fedbench.experiments.robustness.analysis import (make_claims, make_figures, nan_arm_table, robustness_table,
                                                      wide_table)
from fedbench.experiments.robustness.plan import (AGGREGATOR_ORDER, ATTACK_ORDER, EXPERIMENT, NAN_ARM, NAN_COLUMNS,
                                                  NAN_LABEL, ROUND_COLUMNS, SUMMARY_COLUMNS, TABLE_COLUMNS, Cell,
                                                  RobustnessSettings, build_cells, plan_cell, settings_for)

__all__ = ["AGGREGATOR_ORDER", "ATTACK_ORDER", "NAN_ARM", "NAN_COLUMNS", "NAN_LABEL", "SUMMARY_COLUMNS",
           "TABLE_COLUMNS", "Cell", "RobustnessResult", "RobustnessSettings", "build_cells", "expected_nan_per_round",
           "make_claims", "make_figures", "nan_arm_table", "plan_cell", "robustness_table", "run", "run_cells",
           "settings_for", "wide_table"]


@contextmanager
def _quiet_guard():
    """The guard logs a warning per rejected update; the NaN arm rejects hundreds (all counted in the
    records and nan_arm.csv), so they are silenced while the grid runs."""
    log = logging.getLogger("fedbench.fl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# -- running ---------------------------------------------------------------------------------------------

@dataclass
class RobustnessResult:
    settings: RobustnessSettings
    base: ExperimentConfig
    summary: pd.DataFrame
    rounds: pd.DataFrame
    table: pd.DataFrame
    wide: pd.DataFrame
    nan_arm: pd.DataFrame
    claims: pd.DataFrame
    out: Path


def store_root() -> Path:
    """This experiment's part of the run store (delete it to recompute everything)."""
    return runs_root() / EXPERIMENT


def run(profile: str = "quick", path=None, progress: bool = True, **overrides) -> RobustnessResult:
    """Run (or load) the profile's grid and NaN arm; write results/robustness[/<profile>]/."""
    from fedbench.models.checks import check_against_backbone
    p = settings_for(profile, path, **overrides)
    s, base = p.settings, p.base
    check_against_backbone(base)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    summary, rounds, correct, expected = run_cells(build_cells(s), base, s, progress=progress)
    table = robustness_table(summary)
    wide = wide_table(table)
    nan = nan_arm_table(summary, rounds, expected)
    claims = make_claims(summary, correct, nan, s)
    write_outputs(EXPERIMENT, out, {"summary": summary, "rounds": rounds, "robustness": table,
                                    "robustness_wide": wide, "nan_arm": nan, "claims": claims},
                  make_figures(summary, rounds))
    return RobustnessResult(s, base, summary, rounds, table, wide, nan, claims, out)


def expected_nan_per_round(cfg) -> list[int]:
    """How many NaN clients report in each round of `cfg` (the loop's seeded attacker set, sampling and
    dropout, recomputed from the same public functions and streams)."""
    from fedbench.fl import derive_seed, rng_for, sample_clients
    from fedbench.fl.attacks import select_attackers
    attackers = {int(c) for c in select_attackers(cfg.data.num_clients, cfg.fl.attack_fraction,
                                                  derive_seed(cfg.seed, "attack"))}
    out = []
    for r in range(1, cfg.fl.rounds + 1):
        sampled = sample_clients(cfg.data.num_clients, cfg.fl.clients_per_round, rng_for(cfg.seed, "sampling", r))
        dropped = rng_for(cfg.seed, "dropout", r).random(len(sampled)) < cfg.fl.dropout
        out.append(sum(int(c) in attackers for c, d in zip(sampled, dropped) if not d))
    return out


def run_cells(cells: list[Cell], base: ExperimentConfig, s: RobustnessSettings, progress: bool = True):
    """Run (or load) every applicable cell. Returns (summary, rounds, correct, expected): `correct` maps a
    cell's key to (test indices, 0/1 per test example) of its final evaluation, `expected` a NaN-arm cell's
    key to the NaN updates its clients send per round."""
    runner = Runner.with_prefix_caches(root=store_root())
    rows, round_frames, correct, expected = [], [], {}, {}
    t0 = time.perf_counter()
    counts = {"computed": 0, "loaded": 0, "n/a": 0}
    seed_start = {}
    with _quiet_guard():
        for i, cell in enumerate(cells):
            seed_start.setdefault(cell.seed, (time.perf_counter(), dict(counts)))
            plan = plan_cell(cell, base, s)
            row = {"arm": cell.arm, "aggregator": cell.aggregator, "attack": cell.attack,
                   "fraction": float(cell.fraction), "seed": cell.seed, **plan.info,
                   "applicable": plan.cfg is not None}
            if plan.cfg is None:
                counts["n/a"] += 1
                rows.append({**row, "final_accuracy": float("nan"), "best_accuracy": float("nan"),
                             "final_loss": float("nan"), "clients_rejected_total": float("nan"),
                             "rounds_with_rejection": float("nan"), "rounds": float("nan"),
                             "majority_baseline": float("nan"), "config_hash": "", "note": plan.note})
            else:
                cfg = plan.cfg
                result = runner.done(cfg)
                if result is None:
                    result = runner.get(cfg)
                    counts["computed"] += 1
                else:
                    counts["loaded"] += 1
                sm, r = result.summary, result.rounds
                labels = np.asarray(result.predictions["label"])
                rows.append({**row, "final_accuracy": sm["final_accuracy"], "best_accuracy": sm["best_accuracy"],
                             "final_loss": sm["final_loss"], "clients_rejected_total": int(sm["clients_rejected"]),
                             "rounds_with_rejection": int((r["clients_rejected"] > 0).sum()),
                             "rounds": int(sm["rounds"]),
                             "majority_baseline": float(np.bincount(labels).max() / len(labels)),
                             "config_hash": cfg.hash(), "note": ""})
                order = np.argsort(result.predictions["test_index"], kind="stable")
                correct[cell.key] = (np.asarray(result.predictions["test_index"])[order], result.correct)
                rr = r.reindex(columns=ROUND_COLUMNS[5:])
                for k, v in reversed(list(zip(ROUND_COLUMNS[:5], cell.key))):
                    rr.insert(0, k, v)
                round_frames.append(rr)
                if cell.arm == NAN_ARM:
                    expected[cell.key] = expected_nan_per_round(cfg)
            last = i + 1 == len(cells) or cells[i + 1].seed != cell.seed
            if progress and last:
                t_seed, before = seed_start[cell.seed]
                done = {k: counts[k] - before[k] for k in counts}
                print(f"seed {cell.seed}: {sum(done.values())} cells ({done['computed']} run, {done['loaded']} "
                      f"loaded, {done['n/a']} not applicable) in {time.perf_counter() - t_seed:.0f}s "
                      f"({time.perf_counter() - t0:.0f}s total)", flush=True)
    summary = pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)
    for c in ("num_malicious", "clients_rejected_total", "rounds_with_rejection", "rounds"):
        summary[c] = summary[c].astype("Int64")       # integers, empty where the cell did not run
    rounds = pd.concat(round_frames, ignore_index=True) if round_frames else pd.DataFrame(columns=ROUND_COLUMNS)
    return summary, rounds, correct, expected
