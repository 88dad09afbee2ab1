"""Prompt tuning (Lester et al., 2021): `prompt_tokens` learned soft tokens prepended to the input.

peft's prompt tuning needs its PeftModel wrapper around a transformers model, which would hide the
staged forward pass fedbench uses; the method itself is one embedding table, so it lives here.
The table is an nn.Embedding (not a bare Parameter) so Opacus can compute per-sample gradients.
Initialised from the embeddings of random vocabulary tokens, as Lester et al. recommend.
"""
from __future__ import annotations

import torch
from torch import nn


def apply(model, cfg) -> None:
    words = model.encoder.embeddings.word_embeddings.weight
    token_ids = torch.randint(0, words.shape[0], (cfg.prompt_tokens,))
    model.prompt = nn.Embedding(cfg.prompt_tokens, words.shape[1])
    with torch.no_grad():
        model.prompt.weight.copy_(words[token_ids])
    model.prompt.requires_grad_(True)
