"""The measured device profile: ``DEVICES["this_cpu"]`` (fedbench.strategies.autofednlp) holds one run of this."""
from __future__ import annotations

import time

import numpy as np

from fedbench.experiments.autofednlp.plan import NUM_LAYERS


def measure_device(batch_size: int = 8, max_length: int = 32, width: int = 8, repeats: int = 20,
                   task: str = "ng20") -> dict:
    """Seconds of one local step at each depth (adapters of `width`, prefix cached), of full fine-tuning, and of
    one frozen layer's forward, timed on this machine (median of `repeats` steps after a warm-up step)."""
    import torch

    from fedbench.config import ModelConfig, PeftConfig, TrainConfig
    from fedbench.data import load_task
    from fedbench.fl.client import train_client
    from fedbench.models import build_model, load_tokenizer, trainable_state
    from fedbench.models.inputs import ActivationCache, tokenize_split
    ds = load_task(task)["train"]
    split = tokenize_split(ds.select(range(batch_size * (repeats + 1))), load_tokenizer("minilm"), max_length)
    idx = np.arange(len(split))
    tc = TrainConfig(local_steps=1, batch_size=batch_size, lr=1e-3)

    def per_step(peft, cached=True):
        m = build_model(ModelConfig(), peft, 20, seed=0)
        cache = ActivationCache(split, 0) if cached and m.frozen_prefix > 0 else None
        if cache is not None:
            cache.ensure(m.frozen_prefix)
            cache.get(m, idx)
        st = trainable_state(m)
        out = []
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            train_client(m, st, split, idx[r * batch_size:(r + 1) * batch_size], tc, seed=r, cache=cache)
            out.append(time.perf_counter() - t0)
        return float(np.median(out[1:]))

    steps = [0.0] + [per_step(PeftConfig(method="adapter", adapter_width=width, depth=d)) for d in range(1, NUM_LAYERS + 1)]
    full = per_step(PeftConfig(method="full"))
    m = build_model(ModelConfig(), PeftConfig(method="head"), 20, seed=0)
    x, mask = split.inputs(idx[:batch_size], 0)
    with torch.no_grad():
        m.prefix_hidden(x, mask, NUM_LAYERS)
        t0 = time.perf_counter()
        for _ in range(repeats):
            m.prefix_hidden(x, mask, NUM_LAYERS)
    prefix_layer = (time.perf_counter() - t0) / repeats / NUM_LAYERS
    return {"step_s": tuple(round(v, 4) for v in steps), "full_step_s": round(full, 4),
            "prefix_layer_s": round(prefix_layer, 4), "torch_threads": torch.get_num_threads()}
