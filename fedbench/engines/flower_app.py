"""The module-level Flower apps that ``flwr run`` loads (components of ``examples/flower/pyproject.toml``).

    [tool.flwr.app.components]
    serverapp = "fedbench.engines.flower_app:server_app"
    clientapp = "fedbench.engines.flower_app:client_app"

The experiment comes from the run config (``[tool.flwr.app.config]``, overridable with
``flwr run ... --run-config "fl.rounds=10 peft.rank=4"``): ``config`` is a fedbench YAML/JSON config
(absolute path, or relative to the directory the SuperLink runs the ServerApp in; empty = fedbench's
defaults) and every dotted key naming a config field overrides it (see
:func:`fedbench.engines.flower.config_from_run_config`). The ServerApp writes the finished run to the
results store (``results`` = its root; empty = fedbench's default, ``results/runs``) under
``run_key(cfg, "flower")``, like ``fedbench run CONFIG --engine flower``; ``fedbench results`` lists it.

The ClientApp is :data:`fedbench.engines.flower.client_app`: a SuperNode trains the client whose id is its
``partition-id`` node config (the Simulation Runtime sets it; on real machines pass
``--node-config "partition-id=K num-partitions=N"``).
"""
from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbench.engines.flower import client_app, config_from_run_config, flower_result, patch_ray_start, server_main
from fedbench.results import run_key, save_run

# Flower's simulation process loads this module before it starts Ray: let Ray start on a busy machine too
# (fixed agent ports; see patch_ray_start). Processes that never start Ray are not affected.
patch_ray_start()

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(context.run_config)
    result = flower_result(server_main(grid, cfg))
    path = save_run(result, run_key(cfg, "flower"), str(context.run_config.get("results", "")) or None)
    # Flower's logger, so that `flwr run --stream` / `flwr log` show it
    logging.getLogger("flwr").info("fedbench: final accuracy %.4f; run saved to %s",
                                   result.summary["final_accuracy"], path.resolve())


__all__ = ["client_app", "server_app"]
