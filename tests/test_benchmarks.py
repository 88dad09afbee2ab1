"""Every benchmark runs end to end in its --smoke mode (a tiny workload, seconds), as `make bench` would run it:
a benchmark that no longer matches the code it measures fails here, not months later in front of a reader.

The list is the folder's glob, so a new benchmarks/bench_*.py is covered as soon as it exists (it must accept
--smoke).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("bench_*.py"))


def test_the_benchmarks_are_found():
    assert {"bench_engines.py", "bench_training.py", "bench_gpu.py"} <= {b.name for b in BENCHMARKS}


@pytest.mark.parametrize("bench", BENCHMARKS, ids=[b.stem for b in BENCHMARKS])
def test_benchmark_smoke(bench, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "FEDBENCH_RESULTS_ROOT": str(tmp_path / "results")}
    proc = subprocess.run([sys.executable, str(bench), "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip(), "a benchmark prints its figures"


def test_gpu_session_keeps_within_its_budget(tmp_path):
    """benchmarks/gpu_session.sh runs its steps under what is left of SESSION_S (one device call is at most 600 s):
    a step with too little time left is skipped and says so, and the session's log lands in the output folder."""
    env = {**os.environ, "PYTHON": sys.executable, "SESSION_S": "25", "STEPS": "bench", "SITE": str(tmp_path / "site"),
           "RESULTS_ROOT": str(tmp_path / "results")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    log = (tmp_path / "out" / "session.txt").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fedbench imports, MiniLM loads" in log and "bench_gpu skipped" in log and "done:" in log, log
    assert not (tmp_path / "out" / "bench_gpu.txt").exists()
