"""LoRM: the closed-form merges against numpy's least squares, their optimality, the Gram hooks, bad
settings, and an end-to-end FCIL run that reproduces itself and resumes from the run store."""
import numpy as np
import pandas as pd
import pytest
import torch

from fedbench.config import ConfigError
from fedbench.merging import lorm as L


def _problem(seed=0, n_clients=4, d_in=7, d_out=5, r=2, rows=(9, 12, 6, 15)):
    rng = np.random.default_rng(seed)
    X = [rng.normal(size=(rows[i], d_in)) * rng.uniform(0.5, 2.0, size=d_in) for i in range(n_clients)]
    A = rng.normal(size=(r, d_in))
    B = rng.normal(size=(d_out, r))
    Bs = [rng.normal(size=(d_out, r)) for _ in range(n_clients)]
    As = [rng.normal(size=(r, d_in)) for _ in range(n_clients)]
    return X, A, B, As, Bs


def _t(x):
    return torch.as_tensor(x, dtype=torch.float64)


def test_solve_B_is_numpys_least_squares():
    X, A, _, _, Bs = _problem()
    G = [L.gram(_t(x)) for x in X]
    # min_B sum_i ||X_i A^T B^T - X_i A^T B_i^T||^2 as one stacked least-squares problem in B^T
    Z = np.vstack([x @ A.T for x in X])
    Y = np.vstack([x @ A.T @ b.T for x, b in zip(X, Bs)])
    expected = np.linalg.lstsq(Z, Y, rcond=None)[0].T
    got = L.solve_B([_t(b) for b in Bs], _t(A), G)
    assert got.dtype == torch.float64 and got.shape == (5, 2)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-10)


def test_solve_A_is_numpys_least_squares_with_B_in_the_loss():
    X, _, B, As, _ = _problem(seed=1)
    G = [L.gram(_t(x)) for x in X]
    # min_A sum_i ||X_i A^T B^T - X_i A_i^T B^T||^2, vectorised: vec(X A^T B^T) = (B kron X) vec(A^T)
    y = np.concatenate([(x @ a.T @ B.T).reshape(-1, order="F") for x, a in zip(X, As)])
    K = np.vstack([np.kron(B, x) for x in X])          # the same (client, column-major) row order
    vec = np.linalg.lstsq(K, y, rcond=None)[0]
    expected = vec.reshape((X[0].shape[1], B.shape[1]), order="F").T
    got = L.solve_A([_t(a) for a in As], G)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-9)


def test_regmean_is_numpys_least_squares_and_exact_for_one_client():
    X, _, _, _, _ = _problem(seed=2)
    rng = np.random.default_rng(5)
    Ws = [rng.normal(size=(5, 7)) for _ in X]
    expected = np.linalg.lstsq(np.vstack(X), np.vstack([x @ w.T for x, w in zip(X, Ws)]), rcond=None)[0].T
    G = [L.gram(_t(x)) for x in X]
    np.testing.assert_allclose(L.regmean([_t(w) for w in Ws], G).numpy(), expected, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(L.regmean([_t(Ws[0])], [G[0]]).numpy(), Ws[0], rtol=1e-9, atol=1e-10)


def test_ridge_is_least_squares_pulled_towards_the_average():
    X, A, _, _, Bs = _problem(seed=3)
    G = [L.gram(_t(x)) for x in X]
    w = [3, 1, 2, 5]
    avg = sum(wi * b for wi, b in zip(w, Bs)) / sum(w)
    ridge = 0.1
    M = A @ sum(x.T @ x for x in X) @ A.T
    lam = ridge * np.trace(M) / M.shape[0]
    # augmented system: extra rows sqrt(lam) I with targets sqrt(lam) B_avg^T
    Z = np.vstack([x @ A.T for x in X] + [np.sqrt(lam) * np.eye(2)])
    Y = np.vstack([x @ A.T @ b.T for x, b in zip(X, Bs)] + [np.sqrt(lam) * avg.T])
    expected = np.linalg.lstsq(Z, Y, rcond=None)[0].T
    got = L.solve_B([_t(b) for b in Bs], _t(A), G, weights=w, ridge=ridge)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-10)
    # a huge ridge is the plain weighted average
    np.testing.assert_allclose(L.solve_B([_t(b) for b in Bs], _t(A), G, weights=w, ridge=1e12).numpy(), avg,
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 1.0])
def test_lorm_error_is_lowest_among_shared_factor_merges(ridge):
    for seed in range(5):
        X, A, B, As, Bs = _problem(seed=10 + seed)
        G = [L.gram(_t(x)) for x in X]
        w = [len(x) for x in X]
        dW_b = [_t(b) @ _t(A) for b in Bs]                 # clients trained B with A shared
        solved = L.solve_B([_t(b) for b in Bs], _t(A), G, weights=w, ridge=ridge) @ _t(A)
        averaged = L.factor_average([_t(b) for b in Bs], w) @ _t(A)
        e_solved, e_avg = L.response_error(solved, dW_b, G), L.response_error(averaged, dW_b, G)
        assert e_solved <= e_avg * (1 + 1e-12)
        # the dense RegMean optimum is a lower bound (it is not restricted to the row space of A)
        assert L.response_error(L.regmean(dW_b, G), dW_b, G) <= e_solved * (1 + 1e-12)
        if ridge == 0:     # no perturbation of the solution does better
            rng = np.random.default_rng(seed)
            for _ in range(5):
                B_pert = L.solve_B([_t(b) for b in Bs], _t(A), G) + 1e-3 * _t(rng.normal(size=B.shape))
                assert L.response_error(B_pert @ _t(A), dW_b, G) > e_solved
        dW_a = [_t(B) @ _t(a) for a in As]                 # clients trained A with B shared
        solved_a = _t(B) @ L.solve_A([_t(a) for a in As], G, weights=w, ridge=ridge)
        avg_a = _t(B) @ L.factor_average([_t(a) for a in As], w)
        assert L.response_error(solved_a, dW_a, G) <= L.response_error(avg_a, dW_a, G) * (1 + 1e-12)


def test_response_error_from_inputs_and_grams_agree():
    X, A, _, _, Bs = _problem(seed=4)
    dW = [_t(b) @ _t(A) for b in Bs]
    target = _t(np.ones((5, 7)))
    direct = sum(float(((_t(x) @ (target - d).T) ** 2).sum()) for x, d in zip(X, dW))
    assert L.response_error(target, dW, [L.gram(_t(x)) for x in X]) == pytest.approx(direct, rel=1e-12)


def test_bad_ridge_weights_and_grams_are_config_errors():
    X, A, _, As, Bs = _problem()
    G = [L.gram(_t(x)) for x in X]
    with pytest.raises(ConfigError, match="ridge"):
        L.solve_B(Bs, A, G, ridge=-1)
    with pytest.raises(ConfigError, match="weights"):
        L.solve_A(As, G, weights=[1, 2])
    with pytest.raises(ConfigError, match="G_list"):
        L.regmean(As, G[:2])
    assert L.gram_nbytes(384) == 384 * 385 // 2 * 8


# -- the experiment -------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, field", [
    ({"dataset": "fashion_mnist"}, "dataset"), ({"dataset": "nope"}, "dataset"), ({"num_tasks": 1}, "num_tasks"),
    ({"num_tasks": 21}, "num_tasks"), ({"methods": ["lorm", "flora"]}, "methods"), ({"ridge": -1.0}, "ridge"),
    ({"seeds": [0, 0]}, "seeds"), ({"alpha": 0}, "alpha"), ({"rounds_per_task": 0}, "rounds_per_task"),
    ({"depth": 7}, "depth"), ({"heldout_fraction": 0.0}, "heldout_fraction"), ({"max_train_per_task": 5}, "max_train_per_task"),
    ({"shuffle_classes": "yes"}, "shuffle_classes"), ({"colour": 1}, "colour")])
def test_bad_settings_name_the_parameter(override, field):
    from fedbench.experiments import lorm
    with pytest.raises(ConfigError) as e:
        lorm.settings_for("smoke", **override)
    assert e.value.field_name == field
    with pytest.raises(ConfigError, match="profile"):
        lorm.settings_for("huge")


def test_cl_metrics_from_an_accuracy_matrix():
    from fedbench.experiments import lorm
    a = np.array([[0.9, np.nan, np.nan], [0.6, 0.8, np.nan], [0.5, 0.7, 0.9]])
    m = lorm.cl_metrics(a)
    assert m["avg_after_task"] == pytest.approx([0.9, 0.7, 0.7])
    assert m["final_avg_accuracy"] == pytest.approx(0.7)
    assert m["avg_incremental_accuracy"] == pytest.approx(2.3 / 3)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)


TINY = dict(num_tasks=2, clients=2, max_train_per_task=16, max_test_per_task=8, max_length=24, local_steps=1,
            rounds_per_task=1, batch_size=8)


def test_grams_skip_padding_and_match_the_layer_inputs():
    from fedbench.experiments import lorm
    s = lorm.settings_for("smoke", **TINY)
    data = lorm.prepare_data(s, 0)
    run = lorm.FcilRun(s, 0, data)
    model = lorm.build(s, 0, "lorm", data.num_labels)
    idx = data.client_indices[0][0]
    grams = run.grams(model, run.layer_names, "train", idx)
    # depth 1: the wrapped query/value layers of the top layer read the cached output of the layer below
    hidden = torch.cat([run.caches["train"].hidden[int(i)] for i in idx]).double()
    for name in run.layer_names:
        torch.testing.assert_close(grams[name], hidden.T @ hidden, rtol=1e-9, atol=1e-6)
    # every example in the task's own class mask; a client's held-out inputs come from its own classes
    assert data.train.class_mask[idx].sum(1).eq(len(data.class_groups[0])).all()
    held_labels = set(data.heldout.labels[data.heldout_indices[0][0]].tolist())
    assert held_labels <= set(data.train.labels[idx].tolist())


def test_end_to_end_reproduces_exactly_and_resumes(tmp_path, monkeypatch):
    from fedbench.experiments import lorm
    monkeypatch.delenv("FEDBENCH_RESULTS", raising=False)
    names = ("summary.csv", "per_task.csv", "merge_error.csv", "claims.csv")
    tables = []
    for root in ("a", "b"):       # two cold runs in two empty result roots
        monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path / root))
        res = lorm.run(profile="smoke", progress=False, **TINY)
        out = tmp_path / root / "lorm" / "smoke"
        tables.append({n: (out / n).read_text() for n in names})
    assert tables[0] == tables[1]
    # resume: drop one finished run from the store; the rerun recomputes it alone, the tables are unchanged
    store = tmp_path / "b" / "runs" / "lorm"
    victim = res.runs.loc[res.runs["method"] == "regmean", "run"].iloc[0]
    (store / victim / "summary.json").unlink()
    again = lorm.run(profile="smoke", progress=False, **TINY)
    assert {n: (tmp_path / "b" / "lorm" / "smoke" / n).read_text() for n in names} == tables[1]
    pd.testing.assert_frame_equal(again.summary, res.summary)
    summary = pd.read_csv(tmp_path / "b" / "lorm" / "smoke" / "summary.csv")
    assert list(summary.columns) == ["method", "final_avg_accuracy", "avg_incremental_accuracy", "forgetting",
                                     "bytes_up_total", "seed"]
    assert list(summary["method"]) == list(lorm.METHODS)
    b = summary.set_index("method")["bytes_up_total"]
    assert b["joint"] == 0 and b["lorm"] > b["fedavg_factors"] and b["regmean"] > b["fedavg_products"]
    err = res.merge_error
    lo = err[(err["method"] == "lorm") & (err["split"] == "fit")].pivot_table(
        index=["seed", "task", "round", "layer"], columns="rule", values="error")
    assert (lo["lorm"] <= lo["factor_average"] * (1 + 1e-9)).all()       # least squares on the server's inputs
    assert set(err.loc[err["method"] == "lorm", "factor"]) == {"A", "B"}  # alternating, B first
    assert (err.loc[(err["method"] == "lorm") & (err["task"] == 0), "factor"] == "B").all()
    pt = pd.read_csv(tmp_path / "b" / "lorm" / "smoke" / "per_task.csv")
    assert len(pt) == len(lorm.METHODS) * 3 and pt["accuracy"].between(0, 1).all()   # a[0,0], a[1,0], a[1,1]
    for name in ("avg_accuracy.png", "forgetting.png", "accuracy_matrix.png", "merge_error.png"):
        assert (tmp_path / "b" / "lorm" / "smoke" / name).stat().st_size > 1000
