"""Task arithmetic is one-shot FedAvg (Tao et al., 2024, arXiv 2411.18607), on MiniLM and offline text tasks.

Every FedAvg round runs on the shared loop (:class:`fedbench.fl.server.FederatedRun`) with the
``task_clients`` strategy (:mod:`fedbench.strategies`): client t holds task t, and the model is one
shared encoder with one head matrix holding every task's rows (``TokenizedSplit.class_mask`` restricts each
example to its own task's rows: exactly one head per task). The heads are **frozen**, never trained and never
sent, as the paper's: ``head: zero_shot`` (the paper's) makes each task's rows its classes' prompt embeddings by
theta_0 with cosine logits (:mod:`fedbench.models.zero_shot`); ``head: probe`` (exploratory) a linear probe
(logistic regression) fitted on theta_0's features of a probe carve of its training subsample
(``probe_samples``, disjoint from the validation carve and from the fine-tuning data: a probe fitted on the
fine-tuning data fits it almost perfectly and leaves the encoder nothing to learn). The reference rows named
``probe`` are theta_0 with the profile's frozen heads (zero-shot or probe). A task's fine-tune is its client's round-1
update from theta_0, so its task vector tau_t is the change of the shared encoder only: the dense LoRA
update ``s B_t A_t`` of every wrapped weight (LoRA on all layers by default), or every encoder parameter
with full fine-tuning (``tunings: [full]``). LoRA's learning rate is one lr shared by the tasks, chosen
from ``lrs`` on the first seed's validation (best mean individual validation accuracy; ``lr_search``
table) and used for every seed.

Merges are the pure functions of :mod:`fedbench.merging` (the MERGES registry, whose ``scale`` fact says
whether a merge returns a sum- or a mean-scale vector), plus ``fedit`` (the dense product of the averaged
LoRA factors, what FedIT's round gives; mean-scale). The merged model is theta_0 + tau with the frozen heads.

Scale-matched search. lambda is expressed in **per-task units**: the weight w each task vector gets. A
sum-scale merge is called with lam = w, a mean-scale one with lam = w T, so the same grid point means the
same per-task weight for every method; the grid is the settings' ``lambdas`` (the official range
0.05 .. 2) with 1/T always added. w = 1/T is plain one-shot FedAvg (task arithmetic) or the plain
mean-scale merge. Second hyper-parameters as in the authors' code: FedGMA rho over ``gma_rhos``
(0.1 .. 0.9), CCLIP rho over linspace(min ||tau_t||, max ||tau_t||, ``cclip_rhos``, endpoint=False), TIES
densities, DARE drop rates. Everything is chosen on a validation split of ``val_samples`` examples per
task carved (seeded) from the task's training subsample, never the test split, by the authors' criterion
(mean over tasks of merged / individual validation accuracy). Every method is reported twice: ``tuned``
(lambda and rho from the search) and ``1/T`` (lambda = 1/T, rho still searched).

Normalised accuracy = (merged - probe) / (individual - probe), per task, where probe = theta_0 with the
frozen heads; ``accuracy_ratio`` = merged / individual (the paper's) beside it. In the heterogeneous
settings (``hetero_training``: local steps x ``hetero_steps``; ``hetero_lr``: lr x ``hetero_lrs``) both are
taken against the *homogeneous* individual models, so the denominators do not move.

Per (tuning, seed) one unit computes every table; it is stored under ``runs_root()/task_arithmetic`` by the
hash of the whole resolved profile (base config + settings, with this unit's seed and tuning) and the
core's ``RESULTS_SCHEMA``: no hand-kept key list. Tables are always returned as read back from disk, so a
first run and a rerun write byte-identical CSVs.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedbench import merging
from fedbench.bench.report import write_report
from fedbench.config import ConfigError, ExperimentConfig
from fedbench.bench import (Settings, TableRunStore, check_list, is_int, is_number, output_dir,
                                         resolve_profile, save_figure, save_table, variant_note)
from fedbench.fl.seeding import derive_seed
from fedbench.registry import MERGES

EXPERIMENT = "task_arithmetic"
TUNINGS = ("lora", "full")
# the merges searched on validation (fedit: mean(B) mean(A) of the FedIT round, scaled like a mean-scale merge)
MERGE_METHODS = ("task_arithmetic", "fednova", "fedgma", "median", "cclip", "ties", "dare", "fedit")
FL_INSPIRED = ("fednova", "fedgma", "median", "cclip")
VARIANTS = ("tuned", "1/T")
LABELS = {"individual": "individual fine-tune", "probe": "theta_0 + frozen heads (probe)",
          "fedavg": "FedAvg round (loop)", "task_arithmetic": "task arithmetic", "fednova": "FedNova",
          "fedgma": "FedGMA", "median": "median", "cclip": "CCLIP", "ties": "TIES", "dare": "DARE",
          "fedit": "FedIT (factor avg)"}
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
        check_list("tunings", self.tunings, lambda t: t in TUNINGS, f"a non-empty subset of {list(TUNINGS)}")
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
        check_list("methods", self.methods, lambda m: m in MERGE_METHODS, f"a subset of {list(MERGE_METHODS)}")
        check_list("hetero_methods", self.hetero_methods, lambda m: m in MERGE_METHODS,
                   f"a subset of {list(MERGE_METHODS)}", nonempty=False)
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


# -- data: every task in one split, one client per task -----------------------------------------------

def run_config(base: ExperimentConfig, s: TaskArithmeticSettings, tuning: str, seed: int, rounds: int = 1,
               local_steps: int | None = None) -> ExperimentConfig:
    """The loop's config of one (tuning, seed), whole: one client per task (the task_clients federation), every
    client every round, heads frozen at each task's probe (the ``task_clients`` strategy), exact FedAvg of the task
    vectors for LoRA (``stack``)."""
    steps = local_steps or base.train.local_steps
    changes = {"name": EXPERIMENT, "seed": int(seed), "data.task": s.tasks[0], "data.num_clients": len(s.tasks),
               "data.partition": "iid", "peft.method": tuning, "peft.train_head": False, "fl.strategy": "task_clients",
               "fl.rounds": int(rounds), "fl.clients_per_round": 1.0, "fl.dropout": 0.0, "fl.aggregator": "fedavg",
               "fl.lora_aggregation": "stack" if tuning == "lora" else "factors", "train.local_steps": int(steps),
               "fl.options": {"probe_heads": s.head == "probe", "zero_shot_heads": s.head == "zero_shot"},
               "data.federation": "task_clients",
               "data.federation_options": {"tasks": list(s.tasks), "val_samples": s.val_samples,
                                           "probe_samples": s.probe_samples}}
    if tuning == "full":
        changes.update({"train.lr": float(s.full_lr), "peft.depth": None})
    return base.replace(**changes)


def export(profile: str = "quick", path=None, method: str = "lora", seed: int = 0, lr: float | None = None,
           **overrides) -> ExperimentConfig:
    """The loop's run of one (tuning, seed) as a config that runs alone (``fedbench export``): round 1 is every
    task's fine-tune and one-shot FedAvg of the task vectors. `method` is the tuning (lora or full); `lr` default:
    the lr the profile chose on validation (full fine-tuning: ``full_lr``)."""
    from fedbench.bench import check_method, chosen_lr, no_lr
    r = settings_for(profile, path, **overrides)
    check_method(method, tuple(r.settings.tunings))
    cfg = run_config(r.base, r.settings, method, int(seed))
    if lr is None and method == "lora" and r.settings.lrs:
        lr = chosen_lr(EXPERIMENT, profile, path, table="lr_search.csv", tuning=method)
        if lr is None:
            raise no_lr(profile, method)
    return cfg if lr is None else cfg.replace(**{"train.lr": float(lr)})


# -- one unit: everything of one (tuning, seed) ------------------------------------------------------

class Unit:
    """One (tuning, seed): the loop's run, the fine-tunes (its round-1 updates), merges and evaluations."""

    def __init__(self, r: Resolved, tuning: str, seed: int, log):
        from fedbench.fl.server import FederatedRun
        from fedbench.models import lora_modules
        self.r, self.s, self.tuning, self.seed, self.log = r, r.settings, tuning, seed, log
        self.T = len(self.s.tasks)
        self.cfg = run_config(r.base, self.s, tuning, seed)
        self.run = FederatedRun(self.cfg)       # the data and the probe heads from the config
        self.td = self.run.data
        self.modules = lora_modules(self.run.model) if tuning == "lora" else []
        # every LoRA-wrapped base weight named in every model loaded: the loop's base loader only touches the
        # keys it is given, so a model without a delta on a key must say "zero" there
        self.zero_base = {m.base_key: torch.zeros_like(self.run.model.get_parameter(m.base_key))
                          for m in self.modules}
        from fedbench.fl import GlobalModel
        self.g0 = GlobalModel(self.run.global_model.state, dict(self.zero_base))
        self.init = OrderedDict((k, v.clone()) for k, v in self.g0.state.items())
        self.encoder_keys = [k for k in self.init if not k.startswith("classifier.")]
        self._memo: dict = {}

    # models ------------------------------------------------------------------------------------------
    def task_vector(self, state: dict) -> dict:
        if self.modules:
            return merging.lora_task_vector(state, self.modules, self.init)
        return merging.state_task_vector(state, self.init, self.encoder_keys)

    def merged_model(self, tv: dict):
        """theta_0 + tv with the frozen heads: LoRA deltas go into the base weights (factors at init)."""
        from fedbench.fl import GlobalModel
        if self.modules:
            return GlobalModel(OrderedDict(self.init), {**self.zero_base, **tv})
        return GlobalModel(OrderedDict((k, v + tv[k] if k in tv else v) for k, v in self.init.items()))

    def correct(self, gm, split: str, tasks) -> np.ndarray:
        """0/1 per example of `tasks` (validation carve or test split), in joint-index order."""
        from fedbench.fl import evaluate
        from fedbench.models.tuners.lora import zero_branches_skipped
        td = self.td
        if split == "val":
            idx, sp = np.sort(np.concatenate([td.val[t] for t in tasks])), td.train
        else:
            idx, sp = np.flatnonzero(np.isin(td.task_of_test, list(tasks))), td.test
        self.run.load(gm)
        # merged weights sit in the base layers with B = 0: the LoRA branches add exactly zero, skip them
        with zero_branches_skipped(self.run.model):
            ev = evaluate(self.run.model, sp, idx, batch_size=64, pad_id=td.pad_id, return_predictions=True)
        p = ev["predictions"]
        return (p["prediction"] == p["label"]).astype(np.int8)

    def accuracies(self, gm, split: str, tasks) -> dict:
        """{task id: accuracy} and the 0/1 vector, memoised by the model's exact bytes."""
        key = (_fingerprint(gm), split, tuple(tasks))
        if key not in self._memo:
            c = self.correct(gm, split, tasks)
            of = (np.sort(np.concatenate([self.td.task_of_train[self.td.val[t]] for t in tasks])) if split == "val"
                  else self.td.task_of_test[np.isin(self.td.task_of_test, list(tasks))])
            self._memo[key] = ({t: float(c[of == t].mean()) for t in tasks}, c)
        return self._memo[key]

    def remember(self, gm, predictions: dict) -> None:
        """The loop's own evaluation of `gm` on every test example (its final round's predictions) as the
        test accuracies of `gm`: the FedAvg rows are what the loop measured."""
        p = predictions
        order = np.argsort(p["test_index"], kind="stable")
        c = (p["prediction"][order] == p["label"][order]).astype(np.int8)
        ids = tuple(range(self.T))
        self._memo[(_fingerprint(gm), "test", ids)] = ({t: float(c[self.td.task_of_test == t].mean()) for t in ids}, c)

    # the loop's first round: the fine-tunes ------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """The (validation-chosen) learning rate of every later fine-tune and round of this unit."""
        self.cfg = self.cfg.replace(**{"train.lr": float(lr)})
        self.run = self.run.derive(self.cfg, self.g0)

    def fine_tunes(self, steps: dict | None = None, lrs: dict | None = None, reuse: dict | None = None):
        """Every task-client's round-1 update from theta_0 (its fine-tune), on the loop's client side.
        `steps` / `lrs` = {client: local steps / learning rate} (training heterogeneity, the lr search: the
        task-clients strategy's per-client options); an update whose (steps, lr) equal those in `reuse`
        ({client: ((steps, lr), update)}) is taken from it: same start, seed and data, so the same update.
        Returns (run, plan, instructions, updates): `run` is the round's run (this unit's, with the options)."""
        n = self.cfg.data.num_clients
        options = {"client_steps": None if steps is None else [steps.get(c) for c in range(n)],
                   "client_lrs": None if lrs is None else [lrs.get(c) for c in range(n)]}
        run = self.run.derive(self.cfg.replace(**{"fl.options": options}), self.g0)
        plan = run.select_clients(1)
        ins = run.configure(plan)
        updates = []
        for c in plan.reporting:
            key = (ins[c].local_steps or self.cfg.train.local_steps, ins[c].options.get("lr", self.cfg.train.lr))
            if reuse and reuse.get(c, (None,))[0] == key:
                updates.append(reuse[c][1])
            else:
                updates.append(run.client_update(c, 1, ins[c]))
        return run, plan, ins, updates

    def first_round(self, steps: dict | None = None, lrs: dict | None = None, reuse: dict | None = None):
        """Round 1 of the loop from theta_0: the fine-tunes (:meth:`fine_tunes`) and the aggregated global
        model (one-shot FedAvg)."""
        run, plan, ins, updates = self.fine_tunes(steps, lrs, reuse)
        run.finish_round(plan, updates, time.perf_counter(), instructions=ins)
        self.remember(run.global_model, run.final_predictions)
        return updates, run.global_model

    def reuse_of(self, updates) -> dict:
        """{client: ((steps, lr), update)} of `updates` trained with this unit's lr."""
        return {t: ((x.num_steps, self.cfg.train.lr), x) for t, x in enumerate(updates)}


def _fingerprint(gm) -> str:
    import hashlib
    h = hashlib.sha256()
    for part in (gm.state, gm.base_delta):
        for k in sorted(part):
            h.update(k.encode())
            h.update(part[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def lr_grid(s: TaskArithmeticSettings, tuning: str, cfg: ExperimentConfig) -> list[float]:
    """The learning rates searched on validation: the settings' ``lrs`` for LoRA (in their order), else the
    config's one lr (full fine-tuning always uses ``full_lr``)."""
    return [float(x) for x in s.lrs] if s.lrs and tuning == "lora" else [float(cfg.train.lr)]


def per_task_grid(s: TaskArithmeticSettings, T: int) -> list[float]:
    """The lambda grid in per-task units: the settings' lambdas with 1/T added, ascending."""
    return sorted({float(x) for x in s.lambdas} | {1.0 / T})


def rho_grid(method: str, s: TaskArithmeticSettings, tvs) -> list[float]:
    """The second hyper-parameter's grid, as in the authors' code (NaN: none)."""
    if method == "fedgma":
        return [float(x) for x in s.gma_rhos]
    if method == "cclip":
        norms = [merging.norm(tv) for tv in tvs]
        return [float(x) for x in np.linspace(min(norms), max(norms), s.cclip_rhos, endpoint=False)]
    if method == "ties":
        return [float(x) for x in s.ties_densities]
    if method == "dare":
        return [float(x) for x in s.dare_drops]
    return [float("nan")]


def merge(method: str, tvs, w: float, rho: float, steps, seed: int, fedit_tv: dict | None = None) -> dict:
    """The merged task vector of `method` at per-task weight `w`: a sum-scale merge gets lam = w, a mean-scale
    one lam = w T (MERGES' `scale` fact), so every method gives each task vector the same weight at the same w."""
    T = len(tvs)
    if method == "fedit":           # mean-scale: s mean(B) mean(A), the FedIT round's dense update
        return OrderedDict((k, (w * T * v.double()).to(v.dtype)) for k, v in fedit_tv.items())
    entry = MERGES.entry(method)
    lam = w if entry.scale == "sum" else w * T
    fn = entry.obj
    if method == "fednova":
        return fn(tvs, list(steps), lam)
    if method == "dare":
        return fn(tvs, rho, lam, seed=derive_seed(seed, "merge", 0))
    if entry.search is not None:
        return fn(tvs, rho, lam)
    return fn(tvs, lam)


def compute_unit(r: Resolved, tuning: str, seed: int, log, lr: float | None = None) -> dict:
    """Every table of one (tuning, seed); `lr` given: fine-tune with it (no search; the first seed's choice)."""
    from fedbench.fl.strategy import FedAvg
    from fedbench.models import lora_delta
    start = time.perf_counter()
    s = r.settings
    u = Unit(r, tuning, seed, log)
    T, tasks, ids = u.T, list(s.tasks), list(range(u.T))
    rows, val_rows, correct_rows = [], [], []
    nan = float("nan")

    def keep(setting, method, variant, gm, lam, rho, sub=None):
        sub = ids if sub is None else sub
        acc, c = u.accuracies(gm, "test", sub)
        for t in sub:
            rows.append({"setting": setting, "method": method, "variant": variant, "lambda": lam, "rho": rho,
                         "task": tasks[t], "accuracy": acc[t]})
        correct_rows.append({"setting": setting, "method": method, "variant": variant,
                             "bits": "".join(map(str, c.tolist()))})
        return acc

    # the learning rate: one shared lr, the grid point whose fine-tunes have the best mean validation
    # accuracy (first best in grid order); its fine-tunes are the unit's (same seed and data: reused exactly).
    # run() searches it in the first seed's unit and gives the choice to the others (`lr`)
    probe_val = u.accuracies(u.g0, "val", ids)[0]
    lr_rows, reuse = [], None
    if lr is not None:
        u.set_lr(lr)
    grid = lr_grid(s, tuning, u.cfg) if lr is None else [float(lr)]
    if len(grid) > 1:
        found = {}
        for lr in grid:
            cand = u.fine_tunes(lrs={t: lr for t in ids})[3]
            found[lr] = cand
            for t, x in enumerate(cand):
                lr_rows.append({"lr": lr, "task": tasks[t], "steps": x.num_steps, "train_loss": x.train_loss,
                                "probe_val": probe_val[t],
                                "individual_val": u.accuracies(u.merged_model(u.task_vector(x.state)), "val",
                                                               [t])[0][t]})
        lrs = pd.DataFrame(lr_rows)
        score = lrs.groupby("lr", sort=False)["individual_val"].mean()
        best = float(score.index[int(np.argmax(score.to_numpy()))])
        lrs["chosen"] = lrs["lr"] == best
        lr_rows = lrs.to_dict("records")
        u.set_lr(best)
        reuse = u.reuse_of(found[best])
        log(f"  [{tuning} seed {seed}] lr {best:g} chosen on validation from {grid} "
            f"({time.perf_counter() - start:.0f} s)")
    # the loop's round 1: fine-tunes + one-shot FedAvg (stack semantics for LoRA)
    updates, g_fedavg = u.first_round(reuse=reuse)
    log(f"  [{tuning} seed {seed}] fine-tuned {T} tasks x {u.cfg.train.local_steps} steps on the loop "
        f"({time.perf_counter() - start:.0f} s)")
    tvs = [u.task_vector(x.state) for x in updates]
    steps = [x.num_steps for x in updates]
    fedit_tv = None
    if u.modules:
        g_fit = FedAvg(u.cfg.replace(**{"fl.lora_aggregation": "factors", "fl.strategy": "fedavg", "fl.options": {}}),
                       u.run.model).aggregate(u.g0, updates, 1)
        fedit_tv = OrderedDict((m.base_key, lora_delta(g_fit.state, m) - lora_delta(u.init, m)) for m in u.modules)
    # probe (theta_0 + frozen heads) and individual models
    probe_test = keep("homogeneous", "probe", "-", u.g0, 0.0, nan)
    ind_test, ind_val = {}, {}
    for t in ids:
        ind_test[t] = u.accuracies(u.merged_model(tvs[t]), "test", [t])[0][t]
        ind_val[t] = u.accuracies(u.merged_model(tvs[t]), "val", [t])[0][t]
        rows.append({"setting": "homogeneous", "method": "individual", "variant": "-", "lambda": 1.0, "rho": nan,
                     "task": tasks[t], "accuracy": ind_test[t]})
    finetune = pd.DataFrame([{"task": tasks[t], "lr": u.cfg.train.lr, "steps": steps[t],
                              "train_loss": updates[t].train_loss,
                              "probe_val": probe_val[t], "individual_val": ind_val[t], "probe_test": probe_test[t],
                              "individual_test": ind_test[t], "gain_test": ind_test[t] - probe_test[t],
                              "tv_norm": merging.norm(tvs[t])} for t in ids])
    # individual models' per-example test correctness (for the probe-vs-individual claim)
    ind_bits = np.concatenate([u.accuracies(u.merged_model(tvs[t]), "test", [t])[1] for t in ids])
    correct_rows.append({"setting": "homogeneous", "method": "individual", "variant": "-",
                         "bits": "".join(map(str, ind_bits.tolist()))})
    keep("homogeneous", "fedavg", "1/T", g_fedavg, 1.0 / T, nan)

    def search(setting, method, tvs_, sub, steps_, ref_val, variants=VARIANTS, merged=None):
        """(w, rho) tuned and rho at w = 1/T, by the authors' criterion on validation (only w = 1/T searched
        when `variants` lacks "tuned"; a single candidate is not evaluated on validation at all). `merged`
        (a dict) receives every candidate's merged task vector by (w, rho), for the caller to reuse."""
        merged = {} if merged is None else merged
        best = {"tuned": (-1.0, None), "1/T": (-1.0, None)}
        ws = per_task_grid(s, len(sub)) if "tuned" in variants else [1.0 / len(sub)]
        rhos = rho_grid(method, s, tvs_)
        if len(ws) * len(rhos) == 1:
            return {v: (ws[0], rhos[0]) for v in variants}
        for rho in rhos:
            for w in ws:
                tv = merged[(w, rho)] = merge(method, tvs_, w, rho, steps_, seed, fedit_tv)
                acc = u.accuracies(u.merged_model(tv), "val", sub)[0]
                score = float(np.mean([acc[t] / max(ref_val[t], 1e-12) for t in sub]))
                for t in sub:
                    val_rows.append({"setting": setting, "method": method, "lambda": w, "rho": rho, "task": tasks[t],
                                     "accuracy": acc[t], "score": score})
                if score > best["tuned"][0]:
                    best["tuned"] = (score, (w, rho))
                if w == 1.0 / len(sub) and score > best["1/T"][0]:
                    best["1/T"] = (score, (w, rho))
        return {v: best[v][1] for v in variants}

    def merges(setting, methods, tvs_, steps_, ref_val, sub=None, variants=VARIANTS):
        sub = ids if sub is None else sub
        for method in methods:
            if method == "fedit" and fedit_tv is None:
                continue
            merged = {}       # the search's candidates: a full-model merge costs seconds, compute each once
            chosen = search(setting, method, tvs_, sub, steps_, ref_val, variants, merged)
            for variant in variants:
                w, rho = chosen[variant]
                tv = merged.get((w, rho)) or merge(method, tvs_, w, rho, steps_, seed, fedit_tv)
                keep(setting, method, variant, u.merged_model(tv), w, rho, sub)

    merges("homogeneous", s.methods, tvs, steps, ind_val)
    log(f"  [{tuning} seed {seed}] merged homogeneous ({time.perf_counter() - start:.0f} s)")

    # equivalence: task arithmetic at 1/T vs the loop's FedAvg round
    ta = merging.task_arithmetic(tvs, 1.0 / T)
    eq = equivalence_rows(u, ta, g_fedavg, fedit_tv, tasks)

    # training heterogeneity: the same loop, tasks fine-tuned for steps x multiplier (hetero_training) or
    # with lr x multiplier (hetero_lr); normalised by the homogeneous individual models (fixed denominators)
    n0, lr0 = u.cfg.train.local_steps, u.cfg.train.lr
    hetero = []
    if s.hetero_steps:
        hetero.append(("hetero_training", {t: max(1, int(round(n0 * m))) for t, m in enumerate(s.hetero_steps)},
                       None))
    if s.hetero_lrs:
        hetero.append(("hetero_lr", None, {t: lr0 * float(m) for t, m in enumerate(s.hetero_lrs)}))
    for setting, het_steps, het_lrs in hetero:
        h_updates, g_het = u.first_round(het_steps, het_lrs, reuse=u.reuse_of(updates))
        h_tvs = [u.task_vector(x.state) for x in h_updates]
        h_steps = [x.num_steps for x in h_updates]
        h_fedit = None
        if u.modules:
            g_hfit = FedAvg(u.cfg.replace(**{"fl.lora_aggregation": "factors", "fl.strategy": "fedavg", "fl.options": {}}),
                            u.run.model).aggregate(u.g0, h_updates, 1)
            h_fedit = OrderedDict((m.base_key, lora_delta(g_hfit.state, m) - lora_delta(u.init, m))
                                  for m in u.modules)
        for t in ids:
            acc = u.accuracies(u.merged_model(h_tvs[t]), "test", [t])[0][t]
            rows.append({"setting": setting, "method": "individual", "variant": "-", "lambda": 1.0,
                         "rho": nan, "task": tasks[t], "accuracy": acc})
        keep(setting, "fedavg", "1/T", g_het, 1.0 / T, nan)
        saved = fedit_tv
        fedit_tv = h_fedit
        # the authors' criterion against the homogeneous individual models (fixed denominators)
        # FedNova normalises by steps only: with equal steps (hetero_lr) it is task arithmetic, not re-searched
        merges(setting, [m for m in s.hetero_methods if not (het_steps is None and m == "fednova")], h_tvs,
               h_steps, ind_val, variants=[v for v in VARIANTS if v in s.hetero_variants])
        fedit_tv = saved
        log(f"  [{tuning} seed {seed}] {setting}: steps {h_steps}, lr x {list(s.hetero_lrs) if het_lrs else 1} "
            f"({time.perf_counter() - start:.0f} s)")

    # geometry and pairs (data heterogeneity)
    cm = merging.cosine_matrix(tvs)
    cos = pd.DataFrame([{"task_a": tasks[a], "task_b": tasks[b], "cosine": float(cm[a, b])}
                        for a in ids for b in ids])
    pair_rows = []
    if s.pairs:
        for a, b in itertools.combinations(ids, 2):
            name = f"pair:{tasks[a]}+{tasks[b]}"
            w = 0.5
            acc = keep(name, "task_arithmetic", "1/T", u.merged_model(merging.task_arithmetic([tvs[a], tvs[b]], w)),
                       w, nan, [a, b])
            rec = {"task_a": tasks[a], "task_b": tasks[b], "cosine": float(cm[a, b]),
                   "accuracy_1/T": float(np.mean([acc[a], acc[b]])),
                   "normalized_1/T": float(np.mean([_norm(acc[t], probe_test[t], ind_test[t]) for t in (a, b)]))}
            if s.pair_search:
                chosen = search(name, "task_arithmetic", [tvs[a], tvs[b]], [a, b], steps, ind_val)["tuned"]
                acc = keep(name, "task_arithmetic", "tuned",
                           u.merged_model(merging.task_arithmetic([tvs[a], tvs[b]], chosen[0])), chosen[0], nan,
                           [a, b])
                rec.update({"lambda_tuned": chosen[0], "accuracy_tuned": float(np.mean([acc[a], acc[b]])),
                            "normalized_tuned": float(np.mean([_norm(acc[t], probe_test[t], ind_test[t])
                                                               for t in (a, b)]))})
            pair_rows.append(rec)
        log(f"  [{tuning} seed {seed}] {len(pair_rows)} pairs ({time.perf_counter() - start:.0f} s)")

    # rounds: FedAvg over the task-clients for R rounds of steps / R local steps, on the loop
    round_rows = []
    for R in s.rounds:
        if R == 1:
            acc = u.accuracies(g_fedavg, "test", ids)[0]
        else:
            g = rounds_run(u, R)
            acc = keep(f"rounds:{R}", "fedavg", "1/T", g, 1.0 / T, nan)
        for t in ids:
            round_rows.append({"rounds": R, "steps_per_round": u.cfg.train.local_steps // R, "task": tasks[t],
                               "accuracy": acc[t]})
    if len(s.rounds) > 1:
        log(f"  [{tuning} seed {seed}] rounds {list(s.rounds)} ({time.perf_counter() - start:.0f} s)")

    summary = pd.DataFrame(rows)
    summary["normalized_accuracy"] = [
        _norm(a, probe_test[tasks.index(t)], ind_test[tasks.index(t)]) for a, t in zip(summary["accuracy"],
                                                                                        summary["task"])]
    summary["accuracy_ratio"] = [a / ind_test[tasks.index(t)] for a, t in zip(summary["accuracy"], summary["task"])]
    log(f"  [{tuning} seed {seed}] done ({time.perf_counter() - start:.0f} s)")
    return {"accuracy": summary, "validation": pd.DataFrame(val_rows), "equivalence": eq, "cosine": cos,
            "pairs": pd.DataFrame(pair_rows), "rounds": pd.DataFrame(round_rows), "finetune": finetune,
            "lr_search": pd.DataFrame(lr_rows),
            "correct": pd.DataFrame(correct_rows), "summary_json": {"wall_s": time.perf_counter() - start}}


def _norm(acc: float, probe: float, ind: float) -> float:
    """(merged - probe) / (individual - probe); NaN when individual == probe (nothing to normalise by)."""
    return (acc - probe) / (ind - probe) if ind != probe else float("nan")


def equivalence_rows(u: Unit, ta: dict, g_fedavg, fedit_tv, tasks) -> pd.DataFrame:
    """Per task: the largest absolute difference between the effective shared parameters of theta_0 +
    TA(1/T) and of the loop's FedAvg round, and the two models' test accuracies (and FedIT beside them)."""
    from fedbench.models import lora_delta
    params = dict(u.run.model.named_parameters())
    if u.modules:
        w0 = {m.base_key: u.run.base.original.get(m.base_key, params[m.base_key]).detach() for m in u.modules}
        eff_fa = {m.base_key: w0[m.base_key] + g_fedavg.base_delta.get(m.base_key, 0)
                  + (lora_delta(g_fedavg.state, m) - lora_delta(u.init, m)) for m in u.modules}
        eff_ta = {k: w0[k] + ta[k] for k in ta}
        fa_tv = {k: eff_fa[k] - w0[k] for k in eff_fa}
    else:
        eff_fa = {k: g_fedavg.state[k] for k in u.encoder_keys}
        eff_ta = {k: u.init[k] + ta[k] for k in u.encoder_keys}
        fa_tv = {k: g_fedavg.state[k] - u.init[k] for k in u.encoder_keys}
    diff = max(float((eff_ta[k] - eff_fa[k]).abs().max()) for k in eff_ta)
    ids = list(range(len(tasks)))
    a_ta, c_ta = u.accuracies(u.merged_model(ta), "test", ids)
    a_fa, c_fa = u.accuracies(g_fedavg, "test", ids)
    rows = []
    for t in ids:
        row = {"task": tasks[t], "lambda": 1.0 / len(tasks), "max_abs_param_diff": diff,
               "accuracy_task_arithmetic": a_ta[t], "accuracy_fedavg": a_fa[t], "same_accuracy": a_ta[t] == a_fa[t],
               "prediction_mismatches": int((c_ta != c_fa).sum())}
        if fedit_tv is not None:
            num = math.sqrt(sum(float((fedit_tv[k] - fa_tv[k]).double().pow(2).sum()) for k in fa_tv))
            row["fedit_rel_delta_diff"] = num / max(merging.norm(fa_tv), 1e-30)
        rows.append(row)
    return pd.DataFrame(rows)


def rounds_run(u: Unit, R: int):
    """R FedAvg rounds of the loop over the task-clients, local_steps / R steps each (same total steps)."""
    from fedbench.fl.server import FederatedRun
    from fedbench.fl import GlobalModel
    steps = u.cfg.train.local_steps // R
    cfg = run_config(u.r.base, u.s, u.tuning, u.seed, rounds=R, local_steps=steps).replace(
        **{"fl.eval_every": R, "train.lr": u.cfg.train.lr})
    run = FederatedRun(cfg, u.td, caches=(u.run.train_cache, u.run.test_cache))     # fits the same probe heads
    run.restart(GlobalModel(run.global_model.state, dict(u.zero_base)))
    for rnd in range(1, R + 1):
        run.run_round(rnd)           # the loop: configure, train every task-client, guard, aggregate, record
    g = run.global_model
    # the global model lives in the rounds run's model; evaluate it (and every later model) in the unit's
    u.remember(g, run.final_predictions)
    return g


# -- the run store ----------------------------------------------------------------------------------

STORE = TableRunStore(EXPERIMENT, TABLES, read_csv_kwargs={"keep_default_na": True, "dtype": {"bits": str}})


def unit_key(r: Resolved, tuning: str, seed: int, lr: float | None = None) -> dict:
    """The whole resolved profile with this unit's seed and tuning (and the lr it was given), and the core's
    results schema."""
    from fedbench.results import RESULTS_SCHEMA
    settings = dataclasses.replace(r.settings, seeds=(int(seed),), tunings=(tuning,)).to_dict()
    key = {"experiment": EXPERIMENT, "base": r.base.to_dict(), "settings": settings, "schema": RESULTS_SCHEMA}
    if lr is not None:
        key["lr"] = float(lr)
    return key


def load_or_compute(r: Resolved, tuning: str, seed: int, log, lr: float | None = None) -> dict:
    key = unit_key(r, tuning, seed, lr)
    res = STORE.load(key)
    if res is None:
        out = compute_unit(r, tuning, seed, log, lr)
        STORE.save(key, {**{k: out[k] for k in TABLES}, "summary": out["summary_json"]})
        res = STORE.load(key)
    return res


# -- the experiment -----------------------------------------------------------------------------------

@dataclass
class TaskArithmeticResult:
    settings: Resolved
    summary: pd.DataFrame
    table: pd.DataFrame
    equivalence: pd.DataFrame
    cosine: pd.DataFrame
    pairs: pd.DataFrame
    rounds: pd.DataFrame
    validation: pd.DataFrame
    finetune: pd.DataFrame
    lr_search: pd.DataFrame
    claims: pd.DataFrame
    protocol: pd.DataFrame
    figures: dict
    out_dir: Path
    wall_s: float


def run(profile: str = "quick", path=None, verbose: bool = True, **overrides) -> TaskArithmeticResult:
    """Run (or load) every unit, write the tables, claims, protocol and figures, return them."""
    r = settings_for(profile, path, **overrides)
    s = r.settings
    log = print if verbose else (lambda *a, **k: None)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    start = time.perf_counter()
    parts = {k: [] for k in TABLES}
    for tuning in s.tunings:
        lr = None            # the learning rate is searched on the first seed's validation, then used for all
        for seed in s.seeds:
            res = load_or_compute(r, tuning, seed, log, lr)
            if lr is None and len(res["lr_search"]):
                ls = res["lr_search"]
                lr = float(ls[ls["chosen"].astype(bool)]["lr"].iloc[0])
            for k in TABLES:
                df = res[k]
                if len(df):
                    df = df.copy()
                    df.insert(0, "seed", seed)
                    df.insert(0, "tuning", tuning)
                    parts[k].append(df)
    tabs = {k: (pd.concat(v, ignore_index=True) if v else pd.DataFrame()) for k, v in parts.items()}
    if not len(tabs["pairs"]):          # a profile without pairs still writes a readable pairs.csv (its header)
        tabs["pairs"] = pd.DataFrame(columns=["tuning", "seed", "task_a", "task_b", "cosine", "accuracy_1/T",
                                              "normalized_1/T"])
    summary = tabs["accuracy"][SUMMARY_COLUMNS]
    table = method_table(summary)
    claims = make_claims(tabs, r)
    protocol = protocol_table(r)
    for df, name in [(summary, "summary.csv"), (table, "table.csv"), (tabs["equivalence"], "equivalence.csv"),
                     (tabs["cosine"], "cosine.csv"), (tabs["pairs"], "pairs.csv"), (tabs["rounds"], "rounds.csv"),
                     (tabs["validation"], "validation.csv"), (tabs["finetune"], "finetune.csv"),
                     (tabs["lr_search"], "lr_search.csv"),
                     (claims, "claims.csv"), (protocol, "protocol.csv")]:
        save_table(df, out, name)
    from fedbench.results import atomic_write_text
    atomic_write_text(out / "PROTOCOL.md", variant_note(path) + protocol_markdown(protocol, claims, tabs["finetune"]))
    figures = make_figures(summary, tabs, r)
    for name, fig in figures.items():
        save_figure(fig, out, name)
    wall = time.perf_counter() - start
    log(f"task_arithmetic [{profile}]: {wall:.0f} s -> {out}")
    write_report(EXPERIMENT, out)
    return TaskArithmeticResult(r, summary, table, tabs["equivalence"], tabs["cosine"], tabs["pairs"],
                                tabs["rounds"], tabs["validation"], tabs["finetune"], tabs["lr_search"], claims,
                                protocol, figures,
                                out, wall)


def method_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (tuning, setting, method, variant): task-averaged accuracy, normalised accuracy and ratio, mean and
    std over seeds, and the lambda (per-task units) / rho chosen, averaged over seeds."""
    d = summary[~summary["setting"].str.startswith("pair:")]
    per_seed = (d.groupby(["tuning", "setting", "method", "variant", "seed"], sort=False)
                [["accuracy", "normalized_accuracy", "accuracy_ratio", "lambda", "rho"]].mean().reset_index())
    g = per_seed.groupby(["tuning", "setting", "method", "variant"], sort=False)
    return g.agg(accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
                 normalized=("normalized_accuracy", "mean"), normalized_std=("normalized_accuracy", "std"),
                 ratio=("accuracy_ratio", "mean"), mean_lambda=("lambda", "mean"), mean_rho=("rho", "mean"),
                 seeds=("seed", "count")).reset_index()


# -- claims ---------------------------------------------------------------------------------------------

def _bits(correct: pd.DataFrame, tuning, setting, method, variant, seeds) -> np.ndarray | None:
    d = correct[(correct["tuning"] == tuning) & (correct["setting"] == setting) & (correct["method"] == method)
                & (correct["variant"] == variant)]
    rows = []
    for seed in seeds:
        x = d[d["seed"] == seed]["bits"]
        if len(x) != 1:
            return None
        rows.append(np.frombuffer(str(x.iloc[0]).encode(), dtype=np.uint8) - ord("0"))
    if len({len(x) for x in rows}) != 1:
        return None
    return np.stack(rows).astype(int)


def pair_metric(pairs: pd.DataFrame) -> tuple[str, str]:
    """The pairs' y: normalised accuracy when every value is finite, else raw accuracy (a task whose
    fine-tune equals its probe in some seed has no normalised value)."""
    if len(pairs) and np.isfinite(pairs["normalized_1/T"].to_numpy(dtype=float)).all():
        return "normalized_1/T", "normalised accuracy"
    return "accuracy_1/T", "accuracy"


def make_claims(tabs: dict, r: Resolved) -> pd.DataFrame:
    from fedbench import claims as C
    s = r.settings
    out = []
    correct = tabs["correct"]
    for tuning in s.tunings:
        tag = f" [{tuning}]" if len(s.tunings) > 1 else ""
        seeds = list(s.seeds)

        def diff(a, b, claim, paper, direction, comparison, detail="", room=True):
            """room: a claim about what fine-tuning or merging does (gated on the validation headroom)."""
            ca, cb = _bits(correct, tuning, *a, seeds), _bits(correct, tuning, *b, seeds)
            if ca is None or cb is None:
                return
            out.append(C.gate(C.paired_accuracy_difference(ca, cb, claim + tag, paper, direction=direction,
                                                           comparison=comparison, detail=detail),
                              headroom if room else ""))

        e = tabs["equivalence"]
        e = e[e["tuning"] == tuning]
        out.append(C.exact(float(e["max_abs_param_diff"].max()), "Task arithmetic with lambda = 1/T is one round of "
                           "FedAvg" + tag, "theta_0 + (1/T) sum_t tau_t = FedAvg of the T task-clients",
                           direction=-1, threshold=1e-6, comparison="max |parameter difference| (<= 1e-6)",
                           detail=f"test predictions that differ: {int(e['prediction_mismatches'].max())}; "
                                  f"{len(e)} (task, seed)", what="exact difference of two computations"))
        ft = tabs["finetune"]
        ft = ft[ft["tuning"] == tuning]
        per_task = ft.groupby("task", sort=False)["gain_test"].mean()
        headroom = C.headroom_gate(float((ft["individual_val"] - ft["probe_val"]).mean())) if len(ft) else ""
        diff(("homogeneous", "individual", "-"), ("homogeneous", "probe", "-"),
             f"Fine-tuning the encoder beats {HEADS[s.head]} (the prerequisite)",
             "tau_t carries the task: individual > theta_0 with its frozen head", +1, "individual - probe",
             "per task (mean over seeds): " + ", ".join(f"{k} {v:+.3f}" for k, v in per_task.items()), room=False)
        for variant in VARIANTS:
            diff(("homogeneous", "task_arithmetic", variant), ("homogeneous", "individual", "-"),
                 f"The merge loses to the individual models (lambda {variant})",
                 "one model for all tasks is below each task's own fine-tune", -1, "task arithmetic - individual")
        for setting, mult, what, how, unit in (
                ("hetero_training", s.hetero_steps, "Training", "different numbers of steps", "step multipliers"),
                ("hetero_lr", s.hetero_lrs, "Learning-rate", "different learning rates", "lr multipliers")):
            for variant in VARIANTS if mult else ():
                diff((setting, "task_arithmetic", variant), ("homogeneous", "task_arithmetic", variant),
                     f"{what} heterogeneity hurts task arithmetic (lambda {variant})",
                     f"tasks trained with {how} merge worse (raw accuracy, same tasks)", -1,
                     f"{setting} - homogeneous", f"{unit} {list(mult)}")
                if setting == "hetero_training" and "fednova" in s.hetero_methods:
                    diff(("hetero_training", "fednova", variant), ("hetero_training", "task_arithmetic", variant),
                         f"FedNova recovers from training heterogeneity (lambda {variant})",
                         "reweighting tau_t by (mean steps / steps_t) / T beats task arithmetic there", +1,
                         "FedNova - task arithmetic (heterogeneous)")
        # every other merge against task arithmetic at the same variant (a missing row is skipped by diff);
        # FedNova with equal steps is task arithmetic by construction: its claim is the one above
        for setting, where in (("homogeneous", "homogeneous"), ("hetero_training", "step heterogeneity")):
            for m, variant in itertools.product(FL_INSPIRED + ("ties", "dare", "fedit"), VARIANTS):
                if m != "fednova":
                    diff((setting, m, variant), (setting, "task_arithmetic", variant),
                         f"{LABELS[m]} beats task arithmetic ({where}, lambda {variant})",
                         "FL-inspired merges improve on task arithmetic (authors: in heterogeneous settings)"
                         if m in FL_INSPIRED else "merging with less interference improves on task arithmetic", +1,
                         f"{m} - task arithmetic ({setting})")
        diff(("homogeneous", "task_arithmetic", "tuned"), ("homogeneous", "task_arithmetic", "1/T"),
             "Tuning lambda on validation beats plain one-shot FedAvg (lambda = 1/T)",
             "the scaling coefficient matters (authors search it over [0.05, 2])", +1, "tuned - 1/T")
        multi = [R for R in s.rounds if R > 1]
        if multi and 1 in s.rounds:
            R = max(multi)
            diff((f"rounds:{R}", "fedavg", "1/T"), ("homogeneous", "fedavg", "1/T"),
                 f"More communication rounds close the gap ({R} rounds vs 1, equal total steps)",
                 "several FedAvg rounds across the tasks beat the one-shot merge", +1, f"{R} rounds - 1 round")
            diff((f"rounds:{R}", "fedavg", "1/T"), ("homogeneous", "task_arithmetic", "tuned"),
                 f"{R} FedAvg rounds beat one-shot task arithmetic with tuned lambda",
                 "more communication beats tuning the one-shot merge", +1, f"{R} rounds - tuned task arithmetic")
        p = tabs["pairs"]
        p = p[p["tuning"] == tuning] if len(p) else p
        if len(p) >= 3:
            col, what = pair_metric(p)
            pm = p.groupby(["task_a", "task_b"], sort=False)[["cosine", col]].mean()
            if pm["cosine"].nunique() > 1:
                out.append(C.gate(C.rank_correlation(
                    pm["cosine"].to_numpy(), pm[col].to_numpy(),
                    "Data heterogeneity hurts the merge: similar task vectors merge better" + tag,
                    "tasks whose updates point in different directions merge worse", direction=+1,
                    comparison=f"Spearman(cosine of the task vectors, pair {what} at lambda = 1/2)",
                    detail=f"{len(pm)} pairs, each averaged over {p['seed'].nunique()} seeds; cosine "
                           f"{pm['cosine'].min():.3f} .. {pm['cosine'].max():.3f}"
                           + ("" if col == "normalized_1/T" else "; raw accuracy: a normalised value was "
                              "undefined (a task whose fine-tune equals its probe)")), headroom))
    tags = [f" [{t}]" if len(s.tunings) > 1 else "" for t in s.tunings]
    return C.claims_table(out, primary=[PRIMARY_CLAIMS[k] + tag for k in s.primary for tag in tags])


# -- protocol: paper / official code / ours (fedbench.experiments.task_arithmetic_protocol) ----------------

from fedbench.experiments.task_arithmetic_protocol import protocol_markdown, protocol_table  # noqa: E402


# -- figures ----------------------------------------------------------------------------------------------

def make_figures(summary: pd.DataFrame, tabs: dict, r: Resolved) -> dict:
    from fedbench import plots
    s = r.settings
    figs = {}
    order = ["fedavg", *MERGE_METHODS]
    for tuning in s.tunings:
        sfx = "" if tuning == s.tunings[0] else f"_{tuning}"
        d = summary[(summary["tuning"] == tuning) & summary["setting"].isin(["homogeneous", "hetero_training",
                                                                              "hetero_lr"])
                    & summary["method"].isin(order)]
        per_seed = (d.groupby(["setting", "method", "variant", "seed"], sort=False)["normalized_accuracy"].mean()
                    .reset_index())
        per_seed["method"] = per_seed["method"].map(LABELS) + " (" + per_seed["variant"] + ")"
        for setting in per_seed["setting"].unique():
            figs[f"normalized_accuracy_{setting}{sfx}.png"] = plots.bars(
                per_seed[per_seed["setting"] == setting], x="method", y="normalized_accuracy",
                ylabel="normalised accuracy\n(merged - probe) / (individual - probe)",
                title=f"{setting.replace('_', ' ')} ({tuning}): tasks averaged, 95% CI over seeds")
        c = tabs["cosine"]
        c = c[(c["tuning"] == tuning) & (c["task_a"] != c["task_b"])]
        figs[f"cosine_similarity{sfx}.png"] = plots.heatmap(c, "task_a", "task_b", "cosine", center=0.0,
                                                            title=f"cosine of task vectors ({tuning})",
                                                            cbar_label="cosine")
        p = tabs["pairs"]
        if len(p):
            p = p[p["tuning"] == tuning]
            col, what = pair_metric(p)
            pm = p.groupby(["task_a", "task_b"], sort=False)[["cosine", col]].mean().reset_index()
            pm["pair"] = pm["task_a"] + "+" + pm["task_b"]
            pm["merge"] = "task arithmetic, lambda = 1/2"
            figs[f"similarity_vs_accuracy{sfx}.png"] = plots.scatter(
                pm, "cosine", col, hue="merge", annotate="pair",
                xlabel="cosine of the two task vectors", ylabel=f"pair {what}",
                title=f"pairs ({tuning}, mean over seeds)")
        ro = tabs["rounds"]
        if len(ro) and ro["rounds"].nunique() > 1:
            ro = ro[ro["tuning"] == tuning].groupby(["rounds", "seed"])["accuracy"].mean().reset_index()
            ro["method"] = "FedAvg, R rounds x steps / R"
            ta = summary[(summary["tuning"] == tuning) & (summary["setting"] == "homogeneous")]
            hl = {f"{LABELS[m]} ({v})": float(ta[(ta["method"] == m) & (ta["variant"] == v)]
                                               .groupby("seed")["accuracy"].mean().mean())
                  for m, v in (("task_arithmetic", "tuned"), ("probe", "-"), ("individual", "-"))}
            figs[f"accuracy_vs_rounds{sfx}.png"] = plots.curves(
                ro, "rounds", "accuracy", hue="method", hlines=hl, logx=True, xlabel="communication rounds",
                ylabel="test accuracy (tasks averaged)", title=f"rounds at equal total steps ({tuning})")
    return figs
