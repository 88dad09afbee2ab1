"""Every table of one (tuning, seed) unit: the lr search, the loop's round 1 (fine-tunes and one-shot FedAvg),
each merge searched on validation (tuned and 1/T), the heterogeneous settings, pairs and rounds."""
from __future__ import annotations

import itertools
import time

import numpy as np
import pandas as pd

from fedbench import merging
from fedbench.bench import select_lr
from fedbench.experiments.task_arithmetic.plan import (MERGE_FACTS, VARIANTS, Resolved, lr_grid, merge,
                                                       per_task_grid, rho_grid)
from fedbench.experiments.task_arithmetic.unit import Unit, equivalence_rows, rounds_run


def compute_unit(r: Resolved, tuning: str, seed: int, log, lr: float | None = None) -> dict:
    """Every table of one (tuning, seed); `lr` given: fine-tune with it (no search; the first seed's choice)."""
    start = time.perf_counter()
    s = r.settings
    u = Unit(r, tuning, seed, log)
    T, tasks, ids = u.T, list(s.tasks), list(range(u.T))
    rows, val_rows, correct_rows = [], [], []
    nan = float("nan")

    def keep(setting, method, variant, gm, lam, rho, sub=None):
        sub = ids if sub is None else sub
        acc, c = u.accuracies(gm, "test", sub)
        for t in sub:
            rows.append({"setting": setting, "method": method, "variant": variant, "lambda": lam, "rho": rho,
                         "task": tasks[t], "accuracy": acc[t]})
        correct_rows.append({"setting": setting, "method": method, "variant": variant,
                             "bits": "".join(map(str, c.tolist()))})
        return acc

    # the learning rate: one shared lr, the grid point whose fine-tunes have the best mean validation
    # accuracy (bench.select_lr: ties to the smaller lr); its fine-tunes are the unit's (same seed and data:
    # reused exactly). run() searches it in the first seed's unit and gives the choice to the others (`lr`)
    probe_val = u.accuracies(u.g0, "val", ids)[0]
    lr_rows, reuse = [], None
    if lr is not None:
        u.set_lr(lr)
    grid = lr_grid(s, tuning, u.cfg) if lr is None else [float(lr)]
    if len(grid) > 1:
        found = {}

        def score(lr):
            """Every task fine-tuned at `lr`: the mean individual validation accuracy (one lr_search row each)."""
            found[lr] = u.fine_tunes(lrs={t: lr for t in ids})[3]
            for t, x in enumerate(found[lr]):
                lr_rows.append({"lr": lr, "task": tasks[t], "steps": x.num_steps, "train_loss": x.train_loss,
                                "probe_val": probe_val[t],
                                "individual_val": u.accuracies(u.merged_model(u.task_vector(x.state)), "val",
                                                               [t])[0][t]})
            return float(np.mean([row["individual_val"] for row in lr_rows[-len(ids):]]))

        best, _ = select_lr(tuning, grid, score)
        lr_rows = [{**row, "chosen": row["lr"] == best} for row in lr_rows]
        u.set_lr(best)
        reuse = u.reuse_of(found[best])
        log(f"  [{tuning} seed {seed}] lr {best:g} chosen on validation from {grid} "
            f"({time.perf_counter() - start:.0f} s)")
    # the loop's round 1: fine-tunes + one-shot FedAvg (stack semantics for LoRA)
    updates, g_fedavg = u.first_round(reuse=reuse)
    log(f"  [{tuning} seed {seed}] fine-tuned {T} tasks x {u.cfg.train.local_steps} steps on the loop "
        f"({time.perf_counter() - start:.0f} s)")
    tvs = [u.task_vector(x.state) for x in updates]
    steps = [x.num_steps for x in updates]
    fedit_tv = u.fedit_task_vector(updates)
    # probe (theta_0 + frozen heads) and individual models
    probe_test = keep("homogeneous", "probe", "-", u.g0, 0.0, nan)
    ind_test, ind_val = {}, {}
    for t in ids:
        ind_test[t] = u.accuracies(u.merged_model(tvs[t]), "test", [t])[0][t]
        ind_val[t] = u.accuracies(u.merged_model(tvs[t]), "val", [t])[0][t]
        rows.append({"setting": "homogeneous", "method": "individual", "variant": "-", "lambda": 1.0, "rho": nan,
                     "task": tasks[t], "accuracy": ind_test[t]})
    finetune = pd.DataFrame([{"task": tasks[t], "lr": u.cfg.train.lr, "steps": steps[t],
                              "train_loss": updates[t].train_loss,
                              "probe_val": probe_val[t], "individual_val": ind_val[t], "probe_test": probe_test[t],
                              "individual_test": ind_test[t], "gain_test": ind_test[t] - probe_test[t],
                              "tv_norm": merging.norm(tvs[t])} for t in ids])
    # individual models' per-example test correctness (for the probe-vs-individual claim)
    ind_bits = np.concatenate([u.accuracies(u.merged_model(tvs[t]), "test", [t])[1] for t in ids])
    correct_rows.append({"setting": "homogeneous", "method": "individual", "variant": "-",
                         "bits": "".join(map(str, ind_bits.tolist()))})
    keep("homogeneous", "fedavg", "1/T", g_fedavg, 1.0 / T, nan)

    def search(setting, method, tvs_, sub, steps_, ref_val, variants=VARIANTS, merged=None):
        """(w, rho) tuned and rho at w = 1/T, by the authors' criterion on validation (only w = 1/T searched
        when `variants` lacks "tuned"; a single candidate is not evaluated on validation at all). `merged`
        (a dict) receives every candidate's merged task vector by (w, rho), for the caller to reuse."""
        merged = {} if merged is None else merged
        best = {"tuned": (-1.0, None), "1/T": (-1.0, None)}
        ws = per_task_grid(s, len(sub)) if "tuned" in variants else [1.0 / len(sub)]
        rhos = rho_grid(method, s, tvs_)
        if len(ws) * len(rhos) == 1:
            return {v: (ws[0], rhos[0]) for v in variants}
        for rho in rhos:
            for w in ws:
                tv = merged[(w, rho)] = merge(method, tvs_, w, rho, steps_, seed, fedit_tv)
                acc = u.accuracies(u.merged_model(tv), "val", sub)[0]
                score = float(np.mean([acc[t] / max(ref_val[t], 1e-12) for t in sub]))
                for t in sub:
                    val_rows.append({"setting": setting, "method": method, "lambda": w, "rho": rho, "task": tasks[t],
                                     "accuracy": acc[t], "score": score})
                if score > best["tuned"][0]:
                    best["tuned"] = (score, (w, rho))
                if w == 1.0 / len(sub) and score > best["1/T"][0]:
                    best["1/T"] = (score, (w, rho))
        return {v: best[v][1] for v in variants}

    def merges(setting, methods, tvs_, steps_, ref_val, sub=None, variants=VARIANTS):
        sub = ids if sub is None else sub
        for method in methods:
            if not MERGE_FACTS[method].registered and fedit_tv is None:     # FedIT: LoRA factors only
                continue
            merged = {}       # the search's candidates: a full-model merge costs seconds, compute each once
            chosen = search(setting, method, tvs_, sub, steps_, ref_val, variants, merged)
            for variant in variants:
                w, rho = chosen[variant]
                tv = merged.get((w, rho)) or merge(method, tvs_, w, rho, steps_, seed, fedit_tv)
                keep(setting, method, variant, u.merged_model(tv), w, rho, sub)

    merges("homogeneous", s.methods, tvs, steps, ind_val)
    log(f"  [{tuning} seed {seed}] merged homogeneous ({time.perf_counter() - start:.0f} s)")

    # equivalence: task arithmetic at 1/T vs the loop's FedAvg round
    ta = merging.task_arithmetic(tvs, 1.0 / T)
    eq = equivalence_rows(u, ta, g_fedavg, fedit_tv, tasks)

    # training heterogeneity: the same loop, tasks fine-tuned for steps x multiplier (hetero_training) or
    # with lr x multiplier (hetero_lr); normalised by the homogeneous individual models (fixed denominators)
    n0, lr0 = u.cfg.train.local_steps, u.cfg.train.lr
    hetero = []
    if s.hetero_steps:
        hetero.append(("hetero_training", {t: max(1, int(round(n0 * m))) for t, m in enumerate(s.hetero_steps)},
                       None))
    if s.hetero_lrs:
        hetero.append(("hetero_lr", None, {t: lr0 * float(m) for t, m in enumerate(s.hetero_lrs)}))
    for setting, het_steps, het_lrs in hetero:
        h_updates, g_het = u.first_round(het_steps, het_lrs, reuse=u.reuse_of(updates))
        h_tvs = [u.task_vector(x.state) for x in h_updates]
        h_steps = [x.num_steps for x in h_updates]
        h_fedit = u.fedit_task_vector(h_updates)
        for t in ids:
            acc = u.accuracies(u.merged_model(h_tvs[t]), "test", [t])[0][t]
            rows.append({"setting": setting, "method": "individual", "variant": "-", "lambda": 1.0,
                         "rho": nan, "task": tasks[t], "accuracy": acc})
        keep(setting, "fedavg", "1/T", g_het, 1.0 / T, nan)
        saved = fedit_tv
        fedit_tv = h_fedit
        # the authors' criterion against the homogeneous individual models (fixed denominators)
        # a merge that normalises by steps only (FedNova) is task arithmetic with equal steps (hetero_lr): not
        # re-searched there
        merges(setting, [m for m in s.hetero_methods if not (het_steps is None and MERGE_FACTS[m].steps)], h_tvs,
               h_steps, ind_val, variants=[v for v in VARIANTS if v in s.hetero_variants])
        fedit_tv = saved
        log(f"  [{tuning} seed {seed}] {setting}: steps {h_steps}, lr x {list(s.hetero_lrs) if het_lrs else 1} "
            f"({time.perf_counter() - start:.0f} s)")

    # geometry and pairs (data heterogeneity)
    cm = merging.cosine_matrix(tvs)
    cos = pd.DataFrame([{"task_a": tasks[a], "task_b": tasks[b], "cosine": float(cm[a, b])}
                        for a in ids for b in ids])
    pair_rows = []
    if s.pairs:
        for a, b in itertools.combinations(ids, 2):
            name = f"pair:{tasks[a]}+{tasks[b]}"
            w = 0.5
            acc = keep(name, "task_arithmetic", "1/T", u.merged_model(merging.task_arithmetic([tvs[a], tvs[b]], w)),
                       w, nan, [a, b])
            rec = {"task_a": tasks[a], "task_b": tasks[b], "cosine": float(cm[a, b]),
                   "accuracy_1/T": float(np.mean([acc[a], acc[b]])),
                   "normalized_1/T": float(np.mean([_norm(acc[t], probe_test[t], ind_test[t]) for t in (a, b)]))}
            if s.pair_search:
                chosen = search(name, "task_arithmetic", [tvs[a], tvs[b]], [a, b], steps, ind_val)["tuned"]
                acc = keep(name, "task_arithmetic", "tuned",
                           u.merged_model(merging.task_arithmetic([tvs[a], tvs[b]], chosen[0])), chosen[0], nan,
                           [a, b])
                rec.update({"lambda_tuned": chosen[0], "accuracy_tuned": float(np.mean([acc[a], acc[b]])),
                            "normalized_tuned": float(np.mean([_norm(acc[t], probe_test[t], ind_test[t])
                                                               for t in (a, b)]))})
            pair_rows.append(rec)
        log(f"  [{tuning} seed {seed}] {len(pair_rows)} pairs ({time.perf_counter() - start:.0f} s)")

    # rounds: FedAvg over the task-clients for R rounds of steps / R local steps, on the loop
    round_rows = []
    for R in s.rounds:
        if R == 1:
            acc = u.accuracies(g_fedavg, "test", ids)[0]
        else:
            g = rounds_run(u, R)
            acc = keep(f"rounds:{R}", "fedavg", "1/T", g, 1.0 / T, nan)
        for t in ids:
            round_rows.append({"rounds": R, "steps_per_round": u.cfg.train.local_steps // R, "task": tasks[t],
                               "accuracy": acc[t]})
    if len(s.rounds) > 1:
        log(f"  [{tuning} seed {seed}] rounds {list(s.rounds)} ({time.perf_counter() - start:.0f} s)")

    summary = pd.DataFrame(rows)
    summary["normalized_accuracy"] = [
        _norm(a, probe_test[tasks.index(t)], ind_test[tasks.index(t)]) for a, t in zip(summary["accuracy"],
                                                                                        summary["task"])]
    summary["accuracy_ratio"] = [a / ind_test[tasks.index(t)] for a, t in zip(summary["accuracy"], summary["task"])]
    log(f"  [{tuning} seed {seed}] done ({time.perf_counter() - start:.0f} s)")
    return {"accuracy": summary, "validation": pd.DataFrame(val_rows), "equivalence": eq, "cosine": cos,
            "pairs": pd.DataFrame(pair_rows), "rounds": pd.DataFrame(round_rows), "finetune": finetune,
            "lr_search": pd.DataFrame(lr_rows),
            "correct": pd.DataFrame(correct_rows), "summary": {"wall_s": time.perf_counter() - start}}


def _norm(acc: float, probe: float, ind: float) -> float:
    """(merged - probe) / (individual - probe); NaN when individual == probe (nothing to normalise by)."""
    return (acc - probe) / (ind - probe) if ind != probe else float("nan")

