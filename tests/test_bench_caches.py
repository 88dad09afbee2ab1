"""fedbench.bench.caches.PrefixCaches: one cache per data sample, keyed by what it depends on, filled exactly."""
import numpy as np
import torch

from fedbench.bench import PrefixCaches
from fedbench.config import ExperimentConfig, PeftConfig
from fedbench.models import build_model
from fedbench.models.inputs import ActivationCache


def _cfg(seed=0, sub=True, method="lora", depth=1):
    d = {"task": "rt_sentiment", "num_clients": 3, "partition": "iid", "max_length": 16}
    if sub:
        d.update(max_train_samples=24, max_test_samples=12)
    return ExperimentConfig.from_dict({"seed": seed, "data": d, "peft": {"method": method, "depth": depth},
                                       "fl": {"rounds": 1}})


def test_seed_shares_the_cache_only_without_subsampling():
    assert PrefixCaches.sample_key(_cfg(0, sub=False)) == PrefixCaches.sample_key(_cfg(1, sub=False))
    assert PrefixCaches.sample_key(_cfg(0)) != PrefixCaches.sample_key(_cfg(1))
    # the method and depth trained above the prefix do not change what is cached
    assert PrefixCaches.sample_key(_cfg(method="head")) == PrefixCaches.sample_key(_cfg(method="lora", depth=2))


def test_filled_at_the_runs_depth_and_extra_depths_with_one_fill_per_depth_values():
    cfg = _cfg()
    pc = PrefixCaches()
    data = pc.data(cfg)
    assert pc.data(cfg) is data                                  # prepared once
    train, test = pc.get(cfg, data, depths=(3,))
    n = pc.frozen_depth(cfg, data.num_labels)
    assert n == build_model(cfg.model, cfg.peft, data.num_labels, seed=0).num_layers - 1
    assert pc.get(cfg.replace(**{"peft.method": "head", "peft.depth": None}), data)[0] is train   # one cache a sample
    model = build_model(cfg.model, PeftConfig(method="head"), data.num_labels, seed=0)
    for depth in (3, n):
        fresh = ActivationCache(data.train, data.pad_id)
        idx = np.arange(len(data.train))
        fresh.fill(model, idx, depth)
        for i in idx:
            assert torch.equal(fresh._stores[depth][int(i)], train._stores[depth][int(i)])
    assert set(test._stores) >= {3, n} and len(test._stores[n]) == len(data.test_indices)
