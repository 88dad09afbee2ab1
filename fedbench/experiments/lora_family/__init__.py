"""The federated-LoRA family under one set of conditions.

Methods (``settings.methods``, each a config change of the profile's base, :data:`~.plan.METHODS`): FedIT
(factor averaging), FLoRA (stacking), FFA-LoRA, FedSA-LoRA, FedEx-LoRA, FlexLoRA, HetLoRA, RoLoRA, FedSVD, and
in the heterogeneous-rank condition the naive baselines (FedIT zero-padded, which is FedIT there; FedIT
truncated to the smallest rank). LoRM's merge is the continual setting's (notebook 04) and does not apply to
one task. Conditions (``settings.conditions``, :data:`~.plan.CONDITIONS`): IID, Dirichlet(0.1), DP-SGD at
epsilon 8, 30% dropout, heterogeneous ranks (``settings.ranks`` by a seeded rule), a robust rule (median)
under 10% sign-flip attackers. A (method, condition) pair a method cannot run (its config check refuses it)
is a not-applicable row, with why. What a method is under a condition (takes rank tiers, needs them, how it
is evaluated) is read off its strategy's registry entry (:func:`~.plan.strategy_facts`), not tested by name.

Protocol: the lr of every (method, condition) is chosen on a validation carve of the training split
(``data.federation_options.validation``) over ``settings.lr_grid``, with the first seed; test runs use it.
Primary claims (``settings.primaries``: each method vs FedIT in the setting its paper states) run on
``settings.primary_seeds`` (>= 5 for a primary verdict); every other pair is exploratory on ``settings.seeds``.
Claims are paired by seed (final accuracy, method - FedIT); FedSA-LoRA's accuracy is personalised (each client
with its own B, mean over clients), the others' the global model's. The frozen probe (logistic regression on
the frozen encoder's features, the same validation carve) gates the primaries: fine-tuning must beat it on
validation by >= 5 points (``headroom.csv``). One cell (``settings.flower_cell``) also runs on Flower and its
records are compared with the in-process run (``flower_parity.csv``).

The package: :mod:`~.plan` (methods, conditions, settings, each cell's config), :mod:`~.analysis` (tables,
claims, figures), :mod:`~.protocol` (the protocol table); here the runs, through :class:`fedbench.bench.Runner`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedbench.bench import Runner, output_dir, select_lr, write_outputs
from fedbench.config import ConfigError
from fedbench.experiments.lora_family.analysis import (condition_table, headroom_table, make_claims, make_figures,
                                                       parity_table)
from fedbench.experiments.lora_family.plan import (CONDITIONS, EXPERIMENT, HEADROOM, METHODS, PRIMARIES, REFERENCE,
                                                   Condition, LoraFamilySettings, Method, StrategyFacts, cells,
                                                   check_methods, lr_pairs, run_config, settings_for, strategy_facts,
                                                   strategy_under)
from fedbench.experiments.lora_family.protocol import PROTOCOL, protocol_markdown

__all__ = ["CONDITIONS", "EXPERIMENT", "HEADROOM", "METHODS", "PRIMARIES", "PROTOCOL", "REFERENCE", "Condition",
           "LoraFamilyResult", "LoraFamilySettings", "Method", "StrategyFacts", "cells", "check_methods",
           "choose_lrs", "condition_table", "flower_parity", "frozen_probe", "headroom_table", "lr_pairs",
           "make_claims", "make_figures", "parity_table", "protocol_markdown", "run", "run_config", "settings_for",
           "split_data", "strategy_facts", "strategy_under"]


def split_data():
    """The ``data`` provider of the experiment's :class:`~fedbench.bench.Runner`: a run's prepared data, built
    once per (data fields but the validation carve, seed, carve size): the test split for a test run, the
    validation carve of the training split (``prepare_validation``) for an lr-selection run."""
    from fedbench.config import config_hash
    from fedbench.fl import prepare_data, prepare_validation
    built: dict = {}

    def data(cfg):
        d = cfg.to_dict()["data"]
        val = d["federation_options"].get("validation")
        key = config_hash({"data": {**d, "federation_options": None}, "seed": cfg.seed, "val": val})
        if key not in built:
            plain = cfg.replace(**{"data.federation_options.validation": None})
            built[key] = prepare_data(plain) if val is None else prepare_validation(plain, int(val))
        return built[key]
    return data


def choose_lrs(base, s: LoraFamilySettings, runner: Runner) -> tuple[dict, pd.DataFrame]:
    """{(method, condition): lr} chosen on validation (first seed); the lr_selection table."""
    chosen, rows = {}, []
    for m, c in lr_pairs(s):
        try:
            run_config(base, s, m, c, s.seeds[0], validation=True)
        except ConfigError:
            continue
        lr, table = select_lr(m, s.lr_grid, lambda lr, m=m, c=c: runner.get(
            run_config(base, s, m, c, s.seeds[0], lr, validation=True)).summary["final_accuracy"])
        chosen[(m, c)] = lr
        rows += [{**r, "condition": c} for r in table]
    return chosen, pd.DataFrame(rows)


def frozen_probe(base, s: LoraFamilySettings) -> dict:
    """The frozen encoder's linear probe on the validation carve (first seed), IID clients."""
    from fedbench.experiments.quickstart import linear_probe
    from fedbench.fl import prepare_data, prepare_validation
    cfg = run_config(base, s, REFERENCE, "iid", s.seeds[0])
    return linear_probe(prepare_validation(cfg, s.validation_samples, prepare_data(cfg)), cfg.model, cfg.seed)


def flower_parity(base, s: LoraFamilySettings, chosen: dict, runner: Runner) -> pd.DataFrame:
    """The flower cell run on Flower, its records next to the in-process run's (:func:`~.analysis.parity_table`)."""
    from fedbench.engines.flower import run_flower
    m, c = s.flower_cell
    cfg = run_config(base, s, m, c, s.seeds[0], chosen.get((m, c)))
    return parity_table(runner.get(cfg).rounds, run_flower(cfg, quiet=True).rounds, m, c)


@dataclass
class LoraFamilyResult:
    settings: LoraFamilySettings
    summary: pd.DataFrame
    table: pd.DataFrame
    claims: pd.DataFrame
    headroom: pd.DataFrame
    rounds: pd.DataFrame
    flower: pd.DataFrame | None = None


def run_cell(base, s, runner, chosen, m, c, seed, role) -> tuple[dict, pd.DataFrame | None]:
    """One cell's summary row and rounds (None for a not-applicable pair: its row says why)."""
    row = {"method": m, "condition": c, "seed": seed, "role": role, "lr": chosen.get((m, c), np.nan)}
    try:
        cfg = run_config(base, s, m, c, seed, chosen.get((m, c)))
    except ConfigError as e:
        return {**row, "applicable": False, "note": f"not applicable: {e.field_name}={e.value!r}: "
                                                    f"expected {e.allowed}"}, None
    r = runner.get(cfg)
    row = {**row, "applicable": True, "strategy": cfg.fl.strategy,
           "evaluation": strategy_facts(cfg.fl.strategy).evaluation,
           "final_accuracy": r.summary["final_accuracy"], "mb_up": r.rounds["bytes_up"].sum() / 1e6,
           "mb_down": r.rounds["bytes_down"].sum() / 1e6, "mb_total": r.summary["total_bytes"] / 1e6,
           "config_hash": cfg.hash(), "note": ""}
    return row, r.rounds.assign(method=m, condition=c, seed=seed, mb_sent=r.rounds["cumulative_bytes"] / 1e6)


def run(profile: str = "quick", path=None, **overrides) -> LoraFamilyResult:
    """Run (or load) every cell; write results/lora_family[/profile]/ (tables, claims, figures, report)."""
    from fedbench.models.checks import check_against_backbone
    p = settings_for(profile, path, **overrides)
    base, s = p.base, p.settings
    check_against_backbone(base)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    runner = Runner(data=split_data())
    chosen, lr_table = choose_lrs(base, s, runner)
    done = [run_cell(base, s, runner, chosen, *cell) for cell in cells(s)]
    summary = pd.DataFrame([row for row, _ in done])
    rounds = pd.concat([r for _, r in done if r is not None], ignore_index=True)
    table = condition_table(summary)
    headroom, gain = headroom_table(lr_table, frozen_probe(base, s)["accuracy"])
    claims = make_claims(summary, s, gain)
    tables = {"summary": summary, "rounds": rounds, "lr_selection": lr_table, "table": table, "headroom": headroom,
              "claims": claims}
    flower = flower_parity(base, s, chosen, runner) if s.flower_cell is not None else None
    if flower is not None:
        tables["flower_parity"] = flower
    figures = {name.removesuffix(".png"): fig for name, fig in make_figures(summary, rounds).items()}
    write_outputs(EXPERIMENT, out, tables, figures, protocol_markdown())
    return LoraFamilyResult(s, summary, table, claims, headroom, rounds, flower)
