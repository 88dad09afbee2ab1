"""Reading config and profile files: one YAML loader and one file reader, each problem a ConfigError.

PyPI's PyYAML implements YAML 1.1, whose float rule wants a dot: ``lr: 2e-3`` or ``delta: 1e-5`` (how ML
papers and users write numbers) load as *strings* and are then rejected as "not a number". :class:`Loader`
is ``yaml.SafeLoader`` with the YAML 1.2 float rule (a dot *or* an exponent), and it refuses duplicate keys
(YAML 1.1 lets the later one win silently). Everything else is SafeLoader's (no arbitrary objects).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from fedbench.errors import ConfigError

SUFFIXES = (".yaml", ".yml", ".json")
_FLOAT = "tag:yaml.org,2002:float"


class Loader(yaml.SafeLoader):
    """SafeLoader + YAML 1.2 floats (``1e-5``, ``2E3``) + duplicate keys rejected."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":     # '<<: *anchor' may repeat keys by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:                                 # an unhashable key: SafeLoader reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# The resolver table is a class attribute shared with SafeLoader (add_implicit_resolver copies the dict but
# appends to the shared per-character lists), so build a fresh table without the 1.1 float rule first.
Loader.yaml_implicit_resolvers = {ch: [(tag, rx) for tag, rx in rules if tag != _FLOAT]
                                  for ch, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str):
    """YAML text as Python objects (yaml.YAMLError on bad syntax or a duplicate key)."""
    return yaml.load(text, Loader=Loader)


def parse_value(raw: str):
    """A ``--set FIELD=VALUE`` value, read as YAML would read it in a file (``1e-5`` is a number)."""
    try:
        return load_yaml(raw)
    except yaml.YAMLError:
        return raw          # not YAML (e.g. 'a: b: c'): the field's own check then names it


def read_config_file(path: str | Path, what: str = "config") -> dict:
    """A config or profile file (.yaml / .yml / .json) as a dict; ConfigError for a missing file, a folder,
    another suffix, a syntax error or duplicate key (with its line), an empty file or a top level that is not a
    mapping."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(what, str(path), "a .yaml/.yml/.json file, not a folder")
    if not p.exists():
        raise ConfigError(what, str(path), "an existing .yaml/.yml/.json file")
    if p.suffix.lower() not in SUFFIXES:
        raise ConfigError(what, str(path), f"a file ending in {', '.join(SUFFIXES)}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(what, str(path), f"a readable UTF-8 text file ({e})") from e
    try:
        d = json.loads(text) if p.suffix.lower() == ".json" else load_yaml(text)
    except json.JSONDecodeError as e:
        raise ConfigError(what, str(path), f"valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except yaml.YAMLError as e:
        raise ConfigError(what, str(path), f"valid YAML ({_yaml_problem(e)})") from e
    if d is None:
        raise ConfigError(what, str(path), "a non-empty file (an empty one would run every default)")
    if not isinstance(d, dict):
        raise ConfigError(what, str(path), "a mapping of field names to values at the top level")
    return d


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem
