"""Models: the pretrained encoder with a classifier head, PEFT methods, and trainable state."""
from __future__ import annotations

import torch

from fedbench.models.backbone import (BUNDLED_MINILM, BackboneUnavailableError, EncoderClassifier, load_encoder,
                                      load_tokenizer, resolve_backbone)
from fedbench.models.state import count_parameters, load_trainable_state, state_nbytes, state_numel, trainable_state
from fedbench.models.tuners import apply_peft
from fedbench.models.tuners.lora import LoraModuleInfo, lora_delta, lora_modules


def build_model(model_cfg, peft_cfg, num_labels: int, seed: int) -> EncoderClassifier:
    """The backbone with a fresh head and `peft_cfg.method` applied; every init drawn from `seed`."""
    from fedbench.models.vision import VisionEncoderClassifier, check_vision_config, is_vision_config
    encoder = load_encoder(model_cfg.backbone, dropout=model_cfg.dropout)
    cls = EncoderClassifier
    if is_vision_config(encoder.config):
        check_vision_config(encoder.config, model_cfg.backbone)
        cls = VisionEncoderClassifier
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(encoder, num_labels, pooling=model_cfg.pooling)
    apply_peft(model, peft_cfg, seed=seed + 1)
    return model


__all__ = ["BUNDLED_MINILM", "BackboneUnavailableError", "EncoderClassifier", "LoraModuleInfo", "apply_peft",
           "build_model", "count_parameters", "load_encoder", "load_tokenizer", "load_trainable_state",
           "lora_delta", "lora_modules", "resolve_backbone", "state_nbytes", "state_numel", "trainable_state"]
