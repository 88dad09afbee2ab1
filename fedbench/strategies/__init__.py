"""The paper strategies, one module per family, each a small set of classes on the one loop
(:class:`fedbench.fl.strategy.FedAvg` is the default and the base; see :mod:`fedbench.fl.strategy` for the hooks).

- :mod:`~fedbench.strategies.ffa_lora`: FFA-LoRA (A frozen at its seeded init, B trains and travels).
- :mod:`~fedbench.strategies.task_arithmetic`: ``task_clients``, task arithmetic as one-shot FedAvg.
- :mod:`~fedbench.strategies.fl_tac`: FL-TAC (per-task adapters clustered on the server) and its baselines.
- :mod:`~fedbench.strategies.continual`: the continual protocol, LoRM and RegMean.
- :mod:`~fedbench.strategies.autofednlp`: AutoFedNLP / FedAdapter's progressive configurator.
- :mod:`~fedbench.strategies.lora_family`: the federated-LoRA family (FedSA-LoRA, FedEx-LoRA, FlexLoRA, HetLoRA,
  RoLoRA, FedSVD) and heterogeneous client ranks.

Importing this package registers every strategy in :data:`fedbench.registry.STRATEGIES` (its provider).
"""
# imported in the order `fedbench list` shows them
from fedbench.strategies import ffa_lora, task_arithmetic, continual, fl_tac, autofednlp, lora_family  # noqa: F401,I001
