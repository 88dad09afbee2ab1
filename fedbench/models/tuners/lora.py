"""LoRA through peft: dW = (alpha / r) * B A on the chosen linear layers of the top `depth` layers.

peft's ``inject_adapter_in_model`` replaces the target nn.Linear modules in place, so the model keeps
its own structure (and its staged forward pass). :func:`lora_modules` lists, for every wrapped layer,
the state keys of A and B and the scaling, which the LoRA-aware aggregators and LoRM need.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

ADAPTER_NAME = "default"


def apply(model, cfg) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    from fedbench.models.tuners import top_layers
    layers = top_layers(model.num_layers, cfg.depth)
    # BERT's names ('query', 'dense', ...) are fedbench's vocabulary; a backbone that names its linear
    # layers differently (ViT in transformers 5: q_proj, fc1, ...) maps them through its target_aliases
    targets = sorted({t for name in cfg.target_modules for t in model.target_aliases.get(name, (name,))})
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, layers_to_transform=layers,
                        layers_pattern=model.layers_pattern, bias="none")
    inject_adapter_in_model(config, model.encoder, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    if not lora_modules(model):
        from fedbench.config import ConfigError
        raise ConfigError("peft.target_modules", tuple(cfg.target_modules),
                          "names of linear layers in the backbone, e.g. ['query', 'value']")


@dataclass(frozen=True)
class LoraModuleInfo:
    """One LoRA-wrapped linear layer, named by the keys its parts have in the model's state dict."""
    name: str            # module path, e.g. encoder.encoder.layer.4.attention.self.query
    a_key: str           # lora_A weight (r x d_in)
    b_key: str           # lora_B weight (d_out x r)
    base_key: str        # frozen base weight (d_out x d_in)
    scaling: float       # alpha / r


def lora_modules(model) -> list[LoraModuleInfo]:
    from peft.tuners.lora import LoraLayer
    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            out.append(LoraModuleInfo(
                name=name,
                a_key=f"{name}.lora_A.{ADAPTER_NAME}.weight",
                b_key=f"{name}.lora_B.{ADAPTER_NAME}.weight",
                base_key=f"{name}.base_layer.weight",
                scaling=float(module.scaling[ADAPTER_NAME]),
            ))
    return out


def lora_delta(state: dict, info: LoraModuleInfo) -> torch.Tensor:
    """The dense update s * B A that a LoRA state adds to the base weight."""
    return info.scaling * state[info.b_key] @ state[info.a_key]


def grow_lora_state(state: dict, template: dict):
    """Carry a LoRA state into a deeper and/or higher-rank configuration without changing its function.

    `template` is the larger configuration's initial trainable state. New layers keep their init (B = 0);
    a higher rank keeps the trained r rows of A and columns of B first, the new rows of A random (init)
    and the new columns of B zero, so B A is unchanged. The scaling alpha / r changes with r, so B is
    rescaled by r_new / r_old: (alpha / r_new) B' A' = (alpha / r_old) B A.
    """
    from fedbench.models.state import grow_state
    out = grow_state(state, template, {f"lora_B.{ADAPTER_NAME}.weight": (1,)})
    for key, b in state.items():
        if key.endswith(f"lora_B.{ADAPTER_NAME}.weight") and out[key].shape[1] != b.shape[1]:
            out[key] = out[key] * (out[key].shape[1] / b.shape[1])
    return out


@contextmanager
def zero_branches_skipped(model):
    """While active, LoRA layers whose every B is exactly zero run their base layer only.

    Such a branch adds exactly zero (x A^T B^T = 0), so skipping it changes no output value and saves its
    matmuls: what an evaluation of merged weights held in the base layers (factors at their init, B = 0)
    spends on nothing. Layers with a non-zero B keep their branch. peft's ``enable_adapters`` would also
    change ``requires_grad``; only its ``_disable_adapters`` flag is set here, and restored on exit.
    """
    from peft.tuners.lora import LoraLayer
    skipped = [m for m in model.modules() if isinstance(m, LoraLayer) and not m._disable_adapters
               and all(bool((b.weight == 0).all()) for b in m.lora_B.values())]
    for m in skipped:
        m._disable_adapters = True
    try:
        yield len(skipped)
    finally:
        for m in skipped:
            m._disable_adapters = False
