"""Continual (class-incremental) federated LoRA on the one loop, and LoRM (Salami et al., 2024).

One continual protocol for every method, the official one (aimagelab/fed-mammoth, ``cl_merge='individual_mean'``):

- the rounds are cut into tasks of ``rounds_per_task`` rounds (:class:`TaskSchedule`); a round's instruction
  names its task (``options['task']``) and the client trains on its data of that task;
- every task starts **fresh LoRA factors** (peft's init: A kaiming-uniform, B = 0); clients train the current
  task's factors on the frozen pretrained weight W0 (the previous tasks' products do not enter training);
- at the end of task t the server adds the task's dense product D_t (the factors' s B A plus anything a
  rank-growing rule folded into the base during the task) to a running sum; the **served model** (what is
  evaluated) is W0 + mean_{k <= t} D_k, the running mean the official code keeps as ``old_delta``, for the
  strategies whose clients send no Gram matrices; LoRM and RegMean (``fl.options.cross_task='gram'``, their
  default) serve LoRM's **cross-task merge** instead (official ``end_task_server``): from the second task on,
  W0 + (sum_t D_t G_t) pinv(sum_t G_t) (:func:`fedbench.merging.lorm.cross_task_merge`), G_t the clients'
  summed Gram matrices of the task's last round that sent them; ``score_running_mean`` also scores the
  running mean on the same run (an ablation: training never sees the served model, so it is the same run);
- the classifier head is shared by every task and trains on (task-masked logits), FedAvg'd by sample count.

Strategies (``fl.strategy``):

- ``continual``: that protocol with the configured rule and LoRA semantics (``fl.lora_aggregation``):
  ``factors`` = FedIT, ``svd`` = exact product average re-factorised at rank r, ``stack`` = exact product
  average folded into the base each round (rank grows with rounds x clients). With a tuner without LoRA
  factors (e.g. the top layer unfrozen) it is sequential FedAvg over the tasks.
- ``lorm``: LoRM. Within a task the trained factor alternates **per round**, B, A, B, ... (restarting at B every
  task, ``set_train_matrix``); only that factor (and the head) trains and travels up, with one Gram matrix
  G_i = X_i^T X_i per distinct layer input (query and value share one), float32, upper triangle only; the
  server solves the factor in closed form (:func:`fedbench.merging.lorm.solve_B` / ``solve_A``, float64).
  ``solve='average'`` (a control) averages the trained factor instead: with the other factor shared that is
  the exact product average, so only the solve differs from LoRM (Grams then travel in a task's last round
  only, for the cross-task merge).
- ``regmean``: every client trains both factors and sends its Gram matrices; the server merges the dense
  products s B_i A_i by RegMean, then represents the merge by the LoRA semantics: ``svd`` re-factorises it at
  rank r (equal capacity), ``stack`` folds it into the base (unbounded rank).

Without task data (a plain :class:`fedbench.fl.FederatedData`) a run is one task of ``fl.rounds`` rounds.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from fedbench.errors import ConfigError
from fedbench.merging.aggregators import svd_of_product
from fedbench.fl.federations import TaskSchedule, TaskSequenceData
from fedbench.fl.strategy import FedAvg, GlobalModel, check_lora_semantics, has_lora_factors
from fedbench.fl.grams import layer_input_grams
from fedbench.merging import lorm as L
from fedbench.options import Options, check_bool, check_choice, check_number
from fedbench.registry import STRATEGIES

QKV = ("query", "key", "value")


def input_groups(modules) -> "OrderedDict[str, list]":
    """{gram name: [LoRA modules reading that input]}: query, key and value of one attention block read the
    same hidden states (one Gram matrix); every other layer its own input."""
    groups: OrderedDict = OrderedDict()
    for m in modules:
        parent, leaf = m.name.rsplit(".", 1)
        groups.setdefault(f"{parent}.qkv" if leaf in QKV else m.name, []).append(m)
    return groups


def pack_upper(g: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a symmetric matrix, row by row: what travels."""
    i, j = torch.triu_indices(g.shape[0], g.shape[0])
    return g[i, j].contiguous()


def unpack_upper(v: torch.Tensor) -> torch.Tensor:
    d = int((np.sqrt(8 * v.numel() + 1) - 1) / 2)
    i, j = torch.triu_indices(d, d)
    g = torch.zeros((d, d), dtype=v.dtype)
    g[i, j] = v
    g[j, i] = v
    return g


def per_task_accuracy(predictions: dict, task_rows: list) -> list[float]:
    """Accuracy on each task's rows, read off `predictions` (:func:`fedbench.fl.client.evaluate`'s
    ``{"test_index", "label", "prediction"}`` over a set holding every row of `task_rows`); nan for no rows."""
    correct = dict(zip(np.asarray(predictions["test_index"]).tolist(),
                       (np.asarray(predictions["label"]) == np.asarray(predictions["prediction"])).tolist()))
    return [float(np.mean([correct[int(i)] for i in rows])) if len(rows) else float("nan") for rows in task_rows]


def _check_continual(cfg) -> None:
    check_lora_semantics(cfg)


def _check_lorm(cfg) -> None:
    if not has_lora_factors(cfg.peft.method):
        raise ConfigError("fl.strategy", "lorm", f"a LoRA tuner (peft.method={cfg.peft.method!r} has no factors)")
    if cfg.fl.lora_aggregation != "factors":
        raise ConfigError("fl.lora_aggregation", cfg.fl.lora_aggregation,
                          "'factors' with fl.strategy='lorm' (the closed-form solve decides the factors)")
    if cfg.fl.aggregator != "fedavg":
        raise ConfigError("fl.aggregator", cfg.fl.aggregator,
                          "'fedavg' with fl.strategy='lorm' (the head is FedAvg'd; the factors are solved)")


def _check_regmean(cfg) -> None:
    if not has_lora_factors(cfg.peft.method):
        raise ConfigError("fl.strategy", "regmean", f"a LoRA tuner (peft.method={cfg.peft.method!r} has no factors)")
    if cfg.fl.lora_aggregation not in ("svd", "stack"):
        raise ConfigError("fl.lora_aggregation", cfg.fl.lora_aggregation,
                          "'svd' (RegMean re-factorised at rank r) or 'stack' (folded into the base, unbounded) "
                          "with fl.strategy='regmean'")
    if cfg.fl.aggregator != "fedavg":
        raise ConfigError("fl.aggregator", cfg.fl.aggregator, "'fedavg' with fl.strategy='regmean'")


@STRATEGIES.register("continual", check=_check_continual)
class Continual(FedAvg):
    """The continual protocol above around FedAvg's rule and LoRA semantics."""

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.schedule = TaskSchedule(cfg.fl.rounds, 1)
        self.old_sum: dict[str, torch.Tensor] = {}
        self.done = 0               # tasks finished (their products are in old_sum)
        self.rounds_in_task = 0     # rounds aggregated in the current task
        self.last_round = 0
        self.acc_rows: list[dict] = []      # a[t, j] after each task (test), and validation accuracy
        self.merge_rows: list[dict] = []
        self._heldout: dict = {}            # (round, client) -> held-out Gram matrices (diagnostic, never sent)
        # the cross-task merge's running sums: sum_t D_t G_t per module, sum_t G_t per layer input, and the
        # current task's latest summed client Grams (float64, CPU)
        self.cross_dg: dict[str, torch.Tensor] = {}
        self.cross_g: dict[str, torch.Tensor] = {}
        self.task_grams: dict[str, torch.Tensor] = {}
        self.mean_predictions = None        # final predictions of the running mean (score_running_mean)

    @property
    def cross_task(self) -> str:
        """How the served model combines the tasks: 'mean' (running mean) or 'gram' (LoRM's cross-task merge)."""
        return getattr(self.options, "cross_task", "mean")

    def gram_name(self, m) -> str:
        return next(g for g, ms in input_groups(self.lora.modules).items() if m in ms)

    def attach(self, data) -> None:
        """Called by the loop with its data: a :class:`TaskSequenceData` sets the task schedule."""
        sched = getattr(data, "schedule", None)
        if sched is not None:
            if sched.rounds_per_task * sched.num_tasks != self.cfg.fl.rounds:
                raise ConfigError("fl.rounds", self.cfg.fl.rounds,
                                  f"rounds_per_task x num_tasks = {sched.rounds_per_task * sched.num_tasks}")
            self.schedule = sched

    # -- server side --------------------------------------------------------------------------------
    def initial_model(self, model) -> GlobalModel:
        gm = super().initial_model(model)
        params = dict(model.named_parameters())
        # every LoRA base weight is named in base_delta (zeros when nothing is folded), so that loading a
        # model always resets it (after an evaluation of the served model)
        # (on the CPU, beside the global state, whatever device the model is on)
        gm.base_delta = {m.base_key: torch.zeros_like(params[m.base_key], device="cpu") for m in self.lora.modules}
        self.old_sum = {m.base_key: torch.zeros_like(params[m.base_key], dtype=torch.float64, device="cpu")
                        for m in self.lora.modules}
        return gm

    def configure_round(self, round_idx, clients, global_model):
        t = self.schedule.task_of(round_idx)
        return [self.instruction(int(c), round_idx, global_model, options={"task": t}) for c in clients]

    def aggregate(self, global_model, updates, round_idx):
        return self.end_round(super().aggregate(global_model, updates, round_idx), round_idx)

    def note_grams(self, updates) -> None:
        """Keep the sum over clients of this round's Gram matrices: the task's G_t for the cross-task merge."""
        grams = [self.grams_of(u) for u in updates]
        if grams and grams[0]:
            self.task_grams = {g: sum(x[g] for x in grams) for g in grams[0]}

    def task_delta(self, gm: GlobalModel, m) -> torch.Tensor:
        """The current task's dense update of module m: what is folded into the base plus s B A."""
        return gm.base_delta[m.base_key].double() + m.scaling * gm.state[m.b_key].double() @ gm.state[m.a_key].double()

    def end_round(self, gm: GlobalModel, round_idx: int) -> GlobalModel:
        """Count the round; at the end of a task (not the last) bank its product and start fresh factors."""
        self.last_round, self.rounds_in_task = int(round_idx), self.rounds_in_task + 1
        last_of_task = self.schedule.round_in_task(round_idx) == self.schedule.rounds_per_task - 1
        if not (last_of_task and round_idx < self.cfg.fl.rounds) or not self.lora.modules:
            return gm
        state = OrderedDict(gm.state)
        if self.cross_task == "gram":
            self.cross_dg, self.cross_g = self.cross_sums(gm)
        for i, m in enumerate(self.lora.modules):
            self.old_sum[m.base_key] = self.old_sum[m.base_key] + self.task_delta(gm, m)
            state[m.a_key], state[m.b_key] = self.fresh_factors(gm.state, m, i, round_idx)
        self.done, self.rounds_in_task, self.task_grams = self.done + 1, 0, {}
        return GlobalModel(state, {k: torch.zeros_like(v) for k, v in gm.base_delta.items()})

    def cross_sums(self, gm: GlobalModel) -> tuple[dict, dict]:
        """(sum_t D_t G_t, sum_t G_t) over the finished tasks and the current one (if it has Grams). A task
        whose clients never sent Grams (all dropped) has no G_t and stays out of the merge."""
        dg, g = dict(self.cross_dg), dict(self.cross_g)
        if not (self.rounds_in_task > 0 and self.task_grams):
            return dg, g
        for name, G in self.task_grams.items():
            g[name] = g[name] + G if name in g else G
        for m in self.lora.modules:
            add = self.task_delta(gm, m) @ self.task_grams[self.gram_name(m)]
            dg[m.base_key] = dg[m.base_key] + add if m.base_key in dg else add
        return dg, g

    def served_model(self, gm: GlobalModel, rule: str | None = None) -> GlobalModel:
        """W0 + the tasks' products combined by `rule` (default the strategy's ``cross_task``): 'mean', the mean
        of the finished tasks' products and the current one (if it has trained); 'gram', from the second task
        on, (sum_t D_t G_t) pinv(sum_t G_t) (ridge as the strategy's solves, towards the mean)."""
        if not self.lora.modules:
            return gm
        k = self.done + (1 if self.rounds_in_task > 0 else 0)
        if k == 0:
            return gm
        rule = rule or self.cross_task
        dg, g = self.cross_sums(gm) if rule == "gram" and k >= 2 else ({}, {})
        state = OrderedDict(gm.state)
        base = {}
        for m in self.lora.modules:
            total = self.old_sum[m.base_key] + (self.task_delta(gm, m) if self.rounds_in_task > 0 else 0)
            merged = total / k
            if m.base_key in dg:
                merged = L.merge_from_sums(dg[m.base_key], g[self.gram_name(m)], merged, self.options.ridge)
            base[m.base_key] = merged.to(gm.base_delta[m.base_key].dtype)
            state[m.b_key] = torch.zeros_like(gm.state[m.b_key])      # the product lives in the base now
        return GlobalModel(state, base)

    def evaluate(self, run, global_model, predictions: bool = False) -> dict:
        served = self.served_model(global_model)
        if not isinstance(run.data, TaskSequenceData):
            return run.evaluate_model(served, predictions=predictions)
        if getattr(self.options, "score_running_mean", False) and self.cross_task != "mean":
            # the ablation first, so that the served model is the one left loaded
            out = self.score(run, self.served_model(global_model, "mean"), "mean", predictions)
            if predictions:
                self.mean_predictions = out["predictions"]
        return self.score(run, served, self.cross_task, predictions)

    def score(self, run, served: GlobalModel, merge: str, predictions: bool) -> dict:
        """Evaluate `served` on the seen tasks' test rows; at a task's end record a[t, j] (``acc_rows``, with the
        cross-task rule `merge`), and at the last task the validation accuracies."""
        from fedbench.fl.client import evaluate
        data = run.data
        t = self.schedule.task_of(max(self.last_round, 1))
        run.load(served)
        view = data.seen_view(data.test, t)
        kw = dict(cache=run.test_cache, pad_id=data.pad_id)
        end_of_task = self.schedule.round_in_task(max(self.last_round, 1)) == self.schedule.rounds_per_task - 1
        seen = np.concatenate(data.task_test[:t + 1])
        # one pass over the seen test rows: a[t, j] is read off its per-example predictions (the seen rows are
        # exactly the union of the tasks' rows), not computed by a second forward pass per task
        out = evaluate(run.model, view, seen, return_predictions=predictions or end_of_task, **kw)
        if end_of_task:
            for j, acc in enumerate(per_task_accuracy(out["predictions"], data.task_test[:t + 1])):
                self.acc_rows.append({"split": "test", "after_task": t, "task": j, "accuracy": acc, "merge": merge})
            if t == self.schedule.num_tasks - 1 and data.task_val:
                vview = data.seen_view(data.train, t)
                val = evaluate(run.model, vview, np.concatenate(data.task_val[:t + 1]), cache=run.train_cache,
                               pad_id=data.pad_id, return_predictions=True)
                for j, acc in enumerate(per_task_accuracy(val["predictions"], data.task_val[:t + 1])):
                    self.acc_rows.append({"split": "val", "after_task": t, "task": j, "accuracy": acc,
                                          "merge": merge})
            if not predictions:
                out.pop("predictions")
        return out

    # -- client side --------------------------------------------------------------------------------
    def local_indices(self, run, ins):
        data = run.data
        if isinstance(data, TaskSequenceData):
            return data.task_clients[int(ins.options.get("task", 0))][ins.client_id]
        return data.client_indices[ins.client_id]

    def client_grams(self, run, ins, indices) -> dict:
        """{gram name: X^T X} (float32) of every distinct LoRA input on `indices`, with the model as trained."""
        groups = input_groups(self.lora.modules)
        names = [ms[0].name for ms in groups.values()]
        g = layer_input_grams(run.model, names, run.data.train, indices, cache=run.train_cache,
                                pad_id=run.data.pad_id, dtype=torch.float32)
        return OrderedDict((gname, g[ms[0].name]) for gname, ms in groups.items())

    def add_grams(self, run, ins, update):
        idx = self.local_indices(run, ins)
        for gname, g in self.client_grams(run, ins, idx).items():
            update.extras[f"gram/{gname}"] = pack_upper(g)
        return update

    @staticmethod
    def grams_of(update) -> dict:
        return {k[len("gram/"):]: unpack_upper(v).double() for k, v in update.extras.items() if k.startswith("gram/")}

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self):
        tensors, meta = super().state_dict()
        tensors.update({f"old_sum/{k}": v for k, v in self.old_sum.items()})
        for prefix, d in (("cross_dg/", self.cross_dg), ("cross_g/", self.cross_g), ("task_grams/", self.task_grams)):
            tensors.update({prefix + k: v for k, v in d.items()})
        meta.update(done=self.done, rounds_in_task=self.rounds_in_task, last_round=self.last_round,
                    acc_rows=self.acc_rows, merge_rows=self.merge_rows)
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        mine = ("old_sum/", "cross_dg/", "cross_g/", "task_grams/")
        super().load_state_dict({k: v for k, v in tensors.items() if not k.startswith(mine)}, meta)
        self.old_sum.update({k[len("old_sum/"):]: v for k, v in tensors.items() if k.startswith("old_sum/")})
        self.cross_dg, self.cross_g, self.task_grams = (
            {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)} for p in mine[1:])
        self.done, self.rounds_in_task, self.last_round = meta["done"], meta["rounds_in_task"], meta["last_round"]
        self.acc_rows, self.merge_rows = list(meta["acc_rows"]), list(meta["merge_rows"])


def alternating_factor(step: int) -> str:
    """The factor an alternating schedule trains at its `step` (0-based): B, A, B, ... (LoRM within a task;
    RoLoRA over the run, :mod:`fedbench.strategies.lora_family.rolora`)."""
    return "B" if step % 2 == 0 else "A"


def alternating_keys(state, lora, factor: str) -> tuple:
    """The keys of `state` that train and travel while `factor` ("A" or "B") trains: all but the other factor."""
    other = {m.a_key if factor == "B" else m.b_key for m in lora.modules}
    return tuple(k for k in state if k not in other)


def _head_keys(strategy, state) -> list[str]:
    factors = strategy.lora.factor_keys
    return [k for k in state if k not in factors]


@dataclass(frozen=True)
class RegMeanOptions(Options):
    """The closed-form solves' relative ridge (:mod:`fedbench.merging.lorm`; 0 = pseudo-inverse); how the served
    model combines the tasks (``cross_task``: 'gram', LoRM's cross-task merge, or 'mean', the running mean);
    ``score_running_mean``: with 'gram', also record the running mean's accuracies on the same run (merge
    column 'mean'; an ablation that costs one more evaluation per task)."""
    ridge: float = 1e-4
    cross_task: str = "gram"
    score_running_mean: bool = False

    def validate(self, prefix):
        check_number(f"{prefix}.ridge", self.ridge, 0, float("inf"), high_open=True)
        check_choice(f"{prefix}.cross_task", self.cross_task, ("gram", "mean"))
        check_bool(f"{prefix}.score_running_mean", self.score_running_mean)


@dataclass(frozen=True)
class LoRMOptions(RegMeanOptions):
    """LoRM's ridge and ``merge_check``: record, every round, the response-matching error of LoRM's solve and of
    the alternatives on the fit inputs and on each client's held-out inputs (an in-process diagnostic; the
    held-out inputs come from the task data's ``task_heldout``, never sent)."""
    merge_check: bool = False
    solve: str = "closed_form"      # 'average': the trained factor averaged (the control for the solve)

    def validate(self, prefix):
        super().validate(prefix)
        check_bool(f"{prefix}.merge_check", self.merge_check)
        check_choice(f"{prefix}.solve", self.solve, ("closed_form", "average"))
        if self.merge_check and self.solve != "closed_form":
            raise ConfigError(f"{prefix}.merge_check", self.merge_check,
                              "false with solve='average' (the check scores LoRM's solve)")


@STRATEGIES.register("lorm", check=_check_lorm, options=LoRMOptions)
class LoRM(Continual):
    """LoRM: one factor per round (B, A, B, ... within a task), solved in closed form from Gram matrices."""

    def factor(self, round_idx: int) -> str:
        return alternating_factor(self.schedule.round_in_task(round_idx))

    def configure_round(self, round_idx, clients, global_model):
        t = self.schedule.task_of(round_idx)
        keys = alternating_keys(global_model.state, self.lora, self.factor(round_idx))
        return [self.instruction(int(c), round_idx, global_model, train_keys=keys, send_keys=keys,
                                 options={"task": t, "factor": self.factor(round_idx)}) for c in clients]

    def sends_grams(self, round_idx: int) -> bool:
        """Every round for the closed-form solve; with solve='average' only a task's last round, for the
        cross-task merge (none with cross_task='mean')."""
        if self.options.solve == "closed_form":
            return True
        last = self.schedule.round_in_task(round_idx) == self.schedule.rounds_per_task - 1
        return last and self.cross_task == "gram"

    def client_update(self, run, ins, store):
        update = super().client_update(run, ins, store)
        if self.sends_grams(ins.round_idx):
            update = self.add_grams(run, ins, update)
        data = run.data
        if self.options.merge_check and isinstance(data, TaskSequenceData) and data.task_heldout:
            held = data.task_heldout[int(ins.options.get("task", 0))][ins.client_id]
            self._heldout[(ins.round_idx, ins.client_id)] = self.client_grams(run, ins, held)
        return update

    def aggregate(self, global_model, updates, round_idx):
        if not updates:
            return self.end_round(global_model, round_idx)
        factor = self.factor(round_idx)
        weights = [u.num_samples for u in updates]
        head = _head_keys(self, updates[0].state)
        combined = self.rule([{k: u.state[k] for k in head} for u in updates], weights, self.fl)
        state = OrderedDict((k, combined.get(k, v)) for k, v in global_model.state.items())
        grams = [self.grams_of(u) for u in updates]
        self.note_grams(updates)
        for gname, ms in input_groups(self.lora.modules).items():
            G = [g[gname] for g in grams] if grams[0] else None
            for m in ms:
                if self.options.solve == "average":
                    # the other factor is shared, so this is the exact average of the products
                    key = m.b_key if factor == "B" else m.a_key
                    state[key] = L.factor_average([u.state[key] for u in updates], weights).to(
                        global_model.state[key].dtype)
                elif factor == "B":
                    solved = L.solve_B([u.state[m.b_key] for u in updates], global_model.state[m.a_key], G,
                                       weights, self.options.ridge)
                    state[m.b_key] = solved.to(global_model.state[m.b_key].dtype)
                else:
                    solved = L.solve_A([u.state[m.a_key] for u in updates], G, weights, self.options.ridge)
                    state[m.a_key] = solved.to(global_model.state[m.a_key].dtype)
                if self.options.merge_check:
                    self.merge_rows += self._merge_errors(m, gname, factor, round_idx, global_model, state,
                                                          updates, weights, G)
        return self.end_round(GlobalModel(state, global_model.base_delta), round_idx)

    def _merge_errors(self, m, gname, factor, round_idx, g, new_state, updates, weights, G) -> list[dict]:
        """Response-matching error of LoRM's solve and of the alternatives on the same client updates, on the
        inputs the Gram matrices came from (fit) and on held-out inputs of each client (heldout); rel_error
        divides by the error of keeping the previous global factors.

        Cost: every rule is a sum of rank-r products (RegMean of the low-rank updates too:
        :func:`fedbench.merging.lorm.regmean_factored`), so dW - dW_i = U V with few columns in U and
        tr(U V G V^T U^T) = sum((U^T U) * (V G V^T)) is exact (float64) at O(rank d_in^2) instead of
        O(d_out d_in^2) (:func:`fedbench.merging.lorm.factored_response_error`)."""
        s = m.scaling
        full = [OrderedDict(g.state, **u.state) for u in updates]
        Bs = [s * st[m.b_key].double() for st in full]
        As = [st[m.a_key].double() for st in full]
        p = L.normalized_weights(weights, len(full))
        b_avg = L.factor_average([st[m.b_key] for st in full], weights)
        a_avg = L.factor_average([st[m.a_key] for st in full], weights)
        factored = {"lorm": (s * new_state[m.b_key].double(), new_state[m.a_key].double()),
                    "factor_average": (s * b_avg, a_avg),
                    "product_average": (torch.cat([pi * b for pi, b in zip(p, Bs)], 1), torch.cat(As, 0)),
                    "regmean": L.regmean_factored(Bs, As, G, weights, self.options.ridge)}
        prev = (s * g.state[m.b_key].double(), g.state[m.a_key].double())
        held = [self._heldout.get((round_idx, u.client_id)) for u in updates]
        rows = []
        splits = [("fit", G)] + ([("heldout", [h[gname].double() for h in held])] if all(h is not None for h in held)
                                 else [])
        clients = list(zip(Bs, As))
        for split, grams in splits:
            errs = {rule: L.factored_response_error(uv, clients, grams) for rule, uv in factored.items()}
            keep = L.factored_response_error(prev, clients, grams)
            for rule in ("lorm", "factor_average", "product_average", "regmean"):
                e = errs[rule]
                rows.append({"task": self.schedule.task_of(round_idx), "round": int(round_idx), "layer": short(m.name),
                             "factor": factor, "rule": rule, "split": split, "error": e,
                             "rel_error": e / keep if keep > 0 else float("nan")})
        return rows


@STRATEGIES.register("regmean", check=_check_regmean, requires={"fl.lora_aggregation": "svd"},
                     options=RegMeanOptions)
class RegMeanLoRA(Continual):
    """RegMean on the clients' dense LoRA products, re-factorised at rank r (svd) or folded into the base (stack)."""

    def client_update(self, run, ins, store):
        return self.add_grams(run, ins, super().client_update(run, ins, store))

    def aggregate(self, global_model, updates, round_idx):
        if not updates:
            return self.end_round(global_model, round_idx)
        weights = [u.num_samples for u in updates]
        head = _head_keys(self, updates[0].state)
        combined = self.rule([{k: u.state[k] for k in head} for u in updates], weights, self.fl)
        state = OrderedDict((k, combined.get(k, v)) for k, v in global_model.state.items())
        base = dict(global_model.base_delta)
        grams = [self.grams_of(u) for u in updates]
        self.note_grams(updates)
        down = sum(t.numel() * t.element_size() for k, t in state.items() if k not in self.lora.factor_keys)
        for gname, ms in input_groups(self.lora.modules).items():
            G = [g[gname] for g in grams]
            for m in ms:
                # the clients' products B_i A_i (unscaled, as lora_svd) merged by RegMean, kept as factors
                # U V (rank <= clients x r): the same merge as the dense one, at a fraction of the cost
                U, V = L.regmean_factored([u.state[m.b_key] for u in updates], [u.state[m.a_key] for u in updates],
                                          G, weights, self.options.ridge)
                i = self.lora.modules.index(m)
                if self.fl.lora_aggregation == "svd":
                    b, a = svd_of_product(U, V, self.rank)
                    state[m.b_key] = b.to(global_model.state[m.b_key].dtype)
                    state[m.a_key] = a.to(global_model.state[m.a_key].dtype)
                else:     # unbounded: the dense merge goes into the base, the factors restart
                    base[m.base_key] = (base[m.base_key] + m.scaling * (U @ V)).to(base[m.base_key].dtype)
                    state[m.a_key], state[m.b_key] = self.fresh_factors(global_model.state, m, i, round_idx)
                    down += base[m.base_key].numel() * base[m.base_key].element_size()
        if self.fl.lora_aggregation == "svd":
            return self.end_round(GlobalModel(state, base), round_idx)
        # what travels down: the head, the fresh factors and every folded dense delta (float32)
        down += sum(state[k].numel() * state[k].element_size() for k in self.lora.factor_keys)
        return self.end_round(GlobalModel(state, base, down), round_idx)


def short(name: str) -> str:
    """encoder.encoder.layer.5.attention.output.dense -> layer5.attention.output.dense"""
    parts = name.split(".")
    if "layer" in parts:
        i = parts.index("layer")
        return f"layer{parts[i + 1]}." + ".".join(parts[i + 2:])
    return name
