"""What every experiment shares: profiles, output folders, tables, figures, the claims table."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedbench.config import PROFILES, ConfigError
from fedbench.results import atomic_savefig, atomic_write_csv, project_results_dir


def results_root() -> Path:
    """Where experiment outputs go: $FEDBENCH_RESULTS_ROOT, else the checkout's results/."""
    return project_results_dir()


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ConfigError("profile", profile, f"one of {list(PROFILES)}")
    return profile


def output_dir(experiment: str, profile: str) -> Path:
    """results/<experiment>/ for the quick profile (the committed one), results/<experiment>/<profile>/
    for smoke (git-ignored) and full."""
    check_profile(profile)
    d = results_root() / experiment
    d = d if profile == "quick" else d / profile
    d.mkdir(parents=True, exist_ok=True)
    return d


def runs_root() -> Path:
    """The per-config run store (git-ignored): a finished config is loaded, not recomputed."""
    return results_root() / "runs"


def profile_settings(defaults: dict[str, dict], profile: str, overrides: dict) -> dict:
    """The settings of `profile` with the user's non-None overrides on top; unknown keys are errors."""
    check_profile(profile)
    settings = dict(defaults[profile])
    for key, value in overrides.items():
        if key not in settings:
            raise ConfigError(key, value, f"a parameter of this experiment: {sorted(settings)}")
        if value is not None:
            settings[key] = value
    return settings


def save_table(df: pd.DataFrame, out: Path, name: str) -> Path:
    path = Path(out) / name
    atomic_write_csv(path, df)
    return path


def save_figure(fig, out: Path, name: str) -> Path:
    path = Path(out) / name
    atomic_savefig(fig, path)
    return path


@dataclass
class Claim:
    """One published claim, our measured evidence and whether the two agree."""
    claim: str
    paper: str
    ours: str
    agrees: bool

    def row(self) -> dict:
        return {"claim": self.claim, "paper": self.paper, "ours": self.ours,
                "agrees": "yes" if self.agrees else "no"}


def claims_table(claims: list[Claim]) -> pd.DataFrame:
    return pd.DataFrame([c.row() for c in claims], columns=["claim", "paper", "ours", "agrees"])


def mean_std(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Mean, std and count of `value` over seeds, per group `by`."""
    g = df.groupby(by, sort=False)[value]
    return g.agg(mean="mean", std="std", n="count").reset_index()


# -- parameter checks shared by the experiments' settings validators -----------------------------------

def is_int(x) -> bool:
    """An integer (Python or numpy), not a bool."""
    import numpy as np
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A real number (Python or numpy), not a bool."""
    import numpy as np
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# -- a run store for experiments whose runs are a few tables + a summary ---------------------------------

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


def method_colors(order, methods) -> dict:
    """A fixed tab10 colour per method (by its place in the experiment's `order`), for the methods present."""
    import matplotlib
    pal = matplotlib.colormaps["tab10"]
    return {m: pal(i) for i, m in enumerate(order) if m in methods}
