"""Every registered strategy runs from its config alone, on both engines, with the same records.

Each config below is one run of a paper's kind (its federation, its strategy options) shrunk to seconds. Neither
engine is given data: the in-process loop and Flower's ServerApp and ClientApps (through the in-process grid of
tests/test_flower.py, real Flower Messages) each build it from the config (:func:`fedbench.fl.data.build_data`).
"""
import pandas as pd
import pytest
import torch

pytest.importorskip("flwr")

from fedbench.config import ExperimentConfig  # noqa: E402
from fedbench.engines import flower as fl_engine  # noqa: E402
from fedbench.fl import FederatedRun  # noqa: E402
from fedbench.registry import STRATEGIES  # noqa: E402

SHARED = ["round", "clients_sampled", "clients_dropped", "bytes_up", "bytes_down", "cumulative_bytes",
          "train_loss", "local_steps", "accuracy", "loss"]

PLAIN = {"task": "rt_sentiment", "num_clients": 3, "partition": "iid", "max_train_samples": 48,
         "max_test_samples": 24, "max_length": 16}
MULTITASK = {**PLAIN, "federation": "multitask",
             "federation_options": {"tasks": ["rt_sentiment", "sms_spam"], "max_train_per_task": 24,
                                    "val_per_task": 6, "max_test_per_task": 8}}
SEQUENCE = {"task": "ng20", "num_clients": 3, "max_length": 16, "federation": "task_sequence",
            "federation_options": {"num_tasks": 2, "rounds_per_task": 1, "max_train_per_class": 6,
                                   "max_test_per_class": 2}}
LORA = {"method": "lora", "rank": 2, "depth": 1}
LORA_TIERS = {**LORA, "rank": 4}
TIERS = {"ranks": [1, 2, 4], "assignment": "cyclic"}

CONFIGS = {
    "fedavg": {"data": PLAIN, "peft": LORA},
    "ffa_lora": {"data": PLAIN, "peft": LORA},
    "task_clients": {"data": {"task": "rt_sentiment", "num_clients": 2, "max_train_samples": 48, "max_test_samples": 12,
                              "max_length": 16, "federation": "task_clients",
                              "federation_options": {"tasks": ["rt_sentiment", "subjectivity"], "val_samples": 6,
                                                     "probe_samples": 16}},
                     "peft": {**LORA, "train_head": False},
                     "fl": {"lora_aggregation": "stack", "options": {"probe_heads": True, "client_steps": [1, 2]}}},
    "continual": {"data": SEQUENCE, "peft": LORA},
    "lorm": {"data": SEQUENCE, "peft": LORA, "fl": {"options": {"ridge": 1e-3}}},
    "regmean": {"data": SEQUENCE, "peft": LORA, "fl": {"lora_aggregation": "svd"}},
    "fl_tac": {"data": MULTITASK, "peft": LORA, "fl": {"options": {"n_init": 2, "embedding": "pca"}}},
    "fl_tac_oracle": {"data": MULTITASK, "peft": LORA},
    "fl_tac_local": {"data": MULTITASK, "peft": LORA},
    "fedit_tasks": {"data": MULTITASK, "peft": LORA},
    # the federated-LoRA family (fedbench.strategies.lora_family), rank tiers where the method takes them
    "fedit_zero_pad": {"data": PLAIN, "peft": LORA_TIERS, "fl": {"options": TIERS}},
    "fedit_truncate": {"data": PLAIN, "peft": LORA_TIERS, "fl": {"options": TIERS}},
    "fedsa": {"data": PLAIN, "peft": LORA_TIERS, "fl": {"options": TIERS}},
    "fedex_lora": {"data": PLAIN, "peft": LORA_TIERS, "fl": {"options": TIERS}},
    "flexlora": {"data": PLAIN, "peft": LORA_TIERS, "fl": {"options": TIERS}},
    "hetlora": {"data": PLAIN, "peft": LORA_TIERS, "fl": {"options": {**TIERS, "reg": 1.0, "gamma": 0.5}}},
    "rolora": {"data": PLAIN, "peft": LORA},
    "fedsvd": {"data": PLAIN, "peft": LORA_TIERS, "fl": {"options": TIERS}},
    "autofednlp": {"data": PLAIN, "peft": {"method": "adapter", "adapter_width": 4, "depth": 1},
                   "fl": {"rounds": 3, "options": {"width_step": 4, "max_width": 8, "time_threshold": 0.2,
                                                   "validation_samples": 16}}},
}


def config(strategy: str) -> ExperimentConfig:
    c = CONFIGS[strategy]
    return ExperimentConfig.from_dict({
        "name": f"parity-{strategy}", "seed": 1, "data": c["data"], "peft": c["peft"],
        "train": {"local_steps": 2, "batch_size": 8},
        "fl": {"strategy": strategy, "rounds": 2, **c.get("fl", {})}})


def test_every_registered_strategy_is_covered():
    """Every strategy fedbench registers (outside plugins have their own parity tests: tests/test_plugins.py)."""
    own = {e.name for e in STRATEGIES if e.obj.__module__.startswith("fedbench.")}
    assert set(CONFIGS) == own


@pytest.mark.parametrize("strategy", sorted(CONFIGS))
def test_a_run_from_its_config_alone_is_the_same_on_both_engines(strategy):
    from test_flower import LocalGrid
    cfg = config(strategy)
    ref = FederatedRun(cfg)
    for r in range(1, cfg.fl.rounds + 1):
        ref.run_round(r)
    fl_engine.client_runtime(cfg)               # the ClientApp builds its data and model from the config
    run = fl_engine.server_main(LocalGrid(cfg.data.num_clients), cfg)
    assert list(run.global_model.state) == list(ref.global_model.state)
    for k, v in ref.global_model.state.items():
        torch.testing.assert_close(run.global_model.state[k], v, rtol=0, atol=1e-6)
    a, b = pd.DataFrame(ref.records), pd.DataFrame(run.records)
    extra = [c for c in a.columns if c not in SHARED and c in b.columns and c != "wall_s"
             and pd.api.types.is_numeric_dtype(a[c])]
    pd.testing.assert_frame_equal(b[SHARED + extra], a[SHARED + extra], check_exact=False, rtol=1e-5, atol=1e-6)
    if strategy == "fedsa":       # personalised evaluation: an example has one prediction per client, none kept
        assert ref.final_predictions is None and run.final_predictions is None
        return
    assert ref.final_predictions is not None
    assert (run.final_predictions["prediction"] == ref.final_predictions["prediction"]).all()
