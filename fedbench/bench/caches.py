"""The frozen-prefix activation caches an experiment's runs share, keyed by what a cache depends on.

A frozen bottom layer computes the same activations for an example whatever is trained above it (rule, attack,
method, learning rate), so one cache per data sample and depth serves every run of a grid. A cache depends on the
data sample (task, sizes, sequence length, backbone, and the seed only when the sample is subsampled: without
subsampling every seed sees the same examples) and on the depth; nothing else. Each is filled once, before its
first run, in a fixed order (by length, then index: :meth:`fedbench.models.inputs.ActivationCache.fill_depths`),
so the cached values, and every run's numbers, do not depend on which runs came first or were already on disk.
A run evaluated on a validation carve of the training split (the ``validation`` federation option: a learning-rate
search) gets that carve's data and its own evaluation cache, beside the training cache of its sample.
"""
from __future__ import annotations

import numpy as np

from fedbench.config import ExperimentConfig, PeftConfig, config_hash


class PrefixCaches:
    """Prepared data and frozen-prefix caches for the runs of one experiment (in memory, for one process).

    ``data(cfg)`` is the run's :func:`fedbench.fl.prepare_data`, shared by every run with the same data fields,
    backbone and seed; ``get(cfg, data)`` the (train, test) caches for it, filled at the run's frozen depth (the
    layers below what its PEFT method trains, as :func:`fedbench.models.build_model` builds it) and at any
    ``depths`` given with it, in one pass (the values are those of one fill per depth).
    """

    def __init__(self):
        self._data: dict[str, object] = {}
        self._train: dict[str, object] = {}         # sample -> training cache
        self._evaluated: dict[str, object] = {}     # sample (test) or validation carve -> evaluation cache
        self._depths: dict[str, int] = {}
        self._filled: set[tuple[str, int]] = set()
        self._model = None

    @staticmethod
    def sample_key(cfg: ExperimentConfig) -> str:
        """What the cached activations depend on: the sample's fields and backbone, the seed only if subsampled."""
        d = cfg.data
        seeded = d.max_train_samples is not None or d.max_test_samples is not None
        return config_hash({"task": d.task, "max_train_samples": d.max_train_samples, "max_length": d.max_length,
                            "max_test_samples": d.max_test_samples, "backbone": cfg.model.backbone,
                            "seed": cfg.seed if seeded else None})

    @staticmethod
    def validation_size(cfg: ExperimentConfig) -> int | None:
        """The validation carve `cfg` is evaluated on (the single federation's ``validation`` option, the data
        :meth:`data` prepares), or None: the test split."""
        from fedbench.fl.data import SingleOptions
        from fedbench.registry import FEDERATIONS
        if FEDERATIONS.entry(cfg.data.federation).options is not SingleOptions:
            return None
        return cfg.data.federation_options.get("validation")

    def data(self, cfg: ExperimentConfig):
        """The run's prepared data, built once per (data fields, backbone, seed); on a validation carve,
        :func:`fedbench.fl.prepare_validation` of the same clients (the training split shared with test runs)."""
        from fedbench.fl import prepare_data, prepare_validation
        key = config_hash({"data": cfg.to_dict()["data"], "backbone": cfg.model.backbone, "seed": cfg.seed})
        if key not in self._data:
            size = self.validation_size(cfg)
            self._data[key] = prepare_data(cfg) if size is None else prepare_validation(
                cfg, size, self.data(cfg.replace(**{"data.federation_options.validation": None})))
        return self._data[key]

    def frozen_depth(self, cfg: ExperimentConfig, num_labels: int) -> int:
        """How many bottom layers `cfg`'s model keeps frozen (0: none, nothing to cache)."""
        from fedbench.models import build_model
        key = config_hash({"peft": cfg.to_dict()["peft"], "model": cfg.to_dict()["model"]})
        if key not in self._depths:
            self._depths[key] = int(build_model(cfg.model, cfg.peft, num_labels, seed=0).frozen_prefix)
        return self._depths[key]

    def get(self, cfg: ExperimentConfig, data=None, depths=()) -> tuple:
        """(train cache, test cache) for `cfg` on `data` (default: :meth:`data`), filled at its frozen depth and
        at `depths`."""
        import torch

        from fedbench.models import build_model
        from fedbench.models.inputs import ActivationCache
        data = self.data(cfg) if data is None else data
        key = self.sample_key(cfg)
        size = self.validation_size(cfg)      # a validation carve: its own evaluation cache, the sample's training one
        evaluated = key if size is None else config_hash({"sample": key, "validation": size, "seed": cfg.seed})
        if key not in self._train:
            self._train[key] = ActivationCache(data.train, data.pad_id)
        if evaluated not in self._evaluated:
            self._evaluated[evaluated] = ActivationCache(data.test, data.pad_id)
        pair = (self._train[key], self._evaluated[evaluated])
        if self._model is None:      # the plain pretrained layers compute every prefix
            self._model = build_model(cfg.model, PeftConfig(method="head"), data.num_labels, seed=0)
        want = {d for d in (self.frozen_depth(cfg, data.num_labels), *depths) if d > 0}
        with torch.no_grad():
            for cache, idx, k in zip(pair, (np.arange(len(data.train)), np.asarray(data.test_indices)),
                                     ((key, "train"), (evaluated, "evaluated"))):
                todo = sorted(d for d in want if (k, d) not in self._filled)
                if todo:
                    cache.fill_depths(self._model, idx, todo)
                    self._filled.update((k, d) for d in todo)
        return pair
