"""Batched clients (``fl.client_batching``): a round's clients trained together through the shared frozen backbone.

The sequential loop loads one client's trainable state into the one model and trains it, then the next. Here
the clients of a round that train the same way (same trainable keys and optimizer settings) train at once:

- each client's trainable tensors are stacked along a leading client dimension (K, ...), and so is each
  client's optimizer state (one torch optimizer over the stacked tensors: AdamW and SGD are elementwise,
  so one step on the stack is each client's own step);
- a step runs every client's batch through the model in one call: ``torch.func.vmap`` over the client
  dimension of ``torch.func.functional_call`` with the client's tensors, the frozen weights shared by all
  (the multi-LoRA serving trick, for every tuner of :data:`fedbench.registry.TUNERS`);
- attention runs as plain matmul + softmax (transformers' "eager" attention) during the batched step: vmap
  has no batching rule for the fused attention kernels;
- batches of different lengths and sizes are padded to the step's largest (padded tokens masked out of
  attention and pooling, padded examples weighted 0 in the loss); a client whose local steps are done is
  masked: it is left out of the step's call, and its tensors are put back after the optimizer's step.

Each client keeps its own batch order (:func:`fedbench.fl.client.local_batches` with its own seed), FedProx
anchor, gradient clipping (per client, as :func:`torch.nn.utils.clip_grad_norm_` computes it) and loss record,
and the frozen-prefix cache is filled in the order the sequential loop fills it, so the cached values are
bit-identical. The result equals training the clients one by one within float tolerance (padding changes the
shapes the kernels see, so the last bits may differ): tests/test_batched.py checks it for every tuner.

Not covered, refused by :func:`check_batching` with a ConfigError (never a silent fallback): DP-SGD (per-sample
clipping inside a vmapped step is not implemented), dropout in the backbone or in LoRA (the sequential loop
draws masks per client from its seed; a batched call would draw different ones), and strategies whose
client step is their own (``client_update`` overridden: FL-TAC, AutoFedNLP, ...).
"""
from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedbench.errors import ConfigError
from fedbench.registry import CONFIG_CHECKS
from fedbench.fl.client import ClientUpdate, local_batches, make_optimizer
from fedbench.fl.device import autocast
from fedbench.fl.strategy import FedAvg, GlobalModel, train_only
from fedbench.models.inputs import on_model_device


def check_batching(cfg) -> None:
    """ConfigError for what ``fl.client_batching`` does not cover (see the module docstring); registered as a
    config check, so every config with batching on is checked when it is built."""
    from fedbench.registry import STRATEGIES
    if not cfg.fl.client_batching:
        return
    field = "fl.client_batching"
    if cfg.train.dp.enabled:
        raise ConfigError(field, True, "false with train.dp.enabled (batched DP-SGD is not implemented: DP runs "
                          "clients one by one)")
    if cfg.model.dropout is None or cfg.model.dropout > 0:
        raise ConfigError(field, True, f"false with model.dropout={cfg.model.dropout!r} (batched clients need "
                          "model.dropout=0: per-client dropout masks are not reproduced in a batched step)")
    if cfg.peft.method == "lora" and cfg.peft.lora_dropout > 0:
        raise ConfigError(field, True, f"false with peft.lora_dropout={cfg.peft.lora_dropout!r} (batched clients "
                          "need lora_dropout=0: per-client dropout masks are not reproduced in a batched step)")
    strategy = STRATEGIES.get(cfg.fl.strategy)
    if strategy.client_update is not FedAvg.client_update:
        raise ConfigError(field, True, f"false with fl.strategy={cfg.fl.strategy!r} (its client step is its own; "
                          "batching covers strategies that train with FedAvg's client_update)")


class _Staged(nn.Module):
    """The model's staged forward (embed -> layers[start:] -> pool -> head) with the attention masks computed
    outside: transformers builds its masks with data-dependent branches that vmap cannot trace."""

    def __init__(self, model, start: int):
        super().__init__()
        self.model, self.start = model, start

    def forward(self, x, attn, layer_mask):
        m = self.model
        if self.start == 0:
            hidden, attn = m.embed(x, attn)
        else:
            hidden = x
        for layer in m.layers[self.start:]:
            out = layer(hidden, attention_mask=layer_mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return m.classifier(m.pool(hidden, attn))


@dataclasses.dataclass
class _Client:
    ins: object
    split: object
    indices: np.ndarray
    batches: list
    losses: list


def _group_key(ins, tc) -> tuple:
    """Clients that can share one batched call: same received state and base, same trainable / sent keys,
    same optimizer settings (local steps may differ)."""
    opt = (tc.optimizer, tc.lr, tc.weight_decay, tc.momentum, tc.prox_mu, tc.max_grad_norm, tc.batch_size,
           tc.precision)
    return (id(ins.state), id(ins.base_delta), ins.train_keys, ins.send_keys, opt)


# clients in one batched call at most: memory grows with it (a call holds the activations of every client's
# batch); 32 clients x batch 16 saturate a large GPU with MiniLM already
CLIENTS_PER_CALL = 32


def batched_updates(run, instructions: list, clients_per_call: int = CLIENTS_PER_CALL) -> list[ClientUpdate]:
    """The ClientUpdates of `instructions` (in their order), the clients trained in batched groups of at most
    `clients_per_call`."""
    groups: dict[tuple, list] = {}
    for ins in instructions:
        groups.setdefault(_group_key(ins, run.strategy.train_config(run, ins)), []).append(ins)
    out = {}
    for members in groups.values():
        for u in train_group(run, members, clients_per_call):
            out[u.client_id] = u
    return [run.attacked(out[ins.client_id], ins) for ins in instructions]


def train_group(run, members: list, clients_per_call: int = CLIENTS_PER_CALL) -> list[ClientUpdate]:
    """Train the clients of `members` (instructions that share a group key) together, in calls of at most
    `clients_per_call` clients of similar step counts (fewer masked steps)."""
    start_t = time.perf_counter()
    first = members[0]
    model, cache = run.model, run.train_cache
    run.load(GlobalModel(first.state, first.base_delta))
    clients = []
    for ins in members:
        tc = run.strategy.train_config(run, ins)
        idx = np.asarray(run.strategy.local_indices(run, ins))
        split = run.client_split(ins.client_id)
        rng = np.random.default_rng(run.client_seed(ins.round_idx, ins.client_id))
        clients.append(_Client(ins, split, idx, local_batches(idx, split.lengths, tc, rng), []))
    tc = run.strategy.train_config(run, first)
    with train_only(model, first.train_keys):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        use_cache = cache is not None and model.frozen_prefix > 0
        if use_cache:       # the cache filled in the order the clients, one by one, would fill it
            cache.ensure(model.frozen_prefix)
            for c in clients:
                for b in c.batches:
                    cache.get(model, b)
        params = dict(model.named_parameters())
        order = sorted(range(len(clients)), key=lambda i: len(clients[i].batches))
        states = {}
        for s in range(0, len(order), clients_per_call):
            chunk = [clients[i] for i in order[s:s + clients_per_call]]
            stacked = OrderedDict((n, torch.stack([_received(c.ins, n, params[n]) for c in chunk]).requires_grad_(True))
                                  for n in names)
            with eager_attention(model):
                _train_stacked(model, stacked, chunk, tc, cache if use_cache else None, run.data.pad_id)
            for j, c in enumerate(chunk):
                states[c.ins.client_id] = OrderedDict((n, stacked[n][j].detach().to("cpu", copy=True)) for n in names)
    wall = (time.perf_counter() - start_t) / len(clients)      # the group's time, shared out
    updates = []
    for c in clients:
        state = states[c.ins.client_id]
        if c.ins.send_keys is not None:
            state = OrderedDict((k, state[k]) for k in c.ins.send_keys)
        updates.append(ClientUpdate(client_id=c.ins.client_id, state=state, num_samples=len(c.indices),
                                    num_steps=len(c.batches),
                                    train_loss=float(np.mean(c.losses)) if c.losses else float("nan"),
                                    wall_s=wall))
    return updates


@contextmanager
def eager_attention(model):
    """The backbone's attention as plain matmul + softmax within the block: vmap has batching rules for those,
    not for torch's fused attention kernels (it would loop over the clients one by one)."""
    encoder = model.encoder
    before = encoder.config._attn_implementation
    if before == "eager":
        yield
        return
    encoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        encoder.set_attn_implementation(before)


def _received(ins, name, param) -> torch.Tensor:
    """What client `ins` starts `name` from: the received tensor, or the model's value (a key not sent)."""
    v = ins.state.get(name)
    return (param if v is None else v).detach().to(param.device, param.dtype, copy=True)


def _train_stacked(model, stacked: OrderedDict, clients: list, tc, cache, pad_id: int) -> None:
    """Every client's local steps on its slice of `stacked` (updated in place)."""
    device = next(iter(stacked.values())).device
    K = len(clients)
    steps = np.array([len(c.batches) for c in clients])
    optimizer = make_optimizer(list(stacked.values()), tc)
    anchor = {n: t.detach().clone() for n, t in stacked.items()} if tc.prox_mu > 0 else None
    start = model.frozen_prefix if cache is not None else 0
    staged = _Staged(model, start)
    mu = float(tc.prox_mu)

    def client_loss(p, anc, x, attn, layer_mask, labels, weight, cmask):
        with autocast(tc.precision, device):
            logits = functional_call(staged, {"model." + n: t for n, t in p.items()}, (x, attn, layer_mask))
        logits = logits.float()
        if cmask is not None:
            logits = logits.masked_fill(~cmask, float("-inf"))
        ce = (F.cross_entropy(logits, labels, reduction="none") * weight).sum() / weight.sum()
        loss = ce
        if anc is not None:      # FedProx: + mu/2 ||w - w_global||^2
            loss = loss + 0.5 * mu * sum(((p[n] - anc[n]) ** 2).sum() for n in p)
        return loss, ce

    was_training = model.training
    model.eval()    # dropout is off by check_batching; eval mode keeps vmap away from random ops
    try:
        for t in range(int(steps.max(initial=0))):
            active = np.flatnonzero(steps > t)
            batch = _stack_batch(model, [clients[i] for i in active], t, cache, pad_id, start)
            sel = torch.as_tensor(active, device=device)
            everyone = len(active) == K
            p = {n: (v if everyone else v.index_select(0, sel)) for n, v in stacked.items()}
            anc = None if anchor is None else {n: (v if everyone else v.index_select(0, sel)) for n, v in anchor.items()}
            in_dims = (0, None if anc is None else 0, *(None if b is None else 0 for b in batch))
            grads, (_, ce) = vmap(grad_and_value(client_loss, has_aux=True), in_dims=in_dims)(
                {n: v.detach() for n, v in p.items()}, anc, *batch)
            for i, value in zip(active, ce.tolist()):      # one device sync per step, not per client
                clients[i].losses.append(value)
            if tc.max_grad_norm is not None:
                _clip_per_client(grads, tc.max_grad_norm)
            for n, v in stacked.items():
                g = grads[n]
                if not everyone:
                    g = torch.zeros_like(v).index_copy_(0, sel, g)
                v.grad = g
            kept = None if everyone else {n: v.detach().clone() for n, v in stacked.items()}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if kept is not None:      # clients whose steps are done keep their tensors
                done = torch.as_tensor(np.flatnonzero(steps <= t), device=device)
                with torch.no_grad():
                    for n, v in stacked.items():
                        v.index_copy_(0, done, kept[n].index_select(0, done))
    finally:
        model.train(was_training)


def _clip_per_client(grads: dict, max_norm: float) -> None:
    """:func:`torch.nn.utils.clip_grad_norm_` for each client's slice (the norm over all of its tensors);
    torch's own function would clip the whole stack as one vector."""
    total = torch.stack([g.flatten(1).norm(2, dim=1) for g in grads.values()], dim=1).norm(2, dim=1)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads.values():
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


def _stack_batch(model, clients: list, t: int, cache, pad_id: int, start: int):
    """(x, attn, layer_mask, labels, weight, class_mask), each with a leading client dimension: step `t`'s batch
    of every client in `clients`, padded to the longest sequence and the largest batch (padded examples repeat
    the client's first one with weight 0; padded tokens are masked)."""
    xs, masks, labels, cmasks = [], [], [], []
    for c in clients:
        b = c.batches[t]
        if cache is not None:
            x, mask = cache.get(model, b)
        else:
            x, mask = on_model_device(model, *c.split.inputs(b, pad_id))
        xs.append(x)
        masks.append(mask)
        labels.append(c.split.labels[b])
        cmasks.append(None if c.split.class_mask is None else c.split.class_mask[torch.as_tensor(np.asarray(b))])
    device = xs[0].device
    size = max(len(x) for x in xs)
    weight = torch.zeros(len(xs), size, device=device)
    for i, x in enumerate(xs):
        weight[i, : len(x)] = 1.0
    padded_x, padded_m = [], []
    longest = None if masks[0] is None else max(m.shape[1] for m in masks)
    for x, m in zip(xs, masks):
        extra = size - len(x)
        if m is not None:        # pad the sequence dimension (token ids with pad_id, hidden states with 0)
            grow = longest - m.shape[1]
            if grow:
                fill = pad_id if x.dtype == torch.long else 0
                x = torch.cat([x, x.new_full((x.shape[0], grow, *x.shape[2:]), fill)], dim=1)
                m = torch.cat([m, m.new_zeros((m.shape[0], grow))], dim=1)
            m = torch.cat([m, m[:1].expand(extra, -1)]) if extra else m
            padded_m.append(m)
        padded_x.append(torch.cat([x, x[:1].expand(extra, *x.shape[1:])]) if extra else x)
    x = torch.stack(padded_x)
    attn = torch.stack(padded_m) if padded_m else None
    y = torch.stack([torch.cat([v, v[:1].expand(size - len(v))]) for v in labels]).to(device)
    cmask = None
    if cmasks[0] is not None:
        cmask = torch.stack([torch.cat([v, v[:1].expand(size - len(v), -1)]) for v in cmasks]).to(device)
    return x, attn, _layer_mask(model, x, attn, start), y, weight, cmask


def _layer_mask(model, x, attn, start: int):
    """The layers' attention mask for the stacked batch, built outside vmap on the flattened (K * B) batch."""
    if attn is None:
        return None
    K, B = attn.shape[:2]
    flat = attn.reshape(K * B, -1)
    if start == 0 and model.prompt is not None:     # the soft prompt's tokens, prepended by embed()
        flat = torch.cat([flat.new_ones(K * B, model.prompt.num_embeddings), flat], dim=1)
    hidden = torch.zeros((K * B, flat.shape[1], model.encoder.config.hidden_size),
                         dtype=next(model.parameters()).dtype, device=flat.device)
    mask = model.layer_mask(hidden, flat)
    return None if mask is None else mask.reshape(K, B, *mask.shape[1:])


CONFIG_CHECKS.register("client_batching", check_batching)
