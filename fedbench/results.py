"""Results on disk: atomic writes, one folder per config hash, loading every run as a DataFrame.

Layout under a results root (default ``results/runs``)::

    <root>/<config-hash>/config.json     the full config
    <root>/<config-hash>/rounds.csv      one row per round (accuracy, loss, bytes, clients, wall-clock)
    <root>/<run-key>/predictions.safetensors  the final evaluation's per-example predictions (for claims)
    <root>/<run-key>/checkpoint/         the last finished round while the run is going (removed at the end)
    <root>/<run-key>/summary.json        final numbers; its presence means "finished"
    <root>/<run-key>/manifest.json       size and sha256 of the four files above, written last: what is loaded
                                         is checked against it (a corrupt file is named, never half-read)
    <root>/<run-key>/.lock               held (fcntl) by the process computing the run: a second process
                                         running the same config says "already running" instead of racing it

The run key is the hash of the whole config, the engine and :data:`RESULTS_SCHEMA` (a version the code
owns: a change of what a run computes or records bumps it, so an old result is never served for new
semantics). A run whose summary.json exists is finished: :func:`cached_run` loads it instead of
recomputing; an unfinished one resumes from its last checkpointed round. Every file is written to a
temporary name in the same folder and renamed into place, so an interrupted run never leaves a
half-written file behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from fedbench.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: F401 (re-exported)

# Bump when what a run computes or records changes meaning: every stored run is then recomputed.
RESULTS_SCHEMA = 2
MANIFEST = "manifest.json"
RUN_FILES = ("config.json", "rounds.csv", "predictions.safetensors", "summary.json")
log = logging.getLogger("fedbench.results")


class CorruptRunError(RuntimeError):
    """A stored run's file does not match what was written (truncated, edited, unreadable)."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        super().__init__(f"{path} is corrupt ({reason}); rerun with --force (or cached_run(..., force=True)) to "
                         "recompute it, or delete its folder")


class RunAlreadyRunning(RuntimeError):
    """Another process holds the run folder's lock: it is computing this very config now."""


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
    atomic_write_json(d / "summary.json", result.summary)   # marks the run finished
    atomic_write_json(d / MANIFEST, {name: _digest(d / name) for name in RUN_FILES if (d / name).exists()})
    import shutil
    shutil.rmtree(d / "checkpoint", ignore_errors=True)     # the finished run replaces its checkpoints
    return d


def _digest(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_run(config_hash: str, root: str | Path | None = None) -> RunResult | None:
    """The finished run in `config_hash`'s folder, or None; :class:`CorruptRunError` naming the file when one
    of its files is not what was written (checked against manifest.json; a run stored before manifests by
    reading each file whole and checking rounds.csv against the summary's round count)."""
    d = run_dir(config_hash, root)
    if not (d / "summary.json").exists():
        return None
    manifest = _read_json(d / MANIFEST) if (d / MANIFEST).exists() else None
    if manifest is not None:
        for name, want in manifest.items():
            if not (d / name).exists():
                raise CorruptRunError(d / name, "missing, but listed in manifest.json")
            got = _digest(d / name)
            if got != want:
                raise CorruptRunError(d / name, f"{got['bytes']} bytes, sha256 {got['sha256'][:12]}; manifest.json "
                                      f"says {want['bytes']} bytes, sha256 {want['sha256'][:12]}")
    summary = _read_json(d / "summary.json")
    config = _read_json(d / "config.json")
    rounds = _read_rounds(d / "rounds.csv", summary)
    preds = d / "predictions.safetensors"
    try:
        predictions = read_tensors(preds, numpy=True) if preds.exists() else None
    except Exception as e:     # safetensors raises its own error type for a truncated header or body
        raise CorruptRunError(preds, _one_line(e)) from e
    return RunResult(config=config, rounds=rounds, summary=summary, predictions=predictions)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRunError(path, _one_line(e)) from e


def _read_rounds(path: Path, summary: dict) -> pd.DataFrame:
    try:
        text = path.read_text()
        rounds = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise CorruptRunError(path, _one_line(e)) from e
    # the writer ends every row with a newline and records the round count: a cut file fails one or the other
    if not text.endswith("\n") or ("rounds" in summary and len(rounds) != summary["rounds"]):
        raise CorruptRunError(path, f"{len(rounds)} rows, summary.json says {summary.get('rounds')} rounds"
                              + ("" if text.endswith("\n") else ", last row cut"))
    return rounds


@contextlib.contextmanager
def claim_run(folder: Path):
    """Hold `folder`'s lock (fcntl, released when the process dies) while computing its run; raises
    :class:`RunAlreadyRunning` at once when another process holds it."""
    try:
        import fcntl
    except ImportError:          # no fcntl (Windows): runs are not claimed
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunAlreadyRunning(f"already running: another process is computing {folder} (it holds "
                                    f"{folder / '.lock'}); wait for it, then rerun to load its result") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached_run(config, compute: Callable, root: str | Path | None = None, force: bool = False,
               engine: str = "inprocess") -> RunResult:
    """Load the finished run of `config` if there is one, else ``compute(checkpoint_dir)`` and save it.

    `compute` gets the run's checkpoint folder: a run killed mid-way resumes there from its last round.
    A corrupt stored run raises :class:`CorruptRunError` naming the file (``force=True`` recomputes it);
    another process computing the same run raises :class:`RunAlreadyRunning`.
    """
    h = run_key(config, engine)
    d = run_dir(h, root)
    if not force:
        done = load_run(h, root)
        if done is not None:
            log.info("loaded from the store: %s", d)
            return done
    with claim_run(d):
        if not force:            # finished by another process between the check above and the claim
            done = load_run(h, root)
            if done is not None:
                log.info("loaded from the store: %s", d)
                return done
        else:
            import shutil
            shutil.rmtree(d / "checkpoint", ignore_errors=True)
            (d / MANIFEST).unlink(missing_ok=True)     # the old files are about to be replaced
        result = compute(d / "checkpoint")
        save_run(result, h, root)
    return result


def load_results(root: str | Path | None = None, rounds: bool = False) -> pd.DataFrame:
    """Every finished run under `root` as one DataFrame.

    One row per run (``run_key``, summary fields + flattened config columns such as ``peft.method``), or with
    ``rounds=True`` one row per (run, round). A corrupt run is skipped with a warning and listed in
    ``df.attrs["corrupt"]`` as (folder, reason) pairs, so one bad folder does not hide the others.
    """
    root = Path(root or default_root())
    frames, corrupt = [], []
    for summary_path in sorted(root.glob("*/summary.json")):
        h = summary_path.parent.name
        try:
            res = load_run(h, root)
        except CorruptRunError as e:
            corrupt.append((str(summary_path.parent), str(e)))
            import warnings
            warnings.warn(f"skipped a corrupt run: {e}", stacklevel=2)
            continue
        flat_cfg = pd.json_normalize(res.config, sep=".").iloc[0].to_dict()
        if rounds:
            df = res.rounds.copy()
            for k, v in flat_cfg.items():
                df[k] = str(v) if isinstance(v, list) else v
        else:
            df = pd.DataFrame([{**{k: (str(v) if isinstance(v, list) else v) for k, v in flat_cfg.items()},
                                **res.summary}])
        df.insert(0, "run_key", h)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    out.attrs["corrupt"] = corrupt
    return out
