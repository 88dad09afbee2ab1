"""The federated-LoRA family's plan: the methods and conditions as tables of facts, the settings, and each
cell's run config (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fedbench.bench import Settings, check_list, check_seeds, check_subset, is_number, resolve_profile
from fedbench.config import ConfigError, ExperimentConfig

EXPERIMENT = "lora_family"
REFERENCE = "fedit"                  # every claim compares a method with it


@dataclass(frozen=True)
class Method:
    """A method of the grid: its strategy (a STRATEGIES key; whether it takes rank tiers, how it is evaluated
    and whether it needs tiers are that entry's facts, :func:`strategy_facts`), the other config fields it sets,
    the strategy it runs as under rank tiers when its own takes none (FedIT: zero-padded), and its paper's
    claim (the claims' ``paper`` column)."""
    strategy: str
    changes: dict = field(default_factory=dict)
    tiered: str | None = None
    paper: str = ""


METHODS = {
    "fedit": Method("fedavg", tiered="fedit_zero_pad"),
    "flora": Method("fedavg", {"fl.lora_aggregation": "stack"}, paper="FLoRA: exact aggregation by stacking"),
    "ffa_lora": Method("ffa_lora", paper="FFA-LoRA: A frozen, B averaged exactly"),
    "fedsa": Method("fedsa", paper="FedSA-LoRA (arXiv 2410.01463): sharing only A beats FedIT under non-IID data"),
    "fedex_lora": Method("fedex_lora", paper="FedEx-LoRA (arXiv 2410.09432): the exact aggregate beats FedIT's "
                                             "inexact one"),
    "flexlora": Method("flexlora", paper="FlexLoRA (arXiv 2402.11505): SVD redistribution beats zero-padding for "
                                         "mixed ranks"),
    "hetlora": Method("hetlora", paper="HetLoRA (arXiv 2401.06432): pruning + sparsity weighting beat zero-padded "
                                       "FedIT"),
    "rolora": Method("rolora", paper="RoLoRA (arXiv 2502.01755): alternating A/B beats FedIT"),
    "fedsvd": Method("fedsvd", paper="FedSVD (arXiv 2505.12805): B-only training with SVD re-factorisation beats "
                                     "FedIT under DP"),
    "fedit_truncate": Method("fedit_truncate", paper="naive baseline: every client at the smallest rank"),
}


@dataclass(frozen=True)
class Condition:
    """A condition of the grid: the config fields it sets, and whether clients train at rank tiers
    (``settings.ranks``, assigned by the strategy's seeded rule)."""
    changes: dict = field(default_factory=dict)
    rank_tiers: bool = False


CONDITIONS = {
    "iid": Condition({"data.partition": "iid"}),
    "dirichlet": Condition({"data.partition": "dirichlet", "data.alpha": 0.1}),
    "dp": Condition({"train.dp": {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0}}),
    "dropout": Condition({"fl.dropout": 0.3}),
    "hetero": Condition(rank_tiers=True),
    "robust": Condition({"fl.aggregator": "median", "fl.attack": "sign_flip", "fl.attack_fraction": 0.1}),
}
# each method vs FedIT in the setting its paper makes its case in
PRIMARIES = {"fedsa": "dirichlet", "fedex_lora": "iid", "flexlora": "hetero", "hetlora": "hetero",
             "rolora": "iid", "fedsvd": "dp"}
HEADROOM = 0.05


@dataclass(frozen=True)
class StrategyFacts:
    """What the experiment reads off a strategy's registry entry."""
    takes_tiers: bool             # its options have ``ranks`` (fl.options.ranks: clients at rank tiers)
    needs_tiers: bool             # without tiers it is FedIT (a baseline of the heterogeneous-rank condition)
    evaluation: str               # "global" (the global model) or "personalised" (mean over clients' own models)


def strategy_facts(strategy: str) -> StrategyFacts:
    """`strategy`'s facts from its STRATEGIES entry (defaults: no tiers needed, global evaluation)."""
    from fedbench.options import option_fields
    from fedbench.registry import STRATEGIES
    facts = STRATEGIES.entry(strategy).facts
    return StrategyFacts("ranks" in option_fields(STRATEGIES, strategy), bool(facts.get("needs_tiers", False)),
                         facts.get("evaluation", "global"))


def check_methods(methods) -> None:
    """Every method's strategies are registered (a ConfigError naming ``methods`` otherwise)."""
    from fedbench.registry import STRATEGIES
    for m in methods:
        for name in (METHODS[m].strategy, METHODS[m].tiered):
            if name is not None and name not in STRATEGIES:
                raise ConfigError("methods", m, f"methods whose strategies are registered ({name!r} is not; "
                                                f"registered: {STRATEGIES.names()})")


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
        check_methods(self.methods)
        self.conditions = check_subset("conditions", self.conditions, tuple(CONDITIONS))
        if REFERENCE not in self.methods:
            raise ConfigError("methods", list(self.methods), "a list including 'fedit' (every claim compares with it)")
        if "iid" not in self.conditions:
            raise ConfigError("conditions", list(self.conditions), "a list including 'iid' (the headroom's)")
        self.seeds, self.primary_seeds = check_seeds("seeds", self.seeds), check_seeds("primary_seeds",
                                                                                       self.primary_seeds)
        prim = PRIMARIES if self.primaries is None else dict(self.primaries)
        for m, c in prim.items():
            if self.primaries is not None and (m not in METHODS or m == REFERENCE or c not in CONDITIONS):
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

def strategy_under(method: str, condition: str) -> str:
    """The strategy `method` runs as under `condition` (ConfigError if it cannot run there)."""
    m = METHODS[method]
    if CONDITIONS[condition].rank_tiers:
        if strategy_facts(m.strategy).takes_tiers:
            return m.strategy
        if m.tiered is None:
            raise ConfigError("fl.strategy", m.strategy, "a method that takes rank tiers")
        return m.tiered
    if strategy_facts(m.strategy).needs_tiers:
        raise ConfigError("fl.strategy", m.strategy, "a heterogeneous-rank condition (it is FedIT otherwise)")
    return m.strategy


def run_config(base: ExperimentConfig, s: LoraFamilySettings, method: str, condition: str, seed: int,
               lr: float | None = None, validation: bool = False) -> ExperimentConfig:
    """The run of `method` under `condition` (ConfigError if the method cannot run there)."""
    changes = {"fl.strategy": strategy_under(method, condition), **METHODS[method].changes,
               **CONDITIONS[condition].changes, "seed": int(seed)}
    if CONDITIONS[condition].rank_tiers:
        changes["fl.options"] = {"ranks": list(s.ranks)}
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
            out[(m, c, seed)] = out[(REFERENCE, c, seed)] = "primary"
    for c in s.conditions if s.explore else ():
        for m in s.methods:
            for seed in s.seeds:
                out.setdefault((m, c, seed), "exploratory")
    return [(m, c, seed, role) for (m, c, seed), role in out.items()]


def lr_pairs(s: LoraFamilySettings) -> list[tuple[str, str]]:
    """The (method, condition) pairs whose lr is chosen on validation: every pair of the cells and FedIT on IID
    (the headroom's), in grid order."""
    pairs = {(m, c) for m, c, _, _ in cells(s)} | {(REFERENCE, "iid")}
    return sorted(pairs, key=lambda p: (s.conditions.index(p[1]), s.methods.index(p[0])))
