"""The robustness experiment: settings checks, a tiny grid's tables, and the update guard inside the loop."""
import numpy as np
import pytest
import torch

from fedbench.claims import TABLE_COLUMNS as CLAIM_COLUMNS
from fedbench.config import ConfigError, ExperimentConfig
from fedbench.experiments import robustness as rb


def _err(**overrides) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        rb.settings_for("smoke", **overrides)
    return e.value


@pytest.mark.parametrize("overrides, field", [
    ({"aggregators": ["fedavg", "nope"]}, "aggregators"),
    ({"aggregators": []}, "aggregators"),
    ({"aggregators": ["fedavg", "fedavg"]}, "aggregators"),
    ({"attacks": ["nan"]}, "attacks"),
    ({"attacks": ["none"]}, "attacks"),
    ({"fractions": [0.1, 0.3]}, "fractions"),
    ({"fractions": [0.0, 1.5]}, "fractions"),
    ({"fractions": [0.0, 0.05]}, "fractions"),        # round(0.05 * 8) = 0 attackers
    ({"seeds": []}, "seeds"),
    ({"seeds": [0, -1]}, "seeds"),
    ({"nan_fractions": [0.0]}, "nan_fractions"),
    ({"nan_aggregators": ["krum"], "aggregators": ["fedavg"]}, "nan_aggregators"),
    ({"clean_num_malicious": -1}, "clean_num_malicious"),
    ({"claim_attacks": ["scale"]}, "claim_attacks"),   # smoke's attacks are sign_flip, label_flip
    ({"nan_margin": 2}, "nan_margin"),
    ({"n_boot": 10}, "n_boot"),
    ({"no_such_setting": 1}, "no_such_setting"),
    ({"fl.aggregator": "krum"}, "fl.aggregator"),     # the grid sets it per run
    ({"fl.attack": "sign_flip", "fl.attack_fraction": 0.3}, "fl.attack"),
])
def test_settings_errors_name_the_field(overrides, field):
    e = _err(**overrides)
    assert e.field_name == field
    assert field in str(e)


def test_settings_resolve_and_cells():
    p = rb.settings_for("quick")
    s = p.settings
    assert isinstance(s, rb.RobustnessSettings) and isinstance(p.base, ExperimentConfig)
    assert len(s.seeds) >= 3 and 0.0 in s.fractions and s.fractions == (0.0, 0.1, 0.3)
    cells = rb.build_cells(s)
    per_seed = len(s.aggregators) * (1 + len(s.attacks) * 2) + len(s.nan_aggregators) * len(s.nan_fractions)
    assert len(cells) == per_seed * len(s.seeds)
    # f per rule: attackers in the cohort; Bulyan cannot cover 30% (n >= 4f + 3)
    plans = {(c.aggregator, c.attack, c.fraction): rb.plan_cell(c, p.base, s) for c in cells if c.seed == 0}
    assert plans[("krum", "sign_flip", 0.3)].cfg.fl.num_malicious == 3
    assert plans[("krum", "none", 0.0)].cfg.fl.num_malicious == 1
    assert plans[("trimmed_mean", "scale", 0.3)].cfg.fl.trim_ratio == pytest.approx(0.3)
    na = plans[("bulyan", "sign_flip", 0.3)]
    assert na.cfg is None and "n >= 15" in na.note
    assert plans[("bulyan", "sign_flip", 0.1)].cfg.fl.num_malicious == 1


def test_tiny_run_tables(tmp_results):
    res = rb.run("smoke", aggregators=["fedavg", "median", "bulyan"], attacks=["sign_flip"], seeds=[0],
                 progress=False, **{"fl.rounds": 1})
    assert list(res.summary.columns) == rb.SUMMARY_COLUMNS
    assert list(res.table.columns) == rb.TABLE_COLUMNS
    assert list(res.nan_arm.columns) == rb.NAN_COLUMNS
    assert list(res.claims.columns) == CLAIM_COLUMNS
    # 3 rules x (clean + sign_flip 30%) + the NaN arm; Bulyan at 30% (f = 2, n = 8 < 11) is n/a, not a crash
    assert len(res.summary) == 7
    na = res.summary[~res.summary["applicable"]]
    assert list(zip(na["aggregator"], na["attack"], na["fraction"])) == [("bulyan", "sign_flip", 0.3)]
    assert na["final_accuracy"].isna().all() and na["note"].str.startswith("not applicable").all()
    ok = res.summary[res.summary["applicable"]]
    assert ok["final_accuracy"].between(0, 1).all()
    nan = res.nan_arm.iloc[0]
    assert nan["all_rejected"] and nan["rejected"] == nan["nan_updates"] == 2 and nan["honest_rejected"] == 0
    from fedbench.claims import check_table
    assert check_table(res.claims) is res.claims            # roles, labels, no decision from < 3 seeds
    assert "not applicable" in set(res.wide["clean"]) | set(res.wide["sign_flip 30%"])
    import pandas as pd
    back = pd.read_csv(res.out / "summary.csv")
    assert back[["arm", "aggregator", "attack"]].notna().all().all()      # no label reads back as NaN
    assert set(back["arm"]) == {"grid", rb.NAN_ARM} and rb.NAN_LABEL in set(back["attack"])
    for name in ("summary.csv", "rounds.csv", "robustness.csv", "robustness_wide.csv", "nan_arm.csv", "claims.csv",
                 "accuracy_heatmap.png", "accuracy_vs_fraction.png", "nan_arm.png"):
        assert (res.out / name).exists(), name
    # a rerun loads every run from the store and writes the same tables
    again = rb.run("smoke", aggregators=["fedavg", "median", "bulyan"], attacks=["sign_flip"], seeds=[0],
                   progress=False, **{"fl.rounds": 1})
    assert again.summary.equals(res.summary) and again.claims.equals(res.claims)


# -- the loop itself: tiny configs run directly through FederatedRun ----------------------------------------

def _tiny(**fl) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "name": "robustness-test",
        "data": {"task": "rt_sentiment", "num_clients": 7, "partition": "iid", "max_train_samples": 140,
                 "max_test_samples": 40},
        "peft": {"method": "head"}, "train": {"local_steps": 1, "batch_size": 8, "lr": 0.01},
        "fl": {"rounds": 2, **fl}})


@pytest.fixture(scope="module")
def tiny_data():
    from fedbench.fl import prepare_data
    return prepare_data(_tiny())


def _finite_state(run) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in run.global_model.state.values())


def test_nan_clients_rejected_and_counted(tiny_data):
    from fedbench.fl import FederatedRun
    cfg = _tiny(attack="nan", attack_fraction=0.3)
    run = FederatedRun(cfg, tiny_data)
    assert len(run.attackers) == 2
    before = {k: v.clone() for k, v in run.global_model.state.items()}
    for r in (1, 2):
        rec = run.run_round(r)
        assert rec["clients_rejected"] == 2                  # full participation: both NaN clients, every round
        assert np.isfinite(rec["accuracy"]) and np.isfinite(rec["loss"])
    assert {x["client_id"] for x in run.rejections} == run.attackers
    assert all(x["reason"] == "non-finite values" for x in run.rejections)
    assert _finite_state(run)
    assert any(not torch.equal(before[k], v) for k, v in run.global_model.state.items())   # honest ones counted
    assert run.result().summary["clients_rejected"] == 4
    # the experiment's own count of the NaN updates sent matches what the loop rejected
    assert rb.expected_nan_per_round(cfg) == [2, 2]


def test_every_update_rejected_leaves_the_model_unchanged(tiny_data):
    from fedbench.fl import FederatedRun
    run = FederatedRun(_tiny(attack="nan", attack_fraction=1.0), tiny_data)
    before = {k: v.clone() for k, v in run.global_model.state.items()}
    acc0 = run.evaluate_global()["accuracy"]
    rec = run.run_round(1)
    assert rec["clients_rejected"] == 7 and np.isnan(rec["train_loss"])
    assert all(torch.equal(before[k], v) for k, v in run.global_model.state.items())
    assert rec["accuracy"] == acc0


@pytest.mark.parametrize("aggregator", rb.AGGREGATOR_ORDER)
def test_each_rule_runs_inside_the_loop(tiny_data, aggregator):
    from fedbench.fl import FederatedRun
    fl = {"aggregator": aggregator, "attack": "sign_flip", "attack_fraction": 0.15, "num_malicious": 1}
    if aggregator == "trimmed_mean":
        fl["trim_ratio"] = 1 / 7
    run = FederatedRun(_tiny(**fl), tiny_data)
    assert len(run.attackers) == 1
    before = {k: v.clone() for k, v in run.global_model.state.items()}
    rec = run.run_round(1)
    assert rec["clients_rejected"] == 0 and 0 <= rec["accuracy"] <= 1
    assert _finite_state(run)
    assert any(not torch.equal(before[k], v) for k, v in run.global_model.state.items())
