"""AutoFedNLP / FedAdapter (Cai et al., arXiv 2205.10162): pick adapter depth and width while training, on the loop.

Every method is a run of :func:`fedbench.fl.server.run_cached` on the profile's ``base`` ExperimentConfig, so
sampling, dropout, DP, robust rules, the update guard, checkpoints and Flower reach every method by config:

- ``autofednlp``: the progressive configurator, ``fl.strategy="autofednlp"``
  (:class:`fedbench.strategies.autofednlp.AutoFedNLP`: trial groups with the baselines' cohort, equal-simulated-time
  periods, decisions on a validation split carved from the training data, state growth);
- ``fixed_d{d}_w{w}``: FedAvg with one fixed configuration for the whole run, for each grid point;
- ``full_ft``: vanilla FedAvg full fine-tuning (FedNLP), every parameter trained and sent, its learning rate
  chosen on the validation split (``full_lr_grid``, first seed);
- ``autofednlp_nocache`` (first seed, ``cache_rounds`` rounds): the configurator with clients running the whole
  stack every step: the caching control (measured wall-clock per round vs simulated).

The simulated clock of a fixed configuration's round is
:func:`fedbench.strategies.autofednlp.round_seconds` on the profile's device (local steps' compute + download and
upload of the state); the configurator's comes from its strategy (``sim_s`` in the loop's records).

Calibration first (:mod:`.calibration`): every fixed configuration of the grid
trains to its plateau on the validation rows (first seed); whether a deeper one overtakes a shallower one decides
whether the comparison with fixed configurations is testable. Target accuracy, fixed before any test run:
``target_fraction`` x the best validation plateau; the best fixed configuration is the one the calibration's
validation curves reach the target with first (never chosen on test). Time-to-target = simulated (and wall) time
at the first evaluated round (every round is evaluated) whose test accuracy reaches it.

The package: :mod:`.plan` (settings, the method table, each run's config), :mod:`.calibration`, :mod:`.analysis`
(tables, claims, figures), :mod:`.protocol` (the protocol table, filled from the outputs), :mod:`.device` (the
measured device profile); here the running: every run through :class:`fedbench.bench.Runner`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fedbench.bench import (
    Runner,
    check_method,
    chosen_lr,
    no_lr,
    output_dir,
    select_lr,
    write_outputs,
)
from fedbench.config import ExperimentConfig
from fedbench.experiments.autofednlp import calibration as K
from fedbench.experiments.autofednlp import protocol as P
from fedbench.experiments.autofednlp.analysis import (
    SUMMARY_COLUMNS,
    WALL_COLUMNS,
    AutoFedNlpResult,
    compute_claims,
    make_figures,
    summarize,
    tables,
    time_to_target,
)
from fedbench.experiments.autofednlp.device import measure_device
from fedbench.experiments.autofednlp.plan import (
    EXPERIMENT,
    NOCACHE,
    NUM_LAYERS,
    AutoFedNlpSettings,
    Method,
    calibration_config,
    check_methods,
    fixed,
    fixed_name,
    label,
    method_clock,
    method_facts,
    methods_for,
    plan_methods,
    run_config,
    settings_for,
    val_config,
)

__all__ = ["EXPERIMENT", "NUM_LAYERS", "SUMMARY_COLUMNS", "WALL_COLUMNS", "AutoFedNlpResult", "AutoFedNlpSettings",
           "Method", "calibrate", "calibration_config", "check_methods", "compute_claims", "export", "fixed",
           "fixed_name", "label", "make_figures", "measure_device", "method_clock", "method_facts", "methods_for",
           "plan_methods", "providers", "run", "run_config", "settings_for", "summarize", "tables", "time_to_target",
           "val_config"]


def export(profile: str = "quick", path=None, method: str = "autofednlp", seed: int = 0, lr: float | None = None,
           **overrides) -> ExperimentConfig:
    """One reported run as a config that runs alone (``fedbench export``): `method` (autofednlp, full_ft or
    fixed_d<d>_w<w>) at `seed`, at `lr` or the lr the profile chose on validation (full FT's, or the one adapter lr;
    an untuned adapter lr is the base's)."""
    s, base = settings_for(profile, path, **overrides)
    m = method_facts(check_method(method, tuple(methods_for(s))))
    if lr is None:
        lr = chosen_lr(EXPERIMENT, profile, path, applies_to=m.applies_to)
        if lr is None and getattr(s, m.lr_grid):
            raise no_lr(profile, method)
    return run_config(s, base, method, int(seed), lr)


# -- running --------------------------------------------------------------------------------------------------

def providers(s: AutoFedNlpSettings, base: ExperimentConfig):
    """(data, caches) for :class:`fedbench.bench.Runner`: per seed, the prepared data with its frozen-prefix caches
    filled at every depth in one fixed order (by length, then index) and shared by every run of the seed, so a
    cached value never depends on which run came first and no run pays for a fill another has done (the one-off
    fill is not priced in the simulated clock either, as in the official code); a validation run (its
    ``data.federation_options.validation``) evaluates on the seed's validation carve, whose cache is filled the
    same way. Test-split caches come from :class:`fedbench.bench.PrefixCaches`; the validation carve's is kept
    here because PrefixCaches keys a sample's caches without the carve."""
    from fedbench.bench import PrefixCaches
    shared, val, depths = PrefixCaches(), {}, range(1, NUM_LAYERS)

    def seed_cfg(cfg):
        return base.replace(seed=int(cfg.seed))

    def data(cfg):
        d = shared.data(seed_cfg(cfg))
        if cfg.data.federation_options.get("validation") is None:
            return d
        if cfg.seed not in val:
            from fedbench.config import PeftConfig
            from fedbench.fl.data import prepare_validation
            from fedbench.models import build_model
            from fedbench.models.inputs import ActivationCache
            v = prepare_validation(cfg, s.validation_samples, d)
            cache = ActivationCache(v.test, v.pad_id)
            cache.fill_depths(build_model(base.model, PeftConfig(method="head"), v.num_labels, seed=0),
                              np.asarray(v.test_indices), list(depths))
            val[cfg.seed] = (v, cache)
        return val[cfg.seed][0]

    def caches(cfg, d):
        train, test = shared.get(seed_cfg(cfg), shared.data(seed_cfg(cfg)), depths=depths)
        return (train, test) if cfg.data.federation_options.get("validation") is None else (train, val[cfg.seed][1])

    return data, caches


def progress_label(cfg) -> str:
    split = "test" if cfg.data.federation_options.get("validation") is None else "validation"
    return f"[autofednlp] {cfg.name.removeprefix('autofednlp-'):<20} seed {cfg.seed} lr {cfg.train.lr:g} ({split})"


def run(profile: str = "quick", progress: bool = True, path=None, **overrides) -> AutoFedNlpResult:
    """Every run (loaded from the store when finished), then the CSVs, claims, figures and PROTOCOL.md."""
    s, base = settings_for(profile, path, **overrides)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    data, caches = providers(s, base)
    runner = Runner(data, caches, reload=True, label=progress_label if progress else None)
    first = s.seeds[0]

    # learning rates on the validation split, first seed (ties: the smaller lr): each method's grid from its
    # entry (full FT's full_lr_grid; the adapters' one lr from adapter_lr_grid on the starting configuration)
    def val_score(m):
        rounds = getattr(s, m.lr_rounds)
        return lambda lr: (float(runner.get(val_config(s, run_config(s, base, m.name, first, lr), m.name))
                                 .summary["final_accuracy"]), {"rounds": rounds})
    start = fixed(int(base.peft.depth), int(base.peft.adapter_width))
    lrs, rows = {}, []
    for m in (method_facts("full_ft"), start):
        if getattr(s, m.lr_grid):
            lrs[m.lr_grid], m_rows = select_lr(m.name, getattr(s, m.lr_grid), val_score(m))
            rows += [{**r, "applies_to": m.applies_to} for r in m_rows]
    lr_sel = pd.DataFrame(rows)
    lr_sel.insert(1, "applies_to", lr_sel.pop("applies_to"))
    adapter_lr = lrs.get(start.lr_grid)
    cal = calibrate(s, base, runner, adapter_lr)
    results = {}
    grid_seeds = s.seeds if s.grid_seeds is None else s.grid_seeds
    for seed in s.seeds:
        for m in plan_methods(s):
            if m.grid and m.name != cal["best"] and seed not in grid_seeds:
                continue
            results[(m.name, seed)] = runner.get(run_config(s, base, m.name, seed, lrs.get(m.lr_grid)))
    if s.cache_rounds:
        results[(NOCACHE.name, first)] = runner.get(run_config(s, base, NOCACHE.name, first, adapter_lr))
    res = tables(s, base, results, lr_sel, cal)
    res.out = out
    res.protocol = P.render(profile, P.facts(s, base, res.lr_selection, cal, res.summary))
    figures = {**make_figures(res), "calibration": K.figure(cal["calibration"], cal["target"], s.device,
                                                             s.target_fraction)}
    paths = write_outputs(EXPERIMENT, out, {**{n: getattr(res, n) for n in ("summary", "trace", "lr_selection",
                                                                            "decisions", "claims")},
                                            **{n: cal[n] for n in ("calibration", "plateaus", "crossover")}},
                          figures, res.protocol)
    res.figures = {name: paths[f"{name}.png"] for name in figures}
    return res


def calibrate(s: AutoFedNlpSettings, base: ExperimentConfig, runner: Runner, lr: float | None) -> dict:
    """The grid's calibration runs (first seed, validation rows) and what they fix before any test run: the
    curves, plateaus, crossovers, the target, the best fixed configuration and the comparison's gate."""
    runs = {(d, w): runner.get(calibration_config(s, run_config(s, base, fixed_name(d, w), s.seeds[0], lr)))
            for d, w in s.grid}
    clock = {fixed_name(d, w): method_clock(s, ExperimentConfig.from_dict(r.config)) for (d, w), r in runs.items()}
    curves, correct = K.curves_of(runs, clock)
    plat = K.plateaus(curves, s.plateau_rounds, s.plateau_tol)
    cross = K.crossovers(curves, plat, correct, s.plateau_rounds, s.crossover_margin)
    target, best, plat = K.choose(curves, plat, s.target_fraction)
    return {"calibration": curves, "plateaus": plat, "crossover": cross, "target": target, "best": best,
            "gate": K.verdict_text(cross)}
