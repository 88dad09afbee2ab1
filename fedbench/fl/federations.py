"""Federations beyond one task cut into clients: what a run's data is, built from its config alone.

``data.federation`` names a builder in :data:`fedbench.registry.FEDERATIONS` and ``data.federation_options`` are
its typed options (:mod:`fedbench.options`), so a run of any paper is its config: ``fedbench run RUN.yaml``,
the experiments and Flower's workers all build the same data with :func:`fedbench.fl.data.build_data`.

- ``single`` (:func:`fedbench.fl.data.prepare_data`): ``data.task`` subsampled and partitioned.
- ``multitask`` (FL-TAC): several binary tasks, each split over the clients (:class:`MultiTaskData`), a
  validation carve of each task's training rows, one scoring owner per test (validation) row, one shared head
  or one head per task.
- ``task_clients`` (task arithmetic): one client per task over a joint split, with validation and probe carves
  (:class:`TaskClientsData`).
- ``task_sequence`` (LoRM, class-incremental): ``data.task``'s classes cut into a seeded sequence of tasks, each
  split over the clients (Dirichlet), trained ``rounds_per_task`` rounds each (:class:`TaskSequenceData`).

A pool (every task's seeded subsample, tokenized) depends on the options and the backbone, not on the run's seed:
it is built once per process and shared by every run over it, with its frozen-prefix activations
(:func:`pool_caches`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from fedbench.errors import ConfigError
from fedbench.fl.data import FederatedData
from fedbench.fl.seeding import derive_seed, rng_for
from fedbench.options import Options, check_bool, check_int, check_number
from fedbench.registry import FEDERATIONS

# binary offline text tasks; a derived task is a relabelled subset of its source
DERIVED = {"tweet_polarity": ("tweet_sentiment", {0: 0, 2: 1})}     # name -> (source task, {source label: label})
BINARY = ("rt_sentiment", "subjectivity", "sms_spam", "tweet_polarity")


@dataclass
class MultiTaskData(FederatedData):
    """Several tasks in one train and one test split (one shared label space: every task binary here).

    ``client_indices`` (the loop's field) holds every client's rows over all tasks; ``task_clients[t][c]``
    the rows of task t at client c; ``task_test[t]`` / ``task_val[t]`` the test / validation rows of task t
    (validation rows come from the training split and are never trained on); ``test_owner[t]`` /
    ``val_owner[t]`` the client whose adapter scores each of those rows (the server's clustering options are
    the strategy's: ``fl.options``, :class:`ClusterOptions`). ``head_rows[t]`` = (start, stop) of task
    t's classifier rows when every task has its own head; empty: one head shared by every task."""
    tasks: list = field(default_factory=list)
    task_clients: list = field(default_factory=list)
    task_test: list = field(default_factory=list)
    task_val: list = field(default_factory=list)
    test_owner: list = field(default_factory=list)
    val_owner: list = field(default_factory=list)
    head_rows: list = field(default_factory=list)


def draw_owners(rows_per_task: list, task_clients: list, seed: int, stream: int) -> list:
    """For each task, one client per row, drawn with probability proportional to the client's samples of it."""
    out = []
    for t, rows in enumerate(rows_per_task):
        counts = np.array([len(p) for p in task_clients[t]], dtype=float)
        rng = rng_for(seed, "subsample", 10**6 + t, stream)
        out.append(rng.choice(len(counts), size=len(rows), p=counts / counts.sum()).astype(np.int64)
                   if len(rows) else np.zeros(0, dtype=np.int64))
    return out


def as_multitask(data: FederatedData, seed: int) -> MultiTaskData:
    """A plain one-task FederatedData viewed as a federation of one task (every strategy runs on any data)."""
    if isinstance(data, MultiTaskData):
        return data
    tc = [[np.asarray(ix) for ix in data.client_indices]]
    test = [np.asarray(data.test_indices)]
    return MultiTaskData(train=data.train, test=data.test, client_indices=data.client_indices,
                         test_indices=data.test_indices, class_names=data.class_names, pad_id=data.pad_id,
                         tasks=["task"], task_clients=tc, task_test=test, task_val=[],
                         test_owner=draw_owners(test, tc, seed, 1), val_owner=[])


@dataclass
class Pool:
    train: object
    test: object
    task_train: list        # [task] -> rows of train (the clients' share)
    task_val: list          # [task] -> rows of train (validation)
    task_test: list         # [task] -> rows of test
    pad_id: int
    caches: tuple = None
    classes: list = None    # [task] -> its number of classes
    heads: tuple = None     # (train, test) with one head per task: labels offset, class masks (head_splits)


def num_classes(name: str, ds) -> int:
    if name in DERIVED:
        return len(set(DERIVED[name][1].values()))
    return int(ds["train"].features["label"].num_classes)


def head_splits(pool: Pool) -> tuple:
    """(train, test) for the task-head arm: task t's labels shifted to its own rows of one classifier
    (``head_rows``) and a class mask keeping each example on them: one head per task, each with its own label
    count. The token ids are the pool's (its activation caches serve both arms)."""
    import torch
    from fedbench.models.inputs import TokenizedSplit
    if pool.heads is None:
        rows = head_rows(pool.classes)
        out = []
        for split, per_task in ((pool.train, [np.concatenate([a, b]) for a, b in zip(pool.task_train, pool.task_val)]),
                                (pool.test, pool.task_test)):
            labels, mask = split.labels.clone(), torch.zeros((len(split), rows[-1][1]), dtype=torch.bool)
            for t, ix in enumerate(per_task):
                ix = torch.as_tensor(np.asarray(ix, dtype=np.int64))
                labels[ix] += rows[t][0]
                mask[ix, rows[t][0]:rows[t][1]] = True
            out.append(TokenizedSplit(split.input_ids, labels, class_mask=mask))
        pool.heads = tuple(out)
    return pool.heads


def head_rows(classes: list) -> list:
    """(start, stop) of each task's rows in the one classifier of the task-head arm."""
    ends = np.cumsum([0, *classes]).tolist()
    return [(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]


def load_binary(name: str):
    """A binary task as a DatasetDict (a derived one built from its source)."""
    from fedbench.data import load_task
    if name not in DERIVED:
        return load_task(name)
    src, relabel = DERIVED[name]
    ds = load_task(src)
    out = {}
    for split in ("train", "test"):
        lab = ds[split].with_format("numpy")["label"][:]
        keep = np.flatnonzero(np.isin(lab, list(relabel))).tolist()
        part = ds[split].select(keep)
        out[split] = part.map(lambda b: {"label": [relabel[int(x)] for x in b["label"]]}, batched=True,
                              features=None, load_from_cache_file=False, keep_in_memory=True)
    return out


def pick(n: int, k: int, rng) -> np.ndarray:
    return np.arange(n) if k >= n else np.sort(rng.choice(n, size=k, replace=False))


def prepare_pool(o: "MultiTaskOptions", backbone: str, max_length: int) -> Pool:
    """Every task's subsample (seeded by ``data_seed``: the same for every seed of a run), tokenized once."""
    import torch
    from fedbench.models import load_tokenizer
    from fedbench.models.inputs import TokenizedSplit, tokenize_split
    tok = load_tokenizer(backbone)
    trains, tests, tt, tv, te, classes = [], [], [], [], [], []
    n_tr = n_te = 0
    for t, name in enumerate(o.tasks):
        ds = load_binary(name)
        classes.append(num_classes(name, ds))
        n = len(ds["train"])
        rows = pick(n, o.max_train_per_task + o.val_per_task, rng_for(o.data_seed, "subsample", t, 0))
        val = np.zeros(len(rows), dtype=bool)
        val[rng_for(o.data_seed, "subsample", t, 2).choice(len(rows), size=min(o.val_per_task, len(rows) - 1),
                                                             replace=False)] = True
        test_rows = pick(len(ds["test"]), o.max_test_per_task, rng_for(o.data_seed, "subsample", t, 1))
        trains.append(tokenize_split(ds["train"].select(rows.tolist()), tok, max_length,
                                     cache_key=f"fl_tac:{name}:train:{o.data_seed}:{len(rows)}"))
        tests.append(tokenize_split(ds["test"].select(test_rows.tolist()), tok, max_length,
                                    cache_key=f"fl_tac:{name}:test:{o.data_seed}:{len(test_rows)}"))
        tt.append(n_tr + np.flatnonzero(~val))
        tv.append(n_tr + np.flatnonzero(val))
        te.append(n_te + np.arange(len(test_rows)))
        n_tr, n_te = n_tr + len(rows), n_te + len(test_rows)

    def joint(parts):
        return TokenizedSplit([x for p in parts for x in p.input_ids], torch.cat([p.labels for p in parts]))
    return Pool(joint(trains), joint(tests), tt, tv, te, tok.pad_token_id or 0, classes=classes)


def multitask_data(cfg, o: "MultiTaskOptions", pool: Pool) -> MultiTaskData:
    """The federation of ``cfg.seed`` on `pool`: each task split over ``data.num_clients`` clients (Dirichlet
    ``data.alpha`` per task, at least ``min_share``), the scoring owners drawn per seed. ``heads``: the task-head
    arm (one head per task); ``validation``: score the validation split at the end."""
    from fedbench.data import partition_per_task
    seed, heads, validate = cfg.seed, o.heads, o.validation
    K = cfg.data.num_clients
    parts = partition_per_task([len(r) for r in pool.task_train], K, cfg.data.alpha,
                               seed=derive_seed(seed, "partition"), min_share=o.min_share)
    task_clients = [[pool.task_train[t][p] for p in parts[t]] for t in range(len(o.tasks))]
    clients = [np.sort(np.concatenate([tc[c] for tc in task_clients])) for c in range(K)]
    train, test, names, rows = pool.train, pool.test, [str(c) for c in range(max(pool.classes))], []
    if heads:
        (train, test), rows = head_splits(pool), head_rows(pool.classes)
        names = [f"{name}:{c}" for name, n in zip(o.tasks, pool.classes) for c in range(n)]
    val_owner = draw_owners(pool.task_val, task_clients, seed, 2)
    return MultiTaskData(
        train=train, test=test, client_indices=clients, test_indices=np.concatenate(pool.task_test),
        class_names=names, pad_id=pool.pad_id, tasks=list(o.tasks), task_clients=task_clients,
        task_test=pool.task_test, task_val=pool.task_val if validate else [],
        test_owner=draw_owners(pool.task_test, task_clients, seed, 1), val_owner=val_owner if validate else [],
        head_rows=rows, prefill=True)


# -- the multitask federation ----------------------------------------------------------------------------------

def binary_tasks() -> list[str]:
    """Binary text tasks: offline ones, derived ones and the hub's (GLUE: FL-TAC's paper profile)."""
    from fedbench.data import list_tasks
    return sorted([t.name for t in list_tasks() if t.modality == "text" and t.num_classes == 2] + list(DERIVED))


@dataclass(frozen=True)
class MultiTaskOptions(Options):
    """FL-TAC's federation: ``tasks`` (>= 2 distinct binary text tasks, offline or GLUE's), each subsampled to
    ``max_train_per_task`` training + ``val_per_task`` validation rows and ``max_test_per_task`` test rows
    (seeded by ``data_seed``), split over the clients with each client's share of a task at least ``min_share``;
    ``heads``: one classifier head per task (the task-head arm) instead of one shared; ``validation``: also score
    the validation rows at the end (the runs that choose a learning rate)."""
    tasks: tuple = BINARY
    data_seed: int = 0
    max_train_per_task: int = 600
    val_per_task: int = 200
    max_test_per_task: int = 1000
    min_share: float = 0.01
    heads: bool = False
    validation: bool = True

    def validate(self, prefix):
        ok = binary_tasks()
        if (not isinstance(self.tasks, tuple) or len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks)
                or not all(t in ok for t in self.tasks)):
            raise ConfigError(f"{prefix}.tasks", self.tasks, f"at least 2 distinct binary text tasks from {ok}")
        for key, low in (("data_seed", 0), ("max_train_per_task", 2), ("val_per_task", 2), ("max_test_per_task", 1)):
            check_int(f"{prefix}.{key}", getattr(self, key), low)
        check_number(f"{prefix}.min_share", self.min_share, 0, 1, high_open=True)
        check_bool(f"{prefix}.heads", self.heads)
        check_bool(f"{prefix}.validation", self.validation)

    def pool_key(self) -> tuple:
        return (self.tasks, self.data_seed, self.max_train_per_task, self.val_per_task, self.max_test_per_task)


def check_multitask(cfg) -> None:
    o = cfg.data.federation_options
    if o["min_share"] > 1 / cfg.data.num_clients:
        raise ConfigError("data.federation_options.min_share", o["min_share"],
                          f"a number in [0, 1/num_clients] = [0, {1 / cfg.data.num_clients:.4g}]")


_POOLS: dict = {}


def cached_pool(key: tuple, build):
    """The pool keyed `key`, built by `build()` the first time (once per process). One pool at a time: a process
    runs one experiment's federation."""
    if key not in _POOLS:
        _POOLS.clear()
        _POOLS[key] = build()
    return _POOLS[key]


def multitask_pool(o: MultiTaskOptions, backbone: str, max_length: int) -> Pool:
    """The pool of `o` (built once per process)."""
    return cached_pool(("multitask", o.pool_key(), backbone, max_length),
                       lambda: prepare_pool(o, backbone, max_length))


def pool_caches(pool, model_cfg, depth: int | None) -> tuple:
    """The pool's (train, test) frozen-prefix activations at the prefix of a model training its top `depth`
    layers, every example computed up front in one fixed order (reruns bit-identical); built once per pool."""
    from fedbench.config import PeftConfig
    from fedbench.models import build_model
    from fedbench.models.inputs import ActivationCache
    if pool.caches is None:
        caches = (ActivationCache(pool.train, pool.pad_id), ActivationCache(pool.test, pool.pad_id))
        model = build_model(model_cfg, PeftConfig(method="head"), 2, seed=0)
        for cache in caches:
            cache.fill_depths(model, np.arange(len(cache.split)), [model.num_layers - (depth or model.num_layers)])
        pool.caches = caches
    return pool.caches


@FEDERATIONS.register("multitask", options=MultiTaskOptions, check=check_multitask)
def build_multitask(cfg, o: MultiTaskOptions) -> MultiTaskData:
    """FL-TAC's federation of ``cfg`` (module docstring)."""
    return multitask_data(cfg, o, multitask_pool(o, cfg.model.backbone, cfg.data.max_length))


# -- the task_sequence federation (class-incremental) ------------------------------------------------------------

@dataclass
class TaskSchedule:
    rounds_per_task: int
    num_tasks: int

    def task_of(self, round_idx: int) -> int:
        return (int(round_idx) - 1) // self.rounds_per_task

    def round_in_task(self, round_idx: int) -> int:
        return (int(round_idx) - 1) % self.rounds_per_task


@dataclass
class TaskSequenceData(FederatedData):
    """A class-incremental task sequence on one train and one test split (the loop's ``FederatedData``).

    ``train.class_mask`` restricts each training example to its own task's classes. ``client_indices`` (the
    loop's field) holds every client's rows over all tasks; the task's rows are ``task_clients[t][c]``."""
    schedule: TaskSchedule = None
    class_groups: list = field(default_factory=list)          # [task] -> class ids
    task_clients: list = field(default_factory=list)          # [task][client] -> rows of train
    task_test: list = field(default_factory=list)             # [task] -> rows of test
    task_val: list = field(default_factory=list)              # [task] -> rows of train (validation, never trained)
    task_heldout: list = field(default_factory=list)          # [task][client] -> rows of train (merge check)

    def seen_mask(self, t: int) -> torch.Tensor:
        mask = torch.zeros(self.num_labels, dtype=torch.bool)
        mask[[c for g in self.class_groups[:t + 1] for c in g]] = True
        return mask

    def seen_view(self, split, t: int):
        """`split` (token ids or images) scored over the classes of tasks 0..t (the task id is never given)."""
        return dataclasses.replace(split, class_mask=self.seen_mask(t).expand(len(split), -1))


@dataclass
class SequencePool:
    """The fixed subsample (``data_seed``), tokenized once: every seed's task sequence is a view of it."""
    train: object
    test: object
    train_class: np.ndarray        # label of each train row
    val: np.ndarray                # bool per train row: carved out for validation
    test_class: np.ndarray
    class_names: list
    pad_id: int
    caches: tuple = None           # (train, test) ActivationCaches shared by every run


def pick_rows(rows: np.ndarray, k: int, rng) -> np.ndarray:
    return np.sort(rows) if k >= len(rows) else np.sort(rng.choice(rows, size=k, replace=False))


def prepare_sequence_pool(o: "TaskSequenceOptions", task: str, backbone: str, max_length: int) -> SequencePool:
    """Each class's seeded subsample of `task` (``data_seed``: the same for every seed) with its validation carve,
    tokenized once."""
    from fedbench.data import load_task
    from fedbench.models import load_tokenizer
    from fedbench.models.inputs import tokenize_split
    ds = load_task(task)
    tr = ds["train"].with_format("numpy")["label"][:]
    te = ds["test"].with_format("numpy")["label"][:]
    names = list(ds["train"].features["label"].names)
    train_rows, test_rows, val = [], [], []
    for c in range(len(names)):
        rows = pick_rows(np.flatnonzero(tr == c), o.max_train_per_class, rng_for(o.data_seed, "subsample", c, 0))
        n_val = max(1, int(round(o.val_fraction * len(rows))))
        v = np.zeros(len(rows), dtype=bool)
        v[rng_for(o.data_seed, "subsample", c, 2).choice(len(rows), size=n_val, replace=False)] = True
        train_rows.append(rows)
        val.append(v)
        test_rows.append(pick_rows(np.flatnonzero(te == c), o.max_test_per_class, rng_for(o.data_seed, "subsample", c, 1)))
    train_rows, test_rows = np.concatenate(train_rows), np.concatenate(test_rows)
    if "image" in ds["train"].column_names:      # an image task (CIFAR-100 on a ViT): uint8 images, no tokens
        from fedbench.models.backbone import pretrained_config
        from fedbench.models.inputs import image_split
        from fedbench.models.vision import image_normalization
        config, (mean, std) = pretrained_config(backbone), image_normalization(backbone)
        encode, pad_id = (lambda split: image_split(split, config.image_size, config.num_channels, mean, std)), 0
    else:
        tok = load_tokenizer(backbone)
        encode, pad_id = (lambda split: tokenize_split(split, tok, max_length)), tok.pad_token_id or 0
    train = encode(ds["train"].select(train_rows.tolist()))
    test = encode(ds["test"].select(test_rows.tolist()))
    return SequencePool(train, test, tr[train_rows], np.concatenate(val), te[test_rows], names, pad_id)


def sequence_pool_caches(pool: SequencePool, model_cfg, top_depths) -> tuple:
    """Frozen-prefix activations of every example at each depth, computed up front in one fixed order, so a
    cached value never depends on which run touched it first (reruns are bit-identical); every depth in one
    pass (:meth:`~fedbench.models.inputs.ActivationCache.fill_depths`)."""
    from fedbench.models import build_model
    from fedbench.models.inputs import ActivationCache
    from fedbench.config import PeftConfig
    caches = (ActivationCache(pool.train, pool.pad_id), ActivationCache(pool.test, pool.pad_id))
    model = build_model(model_cfg, PeftConfig(method="head"), len(pool.class_names), seed=0)
    for cache in caches:
        cache.fill_depths(model, np.arange(len(cache.split)), [model.num_layers - d for d in top_depths])
    pool.caches = caches
    return caches


def sequence_data(cfg, o: "TaskSequenceOptions", pool: SequencePool) -> TaskSequenceData:
    """The seed's task sequence: class order, per-task Dirichlet partition, held-out inputs per client."""
    from fedbench.data import partition_dirichlet
    n_labels = len(pool.class_names)
    order = rng_for(cfg.seed, "partition", 10**6).permutation(n_labels)      # the task order, per seed
    groups = [sorted(int(c) for c in g) for g in np.array_split(order, o.num_tasks)]
    own = torch.zeros((len(pool.train), n_labels), dtype=torch.bool)
    K = cfg.data.num_clients
    task_clients, task_test, task_val, task_held = [], [], [], []
    for t, classes in enumerate(groups):
        in_task = np.isin(pool.train_class, classes)
        own[torch.as_tensor(np.flatnonzero(in_task))[:, None], torch.as_tensor(classes)[None, :]] = True
        rows = np.flatnonzero(in_task & ~pool.val)
        parts = partition_dirichlet(pool.train_class[rows], K, cfg.data.alpha,
                                    seed=derive_seed(cfg.seed, "partition", t), min_size=2)
        task_clients.append([rows[p] for p in parts])
        vrows = np.flatnonzero(in_task & pool.val)
        task_val.append(vrows)
        # held-out inputs of client i: validation rows, each given to a client drawn with the clients' shares
        # of its class in training (so each client's held-out inputs follow its own class mix)
        counts = np.array([[np.sum(pool.train_class[rows[p]] == c) for c in classes] for p in parts], dtype=float)
        rng = rng_for(cfg.seed, "subsample", t, 3)
        owner = np.array([rng.choice(K, p=counts[:, classes.index(int(pool.train_class[r]))] /
                                     counts[:, classes.index(int(pool.train_class[r]))].sum()) for r in vrows])
        task_held.append([vrows[owner == i] for i in range(K)])
        task_test.append(np.flatnonzero(np.isin(pool.test_class, classes)))
    # the pool's split (token ids or images) with each example's own task's classes
    train = dataclasses.replace(pool.train, class_mask=own)
    clients = [np.sort(np.concatenate([tc[i] for tc in task_clients])) for i in range(K)]
    return TaskSequenceData(train=train, test=pool.test, client_indices=clients,
                            test_indices=np.concatenate(task_test), class_names=pool.class_names, pad_id=pool.pad_id,
                            schedule=TaskSchedule(o.rounds_per_task, o.num_tasks), class_groups=groups,
                            task_clients=task_clients, task_test=task_test, task_val=task_val, task_heldout=task_held,
                            prefill=True)


@dataclass(frozen=True)
class TaskSequenceOptions(Options):
    """LoRM's class-incremental federation of ``data.task``: each class subsampled to ``max_train_per_class``
    training rows (a ``val_fraction`` of them carved out for validation, never trained on) and
    ``max_test_per_class`` test rows (seeded by ``data_seed``); the classes cut into ``num_tasks`` tasks in a
    seeded order per run seed, each trained ``rounds_per_task`` rounds (``fl.rounds`` = their product)."""
    data_seed: int = 0
    num_tasks: int = 5
    max_train_per_class: int = 80
    max_test_per_class: int = 25
    val_fraction: float = 0.2
    rounds_per_task: int = 3

    def validate(self, prefix):
        for key, low in (("data_seed", 0), ("num_tasks", 2), ("max_train_per_class", 4), ("max_test_per_class", 1),
                         ("rounds_per_task", 1)):
            check_int(f"{prefix}.{key}", getattr(self, key), low)
        check_number(f"{prefix}.val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)

    def pool_key(self) -> tuple:
        return (self.data_seed, self.max_train_per_class, self.max_test_per_class, self.val_fraction)


def check_task_sequence(cfg) -> None:
    o = cfg.data.federation_options
    info = sequence_tasks()
    if cfg.data.task not in info:
        raise ConfigError("data.task", cfg.data.task, f"a task with >= 4 classes with "
                                                       f"data.federation='task_sequence': {sorted(info)}")
    if o["num_tasks"] > info[cfg.data.task].num_classes:
        raise ConfigError("data.federation_options.num_tasks", o["num_tasks"],
                          f"at most the {info[cfg.data.task].num_classes} classes of {cfg.data.task!r}")
    if o["num_tasks"] * o["rounds_per_task"] != cfg.fl.rounds:
        raise ConfigError("fl.rounds", cfg.fl.rounds, f"num_tasks x rounds_per_task = "
                                                      f"{o['num_tasks'] * o['rounds_per_task']} (data.federation_options)")


def sequence_tasks() -> dict:
    """{name: TaskInfo} of the tasks a class-incremental sequence can cut (>= 4 classes): the offline text tasks
    and the hub's, images too (CIFAR-100 on a ViT: LoRM's paper profile; no vision backbone ships offline, so the
    offline image tasks stay out); check_against_backbone matches the modality to the backbone."""
    from fedbench.data import list_tasks
    return {t.name: t for t in list_tasks() if t.num_classes >= 4 and (t.modality == "text" or not t.offline)}


def sequence_pool(o: TaskSequenceOptions, task: str, backbone: str, max_length: int) -> SequencePool:
    """The pool of `o` over `task` (built once per process)."""
    return cached_pool(("sequence", o.pool_key(), task, backbone, max_length),
                       lambda: prepare_sequence_pool(o, task, backbone, max_length))


@FEDERATIONS.register("task_sequence", options=TaskSequenceOptions, check=check_task_sequence)
def build_task_sequence(cfg, o: TaskSequenceOptions) -> TaskSequenceData:
    """LoRM's class-incremental federation of ``cfg`` (module docstring)."""
    return sequence_data(cfg, o, sequence_pool(o, cfg.data.task, cfg.model.backbone, cfg.data.max_length))


# -- the task_clients federation (task arithmetic) -----------------------------------------------------------------

@dataclass(frozen=True)
class TaskClientsDataOptions(Options):
    """Task arithmetic's federation: one client per task of ``tasks`` (``data.num_clients`` = their number), each
    task's training subsample cut into ``val_samples`` validation rows, ``probe_samples`` rows for the frozen
    head's probe and the fine-tuning rest."""
    tasks: tuple = ("rt_sentiment", "sms_spam")
    val_samples: int = 200
    probe_samples: int = 200

    def validate(self, prefix):
        from fedbench.data import OFFLINE_TASKS
        if (not isinstance(self.tasks, tuple) or len(self.tasks) < 1 or len(set(self.tasks)) != len(self.tasks)
                or not all(t in OFFLINE_TASKS for t in self.tasks)):
            raise ConfigError(f"{prefix}.tasks", self.tasks, f"distinct offline tasks from {sorted(OFFLINE_TASKS)}")
        check_int(f"{prefix}.val_samples", self.val_samples, 1)
        check_int(f"{prefix}.probe_samples", self.probe_samples, 2)


def check_task_clients_data(cfg) -> None:
    n = len(cfg.data.federation_options["tasks"])
    if cfg.data.num_clients != n:
        raise ConfigError("data.num_clients", cfg.data.num_clients, f"the number of tasks ({n}) with "
                                                                    "data.federation='task_clients'")


@dataclass
class TaskClientsData(FederatedData):
    """One client per task over one joint split (task arithmetic): client t holds task t's fine-tuning rows, the
    head has each task's rows (``offsets[t]`` + its ``num_classes[t]``), each example's class mask its task's."""
    task_of_train: np.ndarray = None     # task id of every joint training example
    task_of_test: np.ndarray = None
    val: list = field(default_factory=list)      # per task: joint training indices of its validation carve
    probe: list = field(default_factory=list)    # per task: joint training indices of its probe carve (frozen head)
    offsets: list = field(default_factory=list)
    num_classes: list = field(default_factory=list)


@FEDERATIONS.register("task_clients", options=TaskClientsDataOptions, check=check_task_clients_data)
def build_task_clients(cfg, o: "TaskClientsDataOptions") -> TaskClientsData:
    """Each task's train split subsampled to ``data.max_train_samples`` (seeded), cut (seeded) into three
    disjoint parts: ``val_samples`` validation examples, ``probe_samples`` for the frozen head's probe, the rest
    the fine-tuning data (the task-client's); its test split subsampled to ``data.max_test_samples``; all
    tokenized into one joint split whose class mask gives each example its own task's rows of the head."""
    from fedbench.data import load_task
    from fedbench.fl.data import subsample
    from fedbench.models import load_tokenizer
    from fedbench.models.inputs import TokenizedSplit, tokenize_split
    tok = load_tokenizer(cfg.model.backbone)
    trains, tests, names, vals_local, probes_local = [], [], [], [], []
    tasks, val_samples, probe_samples = o.tasks, o.val_samples, o.probe_samples
    for t, name in enumerate(tasks):
        ds = load_task(name)
        tr = subsample(len(ds["train"]), cfg.data.max_train_samples, rng_for(cfg.seed, "subsample", t, 0))
        te = subsample(len(ds["test"]), cfg.data.max_test_samples, rng_for(cfg.seed, "subsample", t, 1))
        if len(tr) <= val_samples + probe_samples:
            raise ConfigError("data.federation_options.val_samples", val_samples,
                              f"val_samples + probe_samples ({probe_samples}) fewer than the {len(tr)} training "
                              f"samples of {name}")
        trains.append(tokenize_split(ds["train"].select(tr), tok, cfg.data.max_length))
        tests.append(tokenize_split(ds["test"].select(te), tok, cfg.data.max_length))
        names.append([f"{name}:{c}" for c in ds["train"].features["label"].names])
        perm = rng_for(cfg.seed, "subsample", t, 2).permutation(len(tr))
        vals_local.append(np.sort(perm[:val_samples]))
        probes_local.append(np.sort(perm[val_samples:val_samples + probe_samples]))
    num_classes = [len(n) for n in names]
    offsets = np.concatenate([[0], np.cumsum(num_classes)[:-1]]).astype(int).tolist()

    def joint(splits):
        n = sum(len(x) for x in splits)
        mask = torch.zeros((n, sum(num_classes)), dtype=torch.bool)
        ids, labels, task_of, starts, start = [], [], [], [], 0
        for t, x in enumerate(splits):
            mask[start:start + len(x), offsets[t]:offsets[t] + num_classes[t]] = True
            ids += list(x.input_ids)
            labels.append(x.labels + offsets[t])
            task_of.append(np.full(len(x), t))
            starts.append(start)
            start += len(x)
        return TokenizedSplit(ids, torch.cat(labels), class_mask=mask), np.concatenate(task_of), starts

    train, task_of_train, tr_starts = joint(trains)
    test, task_of_test, _ = joint(tests)
    val = [tr_starts[t] + v for t, v in enumerate(vals_local)]
    probe = [tr_starts[t] + v for t, v in enumerate(probes_local)]
    clients = [np.setdiff1d(tr_starts[t] + np.arange(len(x)), np.concatenate([val[t], probe[t]]))
               for t, x in enumerate(trains)]
    return TaskClientsData(train=train, test=test, client_indices=clients, test_indices=np.arange(len(test)),
                           class_names=[c for n in names for c in n], pad_id=tok.pad_token_id or 0,
                           task_of_train=task_of_train, task_of_test=task_of_test, val=val, probe=probe,
                           offsets=offsets, num_classes=num_classes)
