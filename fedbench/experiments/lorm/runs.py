"""One LoRM run, as tables: a federated run on the shared loop (or the centralised joint run), stored by its
config in a :class:`fedbench.bench.TableRunStore` (its tables are the strategy's per-task accuracies, merge
diagnostic, round records and predictions, not the loop's RunResult)."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from fedbench.bench import TableRunStore
from fedbench.config import ExperimentConfig
from fedbench.experiments.lorm.plan import EXPERIMENT, METHODS, LormSettings, federation
from fedbench.fl.seeding import derive_seed

ACC_COLS = ["split", "after_task", "task", "accuracy", "merge"]
MERGE_COLS = ["task", "round", "layer", "factor", "rule", "split", "error", "rel_error"]
STORE = TableRunStore(EXPERIMENT, ("accuracy", "merge_error", "rounds", "predictions"),
                      read_csv_kwargs={"dtype": {"factor": str}})


def run_key(cfg: ExperimentConfig) -> dict:
    """The whole run config (its data, strategy options and the method's name say everything) and the core's
    results schema."""
    from fedbench.results import RESULTS_SCHEMA
    return {"experiment": EXPERIMENT, "config": cfg.to_dict(), "schema": RESULTS_SCHEMA}


def shared_caches(s: LormSettings, base: ExperimentConfig) -> tuple:
    """The pool's activation caches at every depth the methods train from (the LoRA methods the top
    ``peft.depth`` layers, full_top the top one), filled once up front and shared by every run. The task
    sequence's pool is the federation's own (built once per process), so its caches live on it rather than in
    :class:`fedbench.bench.PrefixCaches` (keyed by the plain data fields, which do not name the pool)."""
    from fedbench.fl.federations import TaskSequenceOptions, sequence_pool, sequence_pool_caches
    o = TaskSequenceOptions.from_dict(federation(s), "data.federation_options")
    pool = sequence_pool(o, s.dataset, base.model.backbone, base.data.max_length)
    if pool.caches is None:
        sequence_pool_caches(pool, base.model, [base.peft.depth or 1, 1])
    return pool.caches


def run_one(s: LormSettings, cfg: ExperimentConfig, method: str, data, caches) -> dict:
    """One (method, seed, lr) run on the shared loop (joint: centralised), as tables."""
    from fedbench.fl import FederatedRun
    t0 = time.perf_counter()
    if METHODS[method].centralised:
        return run_joint(s, cfg, data, caches, t0)
    run = FederatedRun(cfg, data, caches)
    for r in range(1, cfg.fl.rounds + 1):
        run.run_round(r)
    rounds = pd.DataFrame(run.records)
    st = run.strategy
    served = st.cross_task
    pred = pd.DataFrame(run.final_predictions).assign(merge=served)
    if st.mean_predictions is not None:      # the running mean scored beside the served cross-task merge
        pred = pd.concat([pred, pd.DataFrame(st.mean_predictions).assign(merge="mean")], ignore_index=True)
    return {"accuracy": pd.DataFrame(st.acc_rows, columns=ACC_COLS),
            "merge_error": pd.DataFrame(st.merge_rows, columns=MERGE_COLS),
            "rounds": rounds,
            "predictions": pred,
            "summary": {"bytes_up": int(rounds["bytes_up"].sum()), "bytes_down": int(rounds["bytes_down"].sum()),
                        "served": served, "wall_s": time.perf_counter() - t0}}


def view(res: dict, merge: str | None = None) -> dict:
    """A run's accuracy and prediction tables of one cross-task rule (default: the served one), without the
    merge column."""
    merge = merge or res["summary"]["served"]
    out = dict(res)
    for name in ("accuracy", "predictions"):
        t = res[name]
        out[name] = t[t["merge"] == merge].drop(columns="merge").reset_index(drop=True)
    return out


def run_joint(s, cfg, data, caches, t0) -> dict:
    """Centralised LoRA on every task's pooled training rows at once (all classes), as many optimizer steps as
    all clients of a federated run take together; a[t, j] is the final model scored over the classes seen
    after task t."""
    from fedbench.fl.client import train_client
    from fedbench.models import build_model, load_trainable_state, trainable_state
    from fedbench.models.inputs import TokenizedSplit
    model = build_model(cfg.model, cfg.peft, data.num_labels, seed=derive_seed(cfg.seed, "init"))
    every = np.sort(np.concatenate([r for tc in data.task_clients for r in tc]))
    steps = cfg.fl.rounds * cfg.cohort_size() * (cfg.train.local_steps or 1)
    u = train_client(model, trainable_state(model), TokenizedSplit(data.train.input_ids, data.train.labels), every,
                     cfg.train.with_steps(steps), seed=derive_seed(cfg.seed, "client", 0, 10**6), cache=caches[0],
                     pad_id=data.pad_id)
    load_trainable_state(model, u.state)
    # one model for every a[t, j]: its logits on every test and validation row are computed once, and a[t, j]
    # is their argmax over the classes seen after task t
    test_rows, val_rows = np.concatenate(data.task_test), np.concatenate(data.task_val)
    logits = {"test": all_logits(model, data.test, test_rows, caches[1], data.pad_id),
              "val": all_logits(model, data.train, val_rows, caches[0], data.pad_id)}
    labels = {"test": data.test.labels, "val": data.train.labels}
    rows = []
    for t in range(s.num_tasks):
        mask = data.seen_mask(t)
        for split, idx in (("test", data.task_test), ("val", data.task_val)):
            if split == "val" and t < s.num_tasks - 1:
                continue
            for j in range(t + 1):
                pred = masked_argmax(torch.stack([logits[split][int(i)] for i in idx[j]]), mask)
                acc = float(np.mean((pred == labels[split][torch.as_tensor(idx[j])]).numpy())) if len(idx[j]) \
                    else float("nan")
                rows.append({"split": split, "after_task": t, "task": j, "accuracy": acc})
    last = masked_argmax(torch.stack([logits["test"][int(i)] for i in test_rows]), data.seen_mask(s.num_tasks - 1))
    final = {"predictions": {"test_index": test_rows.astype(np.int64),
                             "label": data.test.labels[torch.as_tensor(test_rows)].numpy().astype(np.int64),
                             "prediction": last.numpy().astype(np.int64)}}
    return {"accuracy": pd.DataFrame(rows, columns=ACC_COLS[:-1]).assign(merge="joint"),
            "merge_error": pd.DataFrame(columns=MERGE_COLS),
            "rounds": pd.DataFrame([{"round": 0, "train_loss": u.train_loss, "local_steps": u.num_steps}]),
            "predictions": pd.DataFrame(final["predictions"]).assign(merge="joint"),
            "summary": {"bytes_up": 0, "bytes_down": 0, "served": "joint", "wall_s": time.perf_counter() - t0}}


@torch.no_grad()
def all_logits(model, split, indices, cache, pad_id: int, batch_size: int = 256) -> dict:
    """{row: logits over every class} of `model` on `indices` of `split` (no class mask), in the batches
    :func:`fedbench.fl.client.evaluate` uses."""
    from fedbench.fl.client import forward_batch
    from fedbench.models.inputs import TokenizedSplit, batch_order
    plain = TokenizedSplit(split.input_ids, split.labels)
    model.eval()
    out = {}
    for batch in batch_order(np.asarray(indices), split.lengths, batch_size, rng=None, shuffle=False, bucketing=True):
        out.update(zip(np.asarray(batch).tolist(), forward_batch(model, plain, batch, cache, pad_id)))
    return out


def masked_argmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Argmax over the classes `mask` allows (as :func:`fedbench.fl.client.restrict_logits` then argmax)."""
    return logits.masked_fill(~mask, float("-inf")).argmax(-1)


def run_getter(s: LormSettings, base: ExperimentConfig, progress: bool = True):
    """``get(method, seed, lr) -> (tables, run hash)``: the run of that config from the store, or run once on the
    seed's task sequence (built once per seed: every method of a seed sees the same data) and the pool's caches."""
    from fedbench.config import config_hash
    from fedbench.experiments.lorm.analysis import accuracy_matrix, cl_metrics, val_accuracy
    from fedbench.experiments.lorm.plan import run_config
    data = {}

    def get(method: str, seed: int, lr: float) -> tuple[dict, str]:
        cfg = run_config(s, base, method, seed, lr)
        key = run_key(cfg)

        def compute() -> dict:
            from fedbench.fl.data import build_data
            caches = shared_caches(s, base)
            if seed not in data:
                data[seed] = build_data(cfg)
            res = run_one(s, cfg, method, data[seed], caches)
            if progress:
                acc = view(res)["accuracy"]
                m = cl_metrics(accuracy_matrix(acc, s.num_tasks))
                print(f"[lorm] {method:<14} seed {seed} lr {lr:g}: {res['summary']['wall_s']:.0f} s, final avg acc "
                      f"{m['final_avg_accuracy']:.3f}, val {val_accuracy(acc):.3f}", flush=True)
            return res
        return STORE.get(key, compute), config_hash(key)
    return get
