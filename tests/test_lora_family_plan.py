"""The federated-LoRA family study's plan (fedbench/experiments/lora_family/): methods and conditions dispatch
by facts (the strategy registry's entries, the condition table), never by a method's name; the method table
validates against the registry; the runner's data provider builds each split once; the protocol is data."""
import pytest

from fedbench.config import ConfigError
from fedbench.experiments import lora_family as X
from fedbench.registry import STRATEGIES


def test_strategy_facts_come_from_the_registry_entries():
    assert X.strategy_facts("fedsa").evaluation == "personalised"
    assert {X.strategy_facts(m.strategy).evaluation for k, m in X.METHODS.items() if k != "fedsa"} == {"global"}
    assert X.strategy_facts("fedit_truncate").needs_tiers and X.strategy_facts("fedit_zero_pad").needs_tiers
    assert not X.strategy_facts("fedavg").takes_tiers and not X.strategy_facts("ffa_lora").takes_tiers
    assert all(X.strategy_facts(s).takes_tiers for s in ("fedsa", "fedex_lora", "flexlora", "hetlora", "rolora",
                                                         "fedsvd", "fedit_truncate", "fedit_zero_pad"))


def test_each_method_runs_as_its_facts_say_under_each_condition():
    p = X.settings_for("smoke")
    cfg = X.run_config(p.base, p.settings, "fedit", "hetero", 0)
    assert cfg.fl.strategy == "fedit_zero_pad" and tuple(cfg.fl.options["ranks"]) == tuple(p.settings.ranks)
    assert X.run_config(p.base, p.settings, "fedit", "iid", 0).fl.strategy == "fedavg"
    flora = X.run_config(p.base, p.settings, "flora", "dirichlet", 0)
    assert (flora.fl.strategy, flora.fl.lora_aggregation, flora.data.alpha) == ("fedavg", "stack", 0.1)
    assert X.run_config(p.base, p.settings, "fedit_truncate", "hetero", 0).fl.strategy == "fedit_truncate"
    # the not-applicable notes of summary.csv (their text is part of the committed tables)
    for method, condition, value, allowed in [
            ("flora", "hetero", "fedavg", "a method that takes rank tiers"),
            ("ffa_lora", "hetero", "ffa_lora", "a method that takes rank tiers"),
            ("fedit_truncate", "iid", "fedit_truncate", "a heterogeneous-rank condition (it is FedIT otherwise)")]:
        with pytest.raises(ConfigError) as e:
            X.run_config(p.base, p.settings, method, condition, 0)
        assert (e.value.field_name, e.value.value, e.value.allowed) == ("fl.strategy", value, allowed)


def test_a_changed_registry_fact_changes_the_dispatch_not_a_name(monkeypatch):
    """The experiment reads facts: a strategy whose entry says it needs tiers is refused outside them, and one
    whose entry says personalised is reported so, whatever its name."""
    p = X.settings_for("smoke")
    monkeypatch.setitem(STRATEGIES.entry("fedex_lora").facts, "needs_tiers", True)
    monkeypatch.setitem(STRATEGIES.entry("fedex_lora").facts, "evaluation", "personalised")
    with pytest.raises(ConfigError, match="heterogeneous-rank"):
        X.run_config(p.base, p.settings, "fedex_lora", "iid", 0)
    assert X.run_config(p.base, p.settings, "fedex_lora", "hetero", 0).fl.strategy == "fedex_lora"
    assert X.strategy_facts("fedex_lora").evaluation == "personalised"


def test_the_method_table_validates_against_the_strategy_registry(monkeypatch):
    monkeypatch.setitem(X.plan.METHODS, "ghost", X.Method("no_such_strategy"))
    with pytest.raises(ConfigError) as e:
        X.settings_for("smoke", methods=["fedit", "ghost"])
    assert (e.value.field_name, e.value.value) == ("methods", "ghost") and "no_such_strategy" in e.value.allowed
    monkeypatch.setitem(X.plan.METHODS, "ghost", X.Method("fedavg", tiered="no_such_baseline"))
    with pytest.raises(ConfigError, match="no_such_baseline"):
        X.settings_for("smoke", methods=["fedit", "ghost"])
    X.check_methods(tuple(k for k in X.METHODS if k != "ghost"))      # every shipped method is registered


def test_the_data_provider_builds_each_split_once():
    p = X.settings_for("smoke")
    data = X.split_data()
    a = X.run_config(p.base, p.settings, "fedit", "iid", 0, lr=0.01)
    b = X.run_config(p.base, p.settings, "hetlora", "hetero", 0, lr=0.02)
    va = X.run_config(p.base, p.settings, "fedit", "iid", 0, lr=0.01, validation=True)
    vb = X.run_config(p.base, p.settings, "fedex_lora", "iid", 0, lr=0.02, validation=True)
    assert data(a) is data(b)                      # method, condition's strategy fields and lr: the same data
    assert data(va) is data(vb) and data(va) is not data(a)
    assert len(data(va).test_indices) == p.settings.validation_samples
    assert data(X.run_config(p.base, p.settings, "fedit", "iid", 1)) is not data(a)       # the seed partitions


def test_the_protocol_is_a_table_of_rows():
    lines = X.PROTOCOL.strip().splitlines()
    assert len(lines) == len(X.protocol.ROWS) + 2
    assert all(line.count(" | ") == len(X.protocol.COLUMNS) - 1 for line in lines[2:])
    assert X.protocol_markdown().startswith(X.protocol.TITLE + "\n\n| method |")
