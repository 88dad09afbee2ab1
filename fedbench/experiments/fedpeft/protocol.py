"""FedPEFT's protocol table: paper / official code / ours (quick) / ours (full) / why, one row per protocol choice.

The paper and official-code columns are reading notes; the two "ours" columns are read from the quick and full
profiles; every measured number in the "why" column (the headroom that set the depth, the largest fall of a run's
accuracy in its last evaluation) is filled from this run's outputs when PROTOCOL.md is written, never typed here.
"""
from __future__ import annotations

import pandas as pd

from fedbench.experiments.fedpeft.plan import METHODS, settings_for, takes_depth
from fedbench.experiments.fedpeft.plan import heterogeneity_label, stability_label

NO_CODE = "no official code found (we located no public repository of the paper)"
COLUMNS = ["aspect", "paper", "official code", "ours (quick)", "ours (full)", "why"]


def _methods(x):
    return f"{len(x['methods'])} methods ({', '.join(x['methods'])})"


def _run_shape(x):
    b = x["base"]
    return (f"{b.data.num_clients} clients, {b.fl.rounds} rounds x {b.train.local_steps} local steps of "
            f"{b.train.batch_size}, same for every method")


def _layers(x):
    whole = " / ".join(m for m in METHODS if not takes_depth(m))
    return ("every layer" if x["depth"] is None else
            f"top {x['depth']} layer(s) + head for every method but {whole} ('full' = full FT of them)")


def _dp(x):
    return (f"DP-Adam (Opacus: Poisson sampling, per-sample clip {x['dp_max_grad_norm']:g}, Gaussian noise), "
            f"eps {', '.join(f'{e:g}' for e in x['dp_epsilons'])} + clipping only, delta {x['dp_delta']:g}, "
            f"{len(x['dp_methods'])} methods x {len(x['dp_seeds'])} seed(s)"
            + (f" ({', '.join(x['dp_first_seed_methods'])}: 1 seed)" if x["dp_first_seed_methods"] else "")
            + (f"; clip only: {', '.join(x['clip_methods'])} x {len(x['clip_seeds'])} seed(s)"
               if x["clip_only"] else ""))


def _axes(x):
    het = ", ".join(heterogeneity_label(*h) for h in x["heterogeneity"])
    st = "; ".join(stability_label(*p) for p in x["stability"])
    return f"{het} | {st}: {', '.join(x['axis_methods'])} x {len(x['axis_seeds'])} seed(s)"


def _stats(x):
    return (f"headline {len(x['seeds'])} seeds x {x['base'].data.max_test_samples} test examples; claims by "
            f"fedbench.claims on per-seed scores (t over seeds, df = seeds - 1)")


def _lrs(x):
    return (f"grid per method and privacy level on {x['validation_samples']} held-out training examples "
            f"(seed {x['seeds'][0]}, base condition), reused for every seed and axis")


def _scoring(x):
    b = x["base"]
    return (f"a run's score = mean test accuracy of its last {x['score_last_k']} evaluated rounds (evaluated "
            f"every {b.fl.eval_every} of {b.fl.rounds}); primary: {', '.join(x['primary'])} about "
            f"{x['primary_method']} on {x['tasks'][0]}, {len(x['seeds'])} seeds, Holm")


# aspect, paper, the "ours" column (from a profile's settings), why (a template of the measured values)
ROWS = [
    ("backbone", "ViT-B: ~328 MB per round for full FT vs ~0.68 MB for PEFT", lambda x: "all-MiniLM-L6-v2 (22.7M)",
     "bundled offline; 2 CPU cores. Text, not images"),
    ("data", "CIFAR-100 and the other image sets the paper reports",
     lambda x: f"{', '.join(x['tasks'])}; {x['base'].data.max_train_samples} train examples",
     "offline text tasks (no image backbone ships offline); {main} first (the primary task): the one where full FT "
     "beats head-only by >= {margin:g} on validation (headroom.csv; the others are exploratory)"),
    ("methods", "full, head, bias, adapter, prompt, LoRA", _methods,
     "quick: full FT, head-only and LoRA (the primaries' arms); IA3, BitFit, adapters and prompt tuning moved to "
     "quick-complete (prompt tokens enter at the input: no cached prefix, every layer runs at every step)"),
    ("trained layers", "every layer", _layers,
     "quick: top {depth} layers, for full FT's room over head-only on validation ({headroom}); the frozen "
     "prefix is computed once per task and seed and shared by all runs"),
    ("federation", "the paper's FedAvg setting", _run_shape, "equal client updates per method"),
    ("learning rates", "not documented", _lrs, "chosen on validation only; test is never read for it; a choice at "
     "a grid edge adds up to {lr_extend} grid step(s) beyond it (bench.select_lr)"),
    ("privacy", "DP-SGD on every client", _dp,
     "one optimizer at every level, re-tuned under DP; the comparative claim measures each method's drop from "
     "its own clip-only run (the noise's cost), beside the drop from no DP"),
    ("axes", "IID vs Dirichlet; sampling; dropout", _axes,
     "quick: full FT and the primary method on the primary seeds; the rest moved to quick-complete"),
    ("scoring, claims", "final accuracy", _scoring,
     "a mean over the last evaluations, not one round ({fall})"),
    ("statistics", "not stated in our notes", _stats,
     ">= 5 seeds on the primaries, >= 1000 test examples; every other row exploratory"),
]


def measured(headroom: pd.DataFrame | None, metrics: pd.DataFrame | None) -> dict:
    """The numbers the "why" column quotes, from this run's outputs (headroom.csv, metrics.csv)."""
    if headroom is not None and len(headroom):
        gains = ", ".join(f"{r.task} {r.gain:+.3f} at top {r.depth} layers" for r in headroom.itertuples())
        headroom_text = f"this run's headroom.csv, full FT - head-only: {gains}"
    else:
        headroom_text = "headroom.csv: not measured by this run"
    fall = "no run evaluated twice in this run"
    if metrics is not None and len(metrics):
        acc = metrics[metrics["metric"] == "accuracy"].dropna(subset=["value"])
        by_run = acc.groupby([c for c in acc.columns if c not in ("round", "metric", "value")], dropna=False)
        falls = by_run["value"].apply(lambda v: float(v.iloc[-2] - v.iloc[-1]) if len(v) > 1 else float("nan"))
        if falls.notna().any():
            fall = f"in this run, a run's accuracy fell by up to {falls.max():.3f} in its last evaluation"
    return {"headroom": headroom_text, "fall": fall}


def protocol_table(headroom: pd.DataFrame | None = None, metrics: pd.DataFrame | None = None) -> pd.DataFrame:
    """The protocol rows, read from the quick and full profiles, the why column filled from this run's outputs."""
    from fedbench.claims import HEADROOM_MARGIN
    q, f = settings_for("quick"), settings_for("full")
    values = {"main": q["tasks"][0], "margin": HEADROOM_MARGIN, "depth": q["depth"], "lr_extend": q["lr_extend"],
              **measured(headroom, metrics)}
    rows = [(aspect, paper, NO_CODE, ours(q), ours(f), why.format(**values)) for aspect, paper, ours, why in ROWS]
    return pd.DataFrame(rows, columns=COLUMNS)


def protocol_markdown(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    body = "".join("| " + " | ".join(str(v).replace("|", "/") for v in row) + " |\n" for row in table.values)
    return ("# FedPEFT protocol: paper / official code / ours (generated by fedbench.experiments.fedpeft."
            "protocol_table)\n\n" + head + body)
