"""Merges of task vectors against their formulas, computed densely with numpy."""
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedbench import merging
from fedbench.config import ConfigError, FLConfig
from fedbench.fl import ClientUpdate, GlobalModel, LoraLayout, ServerStep
from fedbench.models import LoraModuleInfo


def _tvs(n=4, seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (3, 4), "b": (5,)}
    return [OrderedDict((k, torch.randn(*s, generator=g)) for k, s in shapes.items()) for _ in range(n)]


def _np(tvs, key):
    return np.stack([tv[key].double().numpy() for tv in tvs])


def _flat(tvs):
    return np.stack([np.concatenate([tv[k].double().numpy().ravel() for k in tv]) for tv in tvs])


def test_task_arithmetic_and_weighted_sum():
    tvs = _tvs()
    out = merging.task_arithmetic(tvs, 0.3)
    for k in tvs[0]:
        np.testing.assert_allclose(out[k].numpy(), 0.3 * _np(tvs, k).sum(0), atol=1e-6)
        assert out[k].dtype == torch.float32
    w = [0.1, 0.2, 0.3, 0.4]
    out = merging.weighted_sum(tvs, w)
    np.testing.assert_allclose(out["w"].numpy(), np.tensordot(w, _np(tvs, "w"), axes=1), atol=1e-6)


def test_fednova_weights_by_inverse_steps():
    tvs, steps = _tvs(), [20, 10, 10, 5]
    out = merging.fednova(tvs, steps, lam=0.7)
    a = (np.mean(steps) / np.array(steps)) / len(steps)
    np.testing.assert_allclose(out["w"].numpy(), 0.7 * np.tensordot(a, _np(tvs, "w"), axes=1), atol=1e-6)
    # equal steps: FedNova is the plain average
    np.testing.assert_allclose(merging.fednova(tvs, [3] * 4)["b"].numpy(), _np(tvs, "b").mean(0), atol=1e-6)


def test_fedgma_mask_follows_the_authors_threshold():
    tvs = _tvs(n=4, seed=3)
    for rho in (0.0, 0.5, 0.75, 1.0):
        out = merging.fedgma(tvs, rho, lam=0.5)
        x = _np(tvs, "w")
        m = np.abs(np.sign(x).mean(0))
        m = np.where(m >= rho, 1.0, m)
        np.testing.assert_allclose(out["w"].numpy(), 0.5 * m * x.sum(0), atol=1e-6)
    # rho = 0: every mask entry is 1, i.e. task arithmetic
    np.testing.assert_allclose(merging.fedgma(tvs, 0.0, 0.5)["w"].numpy(),
                               merging.task_arithmetic(tvs, 0.5)["w"].numpy(), atol=1e-6)


@pytest.mark.parametrize("n", [3, 4])
def test_median_matches_numpy(n):
    tvs = _tvs(n=n)
    out = merging.median(tvs, lam=2.0)
    np.testing.assert_allclose(out["w"].numpy(), 2.0 * np.median(_np(tvs, "w"), axis=0), atol=1e-6)


def test_cclip_clips_each_whole_task_vector():
    tvs = _tvs()
    norms = np.linalg.norm(_flat(tvs), axis=1)
    rho = float(np.median(norms))
    out = merging.cclip(tvs, rho, lam=0.5)
    scale = np.minimum(1.0, rho / norms)
    np.testing.assert_allclose(out["b"].numpy(), 0.5 * np.tensordot(scale, _np(tvs, "b"), axes=1), atol=1e-6)
    # a huge radius clips nothing
    np.testing.assert_allclose(merging.cclip(tvs, 1e9, 1.0)["w"].numpy(), _np(tvs, "w").sum(0), atol=1e-5)
    assert merging.norm(tvs[0]) == pytest.approx(norms[0])


def _ties_numpy(flat, density):
    T, n = flat.shape
    k = max(1, int(round(density * n)))
    trimmed = np.zeros_like(flat)
    for t in range(T):
        idx = np.argsort(-np.abs(flat[t]), kind="stable")[:k]
        trimmed[t, idx] = flat[t, idx]
    gamma = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == gamma) & (trimmed != 0)
    return (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_trim_elect_disjoint_mean(density):
    tvs = _tvs(n=3, seed=5)
    out = merging.ties(tvs, density=density, lam=1.5)
    got = np.concatenate([out[k].double().numpy().ravel() for k in out])
    np.testing.assert_allclose(got, 1.5 * _ties_numpy(_flat(tvs), density), atol=1e-6)
    # a hand-made case: signs disagree on the first coordinate, the positive mass wins
    a = OrderedDict(x=torch.tensor([3.0, 1.0, 0.0]))
    b = OrderedDict(x=torch.tensor([-1.0, 2.0, 0.5]))
    torch.testing.assert_close(merging.ties([a, b], density=1.0)["x"], torch.tensor([3.0, 1.5, 0.5]))


def test_dare_is_seeded_unbiased_and_drops_the_right_share():
    tvs = _tvs(n=2, shapes={"w": (200, 100)})
    a = merging.dare(tvs, drop=0.7, lam=1.0, seed=1)
    b = merging.dare(tvs, drop=0.7, lam=1.0, seed=1)
    torch.testing.assert_close(a["w"], b["w"], rtol=0, atol=0)
    assert not torch.equal(a["w"], merging.dare(tvs, drop=0.7, lam=1.0, seed=2)["w"])
    single = merging.dare(tvs[:1], drop=0.7, lam=1.0, seed=1)["w"]
    kept = single != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(single[kept], tvs[0]["w"][kept] / 0.3)
    # drop = 0 is task arithmetic
    torch.testing.assert_close(merging.dare(tvs, 0.0, 0.4)["w"], merging.task_arithmetic(tvs, 0.4)["w"])


def test_cosine_similarity_and_matrix():
    tvs = _tvs(n=3)
    f = _flat(tvs)
    expected = (f @ f.T) / np.outer(np.linalg.norm(f, axis=1), np.linalg.norm(f, axis=1))
    np.testing.assert_allclose(merging.cosine_matrix(tvs), expected, atol=1e-10)
    assert merging.cosine_similarity(tvs[0], tvs[1]) == pytest.approx(expected[0, 1])
    neg = OrderedDict((k, -v) for k, v in tvs[0].items())
    assert merging.cosine_similarity(tvs[0], neg) == pytest.approx(-1.0)


def _lora(n=4, r=2, d_out=6, d_in=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(r, d_in, generator=g)                   # shared init, as every task starts from theta_0
    info = LoraModuleInfo(name="m", a_key="m.A", b_key="m.B", base_key="m.W", scaling=2.0)
    states = [OrderedDict([("m.A", a0 + 0.1 * torch.randn(r, d_in, generator=g)),
                           ("m.B", torch.randn(d_out, r, generator=g))]) for _ in range(n)]
    init = OrderedDict([("m.A", a0), ("m.B", torch.zeros(d_out, r))])
    return info, states, init


def test_lora_task_vector_is_the_dense_product():
    info, states, init = _lora()
    tv = merging.lora_task_vector(states[0], [info], init)
    torch.testing.assert_close(tv["m.W"], 2.0 * states[0]["m.B"] @ states[0]["m.A"])
    diff = merging.state_task_vector(states[0], init)
    torch.testing.assert_close(diff["m.A"], states[0]["m.A"] - init["m.A"])


def test_task_arithmetic_one_over_t_equals_one_fedavg_round_of_the_core():
    """The paper's equivalence, through the core's server step (exact product average, 'stack' semantics)."""
    info, states, init = _lora()
    T = len(states)
    ta = merging.task_arithmetic([merging.lora_task_vector(s, [info], init) for s in states], 1.0 / T)
    strategy = ServerStep(FLConfig(aggregator="fedavg", lora_aggregation="stack"), LoraLayout([info]), 2, seed=0)
    updates = [ClientUpdate(client_id=i, state=s, num_samples=100, num_steps=1, train_loss=0.0, wall_s=0.0)
               for i, s in enumerate(states)]
    g, _ = strategy.aggregate(GlobalModel(init), updates, round_idx=1)
    dense = g.base_delta["m.W"] + 2.0 * g.state["m.B"] @ g.state["m.A"]     # fresh factors: B = 0
    assert float((dense - ta["m.W"]).abs().max()) <= 1e-6
    # FedIT (factor averaging) is not the same thing
    fit = ServerStep(FLConfig(aggregator="fedavg", lora_aggregation="factors"), LoraLayout([info]), 2, seed=0)
    g2, _ = fit.aggregate(GlobalModel(init), updates, round_idx=1)
    assert float((2.0 * g2.state["m.B"] @ g2.state["m.A"] - ta["m.W"]).abs().max()) > 1e-2
    # with full fine-tuning FedAvg is linear in the parameters: the same statement for plain states
    thetas = _tvs(n=T, seed=9)
    theta0 = _tvs(n=1, seed=10)[0]
    avg = ServerStep(FLConfig(aggregator="fedavg")).combine(thetas, [1] * T)
    ta_full = merging.task_arithmetic([merging.state_task_vector(t, theta0) for t in thetas], 1.0 / T)
    for k in theta0:
        assert float((theta0[k] + ta_full[k] - avg[k]).abs().max()) <= 1e-6


def test_bad_parameters_name_the_field():
    tvs = _tvs()
    with pytest.raises(ConfigError, match="'rho' = 1.5"):
        merging.fedgma(tvs, 1.5)
    with pytest.raises(ConfigError, match="'rho' = 0"):
        merging.cclip(tvs, 0)
    with pytest.raises(ConfigError, match="'density' = 0"):
        merging.ties(tvs, density=0)
    with pytest.raises(ConfigError, match="'drop' = 1"):
        merging.dare(tvs, drop=1)
    with pytest.raises(ConfigError, match="'lam' = -1"):
        merging.task_arithmetic(tvs, -1)
    with pytest.raises(ConfigError, match="'steps'"):
        merging.fednova(tvs, [1, 2])
    with pytest.raises(ConfigError, match="task_vectors\\[1\\]"):
        merging.task_arithmetic([tvs[0], {"w": tvs[1]["w"]}], 1.0)
    with pytest.raises(ConfigError, match="at least one task vector"):
        merging.median([], 1.0)
