"""Krum, Multi-Krum and Bulyan against Flower's reference implementation, and against outliers.

Flower (flwr.server.strategy.aggregate) and the papers differ in places. Each test below states
which one it follows:
* Multi-Krum: Flower weights the selected clients by num_examples, and so does multi_krum when
  given ``weights``. With ``weights=None`` it is the paper's plain mean.
* Neighbours: Flower uses max(1, n - f - 2). krum/multi_krum require n >= 2f + 3 (the paper), so
  there it is n - f - 2. Bulyan's iterated Krum follows Flower on the shrinking set.
"""
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedbench.merging import robust

flwr_agg = pytest.importorskip("flwr.server.strategy.aggregate")

SHAPES = {"w": (3, 4), "b": (4,), "s": ()}


def _states(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [OrderedDict((k, torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for k, s in SHAPES.items())
            for _ in range(n)]


def _results(states, num_examples):
    return [([v.numpy().copy() for v in s.values()], int(m)) for s, m in zip(states, num_examples)]


def _assert_matches(out, ref, atol=1e-6):
    assert len(out) == len(ref)
    for (k, v), r in zip(out.items(), ref):
        np.testing.assert_allclose(v.double().numpy(), np.asarray(r, dtype=np.float64), rtol=0, atol=atol, err_msg=k)


CASES = [(n, f, seed) for n in (7, 11) for f in (1, 2) for seed in (0, 1, 2)]


@pytest.mark.parametrize("n,f,seed", CASES)
def test_krum_matches_flower(n, f, seed):
    states = _states(n, seed)
    out = robust.krum(states, num_malicious=f)
    ref = flwr_agg.aggregate_krum(_results(states, [1] * n), num_malicious=f, to_keep=0)
    _assert_matches(out, ref, atol=0)  # Krum returns one of the inputs, so the match is exact
    (idx,) = robust.selected_clients("krum", states, num_malicious=f)
    assert all(torch.equal(out[k], states[idx][k]) for k in out)
    assert idx == int(robust.krum_scores(states, f).argmin())


@pytest.mark.parametrize("n,f,seed", CASES)
@pytest.mark.parametrize("m", [1, 3, "n-f"])
def test_multi_krum_matches_flower_weighted_by_num_examples(n, f, seed, m):
    m = n - f if m == "n-f" else m
    states = _states(n, seed)
    num_examples = np.random.default_rng(seed).integers(1, 100, size=n)
    ref = flwr_agg.aggregate_krum(_results(states, num_examples), num_malicious=f, to_keep=m)
    # Flower weights Multi-Krum's average by num_examples; multi_krum does when given weights
    _assert_matches(robust.multi_krum(states, num_examples.tolist(), num_malicious=f, num_selected=m), ref)
    # weights=None is the paper's plain mean, which is Flower's with equal num_examples
    ref_plain = flwr_agg.aggregate_krum(_results(states, [5] * n), num_malicious=f, to_keep=m)
    _assert_matches(robust.multi_krum(states, num_malicious=f, num_selected=m), ref_plain)
    kept = robust.selected_clients("multi_krum", states, num_malicious=f, num_selected=m)
    scores = robust.krum_scores(states, f)
    assert len(kept) == m and set(kept) == set(torch.argsort(scores, stable=True)[:m].tolist())


@pytest.mark.parametrize("n,f,seed", [(7, 1, 0), (7, 1, 1), (11, 2, 0), (11, 2, 3), (11, 1, 4), (12, 2, 5)])
def test_bulyan_matches_flower(n, f, seed):
    states = _states(n, seed)
    results = _results(states, [1] * n)
    ref = flwr_agg.aggregate_bulyan(list(results), f, flwr_agg.aggregate_krum, to_keep=0)  # Flower pops its input
    _assert_matches(robust.bulyan(states, num_malicious=f), ref)
    assert len(robust.selected_clients("bulyan", states, num_malicious=f)) == n - 2 * f


def test_dtypes_and_keys_preserved_and_inputs_untouched():
    states = _states(7, 3, dtype=torch.float32)
    before = [OrderedDict((k, v.clone()) for k, v in s.items()) for s in states]
    ref = flwr_agg.aggregate_bulyan(_results(states, [1] * 7), 1, flwr_agg.aggregate_krum, to_keep=0)
    for rule, kw in [(robust.krum, {}), (robust.multi_krum, {"num_selected": 4}), (robust.bulyan, {})]:
        out = rule(states, [1] * 7, num_malicious=1, **kw)
        assert list(out) == list(SHAPES) and all(out[k].dtype == torch.float32 for k in out)
    _assert_matches(robust.bulyan(states, num_malicious=1), ref)  # float32 inputs, Flower in float32
    assert all(torch.equal(s[k], b[k]) for s, b in zip(states, before) for k in s)
    out = robust.krum(states, num_malicious=1)
    idx = robust.selected_clients("krum", states, num_malicious=1)[0]
    out["w"] += 1  # a copy, not the client's tensor
    assert torch.equal(states[idx]["w"], before[idx]["w"])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,f", [(7, 1), (11, 2)])
def test_an_obvious_outlier_is_never_kept(n, f, seed):
    states = _states(n, seed)
    bad = seed % n
    states[bad]["w"] = states[bad]["w"] + 1e6
    assert robust.selected_clients("krum", states, num_malicious=f) != [bad]
    assert bad not in robust.selected_clients("multi_krum", states, num_malicious=f)  # m = n - f
    assert bad not in robust.selected_clients("bulyan", states, num_malicious=f)
    honest = torch.stack([s["w"] for i, s in enumerate(states) if i != bad])
    for rule in (robust.krum, robust.multi_krum, robust.bulyan):
        out = rule(states, num_malicious=f)["w"]
        assert (out >= honest.min(0).values - 1e-12).all() and (out <= honest.max(0).values + 1e-12).all()
    # Bulyan does not move: putting the outlier far away in the other direction changes nothing
    other = [OrderedDict(s) for s in states]
    other[bad] = OrderedDict((k, v - 2e6 if k == "w" else v) for k, v in states[bad].items())
    torch.testing.assert_close(robust.bulyan(other, num_malicious=f)["w"], robust.bulyan(states, num_malicious=f)["w"],
                               rtol=0, atol=1e-12)


def test_duplicates_tie_to_the_lowest_index_like_flower():
    states = _states(7, 9)
    states[4] = OrderedDict((k, v.clone()) for k, v in states[2].items())
    states[5] = OrderedDict((k, v.clone()) for k, v in states[2].items())
    assert robust.selected_clients("krum", states, num_malicious=1) == [2]
    ref = flwr_agg.aggregate_bulyan(_results(states, [1] * 7), 1, flwr_agg.aggregate_krum, to_keep=0)
    _assert_matches(robust.bulyan(states, num_malicious=1), ref)


def test_scores_are_sum_of_n_minus_f_minus_2_nearest_squared_distances():
    states = _states(7, 5)
    flat = np.stack([np.concatenate([v.numpy().ravel() for v in s.values()]) for s in states])
    d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    f = 2
    expected = [np.sort(np.delete(d[i], i))[:7 - f - 2].sum() for i in range(7)]
    np.testing.assert_allclose(robust.krum_scores(states, f).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("call,match", [
    (lambda s: robust.krum(s[:4], num_malicious=1),
     r"krum needs n >= 2 \* num_malicious \+ 3.*n=4 with num_malicious=1.*<= 0"),
    (lambda s: robust.krum_scores(s[:6], 2), r"num_malicious=2"),
    (lambda s: robust.multi_krum(s, num_malicious=3), r"n=7 with num_malicious=3"),
    (lambda s: robust.krum(s, num_malicious=-1), r"num_malicious=-1 must be >= 0"),
    (lambda s: robust.krum(s, num_malicious=1.5), r"num_malicious=1.5 must be an integer"),
    (lambda s: robust.multi_krum(s, num_malicious=1, num_selected=0), r"num_selected=0 must be in \[1, 7\]"),
    (lambda s: robust.multi_krum(s, num_malicious=1, num_selected=8), r"num_selected=8 must be in \[1, 7\]"),
    (lambda s: robust.bulyan(s, num_malicious=2), r"bulyan needs n >= 4 \* num_malicious \+ 3.*n=7.*<= 1"),
    (lambda s: robust.bulyan(s[:6], num_malicious=1), r"num_malicious=1.*<= 0"),
    (lambda s: robust.krum(s, [1, 2], num_malicious=1), r"weights has 2 entries for 7 states"),
    (lambda s: robust.multi_krum(s, [0] * 7, num_malicious=1), r"weights .* sum to > 0"),
    (lambda s: robust.krum([], num_malicious=0), r"states is empty"),
    (lambda s: robust.selected_clients("median", s, num_malicious=1), r"rule='median'.*allowed"),
    (lambda s: robust.selected_clients("krum", s, num_malicious=1, num_selected=2), r"unknown parameter"),
])
def test_bad_parameters_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call(_states(7, 0))


def test_mismatched_states_are_rejected():
    states = _states(7, 0)
    states[3] = OrderedDict((k, v) for k, v in states[3].items() if k != "b")
    with pytest.raises(ValueError, match=r"states\[3\] has keys"):
        robust.krum(states, num_malicious=1)


def test_registry():
    assert robust.ROBUST_RULES == {"krum": robust.krum, "multi_krum": robust.multi_krum, "bulyan": robust.bulyan}
    states = _states(7, 1)
    assert robust.selected_clients(robust.krum, states, num_malicious=1) == \
        robust.selected_clients("krum", states, num_malicious=1)
