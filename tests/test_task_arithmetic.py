"""Task arithmetic = one-shot FedAvg on the shared loop: settings, scale matching, the equivalence, determinism."""
import numpy as np
import pandas as pd
import pytest
import torch

from fedbench import merging
from fedbench.config import ConfigError
from fedbench.experiments import task_arithmetic as ta


@pytest.mark.parametrize("override, field", [
    (dict(tasks=("rt_sentiment",)), "tasks"),
    (dict(tasks=("rt_sentiment", "no_such_task")), "tasks"),
    (dict(hetero_steps=(1.0, 2.0)), "hetero_steps"),
    (dict(hetero_lrs=(1.0, 2.0)), "hetero_lrs"),
    (dict(hetero_lrs=(1.0, 0.0, 1.0)), "hetero_lrs"),
    (dict(lrs=(0.01, -1.0)), "lrs"),
    (dict(probe_samples=1), "probe_samples"),
    (dict(rounds=(1, 500)), "rounds"),
    (dict(gma_rhos=(1.5,)), "gma_rhos"),
    (dict(lambdas=(-0.5,)), "lambdas"),
    (dict(methods=("task_arithmetic", "krum")), "methods"),
    (dict(tunings=("adapter",)), "tunings"),
    (dict(seeds=(0, 0)), "seeds"),
    (dict(no_such_parameter=1), "no_such_parameter"),
    (dict(head="linear"), "head"),
    (dict(primary=("merge_gap", "hetero_hurts"), hetero_steps=()), "primary"),
    (dict(primary=()), "primary"),
    (dict(primary=("merge_gap", "hetero_hurts", "fednova_recovers", "tuned_beats_1/T")), "primary"),
    ({"peft.depth": 99}, "peft.depth"),
])
def test_bad_settings_name_the_parameter(override, field):
    with pytest.raises(ConfigError) as e:
        ta.settings_for("smoke", **override)
    assert e.value.field_name == field


def test_profiles_resolve_with_a_base_and_meet_the_protocol():
    r = ta.settings_for("smoke", seeds=[3], **{"train.local_steps": 6})
    assert r.settings.seeds == (3,) and r.base.train.local_steps == 6
    q = ta.settings_for("quick")
    assert len(q["tasks"]) >= 4 and len(q["seeds"]) >= 5 and q.base.peft.depth is None
    assert q["val_samples"] >= 100 and q.base.data.max_test_samples >= 200
    # the paper's regime: zero-shot heads, 5 seeds for the pre-stated primaries, steps heterogeneous by >= 8x
    assert q["head"] == "zero_shot" and len(q["seeds"]) >= 5 and 1 <= len(q["primary"]) <= 3
    assert max(q["hetero_steps"]) / min(q["hetero_steps"]) >= 8
    from fedbench.bench import profile_path
    folder = profile_path("task_arithmetic", "quick").parent
    c = ta.settings_for("quick", path=folder / "quick-complete.yaml")     # the arms quick moves out, put back
    assert c["hetero_lrs"] and 1 in c["rounds"] and max(c["rounds"]) > 1 and c["pairs"] and len(c["lrs"]) >= 2
    assert set(c["methods"]) == set(c["hetero_methods"]) == set(ta.MERGE_METHODS)
    p = ta.settings_for("quick", path=folder / "probe-heads.yaml")        # the probe-head arm
    assert p["head"] == "probe" and p["probe_samples"] >= 100
    assert p.base.data.max_train_samples - p["probe_samples"] == q.base.data.max_train_samples - q["probe_samples"]
    assert 1.0 / len(q["tasks"]) in ta.per_task_grid(q.settings, len(q["tasks"])) and len(q["lambdas"]) >= 1
    f = ta.settings_for("full")
    assert min(f["lambdas"]) <= 0.05 + 1e-12 and max(f["lambdas"]) >= 2.0 and f["lrs"]
    assert f["val_samples"] >= 200 and list(f["gma_rhos"]) == pytest.approx(list(np.arange(0.1, 1.0, 0.1)))
    cfg = ta.run_config(q.base, q.settings, "lora", 0)
    assert cfg.fl.strategy == "task_clients" and cfg.data.num_clients == len(q["tasks"]) and not cfg.peft.train_head


def test_grid_includes_one_over_T_and_is_scale_matched():
    s = ta.settings_for("smoke").settings
    for T in (2, 3, 6):
        assert 1.0 / T in ta.per_task_grid(s, T)
    g = torch.Generator().manual_seed(0)
    tvs = [{"w": torch.randn(4, 5, generator=g)} for _ in range(3)]
    w = 0.4
    ta_v = ta.merge("task_arithmetic", tvs, w, float("nan"), [5, 5, 5], 0)
    nova = ta.merge("fednova", tvs, w, float("nan"), [5, 5, 5], 0)
    # the same per-task weight: FedNova with equal steps is task arithmetic at the same grid point
    torch.testing.assert_close(nova["w"], ta_v["w"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ta_v["w"], w * sum(t["w"] for t in tvs), rtol=1e-6, atol=1e-7)
    # mean-scale merges at w = 1/T are the plain merge
    med = ta.merge("median", tvs, 1 / 3, float("nan"), [5, 5, 5], 0)
    torch.testing.assert_close(med["w"], merging.median(tvs, 1.0)["w"])
    # CCLIP's rho grid is the official linspace(min norm, max norm, n, endpoint=False)
    norms = [merging.norm(t) for t in tvs]
    assert ta.rho_grid("cclip", s, tvs) == pytest.approx(list(np.linspace(min(norms), max(norms), s.cclip_rhos,
                                                                          endpoint=False)))



def test_the_merge_table_agrees_with_the_merges_registry():
    from fedbench.registry import MERGES
    for name, facts in ta.MERGE_FACTS.items():
        if not facts.registered:           # FedIT: the loop's factor average, not a MERGES function
            assert name not in MERGES and ta.scale_of(name) == "mean"
            continue
        entry = MERGES.entry(name)
        assert ta.scale_of(name) == entry.scale in ("sum", "mean")
        assert (facts.grid is None) == (entry.search is None), name     # a grid exactly for a second parameter
    assert ta.merge_names() == list(ta.MERGE_METHODS)
    from fedbench.registry import TUNERS
    r = ta.settings_for("smoke", tunings=["lora", "full"])
    for tuning, facts in ta.TUNING_FACTS.items():      # each tuning is a TUNERS entry; its facts shape the config
        assert tuning in TUNERS
        cfg = ta.run_config(r.base, r.settings, tuning, 0)
        assert cfg.peft.method == tuning and (cfg.fl.lora_aggregation == "stack") == facts.lora
        assert (cfg.train.lr == r.settings.full_lr) == facts.own_lr
        assert ta.lr_grid(r.settings, tuning, cfg) == ([cfg.train.lr] if facts.own_lr else list(r.settings.lrs))
    s = ta.settings_for("smoke").settings
    g = torch.Generator().manual_seed(1)
    tvs = [{"w": torch.randn(6, 3, generator=g)} for _ in range(3)]
    # dispatch by facts gives each merge's own call: its second parameter, steps and seeded stream
    from fedbench.fl.seeding import derive_seed
    w, T = 0.3, 3
    expect = {"fedgma": merging.fedgma(tvs, 0.5, w), "cclip": merging.cclip(tvs, 1.0, w),
              "ties": merging.ties(tvs, 0.2, w * T), "dare": merging.dare(tvs, 0.5, w, seed=derive_seed(7, "merge", 0)),
              "fednova": merging.fednova(tvs, [2, 4, 8], w * T), "median": merging.median(tvs, w * T)}
    rho = {"fedgma": 0.5, "cclip": 1.0, "ties": 0.2, "dare": 0.5}
    for name, want in expect.items():
        got = ta.merge(name, tvs, w, rho.get(name, float("nan")), [2, 4, 8], 7)
        torch.testing.assert_close(got["w"], want["w"], rtol=0, atol=0)
    assert ta.rho_grid("ties", s, tvs) == list(s.ties_densities) and np.isnan(ta.rho_grid("median", s, tvs)).all()


def test_methods_validate_against_the_merges_registry(monkeypatch):
    from fedbench.registry import MERGES
    MERGES.names()                                         # loaded, then one merge taken out of the registry
    monkeypatch.delitem(MERGES._entries, "ties")
    assert "ties" not in ta.merge_names() and "fedit" in ta.merge_names()
    for field in ("methods", "hetero_methods"):
        with pytest.raises(ConfigError) as e:
            ta.settings_for("smoke", **{"methods": ["task_arithmetic"], field: ["task_arithmetic", "ties"]})
        assert e.value.field_name == field and "ties" not in e.value.allowed


def test_protocol_markdown_fills_the_chosen_lr_from_the_search():
    p = pd.DataFrame({"aspect": ["lr"], "paper": ["-"], "official code": ["-"], "ours": ["searched"], "why": ["-"]})
    ls = pd.DataFrame({"tuning": ["lora"] * 4, "seed": [0] * 4, "lr": [1e-3, 1e-3, 2e-3, 2e-3],
                       "task": ["a", "b", "a", "b"], "individual_val": [0.5, 0.7, 0.8, 0.6],
                       "chosen": [False, False, True, True]})
    md = ta.protocol_markdown(p, lr_search=ls)
    assert "| lora | 0.001 | 0.6 | False |" in md and "| lora | 0.002 | 0.7 | True |" in md
    assert "learning rate" not in ta.protocol_markdown(p, lr_search=ls.iloc[:0])


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import os
    root = tmp_path_factory.mktemp("ta")
    old = os.environ.get("FEDBENCH_RESULTS_ROOT")
    os.environ["FEDBENCH_RESULTS_ROOT"] = str(root / "a")
    try:
        res = ta.run("smoke", verbose=False)
        stored = {p: p.stat().st_mtime_ns for p in (root / "a" / "runs").rglob("*") if p.is_file()}
        again = ta.run("smoke", verbose=False)                                             # cached rerun
        restored = {p: p.stat().st_mtime_ns for p in (root / "a" / "runs").rglob("*") if p.is_file()}
        assert stored and restored == stored, "a rerun must load every unit, not recompute it"
        os.environ["FEDBENCH_RESULTS_ROOT"] = str(root / "b")
        cold = ta.run("smoke", verbose=False)                                              # from scratch
    finally:
        if old is None:
            os.environ.pop("FEDBENCH_RESULTS_ROOT", None)
        else:
            os.environ["FEDBENCH_RESULTS_ROOT"] = old
    return res, again, cold, root


@pytest.mark.slow
def test_equivalence_holds_on_the_loop(smoke):
    res = smoke[0]
    eq = res.equivalence
    assert len(eq) == len(res.settings["tasks"])
    assert (eq["max_abs_param_diff"] <= 1e-6).all() and eq["same_accuracy"].all()
    assert (eq["prediction_mismatches"] == 0).all()
    assert (eq["fedit_rel_delta_diff"] > 1e-3).all()          # FedIT's factor average is another model
    claim = res.claims[res.claims["claim"].str.startswith("Task arithmetic with lambda = 1/T")]
    assert list(claim["verdict"]) == ["agrees (exploratory)"]                  # exact: no seeds needed


@pytest.mark.slow
def test_summary_has_every_merge_tuned_and_one_over_T(smoke):
    res = smoke[0]
    s, summ = res.settings, res.summary
    T = len(s["tasks"])
    assert list(summ.columns) == ta.SUMMARY_COLUMNS
    homo = summ[summ["setting"] == "homogeneous"]
    for m in ta.MERGE_METHODS:
        assert set(homo[homo["method"] == m]["variant"]) == {"tuned", "1/T"}, m
        assert (homo[(homo["method"] == m) & (homo["variant"] == "1/T")]["lambda"] == 1.0 / T).all()
        assert homo[homo["method"] == m]["lambda"].isin(ta.per_task_grid(s.settings, T)).all()
    # plain one-shot FedAvg (the loop's round) = task arithmetic at 1/T
    fa = homo[homo["method"] == "fedavg"].set_index("task")["accuracy"]
    t1 = homo[(homo["method"] == "task_arithmetic") & (homo["variant"] == "1/T")].set_index("task")["accuracy"]
    pd.testing.assert_series_equal(fa.sort_index(), t1.sort_index(), check_names=False)
    # normalised accuracy: probe 0, individual 1
    assert (homo[homo["method"] == "probe"]["normalized_accuracy"].fillna(0) == 0).all()
    ind = homo[homo["method"] == "individual"]
    assert (ind["normalized_accuracy"].dropna() == 1.0).all() and (ind["accuracy_ratio"] == 1.0).all()
    # heterogeneous rows (steps and lr) are normalised by the homogeneous individual models
    ind_h = ind.set_index("task")["accuracy"]
    for setting in ("hetero_training", "hetero_lr"):
        het = summ[summ["setting"] == setting]
        assert set(het["method"]) >= {"individual", "fedavg", "task_arithmetic"}, setting
        np.testing.assert_allclose(het["accuracy_ratio"], het["accuracy"] / het["task"].map(ind_h))
    assert "fednova" not in set(summ[summ["setting"] == "hetero_lr"]["method"])     # = task arithmetic there
    assert summ["setting"].str.startswith("pair:").sum() == T * (T - 1) // 2 * 2
    assert {f"rounds:{R}" for R in s["rounds"] if R > 1} <= set(summ["setting"])
    c = res.cosine.pivot_table(index="task_a", columns="task_b", values="cosine")
    np.testing.assert_allclose(c.values, c.values.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(c.values), 1.0, atol=1e-9)
    for name in ("summary.csv", "equivalence.csv", "claims.csv", "PROTOCOL.md", "cosine_similarity.png",
                 "normalized_accuracy_homogeneous.png", "accuracy_vs_rounds.png"):
        assert (res.out_dir / name).exists(), name
    assert {"aspect", "paper", "official code", "ours", "why"} == set(res.protocol.columns)


@pytest.mark.slow
def test_rerun_and_cold_rerun_give_identical_tables(smoke):
    res, again, cold, root = smoke
    for name in ("summary.csv", "table.csv", "equivalence.csv", "pairs.csv", "rounds.csv", "validation.csv",
                 "finetune.csv", "lr_search.csv", "claims.csv", "PROTOCOL.md"):
        a = (root / "a" / "task_arithmetic" / "smoke" / name).read_text()
        b = (root / "b" / "task_arithmetic" / "smoke" / name).read_text()
        assert a == b, name
    pd.testing.assert_frame_equal(res.summary, again.summary)


def test_task_clients_freeze_the_head_and_take_per_client_steps():
    from fedbench.config import DataConfig, ExperimentConfig, FLConfig, PeftConfig, TrainConfig
    from fedbench.fl.server import FederatedRun
    cfg = ExperimentConfig(data=DataConfig(task="rt_sentiment", num_clients=2, partition="iid", max_train_samples=16,
                                           max_test_samples=8, max_length=16),
                           peft=PeftConfig(method="full"), train=TrainConfig(local_steps=2, batch_size=4),
                           fl=FLConfig(strategy="task_clients", rounds=1, options={"client_steps": [None, 1]}))
    run = FederatedRun(cfg)
    head = run.global_model.state["classifier.weight"].clone()
    ins = run.configure(run.select_clients(1))
    assert all(not k.startswith("classifier.") for k in ins[0].send_keys)
    ups = [run.client_update(c, 1, ins[c]) for c in (0, 1)]
    assert [u.num_steps for u in ups] == [2, 1]
    assert not any(k.startswith("classifier.") for k in ups[0].state)
    g = run.strategy.aggregate(run.global_model, ups, 1)
    assert torch.equal(g.state["classifier.weight"], head)


@pytest.mark.slow
def test_lr_is_chosen_on_validation_and_its_fine_tunes_are_the_units(smoke):
    res = smoke[0]
    lrs, ft = res.lr_search, res.finetune
    grid = list(res.settings["lrs"])
    assert sorted(lrs["lr"].unique()) == sorted(grid) and len(lrs) == len(grid) * len(res.settings["tasks"])
    score = lrs.groupby("lr", sort=False)["individual_val"].mean()
    best = float(score.index[int(np.argmax(score.to_numpy()))])
    assert set(lrs[lrs["chosen"]]["lr"]) == {best} and (ft["lr"] == best).all()
    # the unit's fine-tunes are the search's at the chosen lr (reused, not retrained differently)
    chosen = lrs[lrs["chosen"]].set_index("task")
    np.testing.assert_allclose(ft.set_index("task")["individual_val"], chosen["individual_val"].loc[ft["task"]])
    np.testing.assert_allclose(ft.set_index("task")["train_loss"], chosen["train_loss"].loc[ft["task"]])


def test_probe_carve_is_disjoint_from_validation_and_fine_tuning():
    r = ta.settings_for("smoke")
    cfg = ta.run_config(r.base, r.settings, "lora", 0)
    from fedbench.fl.data import build_data
    td = build_data(cfg)
    for t in range(len(r.settings.tasks)):
        val, probe, ft = set(td.val[t]), set(td.probe[t]), set(td.client_indices[t])
        assert len(val) == r.settings.val_samples and len(probe) == r.settings.probe_samples
        assert not (val & probe) and not (probe & ft) and not (val & ft)
        assert len(val | probe | ft) == cfg.data.max_train_samples
        assert set(td.task_of_train[list(probe)]) == {t}
    with pytest.raises(ConfigError) as e:
        build_data(cfg.replace(**{"data.federation_options.val_samples": 30, "data.federation_options.probe_samples": 30}))
    assert e.value.field_name == "data.federation_options.val_samples"


def test_pairs_fall_back_to_raw_accuracy_when_a_normalised_value_is_undefined():
    p = pd.DataFrame({"cosine": [0.1, 0.2, 0.3], "accuracy_1/T": [0.5, 0.6, 0.7],
                      "normalized_1/T": [0.2, 0.4, 0.9]})
    assert ta.pair_metric(p)[0] == "normalized_1/T"
    p.loc[1, "normalized_1/T"] = float("nan")
    assert ta.pair_metric(p) == ("accuracy_1/T", "accuracy")


def test_task_clients_take_a_per_client_learning_rate():
    from fedbench.config import DataConfig, ExperimentConfig, FLConfig, PeftConfig, TrainConfig
    from fedbench.fl.server import FederatedRun

    def updates(lr, client_lrs):
        cfg = ExperimentConfig(data=DataConfig(task="rt_sentiment", num_clients=2, partition="iid",
                                               max_train_samples=16, max_test_samples=8, max_length=16),
                               peft=PeftConfig(method="lora", rank=2), train=TrainConfig(local_steps=2, batch_size=4,
                                                                                        lr=lr),
                               fl=FLConfig(strategy="task_clients", rounds=1, options={"client_lrs": client_lrs}))
        run = FederatedRun(cfg)
        ins = run.configure(run.select_clients(1))
        return [run.client_update(c, 1, ins[c]).state for c in (0, 1)], ins

    (a0, a1), ins = updates(1e-3, [None, 3e-2])
    assert ins[1].options == {"lr": 3e-2} and ins[0].options == {}
    (b0, b1), _ = updates(3e-2, None)
    (c0, c1), _ = updates(1e-3, None)
    for k in a0:
        assert torch.equal(a0[k], c0[k]) and torch.equal(a1[k], b1[k])      # client 1 trained at 3e-2
    assert any(not torch.equal(a1[k], c1[k]) for k in a1)


def test_protocol_markdown_carries_the_measured_claims():
    p = pd.DataFrame({"aspect": ["heads"], "paper": ["a|b"], "official code": ["c"], "ours": ["d"], "why": ["e"]})
    claims = pd.DataFrame({"claim": ["Fine-tuning beats the probe"], "comparison": ["individual - probe"],
                           "estimate": [0.0278], "ci_low": [-0.0042], "ci_high": [0.0604], "verdict": ["inconclusive"]})
    ft = pd.DataFrame({"tuning": ["lora"] * 2, "task": ["x", "x"], "probe_test": [0.5, 0.7],
                       "individual_test": [0.6, 0.7], "gain_test": [0.1, 0.0]})
    md = ta.protocol_markdown(p, claims, ft)
    assert "a\\|b" in md and "| Fine-tuning beats the probe | individual - probe | 0.0278 | -0.0042 | 0.0604 | " \
                              "inconclusive |" in md
    assert "| lora | x | 0.6 | 0.65 | 0.05 |" in md
    assert "Measured" not in ta.protocol_markdown(p)


def test_zero_lora_branches_are_skipped_exactly_and_only_when_b_is_zero():
    from fedbench.config import ModelConfig, PeftConfig
    from fedbench.models import build_model, load_tokenizer, lora_modules
    from fedbench.models.tuners.lora import zero_branches_skipped
    model = build_model(ModelConfig(), PeftConfig(method="lora", rank=4, target_modules=("query", "value", "dense")),
                        num_labels=3, seed=0).eval()
    tok = load_tokenizer(ModelConfig().backbone)
    enc = tok(["a fine film", "wordnet: to move fast and far away"], padding=True, return_tensors="pt")
    x, m = enc["input_ids"], enc["attention_mask"]
    mods = lora_modules(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for info in mods:                          # merged weights in the base layers, factors at init (B = 0)
            params[info.base_key].add_(0.01 * torch.randn_like(params[info.base_key]))
        ref = model(x, m)
        with zero_branches_skipped(model) as n:
            fast = model(x, m)
        assert n == len(mods) > 0 and torch.equal(fast, ref)
        params[mods[0].b_key].fill_(0.5)          # a non-zero B keeps its branch
        ref = model(x, m)
        with zero_branches_skipped(model) as n:
            fast = model(x, m)
        assert n == len(mods) - 1 and torch.equal(fast, ref)
    assert all(not layer._disable_adapters for layer in model.modules() if hasattr(layer, "_disable_adapters"))
    assert all(p.requires_grad for k, p in params.items() if ".lora_" in k)


@pytest.mark.slow
def test_full_fine_tuning_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path))
    # two tasks, no heterogeneity: every merge of a full-model task vector costs seconds
    res = ta.run("smoke", verbose=False, tunings=["full"], tasks=["rt_sentiment", "wordnet_verb"], rounds=[1],
                 pairs=False, hetero_lrs=[], hetero_steps=[])
    s = res.summary
    assert set(s["tuning"]) == {"full"}
    homo = s[s["setting"] == "homogeneous"]
    # every merge but FedIT (a LoRA factor average: no factors with full fine-tuning)
    assert set(homo["method"]) == {"probe", "individual", "fedavg", *(m for m in ta.MERGE_METHODS if m != "fedit")}
    assert set(homo[homo["method"] == "task_arithmetic"]["variant"]) == {"tuned", "1/T"}
    assert (res.equivalence["max_abs_param_diff"] <= 1e-6).all() and res.equivalence["same_accuracy"].all()
    ft = res.finetune
    assert (ft["lr"] == res.settings["full_lr"]).all() and (ft["tv_norm"] > 0).all()
    assert len(res.lr_search) == 0                    # full fine-tuning uses full_lr, no search


def test_claims_merge_gap_is_primary_and_gated_on_validation_headroom():
    """The merge gap (lambda 1/T) is the primary claim; every claim about what merging does reads 'no headroom'
    when fine-tuning beats the frozen probe on validation by < 0.05; the prerequisite itself is never gated."""
    from types import SimpleNamespace

    from fedbench.claims import check_table
    rng = np.random.default_rng(0)
    seeds = [0, 1, 2, 3, 4]

    def bits(p):
        return ["".join(map(str, (rng.random(300) < p).astype(int).tolist())) for _ in seeds]

    rows = []
    for setting, method, variant, p in [("homogeneous", "individual", "-", 0.8), ("homogeneous", "probe", "-", 0.6),
                                        ("homogeneous", "task_arithmetic", "1/T", 0.65),
                                        ("homogeneous", "task_arithmetic", "tuned", 0.7)]:
        rows += [{"tuning": "lora", "setting": setting, "method": method, "variant": variant, "seed": sd, "bits": b}
                 for sd, b in zip(seeds, bits(p))]
    s = SimpleNamespace(tunings=("lora",), seeds=seeds, hetero_steps=(), hetero_lrs=(), hetero_methods=(),
                        methods=(), rounds=(1,), head="probe", primary=("merge_gap",))
    eq = pd.DataFrame({"tuning": ["lora"], "max_abs_param_diff": [0.0], "prediction_mismatches": [0]})

    def claims(val_gain, primary=("merge_gap",)):
        s.primary = primary
        ft = pd.DataFrame({"tuning": ["lora"] * 2, "task": ["x", "y"], "gain_test": [0.2, 0.2],
                           "probe_val": [0.6, 0.6], "individual_val": [0.6 + val_gain] * 2})
        tabs = {"correct": pd.DataFrame(rows), "equivalence": eq, "finetune": ft, "pairs": pd.DataFrame()}
        return check_table(ta.make_claims(tabs, SimpleNamespace(settings=s))).set_index("claim")

    ok = claims(0.2)
    gap = "The merge loses to the individual models (lambda 1/T)"
    assert ok.index[0] == gap and ok.loc[gap, "role"] == "primary" and ok.loc[gap, "verdict"] == "agrees"
    flat = claims(0.02)
    word = "no headroom: fine-tuning beats the frozen model on validation by 0.020 < 0.05"
    assert flat.loc[gap, "verdict"] == word
    assert flat.loc["The merge loses to the individual models (lambda tuned)", "verdict"] == word + " (exploratory)"
    assert flat.loc[f"Fine-tuning the encoder beats {ta.HEADS['probe']} (the prerequisite)", "verdict"] == \
        "agrees (exploratory)"
    # the profile pre-states its primary family: a second key joins the Holm family, the rest stay exploratory
    two = claims(0.2, ("merge_gap", "tuned_beats_1/T"))
    tuned = ta.PRIMARY_CLAIMS["tuned_beats_1/T"]
    assert list(two.index[:2]) == [gap, tuned] and set(two["role"].iloc[:2]) == {"primary"}
    assert two["p_holm"].iloc[:2].notna().all() and (two["role"].iloc[2:] == "exploratory").all()
    with pytest.raises(ConfigError) as e:
        ta.settings_for("smoke", primary=["merge_gap", "no_such_claim"])
    assert e.value.field_name == "primary"
