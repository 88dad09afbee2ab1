"""Tests of fedbench.data's client partitioners and their inspection helpers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedbench.data import (  # noqa: E402
    class_incremental_tasks,
    describe_partition,
    partition_dirichlet,
    partition_iid,
    partition_per_task,
    partition_quantity_skew,
    plot_partition,
)
from fedbench.data import partition as partition_module  # noqa: E402

LABELS = np.repeat(np.arange(10), 200)  # 2,000 samples, 10 balanced classes, sorted by class


def assert_valid_partition(parts, n, num_clients, cover_all=True):
    assert isinstance(parts, list) and len(parts) == num_clients
    for part in parts:
        assert isinstance(part, np.ndarray) and part.dtype == np.int64 and part.ndim == 1
        assert np.all(np.diff(part) > 0), "indices must be sorted and unique"
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "an index went to two clients"
    assert np.all((joined >= 0) & (joined < n))
    if cover_all:
        assert len(joined) == n


def mean_label_entropy(labels, parts):
    return describe_partition(labels, parts)["label_entropy"].mean()


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------
# IID
# --------------------------------------------------------------------------------------------


def test_iid_is_balanced_disjoint_and_seeded():
    parts = partition_iid(LABELS, 7, seed=0)
    assert_valid_partition(parts, len(LABELS), 7)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert same(parts, partition_iid(len(LABELS), 7, seed=0))  # count or labels: same result
    assert not same(parts, partition_iid(LABELS, 7, seed=1))
    # every client sees (nearly) all classes
    assert describe_partition(LABELS, parts)["label_entropy"].min() > 3.0


# --------------------------------------------------------------------------------------------
# Dirichlet label skew
# --------------------------------------------------------------------------------------------


def test_dirichlet_covers_everything_disjointly_and_is_seeded():
    parts = partition_dirichlet(LABELS, 10, alpha=0.5, seed=3, min_size=20)
    assert_valid_partition(parts, len(LABELS), 10)
    assert min(map(len, parts)) >= 20
    assert same(parts, partition_dirichlet(LABELS, 10, alpha=0.5, seed=3, min_size=20))
    assert not same(parts, partition_dirichlet(LABELS, 10, alpha=0.5, seed=4, min_size=20))


def test_smaller_alpha_gives_more_label_skew():
    entropies = {
        alpha: np.mean([mean_label_entropy(LABELS, partition_dirichlet(LABELS, 10, alpha, seed)) for seed in range(3)])
        for alpha in (0.05, 0.5, 5.0, 100.0)
    }
    assert entropies[0.05] < entropies[0.5] < entropies[5.0] < entropies[100.0]
    assert entropies[0.05] < 1.5 and entropies[100.0] > 3.2  # log2(10) = 3.32 is IID


def test_dirichlet_assigns_random_samples_not_dataset_order():
    """Within a class, which samples a client gets must not follow the dataset order."""
    parts = partition_dirichlet(LABELS, 4, alpha=100.0, seed=0)
    for part in parts:
        class0 = part[LABELS[part] == 0]
        assert len(class0) > 10
        assert not np.array_equal(class0, np.arange(class0[0], class0[0] + len(class0)))  # no block


def test_dirichlet_uses_flower_when_it_can(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fallback used although flwr-datasets can do this one")

    monkeypatch.setattr(partition_module, "_dirichlet_with_repair", fail)
    assert_valid_partition(partition_dirichlet(LABELS, 10, 1.0, seed=0, min_size=10), len(LABELS), 10)


def test_dirichlet_fallback_meets_min_size_where_flower_gives_up():
    # 30 samples, 10 clients, tiny alpha: flwr-datasets resamples 11 times and raises.
    labels = np.arange(30) % 3
    parts = partition_dirichlet(labels, 10, alpha=0.01, seed=0, min_size=3)
    assert_valid_partition(parts, 30, 10)
    assert all(len(part) == 3 for part in parts)
    assert same(parts, partition_dirichlet(labels, 10, alpha=0.01, seed=0, min_size=3))


def test_dirichlet_fallback_is_valid_on_its_own(monkeypatch):
    def flower_gives_up(*args, **kwargs):
        raise ValueError("The max number of attempts (10) was reached.")

    monkeypatch.setattr(partition_module, "_flwr_dirichlet", flower_gives_up)
    parts = partition_dirichlet(LABELS, 20, alpha=0.1, seed=5, min_size=30)
    assert_valid_partition(parts, len(LABELS), 20)
    assert min(map(len, parts)) >= 30
    assert mean_label_entropy(LABELS, parts) < mean_label_entropy(LABELS, partition_iid(LABELS, 20, 5))


# --------------------------------------------------------------------------------------------
# Quantity skew
# --------------------------------------------------------------------------------------------


def test_quantity_skew_sizes_follow_alpha():
    def size_spread(alpha):
        return np.mean([np.std(list(map(len, partition_quantity_skew(2000, 10, alpha, seed)))) for seed in range(5)])

    parts = partition_quantity_skew(2000, 10, 0.3, seed=0, min_size=15)
    assert_valid_partition(parts, 2000, 10)
    assert min(map(len, parts)) >= 15
    assert same(parts, partition_quantity_skew(2000, 10, 0.3, seed=0, min_size=15))
    assert not same(parts, partition_quantity_skew(2000, 10, 0.3, seed=1, min_size=15))
    assert size_spread(0.1) > size_spread(1.0) > size_spread(100.0)


def test_quantity_skew_keeps_labels_iid():
    parts = partition_quantity_skew(LABELS, 5, alpha=100.0, seed=0)
    assert describe_partition(LABELS, parts)["label_entropy"].min() > 3.2


# --------------------------------------------------------------------------------------------
# Per-task (FL-TAC) partition
# --------------------------------------------------------------------------------------------


def test_per_task_partition_respects_min_share_and_covers_each_task():
    sizes = {"ng20": 5000, "sms_spam": 800, "digits": 300, "empty": 0}
    min_share = 0.05
    result = partition_per_task(sizes, 8, alpha=0.3, seed=0, min_share=min_share)
    assert list(result) == list(sizes)
    held = np.zeros((8, len(sizes)), dtype=int)
    for column, (task, size) in enumerate(sizes.items()):
        assert_valid_partition(result[task], size, 8)
        counts = np.array([len(part) for part in result[task]])
        held[:, column] = counts
        nonzero = counts[counts > 0]
        assert np.all(nonzero >= np.floor(min_share * size)), (task, counts)
    assert np.all(held[:, -1] == 0)
    # FL-TAC: clients hold several tasks, in different amounts, and some hold none of a task
    assert (held[:, :3] > 0).sum(axis=1).max() >= 2
    assert (held[:, :3] == 0).any()
    again = partition_per_task(sizes, 8, alpha=0.3, seed=0, min_share=min_share)
    assert all(same(result[t], again[t]) for t in sizes)
    other = partition_per_task(sizes, 8, alpha=0.3, seed=1, min_share=min_share)
    assert not all(same(result[t], other[t]) for t in sizes)


def test_per_task_accepts_a_list_and_zero_min_share():
    result = partition_per_task([100, 50], 4, alpha=1.0, seed=2, min_share=0.0)
    assert list(result) == [0, 1]
    assert_valid_partition(result[1], 50, 4)


def test_per_task_min_share_zeroes_small_shares():
    # with min_share at its maximum 1/num_clients only clients with >= a fair share remain
    result = partition_per_task({"t": 10000}, 5, alpha=0.5, seed=0, min_share=0.2)
    counts = [len(p) for p in result["t"]]
    assert sum(counts) == 10000 and all(c == 0 or c >= 2000 for c in counts)


# --------------------------------------------------------------------------------------------
# Class-incremental tasks
# --------------------------------------------------------------------------------------------


def test_class_incremental_tasks_split_the_label_space():
    tasks = class_incremental_tasks(LABELS, 3, seed=0)
    assert [t["task_id"] for t in tasks] == [0, 1, 2]
    assert [t["classes"] for t in tasks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for task in tasks:
        assert task["indices"].dtype == np.int64
        assert np.array_equal(task["indices"], np.flatnonzero(np.isin(LABELS, task["classes"])))
    assert sum(len(t["indices"]) for t in tasks) == len(LABELS)


def test_class_incremental_shuffle_is_seeded_and_disjoint():
    shuffled = class_incremental_tasks(LABELS, 5, seed=1, shuffle_classes=True)
    groups = [t["classes"] for t in shuffled]
    assert sorted(c for g in groups for c in g) == list(range(10))
    assert groups == [t["classes"] for t in class_incremental_tasks(LABELS, 5, seed=1, shuffle_classes=True)]
    assert groups != [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert len({i for t in shuffled for i in t["indices"].tolist()}) == len(LABELS)


def test_class_incremental_rejects_more_tasks_than_classes():
    with pytest.raises(ValueError, match="num_tasks.*1..10.*11"):
        class_incremental_tasks(LABELS, 11, seed=0)


# --------------------------------------------------------------------------------------------
# describe / plot
# --------------------------------------------------------------------------------------------


def test_describe_partition_counts_and_entropy():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    parts = [np.array([0, 1]), np.array([2, 4]), np.array([], dtype=np.int64), np.array([3, 5, 6, 7])]
    table = describe_partition(labels, parts, class_names=["cat", "dog", "eel"])
    assert list(table.columns) == ["client", "n_samples", "cat", "dog", "eel", "label_entropy"]
    assert table[["cat", "dog", "eel"]].to_numpy().tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 2]]
    assert table["n_samples"].tolist() == [2, 2, 0, 4]
    assert table["label_entropy"].tolist() == pytest.approx([0.0, 1.0, 0.0, 1.5])
    assert list(describe_partition(labels, parts).columns[2:5]) == ["0", "1", "2"]


def test_describe_partition_matches_a_real_partition():
    parts = partition_dirichlet(LABELS, 6, 0.3, seed=0)
    table = describe_partition(LABELS, parts)
    for client, part in enumerate(parts):
        assert table.loc[client, "n_samples"] == len(part)
        assert (
            table.loc[client, [str(c) for c in range(10)]].tolist() == np.bincount(LABELS[part], minlength=10).tolist()
        )
    assert table[[str(c) for c in range(10)]].to_numpy().sum() == len(LABELS)


def test_plot_partition_returns_a_figure():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    parts = partition_dirichlet(LABELS, 5, 0.5, seed=0)
    fig = plot_partition(LABELS, parts, class_names=[f"c{i}" for i in range(10)], title="skew")
    assert isinstance(fig, Figure) and fig.axes[0].get_title() == "skew"
    assert len(fig.axes[0].patches) == 5 * 10  # one bar segment per client and class
    plt.close(fig)
    fig, ax = plt.subplots()
    assert plot_partition(LABELS, parts, ax=ax) is fig
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: partition_dirichlet(LABELS, 10, 0.0, seed=0), r"alpha must be .*> 0, got 0\.0"),
        (lambda: partition_dirichlet(LABELS, 10, -1, seed=0), r"alpha .* got -1"),
        (lambda: partition_dirichlet(LABELS, 10, float("nan"), seed=0), r"alpha .* got nan"),
        (lambda: partition_dirichlet(LABELS, 0, 1.0, seed=0), r"num_clients must be an int >= 1, got 0"),
        (lambda: partition_dirichlet(LABELS[:5], 6, 1.0, seed=0), r"num_clients=6 exceeds .* \(5\)"),
        (
            lambda: partition_dirichlet(LABELS, 10, 1.0, seed=0, min_size=300),
            r"min_size=300 .* allowed: min_size <= 200",
        ),
        (lambda: partition_dirichlet(LABELS.reshape(2, -1), 2, 1.0, seed=0), r"labels must be 1-D"),
        (lambda: partition_dirichlet(np.array(["a", "b"]), 2, 1.0, seed=0), r"labels must be integers"),
        (lambda: partition_iid(10, 2, seed=-1), r"seed must be a non-negative int, got -1"),
        (lambda: partition_iid(10, 2, seed=1.5), r"seed .* got 1\.5"),
        (lambda: partition_iid(0, 1, seed=0), r"labels_or_n must be >= 1"),
        (lambda: partition_iid(3, 4, seed=0), r"num_clients=4 exceeds"),
        (lambda: partition_quantity_skew(100, 5, 0, seed=0), r"alpha"),
        (lambda: partition_quantity_skew(100, 5, 1.0, seed=0, min_size=21), r"min_size=21"),
        (
            lambda: partition_per_task({"a": 10}, 4, 1.0, seed=0, min_share=0.3),
            r"min_share must be in \[0, 1/num_clients\] = \[0, 0\.25\], got 0\.3",
        ),
        (lambda: partition_per_task({"a": -1}, 4, 1.0, seed=0), r"task_sizes\['a'\] must be an int >= 0, got -1"),
        (lambda: partition_per_task({}, 4, 1.0, seed=0), r"task_sizes is empty"),
        (lambda: partition_per_task([10], 0, 1.0, seed=0), r"num_clients"),
    ],
)
def test_invalid_arguments_raise_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
