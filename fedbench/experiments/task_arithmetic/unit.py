"""One (tuning, seed) unit of task arithmetic on the shared loop: the task-clients' run, its fine-tunes (round-1
updates), task vectors, merged models and their memoised evaluations; the equivalence check and the rounds run."""
from __future__ import annotations

import math
import time
from collections import OrderedDict

import numpy as np
import pandas as pd
import torch

from fedbench import merging
from fedbench.experiments.task_arithmetic.plan import TUNING_FACTS, Resolved, run_config


class Unit:
    """One (tuning, seed): the loop's run, the fine-tunes (its round-1 updates), merges and evaluations."""

    def __init__(self, r: Resolved, tuning: str, seed: int, log):
        from fedbench.fl.server import FederatedRun
        from fedbench.models import lora_modules
        self.r, self.s, self.tuning, self.seed, self.log = r, r.settings, tuning, seed, log
        self.T = len(self.s.tasks)
        self.cfg = run_config(r.base, self.s, tuning, seed)
        self.run = FederatedRun(self.cfg)       # the data and the probe heads from the config
        self.td = self.run.data
        self.modules = lora_modules(self.run.model) if TUNING_FACTS[tuning].lora else []
        # every LoRA-wrapped base weight named in every model loaded: the loop's base loader only touches the
        # keys it is given, so a model without a delta on a key must say "zero" there
        self.zero_base = {m.base_key: torch.zeros_like(self.run.model.get_parameter(m.base_key))
                          for m in self.modules}
        from fedbench.fl import GlobalModel
        self.g0 = GlobalModel(self.run.global_model.state, dict(self.zero_base))
        self.init = OrderedDict((k, v.clone()) for k, v in self.g0.state.items())
        self.encoder_keys = [k for k in self.init if not k.startswith("classifier.")]
        self._memo: dict = {}

    # models ------------------------------------------------------------------------------------------
    def task_vector(self, state: dict) -> dict:
        if self.modules:
            return merging.lora_task_vector(state, self.modules, self.init)
        return merging.state_task_vector(state, self.init, self.encoder_keys)

    def fedit_task_vector(self, updates) -> dict | None:
        """FedIT's round on `updates` (FedAvg of the LoRA factors, mean(B) mean(A)) as a task vector per LoRA
        module; None without LoRA factors (full fine-tuning)."""
        if not self.modules:
            return None
        from fedbench.fl.strategy import FedAvg
        from fedbench.models import lora_delta
        cfg = self.cfg.replace(**{"fl.lora_aggregation": "factors", "fl.strategy": "fedavg", "fl.options": {}})
        g = FedAvg(cfg, self.run.model).aggregate(self.g0, updates, 1)
        return OrderedDict((m.base_key, lora_delta(g.state, m) - lora_delta(self.init, m)) for m in self.modules)

    def merged_model(self, tv: dict):
        """theta_0 + tv with the frozen heads: LoRA deltas go into the base weights (factors at init)."""
        from fedbench.fl import GlobalModel
        if self.modules:
            return GlobalModel(OrderedDict(self.init), {**self.zero_base, **tv})
        return GlobalModel(OrderedDict((k, v + tv[k] if k in tv else v) for k, v in self.init.items()))

    def correct(self, gm, split: str, tasks) -> np.ndarray:
        """0/1 per example of `tasks` (validation carve or test split), in joint-index order."""
        from fedbench.fl import evaluate
        from fedbench.models.tuners.lora import zero_branches_skipped
        td = self.td
        if split == "val":
            idx, sp = np.sort(np.concatenate([td.val[t] for t in tasks])), td.train
        else:
            idx, sp = np.flatnonzero(np.isin(td.task_of_test, list(tasks))), td.test
        self.run.load(gm)
        # merged weights sit in the base layers with B = 0: the LoRA branches add exactly zero, skip them
        with zero_branches_skipped(self.run.model):
            ev = evaluate(self.run.model, sp, idx, batch_size=64, pad_id=td.pad_id, return_predictions=True)
        p = ev["predictions"]
        return (p["prediction"] == p["label"]).astype(np.int8)

    def accuracies(self, gm, split: str, tasks) -> dict:
        """{task id: accuracy} and the 0/1 vector, memoised by the model's exact bytes."""
        key = (_fingerprint(gm), split, tuple(tasks))
        if key not in self._memo:
            c = self.correct(gm, split, tasks)
            of = (np.sort(np.concatenate([self.td.task_of_train[self.td.val[t]] for t in tasks])) if split == "val"
                  else self.td.task_of_test[np.isin(self.td.task_of_test, list(tasks))])
            self._memo[key] = ({t: float(c[of == t].mean()) for t in tasks}, c)
        return self._memo[key]

    def remember(self, gm, predictions: dict) -> None:
        """The loop's own evaluation of `gm` on every test example (its final round's predictions) as the
        test accuracies of `gm`: the FedAvg rows are what the loop measured."""
        p = predictions
        order = np.argsort(p["test_index"], kind="stable")
        c = (p["prediction"][order] == p["label"][order]).astype(np.int8)
        ids = tuple(range(self.T))
        self._memo[(_fingerprint(gm), "test", ids)] = ({t: float(c[self.td.task_of_test == t].mean()) for t in ids}, c)

    # the loop's first round: the fine-tunes ------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """The (validation-chosen) learning rate of every later fine-tune and round of this unit."""
        self.cfg = self.cfg.replace(**{"train.lr": float(lr)})
        self.run = self.run.derive(self.cfg, self.g0)

    def fine_tunes(self, steps: dict | None = None, lrs: dict | None = None, reuse: dict | None = None):
        """Every task-client's round-1 update from theta_0 (its fine-tune), on the loop's client side.
        `steps` / `lrs` = {client: local steps / learning rate} (training heterogeneity, the lr search: the
        task-clients strategy's per-client options); an update whose (steps, lr) equal those in `reuse`
        ({client: ((steps, lr), update)}) is taken from it: same start, seed and data, so the same update.
        Returns (run, plan, instructions, updates): `run` is the round's run (this unit's, with the options)."""
        n = self.cfg.data.num_clients
        options = {"client_steps": None if steps is None else [steps.get(c) for c in range(n)],
                   "client_lrs": None if lrs is None else [lrs.get(c) for c in range(n)]}
        run = self.run.derive(self.cfg.replace(**{"fl.options": options}), self.g0)
        plan = run.select_clients(1)
        ins = run.configure(plan)
        updates = []
        for c in plan.reporting:
            key = (ins[c].local_steps or self.cfg.train.local_steps, ins[c].options.get("lr", self.cfg.train.lr))
            if reuse and reuse.get(c, (None,))[0] == key:
                updates.append(reuse[c][1])
            else:
                updates.append(run.client_update(c, 1, ins[c]))
        return run, plan, ins, updates

    def first_round(self, steps: dict | None = None, lrs: dict | None = None, reuse: dict | None = None):
        """Round 1 of the loop from theta_0: the fine-tunes (:meth:`fine_tunes`) and the aggregated global
        model (one-shot FedAvg)."""
        run, plan, ins, updates = self.fine_tunes(steps, lrs, reuse)
        run.finish_round(plan, updates, time.perf_counter(), instructions=ins)
        self.remember(run.global_model, run.final_predictions)
        return updates, run.global_model

    def reuse_of(self, updates) -> dict:
        """{client: ((steps, lr), update)} of `updates` trained with this unit's lr."""
        return {t: ((x.num_steps, self.cfg.train.lr), x) for t, x in enumerate(updates)}


def _fingerprint(gm) -> str:
    import hashlib
    h = hashlib.sha256()
    for part in (gm.state, gm.base_delta):
        for k in sorted(part):
            h.update(k.encode())
            h.update(part[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()

def equivalence_rows(u: Unit, ta: dict, g_fedavg, fedit_tv, tasks) -> pd.DataFrame:
    """Per task: the largest absolute difference between the effective shared parameters of theta_0 +
    TA(1/T) and of the loop's FedAvg round, and the two models' test accuracies (and FedIT beside them)."""
    from fedbench.models import lora_delta
    params = dict(u.run.model.named_parameters())
    if u.modules:
        w0 = {m.base_key: u.run.base.original.get(m.base_key, params[m.base_key]).detach() for m in u.modules}
        eff_fa = {m.base_key: w0[m.base_key] + g_fedavg.base_delta.get(m.base_key, 0)
                  + (lora_delta(g_fedavg.state, m) - lora_delta(u.init, m)) for m in u.modules}
        eff_ta = {k: w0[k] + ta[k] for k in ta}
        fa_tv = {k: eff_fa[k] - w0[k] for k in eff_fa}
    else:
        eff_fa = {k: g_fedavg.state[k] for k in u.encoder_keys}
        eff_ta = {k: u.init[k] + ta[k] for k in u.encoder_keys}
        fa_tv = {k: g_fedavg.state[k] - u.init[k] for k in u.encoder_keys}
    diff = max(float((eff_ta[k] - eff_fa[k]).abs().max()) for k in eff_ta)
    ids = list(range(len(tasks)))
    a_ta, c_ta = u.accuracies(u.merged_model(ta), "test", ids)
    a_fa, c_fa = u.accuracies(g_fedavg, "test", ids)
    rows = []
    for t in ids:
        row = {"task": tasks[t], "lambda": 1.0 / len(tasks), "max_abs_param_diff": diff,
               "accuracy_task_arithmetic": a_ta[t], "accuracy_fedavg": a_fa[t], "same_accuracy": a_ta[t] == a_fa[t],
               "prediction_mismatches": int((c_ta != c_fa).sum())}
        if fedit_tv is not None:
            num = math.sqrt(sum(float((fedit_tv[k] - fa_tv[k]).double().pow(2).sum()) for k in fa_tv))
            row["fedit_rel_delta_diff"] = num / max(merging.norm(fa_tv), 1e-30)
        rows.append(row)
    return pd.DataFrame(rows)


def rounds_run(u: Unit, R: int):
    """R FedAvg rounds of the loop over the task-clients, local_steps / R steps each (same total steps)."""
    from fedbench.fl import GlobalModel
    from fedbench.fl.server import FederatedRun
    steps = u.cfg.train.local_steps // R
    cfg = run_config(u.r.base, u.s, u.tuning, u.seed, rounds=R, local_steps=steps).replace(
        **{"fl.eval_every": R, "train.lr": u.cfg.train.lr})
    run = FederatedRun(cfg, u.td, caches=(u.run.train_cache, u.run.test_cache))     # fits the same probe heads
    run.restart(GlobalModel(run.global_model.state, dict(u.zero_base)))
    for rnd in range(1, R + 1):
        run.run_round(rnd)           # the loop: configure, train every task-client, guard, aggregate, record
    g = run.global_model
    # the global model lives in the rounds run's model; evaluate it (and every later model) in the unit's
    u.remember(g, run.final_predictions)
    return g

