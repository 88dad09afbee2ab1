"""Task arithmetic = one-shot FedAvg: parameters, the equivalence on real fine-tunes, determinism."""
import numpy as np
import pandas as pd
import pytest

from fedbench.config import ConfigError
from fedbench.experiments import task_arithmetic as ta


@pytest.mark.parametrize("override, field", [
    (dict(tasks=("rt_sentiment",)), "tasks"),
    (dict(tasks=("rt_sentiment", "no_such_task")), "tasks"),
    (dict(hetero_steps=(1.0, 2.0)), "hetero_steps"),
    (dict(hetero_lr=(1.0, 1.0)), "hetero_lr"),
    (dict(rounds=(1, 5)), "rounds"),
    (dict(gma_rhos=(1.5,)), "gma_rhos"),
    (dict(lambdas=(-0.5,)), "lambdas"),
    (dict(methods=("fedavg", "krum")), "methods"),
    (dict(tunings=("adapter",)), "tunings"),
    (dict(seeds=(0, 0)), "seeds"),
    (dict(no_such_parameter=1), "no_such_parameter"),
])
def test_bad_settings_name_the_parameter(override, field):
    with pytest.raises(ConfigError) as e:
        ta.settings_for("smoke", **override)
    assert e.value.field_name == field


def test_settings_accept_lists_and_keep_profile_defaults():
    s = ta.settings_for("smoke", seeds=[3], lambdas=[0.5])
    assert s["seeds"] == (3,) and s["lambdas"] == (0.5,) and s["steps"] == ta.DEFAULTS["smoke"]["steps"]
    assert len(ta.settings_for("quick")["tasks"]) >= 4


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
def test_equivalence_holds_on_real_fine_tunes(smoke):
    res = smoke[0]
    eq = res.equivalence
    assert len(eq) == len(res.settings["tasks"])
    assert (eq["max_abs_param_diff"] <= 1e-6).all() and eq["same_accuracy"].all()
    assert (eq["accuracy_task_arithmetic"] == eq["accuracy_fedavg"]).all()
    # FedIT's factor average is a different model
    assert (eq["fedit_rel_delta_diff"] > 1e-3).all()
    claim = res.claims[res.claims["claim"].str.startswith("Task arithmetic with lambda = 1/T")]
    assert list(claim["agrees"]) == ["yes"]


@pytest.mark.slow
def test_summary_is_normalised_and_hyperparameters_come_from_the_grid(smoke):
    res = smoke[0]
    s, summ = res.settings, res.summary
    assert list(summ.columns) == ta.SUMMARY_COLUMNS
    homo = summ[summ["setting"] == "homogeneous"]
    assert set(homo["method"]) == {"individual", "pretrained", *s["methods"]}
    ind = homo[homo["method"] == "individual"].set_index("task")["accuracy"]
    np.testing.assert_allclose(homo["normalized_accuracy"], homo["accuracy"] / homo["task"].map(ind))
    assert (homo[homo["method"] == "individual"]["normalized_accuracy"] == 1.0).all()
    tuned = homo[homo["method"].isin(ta.TUNED)]
    assert tuned["lambda"].isin(s["lambdas"]).all()
    assert homo[homo["method"] == "fedavg"]["lambda"].eq(1 / len(s["tasks"])).all()
    # the selected point is the best mean normalised validation accuracy of its method
    val = res.validation[(res.validation["setting"] == "homogeneous") & (res.validation["method"] == "task_arithmetic")]
    ind_val = val.groupby("lambda")["accuracy"].size()
    assert val["selected"].sum() == len(s["tasks"]) and len(ind_val) == len(s["lambdas"])
    # one round of the federated loop is the one-shot FedAvg merge
    r1 = summ[summ["setting"] == "rounds:1"].set_index("task")["accuracy"]
    fa = homo[homo["method"] == "fedavg"].set_index("task")["accuracy"]
    pd.testing.assert_series_equal(r1.sort_index(), fa.sort_index())
    # settings present: heterogeneous training, every pair, every number of rounds
    T = len(s["tasks"])
    assert {f"rounds:{r}" for r in s["rounds"]} <= set(summ["setting"])
    assert summ["setting"].str.startswith("pair:").sum() == T * (T - 1) // 2 * 2 * 2   # (ind + TA) x 2 tasks
    het = summ[(summ["setting"] == "hetero_training")]
    assert set(het["method"]) == {"individual", *s["hetero_methods"]}
    # the cosine matrix is symmetric with a unit diagonal
    c = res.cosine.pivot_table(index="task_a", columns="task_b", values="cosine")
    np.testing.assert_allclose(c.values, c.values.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(c.values), 1.0, atol=1e-9)
    for name in ("normalized_accuracy.png", "cosine_similarity.png", "similarity_vs_accuracy.png",
                 "accuracy_vs_rounds.png", "summary.csv", "equivalence.csv", "claims.csv"):
        assert (res.out_dir / name).exists(), name


@pytest.mark.slow
def test_rerun_and_cold_rerun_give_identical_tables(smoke):
    res, again, cold, root = smoke
    for name in ("summary.csv", "equivalence.csv", "pairs.csv", "rounds.csv", "validation.csv", "claims.csv"):
        a = (root / "a" / "task_arithmetic" / "smoke" / name).read_text()
        b = (root / "b" / "task_arithmetic" / "smoke" / name).read_text()
        assert a == b, name
    pd.testing.assert_frame_equal(res.summary, again.summary)
