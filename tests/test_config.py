import json

import pytest

from fedbench.config import ConfigError, DataConfig, ExperimentConfig, FLConfig, PeftConfig, TrainConfig, DPConfig


@pytest.mark.parametrize("change, field, allowed", [
    ({"data.alpha": 0}, "data.alpha", "(0"),
    ({"data.alpha": -1.0}, "data.alpha", "(0"),
    ({"peft.rank": 0}, "peft.rank", ">= 1"),
    ({"peft.method": "qlora"}, "peft.method", "'lora'"),
    ({"data.task": "imagenet"}, "data.task", "'rt_sentiment'"),
    ({"data.partition": "pathological"}, "data.partition", "'dirichlet'"),
    ({"fl.aggregator": "geomed"}, "fl.aggregator", "'fedavg'"),
    ({"fl.lora_aggregation": "mean"}, "fl.lora_aggregation", "'svd'"),
    ({"fl.clients_per_round": 0}, "fl.clients_per_round", "fraction"),
    ({"fl.clients_per_round": 20}, "fl.clients_per_round", "data.num_clients=10"),
    ({"fl.dropout": 1.0}, "fl.dropout", "[0, 1)"),
    ({"train.lr": 0}, "train.lr", "(0"),
    ({"data.num_clients": 500, "data.max_train_samples": 100}, "data.num_clients", "max_train_samples=100"),
])
def test_bad_values_name_field_value_and_allowed(change, field, allowed):
    d = ExperimentConfig().to_dict()
    for dotted, value in change.items():
        node = d
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict(d)
    msg = str(e.value)
    assert e.value.field_name == field and field in msg and allowed in msg
    assert repr(e.value.value) in msg


def test_dp_needs_exactly_one_of_epsilon_and_noise():
    with pytest.raises(ConfigError, match="train.dp.target_epsilon"):
        ExperimentConfig(train=TrainConfig(dp=DPConfig(enabled=True)))
    with pytest.raises(ConfigError, match="exactly one"):
        ExperimentConfig(train=TrainConfig(dp=DPConfig(enabled=True, target_epsilon=8, noise_multiplier=1.0)))
    ExperimentConfig(train=TrainConfig(dp=DPConfig(enabled=True, target_epsilon=8)))


def test_stack_and_svd_require_plain_fedavg():
    with pytest.raises(ConfigError, match="fl.aggregator"):
        ExperimentConfig(fl=FLConfig(aggregator="median", lora_aggregation="stack"))


def test_unknown_field_is_an_error():
    d = ExperimentConfig().to_dict()
    d["peft"]["rnak"] = 4
    with pytest.raises(ConfigError, match="peft.rnak"):
        ExperimentConfig.from_dict(d)


def test_yaml_and_json_round_trip_and_hash(tmp_path):
    cfg = ExperimentConfig(name="x", seed=3, data=DataConfig(alpha=0.1), peft=PeftConfig(method="adapter", depth=2))
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"c{suffix}"
        cfg.save(path)
        back = ExperimentConfig.load(path)
        assert back == cfg and back.hash() == cfg.hash()
    assert cfg.replace(seed=4).hash() != cfg.hash()
    assert cfg.replace(**{"peft.rank": 4}).peft.rank == 4
    assert json.loads(cfg.to_json())["peft"]["target_modules"] == ["query", "value"]
    with pytest.raises(ConfigError, match="dotted path"):
        cfg.replace(**{"peft.nope": 1})
