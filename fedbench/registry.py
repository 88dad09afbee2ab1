"""Name-keyed registries: the one place where each kind of component lists its names.

A config field that names a component (``fl.aggregator``, ``peft.method``, ``fl.strategy``, ...) is
validated against its registry's keys, and the code looks the name up here: no if-chains, no second list
of allowed names anywhere. A registry knows the modules that fill it (``providers``) and imports them the
first time it is read, so this module sits at the bottom of the import graph (it imports nothing of
fedbench's) while the entries live beside the code they describe::

    from fedbench.registry import AGGREGATORS

    @AGGREGATORS.register("my_rule", robust=True)
    def my_rule(states, weights=None): ...

An entry is the registered object plus its *facts* (keyword arguments of ``register``), e.g. whether a tuner
takes ``peft.depth``; ``REGISTRIES`` lists every registry for ``fedbench list``.

Outside code registers with the same decorators from its own module (a *plugin*): a config's ``plugins``
list, ``fedbench run --plugin MODULE`` or an installed distribution's ``fedbench.plugins`` entry point
(every one is imported the first time any registry is read) imports it; see :mod:`fedbench.plugins`.
"""
from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Entry:
    """One registered component: its name, the object (function or class) and its facts."""
    name: str
    obj: Any
    facts: dict = field(default_factory=dict)
    doc: str = ""

    def __getattr__(self, item):            # entry.takes_depth == entry.facts["takes_depth"]
        facts = object.__getattribute__(self, "facts")
        if item in facts:
            return facts[item]
        raise AttributeError(f"registry entry {object.__getattribute__(self, 'name')!r} has no fact {item!r}")


class Registry:
    """Names -> entries for one kind of component, validated against by the config field `field`."""

    def __init__(self, kind: str, field_name: str, providers: tuple[str, ...] = (), describe: str = "",
                 plural: str | None = None):
        self.kind, self.field_name, self.describe = kind, field_name, describe
        self.providers = list(providers)    # a list, so that a module can add itself (add_provider)
        self.plural = plural or kind + "s"
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    # -- filling ------------------------------------------------------------------------------------
    def register(self, name: str, obj: Any = None, **facts) -> Callable:
        """Register `obj` under `name` (or use as a decorator). A name is registered once."""
        doc_override = facts.pop("doc", None)

        def add(o):
            if name in self._entries and self._entries[name].obj is not o:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, o, dict(facts), doc_override or first_sentence(getattr(o, "__doc__", None)))
            return o
        return add(obj) if obj is not None else add

    def add_provider(self, module: str) -> None:
        """Have `module` imported when this registry is read (now, if it has been read already)."""
        if module not in self.providers:
            self.providers.append(module)
        if self._loaded:
            importlib.import_module(module)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in list(self.providers):
                importlib.import_module(module)
            load_entry_point_plugins()

    # -- reading ------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def entry(self, name: str, field_name: str | None = None) -> Entry:
        """The entry of `name`; an unknown name is a ConfigError naming the config field."""
        self._load()
        if name not in self._entries:
            from fedbench.errors import ConfigError
            raise ConfigError(field_name or self.field_name, name, f"one of {self.names()}")
        return self._entries[name]

    def get(self, name: str, field_name: str | None = None) -> Any:
        """The registered object of `name`."""
        return self.entry(name, field_name).obj

    def where(self, **facts) -> list[str]:
        """Names whose facts match, e.g. ``TUNERS.where(takes_depth=True)``."""
        self._load()
        return [n for n, e in self._entries.items() if all(e.facts.get(k) == v for k, v in facts.items())]

    def __contains__(self, name) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self._load()
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, field={self.field_name!r}, names={self.names()})"


ENTRY_POINT_GROUP = "fedbench.plugins"
_ENTRY_POINTS: dict = {"loaded": False, "modules": []}
log = logging.getLogger("fedbench.registry")


def load_entry_point_plugins() -> list[str]:
    """Import every installed plugin (entry points of the group ``fedbench.plugins``, e.g. in a plugin's
    pyproject.toml ``[project.entry-points."fedbench.plugins"] extra = "fedbench_extra"``), once per process;
    returns their module names. A plugin that fails to import is logged and skipped: an unrelated broken
    install must not stop every run (a config that names its components then fails with the allowed names)."""
    if not _ENTRY_POINTS["loaded"]:
        _ENTRY_POINTS["loaded"] = True      # first: a plugin that reads a registry while importing must not recurse
        from importlib.metadata import entry_points
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as e:   # noqa: BLE001 - any import error of outside code
                log.warning("fedbench plugin entry point %r (%s) failed to load: %s: %s", ep.name, ep.value,
                            type(e).__name__, e)
                continue
            _ENTRY_POINTS["modules"].append(getattr(obj, "__name__", ep.value.split(":")[0]))
    return list(_ENTRY_POINTS["modules"])


TUNERS = Registry("tuner", "peft.method", ("fedbench.models.tuners",),
                  "PEFT methods: which parameters train and travel")
AGGREGATORS = Registry("aggregator", "fl.aggregator", ("fedbench.merging.aggregators",),
                       "server rules over the clients' states (with a server optimizer where named)")
LORA_SEMANTICS = Registry("LoRA semantics", "fl.lora_aggregation", ("fedbench.fl.strategy",),
                          "what averaging LoRA factors means", plural="LoRA semantics")
STRATEGIES = Registry("strategy", "fl.strategy", ("fedbench.fl.strategy", "fedbench.strategies"),
                      "what a round asks of clients and how the server combines their updates",
                      plural="strategies")
ATTACKS = Registry("attack", "fl.attack", ("fedbench.fl.attacks",), "Byzantine clients: what an attacker sends")
MERGES = Registry("merge", "method", ("fedbench.merging.task_vectors",), "one-shot merges of task vectors")

FEDERATIONS = Registry("federation", "data.federation", ("fedbench.fl.data", "fedbench.fl.federations"),
                       "what a run's data is: one task cut into clients, or several tasks (multitask, task sequence)")
# cross-field checks a component of the loop contributes to every config (e.g. what batched clients cover): run
# by ExperimentConfig.validate after the per-component checks; filled by the loop's modules, so the config
# imports nothing above it
CONFIG_CHECKS = Registry("config check", "config", ("fedbench.fl.batched",), "checks across config fields")
EXPERIMENTS = Registry("experiment", "experiment", ("fedbench.experiments",),
                       "paper experiments: fedbench run configs/<experiment>/<profile>.yaml")

REGISTRIES = (TUNERS, AGGREGATORS, LORA_SEMANTICS, STRATEGIES, ATTACKS, MERGES, FEDERATIONS, EXPERIMENTS)


# a period that ends a sentence: followed by the end or by a space and a capital (or an opening bracket), and
# not the end of an abbreviation a docstring uses mid-sentence ("Blanchard et al. 2017", "e.g. Krum")
_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bcf)(?<!\bFig)\.(?=\s+[A-Z(\[]|\s*$)")


def first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line, without its final period."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    return _SENTENCE_END.split(text, maxsplit=1)[0].rstrip(".")


def format_registries() -> str:
    """Every registry with its names and one line each (``fedbench list``)."""
    lines = []
    for reg in REGISTRIES:
        lines.append(f"{reg.plural} ({reg.field_name}): {reg.describe}")
        for e in reg:
            facts = ", ".join(f"{k}={v}" for k, v in e.facts.items() if isinstance(v, (bool, int, float, str)))
            lines.append(f"  {e.name:16s} {e.doc}" + (f"  [{facts}]" if facts else ""))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
