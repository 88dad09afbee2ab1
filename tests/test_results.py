import json
import os

import pandas as pd
import pytest

from fedbench.config import ExperimentConfig
from fedbench.results import (RunResult, atomic_write_text, cached_run, load_results, load_run, run_key, save_run)


def _result(cfg, acc):
    rounds = pd.DataFrame({"round": [1, 2], "accuracy": [acc / 2, acc], "bytes_up": [10, 10]})
    return RunResult(cfg.to_dict(), rounds, {"final_accuracy": acc})


def test_cached_run_computes_once_and_then_loads(tmp_path):
    cfg = ExperimentConfig(name="a")
    calls = []

    def compute(checkpoint_dir):
        calls.append(1)
        return _result(cfg, 0.8)

    first = cached_run(cfg, compute, root=tmp_path)
    second = cached_run(cfg, compute, root=tmp_path)
    assert len(calls) == 1 and second.final_accuracy == first.final_accuracy == 0.8
    assert second.rounds.equals(first.rounds)
    cached_run(cfg, compute, root=tmp_path, force=True)
    assert len(calls) == 2


def test_unfinished_run_is_recomputed(tmp_path):
    cfg = ExperimentConfig(name="b")
    d = save_run(_result(cfg, 0.5), run_key(cfg), tmp_path)
    (d / "summary.json").unlink()          # interrupted before the last write
    assert load_run(run_key(cfg), tmp_path) is None
    res = cached_run(cfg, lambda ckpt: _result(cfg, 0.6), root=tmp_path)
    assert res.final_accuracy == 0.6


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]     # no temp file left behind


def test_load_results_as_dataframe(tmp_path):
    for seed, acc in [(0, 0.7), (1, 0.9)]:
        cfg = ExperimentConfig(name="c", seed=seed)
        save_run(_result(cfg, acc), cfg.hash(), tmp_path)
    df = load_results(tmp_path)
    assert sorted(df["final_accuracy"]) == [0.7, 0.9] and set(df["seed"]) == {0, 1}
    assert "peft.method" in df.columns and "data.task" in df.columns
    long = load_results(tmp_path, rounds=True)
    assert len(long) == 4 and set(long["round"]) == {1, 2}
    assert json.loads((tmp_path / df["run_key"][0] / "config.json").read_text())["name"] == "c"
