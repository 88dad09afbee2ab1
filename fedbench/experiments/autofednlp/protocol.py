"""AutoFedNLP's protocol table (paper / official code / ours) as data: the paper's and the official code's columns
are reading notes; ours is a template filled, when PROTOCOL.md is written, from the profile's settings and from
what its runs measured (the lr choices, the target, the best fixed configuration, full FT's round time)."""
from __future__ import annotations

import pandas as pd

TITLE = "# AutoFedNLP: protocol (paper / official code / ours)"
OFFICIAL = "official code (`trial_error_w&d.py`)"

# (aspect, paper, official code, ours, why): `ours` and `why` are str.format templates over :func:`facts`
ROWS = (
    ("backbone", "BERT-base (12 layers)", "BERT-base", "{backbone}", "bundled offline, 2 CPU cores"),
    ("data", "AG News, 20News, SEMEVAL, ONTONOTES", "AG News Dirichlet(10) over 1,000 clients; 20News uniform",
     ("{task} ({classes} classes), {clients} clients, {partition}; {train_rows} training rows ({per_client} per "
     "client), {max_length} tokens, {test_rows} test and {validation} validation rows per seed"),
     ("a task where depth pays (fine-tuning beats the frozen probe there; on ng20 with few rows per client no deeper "
     "configuration overtook: the quick profile's comment); the paper's alpha")),
    ("calibration", "deep/wide plateau higher, shallow learns faster (the premise)", "none",
     ("first: every grid configuration on the validation rows (first seed) for {cal_horizon} simulated s (at most "
     "{cal_rounds} rounds); plateau = mean of the last {plateau_rounds} rounds; a deeper configuration overtakes "
     "when its trailing mean stays above the shallower one's and its plateau is ahead by > {margin} and 2 paired "
     "standard errors; here {crossing} (`calibration.csv`, `plateaus.csv`, `crossover.csv`, `calibration.png`)"),
     ("a comparison with fixed configurations means something only where the premise holds; without a crossover "
     "it reads `not testable at this scale`")),
    ("trial groups", "shallow / deep / wide, each a FedAvg job", ("3 jobs, 5 clients per round each, same as a "
     "baseline"), ("3 groups, each round of a group with the loop's whole cohort ({cohort} clients), the same cohort "
     "as every fixed configuration"), ("equal group and baseline cohorts; {cohort} rather than 5 clients to fit the "
     "profile's time budget")),
    ("period", "a time budget", ("`time_threshold * (4 * depth + 1)` s; each group runs `floor(budget / t_round)` "
     "rounds"), ("`time_threshold * ({expand} * depth + 1)`, time_threshold {threshold} s (the official 90 s is for "
     "their per-round times)"), "groups compared at equal simulated time"),
    ("decision", "best accuracy wins, others inherit", "best eval accuracy (ties: shallow, wide, deep)",
     ("on {validation} validation rows carved from the training split: a challenger wins only when ahead of the "
     "current configuration by more than {decision_z} paired standard errors (`decision_z`; 0 = the official plain "
     "max, ties the same order); `decisions.csv` has each decision's gap and se; winner's weights grown into each "
     "layout without changing the function"), "small gaps are noise at these sizes; never the test split"),
    ("clock", "latency per depth + up/download", "`latency_tx2_cached[depth] * batch_num` + `model_size * 2 / bw`",
     ("local steps x step time per depth on the device + exact state bytes down and up; `{device}` ({device_note}) "
     "drives the schedule; `this_cpu` (measured here) listed"), "up and down priced, as officially"),
    ("caching", "frozen bottom layers cached", "cached latency assumed",
     ("clients cache the frozen prefix (ActivationCache, filled once per seed at every depth and shared by the "
     "seed's runs); the one-off fill is not priced (as officially) nor in the measured wall time; {nocache}"), ""),
    ("target", "a target accuracy per task", "fixed per dataset",
     ("{fraction} x the best validation plateau of the calibration (here {target}), one value for every seed, fixed "
     "before any test run; time to target on the test curves"), "independent of the method under test and of test"),
    ("evaluation", "per round", "per period", "every round (test, batched, prefix cached)",
     "time-to-target not quantised"),
    ("baselines", "FedNLP full FT; fixed configurations", "separate scripts",
     ("full FT (lr from a validation grid, first seed); the best fixed configuration on validation (the first whose "
     "calibration curve reaches the target, else the highest plateau; here {best}) on every seed; the grid's other "
     "fixed configurations {grid} {grid_where}"), "never chosen on test"),
    ("horizon", "until the target", "until stopped",
     ("every method the same {horizon} simulated s: each fixed configuration ceil({horizon} s / t_round) rounds (at "
     "most {max_fixed}); the configurator ends on its own clock after the first loop round that reaches {horizon} s "
     "(`horizon_s`; `rounds` only caps it); full FT {full_rounds} round(s) of {full_round_s} s each"),
     "CPU time; a run that misses the target counts with its whole time, a bound"),
    ("learning rates", "not stated", "one per script (`--lr`)",
     ("{adapter_lr}; full FT's from {full_grid} the same way, {full_lr_rounds} round(s); chosen: {full_chosen} "
     "(`lr_selection.csv`)"), "one lr per run as officially, never chosen on test"),
    ("seeds, claims", "not stated", "one",
     ("{seeds} seeds; two primary claims (speed-up over full FT; over the best fixed configuration on validation), "
     "Holm-corrected; every other row exploratory (speed-ups: t interval on log ratios)"),
     "pre-stated primaries on >= 5 seeds"),
)


def _grid(values) -> str:
    return "{" + ", ".join(f"{float(x):g}" for x in values) + "}"


def _chosen(lr_sel: pd.DataFrame, applies_to: str) -> str:
    rows = lr_sel[(lr_sel["applies_to"] == applies_to) & lr_sel["chosen"].astype(bool)]
    return f"{float(rows['lr'].iloc[0]):g}" if len(rows) else "none"


def facts(s, base, lr_selection: pd.DataFrame, calibration: dict, summary: pd.DataFrame) -> dict:
    """The values the template's fields take: the settings' and the outputs' (nothing typed by hand)."""
    from fedbench.data import load_task
    from fedbench.experiments.autofednlp.plan import FULL_FT, label
    from fedbench.strategies.autofednlp import DEVICES
    d = base.data
    cross = calibration["crossover"]
    full = summary[summary["method"] == FULL_FT.name]
    grid_where = ("on every seed" if s.grid_seeds is None else
                  f"on seeds {list(s.grid_seeds)}" if s.grid_seeds else "not on test here (exploratory rows: `full`)")
    adapter_lr = (f"one adapter lr for every adapter run (fixed and configurator), from {_grid(s.adapter_lr_grid)} "
                  f"on the validation split: the starting configuration ({base.peft.depth}, "
                  f"{base.peft.adapter_width}), {s.adapter_lr_rounds} rounds, first seed; chosen: "
                  f"{_chosen(lr_selection, 'every adapter run')} (larger values left out: the profile's comment)"
                  if s.adapter_lr_grid else f"the base's train.lr {base.train.lr:g} for every adapter run (untuned)")
    return {
        "backbone": "all-MiniLM-L6-v2 (6 layers, 22.7M)" if base.model.backbone == "minilm" else f"`{base.model.backbone}`",
        "task": d.task, "classes": len(load_task(d.task)["train"].features["label"].names), "clients": d.num_clients,
        "partition": f"{d.partition} (alpha {d.alpha:g})" if d.partition != "iid" else "iid",
        "train_rows": f"{d.max_train_samples:,}" if d.max_train_samples else "every",
        "per_client": f"{d.max_train_samples // d.num_clients:,}" if d.max_train_samples else "a share",
        "max_length": d.max_length, "test_rows": f"{d.max_test_samples:,}" if d.max_test_samples else "every",
        "validation": f"{s.validation_samples:,}", "cal_horizon": f"{s.calibration_horizon_s:g}",
        "cal_rounds": s.calibration_max_rounds, "plateau_rounds": s.plateau_rounds, "margin": f"{s.crossover_margin:g}",
        "crossing": f"{int(cross['crosses'].sum())} of {len(cross)} pairs cross",
        "cohort": base.cohort_size(), "expand": s.expand, "threshold": f"{s.time_threshold:g}",
        "decision_z": f"{s.decision_z:g}", "device": s.device, "device_note": DEVICES[s.device].note,
        "nocache": (f"the no-cache control runs {s.cache_rounds} rounds on the first seed" if s.cache_rounds else
                    "the no-cache control is off here (`cache_rounds: 0`)"),
        "fraction": f"{s.target_fraction:g}", "target": f"{calibration['target']:.3f}",
        "best": label(calibration["best"]), "grid": ", ".join(f"({a}, {b})" for a, b in s.grid), "grid_where": grid_where,
        "horizon": f"{s.horizon_s:g}", "max_fixed": s.max_fixed_rounds, "full_rounds": s.full_rounds,
        "full_round_s": f"{float(full[f'round_s_{s.device}'].iloc[0]):,.0f}" if len(full) else "?",
        "adapter_lr": adapter_lr, "full_grid": _grid(s.full_lr_grid), "full_lr_rounds": s.full_lr_rounds,
        "full_chosen": _chosen(lr_selection, FULL_FT.applies_to), "seeds": len(s.seeds),
    }


def render(profile: str, values: dict) -> str:
    """PROTOCOL.md: the title and the table, `ours` and `why` filled with `values` (:func:`facts`)."""
    lines = [TITLE, "", f"| aspect | paper | {OFFICIAL} | ours ({profile}) | why |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {p} | {o} | {ours.format(**values)} | {why.format(**values)} |" for a, p, o, ours, why in ROWS]
    return "\n".join(lines) + "\n"
