"""Write results/claims_calibration.csv: the coverage of fedbench.claims' accuracy intervals on simulated data.

    python tools/claims_calibration.py [--reps 2000] [--out results/claims_calibration.csv] [--markdown]

The simulation and the methods are fedbench.claims_calibration's (seeded: the same arguments give the same
file). --markdown also prints the README's table (coverage / false-decisive rate of fedbench's interval per
cell, and the worst cell of each other method).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedbench.claims_calibration import calibrate  # noqa: E402
from fedbench.results import atomic_write_csv  # noqa: E402


def markdown(df) -> str:
    ours = df[df["method"] == "crossed (fedbench)"]
    lines = ["| example sd | seeds | test size | " + " | ".join(f"seed sd {t:g}" for t in sorted(set(ours["seed_sd"])))
             + " |", "|---|---|---|" + "---|" * ours["seed_sd"].nunique()]
    for (h, S, E), g in ours.groupby(["example_sd", "n_seeds", "n_examples"]):
        cells = [f"{r.coverage:.3f} / {r.false_decisive:.3f}" for r in g.sort_values("seed_sd").itertuples()]
        lines.append(f"| {h:g} | {S} | {E} | " + " | ".join(cells) + " |")
    worst = df.groupby("method").agg(min_coverage=("coverage", "min"), max_false_decisive=("false_decisive", "max"))
    lines += ["", "| method | lowest coverage | highest false-decisive rate |", "|---|---|---|"]
    lines += [f"| {m} | {r.min_coverage:.3f} | {r.max_false_decisive:.3f} |" for m, r in worst.iterrows()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "claims_calibration.csv")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    df = calibrate(reps=a.reps, seed=a.seed)
    atomic_write_csv(a.out, df)
    print(f"wrote {a.out} ({len(df)} rows, {a.reps} replicates per cell)")
    if a.markdown:
        print(markdown(df))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
