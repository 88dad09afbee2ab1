"""Claims decided with intervals, never on a bare point estimate.

How to read a verdict
---------------------
Each claim of a paper is turned into a quantity with a direction and a threshold, e.g. "LoRA is at most
0.03 below full fine-tuning" becomes ``lora - full > -0.03`` (direction +1, threshold -0.03), and "the
configurator is faster" becomes ``time_full / time_ours > 1`` (a ratio, threshold 1). We measure the
quantity and an interval around it, then:

* **agrees**: the whole interval lies on the paper's side of the threshold.
* **disagrees**: the whole interval lies on the other side.
* **inconclusive**: the interval contains (or touches) the threshold: at our scale the data cannot tell.
* **single seed** / **2 seeds**: a quantity that varies between training seeds is never decided from fewer
  than ``MIN_SEEDS`` (3) seeds: with 1-2 seeds the seed-to-seed spread is unknown or a guess.
* **too few seeds for a primary claim (3 < 5)**: a primary claim is decided only on >= ``MIN_PRIMARY_SEEDS``.
* **not interpretable: reference does not beat <placebo>**: a "within a margin of the reference" claim
  whose reference does not beat its placebo by its own interval (no assay sensitivity: :func:`assay_gate`).
* **no headroom**: a claim about what fine-tuning or merging does, where fine-tuning does not beat the frozen
  model on validation by ``HEADROOM_MARGIN`` (:func:`headroom_gate`).

Roles. ``claims_table(results, primary=...)`` (or ``role="primary"`` on a claim) marks an experiment's 1-3
pre-stated headline claims. They form one family: their decisions are Holm-corrected (``p_holm``), and each
is shown with the interval at the level of its Holm step (1 - 0.05 / (m - i + 1) for the i-th smallest p of m),
so a primary interval that excludes the threshold is one Holm rejects (unless an earlier step stopped Holm:
then the detail says so). Every other row is exploratory: its 95% interval is unadjusted and its verdict
carries the label, e.g. ``agrees (exploratory)``.

The seed is the unit. Every interval is ``estimate +- t_{df} * se`` from one function (:func:`interval`),
also used by the figures (``fedbench.plots`` draws :func:`t_interval`):

* per-seed metrics (forgetting, ARI, time-to-target, a per-seed mean): the Student t interval over seeds
  (df = S - 1) of the paired difference, of the mean, or of the log ratio (speed-ups, geometric mean);
* per-example metrics (accuracy) of two methods on the same test examples, paired by seed: the crossed
  seed x example random-effects interval (:func:`crossed_pivot`); see there why not the HKSJ meta-analysis
  (:func:`hksj_pivot`, kept and tested) nor the earlier two-way bootstrap;
* correlations: a bootstrap over (x, y) pairs (percentile interval; never a primary claim);
* byte counts: exact.

``tools/claims_calibration.py`` measures the coverage of these intervals on simulated data with a known answer
(``results/claims_calibration.csv``; ``tests/test_claims.py`` checks a fast subset).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

AGREES = "agrees"
DISAGREES = "disagrees"
INCONCLUSIVE = "inconclusive"
VERDICTS = (AGREES, DISAGREES, INCONCLUSIVE)
PRIMARY, EXPLORATORY = "primary", "exploratory"
ROLES = (PRIMARY, EXPLORATORY)
MIN_SEEDS = 3                 # no agrees / disagrees from fewer seeds
MIN_PRIMARY_SEEDS = 5         # no primary decision from fewer seeds
HEADROOM_MARGIN = 0.05        # fine-tuning must beat the frozen model on validation by this much

LEVEL = 0.95
ALPHA = 1 - LEVEL
TABLE_COLUMNS = ["claim", "role", "paper", "comparison", "estimate", "ci_low", "ci_high", "level", "p_value",
                 "p_holm", "n_seeds", "n_examples", "verdict", "interval", "detail"]


# -- the decision rule ---------------------------------------------------------------------------------

def _check_direction(direction) -> int:
    if isinstance(direction, bool) or direction not in (1, -1):
        raise ValueError(f"direction must be +1 (claim: quantity > threshold) or -1 (quantity < threshold), "
                         f"got {direction!r}")
    return int(direction)


def _check_threshold(threshold, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not math.isfinite(threshold):
        raise ValueError(f"{name} must be a finite number, got {threshold!r}")
    return float(threshold)


def decide(ci_low: float, ci_high: float, direction: int, threshold: float = 0.0) -> str:
    """The verdict of one claim from its interval [ci_low, ci_high].

    direction = +1: the paper claims quantity > threshold; -1: quantity < threshold.
    Rule (strict inequalities: an interval that touches the threshold decides nothing):

        direction +1:  agrees if ci_low > threshold,  disagrees if ci_high < threshold
        direction -1:  agrees if ci_high < threshold, disagrees if ci_low > threshold
        otherwise (or if either bound is NaN, i.e. the interval is undefined): inconclusive

    Infinite bounds are allowed (an unbounded side never lies beyond the threshold).
    """
    direction = _check_direction(direction)
    threshold = _check_threshold(threshold)
    for name, v in (("ci_low", ci_low), ("ci_high", ci_high)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number, got {v!r}")
    lo, hi = float(ci_low), float(ci_high)
    if math.isnan(lo) or math.isnan(hi):
        return INCONCLUSIVE
    if lo > hi:
        raise ValueError(f"ci_low must be <= ci_high, got ci_low={lo!r} > ci_high={hi!r}")
    above, below = lo > threshold, hi < threshold
    if direction == -1:
        above, below = below, above
    return AGREES if above else DISAGREES if below else INCONCLUSIVE


def seeds_word(n: int) -> str:
    """The verdict of a seed-based claim with fewer than MIN_SEEDS seeds."""
    return "single seed" if n <= 1 else f"{n} seeds"


def too_few_for_primary(n: int) -> str:
    return f"too few seeds for a primary claim ({n} < {MIN_PRIMARY_SEEDS})"


# -- the one interval ------------------------------------------------------------------------------------

def interval(estimate, se, df, level: float = LEVEL):
    """estimate +- t_{(1 + level) / 2, df} * se (arrays broadcast; df = inf is the normal; se = 0 a point).

    Every interval of fedbench's claims and figures comes from here, on the scale it is computed on (log
    ratios are exponentiated by the caller). NaN se or df gives NaN bounds (undefined: nothing decided)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    est, se, df = np.asarray(estimate, float), np.asarray(se, float), np.asarray(df, float)
    with np.errstate(invalid="ignore"):
        half = stats.t.ppf(0.5 + level / 2, df) * se
    half = np.where(se == 0, 0.0, half)
    return est - half, est + half


def p_two_sided(estimate: float, se: float, df: float, threshold: float) -> float:
    """Two-sided p of H0: quantity = threshold, from the same t pivot as :func:`interval` (so the level-L
    interval excludes the threshold exactly when p < 1 - L)."""
    if not (math.isfinite(se) and math.isfinite(estimate)) or math.isnan(df):
        return math.nan
    if se == 0:
        return 0.0 if estimate != threshold else 1.0
    return float(2 * stats.t.sf(abs(estimate - threshold) / se, df))


def t_pivot(values):
    """(mean, se, df) over the last axis: se = sd / sqrt(n), df = n - 1; se = NaN with < 2 values."""
    v = np.asarray(values, dtype=float)
    n = v.shape[-1]
    m = v.mean(axis=-1)
    if n < 2:
        return m, np.full_like(m, np.nan), np.full_like(m, np.nan)
    return m, v.std(axis=-1, ddof=1) / math.sqrt(n), np.full_like(m, n - 1.0)


def t_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the Student t interval over seeds; (mean, nan, nan) with < 2 values.

    Why t and not a bootstrap over seeds: with 3-5 seeds a percentile bootstrap sees at most a handful of
    distinct resample means and ignores that the spread itself is estimated from 3-5 values; it comes out
    far too narrow (for normal data a 3-seed bootstrap covers ~76% instead of 95%, a 5-seed one ~84%;
    measured over 2,000 repetitions). The t interval is exact for normal per-seed values.
    """
    v = np.asarray(values, dtype=float)
    m, se, df = t_pivot(v.reshape(-1))
    lo, hi = interval(m, se, df, level)
    return float(m), float(lo), float(hi)


def hksj_pivot(estimates, variances, modified: bool = True):
    """Random-effects meta-analysis of per-seed estimates y_s with within-seed variances v_s, with the
    Hartung-Knapp-Sidik-Jonkman variance; batched over leading axes (the last axis is the seed).

        DerSimonian-Laird: w_s = 1/v_s, Q = sum w_s (y_s - ybar_w)^2,
                           tau^2 = max(0, (Q - (S-1)) / (sum w - sum w^2 / sum w))
        w*_s = 1 / (v_s + tau^2),  mu = sum w*_s y_s / sum w*_s
        q = sum w*_s (y_s - mu)^2 / (S - 1);  se^2 = q / sum w*  (modified: max(1, q) / sum w*);  df = S - 1

    The modified form (max(1, q)) keeps HKSJ from coming out narrower than the fixed-effect interval when
    tau^2 is estimated as 0 at small S. Used by the calibration for comparison: when seeds share one test
    set its within-seed variances are not independent and it under-covers (see :func:`crossed_pivot`).
    """
    y, v = np.asarray(estimates, float), np.asarray(variances, float)
    if y.shape != v.shape or y.shape[-1] < 2:
        raise ValueError(f"estimates and variances must have one value per seed (>= 2), shapes {y.shape}, {v.shape}")
    if np.any(v <= 0):
        raise ValueError("variances must be > 0")
    S = y.shape[-1]
    w = 1 / v
    sw = w.sum(-1)
    q_fe = (w * (y - ((w * y).sum(-1) / sw)[..., None]) ** 2).sum(-1)
    tau2 = np.maximum(0.0, (q_fe - (S - 1)) / (sw - (w ** 2).sum(-1) / sw))
    ws = 1 / (v + tau2[..., None])
    mu = (ws * y).sum(-1) / ws.sum(-1)
    q = (ws * (y - mu[..., None]) ** 2).sum(-1) / (S - 1)
    if modified:
        q = np.maximum(q, 1.0)
    return mu, np.sqrt(q / ws.sum(-1)), np.full_like(mu, S - 1.0)


def crossed_pivot(d):
    """(mean, se, df) of the mean of paired per-(seed, example) values d (..., S, E), S >= 2.

    Seeds and test examples are crossed (every seed is scored on the same examples), so the mean carries
    three variances: seed (sigma_s^2 / S), example (sigma_e^2 / E: examples on which A and B differ for
    every seed alike do not average out over seeds) and their interaction (sigma_r^2 / (S E)). The two-way
    ANOVA mean squares (method of moments) estimate their sum without bias:

        MS_S = E sum_s (dbar_s. - dbar)^2 / (S-1),  MS_E = S sum_e (dbar_.e - dbar)^2 / (E-1),
        MS_R = sum (d - dbar_s. - dbar_.e + dbar)^2 / ((S-1)(E-1))
        se^2 = (MS_S + MS_E - MS_R) / (S E),  df = S - 1 (the seed is the unit),

    floored, like the modified HKSJ, at the larger of MS_S / (S E) (the t interval over per-seed means) and
    MS_E / (S E) (the paired interval over per-example means): each has expectation below the true variance,
    so the floor only removes estimates that fell below a part of the truth. df = S - 1 rather than
    Satterthwaite's: with 3 seeds and a seed variance comparable to the example variance Satterthwaite gave
    df ~ 4 and covered 0.92 (measured, 1,000 replicates); S - 1 is exact when the seed variance dominates and
    conservative otherwise.
    Why not HKSJ over seeds (:func:`hksj_pivot`): it takes each seed's test-set variance as independent of
    the others', which they are not on one shared test set; simulated with examples that differ in how much
    A beats B (example_sd 0.2), 10 seeds x 200 examples, modified HKSJ covered 0.91 (the calibration table).
    Why not the earlier two-way bootstrap over seeds and examples: resampling 3 seeds shrinks their spread by
    (S-1)/S and takes normal-like percentiles where t(2) is due; it covered 0.88 at 3 seeds, seed sd 0.05.
    """
    d = np.asarray(d, dtype=float)
    S, E = d.shape[-2:]
    if S < 2 or E < 2:
        raise ValueError(f"d needs >= 2 seeds and >= 2 examples, got shape {d.shape}")
    g = d.mean(axis=(-2, -1))
    ds, de = d.mean(axis=-1), d.mean(axis=-2)
    ms_s = E * ((ds - g[..., None]) ** 2).sum(-1) / (S - 1)
    ms_e = S * ((de - g[..., None]) ** 2).sum(-1) / (E - 1)
    resid = d - ds[..., :, None] - de[..., None, :] + g[..., None, None]
    ms_r = (resid ** 2).sum(axis=(-2, -1)) / ((S - 1) * (E - 1))
    var = np.maximum.reduce([ms_s + ms_e - ms_r, ms_s, ms_e]) / (S * E)
    df = np.full_like(g, S - 1.0)
    return g, np.sqrt(var), df


# -- the result record ---------------------------------------------------------------------------------

@dataclass
class ClaimResult:
    """One published claim, our estimate of the quantity it is about, its interval and the verdict.

    se / df / log_scale are the pivot every interval is computed from (ci at `level`: :func:`interval` on
    estimate (log(estimate) when log_scale) +- t_df * se); gate, when set, is the word that replaces the
    statistical decision (:func:`assay_gate`, :func:`headroom_gate`, a censored time)."""
    claim: str
    paper: str
    comparison: str
    estimate: float
    ci_low: float
    ci_high: float
    n_seeds: int | None
    n_examples: int | None
    verdict: str
    interval: str
    threshold: float
    direction: int
    detail: str = ""
    role: str = EXPLORATORY
    level: float = LEVEL
    p_value: float = math.nan
    p_holm: float = math.nan
    se: float = math.nan
    df: float = math.nan
    log_scale: bool = False
    gate: str = ""

    def row(self) -> dict:
        return asdict(self)

    def bounds(self, level: float) -> tuple[float, float]:
        """The interval at `level` from this claim's pivot (NaN if it has none, e.g. a bootstrap)."""
        centre = math.log(self.estimate) if self.log_scale else self.estimate
        lo, hi = (float(x) for x in interval(centre, self.se, self.df, level))
        return (math.exp(lo), math.exp(hi)) if self.log_scale else (lo, hi)

    def p(self) -> float:
        """Two-sided p against the threshold from the pivot (NaN without one)."""
        if self.log_scale:
            return p_two_sided(math.log(self.estimate), self.se, self.df, math.log(self.threshold))
        return p_two_sided(self.estimate, self.se, self.df, self.threshold)


def _verdict(r: ClaimResult, lo: float, hi: float) -> str:
    """Seeds first, then a gate, then the interval."""
    if r.n_seeds is not None and r.n_seeds < MIN_SEEDS:
        return seeds_word(r.n_seeds)
    if r.role == PRIMARY and r.n_seeds is not None and r.n_seeds < MIN_PRIMARY_SEEDS:
        return too_few_for_primary(r.n_seeds)
    if r.gate:
        return r.gate
    return decide(lo, hi, r.direction, r.threshold)


def _check_role(role) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role


def _result(claim, paper, comparison, estimate, lo, hi, direction, threshold, *, n_seeds, n_examples,
            interval, detail="", se=math.nan, df=math.nan, log_scale=False, role=EXPLORATORY) -> ClaimResult:
    r = ClaimResult(claim=claim, paper=paper, comparison=comparison, estimate=float(estimate),
                    ci_low=float(lo), ci_high=float(hi), n_seeds=n_seeds, n_examples=n_examples,
                    verdict="", interval=interval, threshold=float(_check_threshold(threshold)),
                    direction=_check_direction(direction), detail=detail, role=_check_role(role),
                    se=float(se), df=float(df), log_scale=log_scale)
    r.p_value = r.p()
    r.verdict = _verdict(r, r.ci_low, r.ci_high)
    return r


# -- gates: words that replace a decision ------------------------------------------------------------------

def gate(result: ClaimResult, reason: str) -> ClaimResult:
    """`result` with its decision replaced by `reason` (kept through claims_table; seeds still come first).
    An empty reason leaves the result as it is."""
    if not reason:
        return result
    r = replace(result, gate=reason)
    r.verdict = _verdict(r, r.ci_low, r.ci_high)
    return r


def assay_gate(reference: ClaimResult, placebo: str) -> str:
    """'' when `reference` (the reference minus its placebo, e.g. full FT - head-only) agrees, i.e. the
    reference beats the placebo by its own interval; else the word that a "within a margin of the reference"
    claim reads instead of a decision: without assay sensitivity "as good as the reference" means nothing."""
    if reference.verdict == AGREES:
        return ""
    return f"not interpretable: reference does not beat {placebo}"


def headroom_gate(validation_gain: float, margin: float = HEADROOM_MARGIN) -> str:
    """'' when fine-tuning beats the frozen model on validation by >= `margin` (mean gain, accuracy points
    as fractions); else 'no headroom (...)': a claim about what fine-tuning or merging does is not decided
    when fine-tuning has barely moved the model (every merge then looks like the frozen model)."""
    margin = _check_threshold(margin, "margin")
    g = float(validation_gain)
    if not math.isfinite(g):
        raise ValueError(f"validation_gain must be finite, got {validation_gain!r}")
    return "" if g >= margin else (f"no headroom: fine-tuning beats the frozen model on validation by {g:.3f} "
                                   f"< {margin:g}")


# -- the table: roles and Holm -------------------------------------------------------------------------

def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (step-down, monotone), NaN treated as 1."""
    p = np.nan_to_num(np.asarray(p_values, float), nan=1.0)
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out


def _decidable(r: ClaimResult) -> bool:
    """Enough seeds, no gate, a finite p: Holm may decide it."""
    return not r.gate and _verdict(r, 0.0, 0.0) in VERDICTS and math.isfinite(r.p_value)


def claims_table(results: list[ClaimResult], primary=(), alpha: float = ALPHA) -> pd.DataFrame:
    """One row per claim, columns TABLE_COLUMNS, primary rows first.

    primary: claim texts to mark primary (besides any built with role="primary"). The primary rows are one
    Holm family of size m (every declared primary row counts, also one that cannot be decided): a decidable
    row's verdict is agrees / disagrees when p_holm < alpha (by the side of the estimate), else inconclusive;
    its interval is shown at its Holm step's level 1 - alpha / (m - i + 1) (i = its rank by p). A primary claim
    needs a pivot (a t interval): a bootstrap-only claim (a correlation) cannot be primary. Exploratory rows
    keep their unadjusted 95% interval and read e.g. 'agrees (exploratory)'.
    """
    primary = set(primary)
    rows = [replace(r, role=PRIMARY) if r.claim in primary else r for r in results]
    prim = [i for i, r in enumerate(rows) if r.role == PRIMARY]
    for i in prim:
        if rows[i].n_seeds is None and math.isnan(rows[i].se):
            raise ValueError(f"primary claim {rows[i].claim!r} has no t pivot (interval: {rows[i].interval}); "
                             "only t-based or exact claims can be primary")
    if prim:
        dec = [i for i in prim if _decidable(rows[i])]
        p = np.array([rows[i].p_value if i in dec else math.nan for i in prim])
        adj = holm(p)
        rank = np.argsort(np.nan_to_num(p, nan=2.0), kind="stable").argsort()
        m = len(prim)
        for k, i in enumerate(prim):
            r = rows[i]
            level = 1 - alpha / (m - rank[k])
            lo, hi = r.bounds(level) if not math.isnan(r.se) else (r.ci_low, r.ci_high)
            r = replace(r, role=PRIMARY, ci_low=lo, ci_high=hi, level=level, p_holm=float(adj[k]) if i in dec
                        else math.nan)
            word = _verdict(r, lo, hi)
            if i in dec:
                step = decide(lo, hi, r.direction, r.threshold)
                word = step if r.p_holm < alpha else INCONCLUSIVE
                if step != INCONCLUSIVE and word == INCONCLUSIVE:
                    r.detail = "; ".join(x for x in (r.detail, "Holm stopped at an earlier step") if x)
            r.verdict = word
            rows[i] = r
    for i, r in enumerate(rows):
        if r.role == EXPLORATORY:
            rows[i] = replace(r, verdict=f"{r.verdict} ({EXPLORATORY})")
    rows = [rows[i] for i in prim] + [r for r in rows if r.role == EXPLORATORY]
    return check_table(pd.DataFrame([r.row() for r in rows], columns=TABLE_COLUMNS))


def base_verdict(verdict: str) -> str:
    """The verdict without its role label: 'agrees (exploratory)' -> 'agrees'."""
    suffix = f" ({EXPLORATORY})"
    return verdict[: -len(suffix)] if verdict.endswith(suffix) else verdict


def check_table(table: pd.DataFrame) -> pd.DataFrame:
    """`table` if it keeps the rules of a claims table, else ValueError naming the row: the columns, a role per
    row, primary rows first, every exploratory verdict labelled, no agrees / disagrees from < MIN_SEEDS seeds,
    and no primary decision from < MIN_PRIMARY_SEEDS seeds or without a Holm-adjusted p."""
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"claims table lacks the columns {missing}")
    roles = table["role"].tolist()
    if not set(roles) <= set(ROLES) or roles != sorted(roles, key=lambda r: r != PRIMARY):
        raise ValueError(f"role must be one of {ROLES}, primary rows first; got {roles}")
    for _, r in table.iterrows():
        word, n = base_verdict(r["verdict"]), r["n_seeds"]
        if (r["role"] == EXPLORATORY) != r["verdict"].endswith(f" ({EXPLORATORY})"):
            raise ValueError(f"claim {r['claim']!r}: the verdict {r['verdict']!r} does not carry its role")
        decisive = word in (AGREES, DISAGREES)
        seeds = None if n is None or (isinstance(n, float) and math.isnan(n)) else int(n)
        if decisive and seeds is not None and seeds < MIN_SEEDS:
            raise ValueError(f"claim {r['claim']!r}: {word!r} from {seeds} seeds (< {MIN_SEEDS})")
        if decisive and r["role"] == PRIMARY and ((seeds is not None and seeds < MIN_PRIMARY_SEEDS)
                                                   or not math.isfinite(r["p_holm"])):
            raise ValueError(f"claim {r['claim']!r}: a primary decision needs >= {MIN_PRIMARY_SEEDS} seeds and "
                             f"a Holm-adjusted p")
    return table


# -- input checks --------------------------------------------------------------------------------------

def _check_n_boot(n_boot) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 100:
        raise ValueError(f"n_boot must be an integer >= 100, got {n_boot!r}")
    return int(n_boot)


def _per_seed(values, name: str) -> np.ndarray:
    """A 1-D float array of finite per-seed values."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per seed), got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    return v


def _paired_per_seed(values_a, values_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _per_seed(values_a, "values_a"), _per_seed(values_b, "values_b")
    if a.shape != b.shape:
        raise ValueError(f"values_a and values_b must pair seed i with seed i: shapes {a.shape} != {b.shape}")
    return a, b


def _correct_matrix(correct, name: str) -> np.ndarray:
    """(n_seeds, n_examples) array of 0/1; a 1-D array is one seed. Missing values (NaN) are rejected:
    the pairing of examples between the two methods must be complete."""
    c = np.asarray(correct)
    if c.ndim == 1:
        c = c[None, :]
    if c.ndim != 2:
        raise ValueError(f"{name} must be (n_seeds, n_examples), got shape {c.shape}")
    c = c.astype(float)
    if not np.all((c == 0) | (c == 1)):
        raise ValueError(f"{name} must hold only 0/1 (or bool) per example; NaN/missing entries are not allowed")
    return c


# -- Student t intervals over seeds --------------------------------------------------------------------

def _t_text(n: int, what: str) -> str:
    return f"Student t over {n} seeds ({what})"


def _too_few_seeds(n: int) -> str:
    return f"only {n} seed(s): a 95% interval over seeds needs >= 2, so nothing can be decided"


def _t_claim(values, claim, paper, direction, threshold, comparison, detail, what, role, log_scale=False):
    v = np.asarray(values, dtype=float)
    m, se, df = (float(x) for x in t_pivot(v))
    lo, hi = (float(x) for x in interval(m, se, df))
    if log_scale:
        m, lo, hi = math.exp(m), math.exp(lo), math.exp(hi)
    extra = _too_few_seeds(v.size) if v.size < 2 else ""
    return _result(claim, paper, comparison, m, lo, hi, direction, threshold, n_seeds=int(v.size),
                   n_examples=None, interval=_t_text(v.size, what), se=se, df=df, log_scale=log_scale,
                   role=role, detail="; ".join(x for x in (detail, extra) if x))


def paired_seed_difference(values_a, values_b, claim: str, paper: str, direction: int = +1,
                           threshold: float = 0.0, comparison: str = "a - b", detail: str = "",
                           role: str = EXPLORATORY) -> ClaimResult:
    """A per-seed metric (forgetting, ARI, time-to-target) of A vs B, seed i of A paired with seed i of B.

    d_s = a_s - b_s;  estimate = mean(d);  interval = mean(d) +- t_{0.975, S-1} * sd(d) / sqrt(S).
    With < 2 seeds: ci = (nan, nan); with < 3 seeds the verdict is the seed count.
    """
    a, b = _paired_per_seed(values_a, values_b)
    return _t_claim(a - b, claim, paper, direction, threshold, comparison, detail, "paired differences", role)


def seed_mean(values, claim: str, paper: str, direction: int = +1, threshold: float = 0.0,
              comparison: str = "", detail: str = "", role: str = EXPLORATORY) -> ClaimResult:
    """One per-seed quantity's mean vs a threshold (e.g. ARI > 0.5): mean +- t_{0.975, S-1} * sd / sqrt(S)."""
    v = _per_seed(values, "values")
    return _t_claim(v, claim, paper, direction, threshold, comparison, detail, "mean", role)


def paired_log_ratio(values_a, values_b, claim: str, paper: str, direction: int = +1, threshold: float = 1.0,
                     comparison: str = "a / b", detail: str = "", role: str = EXPLORATORY) -> ClaimResult:
    """A ratio such as a speed-up (a = baseline time, b = our time), paired by seed.

    l_s = log(a_s / b_s);  estimate = exp(mean(l)) (the geometric mean ratio);
    interval = exp(mean(l) +- t_{0.975, S-1} * sd(l) / sqrt(S)).  The threshold is on the ratio scale
    (default 1.0 = "no change"). Why the log scale: ratios multiply, and a 2x and a 0.5x are symmetric
    around 1 only in logs. Non-positive values are rejected.
    """
    a, b = _paired_per_seed(values_a, values_b)
    if np.any(a <= 0) or np.any(b <= 0):
        bad = "values_a" if np.any(a <= 0) else "values_b"
        raise ValueError(f"{bad} must be > 0 for a log ratio, got {(a if bad == 'values_a' else b).tolist()}")
    threshold = _check_threshold(threshold)
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0 on the ratio scale, got {threshold!r}")
    return _t_claim(np.log(a) - np.log(b), claim, paper, direction, threshold, comparison, detail,
                    "log ratio, exponentiated; estimate = geometric mean", role, log_scale=True)


# -- paired per-example quantities (accuracy) ------------------------------------------------------------

def paired_accuracy_difference(correct_a, correct_b, claim: str, paper: str, direction: int = +1,
                               threshold: float = 0.0, n_boot: int | None = None, seed: int | None = None,
                               comparison: str = "", detail: str = "", role: str = EXPLORATORY) -> ClaimResult:
    """Accuracy of A minus accuracy of B on the same test examples, seed i of A paired with seed i of B.

    correct_a, correct_b: (n_seeds, n_examples) of 0/1 or bool (1-D = one seed); NaN/missing entries are
    rejected with ValueError, because the pairing of examples must be complete.
    d[s, e] = A[s, e] - B[s, e];  estimate = mean(d) = acc(A) - acc(B); interval: :func:`paired_mean`.
    n_boot and seed are accepted and ignored: the interval is analytic now (they were the bootstrap's).
    """
    a, b = _correct_matrix(correct_a, "correct_a"), _correct_matrix(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must cover the same seeds x examples: {a.shape} != {b.shape}")
    if a.shape[1] < 2:
        raise ValueError(f"correct_a needs >= 2 examples per seed, got {a.shape[1]}")
    return paired_mean(a - b, claim, paper, direction=direction, threshold=threshold, comparison=comparison,
                       detail=detail, role=role)


def paired_mean(d, claim: str, paper: str, direction: int = +1, threshold: float = 0.0,
                n_boot: int | None = None, seed: int | None = None, comparison: str = "", detail: str = "",
                role: str = EXPLORATORY) -> ClaimResult:
    """The mean of per-(seed, example) paired values `d` (n_seeds, n_examples), e.g. A - B correctness, or a
    difference of differences (the DP cost of one method minus that of another, per example).

    Interval: the crossed seed x example random-effects interval (:func:`crossed_pivot`, t with df S - 1,
    never narrower than the t interval over per-seed means). With one seed only the examples vary: a
    paired t interval over examples (df E - 1), and the verdict is 'single seed'. n_boot and seed are
    accepted and ignored (callers written for the earlier bootstrap)."""
    d = np.asarray(d, dtype=float)
    d = d[None, :] if d.ndim == 1 else d
    if d.ndim != 2 or not np.isfinite(d).all():
        raise ValueError(f"d must be a finite (n_seeds, n_examples) array, got shape {d.shape}")
    n_seeds, n_examples = d.shape
    if n_examples < 2:
        raise ValueError(f"d needs >= 2 examples per seed, got {n_examples}")
    if n_seeds > 1:
        est, se, df = (float(x) for x in crossed_pivot(d))
        text = f"crossed seed x example t over {n_seeds} seeds x {n_examples} examples (df {n_seeds - 1})"
    else:
        est, se, df = (float(x) for x in t_pivot(d[0]))
        text = f"paired t over {n_examples} examples (1 seed: test-example noise only)"
    lo, hi = (float(x) for x in interval(est, se, df))
    return _result(claim, paper, comparison, est, lo, hi, direction, threshold, n_seeds=int(n_seeds),
                   n_examples=int(n_examples), interval=text, detail=detail, se=se, df=df, role=role)


def exact(value: float, claim: str, paper: str, direction: int = +1, threshold: float = 0.0,
          comparison: str = "", detail: str = "", what: str = "exact count", role: str = EXPLORATORY) -> ClaimResult:
    """A quantity with no sampling noise (a byte count): the interval is the value itself."""
    v = float(value)
    return _result(claim, paper, comparison, v, v, v, direction, threshold, n_seeds=None, n_examples=None,
                   interval=f"{what}: no sampling noise", detail=detail, se=0.0, df=math.inf, role=role)


# -- bootstrap intervals (correlations only) -----------------------------------------------------------

def _percentile(stat: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(stat, [0.5 - LEVEL / 2, 0.5 + LEVEL / 2])
    return float(lo), float(hi)


def _row_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of x with the same row of y; NaN for a constant row."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def rank_correlation(x, y, claim: str, paper: str, direction: int = +1, threshold: float = 0.0,
                     method: str = "spearman", n_boot: int = 2000, seed: int = 0, comparison: str = "",
                     detail: str = "") -> ClaimResult:
    """Spearman (ranks, ties averaged) or Pearson correlation of paired points (x_i, y_i), e.g. task-vector
    similarity vs merged accuracy.

    Interval: bootstrap over pairs (resample n pairs with replacement, recompute the correlation; ranks
    are recomputed within each resample), percentile 95%. Resamples in which x or y is constant have no
    correlation and are dropped (their count goes into `detail`). n_seeds and n_examples are None: the
    unit is the pair; n is in `interval`.
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    xv, yv = _per_seed(x, "x"), _per_seed(y, "y")
    if xv.shape != yv.shape:
        raise ValueError(f"x and y must be paired: shapes {xv.shape} != {yv.shape}")
    if xv.size < 3:
        raise ValueError(f"x needs >= 3 pairs for a correlation interval, got {xv.size}")
    n_boot = _check_n_boot(n_boot)
    rank = (lambda v: stats.rankdata(v, axis=-1)) if method == "spearman" else (lambda v: v)
    est = float(_row_corr(rank(xv), rank(yv)))
    idx = np.random.default_rng(seed).integers(0, xv.size, size=(n_boot, xv.size))
    boot = _row_corr(rank(xv[idx]), rank(yv[idx]))
    ok = boot[np.isfinite(boot)]
    notes = [detail] if detail else []
    if ok.size < n_boot:
        notes.append(f"{n_boot - ok.size} of {n_boot} resamples had a constant x or y and were dropped")
    lo, hi = _percentile(ok) if ok.size >= 100 else (math.nan, math.nan)
    if ok.size < 100:
        notes.append("too few usable resamples for an interval")
    return _result(claim, paper, comparison, est, lo, hi, direction, threshold, n_seeds=None, n_examples=None,
                   interval=f"bootstrap over {xv.size} (x, y) pairs, {n_boot} resamples, percentile 95% "
                            f"({method})",
                   detail="; ".join(notes))
