"""fedbench on Flower: a ClientApp and a ServerApp built from an experiment config.

The same experiment as the in-process loop (:class:`fedbench.fl.FederatedRun`), on Flower's Message API
(flwr 1.41):

- **ClientApp** (:data:`client_app`). A ``train`` message carries the strategy's
  :class:`~fedbench.fl.strategy.ClientInstruction` for that client: the tensors that travel down (an
  ``ArrayRecord``), the dense base updates of LoRA stack semantics (a second ``ArrayRecord``, empty
  otherwise), the instruction's ``extras`` (a third ``ArrayRecord``, when the strategy sends any) and a
  ``ConfigRecord`` with the experiment config (JSON) and the instruction's header (client
  id, round, which keys train and travel, local steps, options). The client builds the experiment's run
  from the config (once per process; the config's ``plugins`` are imported before it validates), and
  calls :meth:`FederatedRun.client_update`, i.e. the strategy's client side with the loop's seed for (round,
  client). The client's store (its DP ledger, any private
  state a strategy keeps) lives on its node in ``context.state`` between rounds, as an ``ArrayRecord`` of
  tensors and a JSON string (no pickle). The reply carries the sent state and the update's tensor extras
  (``ArrayRecord``\\ s) and ``MetricRecord``\\ s (examples, steps, loss, epsilon spent, timing).
- **ServerApp** (:func:`make_server_app`, :func:`server_main`) with :class:`FedbenchStrategy`, a
  ``flwr.serverapp.strategy.Strategy``. Each round it asks :meth:`FederatedRun.select_clients` which clients
  take part (the same seeded sampling and dropout as the in-process loop) and the fedbench strategy
  (``fl.strategy``) what to send each, sends one message to the SuperNode of each reporting client, and
  hands the replies, in client order, to :meth:`FederatedRun.finish_round`: the update guard, the
  strategy's aggregate (any registered rule and LoRA semantics), central evaluation, and
  the same per-round row (accuracy, loss, bytes up/down by fedbench's accounting, clients, steps, DP). Flower's
  rows add what Flower really moved (``wire_bytes_up/down``: the serialized arrays, numpy headers and
  keys included), ``client_busy_s`` (time in the round when at least one client was training),
  ``client_train_s`` (the clients' training times, summed) and ``server_s`` (aggregation + evaluation).

Client ids and SuperNodes: client ``k`` is the SuperNode whose node config has ``partition-id = k``
(the Simulation Runtime numbers its nodes so; on real machines start each SuperNode with
``--node-config "partition-id=k num-partitions=N"``). The ServerApp asks every node for its partition id
once (a ``query`` message) and then addresses client ``k``'s messages to that node, so a node only ever
trains its own shard and keeps its own DP ledger. Every node computes the same seeded partition of the
task and trains on its row of it.

Running: :func:`run_flower` / :func:`run_flower_cached` (``fedbench run CONFIG --engine flower``) run the
Simulation Runtime with the Ray backend in this process: the ServerApp in a thread, one SuperNode per
client, ClientApps in Ray actors (``num_cpus=1`` each by default, so a 2-core machine trains 2 clients at a
time). :mod:`fedbench.engines.flower_app` holds the module-level apps that ``flwr run`` loads (see
``examples/flower/`` and the README's "Scaling out with Flower").

Determinism: both engines draw sampling, dropout, client seeds and initialisation from
:func:`fedbench.fl.seeding.derive_seed` and aggregate the updates in client order, so their global
parameters agree to floating-point round-off (the clients run in other processes, with other thread
counts); see tests/test_flower.py.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable

# Flower reads these when it is imported: no telemetry calls from a benchmark, no Ray warning about GPUs.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy as FlowerStrategy
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("fedbench's Flower engine needs the optional extra: pip install 'fedbench[flower]'") from e

import numpy as np
import torch

from fedbench.config import ConfigError, ExperimentConfig
from fedbench.fl.client import ClientUpdate
from fedbench.fl.data import FederatedData
from fedbench.fl.server import FederatedRun, RoundPlan
from fedbench.fl.store import ClientStore
from fedbench.fl.strategy import ClientInstruction, GlobalModel
from fedbench.results import RunResult

log = logging.getLogger("fedbench.engines.flower")

# record names inside a Message's RecordDict
GLOBAL_STATE, BASE_DELTA, TASK, UPDATE, EXTRAS, TRAIN_INFO, CLIENT_METRICS, NODE_INFO = (
    "global-state", "base-delta", "fedbench-task", "update", "extras", "train-info", "client-metrics", "node-info")
EXTRAS_DOWN = "extras-down"      # an instruction's tensors besides the state (ClientInstruction.extras)
# the node's client store in context.state: its tensors and its JSON rest
STORE_TENSORS, STORE_META = "fedbench-store-tensors", "fedbench-store-meta"
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"

DEFAULT_CLIENT_RESOURCES = {"num_cpus": 1, "num_gpus": 0.0}


# ------------------------------------------------------------------------------------------------
# tensors <-> records
# ------------------------------------------------------------------------------------------------
def state_to_record(state: dict) -> ArrayRecord:
    """A trainable state (or base delta) as an ArrayRecord, keys and order kept."""
    return ArrayRecord.from_torch_state_dict({k: v.detach().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, torch.from_numpy(np.array(a.numpy(), copy=True))) for k, a in record.items())


def _metric_values(d: dict) -> dict:
    """The entries of `d` a MetricRecord can carry: ints and floats (bools as 0/1, numpy scalars unwrapped)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)):
            out[k] = v
    return out


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (seconds at least one client was training)."""
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


# ------------------------------------------------------------------------------------------------
# ClientApp
# ------------------------------------------------------------------------------------------------
_RUNTIME: dict = {}
_RUNTIME_LOCK = threading.Lock()


def client_runtime(cfg: ExperimentConfig, data: FederatedData | None = None) -> FederatedRun:
    """This process's data + model for `cfg`, built once (a Ray actor serves many clients in turn) from
    `data` if given, else from :func:`fedbench.fl.prepare_data`. Holds one config at a time."""
    key = cfg.hash()
    with _RUNTIME_LOCK:
        if _RUNTIME.get("key") != key:
            _RUNTIME.clear()
            _RUNTIME.update(key=key, run=FederatedRun(cfg, data))
        return _RUNTIME["run"]


def _node_partition(context: Context) -> int | None:
    pid = context.node_config.get(PARTITION_ID)
    return None if pid is None else int(pid)


client_app = ClientApp()


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    """Which client (partition) this SuperNode is."""
    pid = _node_partition(context)
    info = {PARTITION_ID: -1 if pid is None else pid,
            NUM_PARTITIONS: int(context.node_config.get(NUM_PARTITIONS, -1))}
    return Message(RecordDict({NODE_INFO: MetricRecord(info)}), reply_to=msg)


def _node_store(context: Context) -> ClientStore:
    """The client store this node keeps in its context (tensors + JSON)."""
    tensors = record_to_state(context.state[STORE_TENSORS]) if STORE_TENSORS in context.state else {}
    meta = json.loads(context.state[STORE_META]["json"]) if STORE_META in context.state else {}
    return ClientStore.from_payload(tensors, meta)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    """Client-side evaluation of a personalised strategy: the client scores the model it keeps (its store)."""
    task = msg.content[TASK]
    cfg = ExperimentConfig.from_dict(json.loads(task["config"]))
    client_id = int(task["client-id"])
    pid = _node_partition(context)
    if pid is not None and pid != client_id:
        raise RuntimeError(f"SuperNode with partition-id={pid} was asked to evaluate client {client_id}")
    run = client_runtime(cfg)
    gm = GlobalModel(record_to_state(msg.content[GLOBAL_STATE]), dict(record_to_state(msg.content[BASE_DELTA])))
    scores = run.strategy.client_evaluate(run, client_id, gm, _node_store(context)[client_id])
    info = {"client-id": client_id, **{k: scores[k] for k in ("accuracy", "loss", "n")}}
    return Message(RecordDict({TRAIN_INFO: MetricRecord(_metric_values(info))}), reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    """One client's local training, as its strategy instruction says."""
    task = msg.content[TASK]
    cfg = ExperimentConfig.from_dict(json.loads(task["config"]))
    header = json.loads(task["instruction"])
    client_id, round_idx = int(header["client_id"]), int(header["round_idx"])
    pid = _node_partition(context)
    if pid is not None and pid != client_id:
        raise RuntimeError(f"SuperNode with partition-id={pid} was asked to train client {client_id}")
    run = client_runtime(cfg)
    extras = record_to_state(msg.content[EXTRAS_DOWN]) if EXTRAS_DOWN in msg.content else {}
    ins = ClientInstruction.from_header(header, record_to_state(msg.content[GLOBAL_STATE]),
                                        dict(record_to_state(msg.content[BASE_DELTA])), extras=dict(extras))
    # the client's store: what this node keeps between its rounds (never sent to the server)
    store = _node_store(context)
    t_start = time.time()
    update = run.client_update(client_id, round_idx, ins, store=store[client_id])
    t_end = time.time()
    tensors, meta = store.to_payload()
    context.state[STORE_TENSORS] = state_to_record(tensors)
    context.state[STORE_META] = ConfigRecord({"json": json.dumps(meta)})
    info = {"client-id": client_id, "num-examples": int(update.num_samples), "num-steps": int(update.num_steps),
            "train-loss": float(update.train_loss), "wall-s": float(update.wall_s),
            "t-start": t_start, "t-end": t_end}
    ledger = store[client_id].get("dp", {})
    if "epsilon" in ledger:
        info["dp-epsilon-spent"] = float(ledger["epsilon"])
    content = RecordDict({UPDATE: state_to_record(update.state), EXTRAS: state_to_record(update.extras),
                          TRAIN_INFO: MetricRecord(info), CLIENT_METRICS: MetricRecord(_metric_values(update.metrics))})
    return Message(content, reply_to=msg)


# ------------------------------------------------------------------------------------------------
# ServerApp
# ------------------------------------------------------------------------------------------------
class FedbenchStrategy(FlowerStrategy):
    """A Flower strategy whose every decision is fedbench's: :meth:`FederatedRun.select_clients` picks the
    round's clients, :meth:`FederatedRun.finish_round` aggregates (fedbench's aggregators), evaluates and
    records. Evaluation is central (on the server's test set), as in the in-process loop, so Flower's own
    evaluate step sends nothing; a personalised strategy's client-side evaluation
    (:meth:`FederatedRun.evaluate_clients`) asks every client's node during the round (:meth:`evaluate_on_nodes`),
    where the client's store is."""

    def __init__(self, run: FederatedRun, node_of: dict[int, int], progress: bool = False,
                 allow_failures: bool = False):
        self.run, self.node_of, self.allow_failures = run, node_of, allow_failures
        self._config_json = run.cfg.to_json()
        self._plan: RoundPlan | None = None
        self._instructions: dict[int, ClientInstruction] = {}
        self._t0 = 0.0
        self._wire_down = 0
        self._grid: Grid | None = None
        run.client_evaluator = self.evaluate_on_nodes      # a personalised strategy's clients score on their nodes
        self._bar = None
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=run.cfg.fl.rounds, desc=f"{run.cfg.name} [{run.cfg.peft.method}, flower]",
                             unit="round")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.run.stopped:      # the fedbench strategy ended the run: Flower's remaining rounds send nothing
            return []
        self._t0 = time.perf_counter()
        self._grid = grid
        self._plan = self.run.select_clients(server_round)
        self._instructions = self.run.configure(self._plan)       # the fedbench strategy's, per client
        messages, self._wire_down = [], 0
        for c in self._plan.reporting:
            ins = self._instructions[c]
            state, base = state_to_record(ins.state), state_to_record(ins.base_delta)
            self._wire_down += state.count_bytes() + base.count_bytes()
            task = ConfigRecord({"config": self._config_json, "instruction": json.dumps(ins.header())})
            content = {GLOBAL_STATE: state, BASE_DELTA: base, TASK: task}
            if ins.extras:
                content[EXTRAS_DOWN] = state_to_record(ins.extras)
                self._wire_down += content[EXTRAS_DOWN].count_bytes()
            messages.append(Message(RecordDict(content),
                                    dst_node_id=self.node_of[c], message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies):
        if self.run.stopped and server_round > self.run.rounds_done:
            return None, None
        plan = self._plan
        updates, errors, intervals, wire_up = [], [], [], 0
        for m in replies:
            if m.has_error():
                errors.append(m.error.reason)
                continue
            info = m.content[TRAIN_INFO]
            rec = m.content[UPDATE]
            wire_up += rec.count_bytes()
            c = int(info["client-id"])
            extras = m.content[EXTRAS]
            wire_up += extras.count_bytes()
            updates.append(ClientUpdate(
                client_id=c, state=record_to_state(rec), num_samples=int(info["num-examples"]),
                num_steps=int(info["num-steps"]), train_loss=float(info["train-loss"]), wall_s=float(info["wall-s"]),
                metrics=dict(m.content[CLIENT_METRICS]), extras=dict(record_to_state(extras))))
            intervals.append((float(info["t-start"]), float(info["t-end"])))
            if "dp-epsilon-spent" in info:     # the server's view of each client's spent budget
                self.run.store[c].setdefault("dp", {})["epsilon"] = float(info["dp-epsilon-spent"])
        failed = len(plan.reporting) - len(updates)
        if failed and not self.allow_failures:
            raise RuntimeError(f"round {server_round}: {failed} of {len(plan.reporting)} clients did not report"
                               + (f"; client errors: {errors}" if errors else " (timeout)"))
        updates.sort(key=lambda u: u.client_id)        # the in-process loop's order: same float sums
        t_server = time.perf_counter()
        rec = self.run.finish_round(plan, updates, self._t0, failed=failed, instructions=self._instructions)
        rec.update(wire_bytes_up=wire_up, wire_bytes_down=self._wire_down, client_busy_s=busy_time(intervals),
                   client_train_s=float(sum(u.wall_s for u in updates)), server_s=time.perf_counter() - t_server)
        if self._bar is not None:
            self._bar.update(1)
            if rec["accuracy"] == rec["accuracy"]:
                self._bar.set_postfix(acc=f"{rec['accuracy']:.3f}")
            if server_round == self.run.cfg.fl.rounds or self.run.stopped:
                self._bar.close()
        return state_to_record(self.run.global_model.state), MetricRecord(_metric_values(rec))

    def evaluate_on_nodes(self, clients: list[int], global_model) -> dict[int, dict]:
        """{client: scores} from each client's node (``evaluate`` messages), where its store is: what
        :meth:`FederatedRun.evaluate_clients` computes in-process."""
        state, base = state_to_record(global_model.state), state_to_record(global_model.base_delta)
        messages = [Message(RecordDict({GLOBAL_STATE: state, BASE_DELTA: base,
                                        TASK: ConfigRecord({"config": self._config_json, "client-id": int(c)})}),
                            dst_node_id=self.node_of[c], message_type=MessageType.EVALUATE) for c in clients]
        scores = {}
        for m in self._grid.send_and_receive(messages, timeout=3600.0):
            if m.has_error():
                raise RuntimeError(f"client-side evaluation failed: {m.error.reason}")
            info = m.content[TRAIN_INFO]
            scores[int(info["client-id"])] = {"accuracy": float(info["accuracy"]), "loss": float(info["loss"]),
                                              "n": int(info["n"])}
        missing = sorted(set(clients) - set(scores))
        if missing:
            raise RuntimeError(f"client-side evaluation: no score from clients {missing}")
        return scores

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return []                # central evaluation happens in finish_round

    def aggregate_evaluate(self, server_round: int, replies):
        return None

    def summary(self) -> None:
        fl = self.run.cfg.fl
        log.info("fedbench strategy=%s: aggregator=%s, lora_aggregation=%s, clients_per_round=%s, dropout=%s",
                 fl.strategy, fl.aggregator, fl.lora_aggregation, fl.clients_per_round, fl.dropout)


def wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    """The connected SuperNodes' ids, once at least `n` have connected."""
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.time() > deadline:
            raise RuntimeError(f"only {len(nodes)} SuperNodes connected within {timeout:.0f} s; the experiment has "
                               f"data.num_clients={n} clients and needs one SuperNode per client")
        time.sleep(0.1)


def map_clients_to_nodes(grid: Grid, nodes: list[int], num_clients: int, timeout: float) -> dict[int, int]:
    """{client id: node id}, from each node's ``partition-id`` (one ``query`` message per node)."""
    queries = [Message(RecordDict({TASK: ConfigRecord({"ask": PARTITION_ID})}), dst_node_id=n,
                       message_type=MessageType.QUERY) for n in nodes]
    node_of: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"SuperNode {reply.metadata.src_node_id} failed to report its partition-id: "
                               f"{reply.error.reason}")
        pid = int(reply.content[NODE_INFO][PARTITION_ID])
        if pid in node_of:
            raise RuntimeError(f"two SuperNodes have partition-id={pid}")
        if pid >= 0:
            node_of[pid] = int(reply.metadata.src_node_id)
    missing = sorted(set(range(num_clients)) - set(node_of))
    if missing:
        raise RuntimeError(f"no SuperNode has partition-id in {missing[:10]}{'...' if len(missing) > 10 else ''}: "
                           f"start one SuperNode per client with --node-config \"partition-id=K "
                           f"num-partitions={num_clients}\" for K = 0..{num_clients - 1}")
    return node_of


def check_engine_config(cfg: ExperimentConfig) -> None:
    """ConfigError for what the Flower engine does not do: batched clients (each ClientApp trains one client on
    its node; ``fl.client_batching`` is the in-process engine's)."""
    if cfg.fl.client_batching:
        from fedbench.errors import ConfigError
        raise ConfigError("fl.client_batching", True, "false on the Flower engine (batched clients are the "
                          "in-process engine's; each ClientApp trains one client)")


def server_main(grid: Grid, cfg: ExperimentConfig, data: FederatedData | None = None, progress: bool = False,
                allow_failures: bool = False, round_timeout: float = 3600.0,
                node_timeout: float = 600.0) -> FederatedRun:
    """The ServerApp's work: find the clients' nodes, run `cfg.fl.rounds` rounds, return the server's run
    (its ``global_model``, ``records`` and ``result()``)."""
    check_engine_config(cfg)
    nodes = wait_for_nodes(grid, cfg.data.num_clients, node_timeout)
    node_of = map_clients_to_nodes(grid, nodes, cfg.data.num_clients, node_timeout)
    run = FederatedRun(cfg, data)
    strategy = FedbenchStrategy(run, node_of, progress=progress, allow_failures=allow_failures)
    strategy.start(grid, initial_arrays=state_to_record(run.global_model.state), num_rounds=cfg.fl.rounds,
                   timeout=round_timeout)
    return run


def make_server_app(cfg: ExperimentConfig, data: FederatedData | None = None, sink=None, **options) -> ServerApp:
    """A ServerApp that runs `cfg` and passes the server's :class:`FederatedRun` to ``sink(run)``."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run = server_main(grid, cfg, data=data, **options)
        if sink is not None:
            sink(run)

    return app


def config_from_run_config(run_config: dict) -> ExperimentConfig:
    """An ExperimentConfig from a Flower run config (``[tool.flwr.app.config]`` + ``--run-config``).

    ``config`` names a fedbench YAML/JSON config (absolute, or relative to the working directory; empty =
    fedbench's defaults); every other dotted key that names a config field (``fl.rounds``,
    ``peft.rank``, ...) overrides it; a list field takes a comma-separated string. ``results`` (the results
    root) is not a config field; ``plugins`` (comma-separated modules) is imported first and added to the config's.
    """
    rc = dict(run_config)
    path = str(rc.pop("config", "") or "")
    rc.pop("results", None)
    # plugins (a comma-separated string of modules) are imported before the config names their components
    plugins = rc.pop("plugins", "")
    plugins = [p.strip() for p in plugins.split(",") if p.strip()] if isinstance(plugins, str) else list(plugins)
    from fedbench.plugins import load as load_plugins
    load_plugins(plugins)
    cfg = ExperimentConfig.load(path) if path else ExperimentConfig()
    if not rc and not plugins:
        return cfg
    flat = _flatten(cfg.to_dict())
    changes = {"plugins": list(dict.fromkeys([*cfg.plugins, *plugins]))} if plugins else {}
    for key, value in rc.items():
        if key not in flat:
            raise ConfigError(key, value, "a fedbench config field (dotted path, e.g. fl.rounds), 'config' "
                                          "or 'results'")
        if isinstance(flat[key], list) and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        changes[key] = value
    return cfg.replace(**changes)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------------
# Simulation Runtime (Ray) in this process
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def patch_ray_start() -> "Callable[[], None] | None":
    """Make Ray start on a busy machine; returns the undo function (None: nothing patched).

    Ray 2.55's raylet waits a hard-coded 15 s for the dashboard agent to write its port files and aborts
    ("Timed out waiting for file .../metrics_agent_port", then "The current node timed out during
    startup") when the agent's imports take longer, as they do on a loaded 2-core machine. With the ports
    given up front it does not wait. ``ray.init`` has no arguments for these ports, so they are filled into
    its RayParams, and the raylet, which ``ray.init`` does not pass the dashboard agent's listen port, gets
    that one from the agent's own command line. The runtime-env agent also gets 120 s instead of 30 s to
    come up (``RAY_agent_register_timeout_ms``; an environment value wins). Set FEDBENCH_RAY_FIXED_PORTS=0
    to leave Ray alone.
    """
    if os.environ.get("FEDBENCH_RAY_FIXED_PORTS", "1") == "0":
        return None
    try:
        from ray._private import parameter, services
        orig_init, orig_start = parameter.RayParams.__init__, services.start_ray_process
    except (ImportError, AttributeError):   # another Ray: use its own start-up
        return None
    if getattr(orig_init, "_fedbench_patch", False):
        return None
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")

    def init(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        for name in ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port",
                     "runtime_env_agent_port"):
            if hasattr(self, name) and not getattr(self, name):
                setattr(self, name, _free_port())

    def start(command, process_type, *args, **kwargs):
        if process_type == "raylet" and not any(c.startswith("--dashboard_agent_listen_port") for c in command):
            ports = [m.group(1) for c in command for m in [re.search(r"--listen-port=(\d+)", c)] if m]
            if ports:
                command = [*command, f"--dashboard_agent_listen_port={ports[0]}"]
        return orig_start(command, process_type, *args, **kwargs)

    init._fedbench_patch = True
    parameter.RayParams.__init__, services.start_ray_process = init, start

    def undo() -> None:
        parameter.RayParams.__init__, services.start_ray_process = orig_init, orig_start

    return undo


def start_ray(init_args: dict | None = None) -> None:
    """Start a local Ray for the Simulation Runtime (Flower's RayBackend then uses it and shuts it down),
    with :func:`patch_ray_start`'s fixes for a busy machine."""
    import ray
    if ray.is_initialized():
        return
    args = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False,
            "object_store_memory": 256 * 2**20, **(init_args or {})}
    # Ray's processes inherit this process's environment: with this process's import path in PYTHONPATH
    # (what Flower's RayBackend does), the ClientApp actors import fedbench even from a source checkout
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*sys.path, *([old_path] if old_path else [])])
    undo = patch_ray_start()
    try:
        ray.init(**args)
    finally:
        if undo is not None:
            undo()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


@contextmanager
def _flower_log_level(level: int | None):
    logger = logging.getLogger("flwr")
    old = logger.level
    if level is not None:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def simulate(cfg: ExperimentConfig, data: FederatedData | None = None, progress: bool = False,
             client_resources: dict | None = None, init_args: dict | None = None, quiet: bool = False,
             allow_failures: bool = False, round_timeout: float = 3600.0) -> FederatedRun:
    """Run `cfg` on Flower's Simulation Runtime (Ray backend, one SuperNode per client) in this process.

    Returns the server's :class:`FederatedRun` (``global_model``, ``records``, ``result()``).
    `client_resources` is each ClientApp's Ray share (default 1 CPU, so as many clients train at once as
    the machine has cores); `init_args` go to ``ray.init`` (e.g. ``{"num_cpus": 2}``).
    """
    # The same runtime `flwr run` starts on a local SuperLink (its simulation process calls this
    # function); the public flwr.simulation.run_simulation wrapper is deprecated in flwr 1.41 in favour
    # of `flwr run`, which cannot hand the server's objects back to this process.
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    check_engine_config(cfg)          # before Ray starts

    out: dict = {}
    server_app = make_server_app(cfg, data=data, sink=lambda run: out.__setitem__("run", run), progress=progress,
                                 allow_failures=allow_failures, round_timeout=round_timeout)
    backend_config = {"client_resources": dict(client_resources or DEFAULT_CLIENT_RESOURCES),
                      "init_args": dict(init_args or {})}
    with _flower_log_level(logging.WARNING if quiet else None):
        start_ray(init_args)
        _run_simulation(num_supernodes=cfg.data.num_clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                        client_app=client_app, server_app=server_app, backend_name="ray",
                        backend_config=backend_config)
    if "run" not in out:
        raise RuntimeError("the Flower simulation ended without a result (see Flower's log above)")
    return out["run"]


def run_flower(cfg: ExperimentConfig, data: FederatedData | None = None, progress: bool = False,
               **options) -> RunResult:
    """:func:`fedbench.fl.run_federated` on Flower: the same RunResult (rounds + summary), plus Flower's
    wire bytes and timing columns and ``summary["engine"] = "flower"``."""
    return flower_result(simulate(cfg, data=data, progress=progress, **options))


def flower_result(run: FederatedRun) -> RunResult:
    """The server's run as a RunResult, marked as Flower's, with the total bytes Flower moved."""
    result = run.result()
    result.summary["engine"] = "flower"
    result.summary["wire_bytes_total"] = int(result.rounds["wire_bytes_up"].sum()
                                             + result.rounds["wire_bytes_down"].sum())
    return result


def run_flower_cached(cfg: ExperimentConfig, data: FederatedData | None = None, progress: bool = False,
                      root=None, force: bool = False, **options) -> RunResult:
    """:func:`run_flower`, unless a finished Flower run of the same config is on disk (then load it).
    Stored under ``<root>/<run_key(cfg, "flower")>/`` (a Flower run restarts from round 1 if killed: the
    round-level resume is the in-process loop's). `options` go to :func:`simulate` (e.g. ``quiet=True``:
    Flower's INFO log hidden)."""
    from fedbench.results import cached_run
    return cached_run(cfg, lambda ckpt: run_flower(cfg, data, progress, **options), root=root, force=force,
                      engine="flower")


__all__ = ["FedbenchStrategy", "client_app", "client_runtime", "config_from_run_config", "flower_result",
           "make_server_app", "map_clients_to_nodes", "record_to_state", "run_flower", "run_flower_cached",
           "patch_ray_start", "server_main", "simulate", "start_ray", "state_to_record", "wait_for_nodes"]
