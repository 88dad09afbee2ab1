"""Checks of a config against its backbone, from the backbone's config alone: no weights, no model.

:class:`fedbench.config.ExperimentConfig` checks each field on its own (types, ranges, choices). Some
values are only wrong for a given backbone: ``peft.depth=99`` on a 6-layer encoder, ``data.max_length``
past the position embeddings, a LoRA target no linear layer has, an image task on a text encoder. Left
alone, they fail minutes later when the model is built or the data tokenized, or never (a LoRA target that
matches nothing next to one that matches is silently dropped). :func:`check_against_backbone` finds them
at load time by reading only the backbone's ``config.json`` (through ``AutoConfig``: a few ms, cached).

    facts = backbone_facts("minilm")       # BackboneFacts(num_layers=6, max_positions=512, ...)
    check_against_backbone(cfg)            # raises ConfigError(field, value, allowed) or returns facts
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache

from fedbench.config import ConfigError


# text model types whose AutoModel has BERT's layout, which EncoderClassifier relies on: embeddings with
# word_embeddings, encoder.encoder.layer[i] = attention.self.{query,key,value}, attention.output.dense,
# intermediate.dense, output.dense, the encoder's _create_attention_masks and AutoModel's add_pooling_layer
# (each checked: build_model + forward, with lora / adapter / prompt, up to exactly max_positions). Not
# here: electra (no add_pooling_layer), distilbert & co. (another layout).
BERT_LIKE_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "ernie",
                         "data2vec-text", "roberta-prelayernorm")
# the RoBERTa family numbers positions from padding_idx + 1: pad_token_id + 1 positions are never used
OFFSET_POSITION_MODEL_TYPES = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                               "roberta-prelayernorm")

# module paths of the Linear layers inside one encoder layer, per layout
_BERT_LAYER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", "intermediate.dense", "output.dense")
_VIT_LAYER_LINEARS = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                      "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class BackboneFacts:
    """What the config checks need to know about a backbone, read from its config.json."""
    name: str                      # model.backbone as given ('minilm', a folder, a hub id)
    model_type: str                # 'bert', 'vit', ...
    is_vision: bool
    num_layers: int
    hidden_size: int
    # token positions a text input (soft prompt included) may fill; None for a vision backbone
    max_positions: int | None
    # vision backbones: the side the images are resized to, the patch side and the patch count
    image_size: int | None
    patch_size: int | None
    num_patches: int | None
    # names a LoRA target may use: the leaf names of the Linear layers in an encoder layer plus the aliases
    # the backbone maps (fedbench's BERT vocabulary 'query', 'dense', ... on a ViT)
    linear_module_names: frozenset[str]
    layer_linear_paths: tuple[str, ...]            # those Linear layers' paths inside one encoder layer
    target_aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()   # the backbone's target_aliases, as pairs

    def target_matches(self, target: str) -> bool:
        """Whether the LoRA target `target` wraps at least one Linear of an encoder layer.

        Mirrors :func:`fedbench.models.tuners.lora.apply`: the name goes through the backbone's aliases,
        and peft matches a module whose path is the name or ends with '.' + name.
        """
        if not isinstance(target, str) or not target:
            return False
        names = dict(self.target_aliases).get(target, (target,))
        return any(p == n or p.endswith("." + n) for n in names for p in self.layer_linear_paths)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id ('namespace/repo' or 'repo')."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or os.path.exists(os.path.expanduser(name)))


def _load_config(name: str):
    """The backbone's transformers config, from 'minilm', a local folder or the hub (config.json only)."""
    from fedbench.models.backbone import BUNDLED_MINILM, BackboneUnavailableError, resolve_backbone
    hub_id = False
    if name == BUNDLED_MINILM:
        try:
            path = resolve_backbone(name)
        except BackboneUnavailableError as e:
            raise ConfigError("model.backbone", name, f"a backbone that is installed here: {e}") from e
    elif _looks_like_path(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise ConfigError("model.backbone", name, "'minilm', a Hugging Face model id, or a local model folder "
                              f"that exists (there is no folder {path!r})")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError("model.backbone", name, f"a local model folder with a config.json ({path!r} has none)")
    else:
        path, hub_id = name, True
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        if hub_id:         # neither in the local cache nor reachable
            if _offline():
                raise ConfigError("model.backbone", name, "'minilm' (the bundled all-MiniLM-L6-v2) or a local "
                                  f"model folder: the Hugging Face hub is offline here (HF_HUB_OFFLINE=1) and "
                                  f"{name!r} is not in the local cache") from e
            raise ConfigError("model.backbone", name, "'minilm', a local model folder or a Hugging Face model id "
                              f"that exists ({str(e).splitlines()[0]})") from e
        raise ConfigError("model.backbone", name, f"a model folder whose config.json loads ({e})") from e
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise ConfigError("model.backbone", name,
                          f"a backbone with a config.json transformers understands ({e})") from e


@lru_cache(maxsize=32)
def backbone_facts(backbone: str) -> BackboneFacts:
    """The facts about `backbone` (a model.backbone value), from its config.json alone; cached per name.

    Raises ConfigError('model.backbone', ...) for a folder that does not exist or has no config, a hub id
    while the hub is offline (and the id is not in the local cache), or a kind of model fedbench cannot
    wrap (a text encoder without BERT's layout, a vision model other than ViT).
    """
    from fedbench.models.backbone import EncoderClassifier
    from fedbench.models.vision import VisionEncoderClassifier, check_vision_config, is_vision_config
    config = _load_config(backbone)
    model_type = getattr(config, "model_type", None) or "?"
    if is_vision_config(config):
        check_vision_config(config, backbone)        # ConfigError('model.backbone', ...) unless a ViT
        aliases = VisionEncoderClassifier.target_aliases
        image, patch = int(config.image_size), int(config.patch_size)
        return BackboneFacts(
            name=backbone, model_type=model_type, is_vision=True, num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size), max_positions=None, image_size=image, patch_size=patch,
            num_patches=(image // patch) ** 2,
            linear_module_names=frozenset(p.rsplit(".", 1)[-1] for p in _VIT_LAYER_LINEARS) | frozenset(aliases),
            layer_linear_paths=_VIT_LAYER_LINEARS, target_aliases=tuple(sorted(aliases.items())))
    if model_type not in BERT_LIKE_MODEL_TYPES:
        raise ConfigError("model.backbone", backbone, f"a BERT-style text encoder (model type one of "
                          f"{list(BERT_LIKE_MODEL_TYPES)}) or a ViT image backbone; this one is {model_type!r}")
    positions = int(config.max_position_embeddings)
    if model_type in OFFSET_POSITION_MODEL_TYPES:
        positions -= int(getattr(config, "pad_token_id", None) or 0) + 1
    aliases = EncoderClassifier.target_aliases
    return BackboneFacts(
        name=backbone, model_type=model_type, is_vision=False, num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size), max_positions=positions, image_size=None, patch_size=None,
        num_patches=None,
        linear_module_names=frozenset(p.rsplit(".", 1)[-1] for p in _BERT_LAYER_LINEARS) | frozenset(aliases),
        layer_linear_paths=_BERT_LAYER_LINEARS, target_aliases=tuple(sorted(aliases.items())))


@lru_cache(maxsize=1)
def _task_modalities() -> dict[str, str]:
    from fedbench.data import list_tasks       # TaskInfo of every task, no dataset built
    return {info.name: info.modality for info in list_tasks()}


def task_modality(task: str) -> str | None:
    """'text' or 'image' for a known task (from the task registry, no data loaded), else None."""
    return _task_modalities().get(task)


def check_against_backbone(cfg) -> BackboneFacts:
    """Check the fields of `cfg` (a validated ExperimentConfig) that depend on its backbone.

    Reads only the backbone's config (see :func:`backbone_facts`); builds no model, loads no weights or data.
    Raises ConfigError(field, value, allowed) naming the first offending field; returns the facts otherwise.
    Checked: model.backbone (exists, loadable offline, a kind fedbench wraps, the task's modality),
    peft.depth (lora / adapter / ia3), peft.target_modules (lora), peft.prompt_tokens (prompt, text) and
    data.max_length (text).
    """
    facts = backbone_facts(cfg.model.backbone)
    _check_modality(cfg, facts)
    _check_peft(cfg.peft, facts)
    if not facts.is_vision:
        _check_positions(cfg, facts)
    return facts


def _check_modality(cfg, facts: BackboneFacts) -> None:
    task, backbone = cfg.data.task, cfg.model.backbone
    modality = task_modality(task)
    if modality == "image" and not facts.is_vision:
        raise ConfigError("model.backbone", backbone,
                          f"an image backbone for the image task {task!r} (a local ViT folder, or a Hugging Face "
                          f"ViT id with the hub reachable); {backbone!r} is a text encoder ({facts.model_type})")
    if modality == "text" and facts.is_vision:
        raise ConfigError("model.backbone", backbone,
                          f"a text encoder for the text task {task!r} (e.g. 'minilm'); {backbone!r} is an image "
                          f"backbone ({facts.model_type})")


def takes_depth(method: str) -> bool:
    """Whether the tuner trains only the top ``peft.depth`` layers (the tuner registry's fact)."""
    from fedbench.registry import TUNERS
    return bool(TUNERS.entry(method, "peft.method").facts.get("takes_depth", False))


def reads_field(method: str, name: str) -> bool:
    """Whether the tuner reads ``peft.<name>`` (its registry entry's ``fields``)."""
    from fedbench.registry import TUNERS
    return name in TUNERS.entry(method, "peft.method").facts.get("fields", ())


def reads_target_modules(method: str) -> bool:
    return reads_field(method, "target_modules")


def _check_peft(peft, facts: BackboneFacts) -> None:
    method = peft.method
    depth = getattr(peft, "depth", None)
    if takes_depth(method) and depth is not None and depth > facts.num_layers:
        raise ConfigError("peft.depth", depth, f"at most the backbone's {facts.num_layers} layers "
                          f"(or null for all of them)")
    if reads_field(method, "rank") and peft.rank > facts.hidden_size:
        # every adapted linear layer has hidden_size on one side: a rank above it adds no expressiveness and
        # only multiplies the factors' size (and time)
        raise ConfigError("peft.rank", peft.rank, f"at most the backbone's layer width {facts.hidden_size}")
    if method == "ia3":
        _check_ia3(facts)
    if reads_target_modules(method):
        targets = tuple(peft.target_modules)
        missing = [t for t in targets if not facts.target_matches(t)]
        if missing:
            raise ConfigError("peft.target_modules", targets,
                              f"names of linear layers in the backbone's encoder layers: one of "
                              f"{sorted(facts.linear_module_names)} or a dotted suffix of "
                              f"{list(facts.layer_linear_paths)}; {missing} match none")


def _check_ia3(facts: BackboneFacts) -> None:
    """(IA)^3 places itself by model type (peft's table or ia3.DEFAULTS): known, and matching the layers."""
    try:
        from fedbench.models.tuners import ia3
    except ImportError:       # the tuner is not there: config validation rejects the method
        return
    targets, _ = ia3.default_targets(facts.model_type)     # ConfigError('peft.method', 'ia3', ...) if unknown
    if not any(p == t or p.endswith("." + t) for t in targets for p in facts.layer_linear_paths):
        raise ConfigError("peft.method", "ia3", f"a backbone with the linear layers (IA)^3 targets ({list(targets)}); "
                          f"{facts.name!r} has {list(facts.layer_linear_paths)} in each layer")


def _check_positions(cfg, facts: BackboneFacts) -> None:
    max_length, limit = cfg.data.max_length, facts.max_positions
    if max_length > limit:
        raise ConfigError("data.max_length", max_length,
                          f"at most the backbone's {limit} positions (its special tokens count within max_length)")
    if cfg.peft.method == "prompt" and cfg.peft.prompt_tokens + max_length > limit:
        raise ConfigError("peft.prompt_tokens", cfg.peft.prompt_tokens,
                          f"at most {limit - max_length}: the soft prompt and data.max_length={max_length} tokens "
                          f"share the backbone's {limit} positions")
