"""Round-level checkpoint and resume: a run killed with SIGKILL mid-way continues from its last finished round and
ends bit-identical to an uninterrupted run (records, per-example predictions, final global state)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from fedbench.results import read_tensors

# LoRA on the top 2 layers (the activation cache is replayed on resume), DP-SGD (each client's ledger lives in
# the client store), FedAdam (server moments), sampling and dropout: every piece of state a round leaves behind
CONFIG = {
    "name": "resume", "seed": 5,
    "data": {"task": "rt_sentiment", "num_clients": 4, "partition": "dirichlet", "alpha": 1.0,
             "max_train_samples": 96, "max_test_samples": 48, "max_length": 24},
    "peft": {"method": "lora", "rank": 2, "depth": 2},
    "train": {"local_steps": 2, "batch_size": 8, "lr": 0.003,
              "dp": {"enabled": True, "noise_multiplier": 0.8, "max_grad_norm": 1.0, "delta": 1e-5}},
    "fl": {"rounds": 6, "clients_per_round": 3, "dropout": 0.2, "aggregator": "fedadam", "server_lr": 0.01},
}

SCRIPT = textwrap.dedent("""
    import json, sys
    from fedbench.config import ExperimentConfig
    from fedbench.fl import run_federated
    from fedbench.results import atomic_write_csv, atomic_write_json
    cfg = ExperimentConfig.from_dict(json.loads(sys.argv[1]))
    res = run_federated(cfg, checkpoint_dir=sys.argv[2])
    atomic_write_csv(sys.argv[3] + "/rounds.csv", res.rounds.drop(columns=["wall_s"]))
    atomic_write_json(sys.argv[3] + "/predictions.json", {k: v.tolist() for k, v in res.predictions.items()})
""")


def _start(ckpt, out):
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(CONFIG), str(ckpt), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _latest_round(ckpt) -> int:
    try:
        return json.loads((ckpt / "latest.json").read_text())["round"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path):
    ref_ckpt, ref_out = tmp_path / "ref-ckpt", tmp_path / "ref"
    ref_out.mkdir()
    p = _start(ref_ckpt, ref_out)
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]

    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed"
    out.mkdir()
    p = _start(ckpt, out)
    deadline = time.time() + 600
    while _latest_round(ckpt) < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = _latest_round(ckpt)
    assert 2 <= killed_at < CONFIG["fl"]["rounds"], "the run must be killed mid-way"
    assert not (out / "rounds.csv").exists()

    p = _start(ckpt, out)                                     # restarted: continues from round killed_at + 1
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]
    a, b = pd.read_csv(ref_out / "rounds.csv"), pd.read_csv(out / "rounds.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert (ref_out / "predictions.json").read_text() == (out / "predictions.json").read_text()
    final = {d: json.loads((d / "latest.json").read_text())["dir"] for d in (ref_ckpt, ckpt)}
    sa, sb = (read_tensors(d / final[d] / "global.safetensors") for d in (ref_ckpt, ckpt))
    assert set(sa) == set(sb) and all(bool((sa[k] == sb[k]).all()) for k in sa)
    ledgers = [json.loads((d / final[d] / "store.json").read_text()) for d in (ref_ckpt, ckpt)]
    assert ledgers[0] == ledgers[1] and any("dp" in v for v in ledgers[0].values())


def test_checkpoint_round_trips_in_process(tmp_path):
    """save_checkpoint then restore into a fresh run: the same global model, store and records."""
    from fedbench.config import ExperimentConfig
    from fedbench.fl import FederatedRun, prepare_data
    cfg = ExperimentConfig.from_dict({**CONFIG, "fl": {**CONFIG["fl"], "rounds": 2}})
    data = prepare_data(cfg)
    run = FederatedRun(cfg, data)
    run.run_round(1)
    run.save_checkpoint(tmp_path)
    fresh = FederatedRun(cfg, data)
    assert fresh.restore_checkpoint(tmp_path) == 1
    assert fresh.records == run.records
    assert all(bool((fresh.global_model.state[k] == v).all()) for k, v in run.global_model.state.items())
    assert fresh.dp_states.keys() == run.dp_states.keys()
    assert fresh.strategy.optimizer.m.keys() == run.strategy.optimizer.m.keys()
    assert not list(tmp_path.glob(".round-*"))               # no temporary folder left behind
