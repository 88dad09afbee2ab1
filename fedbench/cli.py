"""`fedbench` on the shell: list tasks, run one experiment config, show finished runs."""
from __future__ import annotations

import argparse
import json
import sys

ENGINES = ("inprocess", "flower")


def _cmd_tasks(args) -> int:
    from fedbench.data import format_tasks_table
    print(format_tasks_table())
    return 0


def _cmd_run(args) -> int:
    from fedbench.config import ConfigError, ExperimentConfig
    try:
        cfg = ExperimentConfig.load(args.config)
        for item in args.set or []:
            key, _, raw = item.partition("=")
            cfg = cfg.replace(**{key: _parse_value(raw)})
    except (ConfigError, FileNotFoundError) as e:
        print(f"fedbench run: {e}", file=sys.stderr)
        return 2
    if args.engine == "flower":
        from fedbench.engines.flower import run_flower_cached as runner
    else:
        from fedbench.fl import run_cached as runner
    result = runner(cfg, progress=True, root=args.results, force=args.force)
    print(json.dumps({"config_hash": cfg.hash(), **result.summary}, indent=2))
    return 0


def _cmd_results(args) -> int:
    from fedbench.results import load_results
    df = load_results(args.results)
    if df.empty:
        print("no finished runs")
        return 0
    cols = [c for c in ["config_hash", "name", "data.task", "peft.method", "seed", "final_accuracy",
                        "total_bytes", "wall_s"] if c in df.columns]
    print(df[cols].to_string(index=False))
    return 0


def _parse_value(raw: str):
    import yaml
    return yaml.safe_load(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks", help="list every task: source, sizes, classes, offline or hub").set_defaults(fn=_cmd_tasks)
    run = sub.add_parser("run", help="run one experiment from a YAML/JSON config")
    run.add_argument("config")
    run.add_argument("--engine", choices=ENGINES, default="inprocess")
    run.add_argument("--set", action="append", metavar="FIELD=VALUE",
                     help="override a config field by dotted path, e.g. --set peft.rank=4 (repeatable)")
    run.add_argument("--results", default=None, help="results root (default: $FEDBENCH_RESULTS or results/runs)")
    run.add_argument("--force", action="store_true", help="recompute even if this config has a finished run")
    run.set_defaults(fn=_cmd_run)
    res = sub.add_parser("results", help="list finished runs")
    res.add_argument("--results", default=None)
    res.set_defaults(fn=_cmd_results)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
