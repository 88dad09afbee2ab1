"""Byzantine attacks change what an attacker sends exactly as specified, and nothing else."""
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedbench.fl import attacks


def _pair(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    glob = OrderedDict([("w", torch.randn(5, 3, generator=g).to(dtype)), ("b", torch.randn(3, generator=g).to(dtype)),
                        ("steps", torch.tensor(7))])
    sent = OrderedDict((k, v + 0.1 * torch.randn(v.shape, generator=g).to(dtype) if v.is_floating_point() else v + 1)
                       for k, v in glob.items())
    return sent, glob


def _clone(state):
    return OrderedDict((k, v.clone()) for k, v in state.items())


def _untouched(before, after):
    return all(torch.equal(before[k], after[k]) for k in before)


def _check_layout(out, sent):
    assert list(out) == list(sent)
    assert all(out[k].dtype == sent[k].dtype and out[k].shape == sent[k].shape for k in sent)
    assert torch.equal(out["steps"], sent["steps"])  # non-floating entries pass through unchanged


def test_sign_flip_reverses_the_update():
    sent, glob = _pair()
    s0, g0 = _clone(sent), _clone(glob)
    out = attacks.sign_flip(sent, glob)
    _check_layout(out, sent)
    for k in ("w", "b"):
        torch.testing.assert_close(sent[k] + out[k], 2 * glob[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(out[k] - glob[k], -(sent[k] - glob[k]), rtol=0, atol=1e-6)
    assert _untouched(s0, sent) and _untouched(g0, glob)


@pytest.mark.parametrize("factor", [10.0, -1.0, 0.0, 3])
def test_scale_multiplies_the_update(factor):
    sent, glob = _pair(1, dtype=torch.float64)
    s0, g0 = _clone(sent), _clone(glob)
    out = attacks.scale(sent, glob, factor=factor)
    _check_layout(out, sent)
    for k in ("w", "b"):
        torch.testing.assert_close(out[k] - glob[k], factor * (sent[k] - glob[k]), rtol=0, atol=1e-12)
    assert _untouched(s0, sent) and _untouched(g0, glob)
    if factor == -1.0:
        assert all(torch.equal(out[k], attacks.sign_flip(sent, glob)[k]) for k in out)
    assert attacks.ATTACKS["scale"].resolve() == {"factor": 10.0}


def test_gaussian_replaces_the_update_by_seeded_noise():
    g = torch.Generator().manual_seed(0)
    glob = OrderedDict([("big", torch.randn(400, 500, generator=g)), ("steps", torch.tensor(3))])
    sent = OrderedDict([("big", glob["big"] + 5.0), ("steps", torch.tensor(4))])
    s0, g0 = _clone(sent), _clone(glob)
    out = attacks.gaussian(sent, glob, torch.Generator().manual_seed(42), sigma=0.5)
    _check_layout(out, sent)
    noise = (out["big"] - glob["big"]).double()  # the honest update (+5) is gone
    assert abs(noise.mean().item()) < 5e-3 and abs(noise.std().item() - 0.5) < 5e-3
    assert _untouched(s0, sent) and _untouched(g0, glob)
    again = attacks.gaussian(sent, glob, torch.Generator().manual_seed(42), sigma=0.5)
    assert torch.equal(again["big"], out["big"])
    other = attacks.gaussian(sent, glob, torch.Generator().manual_seed(43), sigma=0.5)
    assert not torch.equal(other["big"], out["big"])
    # the noise depends on the generator only, not on the parameters' dtype
    as64 = attacks.gaussian(OrderedDict(big=sent["big"].double()), OrderedDict(big=glob["big"].double()),
                            torch.Generator().manual_seed(42), sigma=0.5)
    torch.testing.assert_close((as64["big"] - glob["big"].double()).float(), noise.float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="generator"):
        attacks.gaussian(sent, glob, None)
    with pytest.raises(ValueError, match="sigma=-1.0"):
        attacks.gaussian(sent, glob, torch.Generator(), sigma=-1)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_label_flip_is_an_involution(kind):
    raw = np.array([0, 1, 2, 3, 4, 4, -100], dtype=np.int64)
    labels = torch.from_numpy(raw.copy()) if kind == "torch" else raw.copy()
    flipped = attacks.label_flip(labels, 5)
    assert type(flipped) is type(labels) and flipped.dtype == labels.dtype
    np.testing.assert_array_equal(np.asarray(flipped), [4, 3, 2, 1, 0, 0, -100])  # -100 (ignore index) is kept
    np.testing.assert_array_equal(np.asarray(attacks.label_flip(flipped, 5)), raw)
    np.testing.assert_array_equal(np.asarray(labels), raw)  # input untouched
    with pytest.raises(ValueError, match="num_classes=5"):
        attacks.label_flip(labels + 1, 5)
    with pytest.raises(ValueError, match="num_classes=0"):
        attacks.label_flip(labels, 0)


def test_none_sends_a_copy():
    sent, glob = _pair()
    out = attacks.ATTACKS["none"].fn(sent, glob, generator=None)
    assert _untouched(sent, out) and all(out[k] is not sent[k] for k in out)


def test_mismatched_states_are_rejected():
    sent, glob = _pair()
    with pytest.raises(KeyError, match="missing from global_state"):
        attacks.sign_flip(OrderedDict(sent, extra=torch.zeros(1)), glob)
    with pytest.raises(ValueError, match=r"sent\['b'\] has shape"):
        attacks.scale(OrderedDict(sent, b=torch.zeros(4)), glob)


def test_registry_specs():
    assert set(attacks.ATTACKS) == {"none", "nan", "sign_flip", "scale", "gaussian", "label_flip"}
    assert {k: s.kind for k, s in attacks.ATTACKS.items()} == {
        "none": "update", "nan": "update", "sign_flip": "update", "scale": "update", "gaussian": "update",
        "label_flip": "data"}
    from fedbench.registry import ATTACKS
    assert ATTACKS.names() == list(attacks.ATTACKS)         # the config validates against these names
    assert all(s.name == k for k, s in attacks.ATTACKS.items())
    sent, glob = _pair()
    gen = torch.Generator().manual_seed(0)
    for spec in attacks.ATTACKS.values():  # one calling convention for every update attack
        if spec.kind == "update":
            _check_layout(spec.fn(sent, glob, generator=gen, **spec.resolve()), sent)
    assert attacks.ATTACKS["gaussian"].resolve(sigma=2.0) == {"sigma": 2.0}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['sigma'\] for attack 'scale'"):
        attacks.ATTACKS["scale"].resolve(sigma=1.0)


@pytest.mark.parametrize("n,fraction", [(10, 0.2), (100, 0.3), (7, 0.25), (5, 0.5), (10, 0.0), (10, 1.0)])
def test_select_attackers_is_seeded_sorted_and_sized(n, fraction):
    ids = attacks.select_attackers(n, fraction, seed=123)
    assert len(ids) == round(fraction * n) and ids.dtype == np.int64
    assert np.all(np.diff(ids) > 0) and (len(ids) == 0 or (ids.min() >= 0 and ids.max() < n))
    np.testing.assert_array_equal(attacks.select_attackers(n, fraction, seed=123), ids)


def test_select_attackers_differs_across_seeds():
    sets = {tuple(attacks.select_attackers(100, 0.2, seed=s)) for s in range(5)}
    assert len(sets) == 5
    expected = np.sort(np.random.default_rng(7).choice(20, size=4, replace=False))
    np.testing.assert_array_equal(attacks.select_attackers(20, 0.2, seed=7), expected)


@pytest.mark.parametrize("args,match", [((10, 1.5, 0), "fraction=1.5"), ((10, -0.1, 0), "fraction=-0.1"),
                                        ((-1, 0.2, 0), "num_clients=-1"), ((2.5, 0.2, 0), "num_clients=2.5")])
def test_select_attackers_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        attacks.select_attackers(*args)


def test_nan_fault_sends_nan_for_every_float():
    sent, glob = _pair()
    out = attacks.nan_update(sent, glob)
    assert all(torch.isnan(v).all() for v in out.values() if v.is_floating_point())
