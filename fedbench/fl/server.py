"""The in-process round loop: sample clients, train them, aggregate, evaluate, record.

The loop is the only place that knows about rounds. Client training is
:func:`fedbench.fl.client.train_client` and the server's step is :class:`fedbench.fl.strategy.Strategy`,
so another engine (Flower, :mod:`fedbench.engines.flower`) can drive the same two pieces.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fedbench.fl.client import ClientUpdate, evaluate, train_client
from fedbench.fl.seeding import derive_seed, rng_for
from fedbench.fl.strategy import GlobalModel, LoraLayout, Strategy
from fedbench.models import (build_model, count_parameters, load_tokenizer, load_trainable_state, lora_modules,
                             state_nbytes, trainable_state)
from fedbench.models.inputs import ActivationCache, TokenizedSplit, tokenize_split
from fedbench.results import RunResult


@dataclass
class FederatedData:
    """A task cut into clients and tokenized."""
    train: TokenizedSplit
    test: TokenizedSplit
    client_indices: list[np.ndarray]     # indices into `train`, one array per client
    test_indices: np.ndarray             # the test examples evaluated each round
    class_names: list[str]
    pad_id: int

    @property
    def num_labels(self) -> int:
        return len(self.class_names)


def _subsample(n: int, k: int | None, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if k is None or k >= n else np.sort(rng.choice(n, size=k, replace=False))


def partition_clients(labels: np.ndarray, data_cfg, seed: int) -> list[np.ndarray]:
    from fedbench.data import partition_dirichlet, partition_iid, partition_quantity_skew
    s = derive_seed(seed, "partition")
    if data_cfg.partition == "iid":
        return partition_iid(labels, data_cfg.num_clients, seed=s)
    if data_cfg.partition == "dirichlet":
        return partition_dirichlet(labels, data_cfg.num_clients, alpha=data_cfg.alpha, seed=s)
    return partition_quantity_skew(len(labels), data_cfg.num_clients, alpha=data_cfg.alpha, seed=s)


def prepare_data(cfg) -> FederatedData:
    """Load `cfg.data.task`, subsample (seeded), partition into clients (seeded), tokenize (cached) or, for an
    image task, keep the images for the vision backbone's per-batch preprocessing."""
    from fedbench.data import load_task
    ds = load_task(cfg.data.task)
    image_task = "image" in ds["train"].column_names
    encode = _image_encoder(cfg) if image_task else _text_encoder(cfg)
    train_idx = _subsample(len(ds["train"]), cfg.data.max_train_samples, rng_for(cfg.seed, "subsample", 0))
    test_idx = _subsample(len(ds["test"]), cfg.data.max_test_samples, rng_for(cfg.seed, "subsample", 1))
    train_ds = ds["train"].select(train_idx)
    labels = train_ds.with_format("numpy")["label"][:]
    if cfg.data.num_clients > len(labels):
        from fedbench.config import ConfigError
        raise ConfigError("data.num_clients", cfg.data.num_clients, f"at most the {len(labels)} training samples")
    encoded, pad_id = encode
    return FederatedData(
        train=encoded(train_ds),
        test=encoded(ds["test"]),
        client_indices=partition_clients(labels, cfg.data, cfg.seed),
        test_indices=test_idx,
        class_names=list(ds["train"].features["label"].names),
        pad_id=pad_id,
    )


def _backbone_config(cfg):
    from fedbench.models.backbone import _pretrained_state
    return _pretrained_state(cfg.model.backbone)[1]


def _text_encoder(cfg):
    from fedbench.models.vision import is_vision_config
    if cfg.model.backbone != "minilm" and is_vision_config(_backbone_config(cfg)):
        from fedbench.config import ConfigError
        raise ConfigError("model.backbone", cfg.model.backbone,
                          f"a text encoder for the text task {cfg.data.task!r} (this is an image backbone)")
    tok = load_tokenizer(cfg.model.backbone)
    return (lambda ds: tokenize_split(ds, tok, cfg.data.max_length)), tok.pad_token_id or 0


def _image_encoder(cfg):
    from fedbench.config import ConfigError
    from fedbench.models.inputs import image_split
    from fedbench.models.vision import image_normalization, is_vision_config
    if cfg.model.backbone == "minilm":
        raise ConfigError("model.backbone", cfg.model.backbone,
                          f"an image-classification backbone for the image task {cfg.data.task!r}: a Hugging Face "
                          "ViT id (needs the hub, e.g. 'google/vit-base-patch16-224-in21k') or a local ViT folder. "
                          "No vision backbone ships offline yet (a later issue)")
    config = _backbone_config(cfg)
    if not is_vision_config(config):
        raise ConfigError("model.backbone", cfg.model.backbone,
                          f"an image backbone for the image task {cfg.data.task!r} (this is a text encoder)")
    mean, std = image_normalization(cfg.model.backbone)
    return (lambda ds: image_split(ds, config.image_size, config.num_channels, mean, std)), 0


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
            self.params[key].copy_(self.original[key] + delta)


def load_global(model, global_model: GlobalModel, base: LoraBase) -> None:
    base.load(global_model.base_delta)
    load_trainable_state(model, global_model.state)


class FederatedRun:
    """One experiment's state: data, the shared model, the strategy and every client's ledger.

    Simulated clients are held as data indices (+ a DP ledger when DP is on), never as model copies:
    one model is loaded with each client's state in turn.
    """

    def __init__(self, cfg, data: FederatedData | None = None,
                 caches: tuple[ActivationCache, ActivationCache] | None = None,
                 use_activation_cache: bool = True):
        self.cfg = cfg
        self.data = data or prepare_data(cfg)
        self.model = build_model(cfg.model, cfg.peft, self.data.num_labels, seed=derive_seed(cfg.seed, "init"))
        modules = lora_modules(self.model) if cfg.peft.method == "lora" else []
        self.strategy = Strategy(cfg.fl, LoraLayout(modules), cfg.peft.rank, seed=cfg.seed)
        self.global_model = GlobalModel(trainable_state(self.model))
        self.base = LoraBase(self.model)
        # (train, test) frozen-prefix caches; pass shared ones to reuse them across runs on the same data
        # and backbone (the frozen layers are the pretrained ones whatever the method)
        self.train_cache, self.test_cache = caches or (ActivationCache(self.data.train, self.data.pad_id),
                                                       ActivationCache(self.data.test, self.data.pad_id))
        if not use_activation_cache:   # run the whole stack every step (the benchmark's baseline)
            self.train_cache = self.test_cache = None
        self.dp_states: dict[int, dict] = {}
        self.records: list[dict] = []
        self.cumulative_bytes = 0
        # round 1's broadcast: the initial trainable state
        self.down_bytes = state_nbytes(self.global_model.state)

    def client_update(self, client_id: int, round_idx: int) -> ClientUpdate:
        load_global(self.model, self.global_model, self.base)
        return train_client(
            self.model, self.global_model.state, self.data.train, self.data.client_indices[client_id],
            self.cfg.train, seed=derive_seed(self.cfg.seed, "client", round_idx, client_id), client_id=client_id,
            cache=self.train_cache, pad_id=self.data.pad_id, dp_state=self.dp_states.setdefault(client_id, {}),
            dp_total_rounds=self.cfg.fl.rounds)

    def evaluate_global(self) -> dict:
        load_global(self.model, self.global_model, self.base)
        # the test cache stays valid under stack semantics too: base updates touch only LoRA-wrapped
        # layers, which are trainable and so above the cached frozen prefix by construction
        return evaluate(self.model, self.data.test, self.data.test_indices, cache=self.test_cache,
                        pad_id=self.data.pad_id)

    def select_clients(self, round_idx: int) -> RoundPlan:
        """Which clients round `round_idx` samples and which of them drop out (both seeded by the config)."""
        cfg = self.cfg
        sampled = sample_clients(cfg.data.num_clients, cfg.fl.clients_per_round, rng_for(cfg.seed, "sampling", round_idx))
        drop = rng_for(cfg.seed, "dropout", round_idx).random(len(sampled)) < cfg.fl.dropout
        return RoundPlan(round_idx, sampled, drop)

    def run_round(self, round_idx: int) -> dict:
        t0 = time.perf_counter()
        plan = self.select_clients(round_idx)
        updates = [self.client_update(c, round_idx) for c in plan.reporting]
        return self.finish_round(plan, updates, t0)

    def finish_round(self, plan: RoundPlan, updates: list[ClientUpdate], t0: float, failed: int = 0) -> dict:
        """Aggregate the reporting clients' `updates` (in client order), evaluate, record the round.

        The round loop's second half, shared with other engines (Flower's ServerApp calls it with the
        updates its ClientApps sent back). `failed` counts sampled clients that were asked to train but
        did not report (an engine's real failures); they are recorded as dropped. `t0` is when the round
        started (``time.perf_counter()``).
        """
        cfg, round_idx = self.cfg, plan.round_idx
        bytes_down = self.down_bytes * len(plan.sampled)
        bytes_up = sum(state_nbytes(u.state) for u in updates)
        self.global_model, self.down_bytes = self.strategy.aggregate(self.global_model, updates, round_idx)
        self.cumulative_bytes += bytes_up + bytes_down
        rec = {"round": round_idx, "clients_sampled": len(plan.sampled),
               "clients_dropped": int(plan.dropped.sum()) + int(failed),
               "bytes_up": bytes_up, "bytes_down": bytes_down, "cumulative_bytes": self.cumulative_bytes,
               "train_loss": float(np.mean([u.train_loss for u in updates])) if updates else float("nan"),
               "local_steps": int(sum(u.num_steps for u in updates))}
        if self.cfg.train.dp.enabled:
            eps = [u.metrics.get("dp_epsilon", float("nan")) for u in updates]
            rec["dp_epsilon_max"] = max(self.client_epsilons().values(), default=float("nan"))
            rec["dp_epsilon_round_mean"] = float(np.nanmean(eps)) if eps else float("nan")
        if round_idx % cfg.fl.eval_every == 0 or round_idx == cfg.fl.rounds:
            ev = self.evaluate_global()
            rec.update(accuracy=ev["accuracy"], loss=ev["loss"])
        else:
            rec.update(accuracy=float("nan"), loss=float("nan"))
        rec["wall_s"] = time.perf_counter() - t0
        self.records.append(rec)
        return rec

    def client_epsilons(self) -> dict[int, float]:
        return {c: s["epsilon"] for c, s in self.dp_states.items() if "epsilon" in s}

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
        }
        if self.cfg.train.dp.enabled:
            eps = self.client_epsilons()
            summary["dp_epsilon_spent"] = float(max(eps.values())) if eps else 0.0
        return RunResult(config=self.cfg.to_dict(), rounds=rounds, summary=summary)


def run_federated(cfg, data: FederatedData | None = None, progress: bool = False, caches=None) -> RunResult:
    """Run `cfg` from round 1 to `cfg.fl.rounds` in this process and return its results."""
    run = FederatedRun(cfg, data, caches)
    rounds = range(1, cfg.fl.rounds + 1)
    if progress:
        from tqdm.auto import tqdm
        rounds = tqdm(rounds, desc=f"{cfg.name} [{cfg.peft.method}]", unit="round")
    for r in rounds:
        rec = run.run_round(r)
        if progress and rec["accuracy"] == rec["accuracy"]:
            rounds.set_postfix(acc=f"{rec['accuracy']:.3f}")
    return run.result()


def run_cached(cfg, data: FederatedData | None = None, progress: bool = False, root=None,
               force: bool = False, caches=None) -> RunResult:
    """:func:`run_federated`, unless a finished run of the same config is on disk (then load it)."""
    from fedbench.results import cached_run
    return cached_run(cfg, lambda: run_federated(cfg, data, progress, caches), root=root, force=force)
