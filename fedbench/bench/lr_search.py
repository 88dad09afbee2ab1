"""The one validation learning-rate search every experiment uses: the best value of a grid on validation data,
bracketed (a choice at a grid edge extends the grid), every value scored written as an lr_selection row."""
from __future__ import annotations


def select_lr(method: str, grid, score, metric: str = "val_final_accuracy", extend: int = 0,
              step: float | None = None) -> tuple[float, list[dict]]:
    """The lr of `grid` (ascending) with the best validation score (``score(lr)`` -> a number, or (number, extra
    columns)); ties: the smaller lr. Returns it and one lr_selection row per value scored, with ``chosen``,
    ``chosen_at_grid_edge`` (a choice at the end of the searched values says the optimum may lie outside them; one
    value: no choice at all) and ``extension`` (0 for the grid's own values).

    ``extend`` > 0 brackets the choice: while the best value sits at an end of the values scored so far, the next
    value beyond that end is scored (one grid step further, the step being ``step`` or the ratio of the grid's
    two values nearest that end; a one-value grid scores both neighbours first), at most ``extend`` times; every added value is a row with its ``extension``
    number. Validation decides, so the extension is part of the protocol, not a look at test."""
    grid = sorted(float(x) for x in grid)
    if extend < 0 or (step is not None and step <= 1):
        raise ValueError(f"select_lr: extend must be >= 0 and step > 1, got extend={extend}, step={step}")
    if extend and len(grid) < 2 and step is None:
        raise ValueError("select_lr: extending a one-value grid needs `step`")
    rows, scored = [], {}

    def run(lr: float, extension: int) -> None:
        out = score(lr)
        value, extra = out if isinstance(out, tuple) else (out, {})
        scored[lr] = float(value)
        rows.append({"method": method, "lr": float(lr), metric: float(value), **extra, "extension": extension})

    for lr in grid:
        run(lr, 0)
    for n in range(1, extend + 1):
        values = sorted(scored)
        best = max(values, key=lambda lr: (scored[lr], -lr))      # ties: the smaller lr
        if len(values) == 1:                                       # no side known: both neighbours
            run(float(f"{best / step:.6g}"), n)
            new = best * step
        elif best == values[0]:
            new = best / (step or values[1] / values[0])
        elif best == values[-1]:
            new = best * (step or values[-1] / values[-2])
        else:
            break
        run(float(f"{new:.6g}"), n)
    values = sorted(scored)
    best = max(values, key=lambda lr: (scored[lr], -lr))
    edge = len(values) == 1 or best in (values[0], values[-1])
    for row in rows:
        row["chosen"] = row["lr"] == best
        row["chosen_at_grid_edge"] = edge
    if not extend:  # the tables written before extension existed keep their columns
        for row in rows:
            del row["extension"]
    return best, rows
