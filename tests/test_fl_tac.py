"""FL-TAC: the clustering math against direct computations; the strategies on the loop (what travels, per-cluster
FedAvg, FedIT's local_steps // n_tasks, checkpoint/resume, Flower); parameter errors; an end-to-end run that
reproduces itself."""
import itertools
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedbench.config import ConfigError
from fedbench.strategies import clustering as C


def _blobs(n_per=5, k=3, d=12, spread=0.05, seed=0):
    """Adapter states whose flattened vectors form k well-separated blobs; returns (states, true labels)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g, dtype=torch.float64) * 3
    states, labels = [], []
    for c in range(k):
        for _ in range(n_per):
            v = centers[c] + spread * torch.randn(d, generator=g, dtype=torch.float64)
            states.append(OrderedDict(a=v[:8].reshape(2, 4).float(), b=v[8:].reshape(4, 1).float()))
            labels.append(c)
    order = torch.randperm(len(states), generator=g).tolist()
    return [states[i] for i in order], np.array([labels[i] for i in order])


def test_flatten_adapters_concatenates_in_key_order():
    s = [OrderedDict(a=torch.arange(4.).reshape(2, 2), b=torch.tensor([9., 8.])),
         OrderedDict(a=torch.ones(2, 2), b=torch.zeros(2))]
    x = C.flatten_adapters(s)
    assert x.dtype == np.float64 and x.shape == (2, 6)
    np.testing.assert_array_equal(x[0], [0, 1, 2, 3, 9, 8])
    np.testing.assert_array_equal(C.flatten_adapters(s, keys=["b", "a"])[0], [9, 8, 0, 1, 2, 3])
    with pytest.raises(KeyError, match="lacks"):
        C.flatten_adapters([OrderedDict(a=torch.ones(1))], keys=["a", "b"])
    with pytest.raises(ValueError, match="different lengths"):
        C.flatten_adapters([OrderedDict(a=torch.ones(2)), OrderedDict(a=torch.ones(3))])


def test_kmeans_recovers_blobs_and_is_seeded():
    states, true = _blobs()
    x = C.flatten_adapters(states)
    labels = C.kmeans_labels(x, 3, seed=7)
    assert C.adjusted_rand(true, labels) == pytest.approx(1.0)
    np.testing.assert_array_equal(labels, C.kmeans_labels(x, 3, seed=7))
    with pytest.raises(ValueError, match="k must be an int in 1..15"):
        C.kmeans_labels(x, 16, seed=0)
    with pytest.raises(ValueError, match="k must be an int"):
        C.kmeans_labels(x, 0, seed=0)


def test_silhouette_chooses_the_number_of_blobs():
    for k in (2, 3, 4):
        states, _ = _blobs(n_per=4, k=k, seed=k)
        chosen, scores = C.choose_k_silhouette(C.flatten_adapters(states), seed=0, k_max=6)
        assert chosen == k
        assert set(scores) == set(range(2, 7)) and max(scores, key=scores.get) == k
    assert C.choose_k_silhouette(np.zeros((2, 3)), seed=0) == (1, {})
    with pytest.raises(ValueError, match="k_min"):
        C.choose_k_silhouette(np.zeros((5, 3)), seed=0, k_min=1)


def test_groupwise_fedavg_is_the_weighted_mean_of_each_group():
    g = torch.Generator().manual_seed(1)
    states = [OrderedDict(w=torch.randn(3, 2, generator=g)) for _ in range(6)]
    weights = [1, 5, 2, 7, 3, 4]
    groups = ["x", "y", "x", ("z", 1), "y", "x"]
    out = C.groupwise_fedavg(states, weights, groups)
    assert list(out) == ["x", "y", ("z", 1)]
    for grp in out:
        idx = [i for i, gg in enumerate(groups) if gg == grp]
        expected = sum(weights[i] * states[i]["w"].double() for i in idx) / sum(weights[i] for i in idx)
        torch.testing.assert_close(out[grp]["w"].double(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one entry per adapter"):
        C.groupwise_fedavg(states, weights[:-1], groups)


def test_server_step_sends_each_adapter_its_clusters_weighted_mean():
    states, true = _blobs(n_per=4, k=3, seed=3)
    weights = list(range(1, len(states) + 1))
    step = C.server_step(states, weights, k=3, seed=0)
    assert step.k == 3 and C.adjusted_rand(true, step.labels) == pytest.approx(1.0)
    x = C.flatten_adapters(states)
    for i in range(len(states)):
        members = np.flatnonzero(step.labels == step.labels[i])
        w = np.array([weights[j] for j in members], dtype=np.float64)
        expected = (w[:, None] * x[members]).sum(0) / w.sum()
        np.testing.assert_allclose(C.flatten_adapters([step.state_for(i)])[0], expected, atol=1e-5)
    auto = C.server_step(states, weights, k="auto", seed=0, k_max=6)
    assert auto.k == 3 and auto.silhouette and C.adjusted_rand(true, auto.labels) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'auto'"):
        C.server_step(states, weights, k="four", seed=0)


def test_server_step_on_updates_clusters_what_changed_not_where_it_started():
    # two starting points (A, B) x two update directions (u, v): adapters cluster by start, updates by direction
    d = 6
    start = {"A": torch.zeros(d), "B": torch.full((d,), 10.0)}
    move = {"u": torch.eye(d)[0], "v": torch.eye(d)[1]}
    sent, adapters, direction = [], [], []
    for (s, m), rep in itertools.product(itertools.product("AB", "uv"), range(3)):
        sent.append(OrderedDict(w=start[s].clone()))
        adapters.append(OrderedDict(w=start[s] + move[m] + 0.01 * rep))
        direction.append(m)
    by_adapter = C.server_step(adapters, [1] * 12, k=2, seed=0)
    by_update = C.server_step(adapters, [1] * 12, k=2, seed=0, sent=sent)
    assert C.adjusted_rand(direction, by_update.labels) == pytest.approx(1.0)
    assert C.adjusted_rand(direction, by_adapter.labels) < 0.5
    np.testing.assert_allclose(C.server_features(adapters, sent), C.flatten_adapters(adapters) -
                               C.flatten_adapters(sent))


def _hungarian_brute(true, pred):
    tasks, clusters = sorted(set(true)), sorted(set(pred))
    best = 0
    small, large = (clusters, tasks) if len(clusters) <= len(tasks) else (tasks, clusters)
    for perm in itertools.permutations(large, len(small)):
        m = dict(zip(small, perm))
        if len(clusters) <= len(tasks):
            hits = sum(m[p] == t for t, p in zip(true, pred))
        else:
            hits = sum(m[t] == p for t, p in zip(true, pred))
        best = max(best, hits)
    return best / len(true)


def test_hungarian_accuracy_matches_brute_force_and_ari_is_label_invariant():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n_t, n_c = rng.integers(1, 5), rng.integers(1, 6)
        true = rng.integers(0, n_t, size=12)
        pred = rng.integers(0, n_c, size=12)
        assert C.hungarian_accuracy(true, pred) == pytest.approx(_hungarian_brute(true.tolist(), pred.tolist()))
    true = np.array([0, 0, 1, 1, 2, 2])
    relabelled = np.array([5, 5, 3, 3, 9, 9])
    assert C.hungarian_accuracy(true, relabelled) == 1.0
    assert C.adjusted_rand(true, relabelled) == pytest.approx(1.0)
    assert C.hungarian_accuracy(true, np.zeros(6)) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="one length"):
        C.hungarian_accuracy(true, true[:3])


def test_first_stable_round():
    assert C.first_stable_round([1, 2, 3, 4], [0.2, 1.0, 0.5, 1.0]) == 4
    assert C.first_stable_round([1, 2, 3, 4], [0.2, 1.0, 1.0, 1.0]) == 2
    assert C.first_stable_round([3, 1, 2], [1.0, 1.0, 1.0]) == 1
    assert C.first_stable_round([1, 2], [1.0, 0.9]) is None


def test_class_mask_is_one_head_per_task():
    """Masked cross-entropy over the union label space == cross-entropy of each task's own head."""
    from fedbench.fl.client import restrict_logits
    from fedbench.models.inputs import TokenizedSplit
    g = torch.Generator().manual_seed(0)
    sizes, offsets = [2, 3, 4], [0, 2, 5]
    task = torch.tensor([0, 1, 2, 1, 0, 2])
    local = torch.tensor([1, 2, 0, 0, 0, 3])
    labels = torch.tensor([offsets[t] + y for t, y in zip(task.tolist(), local.tolist())])
    mask = torch.zeros(6, 9, dtype=torch.bool)
    for i, t in enumerate(task.tolist()):
        mask[i, offsets[t]:offsets[t] + sizes[t]] = True
    split = TokenizedSplit([torch.ones(3, dtype=torch.long)] * 6, labels, class_mask=mask)
    logits = torch.randn(6, 9, generator=g)
    masked = restrict_logits(logits, split, np.arange(6))
    expected = torch.stack([F.cross_entropy(logits[i, offsets[t]:offsets[t] + sizes[t]][None], local[i:i + 1])
                            for i, t in enumerate(task.tolist())])
    torch.testing.assert_close(F.cross_entropy(masked, labels, reduction="none"), expected)
    assert torch.equal(masked.argmax(-1) - torch.tensor([offsets[t] for t in task.tolist()]),
                       torch.stack([logits[i, offsets[t]:offsets[t] + sizes[t]].argmax()
                                    for i, t in enumerate(task.tolist())]))
    plain = TokenizedSplit(split.input_ids, labels)
    assert restrict_logits(logits, plain, np.arange(6)) is logits


# -- the strategies on the loop ------------------------------------------------------------------------

TINY = {"tasks": ["rt_sentiment", "sms_spam"], "max_train_per_task": 30, "val_per_task": 8, "max_test_per_task": 12,
        "n_init": 2, "seeds": [0, 1], "data.num_clients": 3, "fl.rounds": 2, "train.local_steps": 4,
        "data.max_length": 16}


@pytest.fixture(scope="module")
def tiny():
    from fedbench.experiments import fl_tac
    s, base = fl_tac.settings_for("smoke", **TINY)
    from fedbench.fl.data import build_data
    pool = fl_tac.pool_of(s, base, caches=True)
    return s, base, pool, build_data(fl_tac.run_config(s, base, "fl_tac", 0, 1e-3))


def _cfg(tiny, method, **changes):
    from fedbench.experiments import fl_tac
    s, base, _, _ = tiny
    cfg = fl_tac.run_config(s, base, method, 0, 1e-3)
    return cfg.replace(**changes) if changes else cfg


def test_fl_tac_sends_one_adapter_per_task_and_averages_per_cluster(tiny):
    from fedbench.fl import FederatedRun
    from fedbench.merging.aggregators import fedavg
    _, _, pool, data = tiny
    run = FederatedRun(_cfg(tiny, "fl_tac"), data, pool.caches)
    st = run.strategy
    plan = run.select_clients(1)
    ins = run.configure(plan)
    updates = []
    for c in plan.reporting:
        tasks = [t for t in range(2) if len(data.task_clients[t][c])]
        assert ins[c].options["tasks"] == tasks
        assert list(ins[c].state) == [f"init/{k}" for k in st.keys]        # one copy of what every task starts from
        u = run.client_update(c, 1, ins[c])
        assert list(u.state) == [f"task{t}/{k}" for t in tasks for k in st.keys] == list(ins[c].send_keys)
        assert [int(u.extras[f"n/task{t}"]) for t in tasks] == [len(data.task_clients[t][c]) for t in tasks]
        assert u.num_steps == 4 * len(tasks)                                  # local_steps per task
        assert set(run.store[c]["adapters"]) == {f"t{t}" for t in tasks}      # kept in the client's store
        updates.append(u)
    run.finish_round(plan, updates, 0.0, instructions=ins)
    row = st.cluster_rows[-1]
    assert row["k"] == 2 and row["adapters"] == sum(len(st.tasks_of(c)) for c in plan.reporting)
    # each (client, task) now points at its cluster's sample-weighted mean
    subs = [(u.client_id, t, s, n) for u in updates for t, s, n in st._unpack(u)]
    by_slot = {}
    for c, t, s, n in subs:
        by_slot.setdefault(st.slot_of(c, t), []).append((s, n))
    assert len(by_slot) == 2
    for slot, members in by_slot.items():
        want = fedavg([m[0] for m in members], [m[1] for m in members])
        for k in st.keys:
            torch.testing.assert_close(run.global_model.state[f"{slot}/{k}"], want[k])


def test_guard_and_update_attacks_measure_each_task_adapter_from_where_it_started(tiny):
    from fedbench.fl import FederatedRun
    from fedbench.fl.server import update_norm
    _, _, pool, data = tiny
    run = FederatedRun(_cfg(tiny, "fl_tac"), data, pool.caches)
    plan = run.select_clients(1)
    ins = run.configure(plan)
    c = int(plan.reporting[0])
    u = run.client_update(c, 1, ins[c])
    ref = run.strategy.reference(ins[c])
    assert list(ref) == list(u.state)                                  # every sent key has its start
    want = sum(float(((u.state[k] - ref[k]).double() ** 2).sum()) for k in u.state) ** 0.5
    from_zero = update_norm(u, {})
    assert update_norm(u, ref) == pytest.approx(want) and want < 0.5 * from_zero
    # a bound between the two: the update passes (it was rejected when measured from zero)
    bounded = FederatedRun(_cfg(tiny, "fl_tac", **{"fl.max_update_norm": (want + from_zero) / 2}), data, pool.caches)
    b_plan = bounded.select_clients(1)
    b_ins = bounded.configure(b_plan)
    kept, rejected = bounded.guard([bounded.client_update(c, 1, b_ins[c])], 1, b_ins)
    assert len(kept) == 1 and not rejected
    # an update attack scales the change from the start (sign flip: start - (adapter - start))
    flip = FederatedRun(_cfg(tiny, "fl_tac", **{"fl.attack": "sign_flip", "fl.attack_fraction": 0.5}),
                        data, pool.caches)
    a = sorted(flip.attackers)[0]
    a_ins = flip.strategy.configure_round(1, [a], flip.global_model)[0]
    honest = flip.strategy.client_update(flip, a_ins, {})
    attacked = flip.client_update(a, 1, a_ins, store={})
    f_ref = flip.strategy.reference(a_ins)
    for k in attacked.state:
        torch.testing.assert_close(attacked.state[k] - f_ref[k], -(honest.state[k] - f_ref[k]))


def test_oracle_groups_by_task_local_keeps_every_adapter_and_fedit_splits_its_steps(tiny):
    from fedbench.fl import FederatedRun
    _, _, pool, data = tiny
    oracle = FederatedRun(_cfg(tiny, "oracle"), data, pool.caches)
    oracle.run_round(1)
    assert set(oracle.strategy.assign.values()) == {"task0", "task1"}
    local = FederatedRun(_cfg(tiny, "local"), data, pool.caches)
    local.run_round(1)
    for p, slot in local.strategy.assign.items():
        c, t = map(int, p.split(":"))
        sent = local.store[c]["adapters"][f"t{t}"]
        assert all(torch.equal(local.global_model.state[f"{slot}/{k}"], v) for k, v in sent.items())
    fedit = FederatedRun(_cfg(tiny, "fedit"), data, pool.caches)
    plan = fedit.select_clients(1)
    ins = fedit.configure(plan)
    for c in plan.reporting:
        u = fedit.client_update(c, 1, ins[c])
        n = len(fedit.strategy.tasks_of(c))
        assert u.num_steps == n * max(1, 4 // n) and list(u.state) == [f"shared/{k}" for k in fedit.strategy.keys]


def test_compute_matched_fedit_trains_fl_tacs_steps_per_task_on_one_adapter(tiny):
    """fedit_matched: local_steps on each task in turn (FL-TAC's steps per (client, task)), one adapter up; with a
    single task held it is the official FedIT exactly; a bad steps_per_task names the option."""
    from fedbench.fl import FederatedRun
    _, _, pool, data = tiny
    runs = {m: FederatedRun(_cfg(tiny, m), data, pool.caches) for m in ("fedit_matched", "fedit", "fl_tac")}
    assert runs["fedit_matched"].cfg.fl.options == {"steps_per_task": "matched"}
    assert runs["fedit"].cfg.fl.options == {"steps_per_task": "split"}
    plan = runs["fedit"].select_clients(1)
    multi = 0
    for c in plan.reporting:
        ups = {m: r.client_update(c, 1, r.configure(plan)[c]) for m, r in runs.items()}
        n = len(runs["fedit"].strategy.tasks_of(c))
        assert ups["fedit_matched"].num_steps == ups["fl_tac"].num_steps == 4 * n
        assert list(ups["fedit_matched"].state) == [f"shared/{k}" for k in runs["fedit"].strategy.keys]
        same = all(torch.equal(ups["fedit_matched"].state[k], ups["fedit"].state[k]) for k in ups["fedit"].state)
        assert same == (n == 1)            # more tasks: 4 steps each instead of 4 // n
        multi += n > 1
    assert multi                           # the tiny federation has a client with both tasks
    with pytest.raises(ConfigError) as e:
        _cfg(tiny, "fedit", **{"fl.options": {"steps_per_task": "all"}})
    assert e.value.field_name == "fl.options.steps_per_task"


def test_resume_from_a_checkpoint_is_bit_identical(tiny, tmp_path):
    from fedbench.fl.server import run_federated
    _, _, pool, data = tiny
    cfg = _cfg(tiny, "fl_tac", **{"fl.rounds": 3})
    whole = run_federated(cfg, data, caches=pool.caches)
    run_federated(cfg, data, caches=pool.caches, checkpoint_dir=tmp_path, stop_after=1)
    resumed = run_federated(cfg, data, caches=pool.caches, checkpoint_dir=tmp_path)
    pd.testing.assert_frame_equal(whole.rounds.drop(columns="wall_s"), resumed.rounds.drop(columns="wall_s"))
    for name in ("clustering", "accuracy", "embedding"):
        pd.testing.assert_frame_equal(pd.DataFrame(whole.summary["fl_tac"][name]),
                                      pd.DataFrame(resumed.summary["fl_tac"][name]), check_like=True)
    assert whole.summary["fl_tac"]["val_predictions"] == resumed.summary["fl_tac"]["val_predictions"]
    np.testing.assert_array_equal(whole.correct, resumed.correct)


def test_strategies_accept_dp_dropout_and_sampling_by_config(tiny):
    from fedbench.fl.server import run_federated
    _, _, pool, data = tiny
    dp = {"enabled": True, "noise_multiplier": 0.7, "max_grad_norm": 1.0, "delta": 1e-5}
    res = run_federated(_cfg(tiny, "fl_tac", **{"train.dp": dp, "fl.dropout": 0.3, "fl.clients_per_round": 2}),
                        data, caches=pool.caches)
    assert res.summary["dp_epsilon_spent"] > 0 and (res.rounds["clients_sampled"] == 2).all()


def test_on_flower_message_api_equals_in_process(tiny):
    pytest.importorskip("flwr")
    from test_flower import LocalGrid

    from fedbench.engines import flower as fl_engine
    from fedbench.fl import FederatedRun
    _, _, pool, data = tiny
    cfg = _cfg(tiny, "fl_tac")
    ref = FederatedRun(cfg, data)
    for r in (1, 2):
        ref.run_round(r)
    fl_engine.client_runtime(cfg, data)
    run = fl_engine.server_main(LocalGrid(cfg.data.num_clients), cfg, data=data)
    cols = ["round", "clients_sampled", "bytes_up", "bytes_down", "local_steps"]
    pd.testing.assert_frame_equal(pd.DataFrame(run.records)[cols], pd.DataFrame(ref.records)[cols])
    assert run.strategy.assign == ref.strategy.assign
    for k, v in ref.global_model.state.items():
        torch.testing.assert_close(run.global_model.state[k], v, rtol=0, atol=1e-6)


def _heads_run(tiny, method, k=None):
    """A run of the task-head arm (one head per task) on the tiny federation; `k` forces FL-TAC's k."""
    from fedbench.experiments import fl_tac
    from fedbench.fl import FederatedRun
    from fedbench.fl.data import build_data
    s, base, pool, _ = tiny
    data = build_data(fl_tac.run_config(s, base, "fl_tac_heads", 0, 1e-3))
    cfg = _cfg(tiny, method) if k is None else _cfg(tiny, method, **{"fl.options.k": k})
    return FederatedRun(cfg, data, pool.caches), data


def _one_round(run):
    plan = run.select_clients(1)
    ins = run.configure(plan)
    updates = [run.client_update(c, 1, ins[c]) for c in plan.reporting]
    before = run.global_model
    run.finish_round(plan, updates, 0.0, instructions=ins)
    return updates, before


def test_task_heads_are_averaged_per_task_never_per_cluster(tiny):
    """k = 1 puts every adapter in one cluster: a per-cluster head average would mix task t's trained rows
    with the untouched rows of the other tasks' adapters; the heads must be the FedAvg over task t's holders."""
    from fedbench.merging.aggregators import fedavg
    run, data = _heads_run(tiny, "fl_tac_heads", k=1)
    st = run.strategy
    assert data.head_rows == [(0, 2), (2, 4)] and data.num_labels == 4
    assert st.head_keys == ["classifier.weight", "classifier.bias"] and not set(st.head_keys) & set(st.cluster_keys)
    updates, _ = _one_round(run)
    subs = [(u.client_id, t, a, n) for u in updates for t, a, n in st._unpack(u)]
    slots = sorted({st.slot_of(c, t) for c, t, _, _ in subs})
    assert len(slots) == 1 and st.cluster_rows[-1]["k"] == 1
    for t, (a, b) in enumerate(data.head_rows):
        mine = [(x, n) for _, tt, x, n in subs if tt == t]
        want = fedavg([OrderedDict((k, x[k][a:b]) for k in st.head_keys) for x, _ in mine], [n for _, n in mine])
        cluster = fedavg([OrderedDict((k, x[k][a:b]) for k in st.head_keys) for _, _, x, _ in subs],
                         [n for *_, n in subs])
        for slot in slots + ["init"]:            # every slot carries every task's head, the init slot too
            for k in st.head_keys:
                got = run.global_model.state[f"{slot}/{k}"][a:b]
                torch.testing.assert_close(got, want[k])
                assert not torch.allclose(got, cluster[k])     # what a per-cluster head would have been
    # the LoRA factors are averaged per cluster as in the paper arm
    lora = [k for k in st.keys if k not in st.head_keys]
    want = fedavg([OrderedDict((k, x[k]) for k in lora) for _, _, x, _ in subs], [n for *_, n in subs])
    for k in lora:
        torch.testing.assert_close(run.global_model.state[f"{slots[0]}/{k}"], want[k])


def test_fedit_with_task_heads_weights_each_head_by_its_tasks_samples(tiny):
    from fedbench.merging.aggregators import fedavg
    run, data = _heads_run(tiny, "fedit_heads")
    st = run.strategy
    updates, _ = _one_round(run)
    for t, (a, b) in enumerate(data.head_rows):
        holders = [u for u in updates if len(data.task_clients[t][u.client_id])]
        assert all(int(u.extras[f"n/task{t}"]) == len(data.task_clients[t][u.client_id]) for u in holders)
        want = fedavg([OrderedDict((k, u.state[f"shared/{k}"][a:b]) for k in st.head_keys) for u in holders],
                      [len(data.task_clients[t][u.client_id]) for u in holders])
        for k in st.head_keys:
            torch.testing.assert_close(run.global_model.state[f"shared/{k}"][a:b], want[k])
    # each task is scored with its own head: every prediction of a task-t row lies in task t's rows
    out = st.evaluate(run, run.global_model, predictions=True)
    pred = dict(zip(out["predictions"]["test_index"].tolist(), out["predictions"]["prediction"].tolist()))
    for t, (a, b) in enumerate(data.head_rows):
        assert all(a <= pred[int(i)] < b for i in data.task_test[t])
        assert set(data.test.labels[torch.as_tensor(data.task_test[t])].tolist()) <= set(range(a, b))


def test_update_clustering_clusters_what_changed_this_round(tiny):
    from fedbench.fl import FederatedRun
    s, base, pool, data = tiny
    cfg = _cfg(tiny, "fl_tac_update")
    assert cfg.fl.options["cluster_on"] == "update"          # the server's option is in the run config
    run = FederatedRun(cfg, data, pool.caches)
    run.run_round(1)
    st = run.strategy
    plan = run.select_clients(2)
    ins = run.configure(plan)
    updates = [run.client_update(c, 2, ins[c]) for c in plan.reporting]
    subs = [(u.client_id, t, a, n) for u in updates for t, a, n in st._unpack(u)]
    x = st._features(run.global_model, subs)
    sent = C.flatten_adapters([st.slot(run.global_model, st.slot_of(c, t)) for c, t, _, _ in subs], keys=st.keys)
    np.testing.assert_allclose(x, C.flatten_adapters([a for _, _, a, _ in subs], keys=st.keys) - sent)
    run.finish_round(plan, updates, 0.0, instructions=ins)
    assert [r["round"] for r in st.cluster_rows] == [1, 2]
    assert all(0 <= r["hungarian_accuracy"] <= 1 and -1 <= r["ari"] <= 1 for r in st.cluster_rows)


def test_embedding_is_umap_when_importable_else_pca(monkeypatch):
    import sys
    x = np.random.default_rng(0).normal(size=(12, 30))
    if C.embedding_method("auto") == "umap":
        a, used = C.embed_2d(x, "umap", seed=5)
        b, _ = C.embed_2d(x, "umap", seed=5)
        assert used == "umap" and a.shape == (12, 2)
        np.testing.assert_array_equal(a, b)                       # seeded: a rerun is identical
    assert C.embed_2d(x[:C.UMAP_MIN_POINTS - 1], "umap", seed=5)[1] == "pca"   # too few points for a graph
    z, used = C.embed_2d(x, "pca", seed=5)
    assert used == "pca" and z.shape == (12, 2)
    monkeypatch.setitem(sys.modules, "umap", None)                # umap-learn absent: PCA
    assert C.embedding_method("auto") == "pca" and C.embedding_method("umap") == "umap"
    with pytest.raises(ValueError, match="embedding must be one of"):
        C.embedding_method("tsne")


def test_changed_clusters_matches_clusters_across_renumbering():
    from fedbench.strategies.fl_tac import changed_count
    assert changed_count([0, 0, 1, 1], [1, 1, 0, 0]) == 0
    assert changed_count([0, 0, 1, 1], [1, 1, 0, 1]) == 1


# -- the experiment -------------------------------------------------------------------------------------

def test_bad_parameters_name_field_and_allowed_values():
    from fedbench.experiments import fl_tac
    bad = [({"tasks": ["rt_sentiment"]}, "tasks"), ({"tasks": ["rt_sentiment", "ng20"]}, "tasks"),
           ({"methods": ["fl_tac", "fedprox"]}, "methods"), ({"k": 0}, "k"), ({"seeds": [0, 0]}, "seeds"),
           ({"min_share": 0.5}, "min_share"), ({"lr_grid": [-1.0]}, "lr_grid"), ({"colour": 1}, "colour"),
           ({"peft.method": "head", "peft.depth": None}, "peft.method"), ({"embedding": "tsne"}, "embedding"),
           ({"silhouette_n_init": 0}, "silhouette_n_init"), ({"lr_extend": -1}, "lr_extend"),
           ({"lr_extend": 1, "lr_grid": [1e-3]}, "lr_grid"), ({"seeds_per_method": {"fedit": 3}}, "seeds_per_method"),
           ({"seeds_per_method": {"fedprox": 1}}, "seeds_per_method"), ({"lr_grids": {"local": []}}, "lr_grids"),
           ({"lr_grids": {"local": [1e-3]}, "lr_extend": 1, "lr_grid": [1e-3, 2e-3]}, "lr_grids"), ({"lr_grids": {"x": [1e-3]}}, "lr_grids")]
    for overrides, name in bad:
        with pytest.raises(ConfigError) as e:
            fl_tac.settings_for("smoke", **overrides)
        assert e.value.field_name == name, (overrides, e.value.field_name)
    with pytest.raises(ConfigError, match="profile"):
        fl_tac.settings_for("huge")
    s, _ = fl_tac.settings_for("smoke", methods=["local", "fl_tac"], seeds=[3])
    assert s.methods == ("fl_tac", "local") and s.seeds == (3,)
    s, _ = fl_tac.settings_for("smoke", seeds=[4, 2, 7], seeds_per_method={"oracle": 2})
    assert s.seeds_of("oracle") == (4, 2) and s.seeds_of("fl_tac") == (4, 2, 7)


def test_lr_choice_at_a_grid_edge_is_bracketed_on_validation():
    """choose_lr scores one grid step beyond an edge choice (lr_extend times at most), on the first seed only."""
    from types import SimpleNamespace

    from fedbench.experiments import fl_tac
    val = {1e-3: 0.60, 2e-3: 0.70, 4e-3: 0.75, 8e-3: 0.65}      # rises past the grid's top, then falls
    calls = []

    def get(method, seed, lr):
        calls.append((method, seed, lr))
        pred = np.zeros(100, dtype=int)
        pred[: int(round(100 * val[round(lr, 10)]))] = 1
        res = SimpleNamespace(summary={"fl_tac": {"val_predictions": {"label": [1] * 100, "prediction": pred}}})
        return res, f"run{lr:g}"
    s, _ = fl_tac.settings_for("smoke", lr_grid=[1e-3, 2e-3], lr_extend=3, seeds=[5, 6])
    best, rows = fl_tac.choose_lr(s, "fedit", get)
    assert best == pytest.approx(4e-3) and [r["extension"] for r in rows] == [0, 0, 1, 2]
    assert {c[1] for c in calls} == {5} and not rows[0]["chosen_at_grid_edge"]
    assert [r["run"] for r in rows] == ["run0.001", "run0.002", "run0.004", "run0.008"]
    s, _ = fl_tac.settings_for("smoke", lr_grid=[1e-3, 2e-3], seeds=[5])       # lr_extend 0: the grid as it is
    best, rows = fl_tac.choose_lr(s, "fedit", get)
    assert best == pytest.approx(2e-3) and len(rows) == 2 and rows[0]["chosen_at_grid_edge"]
    s, _ = fl_tac.settings_for("smoke", lr_grid=[1e-3], lr_grids={"local": [2e-3, 4e-3, 8e-3]}, seeds=[5])
    best, rows = fl_tac.choose_lr(s, "local", get)                       # a method's own grid: bracketed inside it
    assert best == pytest.approx(4e-3) and [r["lr"] for r in rows] == [2e-3, 4e-3, 8e-3]
    assert fl_tac.choose_lr(s, "fedit", get)[0] == pytest.approx(1e-3)   # the others keep lr_grid


def test_tweet_polarity_is_tweet_sentiment_without_neutral():
    from fedbench.data import load_task
    from fedbench.fl.federations import load_binary
    ds, src = load_binary("tweet_polarity"), load_task("tweet_sentiment")
    lab = src["test"].with_format("numpy")["label"][:]
    assert len(ds["test"]) == int((lab != 1).sum()) >= 1000
    assert set(ds["test"].with_format("numpy")["label"][:].tolist()) == {0, 1}


def test_end_to_end_reproduces_exactly(tmp_path, monkeypatch):
    from fedbench.experiments import fl_tac
    from fedbench.bench import output_dir
    monkeypatch.delenv("FEDBENCH_RESULTS", raising=False)
    names = ("summary.csv", "clustering.csv", "accuracy_rounds.csv", "claims.csv", "adapter_embedding.csv")
    tables = []
    for root in ("a", "b"):       # two cold runs in two empty result roots
        monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path / root))
        res = fl_tac.run(profile="smoke", progress=False, **TINY)
        out = output_dir("fl_tac", "smoke", overrides=TINY)       # overrides: its own custom-<hash>/ folder
        tables.append({n: (out / n).read_text() for n in names})
    assert tables[0] == tables[1]
    again = fl_tac.run(profile="smoke", progress=False, **TINY)           # loaded from the run store
    pd.testing.assert_frame_equal(again.summary, res.summary)
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns)[:5] == ["method", "arm", "task", "seed", "accuracy"]
    assert set(summary["method"]) == set(fl_tac.METHODS) and summary["accuracy"].between(0, 1).all()
    assert set(summary["task"]) == {"rt_sentiment", "sms_spam", "mean"}
    arms = summary.groupby("method")["arm"].unique().map(list).to_dict()
    assert arms == {m: ["task heads" if m in fl_tac.HEADS else "shared head"] for m in fl_tac.METHODS}
    emb = pd.read_csv(out / "adapter_embedding.csv")
    assert {"dim1", "dim2", "embedding"} <= set(emb.columns) and set(emb["embedding"]) <= {"umap", "pca"}
    clu = pd.read_csv(out / "clustering.csv")
    for col in ("round", "seed", "ari", "hungarian_accuracy", "k_silhouette", "changed_clusters"):
        assert col in clu.columns
    assert set(clu["method"]) == {"fl_tac", "fl_tac_update", "fl_tac_heads"} and (clu["k"] == 2).all()
    assert clu.loc[clu["round"] == 1, "changed_clusters"].isna().all()
    assert clu.loc[clu["round"] == 2, "changed_clusters"].notna().all()
    assert {"estimate", "ci_low", "ci_high", "verdict", "role", "n_seeds"} <= set(res.claims.columns)
    assert list(res.claims["claim"][:2]) == list(fl_tac.PRIMARY) and set(res.claims["role"][:2]) == {"primary"}
    # FL-TAC, oracle, local and the compute-matched FedIT train n_tasks x FedIT's steps; every method is scored on
    # the same test rows
    steps = res.runs.groupby("method")["local_steps_per_round"].mean()
    assert steps["fl_tac"] == steps["oracle"] == steps["local"] == steps["fedit_matched"] > steps["fedit"]
    ari = pd.read_csv(out / "ari_rounds.csv")
    assert list(ari["round"][ari["method"] == "fl_tac"]) == [1, 2] and (ari["n_seeds"] == 2).all()
    assert {m: c.shape for m, c in res.correct.items()} == {m: (2, 24) for m in fl_tac.METHODS}
    assert (out / "PROTOCOL.md").exists() and (out / "REPORT.md").exists()


def test_a_run_built_from_its_config_alone_equals_the_experiments(tiny):
    """The experiment shares one pool and its prefilled caches across runs; the same config run alone builds its
    own data and caches (data.federation) and gives the same numbers."""
    from fedbench.fl.server import run_federated
    _, _, pool, data = tiny
    cfg = _cfg(tiny, "fl_tac")
    shared = run_federated(cfg, data, caches=pool.caches)
    alone = run_federated(cfg)
    pd.testing.assert_frame_equal(alone.rounds.drop(columns="wall_s"), shared.rounds.drop(columns="wall_s"))
    assert np.array_equal(alone.correct, shared.correct)


def test_claims_primary_first_and_the_oracle_gate():
    """FL-TAC vs compute-matched FedIT and vs local are the primary family (Holm); "as good as the oracle" is decided
    only when the oracle beats the compute-matched FedIT; a method on fewer seeds is paired on the seeds it ran."""
    from types import SimpleNamespace

    from fedbench.claims import check_table
    from fedbench.experiments import fl_tac as ft
    rng = np.random.default_rng(0)
    task_of = np.repeat([0, 1], 200)
    fedit = (rng.random((5, 400)) < 0.6).astype(int)
    local = (rng.random((5, 400)) < 0.55).astype(int)
    s = SimpleNamespace(tasks=["a", "b"])

    def claims(oracle, **extra):
        correct = {"fl_tac": oracle.copy(), "fedit_matched": fedit, "oracle": oracle, "local": local, **extra}
        seeds = {m: list(range(len(v))) for m, v in correct.items()}
        return check_table(ft.compute_claims(s, None, pd.DataFrame(), correct, task_of, seeds)).set_index("claim")

    same = claims(fedit.copy())                                  # the oracle no better than FedIT
    assert list(same.index[:2]) == list(ft.PRIMARY) and list(same["role"][:2]) == ["primary"] * 2
    assert (same["role"][2:] == "exploratory").all()
    near = "FL-TAC is as good as perfect clustering (within 0.02)"
    assert same.loc[near, "verdict"] == "not interpretable: reference does not beat compute-matched FedIT (exploratory)"
    oracle = np.maximum(fedit, (rng.random((5, 400)) < 0.5).astype(int))
    better = claims(oracle, fedit=fedit[:3] * 0)
    assert better.loc[near, "verdict"] == "agrees (exploratory)"        # fl_tac = oracle: within 0.02
    assert better.loc[ft.PRIMARY[0], "verdict"] == "agrees"              # primary, 5 seeds, Holm m=2
    assert better.loc[ft.PRIMARY[0], "p_holm"] >= better.loc[ft.PRIMARY[0], "p_value"]
    official = "FL-TAC beats FedIT with the official split of steps (mean over tasks)"
    assert better.loc[official, "n_seeds"] == 3                          # fedit ran the first 3 seeds only
    from fedbench.claims import paired_accuracy_difference
    want = paired_accuracy_difference(oracle[:3], fedit[:3] * 0, "x", "y")          # FL-TAC's first 3 seeds
    assert better.loc[official, ["estimate", "ci_low", "ci_high"]].tolist() == pytest.approx(
        [want.estimate, want.ci_low, want.ci_high])


def test_method_table_validates_against_the_strategy_registry():
    """Every method is a registered strategy with options it takes and an lr source that chooses its own; its run
    config carries exactly that strategy and those options; a bad fact is a ConfigError naming the method's field."""
    from fedbench.experiments import fl_tac
    from fedbench.experiments.fl_tac.plan import Method, check_methods
    check_methods()
    s, base = fl_tac.settings_for("smoke")
    for name, m in fl_tac.METHODS.items():
        cfg = fl_tac.run_config(s, base, name, 0, 1e-3)
        assert cfg.fl.strategy == m.strategy and m.options.items() <= dict(cfg.fl.options).items()
        assert cfg.data.federation_options["heads"] == m.heads == (name in fl_tac.HEADS)
    bad = [({"x": Method("no_such_strategy", "x")}, "methods.x.strategy"),
           ({"x": Method("fl_tac_local", "x", {"cluster_on": "update"})}, "methods.x.options"),
           ({"x": Method("fedit_tasks", "x", {"k": 2})}, "methods.x.options"),
           ({"a": Method("fl_tac", "a", lr_from="b"), "b": Method("fl_tac", "b", lr_from="a")}, "methods.a.lr_from"),
           ({"a": Method("fl_tac", "a", lr_from="nope")}, "methods.a.lr_from")]
    for table, name in bad:
        with pytest.raises(ConfigError) as e:
            check_methods(table)
        assert e.value.field_name == name


def test_protocol_fills_schedule_grids_lrs_and_claims_from_settings_and_outputs():
    """PROTOCOL.md's "ours" column: the schedule and grids from the settings, the lr choices from lr_selection,
    the steps from runs and the measured gaps from claims; hand-measured calibration only below the table."""
    from fedbench.experiments import fl_tac
    s, base = fl_tac.settings_for("quick", **{"fl.rounds": 7, "train.local_steps": 9})
    lr = pd.DataFrame([
        {"method": "fl_tac", "lr": 0.004, "val_accuracy": 0.5, "run": "a", "extension": 0.0, "chosen": False,
         "chosen_at_grid_edge": False},
        {"method": "fl_tac", "lr": 0.0123, "val_accuracy": 0.8125, "run": "b", "extension": 0.0, "chosen": True,
         "chosen_at_grid_edge": False},
        {"method": "local", "lr": 0.0777, "val_accuracy": 0.6875, "run": "c", "extension": 1.0, "chosen": True,
         "chosen_at_grid_edge": True},
        {"method": "oracle", "lr": 0.0123, "val_accuracy": 0.9375, "run": "from fl_tac", "extension": np.nan,
         "chosen": True, "chosen_at_grid_edge": np.nan}])
    claims = pd.DataFrame([
        {"comparison": "fl_tac - local, every test example", "estimate": 0.0321, "ci_low": -0.0111, "ci_high": 0.0654,
         "n_seeds": 5, "role": "primary", "verdict": "inconclusive"},
        {"comparison": "oracle - local, every test example", "estimate": -0.0432, "ci_low": -0.09, "ci_high": 0.01,
         "n_seeds": 3, "role": "exploratory", "verdict": "inconclusive (exploratory)"}])
    runs = pd.DataFrame({"method": ["fl_tac", "fl_tac", "fedit"], "local_steps_per_round": [101.0, 111.0, 37.0]})
    text = fl_tac.protocol(s, base, "quick", lr, claims, runs)
    table, calibration = text.split("## Calibration")
    ours = {line.split(" | ")[0][2:]: line.split(" | ")[3] for line in table.splitlines() if line.startswith("| ")}
    assert "7 rounds x 9 steps" in ours["rounds x local steps"] and "`fedit`) 2-9 steps" in ours["rounds x local steps"]
    assert "[0.004, 0.008, 0.016]" in ours["optimizer, lr"] and "`local` from [0.001, 0.002, 0.004]" in ours["optimizer, lr"]
    assert "`fl_tac` 0.0123 (inside the values scored; validation 0.812)" in ours["optimizer, lr"]
    assert "`local` 0.0777 (at an edge of the values scored, an extension" in ours["optimizer, lr"]
    assert "`oracle` 0.0123 (from fl_tac's; first-seed validation 0.938)" in ours["optimizer, lr"]
    assert "FL-TAC - local +0.032 [-0.011, 0.065] (5 seeds" in ours["data per client (regime)"]
    assert "oracle - local -0.043 [-0.090, 0.010] (3 seeds" in ours["data per client (regime)"]
    assert "`fl_tac` 707-777, `fedit` 259" in ours["budget (optimizer steps per seed, all clients)"]
    assert "{" not in table and "}" not in table
    assert "0.738" not in table and "0.738 vs 0.696" in calibration       # hand-measured: labelled, out of the table
    assert fl_tac.protocol(s, base, "quick", lr.iloc[:0], claims.iloc[:0], runs.iloc[:0]).count("no runs yet") == 1
