"""Quickstart: LoRA FedAvg on one offline task, against a frozen-encoder linear probe.

The probe (logistic regression on the frozen MiniLM's mean-pooled features, trained centrally on the
same training samples) is the bar a federated PEFT run has to clear to be worth its communication.
The run is one :class:`fedbench.config.ExperimentConfig`: the profile's ``base``
(``configs/quickstart/<profile>.yaml``) with any override on top.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedbench.bench import Settings, output_dir, resolve_profile, runs_root, write_outputs
from fedbench.config import ExperimentConfig, ModelConfig, PeftConfig

EXPERIMENT = "quickstart"
# the notebook's short parameter names -> the config fields they set
ALIASES = {"task": "data.task", "method": "peft.method", "clients": "data.num_clients", "rounds": "fl.rounds",
           "alpha": "data.alpha", "seed": "seed"}


@dataclass
class QuickstartSettings(Settings):
    """The quickstart has no parameters beyond its run's config (the profile's ``base``)."""


def settings_for(profile: str = "quick", path=None, **overrides):
    """The resolved profile (``.base`` is the run's ExperimentConfig), overrides by alias or dotted field."""
    overrides = {ALIASES.get(k, k): v for k, v in overrides.items()}
    return resolve_profile(EXPERIMENT, profile, overrides, QuickstartSettings, path=path)


def make_config(profile: str = "quick", path=None, **overrides) -> ExperimentConfig:
    return settings_for(profile, path, **overrides).base


def export(profile: str = "quick", path=None, method: str = "fedavg", seed: int | None = None, lr: float | None = None,
           **overrides) -> ExperimentConfig:
    """The quickstart's federated run as a config that runs alone (``fedbench export``); `seed` / `lr` replace
    the profile's. (Its other arm, the linear probe, is not a federated run.)"""
    from fedbench.bench import check_method
    check_method(method, ("fedavg",))
    cfg = make_config(profile, path, **overrides)
    changes = {k: v for k, v in (("seed", seed), ("train.lr", lr)) if v is not None}
    return cfg.replace(**changes) if changes else cfg


def linear_probe(data, model_cfg: ModelConfig, seed: int) -> dict:
    """Logistic regression on frozen mean-pooled encoder features, trained on all clients' data pooled.
    Returns its test accuracy and per-example correctness on ``data.test_indices`` (in that order)."""
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
    pred = clf.predict(features(data.test, test_idx))
    correct = (pred == data.test.labels[test_idx].numpy()).astype(int)
    return {"accuracy": float(correct.mean()), "test_index": test_idx.tolist(), "correct": correct.tolist()}


def linear_probe_accuracy(data, model_cfg: ModelConfig, seed: int) -> float:
    return linear_probe(data, model_cfg, seed)["accuracy"]


@dataclass
class QuickstartResult:
    config: ExperimentConfig
    rounds: pd.DataFrame
    summary: pd.DataFrame
    probe_accuracy: float
    claims: pd.DataFrame


def run(profile: str = "quick", path=None, **overrides) -> QuickstartResult:
    """Run (or load) the profile's federated run and the probe; write results/quickstart[/profile]/."""
    from fedbench.fl import prepare_data, run_cached
    from fedbench.models.checks import check_against_backbone
    cfg = make_config(profile, path, **overrides)
    check_against_backbone(cfg)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    data = prepare_data(cfg)
    result = run_cached(cfg, data, progress=True, root=runs_root())
    probe = _cached_probe(cfg, data)
    rounds = result.rounds.copy()
    rounds["mb_sent"] = rounds["cumulative_bytes"] / 1e6
    rounds.insert(0, "seed", cfg.seed)
    summary = pd.DataFrame([{
        "task": cfg.data.task, "method": cfg.peft.method, "clients": cfg.data.num_clients, "alpha": cfg.data.alpha,
        "rounds": cfg.fl.rounds, "seed": cfg.seed, "final_accuracy": result.summary["final_accuracy"],
        "best_accuracy": result.summary["best_accuracy"], "linear_probe_accuracy": probe["accuracy"],
        "beats_probe": result.summary["final_accuracy"] > probe["accuracy"],
        "trainable_params": result.summary["trainable_params"],
        "bytes_up_per_round": result.summary["bytes_up_per_round"], "total_mb": result.summary["total_bytes"] / 1e6,
        "config_hash": cfg.hash(),
    }])
    claims = make_claims(result, probe, cfg)
    figures = {name.removesuffix(".png"): fig for name, fig in make_figures(rounds, probe["accuracy"], cfg).items()}
    write_outputs(EXPERIMENT, out, {"rounds": rounds, "summary": summary, "claims": claims}, figures)
    return QuickstartResult(cfg, rounds, summary, probe["accuracy"], claims)


def make_claims(result, probe: dict, cfg) -> pd.DataFrame:
    """The federated run against the probe, paired on the same test examples."""
    from fedbench.claims import claims_table, paired_accuracy_difference
    pred = result.predictions
    order = np.argsort(pred["test_index"], kind="stable")
    probe_order = np.argsort(np.asarray(probe["test_index"]), kind="stable")
    if not np.array_equal(pred["test_index"][order], np.asarray(probe["test_index"])[probe_order]):
        raise RuntimeError("the probe and the federated run were evaluated on different test examples")
    fed = (pred["prediction"][order] == pred["label"][order]).astype(int)
    lin = np.asarray(probe["correct"])[probe_order]
    c = paired_accuracy_difference(
        fed[None, :], lin[None, :], claim=f"{cfg.peft.method} FedAvg beats a linear probe on the frozen encoder",
        paper="PEFT fine-tuning adapts the encoder: federated LoRA should clear the frozen-feature bar",
        comparison=f"{cfg.peft.method} FedAvg - linear probe", seed=cfg.seed,
        detail=f"{cfg.data.task}, {cfg.data.num_clients} clients Dir({cfg.data.alpha}), {cfg.fl.rounds} rounds; "
               "one seed: the interval covers test-example noise only")
    return claims_table([c])


def make_figures(rounds: pd.DataFrame, probe: float, cfg) -> dict:
    """Accuracy vs round and vs MB sent (log x), with the probe as a reference line."""
    from fedbench import plots
    r = rounds.dropna(subset=["accuracy"]).assign(
        method=f"{cfg.peft.method} FedAvg ({cfg.data.num_clients} clients, Dir({cfg.data.alpha}))")
    ylabel = f"test accuracy ({cfg.data.task})"
    hl = {"linear probe": probe}
    return {"accuracy_vs_round.png": plots.curves(r, "round", "accuracy", hue="method", hlines=hl, ylabel=ylabel),
            "accuracy_vs_mb.png": plots.curves(r, "mb_sent", "accuracy", hue="method", hlines=hl, logx=True,
                                               xlabel="MB sent (up + down, cumulative)", ylabel=ylabel)}


def _cached_probe(cfg, data) -> dict:
    """The probe depends on data + backbone + seed only; keyed by those, stored atomically."""
    import json

    from fedbench.config import config_hash
    from fedbench.results import atomic_write_json
    d = cfg.to_dict()
    key = config_hash({"probe": 2, "data": d["data"], "model": d["model"], "seed": cfg.seed})
    path = runs_root() / f"probe-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    probe = linear_probe(data, cfg.model, cfg.seed)
    atomic_write_json(path, probe)
    return probe
