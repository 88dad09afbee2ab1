"""FedPEFT (arXiv 2210.01708): which parameters to train and send, under realistic FL conditions.

Six methods under one FedAvg loop (full fine-tuning, head only, BitFit, bottleneck adapters, prompt
tuning, LoRA) on the bundled MiniLM, and three conditions varied one at a time around a base condition
(Dirichlet(1.0) label skew, every client every round, no DP):

- heterogeneity: IID or Dirichlet(alpha) label skew;
- client stability: a sampled fraction of the clients per round, and sampled clients that drop out
  before reporting (they received the model, so their download counts; they send nothing);
- differential privacy: DP-SGD on every client with Opacus (:mod:`fedbench.fl.privacy`) at target
  epsilons, delta = 1 / n_client; each client's epsilon is accounted over every round it took part in.

The headline rows (every method, base condition, several seeds) run on the first task; the other tasks
run a subset of methods at the base condition, and the axes a subset of methods (profile settings).
Every run is one :class:`ExperimentConfig`, cached by its hash under ``runs_root()``, so an interrupted
run resumes and a rerun only rebuilds the tables and figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedbench.config import (ConfigError, DataConfig, DPConfig, ExperimentConfig, FLConfig, ModelConfig, PeftConfig,
                             TrainConfig)
from fedbench.experiments.common import (Claim, claims_table, output_dir, profile_settings, runs_root, save_figure,
                                         save_table)
from fedbench.registry import TUNERS

EXPERIMENT = "fedpeft"
# display order: the reference first, then roughly from fewest to most trainable parameters
METHODS = ("full", "head", "prompt", "lora", "bitfit", "adapter")

# AdamW learning rates per method. Full fine-tuning: 3e-4 from a {1e-4, 3e-4, 1e-3} sweep on the quick
# headline setting (final accuracy, seeds 0-1: 0.54 / 0.62 / 0.53; 1e-3 diverges on one seed): with only
# rounds x local_steps = 8 updates, 1e-4 left full FT undertrained and flattered PEFT.
_LR = {"full": 3e-4, "head": 2e-2, "bitfit": 1e-2, "adapter": 1e-2, "prompt": 3e-2, "lora": 1e-2}

DEFAULTS = {
    "smoke": dict(
        tasks=["tweet_sentiment", "ng20"], methods=list(METHODS), seeds=[0],
        task_methods=["head"], axis_methods=["lora", "head"], axis_seeds=[0],
        heterogeneity=["dirichlet-1.0", "iid"], stability=[[1.0, 0.0], [0.5, 0.5]], dp_epsilons=[8.0],
        clients=3, rounds=2, local_steps=1, batch_size=8, lr=dict(_LR), depth=1,
        max_train_samples=60, max_test_samples=48, max_length=32, dp_max_grad_norm=1.0, dp_delta=None,
        axis_eval_every=1, near_tolerance=0.03),
    "quick": dict(
        tasks=["tweet_sentiment", "ng20"], methods=list(METHODS), seeds=[0, 1],
        task_methods=["full", "lora", "head"], axis_methods=["full", "lora", "head"], axis_seeds=[0],
        # 3 clients keep the quick run within its 8 minutes (6 took 595 s, 4 took 439-485 s: full FT, with and
        # without DP, is 60% of it); half of them (2) are sampled, so the sampled rounds still average two clients
        heterogeneity=["dirichlet-1.0", "iid", "dirichlet-0.1"], stability=[[1.0, 0.0], [0.5, 0.0], [0.5, 0.3]],
        dp_epsilons=[8.0, 2.0],
        clients=3, rounds=4, local_steps=2, batch_size=16, lr=dict(_LR), depth=2,
        max_train_samples=720, max_test_samples=200, max_length=64, dp_max_grad_norm=1.0, dp_delta=None,
        axis_eval_every=2, near_tolerance=0.03),
    "full": dict(
        tasks=["tweet_sentiment", "ng20"], methods=list(METHODS), seeds=[0, 1, 2],
        task_methods=list(METHODS), axis_methods=list(METHODS), axis_seeds=[0, 1, 2],
        heterogeneity=["dirichlet-1.0", "iid", "dirichlet-0.1"],
        stability=[[1.0, 0.0], [0.3, 0.0], [0.3, 0.3], [1.0, 0.3]], dp_epsilons=[8.0, 2.0],
        clients=10, rounds=20, local_steps=10, batch_size=32, lr=dict(_LR), depth=None,
        max_train_samples=5000, max_test_samples=2000, max_length=64, dp_max_grad_norm=1.0, dp_delta=None,
        axis_eval_every=2, near_tolerance=0.03),
}

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
    dp_epsilon: float | None  # None = no DP
    seed: int

    @property
    def heterogeneity(self) -> str:
        return heterogeneity_label(self.partition, self.alpha)

    @property
    def stability(self) -> str:
        return stability_label(self.participation, self.dropout)

    @property
    def dp(self) -> str:
        return "none" if self.dp_epsilon is None else f"eps={self.dp_epsilon:g}"


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


def _check_list(name, value, item_ok, allowed, nonempty=True):
    if not isinstance(value, (list, tuple)) or (nonempty and len(value) == 0) or not all(item_ok(v) for v in value):
        raise ConfigError(name, value, allowed)


def validate_settings(s: dict) -> dict:
    """Check every parameter; raise ConfigError naming the parameter, its value and what is allowed."""
    from fedbench.data import OFFLINE_TASKS
    tasks = tuple(OFFLINE_TASKS)
    _check_list("tasks", s["tasks"], lambda t: t in tasks, f"a non-empty list of offline text tasks from {list(tasks)}")
    for key in ("methods", "task_methods", "axis_methods"):
        _check_list(key, s[key], lambda m: m in TUNERS, f"a list of methods from {TUNERS.names()}",
                    nonempty=key == "methods")
    is_seed = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    _check_list("seeds", s["seeds"], is_seed, "a non-empty list of integers >= 0")
    _check_list("axis_seeds", s["axis_seeds"], is_seed, "a non-empty list of integers >= 0")
    _check_list("heterogeneity", s["heterogeneity"], lambda v: True, "a non-empty list like ['dirichlet-1.0', 'iid']")
    s["heterogeneity"] = [parse_heterogeneity(v) for v in s["heterogeneity"]]
    _check_list("stability", s["stability"],
                lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                and 0 < float(v[0]) <= 1 and 0 <= float(v[1]) < 1,
                "a non-empty list of [participation in (0, 1], dropout in [0, 1)] pairs, the first the base")
    s["stability"] = [(float(p), float(d)) for p, d in s["stability"]]
    _check_list("dp_epsilons", s["dp_epsilons"],
                lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v),
                "a list of target epsilons > 0 (no DP is always run)", nonempty=False)
    lr = s["lr"]
    if not isinstance(lr, dict) or not all(m in lr for m in set(s["methods"]) | set(s["task_methods"])
                                           | set(s["axis_methods"])):
        raise ConfigError("lr", lr, f"a dict with a learning rate for every method run, e.g. {_LR}")
    if s["depth"] is not None and not (isinstance(s["depth"], int) and 1 <= s["depth"] <= 6):
        raise ConfigError("depth", s["depth"], "None (every layer) or an integer in [1, 6] (top layers, LoRA/adapter)")
    if not (isinstance(s["axis_eval_every"], int) and not isinstance(s["axis_eval_every"], bool)
            and s["axis_eval_every"] >= 1):
        raise ConfigError("axis_eval_every", s["axis_eval_every"],
                          "an integer >= 1 (the last round is always evaluated)")
    _check_list("near_tolerance", [s["near_tolerance"]], lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
                "an accuracy difference in [0, 1)")
    return s


# -- the grid ----------------------------------------------------------------------------------------
def build_cells(s: dict) -> list[Cell]:
    """Headline (tasks[0] x methods x seeds at the base condition), the base condition on the other tasks,
    and each axis varied alone around the base for the axis methods on tasks[0]. Duplicates removed."""
    (base_part, base_alpha), (base_p, base_d) = s["heterogeneity"][0], s["stability"][0]
    main = s["tasks"][0]

    def cell(task, method, seed, part=base_part, alpha=base_alpha, p=base_p, d=base_d, eps=None):
        return Cell(task, method, part, alpha, p, d, eps, seed)

    cells = [cell(main, m, seed) for m in s["methods"] for seed in s["seeds"]]
    cells += [cell(t, m, s["seeds"][0]) for t in s["tasks"][1:] for m in s["task_methods"]]
    for m in s["axis_methods"]:
        for seed in s["axis_seeds"]:
            cells.append(cell(main, m, seed))
            cells += [cell(main, m, seed, part=part, alpha=alpha) for part, alpha in s["heterogeneity"][1:]]
            cells += [cell(main, m, seed, p=p, d=d) for p, d in s["stability"][1:]]
            cells += [cell(main, m, seed, eps=float(e)) for e in s["dp_epsilons"]]
    seen, out = set(), []
    for c in cells:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def make_config(c: Cell, s: dict) -> ExperimentConfig:
    dp = (DPConfig(enabled=True, target_epsilon=float(c.dp_epsilon), delta=s["dp_delta"],
                   max_grad_norm=float(s["dp_max_grad_norm"])) if c.dp_epsilon is not None else DPConfig())
    return ExperimentConfig(
        name=EXPERIMENT, seed=int(c.seed),
        data=DataConfig(task=c.task, num_clients=s["clients"], partition=c.partition,
                        alpha=float(c.alpha) if c.alpha is not None else 1.0,
                        max_train_samples=s["max_train_samples"], max_test_samples=s["max_test_samples"],
                        max_length=s["max_length"]),
        model=ModelConfig(),
        peft=PeftConfig(method=c.method, depth=s["depth"] if takes_depth(c.method) else None),
        train=TrainConfig(local_steps=s["local_steps"], batch_size=s["batch_size"], lr=float(s["lr"][c.method]),
                          dp=dp),
        fl=FLConfig(rounds=s["rounds"], clients_per_round=float(c.participation), dropout=float(c.dropout),
                    eval_every=1 if is_headline(c, s) else s["axis_eval_every"]),
    )


def is_headline(c: Cell, s: dict) -> bool:
    """A headline cell (first task, base condition, a headline method and seed): evaluated every round, for
    the accuracy-vs-rounds and accuracy-vs-bytes curves; the others every `axis_eval_every` rounds + the last."""
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    return (c.task == s["tasks"][0] and c.method in s["methods"] and c.seed in s["seeds"] and c.partition == part
            and c.alpha == alpha and c.participation == p and c.dropout == d and c.dp_epsilon is None)


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
    depend on which runs came first or were already on disk.
    """

    def __init__(self):
        self.pool: dict[str, tuple] = {}
        self.filled: set[tuple[str, int]] = set()
        self._model = None

    @staticmethod
    def sample_key(cfg) -> str:
        from fedbench.config import config_hash
        d = cfg.data
        return config_hash({"task": d.task, "max_train_samples": d.max_train_samples, "max_length": d.max_length,
                            "max_test_samples": d.max_test_samples, "backbone": cfg.model.backbone, "seed": cfg.seed})

    def frozen_prefix(self, cfg, num_layers: int) -> int:
        if cfg.peft.method == "head":
            return num_layers
        if takes_depth(cfg.peft.method) and cfg.peft.depth is not None:
            return num_layers - cfg.peft.depth
        return 0

    def get(self, cfg, data):
        import torch

        from fedbench.models import build_model
        from fedbench.models.inputs import ActivationCache
        key = self.sample_key(cfg)
        if key not in self.pool:
            self.pool[key] = (ActivationCache(data.train, data.pad_id), ActivationCache(data.test, data.pad_id))
        if self._model is None:      # the plain pretrained layers compute every prefix
            self._model = build_model(cfg.model, PeftConfig(method="head"), data.num_labels, seed=0)
        depth = self.frozen_prefix(cfg, self._model.num_layers)
        if depth > 0 and (key, depth) not in self.filled:
            with torch.no_grad():
                for cache, idx in zip(self.pool[key], (np.arange(len(data.train)), np.asarray(data.test_indices))):
                    cache.ensure(depth)
                    order = idx[np.lexsort((idx, cache.split.lengths[idx]))]
                    for start in range(0, len(order), 128):
                        cache.get(self._model, order[start:start + 128])
            self.filled.add((key, depth))
        return self.pool[key]


def run_cells(cells: list[Cell], s: dict, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or load) every cell; returns (summary rows, long per-round metrics)."""
    import time

    from fedbench.config import config_hash
    from fedbench.fl import prepare_data, run_cached
    from fedbench.results import load_run, run_key
    data_cache: dict[str, object] = {}
    caches = SharedCaches()
    summary_rows, metric_frames = [], []
    t0 = time.perf_counter()
    for i, c in enumerate(cells, 1):
        cfg = make_config(c, s)
        done = load_run(run_key(cfg), runs_root())
        if done is None:
            key = config_hash({"data": cfg.to_dict()["data"], "backbone": cfg.model.backbone, "seed": cfg.seed})
            if key not in data_cache:       # shared by every method run on the same clients
                data_cache[key] = prepare_data(cfg)
            data = data_cache[key]
            result = run_cached(cfg, data, root=runs_root(), caches=caches.get(cfg, data))
        else:
            result = done
        sm = result.summary
        keys = {"task": c.task, "method": c.method, "partition": c.partition, "alpha": c.alpha,
                "participation": c.participation, "dropout": c.dropout, "dp_epsilon_target": c.dp_epsilon,
                "seed": c.seed}
        summary_rows.append({
            **keys, "variant": variant(c.method, cfg.peft.depth), "heterogeneity": c.heterogeneity,
            "stability": c.stability, "dp": c.dp,
            "dp_epsilon_spent": sm.get("dp_epsilon_spent", float("nan")),
            "dp_mechanism": dp_mechanism(sm["trainable_params"], s["batch_size"]) if c.dp_epsilon else "",
            "trainable_params": sm["trainable_params"], "total_params": sm["total_params"],
            "bytes_up_per_round": sm["bytes_up_per_round"], "bytes_down_per_round": sm["bytes_down_per_round"],
            "state_bytes": sm["state_bytes"], "total_bytes": sm["total_bytes"],
            "final_accuracy": sm["final_accuracy"], "best_accuracy": sm["best_accuracy"],
            "final_loss": sm["final_loss"],
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
    return summary, metrics


def run(profile: str = "quick", progress: bool = True, **overrides) -> FedPEFTResult:
    """Run the FedPEFT grid of `profile` (parameters overridable), write results/fedpeft[/profile]/."""
    s = validate_settings(profile_settings(DEFAULTS, profile, overrides))
    cells = build_cells(s)
    out = output_dir(EXPERIMENT, profile)
    summary, metrics = run_cells(cells, s, progress=progress)
    save_table(summary, out, "summary.csv")
    save_table(metrics, out, "metrics.csv")
    tables = make_tables(summary, s)
    for name, df in tables.items():
        save_table(df, out, f"{name}.csv")
    claims = make_claims(summary, s)
    save_table(claims, out, "claims.csv")
    figures = make_figures(summary, metrics, s, out)
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
        acc = g["final_accuracy"]
        rows.append({
            "task": task, "method": method, "variant": g["variant"].iloc[0], "seeds": len(g),
            "trainable_params": int(g["trainable_params"].iloc[0]),
            "bytes_up_per_round": float(g["bytes_up_per_round"].iloc[0]),
            "bytes_down_per_round": float(g["bytes_down_per_round"].iloc[0]),
            "MB_per_client_per_round": float(g["state_bytes"].iloc[0]) / 1e6,
            "bytes_pct_of_full": 100 * float(g["bytes_up_per_round"].iloc[0]) / full_bytes,
            "total_MB": float(g["total_bytes"].mean()) / 1e6,
            "final_accuracy_mean": float(acc.mean()), "final_accuracy_std": float(acc.std()),
            "final_accuracy": _fmt(acc.mean(), acc.std()), "best_accuracy_mean": float(g["best_accuracy"].mean())})
    df = pd.DataFrame(rows)
    if len(df):
        df["_o"] = df["method"].map({m: i for i, m in enumerate(METHODS)})
        df = df.sort_values(["task", "_o"], key=lambda c: c.map({t: i for i, t in enumerate(s["tasks"])})
                            if c.name == "task" else c, kind="stable").drop(columns="_o").reset_index(drop=True)
    return df


def axis_table(summary: pd.DataFrame, s: dict, axis: str) -> pd.DataFrame:
    """Accuracy (mean ± std over axis seeds) of each axis method at every level of one axis, others at base."""
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    df = summary[(summary["task"] == s["tasks"][0]) & summary["method"].isin(s["axis_methods"])
                 & summary["seed"].isin(s["axis_seeds"])]
    het_base = (df["partition"] == part) & (df["alpha"].isna() if alpha is None else (df["alpha"] == alpha))
    stab_base = (df["participation"] == p) & (df["dropout"] == d)
    dp_base = df["dp_epsilon_target"].isna()
    keep = {"heterogeneity": stab_base & dp_base, "stability": het_base & dp_base, "dp": het_base & stab_base}[axis]
    df = df[keep]
    levels = {"heterogeneity": [heterogeneity_label(pa, al) for pa, al in s["heterogeneity"]],
              "stability": [stability_label(pp, dd) for pp, dd in s["stability"]],
              "dp": ["none"] + [f"eps={e:g}" for e in s["dp_epsilons"]]}[axis]
    rows = []
    for method in [m for m in METHODS if m in s["axis_methods"]]:
        ref = df[(df["method"] == method) & (df[axis] == levels[0])]["final_accuracy"].mean()
        for level in levels:
            g = df[(df["method"] == method) & (df[axis] == level)]
            if not len(g):
                continue
            acc = g["final_accuracy"]
            row = {"method": method, "variant": g["variant"].iloc[0], axis: level, "seeds": len(g),
                   "final_accuracy_mean": float(acc.mean()), "final_accuracy_std": float(acc.std()),
                   "final_accuracy": _fmt(acc.mean(), acc.std()), "drop_vs_base": float(ref - acc.mean()),
                   "total_MB": float(g["total_bytes"].mean()) / 1e6}
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
    how = {
        "full": "position/token-type ids given a batch dimension for Opacus",
        "head": "classifier trained on cached frozen features",
        "bitfit": "every bias of the encoder + head",
        "adapter": "adapter Linear layers + head",
        "prompt": "soft prompt looked up per example so Opacus sees a batch dimension",
        "lora": "peft LoRA A/B Linear layers + head (Opacus issue #820: update checked exact in tests)",
    }
    rows = []
    for m in METHODS:
        g = summary[summary["method"] == m]
        trainable = int(g["trainable_params"].iloc[0]) if len(g) else None
        ran = g[g["dp_epsilon_target"].notna()]
        rows.append({"method": m, "dp_supported": "yes",
                     "mechanism": dp_mechanism(trainable, s["batch_size"]) if trainable is not None else "",
                     "run_under_dp_here": "yes" if len(ran) else "no (not in this profile's axis_methods)",
                     "note": how[m]})
    return pd.DataFrame(rows)


def make_tables(summary: pd.DataFrame, s: dict) -> dict[str, pd.DataFrame]:
    return {"headline": headline_table(summary, s), "heterogeneity": axis_table(summary, s, "heterogeneity"),
            "stability": axis_table(summary, s, "stability"), "dp": axis_table(summary, s, "dp"),
            "dp_support": dp_support_table(summary, s)}


# -- claims ------------------------------------------------------------------------------------------
def make_claims(summary: pd.DataFrame, s: dict) -> pd.DataFrame:
    """Each FedPEFT claim against our numbers, computed from the summary (never typed in)."""
    tol = float(s["near_tolerance"])
    claims: list[Claim] = []
    missing: list[tuple[str, str, str]] = []
    head = headline_table(summary, s)

    # 1. PEFT near full-FT accuracy at a small fraction of the bytes (per task)
    for task in s["tasks"]:
        h = head[head["task"] == task].set_index("method")
        paper = ("PEFT within a few points of (or above) full FT while sending ~0.2% of its bytes "
                 "(ViT-B: 0.68 vs 328 MB per round)")
        if "full" not in h.index or not (set(h.index) - {"full"}):
            missing.append((f"[{task}] a PEFT method reaches ~full-FT accuracy at a small fraction of the bytes", paper,
                            "full FT or PEFT not run on this task"))
            continue
        full_acc = h.loc["full", "final_accuracy_mean"]
        peft = h.drop(index="full")
        near = peft[(peft["final_accuracy_mean"] >= full_acc - tol) & (peft["bytes_pct_of_full"] <= 5.0)]
        parts = [f"{m}: {r.final_accuracy_mean:.3f} at {r.bytes_pct_of_full:.2f}% bytes" for m, r in peft.iterrows()]
        ours = f"full {full_acc:.3f} (100% bytes); " + "; ".join(parts) + f" (near = within {tol:.2f}, <= 5% bytes)"
        claims.append(Claim(f"[{task}] a PEFT method reaches ~full-FT accuracy at a small fraction of the bytes",
                            paper, ours + f" -> {', '.join(near.index) or 'none'}", len(near) > 0))

    # 2. LoRA's bytes per round < 2% of full fine-tuning's (exact byte counts)
    main = head[head["task"] == s["tasks"][0]].set_index("method")
    if {"full", "lora"} <= set(main.index):
        pct = 100 * main.loc["lora", "bytes_up_per_round"] / main.loc["full", "bytes_up_per_round"]
        per_client = 100 * main.loc["lora", "MB_per_client_per_round"] / main.loc["full", "MB_per_client_per_round"]
        claims.append(Claim("LoRA sends < 2% of full fine-tuning's bytes per round",
                            "LoRA/adapters/prompts send < 1% of the model per round",
                            f"{main.loc['lora', 'variant']}: "
                            f"{main.loc['lora', 'MB_per_client_per_round'] * 1e3:.1f} kB "
                            f"vs {main.loc['full', 'MB_per_client_per_round']:.1f} MB per client per round "
                            f"= {per_client:.3f}% (bytes up per round: {pct:.3f}%)", bool(pct < 2.0)))

    # 3. PEFT more robust than full FT under DP
    dp = axis_table(summary, s, "dp")
    peft_methods = [m for m in s["axis_methods"] if m != "full"]
    if len(dp) and "full" in set(dp["method"]) and peft_methods and s["dp_epsilons"]:
        ok, parts = True, []
        for e in s["dp_epsilons"]:
            lvl = dp[dp["dp"] == f"eps={e:g}"].set_index("method")
            if "full" not in lvl.index:
                continue
            peft_drops = lvl.loc[[m for m in peft_methods if m in lvl.index], "drop_vs_base"]
            ok &= bool(peft_drops.mean() < lvl.loc["full", "drop_vs_base"])
            parts.append(f"eps={e:g}: drop full {lvl.loc['full', 'drop_vs_base']:+.3f} vs "
                         + ", ".join(f"{m} {v:+.3f}" for m, v in peft_drops.items())
                         + f" (PEFT mean {peft_drops.mean():+.3f})")
        claims.append(Claim("PEFT loses less accuracy than full FT under DP-SGD",
                            "under DP the gap to full FT narrows or reverses: noise grows with the trained dimension",
                            "; ".join(parts), ok))
    else:
        missing.append(("PEFT loses less accuracy than full FT under DP-SGD", "noise grows with the trained dimension",
                        "full FT or PEFT under DP not run"))

    # 4. behaviour under instability: PEFT keeps its standing relative to full FT
    st = axis_table(summary, s, "stability")
    if len(st) and "full" in set(st["method"]) and peft_methods and len(s["stability"]) > 1:
        levels = [stability_label(p, d) for p, d in s["stability"]]
        gaps = {}
        for lvl in levels:
            g = st[st["stability"] == lvl].set_index("method")
            if "full" in g.index:
                gaps[lvl] = g.loc[[m for m in peft_methods if m in g.index], "final_accuracy_mean"].mean() \
                    - g.loc["full", "final_accuracy_mean"]
        base_gap = gaps.get(levels[0], float("nan"))
        ok = all(v >= base_gap - tol for k, v in gaps.items() if k != levels[0])
        claims.append(Claim("PEFT keeps its accuracy relative to full FT when clients are sampled or drop out",
                            "PEFT stays competitive under partial participation and client dropout",
                            "; ".join(f"{k}: PEFT mean - full = {v:+.3f}" for k, v in gaps.items())
                            + f" (agrees if no gap falls more than {tol:.2f} below the all-clients gap)", ok))
    else:
        missing.append(("PEFT keeps its accuracy relative to full FT when clients are sampled or drop out",
                        "PEFT stays competitive under partial participation and client dropout",
                        "full FT or PEFT under instability not run"))
    # 5. heterogeneity: stronger label skew costs accuracy for every method
    het = axis_table(summary, s, "heterogeneity")
    skewed = [heterogeneity_label(p, a) for p, a in s["heterogeneity"] if p == "dirichlet"]
    if len(het) and "iid" in set(het["heterogeneity"]) and len(skewed):
        most = min((a, heterogeneity_label(p, a)) for p, a in s["heterogeneity"] if p == "dirichlet")[1]
        pivot = het.pivot_table(index="method", columns="heterogeneity", values="final_accuracy_mean")
        drops = (pivot["iid"] - pivot[most]) if most in pivot.columns else pd.Series(dtype=float)
        claims.append(Claim(f"strong label skew ({most}) lowers accuracy vs IID for every method",
                            "accuracy falls as Dirichlet alpha shrinks, for full FT and PEFT alike",
                            ", ".join(f"{m}: {v:+.3f}" for m, v in drops.items()) + " (IID minus skewed)",
                            bool(len(drops) and (drops > 0).all())))
    table = claims_table(claims)
    for claim, paper, why in missing:
        table.loc[len(table)] = {"claim": claim, "paper": paper, "ours": f"not measured: {why}", "agrees": "n/a"}
    return table


# -- figures -----------------------------------------------------------------------------------------
def _wide(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics.pivot_table(index=KEYS + ["round"], columns="metric", values="value", dropna=False).reset_index()


def make_figures(summary: pd.DataFrame, metrics: pd.DataFrame, s: dict, out) -> dict:
    import matplotlib
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (MaxNLocator)
    matplotlib.rcParams.update({"font.size": 8})
    figs = {}
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(METHODS)}
    wide = _wide(metrics.assign(alpha=metrics["alpha"].fillna(-1),
                                dp_epsilon_target=metrics["dp_epsilon_target"].fillna(-1)))
    wide = wide.replace({"alpha": {-1: np.nan}, "dp_epsilon_target": {-1: np.nan}})
    base = wide[_base_mask(wide, s)]
    tasks = [t for t in s["tasks"] if t in set(base["task"])]

    for name, x, xlabel, logx in [("accuracy_vs_rounds.png", "round", "round", False),
                                  ("accuracy_vs_mb.png", "cumulative_bytes",
                                   "MB communicated (up + down, cumulative)", True)]:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for method in METHODS:
                g = base[(base["task"] == task) & (base["method"] == method)].dropna(subset=["accuracy"])
                if not len(g):
                    continue
                agg = g.groupby("round").agg(acc=("accuracy", "mean"), sd=("accuracy", "std"),
                                             x=(x, "mean")).reset_index()
                xs = agg["x"] / 1e6 if x == "cumulative_bytes" else agg["x"]
                ax.plot(xs, agg["acc"], marker="o", ms=3, color=colors[method],
                        label=variant(method, s["depth"])
                        + (f" ({g['seed'].nunique()} seeds)" if g["seed"].nunique() > 1 else ""))
                if agg["sd"].notna().any():
                    ax.fill_between(xs, agg["acc"] - agg["sd"], agg["acc"] + agg["sd"], color=colors[method],
                                    alpha=0.15)
            ax.set_title(task)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            if logx:
                ax.set_xscale("log")
            else:
                ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        figs[name] = save_figure(fig, out, name)
        plt.close(fig)

    dp = axis_table(summary, s, "dp")
    if len(dp) and s["dp_epsilons"]:
        fig, ax = plt.subplots(figsize=(4.8, 3.2))
        methods = [m for m in METHODS if m in set(dp["method"])]
        width = 0.8 / max(1, len(s["dp_epsilons"]))
        for j, e in enumerate(s["dp_epsilons"]):
            lvl = dp[dp["dp"] == f"eps={e:g}"].set_index("method")
            vals = [lvl.loc[m, "drop_vs_base"] if m in lvl.index else np.nan for m in methods]
            ax.bar(np.arange(len(methods)) + j * width, vals, width, label=f"target eps={e:g}")
        ax.set_xticks(np.arange(len(methods)) + width * (len(s["dp_epsilons"]) - 1) / 2)
        ax.set_xticklabels([variant(m, s["depth"]) for m in methods], rotation=15)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylabel("accuracy drop under DP-SGD\n(no DP minus DP)")
        ax.set_title(f"{s['tasks'][0]}: DP cost per method")
        ax.legend(fontsize=7)
        figs["dp_drop.png"] = save_figure(fig, out, "dp_drop.png")
        plt.close(fig)

    het = axis_table(summary, s, "heterogeneity")
    if len(het):
        levels = [heterogeneity_label(p, a) for p, a in s["heterogeneity"]]
        levels = sorted(levels, key=lambda lv: -float("inf") if lv == "iid" else -float(lv.split("-")[1]))
        pivot = het.pivot_table(index="method", columns="heterogeneity", values="final_accuracy_mean")
        pivot = pivot.reindex(index=[m for m in METHODS if m in pivot.index],
                              columns=[lv for lv in levels if lv in pivot.columns])
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * pivot.shape[1], 0.9 + 0.45 * pivot.shape[0]))
        im = ax.imshow(pivot.values, cmap="viridis", aspect="auto")
        ax.set_xticks(range(pivot.shape[1]))
        ax.set_xticklabels(pivot.columns)
        ax.set_yticks(range(pivot.shape[0]))
        ax.set_yticklabels([variant(m, s["depth"]) for m in pivot.index])
        lo, hi = np.nanmin(pivot.values), np.nanmax(pivot.values)
        for i in range(pivot.shape[0]):
            for j in range(pivot.shape[1]):
                v = pivot.values[i, j]
                bright = hi > lo and (v - lo) / (hi - lo) > 0.6
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="k" if bright else "w", fontsize=7)
        fig.colorbar(im, ax=ax, label="final accuracy")
        ax.set_title(f"{s['tasks'][0]}: heterogeneity x method")
        figs["heterogeneity_heatmap.png"] = save_figure(fig, out, "heterogeneity_heatmap.png")
        plt.close(fig)

    st = axis_table(summary, s, "stability")
    if len(st) and len(s["stability"]) > 1:
        fig, ax = plt.subplots(figsize=(4.8, 3.2))
        methods = [m for m in METHODS if m in set(st["method"])]
        levels = [stability_label(p, d) for p, d in s["stability"]]
        width = 0.8 / len(levels)
        for j, lvl in enumerate(levels):
            g = st[st["stability"] == lvl].set_index("method")
            ax.bar(np.arange(len(methods)) + j * width,
                   [g.loc[m, "final_accuracy_mean"] if m in g.index else np.nan for m in methods], width, label=lvl)
        ax.set_xticks(np.arange(len(methods)) + width * (len(levels) - 1) / 2)
        ax.set_xticklabels([variant(m, s["depth"]) for m in methods], rotation=15)
        ax.set_ylabel("final accuracy")
        ax.set_title(f"{s['tasks'][0]}: client stability")
        ax.legend(fontsize=7)
        figs["stability.png"] = save_figure(fig, out, "stability.png")
        plt.close(fig)
    return figs
