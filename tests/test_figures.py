"""Every experiment's figures, drawn by the experiment's own figure function, checked as a reader would look at
them: no text outside the canvas, the legend clear of titles and axes, a bounded width, facets on different scales
not forced onto one y axis, signed matrices on a map centred at 0, IID first in heterogeneity columns.

The inputs are the committed quick results (results/<experiment>/*.csv, the same tables the figure functions get
from a run, read back), so the figures are the real ones at their real size, without training anything (every
smoke profile would take 10-60 s)."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from fedbench import plots

RESULTS = Path(__file__).resolve().parents[1] / "results"
MAX_PX = 1200        # saved at 110 dpi: 10.9 inches


def csv(exp: str, name: str) -> pd.DataFrame:
    return pd.read_csv(RESULTS / exp / f"{name}.csv")


def quickstart_figures():
    from fedbench.experiments import quickstart
    probe = float(csv("quickstart", "summary")["linear_probe_accuracy"].iloc[0])
    return quickstart.make_figures(csv("quickstart", "rounds"), probe, quickstart.make_config("quick"))


def fedpeft_figures():
    from fedbench.experiments import fedpeft
    return fedpeft.make_figures(csv("fedpeft", "summary"), csv("fedpeft", "metrics"), fedpeft.settings_for("quick"))


def fl_tac_figures():
    from fedbench.experiments import fl_tac
    s, _ = fl_tac.settings_for("quick")
    res = SimpleNamespace(settings=s, summary=csv("fl_tac", "summary"), accuracy_rounds=csv("fl_tac", "accuracy_rounds"),
                          clustering=csv("fl_tac", "clustering"), embedding=csv("fl_tac", "adapter_embedding"))
    return fl_tac.make_figures(res)


def autofednlp_figures():
    from fedbench.experiments import autofednlp
    s, _ = autofednlp.settings_for("quick")
    res = SimpleNamespace(settings=s, summary=csv("autofednlp", "summary"), trace=csv("autofednlp", "trace"))
    return autofednlp.make_figures(res)


def lorm_figures():
    from fedbench.experiments import lorm
    s, _ = lorm.settings_for("quick")
    res = SimpleNamespace(settings=s, summary=csv("lorm", "summary"), avg_curve=csv("lorm", "avg_accuracy"),
                          merge_error=csv("lorm", "merge_error"))
    return lorm.make_figures(res)


def task_arithmetic_figures():
    from fedbench.experiments import task_arithmetic
    tabs = {name: csv("task_arithmetic", name) for name in ("cosine", "pairs", "rounds")}
    return task_arithmetic.make_figures(csv("task_arithmetic", "summary"), tabs, task_arithmetic.settings_for("quick"))


def robustness_figures():
    from fedbench.experiments import robustness
    return robustness.make_figures(csv("robustness", "summary"), csv("robustness", "rounds"))


EXPERIMENTS = {"quickstart": quickstart_figures, "fedpeft": fedpeft_figures, "fl_tac": fl_tac_figures,
               "autofednlp": autofednlp_figures, "lorm": lorm_figures, "task_arithmetic": task_arithmetic_figures,
               "robustness": robustness_figures}


@pytest.fixture(scope="module", params=sorted(EXPERIMENTS))
def figures(request):
    figs = EXPERIMENTS[request.param]()
    assert figs, request.param
    for fig in figs.values():
        FigureCanvasAgg(fig).draw()
    return request.param, figs


def _titles(fig):
    out = [ax.title for ax in fig.axes if ax.get_title()]
    if fig._suptitle is not None:
        out.append(fig._suptitle)
    return out


def test_no_text_outside_the_canvas(figures):
    """Everything drawn (titles, labels, tick labels, legends, annotations) lies inside the figure: its tight
    box, the one savefig(bbox_inches="tight") would otherwise grow the canvas to, is within the figure's."""
    exp, figs = figures
    for name, fig in figs.items():
        tight = fig.get_tightbbox(fig.canvas.get_renderer())          # inches
        w, h = fig.get_size_inches()
        assert tight.x0 >= -0.02 and tight.y0 >= -0.02 and tight.x1 <= w + 0.02 and tight.y1 <= h + 0.02, \
            (exp, name, tight.bounds, (w, h))
        for ax in fig.axes:          # annotations (point labels) inside their axes, not run off its edge
            box = ax.get_window_extent()
            for t in ax.texts:
                if t.get_visible() and t.get_text().strip():
                    tb = t.get_window_extent()
                    assert box.x0 - 2 <= tb.x0 and tb.x1 <= box.x1 + 2, (exp, name, t.get_text())


def test_legends_clear_of_titles_and_axes(figures):
    exp, figs = figures
    for name, fig in figs.items():
        r = fig.canvas.get_renderer()
        for leg in list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
            box = leg.get_window_extent(r)
            for t in _titles(fig):
                assert not box.overlaps(t.get_window_extent(r)), (exp, name, "legend over a title")
            for ax in fig.axes:
                if ax.get_label() != "<colorbar>":
                    assert not box.overlaps(ax.get_window_extent(r)), (exp, name, "legend over an axes")


def test_width_is_bounded(figures):
    exp, figs = figures
    for name, fig in figs.items():
        assert fig.get_figwidth() * 110 <= MAX_PX, (exp, name, fig.get_figwidth())


def test_panels_on_different_scales_have_their_own_axis(figures):
    exp, figs = figures
    for name, fig in figs.items():
        axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.lines]
        if len(axes) < 2:
            continue
        spans = []
        for ax in axes:
            ys = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines])
            ys = ys[np.isfinite(ys)]
            spans.append(ys.max() - ys.min() if ys.size else 0.0)
        shared = all(ax.get_shared_y_axes().joined(axes[0], ax) for ax in axes[1:])
        if shared and min(spans) > 0:
            assert max(spans) / min(spans) <= 4, (exp, name, spans)


def test_the_named_defects_are_gone():
    figs = task_arithmetic_figures()
    cos = figs["cosine_similarity.png"]
    ax = cos.axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    assert rows == cols                                                    # one order for both
    im = ax.images[0]
    assert im.cmap.name == "RdBu_r" and im.norm.vmin == pytest.approx(-im.norm.vmax)   # diverging, centred at 0
    fed = fedpeft_figures()
    het = [t.get_text() for t in fed["heterogeneity_heatmap.png"].axes[0].get_xticklabels()]
    assert het[0] == "iid" or "iid" not in het                             # quick: Dir(1.0), Dir(0.1) only
    assert het == sorted(het, key=lambda h: -np.inf if h == "iid" else -float(h.split("-")[1]))
    assert "DP-SGD" not in fed["dp_drop.png"].axes[0].get_ylabel()
    auto = autofednlp_figures()
    (leg,) = auto["accuracy_vs_sim_time"].legends
    target = [t.get_text() for t in leg.get_texts() if t.get_text().startswith("target")]
    assert len(target) == 1 and target[0].count(".") == 1                 # the target's value once
    assert not auto["config_path"].axes[0].get_shared_y_axes().joined(*auto["config_path"].axes[:2])
    bars = fl_tac_figures()["accuracy_by_method"].axes[0]
    assert bars.get_ylim()[0] <= 0                                          # bars from 0, chance as a line
    qs = quickstart_figures()["accuracy_vs_mb.png"]
    (leg,) = qs.legends
    assert leg.get_title().get_text() in ("", "mean over seeds")           # no band drawn, none named
    sizes = {t.get_fontsize() for t in qs.axes[0].get_xticklabels(which="both") if t.get_text()}
    assert len(sizes) <= 1                                                 # one tick size, minor labels included


def test_single_seed_bars_are_hatched_and_the_legend_says_so():
    df = pd.DataFrame({"m": ["a", "a", "a", "b"], "seed": [0, 1, 2, 0], "v": [0.5, 0.6, 0.55, 0.7]})
    fig = plots.bars(df, "m", "v")
    hatched = [p.get_hatch() for p in fig.axes[0].patches]
    assert hatched == [None, "///"]
    (leg,) = fig.legends
    assert any("1 seed" in t.get_text() for t in leg.get_texts())


def test_more_than_ten_names_get_distinct_colours():
    colors = plots.method_colors([f"m{i}" for i in range(14)])
    assert len({tuple(c) for c in colors.values()}) == 14
    assert plots.method_colors(list("abc")) == {k: v for k, v in list(plots.method_colors(list("abcd")).items())[:3]}
