"""FedPEFT's plan: the methods (a table of per-method facts beside their tuner entries), the typed settings and
their validation, the grid of cells and each cell's run config (the package docstring has the protocol).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fedbench.bench import Settings, check_list, resolve_profile
from fedbench.config import ConfigError, ExperimentConfig
from fedbench.registry import TUNERS

EXPERIMENT = "fedpeft"


@dataclass(frozen=True)
class Arm:
    """What this experiment knows of a method beside its tuner entry (:data:`fedbench.registry.TUNERS`: whether it
    takes ``peft.depth``, what DP-SGD goes through): its default AdamW grid searched on validation (the profiles
    set their own; under DP the first two values) and its role in the comparisons."""
    lr_grid: tuple[float, ...]
    role: str = "peft"      # "reference": full FT, what every PEFT method is compared with;
    #                         "probe": head-only, the frozen features' floor (the reference's assay placebo)


# display order: the reference first, then roughly from fewest to most trainable parameters
ARMS = {"full": Arm((1e-4, 3e-4, 1e-3), "reference"), "head": Arm((1e-2, 3e-2, 1e-1), "probe"),
        "prompt": Arm((1e-2, 3e-2, 1e-1)), "lora": Arm((3e-3, 1e-2, 3e-2)), "ia3": Arm((1e-2, 3e-2, 1e-1)),
        "bitfit": Arm((3e-3, 1e-2, 3e-2)), "adapter": Arm((3e-3, 1e-2, 3e-2))}
METHODS = tuple(ARMS)
REFERENCE = next(m for m, a in ARMS.items() if a.role == "reference")
PROBE = next(m for m, a in ARMS.items() if a.role == "probe")
_LR_GRID = {m: list(a.lr_grid) for m, a in ARMS.items()}
_DP_LR_GRID = {m: list(v[:2]) for m, v in _LR_GRID.items()}
# the claim kinds a profile may name as primary: what each says about `primary_method` on the first task
PRIMARY_KINDS = {
    "near_full": "within near_tolerance of full fine-tuning (non-inferiority, gated by headroom and the assay)",
    "dp_noise": "loses less accuracy to DP noise than full FT at the first epsilon, each method's drop measured "
                "from its own clip-only run",
    "skew_drop": "loses no more accuracy (within near_tolerance) than full FT under the strongest Dirichlet skew",
}
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
    primary: tuple[str, ...] = ("near_full",)           # 1-3 kinds of PRIMARY_KINDS
    primary_method: str = "lora"                        # the PEFT method the primary claims are about

    def validate(self) -> None:
        d = dataclasses.asdict(self)
        d["heterogeneity"], d["stability"] = list(d["heterogeneity"]), list(d["stability"])
        d["depth"] = None                # checked on the base config (against the backbone)
        validate_settings(d)


def known_methods() -> list[str]:
    """The methods this experiment can run: those with facts here (:data:`ARMS`) and a tuner registered."""
    return [m for m in METHODS if m in TUNERS]


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
    known = known_methods()
    for key in ("methods", "task_methods", "axis_methods", "dp_methods"):
        check_list(key, s[key], lambda m: m in known, f"a list of methods from {known}", nonempty=key == "methods")
    # these two only narrow dp_methods (a method outside dp_methods runs no DP whatever they say)
    check_list("dp_first_seed_methods", s["dp_first_seed_methods"], lambda m: m in known,
               f"a list of methods from {known}", nonempty=False)
    if s["clip_methods"] is not None:
        check_list("clip_methods", s["clip_methods"], lambda m: m in known,
                   f"None (= dp_methods) or a list of methods from {known}", nonempty=False)
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
    peft = [m for m in known_methods() if ARMS[m].role == "peft"]
    if s["primary_method"] not in peft:
        raise ConfigError("primary_method", s["primary_method"], f"a PEFT method: one of {peft}")


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


def base_cell(s: dict, task: str, method: str, seed: int, **change) -> Cell:
    """The cell of (task, method, seed) at the base condition, with `change` (partition/alpha, participation/
    dropout or dp_epsilon) applied."""
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    fields = dict(partition=part, alpha=alpha, participation=p, dropout=d, dp_epsilon=None) | change
    return Cell(task, method, fields["partition"], fields["alpha"], fields["participation"], fields["dropout"],
                fields["dp_epsilon"], seed)


