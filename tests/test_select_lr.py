"""The one validation lr search (fedbench.bench.select_lr): ties, grid-edge flags and bracketing extension."""
import pytest

from fedbench.bench import select_lr


def scores(table):
    calls = []

    def score(lr):
        calls.append(lr)
        return table[round(lr, 10)]
    return score, calls


def test_no_extension_keeps_columns_and_ties_take_the_smaller_lr():
    score, _ = scores({1e-3: 0.5, 3e-3: 0.5})
    best, rows = select_lr("m", (1e-3, 3e-3), score)
    assert best == 1e-3 and all(r["chosen_at_grid_edge"] for r in rows)
    assert "extension" not in rows[0]


def test_extension_walks_up_until_the_choice_is_interior():
    # validation keeps rising to 9e-3, then falls: the search must add 9e-3 and 2.7e-2 and stop there
    score, calls = scores({1e-3: 0.4, 3e-3: 0.5, 9e-3: 0.6, 2.7e-2: 0.3})
    best, rows = select_lr("m", (1e-3, 3e-3), score, extend=3)
    assert best == pytest.approx(9e-3)
    assert [r["extension"] for r in rows] == [0, 0, 1, 2]
    assert calls[-1] == pytest.approx(2.7e-2) and not rows[0]["chosen_at_grid_edge"]


def test_extension_walks_down_and_stops_at_its_budget():
    score, _ = scores({1e-3: 0.5, 1e-2: 0.4, 1e-4: 0.6, 1e-5: 0.7})
    best, rows = select_lr("m", (1e-3, 1e-2), score, extend=2)
    assert best == pytest.approx(1e-5) and rows[-1]["chosen_at_grid_edge"]   # still at the edge: says so
    assert len(rows) == 4


def test_one_value_grid_needs_a_step():
    score, _ = scores({1e-3: 0.5, 3e-3: 0.6, 9e-3: 0.55, 3.33333e-4: 0.1})
    with pytest.raises(ValueError, match="step"):
        select_lr("m", (1e-3,), score, extend=1)
    best, rows = select_lr("m", (1e-3,), score, extend=2, step=3.0)
    assert best == pytest.approx(3e-3) and [r["extension"] for r in rows] == [0, 1, 1, 2]
    assert not rows[0]["chosen_at_grid_edge"]
