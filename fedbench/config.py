"""Experiment configuration: validated dataclasses, YAML/JSON in and out, a stable hash.

An experiment is fully described by an :class:`ExperimentConfig`. Every field is checked when the
config is built; a bad value raises :class:`ConfigError` naming the field, the value and what is
allowed. The config's hash keys its results (see :mod:`fedbench.results`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedbench.errors import ConfigError
from fedbench.options import normalize as normalize_options
from fedbench.registry import AGGREGATORS, ATTACKS, CONFIG_CHECKS, FEDERATIONS, LORA_SEMANTICS, STRATEGIES, TUNERS

# Component names (tuners, aggregators, LoRA semantics, strategies, attacks) live in fedbench.registry;
# these few choices are local to one field each.
PARTITIONS = ("iid", "dirichlet", "quantity_skew")
OPTIMIZERS = ("adamw", "sgd")
POOLINGS = ("mean", "cls")
# "paper": the paper's own backbone, data and schedule through the hub loaders (configs/<exp>/paper.yaml, where
# reachable): for a GPU and the model hub; `make reproduce` runs quick unless PROFILE=paper is asked for
PROFILES = ("smoke", "quick", "full", "paper")
PRECISIONS = ("fp32", "bf16")


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(name, value, allowed)


def _choice(name: str, value: Any, choices) -> None:
    _check(value in choices, name, value, f"one of {list(choices)}")


def _bool(name: str, value: Any) -> None:
    _check(isinstance(value, bool), name, value, "true or false")


def _names(name: str, value: Any, allowed: str, choices=None) -> None:
    """A non-empty list/tuple of non-empty strings (from `choices` when given); a bare string is not a list."""
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) and v for v in value)
    if ok and choices is not None:
        ok = set(value) <= set(choices)
    _check(ok, name, value, allowed)


def _registered(name: str, value: Any, registry) -> None:
    _check(isinstance(value, str) and value in registry, name, value, f"one of {registry.names()}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
           name, value, f"an integer >= {minimum}")


def _optional_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if value is not None:
        _positive_int(name, value, minimum)


def _number(name: str, value: Any, low: float, high: float, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    _check(ok, name, value, f"a number in {lo}{low}, {high}{hi}")


@dataclass
class DataConfig:
    """Which task, how it is cut into clients, and how it is tokenized."""
    task: str = "rt_sentiment"
    num_clients: int = 10
    partition: str = "dirichlet"
    alpha: float = 0.5                      # Dirichlet concentration (dirichlet, quantity_skew)
    max_train_samples: int | None = None    # seeded subsample of the train split before partitioning
    max_test_samples: int | None = None     # seeded subsample of the test split used for evaluation
    max_length: int = 64                    # tokens per example after truncation
    # what the run's data is beyond one task (fedbench.registry.FEDERATIONS): "single" = data.task cut into
    # clients; others (multitask, ...) take typed options, normalised and hashed like fl.options
    federation: str = "single"
    federation_options: dict = field(default_factory=dict)

    def validate(self, prefix: str = "data") -> None:
        from fedbench.data import HUB_TASKS, OFFLINE_TASKS
        _registered(f"{prefix}.federation", self.federation, FEDERATIONS)
        self.federation_options = normalize_options(FEDERATIONS.entry(self.federation), self.federation_options,
                                                    f"{prefix}.federation_options")
        _choice(f"{prefix}.task", self.task, tuple(OFFLINE_TASKS) + tuple(HUB_TASKS))
        _positive_int(f"{prefix}.num_clients", self.num_clients)
        _choice(f"{prefix}.partition", self.partition, PARTITIONS)
        _number(f"{prefix}.alpha", self.alpha, 0, float("inf"), low_open=True, high_open=True)
        _optional_positive_int(f"{prefix}.max_train_samples", self.max_train_samples)
        _optional_positive_int(f"{prefix}.max_test_samples", self.max_test_samples)
        _positive_int(f"{prefix}.max_length", self.max_length, 8)
        if self.max_train_samples is not None:
            _check(self.num_clients <= self.max_train_samples, f"{prefix}.num_clients", self.num_clients,
                   f"at most data.max_train_samples={self.max_train_samples} (each client needs a sample)")


@dataclass
class ModelConfig:
    """The pretrained backbone and how a sentence is pooled for the classifier head."""
    backbone: str = "minilm"    # 'minilm' = bundled all-MiniLM-L6-v2; else an HF model id or local path
    pooling: str = "mean"
    # dropout inside the backbone (hidden + attention). 0 by default: PEFT trains few parameters, and
    # on a CPU the Bernoulli masks cost ~15% of a MiniLM train step. None = the backbone's own (0.1).
    dropout: float | None = 0.0

    def validate(self, prefix: str = "model") -> None:
        _check(isinstance(self.backbone, str) and self.backbone != "", f"{prefix}.backbone", self.backbone,
               "'minilm' or a Hugging Face model id / local path")
        _choice(f"{prefix}.pooling", self.pooling, POOLINGS)
        if self.dropout is not None:
            _number(f"{prefix}.dropout", self.dropout, 0, 1, high_open=True)


@dataclass
class PeftConfig:
    """Which parameters train and travel. Fields not used by `method` are ignored."""
    method: str = "lora"
    # lora
    rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    # adapter (bottleneck, Houlsby placement) and 'which layers' for lora: the top `depth` layers;
    # None = every layer
    adapter_width: int = 16
    depth: int | None = None
    adapter_positions: tuple[str, ...] = ("attention", "ffn")
    # prompt tuning
    prompt_tokens: int = 10
    # the classifier head always trains and travels, except for 'full' where it is part of everything
    train_head: bool = True

    def validate(self, prefix: str = "peft") -> None:
        _registered(f"{prefix}.method", self.method, TUNERS)
        _positive_int(f"{prefix}.rank", self.rank)
        _number(f"{prefix}.lora_alpha", self.lora_alpha, 0, float("inf"), low_open=True, high_open=True)
        _number(f"{prefix}.lora_dropout", self.lora_dropout, 0, 1, high_open=True)
        _names(f"{prefix}.target_modules", self.target_modules, "a non-empty list of module names, e.g. ['query', 'value']")
        _positive_int(f"{prefix}.adapter_width", self.adapter_width)
        _optional_positive_int(f"{prefix}.depth", self.depth)
        _names(f"{prefix}.adapter_positions", self.adapter_positions, "a non-empty subset of ['attention', 'ffn']",
               ("attention", "ffn"))
        _positive_int(f"{prefix}.prompt_tokens", self.prompt_tokens)
        _bool(f"{prefix}.train_head", self.train_head)


@dataclass
class DPConfig:
    """DP-SGD on every client with Opacus: per-sample clipping + Gaussian noise.

    Give either `target_epsilon` (the noise multiplier is calibrated so that a client taking part in
    every round spends at most that epsilon over the whole run) or `noise_multiplier` directly.
    """
    enabled: bool = False
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    # None = 1 / (client's number of samples): weak (publishing one record in the clear meets (0, 1/n)-DP);
    # fedbench.fl.privacy warns when delta >= 1/n. Kept as the default so existing configs keep their hash;
    # experiments set e.g. 1e-5 in their profiles.
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"

    def validate(self, prefix: str = "train.dp") -> None:
        # every value is checked (it is hashed into the run key) even with DP off; the choice between
        # target_epsilon and noise_multiplier only matters when it is on
        _bool(f"{prefix}.enabled", self.enabled)
        if self.enabled:
            _check((self.target_epsilon is None) != (self.noise_multiplier is None), f"{prefix}.target_epsilon",
                   self.target_epsilon, "exactly one of target_epsilon / noise_multiplier when dp is enabled")
        if self.target_epsilon is not None:
            _number(f"{prefix}.target_epsilon", self.target_epsilon, 0, float("inf"), low_open=True, high_open=True)
        if self.noise_multiplier is not None:     # 0 = clipping only (no noise, epsilon infinite): a control
            _number(f"{prefix}.noise_multiplier", self.noise_multiplier, 0, float("inf"), high_open=True)
        if self.delta is not None:
            _number(f"{prefix}.delta", self.delta, 0, 1, low_open=True, high_open=True)
        _number(f"{prefix}.max_grad_norm", self.max_grad_norm, 0, float("inf"), low_open=True, high_open=True)
        _choice(f"{prefix}.accountant", self.accountant, ("rdp", "prv", "gdp"))


@dataclass
class TrainConfig:
    """What one client does with the global state it receives."""
    local_epochs: int = 1
    local_steps: int | None = None      # if set, overrides local_epochs: exactly this many optimizer steps
    batch_size: int = 32
    lr: float = 5e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0               # sgd only
    prox_mu: float = 0.0                # FedProx proximal term mu/2 ||w - w_global||^2 (0 = off)
    max_grad_norm: float | None = None  # plain gradient clipping (not DP)
    length_bucketing: bool = True       # batch examples of similar length together (less padding)
    dp: DPConfig = field(default_factory=DPConfig)
    # where clients train and the model is evaluated: 'auto' (CUDA when present, else the CPU), 'cpu',
    # 'cuda' or 'cuda:N' (fedbench.fl.device); precision 'bf16' = bf16 autocast on CUDA (adapters and
    # optimizer state stay fp32)
    device: str = "auto"
    precision: str = "fp32"

    def validate(self, prefix: str = "train") -> None:
        _positive_int(f"{prefix}.local_epochs", self.local_epochs)
        _optional_positive_int(f"{prefix}.local_steps", self.local_steps)
        _positive_int(f"{prefix}.batch_size", self.batch_size)
        _number(f"{prefix}.lr", self.lr, 0, 10, low_open=True)
        _choice(f"{prefix}.optimizer", self.optimizer, OPTIMIZERS)
        _number(f"{prefix}.weight_decay", self.weight_decay, 0, 1)
        _number(f"{prefix}.momentum", self.momentum, 0, 1, high_open=True)
        _number(f"{prefix}.prox_mu", self.prox_mu, 0, float("inf"), high_open=True)
        _bool(f"{prefix}.length_bucketing", self.length_bucketing)
        if self.max_grad_norm is not None:
            _number(f"{prefix}.max_grad_norm", self.max_grad_norm, 0, float("inf"), low_open=True, high_open=True)
        self.dp.validate(f"{prefix}.dp")
        _check(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device) is not None,
               f"{prefix}.device", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
        _choice(f"{prefix}.precision", self.precision, PRECISIONS)
        # bf16 is for CUDA's tensor cores; a CPU without bf16 GEMM units runs it ~100x slower than fp32 (1.2 vs
        # ~150 GFLOP/s measured on this project's machine), and CPU results must stay fp32-exact. With 'auto'
        # this is checked when the run resolves its device (fedbench.fl.device.resolve_device).
        _check(not (self.precision == "bf16" and self.device == "cpu"), f"{prefix}.precision", self.precision,
               "'fp32' with train.device='cpu' (bf16 autocast is CUDA only: CPU bf16 matmuls are ~100x slower)")

    def with_steps(self, local_steps: int) -> "TrainConfig":
        """A copy that takes exactly `local_steps` optimizer steps."""
        return dataclasses.replace(self, local_steps=int(local_steps))


@dataclass
class FLConfig:
    """The server side: the strategy, rounds, who takes part, how updates are combined, faults and attacks."""
    strategy: str = "fedavg"            # fedbench.registry.STRATEGIES: what a round asks of clients
    rounds: int = 5
    clients_per_round: float = 1.0      # a fraction in (0, 1] or, if > 1, an integer count
    dropout: float = 0.0                # probability that a sampled client drops out before reporting
    aggregator: str = "fedavg"          # fedbench.registry.AGGREGATORS
    lora_aggregation: str = "factors"   # factors (FedIT) | stack (exact, FLoRA) | svd (exact, re-factorised)
    server_lr: float = 1.0              # fedavgm / fedadam
    server_momentum: float = 0.9        # fedavgm; beta1 for fedadam
    server_beta2: float = 0.99          # fedadam
    server_eps: float = 1e-3            # fedadam tau (adaptivity), as in Reddi et al.
    trim_ratio: float = 0.1             # trimmed_mean: fraction cut at each end
    num_malicious: int = 1              # krum / multi_krum / bulyan: the f the rule is built to survive
    multi_krum_keep: int | None = None  # multi_krum: states averaged (None = n - f)
    # update guard: a client update with a non-finite value is always rejected; one whose L2 distance from
    # the global state exceeds this bound too (None = no bound)
    max_update_norm: float | None = None
    # Byzantine clients: a seeded fraction of the clients (fixed for the run) attacks every round it takes part
    attack: str = "none"                # fedbench.registry.ATTACKS
    attack_fraction: float = 0.0
    attack_scale: float = -4.0          # scale: the attacker sends global + attack_scale * its update
    attack_sigma: float = 1.0           # gaussian: the attacker's update is N(0, sigma^2) noise
    eval_every: int = 1
    # train a round's clients together through the shared frozen layers (fedbench.fl.batched); off = one by one
    client_batching: bool = False
    # the strategy's and the aggregator's own settings, validated by the options class each registers
    # (fedbench.options); normalised to every option with its default, so they key the run like any field
    options: dict = field(default_factory=dict)
    aggregator_options: dict = field(default_factory=dict)

    def validate(self, prefix: str = "fl") -> None:
        _registered(f"{prefix}.strategy", self.strategy, STRATEGIES)
        _positive_int(f"{prefix}.rounds", self.rounds)
        cpr = self.clients_per_round
        ok = isinstance(cpr, (int, float)) and not isinstance(cpr, bool) and (
            0 < cpr <= 1 or (cpr > 1 and float(cpr).is_integer()))
        _check(ok, f"{prefix}.clients_per_round", cpr, "a fraction in (0, 1] or an integer count > 1")
        _number(f"{prefix}.dropout", self.dropout, 0, 1, high_open=True)
        _registered(f"{prefix}.aggregator", self.aggregator, AGGREGATORS)
        _registered(f"{prefix}.lora_aggregation", self.lora_aggregation, LORA_SEMANTICS)
        _number(f"{prefix}.server_lr", self.server_lr, 0, float("inf"), low_open=True, high_open=True)
        _number(f"{prefix}.server_momentum", self.server_momentum, 0, 1, high_open=True)
        _number(f"{prefix}.server_beta2", self.server_beta2, 0, 1, high_open=True)
        _number(f"{prefix}.server_eps", self.server_eps, 0, 1, low_open=True)
        _number(f"{prefix}.trim_ratio", self.trim_ratio, 0, 0.5, high_open=True)
        _positive_int(f"{prefix}.num_malicious", self.num_malicious, 0)
        _optional_positive_int(f"{prefix}.multi_krum_keep", self.multi_krum_keep)
        if self.max_update_norm is not None:
            _number(f"{prefix}.max_update_norm", self.max_update_norm, 0, float("inf"), low_open=True,
                    high_open=True)
        _registered(f"{prefix}.attack", self.attack, ATTACKS)
        _number(f"{prefix}.attack_fraction", self.attack_fraction, 0, 1)
        _number(f"{prefix}.attack_scale", self.attack_scale, -1e6, 1e6)
        _number(f"{prefix}.attack_sigma", self.attack_sigma, 0, float("inf"), low_open=True, high_open=True)
        _check(self.attack == "none" or self.attack_fraction > 0, f"{prefix}.attack_fraction", self.attack_fraction,
               f"a fraction > 0 when fl.attack={self.attack!r} (0 attackers would run no attack)")
        _positive_int(f"{prefix}.eval_every", self.eval_every)
        _bool(f"{prefix}.client_batching", self.client_batching)
        self.options = normalize_options(STRATEGIES.entry(self.strategy), self.options, f"{prefix}.options")
        self.aggregator_options = normalize_options(AGGREGATORS.entry(self.aggregator), self.aggregator_options,
                                                    f"{prefix}.aggregator_options")
        if self.lora_aggregation != "factors":
            # stacking / SVD define the exact product average; a robust or adaptive rule on top of it
            # (median of stacked factors, Adam on re-factorised bases) has no clear meaning
            _check(self.aggregator == "fedavg", f"{prefix}.aggregator", self.aggregator,
                   f"'fedavg' when fl.lora_aggregation={self.lora_aggregation!r}")


@dataclass
class ExperimentConfig:
    """One federated run. `seed` seeds every random stream (partition, sampling, clients, init)."""
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    # outside modules that register components this config names (fedbench.plugins): imported first, before
    # any name is validated; left out of to_dict() when empty, so a config without plugins keeps its hash
    plugins: tuple[str, ...] = ()

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        from fedbench.plugins import load as load_plugins
        _check(isinstance(self.plugins, (list, tuple)), "plugins", self.plugins, "a list of module names")
        self.plugins = tuple(load_plugins(self.plugins))
        _check(isinstance(self.name, str) and self.name != "", "name", self.name, "a non-empty string")
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "seed",
               self.seed, "an integer >= 0")
        self.data.validate()
        self.model.validate()
        self.peft.validate()
        self.train.validate()
        self.fl.validate()
        cpr = self.fl.clients_per_round
        if cpr > 1:
            _check(cpr <= self.data.num_clients, "fl.clients_per_round", cpr,
                   f"at most data.num_clients={self.data.num_clients}")
        # combinations: the strategy, the aggregator and the tuner each say what they need of the rest
        for registry, name in ((STRATEGIES, self.fl.strategy), (AGGREGATORS, self.fl.aggregator),
                               (TUNERS, self.peft.method), (FEDERATIONS, self.data.federation)):
            check = registry.entry(name).facts.get("check")
            if check is not None:
                check(self)
        for entry in CONFIG_CHECKS:      # e.g. what batched clients cover (the rest is refused, never run silently)
            entry.obj(self)
        # a strategy whose client training runs a hook (a gradient correction, a loss term) says whether DP-SGD's
        # per-sample clipping and noise keep their meaning with it (its `dp_compatible` fact; default yes)
        if self.train.dp.enabled and not STRATEGIES.entry(self.fl.strategy).facts.get("dp_compatible", True):
            raise ConfigError("train.dp.enabled", True, f"false with fl.strategy={self.fl.strategy!r} (its training "
                                                        f"hook is not compatible with DP-SGD)")

    def cohort_size(self) -> int:
        """How many clients a round samples (before dropout)."""
        cpr = self.fl.clients_per_round
        k = int(cpr) if cpr > 1 else max(1, int(round(cpr * self.data.num_clients)))
        return min(k, self.data.num_clients)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = to_plain(dataclasses.asdict(self))
        # fields added after results were published are left out at their default: every earlier config keeps
        # its hash (its run key) and its saved form byte-identical, and a run that sets one gets its own key
        for (section, name), default in LATER_FIELD_DEFAULTS.items():
            if d[section][name] == default and type(d[section][name]) is type(default):
                del d[section][name]
        if not d["plugins"]:
            del d["plugins"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        return _from_dict(cls, d, prefix="")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = _dump_yaml(self.to_dict()) if path.suffix in (".yaml", ".yml") else self.to_json()
        from fedbench.atomic import atomic_write_text
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentConfig":
        from fedbench.yamlio import read_config_file    # one reader: suffix, syntax, empty file, YAML 1.2 floats
        return cls.from_dict(read_config_file(path))

    def hash(self) -> str:
        """A stable 12-hex-digit key of every field (the name included)."""
        return config_hash(self.to_dict())

    def replace(self, **changes) -> "ExperimentConfig":
        """A copy with dotted-path changes, e.g. ``cfg.replace(**{"peft.rank": 4, "seed": 1})``.

        Options belong to their component: a change of ``fl.strategy`` (``fl.aggregator``) that does not also
        set ``fl.options`` (``fl.aggregator_options``) whole starts the new component from its default options,
        with any ``fl.options.<name>`` changes on top."""
        d = to_plain(dataclasses.asdict(self))       # every field (to_dict leaves some out at their default)
        d.setdefault("plugins", [])
        for component, options in OPTION_FIELDS:
            if component in changes and changes[component] != _get_dotted(d, component) and options not in changes:
                section, name = options.split(".")
                d[section][name] = {}
        for dotted, value in changes.items():
            node = d
            *parents, leaf = dotted.split(".")
            for p in parents:
                if p not in node or not isinstance(node[p], dict):
                    raise ConfigError(dotted, value, "a dotted path to an existing config field")
                node = node[p]
            # an option may be named before it exists (the component's options class validates the name)
            if leaf not in node and ".".join(parents) not in dict(OPTION_FIELDS).values():
                raise ConfigError(dotted, value, "a dotted path to an existing config field")
            node[leaf] = value
        return ExperimentConfig.from_dict(d)


# (section, field) -> default of the fields ExperimentConfig.to_dict leaves out at their default
LATER_FIELD_DEFAULTS = {("train", "device"): "auto", ("train", "precision"): "fp32",
                        ("fl", "client_batching"): False}


OPTION_FIELDS = (("fl.strategy", "fl.options"), ("fl.aggregator", "fl.aggregator_options"),
                 ("data.federation", "data.federation_options"))


def _get_dotted(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def config_hash(d: dict) -> str:
    blob = json.dumps(to_plain(d), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def to_plain(x):
    """Nested dicts/lists/tuples as plain dicts and lists (JSON's view of a config)."""
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x


def _from_dict(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", d, "a mapping of field names to values")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(prefix + unknown[0], d[unknown[0]], f"a field of {cls.__name__}: {sorted(known)}")
    kwargs = {}
    for name, value in d.items():
        sub = _NESTED.get((cls, name))
        if sub is not None:
            kwargs[name] = _from_dict(sub, value, prefix + name + ".")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    obj = cls.__new__(cls)
    # build without running ExperimentConfig.__post_init__ twice: fill defaults, then set values
    for f in fields(cls):
        if f.name in kwargs:
            setattr(obj, f.name, kwargs[f.name])
        elif f.default is not dataclasses.MISSING:
            setattr(obj, f.name, f.default)
        else:
            setattr(obj, f.name, f.default_factory())
    if cls is ExperimentConfig:
        obj.validate()
    return obj


_NESTED = {
    (ExperimentConfig, "data"): DataConfig,
    (ExperimentConfig, "model"): ModelConfig,
    (ExperimentConfig, "peft"): PeftConfig,
    (ExperimentConfig, "train"): TrainConfig,
    (ExperimentConfig, "fl"): FLConfig,
    (TrainConfig, "dp"): DPConfig,
}


def _dump_yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(d, sort_keys=False)
