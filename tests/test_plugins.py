"""Outside code extends fedbench: a plugin package kept outside the package (tests/plugins/fedbench_extra: RFA,
FedSA-LoRA, SCAFFOLD, a consensus merge) loaded by each mechanism (config key, --plugin, entry point), versioned in
the run key, and run on both engines (in-process and Flower's Message API through LocalGrid) with equal records;
each plugin's math against a direct computation."""
import json
import subprocess
import sys
import textwrap
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedbench import registry
from fedbench.config import ConfigError, ExperimentConfig, config_hash
from fedbench.fl import FederatedRun, prepare_data
from fedbench.models import state_nbytes
from fedbench.registry import AGGREGATORS, MERGES
from fedbench.results import RESULTS_SCHEMA, run_key

PLUGINS_DIR = Path(__file__).parent / "plugins"
ROOT = Path(__file__).parents[1]


def tiny_dict(**fl) -> dict:
    return {"name": "plugins", "seed": 5,
            "data": {"task": "rt_sentiment", "num_clients": 3, "partition": "iid", "max_train_samples": 48,
                     "max_test_samples": 32, "max_length": 16},
            "peft": {"method": "lora", "rank": 2, "depth": 1},
            "train": {"local_steps": 2, "batch_size": 8, "lr": 0.05, "optimizer": "sgd"},
            "fl": {"rounds": 2, "num_malicious": 0, **fl}}


def with_plugin(**fl) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**tiny_dict(**fl), "plugins": ["fedbench_extra"]})


@pytest.fixture(scope="module")
def data():
    return prepare_data(with_plugin())


def write_plugin(folder: Path, body: str) -> tuple[str, str]:
    """A fresh plugin module in `folder` registering an aggregator; returns (module, aggregator name)."""
    name = f"plugin_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(f"""
        from fedbench.merging.aggregators import fedavg
        from fedbench.registry import AGGREGATORS

        @AGGREGATORS.register("{name}_rule", weighted=True, robust=False)
        def rule(states, weights, fl_cfg):
            {body}
            return fedavg(states, weights)
        """))
    return name, f"{name}_rule"


# ---------------------------------------------------------------------------------------------------
# loading: config key, --plugin, entry point
# ---------------------------------------------------------------------------------------------------
def test_the_config_key_imports_plugins_before_names_validate(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    module, rule = write_plugin(tmp_path, "pass")
    d = tiny_dict(aggregator=rule)
    with pytest.raises(ConfigError, match="fl.aggregator"):
        ExperimentConfig.from_dict(d)                      # not loaded: an unknown name
    cfg = ExperimentConfig.from_dict({**d, "plugins": [module]})
    assert cfg.plugins == (module,) and cfg.fl.aggregator == rule
    assert cfg.to_dict()["plugins"] == [module]
    assert ExperimentConfig.from_dict(json.loads(cfg.to_json())) == cfg      # travels with the config
    assert "plugins" not in ExperimentConfig().to_dict()                    # a config without plugins: as before
    with pytest.raises(ConfigError, match=r"plugins.*no_such_plugin_module"):
        ExperimentConfig.from_dict({**tiny_dict(), "plugins": ["no_such_plugin_module"]})
    broken, _ = write_plugin(tmp_path, "pass")
    (tmp_path / f"{broken}.py").write_text("raise RuntimeError('half-written plugin')\n")
    with pytest.raises(ConfigError, match="half-written plugin"):
        ExperimentConfig.from_dict({**tiny_dict(), "plugins": [broken]})
    with pytest.raises(ConfigError, match="plugins"):
        ExperimentConfig.from_dict({**tiny_dict(), "plugins": "fedbench_extra"})   # a string is not a list


def test_a_worker_imports_the_configs_plugins_itself(tmp_path):
    """What a Flower worker does with the config JSON it receives: a fresh process that never imported the plugin
    validates the config (its fl.strategy, fl.aggregator) by importing the config's plugins first."""
    cfg = with_plugin(strategy="scaffold", aggregator="rfa", aggregator_options={"iterations": 4})
    code = ("import json, sys; from fedbench.config import ExperimentConfig; "
            "c = ExperimentConfig.from_dict(json.loads(sys.stdin.read())); print(c.fl.strategy, c.fl.aggregator)")
    env = {"PYTHONPATH": f"{ROOT}:{PLUGINS_DIR}", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], input=cfg.to_json(), capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["scaffold", "rfa"]
    d = json.loads(cfg.to_json())
    d.pop("plugins")                                       # without the list the worker cannot know the names
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(d), capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode != 0 and "fl.strategy" in out.stderr


def test_the_plugin_flag_loads_and_travels_with_the_config(tmp_path, monkeypatch, capsys):
    from fedbench.cli import main
    monkeypatch.syspath_prepend(str(tmp_path))
    module, rule = write_plugin(tmp_path, "pass")
    cfg_path = tmp_path / "run.yaml"
    d = tiny_dict(aggregator=rule, rounds=1)
    import yaml
    cfg_path.write_text(yaml.safe_dump(d))
    assert main(["run", str(cfg_path), "--results", str(tmp_path / "runs")]) == 2       # unknown without it
    assert "fl.aggregator" in capsys.readouterr().err
    assert main(["list", "--plugin", module]) == 0
    assert rule in capsys.readouterr().out
    assert main(["run", str(cfg_path), "--plugin", module, "--results", str(tmp_path / "runs")]) == 0
    out = json.loads(capsys.readouterr().out)
    stored = json.loads((tmp_path / "runs" / out["run_key"] / "config.json").read_text())
    assert stored["plugins"] == [module] and stored["fl"]["aggregator"] == rule
    assert main(["run", str(cfg_path), "--plugin", "no_such_plugin_module"]) == 2
    assert "--plugin" in capsys.readouterr().err


def test_an_entry_point_plugin_loads_when_a_registry_is_first_read(tmp_path, monkeypatch, caplog):
    """A fake installed distribution (a .dist-info folder with entry_points.txt on sys.path), as pip leaves it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    module, rule = write_plugin(tmp_path, "pass")
    dist = tmp_path / "fedbench_fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fedbench-fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fedbench.plugins]\nfake = {module}\nbroken = no_such_module_{module}\n")
    monkeypatch.setattr(registry, "_ENTRY_POINTS", {"loaded": False, "modules": []})
    fresh = registry.Registry("thing", "thing")             # any registry's first read loads the entry points
    assert fresh.names() == []
    assert module in registry.load_entry_point_plugins()
    assert rule in AGGREGATORS
    assert "failed to load" in caplog.text                    # a broken install is logged and skipped
    cfg = ExperimentConfig.from_dict(tiny_dict(aggregator=rule))    # no plugins key: the entry point suffices
    assert cfg.plugins == ()
    # its code still keys the run: the outside module that provides a component the config names
    assert run_key(cfg) != config_hash({"config": cfg.to_dict(), "engine": "inprocess", "schema": RESULTS_SCHEMA})


def test_registry_providers_can_be_added(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    module, rule = write_plugin(tmp_path, "pass")
    reg = registry.Registry("thing", "thing")
    reg.add_provider(module)
    assert module in reg.providers and rule not in AGGREGATORS      # imported when the registry is read
    reg.names()
    assert rule in AGGREGATORS
    later, later_rule = write_plugin(tmp_path, "pass")
    reg.add_provider(later)                                           # already read: imported at once
    assert later_rule in AGGREGATORS


# ---------------------------------------------------------------------------------------------------
# the run key
# ---------------------------------------------------------------------------------------------------
def test_a_plugins_version_enters_the_run_key(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    module, rule = write_plugin(tmp_path, "pass")
    cfg = ExperimentConfig.from_dict({**tiny_dict(aggregator=rule), "plugins": [module]})
    before = run_key(cfg)
    assert before == run_key(ExperimentConfig.from_dict(cfg.to_dict()))
    src = tmp_path / f"{module}.py"
    src.write_text(src.read_text().replace("pass", "x = 1"))     # the plugin's code changed: a new key
    assert run_key(cfg) != before
    # a plugin that sets __version__ is keyed by it
    src.write_text(src.read_text() + "\n__version__ = '1.2'\n")
    sys.modules[module].__version__ = "1.2"
    from fedbench.plugins import plugin_versions
    assert plugin_versions(cfg) == {module: "1.2"}
    # a config without plugins keys exactly as before plugins existed
    plain = ExperimentConfig.from_dict(tiny_dict())
    assert run_key(plain) == config_hash({"config": plain.to_dict(), "engine": "inprocess", "schema": RESULTS_SCHEMA})


# ---------------------------------------------------------------------------------------------------
# options of a component
# ---------------------------------------------------------------------------------------------------
def test_aggregator_and_strategy_options_are_validated_and_hashed():
    cfg = with_plugin(aggregator="rfa")
    assert cfg.fl.aggregator_options == {"iterations": 3, "eps": 1e-6}
    assert with_plugin(aggregator="rfa", aggregator_options={"iterations": 3}).hash() == cfg.hash()
    assert with_plugin(aggregator="rfa", aggregator_options={"iterations": 7}).hash() != cfg.hash()
    with pytest.raises(ConfigError, match="fl.aggregator_options.iterations"):
        with_plugin(aggregator="rfa", aggregator_options={"iterations": 0})
    with pytest.raises(ConfigError, match="fl.aggregator_options.eps"):
        with_plugin(aggregator="rfa", aggregator_options={"eps": -1})
    with pytest.raises(ConfigError, match="fl.aggregator_options.itrations"):
        with_plugin(aggregator="rfa", aggregator_options={"itrations": 3})
    assert with_plugin(strategy="scaffold").fl.options == {"server_lr": 1.0}
    with pytest.raises(ConfigError, match="fl.options.server_lr"):
        with_plugin(strategy="scaffold", options={"server_lr": 0})
    with pytest.raises(ConfigError, match="train.optimizer"):
        ExperimentConfig.from_dict({**tiny_dict(strategy="scaffold"), "plugins": ["fedbench_extra"],
                                    "train": {"optimizer": "adamw"}})
    with pytest.raises(ConfigError, match="train.dp.enabled"):
        with_plugin(strategy="scaffold").replace(**{"train.dp": {"enabled": True, "noise_multiplier": 1.0}})


def test_the_rule_gets_its_typed_options(data):
    cfg = with_plugin(aggregator="rfa", aggregator_options={"iterations": 1})
    run = FederatedRun(cfg, data)
    assert run.strategy.rule.keywords["options"].iterations == 1
    assert FederatedRun(with_plugin(), data).strategy.rule is AGGREGATORS.get("fedavg")   # no options: unchanged


# ---------------------------------------------------------------------------------------------------
# both engines
# ---------------------------------------------------------------------------------------------------
SHARED = ["round", "clients_sampled", "clients_dropped", "clients_rejected", "bytes_up", "bytes_down",
          "cumulative_bytes", "train_loss", "local_steps", "accuracy", "loss"]


def in_process(cfg, data) -> FederatedRun:
    run = FederatedRun(cfg, data)
    for r in range(1, cfg.fl.rounds + 1):
        run.run_round(r)
    return run


@pytest.mark.parametrize("fl", [
    {"aggregator": "rfa", "aggregator_options": {"iterations": 4}},
    {"strategy": "fedsa_lora"},
    {"strategy": "scaffold", "options": {"server_lr": 0.8}, "clients_per_round": 2},
], ids=["rfa", "fedsa_lora", "scaffold"])
def test_the_plugin_runs_on_both_engines_with_equal_records(fl, data):
    pytest.importorskip("flwr")
    from test_flower import LocalGrid

    from fedbench.engines import flower as fl_engine
    cfg = with_plugin(**fl)
    ref = in_process(cfg, data)
    fl_engine.client_runtime(cfg, data)
    grid = LocalGrid(cfg.data.num_clients)
    run = fl_engine.server_main(grid, cfg, data=data)
    pd.testing.assert_frame_equal(pd.DataFrame(run.records)[SHARED], pd.DataFrame(ref.records)[SHARED],
                                  check_exact=False, rtol=1e-5, atol=1e-6)
    for k, v in ref.global_model.state.items():
        torch.testing.assert_close(run.global_model.state[k], v, rtol=0, atol=1e-6)
    rounds = pd.DataFrame(run.records)
    assert (rounds["wire_bytes_down"] >= rounds["bytes_down"]).all()
    if fl.get("strategy") == "scaffold":              # the server's control variate agrees too
        for k, v in ref.strategy.c.items():
            torch.testing.assert_close(run.strategy.c[k], v, rtol=0, atol=1e-6)
    fl_engine._RUNTIME.clear()


# ---------------------------------------------------------------------------------------------------
# each plugin's math
# ---------------------------------------------------------------------------------------------------
def direct_weiszfeld(points: np.ndarray, alpha: np.ndarray, iterations: int, eps: float) -> np.ndarray:
    alpha = alpha / alpha.sum()
    v = (alpha[:, None] * points).sum(0)
    for _ in range(iterations):
        beta = np.array([a / max(eps, np.sqrt(((v - p) ** 2).sum())) for a, p in zip(alpha, points)])
        v = (beta[:, None] * points).sum(0) / beta.sum()
    return v


def test_rfa_is_weiszfelds_geometric_median():
    from fedbench_extra import rfa
    g = torch.Generator().manual_seed(0)
    states = [OrderedDict(w=torch.randn(3, 4, generator=g), b=torch.randn(5, generator=g)) for _ in range(6)]
    states[5] = OrderedDict(w=states[5]["w"] + 100.0, b=states[5]["b"] - 100.0)       # one far outlier
    weights = [3, 1, 2, 2, 1, 4]
    points = np.stack([np.concatenate([s["w"].numpy().ravel(), s["b"].numpy().ravel()]) for s in states]).astype(float)
    for iters in (1, 3, 50):
        got = rfa.geometric_median(states, weights, iters, 1e-6)
        want = direct_weiszfeld(points, np.array(weights, float), iters, 1e-6)
        np.testing.assert_allclose(np.concatenate([got["w"].numpy().ravel(), got["b"].numpy().ravel()]), want,
                                   rtol=1e-5, atol=1e-5)
    # converged: the weighted sum of unit vectors towards the points vanishes (the median's optimality condition)
    v = want
    alpha = np.array(weights, float) / sum(weights)
    grad = sum(a * (v - p) / np.linalg.norm(v - p) for a, p in zip(alpha, points))
    assert np.linalg.norm(grad) < 1e-3
    assert np.linalg.norm(v - points[:5].mean(0)) < 2.0        # the outlier (distance ~1000) barely moves it
    cfg = with_plugin(aggregator="rfa", aggregator_options={"iterations": 3})
    rule = AGGREGATORS.get("rfa")
    out = rule(states, weights, cfg.fl, options=rfa.RFAOptions(iterations=3))
    torch.testing.assert_close(out["w"], rfa.geometric_median(states, weights, 3, 1e-6)["w"])


def test_consensus_merge_against_a_direct_computation():
    import fedbench_extra.consensus  # noqa: F401
    merge = MERGES.get("consensus")
    g = torch.Generator().manual_seed(1)
    tvs = [OrderedDict(a=torch.randn(4, 3, generator=g), b=torch.randn(6, generator=g)) for _ in range(4)]
    got = merge(tvs, k=2, tall_lambda=0.4, lam=0.5)
    flat = np.stack([np.concatenate([t["a"].numpy().ravel(), t["b"].numpy().ravel()]) for t in tvs]).astype(float)
    want = np.zeros(flat.shape[1])
    for j in range(flat.shape[1]):
        mtl = flat[:, j].sum()
        votes = sum(abs(flat[t, j]) >= 0.4 * abs(mtl - flat[t, j]) for t in range(len(tvs)))
        want[j] = 0.5 * mtl if votes >= 2 else 0.0
    np.testing.assert_allclose(np.concatenate([got["a"].numpy().ravel(), got["b"].numpy().ravel()]), want, rtol=1e-6,
                               atol=1e-7)
    assert 0 < (want == 0).sum() < len(want)              # the mask keeps some weights and drops others
    with pytest.raises(ConfigError, match="k"):
        merge(tvs, k=5)


def test_scaffold_correction_and_control_variates_follow_the_formulas(data, monkeypatch):
    """y_K = x - lr sum_k (g_k + c - c_i) step by step, c_i+ = c_i - c + (x - y_K) / (K lr) (= the mean task
    gradient), the update sends delta c_i, and the server's c moves by sum delta c_i / N."""
    from fedbench_extra import scaffold
    cfg = with_plugin(strategy="scaffold", options={"server_lr": 0.5})
    run = FederatedRun(cfg, data)
    strat = run.strategy
    g = torch.Generator().manual_seed(3)
    strat.c = OrderedDict((k, 0.1 * torch.randn(v.shape, generator=g)) for k, v in strat.c.items())
    client = 1
    c_i = OrderedDict((k, 0.1 * torch.randn(v.shape, generator=g)) for k, v in strat.c.items())
    run.store[client][scaffold.STORE_KEY] = OrderedDict(c_i)
    task_grads = []

    class Recording(scaffold.ControlVariateCorrection):
        def grad(self, model):
            task_grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
            super().grad(model)

    monkeypatch.setattr(scaffold.Scaffold, "training_hook",
                        lambda self, run_, ins, store: Recording(ins.extras, self.client_control(ins, store)))
    (ins,) = strat.configure_round(1, [client], run.global_model)
    assert ins.down_bytes == 2 * state_nbytes(run.global_model.state)        # the state and c travel down
    x = OrderedDict((k, v.clone()) for k, v in ins.state.items())
    u = run.client_update(client, 1, ins)
    K, lr = u.num_steps, cfg.train.lr
    assert K == cfg.train.local_steps == len(task_grads)
    for k in x:
        expected_y = x[k] - lr * sum(gr[k] for gr in task_grads) - K * lr * (strat.c[k] - c_i[k])
        torch.testing.assert_close(u.state[k], expected_y, rtol=1e-4, atol=1e-6)
        c_new = c_i[k] - strat.c[k] + (x[k] - u.state[k]) / (K * lr)
        torch.testing.assert_close(run.store[client][scaffold.STORE_KEY][k], c_new)
        torch.testing.assert_close(c_new, sum(gr[k] for gr in task_grads) / K, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(u.extras[k], c_new - c_i[k])
    c_before, gm = OrderedDict(strat.c), run.global_model
    new = strat.aggregate(gm, [u], 1)
    for k in x:
        torch.testing.assert_close(strat.c[k], c_before[k] + u.extras[k] / cfg.data.num_clients)
        torch.testing.assert_close(new.state[k], gm.state[k] + 0.5 * (u.state[k] - gm.state[k]))


def test_a_training_hook_does_not_run_under_dp(data):
    from fedbench.fl.client import TrainingHook, train_client
    cfg = ExperimentConfig.from_dict(tiny_dict()).replace(**{"train.dp": {"enabled": True, "noise_multiplier": 1.0}})
    run = FederatedRun(ExperimentConfig.from_dict(tiny_dict()), data)
    with pytest.raises(ValueError, match="DP-SGD"):
        train_client(run.model, run.global_model.state, data.train, data.client_indices[0], cfg.train, seed=0,
                     hook=TrainingHook())


def test_fedsa_lora_keeps_b_on_the_client_and_averages_a(data):
    cfg = with_plugin(strategy="fedsa_lora")
    run = FederatedRun(cfg, data)
    strat = run.strategy
    b_keys = set(strat.initial_b)
    plan = run.select_clients(1)
    instructions = run.configure(plan)
    assert all(not (set(i.state) & b_keys) for i in instructions.values())           # B never travels down
    updates = [run.client_update(c, 1, instructions[c]) for c in plan.reporting]
    assert all(not (set(u.state) & b_keys) for u in updates)                          # nor up
    for c in plan.reporting:                                                           # each client's own B
        kept = run.store[c]["fedsa_b"]
        assert set(kept) == b_keys and any(not torch.equal(kept[k], strat.initial_b[k]) for k in b_keys)
    before = run.global_model
    run.finish_round(plan, updates, 0.0, instructions=instructions)
    weights = np.array([u.num_samples for u in updates], float)
    for m in strat.lora.modules:
        avg = sum(w * u.state[m.a_key].double() for w, u in zip(weights / weights.sum(), updates))
        torch.testing.assert_close(run.global_model.state[m.a_key], avg.float())
        assert torch.equal(run.global_model.state[m.b_key], before.state[m.b_key])


def test_a_personalised_strategy_is_scored_by_its_clients_on_both_engines(data):
    """FedSA-LoRA's record is the mean over clients of each client's score with its own B: computed from the stores
    in-process, and on Flower by every client's node (evaluate messages), where its store is."""
    pytest.importorskip("flwr")
    from test_flower import LocalGrid

    from fedbench.engines import flower as fl_engine
    from fedbench.fl.strategy import GlobalModel
    cfg = with_plugin(strategy="fedsa_lora", rounds=1)
    ref = in_process(cfg, data)
    strat, gm = ref.strategy, ref.global_model
    direct = []
    for c in range(cfg.data.num_clients):
        own = ref.store[c].get("fedsa_b") or strat.initial_b
        state = OrderedDict((k, own[k] if k in own else v) for k, v in gm.state.items())
        direct.append(ref.evaluate_model(GlobalModel(state, gm.base_delta)))
    assert ref.records[-1]["accuracy"] == pytest.approx(np.mean([d["accuracy"] for d in direct]))
    assert ref.records[-1]["loss"] == pytest.approx(np.mean([d["loss"] for d in direct]))
    assert ref.records[-1]["loss"] != pytest.approx(ref.evaluate_model(gm)["loss"])    # not the global model's
    fl_engine.client_runtime(cfg, data)
    grid = LocalGrid(cfg.data.num_clients)
    run = fl_engine.server_main(grid, cfg, data=data)
    assert grid.sent.count("evaluate") == cfg.data.num_clients * cfg.fl.rounds
    assert run.records[-1]["accuracy"] == pytest.approx(ref.records[-1]["accuracy"])
    assert run.records[-1]["loss"] == pytest.approx(ref.records[-1]["loss"], rel=1e-5)
    fl_engine._RUNTIME.clear()


def test_flowers_run_config_takes_plugins(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    from fedbench.engines.flower import config_from_run_config
    monkeypatch.syspath_prepend(str(tmp_path))
    module, rule = write_plugin(tmp_path, "pass")
    cfg = config_from_run_config({"plugins": f"fedbench_extra, {module}", "fl.aggregator": rule})
    assert cfg.plugins == ("fedbench_extra", module) and cfg.fl.aggregator == rule
    with pytest.raises(ConfigError, match="plugins"):
        config_from_run_config({"plugins": "no_such_plugin_module"})


@pytest.mark.parametrize("strategy", ["scaffold", "fedsa_lora"])
def test_a_plugin_strategy_resumes_bit_identically(strategy, data, tmp_path):
    """The server's control variate (SCAFFOLD's state_dict) and the clients' private tensors (their stores) survive
    a checkpoint: round 2 after a restore equals round 2 of an uninterrupted run."""
    cfg = with_plugin(strategy=strategy)
    straight = in_process(cfg, data)
    first = FederatedRun(cfg, data)
    first.run_round(1)
    first.save_checkpoint(tmp_path)
    resumed = FederatedRun(cfg, data)
    assert resumed.restore_checkpoint(tmp_path) == 1
    resumed.run_round(2)
    for k, v in straight.global_model.state.items():
        assert torch.equal(resumed.global_model.state[k], v), k
    pd.testing.assert_frame_equal(pd.DataFrame(resumed.records).drop(columns="wall_s"),
                                  pd.DataFrame(straight.records).drop(columns="wall_s"))
    if strategy == "scaffold":
        assert all(torch.equal(resumed.strategy.c[k], v) for k, v in straight.strategy.c.items())
