"""AutoFedNLP / FedAdapter's progressive configurator (Cai et al., arXiv 2205.10162) as a strategy on the one loop.

A configuration is (depth d, width w): adapters (``peft.method="adapter"``: bottleneck w) or LoRA
(``peft.method="lora"``: rank w) in the top d layers; the run starts at ``(peft.depth, peft.adapter_width)``
(``peft.rank`` for LoRA). Training runs in periods. In a period up to three *trial groups* train, each its own
FedAvg job on its own clients: the current configuration ("shallow"), a deeper one (d + depth_step, w) and a
wider one (d, w + width_step) (the official ``trial_error_w&d.py``). A period is a simulated-time budget,
``time_threshold * (expand * d + 1)`` seconds (official defaults 90 s, expand 4), and each group runs
``floor(budget / t(d, w))`` rounds, t = one round's simulated time on the configured device (local steps'
compute + up- and download of the group's state): groups are compared at equal simulated time. At the
period's end the group with the best accuracy on a validation split carved from the task's *training*
split wins (ties: current, then wider, then deeper, the official order), and every group of the next period
starts from the winner's weights grown into its layout without changing the function
(:func:`~fedbench.models.tuners.adapter.grow_adapter_state` / ``grow_lora_state``).

How the groups map onto the loop. One loop round = one round of one trial group, with the loop's whole
cohort (``fl.clients_per_round``): every group gets as many clients per round as a fixed-configuration
baseline does. Within a period the groups' rounds are interleaved in the order their simulated end times
fall (ties: group order), so the loop's records run forward in simulated time and the three parallel jobs
of the official code become one sequence of rounds; the decision is taken in ``aggregate`` after the
period's last round (when every group has spent its budget). This needs no loop-level change and keeps
sampling, dropout, DP, robust rules, the update guard, checkpoints and Flower working unchanged: each
round is an ordinary FedAvg round of one group. The global model holds every group's tensors, keyed
``g<i>/<name>``; a client receives and sends only its group's.

The deployable model between decisions is the current configuration's group (group 0): ``evaluate`` scores it,
so a row's accuracy is what the configurator would serve at that row's simulated time; after a decision
group 0 holds the winner. ``round_record`` adds each round's group and its configuration (``group_depth``,
``group_width``), the deployable configuration (``depth``, ``width``), the period, the decision and the simulated
clock (``sim_s``) to the loop's records.

The run ends on the configurator's own clock when ``horizon_s`` is set (``finished``: after the first round
whose simulated time reaches it, the fixed baselines' horizon, so every method trains for the same simulated
time; ``fl.rounds`` is then only a cap), otherwise after ``fl.rounds`` loop rounds.

Options (:class:`ConfiguratorOptions`) are the strategy's: ``fl.options`` of the run config, hashed with it.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fedbench.errors import ConfigError
from fedbench.fl.strategy import FedAvg, GlobalModel
from fedbench.options import Options, check_bool, check_choice, check_int, check_number
from fedbench.registry import STRATEGIES


# -- the simulated clock ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceProfile:
    """A client device of the simulated clock.

    ``flops_per_s``: sustained FLOP/s of transformer training (the assumed profiles); ``step_s``: measured
    seconds of one local step per trained depth (index d = depth, 0 unused; ``full`` = full fine-tuning), with
    the frozen prefix cached; ``prefix_layer_s``: measured seconds of one frozen layer's forward for one
    step's batch (what a client without the cache adds per frozen layer). Up- and downlink in bits per second.
    """
    name: str
    uplink_bps: float
    downlink_bps: float
    flops_per_s: float | None = None
    step_s: tuple[float, ...] | None = None
    full_step_s: float | None = None
    prefix_layer_s: float | None = None
    note: str = ""


DEVICES = {
    # assumed (stated, not measured): a low-end phone CPU, ~2 GFLOP/s sustained fp32 training, 1 Mbit/s both ways
    # (the official code prices up- and download at one bandwidth, ``bw``)
    "slow_phone": DeviceProfile("slow_phone", uplink_bps=1e6, downlink_bps=1e6, flops_per_s=2e9,
                                note="assumed: 2 GFLOP/s, 1 Mbit/s up and down"),
    # assumed: a Jetson-class edge board, ~20 GFLOP/s, 20 Mbit/s both ways
    "fast_edge": DeviceProfile("fast_edge", uplink_bps=20e6, downlink_bps=20e6, flops_per_s=20e9,
                               note="assumed: 20 GFLOP/s, 20 Mbit/s up and down"),
    # measured here (fedbench.experiments.autofednlp.measure_device, 2 CPU cores, torch 2 threads, MiniLM,
    # batch 8 x 32 tokens, adapters w=8, median of 20 steps; 2026-12-01): seconds per local step at depth 1..6 with the prefix
    # cached, full fine-tuning, and one frozen layer's forward; network assumed 10 Mbit/s both ways
    "this_cpu": DeviceProfile("this_cpu", uplink_bps=10e6, downlink_bps=10e6,
                              step_s=(0.0, 0.0315, 0.0575, 0.0762, 0.1013, 0.1111, 0.1355),
                              full_step_s=0.4685, prefix_layer_s=0.0115,
                              note="measured on this machine (2 cores); network assumed 10 Mbit/s"),
}


def layer_flops(tokens: int, layer_params: int = 1_769_472, hidden: int = 384, seq: int = 32) -> float:
    """Forward FLOPs of one MiniLM layer over `tokens` tokens in sequences of `seq`: 2 per dense weight per token
    plus attention's Q K^T and attention x V (2 * 2 * hidden * seq per token)."""
    return float(tokens * (2 * layer_params + 4 * hidden * seq))


def step_seconds(device: DeviceProfile, depth: int | None, batch_size: int, max_length: int, cached: bool = True,
                 num_layers: int = 6) -> float:
    """Simulated seconds of one local step at `depth` (None: full fine-tuning) on `device`.

    FLOP profiles: the d trained layers cost a forward and a backward (1x forward for frozen layers carrying
    adapters: gradients of activations only; 2x for full fine-tuning: weights too), the frozen prefix a forward
    unless cached. Measured profiles: the measured step time (plus the prefix's forward when not cached)."""
    if device.flops_per_s is None:
        if depth is None:
            return float(device.full_step_s)
        return float(device.step_s[depth] + (0.0 if cached else (num_layers - depth) * device.prefix_layer_s))
    f = layer_flops(batch_size * max_length, seq=max_length)
    if depth is None:
        return num_layers * 3 * f / device.flops_per_s
    return (depth * 2 * f + (0.0 if cached else (num_layers - depth) * f)) / device.flops_per_s


def round_seconds(device: DeviceProfile, depth: int | None, state_bytes: int, local_steps: int, batch_size: int,
                  max_length: int, cached: bool = True) -> float:
    """One client's round: local steps + download and upload of the `state_bytes` that travel each way.
    Clients of a round run in parallel and do the same work, so this is the round's time."""
    comm = 8.0 * state_bytes / device.downlink_bps + 8.0 * state_bytes / device.uplink_bps
    return local_steps * step_seconds(device, depth, batch_size, max_length, cached) + comm


# -- options ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfiguratorOptions(Options):
    """The configurator's own settings (``fl.options`` of ``fl.strategy="autofednlp"``)."""
    depth_step: int = 1
    width_step: int = 8
    max_width: int = 64
    time_threshold: float = 90.0      # official default (seconds); the period budget is this * (expand * d + 1)
    expand: int = 4
    device: str = "slow_phone"
    validation_samples: int = 500
    cache: bool = True                # clients cache the frozen prefix (priced in the clock; no-cache control)
    # simulated seconds the run trains for: it ends after the first round whose clock reaches this (the fixed
    # configurations' horizon, so every method gets the same simulated time); None = fl.rounds loop rounds
    horizon_s: float | None = None
    # a decision on an interval: a challenger (deeper or wider) replaces the current configuration only when its
    # validation accuracy exceeds the current one's by more than decision_z standard errors of the paired
    # difference on the validation rows (per-example correctness of both models on the same rows); 0 = the
    # official rule, the plain best accuracy (a gap of 0.01 on 500 rows has a standard error near 0.02: noise)
    decision_z: float = 0.0

    def validate(self, prefix: str = "fl.options") -> None:
        for key in ("depth_step", "width_step", "max_width", "expand", "validation_samples"):
            check_int(f"{prefix}.{key}", getattr(self, key), 1)
        check_number(f"{prefix}.decision_z", self.decision_z, 0, float("inf"), high_open=True)
        check_number(f"{prefix}.time_threshold", self.time_threshold, 0, float("inf"), low_open=True,
                     high_open=True)
        check_choice(f"{prefix}.device", self.device, sorted(DEVICES))
        check_bool(f"{prefix}.cache", self.cache)
        if self.horizon_s is not None:
            check_number(f"{prefix}.horizon_s", self.horizon_s, 0, float("inf"), low_open=True, high_open=True)


def paired_se(correct_a, correct_b) -> float:
    """Standard error of mean(correct_a) - mean(correct_b) on the same rows: sd of the per-row differences / sqrt(n)
    (the rows both models got right or wrong cancel, so this is the McNemar-style paired error)."""
    d = np.asarray(correct_a, float) - np.asarray(correct_b, float)
    return float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")


def choose_group(accs, correct, z: float = 0.0) -> tuple[int, list[float]]:
    """(the winning group, each group's paired standard error against group 0). Group 0 is the current
    configuration, 1 the deeper, 2 the wider (those that exist). z = 0: the official rule, the best accuracy
    (ties: current, then wider, then deeper, the official if-chain). z > 0: only challengers whose gain over the
    current configuration exceeds z paired standard errors compete; none does: stay."""
    se = [0.0] + [paired_se(c, correct[0]) for c in correct[1:]]
    pref = {0: 0, 2: 1, 1: 2}
    ok = [g for g in range(len(accs)) if g == 0 or z == 0 or accs[g] - accs[0] > z * se[g]]
    return max(ok, key=lambda g: (accs[g], -pref.get(g, g))), se


def _check(cfg) -> None:
    if cfg.peft.method not in ("adapter", "lora"):
        raise ConfigError("peft.method", cfg.peft.method, "'adapter' or 'lora' with fl.strategy='autofednlp' "
                          "(a configuration is depth x adapter width or LoRA rank)")
    if cfg.peft.depth is None:
        raise ConfigError("peft.depth", None, "the starting depth (an integer) with fl.strategy='autofednlp'")
    if cfg.fl.lora_aggregation != "factors":
        raise ConfigError("fl.lora_aggregation", cfg.fl.lora_aggregation, "'factors' with fl.strategy='autofednlp'")


@STRATEGIES.register("autofednlp", check=_check, options=ConfiguratorOptions)
class AutoFedNLP(FedAvg):
    """The progressive (depth, width) configurator with trial groups and equal-time periods (module docstring)."""

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.num_layers = model.num_layers
        self.num_labels = None
        self.models: dict = {}          # (d, w) -> model (built lazily; same seeds as the loop's model)
        self.val = None                 # (split, indices, cache): the decisions' validation data
        # server state (checkpointed)
        self.period = 0
        self.configs: list[tuple[int, int]] = []     # the period's groups: [current, deeper?, wider?]
        self.plan: list[int] = []                    # group of each of the period's rounds, in order
        self.step = 0                                # rounds of the period done
        self.period_start = 0.0                      # simulated seconds at the period's start
        self.history: list[dict] = []                # one row per decision
        self._last: dict = {}
        self._eval_memo = None

    # -- setup --------------------------------------------------------------------------------------
    def attach(self, data) -> None:
        self.num_labels = data.num_labels
        self.pad_id = data.pad_id

    def cache_depths(self, model) -> list[int]:
        """Every prefix depth: the trial groups train models of every depth over the same caches."""
        return list(range(1, self.num_layers))

    def width_of(self, peft) -> int:
        return peft.rank if peft.method == "lora" else peft.adapter_width

    def peft_for(self, config):
        d, w = config
        key = "peft.rank" if self.cfg.peft.method == "lora" else "peft.adapter_width"
        return self.cfg.replace(**{"peft.depth": int(d), key: int(w)}).peft

    def model_for(self, config):
        from fedbench.fl.seeding import derive_seed
        from fedbench.models import build_model, trainable_state
        config = (int(config[0]), int(config[1]))
        if config not in self.models:
            m = build_model(self.cfg.model, self.peft_for(config), self.num_labels,
                            seed=derive_seed(self.cfg.seed, "init"))
            self.models[config] = (m, trainable_state(m))
        return self.models[config]

    def initial_model(self, model) -> GlobalModel:
        from fedbench.models import trainable_state
        start = (int(self.cfg.peft.depth), int(self.width_of(self.cfg.peft)))
        self.models[start] = (model, trainable_state(model))
        state = trainable_state(model)
        self.start_period(start, state, 0.0)
        return GlobalModel(self.group_states(start, state))

    # -- periods ------------------------------------------------------------------------------------
    def trial_configs(self, config) -> list[tuple[int, int]]:
        """The period's groups: current, deeper (d + depth_step), wider (w + width_step), within bounds."""
        d, w = config
        o = self.options
        out = [(d, w)]
        if d + o.depth_step <= self.num_layers:
            out.append((d + o.depth_step, w))
        if w + o.width_step <= o.max_width:
            out.append((d, w + o.width_step))
        return out

    def group_states(self, winner, state) -> OrderedDict:
        """Every group's starting state (the winner's, grown into each layout), keyed g<i>/<name>."""
        from fedbench.models.tuners.adapter import grow_adapter_state
        from fedbench.models.tuners.lora import grow_lora_state
        grow = grow_lora_state if self.cfg.peft.method == "lora" else grow_adapter_state
        out = OrderedDict()
        for i, c in enumerate(self.configs):
            s = state if c == tuple(winner) else grow(state, self.model_for(c)[1])
            out.update((f"g{i}/{k}", v) for k, v in s.items())
        return out

    def state_bytes(self, config) -> int:
        from fedbench.models import state_nbytes
        return int(state_nbytes(self.model_for(config)[1]))

    def round_time(self, config, device: str | None = None, cached: bool | None = None) -> float:
        c = self.cfg
        dev = DEVICES[device or self.options.device]
        return round_seconds(dev, int(config[0]), self.state_bytes(config), c.train.local_steps or 1,
                             c.train.batch_size, c.data.max_length, self.options.cache if cached is None else cached)

    def start_period(self, winner, state, start_s: float) -> None:
        """Set the period's groups and its round plan: group g runs floor(budget / t_g) rounds (at least one),
        interleaved by simulated end time (ties: group order)."""
        self.configs = self.trial_configs(tuple(winner))
        budget = self.options.time_threshold * (self.options.expand * int(winner[0]) + 1)
        ends = []
        for g, conf in enumerate(self.configs):
            t = self.round_time(conf)
            n = max(1, int(budget // t))
            ends += [((k + 1) * t, g) for k in range(n)]
        self.plan = [g for _, g in sorted(ends)]
        self.step = 0
        self.period_start = float(start_s)
        self.budget = float(budget)

    def group_keys(self, g: int, global_model) -> tuple[str, ...]:
        p = f"g{g}/"
        return tuple(k for k in global_model.state if k.startswith(p))

    # -- server hooks -------------------------------------------------------------------------------
    def current_group(self) -> int:
        return self.plan[self.step]

    def configure_round(self, round_idx, clients, global_model):
        g = self.current_group()
        keys = self.group_keys(g, global_model)
        down = GlobalModel(OrderedDict((k, global_model.state[k]) for k in keys))
        d, w = self.configs[g]
        opts = {"group": g, "depth": int(d), "width": int(w), "cache": bool(self.options.cache)}
        return [self.instruction(int(c), round_idx, down, train_keys=keys, send_keys=keys, options=opts)
                for c in clients]

    def aggregate(self, global_model, updates, round_idx):
        g = self.current_group()
        gm = super().aggregate(global_model, updates, round_idx)
        k = self.plan[: self.step + 1].count(g)
        t = self.round_time(self.configs[g])
        self._last = {"group": g, "group_depth": self.configs[g][0], "group_width": self.configs[g][1],
                      "period": self.period, "sim_s": self.period_start + k * t, "decision": ""}
        self.step += 1
        if self.step == len(self.plan):      # every group has spent its budget: decide, grow, next period
            gm = self.decide(gm, round_idx)
        self._eval_memo = None if g == 0 or self.step == 0 else self._eval_memo
        return gm

    def finished(self, round_idx: int) -> bool:
        """The run's simulated clock (the round just aggregated: its group's end time, or the period's end
        after a decision) has reached ``horizon_s``. Groups run side by side in simulated time and the plan is
        in end-time order, so the clock never goes back."""
        h = self.options.horizon_s
        return h is not None and float(self._last.get("sim_s", 0.0)) >= float(h) - 1e-9

    def decide(self, gm: GlobalModel, round_idx: int) -> GlobalModel:
        evals = [self.validation_eval(c, self.unprefix(gm.state, g)) for g, c in enumerate(self.configs)]
        accs = [e["accuracy"] for e in evals]
        best, se = choose_group(accs, [e["correct"] for e in evals], self.options.decision_z)
        winner, state = self.configs[best], self.unprefix(gm.state, best)
        end = self.period_start + max(self.plan.count(g) * self.round_time(c) for g, c in enumerate(self.configs))
        self.history.append({"period": self.period, "round": int(round_idx), "winner": list(winner),
                             "val_accuracy": accs, "configs": [list(c) for c in self.configs], "end_s": end,
                             "gap_se": se})
        self._last.update(sim_s=end, decision=f"{winner[0]}x{winner[1]}",
                          val_accuracy=float(accs[best]))
        if self.options.decision_z > 0:     # the decision's evidence (columns only where the interval rule is on)
            gaps = [a - accs[0] for a in accs[1:]]
            self._last.update(decision_gap=float(max(gaps)) if gaps else float("nan"),
                              decision_se=float(se[int(np.argmax(gaps)) + 1]) if gaps else float("nan"))
        self.period += 1
        self.start_period(winner, state, end)
        if self.optimizer is not None:        # the layouts changed: restart the server optimizer's moments
            for name in ("velocity", "m", "v"):
                if hasattr(self.optimizer, name):
                    setattr(self.optimizer, name, None)
        return GlobalModel(self.group_states(winner, state))

    @staticmethod
    def unprefix(state, g: int) -> OrderedDict:
        p = f"g{g}/"
        return OrderedDict((k[len(p):], v) for k, v in state.items() if k.startswith(p))

    def validation_data(self):
        """`validation_samples` rows of the task's training split outside the clients' subsample
        (:func:`fedbench.fl.data.validation_indices`), tokenized once; their prefix outputs are cached per
        depth in one fixed order (so a decision never depends on the history of the cache)."""
        if self.val is None:
            from fedbench.data import load_task
            from fedbench.fl.data import text_encoder, validation_indices
            from fedbench.models.inputs import ActivationCache
            ds = load_task(self.cfg.data.task)["train"]
            _, idx = validation_indices(self.cfg, self.options.validation_samples, len(ds))
            encode, pad_id = text_encoder(self.cfg)
            split = encode(ds.select(idx))
            self.val = (split, np.arange(len(idx)), ActivationCache(split, pad_id), pad_id)
        return self.val

    def validation_accuracy(self, config, state) -> float:
        return self.validation_eval(config, state)["accuracy"]

    def validation_eval(self, config, state) -> dict:
        """{"accuracy", "correct" (per validation row, 0/1)} of `config` at `state`."""
        from fedbench.fl.client import evaluate
        from fedbench.models import load_trainable_state
        split, idx, cache, pad_id = self.validation_data()
        model, _ = self.model_for(config)
        load_trainable_state(model, state)
        if model.frozen_prefix > 0:
            cache.fill(model, idx, model.frozen_prefix)
        ev = evaluate(model, split, idx, cache=cache if model.frozen_prefix > 0 else None, pad_id=pad_id,
                      return_predictions=True)
        p = ev["predictions"]
        return {"accuracy": float(ev["accuracy"]), "correct": (p["prediction"] == p["label"]).astype(float)}

    def evaluate(self, run, global_model, predictions: bool = False) -> dict:
        """Test accuracy of the deployable model: group 0 (the current configuration; the winner after a
        decision). Unchanged since the last evaluation (another group trained): the same result."""
        if self._eval_memo is not None and not predictions:
            return self._eval_memo
        from fedbench.fl.client import evaluate
        from fedbench.models import load_trainable_state
        model, _ = self.model_for(self.configs[0])
        load_trainable_state(model, self.unprefix(global_model.state, 0))
        ev = evaluate(model, run.data.test, run.data.test_indices, cache=run.test_cache, pad_id=run.data.pad_id,
                      return_predictions=predictions)
        if not predictions:
            self._eval_memo = ev
        return ev

    def round_record(self, round_idx: int) -> dict:
        """The loop's extra columns of the round just finished."""
        rec = {"group": -1, "group_depth": 0, "group_width": 0, "period": 0, "sim_s": float("nan"), "decision": "",
               "val_accuracy": float("nan")}
        if self.options.decision_z > 0:     # every round has the decision columns (NaN between decisions)
            rec.update(decision_gap=float("nan"), decision_se=float("nan"))
        rec.update(self._last)
        # the deployable model's configuration (what `evaluate` scored): group 0's, the winner after a decision
        rec["depth"], rec["width"] = int(self.configs[0][0]), int(self.configs[0][1])
        return rec

    # -- client side --------------------------------------------------------------------------------
    def client_update(self, run, ins, store):
        from fedbench.fl.client import train_client
        g, config = int(ins.options["group"]), (int(ins.options["depth"]), int(ins.options["width"]))
        if self.num_labels is None:
            self.num_labels = run.data.num_labels
        model, _ = self.model_for(config)
        p = f"g{g}/"
        start = OrderedDict((k[len(p):], v) for k, v in ins.state.items())
        from fedbench.models import load_trainable_state
        load_trainable_state(model, start)
        update = train_client(
            model, start, run.client_split(ins.client_id), self.local_indices(run, ins),
            self.train_config(run, ins), seed=run.client_seed(ins.round_idx, ins.client_id),
            client_id=ins.client_id, cache=run.train_cache if ins.options.get("cache", True) else None,
            pad_id=run.data.pad_id, dp_state=store.setdefault("dp", {}), dp_total_rounds=run.cfg.fl.rounds)
        update.state = OrderedDict((p + k, v) for k, v in update.state.items())
        return update

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self):
        tensors, meta = super().state_dict()
        meta.update(period=self.period, configs=[list(c) for c in self.configs], plan=list(self.plan),
                    step=self.step, period_start=self.period_start, budget=self.budget,
                    history=self.history, last=self._last)
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        super().load_state_dict(tensors, meta)
        self.period, self.step = int(meta["period"]), int(meta["step"])
        self.configs = [tuple(int(x) for x in c) for c in meta["configs"]]
        self.plan = [int(g) for g in meta["plan"]]
        self.period_start, self.budget = float(meta["period_start"]), float(meta["budget"])
        self.history, self._last = list(meta["history"]), dict(meta["last"])
        self._eval_memo = None
