"""What a new user hits first (issue 34): runnable examples, committed outputs never overwritten, every bad input
one line with exit code 2, numbers as ML users write them, corrupt stores named, one run per run directory."""
import fcntl
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

from fedbench.cli import main, results_table
from fedbench.config import ConfigError, ExperimentConfig
from fedbench.results import (CorruptRunError, RunAlreadyRunning, RunResult, cached_run, load_results, load_run,
                              run_dir, run_key, save_run)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "configs" / "examples").glob("*.yaml"))


def one_line_error(capsys, argv, *needles) -> str:
    """main(argv) exits 2 with one line on stderr naming every needle, and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


# -- defect 1: a profile with overrides never writes the committed results/<experiment>/ -----------------------

def test_an_override_or_a_profile_file_of_your_own_writes_its_own_folder(tmp_results, tmp_path):
    from fedbench.bench import output_dir, profile_path
    assert output_dir("quickstart", "quick") == tmp_results / "quickstart"                 # the committed one
    assert output_dir("quickstart", "quick", profile_path("quickstart", "quick")) == tmp_results / "quickstart"
    assert output_dir("quickstart", "quick", overrides={"rounds": None}) == tmp_results / "quickstart"  # unset
    a = output_dir("quickstart", "quick", overrides={"fl.rounds": 1})
    b = output_dir("quickstart", "quick", overrides={"fl.rounds": 2})
    assert a.parent == b.parent == tmp_results / "quickstart" and a != b and a.name.startswith("custom-")
    assert output_dir("quickstart", "quick", overrides={"fl.rounds": 1}) == a                # stable
    assert json.loads((a / "custom.json").read_text())["overrides"] == {"fl.rounds": 1}
    own = tmp_path / "mine.yaml"            # a copy of the quick profile, edited: not the committed profile
    own.write_text(profile_path("quickstart", "quick").read_text().replace("rounds: 10", "rounds: 2"))
    c = output_dir("quickstart", "quick", own)
    assert c.parent == tmp_results / "quickstart" and c.name.startswith("custom-") and c not in (a, b)


# -- defect 8: --results / --force with a profile ---------------------------------------------------------------

def test_force_with_a_profile_is_refused_and_results_is_honoured(tmp_results, tmp_path, capsys):
    one_line_error(capsys, ["run", "configs/quickstart/smoke.yaml", "--force"], "--force")
    assert main(["run", "configs/quickstart/smoke.yaml", "--results", str(tmp_path / "mine"),
                 "--set", "fl.rounds=1"]) == 0
    err = capsys.readouterr().err
    (custom,) = (tmp_path / "mine" / "quickstart" / "smoke").glob("custom-*")
    assert (custom / "rounds.csv").exists() and any((tmp_path / "mine" / "runs").iterdir())
    assert f"outputs in {custom}" in err
    assert not tmp_results.exists()                        # nothing went to the default root
    assert os.environ["FEDBENCH_RESULTS_ROOT"] == str(tmp_results)     # restored for the rest of the process


# -- defect 2: configs/examples, each loadable and the tiny one runnable through the CLI ------------------------

def test_every_example_config_loads_and_checks_against_its_backbone():
    from fedbench.models.checks import check_against_backbone
    assert {p.name for p in EXAMPLES} >= {"tiny.yaml", "dp.yaml", "flower.yaml"}
    for path in EXAMPLES:
        cfg = ExperimentConfig.load(path)
        check_against_backbone(cfg)
    dp = ExperimentConfig.load(ROOT / "configs" / "examples" / "dp.yaml")
    assert dp.train.dp.enabled and dp.train.dp.delta == 1e-5        # written 1e-5 in the file: a number


def test_the_tiny_example_runs_through_the_cli_then_loads_and_lists(tmp_path, capsys):
    tiny = str(ROOT / "configs" / "examples" / "tiny.yaml")
    assert main(["run", tiny, "--results", str(tmp_path)]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["rounds"] == 3 and 0 <= summary["final_accuracy"] <= 1
    assert f"outputs in {tmp_path / summary['run_key']}" in out.err
    assert main(["run", tiny, "--results", str(tmp_path)]) == 0                # second time: from the store
    assert "loaded from the store" in capsys.readouterr().err
    assert main(["results", "--results", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "run_key" in table and summary["run_key"] in table and "config_hash" not in table


def test_readme_and_help_name_only_files_that_exist(capsys):
    import re
    readme = (ROOT / "README.md").read_text()
    assert "my_run.yaml" not in readme and "my_experiment.yaml" not in readme
    with pytest.raises(SystemExit):
        main(["--help"])
    text = readme + capsys.readouterr().out
    for name in set(re.findall(r"fedbench run (configs/\S+\.ya?ml)", text)):
        assert (ROOT / name).exists(), name
    first = readme.index("## ")                   # the first section is the first five minutes
    assert readme[first:].startswith("## First five minutes")
    head = readme[first:readme.index("## ", first + 3)]
    assert "configs/examples/tiny.yaml" in head and "fedbench results" in head and "make setup" in head


def test_every_committed_config_reads_with_the_strict_loader():
    """Duplicate keys (one was a stray uncommented line in configs/lorm/quick.yaml) and empty files fail here."""
    from fedbench.yamlio import read_config_file
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        assert isinstance(read_config_file(path), dict), path


# -- defects 4, 6, 7: one line, exit code 2, before any work ----------------------------------------------------

@pytest.mark.parametrize("name, text, needles", [
    ("bad.yaml", "peft:\n  rank: [1\n", ("bad.yaml", "valid YAML", "line")),
    ("bad.json", '{"peft": {"rank": }', ("bad.json", "valid JSON", "line 1")),
    ("run.txt", "peft: {rank: 4}\n", ("run.txt", ".yaml")),
    ("empty.yaml", "", ("empty.yaml", "non-empty")),
    ("comments.yaml", "# nothing but a comment\n", ("non-empty",)),
    ("dup.yaml", "peft:\n  rank: 4\n  rank: 8\n", ("duplicate key 'rank'", "line 3")),
    ("list.yaml", "- 1\n- 2\n", ("mapping",)),
    ("rank.yaml", "peft: {method: lora, rank: 1000}\n", ("peft.rank", "384")),
    ("keep.yaml", "data: {num_clients: 10}\nfl: {aggregator: multi_krum, clients_per_round: 5, "
                  "multi_krum_keep: 8}\n", ("fl.multi_krum_keep", "5 clients")),
    ("lr.yaml", "train: {lr: fast}\n", ("train.lr", "'fast'")),
])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, name, text, needles):
    path = tmp_path / name
    path.write_text(text)
    one_line_error(capsys, ["run", str(path), "--results", str(tmp_path / "runs")], *needles)
    assert not (tmp_path / "runs").exists()


def test_a_folder_a_missing_file_and_a_bad_results_path_are_one_line(tmp_path, capsys):
    one_line_error(capsys, ["run", str(tmp_path)], "not a folder")
    one_line_error(capsys, ["run", str(tmp_path / "nope.yaml")], "nope.yaml")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("peft: {method: head}\n")
    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, ["run", str(cfg), "--results", str(tmp_path / "afile")], "--results", "is a file")
    one_line_error(capsys, ["run", str(cfg), "--results", str(tmp_path / "afile" / "sub")], "is a file")
    one_line_error(capsys, ["run", "configs/quickstart/smoke.yaml", "--results", str(tmp_path / "afile")],
                   "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_results_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("peft: {method: head}\n")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    one_line_error(capsys, ["run", str(cfg), "--results", str(ro / "runs")], "not writable")


def test_an_offline_hub_task_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))          # an empty cache: the task is not there
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {task: glue/sst2, num_clients: 2}\npeft: {method: head}\nfl: {rounds: 1}\n")
    one_line_error(capsys, ["run", str(cfg), "--results", str(tmp_path / "runs")], "glue/sst2")


def test_numbers_as_ml_users_write_them(tmp_path):
    from fedbench.cli import _parse_sets
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2e-3\n  dp: {enabled: true, noise_multiplier: 1, delta: 1e-5}\n")
    cfg = ExperimentConfig.load(path)
    assert cfg.train.lr == 0.002 and cfg.train.dp.delta == 1e-5
    sets = _parse_sets(["train.dp.delta=1e-5", "train.lr=3E-4", "fl.aggregator=median", "seeds=[0,1]",
                        "name=1e5x"])
    assert sets == {"train.dp.delta": 1e-5, "train.lr": 3e-4, "fl.aggregator": "median", "seeds": [0, 1],
                    "name": "1e5x"}
    assert cfg.replace(**{"train.dp.delta": sets["train.dp.delta"]}).train.dp.delta == 1e-5
    with pytest.raises(ConfigError) as e:
        cfg.replace(**_parse_sets(["train.lr=fast"]))
    assert e.value.field_name == "train.lr"
    import yaml
    assert yaml.safe_load("x: 1e-5") == {"x": "1e-5"}     # PyYAML's own loader is left as it is


def test_profiles_are_read_with_the_same_loader(tmp_path):
    from fedbench.bench import read_profile_file
    p = tmp_path / "p.yaml"
    p.write_text("experiment: quickstart\nbase: {train: {lr: 1e-3}}\nsettings: {}\n")
    assert read_profile_file(p)["base"]["train"]["lr"] == 1e-3
    p.write_text("experiment: quickstart\nbase: {}\nbase: {}\n")
    with pytest.raises(ConfigError, match="duplicate key"):
        read_profile_file(p)


# -- defect 5: corrupt stores are named; fedbench results skips them; one process per run ------------------------

def _result(cfg, acc, rounds=2):
    df = pd.DataFrame({"round": list(range(1, rounds + 1)), "accuracy": [acc] * rounds, "bytes_up": [10] * rounds})
    import numpy as np
    preds = {k: np.arange(5, dtype=np.int64) for k in ("test_index", "label", "prediction")}
    return RunResult(cfg.to_dict(), df, {"final_accuracy": acc, "rounds": rounds}, preds)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["summary.json", "config.json", "rounds.csv", "predictions.safetensors"])
def test_a_truncated_run_file_is_named_and_skipped_by_results(tmp_path, capsys, name):
    good, bad = ExperimentConfig(name="good"), ExperimentConfig(name="bad")
    save_run(_result(good, 0.7), run_key(good), tmp_path)
    d = save_run(_result(bad, 0.8), run_key(bad), tmp_path)
    _truncate(d / name)
    with pytest.raises(CorruptRunError) as e:
        load_run(run_key(bad), tmp_path)
    assert name in str(e.value) and "--force" in str(e.value)
    with pytest.warns(UserWarning, match="corrupt"):
        df = load_results(tmp_path)
    assert list(df["name"]) == ["good"] and [f for f, _ in df.attrs["corrupt"]] == [str(d)]
    assert main(["results", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "good" in out.out and f"skipped a corrupt run: {d / name}" in out.err
    with pytest.raises(CorruptRunError):                               # not served, not silently recomputed
        cached_run(bad, lambda ckpt: _result(bad, 0.9), root=tmp_path)
    assert cached_run(bad, lambda ckpt: _result(bad, 0.9), root=tmp_path, force=True).final_accuracy == 0.9
    assert load_run(run_key(bad), tmp_path).final_accuracy == 0.9


def test_a_truncated_rounds_csv_of_a_run_stored_before_manifests_is_detected(tmp_path):
    cfg = ExperimentConfig(name="old")
    d = save_run(_result(cfg, 0.7, rounds=3), run_key(cfg), tmp_path)
    (d / "manifest.json").unlink()                  # as stored before manifests existed
    assert load_run(run_key(cfg), tmp_path).final_accuracy == 0.7
    text = (d / "rounds.csv").read_text()
    (d / "rounds.csv").write_text(text[: text.rindex("\n", 0, len(text) - 1) + 3])    # the last row cut
    with pytest.raises(CorruptRunError, match="rounds.csv"):
        load_run(run_key(cfg), tmp_path)
    (d / "rounds.csv").write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1])    # the last row gone
    with pytest.raises(CorruptRunError, match="2 rows, summary.json says 3"):
        load_run(run_key(cfg), tmp_path)


def test_a_second_process_on_the_same_run_says_already_running(tmp_path):
    cfg = ExperimentConfig(name="busy")
    d = run_dir(run_key(cfg), tmp_path)
    d.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(d / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        calls = []
        with pytest.raises(RunAlreadyRunning, match="already running"):
            cached_run(cfg, lambda ckpt: calls.append(1), root=tmp_path)
        assert calls == []
    finally:
        holder.kill()
        holder.wait()
    assert cached_run(cfg, lambda ckpt: _result(cfg, 0.5), root=tmp_path).final_accuracy == 0.5   # released
    with open(d / ".lock") as f:                        # and released again after the run
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_truncated_checkpoint_is_named_and_a_resume_says_so(tmp_path, caplog):
    import logging

    from fedbench.fl import prepare_data, run_federated
    cfg = ExperimentConfig.load(ROOT / "configs" / "examples" / "tiny.yaml").replace(
        **{"data.max_train_samples": 64, "data.max_test_samples": 32, "fl.rounds": 2, "train.local_steps": 1})
    data = prepare_data(cfg)
    ckpt = tmp_path / "checkpoint"
    run_federated(cfg, data, checkpoint_dir=ckpt, stop_after=1)
    with caplog.at_level(logging.INFO, logger="fedbench"):
        assert len(run_federated(cfg, data, checkpoint_dir=ckpt).rounds) == 2
    assert "resuming from round 2" in caplog.text
    _truncate(ckpt / "round-0002" / "global.safetensors")
    with pytest.raises(CorruptRunError) as e:
        run_federated(cfg, data, checkpoint_dir=ckpt)
    assert "global.safetensors" in str(e.value) and "--force" in str(e.value)


# -- defect 9: say what happens, quietly --------------------------------------------------------------------------

def test_the_cli_is_offline_unless_told_otherwise(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert main(["list"]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "0"


def test_one_weak_delta_warning_per_run_not_per_client():
    from fedbench.config import DPConfig
    from fedbench.fl import privacy
    for dp in (DPConfig(enabled=True, noise_multiplier=1.0), DPConfig(enabled=True, noise_multiplier=1.0, delta=0.05)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for n in (20, 30, 40):           # three clients of one run, from one call site
                privacy.client_delta(dp, n)
        assert len([w for w in caught if issubclass(w.category, privacy.WeakDeltaWarning)]) == 1


def test_flower_s_info_log_is_hidden_unless_verbose(monkeypatch, capsys, tmp_path):
    pytest.importorskip("flwr")
    from fedbench.engines import flower
    seen = []

    def fake_run_flower(cfg, data=None, progress=False, **options):
        seen.append(options)
        return _result(cfg, 0.5)
    monkeypatch.setattr(flower, "run_flower", fake_run_flower)
    flower_cfg = str(ROOT / "configs" / "examples" / "flower.yaml")
    assert main(["run", flower_cfg, "--engine", "flower", "--results", str(tmp_path / "a")]) == 0
    assert main(["run", flower_cfg, "--engine", "flower", "-v", "--results", str(tmp_path / "b")]) == 0
    assert seen == [{"quiet": True}, {"quiet": False}]


# -- defect 10: fedbench results and fedbench list --------------------------------------------------------------

def test_results_show_what_tells_runs_apart(tmp_path):
    plain = ExperimentConfig(name="r")
    attacked = plain.replace(**{"fl.attack": "sign_flip", "fl.attack_fraction": 0.3})
    private = plain.replace(**{"train.dp.enabled": True, "train.dp.noise_multiplier": 1.0})
    for cfg in (plain, attacked, private):
        save_run(_result(cfg, 0.5), run_key(cfg), tmp_path)
    table = results_table(load_results(tmp_path))
    assert table.columns[0] == "run_key"
    assert {"fl.attack", "fl.attack_fraction", "train.dp.enabled", "train.dp.noise_multiplier"} <= set(table.columns)
    assert len(table.drop(columns=["run_key"]).drop_duplicates()) == 3            # three different rows
    assert "data.max_length" not in table.columns                                  # the same in every run


def test_descriptions_are_whole_first_sentences():
    from fedbench.registry import AGGREGATORS, MERGES, first_sentence
    assert first_sentence("Krum (Blanchard et al. 2017): the closest state. More here.") == \
        "Krum (Blanchard et al. 2017): the closest state"
    assert first_sentence("A rule, e.g. median.\n\nDetails.") == "A rule, e.g. median"
    assert first_sentence("One line\n    wrapped onto two. Second.") == "One line wrapped onto two"
    for name in ("krum", "bulyan", "median", "trimmed_mean"):
        doc = AGGREGATORS.entry(name).doc
        assert not doc.endswith(("et al", "(Yin et al", "(El Mhamdi et al")) and ")" in doc, doc
    assert "  " not in MERGES.entry("fednova").doc                     # wrapped lines joined with one space


# -- defects 3 and 11 ---------------------------------------------------------------------------------------------

def test_make_lab_passes_allow_root_as_root_and_extra_args():
    out = subprocess.run(["make", "-n", "lab", "LAB_ARGS=--no-browser --port 8899"], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout
    line = [ln for ln in out.splitlines() if "jupyter lab" in ln][-1]
    assert "--no-browser --port 8899" in line
    assert ("--allow-root" in line) == (os.geteuid() == 0)


def test_result_files_follow_the_umask(tmp_path):
    from fedbench.atomic import atomic_write_text
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
