"""FedPEFT's runs: every config through :class:`fedbench.bench.Runner` (the run store, the shared prepared data and
frozen-prefix caches of :class:`fedbench.bench.PrefixCaches`), the learning-rate search on validation
(:func:`fedbench.bench.select_lr`) and the reported cells' records.

The lr search's run at the chosen lr is itself the reported seed-0 run: a validation run given the reported
config of the same training is held (:class:`HeldRuns`: the global model at each round the test run evaluates),
and once the lr is chosen the reported run is replayed from it on test instead of trained again. The replay gives
the run :func:`fedbench.fl.server.run_federated` gives (tested), so whether a run was replayed or trained never
shows in a number.
"""
from __future__ import annotations

import time

import pandas as pd

from fedbench.bench import PrefixCaches, Runner, select_lr
from fedbench.experiments.fedpeft.plan import (KEYS, LR_SELECTED_ON, METHODS, Cell, dp_mechanism, lr_key,
                                               make_config, takes_depth, tuning_cells, variant)


def make_runner(s: dict) -> Runner:
    """The experiment's runner: the store, PrefixCaches' data (the validation carve for a search run) and caches,
    each filled in one pass at the frozen depth of every method the profile runs (``fill_depths``: the head's six
    frozen layers are the top-layer methods' four plus two, not six more; the values are one fill per depth's)."""
    shared = PrefixCaches()
    run = {*s["methods"], *s["task_methods"], *s["axis_methods"], *s["dp_methods"]}
    methods = [m for m in METHODS if m in run]

    def caches(cfg, data):
        depths = [shared.frozen_depth(cfg.replace(**{"peft.method": m, "peft.depth": s["depth"] if takes_depth(m)
                                                      else None}), data.num_labels) for m in methods]
        return shared.get(cfg, data, depths=depths)
    return Runner(shared.data, caches, shared=shared)


def _clone_global(gm):
    from fedbench.fl.strategy import GlobalModel
    clone = lambda d: type(d)((k, v.detach().clone()) for k, v in d.items())  # noqa: E731
    return GlobalModel(clone(gm.state), clone(gm.base_delta), gm.down_bytes)


def same_training(cfg, test_cfg) -> bool:
    """Whether `cfg` and `test_cfg` differ at most in what they evaluate (``fl.eval_every``, the evaluated
    split), so they train identically."""
    return cfg.replace(**{"fl.eval_every": test_cfg.fl.eval_every, "data.federation_options.validation":
                          test_cfg.data.federation_options["validation"]}).hash() == test_cfg.hash()


class HeldRuns:
    """Validation runs held for the reported config of the same training (run key -> held run), replayed on test.

    :meth:`search` is the ``compute`` of a validation run given its `test_cfg`: :func:`run_federated` (the same
    round loop and checkpoints) keeping the global model at each round `test_cfg` evaluates; a run resumed from a
    checkpoint keeps nothing (its earlier rounds' models are gone). :meth:`replay` is the ``compute`` of a reported
    run held here: the test split is evaluated (for the first time) on the held models
    (:meth:`fedbench.fl.server.FederatedRun.replay`); every other record (bytes, losses, epsilon) is the training's.
    """

    def __init__(self):
        self.held: dict = {}

    def search(self, test_cfg):
        """The ``compute`` of a validation run that holds its models for `test_cfg`."""
        from fedbench.fl.server import run_federated
        from fedbench.results import run_key

        def compute(cfg, data, caches, checkpoint_dir):
            if not same_training(cfg, test_cfg):
                return run_federated(cfg, data, caches=caches, checkpoint_dir=checkpoint_dir)
            rounds, every = cfg.fl.rounds, test_cfg.fl.eval_every
            evaluated = {r for r in range(1, rounds + 1) if r % every == 0 or r == rounds}
            snapshots, last = {}, []

            def keep(run, r):
                last[:] = [run]
                if r in evaluated:
                    snapshots[r] = _clone_global(run.global_model)
            result = run_federated(cfg, data, caches=caches, checkpoint_dir=checkpoint_dir, after_round=keep)
            if last and set(snapshots) == evaluated:
                self.held[run_key(test_cfg)] = last[0].hold(snapshots)
            return result
        return compute

    def replay(self, cfg):
        """The ``compute`` of reported run `cfg`: its held run replayed on test, or None (train it)."""
        from fedbench.fl.server import FederatedRun
        from fedbench.results import run_key
        if run_key(cfg) not in self.held:
            return None
        return lambda cfg, data, caches, ckpt: FederatedRun(cfg, data, caches).replay(self.held.pop(run_key(cfg)))

    def keep_only(self, test_cfgs) -> None:
        """Drop every held run but those of `test_cfgs` (the chosen learning rates' reported configs)."""
        from fedbench.results import run_key
        keep = {run_key(c) for c in test_cfgs}
        self.held = {k: v for k, v in self.held.items() if k in keep}


def tune(s: dict, runner: Runner, held: HeldRuns | None = None, progress: bool = True) -> pd.DataFrame:
    """The learning-rate search on validation; sets ``s["chosen_lr"]`` and returns the table (lr_selection.csv).
    Per (task, method, privacy level): fedbench.bench.select_lr over the grid (the highest final
    validation accuracy; ties: the smaller lr), extended past an edge choice by up to ``lr_extend`` grid steps
    (``dp_lr_extend`` under DP)."""
    held = held if held is not None else HeldRuns()
    t0 = time.perf_counter()
    groups: dict = {}
    for c, lr in tuning_cells(s):
        groups.setdefault(lr_key(c), (c, []))[1].append(lr)
    rows, chosen = [], {}
    for key, (c, grid) in groups.items():
        def score(lr, c=c):
            cfg = make_config(c, s, lr=lr, eval_every=s["base"].fl.rounds, validation=True)
            cached = runner.done(cfg) is not None
            result = runner.get(cfg, compute=held.search(make_config(c, s, lr=lr)))
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
    held.keep_only([make_config(c, s, lr=chosen[key]) for key, (c, _) in groups.items()])
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


def summary_row(c: Cell, cfg, result, s: dict) -> dict:
    """One reported run's row of summary.csv."""
    sm = result.summary
    return {
        **cell_keys(c), "variant": variant(c.method, cfg.peft.depth), "heterogeneity": c.heterogeneity,
        "stability": c.stability, "dp": c.dp, "dp_epsilon_spent": sm.get("dp_epsilon_spent", float("nan")),
        "dp_delta": float(cfg.train.dp.delta) if c.dp_epsilon is not None and cfg.train.dp.delta is not None
        else float("nan"),
        "lr": float(cfg.train.lr), "lr_selected_on": LR_SELECTED_ON,
        "dp_mechanism": dp_mechanism(sm["trainable_params"], s["batch_size"]) if c.dp_epsilon else "",
        "trainable_params": sm["trainable_params"], "total_params": sm["total_params"],
        "bytes_up_per_round": sm["bytes_up_per_round"], "bytes_down_per_round": sm["bytes_down_per_round"],
        "state_bytes": sm["state_bytes"], "total_bytes": sm["total_bytes"],
        "final_accuracy": sm["final_accuracy"], "best_accuracy": sm["best_accuracy"],
        "score": last_k_score(result.rounds, s["score_last_k"]), "final_loss": sm["final_loss"],
        "rounds": sm["rounds"], "wall_s": sm["wall_s"], "config_hash": cfg.hash()}


def cell_keys(c: Cell) -> dict:
    """The columns that name a cell in summary.csv and metrics.csv (:data:`KEYS`)."""
    return dict(zip(KEYS, (c.task, c.method, c.partition, c.alpha, c.participation, c.dropout, c.dp_epsilon,
                           c.seed)))


def run_cells(cells: list[Cell], s: dict, progress: bool = True, runner: Runner | None = None,
              held: HeldRuns | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Run (or load) every cell at its validation-chosen lr (``s["chosen_lr"]``, from :func:`tune`); returns
    (summary rows, long per-round metrics, {cell: per-example 0/1 of the final evaluation, by test index})."""
    runner = runner or make_runner(s)
    held = held if held is not None else HeldRuns()
    summary_rows, metric_frames, correct = [], [], {}
    t0 = time.perf_counter()
    for i, c in enumerate(cells, 1):
        cfg = make_config(c, s)
        cached = runner.done(cfg) is not None
        result = runner.get(cfg, compute=held.replay(cfg))
        sm = result.summary
        correct[c] = result.correct
        summary_rows.append(summary_row(c, cfg, result, s))
        long = result.rounds.drop(columns=["wall_s"], errors="ignore").melt(id_vars=["round"], var_name="metric",
                                                                              value_name="value")
        for k, v in reversed(list(cell_keys(c).items())):
            long.insert(0, k, v)
        metric_frames.append(long)
        if progress:
            status = "cached" if cached else f"{sm['wall_s']:.0f}s"
            print(f"[{i}/{len(cells)}] {c.task} {c.method:7s} {c.heterogeneity:13s} {c.stability:22s} {c.dp:7s} "
                  f"seed={c.seed}: acc={sm['final_accuracy']:.3f} ({status}, {time.perf_counter() - t0:.0f}s total)",
                  flush=True)
    summary = pd.DataFrame(summary_rows)
    metrics = pd.concat(metric_frames, ignore_index=True) if metric_frames else pd.DataFrame()
    return summary, metrics, correct

