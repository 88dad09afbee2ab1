"""LoRM's analysis: pure functions from the runs' tables to the continual-learning metrics, the output tables,
the claims (:mod:`fedbench.claims`) and the figures (:mod:`fedbench.plots`).

Metrics: final average accuracy = mean_j a[T-1, j]; average incremental accuracy = mean_t mean_{j<=t} a[t, j];
forgetting = mean_{j<T-1} (max_{j<=t<T-1} a[t, j] - a[T-1, j]); mb_up = MB every client sent (Gram matrices
included, upper triangles, exact).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedbench.config import ExperimentConfig
from fedbench.experiments.lorm.plan import LABELS, METHODS, LormSettings
from fedbench.experiments.lorm.runs import MERGE_COLS


def accuracy_matrix(acc: pd.DataFrame, T: int, split: str = "test") -> np.ndarray:
    a = np.full((T, T), np.nan)
    for r in acc[acc["split"] == split].itertuples():
        a[int(r.after_task), int(r.task)] = r.accuracy
    return a


def cl_metrics(a: np.ndarray) -> dict:
    T = a.shape[0]
    avg = [float(np.mean(a[t, :t + 1])) for t in range(T)]
    forgetting = float(np.mean([np.max(a[j:T - 1, j]) - a[T - 1, j] for j in range(T - 1)])) if T > 1 else 0.0
    return {"avg_after_task": avg, "final_avg_accuracy": avg[-1], "avg_incremental_accuracy": float(np.mean(avg)),
            "forgetting": forgetting}


def val_accuracy(acc: pd.DataFrame) -> float:
    return float(acc.loc[acc["split"] == "val", "accuracy"].mean())


# -- tables ---------------------------------------------------------------------------------------------------

@dataclass
class LormResult:
    """What a run of a profile gives: its settings and base config, the output tables and where they went."""
    settings: LormSettings
    base: ExperimentConfig
    summary: pd.DataFrame
    per_task: pd.DataFrame
    avg_curve: pd.DataFrame
    merge_error: pd.DataFrame
    lr_selection: pd.DataFrame
    claims: pd.DataFrame
    runs: pd.DataFrame
    correct: dict = field(default_factory=dict)      # method -> {seed: (n_test,) 0/1}
    out: Path = None
    figures: dict = field(default_factory=dict)
    protocol: str = ""                                # PROTOCOL.md as written (markdown)


def tables(s: LormSettings, base, per_run: dict, lr_selection: pd.DataFrame) -> LormResult:
    """The output tables from ``per_run``: {(method, seed): (the run's tables of its served rule, run hash, lr)}."""
    summary, per_task, curve, errs, runs, correct = [], [], [], [], [], {}
    for (m, seed), (res, h, lr) in per_run.items():
        met = cl_metrics(accuracy_matrix(res["accuracy"], s.num_tasks))
        summary.append({"method": m, "seed": seed, "final_avg_accuracy": met["final_avg_accuracy"],
                        "avg_incremental_accuracy": met["avg_incremental_accuracy"], "forgetting": met["forgetting"],
                        "mb_up": res["summary"]["bytes_up"] / 1e6, "lr": lr})
        pt = res["accuracy"][res["accuracy"]["split"] == "test"].drop(columns="split")
        per_task.append(pt.assign(method=m, seed=seed))
        curve += [{"method": m, "seed": seed, "after_task": t + 1, "avg_accuracy": v}
                  for t, v in enumerate(met["avg_after_task"])]
        if len(res["merge_error"]):
            errs.append(res["merge_error"].assign(method=m, seed=seed))
        p = res["predictions"].sort_values("test_index")
        correct.setdefault(m, {})[seed] = (p["label"].to_numpy() == p["prediction"].to_numpy()).astype(float)
        runs.append({"method": m, "seed": seed, "lr": lr, "wall_s": round(res["summary"]["wall_s"], 1), "run": h})
    summary = pd.DataFrame(summary)
    per_task = pd.concat(per_task, ignore_index=True)[["method", "seed", "after_task", "task", "accuracy"]]
    cols = ["method", "seed"] + MERGE_COLS
    errs = pd.concat(errs, ignore_index=True)[cols] if errs else pd.DataFrame(columns=cols)
    return LormResult(s, base, summary, per_task, pd.DataFrame(curve), errs, lr_selection,
                      compute_claims(summary, errs, correct), pd.DataFrame(runs), correct)


# -- claims (fedbench.claims: an estimate, a 95% interval, a verdict) ---------------------------------------

PAPER = "LoRM beats FedAvg-style LoRA aggregation in FCIL (ViT-B/16; CIFAR-100, ImageNet-R, ...)"
PRIMARY_CLAIM = f"LoRM beats {LABELS['fedit']} (final avg accuracy)"

# paired comparisons on the final test predictions, each where both methods ran (on the seeds both ran):
# (a, b, claim, what the paper says, role)
COMPARISONS = (
    ("lorm", "fedit", PRIMARY_CLAIM, PAPER, "primary"),
    ("lorm", "product_svd", f"LoRM beats {LABELS['product_svd']} (final avg accuracy)",
     "LoRM > exact product averaging at equal rank", "exploratory"),
    ("lorm", "regmean_svd", f"LoRM beats {LABELS['regmean_svd']} (final avg accuracy)",
     "LoRM > RegMean at equal rank", "exploratory"),
    # the controls: which part of LoRM moves its accuracy
    ("lorm", "lorm_mean", "LoRM's cross-task merge beats serving the running mean of task products",
     "alignment of model responses across tasks (abstract)", "exploratory"),
    ("lorm", "lorm_avg", "LoRM's closed-form solve beats averaging the trained factor (same schedule, same lr)",
     "alignment of model responses between clients (abstract)", "exploratory"),
    ("fedit", "fedit_lorm_lr", "FedIT's own lr beats FedIT at LoRM's lr", "(a control: the lr)", "exploratory"),
    ("lorm", "fedit_lorm_lr", "LoRM beats FedIT at one shared lr (LoRM's)", "(a control: the lr)", "exploratory"),
    ("lorm_avg", "fedit_lorm_lr", "LoRM's schedule with averaging beats FedIT at the same lr",
     "(a control: alternating one factor per round vs both; served by the cross-task merge vs the running mean)",
     "exploratory"),
)
MERGE_SPLITS = (("fit", "on the inputs of the Gram matrices (least squares: guaranteed)"),
                ("heldout", "on held-out inputs of each client"))


def compute_claims(summary: pd.DataFrame, errs: pd.DataFrame, correct: dict) -> pd.DataFrame:
    """The primary claim (LoRM with its cross-task merge vs FedIT, every seed), then the controls that say why
    (exploratory: each on the seeds both of its methods ran)."""
    from fedbench import claims as C
    out = []
    methods = set(summary["method"])

    def per_seed(m, col):
        return summary[summary["method"] == m].sort_values("seed")[col].to_numpy()

    def paired(a, b, claim, paper, role="exploratory"):
        seeds = sorted(set(correct[a]) & set(correct[b]))
        out.append(C.paired_accuracy_difference(np.stack([correct[a][s] for s in seeds]),
                                                np.stack([correct[b][s] for s in seeds]), claim, paper,
                                                comparison=f"{a} - {b}", role=role))

    for a, b, claim, paper, role in COMPARISONS:
        if {a, b} <= methods:
            paired(a, b, claim, paper, role)
    if {"lorm", "fedit"} <= methods:
        out.append(C.paired_seed_difference(per_seed("lorm", "forgetting"), per_seed("fedit", "forgetting"),
                                            "LoRM forgets less than FedIT", "(not a headline of the paper)",
                                            direction=-1, comparison="forgetting lorm - fedit"))
    for split, what in MERGE_SPLITS if "lorm" in methods else ():
        e = errs[(errs["method"] == "lorm") & (errs["split"] == split)] if len(errs) else errs
        if len(e):
            piv = e.pivot_table(index=["seed", "task", "round", "layer"], columns="rule", values="rel_error")
            d = (piv["lorm"] - piv["factor_average"]).groupby(level="seed").mean()
            out.append(C.seed_mean(d.to_numpy(), f"LoRM's merge matches client responses better than averaging "
                                   f"the trained factor, {what}", "closed form = least-squares optimum for the "
                                   "factor it solves", direction=-1,
                                   comparison="rel. response error lorm - factor average (per-seed mean)"))
    if {"lorm", "fedit"} <= methods:
        a, b = per_seed("lorm", "mb_up").mean(), per_seed("fedit", "mb_up").mean()
        out.append(C.exact(a / b, "LoRM uploads more than FedIT (Gram matrices)", "clients send one Gram matrix "
                           "per distinct LoRA input besides one factor", threshold=1.0,
                           comparison="mb_up lorm / fedit", what="exact byte count"))
    centralised = [m for m in methods if METHODS[m].centralised]
    fed = [m for m in methods if not METHODS[m].centralised]
    for upper in centralised:
        if fed:
            best = max(fed, key=lambda m: per_seed(m, "final_avg_accuracy").mean())
            paired(upper, best, "joint training is an upper bound", "joint >= every FCIL method")
    return C.claims_table(out, primary=[PRIMARY_CLAIM])


# -- figures (fedbench.plots) ------------------------------------------------------------------------------------

def make_figures(res: LormResult) -> dict:
    from fedbench import plots
    order = [m for m in METHODS if m in set(res.summary["method"])]
    figs = {"avg_accuracy": plots.curves(res.avg_curve, x="after_task", y="avg_accuracy", hue="method", order=order,
                                         xlabel="after task", ylabel="avg accuracy over seen tasks",
                                         title=f"{res.settings.dataset}: {res.settings.num_tasks} tasks"),
            "forgetting": plots.bars(res.summary, x="method", y="forgetting", order=order, ylabel="forgetting"),
            "final_accuracy": plots.bars(res.summary, x="method", y="final_avg_accuracy", order=order,
                                         ylabel="final avg accuracy")}
    if len(res.merge_error):
        e = res.merge_error.groupby(["seed", "rule", "split"], as_index=False)["rel_error"].mean()
        figs["merge_error"] = plots.bars(e, x="rule", y="rel_error", hue="split",
                                         ylabel="response error / error of no merge",
                                         title="merging LoRM's client updates")
    return figs
