"""Run every notebook headless with papermill: `make reproduce` (quick profile), PROFILE=full or PROFILE=paper
(the notebooks of the experiments that have that profile; paper needs the model hub and, in practice, a GPU).

Each executed notebook is kept beside its results: results/<experiment>/<notebook>.ipynb for quick,
results/<experiment>/<profile>/<notebook>.ipynb otherwise. Prints each notebook's wall-clock.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def experiment_of(stem: str) -> str:
    """The experiment whose notebook is `stem` (fedbench's experiment registry), for its results folder."""
    from fedbench.registry import EXPERIMENTS
    return next((e.name for e in EXPERIMENTS if e.notebook == stem), stem)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="quick", choices=["smoke", "quick", "full", "paper"])
    parser.add_argument("--only", nargs="*", help="notebook stems to run (default: all)")
    args = parser.parse_args()
    import papermill as pm
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if nb.stem in args.only]
    if not notebooks:
        print("no notebooks to run", file=sys.stderr)
        return 1
    from fedbench.results import project_results_dir
    results = project_results_dir()      # results/, or $FEDBENCH_RESULTS_ROOT
    timings = []
    for nb in notebooks:
        exp = experiment_of(nb.stem)
        if not (ROOT / "configs" / exp / f"{args.profile}.yaml").exists():   # paper: only where one is reachable
            print(f"== {nb.name}: no configs/{exp}/{args.profile}.yaml, skipped", flush=True)
            continue
        out_dir = results / exp if args.profile == "quick" else results / exp / args.profile
        out_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        print(f"== {nb.name} [{args.profile}]", flush=True)
        pm.execute_notebook(str(nb), str(out_dir / nb.name), parameters={"profile": args.profile}, cwd=str(ROOT),
                            kernel_name="python3", progress_bar=False)
        timings.append((nb.name, time.perf_counter() - start))
        print(f"   {nb.name}: {timings[-1][1]:.0f} s", flush=True)
    total = sum(t for _, t in timings)
    print(f"== all notebooks [{args.profile}]: {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
