"""AutoFedNLP: state growth keeps the function, the simulated clock on a hand-computed case, the
configurator's choice, parameter errors, and an end-to-end smoke run that reproduces and resumes itself."""
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


def test_clock_on_a_hand_computed_case():
    cost = A.ModelCost(layer_params=1000, hidden=10, num_layers=6)
    dev = A.DeviceProfile("toy", flops_per_s=1e6, uplink_bps=8e3)
    steps = np.array([4, 2, 4])
    # F(n) per layer = n * 2 * 1000 + 4 * 10 * n^2: 8,640 + 4,160 + 8,640 = 21,440 FLOPs for the steps
    f_steps = 21_440.0
    f_fill = 4 * 2000 + 40 * 16.0                      # only the sample of length 4 is new: 8,640
    up = 500                                           # bytes: 8 * 500 / 8,000 = 0.5 s
    cached = A.client_round_seconds(cost, dev, 2, steps, np.array([4]), up)
    assert cached["compute_s"] == pytest.approx((4 * f_fill + 2 * 2 * f_steps) / 1e6)
    assert cached["upload_s"] == pytest.approx(0.5)
    assert cached["total_s"] == pytest.approx(cached["compute_s"] + 0.5)
    nocache = A.client_round_seconds(cost, dev, 2, steps, None, up)
    assert nocache["compute_s"] == pytest.approx((4 * f_steps + 2 * 2 * f_steps) / 1e6)
    full = A.client_round_seconds(cost, dev, None, steps, None, up)
    assert full["compute_s"] == pytest.approx(6 * 3 * f_steps / 1e6)
    # the cost of the bundled MiniLM layer: 4 h^2 (attention) + 2 h * 4h (FFN) dense weights, h = 384
    model = build_model(ModelConfig(), PeftConfig(method="adapter", adapter_width=8, depth=1), 3, seed=0)
    c = A.model_cost(model)
    assert (c.hidden, c.num_layers) == (384, 6) and c.layer_params == 4 * 384 ** 2 + 2 * 384 * 1536


def test_configurator_upgrades_and_picks_the_best_validation_group(monkeypatch):
    s = A.settings_for("smoke", max_width=16)
    run = A.Run.__new__(A.Run)
    run.s = s
    assert run.upgrades((1, 8)) == [(1, 8), (2, 8), (1, 16)]
    assert run.upgrades((6, 8)) == [(6, 8), (6, 16)]
    assert run.upgrades((6, 16)) == [(6, 16)]
    # an end-to-end configurator run whose validation accuracy is rigged: the wider group always wins
    data = A.prepare_data(s, 0)
    models = A.Models(s, 0, data)
    real = models.accuracy

    def rigged(config, state, which):
        return config[1] / 100 if which == "val" else real(config, state, which)
    monkeypatch.setattr(models, "accuracy", rigged)
    trace = A.Run(s, 0, data, models, "autofednlp").run()
    assert trace["groups"].tolist() == ["1x8|2x8|1x16", "1x16|2x16", "1x16|2x16"]
    assert trace["width"].tolist() == [16, 16, 16] and trace["depth"].tolist() == [1, 1, 1]


def test_bad_settings_raise_config_error():
    for overrides in [dict(task="mnist"), dict(tuner="prefix"), dict(device="laptop"), dict(clients_per_round=2),
                      dict(clients_per_round=9), dict(grid=[(7, 8)]), dict(grid=[]), dict(start_depth=7),
                      dict(start_width=128), dict(target_accuracy=1.5), dict(target_fraction=0), dict(lr=-1),
                      dict(seeds=[0, 0]), dict(rounds=0), dict(val_size=200), dict(bogus=1)]:
        with pytest.raises(ConfigError):
            A.settings_for("smoke", **overrides)
    with pytest.raises(ConfigError):
        A.settings_for("medium")


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if "wall" in c])


def test_end_to_end_reproduces_resumes_and_caching_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDBENCH_RESULTS", raising=False)
    outs = {}
    for root in ("a", "b"):
        monkeypatch.setenv("FEDBENCH_RESULTS_ROOT", str(tmp_path / root))
        res = A.run(profile="smoke", progress=False)
        outs[root] = tmp_path / root / "autofednlp" / "smoke"
    for name in ("summary.csv", "trace.csv"):
        a, b = pd.read_csv(outs["a"] / name), pd.read_csv(outs["b"] / name)
        pd.testing.assert_frame_equal(_comparable(a), _comparable(b))
    assert list(res.summary.columns[:9]) == A.SUMMARY_COLUMNS
    assert set(res.summary["method"]) == {"autofednlp", "autofednlp_nocache", "full_ft", "fixed_d1_w8",
                                          "fixed_d6_w16", "oracle_fixed"}
    # caching changes the cost, never the computation: same decisions, same accuracies
    tr = res.trace
    c, nc = tr[tr["method"] == "autofednlp"], tr[tr["method"] == "autofednlp_nocache"]
    assert c["groups"].tolist() == nc["groups"].tolist()
    np.testing.assert_allclose(c["accuracy"].to_numpy(), nc["accuracy"].to_numpy(), atol=1e-12)
    assert (nc["sim_s"].to_numpy() >= c["sim_s"].to_numpy() - 1e-9).all()
    # resume: remove one finished run from the store; the rerun recomputes it and writes identical tables
    key = A.run_key(res.settings, "fixed_d1_w8", 0)
    (A._run_dir(key) / "trace.csv").unlink()
    again = A.run(profile="smoke", progress=False)
    pd.testing.assert_frame_equal(_comparable(again.trace), _comparable(res.trace))
    for name in ("accuracy_vs_sim_time.png", "config_path.png", "speedup.png", "claims.csv"):
        assert (outs["b"] / name).stat().st_size > 500
