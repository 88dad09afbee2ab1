"""Task arithmetic read as FedAvg (Tao et al. 2024, arXiv 2411.18607) on the one loop: ``task_clients``.

Client t holds task t's data, the classifier head is frozen (each task's rows a linear probe fitted on theta_0,
never trained, never sent), so an update is the change of the shared encoder only: a task vector. Per-client
local steps and learning rates (training heterogeneity, the lr search) are the strategy's options
(:class:`TaskClientsOptions`).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from fedbench.errors import ConfigError
from fedbench.fl.strategy import FedAvg, GlobalModel, check_lora_semantics
from fedbench.options import Options, check_bool, check_per_client
from fedbench.registry import STRATEGIES

HEAD_PREFIX = "classifier."


@dataclass(frozen=True)
class TaskClientsOptions(Options):
    """Per-client overrides, one entry per client (None: the run's ``train.local_steps`` / ``train.lr``): the
    training-heterogeneity settings of task arithmetic (tasks fine-tuned for different numbers of steps or at
    different learning rates) and its learning-rate search."""
    client_steps: tuple | None = None
    client_lrs: tuple | None = None
    # the frozen head: each task's rows a logistic-regression probe on theta_0's features of its probe carve
    # (a task_clients federation's ``probe`` rows), fitted when the run starts
    probe_heads: bool = False
    # the frozen head instead: each task's rows its classes' prompt embeddings by theta_0 (cosine logits at a
    # fixed temperature, fedbench.models.zero_shot), CLIP's zero-shot heads in the paper; needs no probe carve
    zero_shot_heads: bool = False

    def validate(self, prefix):
        check_per_client(f"{prefix}.client_steps", self.client_steps,
                         lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1")
        check_per_client(f"{prefix}.client_lrs", self.client_lrs,
                         lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 10,
                         "a learning rate in (0, 10]")
        check_bool(f"{prefix}.probe_heads", self.probe_heads)
        check_bool(f"{prefix}.zero_shot_heads", self.zero_shot_heads)
        if self.probe_heads and self.zero_shot_heads:
            raise ConfigError(f"{prefix}.zero_shot_heads", True, "false when probe_heads is true (one frozen head)")


def _check_task_clients(cfg) -> None:
    check_lora_semantics(cfg)
    if cfg.fl.options.get("probe_heads") and cfg.data.federation != "task_clients":
        raise ConfigError("fl.options.probe_heads", True, "false unless data.federation='task_clients' (the probe "
                                                          "carve the heads are fitted on)")
    if cfg.fl.options.get("zero_shot_heads"):
        from fedbench.models.zero_shot import zero_shot_tasks
        tasks = cfg.data.federation_options.get("tasks") if cfg.data.federation == "task_clients" else None
        if tasks is None or any(t not in zero_shot_tasks() for t in tasks):
            raise ConfigError("fl.options.zero_shot_heads", True, "false unless data.federation='task_clients' "
                                                                  f"over tasks with prompts {zero_shot_tasks()}")
    for key in ("client_steps", "client_lrs"):
        v = cfg.fl.options.get(key)
        if v is not None and len(v) != cfg.data.num_clients:
            raise ConfigError(f"fl.options.{key}", v, f"one entry per client (data.num_clients="
                                                      f"{cfg.data.num_clients})")


@STRATEGIES.register("task_clients", check=_check_task_clients, options=TaskClientsOptions)
class TaskClients(FedAvg):
    """One client per task, heads frozen: only the shared encoder's trainable tensors train and travel.

    ``fl.options.client_steps`` / ``client_lrs`` (:class:`TaskClientsOptions`) override ``train.local_steps`` /
    ``train.lr`` per client; the lr travels in the instruction's ``options``.
    """

    def attach(self, data) -> None:
        self.data = data

    def initial_model(self, model):
        if self.options.probe_heads:           # the head (if trainable: full FT) starts as the probe, frozen
            fit_probe_heads(model, self.data)
        elif self.options.zero_shot_heads:     # or as the tasks' zero-shot heads, frozen
            fit_zero_shot_heads(model, self.data, self.cfg)
        return super().initial_model(model)

    def encoder_keys(self, global_model) -> tuple[str, ...]:
        return tuple(k for k in global_model.state if not k.startswith(HEAD_PREFIX))

    def configure_round(self, round_idx, clients, global_model):
        keys = self.encoder_keys(global_model)
        down = GlobalModel(OrderedDict((k, global_model.state[k]) for k in keys), global_model.base_delta)
        steps, lrs = self.options.client_steps, self.options.client_lrs
        return [self.instruction(int(c), round_idx, down, train_keys=keys, send_keys=keys,
                                 local_steps=None if steps is None else steps[int(c)],
                                 options={} if lrs is None or lrs[int(c)] is None else {"lr": float(lrs[int(c)])})
                for c in clients]

    def train_config(self, run, ins):
        cfg = super().train_config(run, ins)
        lr = ins.options.get("lr")
        return cfg if lr is None else dataclasses.replace(cfg, lr=float(lr))


def _features(model, split, idx, pad_id) -> np.ndarray:
    """theta_0's pooled encoder features of `idx` (what the frozen heads read), in `idx` order."""
    from fedbench.models.inputs import pad_batch
    from fedbench.models.tuners.lora import zero_branches_skipped
    out = np.zeros((len(idx), model.classifier.in_features), dtype=np.float32)
    order = np.argsort(split.lengths[idx], kind="stable")
    model.eval()
    with torch.no_grad(), zero_branches_skipped(model):
        for s in range(0, len(idx), 64):
            pos = order[s:s + 64]
            ids, mask = pad_batch([split.input_ids[int(i)] for i in idx[pos]], pad_id)
            out[pos] = model.pool(model.prefix_hidden(ids, mask, model.num_layers), mask).numpy()
    return out


def fit_probe_heads(model, td) -> None:
    """Each task's rows of the head: logistic regression on theta_0's features of its probe carve (disjoint
    from the validation carve and from the fine-tuning data: a head fitted on the fine-tuning data fits it
    almost perfectly, 0.93-1.00 training accuracy measured, and leaves the encoder nothing to learn), written
    into the model's classifier (frozen from then on)."""
    from sklearn.linear_model import LogisticRegression
    data = td
    W = torch.zeros_like(model.classifier.weight)
    b = torch.zeros_like(model.classifier.bias)
    for t, idx in enumerate(td.probe):
        x = _features(model, data.train, idx, data.pad_id)
        y = data.train.labels[torch.as_tensor(idx)].numpy() - td.offsets[t]
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(x, y)
        coef, icpt = torch.as_tensor(clf.coef_, dtype=W.dtype), torch.as_tensor(clf.intercept_, dtype=W.dtype)
        if len(clf.classes_) == 2:                           # one logit -> the equivalent softmax pair
            coef, icpt = torch.cat([-coef / 2, coef / 2]), torch.cat([-icpt / 2, icpt / 2])
        rows = td.offsets[t] + torch.as_tensor(clf.classes_, dtype=torch.long)
        # a class absent from the training subsample keeps weight 0 and a bias far below the others
        b[td.offsets[t]:td.offsets[t] + td.num_classes[t]] = float(icpt.min()) - 30.0
        W[rows], b[rows] = coef, icpt
    with torch.no_grad():
        model.classifier.weight.copy_(W)
        model.classifier.bias.copy_(b)


def fit_zero_shot_heads(model, td, cfg) -> None:
    """Each task's rows of the head: its classes' prompt embeddings by theta_0 (the model as built: LoRA's B is
    zero), a cosine head at a fixed temperature (:func:`fedbench.models.zero_shot.install_zero_shot_heads`)."""
    from fedbench.models import load_tokenizer
    from fedbench.models.zero_shot import class_prompts, install_zero_shot_heads
    tasks = list(cfg.data.federation_options["tasks"])
    prompts = []
    for t, task in enumerate(tasks):
        names = td.class_names[td.offsets[t]:td.offsets[t] + td.num_classes[t]]
        prompts.append(class_prompts(task, [n.split(":", 1)[1] for n in names]))
    install_zero_shot_heads(model, load_tokenizer(cfg.model.backbone), prompts)
