"""FedPEFT experiment: parameters, the grid, configs, exact bytes, claims from the numbers, end to end."""
import numpy as np
import pandas as pd
import pytest

from fedbench.config import ConfigError, ModelConfig, PeftConfig
from fedbench.experiments import fedpeft as fp
from fedbench.bench import output_dir

REQUIRED = ["task", "method", "partition", "alpha", "participation", "dropout", "dp_epsilon_target",
            "dp_epsilon_spent", "seed", "trainable_params", "bytes_up_per_round", "bytes_down_per_round",
            "total_bytes", "final_accuracy", "best_accuracy", "rounds", "wall_s", "dp_delta", "lr", "lr_selected_on"]


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
    ("tasks", ["not_a_task"], "tasks"), ("tasks", [], "tasks"), ("methods", ["lorax"], "methods"),
    ("axis_methods", ["full", "nope"], "axis_methods"), ("seeds", [-1], "seeds"),
    ("stability", [[1.0, 0.0], [0.0, 0.1]], "stability"), ("stability", [[1.0, 1.0]], "stability"),
    ("dp_epsilons", [0.0], "dp_epsilons"), ("lr_grid", {"full": [1e-4]}, "lr_grid"),
    ("dp_lr_grid", {m: [] for m in fp.METHODS}, "dp_lr_grid"), ("clip_only", "yes", "clip_only"),
    ("validation_samples", 1, "validation_samples"), ("dp_methods", ["nope"], "dp_methods"),
    ("dp_seeds", [], "dp_seeds"), ("depth", 7, "peft.depth"),
    ("heterogeneity", ["iid", "dirichlet--1"], "heterogeneity"), ("score_last_k", 0, "score_last_k"),
    ("lr_extend", -1, "lr_extend"), ("dp_lr_extend", 1.5, "dp_lr_extend"), ("primary", ["bytes"], "primary"),
    ("primary", ["near_full", "near_full"], "primary"), ("primary_method", "full", "primary_method"),
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
    (part, alpha), (p, d) = s["heterogeneity"][0], s["stability"][0]
    base = dict(partition=part, alpha=alpha, participation=p, dropout=d, dp_epsilon=None)
    main = [c for c in cells if c.task == s["tasks"][0]]

    def differs(c):
        return [k for k, v in base.items() if getattr(c, k) != v]
    for m in s["methods"]:
        for seed in s["seeds"]:
            assert any(c.method == m and c.seed == seed and not differs(c) for c in main)
    for c in main:
        diff = differs(c)
        if diff == ["dp_epsilon"]:
            assert c.method in s["dp_methods"] and c.seed in fp.dp_seeds_for(s, c.method, c.dp_epsilon)
        elif diff:
            assert c.method in s["axis_methods"] and c.seed in s["axis_seeds"]
            assert set(diff) in ({"partition", "alpha"}, {"alpha"}, {"participation"}, {"dropout"},
                                 {"participation", "dropout"})
    levels = fp.dp_levels(s)
    assert levels == [float("inf"), 8.0]                # quick: the clipping-only control + eps 8 (eps 2: full)
    n_axis = len(s["axis_methods"]) * len(s["axis_seeds"]) * (len(s["heterogeneity"]) - 1 + len(s["stability"]) - 1)
    n_dp = sum(len(fp.dp_seeds_for(s, m, e)) for m in s["dp_methods"] for e in levels)
    assert fp.dp_seeds_for(s, "full", 8.0) == [0, 1, 2] and fp.dp_seeds_for(s, "ia3", 8.0) == []
    assert fp.dp_seeds_for(s, "lora", float("inf")) == [0, 1, 2]        # clip only for every method compared
    assert fp.dp_seeds_for(s, "prompt", 8.0) == []                  # not in quick's dp_methods
    n_head = len(s["methods"]) * len(s["seeds"])
    n_other = (len(s["tasks"]) - 1) * len(s["task_methods"]) * len(s["task_seeds"])
    assert len(cells) == n_head + n_other + n_axis + n_dp
    assert {c.task for c in cells} == set(s["tasks"])


def test_quick_meets_the_issue_floor():
    """10 clients, >= 1000 test examples, 1-3 primary claims on >= 5 seeds on the headroom task, the claims on
    scores over >= 2 evaluations, full / head / LoRA under DP with each one's clip-only control on >= 3 seeds,
    delta 1e-5; quick-complete puts back the other tasks and methods; the full profile runs every method under DP."""
    s = settings()
    assert s["clients"] >= 10 and len(s["seeds"]) >= 5 and s["max_test_samples"] >= 1000
    assert s["tasks"][0] == "wordnet_noun" and 1 <= len(s["primary"]) <= 3 and s["score_last_k"] >= 2
    assert {"full", "head", s["primary_method"]} <= set(s["methods"])
    if "skew_drop" in s["primary"]:
        assert len(s["axis_seeds"]) >= 5 and s["heterogeneity"][-1] == ("dirichlet", 0.1)
    assert {"full", "head", "lora"} <= set(s["dp_methods"]) <= set(s["clip_methods"]) and s["clip_only"]
    assert len(s["dp_seeds"]) >= 3 and list(s["clip_seeds"]) == list(s["dp_seeds"]) and s["dp_delta"] == 1e-5
    assert s["lr_extend"] >= 1
    f = settings("full")
    assert set(f["dp_methods"]) == set(f["methods"]) == set(fp.METHODS) and len(f["dp_seeds"]) >= 3
    from fedbench.bench import profile_path
    c = settings("quick", path=profile_path("fedpeft", "quick").parent / "quick-complete.yaml")
    assert set(c["methods"]) == set(fp.METHODS) and {"tweet_sentiment", "ng20"} <= set(c["tasks"])
    assert len(c["task_seeds"]) >= 3
    b = s["base"]
    assert b.train.dp.delta * (b.data.max_train_samples / b.data.num_clients) < 1


def test_configs_follow_the_cell():
    s = settings()
    c = fp.Cell("tweet_sentiment", "lora", "dirichlet", 0.1, 0.3, 0.3, 2.0, 1)
    cfg = fp.make_config(c, s, lr=0.01)
    assert cfg.peft.method == "lora" and cfg.peft.depth == s["depth"]
    assert cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.1 and cfg.seed == 1
    assert cfg.fl.clients_per_round == 0.3 and cfg.fl.dropout == 0.3
    assert cfg.train.dp.enabled and cfg.train.dp.target_epsilon == 2.0 and cfg.train.dp.delta == 1e-5
    assert cfg.train.dp.noise_multiplier is None and cfg.train.lr == 0.01
    clip = fp.make_config(fp.Cell("tweet_sentiment", "lora", "dirichlet", 1.0, 0.3, 0.0, float("inf"), 0), s, lr=0.01)
    assert clip.train.dp.enabled and clip.train.dp.noise_multiplier == 0.0 and clip.train.dp.target_epsilon is None
    full = fp.make_config(fp.Cell("tweet_sentiment", "full", "iid", None, 1.0, 0.0, None, 0), s, lr=1e-4)
    assert full.peft.depth == s["depth"] and not full.train.dp.enabled and full.data.partition == "iid"
    assert cfg.hash() != full.hash()
    with pytest.raises(KeyError):            # without an lr search there is no lr: never a silent default
        fp.make_config(c, s)
    s["chosen_lr"] = {fp.lr_key(c): 0.003}
    assert fp.make_config(c, s).train.lr == 0.003


class FakeRunner:
    """Scores a validation config by a function of its method, privacy and lr (no training)."""
    def __init__(self, acc):
        self.acc = acc

    def done(self, cfg):
        return None

    def get(self, cfg, compute=None):
        from fedbench.results import RunResult
        dp = "none" if not cfg.train.dp.enabled else ("clip only" if cfg.train.dp.noise_multiplier == 0 else "eps")
        a = self.acc(cfg.peft.method, dp, round(cfg.train.lr, 8))
        return RunResult(config={}, rounds=pd.DataFrame(), summary={"final_accuracy": a, "wall_s": 0.0})


class SpyHeld(fp.HeldRuns):
    """Records which reported configs the search keeps held (the chosen lrs')."""
    kept = None

    def keep_only(self, cfgs):
        self.kept = [(c.peft.method, c.train.lr) for c in cfgs]
        super().keep_only(cfgs)


def test_lr_is_the_validation_argmax_per_task_method_and_privacy_level():
    s = settings("smoke", tasks=["tweet_sentiment"], methods=["lora"], task_methods=[], axis_methods=[],
                 dp_methods=["lora"], dp_epsilons=[8.0], clip_only=False, lr_grid={"lora": [0.01, 0.03, 0.1]},
                 dp_lr_grid={"lora": [0.003, 0.01]})
    acc = {("none", 0.01): 0.5, ("none", 0.03): 0.6, ("none", 0.1): 0.6, ("eps", 0.003): 0.45, ("eps", 0.01): 0.4}
    table = fp.tune(s, FakeRunner(lambda m, dp, lr: acc[(dp, lr)]), progress=False)
    c = fp.base_cell(s, "tweet_sentiment", "lora", 0)
    assert s["chosen_lr"] == {fp.lr_key(c): 0.03, ("tweet_sentiment", "lora", "eps=8"): 0.003}   # ties: smaller lr
    assert table["chosen"].tolist() == [False, True, False, True, False]
    assert table["chosen_at_grid_edge"].tolist() == [False, False, False, True, True]
    assert (table["selected_on"] == "validation").all() and "extension" not in table.columns


def test_an_edge_choice_extends_the_grid_on_validation_until_bracketed():
    """lr_extend: validation keeps improving past the grid's top, so the search adds grid steps (x3) until the
    best is inside the values scored (or the extension budget is spent); the chosen lr is the one kept."""
    s = settings("smoke", tasks=["tweet_sentiment"], methods=["full"], task_methods=[], axis_methods=[],
                 dp_methods=[], lr_grid={"full": [1e-4, 3e-4]}, lr_extend=3)
    peak = {1e-4: 0.3, 3e-4: 0.4, 9e-4: 0.5, 2.7e-3: 0.45, 8.1e-3: 0.1}
    runner, held = FakeRunner(lambda m, dp, lr: peak[lr]), SpyHeld()
    table = fp.tune(s, runner, held, progress=False)
    assert table["lr"].tolist() == pytest.approx([1e-4, 3e-4, 9e-4, 2.7e-3])
    assert table["extension"].tolist() == [0, 0, 1, 2]
    assert s["chosen_lr"][("tweet_sentiment", "full", "none")] == pytest.approx(9e-4)
    assert not table["chosen_at_grid_edge"].any() and held.kept == [("full", pytest.approx(9e-4))]
    s0 = settings("smoke", tasks=["tweet_sentiment"], methods=["full"], task_methods=[], axis_methods=[],
                  dp_methods=[], lr_grid={"full": [1e-4, 3e-4]})
    assert fp.tune(s0, FakeRunner(lambda m, dp, lr: peak[lr]), progress=False)["chosen_at_grid_edge"].all()


def test_a_run_s_score_is_the_mean_of_its_last_k_evaluated_rounds():
    rounds = pd.DataFrame({"round": [1, 2, 3, 4, 5, 6], "accuracy": [0.1, np.nan, 0.5, np.nan, 0.7, 0.3]})
    assert fp.last_k_score(rounds, 1) == pytest.approx(0.3)
    assert fp.last_k_score(rounds, 2) == pytest.approx(0.5)
    assert fp.last_k_score(rounds, 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="score_last_k"):
        fp.last_k_score(rounds, 5)
    assert fp.n_evaluated(10, 5) == 2 and fp.n_evaluated(12, 5) == 3 and fp.n_evaluated(3, 1) == 3
    with pytest.raises(ConfigError, match="score_last_k") as e:      # more than some run evaluates
        settings(score_last_k=fp.n_evaluated(settings()["rounds"], settings()["axis_eval_every"]) + 1)
    assert e.value.field_name == "score_last_k"


def test_tuning_covers_every_reported_task_method_and_level_on_one_seed():
    s = settings()
    tune = fp.tuning_cells(s)
    keys = {fp.lr_key(c) for c, _ in tune}
    assert keys == {fp.lr_key(c) for c in fp.build_cells(s)}
    for c, lr in tune:
        grid = s["lr_grid"][c.method] if c.dp_epsilon is None else s["dp_lr_grid"][c.method]
        assert lr in grid and c.seed == s["seeds"][0]
        assert (c.partition, c.alpha) == s["heterogeneity"][0] and (c.participation, c.dropout) == s["stability"][0]


def test_validation_slice_is_training_data_outside_the_clients_and_never_test():
    from fedbench.fl import prepare_data, prepare_validation
    from fedbench.fl.data import validation_indices
    s = settings("smoke")
    cfg = fp.make_config(fp.base_cell(s, "tweet_sentiment", "head", 0), s, lr=0.01)
    used, val = validation_indices(cfg, 24, 30289)
    assert len(val) == 24 and not set(val) & set(used) and len(used) == cfg.data.max_train_samples
    assert np.array_equal(val, validation_indices(cfg, 24, 30289)[1])        # seeded
    with pytest.raises(ConfigError, match="validation_samples"):
        validation_indices(cfg, 30289, 30289)
    data = prepare_data(cfg)
    v = prepare_validation(cfg, 24, data)
    assert v.train is data.train and all(np.array_equal(a, b) for a, b in zip(v.client_indices, data.client_indices))
    assert v.test is not data.test and len(v.test_indices) == 24


def test_the_lr_search_never_evaluates_on_the_test_split(tmp_results, monkeypatch):
    import fedbench.fl.server as server
    s = settings("smoke", tasks=["tweet_sentiment"], methods=["head", "lora"], task_methods=[], axis_methods=[],
                 dp_methods=["head"], dp_epsilons=[8.0])
    runner = fp.make_runner(s)
    seen = []
    real = server.evaluate

    def spy(model, split, *a, **k):
        seen.append(split)
        return real(model, split, *a, **k)
    monkeypatch.setattr(server, "evaluate", spy)
    table = fp.tune(s, runner, progress=False)
    assert len(table) == len(fp.tuning_cells(s)) and seen
    datas = list(runner.shared._data.values())          # a validation carve has exactly validation_samples rows
    tests = [d.test for d in datas if len(d.test) != s["validation_samples"]]
    vals = [d.test for d in datas if len(d.test) == s["validation_samples"]]
    assert tests and vals
    assert all(any(x is v for v in vals) for x in seen) and not any(any(x is t for t in tests) for x in seen)
    assert set(s["chosen_lr"]) == {fp.lr_key(c) for c in fp.build_cells(s)}


def test_full_and_bitfit_take_depth_as_the_top_layers():
    from fedbench.models import build_model, count_parameters
    full_top = build_model(ModelConfig(), PeftConfig(method="full", depth=1), 3, seed=0)
    layer = sum(p.numel() for p in full_top.layers[-1].parameters())
    assert count_parameters(full_top)[0] == layer + 384 * 3 + 3 and full_top.frozen_prefix == 5
    bit = build_model(ModelConfig(), PeftConfig(method="bitfit", depth=1), 3, seed=0)
    biases = sum(p.numel() for n, p in bit.layers[-1].named_parameters() if n.endswith("bias"))
    assert count_parameters(bit)[0] == biases + 384 * 3 + 3 and bit.frozen_prefix == 5
    assert count_parameters(build_model(ModelConfig(), PeftConfig(method="full"), 3, seed=0))[0] == 22_566_531


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


def synthetic_summary(full_acc=0.70, lora_acc=0.69, head_acc=0.60, dp_drop=None, unstable=None, clip_gain=None,
                      skew_drop=None, n_test=800, seeds=(0, 1, 2, 3, 4), axis_seeds=(0, 1, 2), **over):
    """A summary as run_cells writes it, with chosen scores (mean of the last k evaluations) and a final round
    0.2 below each score (the claims must read the score), per-seed jitter so intervals have a width, and
    per-example results to match the final accuracy."""
    s = settings(seeds=list(seeds), axis_seeds=list(axis_seeds), tasks=["tweet_sentiment"], task_methods=[],
                 methods=["full", "lora", "head"], axis_methods=["full", "lora", "head"],
                 **{"dp_methods": ["full", "lora", "head"], "dp_seeds": [0, 1, 2], "dp_epsilons": [8.0, 2.0],
                    "clip_seeds": [0, 1, 2], "stability": [[0.3, 0.0], [0.3, 0.3]], **over})
    acc = {"full": full_acc, "lora": lora_acc, "head": head_acc}
    nbytes = {"full": 4 * 22_566_531, "lora": 4 * 25_731, "head": 4 * 1_155}
    dp_drop = dp_drop or {"full": 0.2, "lora": 0.05, "head": 0.02}
    unstable = unstable or {"full": 0.0, "lora": 0.0, "head": 0.0}
    clip_gain = clip_gain or {"full": 0.0, "lora": 0.0, "head": 0.0}
    skew_drop = skew_drop or {"full": 0.05, "lora": 0.05, "head": 0.05}
    rows, correct = [], {}
    for c in fp.build_cells(s):
        a = acc[c.method] + (0.01 if c.seed == 1 else 0.0) + 0.002 * ((3 * c.seed + len(c.method) + c.dropout * 10
                                                                       + (c.alpha or 2) * 7) % 3 - 1)
        if c.dp_epsilon is not None:
            a += clip_gain[c.method] - dp_drop[c.method] * (8.0 / c.dp_epsilon) ** 0.5
        if c.dropout > 0:
            a -= unstable[c.method]
        if c.partition == "iid":
            a += 0.02
        if c.alpha == 0.1:
            a -= skew_drop[c.method]
        correct[c] = (np.arange(n_test) < round((a - 0.2) * n_test)).astype(np.int8)
        final = correct[c].mean()
        rows.append({"task": c.task, "method": c.method, "partition": c.partition, "alpha": c.alpha,
                     "participation": c.participation, "dropout": c.dropout, "dp_epsilon_target": c.dp_epsilon,
                     "seed": c.seed, "variant": c.method, "heterogeneity": c.heterogeneity, "stability": c.stability,
                     "dp": c.dp, "dp_epsilon_spent": (c.dp_epsilon - 0.005) if c.dp_epsilon else np.nan,
                     "dp_mechanism": "x" if c.dp_epsilon else "", "trainable_params": nbytes[c.method] // 4,
                     "total_params": 22_566_531, "bytes_up_per_round": 6 * nbytes[c.method],
                     "bytes_down_per_round": 6 * nbytes[c.method], "state_bytes": nbytes[c.method],
                     "total_bytes": 48 * nbytes[c.method], "final_accuracy": final, "best_accuracy": a, "score": a,
                     "final_loss": 1.0, "rounds": 4, "wall_s": 1.0, "lr": 0.01, "lr_selected_on": "validation",
                     "dp_delta": 1e-5 if c.dp_epsilon else np.nan})
    return pd.DataFrame(rows).astype({"alpha": float, "dp_epsilon_target": float}), correct, s


def claims_of(df, s, gain=None):
    from fedbench.experiments.fedpeft import claims as fc
    headroom = None if gain is None else pd.DataFrame({"task": [s["tasks"][0]], "gain": [gain]})
    return words(fc.make_claims(df, s, headroom))


def test_claims_are_decided_on_per_seed_scores_with_seed_level_intervals():
    df, _, s = synthetic_summary()
    claims = claims_of(df, s)
    assert {"estimate", "ci_low", "ci_high", "n_seeds", "n_examples", "verdict"} <= set(claims.columns)
    near = [c for c in claims.index if "lora" in c and "within" in c][0]
    # the score's difference, not the final round's (0.2 lower for every run: the same difference here)
    assert claims.loc[near, "word"] == "agrees" and claims.loc[near, "estimate"] == pytest.approx(-0.01, abs=0.003)
    assert claims.loc[near, "n_seeds"] == 5 and f"last {s['score_last_k']} evaluated" in claims.loc[near, "detail"]
    assert claims.loc[near, "role"] == "primary" and (claims["role"] == "primary").sum() == len(s["primary"])
    assert claims.loc[near, "verdict"] == "agrees" and claims.loc[near, "p_holm"] < 0.05
    assert "Student t over 5 seeds" in claims.loc[near, "interval"]
    head_near = [c for c in claims.index if "head" in c and "within" in c][0]
    assert claims.loc[head_near, "verdict"] == "disagrees (exploratory)"    # 0.10 below full, tolerance 0.03
    lora = [c for c in claims.index if "sends < 2%" in c][0]
    assert claims.loc[lora, "word"] == "agrees"
    assert claims.loc[lora, "estimate"] == pytest.approx(100 * 25_731 / 22_566_531)
    clip = [c for c in claims.index if "[lora] per-sample clipping alone" in c][0]
    assert claims.loc[clip, "estimate"] == pytest.approx(0.0, abs=0.005)      # synthetic: clipping costs nothing
    noise = [c for c in claims.index if "[full] DP noise at eps=2" in c][0]
    assert claims.loc[noise, "word"] == "agrees" and claims.loc[noise, "estimate"] == pytest.approx(0.4, abs=0.005)
    trained = [c for c in claims.index if "beats head-only" in c][0]
    assert claims.loc[trained, "word"] == "agrees"
    assert not any("any" in c for c in claims.index)          # one comparison per row
    dp = "[eps=8] lora loses less accuracy than full FT to DP noise (each method's drop from its own clip-only run)"
    assert claims.loc[dp, "word"] == "agrees" and claims.loc[dp, "estimate"] == pytest.approx(0.15, abs=0.005)
    het = [c for c in claims.index if "[lora] strong label skew" in c][0]
    assert claims.loc[het, "word"] == "agrees" and "vs Dir(1)" in het   # from the base: alpha 0.1 -0.05
    # the opposite numbers disagree
    df, _, s = synthetic_summary(lora_acc=0.50, head_acc=0.40, dp_drop={"full": 0.01, "lora": 0.1, "head": 0.1},
                                 unstable={"full": 0.0, "lora": 0.2, "head": 0.2})
    claims = claims_of(df, s)
    assert claims.loc[near, "word"] == "disagrees" and claims.loc[dp, "word"] == "disagrees"
    stab = [c for c in claims.index if "lora keeps its standing" in c][0]
    assert claims.loc[stab, "word"] == "disagrees"
    # full FT no better than head-only: "within 0.03 of full FT" is not interpretable (no assay sensitivity)
    df, _, s = synthetic_summary(head_acc=0.70)
    claims = claims_of(df, s)
    assert claims.loc[near, "word"] == claims.loc[head_near, "word"] == \
        "not interpretable: reference does not beat head-only"


def test_near_full_claims_need_headroom_on_validation():
    """Full FT beats head-only on test, but on validation by less than 0.05: "within a margin" is not decided."""
    from fedbench.experiments.fedpeft import claims as fc
    df, _, s = synthetic_summary()
    near = f"[tweet_sentiment] {fp.variant('lora', s['depth'])} is within 0.03 of full fine-tuning"
    assert claims_of(df, s, gain=0.02).loc[near, "word"].startswith("no headroom: fine-tuning beats")
    assert claims_of(df, s, gain=0.06).loc[near, "word"] == "agrees"
    lr = pd.DataFrame({"task": ["tweet_sentiment"] * 4 + ["ng20"] * 2, "method": ["full", "full", "head", "lora",
                       "full", "head"], "privacy": ["none", "none", "none", "none", "clip only", "none"],
                       "validation_accuracy": [0.5, 0.62, 0.55, 0.9, 0.9, 0.1]})
    h = fc.headroom_table(lr, {**s, "tasks": ["tweet_sentiment", "ng20"]}).set_index("task")
    assert list(h.index) == ["tweet_sentiment"]                          # ng20: no full FT without DP
    assert h.loc["tweet_sentiment", "gain"] == pytest.approx(0.07) and h.loc["tweet_sentiment", "passes"]


def test_the_dp_comparison_measures_each_method_s_drop_from_its_own_clip_only_run():
    """Clipping alone helps full FT by 0.05 (its no-DP run is under-trained): from no DP full FT's drop looks
    0.05 smaller than the noise's cost; from clip only the comparison sees the noise alone."""
    df, _, s = synthetic_summary(clip_gain={"full": 0.05, "lora": 0.0, "head": 0.0},
                                 dp_drop={"full": 0.1, "lora": 0.06, "head": 0.02})
    claims = claims_of(df, s)
    noise = claims.loc["[eps=8] lora loses less accuracy than full FT to DP noise (each method's drop from its own "
                       "clip-only run)"]
    nodp = claims.loc["[eps=8] lora loses less accuracy than full FT under DP-SGD (drop from no DP)"]
    assert noise["estimate"] == pytest.approx(0.04, abs=0.005) and nodp["estimate"] == pytest.approx(-0.01, abs=0.005)
    assert noise["n_seeds"] == nodp["n_seeds"] == 3
    clip = claims.loc["[full] per-sample clipping alone (noise 0) costs accuracy"]
    assert clip["estimate"] == pytest.approx(-0.05, abs=0.005) and clip["word"] == "disagrees"


def test_three_primary_claims_form_one_holm_family_on_five_seeds():
    df, _, s = synthetic_summary(dp_seeds=[0, 1, 2, 3, 4], clip_seeds=[0, 1, 2, 3, 4], axis_seeds=[0, 1, 2, 3, 4],
                                 heterogeneity=["dirichlet-1.0", "iid", "dirichlet-0.1"],
                                 primary=["near_full", "dp_noise", "skew_drop"],
                                 skew_drop={"full": 0.08, "lora": 0.05, "head": 0.02})
    claims = claims_of(df, s)
    prim = claims[claims["role"] == "primary"]
    assert len(prim) == 3 and (prim["n_seeds"] == 5).all() and prim["p_holm"].notna().all()
    assert list(claims["role"])[:3] == ["primary"] * 3                    # primaries first
    skew = "[Dir(0.1)] lora's drop from Dir(1) is no larger than full FT's (within 0.03)"
    assert prim.loc[skew, "estimate"] == pytest.approx(0.03, abs=0.005) and prim.loc[skew, "verdict"] == "agrees"
    assert prim["level"].max() > 0.95                                   # intervals at their Holm step's level
    head_skew = "[Dir(0.1)] head's drop from Dir(1) is no larger than full FT's (within 0.03)"
    assert claims.loc[head_skew, "role"] == "exploratory" and claims.loc[head_skew, "word"] == "agrees"


def words(table):
    """The claims table by claim, with `word` = the verdict without its role label."""
    from fedbench.claims import base_verdict
    return table.assign(word=table["verdict"].map(base_verdict)).set_index("claim")


def test_dp_claims_pair_the_seeds_both_sides_ran():
    df, _, s = synthetic_summary(dp_seeds=[0, 1], clip_seeds=[0], dp_first_seed_methods=["head"])
    assert fp.dp_seeds_for(s, "head", 8.0) == [0] and fp.dp_seeds_for(s, "lora", 8.0) == [0, 1]
    n = claims_of(df, s)["n_seeds"]
    assert n["[lora] per-sample clipping alone (noise 0) costs accuracy"] == 1
    assert n["[lora] DP noise at eps=8 costs accuracy beyond clip only"] == 1        # clip ran on seed 0 only
    assert n["[eps=8] lora loses less accuracy than full FT under DP-SGD (drop from no DP)"] == 2
    assert n["[eps=8] lora loses less accuracy than full FT to DP noise (each method's drop from its own clip-only "
             "run)"] == 1
    assert n["[eps=8] head loses less accuracy than full FT under DP-SGD (drop from no DP)"] == 1  # head: 1 seed
    dp = fp.axis_table(df, s, "dp").set_index(["method", "dp"])
    assert dp.loc[("lora", "eps=8"), "seeds"] == 2 and dp.loc[("lora", "clip only"), "seeds"] == 1


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
    df, _, s = synthetic_summary(seeds=[0, 1], axis_seeds=[0], dp_seeds=[0], clip_seeds=[0])
    head = fp.headline_table(df, s).set_index("method")
    assert head.loc["lora", "seeds"] == 2
    assert head.loc["lora", "score_mean"] == pytest.approx(0.695, abs=3e-3)
    assert head.loc["lora", "final_accuracy_mean"] == pytest.approx(0.495, abs=3e-3)   # the last round alone
    assert head.loc["full", "bytes_pct_of_full"] == 100
    dp = fp.axis_table(df, s, "dp").set_index(["method", "dp"])
    assert dp.loc[("full", "eps=8"), "drop_vs_base"] == pytest.approx(0.2, abs=5e-3)
    assert dp.loc[("full", "eps=2"), "drop_vs_base"] == pytest.approx(0.4, abs=5e-3)
    assert dp.loc[("lora", "eps=2"), "dp_epsilon_spent_max"] == pytest.approx(1.995)


def test_end_to_end_tiny_grid_is_reproducible(tmp_results, tmp_path, monkeypatch):
    over = dict(tasks=["tweet_sentiment"], methods=["head", "lora"], seeds=[0, 1], task_methods=[],
                axis_methods=["head"], heterogeneity=["dirichlet-1.0", "iid"], stability=[[1.0, 0.0], [0.5, 0.5]],
                dp_epsilons=[8.0], dp_methods=["head"], clip_only=False, progress=False)
    res = fp.run(profile="smoke", **over)
    # overrides: its own custom-<hash>/ folder under smoke's (fedbench.bench.output_dir)
    out = output_dir("fedpeft", "smoke", overrides={k: v for k, v in over.items() if k != "progress"})
    assert out.parent == tmp_results / "fedpeft" / "smoke" and out.name.startswith("custom-")
    for name in ("summary.csv", "metrics.csv", "claims.csv", "headline.csv", "accuracy_vs_rounds.png",
                 "accuracy_vs_mb.png", "dp_drop.png", "heterogeneity_heatmap.png"):
        assert (out / name).exists(), name
    summary = pd.read_csv(out / "summary.csv")
    assert set(REQUIRED) <= set(summary.columns)
    assert (summary["lr_selected_on"] == "validation").all()
    chosen = pd.read_csv(out / "lr_selection.csv")
    for _, r in summary.iterrows():
        pick = chosen[(chosen["method"] == r["method"]) & (chosen["privacy"] == r["dp"]) & chosen["chosen"]]
        assert len(pick) == 1 and pick["lr"].iloc[0] == r["lr"]
    assert len(summary) == 2 * 2 + 3                                   # headline + iid, unstable, dp for head
    dp = summary[summary["dp_epsilon_target"].notna()]
    assert len(dp) == 1 and 0 < dp["dp_epsilon_spent"].iloc[0] <= 8.0 and dp["dp_delta"].iloc[0] == 1e-5
    assert summary["dp_epsilon_spent"].isna().sum() == len(summary) - 1
    lora = summary[summary["method"] == "lora"].iloc[0]
    assert lora["bytes_up_per_round"] == 3 * lora["state_bytes"] and lora["rounds"] == 2
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"round", "metric", "value"} <= set(metrics.columns)
    acc = metrics[metrics["metric"] == "accuracy"]
    assert len(acc) == 2 * len(summary) and acc["value"].between(0, 1).all()
    assert len(res.claims) >= 1 and (res.claims["verdict"] == "single seed (exploratory)").all()   # smoke: 1 seed
    # rerun: every run loads from the store, the CSVs are identical
    fp.run(profile="smoke", **over)
    assert pd.read_csv(out / "summary.csv").equals(summary)
    # cold rerun in a fresh store: the same numbers (wall-clock aside)
    monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path / "cold"))
    fp.run(profile="smoke", **over)
    cold_out = output_dir("fedpeft", "smoke", overrides={k: v for k, v in over.items() if k != "progress"})
    assert cold_out.parent == tmp_path / "cold" / "fedpeft" / "smoke"
    cold = pd.read_csv(cold_out / "summary.csv")
    cols = [c for c in summary.columns if c != "wall_s"]
    assert cold[cols].equals(summary[cols])
    assert pd.read_csv(cold_out / "metrics.csv").equals(metrics)


def test_a_base_field_the_grid_sets_is_refused_not_silently_replaced():
    with pytest.raises(ConfigError, match="stability") as e:
        settings(**{"fl.dropout": 0.3})
    assert e.value.field_name == "fl.dropout"
    s = settings(**{"fl.aggregator": "median"})            # a field no cell sets reaches every run
    assert all(fp.make_config(c, s, lr=0.01).fl.aggregator == "median" for c in fp.build_cells(s))


@pytest.mark.parametrize("method,eps", [("full", None), ("head", 8.0)])
def test_a_held_search_run_replays_on_test_as_the_run_trained_for_it(tmp_results, method, eps):
    """The reported run of a chosen lr is replayed from the lr search's validation run (same training, the
    global model held at each round the test run evaluates): every number equals the run trained for it."""
    from fedbench.fl.server import run_federated
    from fedbench.results import run_key
    s = settings("smoke", tasks=["tweet_sentiment"], methods=["full", "head"], task_methods=[], axis_methods=[],
                 dp_methods=["head"], dp_epsilons=[8.0], clip_only=False, rounds=3, axis_eval_every=2)
    c = fp.base_cell(s, "tweet_sentiment", method, 0, dp_epsilon=eps)
    lr = s["lr_grid"][method][0]
    val_cfg, test_cfg = fp.make_config(c, s, lr=lr, eval_every=3, validation=True), fp.make_config(c, s, lr=lr)
    assert val_cfg.hash() != test_cfg.hash() and fp.same_training(val_cfg, test_cfg)
    runner, held = fp.make_runner(s), fp.HeldRuns()
    runner.get(val_cfg, compute=held.search(test_cfg))
    assert set(held.held) == {run_key(test_cfg)} and runner.done(test_cfg) is None
    replayed = runner.get(test_cfg, compute=held.replay(test_cfg))
    assert not held.held and held.replay(test_cfg) is None
    fresh = fp.make_runner(s)
    data = fresh.data(test_cfg)
    direct = run_federated(test_cfg, data, caches=fresh.caches(test_cfg, data))
    pd.testing.assert_frame_equal(replayed.rounds.drop(columns="wall_s"), direct.rounds.drop(columns="wall_s"))
    assert {k: v for k, v in replayed.summary.items() if k != "wall_s"} == \
        {k: v for k, v in direct.summary.items() if k != "wall_s"}
    assert np.array_equal(replayed.correct, direct.correct)
    # and the reported run is its config: built from the config alone (data, prefilled caches), the same run
    alone = run_federated(test_cfg)
    pd.testing.assert_frame_equal(alone.rounds.drop(columns="wall_s"), direct.rounds.drop(columns="wall_s"))
    assert np.array_equal(alone.correct, direct.correct)
    evaluated = direct.rounds["accuracy"].notna().tolist()
    assert evaluated == ([True, True, True] if eps is None else [False, True, True])
    if eps is not None:
        assert 0 < replayed.summary["dp_epsilon_spent"] <= 8.0


def test_a_validation_run_of_another_training_is_not_held(tmp_results):
    s = settings("smoke", tasks=["tweet_sentiment"], methods=["head"], task_methods=[], axis_methods=[],
                 dp_methods=[], rounds=2)
    c = fp.base_cell(s, "tweet_sentiment", "head", 0)
    runner, held = fp.make_runner(s), fp.HeldRuns()
    runner.get(fp.make_config(c, s, lr=0.01, eval_every=2, validation=True), compute=held.search(fp.make_config(
        c, s, lr=0.03)))
    assert not held.held


def test_the_caches_fill_every_depth_the_profile_needs_with_one_fill_s_values(tmp_results):
    import torch

    from fedbench.models.inputs import ActivationCache
    s = settings("smoke", tasks=["tweet_sentiment"], methods=["full", "head"], task_methods=[], axis_methods=[],
                 dp_methods=[])
    runner = fp.make_runner(s)
    cfg = fp.make_config(fp.base_cell(s, "tweet_sentiment", "full", 0), s, lr=1e-3)
    data = runner.data(cfg)
    train, test = runner.caches(cfg, data)
    assert set(train._stores) == {5, 6} and set(test._stores) == {5, 6}
    model = runner.shared._model
    for depth in (5, 6):
        one = ActivationCache(data.train, data.pad_id)
        one.fill(model, np.arange(len(data.train)), depth)
        assert all(torch.equal(one._stores[depth][i], train._stores[depth][i]) for i in range(len(data.train)))


def test_methods_are_facts_of_a_table_checked_against_the_tuner_registry(monkeypatch):
    """Every method's grid and role come from ARMS; a method runs only where its tuner is registered."""
    from fedbench.experiments.fedpeft import plan
    from fedbench.registry import TUNERS
    assert set(fp.METHODS) <= set(TUNERS.names()) and fp.known_methods() == list(fp.METHODS)
    assert (fp.REFERENCE, fp.PROBE) == ("full", "head")
    assert fp.FedPEFTSettings().lr_grid == {m: list(a.lr_grid) for m, a in fp.ARMS.items()}
    monkeypatch.setattr(plan, "TUNERS", [m for m in TUNERS.names() if m != "ia3"])    # ia3's tuner gone
    with pytest.raises(ConfigError, match="methods") as e:
        settings(methods=["full", "ia3"])
    assert e.value.field_name == "methods" and "ia3" not in str(e.value.allowed)
    with pytest.raises(ConfigError, match="primary_method"):       # the reference and the probe are not PEFT
        settings(primary_method="head")


def test_the_protocol_quotes_measured_numbers_from_the_run_s_outputs():
    headroom = pd.DataFrame({"task": ["wordnet_noun"], "gain": [0.0741], "depth": [2]})
    metrics = pd.DataFrame({**{k: [0] * 4 for k in fp.KEYS}, "round": [4, 8, 10, 10], "value": [0.5, 0.6, 0.41, 9.0],
                            "metric": ["accuracy", "accuracy", "accuracy", "loss"]})
    why = fp.protocol_table(headroom, metrics).set_index("aspect")["why"]
    assert "full FT - head-only: wordnet_noun +0.074 at top 2 layers" in why["trained layers"]
    assert "fell by up to 0.190" in why["scoring, claims"]
    empty = fp.protocol_table().set_index("aspect")["why"]
    assert "not measured by this run" in empty["trained layers"] and "0.190" not in empty["scoring, claims"]
