"""Reliability under faults and attacks: robust aggregation rules against Byzantine clients, and the update guard.

The grid: every aggregation rule in ``settings.aggregators`` (FedAvg, coordinate median, trimmed mean, Krum,
Multi-Krum, Bulyan) x every attack in ``settings.attacks`` (sign_flip, scale, gaussian, label_flip) x every
attacker fraction in ``settings.fractions`` (0 = the clean run, once per rule) x ``settings.seeds``, each run
one :class:`fedbench.config.ExperimentConfig` (the profile's ``base`` with the cell's ``fl.*`` fields) through
:func:`fedbench.fl.run_cached`. Plus the NaN arm: a fraction of the clients sends NaN (``fl.attack="nan"``, a
fault rather than an attack); the loop's update guard must reject every such update (``clients_rejected``)
and the accuracy must stay that of the clean run.

Protocol (what a cell sets, beyond the base):

* attackers: ``fl.attack`` and ``fl.attack_fraction``; the loop picks round(fraction * data.num_clients) clients
  (a seeded set, fixed for the run) that attack every round they take part in;
* f, what the rule is built to survive: the number of attackers expected in a round's cohort,
  round(fraction * cohort). Without attackers the rules keep the f of the smallest attacker fraction of the
  grid (``settings.clean_num_malicious`` overrides it), so the clean column shows what robustness costs.
  Krum, Multi-Krum (``fl.num_malicious`` = f, Multi-Krum averaging n - f) and Bulyan use it; the trimmed mean
  cuts f / n at each end (``fl.trim_ratio``); FedAvg and the median take no parameter;
* a rule that cannot run at a setting (Krum / Multi-Krum need n >= 2f + 3, Bulyan n >= 4f + 3, so Bulyan
  never covers 30% attackers whatever n) is recorded as not applicable, with the reason, and not run;
* the NaN arm runs each rule of ``settings.nan_aggregators`` with the clean run's config and
  ``fl.attack="nan"``: the comparison is clean - NaN on the same seeds and test examples.

Outputs (``results/robustness[/<profile>]/``): ``summary.csv`` (one row per run or not-applicable cell),
``rounds.csv`` (per round), ``robustness.csv`` (mean and 95% t interval over seeds per rule, attack and
fraction), ``robustness_wide.csv`` (the same as one readable grid), ``nan_arm.csv`` (rejections per run),
``claims.csv`` (:mod:`fedbench.claims`) and the figures of :func:`make_figures`.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedbench.bench.report import write_report
from fedbench.config import ConfigError, ExperimentConfig
from fedbench.experiments.common import (Settings, check_list, is_int, is_number, output_dir, resolve_profile,
                                         runs_root, save_figure, save_table)

EXPERIMENT = "robustness"
AGGREGATOR_ORDER = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")
ATTACK_ORDER = ("sign_flip", "scale", "gaussian", "label_flip")
# the rules that take f (fl.num_malicious), and the clients per round each needs for a given f
F_RULES = {"krum": lambda f: 2 * f + 3, "multi_krum": lambda f: 2 * f + 3, "bulyan": lambda f: 4 * f + 3}
PAPERS = {
    "median": "Yin et al. 2018: the coordinate-wise median stays accurate with a minority of Byzantine clients",
    "trimmed_mean": "Yin et al. 2018: the coordinate-wise trimmed mean stays accurate with a minority of "
                    "Byzantine clients",
    "krum": "Blanchard et al. 2017: Krum tolerates f Byzantine clients when n >= 2f + 3",
    "multi_krum": "Blanchard et al. 2017: Multi-Krum tolerates f Byzantine clients when n >= 2f + 3",
    "bulyan": "El Mhamdi et al. 2018: Bulyan tolerates f Byzantine clients when n >= 4f + 3",
}
# the notebook's short parameter names -> the config fields they set
ALIASES = {"task": "data.task", "clients": "data.num_clients", "rounds": "fl.rounds"}
# the NaN arm's attack in the tables (it runs fl.attack="nan"; a bare "nan" would read back as a missing value)
NAN_LABEL = "nan_update"
NAN_ARM = "nan_arm"

SUMMARY_COLUMNS = ["arm", "aggregator", "attack", "fraction", "seed", "num_clients", "cohort", "attackers",
                   "num_malicious", "trim_ratio", "applicable", "final_accuracy", "best_accuracy", "final_loss",
                   "clients_rejected_total", "rounds_with_rejection", "rounds", "majority_baseline",
                   "config_hash", "note"]
TABLE_COLUMNS = ["arm", "aggregator", "attack", "fraction", "attackers", "num_malicious", "applicable", "n_seeds",
                 "accuracy_mean", "ci_low", "ci_high", "accuracy_sd", "change_vs_clean", "clients_rejected_mean",
                 "note"]
NAN_COLUMNS = ["aggregator", "fraction", "seed", "nan_clients", "rounds", "rounds_with_nan", "nan_updates",
               "rejected", "rounds_all_rejected", "all_rejected", "honest_rejected", "loss_finite",
               "final_accuracy", "clean_accuracy", "accuracy_change"]
ROUND_COLUMNS = ["arm", "aggregator", "attack", "fraction", "seed", "round", "accuracy", "loss", "train_loss",
                 "clients_sampled", "clients_dropped", "clients_rejected"]


# -- settings ------------------------------------------------------------------------------------------

@dataclass
class RobustnessSettings(Settings):
    """The grid (rules x attacks x fractions x seeds), the NaN arm and the claims' parameters."""
    aggregators: tuple[str, ...] = AGGREGATOR_ORDER
    attacks: tuple[str, ...] = ATTACK_ORDER
    fractions: tuple[float, ...] = (0.0, 0.1, 0.3)      # attacker fractions; 0.0 (the clean run) is required
    seeds: tuple[int, ...] = (0, 1, 2)
    nan_fractions: tuple[float, ...] = (0.1, 0.3)       # the NaN arm's fractions of NaN clients (may be empty)
    nan_aggregators: tuple[str, ...] = ("fedavg",)      # the rules run in the NaN arm (each needs its clean run)
    clean_num_malicious: int | None = None              # f of the clean runs (None: f of the smallest fraction)
    claim_attacks: tuple[str, ...] | None = None        # attacks with a claim per robust rule (None: all)
    nan_margin: float = 0.02                            # "no harm": clean - NaN arm accuracy below this
    n_boot: int = 2000

    def validate(self) -> None:
        from fedbench.registry import AGGREGATORS, ATTACKS
        check_list("aggregators", self.aggregators, lambda a: a in AGGREGATORS,
                   f"a non-empty list of aggregation rules from {AGGREGATORS.names()}")
        _unique("aggregators", self.aggregators)
        attacks = [a for a in ATTACKS.names() if a not in ("none", "nan")]
        check_list("attacks", self.attacks, lambda a: a in attacks,
                   f"a non-empty list of attacks from {attacks} ('nan' is the NaN arm: nan_fractions)")
        _unique("attacks", self.attacks)
        check_list("fractions", self.fractions, lambda x: is_number(x) and 0 <= x < 1,
                   "a non-empty list of attacker fractions in [0, 1), including 0.0 (the clean run)")
        if 0 not in self.fractions:
            raise ConfigError("fractions", self.fractions, "a list of attacker fractions including 0.0 (the clean "
                                                           "run every comparison starts from)")
        _unique("fractions", self.fractions)
        check_list("seeds", self.seeds, lambda x: is_int(x) and x >= 0, "a non-empty list of integer seeds >= 0")
        _unique("seeds", self.seeds)
        check_list("nan_fractions", self.nan_fractions, lambda x: is_number(x) and 0 < x <= 1,
                   "a list (may be empty) of NaN-client fractions in (0, 1]", nonempty=False)
        _unique("nan_fractions", self.nan_fractions)
        check_list("nan_aggregators", self.nan_aggregators, lambda a: a in self.aggregators,
                   f"a list of rules from aggregators={list(self.aggregators)} (the NaN arm is compared with "
                   "each rule's clean run)", nonempty=False)
        if self.clean_num_malicious is not None and not (is_int(self.clean_num_malicious)
                                                         and self.clean_num_malicious >= 0):
            raise ConfigError("clean_num_malicious", self.clean_num_malicious, "null or an integer >= 0")
        if self.claim_attacks is not None:
            check_list("claim_attacks", self.claim_attacks, lambda a: a in self.attacks,
                       f"null (all attacks) or a list of attacks from attacks={list(self.attacks)}", nonempty=False)
        if not (is_number(self.nan_margin) and 0 <= self.nan_margin < 1):
            raise ConfigError("nan_margin", self.nan_margin, "a number in [0, 1)")
        if not (is_int(self.n_boot) and self.n_boot >= 100):
            raise ConfigError("n_boot", self.n_boot, "an integer >= 100")

    def check_base(self, base: ExperimentConfig) -> None:
        """What the grid needs of the base config: the fields each cell sets are left at their defaults (a
        value there would be silently replaced), and every nonzero fraction gives at least one attacker."""
        for name, default, setting in (("aggregator", "fedavg", "aggregators"), ("attack", "none", "attacks"),
                                       ("attack_fraction", 0.0, "fractions")):
            value = getattr(base.fl, name)
            if value != default:
                raise ConfigError(f"fl.{name}", value, f"{default!r} in this experiment's base: each run sets it "
                                                       f"from the setting {setting!r} (e.g. --set {setting}=[...])")
        n = base.data.num_clients
        for name, fracs in (("fractions", self.fractions), ("nan_fractions", self.nan_fractions)):
            few = [x for x in fracs if x > 0 and round(float(x) * n) == 0]
            if few:
                raise ConfigError(name, list(fracs), f"fractions that give at least one attacker among "
                                                     f"data.num_clients={n} clients (round(fraction * {n}) >= 1)")


def _unique(name: str, values) -> None:
    if len(set(values)) != len(values):
        raise ConfigError(name, values, "a list without repeated values")


def settings_for(profile: str = "quick", path=None, **overrides):
    """The resolved profile: ``.base`` (the ExperimentConfig every run starts from) and ``.settings``
    (:class:`RobustnessSettings`); overrides by setting name, alias or dotted config field."""
    overrides = {ALIASES.get(k, k): v for k, v in overrides.items()}
    p = resolve_profile(EXPERIMENT, profile, overrides, RobustnessSettings, path=path)
    p.settings.check_base(p.base)
    return p


# -- the cells -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One run: arm ("grid" or "nan_arm"), rule, attack ("none" for the clean run), attacker fraction, seed."""
    arm: str
    aggregator: str
    attack: str
    fraction: float
    seed: int

    @property
    def key(self) -> tuple:
        return (self.arm, self.aggregator, self.attack, float(self.fraction), int(self.seed))


def build_cells(s: RobustnessSettings) -> list[Cell]:
    """Seed by seed (each seed's runs share its data and caches): the grid, then the NaN arm."""
    cells = []
    for seed in s.seeds:
        for agg in s.aggregators:
            cells.append(Cell("grid", agg, "none", 0.0, int(seed)))
            for attack in s.attacks:
                cells += [Cell("grid", agg, attack, float(x), int(seed)) for x in s.fractions if x > 0]
        for agg in s.nan_aggregators:
            cells += [Cell(NAN_ARM, agg, NAN_LABEL, float(x), int(seed)) for x in s.nan_fractions]
    return cells


def clean_f(s: RobustnessSettings, cohort: int) -> int:
    """The f of a clean run: settings.clean_num_malicious, else that of the smallest nonzero fraction."""
    if s.clean_num_malicious is not None:
        return int(s.clean_num_malicious)
    nonzero = [x for x in s.fractions if x > 0]
    return round(min(nonzero) * cohort) if nonzero else 0


@dataclass
class Plan:
    """A cell's config (None when not applicable) and what the tables record about it."""
    cell: Cell
    cfg: ExperimentConfig | None
    info: dict
    note: str = ""


def plan_cell(cell: Cell, base: ExperimentConfig, s: RobustnessSettings) -> Plan:
    """The cell's config: the base with the attack, f and the rule's parameters; or why it cannot run."""
    n = base.cohort_size()
    attackers = round(cell.fraction * base.data.num_clients) if cell.fraction > 0 else 0
    expected = round(cell.fraction * n) if cell.fraction > 0 else 0      # attackers in a round's cohort
    f = expected if cell.arm == "grid" and cell.fraction > 0 else clean_f(s, n)
    # every run prefills its caches (a seed's runs share them: SharedData), so each is its config alone
    changes = {"seed": cell.seed, "fl.aggregator": cell.aggregator,
               "fl.attack": "nan" if cell.arm == NAN_ARM else cell.attack,
               "fl.attack_fraction": float(cell.fraction), "data.federation_options.prefill": True}
    info = {"num_clients": base.data.num_clients, "cohort": n, "attackers": attackers,
            "num_malicious": float("nan"), "trim_ratio": float("nan")}
    if cell.aggregator in F_RULES:
        changes["fl.num_malicious"] = f
        info["num_malicious"] = f
    if cell.aggregator == "trimmed_mean":
        changes["fl.trim_ratio"] = f / n
        info["num_malicious"], info["trim_ratio"] = f, f / n
    if cell.aggregator in F_RULES:
        # the guard drops the NaN updates before the rule: it must still have enough states
        survivors = n - expected if cell.arm == NAN_ARM else n
        need = F_RULES[cell.aggregator](f)
        if survivors < need:
            why = (f"not applicable: {cell.aggregator} needs n >= {need} clients per round for f={f}, "
                   f"the round has {survivors}" + (" after the guard" if cell.arm == NAN_ARM else ""))
            return Plan(cell, None, info, why)
    try:
        cfg = base.replace(**changes)
    except ConfigError as e:
        if not e.field_name.startswith("fl."):
            raise
        return Plan(cell, None, info, f"not applicable: {e.field_name}={e.value!r}: expected {e.allowed}")
    return Plan(cell, cfg, info)


# -- shared data and frozen-feature caches ---------------------------------------------------------------

class SharedData:
    """Each seed's prepared data (shared by all its runs) and the frozen-prefix activation caches.

    The caches follow :class:`fedbench.experiments.fedpeft.SharedCaches`: the frozen bottom layers are the
    pretrained ones whatever the rule or attack, so one cache per data sample and depth serves every run,
    filled once before its first run in a fixed order (by length, then index), so the cached values, and
    every run's numbers, do not depend on which runs came first or were already on disk. Without
    subsampling (``data.max_train_samples`` and ``max_test_samples`` null) the sample is the same for every
    seed and so is the cache: the frozen encoder runs once for the whole grid.
    """

    def __init__(self):
        self.data: dict[str, object] = {}
        self.caches: dict[str, tuple] = {}
        self.filled: set[tuple[str, int]] = set()
        self.depths: dict[str, int] = {}
        self._model = None

    def get_data(self, cfg):
        from fedbench.config import config_hash
        from fedbench.fl import prepare_data
        key = config_hash({"data": cfg.to_dict()["data"], "backbone": cfg.model.backbone, "seed": cfg.seed})
        if key not in self.data:
            data = prepare_data(cfg)
            self.data[key] = data
        return self.data[key]

    @staticmethod
    def sample_key(cfg) -> str:
        from fedbench.config import config_hash
        d = cfg.data
        seeded = d.max_train_samples is not None or d.max_test_samples is not None
        return config_hash({"task": d.task, "max_train_samples": d.max_train_samples, "max_length": d.max_length,
                            "max_test_samples": d.max_test_samples, "backbone": cfg.model.backbone,
                            "seed": cfg.seed if seeded else None})

    def _depth(self, cfg, num_labels: int) -> int:
        from fedbench.config import config_hash
        from fedbench.models import build_model
        key = config_hash({"peft": cfg.to_dict()["peft"], "model": cfg.to_dict()["model"]})
        if key not in self.depths:
            self.depths[key] = int(build_model(cfg.model, cfg.peft, num_labels, seed=0).frozen_prefix)
        return self.depths[key]

    def get(self, cfg):
        """(data, (train cache, test cache)) for `cfg`, the caches filled for its frozen depth."""
        import torch

        from fedbench.config import PeftConfig
        from fedbench.models import build_model
        from fedbench.models.inputs import ActivationCache
        data = self.get_data(cfg)
        key = self.sample_key(cfg)
        if key not in self.caches:
            self.caches[key] = (ActivationCache(data.train, data.pad_id), ActivationCache(data.test, data.pad_id))
        if self._model is None:      # the plain pretrained layers compute every prefix
            self._model = build_model(cfg.model, PeftConfig(method="head"), data.num_labels, seed=0)
        depth = self._depth(cfg, data.num_labels)
        if depth > 0 and (key, depth) not in self.filled:
            with torch.no_grad():
                for cache, idx in zip(self.caches[key], (np.arange(len(data.train)), np.asarray(data.test_indices))):
                    cache.fill(self._model, idx, depth)
            self.filled.add((key, depth))
        return data, self.caches[key]


@contextmanager
def _quiet_guard():
    """The guard logs a warning per rejected update; the NaN arm rejects hundreds (all counted in the
    records and nan_arm.csv), so they are silenced while the grid runs."""
    log = logging.getLogger("fedbench.fl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# -- running ---------------------------------------------------------------------------------------------

@dataclass
class RobustnessResult:
    settings: RobustnessSettings
    base: ExperimentConfig
    summary: pd.DataFrame
    rounds: pd.DataFrame
    table: pd.DataFrame
    wide: pd.DataFrame
    nan_arm: pd.DataFrame
    claims: pd.DataFrame
    out: Path


def store_root() -> Path:
    """This experiment's part of the run store (delete it to recompute everything)."""
    return runs_root() / EXPERIMENT


def run(profile: str = "quick", path=None, progress: bool = True, **overrides) -> RobustnessResult:
    """Run (or load) the profile's grid and NaN arm; write results/robustness[/<profile>]/."""
    from fedbench.models.checks import check_against_backbone
    p = settings_for(profile, path, **overrides)
    s, base = p.settings, p.base
    check_against_backbone(base)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    summary, rounds, correct, expected = run_cells(build_cells(s), base, s, progress=progress)
    table = robustness_table(summary)
    wide = wide_table(table)
    nan = nan_arm_table(summary, rounds, expected)
    claims = make_claims(summary, correct, nan, s)
    save_table(summary, out, "summary.csv")
    save_table(rounds, out, "rounds.csv")
    save_table(table, out, "robustness.csv")
    save_table(wide, out, "robustness_wide.csv")
    save_table(nan, out, "nan_arm.csv")
    save_table(claims, out, "claims.csv")
    for name, fig in make_figures(summary, rounds).items():
        save_figure(fig, out, name)
    write_report(EXPERIMENT, out)
    return RobustnessResult(s, base, summary, rounds, table, wide, nan, claims, out)


def expected_nan_per_round(cfg) -> list[int]:
    """How many NaN clients report in each round of `cfg` (the loop's seeded attacker set, sampling and
    dropout, recomputed from the same public functions and streams)."""
    from fedbench.fl import derive_seed, rng_for, sample_clients
    from fedbench.fl.attacks import select_attackers
    attackers = {int(c) for c in select_attackers(cfg.data.num_clients, cfg.fl.attack_fraction,
                                                  derive_seed(cfg.seed, "attack"))}
    out = []
    for r in range(1, cfg.fl.rounds + 1):
        sampled = sample_clients(cfg.data.num_clients, cfg.fl.clients_per_round, rng_for(cfg.seed, "sampling", r))
        dropped = rng_for(cfg.seed, "dropout", r).random(len(sampled)) < cfg.fl.dropout
        out.append(sum(int(c) in attackers for c, d in zip(sampled, dropped) if not d))
    return out


def run_cells(cells: list[Cell], base: ExperimentConfig, s: RobustnessSettings, progress: bool = True):
    """Run (or load) every applicable cell. Returns (summary, rounds, correct, expected): `correct` maps a
    cell's key to (test indices, 0/1 per test example) of its final evaluation, `expected` a NaN-arm cell's
    key to the NaN updates its clients send per round."""
    from fedbench.fl import run_cached
    from fedbench.results import load_run, run_key
    shared, root = SharedData(), store_root()
    rows, round_frames, correct, expected = [], [], {}, {}
    t0 = time.perf_counter()
    counts = {"computed": 0, "loaded": 0, "n/a": 0}
    seed_start = {}
    with _quiet_guard():
        for i, cell in enumerate(cells):
            seed_start.setdefault(cell.seed, (time.perf_counter(), dict(counts)))
            plan = plan_cell(cell, base, s)
            row = {"arm": cell.arm, "aggregator": cell.aggregator, "attack": cell.attack,
                   "fraction": float(cell.fraction), "seed": cell.seed, **plan.info,
                   "applicable": plan.cfg is not None}
            if plan.cfg is None:
                counts["n/a"] += 1
                rows.append({**row, "final_accuracy": float("nan"), "best_accuracy": float("nan"),
                             "final_loss": float("nan"), "clients_rejected_total": float("nan"),
                             "rounds_with_rejection": float("nan"), "rounds": float("nan"),
                             "majority_baseline": float("nan"), "config_hash": "", "note": plan.note})
            else:
                cfg = plan.cfg
                result = load_run(run_key(cfg), root)
                if result is None:
                    data, caches = shared.get(cfg)
                    result = run_cached(cfg, data, root=root, caches=caches)
                    counts["computed"] += 1
                else:
                    counts["loaded"] += 1
                sm, r = result.summary, result.rounds
                labels = np.asarray(result.predictions["label"])
                rows.append({**row, "final_accuracy": sm["final_accuracy"], "best_accuracy": sm["best_accuracy"],
                             "final_loss": sm["final_loss"], "clients_rejected_total": int(sm["clients_rejected"]),
                             "rounds_with_rejection": int((r["clients_rejected"] > 0).sum()),
                             "rounds": int(sm["rounds"]),
                             "majority_baseline": float(np.bincount(labels).max() / len(labels)),
                             "config_hash": cfg.hash(), "note": ""})
                order = np.argsort(result.predictions["test_index"], kind="stable")
                correct[cell.key] = (np.asarray(result.predictions["test_index"])[order], result.correct)
                rr = r.reindex(columns=ROUND_COLUMNS[5:])
                for k, v in reversed(list(zip(ROUND_COLUMNS[:5], cell.key))):
                    rr.insert(0, k, v)
                round_frames.append(rr)
                if cell.arm == NAN_ARM:
                    expected[cell.key] = expected_nan_per_round(cfg)
            last = i + 1 == len(cells) or cells[i + 1].seed != cell.seed
            if progress and last:
                t_seed, before = seed_start[cell.seed]
                done = {k: counts[k] - before[k] for k in counts}
                print(f"seed {cell.seed}: {sum(done.values())} cells ({done['computed']} run, {done['loaded']} "
                      f"loaded, {done['n/a']} not applicable) in {time.perf_counter() - t_seed:.0f}s "
                      f"({time.perf_counter() - t0:.0f}s total)", flush=True)
    summary = pd.DataFrame(rows).reindex(columns=SUMMARY_COLUMNS)
    for c in ("num_malicious", "clients_rejected_total", "rounds_with_rejection", "rounds"):
        summary[c] = summary[c].astype("Int64")       # integers, empty where the cell did not run
    rounds = pd.concat(round_frames, ignore_index=True) if round_frames else pd.DataFrame(columns=ROUND_COLUMNS)
    return summary, rounds, correct, expected


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
