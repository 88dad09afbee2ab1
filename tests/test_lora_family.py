"""The federated-LoRA family (fedbench.strategies.lora_family): each method's server step against a direct
computation of its formula, heterogeneous client ranks (what travels, at which rank, counted how), and the
config errors naming their field."""
from collections import OrderedDict

import pytest
import torch

from fedbench.config import ConfigError, ExperimentConfig
from fedbench.fl import FederatedRun, prepare_data
from fedbench.merging import lora_family as LF
from fedbench.models import state_nbytes
from fedbench.strategies.lora_family.ranks import RankOptions, assign_ranks


def tiny(strategy="fedavg", options=None, rank=4, **changes) -> ExperimentConfig:
    cfg = ExperimentConfig.from_dict({
        "name": "lora-family", "seed": 3,
        "data": {"task": "rt_sentiment", "num_clients": 3, "partition": "iid", "max_train_samples": 48,
                 "max_test_samples": 24, "max_length": 16},
        "peft": {"method": "lora", "rank": rank, "depth": 1},
        "train": {"local_steps": 2, "batch_size": 8, "lr": 0.05, "optimizer": "sgd"},
        "fl": {"rounds": 2, "strategy": strategy, "options": options or {}}})
    return cfg.replace(**changes) if changes else cfg


HETERO = {"ranks": [1, 2, 4], "assignment": "cyclic"}     # client c at rank [1, 2, 4][c]


@pytest.fixture(scope="module")
def data():
    return prepare_data(tiny())


def one_round(cfg, data, round_idx=1, run=None):
    """(run, instructions, updates, global model before) of one round run by hand through the loop's pieces."""
    run = run or FederatedRun(cfg, data)
    before = run.global_model
    plan = run.select_clients(round_idx)
    instructions = run.configure(plan)
    updates = [run.client_update(c, round_idx, instructions[c]) for c in plan.reporting]
    run.finish_round(plan, updates, 0.0, instructions=instructions)
    return run, instructions, updates, before


def p_of(updates):
    n = sum(u.num_samples for u in updates)
    return [u.num_samples / n for u in updates]


# -- the pure math ----------------------------------------------------------------------------------------

def test_truncate_and_pad_keep_the_product_of_the_leading_ranks():
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(4, 5, generator=g), "b": torch.randn(3, 4, generator=g), "h": torch.ones(2)}
    t = LF.truncate_factors(state, [("a", "b")], 2)
    assert t["a"].shape == (2, 5) and t["b"].shape == (3, 2) and t["b"].is_contiguous()
    torch.testing.assert_close(t["b"] @ t["a"], state["b"][:, :2] @ state["a"][:2])
    p = LF.pad_factors(t, [("a", "b")], 4)
    assert p["a"].shape == (4, 5) and p["b"].shape == (3, 4)
    assert torch.equal(p["a"][2:], torch.zeros(2, 5)) and torch.equal(p["b"][:, 2:], torch.zeros(3, 2))
    torch.testing.assert_close(p["b"] @ p["a"], t["b"] @ t["a"])
    assert torch.equal(p["h"], state["h"])


def test_fedex_residual_makes_factor_average_exact():
    g = torch.Generator().manual_seed(1)
    bs, as_ = [torch.randn(6, 2, generator=g) for _ in range(3)], [torch.randn(2, 5, generator=g) for _ in range(3)]
    p = [0.2, 0.3, 0.5]
    mean_prod = sum(pi * b.double() @ a.double() for pi, b, a in zip(p, bs, as_))
    b_avg, a_avg = sum(pi * b for pi, b in zip(p, bs)), sum(pi * a for pi, a in zip(p, as_))
    res = LF.fedex_residual(mean_prod, b_avg, a_avg)
    torch.testing.assert_close(b_avg.double() @ a_avg.double() + res, mean_prod)
    assert res.abs().max() > 1e-3        # factor averaging alone is not exact here


def test_sparsity_weights_are_normalised_update_norms():
    g = torch.Generator().manual_seed(2)
    states = [{"a": torch.randn(2, 4, generator=g), "b": torch.randn(3, 2, generator=g) * k} for k in (1.0, 2.0, 0.0)]
    w = LF.sparsity_weights(states, [("a", "b")])
    norms = [float(torch.linalg.matrix_norm(s["b"] @ s["a"])) for s in states]
    assert w == pytest.approx([n / sum(norms) for n in norms])
    assert w[2] == 0.0
    zero = [{"a": s["a"], "b": torch.zeros(3, 2)} for s in states]
    assert LF.sparsity_weights(zero, [("a", "b")]) == pytest.approx([1 / 3] * 3)


def test_svd_factors_give_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(6, 5, generator=g, dtype=torch.float64)
    b, a = LF.svd_factors(d, 2)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    torch.testing.assert_close(b @ a, u[:, :2] @ torch.diag(s[:2]) @ vh[:2])
    torch.testing.assert_close(a @ a.T, torch.eye(2, dtype=torch.float64))
    # the leading r_k of the rank-r factors are the rank-r_k truncation (FlexLoRA's per-client truncation)
    b1, a1 = LF.svd_factors(d, 1)
    torch.testing.assert_close(b[:, :1] @ a[:1], b1 @ a1)


def test_svd_refactor_keeps_the_product_and_orthonormalises_a():
    g = torch.Generator().manual_seed(4)
    b, a = torch.randn(7, 3, generator=g), torch.randn(3, 9, generator=g)
    nb, na = LF.svd_refactor(b, a, 3)
    torch.testing.assert_close(nb @ na, (b @ a).double())
    torch.testing.assert_close(na @ na.T, torch.eye(3, dtype=torch.float64))
    s = torch.linalg.svdvals((b @ a).double())[:3]
    torch.testing.assert_close(nb.norm(dim=0), s)     # B = U_r S_r: column norms are the singular values


# -- rank tiers -------------------------------------------------------------------------------------------

def test_rank_assignment_is_balanced_seeded_and_cyclic():
    opts = RankOptions(ranks=(4, 8, 16))
    a = assign_ranks(opts, 9, 16, seed=1)
    assert sorted(a) == [4, 4, 4, 8, 8, 8, 16, 16, 16] and a == assign_ranks(opts, 9, 16, seed=1)
    assert any(assign_ranks(opts, 9, 16, seed=s) != a for s in range(2, 6))
    assert assign_ranks(RankOptions(ranks=(4, 8), assignment="cyclic"), 3, 8, 0) == [4, 8, 4]
    assert assign_ranks(RankOptions(), 3, 8, 0) == [8, 8, 8]


@pytest.mark.parametrize("options, field", [
    ({"ranks": [2, 8]}, "fl.options.ranks"),          # above peft.rank=4
    ({"ranks": [0, 2]}, "fl.options.ranks"),
    ({"ranks": "4"}, "fl.options.ranks"),
    ({"assignment": "by_speed"}, "fl.options.assignment"),
    ({"rank": [2]}, "fl.options.rank"),               # unknown option
])
def test_bad_rank_tiers_name_their_field(options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny("fedit_zero_pad", options)


def test_bad_method_options_name_their_field():
    with pytest.raises(ConfigError, match=r"fl\.options\.gamma"):
        tiny("hetlora", {"gamma": 0})
    with pytest.raises(ConfigError, match=r"fl\.options\.period"):
        tiny("fedsvd", {"period": 0})
    with pytest.raises(ConfigError, match=r"fl\.lora_aggregation"):
        tiny("flexlora", **{"fl.lora_aggregation": "svd"})
    with pytest.raises(ConfigError, match=r"train\.dp\.enabled"):
        tiny("hetlora", **{"train.dp": {"enabled": True, "noise_multiplier": 1.0}})


def test_zero_pad_fedit_at_equal_ranks_is_fedavg(data):
    ref, _, _, _ = one_round(tiny("fedavg"), data)
    run, _, _, _ = one_round(tiny("fedit_zero_pad"), data)
    for k, v in ref.global_model.state.items():
        assert torch.equal(run.global_model.state[k], v), k
    assert run.records[0]["bytes_up"] == ref.records[0]["bytes_up"]


def test_heterogeneous_ranks_travel_and_count_at_each_clients_rank(data):
    cfg = tiny("fedit_zero_pad", HETERO)
    run, ins, updates, before = one_round(cfg, data)
    pairs = run.strategy.lora.pairs
    for u in updates:
        r = [1, 2, 4][u.client_id]
        for a_key, b_key in pairs:
            assert ins[u.client_id].state[a_key].shape[0] == r and u.state[b_key].shape[1] == r
        assert ins[u.client_id].down_bytes == state_nbytes(ins[u.client_id].state)
        assert u.nbytes_up == state_nbytes(u.state)
    assert run.records[0]["bytes_up"] < one_round(tiny("fedit_zero_pad"), data)[0].records[0]["bytes_up"]
    # the server's step: the sample-weighted mean of the zero-padded factors
    p = p_of(updates)
    for a_key, b_key in pairs:
        want_a = sum(pi * LF.pad_factors(u.state, pairs, 4)[a_key] for pi, u in zip(p, updates))
        torch.testing.assert_close(run.global_model.state[a_key], want_a)
    # the truncation baseline trains everyone at the smallest rank
    _, ins_t, up_t, _ = one_round(tiny("fedit_truncate", HETERO), data)
    assert all(u.state[pairs[0][0]].shape[0] == 1 for u in up_t)


def test_a_rank_r_client_leaves_the_padded_tail_untouched(data):
    """Trained zero-padded, a rank-1 client's update equals its leading rank only (the tail gets no gradient)."""
    run = FederatedRun(tiny("fedit_zero_pad", HETERO), data)
    ins = run.configure(run.select_clients(1))[0]        # client 0: rank 1
    from fedbench.fl.strategy import FedAvg
    full = LF.pad_factors(ins.state, run.strategy.lora.pairs, 4)
    import dataclasses
    raw = FedAvg.client_update(run.strategy, run, dataclasses.replace(ins, state=full), {})
    for a_key, b_key in run.strategy.lora.pairs:
        assert torch.equal(raw.state[a_key][1:], torch.zeros_like(raw.state[a_key][1:]))
        assert torch.equal(raw.state[b_key][:, 1:], torch.zeros_like(raw.state[b_key][:, 1:]))


# -- each method against its formula ----------------------------------------------------------------------

def effective(gm, m, original):
    """The layer's weight a client computes with: W0 + base updates + s B A."""
    w = original + gm.base_delta.get(m.base_key, 0)
    return w + m.scaling * gm.state[m.b_key] @ gm.state[m.a_key]


@pytest.mark.parametrize("options", [{}, HETERO], ids=["equal", "hetero"])
def test_fedex_global_equals_the_exact_product_average(data, options):
    run, ins, updates, before = one_round(tiny("fedex_lora", options), data)
    pairs = run.strategy.lora.pairs
    p = p_of(updates)
    base = dict(run.model.named_parameters())
    for m in run.strategy.lora.modules:
        w0 = run.base.original.get(m.base_key, base[m.base_key]).detach()
        exact = w0 + m.scaling * sum(pi * (u.state[m.b_key] @ u.state[m.a_key]) for pi, u in zip(p, updates))
        torch.testing.assert_close(effective(run.global_model, m, w0), exact, rtol=1e-5, atol=1e-6)
        # the factors themselves are FedIT's averages
        want_b = sum(pi * LF.pad_factors(u.state, pairs, 4)[m.b_key] for pi, u in zip(p, updates))
        torch.testing.assert_close(run.global_model.state[m.b_key], want_b)
    # the residual travels down next round and is counted
    res_bytes = sum(t.numel() * 4 for t in run.global_model.base_delta.values())
    nxt = run.configure(run.select_clients(2))
    assert all(i.down_bytes == state_nbytes(i.state) + res_bytes for i in nxt.values())


def test_flexlora_sends_each_client_the_svd_truncation_of_the_product_average(data):
    run, ins, updates, before = one_round(tiny("flexlora", HETERO), data)
    p = p_of(updates)
    nxt = run.configure(run.select_clients(2))
    for m in run.strategy.lora.modules:
        mean = sum(pi * (u.state[m.b_key].double() @ u.state[m.a_key].double()) for pi, u in zip(p, updates))
        u_, s, vh = torch.linalg.svd(mean, full_matrices=False)
        for c, i in nxt.items():
            r = [1, 2, 4][c]
            best = u_[:, :r] @ torch.diag(s[:r]) @ vh[:r]
            torch.testing.assert_close((i.state[m.b_key] @ i.state[m.a_key]).double(), best, rtol=1e-4, atol=1e-6)


def test_hetlora_weights_by_update_norm_and_prunes_its_tail(data):
    cfg = tiny("hetlora", {**HETERO, "reg": 0.0})
    run, ins, updates, before = one_round(cfg, data)
    pairs = run.strategy.lora.pairs
    padded = [LF.pad_factors(u.state, pairs, 4) for u in updates]
    norms = [sum(float((s[b] @ s[a]).double().pow(2).sum()) for a, b in pairs) ** 0.5 for s in padded]
    w = [n / sum(norms) for n in norms]
    for a_key, b_key in pairs:
        torch.testing.assert_close(run.global_model.state[b_key], sum(wi * s[b_key] for wi, s in zip(w, padded)))
    # rank self-pruning: a client whose tail (ranks g..r) shrank in training sends only its leading g ranks, and the
    # server sends it g from then on; one whose tail grew keeps its rank
    cfg = tiny("hetlora", {"reg": 10.0, "gamma": 0.5}, **{"train.lr": 0.05})
    run = FederatedRun(cfg, data)
    ins = run.configure(run.select_clients(1))[0]
    big_tail = OrderedDict(ins.state)
    for a_key, b_key in pairs:
        big_tail[b_key] = ins.state[b_key].clone()
        big_tail[b_key][:, 2:] = 0.5
    import dataclasses
    u = run.strategy.client_update(run, dataclasses.replace(ins, state=big_tail), {})
    assert all(u.state[a].shape[0] == 2 and u.state[b].shape[1] == 2 for a, b in pairs)
    run.strategy.aggregate(run.global_model, [u], 1)
    assert run.strategy.pruned == {0: 2} and run.strategy.rank_of(0) == 2 and run.strategy.rank_of(1) == 4
    nxt = run.configure(run.select_clients(2))
    assert nxt[0].state[pairs[0][0]].shape[0] == 2 and nxt[1].state[pairs[0][0]].shape[0] == 4
    kept = run.strategy.client_update(run, ins, {})     # B's tail starts at zero: it cannot shrink
    assert all(kept.state[a].shape[0] == 4 for a, _ in pairs)
    assert all(torch.isfinite(t).all() for t in kept.state.values())     # the norm's gradient at zero is 0


def test_rolora_alternates_b_then_a_and_shares_lorms_schedule(data):
    from fedbench.strategies.continual import alternating_factor
    assert [alternating_factor(s) for s in range(4)] == ["B", "A", "B", "A"]
    cfg = tiny("rolora")
    run, ins, updates, before = one_round(cfg, data, 1)
    mods = run.strategy.lora.modules
    assert all(m.a_key not in u.state and m.b_key in u.state for u in updates for m in mods)
    for m in mods:
        assert torch.equal(run.global_model.state[m.a_key], before.state[m.a_key])
        # B's average times the shared A is the exact product average
        p = p_of(updates)
        exact = sum(pi * u.state[m.b_key] @ before.state[m.a_key] for pi, u in zip(p, updates))
        torch.testing.assert_close(run.global_model.state[m.b_key] @ run.global_model.state[m.a_key], exact)
    mid = run.global_model
    _, _, up2, _ = one_round(cfg, data, 2, run)
    assert all(m.b_key not in u.state and m.a_key in u.state for u in up2 for m in mods)
    for m in mods:
        assert torch.equal(run.global_model.state[m.b_key], mid.state[m.b_key])


def test_fedsvd_trains_b_and_refactors_the_product_exactly(data):
    run, ins, updates, before = one_round(tiny("fedsvd"), data)
    p = p_of(updates)
    for m in run.strategy.lora.modules:
        assert all(m.a_key not in u.state for u in updates)
        b_avg = sum(pi * u.state[m.b_key] for pi, u in zip(p, updates))
        g = run.global_model.state
        torch.testing.assert_close(g[m.b_key] @ g[m.a_key], b_avg @ before.state[m.a_key], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g[m.a_key] @ g[m.a_key].T, torch.eye(4), rtol=0, atol=1e-5)
    nxt = run.configure(run.select_clients(2))      # the new A travels down with B
    assert all(m.a_key in i.state for i in nxt.values() for m in run.strategy.lora.modules)


def test_core_fedsa_equals_the_plugin_fedsa_lora_at_equal_ranks(data):
    from fedbench.plugins import load
    load(["fedbench_extra"])
    a = FederatedRun(tiny("fedsa"), data)
    b = FederatedRun(tiny("fedsa_lora"), data)
    for r in (1, 2):
        a.run_round(r)
        b.run_round(r)
    for k, v in b.global_model.state.items():
        assert torch.equal(a.global_model.state[k], v), k
    assert [r["accuracy"] for r in a.records] == [r["accuracy"] for r in b.records]
    for c in range(3):
        for k, v in b.store[c]["fedsa_b"].items():
            assert torch.equal(a.store[c]["fedsa_b"][k], v)


def test_fedsa_keeps_each_clients_b_at_its_rank(data):
    run, ins, updates, before = one_round(tiny("fedsa", HETERO), data)
    for u in updates:
        kept = run.store[u.client_id]["fedsa_b"]
        assert all(t.shape[1] == [1, 2, 4][u.client_id] for t in kept.values())
        assert not set(kept) & set(u.state)


# -- the study (fedbench/experiments/lora_family.py) ---------------------------------------------------------

@pytest.mark.parametrize("profile", ["smoke", "quick", "full", "quick-complete"])
def test_every_profile_resolves_and_its_primaries_run_on_their_seeds(profile):
    from fedbench.experiments import lora_family as X
    from fedbench.bench import configs_root
    p = X.settings_for(profile.split("-")[0], path=configs_root() / "lora_family" / f"{profile}.yaml")
    s = p.settings
    assert max(s.ranks) == p.base.peft.rank
    cells = X.cells(s)
    for m, c in s.primaries.items():
        for seed in s.primary_seeds:
            assert (m, c, seed, "primary") in cells and ("fedit", c, seed, "primary") in cells
    if profile != "smoke":
        assert len(s.primary_seeds) >= 5 and s.primaries and set(s.primaries) <= set(X.PRIMARIES)
    if profile in ("full", "quick-complete"):      # quick runs the primaries that fit its budget (its comment)
        assert set(s.primaries) == set(X.PRIMARIES)
    roles = {role for *_, role in cells}
    assert roles == ({"primary", "exploratory"} if s.explore else {"primary"})


@pytest.mark.parametrize("override, field", [
    ({"methods": ["fedex_lora"]}, "methods"), ({"methods": ["nope"]}, "methods"),
    ({"conditions": ["dp"]}, "conditions"), ({"ranks": [0]}, "ranks"), ({"lr_grid": []}, "lr_grid"),
    ({"primaries": {"fedsvd": "moon"}}, "primaries.fedsvd"), ({"flower_cell": ["fedit", "moon"]}, "flower_cell"),
    ({"seeds": [1, 1]}, "seeds")])
def test_bad_study_settings_name_their_field(override, field):
    from fedbench.experiments import lora_family as X
    with pytest.raises(ConfigError) as e:
        X.settings_for("smoke", **override)
    assert e.value.field_name == field


def test_a_method_that_cannot_run_a_condition_is_refused_by_its_config():
    from fedbench.experiments import lora_family as X
    p = X.settings_for("quick")
    with pytest.raises(ConfigError, match="fl.strategy"):
        X.run_config(p.base, p.settings, "ffa_lora", "hetero", 0)
    with pytest.raises(ConfigError, match=r"train\.dp\.enabled"):
        X.run_config(p.base, p.settings, "hetlora", "dp", 0)
    cfg = X.run_config(p.base, p.settings, "fedit", "hetero", 0, lr=0.01, validation=True)
    assert cfg.fl.strategy == "fedit_zero_pad" and tuple(cfg.fl.options["ranks"]) == (2, 4, 8)
    assert cfg.train.lr == 0.01 and cfg.data.federation_options["validation"] == 200
