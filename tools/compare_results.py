"""Compare two results folders (e.g. a smoke profile's outputs before and after a change): every CSV must hold
the same text cell for cell, except the columns that record wall-clock time or a run key / config hash;
every other text file (PROTOCOL.md, ...) must be byte-identical. Figures (PNG) are not compared.

    python tools/compare_results.py BASELINE_DIR NEW_DIR [--ignore REGEX]

Exit code 0 when everything compared agrees; 1 with a list of differences otherwise.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

# wall-clock columns and run identifiers: the only cells allowed to differ between two runs of one config
IGNORED = r"(^|_)wall(_|$)|^wall_s$|this_cpu|^run$|run_key|config_hash"


def compare_csv(a: Path, b: Path, ignore: re.Pattern) -> list[str]:
    da, db = pd.read_csv(a, dtype=str, keep_default_na=False), pd.read_csv(b, dtype=str, keep_default_na=False)
    if list(da.columns) != list(db.columns):
        return [f"{a.name}: columns differ: {list(da.columns)} vs {list(db.columns)}"]
    if len(da) != len(db):
        return [f"{a.name}: {len(da)} rows vs {len(db)}"]
    out = []
    for col in da.columns:
        if ignore.search(col):
            continue
        bad = (da[col] != db[col]).to_numpy().nonzero()[0]
        if len(bad):
            i = bad[0]
            out.append(f"{a.name}: column {col!r} differs in {len(bad)} rows (first: row {i}: "
                       f"{da[col].iloc[i]!r} vs {db[col].iloc[i]!r})")
    return out


def compare(base: Path, new: Path, ignore: str = IGNORED) -> tuple[int, list[str]]:
    pattern = re.compile(ignore)
    problems, n = [], 0
    for f in sorted(base.rglob("*")):
        if not f.is_file() or f.suffix == ".png":
            continue
        g = new / f.relative_to(base)
        if not g.exists():
            problems.append(f"{f.relative_to(base)}: missing in {new}")
            continue
        n += 1
        if f.suffix == ".csv":
            problems += [f"{f.relative_to(base).parent}/{p}" for p in compare_csv(f, g, pattern)]
        elif f.read_bytes() != g.read_bytes():
            problems.append(f"{f.relative_to(base)}: bytes differ")
    return n, problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--ignore", default=IGNORED, help="regex of column names not compared")
    a = p.parse_args(argv)
    n, problems = compare(a.base, a.new, a.ignore)
    for line in problems:
        print(line)
    print(f"{n} files compared, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
