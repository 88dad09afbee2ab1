"""Task arithmetic's plan: the settings, the merges compared (a table of per-merge facts checked against the
MERGES registry), the searched grids, and the loop's config of one (tuning, seed) unit."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedbench import merging
from fedbench.bench import Settings, check_list, is_int, is_number, resolve_profile
from fedbench.config import ConfigError, ExperimentConfig
from fedbench.fl.seeding import derive_seed
from fedbench.registry import MERGES, TUNERS

EXPERIMENT = "task_arithmetic"
VARIANTS = ("tuned", "1/T")
SUMMARY_COLUMNS = ["tuning", "seed", "setting", "method", "variant", "lambda", "rho", "task", "accuracy",
                   "normalized_accuracy", "accuracy_ratio"]
# the frozen heads (fedbench.strategies.task_arithmetic): the reference row "probe" is theta_0 with them
HEADS = {"zero_shot": "zero-shot (theta_0, class-prompt heads)", "probe": "the frozen-head probe"}
# the claims a profile may pre-state as primary (`primary`), by key: the claim's text
PRIMARY_CLAIMS = {"merge_gap": "The merge loses to the individual models (lambda 1/T)",
                  "hetero_hurts": "Training heterogeneity hurts task arithmetic (lambda 1/T)",
                  "fednova_recovers": "FedNova recovers from training heterogeneity (lambda 1/T)",
                  "tuned_beats_1/T": "Tuning lambda on validation beats plain one-shot FedAvg (lambda = 1/T)"}
TABLES = ("accuracy", "validation", "equivalence", "cosine", "pairs", "rounds", "finetune", "lr_search", "correct")


# -- the tunings (peft.method of the fine-tunes): what each changes in a unit --------------------------------

@dataclass(frozen=True)
class Tuning:
    """lora: the task vector is the dense LoRA update s B A of each wrapped weight, averaged exactly (``stack``);
    else every encoder parameter's change. own_lr: trained at ``full_lr`` on every layer, no lr search."""
    lora: bool
    own_lr: bool


TUNING_FACTS: dict[str, Tuning] = {"lora": Tuning(lora=True, own_lr=False), "full": Tuning(lora=False, own_lr=True)}
TUNINGS = tuple(TUNING_FACTS)


# -- the merges: what the experiment needs of each beyond its MERGES entry --------------------------------

@dataclass(frozen=True)
class Merge:
    """One merge compared. Its function, its scale (sum- or mean-scale vector) and the name of its second
    hyper-parameter (`search`) are the MERGES entry's; the experiment adds its label, its claim family, the grid
    searched for that hyper-parameter (as in the authors' code) and the inputs it takes beside the vectors."""
    label: str
    family: str                           # "reference" | "fl" (FL-inspired) | "interference" (less interference)
    grid: Callable | None = None          # (settings, task vectors) -> values of the entry's `search` parameter
    steps: bool = False                   # takes each task's local steps (and normalises by them only: with
    #                                       equal steps it is task arithmetic, so it has no claim of its own there)
    seeded: bool = False                  # takes a seed (its random stream: derive_seed(seed, "merge", 0))
    registered: bool = True               # False: not a MERGES function of the task vectors (FedIT's factor
    #                                       average comes from the loop's LoRA factors: LoRA only, mean-scale)


def _cclip_rhos(s, tvs) -> list[float]:
    """linspace(min ||tau_t||, max ||tau_t||, n, endpoint=False), the authors' CCLIP grid."""
    norms = [merging.norm(tv) for tv in tvs]
    return list(np.linspace(min(norms), max(norms), s.cclip_rhos, endpoint=False))


MERGE_FACTS: dict[str, Merge] = {
    "task_arithmetic": Merge("task arithmetic", "reference"),
    "fednova": Merge("FedNova", "fl", steps=True),
    "fedgma": Merge("FedGMA", "fl", grid=lambda s, tvs: s.gma_rhos),
    "median": Merge("median", "fl"),
    "cclip": Merge("CCLIP", "fl", grid=_cclip_rhos),
    "ties": Merge("TIES", "interference", grid=lambda s, tvs: s.ties_densities),
    "dare": Merge("DARE", "interference", grid=lambda s, tvs: s.dare_drops, seeded=True),
    "fedit": Merge("FedIT (factor avg)", "interference", registered=False),
}
MERGE_METHODS = tuple(MERGE_FACTS)
LABELS = {"individual": "individual fine-tune", "probe": "theta_0 + frozen heads (probe)",
          "fedavg": "FedAvg round (loop)", **{m: f.label for m, f in MERGE_FACTS.items()}}


def merge_names() -> list[str]:
    """The merges a profile may list: those of the table whose MERGES entry exists (FedIT needs none)."""
    return [m for m, f in MERGE_FACTS.items() if not f.registered or m in MERGES]


def scale_of(method: str) -> str:
    """"sum" or "mean": the MERGES entry's `scale` fact (FedIT's factor average: a mean-scale vector)."""
    return MERGES.entry(method, "methods").scale if MERGE_FACTS[method].registered else "mean"


# -- settings -----------------------------------------------------------------------------------------

@dataclass
class TaskArithmeticSettings(Settings):
    """The experiment's own parameters; the run config (data sizes, LoRA, steps, lr) is the profile's base."""
    tasks: tuple[str, ...] = ("rt_sentiment", "tweet_sentiment", "subjectivity", "wordnet_verb", "wordnet_noun",
                              "ng20")
    seeds: tuple[int, ...] = (0, 1, 2)
    tunings: tuple[str, ...] = ("lora",)
    full_lr: float = 5e-5                     # learning rate of full fine-tuning (train.lr is LoRA's)
    lrs: tuple[float, ...] = ()               # LoRA lr grid searched on validation (shared lr); () = train.lr
    val_samples: int = 200                    # per task, carved from its training subsample
    probe_samples: int = 200                  # per task, carved too: the frozen head's data, never fine-tuned on
    lambdas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)   # per-task units; 1/T added
    gma_rhos: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    cclip_rhos: int = 5
    ties_densities: tuple[float, ...] = (0.2,)
    dare_drops: tuple[float, ...] = (0.5,)
    methods: tuple[str, ...] = MERGE_METHODS
    hetero_steps: tuple[float, ...] = ()      # local-step multiplier per task (empty: no heterogeneous setting)
    hetero_lrs: tuple[float, ...] = ()        # learning-rate multiplier per task (empty: no such setting)
    hetero_methods: tuple[str, ...] = ("task_arithmetic", "fednova")
    hetero_variants: tuple[str, ...] = VARIANTS   # ("1/T",): the heterogeneous settings untuned only (cheaper)
    rounds: tuple[int, ...] = (1, 4)          # FedAvg rounds at equal total local steps
    pairs: bool = True                        # every pair of tasks merged (plain FedAvg, lambda = 1/2)
    pair_search: bool = False                 # also search lambda for every pair on validation
    head: str = "probe"                       # the frozen heads: "zero_shot" (class prompts) or "probe" (fitted)
    primary: tuple[str, ...] = ("merge_gap",)     # the pre-stated claims (keys of PRIMARY_CLAIMS), 1-3

    def validate(self) -> None:
        from fedbench.data import list_tasks
        text = [t.name for t in list_tasks() if t.offline and t.modality == "text"]
        check_list("tasks", self.tasks, lambda t: t in text, f"at least 2 distinct offline text tasks from {text}")
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError("tasks", self.tasks, f"at least 2 distinct offline text tasks from {text}")
        T = len(self.tasks)
        check_list("seeds", self.seeds, lambda x: is_int(x) and x >= 0, "a non-empty list of distinct integers >= 0")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", self.seeds, "a non-empty list of distinct integers >= 0")
        tunings = [t for t in TUNING_FACTS if t in TUNERS]     # the table's tunings that TUNERS holds
        check_list("tunings", self.tunings, lambda t: t in tunings, f"a non-empty subset of {tunings}")
        if not (is_number(self.full_lr) and self.full_lr > 0):
            raise ConfigError("full_lr", self.full_lr, "a number > 0")
        for key, low in (("val_samples", 1), ("probe_samples", 2), ("cclip_rhos", 1)):
            if not (is_int(getattr(self, key)) and getattr(self, key) >= low):
                raise ConfigError(key, getattr(self, key), f"an integer >= {low}")
        check_list("lrs", self.lrs, lambda x: is_number(x) and 0 < x <= 10, "a list of learning rates in (0, 10]",
                   nonempty=False)
        check_list("lambdas", self.lambdas, lambda x: is_number(x) and x > 0, "a non-empty list of numbers > 0")
        check_list("gma_rhos", self.gma_rhos, lambda x: is_number(x) and 0 <= x <= 1, "a list of numbers in [0, 1]")
        check_list("ties_densities", self.ties_densities, lambda x: is_number(x) and 0 < x <= 1,
                   "a list of numbers in (0, 1]")
        check_list("dare_drops", self.dare_drops, lambda x: is_number(x) and 0 <= x < 1, "a list of numbers in [0, 1)")
        merges = merge_names()      # the table's merges that the MERGES registry holds (and FedIT)
        check_list("methods", self.methods, lambda m: m in merges, f"a subset of {merges}")
        check_list("hetero_methods", self.hetero_methods, lambda m: m in merges, f"a subset of {merges}",
                   nonempty=False)
        check_list("hetero_variants", self.hetero_variants, lambda v: v in VARIANTS, f"a non-empty subset of "
                   f"{list(VARIANTS)}")
        check_list("hetero_steps", self.hetero_steps, lambda x: is_number(x) and x > 0,
                   f"one step multiplier > 0 per task ({T}), or [] for none", nonempty=False)
        if len(self.hetero_steps) not in (0, T):
            raise ConfigError("hetero_steps", self.hetero_steps, f"one step multiplier > 0 per task ({T}), or []")
        check_list("hetero_lrs", self.hetero_lrs, lambda x: is_number(x) and x > 0,
                   f"one learning-rate multiplier > 0 per task ({T}), or [] for none", nonempty=False)
        if len(self.hetero_lrs) not in (0, T):
            raise ConfigError("hetero_lrs", self.hetero_lrs, f"one learning-rate multiplier > 0 per task ({T}), or []")
        check_list("rounds", self.rounds, lambda r: is_int(r) and r >= 1, "a list of integers >= 1 (or empty)",
                   nonempty=False)
        for key in ("pairs", "pair_search"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(key, getattr(self, key), "true or false")
        if self.head not in HEADS:
            raise ConfigError("head", self.head, f"one of {list(HEADS)}")
        check_list("primary", self.primary, lambda k: k in PRIMARY_CLAIMS, f"1-3 distinct of {list(PRIMARY_CLAIMS)}")
        if len(self.primary) > 3 or len(set(self.primary)) != len(self.primary):
            raise ConfigError("primary", self.primary, f"1-3 distinct of {list(PRIMARY_CLAIMS)}")
        if ({"hetero_hurts", "fednova_recovers"} & set(self.primary) and not self.hetero_steps
                or "fednova_recovers" in self.primary and "fednova" not in self.hetero_methods):
            raise ConfigError("primary", self.primary, "claims whose rows this profile computes (hetero_hurts and "
                                                       "fednova_recovers need hetero_steps; the latter fednova in "
                                                       "hetero_methods)")


@dataclass
class Resolved:
    """A resolved profile: the base run config and the typed settings."""
    profile: str
    base: ExperimentConfig
    settings: TaskArithmeticSettings

    def __getitem__(self, key):          # s["tasks"]: a settings field or, dotted, a base field
        return getattr(self.settings, key)


def settings_for(profile: str = "quick", path=None, **overrides) -> Resolved:
    """The profile (configs/task_arithmetic/<profile>.yaml) with overrides: a setting (``seeds``) or a dotted
    base field (``train.local_steps``); every value checked (ConfigError naming the field)."""
    from fedbench.models.checks import check_against_backbone
    prof = resolve_profile(EXPERIMENT, profile, overrides, TaskArithmeticSettings, path=path)
    base, s = prof.base, prof.settings
    if base is None:
        raise ConfigError("base", None, "a base run config in the profile")
    check_against_backbone(base)
    steps = base.train.local_steps
    if steps is None:
        raise ConfigError("train.local_steps", steps, "an integer >= 1 (each task's fine-tuning steps)")
    if any(r > steps for r in s.rounds):
        raise ConfigError("rounds", s.rounds, f"integers in [1, train.local_steps={steps}]")
    if base.train.dp.enabled and s.hetero_steps:
        raise ConfigError("train.dp.enabled", True, "false with hetero_steps (a DP budget per step count is "
                                                    "not defined here)")
    return Resolved(profile, base, s)


# -- each unit's config, key and grids ----------------------------------------------------------------

def run_config(base: ExperimentConfig, s: TaskArithmeticSettings, tuning: str, seed: int, rounds: int = 1,
               local_steps: int | None = None) -> ExperimentConfig:
    """The loop's config of one (tuning, seed), whole: one client per task (the task_clients federation), every
    client every round, heads frozen at each task's probe (the ``task_clients`` strategy), exact FedAvg of the task
    vectors for LoRA (``stack``)."""
    steps = local_steps or base.train.local_steps
    changes = {"name": EXPERIMENT, "seed": int(seed), "data.task": s.tasks[0], "data.num_clients": len(s.tasks),
               "data.partition": "iid", "peft.method": tuning, "peft.train_head": False, "fl.strategy": "task_clients",
               "fl.rounds": int(rounds), "fl.clients_per_round": 1.0, "fl.dropout": 0.0, "fl.aggregator": "fedavg",
               "fl.lora_aggregation": "stack" if TUNING_FACTS[tuning].lora else "factors",
               "train.local_steps": int(steps),
               "fl.options": {"probe_heads": s.head == "probe", "zero_shot_heads": s.head == "zero_shot"},
               "data.federation": "task_clients",
               "data.federation_options": {"tasks": list(s.tasks), "val_samples": s.val_samples,
                                           "probe_samples": s.probe_samples}}
    if TUNING_FACTS[tuning].own_lr:
        changes.update({"train.lr": float(s.full_lr), "peft.depth": None})
    return base.replace(**changes)


def unit_key(r: Resolved, tuning: str, seed: int, lr: float | None = None) -> dict:
    """A unit's run-store key: the whole resolved profile with this unit's seed and tuning (and the lr it was
    given), and the core's results schema (no hand-kept key list)."""
    from fedbench.results import RESULTS_SCHEMA
    settings = dataclasses.replace(r.settings, seeds=(int(seed),), tunings=(tuning,)).to_dict()
    key = {"experiment": EXPERIMENT, "base": r.base.to_dict(), "settings": settings, "schema": RESULTS_SCHEMA}
    if lr is not None:
        key["lr"] = float(lr)
    return key


def lr_grid(s: TaskArithmeticSettings, tuning: str, cfg: ExperimentConfig) -> list[float]:
    """The learning rates searched on validation: the settings' ``lrs``, else the config's one lr (a tuning with
    its own lr, full fine-tuning, always uses ``full_lr``)."""
    return [float(x) for x in s.lrs] if s.lrs and not TUNING_FACTS[tuning].own_lr else [float(cfg.train.lr)]


def per_task_grid(s: TaskArithmeticSettings, T: int) -> list[float]:
    """The lambda grid in per-task units: the settings' lambdas with 1/T added, ascending."""
    return sorted({float(x) for x in s.lambdas} | {1.0 / T})


def rho_grid(method: str, s: TaskArithmeticSettings, tvs) -> list[float]:
    """The second hyper-parameter's grid (the merge's `grid` fact; NaN: it has none)."""
    grid = MERGE_FACTS[method].grid
    return [float(x) for x in grid(s, tvs)] if grid is not None else [float("nan")]


def merge(method: str, tvs, w: float, rho: float, steps, seed: int, fedit_tv: dict | None = None) -> dict:
    """The merged task vector of `method` at per-task weight `w`: a sum-scale merge gets lam = w, a mean-scale
    one lam = w T (:func:`scale_of`), so every method gives each task vector the same weight at the same w.
    FedIT's is `fedit_tv` (s mean(B) mean(A), the FedIT round's dense update) scaled like a mean-scale merge."""
    facts = MERGE_FACTS[method]
    lam = w if scale_of(method) == "sum" else w * len(tvs)
    if not facts.registered:
        return OrderedDict((k, (lam * v.double()).to(v.dtype)) for k, v in fedit_tv.items())
    entry = MERGES.entry(method, "methods")
    kwargs = {entry.search: rho} if entry.search is not None else {}
    if facts.steps:
        kwargs["steps"] = list(steps)
    if facts.seeded:
        kwargs["seed"] = derive_seed(seed, "merge", 0)
    return entry.obj(tvs, lam=lam, **kwargs)
