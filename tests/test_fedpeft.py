"""FedPEFT experiment: parameters, the grid, configs, exact bytes, claims from the numbers, end to end."""
import numpy as np
import pandas as pd
import pytest

from fedbench.config import ConfigError, ModelConfig, PeftConfig
from fedbench.experiments import fedpeft as fp

REQUIRED = ["task", "method", "partition", "alpha", "participation", "dropout", "dp_epsilon_target",
            "dp_epsilon_spent", "seed", "trainable_params", "bytes_up_per_round", "bytes_down_per_round",
            "total_bytes", "final_accuracy", "best_accuracy", "rounds", "wall_s"]


def settings(profile="quick", **overrides):
    return fp.settings_for(profile, **overrides)


def test_heterogeneity_levels_parse_and_bad_ones_are_named():
    assert fp.parse_heterogeneity("iid") == ("iid", None)
    assert fp.parse_heterogeneity("dirichlet-0.1") == ("dirichlet", 0.1)
    assert fp.parse_heterogeneity(1.0) == ("dirichlet", 1.0)
    for bad in ("dirichlet-0", "dirichlet-x", "skewed", -1.0):
        with pytest.raises(ConfigError, match="heterogeneity"):
            fp.parse_heterogeneity(bad)


@pytest.mark.parametrize("key,value,match", [
    ("tasks", ["cifar10"], "tasks"), ("tasks", [], "tasks"), ("methods", ["lorax"], "methods"),
    ("axis_methods", ["full", "nope"], "axis_methods"), ("seeds", [-1], "seeds"),
    ("stability", [[1.0, 0.0], [0.0, 0.1]], "stability"), ("stability", [[1.0, 1.0]], "stability"),
    ("dp_epsilons", [0.0], "dp_epsilons"), ("lr", {"full": 1e-4}, "lr"), ("depth", 7, "peft.depth"),
    ("heterogeneity", ["iid", "dirichlet--1"], "heterogeneity"),
])
def test_bad_parameters_raise_config_errors_naming_them(key, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        settings(**{key: value})
    assert e.value.field_name == match


def test_unknown_parameter_is_rejected():
    with pytest.raises(ConfigError, match="a parameter of this experiment"):
        settings(epochs=3)


def test_grid_headline_plus_one_axis_at_a_time():
    s = settings()
    cells = fp.build_cells(s)
    assert len(cells) == len(set(cells))
    base = dict(partition="dirichlet", alpha=1.0, participation=1.0, dropout=0.0, dp_epsilon=None)
    main = [c for c in cells if c.task == s["tasks"][0]]

    def differs(c):
        return [k for k, v in base.items() if getattr(c, k) != v]
    # headline: every method x every seed at the base condition
    for m in s["methods"]:
        for seed in s["seeds"]:
            assert any(c.method == m and c.seed == seed and not differs(c) for c in main)
    # axes: exactly one factor away from the base (alpha+partition move together), axis methods only
    for c in main:
        d = differs(c)
        if d:
            assert c.method in s["axis_methods"] and c.seed in s["axis_seeds"]
            assert set(d) in ({"partition", "alpha"}, {"alpha"}, {"participation"}, {"participation", "dropout"},
                              {"dp_epsilon"})
    n_axis = len(s["axis_methods"]) * len(s["axis_seeds"]) * (
        len(s["heterogeneity"]) - 1 + len(s["stability"]) - 1 + len(s["dp_epsilons"]))
    n_head = len(s["methods"]) * len(s["seeds"])
    n_other = (len(s["tasks"]) - 1) * len(s["task_methods"])
    assert len(cells) == n_head + n_other + n_axis
    assert {c.task for c in cells} == set(s["tasks"])


def test_configs_follow_the_cell():
    s = settings()
    c = fp.Cell("tweet_sentiment", "lora", "dirichlet", 0.1, 0.3, 0.3, 2.0, 1)
    cfg = fp.make_config(c, s)
    assert cfg.peft.method == "lora" and cfg.peft.depth == s["depth"]
    assert cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.1 and cfg.seed == 1
    assert cfg.fl.clients_per_round == 0.3 and cfg.fl.dropout == 0.3
    assert cfg.train.dp.enabled and cfg.train.dp.target_epsilon == 2.0 and cfg.train.dp.delta is None
    assert cfg.train.lr == s["lr"]["lora"]
    full = fp.make_config(fp.Cell("tweet_sentiment", "full", "iid", None, 1.0, 0.0, None, 0), s)
    assert full.peft.depth is None and not full.train.dp.enabled and full.data.partition == "iid"
    assert cfg.hash() != full.hash()


def test_lora_bytes_per_round_below_two_percent_of_full_exactly():
    """From the exact byte counts of the states that travel (float32), all-layer and top-2 LoRA alike."""
    from fedbench.models import build_model, state_nbytes, trainable_state
    full = state_nbytes(trainable_state(build_model(ModelConfig(), PeftConfig(method="full"), 3, seed=0)))
    assert full == 4 * 22_566_531
    for depth in (None, 2):
        lora = build_model(ModelConfig(), PeftConfig(method="lora", depth=depth), 3, seed=0)
        nb = state_nbytes(trainable_state(lora))
        layers = 6 if depth is None else depth
        assert nb == 4 * (layers * 2 * 8 * (384 + 384) + 384 * 3 + 3)     # A, B on query+value, + head
        assert nb / full < 0.02


def synthetic_summary(full_acc=0.70, lora_acc=0.69, head_acc=0.60, dp_drop=None, unstable=None, n_test=800):
    """A summary as run_cells writes it, with chosen accuracies, and per-example results to match: example e
    is correct iff e < accuracy * n_test, so better runs get every example a worse run gets (paired noise-free)."""
    s = settings(seeds=[0, 1], axis_seeds=[0], tasks=["tweet_sentiment"], task_methods=[],
                 methods=["full", "lora", "head"], axis_methods=["full", "lora", "head"])
    acc = {"full": full_acc, "lora": lora_acc, "head": head_acc}
    nbytes = {"full": 4 * 22_566_531, "lora": 4 * 25_731, "head": 4 * 1_155}
    dp_drop = dp_drop or {"full": 0.2, "lora": 0.05, "head": 0.02}
    unstable = unstable or {"full": 0.0, "lora": 0.0, "head": 0.0}
    rows, correct = [], {}
    for c in fp.build_cells(s):
        a = acc[c.method] + (0.01 if c.seed == 1 else 0.0)
        if c.dp_epsilon is not None:
            a -= dp_drop[c.method] * (8.0 / c.dp_epsilon) ** 0.5
        if c.participation < 1:
            a -= unstable[c.method]
        if c.partition == "iid":
            a += 0.02
        if c.alpha == 0.1:
            a -= 0.05
        correct[c] = (np.arange(n_test) < round(a * n_test)).astype(np.int8)
        a = correct[c].mean()
        rows.append({"task": c.task, "method": c.method, "partition": c.partition, "alpha": c.alpha,
                     "participation": c.participation, "dropout": c.dropout, "dp_epsilon_target": c.dp_epsilon,
                     "seed": c.seed, "variant": c.method, "heterogeneity": c.heterogeneity, "stability": c.stability,
                     "dp": c.dp, "dp_epsilon_spent": (c.dp_epsilon - 0.005) if c.dp_epsilon else np.nan,
                     "dp_mechanism": "x" if c.dp_epsilon else "", "trainable_params": nbytes[c.method] // 4,
                     "total_params": 22_566_531, "bytes_up_per_round": 6 * nbytes[c.method],
                     "bytes_down_per_round": 6 * nbytes[c.method], "state_bytes": nbytes[c.method],
                     "total_bytes": 48 * nbytes[c.method], "final_accuracy": a, "best_accuracy": a,
                     "final_loss": 1.0, "rounds": 4, "wall_s": 1.0})
    return pd.DataFrame(rows).astype({"alpha": float, "dp_epsilon_target": float}), correct, s


def test_claims_are_decided_with_intervals_from_per_example_results():
    df, correct, s = synthetic_summary()
    claims = fp.make_claims(df, correct, s).set_index("claim")
    assert {"estimate", "ci_low", "ci_high", "n_seeds", "n_examples", "verdict"} <= set(claims.columns)
    near = [c for c in claims.index if "lora" in c and "within" in c][0]
    assert claims.loc[near, "verdict"] == "agrees" and claims.loc[near, "estimate"] == pytest.approx(-0.01)
    assert claims.loc[near, "n_seeds"] == 2 and claims.loc[near, "n_examples"] == 800
    head_near = [c for c in claims.index if "head" in c and "within" in c][0]
    assert claims.loc[head_near, "verdict"] == "disagrees"                 # 0.10 below full, tolerance 0.03
    lora = [c for c in claims.index if "sends < 2%" in c][0]
    assert claims.loc[lora, "verdict"] == "agrees"
    assert claims.loc[lora, "estimate"] == pytest.approx(100 * 25_731 / 22_566_531)
    dp = [c for c in claims.index if "[eps=8] lora loses less" in c][0]
    assert claims.loc[dp, "verdict"] == "agrees" and claims.loc[dp, "estimate"] == pytest.approx(0.15, abs=2e-3)
    het = [c for c in claims.index if "[lora] strong label skew" in c][0]
    assert claims.loc[het, "verdict"] == "agrees"                          # iid +0.02, alpha 0.1 -0.05
    # the opposite numbers disagree
    df, correct, s = synthetic_summary(lora_acc=0.50, head_acc=0.40, dp_drop={"full": 0.01, "lora": 0.1, "head": 0.1},
                                       unstable={"full": 0.0, "lora": 0.2, "head": 0.2})
    claims = fp.make_claims(df, correct, s).set_index("claim")
    assert claims.loc[near, "verdict"] == "disagrees" and claims.loc[dp, "verdict"] == "disagrees"
    stab = [c for c in claims.index if "lora keeps its standing" in c and "drop" not in c][0]
    assert claims.loc[stab, "verdict"] == "disagrees"


def test_figures_come_from_fedbench_plots_without_global_state():
    import copy

    import matplotlib
    df, correct, s = synthetic_summary()
    rc = copy.deepcopy(dict(matplotlib.rcParams))
    metrics = df[fp.KEYS].assign(round=4, metric="accuracy", value=df["final_accuracy"])
    metrics = pd.concat([metrics, metrics.assign(metric="cumulative_bytes", value=df["total_bytes"])])
    figs = fp.make_figures(df, metrics, s)
    assert {"accuracy_vs_rounds.png", "dp_drop.png", "heterogeneity_heatmap.png", "stability.png"} <= set(figs)
    assert dict(matplotlib.rcParams) == rc


def test_tables_average_over_seeds_and_measure_drops():
    df, _, s = synthetic_summary()
    head = fp.headline_table(df, s).set_index("method")
    assert head.loc["lora", "seeds"] == 2
    assert head.loc["lora", "final_accuracy_mean"] == pytest.approx(0.695, abs=1e-3)
    assert head.loc["lora", "final_accuracy_std"] == pytest.approx(np.std([0.69, 0.70], ddof=1), abs=2e-3)
    assert head.loc["full", "bytes_pct_of_full"] == 100
    dp = fp.axis_table(df, s, "dp").set_index(["method", "dp"])
    assert dp.loc[("full", "eps=8"), "drop_vs_base"] == pytest.approx(0.2, abs=2e-3)
    assert dp.loc[("full", "eps=2"), "drop_vs_base"] == pytest.approx(0.4, abs=2e-3)
    assert dp.loc[("lora", "eps=2"), "dp_epsilon_spent_max"] == pytest.approx(1.995)


def test_end_to_end_tiny_grid_is_reproducible(tmp_results, tmp_path, monkeypatch):
    over = dict(tasks=["tweet_sentiment"], methods=["head", "lora"], seeds=[0, 1], task_methods=[],
                axis_methods=["head"], heterogeneity=["dirichlet-1.0", "iid"], stability=[[1.0, 0.0], [0.5, 0.5]],
                dp_epsilons=[8.0], progress=False)
    res = fp.run(profile="smoke", **over)
    out = tmp_results / "fedpeft" / "smoke"
    for name in ("summary.csv", "metrics.csv", "claims.csv", "headline.csv", "accuracy_vs_rounds.png",
                 "accuracy_vs_mb.png", "dp_drop.png", "heterogeneity_heatmap.png"):
        assert (out / name).exists(), name
    summary = pd.read_csv(out / "summary.csv")
    assert set(REQUIRED) <= set(summary.columns)
    assert len(summary) == 2 * 2 + 3                                   # headline + iid, unstable, dp for head
    dp = summary[summary["dp_epsilon_target"].notna()]
    assert len(dp) == 1 and 0 < dp["dp_epsilon_spent"].iloc[0] <= 8.0
    assert summary["dp_epsilon_spent"].isna().sum() == len(summary) - 1
    lora = summary[summary["method"] == "lora"].iloc[0]
    assert lora["bytes_up_per_round"] == 3 * lora["state_bytes"] and lora["rounds"] == 2
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"round", "metric", "value"} <= set(metrics.columns)
    acc = metrics[metrics["metric"] == "accuracy"]
    assert len(acc) == 2 * len(summary) and acc["value"].between(0, 1).all()
    assert len(res.claims) >= 1 and res.claims["verdict"].isin(["agrees", "disagrees", "inconclusive"]).all()
    # rerun: every run loads from the store, the CSVs are identical
    fp.run(profile="smoke", **over)
    assert pd.read_csv(out / "summary.csv").equals(summary)
    # cold rerun in a fresh store: the same numbers (wall-clock aside)
    monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path / "cold"))
    fp.run(profile="smoke", **over)
    cold = pd.read_csv(tmp_path / "cold" / "fedpeft" / "smoke" / "summary.csv")
    cols = [c for c in summary.columns if c != "wall_s"]
    assert cold[cols].equals(summary[cols])
    assert pd.read_csv(tmp_path / "cold" / "fedpeft" / "smoke" / "metrics.csv").equals(metrics)


def test_a_base_field_the_grid_sets_is_refused_not_silently_replaced():
    with pytest.raises(ConfigError, match="stability") as e:
        settings(**{"fl.dropout": 0.3})
    assert e.value.field_name == "fl.dropout"
    s = settings(**{"fl.aggregator": "median"})            # a field no cell sets reaches every run
    assert all(fp.make_config(c, s).fl.aggregator == "median" for c in fp.build_cells(s))
