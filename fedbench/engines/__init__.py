"""Engines that drive fedbench's clients and server step.

The in-process loop (:func:`fedbench.fl.run_federated`) is the default engine. :mod:`fedbench.engines.flower`
runs the same experiment on Flower (``pip install 'fedbench[flower]'``): its ClientApp calls
:func:`fedbench.fl.client.train_client` and its ServerApp's strategy calls :class:`fedbench.fl.strategy.FedAvg` (or a strategy of :mod:`fedbench.strategies`),
so both engines sample the same clients, train them with the same seeds and aggregate with the same rules.
Nothing here is imported by ``import fedbench``: Flower stays an optional dependency.
"""
