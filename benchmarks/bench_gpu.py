"""Client updates per second on a GPU: a round's clients one by one (sequential) vs trained together (batched).

    python benchmarks/bench_gpu.py                 # on a CUDA machine: the workload below, ~5 min on one H100
    python benchmarks/bench_gpu.py --smoke         # every code path on a tiny workload, on the CPU, in seconds (CI)

Workload: bundled MiniLM (6 layers, hidden 384), LoRA r=8 on query/value, batch 16, 2 local steps per client,
rt_sentiment (max 64 tokens) cut IID into K clients, every client in every round, K = 10, 100, 1,000; two
layer settings: LoRA on the top 2 layers with the frozen-prefix activation cache (filled before timing: a
one-off cost per run) and LoRA on every layer without a cache. Per (setting, K):

- sequential fp32 (fedbench's default loop; at K = 1,000 timed on the first 200 clients of the round, since
  every update is the same work), batched fp32 and batched bf16 autocast (fl.client_batching, clients in
  calls of 32): client updates per second, and batched / sequential;
- the largest difference between the batched and the sequential states of the first clients (fp32: float
  noise expected, ~1e-6);
- peak GPU memory of each mode (torch.cuda.max_memory_allocated; one backbone + K adapters when batched);
- the share of the GPU's bf16 peak reached on the *necessary* FLOPs: the FLOPs of the sequential updates
  (each batch padded only to its own longest text), counted with torch's FlopCounterMode on the first
  clients and scaled to the round, per second of the batched bf16 round, over the bf16 matmul peak measured
  here (8192^3 GEMMs).

Issue #32's targets: batched >= 10x sequential at 100 clients per round; >= 40% of the bf16 peak. Timings
depend on the GPU and its clocks; the figures are from one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import torch  # noqa: E402

FULL = {"clients": (10, 100, 1000), "sequential_cap": 200, "flop_sample": 10, "check": 4, "steps": 2, "batch": 16,
        "test": 16, "gemm": 8192}
SMOKE = {"clients": (2, 4), "sequential_cap": 3, "flop_sample": 2, "check": 2, "steps": 1, "batch": 4,
         "test": 8, "gemm": 256}
SETTINGS = {"top-2 layers + cache": 2, "every layer, no cache": None}


def config(k: int, depth, size: dict, batching: bool, precision: str, n_train: int):
    from fedbench.config import ExperimentConfig
    return ExperimentConfig.from_dict({
        "name": "bench-gpu", "seed": 0,
        "data": {"task": "rt_sentiment", "num_clients": k, "partition": "iid", "max_length": 64,
                 "max_train_samples": min(n_train, k * size["batch"]), "max_test_samples": size["test"]},
        "peft": {"method": "lora", "rank": 8, "depth": depth},
        "train": {"local_steps": size["steps"], "batch_size": size["batch"], "lr": 5e-4, "precision": precision},
        "fl": {"rounds": 1, "clients_per_round": 1.0, "client_batching": batching},
    })


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_peak_tflops(device, n: int) -> float:
    """Best bf16 GEMM throughput of n x n x n products (the peak the necessary FLOPs are compared with)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * 10 / (time.perf_counter() - t) / 1e12)
    return best


_DATA: dict = {}


def measure(k: int, depth, size: dict, mode: str, n_train: int) -> dict:
    """One round's client updates in `mode` (sequential | batched | batched-bf16): seconds, updates, memory."""
    from fedbench.fl import FederatedRun, prepare_data
    from fedbench.fl.batched import batched_updates
    batching = mode != "sequential"
    cfg = config(k, depth, size, batching, "bf16" if mode == "batched-bf16" else "fp32", n_train)
    if k not in _DATA:                    # the same clients for every mode and setting of one K
        _DATA[k] = prepare_data(cfg)
    data = _DATA[k]
    run = FederatedRun(cfg, data, use_activation_cache=depth is not None)
    device = run.device
    if run.train_cache is not None:       # the cache is filled once per run: not part of a round's time
        run.train_cache.fill(run.model, np.concatenate(data.client_indices), run.model.frozen_prefix)
    plan = run.select_clients(1)
    ins = run.configure(plan)
    clients = [int(c) for c in plan.reporting]
    if not batching:
        clients = clients[: size["sequential_cap"]]
    warm = clients[:2]                    # kernels compiled / autotuned outside the timed round
    if batching:
        batched_updates(run, [ins[c] for c in warm])
    else:
        for c in warm:
            run.client_update(c, 1, ins[c])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    if batching:
        updates = batched_updates(run, [ins[c] for c in clients])
    else:
        updates = [run.client_update(c, 1, ins[c]) for c in clients]
    sync(device)
    wall = time.perf_counter() - t
    out = {"updates": len(updates), "wall_s": wall, "updates_per_s": len(updates) / wall,
           "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
           "states": {u.client_id: u.state for u in updates[: size["check"]]}, "device": str(device)}
    if mode == "sequential":
        out["flops_per_update"] = necessary_flops(run, ins, clients[: size["flop_sample"]])
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def necessary_flops(run, ins, clients) -> float:
    """Mean FLOPs of one sequential client update (forward + backward + optimizer, counted by FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        for c in clients:
            run.client_update(c, 1, ins[c])
    return counter.get_total_flops() / max(len(clients), 1)


def max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for c, sa in a.items():
        sb = b.get(c)
        if sb is not None:
            worst = max(worst, max(float((sa[n] - sb[n]).abs().max()) for n in sa))
    return worst


def main(size: dict) -> None:
    import pandas as pd
    from fedbench.data import load_task
    cuda = torch.cuda.is_available()
    if not cuda and size is FULL:     # `make bench` on a CPU machine: the full workload is hours of CPU here
        print("bench_gpu: no CUDA device; the full workload is for a GPU (benchmarks/gpu_session.sh). "
              "`python benchmarks/bench_gpu.py --smoke` checks it on the CPU.")
        return
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; python {sys.version.split()[0]}", flush=True)
    peak = bf16_peak_tflops(device, size["gemm"]) if cuda else float("nan")
    print(f"measured bf16 GEMM peak ({size['gemm']}^3): {peak:,.1f} TFLOP/s" if cuda else
          "no CUDA device: bf16 rows skipped (bf16 autocast is CUDA only), no peak share", flush=True)
    n_train = len(load_task("rt_sentiment")["train"])
    modes = ["sequential", "batched"] + (["batched-bf16"] if cuda else [])
    rows = []
    t_all = time.perf_counter()
    for setting, depth in SETTINGS.items():
        for k in size["clients"]:
            res = {m: measure(k, depth, size, m, n_train) for m in modes}
            seq = res["sequential"]
            for m in modes:
                r = res[m]
                row = {"setting": setting, "clients_per_round": k, "mode": m, "updates_timed": r["updates"],
                       "updates_per_s": r["updates_per_s"], "x_sequential": r["updates_per_s"] / seq["updates_per_s"],
                       "peak_mem_gib": r["peak_mem_gib"],
                       "max_state_diff_vs_seq": 0.0 if m == "sequential" else max_diff(seq["states"], r["states"])}
                if m == "batched-bf16":
                    row["share_of_bf16_peak"] = seq["flops_per_update"] * r["updates_per_s"] / (peak * 1e12)
                rows.append(row)
            print(pd.DataFrame(rows[-len(modes):]).to_string(index=False, float_format=lambda x: f"{x:,.4g}"),
                  flush=True)
    table = pd.DataFrame(rows)
    print(f"\nall settings ({time.perf_counter() - t_all:,.0f} s):")
    print(table.to_string(index=False, float_format=lambda x: f"{x:,.4g}"))
    at100 = table[(table["clients_per_round"] == max(c for c in size["clients"] if c <= 100)) & (table["mode"] == "batched")]
    print("batched / sequential at the largest K <= 100: " +
          ", ".join(f"{r.setting}: {r.x_sequential:.1f}x" for r in at100.itertuples()) + " (target >= 10x)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every code path on a tiny workload (CPU, seconds; CI)")
    main(SMOKE if p.parse_args().smoke else FULL)
