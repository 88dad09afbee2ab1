"""Client side: train the received trainable state on local data, return the new state.

:func:`train_client` is a plain function of (model, state in, data, config, seed): no rounds, no
server. The in-process loop and the Flower ClientApp both call it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fedbench.fl.device import autocast
from fedbench.models import load_trainable_state, state_nbytes, trainable_state
from fedbench.models.inputs import ActivationCache, TokenizedSplit, batch_order, on_model_device


@dataclass
class ClientUpdate:
    """What a client sends back after local training."""
    client_id: int
    state: dict                      # trainable state after training (what travels up)
    num_samples: int
    num_steps: int
    train_loss: float                # mean loss over the local steps
    wall_s: float
    metrics: dict = field(default_factory=dict)   # e.g. dp_epsilon (numbers; they travel as metrics)
    extras: dict = field(default_factory=dict)    # tensors that travel up beside the state (e.g. Gram matrices)

    @property
    def nbytes_up(self) -> int:
        """Exact bytes this update sends: the state and the tensor extras."""
        return state_nbytes(self.state) + state_nbytes(self.extras)


def forward_batch(model, split: TokenizedSplit, batch: np.ndarray, cache: ActivationCache | None, pad_id: int):
    """Logits for the examples `batch`, starting above the cached frozen layers when possible
    (classes outside an example's ``split.class_mask`` row get -inf), on the model's device."""
    if cache is not None and model.frozen_prefix > 0:
        cache.ensure(model.frozen_prefix)
        hidden, mask = cache.get(model, batch)
        logits = model(hidden=hidden, attention_mask=mask, start_layer=model.frozen_prefix)
    else:
        x, mask = on_model_device(model, *split.inputs(batch, pad_id))
        logits = model(x, mask)
    return restrict_logits(logits, split, batch)


def labels_of(split, batch, like: torch.Tensor) -> torch.Tensor:
    """The labels of `batch` on the device of `like` (the logits)."""
    return split.labels[batch].to(like.device)


def restrict_logits(logits: torch.Tensor, split: TokenizedSplit, batch) -> torch.Tensor:
    """-inf on the classes an example may not take (its row of ``split.class_mask``); unchanged without a mask.
    Cross-entropy and argmax then act within each example's own task: one head per task, in one matrix."""
    if split.class_mask is None:
        return logits
    return logits.masked_fill(~split.class_mask[torch.as_tensor(np.asarray(batch))].to(logits.device), float("-inf"))


def make_optimizer(params, cfg):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def local_batches(indices, lengths, cfg, rng) -> list[np.ndarray]:
    """The batches of one client's local training: `local_steps` batches, or `local_epochs` epochs."""
    batches: list[np.ndarray] = []
    epochs = 0
    while True:
        epoch = batch_order(indices, lengths, cfg.batch_size, rng, shuffle=True, bucketing=cfg.length_bucketing)
        epochs += 1
        batches.extend(epoch)
        if cfg.local_steps is None and epochs >= cfg.local_epochs:
            return batches
        if cfg.local_steps is not None and len(batches) >= cfg.local_steps:
            return batches[: cfg.local_steps]


class TrainingHook:
    """A strategy's callbacks inside local training (no-ops here; a strategy overrides what it needs, e.g.
    SCAFFOLD's gradient correction, FedDyn's linear term). Not run under DP-SGD (see ``dp_compatible``)."""

    def loss(self, model, loss: torch.Tensor) -> torch.Tensor:
        """The loss to minimise for this batch, from the task loss (e.g. plus a regulariser)."""
        return loss

    def grad(self, model) -> None:
        """Change the trainable parameters' ``.grad`` in place after backward, before clipping and the step."""


def train_client(model, state_in: dict, split: TokenizedSplit, indices: np.ndarray, cfg, seed: int,
                 client_id: int = 0, cache: ActivationCache | None = None, pad_id: int = 0,
                 dp_state: dict | None = None, dp_total_rounds: int = 1,
                 hook: TrainingHook | None = None) -> ClientUpdate:
    """Local training of one client, seeded by `seed` (batch order and dropout).

    `cfg` is a :class:`fedbench.config.TrainConfig`. With ``cfg.dp.enabled`` the step is DP-SGD
    (see :mod:`fedbench.fl.privacy`); `dp_state` then carries this client's privacy ledger across rounds,
    and `dp_total_rounds` (the run's rounds) is what a ``dp.target_epsilon`` budget is calibrated over.
    """
    start = time.perf_counter()
    load_trainable_state(model, state_in)
    if cfg.dp.enabled:
        if hook is not None:      # the config refuses this (dp_compatible=False); a direct call is told too
            raise ValueError("a training hook does not run under DP-SGD (train.dp.enabled)")
        from fedbench.fl.privacy import train_client_dp
        return train_client_dp(model, state_in, split, indices, cfg, seed, client_id, pad_id, dp_state, start,
                               total_rounds=dp_total_rounds, cache=cache)
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    optimizer = make_optimizer(params, cfg)
    batches = local_batches(np.asarray(indices), split.lengths, cfg, rng)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)          # dropout masks
        model.train()
        for batch in batches:
            with autocast(cfg.precision, device):
                logits = forward_batch(model, split, batch, cache, pad_id)
            loss = F.cross_entropy(logits.float(), labels_of(split, batch, logits))
            losses.append(loss.item())
            if anchor is not None:       # FedProx: + mu/2 ||w - w_global||^2
                loss = loss + 0.5 * cfg.prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            if hook is not None:
                loss = hook.loss(model, loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if hook is not None:
                hook.grad(model)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
    model.eval()
    return ClientUpdate(client_id=client_id, state=trainable_state(model), num_samples=len(indices),
                        num_steps=len(batches), train_loss=float(np.mean(losses)) if losses else float("nan"),
                        wall_s=time.perf_counter() - start)


@torch.no_grad()
def evaluate(model, split: TokenizedSplit, indices: np.ndarray | None = None, batch_size: int = 256,
             cache: ActivationCache | None = None, pad_id: int = 0, return_predictions: bool = False,
             precision: str = "fp32") -> dict:
    """Accuracy and mean loss on `indices` of `split` (all by default), in big length-sorted batches.

    With `return_predictions`, also ``predictions = {"test_index", "label", "prediction"}`` (int64 arrays in
    the order of `indices`): what :mod:`fedbench.claims` pairs across methods and seeds.
    """
    idx = np.arange(len(split)) if indices is None else np.asarray(indices)
    if len(idx) == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "n": 0}
    model.eval()
    correct, loss_sum = 0, 0.0
    predicted = {}
    for batch in batch_order(idx, split.lengths, batch_size, rng=None, shuffle=False, bucketing=True):
        with autocast(precision, next(model.parameters()).device):
            logits = forward_batch(model, split, batch, cache, pad_id).float()
        labels = labels_of(split, batch, logits)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        pred = logits.argmax(-1)
        correct += (pred == labels).sum().item()
        if return_predictions:
            predicted.update(zip(np.asarray(batch).tolist(), pred.tolist()))
    out = {"accuracy": correct / len(idx), "loss": loss_sum / len(idx), "n": int(len(idx))}
    if return_predictions:
        out["predictions"] = {"test_index": idx.astype(np.int64),
                              "label": split.labels[torch.as_tensor(idx)].numpy().astype(np.int64),
                              "prediction": np.array([predicted[int(i)] for i in idx], dtype=np.int64)}
    return out


def predict(model, split: TokenizedSplit, indices=None, batch_size: int = 256, pad_id: int = 0) -> np.ndarray:
    """Predicted labels for `indices` (in the given order)."""
    idx = np.arange(len(split)) if indices is None else np.asarray(indices)
    out = np.empty(len(idx), dtype=np.int64)
    order = np.argsort(split.lengths[idx], kind="stable")
    model.eval()
    with torch.no_grad():
        for s in range(0, len(idx), batch_size):
            pos = order[s:s + batch_size]
            x, mask = on_model_device(model, *split.inputs(idx[pos], pad_id))
            out[pos] = restrict_logits(model(x, mask), split, idx[pos]).argmax(-1).cpu().numpy()
    return out
