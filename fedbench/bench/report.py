"""One report per experiment, generated from its outputs: ``results/<experiment>/REPORT.md``.

Every number a reader sees lives here, never hand-copied into the README: the protocol table (paper / official
code / ours, the experiment's ``PROTOCOL.md``), the headline table (the experiment's registered headline: a
table of its outputs, averaged over seeds where it has a ``seed`` column), the claims table (``claims.csv``)
and every figure of the folder. An experiment writes it at the end of each run of a profile; ``fedbench report
DIR`` rewrites it from a folder's outputs alone (nothing is recomputed).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedbench.results import atomic_write_text


@dataclass(frozen=True)
class Headline:
    """Which output table heads the report: `table` (a CSV of the folder), the columns that name a row (`by`)
    and the columns shown (`values`); with a ``seed`` column the values are means over seeds (``n seeds``)."""
    table: str
    by: tuple[str, ...]
    values: tuple[str, ...]


CLAIM_COLUMNS = ("claim", "role", "estimate", "ci_low", "ci_high", "n_seeds", "verdict")


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """`df` as a GitHub markdown table, numbers rounded to `digits` decimals, missing values empty."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return ""
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def headline_table(folder: Path, headline: Headline) -> pd.DataFrame | None:
    path = folder / headline.table
    if not path.exists():
        return None
    df = pd.read_csv(path)
    by = [c for c in headline.by if c in df.columns]
    values = [c for c in headline.values if c in df.columns]
    if "seed" in df.columns and by:
        g = df.groupby(by, sort=False)
        out = g[values].mean(numeric_only=True).reset_index()
        out["n seeds"] = g["seed"].nunique().to_numpy()
        return out
    return df[by + values]


def claims_table(folder: Path) -> pd.DataFrame | None:
    path = folder / "claims.csv"
    if not path.exists():
        return None
    df = pd.read_csv(path)
    return df[[c for c in CLAIM_COLUMNS if c in df.columns]]


def protocol_body(folder: Path) -> str | None:
    path = folder / "PROTOCOL.md"
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):         # the report has its own title
        lines = lines[1:]
    return "\n".join(lines).strip()


def render(title: str, folder: Path, headline: Headline | None) -> str:
    """The report of `folder` (an experiment's outputs) as markdown."""
    folder = Path(folder)
    parts = [f"# {title}", "",
             "Generated from the outputs in this folder (`fedbench report`); every run of the profile writes it "
             "again. Tables and figures are the CSVs and PNGs beside it.", ""]
    protocol = protocol_body(folder)
    if protocol:
        parts += ["## Protocol", "", protocol, ""]
    table = headline_table(folder, headline) if headline is not None else None
    if table is not None and len(table):
        note = " (means over seeds)" if "n seeds" in table.columns else ""
        parts += [f"## Headline: `{headline.table}`{note}", "", markdown_table(table), ""]
    claims = claims_table(folder)
    if claims is not None and len(claims):
        parts += ["## Claims (`claims.csv`)", "", "How to read a verdict: the README's \"Reading a verdict\".", "",
                  markdown_table(claims), ""]
    figures = sorted(folder.glob("*.png"))
    if figures:
        parts += ["## Figures", ""] + [f"![{p.stem}]({p.name})\n" for p in figures]
    return "\n".join(parts).rstrip() + "\n"


def write_report(experiment: str, folder: str | Path) -> Path:
    """Write ``REPORT.md`` of `experiment`'s outputs in `folder` (atomically) and return its path."""
    from fedbench.registry import EXPERIMENTS
    entry = EXPERIMENTS.entry(experiment, "experiment")
    folder = Path(folder)
    path = folder / "REPORT.md"
    atomic_write_text(path, render(f"{entry.name}: {entry.doc}", folder, entry.facts.get("headline")))
    return path


def write_outputs(experiment: str, out: str | Path, tables: dict, figures: dict | None = None,
                  protocol: str | None = None) -> dict[str, Path]:
    """Everything a run of `experiment`'s profile writes into `out`, in one place: each table as ``<name>.csv``,
    each figure as ``<name>.png`` (a name may carry its suffix already), `protocol` (markdown with its own title) as ``PROTOCOL.md``, and then the
    report built from them (:func:`write_report`). Every write is atomic. Returns {file name: path}."""
    from fedbench.bench.store import save_figure, save_table
    out = Path(out)

    def named(name: str, suffix: str) -> str:         # "summary" and "summary.csv" name the same file
        return name if name.endswith(suffix) else name + suffix
    paths = {named(n, ".csv"): save_table(df, out, named(n, ".csv")) for n, df in tables.items()}
    if protocol is not None:
        atomic_write_text(out / "PROTOCOL.md", protocol)
        paths["PROTOCOL.md"] = out / "PROTOCOL.md"
    paths.update({named(n, ".png"): save_figure(fig, out, named(n, ".png")) for n, fig in (figures or {}).items()})
    paths["REPORT.md"] = write_report(experiment, out)
    return paths
