"""The federated-LoRA family under one set of conditions (issue 33).

Methods (``settings.methods``, each a config change of the profile's base, :data:`METHODS`): FedIT (factor
averaging), FLoRA (stacking), FFA-LoRA, FedSA-LoRA, FedEx-LoRA, FlexLoRA, HetLoRA, RoLoRA, FedSVD, and in the
heterogeneous-rank condition the naive baselines (FedIT zero-padded, which is FedIT there; FedIT truncated to
the smallest rank). LoRM's merge is the continual setting's (notebook 04) and does not apply to one task.
Conditions (``settings.conditions``, :data:`CONDITIONS`): IID, Dirichlet(0.1), DP-SGD at epsilon 8, 30% dropout,
heterogeneous ranks (``settings.ranks`` by a seeded rule), a robust rule (median) under 10% sign-flip attackers.
A (method, condition) pair a method cannot run (its config check refuses it) is a not-applicable row, with why.

Protocol: the lr of every (method, condition) is chosen on a validation carve of the training split
(``data.federation_options.validation``) over ``settings.lr_grid``, with the first seed; test runs use it.
Primary claims (``settings.primaries``: each method vs FedIT in the setting its paper states) run on
``settings.primary_seeds`` (>= 5 for a primary verdict); every other pair is exploratory on ``settings.seeds``.
Claims are paired by seed (final accuracy, method - FedIT); FedSA-LoRA's accuracy is personalised (each client
with its own B, mean over clients), the others' the global model's. The frozen probe (logistic regression on
the frozen encoder's features, the same validation carve) gates the primaries: fine-tuning must beat it on
validation by >= 5 points (``headroom.csv``). One cell (``settings.flower_cell``) also runs on Flower and its
records are compared with the in-process run (``flower_parity.csv``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedbench.bench.report import write_report
from fedbench.config import ConfigError, ExperimentConfig
from fedbench.bench import (Settings, check_list, check_seeds, check_subset, is_number, output_dir,
                                         resolve_profile, runs_root, save_figure, save_table, select_lr)

EXPERIMENT = "lora_family"
# method -> (config changes, whether it takes rank tiers); FedIT under rank tiers is its zero-padded version
METHODS = {
    "fedit": ({"fl.strategy": "fedavg"}, False),
    "flora": ({"fl.strategy": "fedavg", "fl.lora_aggregation": "stack"}, False),
    "ffa_lora": ({"fl.strategy": "ffa_lora"}, False),
    "fedsa": ({"fl.strategy": "fedsa"}, True),
    "fedex_lora": ({"fl.strategy": "fedex_lora"}, True),
    "flexlora": ({"fl.strategy": "flexlora"}, True),
    "hetlora": ({"fl.strategy": "hetlora"}, True),
    "rolora": ({"fl.strategy": "rolora"}, True),
    "fedsvd": ({"fl.strategy": "fedsvd"}, True),
    "fedit_truncate": ({"fl.strategy": "fedit_truncate"}, True),
}
CONDITIONS = {
    "iid": {"data.partition": "iid"},
    "dirichlet": {"data.partition": "dirichlet", "data.alpha": 0.1},
    "dp": {"train.dp": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}},
    "dropout": {"fl.dropout": 0.3},
    "hetero": {},                    # settings.ranks, set per method below
    "robust": {"fl.aggregator": "median", "fl.attack": "sign_flip", "fl.attack_fraction": 0.1},
}
# each method vs FedIT in the setting its paper makes its case in
PRIMARIES = {"fedsa": "dirichlet", "fedex_lora": "iid", "flexlora": "hetero", "hetlora": "hetero",
             "rolora": "iid", "fedsvd": "dp"}
PAPERS = {"fedsa": "FedSA-LoRA (arXiv 2410.01463): sharing only A beats FedIT under non-IID data",
          "fedex_lora": "FedEx-LoRA (arXiv 2410.09432): the exact aggregate beats FedIT's inexact one",
          "flexlora": "FlexLoRA (arXiv 2402.11505): SVD redistribution beats zero-padding for mixed ranks",
          "hetlora": "HetLoRA (arXiv 2401.06432): pruning + sparsity weighting beat zero-padded FedIT",
          "rolora": "RoLoRA (arXiv 2502.01755): alternating A/B beats FedIT",
          "fedsvd": "FedSVD (arXiv 2505.12805): B-only training with SVD re-factorisation beats FedIT under DP",
          "flora": "FLoRA: exact aggregation by stacking", "ffa_lora": "FFA-LoRA: A frozen, B averaged exactly",
          "fedit_truncate": "naive baseline: every client at the smallest rank"}
HEADROOM = 0.05
# one row per method: paper / reference code / ours (results/lora_family/PROTOCOL.md; where the two disagree, the paper)
PROTOCOL = """| method | paper | reference code | ours |
|---|---|---|---|
| FedSA-LoRA | A averaged, B local (2410.01463) | Pengxin-Guo/FedSA-LoRA; FedLLM-Factory `alg/fedsalora.py`: only lora_A uploaded | `fedsa`: A + head averaged (zero-padded across tiers), B in the client store at its rank; personalised evaluation |
| FedEx-LoRA | residual mean(B_i A_i) - mean(B) mean(A) added to W0, with the LoRA scaling (2410.09432) | FedLLM-Factory `alg/fedexlora.py`: weighted product mean minus *unweighted* factor means, no scaling | `fedex_lora`: paper: both means sample-weighted, times the scaling; the dense residual counted down each round |
| FlexLoRA | weighted mean of full products, SVD, truncation to each client's rank (2402.11505) | none read (not in FedLLM-Factory) | `flexlora`: the rule over dense products, SVD (B = U S, A = V^T), per-client truncation |
| HetLoRA | truncation; self-pruning with lambda on the rank tail; sparsity (||B_k A_k||_F) weighted zero-padded mean (2401.06432) | none public | `hetlora`: as the paper describes (reg, gamma options); refuses DP (a loss term) |
| RoLoRA | alternate B / A (2502.01755; within a round) | FedLLM-Factory `alg/rolora.py`: one factor per round, B on odd rounds | `rolora`: one factor per round, B first (the issue's across-rounds schedule, shared with LoRM) |
| FedSVD | B trained, B A re-factorised by SVD: A = V_r^T, B = U_r S_r (2505.12805) | seanie12/fed-svd (periodic re-init); FedLLM-Factory `alg/fedsvd.py` takes rows of V, not of V^T | `fedsvd`: the paper's V_r^T, every `period` rounds |
| rank tiers | - | - | `fl.options.ranks` (seeded balanced tiers); clients train zero-padded at their rank, bytes counted at it; scaling alpha / peft.rank for all |
"""


@dataclass
class LoraFamilySettings(Settings):
    methods: tuple[str, ...] = tuple(METHODS)
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    primaries: dict | None = None                 # method -> condition (None: PRIMARIES within the grid)
    seeds: tuple[int, ...] = (0,)                  # the exploratory pairs
    primary_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ranks: tuple[int, ...] = (2, 4, 8)            # the heterogeneous condition's tiers (max = peft.rank)
    lr_grid: tuple[float, ...] = (0.002, 0.005)
    validation_samples: int = 200
    flower_cell: tuple | None = None              # (method, condition) also run on Flower; None: none
    explore: bool = True                          # also every other (method, condition) pair, exploratory

    def validate(self) -> None:
        self.methods = check_subset("methods", self.methods, tuple(METHODS))
        self.conditions = check_subset("conditions", self.conditions, tuple(CONDITIONS))
        if "fedit" not in self.methods:
            raise ConfigError("methods", list(self.methods), "a list including 'fedit' (every claim compares with it)")
        if "iid" not in self.conditions:
            raise ConfigError("conditions", list(self.conditions), "a list including 'iid' (the headroom's)")
        self.seeds, self.primary_seeds = check_seeds("seeds", self.seeds), check_seeds("primary_seeds",
                                                                                       self.primary_seeds)
        prim = PRIMARIES if self.primaries is None else dict(self.primaries)
        for m, c in prim.items():
            if self.primaries is not None and (m not in METHODS or m == "fedit" or c not in CONDITIONS):
                raise ConfigError(f"primaries.{m}", c, f"a method of {list(METHODS)[1:]} -> a condition of "
                                                       f"{list(CONDITIONS)}")
        self.primaries = {m: c for m, c in prim.items() if m in self.methods and c in self.conditions}
        check_list("ranks", self.ranks, lambda r: isinstance(r, int) and r >= 1, "a non-empty list of ranks >= 1")
        check_list("lr_grid", self.lr_grid, lambda x: is_number(x) and x > 0, "a non-empty list of lrs > 0")
        if not (isinstance(self.validation_samples, int) and self.validation_samples >= 2):
            raise ConfigError("validation_samples", self.validation_samples, "an integer >= 2")
        if self.flower_cell is not None and not (len(self.flower_cell) == 2 and self.flower_cell[0] in self.methods
                                                 and self.flower_cell[1] in self.conditions):
            raise ConfigError("flower_cell", self.flower_cell, "null or [method, condition] from the grid")
        if not isinstance(self.explore, bool):
            raise ConfigError("explore", self.explore, "true or false")


def settings_for(profile: str = "quick", path=None, **overrides):
    p = resolve_profile(EXPERIMENT, profile, overrides, LoraFamilySettings, path=path)
    if max(p.settings.ranks) > p.base.peft.rank:
        raise ConfigError("ranks", list(p.settings.ranks), f"ranks <= peft.rank={p.base.peft.rank} (the global rank)")
    return p


# -- configs ---------------------------------------------------------------------------------------------

def run_config(base: ExperimentConfig, s: LoraFamilySettings, method: str, condition: str, seed: int,
               lr: float | None = None, validation: bool = False) -> ExperimentConfig:
    """The run of `method` under `condition` (ConfigError if the method cannot run there)."""
    changes, tiers = METHODS[method]
    changes = {**changes, **CONDITIONS[condition], "seed": int(seed)}
    if condition == "hetero":
        if not tiers and method != "fedit":
            raise ConfigError("fl.strategy", changes["fl.strategy"], "a method that takes rank tiers")
        if method == "fedit":
            changes["fl.strategy"] = "fedit_zero_pad"
        changes["fl.options"] = {"ranks": list(s.ranks)}
    elif method == "fedit_truncate":
        raise ConfigError("fl.strategy", "fedit_truncate", "a heterogeneous-rank condition (it is FedIT otherwise)")
    if lr is not None:
        changes["train.lr"] = float(lr)
    if validation:
        changes["data.federation_options.validation"] = s.validation_samples
    return base.replace(**changes)


def cells(s: LoraFamilySettings) -> list[tuple[str, str, int, str]]:
    """(method, condition, seed, role): the primaries and their FedIT on primary_seeds; with ``explore`` every other
    pair of the grid on seeds."""
    out = {}
    for m, c in s.primaries.items():
        for seed in s.primary_seeds:
            out[(m, c, seed)] = out[("fedit", c, seed)] = "primary"
    for c in s.conditions if s.explore else ():
        for m in s.methods:
            for seed in s.seeds:
                out.setdefault((m, c, seed), "exploratory")
    return [(m, c, seed, role) for (m, c, seed), role in out.items()]


# -- running ---------------------------------------------------------------------------------------------

class Runner:
    """Every run through the run store (by config), with each data split built once."""

    def __init__(self):
        self.data: dict = {}

    def get(self, cfg):
        from fedbench.config import config_hash
        from fedbench.fl import prepare_data, prepare_validation
        from fedbench.fl.server import run_cached
        from fedbench.results import load_run, run_key
        done = load_run(run_key(cfg, "inprocess"), runs_root())
        if done is not None:
            return done
        d = cfg.to_dict()["data"]
        val = d["federation_options"].get("validation")
        key = config_hash({"data": {**d, "federation_options": None}, "seed": cfg.seed, "val": val})
        if key not in self.data:
            plain = cfg.replace(**{"data.federation_options.validation": None})
            self.data[key] = prepare_data(plain) if val is None else prepare_validation(plain, int(val))
        return run_cached(cfg, self.data[key], root=runs_root())


def choose_lrs(base, s, runner) -> tuple[dict, pd.DataFrame]:
    """{(method, condition): lr} chosen on validation (first seed); the lr_selection table."""
    chosen, rows = {}, []
    pairs = sorted({(m, c) for m, c, _, _ in cells(s)} | {("fedit", "iid")}, key=lambda p: (s.conditions.index(p[1]),
                                                                      s.methods.index(p[0])))
    for m, c in pairs:
        try:
            run_config(base, s, m, c, s.seeds[0], validation=True)
        except ConfigError:
            continue
        lr, table = select_lr(m, s.lr_grid, lambda lr: runner.get(
            run_config(base, s, m, c, s.seeds[0], lr, validation=True)).summary["final_accuracy"])
        chosen[(m, c)] = lr
        rows += [{**r, "condition": c} for r in table]
    return chosen, pd.DataFrame(rows)


def frozen_probe(base, s) -> dict:
    """The frozen encoder's linear probe on the validation carve (first seed), IID clients."""
    from fedbench.experiments.quickstart import linear_probe
    from fedbench.fl import prepare_data, prepare_validation
    cfg = run_config(base, s, "fedit", "iid", s.seeds[0])
    return linear_probe(prepare_validation(cfg, s.validation_samples, prepare_data(cfg)), cfg.model, cfg.seed)


@dataclass
class LoraFamilyResult:
    settings: LoraFamilySettings
    summary: pd.DataFrame
    table: pd.DataFrame
    claims: pd.DataFrame
    headroom: pd.DataFrame
    rounds: pd.DataFrame
    flower: pd.DataFrame | None = None


def run(profile: str = "quick", path=None, **overrides) -> LoraFamilyResult:
    """Run (or load) every cell; write results/lora_family[/profile]/ (tables, claims, figures, report)."""
    from fedbench.models.checks import check_against_backbone
    p = settings_for(profile, path, **overrides)
    base, s = p.base, p.settings
    check_against_backbone(base)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    runner = Runner()
    chosen, lr_table = choose_lrs(base, s, runner)
    rows, rounds = [], []
    for m, c, seed, role in cells(s):
        row = {"method": m, "condition": c, "seed": seed, "role": role, "lr": chosen.get((m, c), np.nan)}
        try:
            cfg = run_config(base, s, m, c, seed, chosen.get((m, c)))
        except ConfigError as e:
            rows.append({**row, "applicable": False, "note": f"not applicable: {e.field_name}={e.value!r}: "
                                                             f"expected {e.allowed}"})
            continue
        r = runner.get(cfg)
        rows.append({**row, "applicable": True, "strategy": cfg.fl.strategy,
                     "evaluation": "personalised" if m == "fedsa" else "global",
                     "final_accuracy": r.summary["final_accuracy"], "mb_up": r.rounds["bytes_up"].sum() / 1e6,
                     "mb_down": r.rounds["bytes_down"].sum() / 1e6, "mb_total": r.summary["total_bytes"] / 1e6,
                     "config_hash": cfg.hash(), "note": ""})
        rounds.append(r.rounds.assign(method=m, condition=c, seed=seed,
                                      mb_sent=r.rounds["cumulative_bytes"] / 1e6))
    summary = pd.DataFrame(rows)
    table = condition_table(summary)
    probe = frozen_probe(base, s)
    fedit_val = lr_table[(lr_table.method == "fedit") & (lr_table.condition == "iid") & lr_table.chosen]
    gain = float(fedit_val["val_final_accuracy"].iloc[0]) - probe["accuracy"]
    headroom = pd.DataFrame([{"condition": "iid", "fedit_val_accuracy": gain + probe["accuracy"],
                              "probe_val_accuracy": probe["accuracy"], "gain": gain, "required": HEADROOM}])
    claims = make_claims(summary, s, gain)
    from fedbench.results import atomic_write_text
    atomic_write_text(out / "PROTOCOL.md", "# The federated-LoRA family: protocol (paper / reference code / ours)\n\n"
                      + PROTOCOL)
    save_table(summary, out, "summary.csv")
    save_table(pd.concat(rounds, ignore_index=True), out, "rounds.csv")
    save_table(lr_table, out, "lr_selection.csv")
    save_table(table, out, "table.csv")
    save_table(headroom, out, "headroom.csv")
    save_table(claims, out, "claims.csv")
    flower = flower_parity(base, s, chosen, runner) if s.flower_cell is not None else None
    if flower is not None:
        save_table(flower, out, "flower_parity.csv")
    rounds = pd.concat(rounds, ignore_index=True)
    for name, fig in make_figures(summary, rounds).items():
        save_figure(fig, out, name)
    write_report(EXPERIMENT, out)
    return LoraFamilyResult(s, summary, table, claims, headroom, rounds, flower)


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


def make_claims(summary: pd.DataFrame, s: LoraFamilySettings, gain: float) -> pd.DataFrame:
    """Each method vs FedIT in each condition, paired by seed; the primaries gated by the headroom."""
    from fedbench.claims import PRIMARY, claims_table, gate, headroom_gate, paired_seed_difference
    ok = summary[summary["applicable"]].set_index(["method", "condition", "seed"])["final_accuracy"]
    results, primary = [], []
    for c in s.conditions:
        for m in s.methods:
            if m == "fedit" or (m, c) not in {(a, b) for a, b, _ in ok.index}:
                continue
            is_primary = s.primaries.get(m) == c
            seeds = [x for x in (s.primary_seeds if is_primary else s.seeds)
                     if (m, c, x) in ok.index and ("fedit", c, x) in ok.index]
            if not seeds:
                continue
            claim = f"{m} beats FedIT ({c})"
            r = paired_seed_difference([ok[(m, c, x)] for x in seeds], [ok[("fedit", c, x)] for x in seeds],
                                       claim=claim, paper=PAPERS.get(m, ""), comparison=f"{m} - FedIT",
                                       detail=f"final accuracy, {len(seeds)} seeds, paired by seed",
                                       role=PRIMARY if is_primary else "exploratory")
            results.append(gate(r, headroom_gate(gain, HEADROOM)) if is_primary else r)
            if is_primary:
                primary.append(claim)
    return claims_table(results, primary=primary)


def flower_parity(base, s, chosen, runner) -> pd.DataFrame:
    """The flower cell's records on Flower next to the in-process run's (bytes exact, accuracy to 1e-6)."""
    from fedbench.engines.flower import run_flower
    m, c = s.flower_cell
    cfg = run_config(base, s, m, c, s.seeds[0], chosen.get((m, c)))
    ref, flw = runner.get(cfg).rounds, run_flower(cfg, quiet=True).rounds
    cols = ["round", "bytes_up", "bytes_down", "accuracy", "loss"]
    out = ref[cols].merge(flw[cols], on="round", suffixes=("_inprocess", "_flower"))
    out["same"] = ((out.bytes_up_inprocess == out.bytes_up_flower) & (out.bytes_down_inprocess == out.bytes_down_flower)
                   & (((out.accuracy_inprocess - out.accuracy_flower).abs() <= 1e-6)      # rounds not evaluated:
                      | (out.accuracy_inprocess.isna() & out.accuracy_flower.isna())))   # NaN on both engines
    return out.assign(method=m, condition=c)


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
