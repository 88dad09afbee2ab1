"""Split a dataset's sample indices among federated clients.

Every partitioner takes the labels (or the number of samples), the number of clients and an
integer ``seed`` (all randomness comes from ``np.random.default_rng(seed)``, never global state)
and returns one sorted int64 index array per client; no index is given to two clients. Invalid
arguments raise ``ValueError`` naming the parameter, its value and what is allowed.

- :func:`partition_iid` — uniform random split, sizes differ by at most one.
- :func:`partition_dirichlet` — label skew: each class is spread over clients with
  Dirichlet(alpha) proportions (small alpha -> each client sees few classes).
- :func:`partition_quantity_skew` — client sizes ~ Dirichlet(alpha), labels IID.
- :func:`partition_per_task` — several tasks; per task, Dirichlet(alpha) client shares with small
  shares zeroed (FL-TAC style: clients hold different tasks in different amounts).
- :func:`class_incremental_tasks` — cut the label space into a sequence of disjoint class groups.

:func:`describe_partition` tabulates what each client holds and :func:`plot_partition` draws it.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "class_incremental_tasks",
    "describe_partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_per_task",
    "partition_quantity_skew",
    "plot_partition",
]


# --------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_seed(seed) -> int:
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_num_clients(num_clients, num_samples: int, what: str = "samples") -> int:
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    if num_clients > num_samples:
        raise ValueError(
            f"num_clients={num_clients} exceeds the number of {what} ({num_samples}); allowed: 1..{num_samples}"
        )
    return int(num_clients)


def _check_alpha(alpha) -> float:
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def _check_min_size(min_size, num_clients: int, num_samples: int) -> int:
    if not _is_int(min_size) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
    if min_size * num_clients > num_samples:
        raise ValueError(
            f"min_size={min_size} with num_clients={num_clients} needs {min_size * num_clients} samples, "
            f"but there are only {num_samples}; allowed: min_size <= {num_samples // num_clients}"
        )
    return int(min_size)


def _as_labels(labels) -> np.ndarray:
    """Labels as a 1-D integer array (any numpy-able sequence of ints)."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError("labels is empty; need at least one sample")
    if not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0):
            return array.astype(np.int64)
        raise ValueError(f"labels must be integers (class ids), got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _num_samples(labels_or_n, name: str = "labels_or_n") -> int:
    """Accept either a sample count or anything with a length (labels)."""
    if _is_int(labels_or_n):
        if labels_or_n < 1:
            raise ValueError(f"{name} must be >= 1 samples, got {labels_or_n}")
        return int(labels_or_n)
    try:
        n = len(labels_or_n)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of labels, got {type(labels_or_n).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} is empty; need at least one sample")
    return n


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _finalize(parts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def _apportion(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing exactly to ``total``, as close as possible to proportions*total.

    Largest-remainder rounding; ties go to the lower index, so the result is deterministic.
    """
    proportions = np.asarray(proportions, dtype=np.float64)
    ideal = proportions / proportions.sum() * total
    counts = np.floor(ideal).astype(np.int64)
    shortfall = total - int(counts.sum())
    if shortfall > 0:
        order = np.argsort(-(ideal - counts), kind="stable")
        counts[order[:shortfall]] += 1
    return counts


def _split_by_counts(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(counts)[:-1])


def _entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


# --------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------


def partition_iid(labels_or_n, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle all samples and deal them out evenly (client sizes differ by at most one).

    ``labels_or_n`` is the number of samples or any sequence with one entry per sample.
    """
    n = _num_samples(labels_or_n)
    num_clients = _check_num_clients(num_clients, n)
    rng = np.random.default_rng(_check_seed(seed))
    return _finalize(np.array_split(rng.permutation(n), num_clients))


def partition_dirichlet(labels, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Dirichlet label skew (Hsu et al. 2019 / Yurochkin et al. 2019).

    For every class, proportions over clients are drawn from Dirichlet(alpha) and that class's
    samples are dealt out accordingly: alpha -> 0 gives each client only a few classes,
    alpha -> inf approaches IID. Every client gets at least ``min_size`` samples; all samples are
    assigned.

    Uses flwr-datasets' ``DirichletPartitioner`` (the reference implementation FL papers use).
    It meets ``min_size`` by resampling and gives up with ValueError after 11 draws, which
    happens for small alpha with many clients or few samples; then a fallback with the same
    sampling scheme repairs the undersized clients by moving single random samples from the
    largest clients, which always terminates (min_size * num_clients <= n is checked first).
    """
    labels = _as_labels(labels)
    num_clients = _check_num_clients(num_clients, len(labels))
    alpha = _check_alpha(alpha)
    min_size = _check_min_size(min_size, num_clients, len(labels))
    rng = np.random.default_rng(_check_seed(seed))
    # flwr deals each class's samples out in dataset order; shuffling first makes *which*
    # samples a client gets random too (datasets are often ordered by source or time).
    order = rng.permutation(len(labels))
    flwr_seed = int(rng.integers(2**31))
    try:
        parts = _flwr_dirichlet(labels[order], num_clients, alpha, flwr_seed, min_size)
    except ValueError:
        parts = _dirichlet_with_repair(labels[order], num_clients, alpha, rng, min_size)
    return _finalize([order[part] for part in parts])


def _flwr_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int) -> list[np.ndarray]:
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,  # plain Dirichlet: balancing distorts the skew alpha asks for
        shuffle=False,  # order does not matter, we sort
        seed=seed,
    )
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    with warnings.catch_warnings():
        # It warns on every resampling round; the fallback handles the hard cases.
        warnings.simplefilter("ignore")
        return [
            np.asarray(partitioner.load_partition(client).with_format("numpy")["row"][:], dtype=np.int64)
            for client in range(num_clients)
        ]


def _dirichlet_with_repair(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int
) -> list[np.ndarray]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        counts = _apportion(rng.dirichlet(np.full(num_clients, alpha)), len(members))
        for client, chunk in enumerate(_split_by_counts(members, counts)):
            parts[client].extend(chunk.tolist())
    for client in range(num_clients):
        while len(parts[client]) < min_size:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))
            taken = parts[donor].pop(int(rng.integers(len(parts[donor]))))
            parts[client].append(taken)
    return [np.asarray(part, dtype=np.int64) for part in parts]


def partition_quantity_skew(n, num_clients: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Quantity skew: client sizes ~ Dirichlet(alpha) over clients, labels IID.

    ``n`` is the number of samples (or a sequence with one entry per sample). Each client first
    gets ``min_size`` samples, the rest is apportioned by the Dirichlet proportions, then a random
    permutation of the samples is cut into those sizes. Small alpha -> very unequal sizes.
    """
    n = _num_samples(n, "n")
    num_clients = _check_num_clients(num_clients, n)
    alpha = _check_alpha(alpha)
    min_size = _check_min_size(min_size, num_clients, n)
    rng = np.random.default_rng(_check_seed(seed))
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    sizes = min_size + _apportion(proportions, n - min_size * num_clients)
    return _finalize(_split_by_counts(rng.permutation(n), sizes))


def partition_per_task(
    task_sizes: Mapping[str, int] | Sequence[int],
    num_clients: int,
    alpha: float,
    seed: int,
    min_share: float = 0.01,
) -> dict:
    """Spread several tasks over clients, FL-TAC style.

    For each task (in the given order), client proportions are drawn from Dirichlet(alpha);
    proportions below ``min_share`` are zeroed and the rest renormalised, then that task's
    samples (indices ``0..size-1`` within the task) are shuffled and cut accordingly. Clients
    thus hold several tasks in different amounts; a client may hold none of a task (an empty
    array). Because the largest of ``num_clients`` proportions is at least ``1/num_clients``,
    ``min_share <= 1/num_clients`` guarantees every task keeps at least one client.

    Returns ``{task: [indices of client 0, ..., indices of client num_clients-1]}``; tasks given
    as a list are keyed 0..T-1.
    """
    sizes = dict(task_sizes) if isinstance(task_sizes, Mapping) else dict(enumerate(task_sizes))
    if not sizes:
        raise ValueError("task_sizes is empty; give at least one task size")
    for task, size in sizes.items():
        if not _is_int(size) or size < 0:
            raise ValueError(f"task_sizes[{task!r}] must be an int >= 0, got {size!r}")
    if not _is_int(num_clients) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    alpha = _check_alpha(alpha)
    if not isinstance(min_share, numbers.Real) or not 0 <= min_share <= 1 / num_clients:
        raise ValueError(f"min_share must be in [0, 1/num_clients] = [0, {1 / num_clients:.4g}], got {min_share!r}")
    rng = np.random.default_rng(_check_seed(seed))
    result = {}
    for task, size in sizes.items():
        shares = rng.dirichlet(np.full(num_clients, alpha))
        largest = int(np.argmax(shares))
        shares[shares < min_share] = 0.0
        shares[largest] = max(shares[largest], 1e-12)  # float fuzz at min_share == 1/num_clients
        counts = _apportion(shares, int(size))
        result[task] = _finalize(_split_by_counts(rng.permutation(int(size)), counts))
    return result


def class_incremental_tasks(labels, num_tasks: int, seed: int, shuffle_classes: bool = False) -> list[dict]:
    """Cut the label space into ``num_tasks`` disjoint groups of classes (continual learning).

    Classes (the distinct label values, ascending) are split into contiguous groups of near-equal
    size, or, with ``shuffle_classes=True``, a seeded permutation of them is. Each returned dict
    has ``task_id``, ``classes`` (sorted label ids) and ``indices`` (sorted int64 sample indices
    whose label is in ``classes``).
    """
    labels = _as_labels(labels)
    classes = np.unique(labels)
    if not _is_int(num_tasks) or not 1 <= num_tasks <= len(classes):
        raise ValueError(f"num_tasks must be an int in 1..{len(classes)} (the number of classes), got {num_tasks!r}")
    rng = np.random.default_rng(_check_seed(seed))
    if shuffle_classes:
        classes = rng.permutation(classes)
    return [
        {
            "task_id": task_id,
            "classes": sorted(int(c) for c in group),
            "indices": np.flatnonzero(np.isin(labels, group)).astype(np.int64),
        }
        for task_id, group in enumerate(np.array_split(classes, num_tasks))
    ]


# --------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------


def _class_axis(labels: np.ndarray, class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """(label ids, column names) for the per-class columns."""
    if class_names is None:
        ids = np.unique(labels)
        return ids, [str(i) for i in ids]
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels range {labels.min()}..{labels.max()} does not fit {len(class_names)} class_names")
    return np.arange(len(class_names)), [str(name) for name in class_names]


def describe_partition(labels, parts: Sequence[np.ndarray], class_names: Sequence[str] | None = None):
    """One row per client: ``client``, ``n_samples``, a count column per class, ``label_entropy``.

    Class columns are named by ``class_names`` (label id i -> class_names[i]) or, without them,
    by the label ids present (as strings). ``label_entropy`` is the Shannon entropy (bits) of
    the client's label distribution: 0 for a single-class client, log2(K) for a uniform one.
    """
    import pandas as pd

    labels = _as_labels(labels)
    ids, columns = _class_axis(labels, class_names)
    position = {int(label): i for i, label in enumerate(ids)}
    rows = []
    for client, part in enumerate(parts):
        part = np.asarray(part, dtype=np.int64)
        counts = np.zeros(len(ids), dtype=np.int64)
        if part.size:
            present, n = np.unique(labels[part], return_counts=True)
            counts[[position[int(label)] for label in present]] = n
        rows.append([client, int(part.size), *counts.tolist(), _entropy_bits(counts)])
    return pd.DataFrame(rows, columns=["client", "n_samples", *columns, "label_entropy"])


def _class_colors(num_classes: int) -> list:
    """Distinct colours for <= 20 classes (tab10/tab20), a continuous colormap beyond."""
    import matplotlib

    if num_classes <= 20:
        palette = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
        return [palette(i) for i in range(num_classes)]
    return [matplotlib.colormaps["viridis"](i / (num_classes - 1)) for i in range(num_classes)]


class _IndexPartitioner:
    """fedbench's per-client index arrays as a flwr-datasets ``Partitioner``, so that Flower's own counting and
    plotting (``flwr_datasets.visualization``) read them. Built lazily: flwr-datasets is imported on use."""

    def __new__(cls, labels, parts, class_names=None):
        from datasets import ClassLabel, Dataset, Features
        from flwr_datasets.partitioner import Partitioner

        class IndexPartitioner(Partitioner):
            def __init__(self):
                super().__init__()
                labels_ = np.asarray(labels, dtype=np.int64)
                names = list(class_names) if class_names is not None else [str(c) for c in range(int(labels_.max()) + 1)]
                self.dataset = Dataset.from_dict({"label": labels_.tolist()},
                                                 features=Features({"label": ClassLabel(names=names)}))
                self._parts = [np.asarray(p, dtype=np.int64) for p in parts]

            @property
            def num_partitions(self) -> int:
                return len(self._parts)

            def load_partition(self, partition_id: int):
                return self.dataset.select(self._parts[partition_id])

        return IndexPartitioner()


def plot_partition(labels, parts: Sequence[np.ndarray], class_names: Sequence[str] | None = None, ax=None, title=None,
                   size_unit: str = "absolute"):
    """Each client's label histogram as stacked horizontal bars, drawn by flwr-datasets'
    ``plot_label_distributions`` (fed our index arrays through a Partitioner). Returns the matplotlib Figure.

    Draws into `ax` if given, else into a new Figure that is not registered with pyplot (no global state);
    the legend sits outside the axes.
    """
    import os

    from matplotlib.figure import Figure
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")      # a benchmark's plot is no telemetry event
    from flwr_datasets.visualization import plot_label_distributions

    table = describe_partition(labels, parts, class_names)
    if ax is None:
        fig = Figure(figsize=(8, min(12.0, 1.5 + 0.3 * len(table))), layout="constrained")
        ax = fig.add_subplot()
    n_classes = len(table.columns) - 3
    fig, ax, _ = plot_label_distributions(
        _IndexPartitioner(labels, parts, class_names), "label", plot_type="bar", size_unit=size_unit,
        partition_id_axis="y", axis=ax, title=title or f"{len(table)} clients, {int(table['n_samples'].sum())} samples",
        legend=n_classes <= 20, legend_title="class", cmap="tab20" if n_classes > 10 else "tab10",
        legend_kwargs={"loc": "center left", "bbox_to_anchor": (1.0, 0.5), "fontsize": "small"})
    ax.invert_yaxis()  # client 0 on top
    return fig
