"""Task arithmetic is one-shot FedAvg (Tao et al., 2024, arXiv 2411.18607), on MiniLM and offline text tasks.

Every FedAvg round runs on the shared loop (:class:`fedbench.fl.server.FederatedRun`) with the
``task_clients`` strategy (:mod:`fedbench.strategies`): client t holds task t, and the model is one
shared encoder with one head matrix holding every task's rows (``TokenizedSplit.class_mask`` restricts each
example to its own task's rows: exactly one head per task). The heads are **frozen**, never trained and never
sent, as the paper's: ``head: zero_shot`` (the paper's) makes each task's rows its classes' prompt embeddings by
theta_0 with cosine logits (:mod:`fedbench.models.zero_shot`); ``head: probe`` (exploratory) a linear probe
(logistic regression) fitted on theta_0's features of a probe carve of its training subsample
(``probe_samples``, disjoint from the validation carve and from the fine-tuning data: a probe fitted on the
fine-tuning data fits it almost perfectly and leaves the encoder nothing to learn). The reference rows named
``probe`` are theta_0 with the profile's frozen heads (zero-shot or probe). A task's fine-tune is its client's round-1
update from theta_0, so its task vector tau_t is the change of the shared encoder only: the dense LoRA
update ``s B_t A_t`` of every wrapped weight (LoRA on all layers by default), or every encoder parameter
with full fine-tuning (``tunings: [full]``). LoRA's learning rate is one lr shared by the tasks, chosen
from ``lrs`` on the first seed's validation (best mean individual validation accuracy; ``lr_search``
table) and used for every seed.

Merges are the pure functions of :mod:`fedbench.merging` (the MERGES registry, whose ``scale`` fact says
whether a merge returns a sum- or a mean-scale vector), plus ``fedit`` (the dense product of the averaged
LoRA factors, what FedIT's round gives; mean-scale). The merged model is theta_0 + tau with the frozen heads.

Scale-matched search. lambda is expressed in **per-task units**: the weight w each task vector gets. A
sum-scale merge is called with lam = w, a mean-scale one with lam = w T, so the same grid point means the
same per-task weight for every method; the grid is the settings' ``lambdas`` (the official range
0.05 .. 2) with 1/T always added. w = 1/T is plain one-shot FedAvg (task arithmetic) or the plain
mean-scale merge. Second hyper-parameters as in the authors' code: FedGMA rho over ``gma_rhos``
(0.1 .. 0.9), CCLIP rho over linspace(min ||tau_t||, max ||tau_t||, ``cclip_rhos``, endpoint=False), TIES
densities, DARE drop rates. Everything is chosen on a validation split of ``val_samples`` examples per
task carved (seeded) from the task's training subsample, never the test split, by the authors' criterion
(mean over tasks of merged / individual validation accuracy). Every method is reported twice: ``tuned``
(lambda and rho from the search) and ``1/T`` (lambda = 1/T, rho still searched).

Normalised accuracy = (merged - probe) / (individual - probe), per task, where probe = theta_0 with the
frozen heads; ``accuracy_ratio`` = merged / individual (the paper's) beside it. In the heterogeneous
settings (``hetero_training``: local steps x ``hetero_steps``; ``hetero_lr``: lr x ``hetero_lrs``) both are
taken against the *homogeneous* individual models, so the denominators do not move.

The package: :mod:`.plan` (settings, the merges and their facts, grids, each unit's config and key),
:mod:`.unit` and :mod:`.compute` (one unit's computation on the loop), :mod:`.analysis` (tables, claims,
figures), :mod:`.protocol` (paper / official code / ours). Per (tuning, seed) one unit computes every table; it
is stored in a :class:`fedbench.bench.TableRunStore` under ``runs_root()/task_arithmetic`` by the hash of the
whole resolved profile (base config + settings, with this unit's seed and tuning) and the core's
``RESULTS_SCHEMA``: no hand-kept key list. Tables are always returned as read back from disk, so a first run and
a rerun write byte-identical CSVs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd

from fedbench.bench import TableRunStore, output_dir, variant_note, write_outputs
from fedbench.config import ExperimentConfig
from fedbench.experiments.task_arithmetic.analysis import make_claims, make_figures, method_table, pair_metric
from fedbench.experiments.task_arithmetic.compute import compute_unit
from fedbench.experiments.task_arithmetic.plan import (EXPERIMENT, HEADS, LABELS, MERGE_FACTS, MERGE_METHODS,
                                                       PRIMARY_CLAIMS, SUMMARY_COLUMNS, TABLES, TUNING_FACTS, TUNINGS,
                                                       VARIANTS, Merge, Resolved, TaskArithmeticSettings, Tuning,
                                                       lr_grid, merge, merge_names, per_task_grid, rho_grid,
                                                       run_config, scale_of, settings_for, unit_key)
from fedbench.experiments.task_arithmetic.protocol import protocol_markdown, protocol_table
from fedbench.experiments.task_arithmetic.unit import Unit

__all__ = ["EXPERIMENT", "HEADS", "LABELS", "MERGE_FACTS", "MERGE_METHODS", "PRIMARY_CLAIMS", "STORE",
           "SUMMARY_COLUMNS", "TABLES", "TUNING_FACTS", "TUNINGS", "VARIANTS", "Merge", "Resolved",
           "TaskArithmeticResult", "TaskArithmeticSettings", "Tuning", "Unit", "compute_unit", "export", "lr_grid",
           "make_claims", "make_figures", "merge", "merge_names", "method_table", "pair_metric", "per_task_grid",
           "protocol_markdown", "protocol_table", "rho_grid", "run", "run_config", "scale_of", "settings_for", "unit_key"]

# one unit's tables; "bits" (0/1 per test example) stays a string, not a number
STORE = TableRunStore(EXPERIMENT, TABLES, read_csv_kwargs={"keep_default_na": True, "dtype": {"bits": str}})


def export(profile: str = "quick", path=None, method: str = "lora", seed: int = 0, lr: float | None = None,
           **overrides) -> ExperimentConfig:
    """The loop's run of one (tuning, seed) as a config that runs alone (``fedbench export``): round 1 is every
    task's fine-tune and one-shot FedAvg of the task vectors. `method` is the tuning (lora or full); `lr` default:
    the lr the profile chose on validation (full fine-tuning: ``full_lr``)."""
    from fedbench.bench import check_method, chosen_lr, no_lr
    r = settings_for(profile, path, **overrides)
    check_method(method, tuple(r.settings.tunings))
    cfg = run_config(r.base, r.settings, method, int(seed))
    if lr is None and not TUNING_FACTS[method].own_lr and r.settings.lrs:
        lr = chosen_lr(EXPERIMENT, profile, path, table="lr_search.csv", tuning=method)
        if lr is None:
            raise no_lr(profile, method)
    return cfg if lr is None else cfg.replace(**{"train.lr": float(lr)})


@dataclass
class TaskArithmeticResult:
    settings: Resolved
    summary: pd.DataFrame
    table: pd.DataFrame
    equivalence: pd.DataFrame
    cosine: pd.DataFrame
    pairs: pd.DataFrame
    rounds: pd.DataFrame
    validation: pd.DataFrame
    finetune: pd.DataFrame
    lr_search: pd.DataFrame
    claims: pd.DataFrame
    protocol: pd.DataFrame
    figures: dict
    out_dir: Path
    wall_s: float


def run(profile: str = "quick", path=None, verbose: bool = True, **overrides) -> TaskArithmeticResult:
    """Run (or load) every unit, write the tables, claims, protocol and figures, return them."""
    r = settings_for(profile, path, **overrides)
    s = r.settings
    log = print if verbose else (lambda *a, **k: None)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    start = time.perf_counter()
    parts = {k: [] for k in TABLES}
    for tuning in s.tunings:
        lr = None            # the learning rate is searched on the first seed's validation, then used for all
        for seed in s.seeds:
            res = STORE.get(unit_key(r, tuning, seed, lr), partial(compute_unit, r, tuning, seed, log, lr))
            if lr is None and len(res["lr_search"]):
                ls = res["lr_search"]
                lr = float(ls[ls["chosen"].astype(bool)]["lr"].iloc[0])
            for k in TABLES:
                df = res[k]
                if len(df):
                    df = df.copy()
                    df.insert(0, "seed", seed)
                    df.insert(0, "tuning", tuning)
                    parts[k].append(df)
    tabs = {k: (pd.concat(v, ignore_index=True) if v else pd.DataFrame()) for k, v in parts.items()}
    if not len(tabs["pairs"]):          # a profile without pairs still writes a readable pairs.csv (its header)
        tabs["pairs"] = pd.DataFrame(columns=["tuning", "seed", "task_a", "task_b", "cosine", "accuracy_1/T",
                                              "normalized_1/T"])
    summary = tabs["accuracy"][SUMMARY_COLUMNS]
    table = method_table(summary)
    claims = make_claims(tabs, r)
    protocol = protocol_table(r)
    figures = make_figures(summary, tabs, r)
    md = variant_note(path) + protocol_markdown(protocol, claims, tabs["finetune"], tabs["lr_search"])
    tables = {"summary": summary, "table": table, **{k: tabs[k] for k in ("equivalence", "cosine", "pairs", "rounds",
                                                                          "validation", "finetune", "lr_search")},
              "claims": claims, "protocol": protocol}
    write_outputs(EXPERIMENT, out, tables, {name.removesuffix(".png"): fig for name, fig in figures.items()}, md)
    wall = time.perf_counter() - start
    log(f"task_arithmetic [{profile}]: {wall:.0f} s -> {out}")
    return TaskArithmeticResult(r, summary, table, tabs["equivalence"], tabs["cosine"], tabs["pairs"],
                                tabs["rounds"], tabs["validation"], tabs["finetune"], tabs["lr_search"], claims,
                                protocol, figures, out, wall)
