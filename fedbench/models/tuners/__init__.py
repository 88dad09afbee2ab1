"""PEFT methods: each module turns a frozen :class:`EncoderClassifier` into one that trains a part.

One module per method, each with ``apply(model, cfg, generator)``; :func:`apply_peft` dispatches by
``cfg.method``. The classifier head trains with every method (a new task needs its head).
"""
from __future__ import annotations

import torch

from fedbench.models.tuners import adapter, lora, prompt, selective

TUNERS = {
    "full": selective.apply_full,
    "head": selective.apply_head,
    "bitfit": selective.apply_bitfit,
    "lora": lora.apply,
    "adapter": adapter.apply,
    "prompt": prompt.apply,
}


def top_layers(num_layers: int, depth: int | None) -> list[int]:
    """Indices of the top `depth` layers (all layers if depth is None)."""
    if depth is None:
        return list(range(num_layers))
    if depth > num_layers:
        from fedbench.config import ConfigError
        raise ConfigError("peft.depth", depth, f"at most the backbone's {num_layers} layers")
    return list(range(num_layers - depth, num_layers))


def apply_peft(model, cfg, seed: int) -> None:
    """Freeze the model, add `cfg.method`'s modules (seeded init) and mark what trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    # new modules draw their init from a private generator: global RNG state is neither used nor changed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        TUNERS[cfg.method](model, cfg)
    if cfg.method != "full" and cfg.train_head:
        model.classifier.requires_grad_(True)
    model.frozen_prefix = _frozen_prefix(model)


def _frozen_prefix(model) -> int:
    """How many bottom layers (with the embeddings below them) have nothing to train."""
    if model.prompt is not None or any(p.requires_grad for p in model.encoder.embeddings.parameters()):
        return 0
    for i, layer in enumerate(model.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return model.num_layers
