"""Results on disk: atomic writes, one folder per config hash, loading every run as a DataFrame.

Layout under a results root (default ``results/runs``)::

    <root>/<config-hash>/config.json     the full config
    <root>/<config-hash>/rounds.csv      one row per round (accuracy, loss, bytes, clients, wall-clock)
    <root>/<run-key>/predictions.safetensors  the final evaluation's per-example predictions (for claims)
    <root>/<run-key>/checkpoint/         the last finished round while the run is going (removed at the end)
    <root>/<run-key>/summary.json        final numbers; written last, so its presence means "finished"

The run key is the hash of the whole config, the engine and :data:`RESULTS_SCHEMA` (a version the code
owns: a change of what a run computes or records bumps it, so an old result is never served for new
semantics). A run whose summary.json exists is finished: :func:`cached_run` loads it instead of
recomputing; an unfinished one resumes from its last checkpointed round. Every file is written to a
temporary name in the same folder and renamed into place, so an interrupted run never leaves a
half-written file behind.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from fedbench.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: F401 (re-exported)

# Bump when what a run computes or records changes meaning: every stored run is then recomputed.
RESULTS_SCHEMA = 2


def atomic_write_csv(path: str | Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"))


def atomic_write_tensors(path: str | Path, tensors: dict) -> None:
    """A dict of tensors (torch or numpy) as a safetensors file, atomically (no pickle)."""
    import numpy as np
    from safetensors.numpy import save
    arrays = {k: (v.detach().cpu().contiguous().numpy() if hasattr(v, "detach") else np.ascontiguousarray(v))
              for k, v in tensors.items()}
    atomic_write_bytes(path, save(arrays) if arrays else save({}))


def read_tensors(path: str | Path, numpy: bool = False) -> dict:
    """A safetensors file as {name: torch tensor} (or numpy arrays)."""
    from safetensors.numpy import load
    arrays = load(Path(path).read_bytes())
    if numpy:
        return arrays
    import torch
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


def atomic_savefig(fig, path: str | Path, **kwargs) -> None:
    """Save a matplotlib figure atomically (PNG by the path's suffix)."""
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", bbox_inches="tight", dpi=kwargs.pop("dpi", 110),
                **kwargs)
    atomic_write_bytes(path, buf.getvalue())


@dataclass
class RunResult:
    """What one finished federated run leaves behind. `predictions` (final evaluation, per test example):
    ``{"test_index", "label", "prediction"}`` int64 arrays in the same order, or None."""
    config: dict
    rounds: pd.DataFrame
    summary: dict
    predictions: dict | None = None

    @property
    def correct(self):
        """1/0 per test example of the final evaluation, ordered by test index (None without predictions)."""
        import numpy as np
        if not self.predictions:
            return None
        order = np.argsort(self.predictions["test_index"], kind="stable")
        return (self.predictions["prediction"][order] == self.predictions["label"][order]).astype(np.int8)

    @property
    def final_accuracy(self) -> float:
        return float(self.summary["final_accuracy"])


def project_results_dir() -> Path:
    """results/ of the fedbench checkout (so notebooks run from notebooks/ write to the same place),
    else ./results; $FEDBENCH_RESULTS_ROOT overrides both."""
    if os.environ.get("FEDBENCH_RESULTS_ROOT"):
        return Path(os.environ["FEDBENCH_RESULTS_ROOT"])
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").exists() and (checkout / "fedbench").is_dir():
        return checkout / "results"
    return Path("results")


def default_root() -> Path:
    """The run store: $FEDBENCH_RESULTS, else results/runs."""
    return Path(os.environ["FEDBENCH_RESULTS"]) if os.environ.get("FEDBENCH_RESULTS") else project_results_dir() / "runs"


def run_dir(config_hash: str, root: str | Path | None = None) -> Path:
    return Path(root or default_root()) / config_hash


def run_key(config, engine: str = "inprocess") -> str:
    """The run store's key: the whole config, the engine and the results schema, and, for a run that uses
    outside code, each plugin's version (:func:`fedbench.plugins.plugin_versions`): a changed plugin is a new
    key. A config without plugins keys as it always did."""
    from fedbench.config import config_hash
    from fedbench.plugins import plugin_versions
    key = {"config": config.to_dict(), "engine": engine, "schema": RESULTS_SCHEMA}
    versions = plugin_versions(config)
    if versions:
        key["plugins"] = versions
    return config_hash(key)


def save_run(result: RunResult, config_hash: str, root: str | Path | None = None) -> Path:
    d = run_dir(config_hash, root)
    atomic_write_json(d / "config.json", result.config)
    atomic_write_csv(d / "rounds.csv", result.rounds)
    if result.predictions:
        atomic_write_tensors(d / "predictions.safetensors", result.predictions)
    atomic_write_json(d / "summary.json", result.summary)   # last: marks the run finished
    import shutil
    shutil.rmtree(d / "checkpoint", ignore_errors=True)     # the finished run replaces its checkpoints
    return d


def load_run(config_hash: str, root: str | Path | None = None) -> RunResult | None:
    d = run_dir(config_hash, root)
    if not (d / "summary.json").exists():
        return None
    preds = d / "predictions.safetensors"
    return RunResult(config=json.loads((d / "config.json").read_text()),
                     rounds=pd.read_csv(d / "rounds.csv"),
                     summary=json.loads((d / "summary.json").read_text()),
                     predictions=read_tensors(preds, numpy=True) if preds.exists() else None)


def cached_run(config, compute: Callable, root: str | Path | None = None, force: bool = False,
               engine: str = "inprocess") -> RunResult:
    """Load the finished run of `config` if there is one, else ``compute(checkpoint_dir)`` and save it.

    `compute` gets the run's checkpoint folder: a run killed mid-way resumes there from its last round.
    """
    h = run_key(config, engine)
    if not force:
        done = load_run(h, root)
        if done is not None:
            return done
    else:
        import shutil
        shutil.rmtree(run_dir(h, root) / "checkpoint", ignore_errors=True)
    result = compute(run_dir(h, root) / "checkpoint")
    save_run(result, h, root)
    return result


def load_results(root: str | Path | None = None, rounds: bool = False) -> pd.DataFrame:
    """Every finished run under `root` as one DataFrame.

    One row per run (summary fields + flattened config columns such as ``peft.method``), or with
    ``rounds=True`` one row per (run, round).
    """
    root = Path(root or default_root())
    frames = []
    for summary_path in sorted(root.glob("*/summary.json")):
        h = summary_path.parent.name
        res = load_run(h, root)
        flat_cfg = pd.json_normalize(res.config, sep=".").iloc[0].to_dict()
        if rounds:
            df = res.rounds.copy()
            for k, v in flat_cfg.items():
                df[k] = str(v) if isinstance(v, list) else v
        else:
            df = pd.DataFrame([{**{k: (str(v) if isinstance(v, list) else v) for k, v in flat_cfg.items()},
                                **res.summary}])
        df.insert(0, "config_hash", h)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
