"""Figure functions: each returns a Figure, leaves rcParams alone, keeps legends off the data, draws ratio bars
from 1x on a log axis, labels seed counts and draws bands. Small synthetic frames; no training."""
import copy

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from fedbench import plots

ORDER = ["full", "lora", "head"]


def curve_frame(seeds=(("full", 3), ("lora", 3), ("head", 1)), rounds=6, tasks=("rt", "ng20")):
    rng = np.random.default_rng(0)
    rows = [dict(task=t, method=m, seed=s, round=r, accuracy=0.5 + 0.04 * r + rng.normal(0, 0.02))
            for t in tasks for m, n in seeds for s in range(n) for r in range(1, rounds + 1)]
    return pd.DataFrame(rows)


def ratio_frame():
    # geometric means exactly 2 and 0.5: every seed has the same ratio
    return pd.DataFrame([dict(method=m, seed=s, speedup=v) for m, v in [("cache", 2.0), ("slow", 0.5)]
                         for s in range(3)])


def heat_frame():
    rng = np.random.default_rng(1)
    return pd.DataFrame([dict(method=m, alpha=a, seed=s, acc=rng.random()) for m in ORDER for a in (0.1, 1.0)
                         for s in range(2)])


def scatter_frame():
    rng = np.random.default_rng(2)
    return pd.DataFrame(dict(pc1=rng.normal(size=24), pc2=rng.normal(size=24), task=np.repeat(["a", "b", "c"], 8),
                             cluster=np.tile([0, 1, 2], 8), round=np.tile(np.arange(4), 6)))


def all_figures() -> list[Figure]:
    df = curve_frame()
    final = df[df["round"] == 6]
    return [plots.curves(df, "round", "accuracy", "method", facet="task", order=ORDER, hlines={"probe": 0.7}),
            plots.curves(df, "round", "accuracy", "method", band="sd", logx=True),
            plots.bars(final, "task", "accuracy", "method", order=ORDER, baseline=0.5),
            plots.bars(final[final.task == "rt"], "method", "accuracy", error=None),
            plots.bars(ratio_frame(), "method", "speedup", ratio=True),
            plots.heatmap(heat_frame(), "method", "alpha", "acc", cbar_label="accuracy"),
            plots.scatter(scatter_frame(), "pc1", "pc2", "task", marker="cluster", annotate="round")]


def drawn(fig: Figure) -> Figure:
    FigureCanvasAgg(fig).draw()
    return fig


def legends(fig: Figure) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def test_every_function_returns_a_figure_and_leaves_rcparams_alone(tmp_path):
    before = copy.deepcopy(dict(matplotlib.rcParams))
    figs = all_figures()
    for i, fig in enumerate(figs):
        assert isinstance(fig, Figure)
        drawn(fig)
        plots.save(fig, tmp_path / f"f{i}.png")
    assert dict(matplotlib.rcParams) == before


def test_legend_outside_every_axes():
    for fig in all_figures():
        drawn(fig)
        renderer = fig.canvas.get_renderer()
        for leg in legends(fig):
            box = leg.get_window_extent(renderer)
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), "legend drawn over an axes"


def test_curve_labels_carry_seed_counts_and_bands():
    fig = plots.curves(curve_frame(), "round", "accuracy", "method", facet="task", order=ORDER,
                       hlines={"linear probe": 0.7})
    (leg,) = fig.legends
    texts = [t.get_text() for t in leg.get_texts()]
    assert texts[:3] == ["full (3 seeds)", "lora (3 seeds)", "head (1 seed)"]
    assert any(t.startswith("linear probe") for t in texts)
    assert len(fig.axes) == 2                                     # one subplot per facet
    for ax in fig.axes:
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 2                                    # full and lora; head has one seed: no band
    no_band = plots.curves(curve_frame(), "round", "accuracy", "method", band=None)
    assert not [c for c in no_band.axes[0].collections if isinstance(c, PolyCollection)]


def test_curves_seed_count_range_and_fixed_colors():
    df = curve_frame(seeds=(("full", 3), ("lora", 3)), tasks=("rt",))
    df = df[~((df.method == "lora") & (df.seed == 2) & (df["round"] > 3))]       # an unfinished seed
    fig = plots.curves(df, "round", "accuracy", "method", order=["lora", "full"])
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["lora (2-3 seeds)", "full (3 seeds)"]
    lines = fig.axes[0].get_lines()
    assert matplotlib.colors.same_color(lines[0].get_color(), plots.method_colors(["lora", "full"])["lora"])
    assert plots.method_colors(ORDER)["lora"] == matplotlib.colormaps["tab10"](1)


def test_accuracy_y_range_includes_zero_or_baseline_and_ylim_overrides():
    df = curve_frame()
    assert plots.curves(df, "round", "accuracy", "method").axes[0].get_ylim()[0] == 0.0
    lo = plots.curves(df, "round", "accuracy", "method", baseline=0.5).axes[0].get_ylim()[0]
    assert 0.4 < lo <= 0.5
    assert plots.curves(df, "round", "accuracy", "method", ylim=(0.3, 0.9)).axes[0].get_ylim() == (0.3, 0.9)
    loss = df.assign(loss=3 + df["accuracy"])                    # not accuracy-like: autoscaled
    assert plots.curves(loss, "round", "loss", "method").axes[0].get_ylim()[0] > 3
    final = df[df["round"] == 6]
    ax = plots.bars(final, "task", "accuracy", "method", baseline=0.5).axes[0]
    assert ax.get_ylim()[0] == 0.5
    assert all(p.get_y() == 0.5 for p in ax.patches)              # every bar starts at the baseline
    assert plots.bars(final, "task", "accuracy", "method").axes[0].get_ylim()[0] == 0.0


def test_ratio_bars_from_one_on_log_axis():
    fig = drawn(plots.bars(ratio_frame(), "method", "speedup", ratio=True))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    tops = {}
    for p, name in zip(ax.patches, ["cache", "slow"]):
        assert p.get_y() == pytest.approx(1.0)                    # drawn from 1x
        tops[name] = p.get_y() + p.get_height()
    assert tops["cache"] == pytest.approx(2.0) and tops["slow"] == pytest.approx(0.5)
    assert any(np.allclose(line.get_ydata(), 1.0) for line in ax.get_lines())     # the 1x line
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "1x" in labels and "2x" in labels and "0.5x" in labels
    lo, hi = ax.get_ylim()
    assert lo < 0.5 and hi > 2
    with pytest.raises(ValueError, match="speedup"):
        plots.bars(ratio_frame().assign(speedup=[2, 2, 2, 0, 1, 1]), "method", "speedup", ratio=True)


def test_bars_without_hue_label_seed_counts_under_bars():
    final = curve_frame()
    final = final[(final["round"] == 6) & (final.task == "rt")]
    ax = drawn(plots.bars(final, "method", "accuracy", order=ORDER)).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["full\n(3 seeds)", "lora\n(3 seeds)", "head\n(1 seed)"]
    assert len(ax.patches) == 3


def test_heatmap_annotations():
    df = heat_frame()
    df = df[~((df.method == "head") & (df.seed == 1))]             # head has one seed: no sd
    fig = plots.heatmap(df, "method", "alpha", "acc")
    texts = [t for t in fig.axes[0].texts]
    assert len(texts) == 6
    by_row = {t.get_position()[1]: t.get_text() for t in texts}
    assert "±" in by_row[0] and "±" not in by_row[2]
    colors = {t.get_color() for t in texts}
    assert colors <= {"black", "white"}
    assert plots._text_color((0.0, 0.0, 0.0, 1)) == "white" and plots._text_color((1, 1, 0.8, 1)) == "black"


def test_scatter_markers_and_legend():
    fig = plots.scatter(scatter_frame(), "pc1", "pc2", "task", marker="cluster")
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["task = a", "task = b", "task = c", "cluster = 0", "cluster = 1", "cluster = 2"]
    assert len(fig.axes[0].collections) == 9                       # 3 tasks x 3 clusters


def test_save_writes_png(tmp_path):
    path = plots.save(plots.bars(ratio_frame(), "method", "speedup", ratio=True), tmp_path / "sub" / "r.png")
    assert path == tmp_path / "sub" / "r.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("call, name", [
    (lambda d: plots.curves(d, "rounds", "accuracy", "method"), "rounds"),
    (lambda d: plots.curves(d, "round", "acc", "method"), "acc"),
    (lambda d: plots.curves(d, "round", "accuracy", "method", seed="run"), "run"),
    (lambda d: plots.curves(d, "round", "accuracy", "method", facet="dataset"), "dataset"),
    (lambda d: plots.bars(d, "task", "accuracy", hue="algo"), "algo"),
    (lambda d: plots.heatmap(d, "method", "task", "f1"), "f1"),
    (lambda d: plots.scatter(d, "round", "accuracy", "method", marker="cluster"), "cluster"),
])
def test_bad_column_names_raise_naming_the_column(call, name):
    with pytest.raises(KeyError, match=name):
        call(curve_frame())


def test_bad_arguments_raise_value_error():
    df = curve_frame()
    with pytest.raises(ValueError, match="band"):
        plots.curves(df, "round", "accuracy", "method", band="ci90")
    with pytest.raises(ValueError, match="error"):
        plots.bars(df, "task", "accuracy", error="se")
    with pytest.raises(ValueError, match="method"):
        plots.curves(df, "round", "method", "task")                # y must be numeric
