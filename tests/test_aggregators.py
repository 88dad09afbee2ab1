"""Aggregation rules against the dense math they claim to compute."""
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedbench.merging import aggregators as agg


def _states(n=5, seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (3, 4), "b": (4,)}
    return [OrderedDict((k, torch.randn(*s, generator=g)) for k, s in shapes.items()) for _ in range(n)]


def test_fedavg_is_sample_weighted_mean():
    states = _states()
    weights = [1, 2, 3, 4, 10]
    out = agg.fedavg(states, weights)
    for k in states[0]:
        expected = sum(w * s[k] for w, s in zip(weights, states)) / sum(weights)
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)
    assert list(out) == list(states[0])


def test_fedavg_uniform_when_no_weights_and_rejects_zero_total():
    states = _states(3)
    torch.testing.assert_close(agg.fedavg(states)["w"], torch.stack([s["w"] for s in states]).mean(0))
    with pytest.raises(ValueError, match="sum to > 0"):
        agg.fedavg(states, [0, 0, 0])


@pytest.mark.parametrize("n", [4, 5])
def test_coordinate_median_matches_numpy(n):
    states = _states(n)
    out = agg.coordinate_median(states)
    expected = np.median(np.stack([s["w"].numpy() for s in states]), axis=0)
    np.testing.assert_allclose(out["w"].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_coordinate_median_is_torch_quantile_bit_for_bit(n):
    g = torch.Generator().manual_seed(n)
    states = [{"w": torch.randn(5000, generator=g) * 10.0 ** (i - 2)} for i in range(n)]
    states[-1]["w"][:50] = states[0]["w"][:50]           # ties
    expected = torch.quantile(torch.stack([s["w"].double() for s in states]), 0.5, dim=0).float()
    assert torch.equal(agg.coordinate_median(states)["w"], expected)


def test_trimmed_mean_drops_extremes_and_resists_an_outlier():
    states = _states(10)
    states[0]["w"] += 1e6
    out = agg.trimmed_mean(states, trim_ratio=0.1)
    vals = np.sort(np.stack([s["w"].numpy() for s in states]), axis=0)[1:-1].mean(0)
    np.testing.assert_allclose(out["w"].numpy(), vals, atol=1e-5)
    assert out["w"].abs().max() < 10
    with pytest.raises(ValueError, match="leaves no value"):
        agg.trimmed_mean(states[:2], trim_ratio=0.5)


def _lora_states(n=4, d_out=6, d_in=5, r=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [OrderedDict([("m.A", torch.randn(r, d_in, generator=g)), ("m.B", torch.randn(d_out, r, generator=g))])
            for _ in range(n)]


def _dense_mean(states, weights):
    p = np.asarray(weights, dtype=float) / sum(weights)
    return sum(pi * (s["m.B"].double() @ s["m.A"].double()) for pi, s in zip(p, states))


def test_lora_factor_average_is_not_the_product_average():
    states, weights = _lora_states(), [1, 2, 3, 4]
    out = agg.lora_factor_average(states, weights)
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    mean_b = sum(pi * s["m.B"].double() for pi, s in zip(p, states))
    mean_a = sum(pi * s["m.A"].double() for pi, s in zip(p, states))
    torch.testing.assert_close((out["m.B"] @ out["m.A"]).double(), mean_b @ mean_a, atol=1e-5, rtol=0)
    assert (mean_b @ mean_a - _dense_mean(states, weights)).abs().max() > 0.1


def test_lora_stack_is_exact_product_average_with_grown_rank():
    states, weights = _lora_states(), [1, 2, 3, 4]
    b, a = agg.lora_stack(states, weights, [("m.A", "m.B")])["m.A"]
    assert a.shape == (8, 5) and b.shape == (6, 8)
    torch.testing.assert_close((b @ a).double(), _dense_mean(states, weights), atol=1e-5, rtol=0)


def test_lora_svd_exact_when_rank_suffices_and_best_rank_r_otherwise():
    states, weights = _lora_states(n=2, r=2), [1, 3]
    dense = _dense_mean(states, weights)
    out = agg.lora_svd(states, weights, [("m.A", "m.B")], rank=4)       # rank(dense) <= 4
    torch.testing.assert_close((out["m.B"] @ out["m.A"]).double(), dense, atol=1e-5, rtol=0)
    out2 = agg.lora_svd(states, weights, [("m.A", "m.B")], rank=2)
    assert out2["m.A"].shape == (2, 5) and out2["m.B"].shape == (6, 2)
    u, s, vh = torch.linalg.svd(dense)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close((out2["m.B"] @ out2["m.A"]).double(), best, atol=1e-5, rtol=0)


def test_fedavgm_and_fedadam_follow_their_formulas():
    g0 = OrderedDict(w=torch.zeros(3))
    a1, a2 = OrderedDict(w=torch.tensor([1.0, -2.0, 0.5])), OrderedDict(w=torch.tensor([2.0, -1.0, 0.0]))
    m = agg.FedAvgM(lr=0.5, momentum=0.9)
    x1 = m.step(g0, a1)
    torch.testing.assert_close(x1["w"], 0.5 * a1["w"])
    x2 = m.step(x1, a2)
    torch.testing.assert_close(x2["w"], x1["w"] + 0.5 * (0.9 * a1["w"] + (a2["w"] - x1["w"])))
    adam = agg.FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    y1 = adam.step(g0, a1)
    m1, v1 = 0.1 * a1["w"], 0.01 * a1["w"] ** 2
    torch.testing.assert_close(y1["w"], 0.1 * m1 / (v1.sqrt() + 1e-3))
