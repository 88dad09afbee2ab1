"""FedPEFT's claims (results/fedpeft/claims.csv) and the headroom check they are gated by.

Every claim is decided on per-seed scores: a run's score is the mean test accuracy of its last
``score_last_k`` evaluated rounds (the profile states k), so one unlucky last round (3 of 10 clients
sampled) does not decide a comparison. Two runs are paired by seed, and the interval is the Student t
interval over seeds (:func:`fedbench.claims.paired_seed_difference` / :func:`fedbench.claims.seed_mean`,
df = S - 1): each seed's score carries its own test-example noise, so the spread over seeds holds both.

The profile names its 1-3 primary claims (``primary``, kinds of :data:`PRIMARY_KINDS`, about
``primary_method`` on the first task); they form one Holm family (:func:`fedbench.claims.claims_table`),
every other row is exploratory. "Within a margin of full FT" is decided only where full FT beats head-only
on validation by the headroom margin (:func:`headroom_table`, from the lr search) and on test by its own
interval (the assay gate).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedbench import claims as C
from fedbench.experiments.fedpeft import plan as F
from fedbench.experiments.fedpeft.analysis import base_mask
from fedbench.experiments.fedpeft.plan import PRIMARY_KINDS, PROBE, REFERENCE

__all__ = ["PRIMARY_KINDS", "headroom_table", "make_claims", "scores"]


def _none(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def scores(summary: pd.DataFrame) -> dict:
    """{Cell: score} from summary rows (NaN alpha / epsilon = None)."""
    out = {}
    for r in summary.itertuples(index=False):
        eps = _none(r.dp_epsilon_target)
        c = F.Cell(r.task, r.method, r.partition, _none(r.alpha), float(r.participation), float(r.dropout),
                   None if eps is None else float(eps), int(r.seed))
        out[c] = float(r.score)
    return out


def headroom_table(lr_table: pd.DataFrame, s: dict) -> pd.DataFrame:
    """Per task with both full FT and head-only searched without DP: each one's best validation accuracy (the
    lr search's, seed of the search) and the gain of full FT over head-only; `passes` when the gain reaches
    fedbench.claims.HEADROOM_MARGIN (a "within margin of full FT" claim is decided only there)."""
    rows = []
    if not len(lr_table):
        return pd.DataFrame(rows)
    nodp = lr_table[lr_table["privacy"] == "none"]
    for task in s["tasks"]:
        best = nodp[nodp["task"] == task].groupby("method")["validation_accuracy"].max()
        if {REFERENCE, PROBE} <= set(best.index):
            gain = float(best[REFERENCE] - best[PROBE])
            rows.append({"task": task, "full_validation": float(best[REFERENCE]), "head_validation": float(best[PROBE]),
                         "gain": gain, "margin": C.HEADROOM_MARGIN, "passes": gain >= C.HEADROOM_MARGIN,
                         "depth": s["depth"], "rounds": s["rounds"], "local_steps": s["local_steps"]})
    return pd.DataFrame(rows)


def make_claims(summary: pd.DataFrame, s: dict, headroom: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each FedPEFT claim, one comparison per row, decided on per-seed scores paired by seed (see the module).
    A claim whose runs are not in this profile is left out; each comparison uses the seeds all its runs ran."""
    tol, k, pm = float(s["near_tolerance"]), int(s["score_last_k"]), s["primary_method"]
    main = s["tasks"][0]
    score = scores(summary)
    scored = f"per-seed score = mean test accuracy of the last {k} evaluated round(s)"
    rows: list = []
    primary: list = []
    gains = {} if headroom is None or not len(headroom) else dict(zip(headroom["task"], headroom["gain"]))

    def vectors(cells_of, seeds):
        """{name: per-seed scores} over the seeds where every named cell ran (None if fewer than one)."""
        keep = [sd for sd in seeds if all(c in score for c in cells_of(sd).values())]
        if not keep:
            return None
        return {n: np.array([score[cells_of(sd)[n]] for sd in keep]) for n in cells_of(keep[0])}

    def cell(task, method, seed, **change):
        return F.base_cell(s, task, method, seed, **change)

    def add(result, kind=None):
        if kind is not None and kind in s["primary"]:
            primary.append(result.claim)
        rows.append(result)

    # 1. each PEFT method within `tol` of full FT (non-inferiority), decided only where full FT is a reference
    for task in s["tasks"]:
        seeds = s["seeds"] if task == main else s["task_seeds"]
        methods = s["methods"] if task == main else s["task_methods"]
        gate = C.headroom_gate(gains[task]) if task in gains else ""
        v = vectors(lambda sd: {"full": cell(task, REFERENCE, sd), "head": cell(task, PROBE, sd)}, seeds)
        if v is not None:
            reference = C.paired_seed_difference(
                v["full"], v["head"], f"[{task}] {F.variant(REFERENCE, s['depth'])} beats head-only (the reference is "
                "trained)", "full fine-tuning is the upper reference", comparison="full - head", detail=scored)
            rows.append(reference)
            gate = gate or C.assay_gate(reference, "head-only")
        for m in [m for m in methods if m != REFERENCE]:
            v = vectors(lambda sd: {"m": cell(task, m, sd), "full": cell(task, REFERENCE, sd)}, seeds)
            if v is None:
                continue
            add(C.gate(C.paired_seed_difference(
                v["m"], v["full"], f"[{task}] {F.variant(m, s['depth'])} is within {tol:.2f} of full fine-tuning",
                "PEFT reaches accuracy close to (or above) full FT at a small fraction of the bytes",
                threshold=-tol, comparison=f"{m} - full", detail=scored), gate),
                "near_full" if task == main and m == pm else None)
    # 2. LoRA's bytes per round: an exact count
    by = summary[base_mask(summary, s) & (summary["task"] == main)].groupby("method")["bytes_up_per_round"].first()
    if {REFERENCE, "lora"} <= set(by.index):
        rows.append(C.exact(100 * by["lora"] / by[REFERENCE],
                            f"{F.variant('lora', s['depth'])} sends < 2% of full fine-tuning's bytes per round",
                            "LoRA/adapters/prompts send < 1% of the model per round", direction=-1, threshold=2.0,
                            comparison="100 * bytes(lora) / bytes(full)", what="exact byte count"))
    _dp_claims(s, cell, vectors, add, scored)
    _axis_claims(s, cell, vectors, add, scored)
    return C.claims_table(rows, primary=primary)


def _dp_claims(s, cell, vectors, add, scored):
    """Per method: what clipping alone costs (no DP - clip only), what the noise adds (clip only - eps);
    per PEFT method: its drop against full FT's, from each one's own clip-only run (the noise's cost: clipping
    is part of the private recipe) and, beside it, from no DP."""
    main, pm = s["tasks"][0], s["primary_method"]
    clip_seeds = {m: F.dp_seeds_for(s, m, math.inf) for m in F.METHODS}
    for m in [m for m in F.METHODS if m in s["dp_methods"]]:
        v = vectors(lambda sd: {"no": cell(main, m, sd), "clip": cell(main, m, sd, dp_epsilon=math.inf)},
                    clip_seeds[m])
        if v is not None:
            add(C.paired_seed_difference(v["no"], v["clip"], f"[{m}] per-sample clipping alone (noise 0) costs "
                                         "accuracy", "(control, not in the paper)",
                                         comparison=f"{m}: no DP - clip only", detail=scored))
        for eps in s["dp_epsilons"]:
            seeds = F.dp_seeds_for(s, m, float(eps))
            v = vectors(lambda sd: {"clip": cell(main, m, sd, dp_epsilon=math.inf),
                                    "dp": cell(main, m, sd, dp_epsilon=float(eps))}, seeds)
            if v is None:
                continue
            add(C.paired_seed_difference(v["clip"], v["dp"], f"[{m}] DP noise at eps={eps:g} costs accuracy beyond "
                                         "clip only", "DP-SGD costs accuracy, more at smaller epsilon",
                                         comparison=f"{m}: clip only - eps={eps:g}", detail=scored))
    for i, eps in enumerate(s["dp_epsilons"]):
        for m in [m for m in s["dp_methods"] if m != REFERENCE]:
            seeds = [sd for sd in F.dp_seeds_for(s, m, float(eps)) if sd in F.dp_seeds_for(s, REFERENCE, float(eps))]
            for ref, ref_eps, what in (("clip only", math.inf, "to DP noise (each method's drop from its own "
                                        "clip-only run)"), ("no DP", None, "under DP-SGD (drop from no DP)")):
                v = vectors(lambda sd: {"f_ref": cell(main, REFERENCE, sd, dp_epsilon=ref_eps),
                                        "f_dp": cell(main, REFERENCE, sd, dp_epsilon=float(eps)),
                                        "m_ref": cell(main, m, sd, dp_epsilon=ref_eps),
                                        "m_dp": cell(main, m, sd, dp_epsilon=float(eps))}, seeds)
                if v is None:
                    continue
                add(C.seed_mean((v["f_ref"] - v["f_dp"]) - (v["m_ref"] - v["m_dp"]),
                                f"[eps={eps:g}] {m} loses less accuracy than full FT {what}",
                                "under DP the gap to full FT narrows or reverses: noise grows with the trained "
                                "dimension", comparison=f"drop(full) - drop({m}), drops from {ref}", detail=scored),
                    "dp_noise" if i == 0 and m == pm and ref_eps is not None else None)


def _axis_claims(s, cell, vectors, add, scored):
    """Stability: PEFT's gap to full FT does not fall by more than `tol` when clients are sampled / drop out.
    Heterogeneity: strong label skew costs accuracy (per method, from IID where it is a level), and PEFT's drop
    under it is no larger than full FT's (within `tol`), each drop from the base condition (the first level)."""
    main, tol, seeds, pm = s["tasks"][0], float(s["near_tolerance"]), s["axis_seeds"], s["primary_method"]
    peft = [m for m in s["axis_methods"] if m != REFERENCE]
    for p, d in s["stability"][1:]:
        for m in peft:
            v = vectors(lambda sd: {"f_b": cell(main, REFERENCE, sd), "m_b": cell(main, m, sd),
                                    "f_l": cell(main, REFERENCE, sd, participation=p, dropout=d),
                                    "m_l": cell(main, m, sd, participation=p, dropout=d)}, seeds)
            if v is None:
                continue
            add(C.seed_mean((v["m_l"] - v["f_l"]) - (v["m_b"] - v["f_b"]),
                            f"[{F.stability_label(p, d)}] {m} keeps its standing relative to full FT (gap change > "
                            f"-{tol:.2f})", "PEFT stays competitive under partial participation and dropout",
                            threshold=-tol, comparison=f"({m} - full) at this level - at the base level",
                            detail=scored))
    skewed = [(pa, al) for pa, al in s["heterogeneity"] if pa == "dirichlet"]
    if not skewed:
        return
    pa, al = min(skewed, key=lambda x: x[1])
    at_skew = {"partition": pa, "alpha": al}

    def name(level):
        return "IID" if level[0] == "iid" else f"Dir({level[1]:g})"
    # the skew's cost per method: from IID where it is a level (else from the base condition)
    low = ("iid", None) if ("iid", None) in s["heterogeneity"] else s["heterogeneity"][0]
    for m in s["axis_methods"] if low != (pa, al) else []:
        v = vectors(lambda sd: {"ref": cell(main, m, sd, partition=low[0], alpha=low[1]),
                                "skew": cell(main, m, sd, **at_skew)}, seeds)
        if v is not None:
            add(C.paired_seed_difference(v["ref"], v["skew"], f"[{m}] strong label skew (Dir({al:g})) lowers "
                                         f"accuracy vs {name(low)}", "accuracy falls as Dirichlet alpha shrinks, "
                                         "for full FT and PEFT alike", comparison=f"{m}: {name(low)} - Dir({al:g})",
                                         detail=scored))
    # PEFT's drop against full FT's: from the base condition, the same reference in every profile
    ref = s["heterogeneity"][0]
    if ref == (pa, al):
        return
    ref_name = name(ref)
    at_ref = {"partition": ref[0], "alpha": ref[1]}
    for m in peft:
        v = vectors(lambda sd: {"f_ref": cell(main, REFERENCE, sd, **at_ref),
                                "f_skew": cell(main, REFERENCE, sd, **at_skew),
                                "m_ref": cell(main, m, sd, **at_ref), "m_skew": cell(main, m, sd, **at_skew)}, seeds)
        if v is None:
            continue
        add(C.seed_mean((v["f_ref"] - v["f_skew"]) - (v["m_ref"] - v["m_skew"]),
                        f"[Dir({al:g})] {m}'s drop from {ref_name} is no larger than full FT's (within {tol:.2f})",
                        "PEFT is at least as robust to label skew as full FT", threshold=-tol,
                        comparison=f"drop(full) - drop({m}), drops from {ref_name}", detail=scored),
            "skew_drop" if m == pm else None)
