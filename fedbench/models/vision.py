"""An image-classification backbone (ViT-style, by Hugging Face id or local path) behind the same staged
forward pass as the text encoder, so every PEFT method, the activation cache and the federated loop work
on image tasks unchanged.

No vision backbone ships offline (there is no CPU torchvision and no image model inside a PyPI package
here): an id needs the Hugging Face hub; offline, a local folder works (the tests use a tiny random ViT
saved to disk). Inputs are :class:`fedbench.models.inputs.ImageSplit` batches of pixel_values.
"""
from __future__ import annotations

import json

import torch
from torch import nn

from fedbench.models.backbone import EncoderClassifier

# model types whose encoder is a ViT-style stack of layers over patch embeddings with a CLS token
VISION_MODEL_TYPES = ("vit",)
IMAGENET_HALF = (0.5, 0.5, 0.5)     # ViT's (google/vit-*) normalisation when no preprocessor config is found


def is_vision_config(config) -> bool:
    """An image backbone (a config with image_size and no vocabulary); only ViT is wired up (see below)."""
    return hasattr(config, "image_size") and not hasattr(config, "vocab_size")


def check_vision_config(config, name: str) -> None:
    if getattr(config, "model_type", None) not in VISION_MODEL_TYPES:
        from fedbench.config import ConfigError
        raise ConfigError("model.backbone", name, f"a text encoder or an image backbone of type {VISION_MODEL_TYPES} "
                          f"(this one is {getattr(config, 'model_type', None)!r})")


def image_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the backbone's preprocessor_config.json; ViT's 0.5/0.5 if it has none."""
    from transformers.utils import cached_file

    from fedbench.models.backbone import resolve_backbone
    path = cached_file(resolve_backbone(name), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return IMAGENET_HALF, IMAGENET_HALF
    with open(path) as f:
        cfg = json.load(f)
    return tuple(cfg.get("image_mean", IMAGENET_HALF)), tuple(cfg.get("image_std", IMAGENET_HALF))


class VisionEncoderClassifier(EncoderClassifier):
    """ViT encoder + final LayerNorm + pooling (CLS or mean over patches) + linear head.

    The staged forward takes pixel_values where the text model takes token ids; the attention mask it
    hands around is all ones (no padding among patches) so that pooling and the activation cache treat
    both modalities alike. A soft prompt (VPT-shallow) sits between the CLS token and the patches.
    """

    layers_pattern = "layers"
    # fedbench's (BERT) LoRA target names -> transformers 5 ViT names
    target_aliases = {"query": ("q_proj",), "key": ("k_proj",), "value": ("v_proj",),
                      "dense": ("o_proj", "fc1", "fc2"), "q_proj": ("q_proj",), "k_proj": ("k_proj",),
                      "v_proj": ("v_proj",), "o_proj": ("o_proj",), "fc1": ("fc1",), "fc2": ("fc2",)}

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def adapter_sites(self, layer) -> dict[str, tuple[nn.Module, str]]:
        return {"attention": (layer.attention, "o_proj"), "ffn": (layer.mlp, "fc2")}

    def embed(self, pixel_values: torch.Tensor, attention_mask=None):
        hidden = self.encoder.embeddings(pixel_values)
        if self.prompt is not None:
            batch = hidden.shape[0]
            idx = torch.arange(self.prompt.num_embeddings, device=hidden.device).repeat(batch, 1)
            hidden = torch.cat([hidden[:, :1], self.prompt(idx), hidden[:, 1:]], dim=1)
        return hidden, hidden.new_ones(hidden.shape[:2], dtype=torch.long)

    def layer_mask(self, hidden, attention_mask):
        return None                       # every patch attends to every patch

    def pool(self, hidden, attention_mask):
        hidden = self.encoder.layernorm(hidden)
        if self.pooling == "cls":
            return hidden[:, 0]
        start = 1 + (self.prompt.num_embeddings if self.prompt is not None else 0)
        return hidden[:, start:].mean(1)    # mean over the patch tokens
