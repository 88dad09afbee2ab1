"""Claims decided with intervals: known answers on seeded synthetic data (fast: no training)."""
import math

import numpy as np
import pytest
from scipy import stats

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


# -- paired accuracy difference (two-way bootstrap) ---------------------------------------------------

def test_large_difference_agrees_and_disagrees():
    a, b = synthetic_correct(np.random.default_rng(0), 3, 1000, delta=0.15, tau=0.01)
    up = paired_accuracy_difference(a, b, "A beats B", "paper", direction=+1, comparison="a - b")
    down = paired_accuracy_difference(a, b, "A loses to B", "paper", direction=-1)
    assert up.verdict == AGREES and down.verdict == DISAGREES
    assert up.estimate == pytest.approx(a.mean() - b.mean())
    assert up.ci_low < up.estimate < up.ci_high
    assert (up.n_seeds, up.n_examples) == (3, 1000)
    assert "3 seeds x 1000 examples" in up.interval and "2000 resamples" in up.interval


def test_no_difference_is_mostly_inconclusive():
    rng = np.random.default_rng(1)
    reps = 200
    verdicts = [paired_accuracy_difference(*synthetic_correct(rng, 3, 500, delta=0.0, tau=0.01), "c", "p",
                                           seed=r).verdict for r in range(reps)]
    rate = verdicts.count(INCONCLUSIVE) / reps
    print(f"inconclusive rate with no true difference: {rate:.3f}")
    # measured: 0.990 (198 / 200); the two-way bootstrap is conservative when example noise dominates
    assert rate >= 0.9


def test_coverage_near_nominal():
    rng = np.random.default_rng(2)
    reps, delta = 200, 0.03
    covered = 0
    for r in range(reps):
        a, b = synthetic_correct(rng, 3, 1000, delta=delta, tau=0.02)
        res = paired_accuracy_difference(a, b, "c", "p", seed=r)
        covered += res.ci_low <= delta <= res.ci_high
    rate = covered / reps
    print(f"coverage of the true difference: {rate:.3f}")
    # measured: 0.970 at tau = 0.02 (seed effect comparable to the example noise). Outside this test,
    # 300 repetitions each: tau = 0 -> 0.997 (conservative: the seed x example noise counts twice),
    # tau = 0.05 -> 0.88 (too narrow: a bootstrap over 3 seeds underestimates the seed spread).
    assert 0.88 <= rate <= 0.995


def test_one_seed_bootstraps_examples_only():
    a, b = synthetic_correct(np.random.default_rng(3), 1, 2000, delta=0.1)
    res = paired_accuracy_difference(a[0], b[0], "c", "p")        # 1-D = one seed
    assert res.n_seeds == 1 and "(1 seed)" in res.interval
    assert res.verdict == AGREES
    # the bootstrap SE of a paired mean difference ~ sd(d) / sqrt(E)
    d = (a[0].astype(float) - b[0])
    se = d.std() / math.sqrt(d.size)
    assert (res.ci_high - res.ci_low) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bootstrap_is_deterministic_by_seed():
    a, b = synthetic_correct(np.random.default_rng(4), 3, 300, delta=0.02, tau=0.01)
    r1 = paired_accuracy_difference(a, b, "c", "p", seed=7)
    r2 = paired_accuracy_difference(a, b, "c", "p", seed=7)
    r3 = paired_accuracy_difference(a, b, "c", "p", seed=8)
    assert (r1.ci_low, r1.ci_high) == (r2.ci_low, r2.ci_high)
    assert (r1.ci_low, r1.ci_high) != (r3.ci_low, r3.ci_high)
    x = np.random.default_rng(5).normal(size=20)
    c1 = rank_correlation(x, x + np.random.default_rng(6).normal(size=20), "c", "p", seed=3)
    c2 = rank_correlation(x, x + np.random.default_rng(6).normal(size=20), "c", "p", seed=3)
    assert (c1.ci_low, c1.ci_high) == (c2.ci_low, c2.ci_high)


def test_bootstrap_does_not_touch_global_rng():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a, b = synthetic_correct(np.random.default_rng(0), 2, 100, delta=0.0)
    paired_accuracy_difference(a, b, "c", "p")
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


def test_accuracy_difference_rejects_bad_n_boot_and_direction():
    a = np.ones((2, 10))
    with pytest.raises(ValueError, match="n_boot"):
        paired_accuracy_difference(a, a, "c", "p", n_boot=10)
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


def test_one_seed_is_inconclusive_with_nan_interval():
    for res in (paired_seed_difference([0.5], [0.1], "c", "p"), seed_mean([0.9], "c", "p", threshold=0.5),
                paired_log_ratio([4.0], [1.0], "c", "p")):
        assert math.isnan(res.ci_low) and math.isnan(res.ci_high)
        assert res.verdict == INCONCLUSIVE and "only 1 seed" in res.detail


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


# -- the table -----------------------------------------------------------------------------------------

def test_claims_table_columns_and_rows():
    a, b = synthetic_correct(np.random.default_rng(10), 2, 200, delta=0.2)
    results = [paired_accuracy_difference(a, b, "A > B", "Paper A", comparison="a - b"),
               seed_mean([0.9, 0.8], "ARI > 0.5", "Paper B", threshold=0.5)]
    assert isinstance(results[0], ClaimResult)
    row = results[0].row()
    assert row["threshold"] == 0.0 and row["direction"] == 1 and row["comparison"] == "a - b"
    table = claims_table(results)
    assert list(table.columns) == TABLE_COLUMNS == ["claim", "paper", "comparison", "estimate", "ci_low",
                                                     "ci_high", "n_seeds", "n_examples", "verdict", "interval",
                                                     "detail"]
    assert len(table) == 2 and set(table["verdict"]) <= {AGREES, DISAGREES, INCONCLUSIVE}
    assert table.loc[1, "n_examples"] is None or math.isnan(table.loc[1, "n_examples"])
