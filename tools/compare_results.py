"""Compare two results folders CSV by CSV: identical, or identical but for wall-time and run-key columns.

    python tools/compare_results.py OLD_DIR NEW_DIR [--ignore COL ...]

A refactoring that must not change what any run computes is checked this way: the quick (or smoke) outputs
before and after, every CSV under both folders. Wall-time columns (``wall_s``, ``*_wall_s``, ``seconds``...)
and run-key columns (a config hash: ``run``, ``config_hash``, ``run_key``) are expected to differ; any other
difference is printed with the first differing row, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

WALL = re.compile(r"(^|_)(wall|seconds|time_s|elapsed)(_|$)|wall_s$|_s_wall|^wall")
KEYS = {"run", "config_hash", "run_key", "key"}


def ignored(col: str, extra: set[str]) -> bool:
    return col in extra or col in KEYS or bool(WALL.search(col))


def compare(old: Path, new: Path, extra: set[str]) -> list[str]:
    problems = []
    olds = {p.relative_to(old) for p in old.rglob("*.csv")}
    news = {p.relative_to(new) for p in new.rglob("*.csv")}
    for rel in sorted(olds ^ news):
        problems.append(f"{rel}: only in {'old' if rel in olds else 'new'}")
    for rel in sorted(olds & news):
        a, b = (old / rel).read_bytes(), (new / rel).read_bytes()
        if a == b:
            continue
        da, db = pd.read_csv(old / rel, dtype=str, keep_default_na=False), pd.read_csv(new / rel, dtype=str,
                                                                                       keep_default_na=False)
        if list(da.columns) != list(db.columns) or len(da) != len(db):
            problems.append(f"{rel}: columns or rows differ ({list(da.columns)} x {len(da)} vs "
                            f"{list(db.columns)} x {len(db)})")
            continue
        cols = [c for c in da.columns if not ignored(c, extra)]
        diff = (da[cols] != db[cols]).any(axis=1)
        if diff.any():
            i = int(diff.idxmax())
            bad = [c for c in cols if da.at[i, c] != db.at[i, c]]
            problems.append(f"{rel}: {int(diff.sum())} rows differ, first row {i} in {bad}: "
                            f"{[da.at[i, c] for c in bad]} vs {[db.at[i, c] for c in bad]}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--ignore", nargs="*", default=[], help="more columns expected to differ")
    args = ap.parse_args(argv)
    problems = compare(args.old, args.new, set(args.ignore))
    n = len(list(args.old.rglob("*.csv")))
    for p in problems:
        print(p)
    print(f"{n} CSVs compared: {'identical but for wall-time and run-key columns' if not problems else f'{len(problems)} differ'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
