"""AutoFedNLP's plan as a table of per-method facts, and its protocol filled from the outputs."""
import dataclasses

import pandas as pd
import pytest

from fedbench.config import ConfigError
from fedbench.experiments import autofednlp as A
from fedbench.experiments.autofednlp import plan
from fedbench.experiments.autofednlp import protocol as P


def test_the_method_table_validates_against_the_registries(monkeypatch):
    with pytest.raises(ConfigError) as e:
        A.check_methods([dataclasses.replace(plan.AUTOFEDNLP, strategy="no_such_strategy")])
    assert e.value.field_name == "fl.strategy" and e.value.value == "no_such_strategy"
    with pytest.raises(ConfigError) as e:
        A.check_methods([dataclasses.replace(plan.FULL_FT, tuner="no_such_tuner")])
    assert e.value.field_name == "peft.method"
    # settings_for checks the profile's whole table before any work
    monkeypatch.setattr(plan, "FULL_FT", dataclasses.replace(plan.FULL_FT, strategy="no_such_strategy"))
    with pytest.raises(ConfigError, match="no_such_strategy"):
        A.settings_for("smoke")
    with pytest.raises(ConfigError) as e:
        A.method_facts("fixed_depth2")
    assert e.value.field_name == "method"


def test_each_runs_rounds_grid_and_label_come_from_its_entry():
    s, base = A.settings_for("smoke")
    assert A.methods_for(s) == ["autofednlp", "full_ft", "fixed_d1_w8", "fixed_d2_w16"]
    assert A.label("full_ft") == "full FT (FedNLP)" and A.label("fixed_d2_w16") == "fixed d=2, w=16"
    full = A.run_config(s, base, "full_ft", 0, 1e-4)
    assert (full.peft.method, full.peft.depth, full.fl.strategy, full.fl.rounds) == ("full", None, "fedavg", s.full_rounds)
    assert A.val_config(s, full, "full_ft").fl.rounds == s.full_lr_rounds
    auto = A.run_config(s, base, "autofednlp", 1)
    assert auto.fl.strategy == "autofednlp" and auto.fl.rounds == s.rounds and auto.fl.options["cache"] is True
    ctrl = A.run_config(s, base, "autofednlp_nocache", 0)
    assert ctrl.fl.rounds == s.cache_rounds and ctrl.fl.options["cache"] is False
    fx = A.run_config(s, base, "fixed_d2_w16", 0)
    assert (fx.peft.depth, fx.peft.adapter_width, fx.fl.strategy) == (2, 16, "fedavg")
    assert fx.fl.rounds == A.plan.horizon_rounds(s.horizon_s, s.max_fixed_rounds, A.method_clock(s, fx))
    assert A.val_config(s, fx, "fixed_d2_w16").fl.rounds == s.adapter_lr_rounds
    assert {m.lr_grid for m in A.plan_methods(s)} == {"full_lr_grid", "adapter_lr_grid"}


def test_the_protocol_fills_its_numbers_from_the_outputs():
    s, base = A.settings_for("smoke")
    lr_sel = pd.DataFrame({"method": ["full_ft", "full_ft", "fixed_d1_w8", "fixed_d1_w8"],
                           "applies_to": ["full_ft", "full_ft", "every adapter run", "every adapter run"],
                           "lr": [1e-4, 3e-4, 5e-3, 1e-2], "chosen": [False, True, True, False]})
    cal = {"crossover": pd.DataFrame({"crosses": [True]}), "target": 0.4321, "best": "fixed_d2_w16"}
    summary = pd.DataFrame({"method": ["full_ft"], f"round_s_{s.device}": [1234.5]})
    text = P.render("smoke", P.facts(s, base, lr_sel, cal, summary))
    assert text.startswith(P.TITLE) and "ours (smoke)" in text
    for measured in ("chosen: 0.0003", "chosen: 0.005", "here 0.432", "here fixed d=2, w=16", "1,234 s each",
                     "1 of 1 pairs cross"):
        assert measured in text, measured
    assert "{" not in text.replace(P._grid(s.full_lr_grid), "").replace(P._grid(s.adapter_lr_grid), "")
    other = P.render("smoke", P.facts(s, base, lr_sel.assign(chosen=[True, False, False, True]), cal, summary))
    assert "chosen: 0.0001" in other and "chosen: 0.01 " in other
    assert len(text.splitlines()) == 2 + 2 + len(P.ROWS)
