"""LoRM (Salami et al., 2024, arXiv 2410.17961) in federated class-incremental learning, on the shared loop.

Every federated method is a strategy of :mod:`fedbench.strategies.continual` run by :class:`fedbench.fl.FederatedRun`,
so sampling (``fl.clients_per_round``), dropout, DP-SGD (``train.dp``), attacks and the update guard reach
LoRM by configuration: ``fedbench run configs/lorm/quick.yaml --set fl.dropout=0.3``.

Setting. The classes of ``dataset`` (ng20: 20 classes) are cut into ``num_tasks`` tasks in an order drawn
per seed. Each class contributes ``max_train_per_class`` training rows (a fixed subsample, ``data_seed``), of
which ``val_fraction`` are carved out as a validation split (never trained on; it picks the learning rate and
gives the held-out inputs of the merge check), and ``max_test_per_class`` test rows. A task's training rows
are split over the ``data.num_clients`` clients by Dirichlet(``data.alpha``). Each task runs
``rounds_per_task`` rounds (LoRM: B, A, B). While task t trains, the logits outside task t are masked; after
task t the model is scored on every seen task, argmax over every seen class (no task id):
a[t, j] = accuracy on task j after task t.

Metrics: final average accuracy = mean_j a[T-1, j]; average incremental accuracy = mean_t mean_{j<=t} a[t, j];
forgetting = mean_{j<T-1} (max_{j<=t<T-1} a[t, j] - a[T-1, j]); mb_up = MB every client sent (Gram matrices
included, upper triangles, exact).

Methods (:data:`METHODS`; every LoRA method the same placement and rank r, the same continual protocol):
``lorm`` (served by LoRM's cross-task merge); ``lorm_mean`` (the same LoRM runs served by the running mean of
the task products instead: read off LoRM's runs, which score both); ``lorm_avg`` (LoRM's B/A schedule at
LoRM's lr with the trained factor averaged: only the closed-form solve differs); ``fedit`` (factor averaging);
``fedit_lorm_lr`` (FedIT at the lr LoRM chose); ``product_svd`` (exact product average re-factorised at rank r);
``regmean_svd`` (RegMean of the dense products re-factorised at rank r); the rank-growing variants
``product_stack`` and ``regmean_dense`` (folded into the base every round, labelled as such);
``full_top`` (full fine-tuning of the top layer + head, FedAvg, sequential over the tasks); ``joint``
(centralised LoRA on every task's pooled data at once: the upper bound).

Learning rate: per method, each value of ``lr_grid`` is run on the first seed and the one with the best final
average accuracy on the validation split is used for every seed (ties: the smaller lr); ``lr_extend`` > 0
scores one grid step beyond a choice at an end of the values scored, up to that many times (``extension``
rows of lr_selection.csv). The controls ``lorm_avg`` and ``fedit_lorm_lr`` take LoRM's lr.

Seeds: the primary methods (:data:`PRIMARY`) run every seed of ``seeds``; the others the first
``exploratory_seeds`` of them (0: every seed).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedbench.bench.report import write_report
from fedbench.config import ConfigError, ExperimentConfig, config_hash
from fedbench.bench import (Settings, TableRunStore, check_list, check_method, check_seeds,
                                         check_subset, chosen_lr, is_int, is_number, no_lr, output_dir,
                                         resolve_profile, save_figure, save_table)
from fedbench.bench import select_lr as common_select_lr
from fedbench.fl.seeding import derive_seed

EXPERIMENT = "lorm"
METHODS = ("lorm", "lorm_mean", "lorm_avg", "fedit", "fedit_lorm_lr", "product_svd", "regmean_svd", "product_stack", "regmean_dense", "full_top", "joint")
LABELS = {"lorm": "LoRM (closed-form factor, rank r)",
          "lorm_mean": "LoRM served by the running mean of task products",
          "lorm_avg": "LoRM's schedule, trained factor averaged", "fedit": "FedIT (factor average, rank r)",
          "fedit_lorm_lr": "FedIT at LoRM's lr",
          "product_svd": "exact product average, SVD to rank r", "regmean_svd": "RegMean, SVD to rank r",
          "product_stack": "exact product average, stacked (rank grows)",
          "regmean_dense": "RegMean, dense (unbounded rank)", "full_top": "full FT of the top layer",
          "joint": "joint (centralised upper bound)"}
# fl.strategy / fl.lora_aggregation of each federated method
STRATEGY = {"lorm": ("lorm", "factors"), "lorm_avg": ("lorm", "factors"), "fedit": ("continual", "factors"), "product_svd": ("continual", "svd"),
            "regmean_svd": ("regmean", "svd"), "product_stack": ("continual", "stack"),
            "regmean_dense": ("regmean", "stack"), "full_top": ("continual", "factors")}
# methods that train something else than the profile's LoRA: full fine-tuning of the top layer + the head
PEFT = {"full_top": {"peft.method": "full", "peft.depth": 1}}
# the primary comparison's methods: every seed of the profile
PRIMARY = ("lorm", "fedit")
# controls run with the lr another method chose (no grid of their own)
LR_FROM = {"lorm_avg": "lorm", "fedit_lorm_lr": "lorm", "lorm_mean": "lorm"}
# rows read off another method's runs: (its runs, the cross-task rule whose rows they are)
DERIVED = {"lorm_mean": ("lorm", "mean")}
# controls whose grid is scored on the first seed as well (their reported runs still take LR_FROM's lr)
GRID_SCORED = ("lorm_avg",)
# runs that are another method's config (so a control at an lr that method scored reuses that run)
CONFIG_OF = {"fedit_lorm_lr": "fedit"}


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
    methods: tuple[str, ...] = METHODS

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
        self.methods = check_subset("methods", self.methods, METHODS)
        needs = sorted({LR_FROM[m] for m in self.methods if m in LR_FROM} - set(self.methods))
        if needs:
            raise ConfigError("methods", list(self.methods), f"{needs} with {sorted(set(LR_FROM) & set(self.methods))}"
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


def shared_caches(s: LormSettings, base: ExperimentConfig) -> tuple:
    """The pool's activation caches at every depth the methods train from (the LoRA methods the top
    ``peft.depth`` layers, full_top the top one), filled once up front and shared by every run."""
    from fedbench.fl.federations import TaskSequenceOptions, sequence_pool, sequence_pool_caches
    o = TaskSequenceOptions.from_dict(federation(s), "data.federation_options")
    pool = sequence_pool(o, s.dataset, base.model.backbone, base.data.max_length)
    if pool.caches is None:
        sequence_pool_caches(pool, base.model, [base.peft.depth or 1, 1])
    return pool.caches


def run_config(s: LormSettings, base: ExperimentConfig, method: str, seed: int, lr: float) -> ExperimentConfig:
    """The core config of one federated (or joint) run (``lorm_mean``: LoRM's run served by the running mean,
    the run whose rows it is; a control that is another method's config: that method's)."""
    from fedbench.options import option_fields
    from fedbench.registry import STRATEGIES
    if method in DERIVED:
        src, rule = DERIVED[method]
        return run_config(s, base, src, seed, lr).replace(**{
            "fl.options": {**run_config(s, base, src, seed, lr).fl.options, "cross_task": rule,
                           "score_running_mean": False, "merge_check": False}})
    method = CONFIG_OF.get(method, method)
    strategy, semantics = STRATEGY.get(method, ("continual", "factors"))
    # the closed-form solves' ridge, LoRM's merge diagnostic (LoRM's own solve only), the control's averaged
    # factor, and the running mean scored beside the cross-task merge when lorm_mean is asked for
    wanted = {"ridge": float(s.ridge), "merge_check": bool(s.merge_check) and method == "lorm"}
    if method == "lorm_avg":
        wanted["solve"] = "average"
    if method == "lorm" and "lorm_mean" in s.methods:
        wanted["score_running_mean"] = True
    options = {k: v for k, v in wanted.items() if k in option_fields(STRATEGIES, strategy)}
    changes = {"seed": int(seed), "name": f"lorm-{method}", "data.task": s.dataset, "train.lr": float(lr),
               "fl.rounds": s.num_tasks * s.rounds_per_task, "fl.eval_every": s.rounds_per_task,
               "fl.strategy": strategy, "fl.lora_aggregation": semantics, "fl.options": options,
               "data.federation": "task_sequence", "data.federation_options": federation(s)}
    changes.update(PEFT.get(method, {}))
    return base.replace(**changes)


# -- data: one train and one test split for every seed; the task order is drawn per seed ----------------

# -- one run ----------------------------------------------------------------------------------------------

def run_one(s: LormSettings, cfg: ExperimentConfig, method: str, data, caches) -> dict:
    """One (method, seed, lr) run on the shared loop (joint: centralised), as tables."""
    from fedbench.fl import FederatedRun
    t0 = time.perf_counter()
    if method == "joint":
        return run_joint(s, cfg, data, caches, t0)
    run = FederatedRun(cfg, data, caches)
    for r in range(1, cfg.fl.rounds + 1):
        run.run_round(r)
    rounds = pd.DataFrame(run.records)
    st = run.strategy
    served = st.cross_task
    pred = pd.DataFrame(run.final_predictions).assign(merge=served)
    if st.mean_predictions is not None:      # the running mean scored beside the served cross-task merge
        pred = pd.concat([pred, pd.DataFrame(st.mean_predictions).assign(merge="mean")], ignore_index=True)
    return {"accuracy": pd.DataFrame(st.acc_rows, columns=ACC_COLS),
            "merge_error": pd.DataFrame(st.merge_rows, columns=MERGE_COLS),
            "rounds": rounds,
            "predictions": pred,
            "summary": {"bytes_up": int(rounds["bytes_up"].sum()), "bytes_down": int(rounds["bytes_down"].sum()),
                        "served": served, "wall_s": time.perf_counter() - t0}}


ACC_COLS = ["split", "after_task", "task", "accuracy", "merge"]


def view(res: dict, merge: str | None = None) -> dict:
    """A run's accuracy and prediction tables of one cross-task rule (default: the served one), without the
    merge column."""
    merge = merge or res["summary"]["served"]
    out = dict(res)
    for name in ("accuracy", "predictions"):
        t = res[name]
        out[name] = t[t["merge"] == merge].drop(columns="merge").reset_index(drop=True)
    return out


MERGE_COLS = ["task", "round", "layer", "factor", "rule", "split", "error", "rel_error"]


def run_joint(s, cfg, data, caches, t0) -> dict:
    """Centralised LoRA on every task's pooled training rows at once (all classes), as many optimizer steps as
    all clients of a federated run take together; a[t, j] is the final model scored over the classes seen
    after task t."""
    from fedbench.fl.client import train_client
    from fedbench.models import build_model, load_trainable_state, trainable_state
    from fedbench.models.inputs import TokenizedSplit
    model = build_model(cfg.model, cfg.peft, data.num_labels, seed=derive_seed(cfg.seed, "init"))
    every = np.sort(np.concatenate([r for tc in data.task_clients for r in tc]))
    steps = cfg.fl.rounds * cfg.cohort_size() * (cfg.train.local_steps or 1)
    u = train_client(model, trainable_state(model), TokenizedSplit(data.train.input_ids, data.train.labels), every,
                     cfg.train.with_steps(steps), seed=derive_seed(cfg.seed, "client", 0, 10**6), cache=caches[0],
                     pad_id=data.pad_id)
    load_trainable_state(model, u.state)
    # one model for every a[t, j]: its logits on every test and validation row are computed once, and a[t, j]
    # is their argmax over the classes seen after task t
    test_rows, val_rows = np.concatenate(data.task_test), np.concatenate(data.task_val)
    logits = {"test": all_logits(model, data.test, test_rows, caches[1], data.pad_id),
              "val": all_logits(model, data.train, val_rows, caches[0], data.pad_id)}
    labels = {"test": data.test.labels, "val": data.train.labels}
    rows = []
    for t in range(s.num_tasks):
        mask = data.seen_mask(t)
        for split, idx in (("test", data.task_test), ("val", data.task_val)):
            if split == "val" and t < s.num_tasks - 1:
                continue
            for j in range(t + 1):
                pred = masked_argmax(torch.stack([logits[split][int(i)] for i in idx[j]]), mask)
                acc = float(np.mean((pred == labels[split][torch.as_tensor(idx[j])]).numpy())) if len(idx[j]) \
                    else float("nan")
                rows.append({"split": split, "after_task": t, "task": j, "accuracy": acc})
    last = masked_argmax(torch.stack([logits["test"][int(i)] for i in test_rows]), data.seen_mask(s.num_tasks - 1))
    final = {"predictions": {"test_index": test_rows.astype(np.int64),
                             "label": data.test.labels[torch.as_tensor(test_rows)].numpy().astype(np.int64),
                             "prediction": last.numpy().astype(np.int64)}}
    return {"accuracy": pd.DataFrame(rows, columns=ACC_COLS[:-1]).assign(merge="joint"),
            "merge_error": pd.DataFrame(columns=MERGE_COLS),
            "rounds": pd.DataFrame([{"round": 0, "train_loss": u.train_loss, "local_steps": u.num_steps}]),
            "predictions": pd.DataFrame(final["predictions"]).assign(merge="joint"),
            "summary": {"bytes_up": 0, "bytes_down": 0, "served": "joint", "wall_s": time.perf_counter() - t0}}


@torch.no_grad()
def all_logits(model, split, indices, cache, pad_id: int, batch_size: int = 256) -> dict:
    """{row: logits over every class} of `model` on `indices` of `split` (no class mask), in the batches
    :func:`fedbench.fl.client.evaluate` uses."""
    from fedbench.fl.client import forward_batch
    from fedbench.models.inputs import TokenizedSplit, batch_order
    plain = TokenizedSplit(split.input_ids, split.labels)
    model.eval()
    out = {}
    for batch in batch_order(np.asarray(indices), split.lengths, batch_size, rng=None, shuffle=False, bucketing=True):
        out.update(zip(np.asarray(batch).tolist(), forward_batch(model, plain, batch, cache, pad_id)))
    return out


def masked_argmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Argmax over the classes `mask` allows (as :func:`fedbench.fl.client.restrict_logits` then argmax)."""
    return logits.masked_fill(~mask, float("-inf")).argmax(-1)


STORE = TableRunStore(EXPERIMENT, ("accuracy", "merge_error", "rounds", "predictions"),
                      read_csv_kwargs={"dtype": {"factor": str}})


def run_key(s: LormSettings, cfg: ExperimentConfig, method: str) -> dict:
    """The whole run config (its data, strategy options and the method's name say everything) and the core's
    results schema."""
    from fedbench.results import RESULTS_SCHEMA
    return {"experiment": EXPERIMENT, "config": cfg.to_dict(), "schema": RESULTS_SCHEMA}


# -- metrics ------------------------------------------------------------------------------------------------

def accuracy_matrix(acc: pd.DataFrame, T: int, split: str = "test") -> np.ndarray:
    a = np.full((T, T), np.nan)
    for r in acc[acc["split"] == split].itertuples():
        a[int(r.after_task), int(r.task)] = r.accuracy
    return a


def cl_metrics(a: np.ndarray) -> dict:
    T = a.shape[0]
    avg = [float(np.mean(a[t, :t + 1])) for t in range(T)]
    forgetting = float(np.mean([np.max(a[j:T - 1, j]) - a[T - 1, j] for j in range(T - 1)])) if T > 1 else 0.0
    return {"avg_after_task": avg, "final_avg_accuracy": avg[-1], "avg_incremental_accuracy": float(np.mean(avg)),
            "forgetting": forgetting}


def val_accuracy(acc: pd.DataFrame) -> float:
    return float(acc.loc[acc["split"] == "val", "accuracy"].mean())


# -- the experiment -------------------------------------------------------------------------------------------

@dataclass
class LormResult:
    settings: LormSettings
    base: ExperimentConfig
    summary: pd.DataFrame
    per_task: pd.DataFrame
    avg_curve: pd.DataFrame
    merge_error: pd.DataFrame
    lr_selection: pd.DataFrame
    claims: pd.DataFrame
    runs: pd.DataFrame
    correct: dict = field(default_factory=dict)      # method -> {seed: (n_test,) 0/1}
    out: Path = None
    figures: dict = field(default_factory=dict)


def export(profile: str = "quick", path=None, method: str = "lorm", seed: int = 0, lr: float | None = None,
           **overrides) -> ExperimentConfig:
    """One reported federated run as a config that runs alone (``fedbench export``): `method` at `seed`, at `lr` or
    the lr the profile chose on validation. ``joint`` (centralised) is not a federated run."""
    s, base = settings_for(profile, path, **overrides)
    check_method(method, tuple(m for m in METHODS if m != "joint"))
    lr = lr if lr is not None else chosen_lr(EXPERIMENT, profile, path, method=LR_FROM.get(method, method))
    if lr is None:
        raise no_lr(profile, method)
    return run_config(s, base, method, int(seed), float(lr))


class _Runner:
    def __init__(self, s, base, progress):
        self.s, self.base, self.progress = s, base, progress
        self.data = {}

    def get(self, method: str, seed: int, lr: float) -> tuple[dict, str]:
        cfg = run_config(self.s, self.base, method, seed, lr)
        key = run_key(self.s, cfg, method)
        res = STORE.load(key)
        if res is None:
            from fedbench.fl.data import build_data
            caches = shared_caches(self.s, self.base)
            if seed not in self.data:        # the run's data from its config (every method of a seed: the same)
                self.data[seed] = build_data(cfg)
            res = run_one(self.s, cfg, method, self.data[seed], caches)
            STORE.save(key, res)
            if self.progress:
                acc = view(res)["accuracy"]
                m = cl_metrics(accuracy_matrix(acc, self.s.num_tasks))
                print(f"[lorm] {method:<14} seed {seed} lr {lr:g}: {res['summary']['wall_s']:.0f} s, final avg acc "
                      f"{m['final_avg_accuracy']:.3f}, val {val_accuracy(acc):.3f}", flush=True)
            res = STORE.load(key)          # what a later load gives (bit-identical tables either way)
        return res, config_hash(key)


def select_lr(method: str, grid, get, extend: int = 0) -> tuple[float, list[dict]]:
    """The lr of `grid` whose run (``get(lr) -> (tables, run hash)``, the first seed's) has the best final average
    accuracy on the validation split (ties: the smaller lr; `extend`: brackets an edge choice), and one
    lr_selection row per value."""
    def score(lr):
        res, h = get(lr)
        acc = view(res)["accuracy"] if "merge" in res["accuracy"] else res["accuracy"]
        return val_accuracy(acc), {"run": h}
    return common_select_lr(method, grid, score, metric="val_final_avg_accuracy", extend=extend)


def control_grid(s: LormSettings, method: str, used: float, runner) -> list[dict]:
    """A control that takes another method's lr, scored on the first seed's validation at every grid value too
    (what it would have chosen: does it degrade where that method does?); ``chosen`` marks the lr its reported
    runs use, ``lr_from`` whose choice that is."""
    rows = []
    for lr in sorted(set(s.lr_grid) | {used}):
        res, h = runner.get(method, s.seeds[0], lr)
        rows.append({"method": method, "lr": lr, "val_final_avg_accuracy": val_accuracy(view(res)["accuracy"]),
                     "run": h, "chosen": lr == used, "chosen_at_grid_edge": False, "extension": 0,
                     "lr_from": LR_FROM[method]})
    return rows


def method_seeds(s: LormSettings, method: str) -> tuple:
    """Every seed for the primary comparison's methods; the first ``exploratory_seeds`` for the others."""
    if method in PRIMARY or not s.exploratory_seeds:
        return s.seeds
    return s.seeds[:s.exploratory_seeds]


def run(profile: str = "quick", progress: bool = True, path=None, **overrides) -> LormResult:
    """Every (method, seed) run (lr chosen on validation), then the CSVs, claims and figures."""
    s, base = settings_for(profile, path, **overrides)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    runner = _Runner(s, base, progress)
    per_run, lr_rows, chosen, raw = {}, [], {}, {}
    for method in s.methods:
        if method in DERIVED:             # read off the runs of the method it is an ablation of (its seeds: free)
            src, rule = DERIVED[method]
            for seed in method_seeds(s, src):
                res = view(raw[(src, seed)], rule)
                res["merge_error"] = res["merge_error"].iloc[0:0]       # the diagnostic belongs to the source
                per_run[(method, seed)] = (res, *per_run[(src, seed)][1:])
            continue
        if method in LR_FROM:
            best = chosen[LR_FROM[method]]
            if method in GRID_SCORED:
                lr_rows += control_grid(s, method, best, runner)
        else:
            best, rows = select_lr(method, s.lr_grid, lambda lr: runner.get(method, s.seeds[0], lr), s.lr_extend)
            lr_rows += rows
        chosen[method] = best
        for seed in method_seeds(s, method):
            raw[(method, seed)], h = runner.get(method, seed, best)
            per_run[(method, seed)] = (view(raw[(method, seed)]), h, best)
    result = tables(s, base, per_run, pd.DataFrame(lr_rows))
    result.out = out
    for name in ("summary", "per_task", "merge_error", "lr_selection", "claims", "runs"):
        save_table(getattr(result, name), out, f"{name}.csv")
    save_table(result.avg_curve, out, "avg_accuracy.csv")
    from fedbench.results import atomic_write_text
    atomic_write_text(out / "PROTOCOL.md", "# LoRM: protocol (paper / official code / ours)\n\n" + PROTOCOL)
    result.figures = {name: save_figure(fig, out, f"{name}.png") for name, fig in make_figures(result).items()}
    write_report(EXPERIMENT, out)
    return result


def tables(s: LormSettings, base, per_run: dict, lr_selection: pd.DataFrame) -> LormResult:
    summary, per_task, curve, errs, runs, correct = [], [], [], [], [], {}
    for (m, seed), (res, h, lr) in per_run.items():
        met = cl_metrics(accuracy_matrix(res["accuracy"], s.num_tasks))
        summary.append({"method": m, "seed": seed, "final_avg_accuracy": met["final_avg_accuracy"],
                        "avg_incremental_accuracy": met["avg_incremental_accuracy"], "forgetting": met["forgetting"],
                        "mb_up": res["summary"]["bytes_up"] / 1e6, "lr": lr})
        pt = res["accuracy"][res["accuracy"]["split"] == "test"].drop(columns="split")
        per_task.append(pt.assign(method=m, seed=seed))
        curve += [{"method": m, "seed": seed, "after_task": t + 1, "avg_accuracy": v}
                  for t, v in enumerate(met["avg_after_task"])]
        if len(res["merge_error"]):
            errs.append(res["merge_error"].assign(method=m, seed=seed))
        p = res["predictions"].sort_values("test_index")
        correct.setdefault(m, {})[seed] = (p["label"].to_numpy() == p["prediction"].to_numpy()).astype(float)
        runs.append({"method": m, "seed": seed, "lr": lr, "wall_s": round(res["summary"]["wall_s"], 1), "run": h})
    summary = pd.DataFrame(summary)
    per_task = pd.concat(per_task, ignore_index=True)[["method", "seed", "after_task", "task", "accuracy"]]
    cols = ["method", "seed"] + MERGE_COLS
    errs = pd.concat(errs, ignore_index=True)[cols] if errs else pd.DataFrame(columns=cols)
    return LormResult(s, base, summary, per_task, pd.DataFrame(curve), errs, lr_selection,
                      compute_claims(summary, errs, correct), pd.DataFrame(runs), correct)


# -- claims (fedbench.claims: an estimate, a 95% interval, a verdict) ---------------------------------------

PAPER = "LoRM beats FedAvg-style LoRA aggregation in FCIL (ViT-B/16; CIFAR-100, ImageNet-R, ...)"


PRIMARY_CLAIM = "LoRM beats FedIT (factor average, rank r) (final avg accuracy)"


def compute_claims(summary: pd.DataFrame, errs: pd.DataFrame, correct: dict) -> pd.DataFrame:
    """The primary claim (LoRM with its cross-task merge vs FedIT, every seed), then the controls that say why
    (exploratory: each on the seeds both of its methods ran)."""
    from fedbench import claims as C
    out = []
    methods = set(summary["method"])

    def per_seed(m, col):
        return summary[summary["method"] == m].sort_values("seed")[col].to_numpy()

    def paired(a, b, claim, paper, role="exploratory"):
        seeds = sorted(set(correct[a]) & set(correct[b]))
        out.append(C.paired_accuracy_difference(np.stack([correct[a][s] for s in seeds]),
                                                np.stack([correct[b][s] for s in seeds]), claim, paper,
                                                comparison=f"{a} - {b}", role=role))

    if "lorm" in methods:
        for other, paper in (("fedit", PAPER), ("product_svd", "LoRM > exact product averaging at equal rank"),
                             ("regmean_svd", "LoRM > RegMean at equal rank")):
            if other in methods:
                paired("lorm", other, f"LoRM beats {LABELS[other]} (final avg accuracy)", paper,
                       role="primary" if other == "fedit" else "exploratory")
        # the controls: which part of LoRM moves its accuracy
        for other, claim, paper in (
                ("lorm_mean", "LoRM's cross-task merge beats serving the running mean of task products",
                 "alignment of model responses across tasks (abstract)"),
                ("lorm_avg", "LoRM's closed-form solve beats averaging the trained factor (same schedule, same lr)",
                 "alignment of model responses between clients (abstract)")):
            if other in methods:
                paired("lorm", other, claim, paper)
        if {"fedit", "fedit_lorm_lr"} <= methods:
            paired("fedit", "fedit_lorm_lr", "FedIT's own lr beats FedIT at LoRM's lr", "(a control: the lr)")
        if "fedit_lorm_lr" in methods:
            paired("lorm", "fedit_lorm_lr", "LoRM beats FedIT at one shared lr (LoRM's)", "(a control: the lr)")
        if {"lorm_avg", "fedit_lorm_lr"} <= methods:
            paired("lorm_avg", "fedit_lorm_lr", "LoRM's schedule with averaging beats FedIT at the same lr",
                   "(a control: alternating one factor per round vs both; served by the cross-task merge vs "
                   "the running mean)")
        if "fedit" in methods:
            out.append(C.paired_seed_difference(per_seed("lorm", "forgetting"), per_seed("fedit", "forgetting"),
                                                "LoRM forgets less than FedIT", "(not a headline of the paper)",
                                                direction=-1, comparison="forgetting lorm - fedit"))
        for split, what in (("fit", "on the inputs of the Gram matrices (least squares: guaranteed)"),
                            ("heldout", "on held-out inputs of each client")):
            e = errs[(errs["method"] == "lorm") & (errs["split"] == split)] if len(errs) else errs
            if len(e):
                piv = e.pivot_table(index=["seed", "task", "round", "layer"], columns="rule", values="rel_error")
                d = (piv["lorm"] - piv["factor_average"]).groupby(level="seed").mean()
                out.append(C.seed_mean(d.to_numpy(), f"LoRM's merge matches client responses better than averaging "
                                       f"the trained factor, {what}", "closed form = least-squares optimum for the "
                                       "factor it solves", direction=-1,
                                       comparison="rel. response error lorm - factor average (per-seed mean)"))
        if "fedit" in methods:
            a, b = per_seed("lorm", "mb_up").mean(), per_seed("fedit", "mb_up").mean()
            out.append(C.exact(a / b, "LoRM uploads more than FedIT (Gram matrices)", "clients send one Gram matrix "
                               "per distinct LoRA input besides one factor", threshold=1.0,
                               comparison="mb_up lorm / fedit", what="exact byte count"))
    if "joint" in methods:
        fed = [m for m in methods if m != "joint"]
        if fed:
            best = max(fed, key=lambda m: per_seed(m, "final_avg_accuracy").mean())
            paired("joint", best, "joint training is an upper bound", "joint >= every FCIL method")
    return C.claims_table(out, primary=[PRIMARY_CLAIM])


# -- figures (fedbench.plots) ------------------------------------------------------------------------------------

def make_figures(res: LormResult) -> dict:
    from fedbench import plots
    order = [m for m in METHODS if m in set(res.summary["method"])]
    figs = {"avg_accuracy": plots.curves(res.avg_curve, x="after_task", y="avg_accuracy", hue="method", order=order,
                                         xlabel="after task", ylabel="avg accuracy over seen tasks",
                                         title=f"{res.settings.dataset}: {res.settings.num_tasks} tasks"),
            "forgetting": plots.bars(res.summary, x="method", y="forgetting", order=order, ylabel="forgetting"),
            "final_accuracy": plots.bars(res.summary, x="method", y="final_avg_accuracy", order=order,
                                         ylabel="final avg accuracy")}
    if len(res.merge_error):
        e = res.merge_error.groupby(["seed", "rule", "split"], as_index=False)["rel_error"].mean()
        figs["merge_error"] = plots.bars(e, x="rule", y="rel_error", hue="split",
                                         ylabel="response error / error of no merge",
                                         title="merging LoRM's client updates")
    return figs


# -- the protocol table (results/lorm/PROTOCOL.md; the notebook shows it) -------------------------------------

PROTOCOL = """\
| aspect | paper (arXiv 2410.17961) | official code (aimagelab/fed-mammoth `_models/lorm.py`) | ours | why ours differs |
|---|---|---|---|---|
| backbone, data | ViT-B/16; CIFAR-100, ImageNet-R, ... (class-incremental) | same | MiniLM-L6 (offline) on ng20: 20 classes, 5 tasks x 4 classes, task order drawn per seed | CPU-only, offline benchmark |
| clients, rounds | 10 clients, Dirichlet; 5 rounds x 5 epochs per task | per config | 4 clients, Dirichlet(0.5), all sampled; 3 rounds per task (B, A, B), 3 local steps (quick) | CPU budget (quick <= 12 min); sampling/dropout/DP by config |
| trained factor | one factor at a time, alternating | per **round**: B, A, B, ..., restarting at B each task (`set_train_matrix`, `cur_round = 0` in `begin_task`) | same (`configure_round`: `train_keys`/`send_keys`) | - |
| LoRA placement, rank | qkv, attention output, MLP of every block, r = 16 | same | q, v, attention output and the FFN's first linear of the top 2 layers, r = 8, alpha 16 | CPU cost; the FFN's second linear (1536-d input: a 1536 x 1536 Gram matrix per client per round) left out |
| new task | fresh LoRA | `init_matrices` at `begin_task` | fresh factors (peft init: A kaiming-uniform, B = 0, seeded per task) for **every** LoRA method | - |
| previous tasks (training) | - | `cl_merge='individual_mean'`: each task trains on W0 + its own B A | same, for every LoRA method (the rank-growing variants bank what they folded into the base during the task) | - |
| cross-task merge (the served model) | "alignment of model responses ... across tasks" (abstract) | `end_task_server`: at a task's end the clients send Gram matrices of the task's data (`end_task_client`, on W0 + the running mean incl. the task, head excluded); the server keeps sum_t B_t A_t G_t and sum_t G_t and serves W0 + (sum_t B_t A_t G_t) pinv(sum_t G_t) from the second task on; the running mean `old_delta` is only the filler for evaluations within a task | LoRM and RegMean (`fl.options.cross_task='gram'`): the same merge (`merging.lorm.cross_task_merge`, float64, relative ridge 1e-4 towards the running mean), G_t = the sum of the Gram matrices the clients sent in the task's last round (on the model each client trained); FedIT and the other methods (no Gram matrices): the running mean of the task products; `lorm_mean`: LoRM's own runs served by the running mean (scored on the same runs: training never sees the served model) | no extra client pass: the last round's Grams are already sent, and a layer's inputs differ from the official ones only through the LoRA layers below it |
| Gram matrices | G_i = X_i^T X_i per layer | float32 (`gram_dtype='32'`), one per LoRA layer, on the model (old_delta*t + B_i A_i)/(t+1) | float32, **one per distinct layer input** (query and value share one), sent as the upper triangle (exact bytes); on the model the client trained (W0 + its current B_i A_i) | fewer bytes for the same information; the inputs of the responses the client fitted |
| solve | closed form | float64, `torch.pinverse`: no ridge (also in the cross-task merge) | float64, relative ridge 1e-4 (towards the factor average) | numerical stability on rank-deficient Grams at CPU scale; its error never exceeds averaging's |
| solve control | - | - | `lorm_avg`: LoRM's B, A, B schedule at LoRM's lr with the trained factor averaged by sample count (the other factor shared: the exact product average), served by the same cross-task merge (its clients send Grams in a task's last round only); its grid is scored on the first seed too (lr_selection.csv, `lr_from`) | measures the solve apart from schedule and lr |
| head | - | RegMean on the head weight (`regmean_all`, alpha 0.5), bias FedAvg'd | FedAvg'd by sample count, for every method | the same head rule for every method isolates the LoRA merge |
| logits | train on the current task's classes | `outputs[:, cur_offset:cur_offset + cpt]` | logits outside the task masked; evaluated by argmax over every seen class (no task id) | - |
| optimizer, lr | AdamW, lr 3e-4 | AdamW, lr 3e-4, weight decay 0.1 | AdamW, no weight decay; lr per method from a grid, chosen by final average accuracy on a validation split carved from the training data (first seed; `lr_selection.csv`, with `chosen_at_grid_edge`); a choice at an end of the values scored extends the grid by one step beyond it, up to twice (`lr_extend`, `extension` rows); quick: [3e-3, 1e-2] + extensions; full: [1e-3, 3e-3, 1e-2, 3e-2] + extensions; the controls `lorm_avg` and `fedit_lorm_lr` (FedIT at LoRM's lr) take LoRM's | an lr tuned for ViT/CIFAR does not carry over; never chosen on test; quick: two values at CPU cost, bracketed by the extensions |
| baselines | FedAvg-style LoRA, merging methods, ... | `lora.py`, `regmean.py`, ... | FedIT (factor average), exact product average SVD'd to rank r, RegMean SVD'd to rank r (both SVDs of the product of the stacked factors, via QR: no dense d_out x d_in SVD), and separately labelled the rank-growing variants (stacked product average; dense RegMean), full FT of the top layer, joint training; quick runs LoRM, its controls and FedIT; the other baselines run in full (and in the unit tests) | equal capacity: every rank-r method ends each round at rank r; quick: the 12-minute bar with the primary on 5 seeds |
| merge check (diagnostic, lorm only) | - | - | each round, per layer: response error of LoRM's solve, factor average, product average and RegMean on the same client updates, on the inputs of the Gram matrices (fit) and on held-out inputs of each client, relative to keeping the previous factors; every rule scored from its factors, tr(P Q G Q^T P^T) = sum((P^T P) * (Q G Q^T)) (exact, float64; RegMean of rank-r updates is itself a product of factors with clients x r columns) | the factored form is exact at a fraction of the dense cost (quick <= 12 min) |
| statistics | mean of runs | - | the task order drawn per seed; the primary claim (LoRM vs FedIT) on 5 seeds, Holm over the primary family (`claims_table(primary=...)`); the controls and every other row exploratory on the first 3 seeds (quick); claims via `fedbench.claims` (seed-level intervals: seeds x test examples as crossed random effects; t interval for forgetting) | - |
"""
