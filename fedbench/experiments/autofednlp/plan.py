"""AutoFedNLP's plan: the settings, the methods (a table of per-method facts) and each run's config.

Every method is a loop run of the profile's ``base`` config (the package docstring); what differs between methods
is a :class:`Method` entry: its strategy and tuner (validated against STRATEGIES / TUNERS), the settings fields of
its learning-rate grid and rounds, and its clock (the configurator's strategy keeps its own simulated clock; a
FedAvg run is priced per round by :func:`method_clock`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from fedbench.bench import (
    Settings,
    check_list,
    check_seeds,
    is_int,
    is_number,
    resolve_profile,
)
from fedbench.config import ConfigError, ExperimentConfig

EXPERIMENT = "autofednlp"
NUM_LAYERS = 6     # the bundled MiniLM


@dataclass
class AutoFedNlpSettings(Settings):
    """The configurator's options, the baselines and which runs to do (the run config is the profile's ``base``)."""
    rounds: int = 200                   # cap on the configurator's loop rounds (one trial group's round each):
                                        # it ends on its own clock at horizon_s, like the fixed configurations
    depth_step: int = 1
    width_step: int = 8
    max_width: int = 64
    time_threshold: float = 4.0         # seconds; a period's budget = time_threshold * (expand * depth + 1)
    expand: int = 4
    device: str = "slow_phone"
    validation_samples: int = 500
    grid: tuple = ((1, 8), (2, 16), (4, 32))
    horizon_s: float = 300.0            # simulated seconds every fixed configuration trains for
    max_fixed_rounds: int = 80          # ... in at most this many rounds
    full_rounds: int = 6
    full_lr_grid: tuple[float, ...] = (1e-4, 3e-4)
    full_lr_rounds: int = 4             # rounds of each lr-search run of full FT (validation split)
    # the adapters' one lr (every fixed configuration and the configurator, as the official script takes one
    # lr): each value trains the starting configuration (base peft.depth x adapter_width) for adapter_lr_rounds
    # rounds, first seed, scored on the validation split; empty = base train.lr untuned
    adapter_lr_grid: tuple[float, ...] = ()
    adapter_lr_rounds: int = 8
    target_fraction: float = 0.95
    cache_rounds: int = 6               # rounds of the no-cache control (first seed; 0 = none)
    seeds: tuple[int, ...] = (0, 1, 2)
    # the calibration (calibration.py): every grid configuration for this many simulated seconds (at most
    # calibration_max_rounds rounds) on the validation rows, first seed; plateau = mean of the last plateau_rounds
    # rounds; a pair crosses when the deeper plateau is ahead by > crossover_margin (and 2 paired standard errors)
    calibration_horizon_s: float = 300.0
    calibration_max_rounds: int = 80
    plateau_rounds: int = 5
    plateau_tol: float = 0.01
    crossover_margin: float = 0.01
    decision_z: float = 0.0             # the configurator's decisions on an interval (ConfiguratorOptions)
    # seeds of the grid's other fixed configurations on test (exploratory rows); None = every seed. The best
    # fixed configuration on validation runs on every seed
    grid_seeds: tuple[int, ...] | None = None

    def validate(self) -> None:
        from fedbench.strategies.autofednlp import DEVICES
        for key, low in [("rounds", 1), ("depth_step", 1), ("width_step", 1), ("max_width", 1), ("expand", 0),
                         ("validation_samples", 2), ("max_fixed_rounds", 1), ("full_rounds", 1), ("full_lr_rounds", 1),
                         ("cache_rounds", 0), ("adapter_lr_rounds", 1), ("calibration_max_rounds", 1),
                         ("plateau_rounds", 1)]:
            if not is_int(getattr(self, key)) or getattr(self, key) < low:
                raise ConfigError(key, getattr(self, key), f"an integer >= {low}")
        if not is_number(self.horizon_s) or not 0 < self.horizon_s < float("inf"):
            raise ConfigError("horizon_s", self.horizon_s, "a number of simulated seconds > 0")
        for key in ("calibration_horizon_s", "plateau_tol", "crossover_margin", "decision_z"):
            v, positive = getattr(self, key), key == "calibration_horizon_s"
            if not is_number(v) or not np.isfinite(v) or v < 0 or (positive and v == 0):
                raise ConfigError(key, v, "a finite number " + ("> 0" if positive else ">= 0"))
        if not is_number(self.time_threshold) or not 0 < self.time_threshold < float("inf"):
            raise ConfigError("time_threshold", self.time_threshold, "a number of seconds > 0")
        if self.device not in DEVICES:
            raise ConfigError("device", self.device, f"one of {sorted(DEVICES)}")
        if not is_number(self.target_fraction) or not 0 < self.target_fraction <= 1:
            raise ConfigError("target_fraction", self.target_fraction, "a number in (0, 1]")
        grid = self.grid
        if (not isinstance(grid, (list, tuple)) or len(grid) == 0
                or any(not isinstance(g, (list, tuple)) or len(g) != 2 for g in grid)
                or any(not is_int(d) or not 1 <= d <= NUM_LAYERS or not is_int(w) or w < 1 for d, w in grid)):
            raise ConfigError("grid", grid, f"a non-empty list of (depth 1..{NUM_LAYERS}, width >= 1) pairs")
        self.grid = tuple(dict.fromkeys((int(d), int(w)) for d, w in grid))
        check_list("full_lr_grid", self.full_lr_grid, lambda x: is_number(x) and 0 < x <= 1,
                   "a non-empty list of numbers in (0, 1]")
        self.full_lr_grid = tuple(sorted(float(x) for x in self.full_lr_grid))
        check_list("adapter_lr_grid", self.adapter_lr_grid, lambda x: is_number(x) and 0 < x <= 1,
                   "a list of numbers in (0, 1] (empty: base train.lr untuned)", nonempty=False)
        self.adapter_lr_grid = tuple(sorted(float(x) for x in self.adapter_lr_grid))
        self.seeds = check_seeds("seeds", self.seeds)
        if self.grid_seeds is not None:
            self.grid_seeds = check_seeds("grid_seeds", self.grid_seeds) if len(self.grid_seeds) else ()
            if not set(self.grid_seeds) <= set(self.seeds):
                raise ConfigError("grid_seeds", list(self.grid_seeds), f"a subset of seeds {list(self.seeds)}")

    def options(self, cache: bool = True) -> dict:
        """The configurator's options (``fl.options`` of its runs); the no-cache control (``cache=False``) runs
        ``cache_rounds`` rounds, the configurator itself until the fixed configurations' horizon."""
        return {"depth_step": self.depth_step, "width_step": self.width_step, "max_width": self.max_width,
                "time_threshold": float(self.time_threshold), "expand": self.expand, "device": self.device,
                "validation_samples": self.validation_samples, "cache": cache,
                "horizon_s": float(self.horizon_s) if cache else None,
                **({"decision_z": float(self.decision_z)} if self.decision_z else {})}


# -- the methods ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One method's facts: everything the plan, the tables and the claims need to know about it."""
    name: str
    label: str
    strategy: str                       # fl.strategy (a STRATEGIES key)
    tuner: str = "adapter"              # peft.method (a TUNERS key)
    peft: dict = field(default_factory=dict)    # its changes to the base's peft (a fixed configuration, full FT)
    depth: int | None = None            # its configuration in the tables (None: the configurator's, per round)
    width: int | None = None
    lr_grid: str = "adapter_lr_grid"    # the settings field its lr is searched on (validation, first seed)
    lr_rounds: str = "adapter_lr_rounds"
    applies_to: str = "every adapter run"    # its lr_selection rows' `applies_to` (one adapter lr for all)
    rounds: str | None = None           # the settings field of its rounds; None: the horizon in its clock's rounds
    own_clock: bool = False             # the strategy keeps the simulated clock (else method_clock per round)
    cache: bool = True                  # the configurator's clients cache the frozen prefix (the control: not)
    control: bool = False               # a control run (not a compared method: no claims, no curves)
    grid: bool = False                  # a grid arm: on test only on grid_seeds, unless the best on validation


AUTOFEDNLP = Method("autofednlp", "AutoFedNLP", "autofednlp", rounds="rounds", own_clock=True)
NOCACHE = Method("autofednlp_nocache", "AutoFedNLP (no cache)", "autofednlp", rounds="cache_rounds",
                 own_clock=True, cache=False, control=True)
FULL_FT = Method("full_ft", "full FT (FedNLP)", "fedavg", tuner="full", peft={"peft.method": "full", "peft.depth": None},
                 depth=NUM_LAYERS, width=0, lr_grid="full_lr_grid", lr_rounds="full_lr_rounds", applies_to="full_ft",
                 rounds="full_rounds")
NAMED = {m.name: m for m in (AUTOFEDNLP, FULL_FT, NOCACHE)}


def fixed_name(d: int, w: int) -> str:
    return f"fixed_d{d}_w{w}"


def fixed(d: int, w: int) -> Method:
    """FedAvg with the adapter configuration (d, w) for the whole run."""
    return Method(fixed_name(d, w), f"fixed d={d}, w={w}", "fedavg",
                  peft={"peft.depth": int(d), "peft.adapter_width": int(w)}, depth=int(d), width=int(w), grid=True)


def method_facts(name: str) -> Method:
    """The facts of the method called `name` (one of :data:`NAMED` or ``fixed_d<d>_w<w>``)."""
    if name in NAMED:
        return NAMED[name]
    hit = re.fullmatch(r"fixed_d(\d+)_w(\d+)", str(name))
    if hit is None:
        raise ConfigError("method", name, f"one of {sorted(NAMED)} or fixed_d<depth>_w<width>")
    return fixed(int(hit[1]), int(hit[2]))


def label(name: str) -> str:
    return method_facts(name).label


def plan_methods(s: AutoFedNlpSettings) -> list[Method]:
    """The compared methods: the configurator, full FT and one fixed configuration per grid point."""
    return [AUTOFEDNLP, FULL_FT] + [fixed(d, w) for d, w in s.grid]


def methods_for(s: AutoFedNlpSettings) -> list[str]:
    return [m.name for m in plan_methods(s)]


def check_methods(methods) -> None:
    """ConfigError naming the field unless every method's strategy and tuner are registered."""
    from fedbench.registry import STRATEGIES, TUNERS
    for m in methods:
        if m.strategy not in STRATEGIES:
            raise ConfigError("fl.strategy", m.strategy, f"a registered strategy {STRATEGIES.names()} ({m.name})")
        if m.tuner not in TUNERS:
            raise ConfigError("peft.method", m.tuner, f"a registered tuner {TUNERS.names()} ({m.name})")


def settings_for(profile: str = "quick", path=None, **overrides):
    """(settings, base config) of the profile with `overrides` (dotted keys change the base)."""
    from fedbench.models.checks import check_against_backbone
    prof = resolve_profile(EXPERIMENT, profile, overrides, AutoFedNlpSettings, path=path)
    base = prof.base
    if base is None:
        raise ConfigError("base", None, "a base run config in the profile")
    if base.peft.method != "adapter":
        raise ConfigError("peft.method", base.peft.method, "'adapter' (the configurations are adapter depth x width)")
    check_against_backbone(base)
    check_methods([*plan_methods(prof.settings), NOCACHE])
    return prof.settings, base


# -- each run's config ----------------------------------------------------------------------------------------

def run_config(s: AutoFedNlpSettings, base: ExperimentConfig, method: str, seed: int,
               lr: float | None = None) -> ExperimentConfig:
    """The core config of one run (`method`: autofednlp[_nocache], full_ft or fixed_d{d}_w{w}); `lr`: full FT's,
    or the adapters' (None: base train.lr)."""
    m = method_facts(method)
    # every run prefills its caches at every depth (the runs of a seed share them: FederatedData.prefill)
    ch = {"seed": int(seed), "name": f"autofednlp-{method}", "fl.eval_every": 1,
          "data.federation_options": {"validation": None, "prefill": True}, "fl.strategy": m.strategy, **m.peft}
    if lr is not None:
        ch["train.lr"] = float(lr)
    if m.own_clock:
        ch["fl.options"] = s.options(cache=m.cache)
    cfg = base.replace(**ch)
    if m.rounds is not None:
        return cfg.replace(**{"fl.rounds": getattr(s, m.rounds)})
    return cfg.replace(**{"fl.rounds": horizon_rounds(s.horizon_s, s.max_fixed_rounds, method_clock(s, cfg))})


def horizon_rounds(horizon_s: float, max_rounds: int, round_s: float) -> int:
    """The rounds of `round_s` simulated seconds that reach `horizon_s` (at least 1, at most `max_rounds`)."""
    return min(max_rounds, max(1, int(np.ceil(horizon_s / round_s - 1e-9))))


def val_config(s: AutoFedNlpSettings, cfg: ExperimentConfig, method: str) -> ExperimentConfig:
    """`cfg`'s learning-rate search run: fewer rounds, evaluated on the validation carve of the training split."""
    return cfg.replace(**{"fl.rounds": getattr(s, method_facts(method).lr_rounds),
                          "data.federation_options.validation": s.validation_samples})


def calibration_config(s: AutoFedNlpSettings, cfg: ExperimentConfig) -> ExperimentConfig:
    """The calibration run of the fixed-configuration run `cfg`: calibration_horizon_s simulated seconds (at most
    calibration_max_rounds rounds), evaluated every round on the validation rows."""
    rounds = horizon_rounds(s.calibration_horizon_s, s.calibration_max_rounds, method_clock(s, cfg))
    return cfg.replace(**{"fl.rounds": rounds, "data.federation_options.validation": s.validation_samples})


_CLOCK: dict = {}


def method_clock(s: AutoFedNlpSettings, cfg: ExperimentConfig, device: str | None = None) -> float:
    """Simulated seconds of one round of the fedavg run `cfg` (a fixed configuration or full FT) on `device`
    (default: the settings'): local steps + the exact trainable state down and up."""
    from fedbench.data import load_task
    from fedbench.models import build_model, state_nbytes, trainable_state
    from fedbench.strategies.autofednlp import DEVICES, round_seconds
    key = (cfg.peft.method, cfg.peft.depth, cfg.peft.adapter_width, cfg.data.task)
    if key not in _CLOCK:
        n_labels = len(load_task(cfg.data.task)["train"].features["label"].names)
        _CLOCK[key] = int(state_nbytes(trainable_state(build_model(cfg.model, cfg.peft, n_labels, seed=0))))
    return round_seconds(DEVICES[device or s.device], cfg.peft.depth, _CLOCK[key], cfg.train.local_steps or 1,
                         cfg.train.batch_size, cfg.data.max_length, cached=True)


def final_config(s: AutoFedNlpSettings, base: ExperimentConfig, method: str, depth: int, width: int) -> ExperimentConfig:
    """A FedAvg run at a run's final configuration (`depth`, `width` for the configurator): what its round costs."""
    m = method_facts(method)
    peft = m.peft if not m.own_clock else fixed(depth, width).peft
    return base.replace(**{"fl.strategy": "fedavg", **peft})
