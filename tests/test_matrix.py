"""One test matrix over the registries (in the spirit of peft's tuner matrix): every tuner, aggregation rule,
LoRA semantics and strategy, with DP on and off, in-process and on Flower's Message API, on a tiny model.

Each case asserts exact byte accounting (what each instruction sends down and each update sends up), that
only what the strategy declares travels, and determinism (the same config twice gives identical records and
an identical global state). The cases are built from the registries: a new tuner, rule or strategy is in
the matrix as soon as it is registered.
"""
from collections import OrderedDict

import pandas as pd
import pytest
import torch

from fedbench.config import ExperimentConfig
from fedbench.fl import FederatedRun, prepare_data
from fedbench.models import state_nbytes
from fedbench.plugins import load as load_plugins
from fedbench.registry import AGGREGATORS, LORA_SEMANTICS, STRATEGIES, TUNERS

# the outside test plugin (tests/plugins/fedbench_extra: RFA, FedSA-LoRA, SCAFFOLD) is in the matrix like any entry
load_plugins(["fedbench_extra"])

DP = {"enabled": True, "noise_multiplier": 0.7, "max_grad_norm": 1.0, "delta": 1e-5}


def tiny(**changes) -> ExperimentConfig:
    cfg = ExperimentConfig.from_dict({
        "name": "matrix", "seed": 2,
        "data": {"task": "rt_sentiment", "num_clients": 3, "partition": "iid", "max_train_samples": 48,
                 "max_test_samples": 32, "max_length": 16},
        "peft": {"method": "lora", "rank": 2, "depth": 1, "prompt_tokens": 2, "adapter_width": 4},
        "train": {"local_steps": 1, "batch_size": 8, "lr": 0.01},
        "fl": {"rounds": 2, "num_malicious": 0},
    })
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(scope="module")
def data():
    return prepare_data(tiny())


def _depth(method):
    return {"peft.depth": 1 if TUNERS.entry(method).facts.get("takes_depth") else None}


def _lora_strategies():
    return [s for s in STRATEGIES.names() if s != "fedavg"]


def _dp_cases(st):
    """DP on and off, or off alone for a strategy whose training hook is not DP-compatible (its fact)."""
    return (None, DP) if STRATEGIES.entry(st).facts.get("dp_compatible", True) else (None,)


def _strategy(st) -> dict:
    """The strategy and the settings it requires (its registry fact ``requires``, e.g. regmean's semantics)."""
    return {"fl.strategy": st, **STRATEGIES.entry(st).facts.get("requires", {})}


CASES = (
    [pytest.param({"peft.method": m, **_depth(m), "train.dp": dp}, id=f"tuner={m}-dp={'on' if dp else 'off'}")
     for m in TUNERS.names() for dp in (None, DP)]
    + [pytest.param({"peft.method": "head", "peft.depth": None, "fl.aggregator": a, "fl.server_lr": 0.5},
                    id=f"aggregator={a}") for a in AGGREGATORS.names()]
    + [pytest.param({"fl.lora_aggregation": sem}, id=f"lora_semantics={sem}") for sem in LORA_SEMANTICS.names()]
    + [pytest.param({**_strategy(st), "train.dp": dp}, id=f"strategy={st}-dp={'on' if dp else 'off'}")
       for st in _lora_strategies() for dp in _dp_cases(st)]
)


def _changes(case: dict) -> dict:
    out = dict(case)
    if out.get("train.dp") is None:
        out.pop("train.dp", None)
    return out


def run_checked(cfg, data):
    """Two rounds by hand through the loop's own pieces, checking every instruction and update on the way."""
    run = FederatedRun(cfg, data)
    for r in range(1, cfg.fl.rounds + 1):
        plan = run.select_clients(r)
        instructions = run.configure(plan)
        trainable = [k for k in run.global_model.state]
        for c, ins in instructions.items():
            # what travels down is exactly the instruction's tensors, and it is counted exactly
            # (after a stack round the stacked factors travel, not the restarted ones: the global model says so)
            stacked = run.global_model.down_bytes if ins.state is run.global_model.state else None
            sent = state_nbytes(ins.state) if stacked is None else stacked
            assert ins.down_bytes == sent + state_nbytes(ins.extras)
            assert set(ins.state) <= set(trainable)
            # tensors beside the state travel down only for a strategy that declares them
            assert not ins.extras or STRATEGIES.entry(cfg.fl.strategy).facts.get("sends_extras", False)
        updates = []
        for c in plan.reporting:
            u = run.client_update(c, r, instructions[c])
            declared = instructions[c].send_keys
            expected = list(declared) if declared is not None else (
                list(instructions[c].train_keys) if instructions[c].train_keys is not None else trainable)
            assert list(u.state) == expected, "only what the strategy declares travels up"
            assert u.nbytes_up == state_nbytes(u.state) + state_nbytes(u.extras)
            assert all(torch.isfinite(t).all() for t in u.state.values())
            updates.append(u)
        rec = run.finish_round(plan, updates, 0.0, instructions=instructions)
        assert rec["bytes_up"] == sum(u.nbytes_up for u in updates)
        assert rec["bytes_down"] == sum(instructions[int(c)].down_bytes for c in plan.sampled)
        assert 0 <= rec["accuracy"] <= 1
    return run


def _same(a: FederatedRun, b: FederatedRun) -> None:
    ra, rb = pd.DataFrame(a.records).drop(columns="wall_s"), pd.DataFrame(b.records).drop(columns="wall_s")
    pd.testing.assert_frame_equal(ra, rb, check_exact=True)
    assert list(a.global_model.state) == list(b.global_model.state)
    for k, v in a.global_model.state.items():
        assert torch.equal(v, b.global_model.state[k]), k


@pytest.mark.parametrize("case", CASES)
def test_matrix_in_process(case, data):
    cfg = tiny(**_changes(case))
    a = run_checked(cfg, data)
    b = run_checked(cfg, data)
    _same(a, b)
    if cfg.train.dp.enabled:
        assert a.client_epsilons() and all(e > 0 for e in a.client_epsilons().values())


def test_ffa_lora_never_sends_or_changes_a(data):
    run = run_checked(tiny(**{"fl.strategy": "ffa_lora"}), data)
    a_keys = [m.a_key for m in run.strategy.lora.modules]
    init = FederatedRun(tiny(**{"fl.strategy": "ffa_lora"}), data).global_model.state
    for k in a_keys:
        assert torch.equal(run.global_model.state[k], init[k])
    ins = run.configure(run.select_clients(1))
    assert all(k not in i.state for i in ins.values() for k in a_keys)
    fedit = FederatedRun(tiny(), data)
    assert run.records[0]["bytes_up"] < fedit.global_model.nbytes_down() * 3


FLOWER_CASES = [pytest.param({}, id="fedavg"), pytest.param({"train.dp": DP}, id="fedavg-dp"),
                *[pytest.param(_strategy(st), id=st) for st in _lora_strategies()],
                pytest.param({"peft.method": "ia3", "fl.aggregator": "multi_krum"}, id="ia3-multi_krum")]


@pytest.mark.parametrize("case", FLOWER_CASES)
def test_matrix_on_flower_message_api_equals_in_process(case, data):
    pytest.importorskip("flwr")
    from test_flower import LocalGrid

    from fedbench.engines import flower as fl_engine
    cfg = tiny(**case)
    ref = run_checked(cfg, data)
    fl_engine.client_runtime(cfg, data)
    grid = LocalGrid(cfg.data.num_clients)
    run = fl_engine.server_main(grid, cfg, data=data)
    shared = ["round", "clients_sampled", "clients_dropped", "clients_rejected", "bytes_up", "bytes_down",
              "cumulative_bytes", "local_steps"]
    pd.testing.assert_frame_equal(pd.DataFrame(run.records)[shared], pd.DataFrame(ref.records)[shared])
    for k, v in ref.global_model.state.items():
        torch.testing.assert_close(run.global_model.state[k], v, rtol=0, atol=1e-6)


def test_every_registered_name_is_in_the_matrix():
    ids = " ".join(p.id for p in CASES)
    for m in TUNERS.names():
        assert f"tuner={m}-" in ids
    for a in AGGREGATORS.names():
        assert f"aggregator={a}" in ids
    for s in LORA_SEMANTICS.names():
        assert f"lora_semantics={s}" in ids
    for s in _lora_strategies():
        assert f"strategy={s}" in ids


@pytest.mark.parametrize("st", [s for s in STRATEGIES.names() if not STRATEGIES.entry(s).facts.get("dp_compatible", True)])
def test_a_dp_incompatible_strategy_refuses_dp(st):
    from fedbench.config import ConfigError
    with pytest.raises(ConfigError, match="train.dp.enabled"):
        tiny(**{**_strategy(st), "train.dp": DP})


def test_meaningless_combinations_are_config_errors():
    from fedbench.config import ConfigError
    with pytest.raises(ConfigError, match="fl.strategy"):
        tiny(**{"fl.strategy": "ffa_lora", "peft.method": "head", "peft.depth": None})
    with pytest.raises(ConfigError, match="fl.lora_aggregation"):
        tiny(**{"fl.lora_aggregation": "stack", "peft.method": "adapter"})
    with pytest.raises(ConfigError, match="fl.num_malicious"):
        tiny(**{"fl.aggregator": "bulyan", "fl.num_malicious": 1})       # 3 clients < 4f + 3
    with pytest.raises(ConfigError, match="fl.attack_fraction"):
        tiny(**{"fl.attack": "sign_flip"})


def test_an_attacker_sends_what_its_attack_says(data):
    cfg = tiny(**{"peft.method": "head", "peft.depth": None, "fl.attack": "sign_flip", "fl.attack_fraction": 0.34})
    run = FederatedRun(cfg, data)
    (attacker,) = run.attackers
    ins = run.configure(run.select_clients(1))[attacker]
    honest = FederatedRun(tiny(**{"peft.method": "head", "peft.depth": None}), data)
    h = honest.client_update(attacker, 1, honest.configure(honest.select_clients(1))[attacker])
    u = run.client_update(attacker, 1, ins)
    for k in u.state:
        torch.testing.assert_close(u.state[k], 2 * ins.state[k] - h.state[k], rtol=0, atol=1e-6)


def test_nan_updates_are_rejected_counted_and_leave_the_model_unchanged(data):
    cfg = tiny(**{"peft.method": "head", "peft.depth": None, "fl.attack": "nan", "fl.attack_fraction": 1.0})
    run = FederatedRun(cfg, data)
    before = OrderedDict((k, v.clone()) for k, v in run.global_model.state.items())
    rec = run.run_round(1)
    assert rec["clients_rejected"] == 3 and len(run.rejections) == 3
    assert all(r["reason"] == "non-finite values" for r in run.rejections)
    for k, v in before.items():
        assert torch.equal(run.global_model.state[k], v)
    one = FederatedRun(tiny(**{"peft.method": "head", "peft.depth": None, "fl.attack": "nan",
                               "fl.attack_fraction": 0.34}), data)
    rec = one.run_round(1)
    assert rec["clients_rejected"] == 1 and all(torch.isfinite(v).all() for v in one.global_model.state.values())


def test_update_norm_bound_rejects_large_updates(data):
    cfg = tiny(**{"peft.method": "head", "peft.depth": None, "fl.max_update_norm": 1e-9})
    run = FederatedRun(cfg, data)
    rec = run.run_round(1)
    assert rec["clients_rejected"] == 3 and "fl.max_update_norm" in run.rejections[0]["reason"]


def test_a_robust_rule_left_with_too_few_updates_skips_the_round(data):
    """The config checks the cohort; dropout or the guard can still thin a round below the rule's 2f + 3."""
    cfg = tiny(**{"peft.method": "head", "peft.depth": None, "fl.aggregator": "krum", "fl.num_malicious": 0,
                  "fl.attack": "nan", "fl.attack_fraction": 0.34})
    run = FederatedRun(cfg, data)
    before = OrderedDict((k, v.clone()) for k, v in run.global_model.state.items())
    rec = run.run_round(1)                         # 3 sampled, 1 rejected: 2 < 2 * 0 + 3
    assert rec["clients_rejected"] == 1
    assert all(torch.equal(run.global_model.state[k], v) for k, v in before.items())
