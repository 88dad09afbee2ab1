"""Imports point one way: each package of fedbench imports only packages of lower layers (or itself), no private
name crosses a package boundary, and the package graph has no cycle. Function-level imports count too."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fedbench"

# bottom to top; a package may import from its own layer's package only if it is itself
LAYERS = [
    {"errors"},                                 # ConfigError
    {"atomic", "registry", "yamlio"},           # atomic writes; the name registries; the one YAML/JSON reader
    {"options", "plugins"},                     # typed options of registered components; loading outside modules
    {"data"},                                   # tasks, partitions
    {"config"},                                 # the run config (validates against data and the registries)
    {"results", "claims"},                      # the run store; claims (statistics)
    {"models", "plots", "claims_calibration"},  # backbones and PEFT tuners; figures; the claims' calibration
    {"merging"},                                # the math: aggregation rules, robust rules, merges, LoRM/RegMean solves
    {"fl"},                                     # the loop: client training, privacy, client store, FedAvg, rounds
    {"strategies"},                             # the paper strategies, one module per family
    {"engines"},                                # Flower
    {"bench"},                                  # what every experiment shares: profiles, runner, caches, lr search, report
    {"experiments"},                            # the paper experiments
    {"cli", "__init__"},                        # the command line; `import fedbench`
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def package_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports(path: Path):
    """(line, imported module, imported names) of every fedbench import in `path`, at any depth."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fedbench":
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fedbench":
                    yield node.lineno, a.name, []


def target_package(module: str, names: list[str]) -> list[str]:
    parts = module.split(".")
    if len(parts) > 1:
        return [parts[1]]
    return names          # `from fedbench import x`: x is the package


def edges():
    for path in sorted(PKG.rglob("*.py")):
        src = package_of(path)
        for line, module, names in imports(path):
            for dst in target_package(module, names):
                yield path.relative_to(PKG.parent), line, src, dst, module, names


def test_every_package_has_a_layer():
    packages = {package_of(p) for p in PKG.rglob("*.py")}
    assert packages <= set(RANK), sorted(packages - set(RANK))


def test_imports_point_down():
    upward = [f"{path}:{line}: {src} imports {module} ({dst})" for path, line, src, dst, module, _ in edges()
              if dst != src and dst in RANK and RANK[dst] >= RANK[src]]
    assert upward == []


def test_no_private_name_crosses_a_package():
    leaks = [f"{path}:{line}: {src} imports {name} from {module}" for path, line, src, dst, module, names in edges()
             if dst != src for name in names if name.startswith("_")]
    assert leaks == []


def test_the_package_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for _, _, src, dst, _, _ in edges():
        if src != dst:
            graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph.get(n, ()):
            if state.get(m) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [n, m])}")
            if m not in state:
                visit(m, stack + [n])
        state[n] = 2

    for n in list(graph):
        if n not in state:
            visit(n, [])
