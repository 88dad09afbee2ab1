"""The robustness grid's analysis: pure functions from run records to tables, claims and figures."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedbench.experiments.robustness.plan import (AGGREGATOR_ORDER, NAN_ARM, NAN_COLUMNS, NAN_LABEL, PAPERS,
                                                  TABLE_COLUMNS, RobustnessSettings)

# -- tables ----------------------------------------------------------------------------------------------

GROUP_KEYS = ["arm", "aggregator", "attack", "fraction"]


def robustness_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, rule, attack, fraction): mean final accuracy over seeds with its 95% Student t interval, the
    sd, and the mean paired change against the same rule's clean run (same seed)."""
    from fedbench.claims import t_interval
    clean = summary[(summary["arm"] == "grid") & (summary["attack"] == "none") & summary["applicable"]]
    clean_acc = {(a, sd): v for a, sd, v in zip(clean["aggregator"], clean["seed"], clean["final_accuracy"])}
    rows = []
    for keys, g in summary.groupby(GROUP_KEYS, sort=False):
        ok = g[g["applicable"]]
        acc = ok["final_accuracy"].to_numpy(dtype=float)
        row = dict(zip(GROUP_KEYS, keys))
        row.update(attackers=int(g["attackers"].iloc[0]), num_malicious=g["num_malicious"].iloc[0],
                   applicable=bool(len(ok) > 0), n_seeds=int(len(ok)))
        if len(ok):
            mean, lo, hi = t_interval(acc)
            diffs = [v - clean_acc[(a, sd)] for a, sd, v in zip(ok["aggregator"], ok["seed"], acc)
                     if (a, sd) in clean_acc]
            row.update(accuracy_mean=mean, ci_low=lo, ci_high=hi,
                       accuracy_sd=float(np.std(acc, ddof=1)) if len(acc) > 1 else float("nan"),
                       # rounded: the mean of k/E differences carries float noise (1e-17 for "no change")
                       change_vs_clean=round(float(np.mean(diffs)), 12) + 0.0 if diffs and row["attack"] != "none"
                       else float("nan"),
                       clients_rejected_mean=float(ok["clients_rejected_total"].mean()), note="")
        else:
            row.update(accuracy_mean=float("nan"), ci_low=float("nan"), ci_high=float("nan"),
                       accuracy_sd=float("nan"), change_vs_clean=float("nan"), clients_rejected_mean=float("nan"),
                       note=str(g["note"].iloc[0]))
        rows.append(row)
    table = pd.DataFrame(rows).reindex(columns=TABLE_COLUMNS)
    table["num_malicious"] = table["num_malicious"].astype("Int64")
    return table


def _column_label(attack: str, fraction: float, arm: str) -> str:
    if arm == "grid" and attack == "none":
        return "clean"
    return f"{attack} {fraction:.0%}"


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per rule, one column per (attack, fraction): "mean [ci_low, ci_high]" or "not applicable"."""
    cols, cells = [], {}
    for _, r in table.iterrows():
        col = _column_label(r["attack"], r["fraction"], r["arm"])
        if col not in cols:
            cols.append(col)
        if not r["applicable"]:
            text = "not applicable"
        elif r["n_seeds"] > 1:
            text = f"{r['accuracy_mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        else:
            text = f"{r['accuracy_mean']:.3f}"
        cells[(r["aggregator"], col)] = text
    aggs = list(dict.fromkeys(table["aggregator"]))
    wide = pd.DataFrame([{"aggregator": a, **{c: cells.get((a, c), "") for c in cols}} for a in aggs])
    return wide


def nan_arm_table(summary: pd.DataFrame, rounds: pd.DataFrame, expected: dict) -> pd.DataFrame:
    """Per NaN-arm run: NaN updates sent (expected from the seeded attacker set and sampling), rejected, the
    rounds in which every NaN update was rejected, honest updates rejected, finite loss, accuracy vs clean."""
    rows = []
    nan = summary[(summary["arm"] == NAN_ARM) & summary["applicable"]]
    clean = summary[(summary["arm"] == "grid") & (summary["attack"] == "none") & summary["applicable"]]
    clean_acc = {(a, sd): v for a, sd, v in zip(clean["aggregator"], clean["seed"], clean["final_accuracy"])}
    for _, r in nan.iterrows():
        key = (NAN_ARM, r["aggregator"], NAN_LABEL, float(r["fraction"]), int(r["seed"]))
        exp = np.asarray(expected[key])
        rr = rounds[(rounds["arm"] == NAN_ARM) & (rounds["aggregator"] == r["aggregator"])
                    & (rounds["fraction"] == r["fraction"]) & (rounds["seed"] == r["seed"])].sort_values("round")
        rej = rr["clients_rejected"].to_numpy(dtype=int)
        ca = clean_acc.get((r["aggregator"], r["seed"]), float("nan"))
        rows.append({"aggregator": r["aggregator"], "fraction": r["fraction"], "seed": r["seed"],
                     "nan_clients": int(r["attackers"]), "rounds": int(len(rr)),
                     "rounds_with_nan": int((exp > 0).sum()), "nan_updates": int(exp.sum()),
                     "rejected": int(rej.sum()), "rounds_all_rejected": int(((rej >= exp) & (exp > 0)).sum()),
                     "all_rejected": bool(np.array_equal(rej, exp) and exp.sum() > 0),
                     "honest_rejected": int(np.clip(rej - exp, 0, None).sum()),
                     "loss_finite": bool(np.isfinite(rr["loss"].to_numpy(dtype=float)).all()),
                     "final_accuracy": r["final_accuracy"], "clean_accuracy": ca,
                     "accuracy_change": r["final_accuracy"] - ca})
    return pd.DataFrame(rows).reindex(columns=NAN_COLUMNS)


# -- claims ----------------------------------------------------------------------------------------------

def _paired(correct: dict, key_a, key_b, seeds) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(S x E) 0/1 matrices of two cells over the seeds where both ran, checked to be on the same examples."""
    a, b, used = [], [], []
    for sd in seeds:
        ka, kb = (*key_a, int(sd)), (*key_b, int(sd))
        if ka in correct and kb in correct:
            (ia, ca), (ib, cb) = correct[ka], correct[kb]
            if not np.array_equal(ia, ib):
                raise RuntimeError(f"{ka} and {kb} were evaluated on different test examples")
            a.append(ca)
            b.append(cb)
            used.append(int(sd))
    if len({len(x) for x in a}) > 1:      # different test subsamples per seed: keep the common size
        m = min(len(x) for x in a)
        a, b = [x[:m] for x in a], [x[:m] for x in b]
    return np.asarray(a), np.asarray(b), used


def make_claims(summary: pd.DataFrame, correct: dict, nan: pd.DataFrame, s: RobustnessSettings) -> pd.DataFrame:
    """Each robust rule vs FedAvg under each claimed attack, at the largest attacker fraction where the rule
    runs (paired by seed and test example); and, per NaN fraction, clean - NaN-arm accuracy below
    settings.nan_margin, with every NaN update rejected."""
    from fedbench.claims import DISAGREES, claims_table, gate, paired_accuracy_difference
    out = []
    grid = summary[summary["arm"] == "grid"]
    n = int(summary["cohort"].iloc[0]) if len(summary) else 0
    attacks = s.attacks if s.claim_attacks is None else s.claim_attacks
    if "fedavg" in s.aggregators:
        for attack in attacks:
            for rule in [a for a in s.aggregators if a != "fedavg"]:
                ok = grid[(grid["aggregator"] == rule) & (grid["attack"] == attack) & grid["applicable"]]
                if ok.empty:
                    continue
                frac = float(ok["fraction"].max())
                fa, fb = ("grid", rule, attack, frac), ("grid", "fedavg", attack, frac)
                a, b, used = _paired(correct, fa, fb, s.seeds)
                if not used:
                    continue
                row = ok[ok["fraction"] == frac].iloc[0]
                f = row["num_malicious"]
                c = paired_accuracy_difference(
                    a, b, claim=f"under {frac:.0%} {attack}, {rule} beats FedAvg",
                    paper=PAPERS.get(rule, f"{rule} is a Byzantine-robust rule"), comparison=f"{rule} - fedavg",
                    n_boot=s.n_boot, seed=0,
                    detail=f"{int(row['attackers'])} of {int(row['num_clients'])} clients attack, cohort n={n}"
                           + (f", f={int(f)}" if pd.notna(f) else "")
                           + (f"; the largest fraction where {rule} runs" if frac < max(s.fractions) else ""))
                out.append(c)
    for _, g in nan.groupby(["aggregator", "fraction"], sort=False):
        agg, frac = g["aggregator"].iloc[0], float(g["fraction"].iloc[0])
        a, b, used = _paired(correct, ("grid", agg, "none", 0.0), (NAN_ARM, agg, NAN_LABEL, frac), s.seeds)
        if not used:
            continue
        all_rej, finite = bool(g["all_rejected"].all()), bool(g["loss_finite"].all())
        detail = (f"NaN updates rejected: {int(g['rejected'].sum())} of {int(g['nan_updates'].sum())} "
                  f"({int(g['nan_clients'].iloc[0])} NaN clients, every round they took part: "
                  f"{'yes' if all_rej else 'NO'}; honest updates rejected: {int(g['honest_rejected'].sum())}); "
                  f"loss finite every round: {'yes' if finite else 'NO'}; margin {s.nan_margin:g}")
        c = paired_accuracy_difference(
            a, b, claim=f"{agg}: NaN updates from {frac:.0%} of the clients are rejected without harming accuracy",
            paper="fedbench's update guard: a non-finite update is rejected and counted, never aggregated",
            comparison=f"{agg} clean - {agg} with {frac:.0%} NaN clients", direction=-1, threshold=s.nan_margin,
            n_boot=s.n_boot, seed=0, detail=detail)
        if not (all_rej and finite and g["honest_rejected"].sum() == 0):
            c = gate(c, DISAGREES)          # the guard failed: no interval can save the claim (seeds still first)
        out.append(c)
    return claims_table(out)


# -- figures ---------------------------------------------------------------------------------------------

def make_figures(summary: pd.DataFrame, rounds: pd.DataFrame) -> dict:
    """The heatmap rule x attack at the largest fraction, accuracy vs attacker fraction per rule (one panel
    per attack, 95% bands over seeds) and the NaN arm's accuracy per round against the clean run."""
    from fedbench import plots
    figs = {}
    ok = summary[summary["applicable"]].copy()
    grid = ok[ok["arm"] == "grid"]
    chance = float(ok["majority_baseline"].mean()) if len(ok) else None
    hl = {"majority class": chance} if chance is not None and math.isfinite(chance) else None
    aggs = [a for a in AGGREGATOR_ORDER if a in set(summary["aggregator"])] + \
        [a for a in dict.fromkeys(summary["aggregator"]) if a not in AGGREGATOR_ORDER]
    attacked = grid[grid["attack"] != "none"]
    if len(attacked):
        top = float(summary.loc[(summary["arm"] == "grid") & (summary["attack"] != "none"), "fraction"].max())
        clean = grid[grid["attack"] == "none"].assign(attack="none (clean)")
        heat = pd.concat([clean, attacked[attacked["fraction"] == top]], ignore_index=True)
        heat["aggregator"] = pd.Categorical(heat["aggregator"], aggs, ordered=True)
        heat = heat.sort_values("aggregator", kind="stable")
        heat["aggregator"] = heat["aggregator"].astype(str)
        na = sorted(set(summary.loc[(summary["fraction"] == top) & ~summary["applicable"] &
                                    (summary["arm"] == "grid"), "aggregator"]))
        figs["accuracy_heatmap.png"] = plots.heatmap(
            heat, "aggregator", "attack", "final_accuracy", fmt=".2f", cbar_label="final test accuracy",
            title=f"final accuracy with {top:.0%} attackers (clean column: none)"
                  + (f"; blank = not applicable ({', '.join(na)})" if na else ""))
        curves = []
        for attack in dict.fromkeys(attacked["attack"]):
            curves.append(grid[grid["attack"] == "none"].assign(attack=attack))
            curves.append(attacked[attacked["attack"] == attack])
        cur = pd.concat(curves, ignore_index=True)
        cur["attackers_pct"] = 100 * cur["fraction"]
        figs["accuracy_vs_fraction.png"] = plots.curves(
            cur, "attackers_pct", "final_accuracy", hue="aggregator", facet="attack", order=list(aggs),
            hlines=hl, xlabel="attackers (% of clients)", ylabel="final test accuracy")
    nan_keys = summary[(summary["arm"] == NAN_ARM) & summary["applicable"]][["aggregator"]].drop_duplicates()
    if len(nan_keys) and len(rounds):
        frames = []
        for agg in nan_keys["aggregator"]:
            cl = rounds[(rounds["arm"] == "grid") & (rounds["aggregator"] == agg) & (rounds["attack"] == "none")]
            frames.append(cl.assign(run=f"{agg} clean"))
            nn = rounds[(rounds["arm"] == NAN_ARM) & (rounds["aggregator"] == agg)]
            for frac, g in nn.groupby("fraction", sort=True):
                frames.append(g.assign(run=f"{agg}, {frac:.0%} NaN clients"))
        df = pd.concat(frames, ignore_index=True).dropna(subset=["accuracy"])
        figs["nan_arm.png"] = plots.curves(df, "round", "accuracy", hue="run", hlines=hl,
                                           ylabel="test accuracy (NaN updates rejected by the guard)")
    return figs
