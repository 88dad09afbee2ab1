"""Typed options of a registered component: a strategy's or an aggregator's own settings, part of the config.

In the spirit of peft's ``register_peft_method(name, config_cls, model_cls)`` and Flower's
``FedProx(proximal_mu=...)``: a component that has settings of its own declares them as a frozen dataclass
subclassing :class:`Options` and registers it beside the component::

    @dataclass(frozen=True)
    class RidgeOptions(Options):
        ridge: float = 1e-4

        def validate(self, prefix):
            check_number(f"{prefix}.ridge", self.ridge, 0, float("inf"))

    @STRATEGIES.register("lorm", options=RidgeOptions)
    class LoRM(...): ...

The config carries them as plain mappings (``fl.options`` for the strategy, ``fl.aggregator_options`` for the
aggregator), validated by the class (an unknown key or a bad value is a ConfigError naming
``fl.options.<key>``) and normalised to every field with its default filled in, so the run key (the config's
hash) is the same whether a default is written out or left implicit. The component reads its typed instance
with :func:`options_of`. This module sits at the bottom of the import graph with :mod:`fedbench.registry`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from fedbench.errors import ConfigError


@dataclass(frozen=True)
class Options:
    """Base of a component's options: override :meth:`validate` (called once the fields are set)."""

    def validate(self, prefix: str) -> None:       # no constraint beyond the fields' own checks
        pass

    @classmethod
    def from_dict(cls, d: Any, prefix: str) -> "Options":
        if not isinstance(d, dict):
            raise ConfigError(prefix, d, f"a mapping of option names to values: {field_names(cls)}")
        unknown = sorted(set(d) - set(field_names(cls)))
        if unknown:
            raise ConfigError(f"{prefix}.{unknown[0]}", d[unknown[0]], f"an option of {cls.__name__}: "
                                                                          f"{field_names(cls)}")
        opts = cls(**{k: _frozen(v) for k, v in d.items()})
        opts.validate(prefix)
        return opts

    def to_dict(self) -> dict:
        """Plain JSON-able values (tuples as lists), every field."""
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}))


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _frozen(v):
    """Lists as tuples, so an options instance is hashable and cannot be changed in place."""
    if isinstance(v, list):
        return tuple(_frozen(x) for x in v)
    return v


def normalize(entry, value, prefix: str) -> dict:
    """The options mapping `value` of registry `entry`, validated and with every default filled in; a component
    without an ``options`` fact takes none (an empty mapping)."""
    cls = entry.facts.get("options")
    if cls is None:
        if value != {}:
            raise ConfigError(prefix, value, f"{{}} ({entry.name!r} takes no options)")
        return {}
    return cls.from_dict(value, prefix).to_dict()


def option_fields(registry, name: str) -> list[str]:
    """The options component `name` takes (none: an empty list), e.g. to set only those a strategy reads."""
    cls = registry.entry(name).facts.get("options")
    return [] if cls is None else field_names(cls)


def options_of(registry, name: str, value, prefix: str) -> Options | None:
    """The typed options instance of component `name` from its mapping `value` (the config field `prefix`);
    None if the component takes none."""
    cls = registry.entry(name).facts.get("options")
    return None if cls is None else cls.from_dict(value, prefix)


# -- checks an options class's validate() uses (each raises ConfigError naming the field) -----------------------

def check_int(name: str, value: Any, minimum: int = 0) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ConfigError(name, value, f"an integer >= {minimum}")


def check_number(name: str, value: Any, low: float, high: float, low_open: bool = False,
                 high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(name, value, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "true or false")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(name, value, f"one of {list(choices)}")


def check_per_client(name: str, value: Any, item_ok, allowed: str) -> None:
    """None, or a list with one entry per client (None = the run's default for that client)."""
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not all(v is None or item_ok(v) for v in value):
        raise ConfigError(name, value, f"null or a list with one entry per client, each null or {allowed}")
