"""AutoFedNLP's calibration: does a deeper configuration overtake a shallower one, and when?

The paper's premise is a crossover: shallow/narrow configurations learn fast per simulated second but plateau lower,
deep/wide ones are slower per round but end higher. A comparison of the configurator with fixed configurations
means something only where that holds, so before any test run every fixed configuration of the grid trains on the
first seed for ``calibration_horizon_s`` simulated seconds (at most ``calibration_max_rounds`` rounds), scored every
round on the validation rows carved from the training split (never the test split). From those curves, fixed
before the configurator is looked at:

- each configuration's plateau: the mean validation accuracy of its last ``plateau_rounds`` rounds, and whether it
  has plateaued (that mean within ``plateau_tol`` of the mean of the ``plateau_rounds`` rounds before);
- for each pair (shallower, deeper): the plateau gap, its paired standard error (final rounds, same validation
  rows) and the crossover time, the first simulated second from which the deeper curve (trailing mean over
  ``plateau_rounds`` rounds) stays above the shallower one's (held at its plateau after its run ends). A pair
  *crosses* when that time exists and the gap exceeds both ``crossover_margin`` and two standard errors;
- the target accuracy, ``target_fraction`` x the best plateau, and the best fixed configuration on validation: the
  first to reach the target on its validation curve (none reaches it: the highest plateau).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

CURVE_COLUMNS = ["method", "depth", "width", "round", "sim_s", "val_accuracy"]


def smooth(values, k: int) -> np.ndarray:
    """Trailing mean over the last `k` values (fewer at the start)."""
    return pd.Series(np.asarray(values, float)).rolling(int(k), min_periods=1).mean().to_numpy()


def plateaus(curves: pd.DataFrame, k: int, tol: float) -> pd.DataFrame:
    """One row per configuration of `curves` (CURVE_COLUMNS): rounds, simulated seconds trained, plateau (mean of
    the last `k` rounds), previous (mean of the `k` rounds before; NaN with fewer than 2k rounds), plateaued."""
    rows = []
    for m, g in curves.groupby("method", sort=False):
        acc = g.sort_values("round")["val_accuracy"].to_numpy()
        plateau = float(acc[-k:].mean())
        prev = float(acc[-2 * k:-k].mean()) if len(acc) >= 2 * k else float("nan")
        rows.append({"method": m, "depth": int(g["depth"].iloc[0]), "width": int(g["width"].iloc[0]),
                     "rounds": len(acc), "sim_s": float(g["sim_s"].max()), "plateau": plateau,
                     "previous": prev, "plateaued": bool(np.isfinite(prev) and abs(plateau - prev) <= tol),
                     "best": float(acc.max())})
    return pd.DataFrame(rows)


def crossover_time(shallow: pd.DataFrame, deep: pd.DataFrame, k: int) -> float:
    """First simulated second of `deep`'s curve from which its trailing-k mean stays above `shallow`'s trailing-k
    mean at the same simulated time (the last value at or before it; after the shallower run's end its plateau,
    the mean of its last k rounds). NaN when the deeper curve is not above at its end."""
    s = shallow.sort_values("sim_s")
    d = deep.sort_values("sim_s")
    s_t, s_acc = s["sim_s"].to_numpy(), smooth(s["val_accuracy"], k)     # its last value: the plateau
    d_t, d_acc = d["sim_s"].to_numpy(), smooth(d["val_accuracy"], k)
    pos = np.searchsorted(s_t, d_t, side="right") - 1
    other = np.where(pos >= 0, s_acc[np.clip(pos, 0, None)], -np.inf)
    ahead = d_acc > other + 1e-12
    if not ahead[-1]:
        return float("nan")
    behind = np.flatnonzero(~ahead)
    return float(d_t[behind[-1] + 1] if len(behind) else d_t[0])


def paired_gap_se(correct_a, correct_b) -> float:
    """Standard error of the difference of two accuracies on the same rows (the sd of the row differences)."""
    from fedbench.strategies.autofednlp import paired_se
    return paired_se(correct_a, correct_b)


def crossovers(curves: pd.DataFrame, plat: pd.DataFrame, correct: dict, k: int, margin: float) -> pd.DataFrame:
    """One row per (shallower, deeper) pair of the grid's configurations (deeper: more layers, or as many and
    wider): plateaus, gap, its paired standard error (`correct`: method -> per-row 0/1 of its final round on the
    validation rows), crossover time and whether the pair crosses (module docstring)."""
    p = plat.set_index("method")
    order = sorted(p.index, key=lambda m: (p.loc[m, "depth"], p.loc[m, "width"]))
    rows = []
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            gap = float(p.loc[b, "plateau"] - p.loc[a, "plateau"])
            se = paired_gap_se(correct[b], correct[a]) if a in correct and b in correct else float("nan")
            t = crossover_time(curves[curves["method"] == a], curves[curves["method"] == b], k)
            rows.append({"shallower": a, "deeper": b, "plateau_shallower": float(p.loc[a, "plateau"]),
                         "plateau_deeper": float(p.loc[b, "plateau"]), "gap": gap, "gap_se": se,
                         "crossover_sim_s": t, "crosses": bool(np.isfinite(t) and gap > margin
                                                                and (not np.isfinite(se) or gap > 2 * se))})
    return pd.DataFrame(rows)


def time_to(curve: pd.DataFrame, target: float) -> float:
    """Simulated seconds at the first round whose validation accuracy reaches `target` (NaN if none)."""
    c = curve.sort_values("sim_s")
    hit = c[c["val_accuracy"] >= target - 1e-12]
    return float(hit["sim_s"].iloc[0]) if len(hit) else float("nan")


def choose(curves: pd.DataFrame, plat: pd.DataFrame, fraction: float) -> tuple[float, str, pd.DataFrame]:
    """(target accuracy = fraction x the best plateau, the best fixed configuration on validation: the first to
    reach the target, else the highest plateau, `plat` with each configuration's time to the target)."""
    target = float(fraction * plat["plateau"].max())
    plat = plat.assign(time_to_target_sim_s=[time_to(curves[curves["method"] == m], target) for m in plat["method"]])
    ranked = plat.assign(_t=plat["time_to_target_sim_s"].fillna(np.inf)).sort_values(
        ["_t", "plateau"], ascending=[True, False], kind="stable")
    return target, str(ranked["method"].iloc[0]), plat


def verdict_text(cross: pd.DataFrame) -> str:
    """'' when some pair crosses (the fixed-configuration comparison is testable), else the gate's words."""
    if cross["crosses"].any():
        return ""
    if len(cross) == 0:
        return "not testable at this scale: one configuration in the grid, nothing to overtake"
    best = cross.sort_values("gap", ascending=False).iloc[0]
    se = f" (paired se {best['gap_se']:.3f})" if np.isfinite(best.get("gap_se", np.nan)) else ""
    return ("not testable at this scale: no deeper configuration overtakes a shallower one on validation by more "
            f"than the crossover margin and 2 paired standard errors (largest plateau gap {best['gap']:+.3f}{se}, "
            f"{best['deeper']} over {best['shallower']}; calibration.csv, crossover.csv)")


def curves_of(results: dict, clock: dict) -> tuple[pd.DataFrame, dict]:
    """(CURVE_COLUMNS frame, method -> final round's per-row 0/1) of the calibration runs `results`
    ((d, w) -> RunResult evaluated on the validation rows); `clock`: method -> simulated seconds per round."""
    from fedbench.experiments.autofednlp.plan import fixed_name
    frames, correct = [], {}
    for (d, w), r in results.items():
        m = fixed_name(d, w)
        t = r.rounds
        frames.append(pd.DataFrame({"method": m, "depth": d, "width": w, "round": t["round"].to_numpy(),
                                    "sim_s": t["round"].to_numpy() * clock[m],
                                    "val_accuracy": t["accuracy"].to_numpy()}))
        if r.predictions:
            p = r.predictions
            correct[m] = (np.asarray(p["prediction"]) == np.asarray(p["label"])).astype(float)
    return pd.concat(frames, ignore_index=True)[CURVE_COLUMNS], correct


def figure(curves: pd.DataFrame, target: float, device: str, fraction: float):
    from fedbench import plots
    from fedbench.experiments.autofednlp.plan import label
    df = curves.assign(method=curves["method"].map(label))
    return plots.curves(df, x="sim_s", y="val_accuracy", hue="method", seed=None, logx=True,
                        hlines={f"target ({fraction:g} x best plateau)": target},
                        xlabel=f"simulated seconds on {device} (log scale)", ylabel="validation accuracy",
                        title="calibration: fixed configurations to their plateau (first seed, validation)")
