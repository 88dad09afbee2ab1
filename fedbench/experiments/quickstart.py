"""Quickstart: LoRA FedAvg on one offline task, against a frozen-encoder linear probe.

The probe (logistic regression on the frozen MiniLM's mean-pooled features, trained centrally on the
same training samples) is the bar a federated PEFT run has to clear to be worth its communication.
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd

from fedbench.config import (DataConfig, ExperimentConfig, FLConfig, ModelConfig, PeftConfig, TrainConfig)
from fedbench.experiments.common import output_dir, profile_settings, runs_root, save_figure, save_table

EXPERIMENT = "quickstart"

DEFAULTS = {
    "smoke": dict(task="rt_sentiment", method="lora", clients=4, rounds=2, alpha=0.5, seed=0, lr=2e-3,
                  depth=2, local_epochs=1, local_steps=3, max_train_samples=200, max_test_samples=200),
    "quick": dict(task="rt_sentiment", method="lora", clients=10, rounds=10, alpha=0.5, seed=0, lr=2e-3,
                  depth=2, local_epochs=1, local_steps=None, max_train_samples=None, max_test_samples=1000),
    "full": dict(task="rt_sentiment", method="lora", clients=10, rounds=20, alpha=0.5, seed=0, lr=1e-3,
                 depth=None, local_epochs=1, local_steps=None, max_train_samples=None, max_test_samples=None),
}


def make_config(s: dict, profile: str) -> ExperimentConfig:
    return ExperimentConfig(
        name=f"{EXPERIMENT}-{profile}", seed=s["seed"],
        data=DataConfig(task=s["task"], num_clients=s["clients"], partition="dirichlet", alpha=s["alpha"],
                        max_train_samples=s["max_train_samples"], max_test_samples=s["max_test_samples"]),
        model=ModelConfig(),
        # LoRA on every linear layer (q, k, v and the dense projections) of the top `depth` layers: the
        # bottom layers stay frozen and their outputs are cached, so a round costs a fraction of the stack
        peft=PeftConfig(method=s["method"], depth=s["depth"] if s["method"] in ("lora", "adapter") else None,
                        target_modules=("query", "key", "value", "dense")),
        train=TrainConfig(local_epochs=s["local_epochs"], local_steps=s["local_steps"], lr=s["lr"]),
        fl=FLConfig(rounds=s["rounds"]),
    )


def linear_probe_accuracy(data, model_cfg: ModelConfig, seed: int) -> float:
    """Logistic regression on frozen mean-pooled encoder features, trained on all clients' data pooled."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from fedbench.models import build_model
    from fedbench.models.inputs import pad_batch
    model = build_model(model_cfg, PeftConfig(method="head"), data.num_labels, seed=seed)
    model.eval()

    def features(split, indices):
        out = []
        with torch.no_grad():
            for s in range(0, len(indices), 256):
                ids, mask = pad_batch([split.input_ids[i] for i in indices[s:s + 256]], data.pad_id)
                out.append(model.pool(model.prefix_hidden(ids, mask, model.num_layers), mask).numpy())
        return np.concatenate(out)

    train_idx = np.sort(np.concatenate(data.client_indices))
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(features(data.train, train_idx), data.train.labels[train_idx].numpy())
    test_idx = np.asarray(data.test_indices)
    return float(clf.score(features(data.test, test_idx), data.test.labels[test_idx].numpy()))


@dataclass
class QuickstartResult:
    config: ExperimentConfig
    rounds: pd.DataFrame
    summary: pd.DataFrame
    probe_accuracy: float


def run(profile: str = "quick", **overrides) -> QuickstartResult:
    from fedbench.fl import prepare_data, run_cached
    s = profile_settings(DEFAULTS, profile, overrides)
    cfg = make_config(s, profile)
    out = output_dir(EXPERIMENT, profile)
    data = prepare_data(cfg)
    result = run_cached(cfg, data, progress=True, root=runs_root())
    probe = _cached_probe(cfg, data)
    rounds = result.rounds.copy()
    rounds["mb_sent"] = rounds["cumulative_bytes"] / 1e6
    summary = pd.DataFrame([{
        "task": s["task"], "method": s["method"], "clients": s["clients"], "alpha": s["alpha"],
        "rounds": s["rounds"], "seed": s["seed"], "final_accuracy": result.summary["final_accuracy"],
        "best_accuracy": result.summary["best_accuracy"], "linear_probe_accuracy": probe,
        "beats_probe": result.summary["final_accuracy"] > probe,
        "trainable_params": result.summary["trainable_params"],
        "bytes_up_per_round": result.summary["bytes_up_per_round"], "total_mb": result.summary["total_bytes"] / 1e6,
        "config_hash": cfg.hash(),
    }])
    save_table(rounds, out, "rounds.csv")
    save_table(summary, out, "summary.csv")
    _plots(rounds, probe, s, out)
    return QuickstartResult(cfg, rounds, summary, probe)


def _cached_probe(cfg, data) -> float:
    """The probe depends on data + backbone + seed only; keyed by those, stored atomically."""
    import json

    from fedbench.config import config_hash
    from fedbench.results import atomic_write_json
    key = config_hash({"probe": 1, "data": cfg.to_dict()["data"], "model": cfg.to_dict()["model"], "seed": cfg.seed})
    path = runs_root() / f"probe-{key}.json"
    if path.exists():
        return float(json.loads(path.read_text())["accuracy"])
    acc = linear_probe_accuracy(data, cfg.model, cfg.seed)
    atomic_write_json(path, {"accuracy": acc})
    return acc


def _plots(rounds: pd.DataFrame, probe: float, s: dict, out) -> None:
    import matplotlib.pyplot as plt
    matplotlib.rcParams.update({"figure.figsize": (5, 3.4)})
    r = rounds.dropna(subset=["accuracy"])
    label = f"{s['method']} FedAvg ({s['clients']} clients, Dir({s['alpha']}))"
    for x, xlabel, name, logx in [("round", "round", "accuracy_vs_round.png", False),
                                  ("mb_sent", "MB sent (up + down, cumulative)", "accuracy_vs_mb.png", True)]:
        fig, ax = plt.subplots()
        ax.plot(r[x], r["accuracy"], marker="o", label=label)
        ax.axhline(probe, color="gray", ls="--", label=f"linear probe ({probe:.3f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test accuracy ({s['task']})")
        if logx:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save_figure(fig, out, name)
        plt.close(fig)
