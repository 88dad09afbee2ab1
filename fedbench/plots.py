"""Figures over tidy DataFrames (one row per measurement, a `seed` column), made the same way everywhere.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global figure state, safe
in notebooks, threads and tests) and without touching ``matplotlib.rcParams`` (font sizes are set per
artist). Rules every figure follows:

* Means over seeds, each curve / bar labelled with its number of seeds ("lora (3 seeds)", "2-3 seeds"
  where some points have fewer) and a band / error bar over seeds: by default the 95% Student t interval
  of the mean, mean +- t_{0.975, n-1} * sd / sqrt(n); ``"sd"`` draws mean +- sd; ``None`` draws none.
  A point with one seed has no band.
* The legend sits outside the axes, below them (a right-hand legend took 30-40% of a figure's width and ran
  into figure titles), never over data; its title names the band only where a band is drawn.
* Facets share a y axis only when their ranges are alike (depth 1-6 next to width 8-64 would flatten one).
* Width is bounded (MAX_WIDTH inches): many bars get rotated tick labels instead of a wider figure.
* Axes are not truncated so as to inflate differences. Bars start at their baseline (0, or the chance
  level passed as ``baseline``) and the y range includes it. Accuracy-like curves (every value in [0, 1])
  get a y range that includes ``baseline`` when given, else 0. Other curves (loss, bytes) autoscale. A
  ``ylim`` argument overrides the rule.
* Ratio bars (speed-ups) are drawn from 1x on a log axis, so a 0.5x slowdown points down as far as a 2x
  speed-up points up, with a line at 1x and tick labels like "2x"; their mean is the geometric mean and
  the interval is a t interval on the log scale.
* Colours are fixed per name (tab10 by place in ``order``): pass the experiment's order to keep a
  method's colour the same in every figure.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from fedbench.claims import t_interval
from fedbench.results import atomic_savefig

BANDS = ("ci95", "sd", None)
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
BAND_TEXT = {"ci95": "band: 95% t interval over seeds", "sd": "band: +- 1 sd over seeds", None: "no band"}
FONT = {"label": 9, "tick": 8, "legend": 8, "title": 10, "subtitle": 9, "annot": 7}
MAX_WIDTH = 10.0        # inches: 1,100 px at the saved 110 dpi


class Figure(Figure):  # noqa: F811 - the same class, displayable where pyplot was never imported
    """A matplotlib Figure that shows itself in a notebook (``_repr_png_``) without pyplot's inline backend:
    these figures are never registered with pyplot, so IPython would otherwise print ``<Figure ...>``."""

    def _repr_png_(self) -> bytes:
        import io

        from matplotlib.backends.backend_agg import FigureCanvasAgg
        buf = io.BytesIO()
        FigureCanvasAgg(self).print_png(buf)
        return buf.getvalue()


# -- colours, labels, checks ---------------------------------------------------------------------------

def method_colors(order) -> dict:
    """A fixed tab10 colour per name, by its place in `order`; tab20 for more than 10 names (tab10 would
    repeat its colours), cycling only after 20."""
    order = list(order)
    if len(order) <= 10:
        pal = matplotlib.colormaps["tab10"]
        return {name: pal(i % 10) for i, name in enumerate(order)}
    pal = matplotlib.colormaps["tab20"]       # dark then light of each hue: 0, 2, 4, ... then 1, 3, 5, ...
    slots = [*range(0, 20, 2), *range(1, 20, 2)]
    return {name: pal(slots[i % 20]) for i, name in enumerate(order)}


def _require(df: pd.DataFrame, **columns) -> None:
    """KeyError naming the argument and the column when a named column is not in df."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    for arg, col in columns.items():
        if col is not None and col not in df.columns:
            raise KeyError(f"{arg}={col!r} is not a column of the DataFrame (columns: {list(df.columns)})")


def _require_numeric(df: pd.DataFrame, **columns) -> None:
    for arg, col in columns.items():
        if col is not None and not pd.api.types.is_numeric_dtype(df[col]):
            raise ValueError(f"{arg}={col!r} must be a numeric column, got dtype {df[col].dtype}")


def _check_choice(value, allowed, name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _ordered(present, order) -> list:
    """`order`'s names that are present, then the other present names in first-appearance order."""
    present = list(dict.fromkeys(present))
    head = [v for v in (order or []) if v in present]
    return head + [v for v in present if v not in head]


def _sorted_unique(values) -> list:
    uniq = list(dict.fromkeys(values))
    try:
        return sorted(uniq)
    except TypeError:                                   # mixed types: sort by text
        return sorted(uniq, key=str)


def _colors_for(names: list, colors: dict | None, order) -> dict:
    base = method_colors(list(order) + [n for n in names if n not in order] if order else names)
    return {**base, **(colors or {})}


def _seed_label(name, counts) -> str:
    """'lora (3 seeds)', 'lora (1 seed)', or 'lora (2-3 seeds)' when points have different seed counts."""
    counts = sorted({int(c) for c in counts})
    lo, hi = counts[0], counts[-1]
    n = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return f"{name} ({n} seed{'' if hi == 1 else 's'})"


# -- mean and band over seeds --------------------------------------------------------------------------

def _summarise(df: pd.DataFrame, keys: list, y: str, seed: str | None, band, log: bool = False) -> pd.DataFrame:
    """Per group `keys`: mean over seeds, band [lo, hi] and n seeds.

    Rows of one seed within a group are averaged first (one value per seed). ci95: mean +-
    t_{0.975, n-1} * sd / sqrt(n); sd: mean +- sd; lo = hi = NaN with one seed or band None.
    log=True works on log(y) and exponentiates (geometric mean, interval on the log scale).
    """
    d = df[keys + ([seed] if seed else []) + [y]].copy()
    if log:
        d[y] = np.log(d[y].astype(float))
    if seed:
        d = d.groupby(keys + [seed], sort=False, dropna=False)[y].mean().reset_index()
    g = d.groupby(keys, sort=False, dropna=False)[y].agg(mean="mean", sd="std", n="count").reset_index()
    if band == "ci95":   # the claims' interval over seeds (fedbench.claims.t_interval): figures and verdicts agree
        ci = [t_interval(v.dropna().to_numpy()) if v.notna().any() else (np.nan,) * 3
              for _, v in d.groupby(keys, sort=False, dropna=False)[y]]
        g["lo"], g["hi"] = [c[1] for c in ci], [c[2] for c in ci]
        mult = None
    elif band == "sd":
        mult = np.where(g["n"] > 1, 1.0, np.nan)
    else:
        mult = np.full(len(g), np.nan)
    if mult is not None:
        half = g["sd"].to_numpy(dtype=float) * mult
        g["lo"], g["hi"] = g["mean"] - half, g["mean"] + half
    if log:
        for c in ("mean", "lo", "hi"):
            g[c] = np.exp(g[c])
    return g


# -- layout helpers ------------------------------------------------------------------------------------

def _legend_outside(fig: Figure, handles, labels, title: str | None = None):
    """One figure legend below all axes (constrained layout makes room for it), never over data, in as many
    columns as the figure's width holds (by the longest label)."""
    longest = max([len(str(t)) for t in labels] + [1])
    per_col = 0.075 * longest + 0.5                        # inches per column at the legend's 8 pt
    ncols = max(1, min(len(labels), int(fig.get_figwidth() // per_col)))
    leg = fig.legend(handles, labels, loc="outside lower center", fontsize=FONT["legend"], frameon=False,
                     title=title, title_fontsize=FONT["legend"], ncols=ncols)
    return leg


def _wrap(text: str, inches: float, fontsize: float) -> str:
    """`text` broken into lines that fit `inches` at `fontsize` (about 0.55 em per character): a label or title
    longer than its axes would otherwise run off the canvas (constrained layout moves text, it cannot shorten it)."""
    import textwrap
    width = max(12, int(inches * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, width) if len(line) > width else line for line in str(text).split("\n"))


def _axes_inches(ax) -> tuple[float, float]:
    """The axes' width and height in inches, from its place in the figure's grid (before layout)."""
    fig, pos = ax.figure, ax.get_position()
    return pos.width * fig.get_figwidth(), pos.height * fig.get_figheight()


def _set_title(ax, title: str, fontsize: float) -> None:
    ax.set_title(_wrap(title, max(_axes_inches(ax)[0] * 1.1, 2.5), fontsize), fontsize=fontsize)


def _style_axes(ax, xlabel: str | None, ylabel: str | None) -> None:
    w, h = _axes_inches(ax)
    if xlabel is not None:
        ax.set_xlabel(_wrap(xlabel, max(w, 2.5), FONT["label"]), fontsize=FONT["label"])
    if ylabel is not None:
        # 0.6: the layout later gives part of the height to titles and a legend below
        ax.set_ylabel(_wrap(ylabel, max(h * 0.6, 1.8), FONT["label"]), fontsize=FONT["label"])
    ax.tick_params(which="both", labelsize=FONT["tick"])      # minor labels too (log axes label some)
    ax.grid(True, alpha=0.3, linewidth=0.5)
    ax.set_axisbelow(True)


def _finite(*arrays) -> np.ndarray:
    v = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    return v[np.isfinite(v)]


def _curve_ylim(values: np.ndarray, baseline: float | None):
    """The y range rule for curves: accuracy-like (all values in [0, 1]) -> include `baseline`, else 0;
    otherwise include `baseline` if given, else None (autoscale)."""
    if values.size == 0:
        return None
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi <= 1:
        floor = 0.0 if baseline is None else float(baseline)
    elif baseline is not None:
        floor = float(baseline)
    else:
        return None
    lo, hi = min(lo, floor), max(hi, floor)
    pad = 0.04 * (hi - lo) if hi > lo else 0.05
    return (lo if lo == 0 else lo - pad), hi + pad


# -- curves --------------------------------------------------------------------------------------------

def curves(df: pd.DataFrame, x: str, y: str, hue: str, seed: str | None = "seed", facet: str | None = None,
           band: str | None = "ci95", logx: bool = False, xlabel: str | None = None, ylabel: str | None = None,
           title: str | None = None, colors: dict | None = None, order=None, hlines: dict | None = None,
           baseline: float | None = None, ylim: tuple | None = None, sharey: bool | None = None) -> Figure:
    """Mean of `y` over seeds vs `x`, one line per `hue` value, one subplot per `facet` value.

    sharey: whether the facets share one y axis; None = only when their ranges are alike (see
    :func:`_alike_ranges`), so a panel of small values is not flattened against one of large values.

    Band per point over seeds (see BANDS); labels "name (n seeds)". hlines = {label: y} draws dashed
    reference lines (e.g. a linear probe) on every subplot, listed in the legend. seed=None treats each
    row as one replicate. y range: see the module docstring (baseline / 0 for accuracy-like y; ylim overrides).
    """
    _require(df, x=x, y=y, hue=hue, seed=seed, facet=facet)
    _require_numeric(df, y=y)
    _check_choice(band, BANDS, "band")
    facets = _ordered(df[facet], None) if facet else [None]
    hues = _ordered(df[hue], order)
    palette = _colors_for(hues, colors, order)
    keys = ([facet] if facet else []) + [hue, x]
    summary = _summarise(df, keys, y, seed, band)
    bounded = bool(len(summary)) and summary["mean"].between(0, 1).all()
    if bounded:       # an accuracy-like quantity: its band cannot leave [0, 1] (a 2-seed t interval easily would)
        summary[["lo", "hi"]] = summary[["lo", "hi"]].clip(0, 1)

    if sharey is None:
        sharey = facet is None or _alike_ranges([summary.loc[summary[facet] == fv, "mean"] for fv in facets])
    fig = Figure(figsize=(min(MAX_WIDTH, 3.8 * len(facets) + 1.0), 3.8), layout="constrained")
    axes = fig.subplots(1, len(facets), sharey=sharey, squeeze=False)[0]
    alpha = 0.2 if len(hues) <= 3 else 0.1          # many overlapping bands: lighter, so lines stay readable
    handles, labels = {}, {}
    for ax, fv in zip(axes, facets):
        sub = summary if facet is None else summary[summary[facet] == fv]
        for h in hues:
            pts = sub[sub[hue] == h].sort_values(x)
            if pts.empty:
                continue
            line, = ax.plot(pts[x], pts["mean"], marker="o", markersize=3, linewidth=1.5, color=palette[h])
            if pts["lo"].notna().any():
                ax.fill_between(pts[x], pts["lo"], pts["hi"], color=palette[h], alpha=alpha, linewidth=0)
            handles.setdefault(h, line)
            labels[h] = _seed_label(h, summary.loc[summary[hue] == h, "n"])
        if facet is not None:
            ax.set_title(f"{facet} = {fv}", fontsize=FONT["subtitle"])
        if not logx and pd.api.types.is_integer_dtype(df[x]):     # rounds, steps: integer ticks only
            from matplotlib.ticker import MaxNLocator
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if logx:
            ax.set_xscale("log")
            # plain numbers (0.5, 2, 10) rather than 5x10^-1; minor ticks labelled only on a short range
            from matplotlib.ticker import LogFormatter
            ax.xaxis.set_major_formatter(LogFormatter())
            ax.xaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1.5, 0.5)))
        _style_axes(ax, xlabel if xlabel is not None else x, (ylabel if ylabel is not None else y)
                    if ax is axes[0] or not sharey else None)
    ref = _draw_hlines(axes, hlines)
    legend_handles = [handles[h] for h in hues if h in handles] + [r[0] for r in ref]
    legend_labels = [labels[h] for h in hues if h in handles] + [r[1] for r in ref]
    # seed=None: each row is one replicate, so there is no mean or band to name; no band drawn: none named
    drawn = summary["lo"].notna().any()
    legend_title = None if seed is None or summary["n"].max() <= 1 else \
        f"mean over seeds; {BAND_TEXT[band]}" if drawn else "mean over seeds"
    _legend_outside(fig, legend_handles, legend_labels, title=legend_title)
    for ax, fv in zip(axes if not sharey else axes[:1], facets if not sharey else [None]):
        sub = summary if fv is None else summary[summary[facet] == fv]
        limits = ylim or _curve_ylim(_finite(sub["mean"], sub["lo"], sub["hi"], list((hlines or {}).values())),
                                     baseline)
        if limits is not None and bounded and ylim is None:
            limits = (limits[0], min(limits[1], 1.02))
        if limits is not None:
            ax.set_ylim(*limits)                        # shared y: applies to every facet
    if title and len(facets) == 1:     # over its axes: a figure-wide title would run into the outside legend
        _set_title(axes[0], title, FONT["title"])
    elif title:
        fig.suptitle(_wrap(title, fig.get_figwidth() * 0.95, FONT["title"]), fontsize=FONT["title"])
    return fig


def _alike_ranges(series, ratio: float = 4.0) -> bool:
    """Whether facets' values are on one scale: their ranges overlap and no span is `ratio` times another's."""
    spans = []
    for v in series:
        v = _finite(v)
        if v.size:
            spans.append((float(v.min()), float(v.max())))
    if len(spans) < 2:
        return True
    lo, hi = max(a for a, _ in spans), min(b for _, b in spans)
    widths = [max(b - a, 1e-12) for a, b in spans]
    top = max(abs(b) for _, b in spans) or 1.0
    overlap = hi >= lo or (lo - hi) <= 0.25 * top
    return overlap and max(widths) / min(widths) <= ratio or all(w <= 1e-9 for w in widths) and overlap


def _draw_hlines(axes, hlines: dict | None) -> list:
    """Reference lines on every axes; returns [(handle, label)] for the legend."""
    out = []
    styles = ["--", ":", "-."]
    for i, (label, yv) in enumerate((hlines or {}).items()):
        for ax in axes:
            line = ax.axhline(float(yv), color="0.35", linestyle=styles[i % 3], linewidth=1.2)
        out.append((line, f"{label} ({float(yv):.3g})"))
    return out


# -- bars ----------------------------------------------------------------------------------------------

def _ratio_ticks(ax, lo: float, hi: float) -> None:
    """Ticks at 'nice' ratios inside [lo, hi], labelled '2x', '0.5x'; no minor ticks."""
    nice = {m * 10.0 ** e for e in range(-3, 4) for m in (1, 1.5, 2, 3, 5)}
    cands = sorted({2.0 ** k for k in range(-10, 11)} | nice)
    ticks = [t for t in cands if lo <= t <= hi]
    if len(ticks) > 8:                                  # wide range: powers of 2 only, thinned
        ticks = [t for t in ticks if math.log2(t).is_integer()]
        ticks = ticks[::max(1, math.ceil(len(ticks) / 8))]
    if 1.0 not in ticks:
        ticks = sorted(ticks + [1.0])
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))


def bars(df: pd.DataFrame, x: str, y: str, hue: str | None = None, seed: str | None = "seed",
         error: str | None = "ci95", baseline: float = 0.0, ratio: bool = False, ylabel: str | None = None,
         title: str | None = None, colors: dict | None = None, order=None, ylim: tuple | None = None) -> Figure:
    """Grouped bars of the mean of `y` over seeds per `x` (and `hue`), with error bars over seeds.

    Bars start at `baseline` (0, or the chance level) and the y range includes it. ratio=True (speed-ups):
    geometric mean over seeds, log y axis, bars drawn from 1x (a slowdown points down), a line at 1x,
    ticks "2x"; values must be > 0. `order` orders the hue values (the x values when hue is None).
    Labels carry the seed count: in the legend with a hue, under each bar without. A bar of one seed (no error
    bar to draw) is hatched, and the legend says so.
    """
    _require(df, x=x, y=y, hue=hue, seed=seed)
    _require_numeric(df, y=y)
    _check_choice(error, BANDS, "error")
    if ratio and not (df[y] > 0).all():
        raise ValueError(f"y={y!r} must be > 0 for ratio bars (a ratio of two positive quantities)")
    xs = _ordered(df[x], None if hue else order)
    hues = _ordered(df[hue], order) if hue else [None]
    palette = _colors_for(hues if hue else xs, colors, order)
    summary = _summarise(df, [x] + ([hue] if hue else []), y, seed, error, log=ratio)
    floor = 1.0 if ratio else float(baseline)

    width_in = max(3.5, 0.9 * len(xs) * max(1, len(hues)) ** 0.5 + 2.0)
    fig = Figure(figsize=(min(MAX_WIDTH, width_in), 3.8), layout="constrained")
    ax = fig.subplots()
    if ratio:
        ax.set_yscale("log")
    width = 0.8 / len(hues)
    handles, labels = [], []
    for j, h in enumerate(hues):
        rows = summary if h is None else summary[summary[hue] == h]
        rows = rows.set_index(x).reindex(xs).dropna(subset=["mean"])
        pos = np.array([xs.index(v) for v in rows.index]) + (j - (len(hues) - 1) / 2) * width
        col = [palette[h]] * len(rows) if hue else [palette[v] for v in rows.index]
        # every bar starts at the floor (baseline, or 1x for ratios): a value below it points down
        cont = ax.bar(pos, rows["mean"] - floor, bottom=floor, width=width * 0.92, color=col,
                      edgecolor="white", linewidth=0.5)
        for patch, n in zip(cont.patches, rows["n"]):
            if n == 1 and error is not None:
                patch.set_hatch("///")
        if rows["lo"].notna().any():
            ax.errorbar(pos, rows["mean"], yerr=[rows["mean"] - rows["lo"], rows["hi"] - rows["mean"]],
                        fmt="none", ecolor="black", elinewidth=1, capsize=3)
        if hue:
            handles.append(cont)
            labels.append(_seed_label(h, rows["n"]))
    ax.axhline(floor, color="black", linewidth=0.8)
    ax.set_xticks(range(len(xs)))
    if hue:
        ticklabels = [str(v) for v in xs]
    else:
        n_by_x = summary.set_index(x)["n"]
        ticklabels = [_seed_label(v, [n_by_x[v]]).replace(" (", "\n(") for v in xs]
    # labels that would not fit side by side at this width: rotated rather than a wider figure
    crowded = sum(max(len(line) for line in t.split("\n")) for t in ticklabels) * 0.07 > 0.8 * fig.get_figwidth()
    if crowded:           # one line each, slanted: stacked lines would run into their neighbours
        ticklabels = [t.replace("\n", " ") for t in ticklabels]
        # the slanted labels take height from the axes: give it back
        fig.set_figheight(fig.get_figheight() + 0.07 * max(len(t) for t in ticklabels) * math.sin(math.radians(40)))
    ax.set_xticklabels(ticklabels, rotation=40 if crowded else 0, ha="right" if crowded else "center",
                       rotation_mode="anchor" if crowded else "default")
    what = f"{'geometric ' if ratio else ''}mean over seeds; {BAND_TEXT[error].replace('band', 'error bar')}"
    # without a hue there is no legend: say what bar and error bar are under the axis instead
    _style_axes(ax, x if hue else f"{x}\n({what})", ylabel if ylabel is not None else y)
    ax.grid(False, axis="x")
    _set_bar_ylim(ax, summary, floor, ratio, ylim)
    single = error is not None and bool((summary["n"] == 1).any())
    if single:            # hatched bars: say what the hatch means
        from matplotlib.patches import Patch
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="///"))
        labels.append("hatched: 1 seed, no error bar")
    if hue or single:
        _legend_outside(fig, handles, labels, title=what if hue else None)
    if title:
        _set_title(ax, title, FONT["title"])
    return fig


def _set_bar_ylim(ax, summary: pd.DataFrame, floor: float, ratio: bool, ylim) -> None:
    """y range that includes the floor and every bar and error bar (log-symmetric padding for ratios)."""
    vals = _finite(summary["mean"], summary["lo"], summary["hi"], [floor])
    lo, hi = float(vals.min()), float(vals.max())
    if ratio:
        f = max(1.1, (hi / lo) ** 0.08)
        lo, hi = lo / f, hi * f
        ax.set_ylim(*(ylim or (lo, hi)))
        _ratio_ticks(ax, *ax.get_ylim())
        return
    pad = 0.05 * (hi - lo) if hi > lo else 0.05
    # the floor is the axis edge when no bar goes below it, so bars visibly start at their baseline
    ax.set_ylim(*(ylim or (lo if lo == floor else lo - pad, hi + pad)))


# -- heatmap -------------------------------------------------------------------------------------------

def _text_color(rgba) -> str:
    """Black or white, whichever contrasts more with the cell (WCAG relative luminance, cut at 0.179)."""
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    return "black" if lum > 0.179 else "white"


def heatmap(df: pd.DataFrame, index: str, columns: str, values: str, seed: str | None = "seed", fmt: str = ".3f",
            title: str | None = None, cbar_label: str | None = None, cmap: str | None = None,
            center: float | None = None, row_order=None, col_order=None) -> Figure:
    """Mean of `values` over seeds per (index, columns) cell, each cell annotated "mean ± sd" (sd only with
    > 1 seed), text black or white for contrast. Rows and columns in `row_order` / `col_order`, else in
    first-appearance order, and in the rows' order when rows and columns are the same names (a task x task
    matrix); a missing cell is left blank. The colour bar's label gives the seed count.

    Colours: a diverging map (RdBu_r) centred at `center` when it is given or the values have both signs (a
    signed quantity such as a cosine), else `cmap` (viridis).
    """
    _require(df, index=index, columns=columns, values=values, seed=seed)
    _require_numeric(df, values=values)
    g = _summarise(df, [index, columns], values, seed, "sd")
    rows, cols = _ordered(df[index], row_order), _ordered(df[columns], col_order)
    if col_order is None and set(rows) == set(cols):
        cols = list(rows)
    mean = g.pivot(index=index, columns=columns, values="mean").reindex(index=rows, columns=cols)
    sd = g.pivot(index=index, columns=columns, values="sd").reindex(index=rows, columns=cols)
    n = g.pivot(index=index, columns=columns, values="n").reindex(index=rows, columns=cols)

    fig = Figure(figsize=(min(MAX_WIDTH, 1.2 * len(cols) + 2.6), min(10, 0.55 * len(rows) + 1.6)),
                 layout="constrained")
    ax = fig.subplots()
    grid = mean.to_numpy(dtype=float)
    vals = grid[np.isfinite(grid)]
    signed = vals.size > 0 and vals.min() < 0 < vals.max()
    norm = None
    if center is not None or (signed and cmap is None):
        c = 0.0 if center is None else float(center)
        half = float(np.max(np.abs(vals - c))) if vals.size else 1.0
        from matplotlib.colors import Normalize
        norm = Normalize(c - (half or 1.0), c + (half or 1.0))    # symmetric about the centre
        cmap = cmap or "RdBu_r"
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap or "viridis", norm=norm, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            m = mean.iat[i, j]
            if not np.isfinite(m):
                continue
            text = f"{m:{fmt}}" + (f" ± {sd.iat[i, j]:{fmt}}" if n.iat[i, j] > 1 else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=FONT["annot"],
                    color=_text_color(im.cmap(im.norm(m))))
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=30 if len(cols) > 4 else 0,
                  ha="right" if len(cols) > 4 else "center")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    _style_axes(ax, columns, index)
    ax.grid(False)
    cbar = fig.colorbar(im, ax=ax)
    counts = n.to_numpy(dtype=float)
    seeds = _seed_label("", counts[np.isfinite(counts)]).strip().strip("()")
    cbar.set_label(f"{cbar_label or values}, mean over {seeds}", fontsize=FONT["label"])
    cbar.ax.tick_params(labelsize=FONT["tick"])
    if title:
        _set_title(ax, title, FONT["title"])
    return fig


# -- scatter -------------------------------------------------------------------------------------------

def scatter(df: pd.DataFrame, x: str, y: str, hue: str, marker: str | None = None, annotate: str | None = None,
            title: str | None = None, xlabel: str | None = None, ylabel: str | None = None,
            colors: dict | None = None, order=None) -> Figure:
    """One point per row: colour by `hue` (e.g. the true task), shape by `marker` (e.g. the assigned
    cluster), optional text label from `annotate` (e.g. the round). One legend outside the axes lists
    colours then shapes.
    """
    _require(df, x=x, y=y, hue=hue, marker=marker, annotate=annotate)
    _require_numeric(df, x=x, y=y)
    hues = _ordered(_sorted_unique(df[hue]), order)      # unordered categories (tasks, clusters): sorted
    palette = _colors_for(hues, colors, order)
    marks = _sorted_unique(df[marker]) if marker else [None]
    shape = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(marks)}

    fig = Figure(figsize=(6.0, 4.4), layout="constrained")
    ax = fig.subplots()
    for h in hues:
        for m in marks:
            sel = (df[hue] == h) & ((df[marker] == m) if marker else True)
            pts = df[sel]
            if not pts.empty:
                ax.scatter(pts[x], pts[y], color=palette[h], marker=shape[m], s=28, edgecolors="white",
                           linewidths=0.5)
    if annotate:
        # neighbours along x alternate above / below their point, so close labels do not overprint; a point in
        # the right half is labelled to its left, so no label runs off the axes
        mid = (float(df[x].min()) + float(df[x].max())) / 2
        for i, (_, r) in enumerate(df.sort_values([x, y]).iterrows()):
            left = float(r[x]) > mid
            ax.annotate(str(r[annotate]), (r[x], r[y]), xytext=(-3 if left else 3, 4 if i % 2 == 0 else -10),
                        textcoords="offset points", ha="right" if left else "left", fontsize=FONT["annot"] - 1,
                        color="0.3")
        ax.margins(x=0.08, y=0.12)
    _style_axes(ax, xlabel if xlabel is not None else x, ylabel if ylabel is not None else y)
    handles = [Line2D([], [], linestyle="", marker="o", color=palette[h]) for h in hues]
    labels = [f"{hue} = {h}" for h in hues]
    if marker:
        handles += [Line2D([], [], linestyle="", marker=shape[m], color="0.4") for m in marks]
        labels += [f"{marker} = {m}" for m in marks]
    _legend_outside(fig, handles, labels)
    if title:
        _set_title(ax, title, FONT["title"])
    return fig


# -- saving --------------------------------------------------------------------------------------------

def save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` atomically (format from the suffix, PNG by default) and return the path."""
    path = Path(path)
    atomic_savefig(fig, path)
    return path
