"""FL-TAC's protocol table (``PROTOCOL.md``): paper / official code / ours, as data.

The paper and official-code columns are reading notes (arXiv 2404.15384; siqi2000/FL-TAC). The "ours" column is
a template filled when the outputs are written: the schedule, data sizes and grids from the profile's settings and
base config, the learning rates chosen from ``lr_selection``, step counts from ``runs``, the measured gaps from
``claims``. No number a run measures is typed here; the calibration that chose quick's data size, measured by hand
before these outputs existed, is a labelled section below the table, each number with its setting.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from fedbench.config import ExperimentConfig
from fedbench.experiments.fl_tac.plan import HEADS, METHODS, FlTacSettings

TITLE = "# FL-TAC: protocol (paper / official code / ours)"


@dataclass(frozen=True)
class Row:
    aspect: str
    paper: str
    official: str
    ours: str
    why: str


HEADER = ("aspect", "paper (arXiv 2404.15384)", "official code (siqi2000/FL-TAC, `configs/glue_bert.yaml`)",
          "ours (profile `{profile}`)", "why ours differs")

# one Row per aspect: paper, official code, ours (a template over facts()), why ours differs (a template too)
ROWS = (
    Row(
        aspect="backbone",
        paper="BERT-base (GLUE), ViT (CIFAR), LLaMA (Dolly)",
        official="`bert-base-uncased`, `num_labels=2`",
        ours="`{backbone}`",
        why="CPU-only, offline benchmark (the `paper` profile runs BERT-base on GLUE through the hub)",
    ),
    Row(
        aspect="tasks",
        paper="GLUE: SST-2, QNLI, QQP, MRPC, RTE (all binary)",
        official="same, `max_len` 128",
        ours="{n_tasks} binary tasks: {tasks} (tweet_polarity: tweet_sentiment without neutral, made here); {rows}",
        why="offline; GLUE needs the hub; the training rows per task set the data-starved regime (next rows)",
    ),
    Row(
        aspect="head",
        paper="one per model",
        official="one 2-class head (`num_labels=2`) for every task; no task id",
        ours="one 2-class head, no task id, no class mask",
        why="-",
    ),
    Row(
        aspect="what an adapter is / what travels",
        paper="LoRA adapters",
        official=("`get_adapter_state`: every trainable parameter, i.e. LoRA A, B **and the 2-class head**, per "
                  "task (FL-TAC) or one per client (FedIT)"),
        ours="the same: LoRA factors + head per (client, task); clustered and averaged together",
        why="- (the official code's docstring says the head is federated too)",
    ),
    Row(
        aspect="clients, partition",
        paper="10 clients per task, Dirichlet(0.5)",
        official="`n_clients` 10, `dirichlet_alpha` 0.5, shares < 1% zeroed",
        ours=("{clients} clients, Dirichlet({alpha}) per task, shares < {min_share} zeroed (`data.num_clients`, "
              "`data.alpha`, `min_share`)"),
        why="-",
    ),
    Row(
        aspect="data per client (regime)",
        paper="GLUE-sized: thousands of rows per client and task",
        official="the whole GLUE training sets split over 10 clients",
        ours=("{train_rows} rows per task, ~{per_client} per client per task on average (`partition.csv`); measured "
              "on test (`claims.csv`): {gaps}"),
        why=("with MiniLM's features a client's few dozen rows of one task train a good local adapter; the paper's "
             "question (does sharing through clusters help?) needs clients that cannot learn alone: the calibration "
             "below chose the most starved size tried"),
    ),
    Row(
        aspect="participation",
        paper="full",
        official="full (`sel = range(n_clients)`)",
        ours="{participation} (`fl.clients_per_round`; sampling/dropout by config)",
        why="-",
    ),
    Row(
        aspect="rounds x local steps",
        paper="20 rounds",
        official=("20 rounds x 50 steps per (client, task) adapter (FL-TAC); FedIT `max(1, local_steps // n_tasks)` "
                  "per task, i.e. ~50 per client: FL-TAC gets n_tasks x FedIT's compute"),
        ours=("{rounds} rounds x {local_steps} steps per (client, task) adapter (few rounds of several steps, as "
              "the official 20 x 50), so adapters move before the first k-means; the official FedIT (`fedit`) "
              "{split} steps per task per round (`max(1, local_steps // n_tasks)` for a client holding n_tasks "
              "tasks); the compute-matched FedIT (`fedit_matched`, `fl.options.steps_per_task: matched`) "
              "{local_steps} per task per round: the same optimiser steps as FL-TAC (`local_steps_per_round` in "
              "`runs.csv`)"),
        why=("CPU budget: a cold quick run within 12 minutes on 2 cores (the runs' times: `wall_s` in `runs.csv`); "
             "`full` runs the official 20 x 50 (not run)"),
    ),
    Row(
        aspect="budget (optimizer steps per seed, all clients)",
        paper="-",
        official=("official: FL-TAC ~31 adapters x 20 x 50 = ~31,000 steps of batch 32 (~1.0 M examples); FedIT 10 "
                  "clients x 20 x ~50 = ~10,000 steps"),
        ours="{budget} (steps of batch {batch} per seed: `local_steps_per_round` x {rounds} in `runs.csv`)",
        why="the CPU budget",
    ),
    Row(
        aspect="LoRA",
        paper="r = 4",
        official="r 4, alpha 16, dropout 0.05, query/value of every layer",
        ours=("r {rank}, alpha {lora_alpha:g}, dropout {lora_dropout:g}, {targets} of {layers}, the frozen prefix "
              "cached"),
        why="CPU cost",
    ),
    Row(
        aspect="optimizer, lr",
        paper="lr 5e-4 (BERT)",
        official="AdamW (wd 0.01 default), lr 5e-4, batch 32; a fresh optimizer per (client, task, round)",
        ours=("{optimizer} (wd {weight_decay:g}), fresh per (client, task, round), batch {batch}; lr chosen on a "
              "validation split carved from the training data (first seed): {grids}; a choice at the edge of the "
              "values scored scores up to {lr_extend} grid step(s) beyond it (`lr_extend`; `extension` rows in "
              "`lr_selection.csv`). Chosen: {chosen}"),
        why=("never chosen on test; higher lrs than the official 5e-4 because each adapter trains "
             "{steps_per_adapter} steps, not 1,000"),
    ),
    Row(
        aspect="server",
        paper="k-means, k = tasks, FedAvg per cluster",
        official=("sklearn KMeans(n_init=10, random_state=seed) on the flattened adapters; FedAvg by samples per "
                  "cluster; each (client, task) gets its cluster's aggregate"),
        ours=("the same (`fedbench.strategies.fl_tac`, `n_init` {n_init}); k-means seed derived per round; "
              "silhouette k (k = 2..{k_max}) recorded beside k = {k} ({sil_n_init} restarts for the silhouette's "
              "k-means, `silhouette_n_init`); ARI of the clusters against the true tasks every round "
              "(`clustering.csv` per seed, `ari_rounds.csv` mean and t interval, `ari_vs_round.png`); the "
              "diagnostic `fl_tac_update` clusters the round's updates (adapter - what was sent): {update_arm}"),
        why="CPU budget",
    ),
    Row(
        aspect="adapter-evolution figure",
        paper="UMAP of the adapters over rounds, colour = task",
        official="-",
        ours=("embedding `{embedding}`: UMAP (umap-learn, `random_state` derived from the run's seed and the round, "
              "n_neighbors min(15, n - 1)) of what the server clustered, every round, when importable; PCA "
              "otherwise (or < 5 adapters); `adapter_embedding.csv` holds the plotted coordinates and which "
              "embedding"),
        why="umap-learn is optional (the dev extra); its first fit JIT-compiles for ~15 s",
    ),
    Row(
        aspect="FedIT",
        paper="one adapter, FedAvg",
        official="one shared adapter, tasks in turn, `max(1, local_steps // n_tasks)` steps each",
        ours=("the official one (`fedit`: `fedit_tasks`, `steps_per_task: split`) and the compute-matched one "
              "(`fedit_matched`: `steps_per_task: matched`, `local_steps` on each task in turn)"),
        why=("the official FedIT trains 1 / n_tasks of FL-TAC's steps per task: only the matched one isolates what "
             "clustering adds"),
    ),
    Row(
        aspect="evaluation",
        paper="per task",
        official="task t scored with the first client's copy of the adapter for t",
        ours=("each test row of task t scored by the adapter of one client holding t, drawn with probability "
              "proportional to its samples (the same owners for every method of a seed); the validation split is "
              "scored only by the first seed's runs"),
        why="every client's adapter counts, at the cost of one pass over the test set",
    ),
    Row(
        aspect="task-head arm",
        paper="-",
        official="-",
        ours=('"FedIT + task heads" (`fedit_heads`) and "FL-TAC + task heads" (`fl_tac_heads`): one classifier head '
              "per task (each task its own label count, a class mask per example), task t scored with head t; heads "
              "FedAvg'd per task over the clients holding t, weighted by their samples of t, never per cluster; "
              "k-means on the LoRA factors only; otherwise the paper arm's schedule. {heads_arm}"),
        why="kept out of quick for time (quick holds the primaries on 5 seeds)",
    ),
    Row(
        aspect="statistics",
        paper="one run",
        official="one seed (42)",
        ours=("seeds (partition, init, batches, scoring owners): {seeds}; primary claims (Holm over them, intervals "
              "at the Holm level): {primary}; every other row exploratory, paired on the seeds both sides ran; the "
              "same test rows; claims via `fedbench.claims` (seeds x test examples; t interval for ARI)"),
        why="-",
    ),
)

CALIBRATION = """\
## Calibration (measured by hand while choosing the quick profile; not outputs of this run)

Each number with the setting it was measured at; the tables of this folder hold what this run measured.
- 600 training rows per task, 6 rounds x 4 steps (the earlier quick, test, 3 seeds): local-only beat FL-TAC,
  0.738 vs 0.696.
- 160 rows per task, 3 rounds x 8 steps (first seed, validation): local 0.755, oracle 0.780, FL-TAC 0.686,
  compute-matched FedIT 0.691 (lr 2e-3): local-only still led.
- 64 rows per task, 3 rounds x 6 steps (first seed, validation): local 0.756 at lr 2e-3 (0.719 at 4e-3), oracle
  0.779 at 4e-3 (0.757 at 2e-3), FL-TAC 0.743 at 4e-3 (0.709 at 2e-3), compute-matched FedIT 0.679 at 2e-3: only
  the oracle cleared local-only, so 64 rows was kept as the most starved of the sizes tried.
- 64 rows per task, 3 rounds x 6 steps, grid [1e-3, 2e-3, 4e-3] extended once (first seed, validation): FL-TAC and
  both FedITs chose the extension 8e-3, local 2e-3; quick's grids are centred on those choices.
"""


def _lr(x: float) -> str:
    return f"{x:.3g}"


def _span(values) -> str:
    lo, hi = round(min(values)), round(max(values))
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def _claim(claims: pd.DataFrame, comparison: str, what: str) -> str | None:
    row = claims[claims["comparison"].astype(str).str.startswith(comparison)] if len(claims) else claims
    if not len(row):
        return None
    r = row.iloc[0]
    role = ", primary" if r["role"] == "primary" else ""
    return (f"{what} {r['estimate']:+.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] ({int(r['n_seeds'])} seeds{role}: "
            f"{r['verdict']})")


def _grids(s: FlTacSettings) -> str:
    by_grid: dict[tuple, list[str]] = {}
    for m in s.methods:
        if not METHODS[m].lr_from:
            by_grid.setdefault(s.grid_of(m), []).append(f"`{m}`")
    out = [f"{', '.join(ms)} from [{', '.join(_lr(x) for x in g)}]" for g, ms in by_grid.items()]
    takes = [f"`{m}` takes `{METHODS[m].lr_from}`'s" for m in s.methods if METHODS[m].lr_from in s.methods]
    return "; ".join(out + takes)


def _chosen(lr_selection: pd.DataFrame) -> str:
    """Each method's chosen lr from ``lr_selection``: where it sits among the values scored, or whose it took."""
    if not len(lr_selection):
        return "none yet"
    out = []
    for m, g in lr_selection.groupby("method", sort=False):
        row = g[g["chosen"].astype(bool)].iloc[0]
        src = str(row.get("run", ""))
        if src.startswith("from "):
            out.append(f"`{m}` {_lr(row['lr'])} ({src}'s; first-seed validation {row['val_accuracy']:.3f})")
            continue
        ext = int(row["extension"]) if "extension" in row and pd.notna(row["extension"]) else 0
        where = "at an edge of the values scored" if bool(row["chosen_at_grid_edge"]) else "inside the values scored"
        out.append(f"`{m}` {_lr(row['lr'])} ({where}{', an extension' if ext else ''}; validation "
                   f"{row['val_accuracy']:.3f})")
    return ", ".join(out)


def _budget(runs: pd.DataFrame, rounds: int) -> str:
    if not len(runs):
        return "no runs yet"
    steps = runs.groupby("method", sort=False)["local_steps_per_round"]
    return ", ".join(f"`{m}` {_span(v * rounds)}" for m, v in steps)


def _seeds(s: FlTacSettings) -> str:
    by_n: dict[int, list[str]] = {}
    for m in s.methods:
        by_n.setdefault(len(s.seeds_of(m)), []).append(f"`{m}`")
    return "; ".join(f"{n} for {', '.join(ms)}" for n, ms in sorted(by_n.items(), reverse=True))


def facts(s: FlTacSettings, base: ExperimentConfig, profile: str, lr_selection: pd.DataFrame,
          claims: pd.DataFrame, runs: pd.DataFrame) -> dict:
    """The values the "ours" column is filled with: settings, base config and this run's outputs."""
    from fedbench.experiments.fl_tac.analysis import PRIMARY
    n, L, R = len(s.tasks), base.train.local_steps, base.fl.rounds
    gaps = [g for g in (_claim(claims, "fl_tac - local", "FL-TAC - local"),
                        _claim(claims, "oracle - local", "oracle - local")) if g]
    heads = [m for m in s.methods if m in HEADS]
    cpr = base.fl.clients_per_round
    return {
        "profile": profile, "backbone": base.model.backbone, "n_tasks": n, "tasks": ", ".join(s.tasks),
        "rows": f"{s.max_train_per_task:,} train / {s.val_per_task:,} validation / {s.max_test_per_task:,} test "
                f"rows per task, max_length {base.data.max_length}",
        "clients": base.data.num_clients, "alpha": f"{base.data.alpha:g}", "min_share": f"{s.min_share:.0%}",
        "train_rows": f"{s.max_train_per_task:,}", "per_client": f"{s.max_train_per_task / base.data.num_clients:.2g}",
        "gaps": "; ".join(gaps) if gaps else "no federated-vs-local claim in this profile",
        "participation": "full" if cpr == 1 else f"{cpr:g} of the clients per round",
        "rounds": R, "local_steps": L, "split": f"{max(1, L // n)}-{L}" if max(1, L // n) < L else f"{L}",
        "budget": _budget(runs, R), "batch": base.train.batch_size, "rank": base.peft.rank,
        "lora_alpha": base.peft.lora_alpha, "lora_dropout": base.peft.lora_dropout,
        "targets": "/".join(base.peft.target_modules),
        "layers": "every layer" if base.peft.depth is None else f"the top {base.peft.depth} layers",
        "optimizer": {"adamw": "AdamW"}.get(base.train.optimizer, base.train.optimizer),
        "weight_decay": base.train.weight_decay, "grids": _grids(s), "lr_extend": s.lr_extend,
        "chosen": _chosen(lr_selection), "steps_per_adapter": R * L, "n_init": s.n_init,
        "k_max": s.k_max or 2 * n, "k": s.k or "T", "sil_n_init": s.silhouette_n_init or s.n_init,
        "update_arm": "run in this profile" if "fl_tac_update" in s.methods else "not in this profile "
                      "(smoke, quick-complete and full run it)",
        "embedding": s.embedding,
        "heads_arm": (f"This profile runs {', '.join(f'`{m}`' for m in heads)}." if heads else
                      "Not in this profile (smoke, quick-complete and full run it)."),
        "seeds": _seeds(s), "primary": "; ".join(f"\"{p}\"" for p in PRIMARY),
    }


def render(s: FlTacSettings, base: ExperimentConfig, profile: str, lr_selection: pd.DataFrame,
           claims: pd.DataFrame, runs: pd.DataFrame) -> str:
    """PROTOCOL.md: the title, the table (the "ours" and "why" columns filled from :func:`facts`), then the
    calibration notes."""
    f = facts(s, base, profile, lr_selection, claims, runs)

    def line(cells) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    head = [h.format(**f) for h in HEADER]
    rows = [line((r.aspect, r.paper, r.official, r.ours.format(**f), r.why.format(**f))) for r in ROWS]
    return "\n".join([TITLE, "", line(head), "|" + "---|" * len(HEADER), *rows, "", CALIBRATION])
