"""FL-TAC's server step (Ping et al., 2024, arXiv 2404.15384) as small functions.

Each client trains one low-rank adapter per task it holds and sends them all up, unlabelled. The
server flattens every adapter into a vector, clusters the vectors with k-means (k = number of tasks,
or chosen from the vectors alone by the silhouette score), averages the adapters inside each cluster
weighted by sample count (FedAvg) and sends every adapter back the aggregate of its cluster.

Nothing here knows about rounds, models or task labels: the FL-TAC strategy on the shared loop
(:mod:`fedbench.strategies.fl_tac`) calls these functions. Task labels enter
only through the scoring functions :func:`adjusted_rand` and :func:`hungarian_accuracy`, which say how
well the clusters recover the tasks after the fact.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np
import torch

from fedbench.merging.aggregators import fedavg


def flatten_adapters(states: Sequence[dict], keys: Sequence[str] | None = None) -> np.ndarray:
    """One row per adapter: the tensors `keys` (default: every key of the first state, in its order)
    flattened and concatenated, in float64. Every state must have the same keys and shapes."""
    if len(states) == 0:
        raise ValueError("flatten_adapters needs at least one adapter state")
    keys = list(states[0]) if keys is None else list(keys)
    rows = []
    for i, s in enumerate(states):
        missing = [k for k in keys if k not in s]
        if missing:
            raise KeyError(f"adapter {i} lacks {missing[:3]}")
        rows.append(torch.cat([s[k].detach().reshape(-1).double() for k in keys]).numpy())
    shapes = {r.shape for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"adapters flatten to different lengths {sorted(shapes)}: they must share one layout")
    return np.stack(rows)


def server_features(adapters: Sequence[dict], sent: Sequence[dict] | None = None) -> np.ndarray:
    """What the server clusters: the flattened adapters, or with `sent` the flattened updates
    (adapter - the state sent for it at the start of the round)."""
    x = flatten_adapters(adapters)
    if sent is not None:
        if len(sent) != len(adapters):
            raise ValueError(f"sent must hold one state per adapter: {len(sent)} != {len(adapters)}")
        x = x - flatten_adapters(sent, keys=list(adapters[0]))
    return x


def _check_k(k, n: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in 1..{n} (the number of adapters), got {k!r}")
    return int(k)


def kmeans_labels(x: np.ndarray, k: int, seed: int, n_init: int = 10) -> np.ndarray:
    """sklearn ``KMeans(n_clusters=k, n_init=n_init, random_state=seed)`` labels of the rows of `x`
    (the authors' settings: n_init=10, seeded)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    x = np.asarray(x, dtype=np.float64)
    k = _check_k(k, len(x))
    with warnings.catch_warnings():
        # identical adapters (e.g. before any training) give fewer distinct clusters than k: not an error
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=k, n_init=n_init, random_state=int(seed)).fit_predict(x).astype(np.int64)


def choose_k_silhouette(x: np.ndarray, seed: int, k_min: int = 2, k_max: int | None = None,
                        n_init: int = 10) -> tuple[int, dict[int, float]]:
    """k from the adapters alone: the k in [k_min, min(k_max, n-1)] whose k-means clustering has the
    highest mean silhouette score (ties: the smaller k). Returns (k, {k: score}).

    With fewer than 3 adapters no silhouette is defined; then k = 1.
    """
    from sklearn.metrics import silhouette_score
    n = len(x)
    if not isinstance(k_min, int) or k_min < 2:
        raise ValueError(f"k_min must be an int >= 2 (a silhouette needs two clusters), got {k_min!r}")
    if k_max is not None and (not isinstance(k_max, int) or k_max < k_min):
        raise ValueError(f"k_max must be None or an int >= k_min={k_min}, got {k_max!r}")
    hi = n - 1 if k_max is None else min(k_max, n - 1)
    scores: dict[int, float] = {}
    for k in range(k_min, hi + 1):
        labels = kmeans_labels(x, k, seed, n_init)
        if len(np.unique(labels)) < 2:
            continue
        scores[k] = float(silhouette_score(x, labels))
    if not scores:
        return 1, scores
    best = max(scores.values())
    return min(k for k, s in scores.items() if s == best), scores


def groupwise_fedavg(states: Sequence[dict], weights: Sequence[float], groups: Sequence[Hashable]) -> dict:
    """FedAvg inside each group: {group: sum_{i in group} n_i x_i / sum_{i in group} n_i}.

    The aggregates are built with :func:`fedbench.merging.aggregators.fedavg` over the group's members in
    their given order.
    """
    if not (len(states) == len(weights) == len(groups)):
        raise ValueError(f"states, weights and groups must have one entry per adapter, got lengths "
                         f"{len(states)}, {len(weights)}, {len(groups)}")
    members: dict = OrderedDict()
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return {g: fedavg([states[i] for i in idx], [weights[i] for i in idx]) for g, idx in members.items()}


@dataclass
class ServerStep:
    """What the FL-TAC server decided this round."""
    labels: np.ndarray                   # cluster of each adapter, in the order received
    aggregates: dict                     # cluster -> aggregated adapter state
    k: int                               # the number of clusters asked of k-means
    silhouette: dict = field(default_factory=dict)   # k -> score, when k was chosen by silhouette

    def state_for(self, i: int) -> dict:
        """The state sent back for adapter i: the aggregate of its cluster."""
        return self.aggregates[int(self.labels[i])]


def server_step(adapters: Sequence[dict], weights: Sequence[float], k: int | str, seed: int,
                n_init: int = 10, k_max: int | None = None, sent: Sequence[dict] | None = None) -> ServerStep:
    """One FL-TAC aggregation: flatten, k-means (k given, or ``k="auto"``: silhouette), FedAvg per cluster.

    `adapters` are the adapter states as received (no task labels), `weights` their sample counts.
    The paper clusters the adapters themselves. With `sent` (the state the server sent each adapter's
    client at the start of the round) it clusters the round's updates ``adapter - sent`` instead; the
    aggregation is of the adapters either way.
    """
    x = server_features(adapters, sent)
    scores: dict[int, float] = {}
    if k == "auto":
        k, scores = choose_k_silhouette(x, seed, k_max=k_max, n_init=n_init)
    elif isinstance(k, str):
        raise ValueError(f"k must be an int or 'auto', got {k!r}")
    labels = kmeans_labels(x, k, seed, n_init)
    return ServerStep(labels=labels, aggregates=groupwise_fedavg(adapters, weights, labels.tolist()), k=int(k),
                      silhouette=scores)


# -- scoring against the true tasks (never used by the server's decision) -------------------------

def adjusted_rand(true_tasks: Sequence, clusters: Sequence) -> float:
    """Adjusted Rand index (sklearn): 1 = the clusters are the tasks, ~0 = chance agreement."""
    from sklearn.metrics import adjusted_rand_score
    return float(adjusted_rand_score(np.asarray(true_tasks), np.asarray(clusters)))


def hungarian_accuracy(true_tasks: Sequence, clusters: Sequence) -> float:
    """Fraction of adapters whose cluster maps to their task under the best one-to-one matching of
    clusters to tasks (Hungarian algorithm on the contingency table; scipy's linear_sum_assignment).
    With more clusters than tasks (or fewer) the unmatched ones count as wrong."""
    from scipy.optimize import linear_sum_assignment
    true_tasks, clusters = np.asarray(true_tasks), np.asarray(clusters)
    if true_tasks.shape != clusters.shape or true_tasks.ndim != 1 or len(true_tasks) == 0:
        raise ValueError(f"need two non-empty 1-D label arrays of one length, got shapes {true_tasks.shape} "
                         f"and {clusters.shape}")
    _, t = np.unique(true_tasks, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    table = np.zeros((t.max() + 1, c.max() + 1), dtype=np.int64)
    np.add.at(table, (t, c), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(true_tasks))


def first_stable_round(rounds: Sequence[int], values: Sequence[float], threshold: float = 1.0) -> int | None:
    """The first round from which `values` stay >= threshold through the last round (None if never)."""
    rounds, values = np.asarray(rounds), np.asarray(values, dtype=np.float64)
    order = np.argsort(rounds, kind="stable")
    rounds, values = rounds[order], values[order]
    ok = values >= threshold - 1e-12
    if len(ok) == 0 or not ok[-1]:
        return None
    i = len(ok) - 1
    while i > 0 and ok[i - 1]:
        i -= 1
    return int(rounds[i])


EMBEDDINGS = ("auto", "umap", "pca")


def embedding_method(requested: str = "auto") -> str:
    """The 2-D embedding the adapter-evolution figure uses: ``"umap"`` (umap-learn, the paper's figure) or
    ``"pca"``; ``"auto"`` is UMAP when ``umap-learn`` is importable, PCA otherwise."""
    if requested not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {list(EMBEDDINGS)}, got {requested!r}")
    if requested != "auto":
        return requested
    try:
        import umap  # noqa: F401
    except ImportError:
        return "pca"
    return "umap"


UMAP_MIN_POINTS = 5        # below this UMAP's neighbour graph is degenerate: PCA instead (recorded)


def embed_2d(x: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """(n, 2) coordinates of the rows of `x` and the method actually used. ``"umap"``: umap-learn with
    ``random_state=seed`` (deterministic; umap then runs single-threaded), ``n_neighbors = min(15, n - 1)``;
    fewer than :data:`UMAP_MIN_POINTS` rows fall back to PCA. ``"pca"``: sklearn PCA (2 components)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        return np.zeros((n, 2)), "pca"
    if method == "umap" and n >= UMAP_MIN_POINTS:
        import umap
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # "n_jobs overridden by random_state", tiny-graph notes
            z = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=int(seed) % 2**32,
                          transform_seed=int(seed) % 2**32).fit_transform(x)
        return np.asarray(z, dtype=np.float64), "umap"
    if method not in ("umap", "pca"):
        raise ValueError(f"method must be 'umap' or 'pca', got {method!r}")
    from sklearn.decomposition import PCA
    z = PCA(n_components=min(2, n, x.shape[1]), random_state=0).fit_transform(x)
    if z.shape[1] < 2:
        z = np.pad(z, ((0, 0), (0, 2 - z.shape[1])))
    return z, "pca"
