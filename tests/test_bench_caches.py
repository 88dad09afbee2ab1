"""fedbench.bench.caches.PrefixCaches: one cache per data sample, keyed by what it depends on, filled exactly."""
import numpy as np
import torch

from fedbench.bench import PrefixCaches
from fedbench.config import ExperimentConfig, PeftConfig
from fedbench.models import build_model
from fedbench.models.inputs import ActivationCache


def _cfg(seed=0, sub=True, method="lora", depth=1):
    d = {"task": "rt_sentiment", "num_clients": 3, "partition": "iid", "max_length": 16}
    if sub:
        d.update(max_train_samples=24, max_test_samples=12)
    return ExperimentConfig.from_dict({"seed": seed, "data": d, "peft": {"method": method, "depth": depth},
                                       "fl": {"rounds": 1}})


def test_seed_shares_the_cache_only_without_subsampling():
    assert PrefixCaches.sample_key(_cfg(0, sub=False)) == PrefixCaches.sample_key(_cfg(1, sub=False))
    assert PrefixCaches.sample_key(_cfg(0)) != PrefixCaches.sample_key(_cfg(1))
    # the method and depth trained above the prefix do not change what is cached
    assert PrefixCaches.sample_key(_cfg(method="head")) == PrefixCaches.sample_key(_cfg(method="lora", depth=2))


def test_filled_at_the_runs_depth_and_extra_depths_with_one_fill_per_depth_values():
    cfg = _cfg()
    pc = PrefixCaches()
    data = pc.data(cfg)
    assert pc.data(cfg) is data                                  # prepared once
    train, test = pc.get(cfg, data, depths=(3,))
    n = pc.frozen_depth(cfg, data.num_labels)
    assert n == build_model(cfg.model, cfg.peft, data.num_labels, seed=0).num_layers - 1
    assert pc.get(cfg.replace(**{"peft.method": "head", "peft.depth": None}), data)[0] is train   # one cache a sample
    model = build_model(cfg.model, PeftConfig(method="head"), data.num_labels, seed=0)
    for depth in (3, n):
        fresh = ActivationCache(data.train, data.pad_id)
        idx = np.arange(len(data.train))
        fresh.fill(model, idx, depth)
        for i in idx:
            assert torch.equal(fresh._stores[depth][int(i)], train._stores[depth][int(i)])
    assert set(test._stores) >= {3, n} and len(test._stores[n]) == len(data.test_indices)


def test_table_run_store_get_computes_once_and_reloads(tmp_path, monkeypatch):
    """TableRunStore.get: the first call computes, saves and returns what a load gives; the second only loads."""
    import pandas as pd

    from fedbench.bench import TableRunStore
    monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path))
    store, calls = TableRunStore("probe", ("t",)), []

    def compute():
        calls.append(1)
        return {"t": pd.DataFrame({"x": [0.1 + 0.2, 1 / 3]}), "summary": {"n": 2}}
    first = store.get({"k": 1}, compute)
    second = store.get({"k": 1}, compute)
    assert calls == [1]
    assert first["summary"] == second["summary"] == {"n": 2}
    assert first["t"]["x"].tolist() == second["t"]["x"].tolist() == [0.1 + 0.2, 1 / 3]
    assert (tmp_path / "runs" / "probe").is_dir()


def test_runner_runs_a_config_once_through_the_store_and_matches_a_plain_run(tmp_path):
    """bench.Runner: a run not in the store runs once on the provider's data (here the shared PrefixCaches and
    their prefix caches) and gives the same numbers as the loop without caches; the second get loads it."""
    from fedbench.bench import Runner
    from fedbench.fl import prepare_data
    from fedbench.fl.server import run_federated
    cfg = _cfg(method="lora", depth=1).replace(**{"train.local_steps": 1, "data.num_clients": 2})
    calls = []
    runner = Runner(root=tmp_path, reload=True)
    runner.data = lambda c: (calls.append(1), runner.shared.data(c))[1]
    runner.caches = runner.prefix_caches
    first = runner.get(cfg)
    again = runner.get(cfg)
    assert calls == [1]                                          # the second get loads, builds no data
    plain = run_federated(cfg, prepare_data(cfg))
    assert first.summary["final_accuracy"] == again.summary["final_accuracy"] == plain.summary["final_accuracy"]
    assert np.allclose(first.rounds["loss"].to_numpy(float), plain.rounds["loss"].to_numpy(float), atol=1e-6)


def test_write_outputs_writes_tables_figures_protocol_and_the_report(tmp_path):
    """bench.write_outputs: the one writer of an experiment's folder; the report lists what it wrote."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from fedbench.bench import write_outputs
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    claims = pd.DataFrame({"claim": ["a beats b"], "role": ["primary"], "estimate": [0.1], "ci_low": [0.0],
                           "ci_high": [0.2], "n_seeds": [5], "verdict": ["inconclusive"]})
    paths = write_outputs("quickstart", tmp_path, {"summary": pd.DataFrame({"task": ["t"], "method": ["m"],
                                                                            "final_accuracy": [0.5]}),
                                                   "claims": claims},
                          {"curve": fig}, protocol="# title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert sorted(paths) == ["PROTOCOL.md", "REPORT.md", "claims.csv", "curve.png", "summary.csv"]
    report = (tmp_path / "REPORT.md").read_text()
    assert "| 1 | 2 |" in report and "a beats b" in report and "![curve](curve.png)" in report
    assert pd.read_csv(tmp_path / "summary.csv")["final_accuracy"].tolist() == [0.5]


def test_a_validation_carve_has_its_data_and_evaluation_cache_beside_the_shared_training_cache():
    """A config evaluated on a validation carve (the single federation's ``validation`` option) gets
    prepare_validation's data (the test run's training split) and its own evaluation cache; the training cache is
    the sample's, filled once."""
    from fedbench.fl import prepare_validation
    cfg = _cfg()
    val = cfg.replace(**{"data.federation_options.validation": 6})
    pc = PrefixCaches()
    data, vdata = pc.data(cfg), pc.data(val)
    assert vdata.train is data.train and len(vdata.test) == 6
    assert np.array_equal(vdata.test_indices, prepare_validation(cfg, 6).test_indices)
    (vtrain, vtest), (train, test) = pc.get(val, vdata), pc.get(cfg, data)
    assert vtrain is train and vtest is not test and len(vtest._stores[5]) == 6
    assert len(test._stores[5]) == len(data.test_indices)
    assert PrefixCaches.validation_size(val) == 6 and PrefixCaches.validation_size(cfg) is None


def test_runner_get_computes_a_missing_run_with_the_given_compute_once(tmp_path):
    from fedbench.bench import Runner
    from fedbench.fl.server import run_federated
    cfg = _cfg(method="head", depth=None).replace(**{"train.local_steps": 1, "data.num_clients": 2})
    calls = []

    def compute(c, data, caches, ckpt):
        calls.append(c.hash())
        return run_federated(c, data, caches=caches, checkpoint_dir=ckpt)
    runner = Runner(root=tmp_path)
    first = runner.get(cfg, compute=compute)
    assert runner.get(cfg, compute=compute).summary["final_accuracy"] == first.summary["final_accuracy"]
    assert calls == [cfg.hash()] and runner.done(cfg) is not None
