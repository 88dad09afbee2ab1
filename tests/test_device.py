"""train.device / train.precision: resolution, refusals before any work, CPU results unchanged, and (where a
CUDA device exists) a run on it whose records have the CPU run's form and whose states come back to the CPU."""
import pandas as pd
import pytest
import torch

from fedbench.config import ExperimentConfig, TrainConfig
from fedbench.errors import ConfigError
from fedbench.fl import FederatedRun, prepare_data, run_federated
from fedbench.fl.device import resolve_device

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here")
cpu_only = pytest.mark.skipif(CUDA, reason="checks what happens without CUDA")


def tiny(**changes) -> ExperimentConfig:
    cfg = ExperimentConfig.from_dict({
        "name": "device", "seed": 1,
        "data": {"task": "rt_sentiment", "num_clients": 3, "partition": "iid", "max_train_samples": 36,
                 "max_test_samples": 20, "max_length": 24},
        "peft": {"method": "lora", "rank": 2, "depth": 2},
        "train": {"local_steps": 2, "batch_size": 6, "lr": 0.01},
        "fl": {"rounds": 2},
    })
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(scope="module")
def data():
    return prepare_data(tiny())


def test_auto_resolves_to_cuda_when_present_else_cpu():
    assert resolve_device(TrainConfig()).type == ("cuda" if CUDA else "cpu")
    assert resolve_device(TrainConfig(device="cpu")) == torch.device("cpu")


@cpu_only
def test_auto_picks_the_cpu_here():
    assert resolve_device(TrainConfig(device="auto")) == torch.device("cpu")


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CUDA", "", 0, None, "cuda:-1"])
def test_a_bad_device_is_a_config_error(value):
    with pytest.raises(ConfigError) as e:
        tiny(**{"train.device": value})
    assert e.value.field_name == "train.device"


@pytest.mark.parametrize("value", ["fp16", "bfloat16", None])
def test_a_bad_precision_is_a_config_error(value):
    with pytest.raises(ConfigError) as e:
        tiny(**{"train.precision": value})
    assert e.value.field_name == "train.precision"


def test_bf16_on_an_explicit_cpu_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as e:
        tiny(**{"train.device": "cpu", "train.precision": "bf16"})
    assert e.value.field_name == "train.precision" and "CUDA only" in str(e.value)


@cpu_only
def test_bf16_with_auto_on_a_cpu_machine_is_refused_before_any_work(monkeypatch):
    cfg = tiny(**{"train.precision": "bf16"})          # valid as a config: it may run on a GPU machine
    monkeypatch.setattr("fedbench.fl.server.build_data", lambda cfg: pytest.fail("work started"))
    with pytest.raises(ConfigError) as e:
        FederatedRun(cfg)
    assert e.value.field_name == "train.precision"


@cpu_only
def test_cuda_without_a_cuda_device_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr("fedbench.fl.server.build_data", lambda cfg: pytest.fail("work started"))
    for value in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as e:
            FederatedRun(tiny(**{"train.device": value}))
        assert e.value.field_name == "train.device"


def test_new_fields_keep_every_earlier_config_hash():
    """Left out of to_dict at their default: a config that does not set them has the saved form, so the hash, it
    had before they existed (on this branch's base, ExperimentConfig()'s hash was 26f76a58a2aa before and after)."""
    import dataclasses

    from fedbench.config import LATER_FIELD_DEFAULTS, config_hash, to_plain
    cfg = ExperimentConfig()
    before = to_plain(dataclasses.asdict(cfg))
    for section, name in LATER_FIELD_DEFAULTS:
        del before[section][name]
    del before["plugins"]                        # left out too when empty (fedbench.plugins)
    assert cfg.to_dict() == before and cfg.hash() == config_hash(before)
    assert "device" not in cfg.to_dict()["train"] and "precision" not in cfg.to_dict()["train"]
    assert cfg.replace(**{"train.device": "cpu"}).hash() != cfg.hash()
    assert ExperimentConfig.from_dict(cfg.replace(**{"train.device": "cuda:0"}).to_dict()).train.device == "cuda:0"


@cpu_only
def test_explicit_cpu_equals_auto_on_this_machine(data):
    a, b = run_federated(tiny(), data), run_federated(tiny(**{"train.device": "cpu"}), data)
    pd.testing.assert_frame_equal(a.rounds.drop(columns="wall_s"), b.rounds.drop(columns="wall_s"), check_exact=True)
    assert all(torch.equal(a.predictions[k], b.predictions[k]) if torch.is_tensor(a.predictions[k])
               else (a.predictions[k] == b.predictions[k]).all() for k in a.predictions)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_cuda_run_has_the_cpu_runs_form_and_hands_states_to_the_cpu(precision, data):
    # SGD: Adam would turn float noise on exactly-zero gradients into lr-sized steps (see tests/test_batched.py)
    sgd = {"train.optimizer": "sgd", "train.momentum": 0.9, "train.lr": 0.05}
    cpu = FederatedRun(tiny(**sgd, **{"train.device": "cpu"}), data)
    gpu = FederatedRun(tiny(**sgd, **{"train.device": "cuda", "train.precision": precision}), data)
    assert next(gpu.model.parameters()).device.type == "cuda"
    for r in (1, 2):
        cpu.run_round(r)
        gpu.run_round(r)
    assert list(pd.DataFrame(gpu.records).columns) == list(pd.DataFrame(cpu.records).columns)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in gpu.global_model.state.values())
    for k, v in cpu.global_model.state.items():        # close, not bit-identical: other kernels, other sums
        tol = 1e-3 if precision == "fp32" else 5e-2
        torch.testing.assert_close(gpu.global_model.state[k], v, atol=tol, rtol=tol)
