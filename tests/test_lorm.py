"""LoRM: the closed-form merges against numpy's least squares, their optimality, the Gram hooks; the strategies on
the shared loop (alternation per round, what travels, exact Gram bytes, fresh factors per task, equal-rank baselines),
bad settings, and an end-to-end FCIL run that reproduces itself from an empty store and resumes from the run store."""
import numpy as np
import pandas as pd
import pytest
import torch

from fedbench.config import ConfigError
from fedbench.fl.grams import layer_input_grams
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


def test_factored_response_error_is_the_dense_one():
    """The merge check scores rank-r merges from their factors: exact, not an approximation."""
    X, A, _, _, Bs = _problem(seed=5)
    G = [L.gram(_t(x)) for x in X]
    rng = np.random.default_rng(0)
    As = [_t(A) + _t(rng.normal(size=A.shape)) for _ in Bs]
    dW = [_t(b) @ a for b, a in zip(Bs, As)]
    U, V = _t(rng.normal(size=(5, 3))), _t(rng.normal(size=(3, 7)))
    assert L.factored_response_error((U, V), list(zip(map(_t, Bs), As)), G) == pytest.approx(
        L.response_error(U @ V, dW, G), rel=1e-10)


@pytest.mark.parametrize("ridge", [0.0, 1e-4, 10.0])
def test_regmean_of_low_rank_updates_as_factors_is_the_dense_regmean(ridge):
    X, _, _, As, Bs = _problem(d_in=6, rows=(2, 3, 2, 4))          # every G_i rank-deficient, their sum too
    G = [L.gram(_t(x)) for x in X]
    w = [3, 1, 2, 5]
    U, V = L.regmean_factored([_t(b) for b in Bs], [_t(a) for a in As], G, w, ridge)
    assert U.shape[1] == sum(b.shape[1] for b in Bs)
    dense = L.regmean([_t(b) @ _t(a) for b, a in zip(Bs, As)], G, w, ridge)
    torch.testing.assert_close(U @ V, dense, rtol=1e-9, atol=1e-9)
    # no input at all: the (weighted) product average
    zero = [torch.zeros_like(g) for g in G]
    U, V = L.regmean_factored([_t(b) for b in Bs], [_t(a) for a in As], zero, w, 1e-4)
    torch.testing.assert_close(U @ V, L.regmean([_t(b) @ _t(a) for b, a in zip(Bs, As)], zero, w, 1e-4))


def test_truncated_svd_of_factors_is_the_dense_truncated_svd():
    from fedbench.merging.aggregators import svd_of_product
    rng = np.random.default_rng(3)
    U, V = _t(rng.normal(size=(40, 12))), _t(rng.normal(size=(12, 25)))
    for rank in (3, 12):
        b, a = svd_of_product(U, V, rank)
        assert b.shape == (40, rank) and a.shape == (rank, 25)
        u, sv, vh = torch.linalg.svd(U @ V, full_matrices=False)
        torch.testing.assert_close(b @ a, (u[:, :rank] * sv[:rank]) @ vh[:rank], rtol=1e-9, atol=1e-9)
        # balanced like lora_svd: B^T B = A A^T = S_r
        torch.testing.assert_close(b.T @ b, torch.diag(sv[:rank]), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a @ a.T, torch.diag(sv[:rank]), rtol=1e-9, atol=1e-9)


def test_bad_ridge_weights_and_grams_are_config_errors():
    X, A, _, As, Bs = _problem()
    G = [L.gram(_t(x)) for x in X]
    with pytest.raises(ConfigError, match="ridge"):
        L.solve_B(Bs, A, G, ridge=-1)
    with pytest.raises(ConfigError, match="weights"):
        L.solve_A(As, G, weights=[1, 2])
    with pytest.raises(ConfigError, match="G_list"):
        L.regmean(As, G[:2])
    from fedbench.strategies.continual import pack_upper
    from fedbench.models.state import state_nbytes
    g = L.gram(_t(X[0])).float()
    assert L.gram_nbytes(g.shape[0]) == state_nbytes({"g": pack_upper(g)})      # what a client's extras carry
    assert L.gram_nbytes(384, torch.float64) == 384 * 385 // 2 * 8



@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_cross_task_merge_is_the_direct_float64_computation(ridge):
    """(sum_t D_t G_t) pinv(sum_t G_t), the official end_task_server's merge, against numpy in float64 (a ridge:
    (sum_t D_t G_t + lam' mean_t D_t)(sum_t G_t + lam' I)^-1, lam' relative to the mean eigenvalue); the running
    sums give the same; a huge ridge gives the running mean."""
    rng = np.random.default_rng(3)
    D = [rng.standard_normal((5, 7)) for _ in range(3)]
    X = [rng.standard_normal((n, 7)) for n in (4, 9, 6)]        # the first task's Gram is rank-deficient
    G = [x.T @ x for x in X]
    g = sum(G)
    if ridge == 0:
        want = sum(d @ gi for d, gi in zip(D, G)) @ np.linalg.pinv(g)
    else:
        lam = ridge * np.trace(g) / 7
        want = (sum(d @ gi for d, gi in zip(D, G)) + lam * sum(D) / 3) @ np.linalg.inv(g + lam * np.eye(7))
    got = L.cross_task_merge([_t(d) for d in D], [_t(x) for x in G], ridge=ridge)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)
    sums = L.merge_from_sums(_t(sum(d @ gi for d, gi in zip(D, G))), _t(g), _t(sum(D) / 3), ridge)
    np.testing.assert_allclose(sums.numpy(), want, rtol=1e-9, atol=1e-9)
    far = L.cross_task_merge([_t(d) for d in D], [_t(x) for x in G], ridge=1e12)
    np.testing.assert_allclose(far.numpy(), sum(D) / 3, rtol=1e-6, atol=1e-8)


# -- the strategies on the shared loop ------------------------------------------------------------------

@pytest.mark.parametrize("override, field", [
    ({"dataset": "fashion_mnist"}, "dataset"), ({"dataset": "nope"}, "dataset"), ({"num_tasks": 1}, "num_tasks"),
    ({"num_tasks": 21}, "num_tasks"), ({"methods": ["lorm", "flora"]}, "methods"), ({"ridge": -1.0}, "ridge"),
    ({"seeds": [0, 0]}, "seeds"), ({"rounds_per_task": 0}, "rounds_per_task"), ({"lr_grid": []}, "lr_grid"),
    ({"val_fraction": 1.0}, "val_fraction"), ({"fl.dropout": 2.0}, "fl.dropout"), ({"peft.depth": 9}, "peft.depth"),
    ({"colour": 1}, "colour"), ({"lr_extend": -1}, "lr_extend"), ({"exploratory_seeds": 1.5}, "exploratory_seeds"),
    ({"methods": ["fedit", "lorm_avg"]}, "methods"), ({"methods": ["lorm_mean"]}, "methods"),
    ({"lr_extend": 1}, "lr_extend")])
def test_bad_settings_name_the_parameter(override, field):
    from fedbench.experiments import lorm
    with pytest.raises(ConfigError) as e:
        lorm.settings_for("smoke", **override)
    assert e.value.field_name == field


def test_the_method_table_names_registered_components(monkeypatch):
    """Every row of the method table runs a registered strategy with registered LoRA semantics and options that
    strategy takes; a row that does not is a ConfigError naming ``methods`` before any run, and each run config
    takes its strategy and semantics from its row."""
    from fedbench.experiments import lorm
    from fedbench.experiments.lorm import plan
    lorm.check_method_table()
    s, base = lorm.settings_for("smoke", methods=list(lorm.METHODS))
    for name, m in lorm.METHODS.items():
        row = lorm.METHODS[m.config_of] if m.config_of else m
        cfg = lorm.run_config(s, base, name, 0, 1e-3)
        assert (cfg.fl.strategy, cfg.fl.lora_aggregation) == (row.strategy, row.semantics)
        assert all(cfg.fl.options[k] == v for k, v in row.options)
    for bad in (plan.Method("x", strategy="no_such_strategy"), plan.Method("x", semantics="no_such_rule"),
                plan.Method("x", "lorm", options=(("no_such_option", 1),)), plan.Method("x", lr_from="nope"),
                plan.Method("x", peft=(("peft.method", "no_such_tuner"),))):
        monkeypatch.setitem(plan.METHODS, "fedit", bad)
        with pytest.raises(ConfigError) as e:
            lorm.settings_for("smoke")
        assert e.value.field_name == "methods" and e.value.value == "fedit"


def test_the_protocol_is_filled_from_the_settings_and_the_chosen_lrs():
    from fedbench.experiments import lorm
    s, base = lorm.settings_for("smoke", **{"data.num_clients": 3, "ridge": 0.02, "seeds": [0, 1, 2],
                                            "exploratory_seeds": 1})
    sel = pd.DataFrame([{"method": "lorm", "lr": 0.003, "chosen": True, "lr_from": None},
                        {"method": "lorm", "lr": 0.01, "chosen": False, "lr_from": None},
                        {"method": "lorm_avg", "lr": 0.003, "chosen": True, "lr_from": "lorm"},
                        {"method": "fedit", "lr": 0.01, "chosen": True, "lr_from": None}])
    text = lorm.protocol(s, base, sel)
    assert text.startswith("# LoRM: protocol") and "{" not in text
    assert "chosen lorm 0.003, fedit 0.01 (`lr_selection.csv`)" in text
    assert "| 3 clients, Dirichlet(0.5)" in text and "relative ridge 0.02 " in text
    assert "on 3 seeds, Holm" in text and "exploratory on 1 seed;" in text
    assert "2 tasks x 10 classes" in text and "1 local step |" in text
    assert lorm.protocol(s, base, sel.assign(lr=[0.03, 0.01, 0.03, 0.1])) != text


def test_core_conditions_reach_every_run_by_config():
    from fedbench.experiments import lorm
    s, base = lorm.settings_for("smoke", **{"fl.dropout": 0.3, "fl.clients_per_round": 1.0})
    for m in lorm.METHODS:
        cfg = lorm.run_config(s, base, m, 0, 1e-3)
        assert cfg.fl.dropout == 0.3 and cfg.fl.rounds == s.num_tasks * s.rounds_per_task
    assert lorm.run_config(s, base, "lorm", 0, 1e-3).fl.strategy == "lorm"
    assert lorm.run_config(s, base, "regmean_svd", 0, 1e-3).fl.lora_aggregation == "svd"


def test_cl_metrics_from_an_accuracy_matrix():
    from fedbench.experiments import lorm
    a = np.array([[0.9, np.nan, np.nan], [0.6, 0.8, np.nan], [0.5, 0.7, 0.9]])
    m = lorm.cl_metrics(a)
    assert m["avg_after_task"] == pytest.approx([0.9, 0.7, 0.7])
    assert m["final_avg_accuracy"] == pytest.approx(0.7)
    assert m["avg_incremental_accuracy"] == pytest.approx(2.3 / 3)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)


TINY = {"max_train_per_class": 6, "max_test_per_class": 2, "num_tasks": 2, "rounds_per_task": 3}


@pytest.fixture(scope="module")
def tiny():
    """(settings, base, pool, data of seed 0) on the smoke profile, shrunk."""
    from fedbench.experiments import lorm
    from fedbench.fl.data import build_data
    from fedbench.fl.federations import TaskSequenceOptions, sequence_pool
    s, base = lorm.settings_for("smoke", **TINY)
    lorm.shared_caches(s, base)
    o = TaskSequenceOptions.from_dict(lorm.federation(s), "data.federation_options")
    pool = sequence_pool(o, s.dataset, base.model.backbone, base.data.max_length)
    return s, base, pool, build_data(lorm.run_config(s, base, "lorm", 0, 3e-3))


def _run(tiny, method, rounds=None):
    from fedbench.experiments import lorm
    from fedbench.fl import FederatedRun
    s, base, pool, data = tiny
    cfg = lorm.run_config(s, base, method, 0, 3e-3)
    run = FederatedRun(cfg, data, pool.caches)
    records = [run.run_round(r) for r in range(1, (rounds or cfg.fl.rounds) + 1)]
    return run, records


def test_lorm_alternates_per_round_and_only_the_declared_factor_travels(tiny):
    from fedbench.fl import FederatedRun
    from fedbench.strategies.continual import input_groups
    from fedbench.experiments import lorm
    s, base, pool, data = tiny
    run = FederatedRun(lorm.run_config(s, base, "lorm", 0, 3e-3), data, pool.caches)
    mods = run.strategy.lora.modules
    assert [run.strategy.factor(r) for r in range(1, 7)] == ["B", "A", "B", "B", "A", "B"]   # restarts at B per task
    d = {m.name: m for m in mods}
    for r in range(1, 7):
        ins = run.configure(run.select_clients(r))
        factor = run.strategy.factor(r)
        for c, i in ins.items():
            assert i.options == {"task": (r - 1) // 3, "factor": factor}
            assert all((m.b_key in i.send_keys) == (factor == "B") and (m.a_key in i.send_keys) == (factor == "A")
                       for m in mods)
            assert "classifier.weight" in i.send_keys
        updates = [run.client_update(c, r, ins[c]) for c in run.select_clients(r).reporting]
        for u in updates:
            assert list(u.state) == list(ins[u.client_id].send_keys)
            # one Gram matrix per distinct layer input (query and value share one), upper triangle, float32
            groups = input_groups(mods)
            assert sorted(u.extras) == sorted(f"gram/{g}" for g in groups)
            assert any(len(ms) == 2 for ms in groups.values())            # query + value
            d_in = {g: run.model.get_submodule(ms[0].name).in_features for g, ms in groups.items()}
            assert u.nbytes_up == sum(t.numel() * 4 for t in u.state.values()) + \
                sum(n * (n + 1) // 2 * 4 for n in d_in.values())
        before = {k: v.clone() for k, v in run.global_model.state.items()}
        rec = run.finish_round(run.select_clients(r), updates, 0.0, instructions=ins)
        assert rec["bytes_up"] == sum(u.nbytes_up for u in updates)
        if r % 3:     # within a task the frozen factor never changes on the server either
            frozen = [m.a_key if factor == "B" else m.b_key for m in mods]
            assert all(torch.equal(run.global_model.state[k], before[k]) for k in frozen)
    assert len(d) == len(mods)


def test_the_gram_matrix_is_that_of_the_layer_inputs(tiny):
    from fedbench.strategies.continual import unpack_upper
    s, base, pool, data = tiny
    run, _ = _run(tiny, "lorm", rounds=1)
    ins = run.configure(run.select_clients(2))[0]
    u = run.client_update(0, 2, ins)
    idx = data.task_clients[0][0]
    # depth 1: query/value read the cached output of the layer below
    hidden = torch.cat([pool.caches[0].hidden[int(i)] for i in idx]).double()
    g = unpack_upper(u.extras[next(k for k in u.extras if k.endswith(".qkv"))]).double()
    torch.testing.assert_close(g, hidden.T @ hidden, rtol=1e-4, atol=1e-3)


def test_gram_forward_stops_after_the_last_input_and_gives_the_same_grams(tiny):
    s, base, pool, data = tiny
    run, _ = _run(tiny, "lorm", rounds=1)
    model, idx = run.model, data.task_clients[0][0]
    mods = [m.name for m in run.strategy.lora.modules]
    low, top = mods[0], [n for n in mods if n.endswith("intermediate.dense")][-1]
    above = top.replace("intermediate.dense", "output.dense")            # runs after the last hooked input
    calls = []
    h = model.get_submodule(above).register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        kw = dict(cache=pool.caches[0], pad_id=data.pad_id, dtype=torch.float32)
        only_low = layer_input_grams(model, [low], data.train, idx, **kw)
        both = layer_input_grams(model, [low, top], data.train, idx, **kw)
        assert calls == []                       # the forward stopped at the last hooked input
        torch.testing.assert_close(only_low[low], both[low], rtol=0, atol=0)     # bit for bit
        from fedbench.fl.client import forward_batch
        forward_batch(model, data.train, idx, pool.caches[0], data.pad_id)
        assert calls                             # (the hook does see a full forward)
    finally:
        h.remove()


def test_task_accuracies_from_one_pass_are_the_per_task_evaluations(tiny):
    from fedbench.experiments import lorm
    from fedbench.fl.client import evaluate
    s, base, pool, data = tiny
    run, _ = _run(tiny, "fedit")                   # both tasks: test rows after each task, val rows at the end
    st = run.strategy
    run.load(st.served_model(run.global_model))
    acc = pd.DataFrame(st.acc_rows)
    last = s.num_tasks - 1
    for split, sp, rows, cache in (("test", data.test, data.task_test, pool.caches[1]),
                                   ("val", data.train, data.task_val, pool.caches[0])):
        got = acc[(acc.split == split) & (acc.after_task == last)].sort_values("task")["accuracy"].tolist()
        want = [evaluate(run.model, data.seen_view(sp, last), rows[j], cache=cache, pad_id=data.pad_id)["accuracy"]
                for j in range(last + 1)]
        assert got == want
        # the joint run's path: logits once, argmax over the seen classes
        logits = lorm.all_logits(run.model, sp, np.concatenate(rows), cache, data.pad_id)
        for t in range(last + 1):
            ref = evaluate(run.model, data.seen_view(sp, t), np.concatenate(rows[:t + 1]), cache=cache,
                           pad_id=data.pad_id, return_predictions=True)["predictions"]
            pred = lorm.masked_argmax(torch.stack([logits[int(i)] for i in ref["test_index"]]), data.seen_mask(t))
            assert np.array_equal(pred.numpy(), ref["prediction"])
    assert len(acc[(acc.split == "test")]) == sum(t + 1 for t in range(s.num_tasks))


def test_one_pass_fill_of_several_depths_is_one_fill_per_depth(tiny):
    from fedbench.config import PeftConfig
    from fedbench.models import build_model
    from fedbench.models.inputs import ActivationCache
    s, base, pool, data = tiny
    model = build_model(base.model, PeftConfig(method="head"), len(pool.class_names), seed=0)
    idx = np.arange(len(pool.train))
    depths = [model.num_layers - 2, model.num_layers - 1]
    calls = []
    h = model.layers[0].register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        one = ActivationCache(pool.train, pool.pad_id)
        one.fill_depths(model, idx, depths, batch_size=8)
        chunks = len(calls)
        per_depth = ActivationCache(pool.train, pool.pad_id)
        for d in depths:
            per_depth.fill(model, idx, d, batch_size=8)
    finally:
        h.remove()
    # the bottom layer ran once per chunk for both depths (and once per chunk and depth with one fill per depth)
    assert chunks == -(-len(idx) // 8) and len(calls) == 3 * chunks
    for d in depths:
        one.ensure(d)
        per_depth.ensure(d)
        assert sorted(one.hidden) == sorted(per_depth.hidden) == idx.tolist()
        assert all(torch.equal(one.hidden[i], per_depth.hidden[i]) for i in idx.tolist())     # bit for bit
    assert one.fill_log() == per_depth.fill_log()


def test_every_task_starts_fresh_factors_and_the_served_model_is_the_mean(tiny):
    run, _ = _run(tiny, "fedit", rounds=3)       # task 0 done
    st, mods = run.strategy, run.strategy.lora.modules
    assert st.done == 1 and st.rounds_in_task == 0
    for i, m in enumerate(mods):
        assert torch.count_nonzero(run.global_model.state[m.b_key]) == 0          # B = 0: fresh
        fresh_a, _ = st.fresh_factors(run.global_model.state, m, i, 3)
        assert torch.equal(run.global_model.state[m.a_key], fresh_a)
    task0 = {m.base_key: st.old_sum[m.base_key].clone() for m in mods}
    assert any(v.abs().sum() > 0 for v in task0.values())
    served = st.served_model(run.global_model)
    for m in mods:
        torch.testing.assert_close(served.base_delta[m.base_key].double(), task0[m.base_key], rtol=1e-6, atol=1e-7)
    for r in range(4, 7):
        run.run_round(r)
    # the last task keeps its factors; served = (task 0 + task 1) / 2
    served = st.served_model(run.global_model)
    for m in mods:
        t1 = st.task_delta(run.global_model, m)
        torch.testing.assert_close(served.base_delta[m.base_key].double(), (task0[m.base_key] + t1) / 2,
                                   rtol=1e-5, atol=1e-6)
    acc = pd.DataFrame(st.acc_rows)
    assert sorted(zip(acc.loc[acc.split == "test", "after_task"], acc.loc[acc.split == "test", "task"])) == \
        [(0, 0), (1, 0), (1, 1)]


@pytest.mark.parametrize("method", ["product_svd", "regmean_svd", "product_stack", "regmean_dense"])
def test_equal_rank_baselines_stay_at_rank_r_and_growing_ones_fold(tiny, method):
    s, base, pool, data = tiny
    run, recs = _run(tiny, method, rounds=2)
    r = base.peft.rank
    for m in run.strategy.lora.modules:
        b, a = run.global_model.state[m.b_key], run.global_model.state[m.a_key]
        assert b.shape[1] == r and a.shape[0] == r
        folded = run.global_model.base_delta[m.base_key]
        if method.endswith("_svd"):
            assert torch.count_nonzero(folded) == 0 and torch.linalg.matrix_rank(b.double() @ a.double()) <= r
        else:        # rank grows: the merge is folded into the base and the factors restart
            assert torch.count_nonzero(folded) > 0 and torch.count_nonzero(b) == 0
    if method == "regmean_dense":       # what travels down includes every folded dense delta
        assert recs[1]["bytes_down"] > recs[0]["bytes_down"]


def test_lorm_rejects_what_it_cannot_run():
    from fedbench.experiments import lorm
    s, base = lorm.settings_for("smoke")
    with pytest.raises(ConfigError, match="fl.lora_aggregation"):
        base.replace(**{"fl.strategy": "lorm", "fl.lora_aggregation": "svd"})
    with pytest.raises(ConfigError, match="fl.lora_aggregation"):
        base.replace(**{"fl.strategy": "regmean"})
    with pytest.raises(ConfigError, match="fl.aggregator"):
        base.replace(**{"fl.strategy": "lorm", "fl.aggregator": "median"})


def test_lr_is_the_best_on_validation_ties_to_the_smaller_and_edges_are_flagged():
    """LoRM's lr search is bench.select_lr on val_score: the validation accuracy of the served model (not test,
    not the running mean LoRM's runs score beside it), the run's hash in its row."""
    from fedbench.bench import select_lr
    from fedbench.experiments import lorm

    def get(val_by_lr):
        def one(lr):
            row = {"after_task": 0, "task": 0}
            acc = pd.DataFrame([{**row, "split": "val", "accuracy": val_by_lr[lr], "merge": "gram"},
                                {**row, "split": "val", "accuracy": 1.0, "merge": "mean"},
                                {**row, "split": "test", "accuracy": 1.0, "merge": "gram"}])
            return lorm.val_score({"accuracy": acc, "predictions": acc, "summary": {"served": "gram"}}, f"h{lr}")
        return one

    best, rows = select_lr("fedit", (1e-3, 3e-3, 1e-2), get({1e-3: 0.2, 3e-3: 0.5, 1e-2: 0.4}), metric=lorm.METRIC)
    assert best == 3e-3 and [r["chosen"] for r in rows] == [False, True, False]
    assert not any(r["chosen_at_grid_edge"] for r in rows) and rows[1]["run"] == "h0.003"
    assert rows[1][lorm.METRIC] == 0.5
    best, rows = select_lr("fedit", (1e-3, 3e-3), get({1e-3: 0.5, 3e-3: 0.5}), metric=lorm.METRIC)
    assert best == 1e-3 and all(r["chosen_at_grid_edge"] for r in rows)      # a tie goes to the smaller lr
    best, rows = select_lr("fedit", (3e-3,), get({3e-3: 0.1}), metric=lorm.METRIC)
    assert best == 3e-3 and rows[0]["chosen_at_grid_edge"]                    # one value is no choice


def test_end_to_end_reproduces_exactly_and_resumes(tmp_path, monkeypatch):
    from fedbench.experiments import lorm
    from fedbench.bench import output_dir
    monkeypatch.delenv("FEDBENCH_RESULTS", raising=False)
    kw = dict(TINY, methods=["lorm", "lorm_mean", "lorm_avg", "fedit", "fedit_lorm_lr", "joint"])
    names = ("summary.csv", "per_task.csv", "merge_error.csv", "claims.csv")
    tables = []
    for root in ("a", "b"):       # two cold runs in two empty result roots
        monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path / root))
        res = lorm.run(profile="smoke", progress=False, **kw)
        out = output_dir("lorm", "smoke", overrides=kw)           # overrides: its own custom-<hash>/ folder
        tables.append({n: (out / n).read_text() for n in names})
    assert tables[0] == tables[1]
    store = tmp_path / "b" / "runs" / "lorm"
    victim = res.runs.loc[res.runs["method"] == "fedit", "run"].iloc[0]
    (store / victim / "summary.json").unlink()
    again = lorm.run(profile="smoke", progress=False, **kw)
    assert {n: (out / n).read_text() for n in names} == tables[1]
    pd.testing.assert_frame_equal(again.summary, res.summary)
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns)[:6] == ["method", "seed", "final_avg_accuracy", "avg_incremental_accuracy",
                                         "forgetting", "mb_up"]
    b = summary.groupby("method")["mb_up"].mean()
    assert b["joint"] == 0 and b["lorm"] > b["lorm_avg"] > b["fedit"] == b["fedit_lorm_lr"]
    # the controls: the running mean read off LoRM's runs, the solve control and FedIT at LoRM's lr (FedIT's runs
    # where the lr is the same), each lr from LoRM's choice; the solve control's grid scored on the first seed
    runs = res.runs.set_index(["method", "seed"])
    assert (runs.loc["lorm_mean", "run"] == runs.loc["lorm", "run"]).all()
    assert (runs.loc["fedit_lorm_lr", "run"] == runs.loc["fedit", "run"]).all()     # one lr in smoke: same runs
    assert set(res.summary.loc[res.summary.method != "joint", "lr"]) == {3e-3}
    sel = res.lr_selection
    assert list(sel.loc[sel.method == "lorm_avg", "lr_from"]) == ["lorm"]
    assert set(res.merge_error["method"]) == {"lorm"}
    assert set(res.claims["comparison"]) >= {"lorm - fedit", "lorm - lorm_mean", "lorm - lorm_avg",
                                             "fedit - fedit_lorm_lr", "lorm - fedit_lorm_lr"}
    assert res.claims["role"].tolist()[0] == "primary" and (res.claims["role"] == "primary").sum() == 1
    err = res.merge_error
    lo = err[err["split"] == "fit"].pivot_table(index=["seed", "task", "round", "layer"], columns="rule",
                                                values="error")
    assert (lo["lorm"] <= lo["factor_average"] * (1 + 1e-6)).all()       # least squares on the server's inputs
    assert set(err["split"]) == {"fit", "heldout"}
    assert list(err.groupby("round")["factor"].first()) == ["B", "A", "B", "B", "A", "B"]
    from fedbench.claims import check_table
    assert check_table(res.claims) is res.claims            # roles, labels, no decision from < 3 seeds


def test_a_run_built_from_its_config_alone_equals_the_experiments(tiny):
    """LoRM's runs share the pool's caches filled at every depth; one run from its config alone (its own data and
    caches, data.federation = task_sequence) gives the same tables."""
    from fedbench.experiments import lorm
    from fedbench.fl import FederatedRun
    s, base, pool, data = tiny
    cfg = lorm.run_config(s, base, "lorm", 0, 3e-3)
    shared = lorm.run_one(s, cfg, "lorm", data, pool.caches)
    run = FederatedRun(cfg)
    for r in range(1, cfg.fl.rounds + 1):
        run.run_round(r)
    alone = pd.DataFrame(run.strategy.acc_rows, columns=lorm.ACC_COLS)
    pd.testing.assert_frame_equal(alone, shared["accuracy"])
    assert (pd.DataFrame(run.final_predictions)["prediction"].to_numpy() ==
            lorm.view(shared)["predictions"]["prediction"].to_numpy()).all()


def test_the_served_model_is_the_cross_task_merge_of_the_tasks(tiny):
    """LoRM's served model from the second task on: W0 + (D_0 G_0 + D_1 G_1) pinv(G_0 + G_1), G_t the sum of the
    Gram matrices the clients sent in task t's last round, D_t the task's product; the first task alone is served
    as it is (the official code merges from the second task on)."""
    from fedbench.strategies.continual import input_groups, unpack_upper
    run, _ = _run(tiny, "lorm", rounds=2)
    st, mods = run.strategy, run.strategy.lora.modules

    def last_round(r):
        plan = run.select_clients(r)
        ins = run.configure(plan)
        updates = [run.client_update(c, r, ins[c]) for c in plan.reporting]
        sent = {g: sum(unpack_upper(u.extras[f"gram/{g}"]).double() for u in updates)
                for g in input_groups(mods)}
        before = {m.base_key: st.task_delta(run.global_model, m) for m in mods}
        run.finish_round(plan, updates, 0.0, instructions=ins)
        return sent, before

    G0, _ = last_round(3)
    D0 = {m.base_key: st.old_sum[m.base_key].clone() for m in mods}
    served = st.served_model(run.global_model)           # one task: its own product (the running mean of one)
    for m in mods:
        torch.testing.assert_close(served.base_delta[m.base_key].double(), D0[m.base_key], rtol=1e-6, atol=1e-7)
    run.run_round(4)
    run.run_round(5)
    G1, _ = last_round(6)
    served = st.served_model(run.global_model)
    mean = st.served_model(run.global_model, "mean")
    for m in mods:
        g = st.gram_name(m)
        D1 = st.task_delta(run.global_model, m)
        want = L.cross_task_merge([D0[m.base_key], D1], [G0[g], G1[g]], ridge=st.options.ridge)
        torch.testing.assert_close(served.base_delta[m.base_key].double(), want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mean.base_delta[m.base_key].double(), (D0[m.base_key] + D1) / 2,
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(served.base_delta[m.base_key], mean.base_delta[m.base_key])


def test_the_running_mean_row_is_a_run_served_by_the_running_mean(tiny):
    """lorm_mean is read off LoRM's runs (which score the running mean beside the cross-task merge): the same
    numbers as a run configured with cross_task='mean' (training never sees the served model)."""
    from fedbench.experiments import lorm
    s, base, pool, data = tiny
    s2 = lorm.LormSettings(**{**s.__dict__, "methods": ("lorm", "lorm_mean")})
    both = lorm.run_one(s2, lorm.run_config(s2, base, "lorm", 0, 3e-3), "lorm", data, pool.caches)
    assert set(both["accuracy"]["merge"]) == {"gram", "mean"} and both["summary"]["served"] == "gram"
    cfg = lorm.run_config(s2, base, "lorm_mean", 0, 3e-3)
    assert cfg.fl.options["cross_task"] == "mean" and cfg.fl.strategy == "lorm"
    alone = lorm.run_one(s2, cfg, "lorm", data, pool.caches)
    for name in ("accuracy", "predictions"):
        pd.testing.assert_frame_equal(lorm.view(both, "mean")[name], lorm.view(alone)[name])
    assert not lorm.view(both)["accuracy"].equals(lorm.view(both, "mean")["accuracy"])


def test_the_solve_control_averages_the_trained_factor_and_sends_grams_at_a_tasks_end(tiny):
    from fedbench.experiments import lorm
    from fedbench.fl import FederatedRun
    s, base, pool, data = tiny
    cfg = lorm.run_config(s, base, "lorm_avg", 0, 3e-3)
    assert cfg.fl.options["solve"] == "average" and not cfg.fl.options["merge_check"]
    run = FederatedRun(cfg, data, pool.caches)
    mods = run.strategy.lora.modules
    for r in range(1, 4):
        plan = run.select_clients(r)
        ins = run.configure(plan)
        updates = [run.client_update(c, r, ins[c]) for c in plan.reporting]
        assert all(bool(u.extras) == (r == 3) for u in updates)       # Grams only for the cross-task merge
        run.finish_round(plan, updates, 0.0, instructions=ins)
        if r == 2:                       # an A round: A is the weighted average, B (shared) unchanged
            w = np.array([u.num_samples for u in updates], dtype=float)
            for m in mods:
                want = sum(wi * u.state[m.a_key].double() for wi, u in zip(w / w.sum(), updates))
                torch.testing.assert_close(run.global_model.state[m.a_key].double(), want, rtol=1e-6, atol=1e-8)
    with pytest.raises(ConfigError, match="merge_check"):
        cfg.replace(**{"fl.options": {**cfg.fl.options, "merge_check": True}})
