import json

from fedbench.cli import main
from fedbench.config import DataConfig, ExperimentConfig, FLConfig, PeftConfig, TrainConfig
from fedbench.results import run_key


def test_tasks_lists_every_task(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ["ng20", "rt_sentiment", "wordnet_noun", "fashion_mnist", "glue/sst2", "cifar100"]:
        assert name in out


def test_run_a_yaml_config_then_load_it(tmp_path, capsys):
    cfg = ExperimentConfig(name="cli", data=DataConfig(num_clients=2, max_train_samples=32, max_test_samples=32,
                                                       max_length=24),
                           peft=PeftConfig(method="head"), train=TrainConfig(local_steps=1, batch_size=16),
                           fl=FLConfig(rounds=1))
    path = tmp_path / "c.yaml"
    cfg.save(path)
    root = tmp_path / "runs"
    assert main(["run", str(path), "--results", str(root)]) == 0
    assert (root / run_key(cfg) / "summary.json").exists()
    assert main(["run", str(path), "--results", str(root), "--set", "seed=1"]) == 0
    assert (root / run_key(cfg.replace(seed=1)) / "summary.json").exists()
    assert main(["results", "--results", str(root)]) == 0
    assert "cli" in capsys.readouterr().out


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("peft:\n  rank: 0\n")
    assert main(["run", str(path)]) == 2
    assert "peft.rank" in capsys.readouterr().err
