"""Redraw the committed figures of results/<experiment>/ from the CSVs in the same folder, with each experiment's
own figure function (the table builders of tests/test_figures.py), without training anything.

    python tools/redraw_figures.py compare OUT_DIR    # draw into OUT_DIR, say which match the committed PNG bytes
    python tools/redraw_figures.py write NAME,...      # overwrite those committed PNGs (e.g. fedpeft/dp_drop.png)

Run `compare` with the code that drew the committed PNGs first: a figure whose redraw is byte-identical is drawn
from exactly the CSVs, so `write` with newer figure code redraws it faithfully. The others (inputs not all in the
CSVs) are left for the next quick rerun.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_figures as tf  # noqa: E402

from fedbench.results import atomic_savefig  # noqa: E402


def main(argv) -> int:
    mode, arg = argv[1], argv[2]
    only = set(arg.split(",")) if mode == "write" else None
    out = Path(arg) if mode == "compare" else None
    for exp, build in tf.EXPERIMENTS.items():
        for name, fig in build().items():
            name = name if name.endswith(".png") else f"{name}.png"
            committed = ROOT / "results" / exp / name
            if mode == "compare":
                path = out / f"{exp}__{name}"
                atomic_savefig(fig, path)
                same = committed.exists() and committed.read_bytes() == path.read_bytes()
                print(f"{'EXACT' if same else 'differs'} {exp}/{name}")
            elif f"{exp}/{name}" in only:
                atomic_savefig(fig, committed)
                print(f"wrote {committed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
