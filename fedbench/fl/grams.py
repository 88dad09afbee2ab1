"""What a client measures on its own data besides training: the Gram matrices of a layer's inputs (LoRM,
RegMean). The solves that use them are pure math (:mod:`fedbench.merging.lorm`); this forward pass is the
client's, on the loop's model and activation cache."""
from __future__ import annotations

from typing import Sequence

import torch

from fedbench.fl.client import forward_batch
from fedbench.models.inputs import batch_order, pad_batch


class _EveryInputSeen(Exception):
    """Raised by the last forward pre-hook of a batch: nothing above it is needed for the Gram matrices."""


@torch.no_grad()
def layer_input_grams(model, module_names: Sequence[str], split, indices, cache=None, pad_id: int = 0,
                      batch_size: int = 64, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """{module name: X^T X} over the non-padding token rows of the inputs each module sees on the examples
    `indices` of `split`, in `dtype` (float64 by default; the official code accumulates in float32) (forward
    pre-hooks; eval mode; a fixed batch order, so the sums are deterministic). With an :class:`~fedbench.models.inputs.ActivationCache` the forward starts above the
    frozen prefix, as training does. The forward stops once every named module has seen its input (the
    layers above the last one, and the head, are not run: the Gram matrices are the same, bit for bit)."""
    modules = {name: model.get_submodule(name) for name in module_names}
    out = {name: None for name in module_names}
    current = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            mask = current["mask"].bool().to(x.device)
            if x.shape[:2] != mask.shape:
                raise RuntimeError(f"{name}: input {tuple(x.shape)} does not match the token mask {tuple(mask.shape)}")
            rows = x[mask].to(dtype)                # padding rows never enter the Gram matrix
            g = rows.T @ rows
            out[name] = g if out[name] is None else out[name] + g
            current["todo"].discard(name)
            if not current["todo"]:
                raise _EveryInputSeen
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batch_order(indices, split.lengths, batch_size, rng=None, shuffle=False, bucketing=True):
            if cache is not None and model.frozen_prefix > 0:
                cache.ensure(model.frozen_prefix)
                current["mask"] = cache.get(model, batch)[1]
            else:
                current["mask"] = pad_batch([split.input_ids[i] for i in batch], pad_id)[1]
            current["todo"] = set(modules)
            try:
                forward_batch(model, split, batch, cache, pad_id)
            except _EveryInputSeen:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, m in modules.items():
        if out[name] is None:
            d_in = m.in_features if hasattr(m, "in_features") else m.base_layer.in_features
            out[name] = torch.zeros((d_in, d_in), dtype=dtype)
    return {name: g.cpu() for name, g in out.items()}     # computed on the model's device, sent from the CPU
