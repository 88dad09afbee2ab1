"""The federated loop end to end on a real task (tiny), byte accounting, determinism, LoRA semantics."""
import numpy as np
import pytest
import torch

from fedbench.config import DataConfig, ExperimentConfig, FLConfig, PeftConfig, TrainConfig
from fedbench.fl import FederatedRun, evaluate, prepare_data, run_federated, sample_clients, train_client
from fedbench.fl.seeding import derive_seed
from fedbench.models import lora_delta, lora_modules, state_nbytes


def tiny(method="lora", **changes):
    cfg = ExperimentConfig(
        name="tiny", seed=0,
        data=DataConfig(task="rt_sentiment", num_clients=3, alpha=1.0, max_train_samples=96, max_test_samples=64,
                        max_length=32),
        peft=PeftConfig(method=method, rank=4, depth=2 if method in ("lora", "adapter") else None),
        train=TrainConfig(local_steps=2, batch_size=16, lr=2e-3),
        fl=FLConfig(rounds=2))
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(scope="module")
def data():
    return prepare_data(tiny())


@pytest.mark.parametrize("method", ["full", "head", "bitfit", "lora", "adapter", "prompt"])
def test_end_to_end_each_peft_method(method, data):
    res = run_federated(tiny(method), data)
    r = res.rounds
    assert list(r["round"]) == [1, 2] and r["accuracy"].between(0, 1).all()
    # exact bytes: every reporting client sends its whole trainable state; the server sends it back
    state_bytes = res.summary["state_bytes"]
    assert (r["bytes_up"] == 3 * state_bytes).all() and (r["bytes_down"] == 3 * state_bytes).all()
    assert state_bytes == 4 * res.summary["trainable_params"]          # float32
    assert res.summary["total_bytes"] == r["bytes_up"].sum() + r["bytes_down"].sum()


def test_trainable_parameter_counts_are_what_the_method_says(data):
    run = FederatedRun(tiny("head"), data)
    assert set(run.global_model.state) == {"classifier.weight", "classifier.bias"}
    run = FederatedRun(tiny("lora"), data)
    mods = lora_modules(run.model)
    assert len(mods) == 4 and all(".layer.4." in m.name or ".layer.5." in m.name for m in mods)
    assert run.model.frozen_prefix == 4
    lora_params = sum(run.global_model.state[m.a_key].numel() + run.global_model.state[m.b_key].numel() for m in mods)
    assert lora_params == 4 * 4 * (384 + 384)
    full = FederatedRun(tiny("full"), data)
    assert state_nbytes(run.global_model.state) < 0.02 * state_nbytes(full.global_model.state)


def test_same_config_same_seed_identical_metrics(data):
    a = run_federated(tiny("lora"), data)
    b = run_federated(tiny("lora"), data)
    cols = [c for c in a.rounds.columns if c != "wall_s"]
    assert a.rounds[cols].equals(b.rounds[cols])
    c = run_federated(tiny("lora", seed=1), data)
    assert not a.rounds["train_loss"].equals(c.rounds["train_loss"])


def test_activation_cache_gives_the_same_training(data):
    cfg = tiny("lora")
    run = FederatedRun(cfg, data)
    state0 = run.global_model.state
    seed = derive_seed(0, "client", 1, 0)
    with_cache = train_client(run.model, state0, data.train, data.client_indices[0], cfg.train, seed,
                              cache=run.train_cache, pad_id=data.pad_id)
    without = train_client(run.model, state0, data.train, data.client_indices[0], cfg.train, seed,
                           cache=None, pad_id=data.pad_id)
    for k in with_cache.state:
        torch.testing.assert_close(with_cache.state[k], without.state[k], atol=1e-5, rtol=1e-4)


def test_sampling_and_dropout_are_seeded_and_counted(data):
    cfg = tiny("head", **{"fl.clients_per_round": 2, "fl.dropout": 0.5, "fl.rounds": 4})
    a, b = run_federated(cfg, data), run_federated(cfg, data)
    assert (a.rounds["clients_sampled"] == 2).all()
    assert a.rounds["clients_dropped"].equals(b.rounds["clients_dropped"])
    reporting = a.rounds["clients_sampled"] - a.rounds["clients_dropped"]
    assert (a.rounds["bytes_up"] == reporting * a.summary["state_bytes"]).all()
    rng = np.random.default_rng(0)
    assert len(sample_clients(10, 0.3, rng)) == 3 and len(sample_clients(10, 4, rng)) == 4


@pytest.mark.parametrize("semantics", ["factors", "stack", "svd"])
def test_lora_semantics_in_the_loop_against_dense_math(semantics, data):
    cfg = tiny("lora", **{"fl.lora_aggregation": semantics, "fl.rounds": 1})
    run = FederatedRun(cfg, data)
    updates = [run.client_update(c, 1) for c in range(3)]
    weights = np.array([u.num_samples for u in updates], dtype=float)
    p = weights / weights.sum()
    new = run.strategy.aggregate(run.global_model, updates, 1)
    down = new.nbytes_down()
    for m in lora_modules(run.model):
        exact = sum(pi * lora_delta(u.state, m).double() for pi, u in zip(p, updates))
        got = lora_delta(new.state, m).double() + new.base_delta.get(m.base_key, 0)
        if semantics == "factors":
            mean_b = sum(pi * u.state[m.b_key].double() for pi, u in zip(p, updates))
            mean_a = sum(pi * u.state[m.a_key].double() for pi, u in zip(p, updates))
            torch.testing.assert_close(got, m.scaling * mean_b @ mean_a, atol=1e-5, rtol=0)
        else:   # stack and svd (rank of 3 clients x r=4 <= 12 > 4: svd is the best rank-4 approximation)
            if semantics == "stack":
                torch.testing.assert_close(got, exact, atol=1e-5, rtol=0)
                assert new.state[m.b_key].abs().max() == 0      # product folded into the base weight
            else:
                u_, s_, vh = torch.linalg.svd(exact / m.scaling)
                best = m.scaling * (u_[:, :4] * s_[:4]) @ vh[:4]
                torch.testing.assert_close(got, best, atol=1e-5, rtol=0)
    if semantics == "stack":   # stacked factors travel down: rank 3 x 4 per module
        assert down > state_nbytes(new.state)
    # the model loaded with the new global state computes with W0 + merged delta
    from fedbench.fl.server import load_global
    load_global(run.model, new, run.base)
    assert evaluate(run.model, data.test, data.test_indices[:16])["n"] == 16


def test_fedprox_term_pulls_towards_the_global_state(data):
    cfg = tiny("head")
    run = FederatedRun(cfg, data)
    s0 = run.global_model.state
    seed = derive_seed(0, "client", 1, 0)
    plain = train_client(run.model, s0, data.train, data.client_indices[0], cfg.train, seed)
    prox_cfg = cfg.replace(**{"train.prox_mu": 100.0}).train
    prox = train_client(run.model, s0, data.train, data.client_indices[0], prox_cfg, seed)
    dist = lambda u: sum(((u.state[k] - s0[k]) ** 2).sum() for k in s0)  # noqa: E731
    assert dist(prox) < dist(plain)


def test_robust_aggregators_and_server_optimizers_run(data):
    for agg in ["median", "trimmed_mean", "fedavgm", "fedadam"]:
        res = run_federated(tiny("head", **{"fl.aggregator": agg, "fl.server_lr": 0.5}), data)
        assert res.rounds["accuracy"].notna().all()
