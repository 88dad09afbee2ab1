"""FedPEFT (arXiv 2210.01708): which parameters to train and send, under realistic FL conditions.

Seven methods under one FedAvg loop (full fine-tuning, head only, BitFit, bottleneck adapters, prompt
tuning, LoRA, (IA)^3) on the bundled MiniLM, and three conditions varied one at a time around a base
condition (the profile's first heterogeneity and stability levels, no DP; quick: Dirichlet(1.0), 3 of 10
clients per round):

- heterogeneity: IID or Dirichlet(alpha) label skew;
- client stability: a sampled fraction of the clients per round, and sampled clients that drop out
  before reporting (they received the model, so their download counts; they send nothing);
- differential privacy: DP-SGD on every client with Opacus (:mod:`fedbench.fl.privacy`) at target
  epsilons and the clipping-only control, at the profile's delta (1e-5); each client's epsilon is
  accounted over every round it took part in.

Every learning rate is chosen on a validation slice of the training split (:func:`tune`); the test split is
read only for the reported runs, and the search's run at the chosen lr is itself the reported seed-0 run,
evaluated on test after the choice (:class:`~fedbench.experiments.fedpeft.runs.HeldRuns`). The headline rows
(every method, base condition, several seeds) run on the first task; the other tasks run a subset of methods
at the base condition, and the axes a subset of methods (profile settings). Claims: :mod:`~fedbench.experiments.fedpeft.claims`, on per-seed
scores (the mean accuracy of a run's last ``score_last_k`` evaluations). Every run is one :class:`ExperimentConfig`
run through :class:`fedbench.bench.Runner` (the run store under ``runs_root()``), so an interrupted run resumes and
a rerun only rebuilds the tables and figures.

The package: :mod:`.plan` (methods, settings, cells, configs), :mod:`.runs` (the runner, the lr search, the
reported runs' records), :mod:`.analysis` (tables, figures), :mod:`.claims`, :mod:`.protocol`; :func:`run` here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from fedbench.bench import output_dir, variant_note, write_outputs
from fedbench.experiments.fedpeft.analysis import axis_table, base_mask, headline_table, make_figures, make_tables
from fedbench.experiments.fedpeft.claims import headroom_table, make_claims
from fedbench.experiments.fedpeft.plan import (ALIASES, ARMS, EXPERIMENT, GRID_FIELDS, KEYS, LR_SELECTED_ON, METHODS,
                                               PRIMARY_KINDS, PROBE, REFERENCE, Arm, Cell, FedPEFTSettings,
                                               base_cell, build_cells, dp_label, dp_levels, dp_mechanism,
                                               dp_seeds_for, dp_table_seeds, heterogeneity_label, is_headline,
                                               known_methods, lr_key, make_config, n_evaluated, parse_heterogeneity,
                                               settings_for, stability_label, takes_depth, tuning_cells,
                                               validate_settings, variant)
from fedbench.experiments.fedpeft.protocol import protocol_markdown, protocol_table
from fedbench.experiments.fedpeft.runs import (HeldRuns, last_k_score, make_runner, run_cells, same_training,
                                               summary_row, tune)

__all__ = ["ALIASES", "ARMS", "EXPERIMENT", "GRID_FIELDS", "KEYS", "LR_SELECTED_ON", "METHODS", "PRIMARY_KINDS",
           "PROBE", "REFERENCE", "Arm", "Cell", "FedPEFTResult", "FedPEFTSettings", "HeldRuns", "axis_table",
           "base_cell", "base_mask", "build_cells", "dp_label", "dp_levels", "dp_mechanism", "dp_seeds_for",
           "dp_table_seeds", "headline_table", "headroom_table", "heterogeneity_label", "is_headline",
           "known_methods", "last_k_score", "lr_key", "make_claims", "make_config", "make_figures", "make_runner",
           "make_tables", "n_evaluated", "parse_heterogeneity", "protocol_markdown", "protocol_table", "run",
           "run_cells", "same_training", "settings_for", "stability_label", "summary_row", "takes_depth", "tune",
           "tuning_cells", "validate_settings", "variant"]


@dataclass
class FedPEFTResult:
    settings: dict
    summary: pd.DataFrame
    metrics: pd.DataFrame
    tables: dict = field(default_factory=dict)
    claims: pd.DataFrame | None = None
    figures: dict = field(default_factory=dict)


def run(profile: str = "quick", progress: bool = True, path=None, **overrides) -> FedPEFTResult:
    """Run the FedPEFT grid of `profile` (parameters overridable), write results/fedpeft[/profile]/."""
    s = settings_for(profile, path, **overrides)
    cells = build_cells(s)
    out = output_dir(EXPERIMENT, profile, path, overrides)
    runner, held = make_runner(s), HeldRuns()
    lr_table = tune(s, runner, held, progress=progress)
    summary, metrics, _ = run_cells(cells, s, progress=progress, runner=runner, held=held)
    tables = {**make_tables(summary, s), "lr_selection": lr_table}
    tables["headroom"] = headroom_table(lr_table, s)
    claims = make_claims(summary, s, tables["headroom"])
    figures = make_figures(summary, metrics, s)
    protocol = protocol_table(tables["headroom"], metrics)
    write_outputs(EXPERIMENT, out, {"summary": summary, "metrics": metrics, **tables, "claims": claims},
                  {name.removesuffix(".png"): fig for name, fig in figures.items()},
                  protocol=variant_note(path) + protocol_markdown(protocol))
    tables["protocol"] = protocol
    return FedPEFTResult(settings=s, summary=summary, metrics=metrics, tables=tables, claims=claims, figures=figures)
