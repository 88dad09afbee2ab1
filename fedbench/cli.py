"""`fedbench` on the shell: list tasks and registries, run a paper experiment or one federated run, show runs.

    fedbench run configs/fedpeft/quick.yaml --set fl.aggregator=median   # a whole paper experiment (its profile)
    fedbench run my_run.yaml --set peft.rank=4 --engine flower        # one federated run (an ExperimentConfig)
    fedbench list                                                     # tuners, aggregators, strategies, ...
    fedbench run my_run.yaml --plugin my_rules                        # outside code registers components first

A bad value, at load time or while building (e.g. ``peft.depth=99`` on a 6-layer backbone), is one line
naming the field, the value and what is allowed, with exit code 2 and no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

ENGINES = ("inprocess", "flower")


def _cmd_tasks(args) -> int:
    from fedbench.data import format_tasks_table
    print(format_tasks_table())
    return 0


def _cmd_list(args) -> int:
    from fedbench.config import ConfigError
    from fedbench.plugins import load as load_plugins
    from fedbench.registry import format_registries
    try:
        load_plugins(args.plugin or [], "--plugin")
    except ConfigError as e:
        print(f"fedbench list: {e}", file=sys.stderr)
        return 2
    print(format_registries(), end="")
    return 0


def _parse_sets(items) -> dict:
    out = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            from fedbench.config import ConfigError
            raise ConfigError(item, item, "FIELD=VALUE, e.g. --set fl.rounds=10")
        out[key.strip()] = _parse_value(raw)
    return out


def _cmd_run(args) -> int:
    from fedbench.config import ConfigError
    try:
        return _run(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"fedbench run: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import yaml

    from fedbench.config import ConfigError, ExperimentConfig
    from fedbench.experiments.common import read_profile_file
    from fedbench.models.checks import check_against_backbone
    overrides = _parse_sets(args.set)
    from fedbench.plugins import load as load_plugins
    plugins = load_plugins(args.plugin or [], "--plugin")     # before the config names their components
    text = open(args.config).read()
    d = yaml.safe_load(text) if args.config.endswith((".yaml", ".yml")) else json.loads(text)
    if isinstance(d, dict) and "experiment" in d:        # a paper experiment's profile
        import importlib

        from fedbench.registry import EXPERIMENTS
        profile = read_profile_file(args.config)
        entry = EXPERIMENTS.entry(profile["experiment"], "experiment")
        if args.engine != "inprocess":
            raise ConfigError("--engine", args.engine, "inprocess for a paper experiment (Flower runs one config: "
                                                       "fedbench run RUN.yaml --engine flower)")
        module = importlib.import_module(entry.obj)
        prof = profile["profile"] or "quick"
        res = module.run(profile=prof, path=args.config, **overrides)
        claims = getattr(res, "claims", None)
        if claims is not None and len(claims):
            cols = [c for c in ("claim", "estimate", "ci_low", "ci_high", "verdict") if c in claims.columns]
            print(claims[cols].to_string(index=False))
        return 0
    cfg = ExperimentConfig.load(args.config)
    if plugins:          # they travel with the config (Flower's workers import them) and version its run key
        overrides["plugins"] = list(dict.fromkeys([*cfg.plugins, *overrides.get("plugins", ()), *plugins]))
    if overrides:
        cfg = cfg.replace(**overrides)
    check_against_backbone(cfg)               # before any work
    if args.engine == "flower":
        from fedbench.engines.flower import run_flower_cached as runner
    else:
        from fedbench.fl import run_cached as runner
    result = runner(cfg, progress=True, root=args.results, force=args.force)
    from fedbench.results import run_key
    print(json.dumps({"run_key": run_key(cfg, args.engine), "config_hash": cfg.hash(), **result.summary}, indent=2))
    return 0


def _cmd_results(args) -> int:
    from fedbench.results import load_results
    df = load_results(args.results)
    if df.empty:
        print("no finished runs")
        return 0
    cols = [c for c in ["config_hash", "name", "data.task", "peft.method", "fl.strategy", "seed", "final_accuracy",
                        "total_bytes", "wall_s"] if c in df.columns]
    print(df[cols].to_string(index=False))
    return 0


def _parse_value(raw: str):
    import yaml
    return yaml.safe_load(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks", help="list every task: source, sizes, classes, offline or hub").set_defaults(fn=_cmd_tasks)
    lst = sub.add_parser("list", help="list the registries: tuners, aggregators, LoRA semantics, strategies, "
                                      "attacks, merges, experiments")
    lst.add_argument("--plugin", action="append", metavar="MODULE", help="import MODULE first (its components "
                                                                         "are listed too); repeatable")
    lst.set_defaults(fn=_cmd_list)
    run = sub.add_parser("run", help="run a paper experiment (configs/<experiment>/<profile>.yaml) or one "
                                     "federated run (an ExperimentConfig YAML/JSON)")
    run.add_argument("config")
    run.add_argument("--engine", choices=ENGINES, default="inprocess")
    run.add_argument("--set", action="append", metavar="FIELD=VALUE",
                     help="override a config field by dotted path (fl.dropout=0.3) or an experiment setting "
                          "(seeds=[0,1,2]); repeatable")
    run.add_argument("--results", default=None, help="results root of a single run (default: $FEDBENCH_RESULTS or "
                                                     "results/runs)")
    run.add_argument("--force", action="store_true", help="recompute even if this config has a finished run")
    run.add_argument("--plugin", action="append", metavar="MODULE",
                     help="import MODULE (an outside module that registers components) before the config is read; "
                          "added to the config's plugins; repeatable")
    run.set_defaults(fn=_cmd_run)
    res = sub.add_parser("results", help="list finished runs")
    res.add_argument("--results", default=None)
    res.set_defaults(fn=_cmd_results)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
