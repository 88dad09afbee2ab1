"""(IA)^3 (Liu et al., 2022) through peft: learned vectors that rescale keys, values and FFN activations.

Each wrapped linear layer gets one vector ``l``, initialised to ones (so a new model computes exactly the
backbone's function): y = base(x) * l on its output, or for a "feedforward" layer y = base(x * l) on its
input. peft's ``inject_adapter_in_model`` replaces the target nn.Linear modules in place (as for LoRA),
so the model keeps its structure and its staged forward pass; the vectors are the state keys
``<layer>.ia3_l.default`` (shape (out, 1), or (1, in) for a feedforward layer).

Which layers: peft's own default for the backbone's model type
(``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING``): for BERT (MiniLM) ``key``, ``value`` and
``output.dense``, with ``output.dense`` feedforward. peft matches names by suffix, and in BERT
``output.dense`` names two layers: the FFN's down projection (``layer.i.output.dense``, whose input is
the FFN intermediate activation the paper rescales) and the attention output projection
(``layer.i.attention.output.dense``, whose input is the attention context). peft's default wraps both as
feedforward layers and fedbench follows it; note that the attention-output vector is redundant with the
value vector (the context is linear in each feature of V, so scaling context feature j is scaling value
feature j): the model is over-parameterised by hidden_size entries per layer, not more expressive. Per MiniLM
layer: 384 (key) + 384 (value) + 384 (attention output) + 1536 (FFN) = 2688 entries. A ViT backbone
(not in peft's table) gets the same placement in its names (:data:`DEFAULTS`).

Which layers of the stack: the top ``cfg.depth`` (all if None), as for LoRA. peft 0.21's IA3Config has
no ``layers_to_transform``, so the chosen modules are passed to peft by their full names.

DP-SGD (Opacus): see :data:`OPACUS_NOTE`. peft keeps each vector in an ``nn.ParameterDict``
(``ia3_l``) inside the wrapped layer and applies it inline in the layer's forward. Opacus' hooks attach
to modules that own trainable parameters *directly* (``parameters(recurse=False)``): the wrapped layer
owns none (so a grad sampler registered for peft's Linear would never run), and the ParameterDict,
which Opacus does hook, is never called, so no per-sample gradient would be produced ("Per sample
gradient is not initialized" from the DP optimizer). :func:`apply` therefore turns each ``ia3_l`` into
an :class:`IA3Scale` (the same ParameterDict, same state keys, made callable: h -> h * l) and each wrapped
layer into :class:`IA3Linear` (peft's Linear whose forward routes the multiplication through that
module; same values as peft's forward). The elementwise scaling is then a module of its own, with the
exact grad sampler registered below: per example, dL/dl = sum over tokens of backprops * h, where h is
the scaled tensor (base(x) for key/value, the layer input x for feedforward layers). Neither the frozen
base weight nor a recomputation of base(x) is needed, and the frozen base Linear is never hooked.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

ADAPTER_NAME = "default"

# what the tuner registry records about this method
TAKES_DEPTH = True
CONFIG_FIELDS = ("depth",)
# peft's ParameterDict is never called, so the vectors are scaled through fedbench's IA3Scale module, which has
# its own exact grad sampler (Opacus has none); ghost clipping falls back to it
OPACUS_NOTE = "(IA)^3 scaling vectors as modules of their own, with an exact grad sampler + head"

# (target modules, feedforward modules) for backbones peft's IA3 table lacks; peft's table comes first.
# ViT (transformers 5 names): BERT's placement, key/value -> k_proj/v_proj, attention.output.dense ->
# o_proj, output.dense -> mlp.fc2.
DEFAULTS = {"vit": (("k_proj", "v_proj", "o_proj", "fc2"), ("o_proj", "fc2"))}


def default_targets(model_type: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(target modules, feedforward modules): peft's IA3 default for `model_type`, else :data:`DEFAULTS`."""
    from peft.utils import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)
    if model_type in TARGETS and model_type in FEEDFORWARD:
        return tuple(TARGETS[model_type]), tuple(FEEDFORWARD[model_type])
    if model_type in DEFAULTS:
        return DEFAULTS[model_type]
    from fedbench.config import ConfigError
    raise ConfigError("peft.method", "ia3", f"a backbone whose (IA)^3 placement is known (peft's table or "
                      f"{sorted(DEFAULTS)}); this one is of type {model_type!r}")


def _matches(name: str, targets) -> bool:
    """peft's rule for a list of target names: the module name is one or ends with '.' + one."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


def target_names(model, depth: int | None) -> tuple[list[str], list[str]]:
    """Full names (inside ``model.encoder``) of the linear layers to wrap in the top `depth` layers, and
    those among them that are feedforward."""
    from fedbench.models.tuners import top_layers
    targets, feedforward = default_targets(model.encoder.config.model_type)
    stack = next(n for n, m in model.encoder.named_modules() if m is model.layers)
    names, ff = [], []
    for i in top_layers(model.num_layers, depth):
        for rel, module in model.layers[i].named_modules():
            if rel and isinstance(module, nn.Linear) and _matches(rel, targets):
                names.append(f"{stack}.{i}.{rel}")
                if _matches(rel, feedforward):
                    ff.append(names[-1])
    return names, ff


def apply(model, cfg) -> None:
    from peft import IA3Config, inject_adapter_in_model
    from peft.tuners.ia3.layer import Linear as PeftIA3Linear
    names, ff = target_names(model, cfg.depth)
    if not names:
        from fedbench.config import ConfigError
        raise ConfigError("peft.method", "ia3", "a backbone with the linear layers (IA)^3 targets")
    config = IA3Config(target_modules=names, feedforward_modules=ff, init_ia3_weights=True)
    inject_adapter_in_model(config, model.encoder, adapter_name=ADAPTER_NAME)
    linear_cls = _ia3_linear_class()
    for module in model.modules():
        if type(module) is PeftIA3Linear:
            module.__class__ = linear_cls
            module.ia3_l.__class__ = IA3Scale
    register_opacus_sampler()
    for name, p in model.named_parameters():
        p.requires_grad_(".ia3_l." in name)


class IA3Scale(nn.ParameterDict):
    """peft's ``ia3_l`` ParameterDict, callable: h -> h * l (l = its ``default`` vector, flattened), in
    the vector's dtype and back to h's, as peft's forward computes it."""

    __call__ = nn.Module.__call__     # ParameterDict forbids calls; this one is a module with hooks

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        scale = self[ADAPTER_NAME]
        return (h.to(scale.dtype) * scale.flatten()).to(h.dtype)


@lru_cache(maxsize=1)
def _ia3_linear_class():
    """:class:`IA3Linear`, built on first use: subclassing peft's Linear imports peft (seconds), which
    importing fedbench should not."""
    from peft.tuners.ia3.layer import Linear

    class IA3Linear(Linear):
        """peft's IA3 Linear whose scaling runs through its :class:`IA3Scale` module (so Opacus' hooks see
        it). peft's own forward is used whenever more than the single fedbench adapter is in play."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if (self.disable_adapters or self.merged or not isinstance(self.ia3_l, IA3Scale)
                    or list(self.active_adapters) != [ADAPTER_NAME] or list(self.ia3_l.keys()) != [ADAPTER_NAME]):
                return super().forward(x, *args, **kwargs)
            if self.is_feedforward:
                return self.base_layer(self.ia3_l(x), *args, **kwargs)
            return self.ia3_l(self.base_layer(x, *args, **kwargs))

    IA3Linear.__module__, IA3Linear.__qualname__ = __name__, "IA3Linear"
    return IA3Linear


def __getattr__(name: str):
    if name == "IA3Linear":      # importable (and picklable) by name, built on first access
        return _ia3_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ia3_grad_sample(module: IA3Scale, activations, backprops: torch.Tensor) -> dict:
    """Per-sample gradient of y = h * l: for example n, dL_n/dl = sum over tokens of backprops_n * h_n,
    in the vector's shape ((d, 1) or (1, d): the same order as its flattened entries)."""
    h = activations[0].to(backprops.dtype)
    scale = module[ADAPTER_NAME]
    if not scale.requires_grad:
        return {}
    gs = torch.einsum("n...d,n...d->nd", backprops, h)
    return {scale: gs.reshape(gs.shape[0], *scale.shape)}


@lru_cache(maxsize=1)
def register_opacus_sampler() -> bool:
    """Register :func:`ia3_grad_sample` for :class:`IA3Scale` with Opacus (once; False without Opacus).
    Registration covers GradSampleHooks and, through its grad-sampler fallback, ghost clipping."""
    try:
        from opacus.grad_sample import register_grad_sampler
    except ImportError:   # pragma: no cover - opacus is a dependency; without it there is no DP-SGD to serve
        return False
    register_grad_sampler(IA3Scale)(ia3_grad_sample)
    return True


@dataclass(frozen=True)
class IA3ModuleInfo:
    """One (IA)^3-wrapped linear layer."""
    name: str            # module path, e.g. encoder.encoder.layer.4.attention.self.key
    key: str             # state key of its vector, <name>.ia3_l.default
    feedforward: bool    # True: scales the layer's input (shape (1, in)); False: its output ((out, 1))
    size: int            # entries of the vector


def ia3_modules(model) -> list[IA3ModuleInfo]:
    from peft.tuners.ia3 import IA3Layer
    return [IA3ModuleInfo(name=name, key=f"{name}.ia3_l.{ADAPTER_NAME}", feedforward=bool(module.is_feedforward),
                          size=module.ia3_l[ADAPTER_NAME].numel())
            for name, module in model.named_modules()
            if isinstance(module, IA3Layer) and ADAPTER_NAME in module.ia3_l]
