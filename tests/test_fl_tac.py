"""FL-TAC: the server step (flatten, k-means, silhouette k, cluster-wise FedAvg, scores) against direct
computations, the per-task head masking, parameter errors, and an end-to-end run that reproduces itself."""
import itertools
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedbench.config import ConfigError
from fedbench.fl import clustering as C


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


# -- the experiment -------------------------------------------------------------------------------------

def test_bad_parameters_name_field_and_allowed_values():
    from fedbench.experiments import fl_tac
    bad = [({"tasks": ["rt_sentiment"]}, "tasks"), ({"tasks": ["rt_sentiment", "digits"]}, "tasks"),
           ({"methods": ["fl_tac", "fedprox"]}, "methods"), ({"k": 0}, "k"), ({"cluster_on": "heads"}, "cluster_on"),
           ({"embedding": "mds"}, "embedding"), ({"seeds": [0, 0]}, "seeds"), ({"min_share": 0.5}, "min_share"),
           ({"rounds": 0}, "rounds"), ({"depth": 0}, "depth"), ({"lr": -1.0}, "lr"), ({"colour": 1}, "colour")]
    for overrides, name in bad:
        with pytest.raises(ConfigError) as e:
            fl_tac.settings_for("smoke", **overrides)
        assert e.value.field_name == name and "expected" in str(e.value)
    with pytest.raises(ConfigError, match="profile"):
        fl_tac.settings_for("huge")
    s = fl_tac.settings_for("smoke", methods=["local", "fl_tac"], seeds=3)
    assert s["methods"] == ("fl_tac", "local") and s["seeds"] == (3,)


TINY = dict(tasks=["rt_sentiment", "wordnet_verb"], clients=3, max_train_per_task=24, max_test_per_task=16,
            rounds=2, local_steps=1, batch_size=8, k_max=4)


def test_partition_and_joint_split():
    from fedbench.experiments import fl_tac
    s = fl_tac.settings_for("smoke", **TINY)
    data = fl_tac.prepare_data(s, seed=0)
    assert data.num_classes == [2, 15] and data.offsets == [0, 2]
    # every train example belongs to exactly one (client, task) pair, of its own task
    allidx = np.concatenate(data.pair_indices)
    assert sorted(allidx.tolist()) == list(range(len(data.train)))
    for (c, t), idx in zip(data.pairs, data.pair_indices):
        rows = data.train.class_mask[idx]
        assert rows[:, data.rows(t)].all() and rows.sum(1).eq(data.num_classes[t]).all()
        assert ((data.train.labels[idx] >= data.offsets[t]) &
                (data.train.labels[idx] < data.offsets[t] + data.num_classes[t])).all()
    run = fl_tac.MultiTaskRun(s, 0, data)
    pair_state = OrderedDict(list(run.init_lora.items()) + list(run.head(1).items()))
    full = run.full_state(pair_state, {1: pair_state})
    back = run.split_state(full, 1)
    assert list(back) == list(pair_state) and all(torch.equal(back[k], pair_state[k]) for k in back)
    assert full["classifier.weight"].shape == (17, 384)
    # a state object shared by pairs of two tasks (one cluster) is scored on each task separately
    run.accuracy = lambda state, t: [0.25, 0.75][t]
    run.full_state = lambda state, heads: state
    shared = OrderedDict(list(run.init_lora.items()) + list(run.head(0).items()))
    shared_rows = run._evaluate_pairs(1, [shared] * len(data.pairs), [1] * len(data.pairs))
    assert [r["accuracy"] for r in shared_rows] == [0.25, 0.75]


def test_end_to_end_reproduces_exactly(tmp_path, monkeypatch):
    from fedbench.experiments import fl_tac
    monkeypatch.delenv("FEDBENCH_RESULTS", raising=False)
    tables = []
    for root in ("a", "b"):       # two cold runs in two empty result roots
        monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path / root))
        res = fl_tac.run(profile="smoke", progress=False, **TINY)
        out = tmp_path / root / "fl_tac" / "smoke"
        tables.append({n: (out / n).read_text() for n in ("summary.csv", "clustering.csv", "accuracy_rounds.csv",
                                                          "claims.csv")})
    assert tables[0] == tables[1]
    again = fl_tac.run(profile="smoke", progress=False, **TINY)           # loaded from the run store
    pd.testing.assert_frame_equal(again.summary, res.summary)
    # a method computed alone equals the same method computed after the others (same init, same caches)
    monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path / "c"))
    alone = fl_tac.run(profile="smoke", progress=False, **dict(TINY, methods=["local"]))
    pd.testing.assert_frame_equal(alone.summary, res.summary[res.summary["method"] == "local"].reset_index(drop=True))
    summary = pd.read_csv(tmp_path / "b" / "fl_tac" / "smoke" / "summary.csv")
    assert list(summary.columns) == ["method", "task", "accuracy", "trainable_params_per_client",
                                     "bytes_up_per_round", "seed"]
    assert set(summary["method"]) == set(fl_tac.METHODS) and summary["accuracy"].between(0, 1).all()
    by = summary.groupby("method")
    assert (by["bytes_up_per_round"].first()["local"] == 0) and by["bytes_up_per_round"].first()["fl_tac"] > 0
    # FL-TAC and the oracle train the same per-task adapters; FedIT one adapter per client: fewer parameters
    p = by["trainable_params_per_client"].first()
    assert p["fl_tac"] == p["oracle"] == p["local"] > p["fedit"]
    clu = res.clustering
    assert set(clu["k_mode"]) == {"fixed", "silhouette_probe", "silhouette"}
    assert (clu.loc[clu["k_mode"] == "fixed", "k"] == 2).all()
    assert clu["ari"].between(-1, 1).all() and clu["hungarian_accuracy"].between(0, 1).all()
    assert list(res.claims.columns) == ["claim", "paper", "ours", "agrees"] and len(res.claims) == 2 + 1 + 1 + 2
    emb = pd.read_csv(tmp_path / "b" / "fl_tac" / "smoke" / "adapter_embedding.csv")
    pairs = int(res.runs.loc[res.runs["method"] == "fl_tac", "pairs"].iloc[0])
    assert len(emb) == 2 * 2 * pairs      # (fl_tac, fl_tac_auto) x 2 rounds x every adapter
    assert set(emb["round"]) == {1, 2} and emb[["pc1", "pc2"]].notna().all().all()
    for name in ("accuracy_by_method.png", "ari_vs_round.png", "adapter_evolution.png", "accuracy_vs_rounds.png"):
        assert (tmp_path / "b" / "fl_tac" / "smoke" / name).stat().st_size > 1000
