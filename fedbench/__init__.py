"""fedbench: federated fine-tuning of pretrained models with parameter-efficient modules.

Layers, imports pointing one way:  data -> models -> fl (client, aggregators, strategy, loop)
-> experiments (one module per paper) -> notebooks.
"""
__version__ = "0.1.0"
