"""Where an experiment's outputs go on disk: its tables and figures (atomic writes) and, for experiments whose runs
are a few tables and a summary rather than a loop RunResult, a run store keyed by the run's whole config."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedbench.bench.profiles import runs_root
from fedbench.results import atomic_savefig, atomic_write_csv


def save_table(df: pd.DataFrame, out: Path, name: str) -> Path:
    path = Path(out) / name
    atomic_write_csv(path, df)
    return path


def save_figure(fig, out: Path, name: str) -> Path:
    path = Path(out) / name
    atomic_savefig(fig, path)
    return path


class TableRunStore:
    """One folder per run key under ``runs_root()/<experiment>/<hash of the key>``: ``key.json``, one CSV per
    table and ``summary.json`` written last, so a folder without it is an interrupted run and is recomputed.

    pandas >= 3 parses floats round-trip exactly, so a loaded run rewrites byte-identical CSVs.
    """

    def __init__(self, experiment: str, tables: tuple[str, ...], read_csv_kwargs: dict | None = None):
        self.experiment, self.tables, self.read_csv_kwargs = experiment, tuple(tables), dict(read_csv_kwargs or {})

    def folder(self, key: dict) -> Path:
        from fedbench.config import config_hash
        return runs_root() / self.experiment / config_hash(key)

    def load(self, key: dict) -> dict | None:
        import json
        d = self.folder(key)
        if not (d / "summary.json").exists():
            return None
        out = {}
        for name in self.tables:
            path = d / f"{name}.csv"
            out[name] = pd.read_csv(path, **self.read_csv_kwargs) if path.stat().st_size > 1 else pd.DataFrame()
        out["summary"] = json.loads((d / "summary.json").read_text())
        return out

    def save(self, key: dict, res: dict) -> None:
        from fedbench.results import atomic_write_json
        d = self.folder(key)
        atomic_write_json(d / "key.json", key)
        for name in self.tables:
            atomic_write_csv(d / f"{name}.csv", res[name])
        atomic_write_json(d / "summary.json", res["summary"])     # last: marks the run finished

    def get(self, key: dict, compute) -> dict:
        """The run of `key`: loaded, or ``compute()`` (a dict with one DataFrame per table and ``summary``) run
        once, saved and loaded back (what a later load gives: bit-identical tables whether or not it was on disk)."""
        res = self.load(key)
        if res is None:
            self.save(key, compute())
            res = self.load(key)
        return res
