"""Model merging over task vectors, with the FL aggregation rules read as merges (see
:mod:`fedbench.merging.task_vectors`)."""
from fedbench.merging.task_vectors import (cclip, cosine_matrix, cosine_similarity, dare, fedgma, fednova, flatten,
                                           lora_task_vector, median, norm, state_task_vector, task_arithmetic, ties,
                                           unflatten, weighted_sum)

__all__ = ["cclip", "cosine_matrix", "cosine_similarity", "dare", "fedgma", "fednova", "flatten", "lora_task_vector",
           "median", "norm", "state_task_vector", "task_arithmetic", "ties", "unflatten", "weighted_sum"]
