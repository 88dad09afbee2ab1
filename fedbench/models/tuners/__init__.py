"""PEFT methods: each module turns a frozen :class:`EncoderClassifier` into one that trains a part.

One module per method, each with ``apply(model, cfg)``, registered in :data:`fedbench.registry.TUNERS` with
the facts the rest of fedbench asks about it: whether it takes ``peft.depth`` (top layers only), which
``PeftConfig`` fields it reads, and what DP-SGD's per-sample gradients go through (``opacus``: one line, shown by
``fedbench list`` and FedPEFT's DP support table; the mechanism, hooks or ghost clipping, follows from the size:
:func:`fedbench.fl.privacy.clipping_mode`). :func:`apply_peft` looks
``cfg.method`` up there. The classifier head trains with every method (a new task needs its head).

Adding a tuner: a module here with ``apply(model, cfg)``, one ``TUNERS.register(...)`` line below, and the
test matrix (tests/test_matrix.py) covers it.
"""
from __future__ import annotations

import torch

from fedbench.models.tuners import adapter, ia3, lora, prompt, selective
from fedbench.registry import TUNERS

TUNERS.register("full", selective.apply_full, doc="full fine-tuning: every parameter (with `depth`: every parameter "
                "of the top `depth` layers + the head)", takes_depth=True, fields=("depth",),
                opacus="position/token-type ids given a batch dimension for Opacus")
TUNERS.register("head", selective.apply_head, doc="the classifier head only (a linear probe)", takes_depth=False,
                fields=(),
                opacus="classifier trained on cached frozen features")
TUNERS.register("bitfit", selective.apply_bitfit, doc="BitFit: every bias + the head (Ben Zaken et al. 2022; "
                "with `depth`: the biases of the top `depth` layers)", takes_depth=True, fields=("depth",),
                opacus="every bias of the encoder + head")
TUNERS.register("lora", lora.apply, doc="LoRA through peft on the top `depth` layers (Hu et al. 2022)",
                takes_depth=True, has_lora_factors=True,
                fields=("rank", "lora_alpha", "lora_dropout", "target_modules", "depth"),
                opacus="peft LoRA A/B Linear layers + head (Opacus issue #820: update checked exact in tests)")
TUNERS.register("adapter", adapter.apply, doc="Houlsby bottleneck adapters on the top `depth` layers",
                takes_depth=True, fields=("adapter_width", "adapter_positions", "depth"),
                opacus="adapter Linear layers + head")
TUNERS.register("ia3", ia3.apply, doc="(IA)^3: learned vectors rescaling keys, values and FFN activations (Liu et al. 2022)",
                takes_depth=ia3.TAKES_DEPTH, fields=ia3.CONFIG_FIELDS, opacus=ia3.OPACUS_NOTE)
TUNERS.register("prompt", prompt.apply, doc="prompt tuning: learned soft tokens (Lester et al. 2021)",
                takes_depth=False, fields=("prompt_tokens",),
                opacus="soft prompt looked up per example so Opacus sees a batch dimension")


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
        TUNERS.get(cfg.method)(model, cfg)
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
