"""Calibration of fedbench.claims' accuracy intervals on simulated paired data with a known answer.

The model (one replicate): E test examples shared by every seed (as in fedbench: every seed of a method is
scored on the same test examples), S training seeds, two methods A and B.

    difficulty_e = 0.15 tanh(z_e)                           shared by A and B (why pairing matters)
    delta_e      = delta + example_sd * clip(z'_e, -2, 2)   how much A beats B on example e
    u_s          ~ N(0, seed_sd^2)                          seed-to-seed variation of the difference
    P(A right) = 0.7 + difficulty_e + (delta_e + u_s) / 2,  P(B right) = 0.7 + difficulty_e - (delta_e + u_s) / 2

The truth is `delta`, the difference over new seeds and new test examples. Each method's interval is
computed from the (S, E) matrix of A - B; coverage = share of replicates whose 95% interval contains delta;
false_decisive = share of replicates with delta = 0 whose interval excludes 0 (agrees or disagrees).
Everything is vectorised over replicates and seeded: the same arguments give the same table.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedbench.claims import crossed_pivot, hksj_pivot, interval, t_pivot

SEEDS = (3, 5, 10)
SEED_SDS = (0.0, 0.02, 0.05, 0.07)
TEST_SIZES = (200, 1000)
EXAMPLE_SDS = (0.0, 0.2)
DELTA = 0.03


def simulate(rng: np.random.Generator, reps: int, n_seeds: int, n_examples: int, delta: float, seed_sd: float,
             example_sd: float) -> np.ndarray:
    """(reps, n_seeds, n_examples) int8 paired differences A - B (each -1, 0 or 1)."""
    shape = (reps, n_seeds, n_examples)
    difficulty = 0.15 * np.tanh(rng.normal(0, 1, (reps, 1, n_examples)))
    effect = (delta + example_sd * np.clip(rng.normal(0, 1, (reps, 1, n_examples)), -2, 2)
              + rng.normal(0, seed_sd, (reps, n_seeds, 1)))
    pa = np.clip(0.7 + difficulty + effect / 2, 0, 1)
    pb = np.clip(0.7 + difficulty - effect / 2, 0, 1)
    a = rng.random(shape, dtype=np.float32) < pa
    b = rng.random(shape, dtype=np.float32) < pb
    return a.astype(np.int8) - b.astype(np.int8)


def _hksj(d: np.ndarray, modified: bool):
    """HKSJ over seeds with each seed's paired test-example variance var(d_s.) / E; a seed whose A and B
    agree on every example (variance 0) gets the variance of one disagreement, ~1 / E^2."""
    E = d.shape[-1]
    v = np.maximum(d.var(axis=-1, ddof=1) / E, 1.0 / E ** 2)
    return hksj_pivot(d.mean(axis=-1), v, modified=modified)


METHODS = {
    "crossed (fedbench)": crossed_pivot,
    "modified HKSJ": lambda d: _hksj(d, True),
    "HKSJ": lambda d: _hksj(d, False),
    "t over seed means": lambda d: t_pivot(d.mean(axis=-1)),
}


def _cell(rng, reps, S, E, delta, seed_sd, example_sd, methods, chunk=250) -> dict:
    """{method: share of replicates whose 95% interval contains delta}."""
    hits = {m: 0 for m in methods}
    done = 0
    while done < reps:
        n = min(chunk, reps - done)
        d = simulate(rng, n, S, E, delta, seed_sd, example_sd).astype(np.float32)
        for m in methods:
            lo, hi = interval(*METHODS[m](d))
            hits[m] += int(np.sum((lo <= delta) & (delta <= hi)))
        done += n
    return {m: hits[m] / reps for m in methods}


def calibrate(reps: int = 1000, seed: int = 0, seeds=SEEDS, seed_sds=SEED_SDS, test_sizes=TEST_SIZES,
              example_sds=EXAMPLE_SDS, methods=tuple(METHODS), delta: float = DELTA) -> pd.DataFrame:
    """One row per (method, example_sd, n_seeds, n_examples, seed_sd): coverage of the 95% interval at the
    true difference `delta`, and the false-decisive rate at a true difference of 0, each over `reps`
    replicates; mc_se = the Monte-Carlo standard error of a rate of 0.95 (resp. 0.05) over `reps`."""
    rows = []
    for i, (h, S, E, tau) in enumerate((h, S, E, tau) for h in example_sds for S in seeds for E in test_sizes
                                        for tau in seed_sds):
        rng = np.random.default_rng([seed, i])          # each cell its own stream: cells do not shift others
        cov = _cell(rng, reps, S, E, delta, tau, h, methods)
        zero = _cell(rng, reps, S, E, 0.0, tau, h, methods)
        for m in methods:
            rows.append({"method": m, "example_sd": h, "n_seeds": S, "n_examples": E, "seed_sd": tau,
                         "coverage": cov[m], "false_decisive": 1 - zero[m], "reps": reps})
    out = pd.DataFrame(rows)
    out["mc_se"] = math.sqrt(0.95 * 0.05 / reps)
    return out
