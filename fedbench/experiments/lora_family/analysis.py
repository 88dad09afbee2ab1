"""The federated-LoRA family's analysis: pure functions from run records to tables, claims and figures."""
from __future__ import annotations

import numpy as np
import pandas as pd

from fedbench.experiments.lora_family.plan import HEADROOM, METHODS, REFERENCE, LoraFamilySettings


def condition_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per condition and method: mean final accuracy over seeds with its 95% t interval, MB sent."""
    from fedbench.claims import t_interval
    ok = summary[summary["applicable"]]
    rows = []
    for (c, m), g in ok.groupby(["condition", "method"], sort=False):
        acc = g["final_accuracy"].to_numpy(float)
        mean, lo, hi = t_interval(acc) if len(acc) >= 2 else (float(acc.mean()), np.nan, np.nan)
        rows.append({"condition": c, "method": m, "seeds": len(acc), "accuracy": mean, "ci_low": lo, "ci_high": hi,
                     "mb_total": float(g["mb_total"].mean()), "evaluation": g["evaluation"].iloc[0]})
    return pd.DataFrame(rows)


def headroom_table(lr_table: pd.DataFrame, probe_accuracy: float) -> tuple[pd.DataFrame, float]:
    """FedIT at its chosen lr on the IID validation carve against the frozen probe: the table and the gain."""
    fedit_val = lr_table[(lr_table.method == REFERENCE) & (lr_table.condition == "iid") & lr_table.chosen]
    gain = float(fedit_val["val_final_accuracy"].iloc[0]) - probe_accuracy
    return pd.DataFrame([{"condition": "iid", "fedit_val_accuracy": gain + probe_accuracy,
                          "probe_val_accuracy": probe_accuracy, "gain": gain, "required": HEADROOM}]), gain


def make_claims(summary: pd.DataFrame, s: LoraFamilySettings, gain: float) -> pd.DataFrame:
    """Each method vs FedIT in each condition, paired by seed; the primaries gated by the headroom."""
    from fedbench.claims import PRIMARY, claims_table, gate, headroom_gate, paired_seed_difference
    ok = summary[summary["applicable"]].set_index(["method", "condition", "seed"])["final_accuracy"]
    results, primary = [], []
    for c in s.conditions:
        for m in s.methods:
            if m == REFERENCE or (m, c) not in {(a, b) for a, b, _ in ok.index}:
                continue
            is_primary = s.primaries.get(m) == c
            seeds = [x for x in (s.primary_seeds if is_primary else s.seeds)
                     if (m, c, x) in ok.index and (REFERENCE, c, x) in ok.index]
            if not seeds:
                continue
            claim = f"{m} beats FedIT ({c})"
            r = paired_seed_difference([ok[(m, c, x)] for x in seeds], [ok[(REFERENCE, c, x)] for x in seeds],
                                       claim=claim, paper=METHODS[m].paper, comparison=f"{m} - FedIT",
                                       detail=f"final accuracy, {len(seeds)} seeds, paired by seed",
                                       role=PRIMARY if is_primary else "exploratory")
            results.append(gate(r, headroom_gate(gain, HEADROOM)) if is_primary else r)
            if is_primary:
                primary.append(claim)
    return claims_table(results, primary=primary)


def parity_table(ref: pd.DataFrame, flw: pd.DataFrame, method: str, condition: str) -> pd.DataFrame:
    """A cell's records on Flower next to the in-process run's (bytes exact, accuracy to 1e-6)."""
    cols = ["round", "bytes_up", "bytes_down", "accuracy", "loss"]
    out = ref[cols].merge(flw[cols], on="round", suffixes=("_inprocess", "_flower"))
    out["same"] = ((out.bytes_up_inprocess == out.bytes_up_flower) & (out.bytes_down_inprocess == out.bytes_down_flower)
                   & (((out.accuracy_inprocess - out.accuracy_flower).abs() <= 1e-6)      # rounds not evaluated:
                      | (out.accuracy_inprocess.isna() & out.accuracy_flower.isna())))   # NaN on both engines
    return out.assign(method=method, condition=condition)


def make_figures(summary: pd.DataFrame, rounds: pd.DataFrame) -> dict:
    """Per condition: final accuracy by method (bars, seed intervals); accuracy vs MB sent (every condition)."""
    from fedbench import plots
    ok = summary[summary["applicable"]]
    figs = {f"accuracy_{c}.png": plots.bars(g, "method", "final_accuracy", ylabel="test accuracy (final round)",
                                            title=f"condition: {c}", order=list(METHODS))
            for c, g in ok.groupby("condition", sort=False)}
    last = rounds.dropna(subset=["accuracy"])
    figs["accuracy_vs_mb.png"] = plots.curves(last, "mb_sent", "accuracy", hue="method", facet="condition",
                                              logx=True, xlabel="MB sent (up + down, cumulative)",
                                              ylabel="test accuracy")
    return figs
