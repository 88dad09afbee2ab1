"""The Flower engine against the in-process loop.

Two paths: the Message API path alone (fedbench's ServerApp strategy and ClientApp exchanging real Flower
Messages through a minimal in-process grid; fast, no Ray), and Flower's Simulation Runtime with the Ray
backend, end to end. Both must give the in-process loop's global parameters and per-round records.
"""
import json
import uuid
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402

from fedbench.config import ConfigError, ExperimentConfig  # noqa: E402
from fedbench.engines import flower as fl_engine  # noqa: E402
from fedbench.fl import FederatedRun, prepare_data  # noqa: E402
from fedbench.models import state_nbytes  # noqa: E402
from fedbench.results import run_key  # noqa: E402

SHARED = ["round", "clients_sampled", "clients_dropped", "bytes_up", "bytes_down", "cumulative_bytes",
          "train_loss", "local_steps", "accuracy", "loss"]


def small_cfg(**changes) -> ExperimentConfig:
    cfg = ExperimentConfig.from_dict({
        "name": "flower-eq", "seed": 3,
        "data": {"task": "rt_sentiment", "num_clients": 4, "partition": "iid", "max_train_samples": 96,
                 "max_test_samples": 64, "max_length": 32},
        "peft": {"method": "lora", "rank": 4, "depth": 2},
        "train": {"local_steps": 2, "batch_size": 16},
        "fl": {"rounds": 2, "clients_per_round": 3, "aggregator": "fedavg"},
    })
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(scope="module")
def data():
    return prepare_data(small_cfg())


_REFERENCE: dict = {}


def in_process(cfg, data) -> FederatedRun:
    """The in-process loop's run of `cfg` (computed once per config)."""
    if cfg.hash() not in _REFERENCE:
        run = FederatedRun(cfg, data)
        for r in range(1, cfg.fl.rounds + 1):
            run.run_round(r)
        _REFERENCE[cfg.hash()] = run
    return _REFERENCE[cfg.hash()]


def assert_same_run(a: FederatedRun, b: FederatedRun, atol: float) -> None:
    assert list(a.global_model.state) == list(b.global_model.state)
    for k in a.global_model.state:
        torch.testing.assert_close(b.global_model.state[k], a.global_model.state[k], rtol=0, atol=atol)
    assert set(a.global_model.base_delta) == set(b.global_model.base_delta)
    for k in a.global_model.base_delta:
        torch.testing.assert_close(b.global_model.base_delta[k], a.global_model.base_delta[k], rtol=0, atol=atol)
    ra, rb = pd.DataFrame(a.records), pd.DataFrame(b.records)
    cols = SHARED + [c for c in ra.columns if c.startswith("dp_")]
    pd.testing.assert_frame_equal(rb[cols], ra[cols], check_exact=False, rtol=1e-5, atol=atol)


# ---------------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------------
def test_state_round_trips_through_an_array_record_exactly():
    g = torch.Generator().manual_seed(0)
    state = OrderedDict([("z.lora_A", torch.randn(4, 8, generator=g)), ("a.bias", torch.randn(3, generator=g)),
                         ("m.weight", torch.randn(2, 2, generator=g))])
    rec = fl_engine.state_to_record(state)
    back = fl_engine.record_to_state(rec)
    assert list(back) == list(state)                     # order kept (aggregation sums in this order)
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])
    back["a.bias"] += 1                                  # a writable copy, not a view of the message
    assert torch.equal(fl_engine.record_to_state(rec)["a.bias"], state["a.bias"])
    # what travels: the payload plus numpy headers and key names
    assert rec.count_bytes() > state_nbytes(state)
    assert rec.count_bytes() - state_nbytes(state) < 200 * len(state)


def test_busy_time_is_the_length_of_the_union_of_intervals():
    rng = np.random.default_rng(0)
    starts = rng.uniform(0, 10, 8)
    intervals = [(s, s + d) for s, d in zip(starts, rng.uniform(0, 3, 8))]
    grid = np.linspace(0, 14, 140001)
    covered = np.zeros_like(grid, dtype=bool)
    for s, e in intervals:
        covered |= (grid >= s) & (grid < e)
    assert fl_engine.busy_time(intervals) == pytest.approx(covered.mean() * 14, abs=1e-3)
    assert fl_engine.busy_time([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)
    assert fl_engine.busy_time([]) == 0.0


def test_config_from_run_config(tmp_path):
    path = tmp_path / "c.yaml"
    small_cfg().save(path)
    cfg = fl_engine.config_from_run_config({"config": str(path), "results": "", "fl.rounds": 7,
                                            "peft.target_modules": "query, key,value"})
    assert cfg.fl.rounds == 7 and tuple(cfg.peft.target_modules) == ("query", "key", "value")
    assert cfg.data.num_clients == 4
    assert fl_engine.config_from_run_config({}) == ExperimentConfig()
    with pytest.raises(ConfigError, match="fl.roundz"):
        fl_engine.config_from_run_config({"fl.roundz": 3})
    with pytest.raises(ConfigError, match="fl.rounds"):
        fl_engine.config_from_run_config({"fl.rounds": 0})


def test_run_key_separates_engines_and_configs():
    cfg = small_cfg()
    assert run_key(cfg, "flower") != run_key(cfg, "inprocess")
    assert run_key(cfg, "flower") == run_key(small_cfg(), "flower")
    assert run_key(cfg, "flower") != run_key(cfg.replace(seed=4), "flower")


# ---------------------------------------------------------------------------------------------------
# the Message API path without Ray: ServerApp strategy <-> ClientApp through a minimal grid
# ---------------------------------------------------------------------------------------------------
class LocalGrid:
    """Delivers each Message to `client_app` of its destination node, in this process (what a SuperLink
    and SuperNodes do, minus the network); each node keeps its own Context across rounds."""

    def __init__(self, num_nodes: int, partition_of=None):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity
        # who sends: set per process by Flower's runtimes (a ServerApp task on the SuperLink)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.nodes = [1000 + 7 * i for i in range(num_nodes)]
        partition_of = partition_of or (lambda i: i)
        self.contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={},
                                    node_config={"partition-id": partition_of(i), "num-partitions": num_nodes})
                         for i, n in enumerate(self.nodes)}
        self.sent = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex      # what a grid's push does
            self.sent.append(msg.metadata.message_type)
            try:
                replies.append(fl_engine.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as e:          # a SuperNode turns a ClientApp's exception into an error reply
                replies.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg))
        return replies[::-1]            # replies come back in any order


@pytest.mark.parametrize("changes", [
    {},
    {"fl.lora_aggregation": "stack", "fl.dropout": 0.3, "fl.rounds": 3},
], ids=["fedavg", "stack+dropout"])
def test_message_path_equals_in_process(data, changes):
    cfg = small_cfg(**changes)
    ref = in_process(cfg, data)
    fl_engine.client_runtime(cfg, data)          # the ClientApp's data: the same, without a reload
    grid = LocalGrid(cfg.data.num_clients)
    run = fl_engine.server_main(grid, cfg, data=data)
    assert_same_run(ref, run, atol=1e-6)
    assert grid.sent.count("query") == cfg.data.num_clients
    assert grid.sent.count("train") == sum(r["clients_sampled"] - r["clients_dropped"] for r in ref.records)
    rounds = pd.DataFrame(run.records)
    assert (rounds["wire_bytes_up"] >= rounds["bytes_up"]).all()
    assert (rounds["client_busy_s"] > 0).all() and (rounds["server_s"] > 0).all()


def test_message_path_with_dp_keeps_each_clients_ledger_on_its_node(data):
    cfg = small_cfg(**{"train.dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
                       "fl.clients_per_round": 4})
    ref = in_process(cfg, data)
    fl_engine.client_runtime(cfg, data)          # the ClientApp's data: the same, without a reload
    grid = LocalGrid(cfg.data.num_clients)
    run = fl_engine.server_main(grid, cfg, data=data)
    assert_same_run(ref, run, atol=1e-6)
    assert run.client_epsilons() == pytest.approx(ref.client_epsilons())
    # each node keeps its client's store (the DP ledger inside) as tensors + JSON: no pickle
    assert all(fl_engine.STORE_META in ctx.state for ctx in grid.contexts.values())
    for ctx in grid.contexts.values():
        meta = json.loads(ctx.state[fl_engine.STORE_META]["json"])
        (client,) = meta                       # one client per node: its own store only
        assert meta[client]["dp"]["epsilon"] > 0


def test_nodes_are_matched_to_clients_by_partition_id(data):
    cfg = small_cfg(**{"fl.aggregator": "trimmed_mean", "fl.clients_per_round": 4, "train.optimizer": "sgd",
                       "train.lr": 0.05})
    # node i holds partition (i + 1) % 4: client k's messages must go to the node holding partition k
    fl_engine.client_runtime(cfg, data)
    grid = LocalGrid(4, partition_of=lambda i: (i + 1) % 4)
    node_of = fl_engine.map_clients_to_nodes(grid, grid.get_node_ids(), 4, timeout=5)
    assert {k: grid.contexts[n].node_config["partition-id"] for k, n in node_of.items()} == {k: k for k in range(4)}
    assert_same_run(in_process(cfg, data), fl_engine.server_main(grid, cfg, data=data), atol=1e-6)
    with pytest.raises(RuntimeError, match="partition-id=K num-partitions=5"):
        fl_engine.map_clients_to_nodes(grid, grid.get_node_ids(), 5, timeout=5)
    with pytest.raises(RuntimeError, match="only 4 SuperNodes"):
        fl_engine.wait_for_nodes(grid, 5, timeout=0.2)


def test_a_client_error_fails_the_round_unless_failures_are_allowed(data, monkeypatch):
    cfg = small_cfg(**{"fl.rounds": 1})
    real = FederatedRun.client_update

    def flaky(self, client_id, round_idx, *args, **kwargs):
        if client_id == 2:
            raise RuntimeError("disk on fire")
        return real(self, client_id, round_idx, *args, **kwargs)

    monkeypatch.setattr(FederatedRun, "client_update", flaky)
    fl_engine.client_runtime(cfg, data)
    with pytest.raises(RuntimeError, match="disk on fire"):
        fl_engine.server_main(LocalGrid(4), cfg, data=data)
    sampled = FederatedRun(cfg, data).select_clients(1).reporting
    run = fl_engine.server_main(LocalGrid(4), cfg, data=data, allow_failures=True)
    assert run.records[0]["clients_dropped"] == int(2 in sampled)
    fl_engine._RUNTIME.clear()


# ---------------------------------------------------------------------------------------------------
# Flower's Simulation Runtime with the Ray backend, end to end
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_simulation_equals_in_process(data, tmp_path, monkeypatch):
    cfg = small_cfg()
    ref = in_process(cfg, data)
    runs = []
    real = fl_engine.simulate
    monkeypatch.setattr(fl_engine, "simulate", lambda *a, **k: runs.append(real(*a, **k)) or runs[-1])
    result = fl_engine.run_flower_cached(cfg, data=data, root=tmp_path)
    assert len(runs) == 1
    assert_same_run(ref, runs[0], atol=1e-6)
    assert result.summary["engine"] == "flower"
    assert result.summary["final_accuracy"] == pytest.approx(ref.result().summary["final_accuracy"])
    assert (result.rounds["wire_bytes_down"] >= result.rounds["bytes_down"]).all()
    assert (tmp_path / run_key(cfg, "flower") / "summary.json").exists()
    again = fl_engine.run_flower_cached(cfg, data=data, root=tmp_path)      # loaded from disk, not rerun
    assert len(runs) == 1 and again.summary["final_accuracy"] == result.summary["final_accuracy"]
