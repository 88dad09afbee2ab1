"""Plugins: outside modules that register components (aggregators, strategies, merges, tuners, ...).

A plugin is an ordinary module that registers with the registries' decorators when it is imported::

    # my_rules.py (anywhere on the import path, outside fedbench)
    from fedbench.registry import AGGREGATORS

    @AGGREGATORS.register("my_rule", weighted=True, robust=False)
    def my_rule(states, weights, fl_cfg): ...

Three ways load it: a config's ``plugins: [my_rules]`` (imported before the config validates the names it
uses, and carried with the config to Flower's workers, which import it before they validate), the CLI's
``fedbench run RUN.yaml --plugin my_rules``, and an installed distribution's entry point in the group
``fedbench.plugins`` (:func:`fedbench.registry.load_entry_point_plugins`). A plugin's version (its
``__version__``, else a hash of its source) enters the run key (:func:`fedbench.results.run_key`), so a
changed plugin never gets a stale stored result.
"""
from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

from fedbench.errors import ConfigError


def load(modules, field_name: str = "plugins") -> list[str]:
    """Import each module of `modules` (registering its components); a module that does not import is a
    ConfigError naming `field_name` and the module. Returns the module names."""
    names = list(modules)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(field_name, name, "an importable module name (a non-empty string)")
        try:
            importlib.import_module(name)
        except Exception as e:   # ImportError, or any error the module raises while importing
            raise ConfigError(field_name, name, f"an importable module (importing it failed: "
                                                f"{type(e).__name__}: {e})") from e
    return names


def version(module_name: str) -> str:
    """The module's ``__version__`` if it sets one, else the sha256 (16 hex digits) of its source: every .py
    file of a package (sorted by path), the file of a module, so any edit of a plugin's code changes it."""
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    v = getattr(module, "__version__", None)
    if v is not None:
        return str(v)
    path = getattr(module, "__file__", None)
    if path is None:                  # a namespace package or a built-in: nothing to hash
        return "unknown"
    path = Path(path)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode() + b"\0" + f.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()[:16]


def _top_package(obj) -> str | None:
    name = getattr(obj, "__module__", None) or getattr(obj, "__name__", None)
    return name if isinstance(name, str) else None


def outside_modules(cfg) -> list[str]:
    """The modules outside fedbench that provide a component `cfg` names (an entry-point plugin's strategy,
    aggregator, tuner, ...): these are versioned in the run key even when the config lists no plugin."""
    from fedbench.registry import AGGREGATORS, ATTACKS, LORA_SEMANTICS, STRATEGIES, TUNERS
    out = []
    for registry, name in ((STRATEGIES, cfg.fl.strategy), (AGGREGATORS, cfg.fl.aggregator),
                           (LORA_SEMANTICS, cfg.fl.lora_aggregation), (ATTACKS, cfg.fl.attack),
                           (TUNERS, cfg.peft.method)):
        module = _top_package(registry.entry(name).obj)
        top = module.split(".")[0] if module else None
        # the whole top-level package: a component's code may live in any of its modules (the standard library,
        # e.g. a functools.partial's module, is no plugin)
        if top and top != "fedbench" and top not in sys.stdlib_module_names and top not in out:
            out.append(top)
    return out


def plugin_versions(cfg) -> dict[str, str]:
    """{module: version} of the config's plugins and of every outside module providing a component it names
    (empty for a config that uses fedbench's own components only)."""
    modules = list(dict.fromkeys([*cfg.plugins, *outside_modules(cfg)]))
    return {m: version(m) for m in modules}
