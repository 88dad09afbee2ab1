"""Task arithmetic = one-shot FedAvg on the shared loop: settings, scale matching, the equivalence, determinism."""
import numpy as np
import pandas as pd
import pytest
import torch

from fedbench import merging
from fedbench.config import ConfigError
from fedbench.experiments import task_arithmetic as ta


@pytest.mark.parametrize("override, field", [
    (dict(tasks=("rt_sentiment",)), "tasks"),
    (dict(tasks=("rt_sentiment", "no_such_task")), "tasks"),
    (dict(hetero_steps=(1.0, 2.0)), "hetero_steps"),
    (dict(rounds=(1, 500)), "rounds"),
    (dict(gma_rhos=(1.5,)), "gma_rhos"),
    (dict(lambdas=(-0.5,)), "lambdas"),
    (dict(methods=("task_arithmetic", "krum")), "methods"),
    (dict(tunings=("adapter",)), "tunings"),
    (dict(seeds=(0, 0)), "seeds"),
    (dict(no_such_parameter=1), "no_such_parameter"),
    ({"peft.depth": 99}, "peft.depth"),
])
def test_bad_settings_name_the_parameter(override, field):
    with pytest.raises(ConfigError) as e:
        ta.settings_for("smoke", **override)
    assert e.value.field_name == field


def test_profiles_resolve_with_a_base_and_meet_the_protocol():
    r = ta.settings_for("smoke", seeds=[3], **{"train.local_steps": 6})
    assert r.settings.seeds == (3,) and r.base.train.local_steps == 6
    q = ta.settings_for("quick")
    assert len(q["tasks"]) >= 6 and len(q["seeds"]) >= 3 and q.base.peft.depth is None
    assert min(q["lambdas"]) <= 0.05 + 1e-12 and max(q["lambdas"]) >= 2.0
    f = ta.settings_for("full")
    assert f["val_samples"] >= 200 and list(f["gma_rhos"]) == pytest.approx(list(np.arange(0.1, 1.0, 0.1)))
    cfg = ta.run_config(q.base, q.settings, "lora", 0)
    assert cfg.fl.strategy == "task_clients" and cfg.data.num_clients == len(q["tasks"]) and not cfg.peft.train_head


def test_grid_includes_one_over_T_and_is_scale_matched():
    s = ta.settings_for("smoke").settings
    for T in (2, 3, 6):
        assert 1.0 / T in ta.per_task_grid(s, T)
    g = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(4, 5, generator=g)} for _ in range(3)]
    w = 0.4
    ta_v = ta.merge("task_arithmetic", tvs, w, float("nan"), [5, 5, 5], 0)
    nova = ta.merge("fednova", tvs, w, float("nan"), [5, 5, 5], 0)
    # the same per-task weight: FedNova with equal steps is task arithmetic at the same grid point
    torch.testing.assert_close(nova["w"], ta_v["w"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ta_v["w"], w * sum(t["w"] for t in tvs), rtol=1e-6, atol=1e-7)
    # mean-scale merges at w = 1/T are the plain merge
    med = ta.merge("median", tvs, 1 / 3, float("nan"), [5, 5, 5], 0)
    torch.testing.assert_close(med["w"], merging.median(tvs, 1.0)["w"])
    # CCLIP's rho grid is the official linspace(min norm, max norm, n, endpoint=False)
    norms = [merging.norm(t) for t in tvs]
    assert ta.rho_grid("cclip", s, tvs) == pytest.approx(list(np.linspace(min(norms), max(norms), s.cclip_rhos,
                                                                          endpoint=False)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import os
    root = tmp_path_factory.mktemp("ta")
    old = os.environ.get("FEDBENCH_RESULTS_ROOT")
    os.environ["FEDBENCH_RESULTS_ROOT"] = str(root / "a")
    try:
        res = ta.run("smoke", verbose=False)
        stored = {p: p.stat().st_mtime_ns for p in (root / "a" / "runs").rglob("*") if p.is_file()}
        again = ta.run("smoke", verbose=False)                                             # cached rerun
        restored = {p: p.stat().st_mtime_ns for p in (root / "a" / "runs").rglob("*") if p.is_file()}
        assert stored and restored == stored, "a rerun must load every unit, not recompute it"
        os.environ["FEDBENCH_RESULTS_ROOT"] = str(root / "b")
        cold = ta.run("smoke", verbose=False)                                              # from scratch
    finally:
        if old is None:
            os.environ.pop("FEDBENCH_RESULTS_ROOT", None)
        else:
            os.environ["FEDBENCH_RESULTS_ROOT"] = old
    return res, again, cold, root


@pytest.mark.slow
def test_equivalence_holds_on_the_loop(smoke):
    res = smoke[0]
    eq = res.equivalence
    assert len(eq) == len(res.settings["tasks"])
    assert (eq["max_abs_param_diff"] <= 1e-6).all() and eq["same_accuracy"].all()
    assert (eq["prediction_mismatches"] == 0).all()
    assert (eq["fedit_rel_delta_diff"] > 1e-3).all()          # FedIT's factor average is another model
    claim = res.claims[res.claims["claim"].str.startswith("Task arithmetic with lambda = 1/T")]
    assert list(claim["verdict"]) == ["agrees"]


@pytest.mark.slow
def test_summary_has_every_merge_tuned_and_one_over_T(smoke):
    res = smoke[0]
    s, summ = res.settings, res.summary
    T = len(s["tasks"])
    assert list(summ.columns) == ta.SUMMARY_COLUMNS
    homo = summ[summ["setting"] == "homogeneous"]
    for m in ta.MERGE_METHODS:
        assert set(homo[homo["method"] == m]["variant"]) == {"tuned", "1/T"}, m
        assert (homo[(homo["method"] == m) & (homo["variant"] == "1/T")]["lambda"] == 1.0 / T).all()
        assert homo[homo["method"] == m]["lambda"].isin(ta.per_task_grid(s.settings, T)).all()
    # plain one-shot FedAvg (the loop's round) = task arithmetic at 1/T
    fa = homo[homo["method"] == "fedavg"].set_index("task")["accuracy"]
    t1 = homo[(homo["method"] == "task_arithmetic") & (homo["variant"] == "1/T")].set_index("task")["accuracy"]
    pd.testing.assert_series_equal(fa.sort_index(), t1.sort_index(), check_names=False)
    # normalised accuracy: probe 0, individual 1
    assert (homo[homo["method"] == "probe"]["normalized_accuracy"].fillna(0) == 0).all()
    ind = homo[homo["method"] == "individual"]
    assert (ind["normalized_accuracy"].dropna() == 1.0).all() and (ind["accuracy_ratio"] == 1.0).all()
    # heterogeneous rows are normalised by the homogeneous individual models
    het = summ[summ["setting"] == "hetero_training"]
    ind_h = ind.set_index("task")["accuracy"]
    np.testing.assert_allclose(het["accuracy_ratio"], het["accuracy"] / het["task"].map(ind_h))
    assert summ["setting"].str.startswith("pair:").sum() == T * (T - 1) // 2 * 2
    assert {f"rounds:{R}" for R in s["rounds"] if R > 1} <= set(summ["setting"])
    c = res.cosine.pivot_table(index="task_a", columns="task_b", values="cosine")
    np.testing.assert_allclose(c.values, c.values.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(c.values), 1.0, atol=1e-9)
    for name in ("summary.csv", "equivalence.csv", "claims.csv", "PROTOCOL.md", "cosine_similarity.png",
                 "normalized_accuracy_homogeneous.png", "accuracy_vs_rounds.png"):
        assert (res.out_dir / name).exists(), name
    assert {"aspect", "paper", "official code", "ours", "why"} == set(res.protocol.columns)


@pytest.mark.slow
def test_rerun_and_cold_rerun_give_identical_tables(smoke):
    res, again, cold, root = smoke
    for name in ("summary.csv", "table.csv", "equivalence.csv", "pairs.csv", "rounds.csv", "validation.csv",
                 "finetune.csv", "claims.csv", "PROTOCOL.md"):
        a = (root / "a" / "task_arithmetic" / "smoke" / name).read_text()
        b = (root / "b" / "task_arithmetic" / "smoke" / name).read_text()
        assert a == b, name
    pd.testing.assert_frame_equal(res.summary, again.summary)


def test_task_clients_freeze_the_head_and_take_per_client_steps():
    from fedbench.config import DataConfig, ExperimentConfig, FLConfig, PeftConfig, TrainConfig
    from fedbench.fl.server import FederatedRun
    cfg = ExperimentConfig(data=DataConfig(task="rt_sentiment", num_clients=2, partition="iid", max_train_samples=16,
                                           max_test_samples=8, max_length=16),
                           peft=PeftConfig(method="full"), train=TrainConfig(local_steps=2, batch_size=4),
                           fl=FLConfig(strategy="task_clients", rounds=1))
    run = FederatedRun(cfg)
    head = run.global_model.state["classifier.weight"].clone()
    run.strategy.client_steps = {1: 1}
    ins = run.configure(run.select_clients(1))
    assert all(not k.startswith("classifier.") for k in ins[0].send_keys)
    ups = [run.client_update(c, 1, ins[c]) for c in (0, 1)]
    assert [u.num_steps for u in ups] == [2, 1]
    assert not any(k.startswith("classifier.") for k in ups[0].state)
    g = run.strategy.aggregate(run.global_model, ups, 1)
    assert torch.equal(g.state["classifier.weight"], head)
