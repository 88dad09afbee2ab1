"""Profiles and settings: YAML profiles, typed settings, parameter checks, output folders.

Profiles are YAML files a user can read and copy, ``configs/<experiment>/{smoke,quick,full}.yaml`` (and
``paper.yaml`` where the paper's own backbone and data are reachable through the hub loaders)::

    experiment: fedpeft
    profile: quick
    base:              # the fedbench.config.ExperimentConfig every run of the experiment starts from
      data: {task: tweet_sentiment, num_clients: 3, ...}
      train: {local_steps: 2, ...}
    settings:          # the experiment's own parameters (its grid, seeds, methods, ...)
      seeds: [0, 1]

A profile may also extend another of its experiment and write its outputs to a folder of its own, so
that a variant (more seeds, more methods under an axis) shares the run store with the profile it extends
and reruns only the runs it adds, without overwriting that profile's results::

    experiment: fedpeft
    profile: quick              # what it is run as (and what check_profile allows)
    extends: quick              # start from configs/fedpeft/quick.yaml: its base, then these keys over it
    results: quick-complete     # outputs under results/fedpeft/quick-complete/
    settings:                   # each key replaces the extended profile's (base: merged field by field)
      axis_methods: [full, head, lora, ia3, bitfit, adapter]

:func:`resolve_profile` reads one, applies overrides (a dotted key such as ``fl.dropout`` changes ``base``;
any other key a setting) and validates both: the base as an ExperimentConfig, the settings by the
experiment's typed :class:`Settings` class, each bad value a ConfigError naming the field.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from fedbench.config import PROFILES, ConfigError, ExperimentConfig, to_plain
from fedbench.results import project_results_dir

CORE_SECTIONS = ("name", "seed", "data", "model", "peft", "train", "fl")


def results_root() -> Path:
    """Where experiment outputs go: $FEDBENCH_RESULTS_ROOT, else the checkout's results/."""
    return project_results_dir()


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ConfigError("profile", profile, f"one of {list(PROFILES)}")
    return profile


def output_dir(experiment: str, profile: str, path: str | Path | None = None, overrides: dict | None = None) -> Path:
    """results/<experiment>/ for the quick profile (the committed one), results/<experiment>/<profile>/
    for smoke (git-ignored) and full; results/<experiment>/<results>/ for a profile file (`path`) that names
    its own ``results`` folder.

    A run that is not the profile as committed (any non-None override, or a profile file other than
    configs/<experiment>/<profile>.yaml without a ``results`` folder of its own) writes to ``custom-<hash>/``
    under that folder, the hash taken over the overrides and the file's contents, with ``custom.json`` saying
    what was changed: the committed outputs are only ever written by the profile they come from."""
    check_profile(profile)
    d = results_root() / experiment
    read = read_profile_file(path) if path is not None else None
    folder = read["results"] if read is not None else None
    if folder is not None:
        d = d / folder
    else:
        d = d if profile == "quick" else d / profile
    changed = {k: v for k, v in (overrides or {}).items() if v is not None}
    own_file = path is not None and folder is None and \
        Path(path).resolve() != profile_path(experiment, profile).resolve()
    if changed or own_file:
        import hashlib
        import json
        what = {"profile": profile, "file": str(path) if own_file else None,
                "file_contents": {k: v for k, v in read.items() if k != "changed"} if own_file else None,
                "overrides": changed}
        blob = json.dumps(to_plain(what), sort_keys=True, default=str)
        d = d / f"custom-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
        d.mkdir(parents=True, exist_ok=True)
        from fedbench.atomic import atomic_write_text
        atomic_write_text(d / "custom.json", json.dumps(to_plain(what), indent=2, sort_keys=True, default=str) + "\n")
    d.mkdir(parents=True, exist_ok=True)
    return d


def chosen_lr(experiment: str, profile: str, path=None, table: str = "lr_selection.csv", **match) -> float | None:
    """The learning rate a profile's last run chose on validation for the rows of its `table` matching `match`
    (column = value), read from its outputs; None if it has not run or chose none there."""
    import pandas as pd
    name = read_profile_file(path)["results"] if path is not None else None
    folder = results_root() / experiment
    folder = folder / name if name else (folder if profile == "quick" else folder / profile)
    f = folder / table
    if not f.exists():
        return None
    rows = pd.read_csv(f)
    rows = rows[rows["chosen"].astype(bool)]
    for col, value in match.items():
        rows = rows[rows[col] == value]
    return float(rows["lr"].iloc[0]) if len(rows) else None


def check_method(method: str, allowed) -> str:
    if method not in allowed:
        raise ConfigError("--method", method, f"one of {list(allowed)}")
    return method


def no_lr(profile: str, method: str):
    return ConfigError("--lr", None, f"a learning rate for {method!r}: profile {profile!r} has no chosen one yet "
                                     f"(its lr_selection.csv is written when it runs)")


def runs_root() -> Path:
    """The per-config run store (git-ignored): a finished config is loaded, not recomputed."""
    return results_root() / "runs"


def configs_root() -> Path:
    """configs/ of the fedbench checkout ($FEDBENCH_CONFIGS overrides it)."""
    import os
    if os.environ.get("FEDBENCH_CONFIGS"):
        return Path(os.environ["FEDBENCH_CONFIGS"])
    return Path(__file__).resolve().parents[2] / "configs"


def profile_path(experiment: str, profile: str) -> Path:
    return configs_root() / experiment / f"{check_profile(profile)}.yaml"


PROFILE_KEYS = ("experiment", "profile", "extends", "results", "base", "settings")


def read_profile_file(path: str | Path) -> dict:
    """A profile YAML as a dict with keys experiment, profile, extends, results (folder name or None), base
    (dict or None), settings (dict); an ``extends`` profile is read first and this file's keys laid over it
    (then ``changed`` lists the keys this file sets)."""
    from fedbench.yamlio import read_config_file
    path = Path(path)
    if not path.exists():
        raise ConfigError("profile", str(path), "an existing configs/<experiment>/<profile>.yaml file")
    d = read_config_file(path, "profile")
    unknown = sorted(set(d) - set(PROFILE_KEYS))
    if unknown:
        raise ConfigError(unknown[0], d[unknown[0]], f"one of the profile keys {', '.join(PROFILE_KEYS)}")
    results = d.get("results")
    if results is not None:
        _check_folder(results)
    parent = d.get("extends")
    out = {"experiment": d.get("experiment"), "profile": d.get("profile"), "extends": parent, "results": results,
           "base": d.get("base"), "settings": dict(d.get("settings") or {})}
    if parent is None:
        return out
    if parent not in PROFILES:
        raise ConfigError("extends", parent, f"one of the experiment's profiles {list(PROFILES)}")
    if out["experiment"] is None:
        raise ConfigError("experiment", None, "the experiment's name (a profile with extends names its experiment)")
    if results is None:       # or it would overwrite the outputs of the profile it was run as
        raise ConfigError("results", None, "a folder name of its own for a profile with extends")
    sibling = path.parent / f"{parent}.yaml"     # configs/<experiment>/<parent>.yaml beside this file
    up = read_profile_file(sibling if sibling.exists() else profile_path(out["experiment"], parent))
    if up["experiment"] != out["experiment"]:
        raise ConfigError("extends", parent, f"a profile of {out['experiment']!r} (that file is {up['experiment']!r}'s)")
    base = up["base"] if out["base"] is None else _merge(up["base"] or {}, out["base"])
    changed = sorted(out["settings"]) + [f"base.{k}" for k in sorted(out["base"] or {})]   # for variant_note
    return {**out, "profile": out["profile"] or parent, "base": base, "changed": changed,
            "settings": {**up["settings"], **out["settings"]}}


def variant_note(path: str | Path | None) -> str:
    """A Markdown preamble for a variant's PROTOCOL.md (what it changes of the profile it extends); "" for a
    plain profile. The protocol table under it compares the plain profiles."""
    d = read_profile_file(path) if path is not None else {"extends": None}
    if d["extends"] is None:
        return ""
    return (f"> `{d['results']}`: a variant of the `{d['extends']}` profile (`{Path(path).name}`) that sets "
            f"{', '.join(f'`{k}`' for k in d['changed']) or 'nothing'} (values in that file). The table below "
            f"describes the plain profiles.\n\n")


def _check_folder(name) -> None:
    import re
    ok = isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None
    ok = ok and name not in PROFILES and name != "runs"
    if not ok:
        raise ConfigError("results", name, "a folder name (letters, digits, '-', '_', '.'), not a profile name or 'runs'")


def _merge(base: dict, over: dict) -> dict:
    """`base` with `over` laid over it, nested dicts merged key by key (a base config's sections)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_profiles(experiment: str) -> dict[str, dict]:
    """{profile: settings dict} from the experiment's YAML files (for experiments whose settings are a dict)."""
    return {p: read_profile_file(profile_path(experiment, p))["settings"] for p in PROFILES
            if profile_path(experiment, p).exists()}


@dataclass
class Profile:
    """A resolved profile: the validated base run config (None for experiments without one) and settings."""
    experiment: str
    profile: str
    base: ExperimentConfig | None
    settings: typing.Any


def resolve_profile(experiment: str, profile: str, overrides: dict | None = None, settings_cls=None,
                    path: str | Path | None = None) -> Profile:
    """Read ``configs/<experiment>/<profile>.yaml`` (or `path`), apply non-None `overrides` and validate.

    A dotted override (``fl.dropout``, ``train.lr``, ``seed``) changes the base config; any other key a
    setting. With `settings_cls` (a :class:`Settings` dataclass) the settings are built and validated by it.
    """
    d = read_profile_file(path or profile_path(experiment, profile))
    base_dict = d["base"]
    settings = dict(d["settings"])
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key.split(".")[0] in CORE_SECTIONS and ("." in key or key in ("seed", "name")):
            if base_dict is None:
                raise ConfigError(key, value, f"a setting of {experiment} (it has no base run config)")
            base_dict = _set_dotted(base_dict, key, value)
        elif settings_cls is not None or key in settings:
            settings[key] = value
        else:
            raise ConfigError(key, value, f"a parameter of this experiment: {sorted(settings)}")
    base = ExperimentConfig.from_dict(base_dict) if base_dict is not None else None
    if settings_cls is not None:
        settings = settings_cls.from_dict(settings)
    return Profile(experiment, profile, base, settings)


def _set_dotted(d: dict, dotted: str, value) -> dict:
    import copy
    out = copy.deepcopy(d)
    node = out
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, value, "a dotted path to a config field")
    node[leaf] = value
    return out


class Settings:
    """Base of an experiment's typed settings (a dataclass): built from a dict, unknown keys rejected, lists
    turned into tuples where the field says tuple, then ``validate()`` (ConfigError per bad field)."""

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(unknown[0], d[unknown[0]], f"a parameter of this experiment: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in d.items():
            if isinstance(v, list) and typing.get_origin(hints.get(k)) is tuple:
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            kwargs[k] = v
        obj = cls(**kwargs)
        obj.validate()
        return obj

    def validate(self) -> None:  # pragma: no cover - each experiment defines its checks
        pass

    def to_dict(self) -> dict:
        return to_plain(dataclasses.asdict(self))


def check_list(name: str, value, item_ok, allowed: str, nonempty: bool = True) -> None:
    """ConfigError(name, value, allowed) unless `value` is a (non-empty) list/tuple whose items pass."""
    if not isinstance(value, (list, tuple)) or (nonempty and len(value) == 0) or not all(item_ok(v) for v in value):
        raise ConfigError(name, value, allowed)


def check_seeds(name: str, seeds) -> tuple[int, ...]:
    """The seeds as a tuple of ints; ConfigError unless a non-empty list of distinct integers >= 0."""
    check_list(name, seeds, lambda x: is_int(x) and x >= 0, "a non-empty list of distinct integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(name, seeds, "distinct seeds")
    return tuple(int(x) for x in seeds)


def check_subset(name: str, value, allowed: tuple) -> tuple:
    """`value` as a tuple in the order of `allowed`; ConfigError unless a non-empty subset of it."""
    check_list(name, value, lambda m: m in allowed, f"a non-empty subset of {list(allowed)}")
    return tuple(m for m in allowed if m in value)


# -- parameter checks shared by the experiments' settings validators -----------------------------------

def is_int(x) -> bool:
    """An integer (Python or numpy), not a bool."""
    import numpy as np
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A real number (Python or numpy), not a bool."""
    import numpy as np
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


