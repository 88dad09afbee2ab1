"""Prompt tuning (Lester et al., 2021): `prompt_tokens` learned soft tokens prepended to the input.

peft's prompt tuning needs its PeftModel wrapper around a transformers model, which would hide the
staged forward pass fedbench uses; the method itself is one embedding table, so it lives here.
The table is an nn.Embedding (not a bare Parameter) so Opacus can compute per-sample gradients.
Initialised from the embeddings of random vocabulary tokens, as Lester et al. recommend; on a vision
backbone (no vocabulary) uniformly in +-sqrt(6 / (patch_dim + hidden)), as VPT (Jia et al., 2022) does,
and inserted after the CLS token (VPT-shallow).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def apply(model, cfg) -> None:
    words = getattr(model.encoder.embeddings, "word_embeddings", None)
    hidden = model.encoder.config.hidden_size
    model.prompt = nn.Embedding(cfg.prompt_tokens, hidden)
    with torch.no_grad():
        if words is not None:
            token_ids = torch.randint(0, words.weight.shape[0], (cfg.prompt_tokens,))
            model.prompt.weight.copy_(words.weight[token_ids])
        else:
            c = model.encoder.config
            bound = math.sqrt(6.0 / (c.num_channels * c.patch_size ** 2 + hidden))
            model.prompt.weight.uniform_(-bound, bound)
    model.prompt.requires_grad_(True)
