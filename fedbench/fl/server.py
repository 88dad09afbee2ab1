"""The one round loop: sample clients, ask the strategy, train, guard, aggregate, evaluate, record, checkpoint.

Every paper runs on it: a strategy (:mod:`fedbench.fl.strategy`, looked up by ``fl.strategy`` in
:data:`fedbench.registry.STRATEGIES`) decides what each round asks of the clients and how the server combines
their updates; the loop owns what is the same for every strategy:

1. sampling and dropout (seeded per round), Byzantine clients (a seeded set, fixed for the run), the
   per-client store (:class:`fedbench.fl.store.ClientStore`: DP ledgers, private state);
2. the exact byte count of what each instruction sends down and each update sends up (state + extras);
3. the update guard: a non-finite update (or one beyond ``fl.max_update_norm``) is rejected, counted and
   logged, never aggregated;
4. central evaluation, per-example predictions of the final round (for :mod:`fedbench.claims`), the
   per-round records, and a checkpoint after every round from which a killed run resumes bit-identically.

Flower (:mod:`fedbench.engines.flower`) drives the same pieces: its ServerApp calls
:meth:`FederatedRun.configure` and :meth:`FederatedRun.finish_round`, its ClientApp
:meth:`FederatedRun.client_update`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedbench.fl.client import ClientUpdate, evaluate
from fedbench.fl.data import FederatedData, build_data
from fedbench.fl.device import resolve_device
from fedbench.fl.seeding import derive_seed, rng_for
from fedbench.fl.store import ClientStore
from fedbench.fl.strategy import ClientInstruction, GlobalModel
from fedbench.models import build_model, count_parameters, load_trainable_state, state_nbytes
from fedbench.models.inputs import ActivationCache
from fedbench.registry import ATTACKS, STRATEGIES
from fedbench.results import RunResult, atomic_write_json, atomic_write_tensors, read_tensors

log = logging.getLogger("fedbench.fl")


def sample_clients(num_clients: int, clients_per_round: float, rng: np.random.Generator) -> np.ndarray:
    """Seeded sample without replacement: a fraction (<= 1) or a count (> 1) of the clients."""
    k = int(clients_per_round) if clients_per_round > 1 else max(1, int(round(clients_per_round * num_clients)))
    return np.sort(rng.choice(num_clients, size=min(k, num_clients), replace=False))


@dataclass
class RoundPlan:
    """One round's participants: the sampled clients and which of them drop out before reporting."""
    round_idx: int
    sampled: np.ndarray          # sorted client ids
    dropped: np.ndarray          # bool, one per sampled client

    @property
    def reporting(self) -> list[int]:
        return [int(c) for c, d in zip(self.sampled, self.dropped) if not d]


class LoraBase:
    """Applies a GlobalModel's dense base updates to the one shared model (stack semantics)."""

    def __init__(self, model):
        self.params = dict(model.named_parameters())
        self.original: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def load(self, base_delta: dict) -> None:
        for key, delta in base_delta.items():
            if key not in self.original:
                self.original[key] = self.params[key].detach().clone()
            self.params[key].copy_(self.original[key] + delta.to(self.original[key].device))


def load_global(model, global_model: GlobalModel, base: LoraBase) -> None:
    """Load what a client received: the base updates and the trainable tensors sent (a strategy may send a
    subset: the others keep what the model holds, e.g. a client's private factors loaded from its store)."""
    base.load(global_model.base_delta)
    params = dict(model.named_parameters())
    unknown = [k for k in global_model.state if k not in params]
    if unknown:
        raise KeyError(f"the global state names tensors the model lacks: {unknown[:3]}")
    if all(k in global_model.state for k, p in params.items() if p.requires_grad):
        load_trainable_state(model, global_model.state)
        return
    with torch.no_grad():
        for k, v in global_model.state.items():
            params[k].copy_(v)


def finite(update: ClientUpdate) -> bool:
    tensors = [*update.state.values(), *update.extras.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def update_norm(update: ClientUpdate, reference: dict) -> float:
    """L2 distance of the sent state from `reference` (what the client received; keys it lacks count from zero)."""
    sq = 0.0
    for k, v in update.state.items():
        ref = reference.get(k)
        d = v.double() - (ref.double() if ref is not None else 0.0)
        sq += float((d * d).sum())
    return sq ** 0.5


@dataclass
class HeldRun:
    """A run's training kept to be evaluated again (:meth:`FederatedRun.replay`): the global model after each
    round of `snapshots` (cloned tensors), the per-round records and the client store (DP ledgers)."""
    snapshots: dict           # round -> GlobalModel
    records: list
    rejections: list
    cumulative_bytes: int
    store: object


class FederatedRun:
    """One experiment's state: data, the shared model, the strategy, the global model and the client store.

    Simulated clients are held as data indices + their store entry, never as model copies: one model is
    loaded with each client's state in turn.
    """

    def __init__(self, cfg, data: FederatedData | None = None,
                 caches: tuple[ActivationCache, ActivationCache] | None = None,
                 use_activation_cache: bool = True):
        self.cfg = cfg
        self.device = resolve_device(cfg.train)          # a ConfigError (no CUDA, bf16 on a CPU) before any work
        self.data = data or build_data(cfg)
        self.model = build_model(cfg.model, cfg.peft, self.data.num_labels,
                                 seed=derive_seed(cfg.seed, "init")).to(self.device)
        self.strategy = STRATEGIES.get(cfg.fl.strategy)(cfg, self.model)
        self.strategy.attach(self.data)
        self.global_model = self.strategy.initial_model(self.model)
        self.base = LoraBase(self.model)
        # (train, test) frozen-prefix caches; pass shared ones to reuse them across runs on the same data
        # and backbone (the frozen layers are the pretrained ones whatever the method)
        self.train_cache, self.test_cache = caches or self._new_caches()
        if not use_activation_cache:   # run the whole stack every step (the benchmark's baseline)
            self.train_cache = self.test_cache = None
        self.store = ClientStore()
        self._set_attackers(cfg)
        self.records: list[dict] = []
        self.rejections: list[dict] = []
        self.cumulative_bytes = 0
        self.final_predictions: dict | None = None
        self.stopped = False             # the strategy ended the run (``strategy.finished``) before fl.rounds
        self.client_evaluator = None     # set by an engine whose client stores live elsewhere (evaluate_clients)

    def _set_attackers(self, cfg) -> None:
        """The attack of `cfg` and its seeded set of attackers (fixed for the run)."""
        self.attack = ATTACKS.entry(cfg.fl.attack)
        self.attackers: set[int] = set()
        if cfg.fl.attack != "none":
            from fedbench.fl.attacks import select_attackers
            self.attackers = {int(c) for c in select_attackers(cfg.data.num_clients, cfg.fl.attack_fraction,
                                                               derive_seed(cfg.seed, "attack"))}
        self._flipped_split = None

    def _new_caches(self) -> tuple[ActivationCache, ActivationCache]:
        train, test = (ActivationCache(self.data.train, self.data.pad_id),
                       ActivationCache(self.data.test, self.data.pad_id))
        depths = [d for d in self.strategy.cache_depths(self.model) if d > 0]
        if self.data.prefill and depths:         # one fixed order, up front (FederatedData.prefill)
            train.fill_depths(self.model, np.arange(len(self.data.train)), depths)
            test.fill_depths(self.model, np.asarray(self.data.test_indices), depths)
        return train, test

    # -- what experiments call: explicit operations instead of writes to the run's fields -------------------
    def initial_model(self) -> GlobalModel:
        """The strategy's initial global model from the model's current weights (e.g. after fitting its head)."""
        return self.strategy.initial_model(self.model)

    def restart(self, global_model: GlobalModel | None = None) -> None:
        """Start over before round 1 from `global_model` (default: :meth:`initial_model`): no records, no bytes,
        no predictions, an empty client store."""
        self.global_model = self.initial_model() if global_model is None else global_model
        self.records, self.rejections, self.cumulative_bytes = [], [], 0
        self.final_predictions, self.stopped = None, False
        self.store = ClientStore()

    def derive(self, cfg, global_model: GlobalModel) -> "FederatedRun":
        """A run of `cfg` that shares this run's data, model and activation caches (building them is the
        expensive part), starting from `global_model`. `cfg` may differ from this run's config in how clients
        train and what the strategy does (``train``, ``fl``, the seed), not in what the data and the model are
        (``data``, ``model``, ``peft``): a ConfigError says which."""
        from fedbench.errors import ConfigError
        for part in ("data", "model", "peft"):
            if getattr(cfg, part) != getattr(self.cfg, part):
                raise ConfigError(part, getattr(cfg, part), f"this run's {part} (a derived run shares its data and model)")
        run = FederatedRun.__new__(FederatedRun)
        run.__dict__.update(self.__dict__)
        run.cfg = cfg
        run.strategy = STRATEGIES.get(cfg.fl.strategy)(cfg, self.model)
        run.strategy.attach(self.data)
        run._set_attackers(cfg)
        run.restart(global_model)
        return run

    def hold(self, snapshots: dict) -> "HeldRun":
        """This run's training kept with the global models `snapshots` ({round: GlobalModel}) to evaluate it
        again elsewhere (:meth:`replay`)."""
        return HeldRun(snapshots, [dict(r) for r in self.records], list(self.rejections), self.cumulative_bytes,
                       self.store)

    def replay(self, held: "HeldRun") -> RunResult:
        """The result this config gives from a held run of the same training (a run of a config that differs at
        most in what it evaluates: ``fl.eval_every``, the evaluated split): the held global model is evaluated at
        each round this config evaluates; every other record (bytes, losses, epsilon) is the training's own.
        Nothing trains."""
        self.records = [dict(r) for r in held.records]
        self.rejections, self.cumulative_bytes, self.store = list(held.rejections), held.cumulative_bytes, held.store
        rounds, every = self.cfg.fl.rounds, self.cfg.fl.eval_every
        for rec in self.records:
            r = int(rec["round"])
            if r % every == 0 or r == rounds:
                self.global_model = held.snapshots[r]
                ev = self.evaluate_global(predictions=r == rounds)
                rec.update(accuracy=ev["accuracy"], loss=ev["loss"])
                if r == rounds and "predictions" in ev:
                    self.final_predictions = ev["predictions"]
            else:
                rec.update(accuracy=float("nan"), loss=float("nan"))
        return self.result()

    # -- what strategies and engines call ---------------------------------------------------------------
    @property
    def dp_states(self) -> dict[int, dict]:
        """Each client's DP ledger (in its store)."""
        return {c: d["dp"] for c, d in self.store.items() if "dp" in d}

    def load(self, global_model: GlobalModel) -> None:
        load_global(self.model, global_model, self.base)

    def client_seed(self, round_idx: int, client_id: int) -> int:
        return derive_seed(self.cfg.seed, "client", round_idx, client_id)

    def client_split(self, client_id: int):
        """The training split as client `client_id` sees it: with flipped labels for a label_flip attacker."""
        if client_id in self.attackers and self.attack.facts.get("kind") == "data":
            if self._flipped_split is None:
                labels = self.attack.obj(self.data.train.labels, self.data.num_labels)
                self._flipped_split = dataclasses.replace(self.data.train, labels=labels)
            return self._flipped_split
        return self.data.train

    def evaluate_model(self, global_model: GlobalModel, predictions: bool = False) -> dict:
        self.load(global_model)
        # the test cache stays valid under stack semantics too: base updates touch only LoRA-wrapped
        # layers, which are trainable and so above the cached frozen prefix by construction
        return evaluate(self.model, self.data.test, self.data.test_indices, cache=self.test_cache,
                        pad_id=self.data.pad_id, return_predictions=predictions, precision=self.cfg.train.precision)

    def evaluate_clients(self, global_model: GlobalModel) -> dict:
        """Client-side evaluation (a personalised strategy's ``evaluate``): every client scores the model it keeps
        (``strategy.client_evaluate`` with its store) on the test examples; the record is the mean over clients
        (no per-example predictions: each example has one per client). An engine whose client stores live
        elsewhere sets ``client_evaluator(clients, global_model) -> {client: scores}`` (Flower asks its nodes)."""
        clients = list(range(self.cfg.data.num_clients))
        if self.client_evaluator is not None:
            scores = self.client_evaluator(clients, global_model)
        else:
            scores = {c: self.strategy.client_evaluate(self, c, global_model, self.store[c]) for c in clients}
        return {"accuracy": float(np.mean([scores[c]["accuracy"] for c in clients])),
                "loss": float(np.mean([scores[c]["loss"] for c in clients])),
                "n": int(sum(scores[c]["n"] for c in clients))}

    def evaluate_global(self, predictions: bool = False) -> dict:
        return self.strategy.evaluate(self, self.global_model, predictions=predictions)

    def select_clients(self, round_idx: int) -> RoundPlan:
        """Which clients round `round_idx` samples and which of them drop out (both seeded by the config)."""
        cfg = self.cfg
        sampled = sample_clients(cfg.data.num_clients, cfg.fl.clients_per_round, rng_for(cfg.seed, "sampling", round_idx))
        drop = rng_for(cfg.seed, "dropout", round_idx).random(len(sampled)) < cfg.fl.dropout
        return RoundPlan(round_idx, sampled, drop)

    def configure(self, plan: RoundPlan) -> dict[int, ClientInstruction]:
        """The strategy's instruction for every sampled client (dropped ones received the model too)."""
        instructions = self.strategy.configure_round(plan.round_idx, [int(c) for c in plan.sampled],
                                                     self.global_model)
        return {ins.client_id: ins for ins in instructions}

    def client_update(self, client_id: int, round_idx: int, instruction: ClientInstruction | None = None,
                      store: dict | None = None) -> ClientUpdate:
        """Client `client_id`'s update in round `round_idx` (an attacker's is what it sends, attacked)."""
        ins = instruction or self.strategy.configure_round(round_idx, [client_id], self.global_model)[0]
        update = self.strategy.client_update(self, ins, self.store[client_id] if store is None else store)
        return self.attacked(update, ins)

    def attacked(self, update: ClientUpdate, ins: ClientInstruction) -> ClientUpdate:
        """What client ``ins.client_id`` sends: `update`, attacked if it is an update attacker."""
        client_id, round_idx = ins.client_id, ins.round_idx
        if client_id in self.attackers and self.attack.facts.get("kind") == "update":
            gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "attack", round_idx, client_id))
            received = self.strategy.reference(ins)
            ref = {k: received[k] if k in received else torch.zeros_like(v) for k, v in update.state.items()}
            update.state = self.attack.obj(update.state, ref, generator=gen, factor=self.cfg.fl.attack_scale,
                                           sigma=self.cfg.fl.attack_sigma)
            update.metrics["attacker"] = 1
        return update

    # -- the round ------------------------------------------------------------------------------------
    def run_round(self, round_idx: int) -> dict:
        t0 = time.perf_counter()
        plan = self.select_clients(round_idx)
        instructions = self.configure(plan)
        if self.cfg.fl.client_batching:       # the round's clients trained together (fedbench.fl.batched)
            from fedbench.fl.batched import batched_updates
            updates = batched_updates(self, [instructions[c] for c in plan.reporting])
        else:
            updates = [self.client_update(c, round_idx, instructions[c]) for c in plan.reporting]
        return self.finish_round(plan, updates, t0, instructions=instructions)

    def guard(self, updates: list[ClientUpdate], round_idx: int,
              instructions: dict[int, ClientInstruction] | None = None) -> tuple[list[ClientUpdate], list[dict]]:
        """(accepted updates, rejections): a non-finite update, or one farther than fl.max_update_norm from
        what the client received (``strategy.reference``; the global state without its instruction), is
        rejected and logged with the client id and the reason."""
        bound = self.cfg.fl.max_update_norm
        instructions = instructions or {}
        accepted, rejected = [], []
        for u in updates:
            reason = None
            if not finite(u):
                reason = "non-finite values"
            elif bound is not None:
                ins = instructions.get(int(u.client_id))
                norm = update_norm(u, self.global_model.state if ins is None else self.strategy.reference(ins))
                if norm > bound:
                    reason = f"update norm {norm:.4g} > fl.max_update_norm={bound:g}"
            if reason is None:
                accepted.append(u)
            else:
                log.warning("round %d: update of client %d rejected: %s", round_idx, u.client_id, reason)
                rejected.append({"round": round_idx, "client_id": u.client_id, "reason": reason})
        return accepted, rejected

    def finish_round(self, plan: RoundPlan, updates: list[ClientUpdate], t0: float, failed: int = 0,
                     instructions: dict[int, ClientInstruction] | None = None) -> dict:
        """Guard and aggregate the reporting clients' `updates` (in client order), evaluate, record the round.

        The round loop's second half, shared with other engines (Flower's ServerApp calls it with the
        updates its ClientApps sent back). `failed` counts sampled clients that were asked to train but
        did not report (an engine's real failures); they are recorded as dropped. `t0` is when the round
        started (``time.perf_counter()``).
        """
        cfg, round_idx = self.cfg, plan.round_idx
        if instructions is None:
            instructions = self.configure(plan)
        bytes_down = sum(instructions[int(c)].down_bytes for c in plan.sampled)
        bytes_up = sum(u.nbytes_up for u in updates)
        accepted, rejected = self.guard(updates, round_idx, instructions)
        self.rejections.extend(rejected)
        self.global_model = self.strategy.aggregate(self.global_model, accepted, round_idx)
        self.cumulative_bytes += bytes_up + bytes_down
        rec = {"round": round_idx, "clients_sampled": len(plan.sampled),
               "clients_dropped": int(plan.dropped.sum()) + int(failed), "clients_rejected": len(rejected),
               "bytes_up": bytes_up, "bytes_down": bytes_down, "cumulative_bytes": self.cumulative_bytes,
               "train_loss": float(np.mean([u.train_loss for u in accepted])) if accepted else float("nan"),
               "local_steps": int(sum(u.num_steps for u in updates))}
        if self.cfg.train.dp.enabled:
            eps = [u.metrics.get("dp_epsilon", float("nan")) for u in updates]
            rec["dp_epsilon_max"] = max(self.client_epsilons().values(), default=float("nan"))
            rec["dp_epsilon_round_mean"] = float(np.nanmean(eps)) if eps else float("nan")
        self.stopped = bool(self.strategy.finished(round_idx))
        last = round_idx == cfg.fl.rounds or self.stopped
        if round_idx % cfg.fl.eval_every == 0 or last:
            ev = self.evaluate_global(predictions=last)
            rec.update(accuracy=ev["accuracy"], loss=ev["loss"])
            if last and "predictions" in ev:
                self.final_predictions = ev["predictions"]
        else:
            rec.update(accuracy=float("nan"), loss=float("nan"))
        rec.update(self.strategy.round_record(round_idx))      # a strategy's own columns (e.g. its clock)
        rec["wall_s"] = time.perf_counter() - t0
        self.records.append(rec)
        return rec

    def client_epsilons(self) -> dict[int, float]:
        return {c: s["epsilon"] for c, s in self.dp_states.items() if "epsilon" in s}

    # -- checkpoints ----------------------------------------------------------------------------------
    @property
    def rounds_done(self) -> int:
        return int(self.records[-1]["round"]) if self.records else 0

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Everything the next round depends on, after the last finished round, atomically: the global model,
        the strategy's server state, the client store, the records, and the activation caches' fill order
        (replayed on resume, so the cached values, and every number after them, are bit-identical).

        Every random stream is derived from (seed, stream, round, client), so there is no RNG position to
        save. Files: ``round-NNNN/`` (written under a temporary name, then renamed) and ``latest.json``
        pointing at it, replaced atomically; older rounds are removed after the pointer moves.
        """
        folder = Path(folder)
        name = f"round-{self.rounds_done:04d}"
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        gm = self.global_model
        atomic_write_tensors(tmp / "global.safetensors",
                             {**{f"state/{k}": v for k, v in gm.state.items()},
                              **{f"base/{k}": v for k, v in gm.base_delta.items()}})
        s_tensors, s_meta = self.strategy.state_dict()
        atomic_write_tensors(tmp / "strategy.safetensors", s_tensors)
        self.store.save(tmp)
        meta = {"round": self.rounds_done, "records": self.records, "rejections": self.rejections,
                "record_keys": [list(r) for r in self.records],          # JSON files sort keys: keep the order
                "cumulative_bytes": self.cumulative_bytes, "down_bytes": gm.down_bytes, "strategy": s_meta,
                "state_keys": list(gm.state), "config_hash": self.cfg.hash(),
                "caches": [c.fill_log() if c is not None else None for c in (self.train_cache, self.test_cache)],
                "final_predictions": None if self.final_predictions is None else
                {k: np.asarray(v).tolist() for k, v in self.final_predictions.items()}}
        atomic_write_json(tmp / "meta.json", meta)
        shutil.rmtree(folder / name, ignore_errors=True)
        os.replace(tmp, folder / name)
        atomic_write_json(folder / "latest.json", {"round": self.rounds_done, "dir": name})
        for old in folder.glob("round-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return folder / name

    def restore_checkpoint(self, folder: str | Path) -> int:
        """Continue from the last checkpointed round in `folder` (if any); returns the rounds done."""
        folder = Path(folder)
        pointer = folder / "latest.json"
        if not pointer.exists():
            return 0
        path = pointer
        try:       # a truncated file raises safetensors' or json's own error, which names no file
            d = folder / json.loads(pointer.read_text())["dir"]
            meta = json.loads((path := d / "meta.json").read_text())
            tensors = read_tensors(path := d / "global.safetensors")
            strategy_tensors = read_tensors(path := d / "strategy.safetensors")
            path, store = d, ClientStore.load(d)
        except Exception as e:
            from fedbench.results import CorruptRunError
            raise CorruptRunError(path, f"checkpoint unreadable: {type(e).__name__}: {e}") from e
        if meta["config_hash"] != self.cfg.hash():
            raise RuntimeError(f"checkpoint {d} belongs to another config ({meta['config_hash']})")
        state = OrderedDict((k, tensors[f"state/{k}"]) for k in meta["state_keys"])
        base = {k[len("base/"):]: v for k, v in tensors.items() if k.startswith("base/")}
        self.global_model = GlobalModel(state, base, meta["down_bytes"])
        self.strategy.load_state_dict(strategy_tensors, meta["strategy"])
        self.store = store
        self.records = [{k: r[k] for k in keys} for r, keys in zip(meta["records"], meta["record_keys"])]
        self.rejections = meta["rejections"]
        self.cumulative_bytes = meta["cumulative_bytes"]
        fp = meta.get("final_predictions")
        self.final_predictions = None if fp is None else {k: np.asarray(v, dtype=np.int64) for k, v in fp.items()}
        for cache, fill in zip((self.train_cache, self.test_cache), meta["caches"]):
            if cache is not None and fill is not None:
                cache.replay(self.model, fill)
        log.info("resuming from round %d (checkpoint %s)", self.rounds_done + 1, d)
        return self.rounds_done

    def result(self) -> RunResult:
        rounds = pd.DataFrame(self.records)
        trainable, total = count_parameters(self.model)
        acc = rounds["accuracy"].dropna()
        summary = {
            "final_accuracy": float(acc.iloc[-1]), "best_accuracy": float(acc.max()),
            "final_loss": float(rounds["loss"].dropna().iloc[-1]),
            "trainable_params": int(trainable), "total_params": int(total),
            "bytes_up_per_round": float(rounds["bytes_up"].mean()),
            "bytes_down_per_round": float(rounds["bytes_down"].mean()),
            "state_bytes": int(state_nbytes(self.global_model.state)),
            "total_bytes": int(rounds["bytes_up"].sum() + rounds["bytes_down"].sum()),
            "rounds": int(len(rounds)), "wall_s": float(rounds["wall_s"].sum()),
            "clients_rejected": int(rounds["clients_rejected"].sum()),
        }
        if self.cfg.train.dp.enabled:
            eps = self.client_epsilons()
            summary["dp_epsilon_spent"] = float(max(eps.values())) if eps else 0.0
        summary.update(self.strategy.result_extras())          # a strategy's own tables (JSON-able)
        return RunResult(config=self.cfg.to_dict(), rounds=rounds, summary=summary,
                         predictions=self.final_predictions)


def run_federated(cfg, data: FederatedData | None = None, progress: bool = False, caches=None,
                  checkpoint_dir: str | Path | None = None, stop_after: int | None = None,
                  after_round=None) -> RunResult:
    """Run `cfg` from round 1 (or its last checkpointed round in `checkpoint_dir`) to `cfg.fl.rounds`, or to the
    round the strategy ends the run on (``strategy.finished``).

    With `checkpoint_dir` a checkpoint is written after every round, so a killed run restarted with the same
    folder continues where it stopped and ends bit-identical to an uninterrupted one. `stop_after` ends the
    run after that round (for tests and benchmarks), returning the partial result. `after_round(run, r)` is
    called after each round this call runs (after its checkpoint), e.g. to keep the global model of some rounds.
    """
    from fedbench.models.checks import check_against_backbone
    check_against_backbone(cfg)      # before any work: a bad depth or max_length fails in the first second
    run = FederatedRun(cfg, data, caches)
    done = run.restore_checkpoint(checkpoint_dir) if checkpoint_dir is not None else 0
    # a checkpoint of the round the strategy ended the run on: nothing is left to run
    rounds = range(done + 1, cfg.fl.rounds + 1) if not (done and run.strategy.finished(done)) else range(0)
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc=f"{cfg.name} [{cfg.peft.method}]", unit="round", initial=done,
                      total=cfg.fl.rounds)
    for r in rounds:
        rec = run.run_round(r)
        if checkpoint_dir is not None:
            run.save_checkpoint(checkpoint_dir)
        if after_round is not None:
            after_round(run, r)
        if progress and rec["accuracy"] == rec["accuracy"]:
            rounds.set_postfix(acc=f"{rec['accuracy']:.3f}")
        if run.stopped or (stop_after is not None and r >= stop_after):
            break
    return run.result()


def run_cached(cfg, data: FederatedData | None = None, progress: bool = False, root=None,
               force: bool = False, caches=None) -> RunResult:
    """:func:`run_federated`, unless a finished run of the same config is on disk (then load it); an
    unfinished one resumes from its checkpoint."""
    from fedbench.results import cached_run
    return cached_run(cfg, lambda ckpt: run_federated(cfg, data, progress, caches, checkpoint_dir=ckpt),
                      root=root, force=force)
