"""Task arithmetic's analysis: pure functions from the units' tables to the method table, claims and figures."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from fedbench.experiments.task_arithmetic.plan import (HEADS, LABELS, MERGE_FACTS, MERGE_METHODS, PRIMARY_CLAIMS,
                                                       VARIANTS, Resolved)

# what the claim "<merge> beats task arithmetic" reads in the paper, by the merge's family
FAMILY_CLAIMS = {"fl": "FL-inspired merges improve on task arithmetic (authors: in heterogeneous settings)",
                 "interference": "merging with less interference improves on task arithmetic"}


def method_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (tuning, setting, method, variant): task-averaged accuracy, normalised accuracy and ratio, mean and
    std over seeds, and the lambda (per-task units) / rho chosen, averaged over seeds."""
    d = summary[~summary["setting"].str.startswith("pair:")]
    per_seed = (d.groupby(["tuning", "setting", "method", "variant", "seed"], sort=False)
                [["accuracy", "normalized_accuracy", "accuracy_ratio", "lambda", "rho"]].mean().reset_index())
    g = per_seed.groupby(["tuning", "setting", "method", "variant"], sort=False)
    return g.agg(accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
                 normalized=("normalized_accuracy", "mean"), normalized_std=("normalized_accuracy", "std"),
                 ratio=("accuracy_ratio", "mean"), mean_lambda=("lambda", "mean"), mean_rho=("rho", "mean"),
                 seeds=("seed", "count")).reset_index()


# -- claims ---------------------------------------------------------------------------------------------

def _bits(correct: pd.DataFrame, tuning, setting, method, variant, seeds) -> np.ndarray | None:
    d = correct[(correct["tuning"] == tuning) & (correct["setting"] == setting) & (correct["method"] == method)
                & (correct["variant"] == variant)]
    rows = []
    for seed in seeds:
        x = d[d["seed"] == seed]["bits"]
        if len(x) != 1:
            return None
        rows.append(np.frombuffer(str(x.iloc[0]).encode(), dtype=np.uint8) - ord("0"))
    if len({len(x) for x in rows}) != 1:
        return None
    return np.stack(rows).astype(int)


def pair_metric(pairs: pd.DataFrame) -> tuple[str, str]:
    """The pairs' y: normalised accuracy when every value is finite, else raw accuracy (a task whose
    fine-tune equals its probe in some seed has no normalised value)."""
    if len(pairs) and np.isfinite(pairs["normalized_1/T"].to_numpy(dtype=float)).all():
        return "normalized_1/T", "normalised accuracy"
    return "accuracy_1/T", "accuracy"


def make_claims(tabs: dict, r: Resolved) -> pd.DataFrame:
    from fedbench import claims as C
    s = r.settings
    out = []
    correct = tabs["correct"]
    for tuning in s.tunings:
        tag = f" [{tuning}]" if len(s.tunings) > 1 else ""
        seeds = list(s.seeds)

        def diff(a, b, claim, paper, direction, comparison, detail="", room=True):
            """room: a claim about what fine-tuning or merging does (gated on the validation headroom)."""
            ca, cb = _bits(correct, tuning, *a, seeds), _bits(correct, tuning, *b, seeds)
            if ca is None or cb is None:
                return
            out.append(C.gate(C.paired_accuracy_difference(ca, cb, claim + tag, paper, direction=direction,
                                                           comparison=comparison, detail=detail),
                              headroom if room else ""))

        e = tabs["equivalence"]
        e = e[e["tuning"] == tuning]
        out.append(C.exact(float(e["max_abs_param_diff"].max()), "Task arithmetic with lambda = 1/T is one round of "
                           "FedAvg" + tag, "theta_0 + (1/T) sum_t tau_t = FedAvg of the T task-clients",
                           direction=-1, threshold=1e-6, comparison="max |parameter difference| (<= 1e-6)",
                           detail=f"test predictions that differ: {int(e['prediction_mismatches'].max())}; "
                                  f"{len(e)} (task, seed)", what="exact difference of two computations"))
        ft = tabs["finetune"]
        ft = ft[ft["tuning"] == tuning]
        per_task = ft.groupby("task", sort=False)["gain_test"].mean()
        headroom = C.headroom_gate(float((ft["individual_val"] - ft["probe_val"]).mean())) if len(ft) else ""
        diff(("homogeneous", "individual", "-"), ("homogeneous", "probe", "-"),
             f"Fine-tuning the encoder beats {HEADS[s.head]} (the prerequisite)",
             "tau_t carries the task: individual > theta_0 with its frozen head", +1, "individual - probe",
             "per task (mean over seeds): " + ", ".join(f"{k} {v:+.3f}" for k, v in per_task.items()), room=False)
        for variant in VARIANTS:
            diff(("homogeneous", "task_arithmetic", variant), ("homogeneous", "individual", "-"),
                 f"The merge loses to the individual models (lambda {variant})",
                 "one model for all tasks is below each task's own fine-tune", -1, "task arithmetic - individual")
        for setting, mult, what, how, unit in (
                ("hetero_training", s.hetero_steps, "Training", "different numbers of steps", "step multipliers"),
                ("hetero_lr", s.hetero_lrs, "Learning-rate", "different learning rates", "lr multipliers")):
            for variant in VARIANTS if mult else ():
                diff((setting, "task_arithmetic", variant), ("homogeneous", "task_arithmetic", variant),
                     f"{what} heterogeneity hurts task arithmetic (lambda {variant})",
                     f"tasks trained with {how} merge worse (raw accuracy, same tasks)", -1,
                     f"{setting} - homogeneous", f"{unit} {list(mult)}")
                if setting == "hetero_training" and "fednova" in s.hetero_methods:
                    diff(("hetero_training", "fednova", variant), ("hetero_training", "task_arithmetic", variant),
                         f"FedNova recovers from training heterogeneity (lambda {variant})",
                         "reweighting tau_t by (mean steps / steps_t) / T beats task arithmetic there", +1,
                         "FedNova - task arithmetic (heterogeneous)")
        # every other merge against task arithmetic at the same variant (a missing row is skipped by diff); a
        # merge that normalises by steps only (FedNova) is task arithmetic with equal steps: its claim is the one above
        others = [m for m, f in MERGE_FACTS.items() if f.family in FAMILY_CLAIMS and not f.steps]
        for setting, where in (("homogeneous", "homogeneous"), ("hetero_training", "step heterogeneity")):
            for m, variant in itertools.product(others, VARIANTS):
                diff((setting, m, variant), (setting, "task_arithmetic", variant),
                     f"{LABELS[m]} beats task arithmetic ({where}, lambda {variant})",
                     FAMILY_CLAIMS[MERGE_FACTS[m].family], +1, f"{m} - task arithmetic ({setting})")
        diff(("homogeneous", "task_arithmetic", "tuned"), ("homogeneous", "task_arithmetic", "1/T"),
             "Tuning lambda on validation beats plain one-shot FedAvg (lambda = 1/T)",
             "the scaling coefficient matters (authors search it over [0.05, 2])", +1, "tuned - 1/T")
        multi = [R for R in s.rounds if R > 1]
        if multi and 1 in s.rounds:
            R = max(multi)
            diff((f"rounds:{R}", "fedavg", "1/T"), ("homogeneous", "fedavg", "1/T"),
                 f"More communication rounds close the gap ({R} rounds vs 1, equal total steps)",
                 "several FedAvg rounds across the tasks beat the one-shot merge", +1, f"{R} rounds - 1 round")
            diff((f"rounds:{R}", "fedavg", "1/T"), ("homogeneous", "task_arithmetic", "tuned"),
                 f"{R} FedAvg rounds beat one-shot task arithmetic with tuned lambda",
                 "more communication beats tuning the one-shot merge", +1, f"{R} rounds - tuned task arithmetic")
        p = tabs["pairs"]
        p = p[p["tuning"] == tuning] if len(p) else p
        if len(p) >= 3:
            col, what = pair_metric(p)
            pm = p.groupby(["task_a", "task_b"], sort=False)[["cosine", col]].mean()
            if pm["cosine"].nunique() > 1:
                out.append(C.gate(C.rank_correlation(
                    pm["cosine"].to_numpy(), pm[col].to_numpy(),
                    "Data heterogeneity hurts the merge: similar task vectors merge better" + tag,
                    "tasks whose updates point in different directions merge worse", direction=+1,
                    comparison=f"Spearman(cosine of the task vectors, pair {what} at lambda = 1/2)",
                    detail=f"{len(pm)} pairs, each averaged over {p['seed'].nunique()} seeds; cosine "
                           f"{pm['cosine'].min():.3f} .. {pm['cosine'].max():.3f}"
                           + ("" if col == "normalized_1/T" else "; raw accuracy: a normalised value was "
                              "undefined (a task whose fine-tune equals its probe)")), headroom))
    tags = [f" [{t}]" if len(s.tunings) > 1 else "" for t in s.tunings]
    return C.claims_table(out, primary=[PRIMARY_CLAIMS[k] + tag for k in s.primary for tag in tags])



# -- figures ----------------------------------------------------------------------------------------------

def make_figures(summary: pd.DataFrame, tabs: dict, r: Resolved) -> dict:
    from fedbench import plots
    s = r.settings
    figs = {}
    order = ["fedavg", *MERGE_METHODS]
    for tuning in s.tunings:
        sfx = "" if tuning == s.tunings[0] else f"_{tuning}"
        d = summary[(summary["tuning"] == tuning) & summary["setting"].isin(["homogeneous", "hetero_training",
                                                                              "hetero_lr"])
                    & summary["method"].isin(order)]
        per_seed = (d.groupby(["setting", "method", "variant", "seed"], sort=False)["normalized_accuracy"].mean()
                    .reset_index())
        per_seed["method"] = per_seed["method"].map(LABELS) + " (" + per_seed["variant"] + ")"
        for setting in per_seed["setting"].unique():
            figs[f"normalized_accuracy_{setting}{sfx}.png"] = plots.bars(
                per_seed[per_seed["setting"] == setting], x="method", y="normalized_accuracy",
                ylabel="normalised accuracy\n(merged - probe) / (individual - probe)",
                title=f"{setting.replace('_', ' ')} ({tuning}): tasks averaged, 95% CI over seeds")
        c = tabs["cosine"]
        c = c[(c["tuning"] == tuning) & (c["task_a"] != c["task_b"])]
        figs[f"cosine_similarity{sfx}.png"] = plots.heatmap(c, "task_a", "task_b", "cosine", center=0.0,
                                                            title=f"cosine of task vectors ({tuning})",
                                                            cbar_label="cosine")
        p = tabs["pairs"]
        if len(p):
            p = p[p["tuning"] == tuning]
            col, what = pair_metric(p)
            pm = p.groupby(["task_a", "task_b"], sort=False)[["cosine", col]].mean().reset_index()
            pm["pair"] = pm["task_a"] + "+" + pm["task_b"]
            pm["merge"] = "task arithmetic, lambda = 1/2"
            figs[f"similarity_vs_accuracy{sfx}.png"] = plots.scatter(
                pm, "cosine", col, hue="merge", annotate="pair",
                xlabel="cosine of the two task vectors", ylabel=f"pair {what}",
                title=f"pairs ({tuning}, mean over seeds)")
        ro = tabs["rounds"]
        if len(ro) and ro["rounds"].nunique() > 1:
            ro = ro[ro["tuning"] == tuning].groupby(["rounds", "seed"])["accuracy"].mean().reset_index()
            ro["method"] = "FedAvg, R rounds x steps / R"
            ta = summary[(summary["tuning"] == tuning) & (summary["setting"] == "homogeneous")]
            hl = {f"{LABELS[m]} ({v})": float(ta[(ta["method"] == m) & (ta["variant"] == v)]
                                               .groupby("seed")["accuracy"].mean().mean())
                  for m, v in (("task_arithmetic", "tuned"), ("probe", "-"), ("individual", "-"))}
            figs[f"accuracy_vs_rounds{sfx}.png"] = plots.curves(
                ro, "rounds", "accuracy", hue="method", hlines=hl, logx=True, xlabel="communication rounds",
                ylabel="test accuracy (tasks averaged)", title=f"rounds at equal total steps ({tuning})")
    return figs
