"""Write a notebook from a list of (kind, source) cells: `python tools/nbedit.py` is not a CLI; import it."""
import json


def write_notebook(path, cells):
    nb = {"cells": [], "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    for i, (kind, src) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"c{i:02d}", "metadata": {}, "source": src.strip("\n").splitlines(keepends=True)}
        if kind == "parameters":
            cell["cell_type"] = "code"
            cell["metadata"] = {"tags": ["parameters"]}
        if cell["cell_type"] == "code":
            cell["execution_count"] = None
            cell["outputs"] = []
        nb["cells"].append(cell)
    with open(path, "w") as f:
        json.dump(nb, f, indent=1)
        f.write("\n")
