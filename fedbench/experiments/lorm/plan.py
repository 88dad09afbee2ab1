"""LoRM's plan: the settings, the methods (one table of facts) and each run's config.

The task sequence: the classes of ``dataset`` (ng20: 20 classes) cut into ``num_tasks`` tasks in an order drawn
per seed. Each class contributes ``max_train_per_class`` training rows (a fixed subsample, ``data_seed``), of
which ``val_fraction`` are carved out as a validation split (never trained on; it picks the learning rate and
gives the held-out inputs of the merge check), and ``max_test_per_class`` test rows. A task's training rows
are split over the ``data.num_clients`` clients by Dirichlet(``data.alpha``). Each task runs
``rounds_per_task`` rounds (LoRM: B, A, B). While task t trains, the logits outside task t are masked; after
task t the model is scored on every seen task, argmax over every seen class (no task id):
a[t, j] = accuracy on task j after task t.

A method is a row of :data:`METHODS`: the strategy and LoRA semantics it runs with (looked up in
``fedbench.registry``), the options it sets, where its learning rate comes from (its own search over
``lr_grid``, or another method's choice) and which seeds it runs. Nothing else in the experiment branches on
a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass

from fedbench.bench import (Settings, check_list, check_seeds, check_subset, is_int, is_number,
                            resolve_profile)
from fedbench.config import ConfigError, ExperimentConfig

EXPERIMENT = "lorm"


@dataclass(frozen=True)
class Method:
    """What one method of the experiment is (every LoRA method: the profile's placement and rank, the same
    continual protocol)."""
    label: str
    strategy: str = "continual"                  # fl.strategy (a STRATEGIES name)
    semantics: str = "factors"                   # fl.lora_aggregation (a LORA_SEMANTICS name)
    options: tuple = ()                          # (name, value) fl.options it sets beyond the ridge
    peft: tuple = ()                             # (dotted key, value) changes to the profile's PEFT
    merge_check: bool = False                    # scores the per-round merge diagnostic (LoRM's own solve)
    lr_from: str | None = None                   # takes this method's lr (no grid of its own)
    grid_scored: bool = False                    # with lr_from: its grid is scored on the first seed too
    config_of: str | None = None                 # its runs are this method's configs (a run at an lr it shares)
    read_off: tuple[str, str] | None = None      # (method, cross-task rule): rows read off that method's runs
    primary: bool = False                        # the primary comparison: every seed of the profile
    centralised: bool = False                    # one centralised run on the pooled data (not a federated run)


METHODS: dict[str, Method] = {
    "lorm": Method("LoRM (closed-form factor, rank r)", "lorm", merge_check=True, primary=True),
    "lorm_mean": Method("LoRM served by the running mean of task products", "lorm", lr_from="lorm",
                        read_off=("lorm", "mean")),
    "lorm_avg": Method("LoRM's schedule, trained factor averaged", "lorm", options=(("solve", "average"),),
                       lr_from="lorm", grid_scored=True),
    "fedit": Method("FedIT (factor average, rank r)", primary=True),
    "fedit_lorm_lr": Method("FedIT at LoRM's lr", lr_from="lorm", config_of="fedit"),
    "product_svd": Method("exact product average, SVD to rank r", semantics="svd"),
    "regmean_svd": Method("RegMean, SVD to rank r", "regmean", "svd"),
    "product_stack": Method("exact product average, stacked (rank grows)", semantics="stack"),
    "regmean_dense": Method("RegMean, dense (unbounded rank)", "regmean", "stack"),
    "full_top": Method("full FT of the top layer", peft=(("peft.method", "full"), ("peft.depth", 1))),
    "joint": Method("joint (centralised upper bound)", centralised=True),
}
LABELS = {name: m.label for name, m in METHODS.items()}
PRIMARY = tuple(name for name, m in METHODS.items() if m.primary)


def check_method_table(methods=tuple(METHODS)) -> None:
    """Every fact of `methods`' rows names something that exists: a registered strategy, LoRA semantics and
    tuner, options the strategy takes, and methods of the table. ConfigError naming ``methods`` otherwise."""
    from fedbench.options import option_fields
    from fedbench.registry import LORA_SEMANTICS, STRATEGIES, TUNERS
    for name in methods:
        m = METHODS[name]
        problems = [f"strategy {m.strategy!r} is not one of {STRATEGIES.names()}"] if m.strategy not in STRATEGIES \
            else [f"{m.strategy} takes no option {k!r}" for k, _ in m.options
                  if k not in option_fields(STRATEGIES, m.strategy)]
        if m.semantics not in LORA_SEMANTICS:
            problems.append(f"LoRA semantics {m.semantics!r} is not one of {LORA_SEMANTICS.names()}")
        problems += [f"tuner {v!r} is not one of {TUNERS.names()}" for k, v in m.peft
                     if k == "peft.method" and v not in TUNERS]
        sources = [m.lr_from, m.config_of, m.read_off[0] if m.read_off else None]
        problems += [f"{src!r} is not a method of the table" for src in sources if src and src not in METHODS]
        if problems:
            raise ConfigError("methods", name, f"a method whose facts name registered components: {problems}")


@dataclass
class LormSettings(Settings):
    """The task sequence, the protocol and which runs to do (the run config is the profile's ``base``)."""
    dataset: str = "ng20"
    data_seed: int = 0
    num_tasks: int = 5
    max_train_per_class: int = 80
    max_test_per_class: int = 25
    val_fraction: float = 0.2
    rounds_per_task: int = 3
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    lr_extend: int = 0
    ridge: float = 1e-4
    merge_check: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    exploratory_seeds: int = 0
    methods: tuple[str, ...] = tuple(METHODS)

    def validate(self) -> None:
        from fedbench.fl.federations import sequence_tasks
        info = sequence_tasks()        # offline text tasks, or the hub's (CIFAR-100 on a ViT: the paper profile)
        if self.dataset not in info:
            raise ConfigError("dataset", self.dataset, f"a task with >= 4 classes: {sorted(info)}")
        for key, low in [("data_seed", 0), ("num_tasks", 2), ("max_train_per_class", 4), ("max_test_per_class", 1),
                         ("rounds_per_task", 1), ("lr_extend", 0), ("exploratory_seeds", 0)]:
            if not is_int(getattr(self, key)) or getattr(self, key) < low:
                raise ConfigError(key, getattr(self, key), f"an integer >= {low}")
        if self.num_tasks > info[self.dataset].num_classes:
            raise ConfigError("num_tasks", self.num_tasks, f"at most the {info[self.dataset].num_classes} classes")
        if not is_number(self.val_fraction) or not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction", self.val_fraction, "a number in (0, 1)")
        check_list("lr_grid", self.lr_grid, lambda x: is_number(x) and x > 0, "a non-empty list of numbers > 0")
        if self.lr_extend and len(set(self.lr_grid)) < 2:
            raise ConfigError("lr_extend", self.lr_extend, "0 with a one-value lr_grid (no grid step to extend by)")
        if not is_number(self.ridge) or not 0 <= self.ridge < float("inf"):
            raise ConfigError("ridge", self.ridge, "a number >= 0 (relative to the mean eigenvalue)")
        if not isinstance(self.merge_check, bool):
            raise ConfigError("merge_check", self.merge_check, "true or false")
        self.seeds = check_seeds("seeds", self.seeds)
        self.methods = check_subset("methods", self.methods, tuple(METHODS))
        check_method_table(self.methods)
        takes = [m for m in self.methods if METHODS[m].lr_from]
        needs = sorted({METHODS[m].lr_from for m in takes} - set(self.methods))
        if needs:
            raise ConfigError("methods", list(self.methods), f"{needs} with {sorted(takes)}"
                              " (they take its lr or its runs)")
        self.lr_grid = tuple(sorted(float(x) for x in self.lr_grid))


def settings_for(profile: str = "quick", path=None, **overrides):
    """(settings, base config) of the profile with `overrides` (dotted keys change the base)."""
    from fedbench.models.checks import check_against_backbone
    prof = resolve_profile(EXPERIMENT, profile, overrides, LormSettings, path=path)
    base = prof.base
    if base is None:
        raise ConfigError("base", None, "a base run config in the profile")
    check_against_backbone(base)
    return prof.settings, base


def federation(s: LormSettings) -> dict:
    """The run's data: the class-incremental task sequence of ``dataset`` (``data.federation_options``)."""
    return {"data_seed": s.data_seed, "num_tasks": s.num_tasks, "max_train_per_class": s.max_train_per_class,
            "max_test_per_class": s.max_test_per_class, "val_fraction": s.val_fraction,
            "rounds_per_task": s.rounds_per_task}


def run_config(s: LormSettings, base: ExperimentConfig, method: str, seed: int, lr: float) -> ExperimentConfig:
    """The core config of one federated (or joint) run (a method read off another's runs: that run served by
    its rule; a method that is another's config: that method's)."""
    from fedbench.options import option_fields
    from fedbench.registry import STRATEGIES
    m = METHODS[method]
    if m.read_off:
        src, rule = m.read_off
        cfg = run_config(s, base, src, seed, lr)
        return cfg.replace(**{"fl.options": {**cfg.fl.options, "cross_task": rule, "score_running_mean": False,
                                             "merge_check": False}})
    if m.config_of:
        method, m = m.config_of, METHODS[m.config_of]
    # the closed-form solves' ridge, the merge diagnostic (LoRM's own solve only), the method's own options, and
    # the running mean scored beside the cross-task merge when a method reads its rows off these runs
    wanted = {"ridge": float(s.ridge), "merge_check": bool(s.merge_check) and m.merge_check, **dict(m.options)}
    if any(METHODS[o].read_off == (method, "mean") for o in s.methods):
        wanted["score_running_mean"] = True
    options = {k: v for k, v in wanted.items() if k in option_fields(STRATEGIES, m.strategy)}
    changes = {"seed": int(seed), "name": f"lorm-{method}", "data.task": s.dataset, "train.lr": float(lr),
               "fl.rounds": s.num_tasks * s.rounds_per_task, "fl.eval_every": s.rounds_per_task,
               "fl.strategy": m.strategy, "fl.lora_aggregation": m.semantics, "fl.options": options,
               "data.federation": "task_sequence", "data.federation_options": federation(s)}
    changes.update(dict(m.peft))
    return base.replace(**changes)


def method_seeds(s: LormSettings, method: str) -> tuple:
    """Every seed for the primary comparison's methods; the first ``exploratory_seeds`` for the others."""
    if METHODS[method].primary or not s.exploratory_seeds:
        return s.seeds
    return s.seeds[:s.exploratory_seeds]
