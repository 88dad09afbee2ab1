"""AutoFedNLP: state growth keeps the function; the configurator strategy on the loop (trial groups with the
cohort, equal-time periods, the validation decision, checkpoint resume); the clock; settings; the experiment."""
import numpy as np
import pandas as pd
import pytest
import torch

from fedbench.config import ConfigError, ModelConfig, PeftConfig
from fedbench.experiments import autofednlp as A
from fedbench.models import build_model, load_trainable_state, trainable_state
from fedbench.models.state import embed_leading
from fedbench.models.tuners.adapter import grow_adapter_state
from fedbench.models.tuners.lora import grow_lora_state


def _perturbed(model, seed=0):
    """The model's trainable state with every tensor moved off its init (a 'trained' state)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in trainable_state(model).items()}


def _logits(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model(ids, mask)


@pytest.mark.parametrize("tuner, small, big", [
    ("adapter", (1, 8), (2, 8)), ("adapter", (1, 8), (1, 16)), ("adapter", (2, 8), (4, 24)),
    ("lora", (1, 4), (2, 4)), ("lora", (1, 4), (1, 12)), ("lora", (2, 4), (3, 8))])
def test_growing_a_configuration_keeps_the_models_outputs(tuner, small, big):
    def peft(c):
        if tuner == "lora":
            return PeftConfig(method="lora", rank=c[1], lora_alpha=8.0, depth=c[0])
        return PeftConfig(method="adapter", adapter_width=c[1], depth=c[0])
    m_small = build_model(ModelConfig(), peft(small), 5, seed=3)
    m_big = build_model(ModelConfig(), peft(big), 5, seed=3)
    state = _perturbed(m_small)
    load_trainable_state(m_small, state)
    grow = grow_lora_state if tuner == "lora" else grow_adapter_state
    grown = grow(state, trainable_state(m_big))
    load_trainable_state(m_big, grown)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 5000, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    torch.testing.assert_close(_logits(m_big, ids, mask), _logits(m_small, ids, mask), rtol=1e-5, atol=1e-5)
    # the grown state really is larger, and the new units are not all zero (they can train)
    assert sum(v.numel() for v in grown.values()) > sum(v.numel() for v in state.values())
    with pytest.raises((KeyError, ValueError)):       # states only grow: no way back to the smaller layout
        grow(grown, trainable_state(m_small))


def test_embed_leading_places_the_block_and_zeroes_new_outputs():
    small = torch.arange(6.).reshape(2, 3)
    template = torch.full((4, 5), 7.)
    out = embed_leading(small, template, zero_new_dims=(1,))
    assert torch.equal(out[:2, :3], small)
    assert torch.equal(out[:, 3:], torch.zeros(4, 2))           # new columns zeroed
    assert torch.equal(out[2:, :3], torch.full((2, 3), 7.))     # new rows kept from the template
    assert torch.equal(template, torch.full((4, 5), 7.))        # template untouched
    with pytest.raises(ValueError):
        embed_leading(template, small)


# -- the configurator strategy on the loop ------------------------------------------------------------------

from collections import OrderedDict  # noqa: E402

from fedbench.config import ExperimentConfig  # noqa: E402
from fedbench.fl import FederatedRun, prepare_data  # noqa: E402
from fedbench.strategies import autofednlp as CF  # noqa: E402
from fedbench.fl.data import validation_indices  # noqa: E402
from fedbench.fl.server import run_federated  # noqa: E402


# the configurator's options: the strategy's, in the run config (fl.options)
OPTS = {"width_step": 4, "max_width": 8, "time_threshold": 0.2, "expand": 4, "validation_samples": 16}


def tiny(**changes) -> ExperimentConfig:
    cfg = ExperimentConfig.from_dict({
        "name": "afn", "seed": 1,
        "data": {"task": "rt_sentiment", "num_clients": 8, "partition": "iid", "max_train_samples": 64,
                 "max_test_samples": 24, "max_length": 12},
        "peft": {"method": "adapter", "adapter_width": 4, "depth": 1},
        "train": {"local_steps": 1, "batch_size": 4, "lr": 0.01},
        "fl": {"strategy": "autofednlp", "clients_per_round": 3, "rounds": 7, "options": OPTS},
    })
    return cfg.replace(**changes) if changes else cfg


@pytest.fixture(scope="module")
def data():
    return prepare_data(tiny())


def test_a_period_gives_each_group_the_rounds_its_budget_fits_in_simulated_time_order(data):
    run = FederatedRun(tiny(), data)
    st = run.strategy
    assert st.configs == [(1, 4), (2, 4), (1, 8)]            # current, deeper, wider
    budget = OPTS["time_threshold"] * (OPTS["expand"] * 1 + 1)
    times = [st.round_time(c) for c in st.configs]
    counts = [max(1, int(budget // t)) for t in times]
    assert [st.plan.count(g) for g in range(3)] == counts
    assert times[1] > times[0] and times[2] > times[0]         # deeper and wider rounds cost more
    ends = sorted(((k + 1) * t, g) for g, (n, t) in enumerate(zip(counts, times)) for k in range(n))
    assert st.plan == [g for _, g in ends]


def test_every_round_trains_one_group_with_the_whole_cohort_and_only_its_tensors_travel(data):
    run = FederatedRun(tiny(), data)
    n_groups = len(run.strategy.configs)
    for r in range(1, 4):
        plan = run.select_clients(r)
        ins = run.configure(plan)
        groups = {i.options["group"] for i in ins.values()}
        assert len(groups) == 1 and len(ins) == 3                 # the cohort of a fixed baseline, one group
        g = groups.pop()
        assert all(set(i.state) == set(run.strategy.group_keys(g, run.global_model)) for i in ins.values())
        ups = [run.client_update(c, r, ins[c]) for c in plan.reporting]
        assert all(list(u.state) == list(ins[c].send_keys) for u, c in zip(ups, plan.reporting))
        before = OrderedDict((k, v.clone()) for k, v in run.global_model.state.items())
        rec = run.finish_round(plan, ups, 0.0, instructions=ins)
        assert rec["group"] == g and rec["sim_s"] > 0
        if not rec["decision"]:                                       # only the training group moves
            changed = {k.split("/")[0] for k, v in run.global_model.state.items() if not torch.equal(v, before[k])}
            assert changed == {f"g{g}"}
    assert n_groups == 3


def _ev(acc, n=10):
    """A validation result of accuracy `acc` on n rows (the first acc * n right)."""
    return {"accuracy": acc, "correct": (np.arange(n) < round(acc * n)).astype(float)}


def test_the_decision_picks_the_best_validation_group_and_every_group_restarts_from_it(data, monkeypatch):
    run = FederatedRun(tiny(), data)
    st = run.strategy
    monkeypatch.setattr(st, "validation_eval", lambda config, state: _ev({(1, 4): 0.5, (2, 4): 0.7, (1, 8): 0.6}[
        tuple(config)]))
    n = len(st.plan)
    for r in range(1, n + 1):
        rec = run.run_round(r)
    assert rec["decision"] == "2x4" and st.period == 1
    assert st.configs == [(2, 4), (3, 4), (2, 8)]
    assert (rec["depth"], rec["width"]) == (2, 4)
    # the new current group holds the winner's trained weights; the others the same function, grown
    assert st.history[-1]["winner"] == [2, 4]
    # ties: current first, then wider, then deeper (the official order)
    monkeypatch.setattr(st, "validation_eval", lambda config, state: _ev(0.5))
    for r in range(n + 1, n + 1 + len(st.plan)):
        rec = run.run_round(r)
    assert rec["decision"] == "2x4"


def period_rounds(data) -> int:
    return len(FederatedRun(tiny(), data).strategy.plan)


def test_the_groups_share_nothing_but_the_cohort_sampler_and_the_run_is_deterministic(data):
    cfg = tiny(**{"fl.rounds": period_rounds(data) + 2})
    a = run_federated(cfg, data)
    b = run_federated(cfg, data)
    pd.testing.assert_frame_equal(a.rounds.drop(columns="wall_s"), b.rounds.drop(columns="wall_s"), check_exact=True)
    assert a.rounds["sim_s"].is_monotonic_increasing
    assert (a.rounds["decision"].fillna("") != "").sum() == 1      # the rounds cross one period end


def test_resume_from_a_checkpoint_mid_period_and_across_a_decision_is_bit_identical(data, tmp_path):
    first = period_rounds(data)                                              # the round of the first decision
    cfg = tiny(**{"fl.rounds": first + 2})
    ref = run_federated(cfg, data)
    assert ref.rounds["decision"].iloc[first - 1] != ""
    for stop in (first - 1, first):
        ck = tmp_path / f"ck{stop}"
        run_federated(cfg, data, checkpoint_dir=ck, stop_after=stop)
        res = run_federated(cfg, data, checkpoint_dir=ck)
        pd.testing.assert_frame_equal(res.rounds.drop(columns="wall_s"), ref.rounds.drop(columns="wall_s"),
                                      check_exact=True)
        assert res.predictions["prediction"].tolist() == ref.predictions["prediction"].tolist()


def test_a_horizon_ends_the_run_on_the_configurators_clock_and_resume_runs_nothing_more(data, tmp_path):
    free = run_federated(tiny(**{"fl.rounds": 12}), data)
    sim = free.rounds["sim_s"].to_numpy()
    stop = 5                                                   # end on the clock of the 5th round
    h = float(sim[stop - 1]) - 1e-3
    assert sim[stop - 2] < h                                   # (the round before is still short of it)
    cfg = tiny(**{"fl.rounds": 12, "fl.options.horizon_s": h})     # fl.rounds is only the cap
    res = run_federated(cfg, data)
    assert len(res.rounds) == stop and res.rounds["sim_s"].iloc[-1] >= h > res.rounds["sim_s"].iloc[-2]
    pd.testing.assert_frame_equal(res.rounds.drop(columns="wall_s"),
                                  free.rounds.iloc[:stop].drop(columns="wall_s"), check_exact=True)
    assert res.predictions is not None                         # the stop round is the last: scored with predictions
    # a checkpoint of the stop round (a run killed before its result was saved) resumes to the same result
    ck = tmp_path / "ck"
    run_federated(cfg, data, checkpoint_dir=ck)
    again = run_federated(cfg, data, checkpoint_dir=ck)
    assert len(again.rounds) == stop
    assert again.predictions["prediction"].tolist() == res.predictions["prediction"].tolist()
    # without a horizon the loop runs fl.rounds; a bad horizon is a config error before any work
    assert len(run_federated(tiny(**{"fl.rounds": 6}), data).rounds) == 6
    with pytest.raises(ConfigError, match="fl.options.horizon_s"):
        tiny(**{"fl.options.horizon_s": -1.0})


def test_flower_stops_where_the_in_process_loop_stops(data):
    pytest.importorskip("flwr")
    from test_flower import LocalGrid

    from fedbench.engines import flower as fl_engine
    h = float(run_federated(tiny(**{"fl.rounds": 8}), data).rounds["sim_s"].iloc[3]) - 1e-3
    cfg = tiny(**{"fl.rounds": 8, "fl.options.horizon_s": h})
    ref = run_federated(cfg, data)
    fl_engine.client_runtime(cfg, data)
    grid = LocalGrid(cfg.data.num_clients)
    run = fl_engine.server_main(grid, cfg, data=data)
    assert len(run.records) == len(ref.rounds) == 4
    from flwr.common import MessageType
    trained = sum(r["clients_sampled"] - r["clients_dropped"] for r in run.records)
    assert grid.sent.count(MessageType.TRAIN) == trained            # Flower's remaining rounds sent nothing
    shared = ["round", "group", "sim_s", "bytes_up", "bytes_down", "accuracy"]
    pd.testing.assert_frame_equal(pd.DataFrame(run.records)[shared], ref.rounds[shared], check_dtype=False,
                                  atol=1e-6)


def test_validation_rows_lie_outside_every_clients_data():
    cfg = tiny()
    used, val = validation_indices(cfg, 16, 8000)
    assert len(np.intersect1d(used, val)) == 0


def test_the_strategy_rejects_tuners_without_depth_and_width():
    with pytest.raises(ConfigError, match="peft.method"):
        tiny(**{"peft.method": "head", "peft.depth": None})
    with pytest.raises(ConfigError, match="peft.depth"):
        tiny(**{"peft.depth": None})
    with pytest.raises(ConfigError, match="fl.options.device"):
        tiny(**{"fl.options.device": "moon"})
    with pytest.raises(ConfigError, match="fl.options.widht_step"):
        tiny(**{"fl.options": {"widht_step": 4}})


def test_the_clock_prices_compute_and_both_directions_of_the_network():
    dev = CF.DEVICES["slow_phone"]
    t = CF.round_seconds(dev, 1, 1000, local_steps=2, batch_size=4, max_length=8)
    step = CF.step_seconds(dev, 1, 4, 8)
    assert t == pytest.approx(2 * step + 8 * 1000 / 1e6 + 8 * 1000 / 1e6)
    # hand-computed: one layer, 32 tokens of 8: 32 * (2 * 1769472 + 4 * 384 * 8) FLOPs, forward + backward
    assert step == pytest.approx(2 * 32 * (2 * 1769472 + 4 * 384 * 8) / 2e9)
    assert CF.step_seconds(dev, 1, 4, 8, cached=False) > step
    assert CF.step_seconds(dev, None, 4, 8) > CF.step_seconds(dev, 6, 4, 8)        # weight gradients too
    me = CF.DEVICES["this_cpu"]
    assert CF.step_seconds(me, 3, 8, 32) == pytest.approx(me.step_s[3])
    assert all(a < b for a, b in zip(me.step_s[1:], me.step_s[2:]))            # measured: deeper costs more


# -- the experiment ---------------------------------------------------------------------------------------------

def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="grid"):
        A.settings_for("smoke", grid=[[9, 8]])
    with pytest.raises(ConfigError, match="device"):
        A.settings_for("smoke", device="moon")
    with pytest.raises(ConfigError, match="target_fraction"):
        A.settings_for("smoke", target_fraction=1.5)
    with pytest.raises(ConfigError, match="peft.method"):
        A.settings_for("smoke", **{"peft.method": "lora"})
    with pytest.raises(ConfigError, match="grid_seeds"):
        A.settings_for("smoke", grid_seeds=[7])
    with pytest.raises(ConfigError, match="decision_z"):
        A.settings_for("smoke", decision_z=-1)
    with pytest.raises(ConfigError, match="calibration_horizon_s"):
        A.settings_for("smoke", calibration_horizon_s=0)
    assert A.settings_for("smoke", decision_z=2)[0].options()["decision_z"] == 2.0


def test_time_to_target_uses_the_calibrations_target_for_every_method():
    rows = []
    for m, accs in {"autofednlp": [0.1, 0.9], "fixed_d1_w8": [0.2, 0.4], "fixed_d2_w16": [0.3, 0.5]}.items():
        for r, acc in enumerate(accs, 1):
            rows.append({"method": m, "seed": 0, "round": r, "depth": 1, "width": 8, "accuracy": acc,
                         "sim_s": 10.0 * r, "cum_wall_s": 1.0 * r, "cumulative_bytes": 5 * r, "wall_s": 1.0})
    sm = A.summarize(pd.DataFrame(rows), 0.95 * 0.5)
    assert sm["target_accuracy"].unique().tolist() == [pytest.approx(0.95 * 0.5)]
    by = sm.set_index("method")
    assert by.loc["autofednlp", "time_to_target_sim_s"] == 20.0
    assert by.loc["fixed_d2_w16", "time_to_target_sim_s"] == 20.0
    assert not by.loc["fixed_d1_w8", "reached"] and np.isnan(by.loc["fixed_d1_w8", "time_to_target_sim_s"])
    assert list(sm.columns[:9]) == A.SUMMARY_COLUMNS


def test_smoke_experiment_end_to_end_reproduces_from_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path))
    kw = dict(seeds=[0, 1], rounds=4, cache_rounds=2, full_lr_grid=[1e-4], adapter_lr_grid=[5e-3, 1e-2])
    a = A.run("smoke", progress=False, **kw)
    b = A.run("smoke", progress=False, **kw)          # every run from the store
    drop = [c for c in A.WALL_COLUMNS if c in a.trace]
    pd.testing.assert_frame_equal(a.trace.drop(columns=drop), b.trace.drop(columns=drop))
    pd.testing.assert_frame_equal(a.summary.drop(columns=[c for c in A.WALL_COLUMNS if c in a.summary]),
                                  b.summary.drop(columns=[c for c in A.WALL_COLUMNS if c in b.summary]))
    t = a.trace[a.trace["method"] == "autofednlp"]
    assert t["accuracy"].notna().all()                         # every round evaluated
    from fedbench.claims import check_table
    assert check_table(a.claims) is a.claims            # roles, labels, no decision from < 3 seeds
    assert {"accuracy_vs_sim_time", "config_path", "speedup", "calibration"} <= set(a.figures)
    assert (a.out / "summary.csv").exists() and (a.out / "trace.csv").exists()
    # the calibration: on the validation rows only, and it alone fixes the target and the best fixed configuration
    from fedbench.experiments.autofednlp import calibration as K
    cal = a.calibration
    assert set(cal["calibration"]["method"]) == {"fixed_d1_w8", "fixed_d2_w16"}
    target, best, _ = K.choose(cal["calibration"], cal["plateaus"], 0.95)
    assert (cal["target"], cal["best"]) == (target, best)
    assert a.summary["target_accuracy"].unique().tolist() == [target]
    for f in ("calibration.csv", "plateaus.csv", "crossover.csv", "calibration.png"):
        assert (a.out / f).exists()
    # the adapters' lr: chosen on validation from the grid and used by every adapter run (configurator included)
    sel = a.lr_selection[a.lr_selection["applies_to"] == "every adapter run"]
    assert sel["lr"].tolist() == [5e-3, 1e-2] and sel["chosen"].sum() == 1
    chosen = float(sel.loc[sel["chosen"], "lr"].iloc[0])
    assert chosen == sel.loc[sel["val_final_accuracy"].idxmax(), "lr"]
    s, base = A.settings_for("smoke", **kw)
    for m in ("autofednlp", "fixed_d1_w8", "fixed_d2_w16"):
        assert A.run_config(s, base, m, 0, chosen).train.lr == chosen


def test_a_speed_up_is_not_called_when_the_censored_side_could_reverse_it():
    import dataclasses
    s, _ = A.settings_for("smoke")
    s = dataclasses.replace(s, seeds=(0, 1, 2, 3, 4))     # the speed-up over full FT is primary: >= 5 seeds

    def rows(ours_reached):
        out = []
        for seed in s.seeds:
            for m, t, reached in [("autofednlp", 10.0 + seed, ours_reached), ("full_ft", 1000.0 + seed, False),
                                  ("fixed_d1_w8", 100.0 + 3 * seed, True), ("fixed_d2_w16", 200.0 + seed, True)]:
                out.append({"method": m, "seed": seed, "reached": reached, "time_to_target_sim_s": t if reached
                            else np.nan, "total_sim_s": t, "final_accuracy": 0.5})
        return pd.DataFrame(out)

    for ours_reached, verdict in ((True, "agrees"), (False, "inconclusive")):
        res = A.AutoFedNlpResult(settings=s, base=None, summary=rows(ours_reached), trace=pd.DataFrame({"method": []}),
                                 lr_selection=None, decisions=None, claims=None,
                                 calibration={"best": "fixed_d1_w8", "gate": ""})
        c = A.compute_claims(res)
        full = c[c["claim"].str.contains("full FT")].iloc[0]
        assert full["estimate"] > 50 and full["verdict"] == verdict      # full FT censored: a lower bound
        assert c["role"].tolist()[:2] == ["primary", "primary"] and c["role"].tolist().count("primary") == 2
        assert full["p_holm"] >= full["p_value"] or verdict == "inconclusive"     # Holm over the two primaries


def test_without_a_crossover_the_fixed_configuration_comparison_reads_not_testable():
    import dataclasses

    from fedbench.experiments.autofednlp import calibration as K
    s, _ = A.settings_for("smoke")
    s = dataclasses.replace(s, seeds=(0, 1, 2, 3, 4))
    sm = pd.DataFrame([{"method": m, "seed": x, "reached": True, "time_to_target_sim_s": t + x, "total_sim_s": t + x,
                        "final_accuracy": 0.5} for x in s.seeds
                       for m, t in (("autofednlp", 10.0), ("full_ft", 1000.0), ("fixed_d1_w8", 50.0))])
    cross = pd.DataFrame([{"shallower": "fixed_d1_w8", "deeper": "fixed_d2_w16", "gap": -0.01, "crosses": False}])
    gate = K.verdict_text(cross)
    assert gate.startswith("not testable at this scale")
    res = A.AutoFedNlpResult(settings=s, base=None, summary=sm, trace=pd.DataFrame({"method": []}), lr_selection=None,
                             decisions=None, claims=None, calibration={"best": "fixed_d1_w8", "gate": gate})
    c = A.compute_claims(res).set_index("claim")
    fixed = c.loc[next(k for k in c.index if "best fixed configuration on validation" in k)]
    assert fixed["role"] == "primary" and fixed["verdict"] == gate and np.isnan(fixed["p_holm"])
    full = c.loc[next(k for k in c.index if "full FT" in k)]
    assert full["verdict"] == "agrees" and full["role"] == "primary"     # the speed-up over full FT stays decided


def _curve(method, d, w, t_round, accs):
    return pd.DataFrame({"method": method, "depth": d, "width": w, "round": np.arange(1, len(accs) + 1),
                         "sim_s": t_round * np.arange(1, len(accs) + 1), "val_accuracy": accs})


def test_calibration_finds_when_a_deeper_configuration_overtakes_and_fixes_target_and_best_on_it():
    from fedbench.experiments.autofednlp import calibration as K
    shallow = _curve("fixed_d1_w8", 1, 8, 1.0, [0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])   # ends t=10
    deep = _curve("fixed_d2_w16", 2, 16, 2.0, [0.1, 0.2, 0.3, 0.45, 0.55, 0.6, 0.7, 0.7, 0.7, 0.7])  # ends t=20
    curves = pd.concat([shallow, deep], ignore_index=True)
    plat = K.plateaus(curves, k=2, tol=0.01).set_index("method")
    assert plat.loc["fixed_d1_w8", "plateau"] == pytest.approx(0.5) and plat.loc["fixed_d1_w8", "plateaued"]
    assert plat.loc["fixed_d2_w16", "plateau"] == pytest.approx(0.7) and plat.loc["fixed_d2_w16", "plateaued"]
    # trailing means (k=2) of the deeper curve: ... 0.375 (t=8), 0.5 (t=10), 0.575 (t=12): above 0.5 from t=12 on
    assert K.crossover_time(shallow, deep, 2) == 12.0
    assert np.isnan(K.crossover_time(deep, shallow, 2))                  # the shallower one never stays above
    n = 200
    correct = {"fixed_d1_w8": (np.arange(n) < 100).astype(float), "fixed_d2_w16": (np.arange(n) < 140).astype(float)}
    cross = K.crossovers(curves, plat.reset_index(), correct, k=2, margin=0.01)
    row = cross.iloc[0]
    assert (row["shallower"], row["deeper"]) == ("fixed_d1_w8", "fixed_d2_w16") and row["crosses"]
    assert row["gap"] == pytest.approx(0.2) and row["gap_se"] == pytest.approx(CF.paired_se(
        correct["fixed_d2_w16"], correct["fixed_d1_w8"]))
    assert K.verdict_text(cross) == ""
    assert not K.crossovers(curves, plat.reset_index(), correct, k=2, margin=0.25)["crosses"].any()
    target, best, p = K.choose(curves, plat.reset_index(), 0.95)
    assert target == pytest.approx(0.95 * 0.7) and best == "fixed_d2_w16"      # only the deeper one reaches 0.665
    assert p.set_index("method").loc["fixed_d2_w16", "time_to_target_sim_s"] == 14.0
    target, best, _ = K.choose(curves, plat.reset_index(), 0.7)               # 0.49: the shallower one first (t=3)
    assert best == "fixed_d1_w8"


def test_paired_se_is_the_sd_of_row_differences_over_root_n():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0.])
    b = np.array([1, 0, 0, 1, 1, 1, 0, 0.])
    d = a - b
    assert CF.paired_se(a, b) == pytest.approx(np.sqrt(np.sum((d - d.mean()) ** 2) / 7 / 8))
    assert CF.paired_se(a, a) == 0.0                    # identical predictions: no noise in the difference


def test_choose_group_stays_unless_a_challenger_is_ahead_by_the_interval():
    n = 400
    cur = (np.arange(n) < 200).astype(float)            # 0.50
    close = cur.copy(); close[200:208] = 1              # 0.52, +8 rows: paired se ~0.007, gain ~2.8 se
    far = cur.copy(); far[200:240] = 1                  # 0.60
    accs = [cur.mean(), close.mean(), far.mean()]
    assert CF.choose_group(accs, [cur, close, far], 0.0)[0] == 2                 # official: the best
    assert CF.choose_group([0.5, 0.52], [cur, close], 0.0)[0] == 1
    best, se = CF.choose_group([0.5, 0.52], [cur, close], 3.0)
    assert best == 0 and se[1] == pytest.approx(CF.paired_se(close, cur))       # 2.8 se < 3: stay
    assert CF.choose_group([0.5, 0.52], [cur, close], 2.0)[0] == 1              # > 2 se: move
    assert CF.choose_group(accs, [cur, close, far], 3.0)[0] == 2
    # ties under z = 0 keep the official order: current, then wider (group 2), then deeper (group 1)
    assert CF.choose_group([0.5, 0.6, 0.6], [cur, cur, cur], 0.0)[0] == 2
    assert CF.choose_group([0.6, 0.6, 0.6], [cur, cur, cur], 0.0)[0] == 0


def test_an_interval_decision_on_the_loop_keeps_the_current_configuration_and_records_its_evidence(data, monkeypatch):
    run = FederatedRun(tiny(**{"fl.options": {**OPTS, "decision_z": 2.0}}), data)
    st = run.strategy
    base = (np.arange(10) < 5).astype(float)
    ahead = base.copy(); ahead[5] = 1                   # +0.1 on 10 rows: se 0.1, below 2 se
    monkeypatch.setattr(st, "validation_eval", lambda config, state: {
        "accuracy": float((ahead if tuple(config) == (2, 4) else base).mean()),
        "correct": ahead if tuple(config) == (2, 4) else base})
    for r in range(1, len(st.plan) + 1):
        rec = run.run_round(r)
    assert rec["decision"] == "1x4" and rec["decision_gap"] == pytest.approx(0.1)
    assert rec["decision_se"] == pytest.approx(CF.paired_se(ahead, base))
    with pytest.raises(ConfigError, match="decision_z"):
        tiny(**{"fl.options": {**OPTS, "decision_z": -1.0}})
