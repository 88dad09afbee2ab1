"""Client-training speed on this machine: samples/s and the share of the measured matmul peak.

Workload: bundled MiniLM, LoRA r=8 (query, value), batch 32, real text (rt_sentiment, max 64 tokens).
Prints, for each variant, samples/s and achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode on
the very step that is timed) as a share of the measured fp32 matmul peak:
  1. plain step, static padding to 64 tokens (the naive baseline the target is stated for);
  2. dynamic padding + length bucketing (same samples, less padding: fewer FLOPs, more samples/s);
  3. LoRA on the top 2 layers, a local round of 4 epochs over 256 samples, with and without the
     frozen-prefix activation cache (the cache is filled in the first epoch and reused after);
  4. evaluation of 1,000 test texts: batch 32 in dataset order vs batch 256 sorted by length.
Targets (issue #2): plain step >= 50% of peak; cached top-2 LoRA round >= 2x faster than the full stack.

    python benchmarks/bench_training.py           # the workload above
    python benchmarks/bench_training.py --smoke   # every part on a tiny workload in seconds (CI runs it)
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fedbench.config import DataConfig, ExperimentConfig, PeftConfig, TrainConfig  # noqa: E402
from fedbench.fl import evaluate, prepare_data  # noqa: E402
from fedbench.fl.client import make_optimizer  # noqa: E402
from fedbench.models import build_model  # noqa: E402
from fedbench.models.inputs import ActivationCache, batch_order, pad_batch  # noqa: E402
from fedbench.fl import train_client  # noqa: E402

BATCH, MAX_LEN, THREADS = 32, 64, 2
# sizes of each part: the benchmark's, and --smoke's (every code path, tiny: what CI runs)
FULL = {"batches": 12, "client_samples": 256, "epochs": 4, "fed_samples": 512, "fed_test": 500, "eval": 1000,
        "peak_repeats": 10}
SMOKE = {"batches": 4, "client_samples": 16, "epochs": 1, "fed_samples": 32, "fed_test": 16, "eval": 40,
         "peak_repeats": 1}


def matmul_peak_gflops(repeats: int = 10) -> float:
    """Best fp32 GEMM throughput over shapes like the model's (tokens x 384 x 1536 and square 1024)."""
    best = 0.0
    for m, k, n in [(2048, 384, 1536), (2048, 1536, 384), (1024, 1024, 1024), (2048, 2048, 2048)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - t) / 1e9)
    return best


def time_steps(model, batches, n_warm=2):
    """Seconds per step and FLOPs per step (counted on the timed steps) of LoRA training on `batches`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, TrainConfig(lr=1e-4))
    model.train()

    def step(ids, mask, y):
        loss = F.cross_entropy(model(ids, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for ids, mask, y in batches[:n_warm]:
        step(ids, mask, y)
    counter = FlopCounterMode(display=False)
    with counter:
        for ids, mask, y in batches[n_warm:n_warm + 2]:
            step(ids, mask, y)
    flops_per_step = counter.get_total_flops() / 2
    t = time.perf_counter()
    for ids, mask, y in batches[n_warm:]:
        step(ids, mask, y)
    return (time.perf_counter() - t) / len(batches[n_warm:]), flops_per_step


def main(size: dict = FULL) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    peak = matmul_peak_gflops(size["peak_repeats"])
    print(f"machine: {THREADS} threads, measured fp32 matmul peak {peak:.0f} GFLOP/s")
    cfg = ExperimentConfig(data=DataConfig(task="rt_sentiment", num_clients=1, partition="iid",
                                           max_train_samples=2048, max_test_samples=1000, max_length=MAX_LEN),
                           peft=PeftConfig(method="lora", rank=8))
    data = prepare_data(cfg)
    split, rng = data.train, np.random.default_rng(0)
    order = rng.permutation(len(split))[: BATCH * size["batches"]]

    def static_batches():
        out = []
        for s in range(0, len(order), BATCH):
            idx = order[s:s + BATCH]
            ids = torch.zeros((len(idx), MAX_LEN), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, j in enumerate(idx):
                ids[i, : len(split.input_ids[j])] = split.input_ids[j]
                mask[i, : len(split.input_ids[j])] = 1
            out.append((ids, mask, split.labels[idx]))
        return out

    def dynamic_batches():
        bs = batch_order(order, split.lengths, BATCH, rng=np.random.default_rng(1), shuffle=True, bucketing=True)
        return [(*pad_batch([split.input_ids[j] for j in b]), split.labels[b]) for b in bs]

    model = build_model(cfg.model, cfg.peft, data.num_labels, seed=0)
    print(f"\n1-2. LoRA r=8 (query, value; all 6 layers) train step, batch {BATCH}:")
    for name, batches in [("static padding to 64", static_batches()), ("dynamic padding + bucketing", dynamic_batches())]:
        sec, flops = time_steps(model, batches)
        achieved = flops / sec / 1e9
        print(f"   {name:30s} {BATCH / sec:7.1f} samples/s  {sec * 1000:6.0f} ms/step  {flops / 1e9:5.1f} GFLOP/step  "
              f"{achieved:5.0f} GFLOP/s = {100 * achieved / peak:4.1f}% of peak")

    n, epochs = size["client_samples"], size["epochs"]
    print(f"\n3. one client's local training, LoRA r=8 on the top 2 layers, {epochs} epochs x {n} samples:")
    top2 = PeftConfig(method="lora", rank=8, depth=2)
    model2 = build_model(cfg.model, top2, data.num_labels, seed=0)
    idx = np.arange(n)
    train_cfg = TrainConfig(local_epochs=epochs, batch_size=BATCH, lr=1e-3)
    state = {k: v.clone() for k, v in model2.state_dict().items() if "lora_" in k or "classifier" in k}
    timings = {}
    for name, cache in [("whole stack every step", None), ("frozen-prefix cache", ActivationCache(split, data.pad_id))]:
        t = time.perf_counter()
        train_client(model2, state, split, idx, train_cfg, seed=0, cache=cache, pad_id=data.pad_id)
        timings[name] = time.perf_counter() - t
        print(f"   {name:30s} {timings[name]:6.2f} s per local round ({epochs * n / timings[name]:6.1f} samples/s)")
    cache = ActivationCache(split, data.pad_id)
    cache.ensure(model2.frozen_prefix)
    cache.get(model2, idx)             # a later round: the cache is already filled
    t = time.perf_counter()
    train_client(model2, state, split, idx, train_cfg, seed=0, cache=cache, pad_id=data.pad_id)
    warm = time.perf_counter() - t
    print(f"   {'cache already filled':30s} {warm:6.2f} s per local round")
    print(f"   speed-up of caching: {timings['whole stack every step'] / timings['frozen-prefix cache']:.2f}x in the first "
          f"round (cache filled during it), {timings['whole stack every step'] / warm:.2f}x in later rounds")

    print(f"\n3b. federated rounds (LoRA r=8, top 2 layers; 4 clients x {size['fed_samples'] // 4} samples, 2 local "
          f"epochs, eval on {size['fed_test']}):")
    from fedbench.fl import FederatedRun
    fed_cfg = ExperimentConfig(
        data=DataConfig(task="rt_sentiment", num_clients=4, partition="iid", max_train_samples=size["fed_samples"],
                        max_test_samples=size["fed_test"], max_length=MAX_LEN),
        peft=top2, train=TrainConfig(local_epochs=2, batch_size=BATCH, lr=1e-3))
    fed_data = prepare_data(fed_cfg)
    per_round = {}
    for name, use_cache in [("whole stack every step", False), ("frozen-prefix cache", True)]:
        run = FederatedRun(fed_cfg, fed_data, use_activation_cache=use_cache)
        walls = [run.run_round(r)["wall_s"] for r in (1, 2, 3)]
        per_round[name] = walls
        print(f"   {name:30s} round 1 {walls[0]:5.2f} s, later rounds {np.mean(walls[1:]):5.2f} s")
    a, b = per_round["whole stack every step"], per_round["frozen-prefix cache"]
    print(f"   speed-up per round: {a[0] / b[0]:.2f}x in round 1 (cache filled), "
          f"{np.mean(a[1:]) / np.mean(b[1:]):.2f}x in later rounds (target >= 2x)")

    print(f"\n4. evaluation of {size['eval']:,} test texts (all 6 layers, LoRA model):")
    test_idx = np.arange(size["eval"])
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(test_idx), 32):
            b = test_idx[s:s + 32]
            model(*pad_batch([data.test.input_ids[j] for j in b]))
    naive = time.perf_counter() - t
    t = time.perf_counter()
    evaluate(model, data.test, test_idx, batch_size=256)
    fast = time.perf_counter() - t
    print(f"   batch 32, dataset order       {naive:6.2f} s\n   batch 256, sorted by length   {fast:6.2f} s  "
          f"({naive / fast:.2f}x)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every part on a tiny workload in seconds (CI)")
    main(SMOKE if p.parse_args().smoke else FULL)
