"""Config checks: every leaf field rejects bad values by name, and values that are only wrong for the chosen
backbone (depth, max_length, LoRA targets, modality, the backbone itself) are caught from its config.json,
before any model is built."""
import dataclasses
import math
import time
import typing

import pytest

from fedbench.config import LATER_FIELD_DEFAULTS, ConfigError, ExperimentConfig, to_plain
from fedbench.models.checks import BackboneFacts, backbone_facts, check_against_backbone
from fedbench.registry import TUNERS



# --------------------------------------------------------------------------------------------------
# a sweep over every leaf field of ExperimentConfig
# --------------------------------------------------------------------------------------------------

def _leaves(cls=ExperimentConfig, prefix=""):
    """(dotted name, type hint) of every leaf field, recursing into nested config dataclasses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, prefix + f.name + ".")
        else:
            yield prefix + f.name, hint


def _dotted_get(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


LEAVES = dict(_leaves())
DEFAULTS = to_plain(dataclasses.asdict(ExperimentConfig()))      # every field (to_dict leaves some out at default)


OPTION_MAPPINGS = {"fl.options", "fl.aggregator_options", "data.federation_options"}   # a component's typed options


def _dict_leaves(d, prefix=""):
    for k, v in d.items():
        leaf = isinstance(v, dict) and prefix + k not in OPTION_MAPPINGS
        yield from (_dict_leaves(v, prefix + k + ".") if leaf else [prefix + k])


# fields holding a fraction / a bounded number: a value just out of their range
OUT_OF_RANGE = {
    "model.dropout": 1.0, "peft.lora_dropout": 1.0, "train.weight_decay": 1.5, "train.momentum": 1.0,
    "train.lr": 11.0, "train.dp.delta": 1.0, "fl.clients_per_round": 1.5, "fl.dropout": 1.0,
    "fl.server_momentum": 1.0, "fl.server_beta2": 1.0, "fl.server_eps": 1.5, "fl.trim_ratio": 0.5,
    "data.max_length": 7, "data.num_clients": 0, "peft.rank": 0, "fl.attack_fraction": 1.5, "fl.attack_scale": 1e7,
}
# numbers whose sign is free, so a negative value is valid:
SIGNED = {
    "fl.attack_scale": "the attacker sends global + scale * update; negative scales (-4 by default) flip it",
}
# string fields whose value is free (no list of choices), so an unknown name is valid for the config:
FREE_NAMES = {
    "name": "free text naming the run",
    "model.backbone": "any HF id / local path is well-formed; whether it exists is check_against_backbone's job",
    "peft.target_modules": "module names depend on the backbone: check_against_backbone checks them",
}
# the config a field is checked in: DP fields are only read (and validated) when DP is enabled
CONTEXT = {
    "train.dp.": {"train.dp.enabled": True, "train.dp.target_epsilon": 8.0},
    "train.dp.noise_multiplier": {"train.dp.enabled": True, "train.dp.noise_multiplier": 1.0},
}


def _optional(hint):
    return type(None) in typing.get_args(hint)


def _base(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if _optional(hint) and len(args) == 1 else hint


def _bad_values(dotted, hint):
    """(label, value) pairs that the field must reject."""
    base, out = _base(hint), []
    if base is bool:
        out += [("str", "yes"), ("str-false", "false"), ("int", 1), ("int0", 0), ("list", [True])]
    elif base is int:
        out += [("str", "3"), ("float", 1.5), ("bool", True), ("negative", -1), ("list", [1]), ("nan", math.nan)]
    elif base is float:
        out += [("str", "0.5"), ("bool", True), ("negative", -1.0), ("list", [0.5]), ("nan", math.nan),
                ("inf", math.inf)]
    elif base is str:
        out += [("empty", ""), ("int", 3), ("list", ["x"]), ("unknown-name", "no-such-name")]
    elif typing.get_origin(base) is tuple and typing.get_args(base)[0] is str:
        default = _dotted_get(DEFAULTS, dotted)
        out += [("empty-str-item", [""]), ("bare-str", default[0] if default else "x"), ("int", 3),
                ("int-item", [3]), ("unknown-name", ["no-such-name"])]
        if default:             # a list that may be empty (plugins) takes [] as its default
            out.append(("empty-list", []))
    elif base is dict:          # the default component takes no options: any option is unknown to it
        out += [("str", "x"), ("list", [1]), ("unknown-option", {"no_such_option": 1})]
    else:
        pytest.fail(f"no bad values for {dotted}: {hint!r}; add its type to _bad_values")
    if not _optional(hint):
        out.append(("none", None))
    if dotted in OUT_OF_RANGE:
        out.append(("out-of-range", OUT_OF_RANGE[dotted]))
    return out


def _sweep_cases():
    for dotted, hint in LEAVES.items():
        for label, bad in _bad_values(dotted, hint):
            if (label == "unknown-name" and dotted in FREE_NAMES) or (label == "negative" and dotted in SIGNED):
                continue    # see FREE_NAMES / SIGNED for why these values are fine
            yield pytest.param(dotted, bad, id=f"{dotted}-{label}")


def _context(dotted):
    """The valid changes a field is checked under (the most specific CONTEXT key wins)."""
    keys = [k for k in CONTEXT if dotted == k or (k.endswith(".") and dotted.startswith(k))]
    return CONTEXT[max(keys, key=len)] if keys else {}


@pytest.mark.parametrize("dotted, bad", list(_sweep_cases()))
def test_every_leaf_field_rejects_bad_values_by_name(dotted, bad):
    base = ExperimentConfig().replace(**_context(dotted))
    with pytest.raises(ConfigError) as e:
        base.replace(**{dotted: bad})
    # an options mapping names the option itself (data.federation_options.no_such_option)
    assert e.value.field_name == dotted or (dotted in OPTION_MAPPINGS and e.value.field_name.startswith(dotted + ".")), \
        str(e.value)


def test_sweep_covers_every_field_and_the_lists_name_real_fields():
    # the dataclass walk sees what to_dict() holds (and the later fields it leaves out at their default)
    assert set(LEAVES) == set(_dict_leaves(DEFAULTS)) | {".".join(k) for k in LATER_FIELD_DEFAULTS}
    assert len(LEAVES) >= 40 and "train.dp.enabled" in LEAVES and "peft.train_head" in LEAVES
    for listed in (*OUT_OF_RANGE, *FREE_NAMES, *SIGNED):
        assert listed in LEAVES, f"{listed} is no longer a config field: update this test's lists"
    for key in CONTEXT:
        assert any(f == key or f.startswith(key) for f in LEAVES), key


@pytest.mark.parametrize("dotted", sorted(f for f in LEAVES if f.startswith("train.dp.") and f != "train.dp.enabled"))
def test_dp_fields_are_checked_even_when_dp_is_off(dotted):
    """A junk DP value would be hashed into the run key and kept silently: it is checked with DP off too."""
    with pytest.raises(ConfigError) as e:
        ExperimentConfig().replace(**{dotted: "junk"})
    assert e.value.field_name == dotted


# --------------------------------------------------------------------------------------------------
# checks against the backbone
# --------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_model_build(monkeypatch):
    """Checks read configs only: building a model or loading weights here is a bug."""
    import fedbench.models
    import fedbench.models.backbone

    def forbidden(*args, **kwargs):
        raise AssertionError("a config check must not build a model or load weights")
    monkeypatch.setattr(fedbench.models, "build_model", forbidden)
    monkeypatch.setattr(fedbench.models.backbone, "load_encoder", forbidden)
    monkeypatch.setattr(fedbench.models.backbone, "_pretrained_state", forbidden)
    monkeypatch.setattr(fedbench.models.backbone, "load_tokenizer", forbidden)


def _config_dir(tmp_path_factory, name, config):
    path = tmp_path_factory.mktemp(name)
    config.save_pretrained(path)          # config.json only: no weights
    return str(path)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers import ViTConfig
    return _config_dir(tmp_path_factory, "vit", ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                          intermediate_size=64, image_size=16, patch_size=4))


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    from transformers import RobertaConfig
    return _config_dir(tmp_path_factory, "roberta", RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, pad_token_id=1))


def _cfg(**changes):
    return ExperimentConfig().replace(**changes)


def _raises(cfg, field, *fragments):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        check_against_backbone(cfg)
    assert time.perf_counter() - t0 < 2.0
    assert e.value.field_name == field, str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    return e.value


def test_minilm_facts_come_from_its_config_and_are_cached():
    facts = backbone_facts("minilm")
    assert isinstance(facts, BackboneFacts) and backbone_facts("minilm") is facts
    assert (facts.num_layers, facts.max_positions, facts.hidden_size, facts.is_vision) == (6, 512, 384, False)
    assert facts.linear_module_names == {"query", "key", "value", "dense"}
    assert all(facts.target_matches(t) for t in ("query", "dense", "output.dense", "attention.self.value"))
    assert not any(facts.target_matches(t) for t in ("q_proj", "attention", "", "self"))


def test_vit_facts_include_the_bert_aliases(vit_dir):
    facts = backbone_facts(vit_dir)
    assert facts.is_vision and facts.max_positions is None
    assert (facts.num_layers, facts.hidden_size, facts.image_size, facts.patch_size, facts.num_patches) == (3, 32, 16, 4, 16)
    assert {"query", "value", "dense", "q_proj", "fc1", "fc2"} <= facts.linear_module_names
    assert facts.target_matches("query") and facts.target_matches("mlp.fc1") and not facts.target_matches("intermediate")


def test_default_config_passes_fast():
    t0 = time.perf_counter()
    assert check_against_backbone(ExperimentConfig()).num_layers == 6
    assert time.perf_counter() - t0 < 2.0
    for method in ("full", "head", "bitfit", "lora", "adapter", "prompt"):
        max_length = 502 if method == "prompt" else 512        # the prompt's 10 tokens + 502 = 512
        check_against_backbone(_cfg(**{"peft.method": method, "peft.depth": 6, "data.max_length": max_length}))


@pytest.mark.parametrize("method", ["lora", "adapter", "ia3"])
def test_depth_past_the_backbone(method):
    cfg = _cfg(**{"peft.depth": 99})
    cfg.peft.method = method          # 'ia3' ahead of config.py listing it: the check reads the field only
    _raises(cfg, "peft.depth", "at most the backbone's 6 layers")
    cfg.peft.depth = 6
    check_against_backbone(cfg)


def test_ia3_places_itself_on_bert_and_vit(vit_dir):
    pytest.importorskip("fedbench.models.tuners.ia3")
    for changes in ({}, {"model.backbone": vit_dir, "data.task": "digits"}):
        cfg = _cfg(**changes, **{"peft.target_modules": ["ignored-by-ia3"]})
        cfg.peft.method = "ia3"
        check_against_backbone(cfg)


def test_depth_is_ignored_by_methods_without_it():
    without = [n for n in TUNERS.names() if not TUNERS.entry(n).takes_depth]
    assert without                          # head / prompt
    for method in without:
        check_against_backbone(_cfg(**{"peft.method": method, "peft.depth": 99}))
    # full and bitfit take a depth (top-k layers), so theirs is checked like LoRA's
    _raises(_cfg(**{"peft.method": "bitfit", "peft.depth": 99}), "peft.depth", "6 layers")


def test_max_length_past_the_positions():
    _raises(_cfg(**{"data.max_length": 100000}), "data.max_length", "512 positions")
    _raises(_cfg(**{"data.max_length": 513}), "data.max_length")
    check_against_backbone(_cfg(**{"data.max_length": 512}))     # [CLS]/[SEP] are counted within max_length


def test_roberta_reserves_padding_positions(roberta_dir):
    assert backbone_facts(roberta_dir).max_positions == 128      # 130 - (pad_token_id + 1)
    check_against_backbone(_cfg(**{"model.backbone": roberta_dir, "data.max_length": 128, "peft.depth": 2}))
    _raises(_cfg(**{"model.backbone": roberta_dir, "data.max_length": 129}), "data.max_length", "128 positions")
    _raises(_cfg(**{"model.backbone": roberta_dir, "peft.depth": 3}), "peft.depth", "2 layers")


def test_prompt_tokens_share_the_positions(vit_dir):
    _raises(_cfg(**{"peft.method": "prompt", "peft.prompt_tokens": 500, "data.max_length": 64}),
            "peft.prompt_tokens", "at most 448")
    check_against_backbone(_cfg(**{"peft.method": "prompt", "peft.prompt_tokens": 448, "data.max_length": 64}))
    # on a ViT the prompt sits after the position embeddings and max_length is unused
    check_against_backbone(_cfg(**{"model.backbone": vit_dir, "data.task": "digits", "peft.method": "prompt",
                                   "peft.prompt_tokens": 500, "data.max_length": 100000}))


@pytest.mark.parametrize("targets", [["nonexistent"], ["query", "nonexistent"], ["q_proj"], ["attention"]])
def test_lora_targets_must_each_match_a_linear_layer(targets):
    e = _raises(_cfg(**{"peft.target_modules": targets}), "peft.target_modules", "'query'", "match none")
    assert e.value == tuple(targets)


def test_lora_targets_that_match(vit_dir):
    check_against_backbone(_cfg(**{"peft.target_modules": ["query", "key", "value", "dense",
                                                           "attention.output.dense"]}))
    check_against_backbone(_cfg(**{"model.backbone": vit_dir, "data.task": "digits",
                                   "peft.target_modules": ["query", "dense", "q_proj", "fc2"]}))
    _raises(_cfg(**{"model.backbone": vit_dir, "data.task": "digits", "peft.target_modules": ["intermediate"]}),
            "peft.target_modules")
    # only lora reads target_modules ('ia3' has its own defaults)
    for method in ("adapter", "ia3"):
        cfg = _cfg(**{"peft.target_modules": ["nonexistent"]})
        cfg.peft.method = method
        check_against_backbone(cfg)


def test_modality_must_match(vit_dir):
    _raises(_cfg(**{"data.task": "digits"}), "model.backbone", "image task 'digits'", "text encoder")
    _raises(_cfg(**{"data.task": "cifar10"}), "model.backbone", "image task")
    _raises(_cfg(**{"model.backbone": vit_dir}), "model.backbone", "text task 'rt_sentiment'", "image backbone")
    _raises(_cfg(**{"model.backbone": vit_dir, "data.task": "glue/sst2"}), "model.backbone", "text task")
    check_against_backbone(_cfg(**{"model.backbone": vit_dir, "data.task": "fashion_mnist", "peft.depth": 3}))
    _raises(_cfg(**{"model.backbone": vit_dir, "data.task": "digits", "peft.depth": 4}), "peft.depth", "3 layers")


@pytest.mark.parametrize("backbone", ["/nonexistent/model/dir", "./no-such-folder", "~/no-such-fedbench-model",
                                      "a/b/c"])
def test_unknown_local_path(backbone):
    _raises(_cfg(**{"model.backbone": backbone}), "model.backbone", "exists")


def test_folder_without_config(tmp_path):
    _raises(_cfg(**{"model.backbone": str(tmp_path)}), "model.backbone", "config.json")
    (tmp_path / "config.json").write_text("{not json")
    _raises(_cfg(**{"model.backbone": str(tmp_path)}), "model.backbone")


@pytest.mark.parametrize("hub_id", ["fedbench-no-such-user/no-such-model", "no-such-fedbench-model"])
def test_hub_id_offline_is_a_config_error(hub_id, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _raises(_cfg(**{"model.backbone": hub_id}), "model.backbone", "offline", "'minilm'", "local model folder")


def test_unsupported_architectures(tmp_path_factory):
    from transformers import DistilBertConfig, ElectraConfig, SwinConfig
    distil = _config_dir(tmp_path_factory, "distil", DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    _raises(_cfg(**{"model.backbone": distil}), "model.backbone", "BERT-style", "'distilbert'")
    electra = _config_dir(tmp_path_factory, "electra", ElectraConfig(hidden_size=32, num_hidden_layers=1))
    _raises(_cfg(**{"model.backbone": electra}), "model.backbone", "'electra'")   # AutoModel lacks add_pooling_layer
    swin = _config_dir(tmp_path_factory, "swin", SwinConfig(embed_dim=8, depths=[1], num_heads=[1]))
    _raises(_cfg(**{"model.backbone": swin, "data.task": "digits"}), "model.backbone", "'swin'")
