"""LoRM's protocol table (``PROTOCOL.md``): paper / official code / ours / why ours differs.

The paper and official-code columns are reading notes. Every value of ours that a profile sets (clients, rounds,
placement, ridge, grid, seeds, methods) is filled from the run's settings and base config, and the learning rates
from what the run chose on validation (its lr_selection table): no number in it is typed by hand.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from fedbench.config import ExperimentConfig
from fedbench.experiments.lorm.plan import METHODS, LormSettings, method_seeds

TITLE = "# LoRM: protocol (paper / official code / ours)"

TEMPLATE = """\
| aspect | paper (arXiv 2410.17961) | official code (aimagelab/fed-mammoth `_models/lorm.py`) | ours | why ours differs |
|---|---|---|---|---|
| backbone, data | ViT-B/16; CIFAR-100, ImageNet-R, ... (class-incremental) | same | `{backbone}` (offline) on {dataset}: {num_classes} classes, {num_tasks} tasks x {task_classes} classes, task order drawn per seed | CPU-only, offline benchmark |
| clients, rounds | 10 clients, Dirichlet; 5 rounds x 5 epochs per task | per config | {clients} clients, Dirichlet({alpha}), {sampled}; {rounds_per_task} rounds per task (LoRM: B, A, B, ... from B), {local_work} | CPU budget (quick <= 12 min); sampling/dropout/DP by config |
| trained factor | one factor at a time, alternating | per **round**: B, A, B, ..., restarting at B each task (`set_train_matrix`, `cur_round = 0` in `begin_task`) | same (`configure_round`: `train_keys`/`send_keys`) | - |
| LoRA placement, rank | qkv, attention output, MLP of every block, r = 16 | same | {targets} of {layers}, r = {rank}, alpha {lora_alpha} | CPU cost; the FFN's second linear (1536-d input: a 1536 x 1536 Gram matrix per client per round) left out |
| new task | fresh LoRA | `init_matrices` at `begin_task` | fresh factors (peft init: A kaiming-uniform, B = 0, seeded per task) for **every** LoRA method | - |
| previous tasks (training) | - | `cl_merge='individual_mean'`: each task trains on W0 + its own B A | same, for every LoRA method (the rank-growing variants bank what they folded into the base during the task) | - |
| cross-task merge (the served model) | "alignment of model responses ... across tasks" (abstract) | `end_task_server`: at a task's end the clients send Gram matrices of the task's data (`end_task_client`, on W0 + the running mean incl. the task, head excluded); the server keeps sum_t B_t A_t G_t and sum_t G_t and serves W0 + (sum_t B_t A_t G_t) pinv(sum_t G_t) from the second task on; the running mean `old_delta` is only the filler for evaluations within a task | LoRM and RegMean (`fl.options.cross_task='gram'`): the same merge (`merging.lorm.cross_task_merge`, float64, relative ridge {ridge} towards the running mean), G_t = the sum of the Gram matrices the clients sent in the task's last round (on the model each client trained); FedIT and the other methods (no Gram matrices): the running mean of the task products; `lorm_mean`: LoRM's own runs served by the running mean (scored on the same runs: training never sees the served model) | no extra client pass: the last round's Grams are already sent, and a layer's inputs differ from the official ones only through the LoRA layers below it |
| Gram matrices | G_i = X_i^T X_i per layer | float32 (`gram_dtype='32'`), one per LoRA layer, on the model (old_delta*t + B_i A_i)/(t+1) | float32, **one per distinct layer input** (query and value share one), sent as the upper triangle (exact bytes); on the model the client trained (W0 + its current B_i A_i) | fewer bytes for the same information; the inputs of the responses the client fitted |
| solve | closed form | float64, `torch.pinverse`: no ridge (also in the cross-task merge) | float64, relative ridge {ridge} (towards the factor average) | numerical stability on rank-deficient Grams at CPU scale; its error never exceeds averaging's |
| solve control | - | - | `lorm_avg`: LoRM's B, A, B schedule at LoRM's lr with the trained factor averaged by sample count (the other factor shared: the exact product average), served by the same cross-task merge (its clients send Grams in a task's last round only); its grid is scored on the first seed too (lr_selection.csv, `lr_from`) | measures the solve apart from schedule and lr |
| head | - | RegMean on the head weight (`regmean_all`, alpha 0.5), bias FedAvg'd | FedAvg'd by sample count, for every method | the same head rule for every method isolates the LoRA merge |
| logits | train on the current task's classes | `outputs[:, cur_offset:cur_offset + cpt]` | logits outside the task masked; evaluated by argmax over every seen class (no task id) | - |
| optimizer, lr | AdamW, lr 3e-4 | AdamW, lr 3e-4, weight decay 0.1 | AdamW, no weight decay; lr per method from a grid, chosen by final average accuracy on a validation split carved from the training data (first seed; `lr_selection.csv`, with `chosen_at_grid_edge`); a choice at an end of the values scored extends the grid by one step beyond it, up to `lr_extend` times (here {lr_extend}; `extension` rows); this profile: {lr_grid} + extensions, chosen {chosen}; the controls `lorm_avg` and `fedit_lorm_lr` (FedIT at LoRM's lr) take LoRM's | an lr tuned for ViT/CIFAR does not carry over; never chosen on test; {n_grid} value(s) at CPU cost, bracketed by the extensions |
| baselines | FedAvg-style LoRA, merging methods, ... | `lora.py`, `regmean.py`, ... | FedIT (factor average), exact product average SVD'd to rank r, RegMean SVD'd to rank r (both SVDs of the product of the stacked factors, via QR: no dense d_out x d_in SVD), and separately labelled the rank-growing variants (stacked product average; dense RegMean), full FT of the top layer, joint training; this profile runs {methods} (full: every method; the unit tests too) | equal capacity: every rank-r method ends each round at rank r; quick: the 12-minute bar |
| merge check (diagnostic, lorm only) | - | - | each round, per layer: response error of LoRM's solve, factor average, product average and RegMean on the same client updates, on the inputs of the Gram matrices (fit) and on held-out inputs of each client, relative to keeping the previous factors; every rule scored from its factors, tr(P Q G Q^T P^T) = sum((P^T P) * (Q G Q^T)) (exact, float64; RegMean of rank-r updates is itself a product of factors with clients x r columns) | the factored form is exact at a fraction of the dense cost (quick <= 12 min) |
| statistics | mean of runs | - | the task order drawn per seed; the primary claim (LoRM vs FedIT) on {n_seeds}, Holm over the primary family (`claims_table(primary=...)`); the controls and every other row exploratory on {n_exploratory}; claims via `fedbench.claims` (seed-level intervals: seeds x test examples as crossed random effects; t interval for forgetting) | - |
"""


def chosen_lrs(lr_selection: pd.DataFrame) -> str:
    """``method lr`` for each method's own choice on validation (the controls that take another's lr left out)."""
    if not len(lr_selection):
        return "none (no lr searched)"
    rows = lr_selection[lr_selection["chosen"].astype(bool)]
    if "lr_from" in rows.columns:
        rows = rows[rows["lr_from"].isna()]
    return ", ".join(f"{r.method} {r.lr:g}" for r in rows.itertuples()) + " (`lr_selection.csv`)"


def count(n: int, unit: str) -> str:
    return f"{n} {unit}{'s' if n != 1 else ''}"


def local_work(base: ExperimentConfig) -> str:
    t = base.train
    return count(t.local_steps, "local step") if t.local_steps else count(t.local_epochs, "local epoch")


def protocol(s: LormSettings, base: ExperimentConfig, lr_selection: pd.DataFrame) -> str:
    """PROTOCOL.md of a run of the profile `s` / `base` that chose `lr_selection`'s learning rates."""
    from fedbench.fl.federations import sequence_tasks
    classes = sequence_tasks()[s.dataset].num_classes
    sizes = sorted({len(g) for g in np.array_split(np.arange(classes), s.num_tasks)})
    cpr = base.fl.clients_per_round
    others = [m for m in s.methods if not METHODS[m].primary]
    n_exploratory = len(method_seeds(s, others[0])) if others else len(s.seeds)
    body = TEMPLATE.format(
        backbone=base.model.backbone, dataset=s.dataset, num_classes=classes, num_tasks=s.num_tasks,
        task_classes="-".join(str(n) for n in sizes), clients=base.data.num_clients, alpha=f"{base.data.alpha:g}",
        sampled="all sampled" if cpr == 1 else f"clients_per_round {cpr:g}", rounds_per_task=s.rounds_per_task,
        local_work=local_work(base), targets=", ".join(f"`{t}`" for t in base.peft.target_modules),
        layers={None: "every layer", 1: "the top layer"}.get(base.peft.depth, f"the top {base.peft.depth} layers"),
        rank=base.peft.rank, lora_alpha=f"{base.peft.lora_alpha:g}", ridge=f"{s.ridge:g}", lr_extend=s.lr_extend,
        lr_grid="[" + ", ".join(f"{lr:g}" for lr in s.lr_grid) + "]", chosen=chosen_lrs(lr_selection),
        n_grid=len(s.lr_grid), methods=", ".join(s.methods), n_seeds=count(len(s.seeds), "seed"),
        n_exploratory=count(n_exploratory, "seed"))
    return f"{TITLE}\n\n{body}"
