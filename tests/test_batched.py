"""Batched clients (fl.client_batching) equal sequential training, and the config refuses what batching lacks.

Every tuner of the registry, clients of unequal sizes (quantity skew) so that their local step counts differ
(1 local epoch each), with and without the frozen-prefix cache; FedProx and gradient clipping; attackers.
Batched and sequential runs agree within fp32 tolerance on every client's state and loss and on the round
records.

The tuner matrix trains with SGD + momentum: Adam divides each gradient entry by its own magnitude, so an
entry whose gradient is zero in exact arithmetic (a key-projection bias: softmax ignores a constant per row;
float noise ~1e-10) moves by lr * noise / (|noise| + eps), a different amount in any two float orders. AdamW is
checked end-to-end where no such entry trains (the head, LoRA), and its stacked step is checked bit-exact
against per-client steps.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from fedbench.config import ExperimentConfig
from fedbench.errors import ConfigError
from fedbench.fl import FederatedRun, prepare_data
from fedbench.registry import TUNERS

ATOL, RTOL = 2e-5, 1e-4


def tiny(**changes) -> ExperimentConfig:
    cfg = ExperimentConfig.from_dict({
        "name": "batched", "seed": 3,
        "data": {"task": "rt_sentiment", "num_clients": 4, "partition": "quantity_skew", "alpha": 1.0,
                 "max_train_samples": 56, "max_test_samples": 24, "max_length": 24},
        "peft": {"method": "lora", "rank": 2, "depth": 2, "prompt_tokens": 2, "adapter_width": 4},
        "train": {"local_epochs": 1, "batch_size": 6, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9},
        "fl": {"rounds": 2},
    })
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(scope="module")
def data():
    return prepare_data(tiny())


def _pair(cfg, data, clients_per_call=None):
    """(sequential run, batched run) of `cfg`, both after their rounds, and each round's updates."""
    out = []
    for batching in (False, True):
        run = FederatedRun(cfg.replace(**{"fl.client_batching": batching}), data)
        per_round = []
        for r in range(1, cfg.fl.rounds + 1):
            plan = run.select_clients(r)
            ins = run.configure(plan)
            if batching:
                from fedbench.fl.batched import batched_updates
                kw = {} if clients_per_call is None else {"clients_per_call": clients_per_call}
                updates = batched_updates(run, [ins[c] for c in plan.reporting], **kw)
            else:
                updates = [run.client_update(c, r, ins[c]) for c in plan.reporting]
            per_round.append(updates)
            run.finish_round(plan, updates, 0.0, instructions=ins)
        out.append((run, per_round))
    return out


def _assert_same(seq, bat, unequal_steps=True):
    (rs, us), (rb, ub) = seq, bat
    steps = set()
    for a_round, b_round in zip(us, ub):
        assert [u.client_id for u in a_round] == [u.client_id for u in b_round]
        for a, b in zip(a_round, b_round):
            assert (a.num_steps, a.num_samples) == (b.num_steps, b.num_samples)
            steps.add(a.num_steps)
            assert list(a.state) == list(b.state)
            for k in a.state:
                assert a.state[k].device.type == "cpu" and b.state[k].device.type == "cpu"
                torch.testing.assert_close(b.state[k], a.state[k], atol=ATOL, rtol=RTOL, msg=k)
            assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5, abs=1e-6)
    if unequal_steps:
        assert len(steps) > 1, "the clients should take unequal numbers of local steps"
    ra, rb_ = pd.DataFrame(rs.records).drop(columns="wall_s"), pd.DataFrame(rb.records).drop(columns="wall_s")
    assert list(ra.columns) == list(rb_.columns)
    pd.testing.assert_frame_equal(ra, rb_, check_exact=False, rtol=1e-4, atol=1e-5)
    for k, v in rs.global_model.state.items():
        torch.testing.assert_close(rb.global_model.state[k], v, atol=ATOL, rtol=RTOL, msg=k)


def _depth(method):
    return 2 if TUNERS.entry(method).facts.get("takes_depth") else None


@pytest.mark.parametrize("method", TUNERS.names())
def test_batched_equals_sequential_for_every_tuner(method, data):
    rounds = 1 if method == "full" else 2           # 22.7M trainable parameters per client: one round
    _assert_same(*_pair(tiny(**{"peft.method": method, "peft.depth": _depth(method), "fl.rounds": rounds}), data))


@pytest.mark.parametrize("method", ["lora", "adapter", "ia3", "prompt"])
def test_batched_equals_sequential_through_every_layer(method, data):
    """No frozen prefix: token ids through the whole stack (no activation cache)."""
    _assert_same(*_pair(tiny(**{"peft.method": method, "peft.depth": None}), data))


@pytest.mark.parametrize("method", ["head", "lora"])
def test_batched_equals_sequential_with_adamw(method, data):
    _assert_same(*_pair(tiny(**{"peft.method": method, "train.optimizer": "adamw", "train.momentum": 0.0,
                                "train.lr": 0.01, "fl.rounds": 1}), data))


def test_stacked_adamw_step_is_each_clients_own_step():
    """The premise of one optimizer over the stacked tensors: AdamW is elementwise, so one step on the (K, ...)
    stack equals K separate steps bit for bit."""
    from fedbench.config import TrainConfig
    from fedbench.fl.client import make_optimizer
    gen = torch.Generator().manual_seed(0)
    tc = TrainConfig(lr=0.01, weight_decay=0.01)
    init = torch.randn(3, 5, 4, generator=gen)
    grads = [torch.randn(3, 5, 4, generator=gen) for _ in range(4)]
    stacked = init.clone().requires_grad_(True)
    opt = make_optimizer([stacked], tc)
    for g in grads:
        stacked.grad = g.clone()
        opt.step()
    for k in range(3):
        p = init[k].clone().requires_grad_(True)
        opt_k = make_optimizer([p], tc)
        for g in grads:
            p.grad = g[k].clone()
            opt_k.step()
        assert torch.equal(p, stacked[k])


@pytest.mark.parametrize("changes", [
    {"train.prox_mu": 0.5}, {"train.max_grad_norm": 0.05}, {"train.momentum": 0.0},
    {"train.local_steps": 3, "train.weight_decay": 0.01}, {"fl.attack": "label_flip", "fl.attack_fraction": 0.5},
    {"fl.attack": "scale", "fl.attack_fraction": 0.5},
], ids=["prox", "clip", "plain_sgd", "steps", "label_flip", "scale_attack"])
def test_batched_equals_sequential_with_train_options(changes, data):
    _assert_same(*_pair(tiny(**changes), data), unequal_steps="train.local_steps" not in changes)


def test_batched_in_calls_of_two_clients(data):
    """A round's clients split over several batched calls (sorted by their step counts) give the same result."""
    _assert_same(*_pair(tiny(), data, clients_per_call=2))


def test_batched_clip_is_per_client(data):
    """A bound that only some clients' gradients exceed: a clip over the whole stack would differ."""
    _assert_same(*_pair(tiny(**{"train.max_grad_norm": 0.3, "peft.method": "head", "peft.depth": None}), data))


def test_run_federated_with_batching_matches(data):
    from fedbench.fl import run_federated
    cfg = tiny()
    a = run_federated(cfg, data)
    b = run_federated(cfg.replace(**{"fl.client_batching": True}), data)
    pd.testing.assert_frame_equal(a.rounds.drop(columns="wall_s"), b.rounds.drop(columns="wall_s"),
                                  check_exact=False, rtol=1e-4, atol=1e-5)
    assert np.array_equal(a.predictions["test_index"], b.predictions["test_index"])


@pytest.mark.parametrize("changes, field", [
    ({"train.dp": {"enabled": True, "noise_multiplier": 1.0}}, "fl.client_batching"),
    ({"model.dropout": 0.1}, "fl.client_batching"),
    ({"model.dropout": None}, "fl.client_batching"),
    ({"peft.lora_dropout": 0.1}, "fl.client_batching"),
    ({"fl.strategy": "ffa_lora"}, "fl.client_batching"),
])
def test_what_batching_lacks_is_a_config_error(changes, field):
    with pytest.raises(ConfigError) as e:
        tiny(**{"fl.client_batching": True, **changes})
    assert e.value.field_name == field


def test_batching_is_off_by_default_and_keeps_the_hash():
    cfg = tiny()
    assert cfg.fl.client_batching is False
    assert "client_batching" not in cfg.to_dict()["fl"]
    on = cfg.replace(**{"fl.client_batching": True})
    assert on.hash() != cfg.hash()
    assert ExperimentConfig.from_dict(on.to_dict()).fl.client_batching is True


def test_the_flower_engine_refuses_batching_before_it_starts():
    from fedbench.engines.flower import check_engine_config
    with pytest.raises(ConfigError) as e:
        check_engine_config(tiny(**{"fl.client_batching": True}))
    assert e.value.field_name == "fl.client_batching"
    check_engine_config(tiny())


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny random ViT saved to disk (as in tests/test_vision.py)."""
    from transformers import ViTConfig, ViTModel
    path = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=4, num_channels=3), add_pooling_layer=False).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("method, depth", [("lora", 1), ("lora", None), ("prompt", None), ("ia3", 2)])
def test_batched_equals_sequential_on_a_vit(vit_dir, method, depth):
    """Image batches (no attention mask; a soft prompt sits after the CLS token), with and without the cache."""
    cfg = ExperimentConfig.from_dict({
        "name": "batched-vit", "seed": 0,
        "data": {"task": "digits", "num_clients": 3, "partition": "quantity_skew", "alpha": 1.0,
                 "max_train_samples": 45, "max_test_samples": 20},
        "model": {"backbone": vit_dir}, "peft": {"method": method, "depth": depth, "rank": 2, "prompt_tokens": 2},
        "train": {"local_epochs": 1, "batch_size": 6, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9},
        "fl": {"rounds": 2}})
    _assert_same(*_pair(cfg, prepare_data(cfg)))
