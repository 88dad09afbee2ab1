"""FedPEFT (arXiv 2210.01708): which parameters to train and send, under realistic FL conditions.

Seven methods under one FedAvg loop (full fine-tuning, head only, BitFit, bottleneck adapters, prompt
tuning, LoRA, (IA)^3) on the bundled MiniLM, and three conditions varied one at a time around a base
condition (the profile's first heterogeneity and stability levels, no DP; quick: Dirichlet(1.0), 3 of 10
clients per round):

- heterogeneity: IID or Dirichlet(alpha) label skew;
- client stability: a sampled fraction of the clients per round, and sampled clients that drop out
  before reporting (they received the model, so their download counts; they send nothing);
- differential privacy: DP-SGD on every client with Opacus (:mod:`fedbench.fl.privacy`) at target
  epsilons and the clipping-only control, at the profile's delta (1e-5); each client's epsilon is
  accounted over every round it took part in.

Every learning rate is chosen on a validation slice of the training split (:func:`tune`); the test split is
read only for the reported runs, and the search's run at the chosen lr is itself the reported seed-0 run,
evaluated on test after the choice (:class:`Runner`). The headline rows (every method, base condition,
several seeds) run on the first task; the other tasks run a subset of methods at the base condition, and the
axes a subset of methods (profile settings). Claims: :mod:`fedbench.experiments.fedpeft_claims`, on per-seed
scores (the mean accuracy of a run's last ``score_last_k`` evaluations). Every run is one :class:`ExperimentConfig`, cached by its hash
under ``runs_root()``, so an interrupted run resumes and a rerun only rebuilds the tables and figures.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedbench.bench.report import write_report
from fedbench.config import ConfigError, ExperimentConfig, PeftConfig
from fedbench.bench import (Settings, check_list, output_dir, resolve_profile, runs_root, save_figure,
                                         save_table, variant_note)
from fedbench.registry import TUNERS

EXPERIMENT = "fedpeft"
# display order: the reference first, then roughly from fewest to most trainable parameters
METHODS = ("full", "head", "prompt", "lora", "ia3", "bitfit", "adapter")

# AdamW (DP: DP-Adam) learning-rate grids per method, searched on the validation split (see tune);
# the profiles set their own. Under DP the search uses `dp_lr_grid` at every privacy level.
_LR_GRID = {"full": [1e-4, 3e-4, 1e-3], "head": [1e-2, 3e-2, 1e-1], "prompt": [1e-2, 3e-2, 1e-1],
            "lora": [3e-3, 1e-2, 3e-2], "ia3": [1e-2, 3e-2, 1e-1], "bitfit": [3e-3, 1e-2, 3e-2],
            "adapter": [3e-3, 1e-2, 3e-2]}
_DP_LR_GRID = {m: list(v[:2]) for m, v in _LR_GRID.items()}
LR_SELECTED_ON = "validation"

# The profiles live in configs/fedpeft/{smoke,quick,full}.yaml: `base` (what every run of the grid starts from)
# and `settings` (FedPEFTSettings, the grid). The short names below are the notebook's parameters for base fields.
ALIASES = {"clients": "data.num_clients", "rounds": "fl.rounds", "local_steps": "train.local_steps",
           "batch_size": "train.batch_size", "depth": "peft.depth", "max_train_samples": "data.max_train_samples",
           "max_test_samples": "data.max_test_samples", "max_length": "data.max_length",
           "dp_max_grad_norm": "train.dp.max_grad_norm", "dp_delta": "train.dp.delta",
           "optimizer": "train.optimizer"}


# base fields every cell sets itself (make_config), and the setting that controls each
GRID_FIELDS = {"seed": "seeds", "data.task": "tasks", "data.partition": "heterogeneity", "data.alpha": "heterogeneity",
               "peft.method": "methods", "train.lr": "lr_grid", "train.dp.enabled": "dp_epsilons",
               "train.dp.target_epsilon": "dp_epsilons", "train.dp.noise_multiplier": "clip_only", "fl.clients_per_round": "stability",
               "fl.dropout": "stability", "fl.eval_every": "axis_eval_every"}


@dataclass
class FedPEFTSettings(Settings):
    """The grid: tasks x methods x seeds at the base condition, and each axis varied alone around it."""
    tasks: tuple[str, ...] = ("tweet_sentiment", "ng20")
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    task_methods: tuple[str, ...] = ()          # methods run on the other tasks (base condition)
    task_seeds: tuple[int, ...] = (0,)          # seeds of the other tasks' runs
    axis_methods: tuple[str, ...] = ()          # methods run under every heterogeneity / stability level
    axis_seeds: tuple[int, ...] = (0,)
    heterogeneity: tuple = ("dirichlet-1.0", "iid")     # the first is the base condition
    stability: tuple = ((1.0, 0.0),)                    # (participation, dropout) pairs, the first the base
    dp_epsilons: tuple[float, ...] = ()                 # target epsilons (no DP is always run)
    clip_only: bool = False                             # also the clipping-only control (noise 0, eps = inf)
    dp_methods: tuple[str, ...] = ()                    # methods run at every privacy level (dp_seeds)
    dp_seeds: tuple[int, ...] = (0,)
    dp_first_seed_methods: tuple[str, ...] = ()         # of dp_methods: run on dp_seeds[0] only (time)
    clip_methods: tuple[str, ...] | None = None         # the clip-only control's methods (None: dp_methods),
    clip_seeds: tuple[int, ...] | None = None           # on these seeds (None: dp_seeds); resolved by validation
    lr_grid: dict = field(default_factory=lambda: {k: list(v) for k, v in _LR_GRID.items()})
    dp_lr_grid: dict = field(default_factory=lambda: {k: list(v) for k, v in _DP_LR_GRID.items()})
    validation_samples: int = 300                       # train-split examples outside the clients' (lr search)
    axis_eval_every: int = 2
    near_tolerance: float = 0.03
    score_last_k: int = 1                               # a run's score: mean accuracy of its last k evaluated rounds
    lr_extend: int = 0                                  # select_lr's extend: grid steps added past an edge choice
    dp_lr_extend: int = 0                               # the same for the searches under DP (dp_lr_grid)
    primary: tuple[str, ...] = ("near_full",)           # 1-3 kinds of fedpeft_claims.PRIMARY_KINDS
    primary_method: str = "lora"                        # the PEFT method the primary claims are about

    def validate(self) -> None:
        d = dataclasses.asdict(self)
        d["heterogeneity"], d["stability"] = list(d["heterogeneity"]), list(d["stability"])
        d["depth"] = None                # checked on the base config (against the backbone)
        validate_settings(d)


def takes_depth(method: str) -> bool:
    """Whether `method`'s `depth` setting limits it to the top layers (the tuner registry's fact)."""
    return bool(TUNERS.entry(method).facts.get("takes_depth"))


KEYS = ["task", "method", "partition", "alpha", "participation", "dropout", "dp_epsilon_target", "seed"]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a task, a method and one setting of each axis."""
    task: str
    method: str
    partition: str            # iid | dirichlet
    alpha: float | None       # Dirichlet alpha (None for iid)
    participation: float
    dropout: float
    dp_epsilon: float | None  # None = no DP; inf = clipping only (noise 0)
    seed: int

    @property
    def heterogeneity(self) -> str:
        return heterogeneity_label(self.partition, self.alpha)

    @property
    def stability(self) -> str:
        return stability_label(self.participation, self.dropout)

    @property
    def dp(self) -> str:
        return dp_label(self.dp_epsilon)


def dp_label(eps: float | None) -> str:
    """'none', 'clip only' (noise 0: epsilon infinite) or 'eps=8'."""
    if eps is None or (isinstance(eps, float) and math.isnan(eps)):
        return "none"
    return "clip only" if math.isinf(eps) else f"eps={eps:g}"


def dp_levels(s: dict) -> list:
    """The privacy levels run besides no DP: the clipping-only control (inf) and each target epsilon."""
    return ([math.inf] if s["clip_only"] else []) + [float(e) for e in s["dp_epsilons"]]


def dp_seeds_for(s: dict, method: str, eps: float) -> list[int]:
    """The seeds `method` runs at privacy level `eps` (inf: the clip-only control); [] if it does not run there."""
    if method not in s["dp_methods"]:
        return []
    if math.isinf(eps):
        return list(s["clip_seeds"]) if s["clip_only"] and method in s["clip_methods"] else []
    return list(s["dp_seeds"][:1]) if method in s["dp_first_seed_methods"] else list(s["dp_seeds"])


def dp_table_seeds(s: dict) -> list[int]:
    """Every seed some privacy level runs on (the dp table and figure read these; each row keeps its own)."""
    return [*s["dp_seeds"], *s["clip_seeds"]]


def heterogeneity_label(partition: str, alpha: float | None) -> str:
    return "iid" if partition == "iid" else f"dirichlet-{float(alpha)}"


def stability_label(participation: float, dropout: float) -> str:
    s = "all clients" if participation >= 1 else f"sample {participation:g}"
    return s if dropout == 0 else f"{s}, drop {dropout:g}"


# -- parameters -------------------------------------------------------------------------------------
def parse_heterogeneity(level) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'dirichlet-0.1' (or a bare number) -> ('dirichlet', 0.1)."""
    if isinstance(level, str) and level.strip().lower() == "iid":
        return "iid", None
    text = level.split("-", 1)[1] if isinstance(level, str) and level.lower().startswith("dirichlet-") else level
    try:
        alpha = float(text)
    except (TypeError, ValueError):
        alpha = float("nan")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError("heterogeneity", level, "'iid' or 'dirichlet-<alpha>' with alpha > 0, e.g. 'dirichlet-0.1'")
    return "dirichlet", alpha


def settings_for(profile: str = "quick", path=None, **overrides) -> dict:
    """The profile's grid settings (validated) with the base fields under their short names and the base
    config itself under ``"base"``. Overrides: a setting, a short name (``clients``) or a dotted field."""
    from fedbench.models.checks import check_against_backbone
    overrides = {ALIASES.get(k, k): v for k, v in overrides.items()}
    for key, setting in GRID_FIELDS.items():      # each cell sets these: a base value would be silently replaced
        if overrides.get(key) is not None:
            raise ConfigError(key, overrides[key], f"a field the grid sets per run: change the setting {setting!r}")
    prof = resolve_profile(EXPERIMENT, profile, overrides, FedPEFTSettings, path=path)
    base = prof.base
    check_against_backbone(base)         # peft.depth, max_length, ... against the backbone, before any work
    s = validate_settings({**dataclasses.asdict(prof.settings), "depth": None})
    s.update(base=base, clients=base.data.num_clients, rounds=base.fl.rounds, local_steps=base.train.local_steps,
             batch_size=base.train.batch_size, depth=base.peft.depth, max_train_samples=base.data.max_train_samples,
             max_test_samples=base.data.max_test_samples, max_length=base.data.max_length,
             dp_max_grad_norm=base.train.dp.max_grad_norm, dp_delta=base.train.dp.delta)
    _validate_scoring(s)                 # k against the rounds the base evaluates
    return s


def validate_settings(s: dict) -> dict:
    """Check every parameter; raise ConfigError naming the parameter, its value and what is allowed."""
    from fedbench.data import HUB_TASKS, OFFLINE_TASKS
    tasks = tuple(OFFLINE_TASKS) + tuple(HUB_TASKS)     # hub: CIFAR-100 on a ViT (the paper profile)
    check_list("tasks", s["tasks"], lambda t: t in tasks, f"a non-empty list of tasks from {list(tasks)}")
    for key in ("methods", "task_methods", "axis_methods", "dp_methods"):
        check_list(key, s[key], lambda m: m in TUNERS, f"a list of methods from {TUNERS.names()}",
                    nonempty=key == "methods")
    # these two only narrow dp_methods (a method outside dp_methods runs no DP whatever they say)
    check_list("dp_first_seed_methods", s["dp_first_seed_methods"], lambda m: m in TUNERS,
               f"a list of methods from {TUNERS.names()}", nonempty=False)
    if s["clip_methods"] is not None:
        check_list("clip_methods", s["clip_methods"], lambda m: m in TUNERS,
                   f"None (= dp_methods) or a list of methods from {TUNERS.names()}", nonempty=False)
    else:
        s["clip_methods"] = list(s["dp_methods"])
    is_seed = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    check_list("seeds", s["seeds"], is_seed, "a non-empty list of integers >= 0")
    for key in ("axis_seeds", "task_seeds", "dp_seeds"):
        check_list(key, s[key], is_seed, "a non-empty list of integers >= 0")
    if s["clip_seeds"] is not None:
        check_list("clip_seeds", s["clip_seeds"], is_seed, "None (= dp_seeds) or a non-empty list of integers >= 0")
    else:
        s["clip_seeds"] = list(s["dp_seeds"])
    if not isinstance(s["clip_only"], bool):
        raise ConfigError("clip_only", s["clip_only"], "true or false")
    v = s["validation_samples"]
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 2):
        raise ConfigError("validation_samples", v, "an integer >= 2 (training examples held out for the lr search)")
    check_list("heterogeneity", s["heterogeneity"], lambda v: True, "a non-empty list like ['dirichlet-1.0', 'iid']")
    s["heterogeneity"] = [parse_heterogeneity(v) for v in s["heterogeneity"]]
    check_list("stability", s["stability"],
                lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                and 0 < float(v[0]) <= 1 and 0 <= float(v[1]) < 1,
                "a non-empty list of [participation in (0, 1], dropout in [0, 1)] pairs, the first the base")
    s["stability"] = [(float(p), float(d)) for p, d in s["stability"]]
    check_list("dp_epsilons", s["dp_epsilons"],
                lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v),
                "a list of target epsilons > 0 (no DP is always run)", nonempty=False)
    run = set(s["methods"]) | set(s["task_methods"]) | set(s["axis_methods"]) | set(s["dp_methods"])
    for key, need in (("lr_grid", run), ("dp_lr_grid", set(s["dp_methods"]))):
        grid = s[key]
        ok = isinstance(grid, dict) and all(
            m in grid and isinstance(grid[m], (list, tuple)) and len(grid[m]) > 0
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 10 for x in grid[m])
            for m in need)
        if not ok:
            raise ConfigError(key, grid, f"a dict with a non-empty list of learning rates in (0, 10] for every method "
                              f"run, e.g. {_LR_GRID}")
    if s["depth"] is not None and not (isinstance(s["depth"], int) and 1 <= s["depth"] <= 6):
        raise ConfigError("depth", s["depth"], "None (every layer) or an integer in [1, 6] (top layers, LoRA/adapter)")
    if not (isinstance(s["axis_eval_every"], int) and not isinstance(s["axis_eval_every"], bool)
            and s["axis_eval_every"] >= 1):
        raise ConfigError("axis_eval_every", s["axis_eval_every"],
                          "an integer >= 1 (the last round is always evaluated)")
    check_list("near_tolerance", [s["near_tolerance"]], lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
                "an accuracy difference in [0, 1)")
    _validate_scoring(s)
    return s


def n_evaluated(rounds: int, every: int) -> int:
    """How many rounds a run evaluates (every `every`-th round and the last: fedbench.fl.server)."""
    return rounds // every + (rounds % every != 0)


def _validate_scoring(s: dict) -> None:
    """score_last_k against the rounds every cell evaluates (when the base is known), lr_extend, the primaries."""
    from fedbench.experiments.fedpeft_claims import PRIMARY_KINDS
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    k = s["score_last_k"]
    base = s.get("base")
    most = (min(n_evaluated(base.fl.rounds, base.fl.eval_every), n_evaluated(base.fl.rounds, s["axis_eval_every"]))
            if base is not None else None)
    if not (is_int(k) and k >= 1 and (most is None or k <= most)):
        raise ConfigError("score_last_k", k, "an integer >= 1, at most the number of rounds every run evaluates"
                          + (f" ({most}: fl.eval_every / axis_eval_every)" if most is not None else ""))
    for key in ("lr_extend", "dp_lr_extend"):
        if not (is_int(s[key]) and s[key] >= 0):
            raise ConfigError(key, s[key], "an integer >= 0 (grid steps the lr search may add)")
    check_list("primary", s["primary"], lambda v: v in PRIMARY_KINDS, f"1-3 of {list(PRIMARY_KINDS)}", nonempty=False)
    if len(s["primary"]) > 3 or len(set(s["primary"])) < len(s["primary"]):
        raise ConfigError("primary", s["primary"], f"at most 3 distinct kinds from {list(PRIMARY_KINDS)}")
    if s["primary_method"] not in TUNERS or s["primary_method"] in ("full", "head"):
        raise ConfigError("primary_method", s["primary_method"], "a PEFT method other than full and head")


# -- the grid ----------------------------------------------------------------------------------------
def build_cells(s: dict) -> list[Cell]:
    """Headline (tasks[0] x methods x seeds at the base condition), the base condition on the other tasks,
    and each axis varied alone around the base for the axis methods on tasks[0]. Duplicates removed."""
    (base_part, base_alpha), (base_p, base_d) = s["heterogeneity"][0], s["stability"][0]
    main = s["tasks"][0]

    def cell(task, method, seed, part=base_part, alpha=base_alpha, p=base_p, d=base_d, eps=None):
        return Cell(task, method, part, alpha, p, d, eps, seed)

    cells = [cell(main, m, seed) for m in s["methods"] for seed in s["seeds"]]
    cells += [cell(t, m, seed) for t in s["tasks"][1:] for m in s["task_methods"] for seed in s["task_seeds"]]
    for m in s["axis_methods"]:
        for seed in s["axis_seeds"]:
            cells.append(cell(main, m, seed))
            cells += [cell(main, m, seed, part=part, alpha=alpha) for part, alpha in s["heterogeneity"][1:]]
            cells += [cell(main, m, seed, p=p, d=d) for p, d in s["stability"][1:]]
    for m in s["dp_methods"]:
        for e in dp_levels(s):
            for seed in dp_seeds_for(s, m, e):
                cells += [cell(main, m, seed), cell(main, m, seed, eps=e)]
    seen, out = set(), []
    for c in cells:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def make_config(c: Cell, s: dict, lr: float | None = None, eval_every: int | None = None,
                validation: bool = False) -> ExperimentConfig:
    """The profile's base config with this cell's task, method, partition, participation, dropout and DP, at
    learning rate `lr` (default: the one chosen on validation for the cell's task, method and privacy level);
    `validation`: evaluated on the profile's validation carve of the training split instead of the test split.
    Every run prefills its activation caches (the runs of the experiment share them)."""
    eps = c.dp_epsilon
    if lr is None:
        lr = s["chosen_lr"][lr_key(c)]
    if eval_every is None:
        eval_every = s["base"].fl.eval_every if is_headline(c, s) else s["axis_eval_every"]
    return s["base"].replace(**{
        "seed": int(c.seed), "data.task": c.task, "data.partition": c.partition,
        "data.alpha": float(c.alpha) if c.alpha is not None else 1.0, "peft.method": c.method,
        "peft.depth": s["depth"] if takes_depth(c.method) else None, "train.lr": float(lr),
        "train.dp.enabled": eps is not None,
        "train.dp.target_epsilon": float(eps) if eps is not None and math.isfinite(eps) else None,
        "train.dp.noise_multiplier": 0.0 if eps is not None and math.isinf(eps) else None,
        "fl.clients_per_round": float(c.participation), "fl.dropout": float(c.dropout),
        "fl.eval_every": int(eval_every),
        "data.federation_options": {"validation": int(s["validation_samples"]) if validation else None,
                                    "prefill": True}})


def lr_key(c: Cell) -> tuple:
    """What a learning rate is chosen for: (task, method, privacy level)."""
    return (c.task, c.method, c.dp)


# -- learning rates, chosen on validation --------------------------------------------------------------
def tuning_cells(s: dict) -> list[tuple[Cell, float]]:
    """(cell, lr) of the learning-rate search: for every (task, method, privacy level) the profile runs, each lr
    of the method's grid (`dp_lr_grid` under DP) at the base condition on the first seed."""
    main, seed = s["tasks"][0], s["seeds"][0]
    keys = []
    for c in build_cells(s):
        k = (c.task, c.method, c.dp_epsilon)
        if k not in keys:
            keys.append(k)
    out = []
    for task, method, eps in keys:
        grid = s["lr_grid"][method] if eps is None else s["dp_lr_grid"][method]
        c = base_cell(s, task, method, seed if task == main else s["task_seeds"][0], dp_epsilon=eps)
        out += [(c, float(lr)) for lr in grid]
    return out


def is_headline(c: Cell, s: dict) -> bool:
    """A cell of the curves (any task, base condition, no DP): evaluated every ``fl.eval_every`` rounds, for the
    accuracy-vs-rounds and accuracy-vs-bytes figures; the others every `axis_eval_every` rounds + the last
    (an axis or DP cell is read at its final round only, so quick evaluates it there only)."""
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    return (c.partition == part and c.alpha == alpha and c.participation == p and c.dropout == d
            and c.dp_epsilon is None)


def variant(method: str, depth: int | None) -> str:
    """How a method was run, for the tables: LoRA/adapters on the top `depth` layers or on all six."""
    if takes_depth(method):
        return f"{method} (top {depth} layers)" if depth is not None else f"{method} (all layers)"
    return method


def dp_mechanism(trainable: int, batch_size: int) -> str:
    """Which Opacus mechanism DP-SGD used for a method (see fedbench.fl.privacy.clipping_mode)."""
    from fedbench.fl.privacy import auto_clipping_mode
    ghost = auto_clipping_mode(trainable, batch_size) == "ghost"
    return "Opacus ghost clipping" if ghost else "Opacus per-sample grads (hooks)"


# -- protocol -----------------------------------------------------------------------------------------
def protocol_table(profile: str = "quick") -> pd.DataFrame:
    """Paper / official code / ours (quick) / ours (full) / why, one row per protocol choice; read from the two
    profiles."""
    q, f = settings_for("quick"), settings_for("full")

    def grid(x):
        return f"{len(x['methods'])} methods ({', '.join(x['methods'])})"

    def run_shape(x):
        b = x["base"]
        return (f"{b.data.num_clients} clients, {b.fl.rounds} rounds x {b.train.local_steps} local steps of "
                f"{b.train.batch_size}, same for every method")

    def layers(x):
        return ("every layer" if x["depth"] is None else
                f"top {x['depth']} layer(s) + head for every method but head / prompt ('full' = full FT of them)")

    def dp(x):
        return (f"DP-Adam (Opacus: Poisson sampling, per-sample clip {x['dp_max_grad_norm']:g}, Gaussian noise), "
                f"eps {', '.join(f'{e:g}' for e in x['dp_epsilons'])} + clipping only, delta {x['dp_delta']:g}, "
                f"{len(x['dp_methods'])} methods x {len(x['dp_seeds'])} seed(s)"
                + (f" ({', '.join(x['dp_first_seed_methods'])}: 1 seed)" if x["dp_first_seed_methods"] else "")
                + (f"; clip only: {', '.join(x['clip_methods'])} x {len(x['clip_seeds'])} seed(s)"
                   if x["clip_only"] else ""))

    def axes(x):
        het = ", ".join(heterogeneity_label(*h) for h in x["heterogeneity"])
        st = "; ".join(stability_label(*p) for p in x["stability"])
        return f"{het} | {st}: {', '.join(x['axis_methods'])} x {len(x['axis_seeds'])} seed(s)"

    def stats(x):
        b = x["base"]
        return (f"headline {len(x['seeds'])} seeds x {b.data.max_test_samples} test examples; claims by "
                f"fedbench.claims on per-seed scores (t over seeds, df = seeds - 1)")

    def lrs(x):
        return (f"grid per method and privacy level on {x['validation_samples']} held-out training examples "
                f"(seed {x['seeds'][0]}, base condition), reused for every seed and axis")

    def scoring(x):
        b = x["base"]
        return (f"a run's score = mean test accuracy of its last {x['score_last_k']} evaluated rounds (evaluated "
                f"every {b.fl.eval_every} of {b.fl.rounds}); primary: {', '.join(x['primary'])} about "
                f"{x['primary_method']} on {x['tasks'][0]}, {len(x['seeds'])} seeds, Holm")

    none = "no official code found (we located no public repository of the paper)"
    rows = [
        ("backbone", "ViT-B: ~328 MB per round for full FT vs ~0.68 MB for PEFT", none, "all-MiniLM-L6-v2 (22.7M)",
         "all-MiniLM-L6-v2 (22.7M)", "bundled offline; 2 CPU cores. Text, not images"),
        ("data", "CIFAR-100 and the other image sets the paper reports", none, f"{', '.join(q['tasks'])}; "
         f"{q['base'].data.max_train_samples} train examples", f"{', '.join(f['tasks'])}; "
         f"{f['base'].data.max_train_samples} train examples", "offline text tasks (no image backbone ships offline); "
         f"{q['tasks'][0]} first (the primary task): the one where full FT beats head-only by >= 0.05 on validation "
         "(headroom.csv; the others are exploratory)"),
        ("methods", "full, head, bias, adapter, prompt, LoRA", none, grid(q), grid(f),
         "quick: full FT, head-only and LoRA (the primaries' arms); IA3, BitFit, adapters and prompt tuning moved to "
         "quick-complete (prompt tokens enter at the input: no cached prefix, ~6x a run)"),
        ("trained layers", "every layer", none, layers(q), layers(f),
         "quick: top 2 layers, since on wordnet_noun validation full FT of the top layer beat head-only by 0.024 only "
         "(top 2: 0.074); the frozen prefix is computed once per task and seed and shared by all runs"),
        ("federation", "the paper's FedAvg setting", none, run_shape(q), run_shape(f),
         "equal client updates per method"),
        ("learning rates", "not documented", none, lrs(q), lrs(f), "chosen on validation only; test is never read for "
         f"it; a choice at a grid edge adds up to {q['lr_extend']} grid step(s) beyond it (common.select_lr)"),
        ("privacy", "DP-SGD on every client", none, dp(q), dp(f),
         "one optimizer at every level, re-tuned under DP; the comparative claim measures each method's drop from "
         "its own clip-only run (the noise's cost), beside the drop from no DP"),
        ("axes", "IID vs Dirichlet; sampling; dropout", none, axes(q), axes(f),
         "quick: full FT and the primary method on the primary seeds; the rest moved to quick-complete"),
        ("scoring, claims", "final accuracy", none, scoring(q), scoring(f),
         "a mean over the last evaluations, not one round (one LoRA seed fell 0.19 in its last round)"),
        ("statistics", "not stated in our notes", none, stats(q), stats(f), ">= 5 seeds on the primaries, >= 1000 test "
         "examples; every other row exploratory"),
    ]
    return pd.DataFrame(rows, columns=["aspect", "paper", "official code", "ours (quick)", "ours (full)", "why"])


def protocol_markdown(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    body = "".join("| " + " | ".join(str(v).replace("|", "/") for v in row) + " |\n" for row in table.values)
    return ("# FedPEFT protocol: paper / official code / ours (generated by fedbench.experiments.fedpeft."
            "protocol_table)\n\n" + head + body)


# -- running -----------------------------------------------------------------------------------------
@dataclass
class FedPEFTResult:
    settings: dict
    summary: pd.DataFrame
    metrics: pd.DataFrame
    tables: dict = field(default_factory=dict)
    claims: pd.DataFrame | None = None
    figures: dict = field(default_factory=dict)


class SharedCaches:
    """Frozen-prefix activation caches shared by every run on the same training/test sample.

    The clients' data differ between partitions, but the subsample and its tokens depend only on (task,
    sizes, seed), and the frozen bottom layers are the pretrained ones whatever the method, so one cache
    per sample and depth serves head, LoRA and adapter runs alike. Each is filled once, before its first
    run, in a fixed order (by length, then index): the cached values, and so every run's numbers, do not
    depend on which runs came first or were already on disk. `methods` (those the profile runs) name the
    depths to fill: all of them are filled in one pass (``ActivationCache.fill_depths``: the head's six
    frozen layers are the top-layer methods' five plus one, not six more), with the same values as one
    fill per depth.
    """

    def __init__(self, methods=()):
        self.pool: dict[tuple, tuple] = {}
        self.filled: set[tuple[str, int]] = set()
        self.methods = tuple(methods)
        self._model = None

    @staticmethod
    def sample_key(cfg) -> str:
        from fedbench.config import config_hash
        d = cfg.data
        return config_hash({"task": d.task, "max_train_samples": d.max_train_samples, "max_length": d.max_length,
                            "max_test_samples": d.max_test_samples, "backbone": cfg.model.backbone, "seed": cfg.seed})

    def frozen_prefix(self, cfg, num_layers: int, method: str | None = None) -> int:
        """Frozen layers below what `method` (default: cfg's) trains, at cfg's depth."""
        method = method or cfg.peft.method
        if method == "head":
            return num_layers
        if takes_depth(method) and cfg.peft.depth is not None:
            return num_layers - cfg.peft.depth
        return 0

    def get(self, cfg, data, evaluation: str = "test"):
        """(train, evaluation) caches for `cfg` on `data`; `evaluation` names the evaluated split ("test" or
        the validation slice): the training cache is shared by both."""
        import torch

        from fedbench.models import build_model
        from fedbench.models.inputs import ActivationCache
        key = (self.sample_key(cfg), evaluation)
        if key not in self.pool:
            train = next((v[0] for k, v in self.pool.items() if k[0] == key[0]), None)
            self.pool[key] = (train or ActivationCache(data.train, data.pad_id), ActivationCache(data.test, data.pad_id))
        if self._model is None:      # the plain pretrained layers compute every prefix
            self._model = build_model(cfg.model, PeftConfig(method="head"), data.num_labels, seed=0)
        depth = self.frozen_prefix(cfg, self._model.num_layers)
        if depth > 0 and (key, depth) not in self.filled:
            n = self._model.num_layers
            depths = sorted({depth} | {d for m in self.methods if (d := self.frozen_prefix(cfg, n, m)) > 0})
            with torch.no_grad():
                for cache, idx in zip(self.pool[key], (np.arange(len(data.train)), np.asarray(data.test_indices))):
                    if not all(int(i) in cache._stores.get(d, {}) for d in depths for i in idx):
                        cache.fill_depths(self._model, idx, depths)
            self.filled.update((key, d) for d in depths)
        return self.pool[key]


def _clone_global(gm):
    from fedbench.fl.strategy import GlobalModel
    clone = lambda d: type(d)((k, v.detach().clone()) for k, v in d.items())  # noqa: E731
    return GlobalModel(clone(gm.state), clone(gm.base_delta), gm.down_bytes)


def search_run(cfg, test_cfg, data, caches, checkpoint_dir):
    """:func:`fedbench.fl.server.run_federated` of the validation config `cfg` (the same round loop and
    checkpoints), also keeping (:class:`fedbench.fl.server.HeldRun`) the global model at each round `test_cfg` evaluates. `test_cfg`
    is `cfg` but for ``fl.eval_every``: evaluation does not touch the training, so its training is this one.
    A run resumed from a checkpoint keeps nothing (its earlier rounds' models are gone): (result, None)."""
    from fedbench.fl.server import run_federated
    rounds, every = cfg.fl.rounds, test_cfg.fl.eval_every
    evaluated = {r for r in range(1, rounds + 1) if r % every == 0 or r == rounds}
    snapshots, last = {}, []

    def keep(run, r):
        last[:] = [run]
        if r in evaluated:
            snapshots[r] = _clone_global(run.global_model)

    result = run_federated(cfg, data, caches=caches, checkpoint_dir=checkpoint_dir, after_round=keep)
    if not last or set(snapshots) != evaluated:       # resumed: the earlier rounds' models are gone
        return result, None
    return result, last[0].hold(snapshots)


def replay_on_test(test_cfg, held, data, caches):
    """The RunResult :func:`run_federated` gives for `test_cfg`, from a held validation run of the same
    training (:meth:`fedbench.fl.server.FederatedRun.replay`): the test split is evaluated (for the first time)
    at the rounds `test_cfg` evaluates, on the global model held from those rounds; every other record (bytes,
    losses, epsilon) is the training's own."""
    from fedbench.fl.server import FederatedRun
    return FederatedRun(test_cfg, data, caches).replay(held)


def _same_training(cfg, test_cfg) -> bool:
    """Whether `cfg` and `test_cfg` differ at most in what they evaluate (``fl.eval_every``, the evaluated
    split), so they train identically."""
    return cfg.replace(**{"fl.eval_every": test_cfg.fl.eval_every, "data.federation_options.validation":
                          test_cfg.data.federation_options["validation"]}).hash() == test_cfg.hash()


class Runner:
    """Runs (or loads from the run store) one config on the test split or on the validation slice, sharing the
    prepared data and the frozen-prefix caches between runs.

    A validation run given the `test_cfg` of the same training (:func:`tune` passes the reported cell's config
    at that lr) is held (:class:`fedbench.fl.server.HeldRun`); once the lr is chosen (:meth:`keep_only`), the reported run of that
    config is replayed from it on test (:func:`replay_on_test`) instead of trained again. The replay gives the
    run :func:`run_federated` gives (tested), so whether a run was replayed or trained never shows in a number.
    """

    def __init__(self, s: dict):
        methods = {*s["methods"], *s["task_methods"], *s["axis_methods"], *s["dp_methods"]}
        self.s, self.data, self.caches = s, {}, SharedCaches([m for m in METHODS if m in methods])
        self.held: dict = {}          # run key of the test config -> held validation run

    @staticmethod
    def evaluation(cfg) -> str:
        """"test", or "validation" for a run evaluated on the validation carve (its config says which)."""
        return "test" if cfg.data.federation_options["validation"] is None else "validation"

    def _data(self, cfg, evaluation: str):
        """The run's data (what :func:`fedbench.fl.data.build_data` gives for `cfg`), shared by every method run
        on the same clients."""
        import dataclasses

        from fedbench.config import config_hash
        from fedbench.fl import prepare_data, prepare_validation
        d = cfg.to_dict()["data"]
        d.pop("federation_options")
        key = config_hash({"data": d, "backbone": cfg.model.backbone, "seed": cfg.seed})
        if (key, "test") not in self.data:
            self.data[(key, "test")] = dataclasses.replace(prepare_data(cfg), prefill=True)
        if evaluation != "test" and (key, evaluation) not in self.data:
            self.data[(key, evaluation)] = prepare_validation(cfg, int(self.s["validation_samples"]),
                                                              self.data[(key, "test")])
        return self.data[(key, evaluation)]

    def keep_only(self, test_cfgs) -> None:
        """Drop every held run but those of `test_cfgs` (the chosen learning rates' reported configs)."""
        from fedbench.results import run_key
        keep = {run_key(c, "inprocess") for c in test_cfgs}
        self.held = {k: v for k, v in self.held.items() if k in keep}

    def run(self, cfg, test_cfg=None):
        """(result, whether it was on disk). A run on the validation carve (its config says so: the lr search;
        the test split is not loaded into the run) may be given `test_cfg`, the reported config of the same
        training, to hold the run for (see the class)."""
        from fedbench.fl.server import run_federated
        from fedbench.results import cached_run, load_run, run_key, save_run
        evaluation, engine = self.evaluation(cfg), "inprocess"
        key = run_key(cfg, engine)
        done = load_run(key, runs_root())
        if done is not None:
            return done, True
        data = self._data(cfg, evaluation)
        caches = self.caches.get(cfg, data, evaluation)
        if evaluation == "test" and key in self.held:
            result = replay_on_test(cfg, self.held.pop(key), data, caches)
            save_run(result, key, runs_root())
            return result, False
        if evaluation != "test" and test_cfg is not None and _same_training(cfg, test_cfg):
            out = {}

            def compute(ckpt):
                result, out["held"] = search_run(cfg, test_cfg, data, caches, ckpt)
                return result
            result = cached_run(cfg, compute, root=runs_root(), engine=engine)
            if out.get("held") is not None:
                self.held[run_key(test_cfg, "inprocess")] = out["held"]
            return result, False
        return cached_run(cfg, lambda ckpt: run_federated(cfg, data, caches=caches, checkpoint_dir=ckpt),
                          root=runs_root(), engine=engine), False


def tune(s: dict, runner: Runner, progress: bool = True) -> pd.DataFrame:
    """The learning-rate search on validation; sets ``s["chosen_lr"]`` and returns the table (lr_selection.csv).
    Per (task, method, privacy level): fedbench.bench.select_lr over the grid (the highest final
    validation accuracy; ties: the smaller lr), extended past an edge choice by up to ``lr_extend`` grid steps
    (``dp_lr_extend`` under DP)."""
    import time

    from fedbench.bench import select_lr
    t0 = time.perf_counter()
    groups: dict = {}
    for c, lr in tuning_cells(s):
        groups.setdefault(lr_key(c), (c, []))[1].append(lr)
    rows, chosen = [], {}
    for key, (c, grid) in groups.items():
        def score(lr, c=c):
            cfg = make_config(c, s, lr=lr, eval_every=s["base"].fl.rounds, validation=True)
            result, cached = runner.run(cfg, test_cfg=make_config(c, s, lr=lr))
            acc = float(result.summary["final_accuracy"])
            if progress:
                status = "cached" if cached else f"{result.summary['wall_s']:.0f}s"
                print(f"[lr] {c.task} {c.method:7s} {c.dp:9s} lr={lr:g}: validation acc={acc:.3f} ({status}, "
                      f"{time.perf_counter() - t0:.0f}s total)", flush=True)
            return acc
        extend = s["lr_extend"] if c.dp_epsilon is None else s["dp_lr_extend"]
        chosen[key], got = select_lr(c.method, grid, score, metric="validation_accuracy", extend=extend)
        rows += [{"task": c.task, "privacy": c.dp, "seed": c.seed, **r} for r in got]
    s["chosen_lr"] = chosen
    runner.keep_only([make_config(c, s, lr=chosen[key]) for key, (c, _) in groups.items()])
    table = pd.DataFrame(rows)
    if len(table):
        first = ["task", "method", "privacy", "seed", "lr", "validation_accuracy"]
        table = table[first + [col for col in table.columns if col not in first]].assign(selected_on=LR_SELECTED_ON)
        if "extension" in table:             # searches run without extension score the grid alone
            table["extension"] = table["extension"].fillna(0).astype(int)
    return table


def last_k_score(rounds: pd.DataFrame, k: int) -> float:
    """A run's score: the mean test accuracy of its last `k` evaluated rounds (what every claim compares)."""
    acc = rounds["accuracy"].dropna()
    if len(acc) < k:
        raise ValueError(f"a run evaluated {len(acc)} rounds, fewer than score_last_k = {k}")
    return float(acc.iloc[-k:].mean())


def run_cells(cells: list[Cell], s: dict, progress: bool = True, runner: Runner | None = None
              ) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Run (or load) every cell at its validation-chosen lr (``s["chosen_lr"]``, from :func:`tune`); returns
    (summary rows, long per-round metrics, {cell: per-example 0/1 of the final evaluation, by test index})."""
    import time
    runner = runner or Runner(s)
    summary_rows, metric_frames, correct = [], [], {}
    t0 = time.perf_counter()
    for i, c in enumerate(cells, 1):
        cfg = make_config(c, s)
        result, cached = runner.run(cfg)
        done = result if cached else None
        sm = result.summary
        correct[c] = result.correct
        keys = {"task": c.task, "method": c.method, "partition": c.partition, "alpha": c.alpha,
                "participation": c.participation, "dropout": c.dropout, "dp_epsilon_target": c.dp_epsilon,
                "seed": c.seed}
        summary_rows.append({
            **keys, "variant": variant(c.method, cfg.peft.depth), "heterogeneity": c.heterogeneity,
            "stability": c.stability, "dp": c.dp,
            "dp_epsilon_spent": sm.get("dp_epsilon_spent", float("nan")),
            "dp_delta": float(cfg.train.dp.delta) if c.dp_epsilon is not None and cfg.train.dp.delta is not None
            else float("nan"),
            "lr": float(cfg.train.lr), "lr_selected_on": LR_SELECTED_ON,
            "dp_mechanism": dp_mechanism(sm["trainable_params"], s["batch_size"]) if c.dp_epsilon else "",
            "trainable_params": sm["trainable_params"], "total_params": sm["total_params"],
            "bytes_up_per_round": sm["bytes_up_per_round"], "bytes_down_per_round": sm["bytes_down_per_round"],
            "state_bytes": sm["state_bytes"], "total_bytes": sm["total_bytes"],
            "final_accuracy": sm["final_accuracy"], "best_accuracy": sm["best_accuracy"],
            "score": last_k_score(result.rounds, s["score_last_k"]), "final_loss": sm["final_loss"],
            "rounds": sm["rounds"], "wall_s": sm["wall_s"], "config_hash": cfg.hash()})
        r = result.rounds.drop(columns=["wall_s"], errors="ignore")
        long = r.melt(id_vars=["round"], var_name="metric", value_name="value")
        for k, v in reversed(list(keys.items())):
            long.insert(0, k, v)
        metric_frames.append(long)
        if progress:
            status = "cached" if done is not None else f"{sm['wall_s']:.0f}s"
            print(f"[{i}/{len(cells)}] {c.task} {c.method:7s} {c.heterogeneity:13s} {c.stability:22s} {c.dp:7s} "
                  f"seed={c.seed}: acc={sm['final_accuracy']:.3f} ({status}, {time.perf_counter() - t0:.0f}s total)",
                  flush=True)
    summary = pd.DataFrame(summary_rows)
    metrics = pd.concat(metric_frames, ignore_index=True) if metric_frames else pd.DataFrame()
    return summary, metrics, correct


def run(profile: str = "quick", progress: bool = True, path=None, **overrides) -> FedPEFTResult:
    """Run the FedPEFT grid of `profile` (parameters overridable), write results/fedpeft[/profile]/."""
    s = settings_for(profile, path, **overrides)
    cells = build_cells(s)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    runner = Runner(s)
    lr_table = tune(s, runner, progress=progress)
    summary, metrics, correct = run_cells(cells, s, progress=progress, runner=runner)
    save_table(summary, out, "summary.csv")
    save_table(metrics, out, "metrics.csv")
    tables = {**make_tables(summary, s), "lr_selection": lr_table}
    for name, df in tables.items():
        save_table(df, out, f"{name}.csv")
    from fedbench.experiments.fedpeft_claims import headroom_table, make_claims
    tables["headroom"] = headroom_table(lr_table, s)
    save_table(tables["headroom"], out, "headroom.csv")
    claims = make_claims(summary, s, tables["headroom"])
    save_table(claims, out, "claims.csv")
    from fedbench.results import atomic_write_text
    tables["protocol"] = protocol_table()
    atomic_write_text(out / "PROTOCOL.md", variant_note(path) + protocol_markdown(tables["protocol"]))
    figures = make_figures(summary, metrics, s)
    for name, fig in figures.items():
        save_figure(fig, out, name)
    write_report(EXPERIMENT, out)
    return FedPEFTResult(settings=s, summary=summary, metrics=metrics, tables=tables, claims=claims, figures=figures)


# -- analysis ----------------------------------------------------------------------------------------
def _base_mask(df: pd.DataFrame, s: dict) -> pd.Series:
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    m = (df["partition"] == part) & (df["participation"] == p) & (df["dropout"] == d) & df["dp_epsilon_target"].isna()
    return m & (df["alpha"].isna() if alpha is None else (df["alpha"] == alpha))


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f}" if not np.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def headline_table(summary: pd.DataFrame, s: dict) -> pd.DataFrame:
    """Per task and method at the base condition: parameters, exact bytes, accuracy mean ± std over seeds."""
    base = summary[_base_mask(summary, s)]
    rows = []
    for (task, method), g in base.groupby(["task", "method"], sort=False):
        full = base[(base["task"] == task) & (base["method"] == "full")]
        full_bytes = float(full["bytes_up_per_round"].iloc[0]) if len(full) else float("nan")
        acc, sc = g["final_accuracy"], g["score"]
        rows.append({
            "task": task, "method": method, "variant": g["variant"].iloc[0], "seeds": len(g),
            "trainable_params": int(g["trainable_params"].iloc[0]),
            "bytes_up_per_round": float(g["bytes_up_per_round"].iloc[0]),
            "bytes_down_per_round": float(g["bytes_down_per_round"].iloc[0]),
            "MB_per_client_per_round": float(g["state_bytes"].iloc[0]) / 1e6,
            "bytes_pct_of_full": 100 * float(g["bytes_up_per_round"].iloc[0]) / full_bytes,
            "total_MB": float(g["total_bytes"].mean()) / 1e6,
            "final_accuracy_mean": float(acc.mean()), "final_accuracy_std": float(acc.std()),
            "final_accuracy": _fmt(acc.mean(), acc.std()), "score_mean": float(sc.mean()),
            "score": _fmt(sc.mean(), sc.std()), "best_accuracy_mean": float(g["best_accuracy"].mean())})
    df = pd.DataFrame(rows)
    if len(df):
        df["_o"] = df["method"].map({m: i for i, m in enumerate(METHODS)})
        df = df.sort_values(["task", "_o"], key=lambda c: c.map({t: i for i, t in enumerate(s["tasks"])})
                            if c.name == "task" else c, kind="stable").drop(columns="_o").reset_index(drop=True)
    return df


def axis_table(summary: pd.DataFrame, s: dict, axis: str) -> pd.DataFrame:
    """Accuracy (mean ± std over axis seeds) of each axis method at every level of one axis, others at base."""
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    methods, seeds = ((s["dp_methods"], dp_table_seeds(s)) if axis == "dp"
                      else (s["axis_methods"], s["axis_seeds"]))
    df = summary[(summary["task"] == s["tasks"][0]) & summary["method"].isin(methods)
                 & summary["seed"].isin(seeds)]
    het_base = (df["partition"] == part) & (df["alpha"].isna() if alpha is None else (df["alpha"] == alpha))
    stab_base = (df["participation"] == p) & (df["dropout"] == d)
    dp_base = df["dp_epsilon_target"].isna()
    keep = {"heterogeneity": stab_base & dp_base, "stability": het_base & dp_base, "dp": het_base & stab_base}[axis]
    df = df[keep]
    levels = {"heterogeneity": [heterogeneity_label(pa, al) for pa, al in s["heterogeneity"]],
              "stability": [stability_label(pp, dd) for pp, dd in s["stability"]],
              "dp": ["none"] + [dp_label(e) for e in dp_levels(s)]}[axis]
    rows = []
    for method in [m for m in METHODS if m in methods]:
        base = df[(df["method"] == method) & (df[axis] == levels[0])]
        for level in levels:
            g = df[(df["method"] == method) & (df[axis] == level)]
            if not len(g):
                continue
            acc, sc = g["final_accuracy"], g["score"]
            ref = base[base["seed"].isin(g["seed"])]["score"].mean()     # the drop on the same seeds, in score
            row = {"method": method, "variant": g["variant"].iloc[0], axis: level, "seeds": len(g),
                   "final_accuracy_mean": float(acc.mean()), "final_accuracy_std": float(acc.std()),
                   "final_accuracy": _fmt(acc.mean(), acc.std()), "score_mean": float(sc.mean()),
                   "score": _fmt(sc.mean(), sc.std()), "drop_vs_base": float(ref - sc.mean()),
                   "total_MB": float(g["total_bytes"].mean()) / 1e6, "lr": float(g["lr"].iloc[0])}
            if axis == "dp":
                row["dp_epsilon_spent_max"] = float(g["dp_epsilon_spent"].max()) if level != "none" else float("nan")
                row["dp_mechanism"] = g["dp_mechanism"].iloc[0] if level != "none" else ""
                row["dp_supported"] = "yes" if level == "none" or g["final_accuracy"].notna().all() else "no"
            rows.append(row)
    return pd.DataFrame(rows)


def dp_support_table(summary: pd.DataFrame, s: dict) -> pd.DataFrame:
    """Whether and how DP-SGD runs with each method: every method is supported by fedbench.fl.privacy
    (the clipped update of each is checked exact against one-example autograd in tests/test_privacy.py);
    the mechanism follows from the trainable-parameter count; and whether this profile ran it."""
    from fedbench.registry import TUNERS
    how = {m: TUNERS.entry(m).opacus for m in METHODS}      # what DP-SGD's per-sample gradients go through
    rows = []
    for m in METHODS:
        g = summary[summary["method"] == m]
        trainable = int(g["trainable_params"].iloc[0]) if len(g) else None
        ran = g[g["dp_epsilon_target"].notna()]
        rows.append({"method": m, "dp_supported": "yes",
                     "mechanism": dp_mechanism(trainable, s["batch_size"]) if trainable is not None else "",
                     "run_under_dp_here": "yes" if len(ran) else "no (not in this profile's dp_methods)",
                     "note": how[m]})
    return pd.DataFrame(rows)


def make_tables(summary: pd.DataFrame, s: dict) -> dict[str, pd.DataFrame]:
    return {"headline": headline_table(summary, s), "heterogeneity": axis_table(summary, s, "heterogeneity"),
            "stability": axis_table(summary, s, "stability"), "dp": axis_table(summary, s, "dp"),
            "dp_support": dp_support_table(summary, s)}


# -- claims ------------------------------------------------------------------------------------------
def base_cell(s: dict, task: str, method: str, seed: int, **change) -> Cell:
    """The cell of (task, method, seed) at the base condition, with `change` (partition/alpha, participation/
    dropout or dp_epsilon) applied."""
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    fields = dict(partition=part, alpha=alpha, participation=p, dropout=d, dp_epsilon=None) | change
    return Cell(task, method, fields["partition"], fields["alpha"], fields["participation"], fields["dropout"],
                fields["dp_epsilon"], seed)


# -- figures -----------------------------------------------------------------------------------------
def _wide(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics.pivot_table(index=KEYS + ["round"], columns="metric", values="value", dropna=False).reset_index()


def make_figures(summary: pd.DataFrame, metrics: pd.DataFrame, s: dict) -> dict:
    """The figure set (fedbench.plots): accuracy vs rounds and vs MB (log x) at the base condition, the DP drop
    per method, the heterogeneity x method heatmap and client stability, each mean over seeds with intervals."""
    from fedbench import plots
    colors = plots.method_colors([variant(m, s["depth"]) for m in METHODS])
    order = [variant(m, s["depth"]) for m in METHODS]
    figs = {}
    wide = _wide(metrics.assign(alpha=metrics["alpha"].fillna(-1),
                                dp_epsilon_target=metrics["dp_epsilon_target"].fillna(-1)))
    wide = wide.replace({"alpha": {-1: np.nan}, "dp_epsilon_target": {-1: np.nan}})
    base = wide[_base_mask(wide, s)].dropna(subset=["accuracy"]).copy()
    base["variant"] = [variant(m, s["depth"]) for m in base["method"]]
    base["MB"] = base["cumulative_bytes"] / 1e6
    if len(base):
        figs["accuracy_vs_rounds.png"] = plots.curves(base, "round", "accuracy", hue="variant", facet="task",
                                                      colors=colors, order=order, ylabel="test accuracy")
        figs["accuracy_vs_mb.png"] = plots.curves(base, "MB", "accuracy", hue="variant", facet="task", logx=True,
                                                  colors=colors, order=order, ylabel="test accuracy",
                                                  xlabel="MB communicated (up + down, cumulative)")
    main = summary[(summary["task"] == s["tasks"][0]) & summary["method"].isin(s["axis_methods"])
                   & summary["seed"].isin(s["axis_seeds"])].copy()
    main["variant"] = [variant(m, s["depth"]) for m in main["method"]]
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    het_base = (main["partition"] == part) & ((main["alpha"].isna()) if alpha is None else (main["alpha"] == alpha))
    stab_base = (main["participation"] == p) & (main["dropout"] == d)
    if dp_levels(s):
        dpm = summary[(summary["task"] == s["tasks"][0]) & summary["method"].isin(s["dp_methods"])
                      & summary["seed"].isin(dp_table_seeds(s))
                      & _base_mask(summary.assign(dp_epsilon_target=np.nan), s)].copy()
        dpm["variant"] = [variant(m, s["depth"]) for m in dpm["method"]]
        no_dp = dpm[dpm["dp_epsilon_target"].isna()].set_index(["method", "seed"])
        drops = []
        for _, r in dpm[dpm["dp_epsilon_target"].notna()].iterrows():
            if (r["method"], r["seed"]) in no_dp.index:
                drops.append({"variant": r["variant"], "seed": r["seed"], "dp": r["dp"],
                              "drop": no_dp.loc[(r["method"], r["seed"]), "score"] - r["score"]})
        if drops:
            figs["dp_drop.png"] = plots.bars(pd.DataFrame(drops), "variant", "drop", hue="dp", order=order,
                                             ylabel="score drop under DP-Adam (no DP - DP)",
                                             title=f"{s['tasks'][0]}: DP cost per method")
    het = main[stab_base & main["dp_epsilon_target"].isna()]
    if het["heterogeneity"].nunique() > 1:
        # columns from IID to the strongest skew: iid, then Dirichlet alpha from large to small
        skew = sorted(set(het["heterogeneity"]), key=lambda h: -np.inf if h == "iid" else -float(h.rsplit("-", 1)[1]))
        figs["heterogeneity_heatmap.png"] = plots.heatmap(het, "variant", "heterogeneity", "score",
                                                          col_order=skew, row_order=order,
                                                          title=f"{s['tasks'][0]}: heterogeneity x method",
                                                          cbar_label=f"score (last {s['score_last_k']} evaluations)")
    st = main[het_base & main["dp_epsilon_target"].isna()]
    if st["stability"].nunique() > 1:
        figs["stability.png"] = plots.bars(st, "variant", "score", hue="stability", order=order,
                                           ylabel=f"score (mean accuracy, last {s['score_last_k']} evaluations)",
                                           title=f"{s['tasks'][0]}: client stability")
    return figs
