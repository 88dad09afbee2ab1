"""The one way an experiment runs a config: through the run store, keyed by the whole config.

A finished config is loaded, never recomputed; an unfinished one runs once on the loop (resuming from its
checkpoint), on the data and frozen-prefix caches the experiment's own provider builds (by default
:class:`fedbench.bench.caches.PrefixCaches`: one prepared data set and one cache per sample and depth, shared
by every run that needs them). An experiment whose data is not the loop's plain ``prepare_data`` (a validation
split, a task pool, a per-seed cache filled at every depth) passes its own ``data`` / ``caches`` callables;
what runs, and the store, are the same for every experiment.
"""
from __future__ import annotations

import time
from typing import Callable

from fedbench.bench.caches import PrefixCaches
from fedbench.bench.profiles import runs_root


class Runner:
    """``get(cfg)``: the RunResult of `cfg`, from the store or run once.

    ``data(cfg)`` gives the run's prepared data and ``caches(cfg, data)`` its (train, test) prefix caches or None;
    both are called only for a run that is not in the store. ``reload`` returns what a later load gives even for a
    run just computed (bit-identical tables whether or not it was on disk). ``label(cfg)`` names a run in the
    progress line (None: no progress printed). ``shared``: the PrefixCaches the providers draw on (default: new).
    """

    def __init__(self, data: Callable | None = None, caches: Callable | None = None, *, root=None,
                 reload: bool = False, label: Callable | None = None, shared: PrefixCaches | None = None):
        self.shared = shared if shared is not None else PrefixCaches()
        self.data = data if data is not None else self.shared.data
        self.caches = caches
        self.root, self.reload, self.label = root, reload, label

    @classmethod
    def with_prefix_caches(cls, **kwargs) -> "Runner":
        """A Runner whose runs get the shared frozen-prefix caches of their sample (data: ``PrefixCaches.data``)."""
        runner = cls(**kwargs)
        runner.caches = runner.prefix_caches
        return runner

    def store(self):
        return self.root if self.root is not None else runs_root()

    def done(self, cfg):
        """The finished run of `cfg` in the store, or None."""
        from fedbench.results import load_run, run_key
        return load_run(run_key(cfg), self.store())

    def get(self, cfg, compute: Callable | None = None):
        """`compute(cfg, data, caches, checkpoint_dir)`, if given, computes a run not in the store instead of the
        loop's :func:`~fedbench.fl.server.run_federated` (e.g. a replay of a held run of the same training); its
        result is stored like any run's."""
        from fedbench.fl.server import run_cached
        from fedbench.results import cached_run, load_run, run_key
        done = self.done(cfg)
        if done is not None:
            return done
        data = self.data(cfg)
        caches = self.caches(cfg, data) if self.caches is not None else None
        t0 = time.perf_counter()
        if compute is None:
            res = run_cached(cfg, data, root=self.store(), caches=caches)
        else:
            res = cached_run(cfg, lambda ckpt: compute(cfg, data, caches, ckpt), root=self.store())
        if self.label is not None:
            print(f"{self.label(cfg)}: {time.perf_counter() - t0:.0f} s, test accuracy "
                  f"{res.summary['final_accuracy']:.3f}", flush=True)
        return load_run(run_key(cfg), self.store()) if self.reload else res

    def prefix_caches(self, cfg, data):
        """A ``caches`` provider: the shared frozen-prefix caches of `cfg`'s sample at its frozen depth."""
        return self.shared.get(cfg, data)
