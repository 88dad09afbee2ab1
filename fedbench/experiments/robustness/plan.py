"""The robustness grid's plan: settings, cells and each cell's run config (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass

from fedbench.config import ConfigError, ExperimentConfig
from fedbench.bench import Settings, check_list, is_int, is_number, resolve_profile

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
    # every run prefills its caches (a seed's runs share them: fedbench.bench.caches.PrefixCaches), so each is its config alone
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
