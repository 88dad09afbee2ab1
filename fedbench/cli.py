"""`fedbench` on the shell: list tasks and registries, run a paper experiment or one federated run, show runs.

    fedbench run configs/examples/tiny.yaml                           # one federated run (~20 s; an ExperimentConfig)
    fedbench run configs/examples/tiny.yaml --set peft.rank=4 --engine flower   # the same on Flower
    fedbench run configs/quickstart/quick.yaml                        # a whole paper experiment (its profile)
    fedbench run configs/fedpeft/quick.yaml --set fl.aggregator=median   # ... changed: outputs in custom-<hash>/
    fedbench results                                                  # every finished run
    fedbench list                                                     # tuners, aggregators, strategies, ...
    fedbench export configs/fl_tac/quick.yaml --method fl_tac --seed 0 > run.yaml   # one paper run, alone
    fedbench run my_run.yaml --plugin my_rules                        # outside code registers components first

A bad value, at load time or while building (e.g. ``peft.depth=99`` on a 6-layer backbone), is one line
naming the field, the value and what is allowed, with exit code 2 and no traceback. A profile run with
overrides (or from a profile file of your own) writes to results/<experiment>/custom-<hash>/, never over the
committed results/<experiment>/. The Hugging Face hub is offline unless HF_HUB_OFFLINE=0 is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ENGINES = ("inprocess", "flower")
# Offline unless the user says otherwise: the bundled backbone and tasks need no network, and a hub id that
# is not cached then fails at once instead of after the hub's retries (~30 s).
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"}


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
    from fedbench.yamlio import parse_value
    out = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            from fedbench.errors import ConfigError
            raise ConfigError(item, item, "FIELD=VALUE, e.g. --set fl.rounds=10")
        out[key.strip()] = parse_value(raw)
    return out


# errors that are the user's to fix, printed as one line (exit code 2): (module, class name)
ONE_LINE_ERRORS = (("fedbench.errors", "ConfigError"), ("fedbench.data.sources", "TaskUnavailableError"),
                   ("fedbench.data.sources", "DataIntegrityError"), ("fedbench.results", "CorruptRunError"),
                   ("fedbench.results", "RunAlreadyRunning"))


def _is_one_line_error(e: Exception) -> bool:
    # looked up among the modules already imported: an error from a module never imported cannot be one of its
    # classes, and importing fedbench.data only to compare would cost a second (datasets) on every bad input
    return any(isinstance(e, getattr(sys.modules[mod], name)) for mod, name in ONE_LINE_ERRORS if mod in sys.modules)


def _cmd_run(args) -> int:
    try:
        return _run(args)
    except Exception as e:
        if not _is_one_line_error(e):
            raise
        print(f"fedbench run: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def check_results_folder(path, flag: str = "--results") -> None:
    """ConfigError unless `path` is (or can be created as) a folder this process can write, checked before
    any work: a path that is a file, or under a file, or not writable would otherwise fail after training."""
    from pathlib import Path

    from fedbench.errors import ConfigError
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(flag, str(path), f"a folder ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(flag, str(path), f"a folder you can write ({probe} is not writable)")


def _run(args) -> int:
    from fedbench.yamlio import read_config_file
    overrides = _parse_sets(args.set)
    from fedbench.plugins import load as load_plugins
    plugins = load_plugins(args.plugin or [], "--plugin")     # before the config names their components
    d = read_config_file(args.config)        # one line for a folder, a bad suffix, bad syntax, an empty file
    if "experiment" in d:                    # a paper experiment's profile
        return _run_profile(args, overrides)
    from fedbench.config import ExperimentConfig
    cfg = ExperimentConfig.from_dict(d)
    if plugins:          # they travel with the config (Flower's workers import them) and version its run key
        overrides["plugins"] = list(dict.fromkeys([*cfg.plugins, *overrides.get("plugins", ()), *plugins]))
    if overrides:
        cfg = cfg.replace(**overrides)
    from fedbench.models.checks import check_against_backbone
    check_against_backbone(cfg)               # before any work
    from fedbench.results import default_root, run_dir, run_key
    root = args.results if args.results is not None else default_root()
    check_results_folder(root)
    if args.engine == "flower":
        from fedbench.engines.flower import run_flower_cached
        result = run_flower_cached(cfg, progress=True, root=root, force=args.force, quiet=not args.verbose)
    else:
        from fedbench.fl import run_cached
        result = run_cached(cfg, progress=True, root=root, force=args.force)
    key = run_key(cfg, args.engine)
    print(json.dumps({"run_key": key, "config_hash": cfg.hash(), **result.summary}, indent=2))
    print(f"outputs in {run_dir(key, root)}", file=sys.stderr)
    return 0


def _run_profile(args, overrides: dict) -> int:
    import importlib

    from fedbench.errors import ConfigError
    from fedbench.bench import output_dir, read_profile_file
    from fedbench.registry import EXPERIMENTS
    profile = read_profile_file(args.config)
    entry = EXPERIMENTS.entry(profile["experiment"], "experiment")
    if args.engine != "inprocess":
        raise ConfigError("--engine", args.engine, "inprocess for a paper experiment (Flower runs one config: "
                                                   "fedbench run RUN.yaml --engine flower)")
    if args.force:    # an experiment is many runs, each loaded from the store when finished
        raise ConfigError("--force", True, "no --force with a paper experiment's profile (it recomputes nothing "
                                           "finished); use --results NEW_FOLDER for a fresh store, or delete "
                                           "results/runs/")
    old_root = os.environ.get("FEDBENCH_RESULTS_ROOT")
    if args.results is not None:   # the results root of the whole experiment: its outputs and its run store
        check_results_folder(args.results)
        os.environ["FEDBENCH_RESULTS_ROOT"] = os.path.abspath(os.path.expanduser(args.results))
    try:
        from fedbench.bench import results_root
        check_results_folder(results_root(), "results folder")
        module = importlib.import_module(entry.obj)
        prof = profile["profile"] or "quick"
        res = module.run(profile=prof, path=args.config, **overrides)
        claims = getattr(res, "claims", None)
        if claims is not None and len(claims):
            cols = [c for c in ("claim", "estimate", "ci_low", "ci_high", "verdict") if c in claims.columns]
            print(claims[cols].to_string(index=False))
        print(f"outputs in {output_dir(profile['experiment'], prof, args.config, overrides)}", file=sys.stderr)
    finally:                       # main() may be called again in this process (tests, notebooks)
        if old_root is None:
            os.environ.pop("FEDBENCH_RESULTS_ROOT", None)
        else:
            os.environ["FEDBENCH_RESULTS_ROOT"] = old_root
    return 0


def _cmd_export(args) -> int:
    """One run of a paper experiment as a config that runs alone (``fedbench run RUN.yaml``, Flower included)."""
    import importlib

    from fedbench.config import ConfigError
    from fedbench.bench import read_profile_file
    from fedbench.registry import EXPERIMENTS
    try:
        profile = read_profile_file(args.config)
        entry = EXPERIMENTS.entry(profile["experiment"], "experiment")
        if not entry.facts.get("exports"):
            exporting = [e.name for e in EXPERIMENTS if e.facts.get("exports")]
            raise ConfigError("experiment", entry.name, f"an experiment whose runs export as configs: {exporting}")
        module = importlib.import_module(entry.obj)
        kw = {k: v for k, v in (("method", args.method), ("seed", args.seed), ("lr", args.lr)) if v is not None}
        cfg = module.export(profile=profile["profile"] or "quick", path=args.config, **kw, **_parse_sets(args.set))
    except (ConfigError, FileNotFoundError) as e:
        print(f"fedbench export: {e}", file=sys.stderr)
        return 2
    import yaml
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def _cmd_report(args) -> int:
    """Rewrite a profile's REPORT.md from its outputs (nothing is recomputed)."""
    from fedbench.bench.report import write_report
    from fedbench.config import ConfigError
    from fedbench.bench import output_dir, read_profile_file
    try:
        profile = read_profile_file(args.config)
        path = write_report(profile["experiment"], output_dir(profile["experiment"], profile["profile"] or "quick",
                                                              args.config))
    except (ConfigError, FileNotFoundError) as e:
        print(f"fedbench report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


# what tells runs apart at a glance; any other config field that differs between the listed runs is added
RESULTS_COLUMNS = ("name", "engine", "data.task", "peft.method", "fl.strategy", "fl.aggregator", "fl.attack",
                   "train.dp.enabled", "seed")
METRIC_COLUMNS = ("final_accuracy", "dp_epsilon_spent", "total_bytes", "wall_s")
CONFIG_SECTIONS = ("data.", "model.", "peft.", "train.", "fl.")


def results_table(df):
    """The runs as a table for the shell: run key, the columns that tell runs apart, the headline numbers."""
    df = df.copy()
    df["engine"] = df["engine"].fillna("inprocess") if "engine" in df.columns else "inprocess"
    varying = [c for c in df.columns if c.startswith(CONFIG_SECTIONS) and c not in RESULTS_COLUMNS
               and df[c].map(str).nunique(dropna=False) > 1]      # map(str): None and NaN count as values
    cols = ["run_key", *[c for c in RESULTS_COLUMNS if c in df.columns], *varying,
            *[c for c in METRIC_COLUMNS if c in df.columns]]
    return df[cols]


def _cmd_results(args) -> int:
    from fedbench.results import load_results
    if args.results is not None:
        from pathlib import Path
        if not Path(args.results).is_dir():
            print(f"fedbench results: {args.results} is not a folder of runs", file=sys.stderr)
            return 2
    import warnings
    with warnings.catch_warnings():          # each corrupt run is listed once below, not warned about too
        warnings.simplefilter("ignore")
        df = load_results(args.results)
    for folder, reason in df.attrs.get("corrupt", []):
        print(f"skipped a corrupt run: {reason}", file=sys.stderr)
    if df.empty:
        print("no finished runs")
        return 0
    print(results_table(df).to_string(index=False))
    return 0


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
    run.add_argument("--results", default=None, help="one run: its run store (default: $FEDBENCH_RESULTS or "
                                                     "results/runs); a profile: the results root (outputs in "
                                                     "RESULTS/<experiment>/, run store RESULTS/runs)")
    run.add_argument("--force", action="store_true", help="one run: recompute even if this config has a finished "
                                                          "(or corrupt) run; not for a profile")
    run.add_argument("-v", "--verbose", action="store_true", help="show Flower's INFO log (hidden by default)")
    run.add_argument("--plugin", action="append", metavar="MODULE",
                     help="import MODULE (an outside module that registers components) before the config is read; "
                          "added to the config's plugins; repeatable")
    run.set_defaults(fn=_cmd_run)
    exp = sub.add_parser("export", help="write one run of a paper experiment as a run config (YAML on stdout) that "
                                        "`fedbench run` and Flower run alone")
    exp.add_argument("config", help="the experiment's profile, e.g. configs/fl_tac/quick.yaml")
    exp.add_argument("--method", default=None, help="the experiment's method (default: its headline method)")
    exp.add_argument("--seed", type=int, default=None)
    exp.add_argument("--lr", type=float, default=None, help="default: the lr the profile chose on validation")
    exp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a profile setting or field")
    exp.set_defaults(fn=_cmd_export)
    rep = sub.add_parser("report", help="rewrite a profile's results/<experiment>/REPORT.md from its outputs")
    rep.add_argument("config", help="the experiment's profile, e.g. configs/fl_tac/quick.yaml")
    rep.set_defaults(fn=_cmd_report)
    res = sub.add_parser("results", help="list finished runs")
    res.add_argument("--results", default=None)
    res.set_defaults(fn=_cmd_results)
    args = parser.parse_args(argv)
    for k, v in OFFLINE_DEFAULTS.items():     # before anything imports huggingface_hub (it reads them once)
        os.environ.setdefault(k, v)
    _log_to_stderr()
    return args.fn(args)


def _log_to_stderr() -> None:
    """fedbench's INFO lines ("loaded from the store", "resuming from round N") as bare lines on stderr."""
    import logging
    log = logging.getLogger("fedbench")
    if not any(getattr(h, "_fedbench_cli", False) for h in log.handlers):
        h = logging.StreamHandler()             # stderr, looked up when each line is written
        h.setFormatter(logging.Formatter("%(message)s"))
        h._fedbench_cli = True
        log.addHandler(h)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
