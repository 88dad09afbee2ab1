"""The federated-LoRA family on one loop, each a small module over :class:`~.ranks.RankTiered` (clients of
different LoRA ranks, zero-padded on the server; every client at ``peft.rank`` without ``fl.options.ranks``):

- :mod:`~.ranks`: rank tiers (``fl.options.ranks`` / ``assignment``) and the baselines ``fedit_zero_pad``,
  ``fedit_truncate``;
- :mod:`~.fedsa`: FedSA-LoRA (A shared, each client's B in its store);
- :mod:`~.fedex`: FedEx-LoRA (factor averages + the residual folded into the frozen weight: exact);
- :mod:`~.flexlora`: FlexLoRA (product average, SVD-truncated to each client's rank);
- :mod:`~.hetlora`: HetLoRA (truncation, rank self-pruning, sparsity-weighted zero-padded averaging);
- :mod:`~.rolora`: RoLoRA (B, A, B, ... across rounds, LoRM's alternating schedule);
- :mod:`~.fedsvd`: FedSVD (B trains; the server re-factorises B A by SVD).

The server math is in :mod:`fedbench.merging.lora_family` (pure functions, tested against their formulas).
"""
# imported in the order `fedbench list` shows them
from fedbench.strategies.lora_family import ranks, fedsa, fedex, flexlora, hetlora, rolora, fedsvd  # noqa: F401,I001
