"""DP-SGD on clients (fedbench.fl.privacy) against the math it claims: per-sample gradients, clipping,
noise scale, accounting across rounds, seeding, and the shared model left as it was."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedbench.config import ConfigError, DataConfig, DPConfig, ExperimentConfig, FLConfig, PeftConfig, TrainConfig
from fedbench.fl import FederatedRun, evaluate, prepare_data, train_client
from fedbench.fl import privacy
from fedbench.fl.client import forward_batch
from fedbench.models import build_model, load_trainable_state, trainable_state
from fedbench.models.inputs import ActivationCache


@pytest.fixture(scope="module")
def data():
    cfg = ExperimentConfig(data=DataConfig(task="rt_sentiment", num_clients=2, max_train_samples=96,
                                           max_test_samples=64, max_length=32))
    return prepare_data(cfg)


def model_for(method, data, depth=None, perturb=True):
    from fedbench.config import ModelConfig
    m = build_model(ModelConfig(), PeftConfig(method=method, rank=4, depth=depth), data.num_labels, seed=3)
    if perturb:   # zero-initialised factors (LoRA B, adapter up) would hide their partners' gradients
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for k, p in m.named_parameters():
                if "lora_B" in k or "adapter.up" in k:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return m


def one_example_grads(model, data, examples):
    """Plain autograd, one example at a time, no padding: the per-sample gradients by definition."""
    out = []
    for ex in examples:
        model.zero_grad(set_to_none=True)
        model.train()
        loss = F.cross_entropy(forward_batch(model, data.train, np.array([ex]), None, data.pad_id),
                               data.train.labels[[ex]])
        loss.backward()
        out.append({k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                    for k, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    model.eval()
    return out


def no_opacus_left(model) -> bool:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                + len(m._backward_pre_hooks) for m in model.modules())
    attrs = [a for p in model.parameters() for a in privacy._PARAM_ATTRS if hasattr(p, a)]
    mod_attrs = [a for m in model.modules() for a in privacy._MODULE_ATTRS + ("autograd_grad_sample_hooks",)
                 if hasattr(m, a)]
    return hooks == 0 and not attrs and not mod_attrs


def rel_err(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b)
    den = sum((b[k] ** 2).sum() for k in b)
    return float((num / den).sqrt())


# a padded batch of examples of different lengths
BATCH = np.array([0, 5, 11, 17])


@pytest.mark.parametrize("method,depth", [("head", None), ("bitfit", None), ("lora", None), ("adapter", 2),
                                          ("prompt", None)])
def test_opacus_per_sample_gradients_equal_one_example_autograd(method, depth, data):
    assert len(set(data.train.lengths[BATCH].tolist())) > 1          # padding is really exercised
    m = model_for(method, data, depth)
    cache = ActivationCache(data.train, data.pad_id)
    ps = privacy.per_sample_gradients(m, data.train, BATCH, data.pad_id, cache=cache)
    assert no_opacus_left(m)
    ref = one_example_grads(m, data, BATCH)
    for i in range(len(BATCH)):
        assert rel_err({k: v[i] for k, v in ps.items()}, ref[i]) < 1e-4


def dp_cfg(**dp):
    return TrainConfig(local_steps=1, batch_size=64, lr=1.0, optimizer="sgd",
                       dp=DPConfig(enabled=True, **{"noise_multiplier": 1e-9, "max_grad_norm": 0.05, **dp}))


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")   # negligible noise: eps is huge
@pytest.mark.parametrize("method,clipping", [("head", "hooks"), ("lora", "hooks"), ("lora", "ghost"),
                                             ("prompt", "hooks"), ("bitfit", "ghost"), ("full", "ghost")])
def test_dp_step_is_the_mean_of_clipped_per_sample_gradients(method, clipping, data):
    """One DP-SGD step with SGD(lr=1), q = 1 (n <= batch) and negligible noise moves the trainable state by
    exactly -(1/n) sum_i g_i min(1, C/||g_i||) (catches corrupted LoRA updates, Opacus issue #820)."""
    m = model_for(method, data)
    state = trainable_state(m)
    examples = np.arange(6)
    C = 0.05
    grads = one_example_grads(m, data, examples)
    norms = [math.sqrt(sum(float((g ** 2).sum()) for g in gi.values())) for gi in grads]
    assert max(norms) > C                                             # clipping is active
    expected = {k: state[k] - sum(min(1.0, C / (n + 1e-6)) * g[k] for g, n in zip(grads, norms)) / len(examples)
                for k in state}
    unclipped = {k: state[k] - sum(g[k] for g in grads) / len(examples) for k in state}
    load_trainable_state(m, state)
    upd = privacy.train_client_dp(m, state, data.train, examples, dp_cfg(max_grad_norm=C), seed=0,
                                  cache=ActivationCache(data.train, data.pad_id), clipping=clipping)
    assert upd.metrics["dp_clipping"] == clipping and upd.metrics["dp_sample_rate"] == 1.0
    delta = {k: upd.state[k] - state[k] for k in state}
    assert rel_err(upd.state, expected) < 1e-6 and rel_err(delta, {k: expected[k] - state[k] for k in state}) < 1e-4
    assert rel_err(unclipped, expected) > 1e-3                         # and the check can tell the two apart
    assert no_opacus_left(m)


def test_auto_clipping_picks_ghost_for_full_and_hooks_for_peft(data):
    assert privacy.clipping_mode(model_for("full", data), 32) == "ghost"
    for method in ("head", "lora", "bitfit", "prompt", "adapter"):
        assert privacy.clipping_mode(model_for(method, data), 32) == "hooks"
    with pytest.raises(ConfigError, match="clipping"):
        privacy.clipping_mode(model_for("head", data), 32, "fast")


def test_noise_has_the_calibrated_scale_and_is_seeded(data):
    """With gradients clipped to ~0 (C tiny), the update is the noise: N(0, (sigma C / (q n))^2) per
    coordinate (SGD lr=1, q = 1); the same seed gives the same noise, another seed other noise."""
    m = model_for("head", data)
    state = trainable_state(m)
    examples = np.arange(10)
    sigma, C = 3.0, 1e-3
    cfg = dp_cfg(noise_multiplier=sigma, max_grad_norm=C)
    cache = ActivationCache(data.train, data.pad_id)
    a = privacy.train_client_dp(m, state, data.train, examples, cfg, seed=7, cache=cache)
    load_trainable_state(m, state)
    b = privacy.train_client_dp(m, state, data.train, examples, cfg, seed=7, cache=cache)
    load_trainable_state(m, state)
    c = privacy.train_client_dp(m, state, data.train, examples, cfg, seed=8, cache=cache)
    for k in state:
        assert torch.equal(a.state[k], b.state[k]) and not torch.equal(a.state[k], c.state[k])
    noise = torch.cat([(a.state[k] - state[k]).flatten() for k in state])
    clipped_part = C                                                  # |mean of clipped grads| <= C
    assert noise.numel() == 385 * data.num_labels                     # the head: 384 x K weights + K biases
    expected_std = sigma * C / len(examples)
    assert abs(float(noise.std()) / expected_std - 1) < 0.08
    assert abs(float(noise.mean())) < clipped_part + 4 * expected_std / math.sqrt(noise.numel())


def test_calibration_meets_opacus_criterion_and_matches_get_noise_multiplier():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier
    for eps, q, steps, delta in [(8.0, 1 / 13, 15, 1 / 200), (2.0, 1 / 5, 40, 1 / 70), (1.0, 1.0, 3, 1e-3)]:
        sigma = privacy.calibrate_rdp(eps, delta, q, steps)
        acc = RDPAccountant()
        acc.history = [(sigma, q, steps)]
        spent = acc.get_epsilon(delta)
        assert eps - 0.01 <= spent <= eps
        assert privacy.epsilon_of("rdp", [(sigma, q, steps)], delta) == spent     # bit-identical to Opacus
        ref = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps)
        assert abs(sigma / ref - 1) < 0.01
    with pytest.raises(ValueError):
        privacy.calibrate_rdp(1e-9, 1e-9, 1.0, 10**6)


def test_ledger_accounts_every_round_and_target_is_met_after_all_rounds(data):
    """Three rounds of one client: the ledger composes all three, epsilon grows each round, and after the
    run's last round the spent epsilon is the target (within Opacus' 0.01 tolerance, never above)."""
    from opacus.accountants import RDPAccountant
    m = model_for("head", data)
    idx = data.client_indices[0]
    cfg = TrainConfig(local_steps=4, batch_size=16, lr=1e-2, dp=DPConfig(enabled=True, target_epsilon=3.0))
    ledger, eps = {}, []
    state = trainable_state(m)
    for r in range(3):
        upd = train_client(m, state, data.train, idx, cfg, seed=r, cache=ActivationCache(data.train, data.pad_id),
                           pad_id=data.pad_id, dp_state=ledger, dp_total_rounds=3)
        state = upd.state
        eps.append(upd.metrics["dp_epsilon"])
        assert ledger["epsilon"] == upd.metrics["dp_epsilon"] and ledger["rounds"] == r + 1
    q = 1 / math.ceil(len(idx) / 16)
    assert ledger["history"] == [(ledger["noise_multiplier"], q, 12)]
    assert ledger["delta"] == 1 / len(idx)
    assert eps[0] < eps[1] < eps[2] and 3.0 - 0.01 <= eps[2] <= 3.0
    acc = RDPAccountant()
    acc.history = ledger["history"]
    assert acc.get_epsilon(1 / len(idx)) == eps[2]


def test_loop_records_epsilon_spent_over_the_rounds_each_client_took_part_in(data):
    cfg = ExperimentConfig(
        name="dp", seed=0,
        data=DataConfig(task="rt_sentiment", num_clients=2, max_train_samples=96, max_test_samples=64, max_length=32),
        peft=PeftConfig(method="head"),
        train=TrainConfig(local_steps=2, batch_size=16, lr=1e-2, dp=DPConfig(enabled=True, target_epsilon=4.0)),
        fl=FLConfig(rounds=3, clients_per_round=0.5, dropout=0.0))
    run = FederatedRun(cfg, data)
    recs = [run.run_round(r) for r in (1, 2, 3)]
    spent = run.client_epsilons()
    sampled = [set(), set(), set()]
    from fedbench.fl import rng_for, sample_clients
    for r in (1, 2, 3):
        sampled[r - 1] = set(sample_clients(2, 0.5, rng_for(0, "sampling", r)).tolist())
    for client, s in run.dp_states.items():
        rounds_in = sum(client in sampled[r] for r in range(3))
        assert s["rounds"] == rounds_in
        assert s["history"][0][2] == 2 * rounds_in                     # 2 local steps per round taken
        assert spent[client] <= 4.0
    assert recs[-1]["dp_epsilon_max"] == max(spent.values())
    assert run.result().summary["dp_epsilon_spent"] == max(spent.values())


def test_shared_model_is_plain_again_after_dp(data):
    """After a DP client the next (non-DP) client and the evaluation see exactly the plain model."""
    m = model_for("lora", data)
    state = trainable_state(m)
    idx = data.client_indices[0]
    privacy.train_client_dp(m, state, data.train, idx, dp_cfg(noise_multiplier=1.0), seed=0)
    assert no_opacus_left(m) and not m.training
    plain_cfg = TrainConfig(local_steps=2, batch_size=16, lr=1e-3)
    after = train_client(m, state, data.train, idx, plain_cfg, seed=1, pad_id=data.pad_id)
    fresh = model_for("lora", data)
    ref = train_client(fresh, state, data.train, idx, plain_cfg, seed=1, pad_id=data.pad_id)
    for k in ref.state:
        assert torch.equal(after.state[k], ref.state[k])
    assert evaluate(m, data.test, data.test_indices, pad_id=data.pad_id) == \
        evaluate(fresh, data.test, data.test_indices, pad_id=data.pad_id)


def test_hooks_are_removed_when_training_fails(data, monkeypatch):
    m = model_for("bitfit", data)
    import fedbench.fl.client as client

    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(client, "forward_batch", boom)
    with pytest.raises(RuntimeError, match="boom"):
        privacy.train_client_dp(m, trainable_state(m), data.train, np.arange(8), dp_cfg(), seed=0)
    assert no_opacus_left(m)


def test_dp_trained_lora_still_learns(data):
    """Opacus issue #820 (LoRA updates silently corrupted): DP-SGD LoRA with moderate noise must lower
    the loss and raise accuracy on the client's data, with both LoRA factors actually trained."""
    m = model_for("lora", data, depth=2, perturb=False)
    idx = np.arange(len(data.train))
    state = trainable_state(m)
    cache = ActivationCache(data.train, data.pad_id)
    before = evaluate(m, data.train, idx, cache=cache, pad_id=data.pad_id)
    cfg = TrainConfig(local_steps=40, batch_size=32, lr=1e-2,
                      dp=DPConfig(enabled=True, noise_multiplier=0.5, max_grad_norm=1.0))
    upd = train_client(m, state, data.train, idx, cfg, seed=0, cache=cache, pad_id=data.pad_id, dp_state={})
    load_trainable_state(m, upd.state)
    after = evaluate(m, data.train, idx, cache=cache, pad_id=data.pad_id)
    assert after["loss"] < before["loss"] - 0.15 and after["accuracy"] > before["accuracy"] + 0.2
    for k in state:
        if ".lora_" in k:
            assert not torch.equal(upd.state[k], state[k])
    assert math.isfinite(upd.metrics["dp_epsilon"]) and upd.metrics["dp_epsilon"] > 0


def test_empty_poisson_batches_still_release_noise(data):
    m = model_for("head", data)
    state = trainable_state(m)
    cfg = TrainConfig(local_steps=12, batch_size=1, lr=1.0, optimizer="sgd",
                      dp=DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0))
    upd = privacy.train_client_dp(m, state, data.train, np.arange(40), cfg, seed=0)
    assert upd.metrics["dp_sample_rate"] == 1 / 40 and upd.metrics["dp_mean_batch"] < 1
    assert all(torch.isfinite(v).all() for v in upd.state.values())
    assert upd.num_steps == 12


def test_bad_inputs_are_config_errors(data):
    m = model_for("head", data)
    with pytest.raises(ConfigError, match="fl.rounds"):
        privacy.train_client_dp(m, trainable_state(m), data.train, np.arange(4), dp_cfg(), seed=0, total_rounds=0)
    with pytest.raises(ConfigError, match="data.num_clients"):
        privacy.train_client_dp(m, trainable_state(m), data.train, np.arange(0), dp_cfg(), seed=0)
    with pytest.raises(ConfigError, match="train.dp.target_epsilon"):
        DPConfig(enabled=True, target_epsilon=8.0, noise_multiplier=1.0).validate()


def test_clipping_only_control_adds_no_noise_and_spends_infinite_epsilon(data):
    """noise_multiplier = 0: the clipping-only control. With q = 1 every example is in the batch whatever the
    seed, so two seeds give the same update exactly iff no noise was added; epsilon is infinite."""
    DPConfig(enabled=True, noise_multiplier=0.0).validate()
    with pytest.raises(ConfigError, match="noise_multiplier"):
        DPConfig(enabled=True, noise_multiplier=-0.1).validate()
    m = model_for("head", data)
    state = trainable_state(m)
    cfg = dp_cfg(noise_multiplier=0.0, max_grad_norm=0.05)
    cache = ActivationCache(data.train, data.pad_id)
    examples = np.arange(6)
    a = privacy.train_client_dp(m, state, data.train, examples, cfg, seed=1, cache=cache)
    load_trainable_state(m, state)
    b = privacy.train_client_dp(m, state, data.train, examples, cfg, seed=2, cache=cache)
    assert a.metrics["dp_noise_multiplier"] == 0.0 and math.isinf(a.metrics["dp_epsilon"])
    assert all(torch.equal(a.state[k], b.state[k]) for k in state)
    assert any(not torch.equal(a.state[k], state[k]) for k in state)          # it did train
    load_trainable_state(m, state)
    c = privacy.train_client_dp(m, state, data.train, examples, dp_cfg(noise_multiplier=0.5, max_grad_norm=0.05),
                                seed=2, cache=cache)
    assert any(not torch.equal(a.state[k], c.state[k]) for k in state)        # and noise would show
    assert privacy.epsilon_of("rdp", [(0.0, 0.5, 3)], 1e-5) == math.inf


def test_delta_at_or_above_one_over_n_warns():
    with pytest.warns(privacy.WeakDeltaWarning, match="1/n"):
        assert privacy.client_delta(DPConfig(enabled=True, noise_multiplier=1.0), 100) == 0.01   # the None default
    with pytest.warns(privacy.WeakDeltaWarning):
        privacy.client_delta(DPConfig(enabled=True, noise_multiplier=1.0, delta=0.02), 100)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", privacy.WeakDeltaWarning)
        assert privacy.client_delta(DPConfig(enabled=True, noise_multiplier=1.0, delta=1e-5), 100) == 1e-5
