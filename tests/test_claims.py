"""Claims decided with intervals: known answers on seeded synthetic data (fast: no training)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedbench import claims as C
from fedbench.claims import (AGREES, DISAGREES, INCONCLUSIVE, TABLE_COLUMNS, ClaimResult, claims_table, decide,
                             paired_accuracy_difference, paired_log_ratio, paired_seed_difference,
                             rank_correlation, seed_mean, t_interval)


def synthetic_correct(rng, n_seeds, n_examples, delta, tau=0.0, base=0.7):
    """0/1 correctness of methods A and B on the same examples, paired by seed.

    Example difficulty is shared by A and B (so the pairing matters); each seed s adds a random effect
    u_s ~ N(0, tau^2) to the difference A - B. The population difference (over new seeds and examples)
    is `delta`.
    """
    difficulty = 0.15 * np.tanh(rng.normal(0, 1, n_examples))[None, :]
    u = rng.normal(0, tau, n_seeds)[:, None]
    pa = base + delta / 2 + u / 2 + difficulty
    pb = base - delta / 2 - u / 2 + difficulty
    a = rng.random((n_seeds, n_examples)) < pa
    b = rng.random((n_seeds, n_examples)) < pb
    return a, b


# -- decide() ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lo, hi, direction, threshold, expected", [
    (0.1, 0.2, +1, 0.0, AGREES),
    (-0.2, -0.1, +1, 0.0, DISAGREES),
    (-0.1, 0.1, +1, 0.0, INCONCLUSIVE),
    (0.1, 0.2, -1, 0.0, DISAGREES),
    (-0.2, -0.1, -1, 0.0, AGREES),
    (-0.1, 0.1, -1, 0.0, INCONCLUSIVE),
    # touching the threshold decides nothing (strict inequalities)
    (0.0, 0.2, +1, 0.0, INCONCLUSIVE),
    (-0.2, 0.0, +1, 0.0, INCONCLUSIVE),
    (0.0, 0.2, -1, 0.0, INCONCLUSIVE),
    (-0.2, 0.0, -1, 0.0, INCONCLUSIVE),
    (0.0, 0.0, +1, 0.0, INCONCLUSIVE),
    # a point interval off the threshold decides
    (0.5, 0.5, +1, 0.0, AGREES),
    # non-zero thresholds
    (-0.02, -0.01, +1, -0.03, AGREES),
    (-0.05, -0.04, +1, -0.03, DISAGREES),
    (1.5, 2.5, -1, 1.0, DISAGREES),
    # infinite and undefined bounds
    (-math.inf, math.inf, +1, 0.0, INCONCLUSIVE),
    (0.1, math.inf, +1, 0.0, AGREES),
    (-math.inf, -0.1, +1, 0.0, DISAGREES),
    (math.nan, math.nan, +1, 0.0, INCONCLUSIVE),
    (math.nan, 0.2, -1, 0.0, INCONCLUSIVE),
])
def test_decide_cases(lo, hi, direction, threshold, expected):
    assert decide(lo, hi, direction, threshold) == expected


@pytest.mark.parametrize("kwargs, name", [
    (dict(ci_low=0.2, ci_high=0.1, direction=1), "ci_low"),
    (dict(ci_low=0.0, ci_high=0.1, direction=0), "direction"),
    (dict(ci_low=0.0, ci_high=0.1, direction=2), "direction"),
    (dict(ci_low=0.0, ci_high=0.1, direction=True), "direction"),
    (dict(ci_low=0.0, ci_high=0.1, direction="+"), "direction"),
    (dict(ci_low=0.0, ci_high=0.1, direction=1, threshold=math.nan), "threshold"),
    (dict(ci_low=0.0, ci_high=0.1, direction=1, threshold="0"), "threshold"),
    (dict(ci_low="0", ci_high=0.1, direction=1), "ci_low"),
    (dict(ci_low=0.0, ci_high=None, direction=1), "ci_high"),
])
def test_decide_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        decide(**kwargs)


# -- paired accuracy difference (crossed seed x example interval) -------------------------------------

def test_large_difference_agrees_and_disagrees():
    a, b = synthetic_correct(np.random.default_rng(0), 3, 1000, delta=0.15, tau=0.01)
    up = paired_accuracy_difference(a, b, "A beats B", "paper", direction=+1, comparison="a - b")
    down = paired_accuracy_difference(a, b, "A loses to B", "paper", direction=-1)
    assert up.verdict == AGREES and down.verdict == DISAGREES
    assert up.estimate == pytest.approx(a.mean() - b.mean())
    assert up.ci_low < up.estimate < up.ci_high
    assert (up.n_seeds, up.n_examples, up.df) == (3, 1000, 2.0)
    assert "3 seeds x 1000 examples" in up.interval


def test_no_difference_is_mostly_inconclusive():
    rng = np.random.default_rng(1)
    reps = 200
    verdicts = [paired_accuracy_difference(*synthetic_correct(rng, 3, 500, delta=0.0, tau=0.01), "c", "p").verdict
                for r in range(reps)]
    rate = verdicts.count(INCONCLUSIVE) / reps
    print(f"inconclusive rate with no true difference: {rate:.3f}")
    assert rate >= 0.9


def _anova_by_hand(d):
    """The crossed pivot's mean squares with explicit loops (the textbook two-way ANOVA without replication)."""
    S, E = d.shape
    g = sum(d[s, e] for s in range(S) for e in range(E)) / (S * E)
    ds = [sum(d[s]) / E for s in range(S)]
    de = [sum(d[s, e] for s in range(S)) / S for e in range(E)]
    ms_s = E * sum((x - g) ** 2 for x in ds) / (S - 1)
    ms_e = S * sum((x - g) ** 2 for x in de) / (E - 1)
    ms_r = sum((d[s, e] - ds[s] - de[e] + g) ** 2 for s in range(S) for e in range(E)) / ((S - 1) * (E - 1))
    return g, ms_s, ms_e, ms_r


def test_crossed_pivot_matches_a_hand_computation():
    a, b = synthetic_correct(np.random.default_rng(11), 4, 60, delta=0.05, tau=0.03)
    d = a.astype(float) - b
    g, ms_s, ms_e, ms_r = _anova_by_hand(d)
    est, se, df = C.crossed_pivot(d)
    assert est == pytest.approx(g) and df == 3
    assert se ** 2 == pytest.approx(max(ms_s + ms_e - ms_r, ms_s, ms_e) / d.size)
    res = C.paired_mean(d, "c", "p")
    lo, hi = stats.t.interval(0.95, df=3, loc=g, scale=float(se))
    assert (res.ci_low, res.ci_high) == (pytest.approx(lo), pytest.approx(hi))


def test_crossed_pivot_floors_at_the_t_interval_over_seed_means():
    """Seeds that differ by far more than their test noise: the interval is the t interval over seed means."""
    rng = np.random.default_rng(12)
    d = np.stack([(rng.random(400) < p).astype(float) - (rng.random(400) < 0.5) for p in (0.3, 0.7, 0.45, 0.9)])
    _, se, df = C.crossed_pivot(d)
    assert float(se) == pytest.approx(stats.sem(d.mean(axis=1))) and df == 3


def test_crossed_pivot_point_when_every_value_is_equal():
    est, se, _ = C.crossed_pivot(np.zeros((3, 10)))
    assert (est, se) == (0.0, 0.0)
    res = paired_accuracy_difference(np.ones((3, 10)), np.ones((3, 10)), "c", "p")
    assert (res.ci_low, res.ci_high, res.verdict) == (0.0, 0.0, INCONCLUSIVE)


def test_one_seed_is_a_paired_t_over_examples_and_decides_nothing():
    a, b = synthetic_correct(np.random.default_rng(3), 1, 2000, delta=0.1)
    res = paired_accuracy_difference(a[0], b[0], "c", "p")        # 1-D = one seed
    d = a[0].astype(float) - b[0]
    lo, hi = stats.t.interval(0.95, df=d.size - 1, loc=d.mean(), scale=stats.sem(d))
    assert (res.ci_low, res.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert res.n_seeds == 1 and "1 seed" in res.interval
    assert res.ci_low > 0 and res.verdict == "single seed"          # clearly positive, still no verdict
    two = paired_accuracy_difference(*synthetic_correct(np.random.default_rng(3), 2, 500, delta=0.3), "c", "p")
    assert two.ci_low > 0 and two.verdict == "2 seeds"


def test_bootstrap_is_deterministic_by_seed():
    x = np.random.default_rng(5).normal(size=20)
    c1 = rank_correlation(x, x + np.random.default_rng(6).normal(size=20), "c", "p", seed=3)
    c2 = rank_correlation(x, x + np.random.default_rng(6).normal(size=20), "c", "p", seed=3)
    c3 = rank_correlation(x, x + np.random.default_rng(6).normal(size=20), "c", "p", seed=4)
    assert (c1.ci_low, c1.ci_high) == (c2.ci_low, c2.ci_high) != (c3.ci_low, c3.ci_high)


def test_claims_do_not_touch_global_rng():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a, b = synthetic_correct(np.random.default_rng(0), 2, 100, delta=0.0)
    paired_accuracy_difference(a, b, "c", "p")
    rank_correlation(np.arange(5.0), np.arange(5.0) ** 2, "c", "p")
    assert np.array_equal(np.random.get_state()[1], before)


@pytest.mark.parametrize("a, b, name", [
    (np.ones((2, 10)), np.ones((3, 10)), "correct_a and correct_b"),
    (np.full((2, 10), 0.5), np.ones((2, 10)), "correct_a"),
    (np.ones((2, 10)), np.where(np.eye(2, 10) > 0, np.nan, 1.0), "correct_b"),
    (np.ones((2, 2, 2)), np.ones((2, 2, 2)), "correct_a"),
    (np.ones((2, 1)), np.ones((2, 1)), "correct_a"),
])
def test_accuracy_difference_rejects_bad_input(a, b, name):
    with pytest.raises(ValueError, match=name):
        paired_accuracy_difference(a, b, "c", "p")


def test_accuracy_difference_rejects_bad_direction_and_role():
    a = np.ones((2, 10))
    with pytest.raises(ValueError, match="role"):
        paired_accuracy_difference(a, a, "c", "p", role="headline")
    with pytest.raises(ValueError, match="direction"):
        paired_accuracy_difference(a, a, "c", "p", direction=0)


# -- Student t intervals over seeds ------------------------------------------------------------------

def test_paired_seed_difference_matches_scipy():
    a = np.array([0.31, 0.35, 0.29, 0.33])
    b = np.array([0.21, 0.22, 0.24, 0.20])
    d = a - b
    lo, hi = stats.t.interval(0.95, df=d.size - 1, loc=d.mean(), scale=stats.sem(d))
    res = paired_seed_difference(a, b, "forgetting drops", "p", direction=+1)
    assert res.estimate == pytest.approx(d.mean())
    assert (res.ci_low, res.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert res.verdict == AGREES and res.n_examples is None and res.n_seeds == 4
    assert "Student t" in res.interval and "4 seeds" in res.interval


def test_seed_mean_matches_scipy():
    v = np.array([0.62, 0.48, 0.71])
    lo, hi = stats.t.interval(0.95, df=2, loc=v.mean(), scale=stats.sem(v))
    res = seed_mean(v, "ARI > 0.5", "p", threshold=0.5)
    assert (res.ci_low, res.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert res.verdict == INCONCLUSIVE                # 3 seeds spread 0.48..0.71: the interval covers 0.5
    assert seed_mean([0.90, 0.91, 0.92], "ARI > 0.5", "p", threshold=0.5).verdict == AGREES
    assert t_interval([1.0, 2.0, 3.0])[0] == 2.0


def test_one_seed_has_nan_interval_and_no_verdict():
    for res in (paired_seed_difference([0.5], [0.1], "c", "p"), seed_mean([0.9], "c", "p", threshold=0.5),
                paired_log_ratio([4.0], [1.0], "c", "p")):
        assert math.isnan(res.ci_low) and math.isnan(res.ci_high)
        assert res.verdict == "single seed" and "only 1 seed" in res.detail
    two = seed_mean([0.9, 0.91], "ARI > 0.5", "p", threshold=0.5)
    assert two.ci_low > 0.5 and two.verdict == "2 seeds"       # the interval is above, the verdict waits


def test_seed_functions_reject_bad_input():
    with pytest.raises(ValueError, match="values_a and values_b"):
        paired_seed_difference([1, 2, 3], [1, 2], "c", "p")
    with pytest.raises(ValueError, match="values_b"):
        paired_seed_difference([1, 2], [1, np.nan], "c", "p")
    with pytest.raises(ValueError, match="values"):
        seed_mean([[1, 2]], "c", "p")


def test_log_ratio_speed_up():
    rng = np.random.default_rng(8)
    base = np.array([100.0, 120.0, 90.0, 110.0])            # baseline time per seed
    fast = base / 2 * np.exp(rng.normal(0, 0.05, 4))        # a 2x speed-up with small noise
    slow = base * 2 * np.exp(rng.normal(0, 0.05, 4))        # a 0.5x "speed-up"
    up = paired_log_ratio(base, fast, "ours is faster", "p", threshold=1.0)
    down = paired_log_ratio(base, slow, "ours is faster", "p", threshold=1.0)
    assert up.verdict == AGREES and down.verdict == DISAGREES
    assert up.estimate == pytest.approx(stats.gmean(base / fast))
    l = np.log(base / fast)
    lo, hi = stats.t.interval(0.95, df=3, loc=l.mean(), scale=stats.sem(l))
    assert (up.ci_low, up.ci_high) == (pytest.approx(math.exp(lo)), pytest.approx(math.exp(hi)))
    assert up.ci_low > 1.5 and up.ci_high < 2.5


def test_log_ratio_rejects_non_positive():
    with pytest.raises(ValueError, match="values_b"):
        paired_log_ratio([1.0, 2.0], [1.0, 0.0], "c", "p")
    with pytest.raises(ValueError, match="values_a"):
        paired_log_ratio([-1.0, 2.0], [1.0, 1.0], "c", "p")
    with pytest.raises(ValueError, match="threshold"):
        paired_log_ratio([1.0, 2.0], [1.0, 1.0], "c", "p", threshold=0.0)


# -- rank correlation ----------------------------------------------------------------------------------

def test_rank_correlation_monotone_agrees():
    x = np.linspace(0, 1, 15)
    res = rank_correlation(x, np.exp(3 * x) + 0.01 * np.sin(40 * x), "similar tasks merge better", "p")
    assert res.estimate == pytest.approx(stats.spearmanr(x, np.exp(3 * x) + 0.01 * np.sin(40 * x))[0])
    assert res.verdict == AGREES
    assert rank_correlation(x, -x ** 2, "c", "p").verdict == DISAGREES
    pearson = rank_correlation(x, 2 * x + 1, "c", "p", method="pearson")
    assert pearson.estimate == pytest.approx(1.0) and "pearson" in pearson.interval


def test_rank_correlation_independent_noise_mostly_inconclusive():
    rng = np.random.default_rng(9)
    reps = 100
    verdicts = [rank_correlation(rng.normal(size=20), rng.normal(size=20), "c", "p", n_boot=500, seed=r).verdict
                for r in range(reps)]
    rate = verdicts.count(INCONCLUSIVE) / reps
    print(f"rank correlation inconclusive rate with independent noise: {rate:.2f}")
    # measured: 0.94 (nominal 0.95; a pairs bootstrap with n = 20 runs close to it)
    assert rate >= 0.85


def test_rank_correlation_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        rank_correlation([1, 2, 3], [1, 2, 3], "c", "p", method="kendall")
    with pytest.raises(ValueError, match="x needs"):
        rank_correlation([1, 2], [1, 2], "c", "p")
    with pytest.raises(ValueError, match="x and y"):
        rank_correlation([1, 2, 3], [1, 2], "c", "p")


# -- the one interval, p-values, HKSJ, Holm ---------------------------------------------------------------

def test_interval_and_p_value_are_one_pivot():
    lo, hi = C.interval(0.1, 0.02, 4)
    assert (float(lo), float(hi)) == (pytest.approx(stats.t.interval(0.95, 4, 0.1, 0.02)[0]),
                                      pytest.approx(stats.t.interval(0.95, 4, 0.1, 0.02)[1]))
    p = C.p_two_sided(0.1, 0.02, 4, 0.0)
    assert p == pytest.approx(2 * stats.t.sf(5.0, 4))
    lo_p, _ = C.interval(0.1, 0.02, 4, level=1 - p)              # the (1 - p) interval touches the threshold
    assert float(lo_p) == pytest.approx(0.0, abs=1e-9)
    assert C.interval(0.3, 0.0, 2) == (0.3, 0.3) and C.p_two_sided(0.3, 0.0, 2, 0.0) == 0.0
    with pytest.raises(ValueError, match="level"):
        C.interval(0.0, 1.0, 3, level=1.5)


def test_hksj_matches_a_hand_computation():
    y = np.array([0.05, 0.01, 0.09, 0.03])
    v = np.array([0.0004, 0.0009, 0.0006, 0.0005])
    w = 1 / v
    ybar = (w * y).sum() / w.sum()
    Q = (w * (y - ybar) ** 2).sum()
    tau2 = max(0.0, (Q - 3) / (w.sum() - (w ** 2).sum() / w.sum()))
    assert tau2 > 0                                                   # the example has between-seed spread
    ws = 1 / (v + tau2)
    mu = (ws * y).sum() / ws.sum()
    q = (ws * (y - mu) ** 2).sum() / 3
    est, se, df = C.hksj_pivot(y, v, modified=False)
    assert (float(est), float(se) ** 2, float(df)) == (pytest.approx(mu), pytest.approx(q / ws.sum()), 3.0)
    # no spread between seeds: tau^2 = 0, q < 1; the modified form uses max(1, q) = the fixed-effect variance
    flat = np.array([0.040, 0.041, 0.039, 0.040])
    _, se_hk, _ = C.hksj_pivot(flat, v, modified=False)
    _, se_mhk, _ = C.hksj_pivot(flat, v, modified=True)
    assert float(se_hk) < float(se_mhk) == pytest.approx(math.sqrt(1 / w.sum()))
    with pytest.raises(ValueError, match="variances"):
        C.hksj_pivot(y, np.zeros(4))


def test_holm_matches_a_hand_computation():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, 1*0.04, made monotone
    assert C.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert C.holm([0.5, math.nan]) == pytest.approx([1.0, 1.0])


# -- the table: roles, Holm, seeds, gates -------------------------------------------------------------------

def _seed_claim(values, claim, threshold=0.0):
    return seed_mean(values, claim, "p", threshold=threshold)


def test_claims_table_columns_roles_and_labels():
    a, b = synthetic_correct(np.random.default_rng(10), 2, 200, delta=0.2)
    results = [paired_accuracy_difference(a, b, "A > B", "Paper A", comparison="a - b"),
               seed_mean([0.9, 0.8, 0.85], "ARI > 0.5", "Paper B", threshold=0.5)]
    assert isinstance(results[0], ClaimResult)
    row = results[0].row()
    assert row["threshold"] == 0.0 and row["direction"] == 1 and row["comparison"] == "a - b"
    table = claims_table(results)
    assert list(table.columns) == TABLE_COLUMNS
    assert {"role", "n_seeds", "level", "p_value", "p_holm"} <= set(TABLE_COLUMNS)
    assert table["verdict"].tolist() == ["2 seeds (exploratory)", "agrees (exploratory)"]
    assert table["role"].tolist() == ["exploratory", "exploratory"] and table["level"].tolist() == [0.95, 0.95]
    assert table.loc[1, "n_examples"] is None or math.isnan(table.loc[1, "n_examples"])


def test_no_row_with_fewer_than_three_seeds_decides():
    rng = np.random.default_rng(13)
    for n in (1, 2):
        for res in (seed_mean(rng.normal(5, 0.01, n), "c", "p"),
                    paired_accuracy_difference(np.ones((n, 50)), np.zeros((n, 50)), "c", "p")):
            assert res.verdict == C.seeds_word(n) and res.verdict not in VERDICTS_DECISIVE


VERDICTS_DECISIVE = (AGREES, DISAGREES)


def test_primary_claims_holm_family():
    big = [0.30, 0.31, 0.29, 0.30, 0.32]                 # clearly > 0: tiny p
    mid = [0.040, 0.010, 0.035, 0.02, 0.03]              # p ~ 0.005
    results = [_seed_claim(big, "big"), _seed_claim(mid, "mid"), _seed_claim([0.5, 0.4, 0.6], "three seeds"),
               _seed_claim([0.1, 0.2, 0.15], "exploratory one")]
    t = claims_table(results, primary=["big", "mid", "three seeds"]).set_index("claim")
    assert t.index.tolist() == ["big", "mid", "three seeds", "exploratory one"]        # primary first
    assert t.loc["three seeds", "verdict"] == "too few seeds for a primary claim (3 < 5)"
    assert math.isnan(t.loc["three seeds", "p_holm"])
    # m = 3 (every declared primary counts); ranks by p: big 1st (level 1 - 0.05/3), mid 2nd (1 - 0.05/2)
    p_big, p_mid = results[0].p_value, results[1].p_value
    assert t.loc["big", "p_holm"] == pytest.approx(min(1, 3 * p_big))
    assert t.loc["mid", "p_holm"] == pytest.approx(max(3 * p_big, 2 * p_mid))
    assert t.loc["big", "level"] == pytest.approx(1 - 0.05 / 3) and t.loc["mid", "level"] == pytest.approx(0.975)
    lo, hi = stats.t.interval(0.975, df=4, loc=np.mean(mid), scale=stats.sem(mid))
    assert (t.loc["mid", "ci_low"], t.loc["mid", "ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert t.loc["big", "verdict"] == AGREES and t.loc["mid", "verdict"] == (AGREES if 2 * p_mid < 0.05
                                                                              else INCONCLUSIVE)
    assert t.loc["exploratory one", "verdict"] == "agrees (exploratory)"
    assert t.loc["exploratory one", "level"] == 0.95 and math.isnan(t.loc["exploratory one", "p_holm"])


def test_holm_can_undo_an_unadjusted_agreement():
    """Alone at 95% the claim agrees; as one of three primary claims its Holm-adjusted p is above 0.05."""
    vals = [0.030, 0.002, 0.028, 0.020, 0.010]
    alone = _seed_claim(vals, "x")
    assert alone.verdict == AGREES and alone.p_value == pytest.approx(stats.ttest_1samp(vals, 0).pvalue)   # 0.028
    t = claims_table([alone, _seed_claim([0.0, 0.1, -0.1, 0.05, -0.05], "y"),
                      _seed_claim([0.0, 0.2, -0.2, 0.1, -0.1], "z")], primary=["x", "y", "z"]).set_index("claim")
    assert t.loc["x", "p_holm"] == pytest.approx(3 * alone.p_value) and t.loc["x", "p_holm"] > 0.05
    assert t.loc["x", "verdict"] == INCONCLUSIVE


def test_primary_role_argument_and_bootstrap_cannot_be_primary():
    r = seed_mean([1.0, 1.1, 0.9, 1.05, 0.95], "c", "p", role="primary")
    assert claims_table([r])["role"].tolist() == ["primary"]
    corr = rank_correlation(np.arange(10.0), np.arange(10.0) ** 2, "corr", "p")
    with pytest.raises(ValueError, match="corr"):
        claims_table([corr], primary=["corr"])


def test_assay_gate_blocks_a_non_inferiority_claim_without_a_working_reference():
    rng = np.random.default_rng(14)
    full, head, peft = (rng.random((3, 400)) < p for p in (0.71, 0.70, 0.705))
    reference = paired_accuracy_difference(full, head, "full beats head", "p")
    assert reference.verdict == INCONCLUSIVE
    word = C.assay_gate(reference, "head-only")
    assert word == "not interpretable: reference does not beat head-only"
    ni = C.gate(paired_accuracy_difference(peft, full, "peft within 0.2 of full", "p", threshold=-0.2), word)
    assert ni.verdict == word and ni.gate == word
    assert claims_table([ni])["verdict"].tolist() == [word + " (exploratory)"]
    strong = paired_accuracy_difference(np.ones((3, 400)), rng.random((3, 400)) < 0.5, "full beats head", "p")
    assert C.assay_gate(strong, "head-only") == ""
    decided = C.gate(paired_accuracy_difference(peft, full, "peft within 0.2", "p", threshold=-0.2), "")
    assert decided.verdict == AGREES


def test_headroom_gate():
    assert C.headroom_gate(0.06) == "" and C.headroom_gate(0.05) == ""
    word = C.headroom_gate(0.024)
    assert word.startswith("no headroom") and "0.024 < 0.05" in word
    assert C.headroom_gate(0.03, margin=0.02) == ""
    r = C.gate(_seed_claim([0.1, 0.2, 0.15], "merge gap"), word)
    assert r.verdict == word
    # the seed count still comes first; a gated primary claim counts in the family but is not decided
    assert C.gate(_seed_claim([0.1, 0.2], "c"), word).verdict == "2 seeds"
    t = claims_table([C.gate(_seed_claim([0.1, 0.2, 0.15, 0.12, 0.18], "g"), word),
                      _seed_claim([0.30, 0.31, 0.29, 0.30, 0.32], "k")], primary=["g", "k"]).set_index("claim")
    assert t.loc["g", "verdict"] == word and t.loc["k", "level"] == pytest.approx(0.975)
    with pytest.raises(ValueError, match="validation_gain"):
        C.headroom_gate(math.nan)


# -- calibration: the interval holds its coverage where fedbench's results live -------------------------------
# Monte-Carlo error: 1,000 replicates per cell give a rate's standard error sqrt(0.95 * 0.05 / 1000) = 0.0069. A
# method with true coverage 0.95 falls below 0.93 with probability ~0.2% per cell; one at 0.91 passes with ~1.4%.
# The false-decisive bound 0.05 + 2.33 * 0.0069 = 0.066: a true rate of 0.05 exceeds it with probability 1% per
# cell, a true 0.08 stays under it with ~2%. Seeded: the test's outcome is fixed; these numbers say it means
# something. Measured (this grid, example_sd 0.2): coverage 0.943-0.99, false-decisive at most 0.052.

def test_calibration_coverage_and_false_decisions():
    from fedbench.claims_calibration import calibrate
    table = calibrate(reps=1000, example_sds=(0.2,), methods=("crossed (fedbench)",))
    assert len(table) == 24 and set(table["n_seeds"]) == {3, 5, 10} and set(table["n_examples"]) == {200, 1000}
    assert set(table["seed_sd"]) == {0.0, 0.02, 0.05, 0.07}
    print(table[["n_seeds", "n_examples", "seed_sd", "coverage", "false_decisive"]].to_string())
    assert table["coverage"].min() >= 0.93
    assert table["false_decisive"].max() <= 0.05 + 2.33 * math.sqrt(0.05 * 0.95 / 1000)


def test_calibration_shows_why_not_hksj():
    """Ten seeds on one shared test set whose examples differ in how much A beats B: HKSJ's within-seed
    variances are not independent across seeds and it under-covers; the crossed interval does not."""
    from fedbench.claims_calibration import calibrate
    t = calibrate(reps=1000, seeds=(10,), seed_sds=(0.0,), test_sizes=(200,), example_sds=(0.2,),
                  methods=("crossed (fedbench)", "modified HKSJ")).set_index("method")
    print(t[["coverage", "false_decisive"]])
    assert t.loc["modified HKSJ", "coverage"] < 0.93 <= t.loc["crossed (fedbench)", "coverage"]




# -- figures draw the claims' interval ---------------------------------------------------------------------

def test_figure_bands_are_the_claims_t_interval():
    """fedbench.plots' 95% band over seeds is claims.t_interval of the per-seed values (rows of one seed
    averaged first), and the log-scale band of ratio bars is its exponentiated log version."""
    from fedbench import plots
    rng = np.random.default_rng(15)
    df = pd.DataFrame([dict(method=m, seed=s, rep=r, y=float(v)) for m, n in (("a", 4), ("b", 3), ("c", 1))
                       for s in range(n) for r in range(2) for v in [rng.uniform(0.5, 2.0)]])
    g = plots._summarise(df, ["method"], "y", "seed", "ci95").set_index("method")
    for m in ("a", "b"):
        per_seed = df[df["method"] == m].groupby("seed")["y"].mean().to_numpy()
        mean, lo, hi = t_interval(per_seed)
        assert (g.loc[m, "mean"], g.loc[m, "lo"], g.loc[m, "hi"]) == (pytest.approx(mean), pytest.approx(lo),
                                                                     pytest.approx(hi))
    assert math.isnan(g.loc["c", "lo"]) and math.isnan(g.loc["c", "hi"])          # one seed: no band
    logged = plots._summarise(df, ["method"], "y", "seed", "ci95", log=True).set_index("method")
    a = df[df["method"] == "a"]
    per_seed = np.log(a["y"]).groupby(a["seed"]).mean().to_numpy()          # logs first, then per seed
    _, lo, hi = t_interval(per_seed)
    assert (logged.loc["a", "lo"], logged.loc["a", "hi"]) == (pytest.approx(math.exp(lo)), pytest.approx(math.exp(hi)))
