"""fedbench_extra: four methods written as an outside researcher would, in a package outside fedbench.

Each module registers one component with fedbench's ordinary decorators when it is imported:

- :mod:`fedbench_extra.rfa`: RFA (Pillutla et al. 2022), the geometric median by smoothed Weiszfeld iterations,
  an aggregator with its own options (``fl.aggregator_options: {iterations, eps}``);
- :mod:`fedbench_extra.fedsa_lora`: FedSA-LoRA (Guo et al. 2025), A shared and averaged, each client's B kept in
  its client store;
- :mod:`fedbench_extra.scaffold`: SCAFFOLD (Karimireddy et al. 2020), control variates sent down beside the state
  (``ClientInstruction.extras``) and a gradient correction in local training (a ``TrainingHook``);
- :mod:`fedbench_extra.consensus`: Consensus merging (Wang et al. 2024, TALL masks) in ``MERGES``.

Load it with ``plugins: [fedbench_extra]`` in a config, ``fedbench run RUN.yaml --plugin fedbench_extra``, or an
entry point ``[project.entry-points."fedbench.plugins"] extra = "fedbench_extra"`` (tests/test_plugins.py).
"""
from fedbench_extra import consensus, fedsa_lora, rfa, scaffold  # noqa: F401  (each registers on import)
