"""FedPEFT's analysis: pure functions from the reported runs' records (summary.csv, metrics.csv) to the tables
and figures (:mod:`fedbench.plots`); the claims are :mod:`fedbench.experiments.fedpeft.claims`."""
from __future__ import annotations

import numpy as np
import pandas as pd

from fedbench.registry import TUNERS
from fedbench.experiments.fedpeft.plan import (KEYS, METHODS, REFERENCE, dp_label, dp_levels, dp_mechanism,
                                               dp_table_seeds, heterogeneity_label, stability_label, variant)


def base_mask(df: pd.DataFrame, s: dict) -> pd.Series:
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    m = (df["partition"] == part) & (df["participation"] == p) & (df["dropout"] == d) & df["dp_epsilon_target"].isna()
    return m & (df["alpha"].isna() if alpha is None else (df["alpha"] == alpha))


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f}" if not np.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def headline_table(summary: pd.DataFrame, s: dict) -> pd.DataFrame:
    """Per task and method at the base condition: parameters, exact bytes, accuracy mean ± std over seeds."""
    base = summary[base_mask(summary, s)]
    rows = []
    for (task, method), g in base.groupby(["task", "method"], sort=False):
        full = base[(base["task"] == task) & (base["method"] == REFERENCE)]
        full_bytes = float(full["bytes_up_per_round"].iloc[0]) if len(full) else float("nan")
        acc, sc = g["final_accuracy"], g["score"]
        rows.append({
            "task": task, "method": method, "variant": g["variant"].iloc[0], "seeds": len(g),
            "trainable_params": int(g["trainable_params"].iloc[0]),
            "bytes_up_per_round": float(g["bytes_up_per_round"].iloc[0]),
            "bytes_down_per_round": float(g["bytes_down_per_round"].iloc[0]),
            "MB_per_client_per_round": float(g["state_bytes"].iloc[0]) / 1e6,
            "bytes_pct_of_full": 100 * float(g["bytes_up_per_round"].iloc[0]) / full_bytes,
            "total_MB": float(g["total_bytes"].mean()) / 1e6,
            "final_accuracy_mean": float(acc.mean()), "final_accuracy_std": float(acc.std()),
            "final_accuracy": _fmt(acc.mean(), acc.std()), "score_mean": float(sc.mean()),
            "score": _fmt(sc.mean(), sc.std()), "best_accuracy_mean": float(g["best_accuracy"].mean())})
    df = pd.DataFrame(rows)
    if len(df):
        df["_o"] = df["method"].map({m: i for i, m in enumerate(METHODS)})
        df = df.sort_values(["task", "_o"], key=lambda c: c.map({t: i for i, t in enumerate(s["tasks"])})
                            if c.name == "task" else c, kind="stable").drop(columns="_o").reset_index(drop=True)
    return df


def axis_table(summary: pd.DataFrame, s: dict, axis: str) -> pd.DataFrame:
    """Accuracy (mean ± std over axis seeds) of each axis method at every level of one axis, others at base."""
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    methods, seeds = ((s["dp_methods"], dp_table_seeds(s)) if axis == "dp"
                      else (s["axis_methods"], s["axis_seeds"]))
    df = summary[(summary["task"] == s["tasks"][0]) & summary["method"].isin(methods)
                 & summary["seed"].isin(seeds)]
    het_base = (df["partition"] == part) & (df["alpha"].isna() if alpha is None else (df["alpha"] == alpha))
    stab_base = (df["participation"] == p) & (df["dropout"] == d)
    dp_base = df["dp_epsilon_target"].isna()
    keep = {"heterogeneity": stab_base & dp_base, "stability": het_base & dp_base, "dp": het_base & stab_base}[axis]
    df = df[keep]
    levels = {"heterogeneity": [heterogeneity_label(pa, al) for pa, al in s["heterogeneity"]],
              "stability": [stability_label(pp, dd) for pp, dd in s["stability"]],
              "dp": ["none"] + [dp_label(e) for e in dp_levels(s)]}[axis]
    rows = []
    for method in [m for m in METHODS if m in methods]:
        base = df[(df["method"] == method) & (df[axis] == levels[0])]
        for level in levels:
            g = df[(df["method"] == method) & (df[axis] == level)]
            if not len(g):
                continue
            acc, sc = g["final_accuracy"], g["score"]
            ref = base[base["seed"].isin(g["seed"])]["score"].mean()     # the drop on the same seeds, in score
            row = {"method": method, "variant": g["variant"].iloc[0], axis: level, "seeds": len(g),
                   "final_accuracy_mean": float(acc.mean()), "final_accuracy_std": float(acc.std()),
                   "final_accuracy": _fmt(acc.mean(), acc.std()), "score_mean": float(sc.mean()),
                   "score": _fmt(sc.mean(), sc.std()), "drop_vs_base": float(ref - sc.mean()),
                   "total_MB": float(g["total_bytes"].mean()) / 1e6, "lr": float(g["lr"].iloc[0])}
            if axis == "dp":
                row["dp_epsilon_spent_max"] = float(g["dp_epsilon_spent"].max()) if level != "none" else float("nan")
                row["dp_mechanism"] = g["dp_mechanism"].iloc[0] if level != "none" else ""
                row["dp_supported"] = "yes" if level == "none" or g["final_accuracy"].notna().all() else "no"
            rows.append(row)
    return pd.DataFrame(rows)


def dp_support_table(summary: pd.DataFrame, s: dict) -> pd.DataFrame:
    """Whether and how DP-SGD runs with each method: every method is supported by fedbench.fl.privacy
    (the clipped update of each is checked exact against one-example autograd in tests/test_privacy.py);
    the mechanism follows from the trainable-parameter count; and whether this profile ran it."""
    how = {m: TUNERS.entry(m).opacus for m in METHODS}      # what DP-SGD's per-sample gradients go through
    rows = []
    for m in METHODS:
        g = summary[summary["method"] == m]
        trainable = int(g["trainable_params"].iloc[0]) if len(g) else None
        ran = g[g["dp_epsilon_target"].notna()]
        rows.append({"method": m, "dp_supported": "yes",
                     "mechanism": dp_mechanism(trainable, s["batch_size"]) if trainable is not None else "",
                     "run_under_dp_here": "yes" if len(ran) else "no (not in this profile's dp_methods)",
                     "note": how[m]})
    return pd.DataFrame(rows)


def make_tables(summary: pd.DataFrame, s: dict) -> dict[str, pd.DataFrame]:
    return {"headline": headline_table(summary, s), "heterogeneity": axis_table(summary, s, "heterogeneity"),
            "stability": axis_table(summary, s, "stability"), "dp": axis_table(summary, s, "dp"),
            "dp_support": dp_support_table(summary, s)}


def _wide(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics.pivot_table(index=KEYS + ["round"], columns="metric", values="value", dropna=False).reset_index()


def make_figures(summary: pd.DataFrame, metrics: pd.DataFrame, s: dict) -> dict:
    """The figure set (fedbench.plots): accuracy vs rounds and vs MB (log x) at the base condition, the DP drop
    per method, the heterogeneity x method heatmap and client stability, each mean over seeds with intervals."""
    from fedbench import plots
    colors = plots.method_colors([variant(m, s["depth"]) for m in METHODS])
    order = [variant(m, s["depth"]) for m in METHODS]
    figs = {}
    wide = _wide(metrics.assign(alpha=metrics["alpha"].fillna(-1),
                                dp_epsilon_target=metrics["dp_epsilon_target"].fillna(-1)))
    wide = wide.replace({"alpha": {-1: np.nan}, "dp_epsilon_target": {-1: np.nan}})
    base = wide[base_mask(wide, s)].dropna(subset=["accuracy"]).copy()
    base["variant"] = [variant(m, s["depth"]) for m in base["method"]]
    base["MB"] = base["cumulative_bytes"] / 1e6
    if len(base):
        figs["accuracy_vs_rounds.png"] = plots.curves(base, "round", "accuracy", hue="variant", facet="task",
                                                      colors=colors, order=order, ylabel="test accuracy")
        figs["accuracy_vs_mb.png"] = plots.curves(base, "MB", "accuracy", hue="variant", facet="task", logx=True,
                                                  colors=colors, order=order, ylabel="test accuracy",
                                                  xlabel="MB communicated (up + down, cumulative)")
    main = summary[(summary["task"] == s["tasks"][0]) & summary["method"].isin(s["axis_methods"])
                   & summary["seed"].isin(s["axis_seeds"])].copy()
    main["variant"] = [variant(m, s["depth"]) for m in main["method"]]
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    het_base = (main["partition"] == part) & ((main["alpha"].isna()) if alpha is None else (main["alpha"] == alpha))
    stab_base = (main["participation"] == p) & (main["dropout"] == d)
    if dp_levels(s):
        dpm = summary[(summary["task"] == s["tasks"][0]) & summary["method"].isin(s["dp_methods"])
                      & summary["seed"].isin(dp_table_seeds(s))
                      & base_mask(summary.assign(dp_epsilon_target=np.nan), s)].copy()
        dpm["variant"] = [variant(m, s["depth"]) for m in dpm["method"]]
        no_dp = dpm[dpm["dp_epsilon_target"].isna()].set_index(["method", "seed"])
        drops = []
        for _, r in dpm[dpm["dp_epsilon_target"].notna()].iterrows():
            if (r["method"], r["seed"]) in no_dp.index:
                drops.append({"variant": r["variant"], "seed": r["seed"], "dp": r["dp"],
                              "drop": no_dp.loc[(r["method"], r["seed"]), "score"] - r["score"]})
        if drops:
            figs["dp_drop.png"] = plots.bars(pd.DataFrame(drops), "variant", "drop", hue="dp", order=order,
                                             ylabel="score drop under DP-Adam (no DP - DP)",
                                             title=f"{s['tasks'][0]}: DP cost per method")
    het = main[stab_base & main["dp_epsilon_target"].isna()]
    if het["heterogeneity"].nunique() > 1:
        # columns from IID to the strongest skew: iid, then Dirichlet alpha from large to small
        skew = sorted(set(het["heterogeneity"]), key=lambda h: -np.inf if h == "iid" else -float(h.rsplit("-", 1)[1]))
        figs["heterogeneity_heatmap.png"] = plots.heatmap(het, "variant", "heterogeneity", "score",
                                                          col_order=skew, row_order=order,
                                                          title=f"{s['tasks'][0]}: heterogeneity x method",
                                                          cbar_label=f"score (last {s['score_last_k']} evaluations)")
    st = main[het_base & main["dp_epsilon_target"].isna()]
    if st["stability"].nunique() > 1:
        figs["stability.png"] = plots.bars(st, "variant", "score", hue="stability", order=order,
                                           ylabel=f"score (mean accuracy, last {s['score_last_k']} evaluations)",
                                           title=f"{s['tasks'][0]}: client stability")
    return figs
