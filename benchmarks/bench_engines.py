"""The in-process engine against Flower's Simulation Runtime (Ray backend), on the same workload.

    python benchmarks/bench_engines.py                  # the issue's workload (see --help to shrink it)
    python benchmarks/bench_engines.py --parts scale    # only the 1,000-client memory figures
    python benchmarks/bench_engines.py --smoke          # a tiny workload in seconds (CI: tests/test_benchmarks.py)

Workload (defaults): MiniLM + LoRA r=8 (query/value, every layer), rt_sentiment cut IID into 20 clients of
64 training examples, 5 clients per round, 1 local epoch (2 steps of 32), 5 rounds, central evaluation
on 500 test examples after every round. Each engine runs in its own child process; this process samples
the child's whole process tree (Flower: the driver with the ServerApp, Ray's GCS, raylet and agents, and
the ClientApp actors) every 0.2 s for memory.

Printed per engine: wall-clock per round (all rounds, and rounds 2+ once the ClientApp actors are up),
client updates per second, the engine's per-round overhead (round wall-clock minus the time at least one
client was training minus the server's aggregation + evaluation), the clients' own training time per
update, engine start + stop time, and peak memory: RSS summed over the process tree (counts shared
library pages once per process, so it overstates a multi-process engine) and PSS (shared pages split
between the processes that map them: the machine's actual footprint). Then Flower / in-process ratios.

Scale: the in-process engine with 20 and with 1,000 registered clients on the same data (the task's whole
training split) and the same work per round (5 clients x 2 local steps of 4 examples, since 1,000 clients
hold ~5 examples each): clients are held as data indices (+ a DP ledger when DP is on),
never as model copies, so memory should not grow with the number of clients. For comparison, the same
1,000 clients each holding one adapter (the trainable state) in memory, as personalised-FL clients would,
and what one model copy per client would take.

Timings depend on the machine and on what else runs on it; the figures are from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "FLWR_TELEMETRY_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)


def workload_cfg(a):
    from fedbench.config import ExperimentConfig
    return ExperimentConfig.from_dict({
        "name": "bench-engines", "seed": 0,
        "data": {"task": a.task, "num_clients": a.clients, "partition": "iid",
                 "max_train_samples": a.clients * a.samples, "max_test_samples": a.test_samples},
        "peft": {"method": "lora", "rank": a.rank, "depth": a.depth},
        "train": {"local_epochs": 1, "batch_size": a.batch_size},
        "fl": {"rounds": a.rounds, "clients_per_round": a.per_round, "aggregator": "fedavg"},
    })


def scale_cfg(a, num_clients: int):
    from fedbench.config import ExperimentConfig
    return ExperimentConfig.from_dict({
        "name": "bench-engines-scale", "seed": 0,
        "data": {"task": a.task, "num_clients": num_clients, "partition": "iid",
                 "max_test_samples": a.test_samples},
        "peft": {"method": "lora", "rank": a.rank, "depth": a.depth},
        "train": {"local_steps": 2, "batch_size": a.scale_batch_size},
        "fl": {"rounds": a.scale_rounds, "clients_per_round": a.per_round},
    })


# ----------------------------------------------------------------------------------------------------
# child: run one engine, print its figures as JSON on the last line
# ----------------------------------------------------------------------------------------------------
def _timed_run_class():
    from fedbench.engines.flower import busy_time
    from fedbench.fl import FederatedRun

    class TimedRun(FederatedRun):
        """The in-process loop, unchanged, with the same timing columns the Flower engine records."""
        intervals: list

        def client_update(self, client_id, round_idx, instruction=None, store=None):
            t = time.time()
            u = super().client_update(client_id, round_idx, instruction, store)
            self.intervals.append((t, time.time()))
            return u

        def finish_round(self, plan, updates, t0, failed=0, instructions=None):
            ts = time.perf_counter()
            rec = super().finish_round(plan, updates, t0, failed, instructions=instructions)
            rec.update(server_s=time.perf_counter() - ts, client_busy_s=busy_time(self.intervals),
                       client_train_s=float(sum(u.wall_s for u in updates)))
            self.intervals = []
            return rec

    return TimedRun


def child(a) -> dict:
    import torch
    from fedbench.models import state_nbytes
    t_start = time.perf_counter()
    if a.child == "flower":
        from fedbench.engines.flower import simulate
        cfg = workload_cfg(a)
        run = simulate(cfg, quiet=True)
    else:
        cfg = workload_cfg(a) if a.child == "inprocess" else scale_cfg(a, a.scale_clients)
        run = _timed_run_class()(cfg)
        run.intervals = []
        if a.hold_adapters:      # personalised clients: one adapter (trainable state) per client, in memory
            run.personal = {c: {k: v.clone() for k, v in run.global_model.state.items()}
                            for c in range(cfg.data.num_clients)}
        for r in range(1, cfg.fl.rounds + 1):
            run.run_round(r)
    total = time.perf_counter() - t_start
    model_bytes = sum(p.numel() * p.element_size() for p in run.model.parameters())
    return {"records": run.records, "total_s": total, "state_bytes": state_nbytes(run.global_model.state),
            "model_bytes": model_bytes, "torch_threads": torch.get_num_threads(),
            "num_clients": cfg.data.num_clients}


# ----------------------------------------------------------------------------------------------------
# parent: spawn a child, sample its process tree's memory
# ----------------------------------------------------------------------------------------------------
def measure(argv: list[str]) -> dict:
    import psutil
    fd, out_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    proc = subprocess.Popen([sys.executable, __file__, *argv, f"--out-json={out_path}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "pss": 0}
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            rss = pss = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    mi = p.memory_full_info()
                    rss += mi.rss
                    pss += getattr(mi, "pss", mi.rss)
                except psutil.Error:
                    pass
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            done.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        sys.stderr.write(out[-5000:])
        raise SystemExit(f"benchmark child {argv} failed with exit code {proc.returncode}")
    with open(out_path) as f:
        res = json.load(f)
    os.unlink(out_path)
    res["peak_rss_mb"], res["peak_pss_mb"] = peak["rss"] / 2**20, peak["pss"] / 2**20
    return res


def figures(res: dict) -> dict:
    import pandas as pd
    r = pd.DataFrame(res["records"])
    updates = (r["clients_sampled"] - r["clients_dropped"]).astype(float)
    overhead = r["wall_s"] - r["client_busy_s"] - r["server_s"]
    later = r["round"] > 1
    return {
        "wall_s_per_round": r["wall_s"].mean(),
        "wall_s_per_round_2plus": r.loc[later, "wall_s"].mean(),
        "updates_per_s": updates.sum() / r["wall_s"].sum(),
        "updates_per_s_2plus": updates[later].sum() / r.loc[later, "wall_s"].sum(),
        "overhead_s_per_round": overhead.mean(),
        "overhead_s_per_round_2plus": overhead[later].mean(),
        "overhead_s_round1": float(overhead.iloc[0]),
        "client_train_s_per_update": r["client_train_s"].sum() / updates.sum(),
        "client_train_s_per_update_2plus": r.loc[later, "client_train_s"].sum() / updates[later].sum(),
        "server_s_per_round": r["server_s"].mean(),
        "start_stop_s": res["total_s"] - r["wall_s"].sum(),
        "peak_rss_mb": res["peak_rss_mb"], "peak_pss_mb": res["peak_pss_mb"],
        "final_accuracy": float(r["accuracy"].dropna().iloc[-1]),
    }


def _common_args(a) -> list[str]:
    return [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
            ("task", "clients", "samples", "per_round", "rounds", "rank", "depth", "batch_size", "test_samples",
             "scale_rounds", "scale_batch_size") if getattr(a, k) is not None]


def main(a) -> None:
    import pandas as pd
    from fedbench.fl import prepare_data
    pd.set_option("display.width", 160)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at start; python {sys.version.split()[0]}")
    cfg = workload_cfg(a)
    print(f"workload: {cfg.data.task}, {cfg.data.num_clients} clients x {a.samples} examples (IID), LoRA r={a.rank} "
          f"({'every layer' if a.depth is None else f'top {a.depth} layers'}), {a.per_round} clients/round, "
          f"1 local epoch (batch {a.batch_size}), {a.rounds} rounds, eval on {a.test_samples} test examples")
    prepare_data(cfg)                       # tokenize once (disk cache), outside the measured runs
    prepare_data(scale_cfg(a, 20))
    common = _common_args(a)
    parts = set(a.parts.split(","))
    if "engines" in parts:
        engines(a, common)
    if "scale" in parts:
        scale(a, common)


def engines(a, common) -> None:
    import pandas as pd
    res = {"in-process": measure(["--child=inprocess", *common]), "flower": measure(["--child=flower", *common])}
    fig = pd.DataFrame({k: figures(v) for k, v in res.items()})
    fig["flower / in-process"] = fig["flower"] / fig["in-process"]
    # a ratio to a near-zero overhead says nothing
    fig.loc[fig["in-process"].abs() < 1e-2, "flower / in-process"] = float("nan")
    print(f"\nengines, one run each (in-process: {res['in-process']['torch_threads']} torch thread(s); Flower: "
          f"ClientApp actors of 1 CPU each, {os.cpu_count()} at a time)")
    print(fig.to_string(float_format=lambda x: f"{x:,.3f}", na_rep="-"))
    same = [c for c in ["train_loss", "accuracy", "loss", "bytes_up", "bytes_down"]]
    ra, rb = pd.DataFrame(res["in-process"]["records"]), pd.DataFrame(res["flower"]["records"])
    diff = (ra[same] - rb[same]).abs().max().max()
    print(f"same per-round records on both engines (train_loss, accuracy, loss, bytes): max abs difference {diff:.2e}")
    print(f"Flower wire bytes / fedbench's byte count: up {rb['wire_bytes_up'].sum() / rb['bytes_up'].sum():.4f}, "
          f"down {rb['wire_bytes_down'].sum() / rb['bytes_down'].sum():.4f}")


def scale(a, common) -> None:
    import pandas as pd
    scale = {}
    for n, hold in [(20, False), (a.scale_clients, False), (a.scale_clients, True)]:
        label = f"{n} clients" + (" + one adapter each" if hold else "")
        scale[label] = measure([f"--child=scale", f"--scale-clients={n}", *common,
                                *(["--hold-adapters"] if hold else [])])
    rows = {k: {"registered clients": v["num_clients"], "peak_rss_mb": v["peak_rss_mb"],
                "peak_pss_mb": v["peak_pss_mb"], "wall_s_per_round": pd.DataFrame(v["records"])["wall_s"].mean()}
            for k, v in scale.items()}
    print(f"\nscale (in-process, {a.task} all training data, {a.per_round} clients x 2 steps of batch "
          f"{a.scale_batch_size} per round, {a.scale_rounds} rounds)")
    print(pd.DataFrame(rows).T.to_string(float_format=lambda x: f"{x:,.1f}"))
    v = scale[f"{a.scale_clients} clients"]
    base = scale["20 clients"]
    per_client = (v["peak_pss_mb"] - base["peak_pss_mb"]) * 2**20 / (a.scale_clients - 20)
    print(f"memory per extra registered client: {per_client / 1024:,.1f} KiB (PSS difference / {a.scale_clients - 20});"
          f" one adapter = {v['state_bytes'] / 2**20:.3f} MiB, so {a.scale_clients} adapters = "
          f"{a.scale_clients * v['state_bytes'] / 2**20:,.0f} MiB; one model copy per client would be "
          f"{a.scale_clients * v['model_bytes'] / 2**30:,.1f} GiB")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="rt_sentiment")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--samples", type=int, default=64, help="training examples per client")
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--depth", type=int, default=None, help="LoRA in the top DEPTH layers (default: every layer)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--test-samples", type=int, default=500)
    p.add_argument("--scale-clients", type=int, default=1000)
    p.add_argument("--scale-rounds", type=int, default=2)
    p.add_argument("--scale-batch-size", type=int, default=4,
                   help="scale runs: batch size (1,000 clients hold ~5 examples each; the same batches for 20)")
    p.add_argument("--parts", default="engines,scale", help="comma-separated: engines, scale")
    p.add_argument("--child", choices=["inprocess", "flower", "scale"], help=argparse.SUPPRESS)
    p.add_argument("--hold-adapters", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="a tiny workload that runs every part in seconds (CI)")
    a = p.parse_args(argv)
    if a.smoke:     # every code path, tiny sizes: what CI runs so that the benchmark cannot rot unnoticed
        for k, v in SMOKE.items():
            setattr(a, k, v)
    return a


# the --smoke workload: 4 clients x 8 examples, 2 per round, 2 rounds; scale runs with 40 clients
SMOKE = {"clients": 4, "samples": 8, "per_round": 2, "rounds": 2, "rank": 2, "depth": 1, "batch_size": 4,
         "test_samples": 16, "scale_clients": 40, "scale_rounds": 1, "scale_batch_size": 2}


if __name__ == "__main__":
    args = parse()
    if args.child:
        with open(args.out_json, "w") as f:
            json.dump(child(args), f, default=float)
    else:
        main(args)
