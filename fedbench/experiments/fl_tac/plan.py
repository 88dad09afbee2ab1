"""FL-TAC's plan: the methods (a table of per-method facts), the typed settings, and each run's config.

A method is a strategy of :mod:`fedbench.strategies.fl_tac` (``STRATEGIES``) with its own options; the table
below says, per method, which strategy runs, with which options beyond the server's clustering, whether every
task has its own head (the task-head arm), and whose learning rate it takes (None: it searches its own grid,
``Settings.grid_of``). Nothing in the experiment branches on a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fedbench.bench import Settings, check_list, check_seeds, check_subset, is_int, is_number, resolve_profile
from fedbench.config import ConfigError, ExperimentConfig
from fedbench.fl.federations import BINARY, binary_tasks

EXPERIMENT = "fl_tac"


@dataclass(frozen=True)
class Method:
    """One arm of the experiment: the ``fl.strategy`` it runs, its ``fl.options`` beyond the clustering settings
    (:func:`clustering_options`), its label, whether each task has its own head, and the method whose validation
    lr it takes (None: it chooses its own on validation)."""
    strategy: str
    label: str
    options: dict = field(default_factory=dict)
    heads: bool = False
    lr_from: str | None = None

    @property
    def arm(self) -> str:
        return "task heads" if self.heads else "shared head"


# The methods that train per-task adapters exactly as FL-TAC does take its lr (chosen on validation), to save a
# grid each; local chooses its own (a side of a primary claim). FedIT's local budget (fedit_tasks'
# steps_per_task): the official split of local_steps over the client's tasks, or FL-TAC's steps per task.
METHODS: dict[str, Method] = {
    "fl_tac": Method("fl_tac", "FL-TAC (k-means, k = T)"),
    "fl_tac_update": Method("fl_tac", "FL-TAC clustering updates (diagnostic)", {"cluster_on": "update"},
                            lr_from="fl_tac"),
    "fedit": Method("fedit_tasks", "FedIT (one adapter, local_steps // n_tasks per task)",
                    {"steps_per_task": "split"}),
    "fedit_matched": Method("fedit_tasks", "FedIT, compute-matched (one adapter, local_steps per task)",
                            {"steps_per_task": "matched"}),
    "oracle": Method("fl_tac_oracle", "oracle per-task FedAvg", lr_from="fl_tac"),
    "local": Method("fl_tac_local", "local only"),
    "fedit_heads": Method("fedit_tasks", "FedIT + task heads", {"steps_per_task": "split"}, heads=True,
                          lr_from="fedit"),
    "fl_tac_heads": Method("fl_tac", "FL-TAC + task heads", heads=True, lr_from="fl_tac"),
}
HEADS = tuple(m for m, f in METHODS.items() if f.heads)
LR_FROM = {m: f.lr_from for m, f in METHODS.items() if f.lr_from}
LABELS = {m: f.label for m, f in METHODS.items()}
ARM = {m: f.arm for m, f in METHODS.items()}


def check_methods(table: dict[str, Method] = METHODS) -> None:
    """Every method's strategy is a registered strategy taking the options it sets, and an lr source is a method
    of the table that chooses its own; a ConfigError names the method's field otherwise."""
    from fedbench.options import option_fields
    from fedbench.registry import STRATEGIES
    for name, m in table.items():
        if m.strategy not in STRATEGIES:
            raise ConfigError(f"methods.{name}.strategy", m.strategy, f"a strategy of {STRATEGIES.names()}")
        extra = sorted(set(m.options) - set(option_fields(STRATEGIES, m.strategy)))
        if extra:
            raise ConfigError(f"methods.{name}.options", m.options,
                              f"options of strategy {m.strategy!r}: {option_fields(STRATEGIES, m.strategy)}")
        if m.lr_from is not None and (m.lr_from not in table or table[m.lr_from].lr_from is not None):
            raise ConfigError(f"methods.{name}.lr_from", m.lr_from,
                              f"a method that chooses its own lr: {[k for k, v in table.items() if not v.lr_from]}")


@dataclass
class FlTacSettings(Settings):
    tasks: tuple[str, ...] = BINARY
    data_seed: int = 0
    max_train_per_task: int = 600
    val_per_task: int = 200
    max_test_per_task: int = 1000
    min_share: float = 0.01
    k: int | None = None              # None: the number of tasks
    k_max: int | None = None          # silhouette search up to this k (None: 2 x tasks)
    n_init: int = 10
    silhouette_n_init: int | None = None   # k-means restarts for the recorded silhouette k (None: n_init)
    embedding: str = "auto"                # adapter-evolution figure: auto (UMAP if umap-learn imports) | umap | pca
    lr_grid: tuple[float, ...] = (5e-4, 1e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("fl_tac", "fedit", "oracle", "local")
    evolution_panels: int = 4
    seeds_per_method: dict = field(default_factory=dict)   # method -> run on the first n seeds (exploratory arms)
    lr_extend: int = 0               # validation's choice at a grid edge: score up to this many steps beyond it
    lr_grids: dict = field(default_factory=dict)           # method -> its own lr grid (else lr_grid)

    def validate(self) -> None:
        ok = binary_tasks()
        check_list("tasks", self.tasks, lambda t: t in ok, f"at least 2 distinct binary offline text tasks from {ok}")
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError("tasks", self.tasks, f"at least 2 distinct binary offline text tasks from {ok}")
        for key, low in [("data_seed", 0), ("max_train_per_task", 2), ("val_per_task", 2), ("max_test_per_task", 1),
                         ("n_init", 1), ("evolution_panels", 1)]:
            if not is_int(getattr(self, key)) or getattr(self, key) < low:
                raise ConfigError(key, getattr(self, key), f"an integer >= {low}")
        if self.silhouette_n_init is not None and (not is_int(self.silhouette_n_init) or self.silhouette_n_init < 1):
            raise ConfigError("silhouette_n_init", self.silhouette_n_init, "None (= n_init) or an integer >= 1")
        from fedbench.strategies.clustering import EMBEDDINGS
        if self.embedding not in EMBEDDINGS:
            raise ConfigError("embedding", self.embedding, f"one of {list(EMBEDDINGS)}")
        if not is_number(self.min_share) or not 0 <= self.min_share < 1:
            raise ConfigError("min_share", self.min_share, "a number in [0, 1/num_clients]")
        if self.k is not None and (not is_int(self.k) or self.k < 1):
            raise ConfigError("k", self.k, "None (= the number of tasks) or an integer >= 1")
        if self.k_max is not None and (not is_int(self.k_max) or self.k_max < 2):
            raise ConfigError("k_max", self.k_max, "None (= 2 x the number of tasks) or an integer >= 2")
        check_list("lr_grid", self.lr_grid, lambda x: is_number(x) and x > 0, "a non-empty list of numbers > 0")
        self.seeds = check_seeds("seeds", self.seeds)
        check_methods()
        self.methods = check_subset("methods", self.methods, tuple(METHODS))
        if not is_int(self.lr_extend) or self.lr_extend < 0:
            raise ConfigError("lr_extend", self.lr_extend, "an integer >= 0")
        if self.lr_extend and len(self.lr_grid) < 2:
            raise ConfigError("lr_grid", self.lr_grid, "at least 2 values with lr_extend > 0 (the step is their ratio)")
        grids = self.lr_grids
        if not isinstance(grids, dict) or any(
                m not in METHODS or not isinstance(g, (list, tuple)) or len(g) < (2 if self.lr_extend else 1)
                or not all(is_number(x) and x > 0 for x in g) for m, g in grids.items()):
            raise ConfigError("lr_grids", grids, f"a mapping of methods {list(METHODS)} to lists of numbers > 0 "
                                                 f"(at least 2 with lr_extend > 0)")
        self.lr_grids = {m: tuple(sorted(float(x) for x in g)) for m, g in grids.items()}
        spm = self.seeds_per_method
        if not isinstance(spm, dict) or any(m not in METHODS or not is_int(n) or not 1 <= n <= len(self.seeds)
                                            for m, n in spm.items()):
            raise ConfigError("seeds_per_method", spm, f"a mapping of methods {list(METHODS)} to a number of seeds "
                                                       f"in [1, {len(self.seeds)}] (the first n of seeds)")
        self.lr_grid = tuple(sorted(float(x) for x in self.lr_grid))
        self.tasks = tuple(self.tasks)

    def seeds_of(self, method: str) -> tuple[int, ...]:
        """The seeds `method` runs on: the first ``seeds_per_method[method]`` of ``seeds``, else all of them."""
        return self.seeds[:self.seeds_per_method.get(method, len(self.seeds))]

    def grid_of(self, method: str) -> tuple[float, ...]:
        """The lr grid `method` searches on validation: its own (``lr_grids``) or ``lr_grid``."""
        return self.lr_grids.get(method, self.lr_grid)


def settings_for(profile: str = "quick", path=None, **overrides):
    """(settings, base config) of the profile with `overrides` (dotted keys change the base)."""
    from fedbench.models.checks import check_against_backbone
    prof = resolve_profile(EXPERIMENT, profile, overrides, FlTacSettings, path=path)
    if prof.base is None:
        raise ConfigError("base", None, "a base run config in the profile")
    s, base = prof.settings, prof.base
    if not s.min_share <= 1 / base.data.num_clients:
        raise ConfigError("min_share", s.min_share, f"a number in [0, 1/num_clients] = [0, {1 / base.data.num_clients:.4g}]")
    if base.peft.method != "lora":
        raise ConfigError("peft.method", base.peft.method, "'lora' (FL-TAC clusters LoRA adapters)")
    check_against_backbone(base)
    return s, base


def federation(s: FlTacSettings, method: str, validate: bool) -> dict:
    """The run's data: the multitask federation of the profile's tasks (``data.federation_options``)."""
    return {"tasks": list(s.tasks), "data_seed": s.data_seed, "max_train_per_task": s.max_train_per_task,
            "val_per_task": s.val_per_task, "max_test_per_task": s.max_test_per_task, "min_share": s.min_share,
            "heads": METHODS[method].heads, "validation": bool(validate)}


def clustering_options(s: FlTacSettings) -> dict:
    """The server's clustering from the settings (``fl.options`` of the strategies that cluster)."""
    from fedbench.strategies.clustering import embedding_method
    return {"k": s.k, "k_max": s.k_max, "n_init": s.n_init, "silhouette_n_init": s.silhouette_n_init,
            "cluster_on": "adapter", "silhouette": True, "embedding": embedding_method(s.embedding)}


def run_config(s: FlTacSettings, base: ExperimentConfig, method: str, seed: int, lr: float,
               validate: bool = True) -> ExperimentConfig:
    """The run of `method` at `seed` and `lr`, whole: its data (the multitask federation), the strategy and its
    options (the clustering settings, then the method's own). `validate`: it also scores the validation split
    (the runs that choose a learning rate)."""
    from fedbench.options import option_fields
    from fedbench.registry import STRATEGIES
    m = METHODS[method]
    every = {**clustering_options(s), **m.options}
    options = {k: v for k, v in every.items() if k in option_fields(STRATEGIES, m.strategy)}
    return base.replace(**{"seed": int(seed), "name": f"fl_tac-{method}", "train.lr": float(lr),
                           "fl.strategy": m.strategy, "fl.options": options, "data.task": s.tasks[0],
                           "data.federation": "multitask", "data.federation_options": federation(s, method, validate)})


def pool_of(s: FlTacSettings, base: ExperimentConfig, caches: bool = False):
    """The profile's pool (every task's subsample, tokenized), with its prefilled activation caches if asked."""
    from fedbench.fl.federations import MultiTaskOptions, multitask_pool, pool_caches
    o = MultiTaskOptions.from_dict(federation(s, "fl_tac", True), "data.federation_options")
    pool = multitask_pool(o, base.model.backbone, base.data.max_length)
    if caches:
        pool_caches(pool, base.model, base.peft.depth)
    return pool


def runner(s: FlTacSettings, base: ExperimentConfig, progress: bool = True):
    """The bench Runner for the profile's runs: each run's data from its config alone (``build_data``: the
    multitask federation), the frozen-prefix caches of the profile's pool shared by every run."""
    from fedbench.bench import Runner
    from fedbench.fl.data import build_data

    def label(cfg):
        return f"[fl_tac] {cfg.name.removeprefix('fl_tac-'):<14} seed {cfg.seed} lr {cfg.train.lr:g}"
    return Runner(data=build_data, caches=lambda cfg, data: pool_of(s, base, caches=True).caches,
                  label=label if progress else None)
