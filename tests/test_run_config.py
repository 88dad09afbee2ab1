"""A run is its config: strategy options are typed, validated and hashed; experiments drive the loop through
its API, never by writing to its fields."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedbench.config import ExperimentConfig
from fedbench.errors import ConfigError
from fedbench.registry import AGGREGATORS, STRATEGIES

ROOT = Path(__file__).resolve().parents[1]


def cfg(**fl) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"data": {"task": "rt_sentiment", "num_clients": 2, "partition": "iid",
                                                "max_train_samples": 16, "max_test_samples": 8, "max_length": 16},
                                       "peft": {"method": "lora", "rank": 2},
                                       "train": {"local_steps": 1, "batch_size": 4},
                                       "fl": {"rounds": 1, **fl}})


def test_options_are_normalised_so_a_default_written_out_keys_the_same_run():
    implicit = cfg(strategy="lorm", lora_aggregation="factors")
    explicit = cfg(strategy="lorm", lora_aggregation="factors", options={"ridge": 1e-4, "merge_check": False})
    assert implicit.fl.options == {"ridge": 1e-4, "cross_task": "gram", "score_running_mean": False,
                                   "merge_check": False, "solve": "closed_form"}
    assert implicit.hash() == explicit.hash()
    changed = cfg(strategy="lorm", options={"ridge": 1e-3})
    assert changed.hash() != implicit.hash()


def test_options_round_trip_through_yaml_and_json(tmp_path):
    c = cfg(strategy="task_clients", options={"client_steps": [3, None], "client_lrs": None})
    for name in ("run.yaml", "run.json"):
        c.save(tmp_path / name)
        back = ExperimentConfig.load(tmp_path / name)
        assert back.hash() == c.hash() and back.fl.options == c.fl.options


@pytest.mark.parametrize("fl, field", [
    ({"strategy": "lorm", "options": {"ridg": 1.0}}, "fl.options.ridg"),
    ({"strategy": "lorm", "options": {"ridge": -1.0}}, "fl.options.ridge"),
    ({"strategy": "lorm", "options": {"merge_check": "yes"}}, "fl.options.merge_check"),
    ({"strategy": "fedavg", "options": {"ridge": 1.0}}, "fl.options"),
    ({"strategy": "fl_tac", "lora_aggregation": "factors", "options": {"k": 0}}, "fl.options.k"),
    ({"strategy": "fl_tac", "options": {"cluster_on": "both"}}, "fl.options.cluster_on"),
    ({"strategy": "task_clients", "options": {"client_steps": [1]}}, "fl.options.client_steps"),
    ({"strategy": "task_clients", "options": {"client_lrs": [0.1, -1]}}, "fl.options.client_lrs"),
    ({"aggregator": "fedavg", "aggregator_options": {"iterations": 3}}, "fl.aggregator_options"),
    ({"strategy": "fedavg", "options": [1]}, "fl.options"),
])
def test_a_bad_option_names_its_field(fl, field):
    with pytest.raises(ConfigError) as e:
        cfg(**fl)
    assert e.value.field_name == field


def test_every_options_class_is_a_frozen_dataclass_with_defaults_that_validate():
    from fedbench.options import Options
    for registry in (STRATEGIES, AGGREGATORS):
        for entry in registry:
            cls = entry.facts.get("options")
            if cls is None:
                continue
            assert issubclass(cls, Options), entry.name
            defaults = cls.from_dict({}, "fl.options")
            assert cls.from_dict(defaults.to_dict(), "fl.options") == defaults


def test_the_strategy_reads_its_typed_options():
    from fedbench.fl import FederatedRun
    run = FederatedRun(cfg(strategy="lorm", options={"ridge": 0.5}))
    assert run.strategy.options.ridge == 0.5 and run.strategy.options.merge_check is False
    assert FederatedRun(cfg()).strategy.options is None           # fedavg takes none


def test_a_derived_run_shares_data_and_model_and_refuses_other_data():
    from fedbench.fl import FederatedRun
    run = FederatedRun(cfg(strategy="task_clients"))
    other = run.derive(run.cfg.replace(**{"train.lr": 0.1, "fl.options.client_steps": [2, 1]}), run.global_model)
    assert other.model is run.model and other.data is run.data and other.cfg.train.lr == 0.1
    assert other.strategy is not run.strategy and other.strategy.options.client_steps == (2, 1)
    assert other.records == [] and run.cfg.train.lr != 0.1
    with pytest.raises(ConfigError) as e:
        run.derive(run.cfg.replace(**{"data.max_length": 12}), run.global_model)
    assert e.value.field_name == "data"


def test_replay_evaluates_held_global_models_and_keeps_the_training_records():
    from fedbench.fl import FederatedRun
    from fedbench.fl.server import run_federated
    c = cfg(rounds=2, eval_every=2)
    snapshots, last = {}, []

    def keep(run, r):
        last[:] = [run]
        snapshots[r] = run.global_model

    trained = run_federated(c, after_round=keep)
    replayed = FederatedRun(c.replace(**{"fl.eval_every": 1})).replay(last[0].hold(snapshots))
    assert len(replayed.rounds) == 2 and replayed.rounds["accuracy"].notna().all()
    assert replayed.rounds["accuracy"].iloc[-1] == trained.rounds["accuracy"].iloc[-1]
    assert replayed.rounds["bytes_up"].tolist() == trained.rounds["bytes_up"].tolist()


def test_the_loop_calls_the_strategy_hooks_without_probing_for_them():
    """Optional hooks are declared on the base strategy with no-op defaults; the loop never asks hasattr."""
    from fedbench.fl.strategy import FedAvg
    for hook in ("attach", "round_record", "result_extras", "finished", "reference", "local_indices"):
        assert callable(getattr(FedAvg, hook)), hook
    src = (ROOT / "fedbench" / "fl" / "server.py").read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
            assert "strategy" not in ast.unparse(node), ast.unparse(node)


LOOP_FIELDS = ("cfg", "global_model", "records", "store", "rejections", "cumulative_bytes", "final_predictions",
               "model", "data", "strategy")


def _assigned_attributes(target) -> list[str]:
    """Dotted names written by an assignment target (tuples unpacked)."""
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for t in target.elts for n in _assigned_attributes(t)]
    return [ast.unparse(target)] if isinstance(target, ast.Attribute) else []


def test_no_experiment_writes_to_the_loops_internals():
    """Experiments drive the loop through its API (derive, restart, replay, run_round): no statement under
    fedbench/experiments/ assigns to a run's strategy, config, global model or records."""
    offenders = []
    for path in sorted((ROOT / "fedbench" / "experiments").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                for name in _assigned_attributes(t):
                    parts = name.split(".")
                    # x.run.<field> / run.<field> / run.strategy.<anything>
                    for i, p in enumerate(parts[:-1]):
                        if p == "run" and (parts[i + 1] in LOOP_FIELDS):
                            offenders.append(f"{path.name}:{node.lineno}: {name}")
    assert offenders == []


def test_changing_the_strategy_starts_it_from_its_default_options():
    lorm = cfg(strategy="lorm", options={"ridge": 0.5})
    plain = lorm.replace(**{"fl.strategy": "fedavg"})
    assert plain.fl.options == {}
    back = plain.replace(**{"fl.strategy": "lorm"})
    assert back.fl.options["ridge"] == 1e-4
    assert lorm.replace(**{"fl.strategy": "regmean", "fl.lora_aggregation": "svd",
                           "fl.options.ridge": 0.5}).fl.options == {"ridge": 0.5, "cross_task": "gram",
                                                                    "score_running_mean": False}
    assert lorm.replace(**{"fl.rounds": 2}).fl.options["ridge"] == 0.5      # other changes keep them


def test_export_writes_one_paper_run_as_a_config_that_loads(tmp_path, capsys):
    from fedbench.cli import main
    assert main(["export", "configs/lorm/smoke.yaml", "--method", "fedit", "--seed", "1", "--lr", "0.003"]) == 0
    path = tmp_path / "run.yaml"
    path.write_text(capsys.readouterr().out)
    cfg = ExperimentConfig.load(path)
    from fedbench.experiments import lorm
    s, base = lorm.settings_for("smoke")
    assert cfg.hash() == lorm.run_config(s, base, "fedit", 1, 0.003).hash()
    assert cfg.data.federation == "task_sequence" and cfg.seed == 1
    assert main(["export", "configs/lorm/smoke.yaml", "--method", "joint", "--lr", "0.003"]) == 2
    assert "--method" in capsys.readouterr().err
    assert main(["export", "configs/robustness/smoke.yaml"]) == 2


def test_a_report_is_generated_from_an_experiments_outputs(tmp_path):
    """REPORT.md holds the protocol, the headline table (means over seeds), the claims and every figure of the
    folder, all read from the files beside it."""
    import pandas as pd

    from fedbench.bench.report import write_report
    pd.DataFrame({"method": ["lorm", "lorm", "fedit", "fedit"], "seed": [0, 1, 0, 1],
                  "final_avg_accuracy": [0.2, 0.4, 0.5, 0.7], "forgetting": [0.1, 0.1, 0.2, 0.2]}
                 ).to_csv(tmp_path / "summary.csv", index=False)
    pd.DataFrame({"claim": ["LoRM beats FedIT"], "estimate": [-0.3], "ci_low": [-0.5], "ci_high": [-0.1],
                  "n_seeds": [2], "verdict": ["2 seeds"]}).to_csv(tmp_path / "claims.csv", index=False)
    (tmp_path / "PROTOCOL.md").write_text("# LoRM: protocol\n\n| aspect | paper |\n|---|---|\n| rounds | 5 |\n")
    (tmp_path / "a.png").write_bytes(b"")
    text = write_report("lorm", tmp_path).read_text()
    assert text.startswith("# lorm:") and "| rounds | 5 |" in text and "# LoRM: protocol" not in text
    assert "| lorm | 0.300 | 0.100 | 2 |" in text and "| fedit | 0.600 | 0.200 | 2 |" in text
    assert "| LoRM beats FedIT | -0.300 | -0.500 | -0.100 | 2 | 2 seeds |" in text and "![a](a.png)" in text
