"""The federated layer: client training, aggregation rules, strategies, the client store and the round loop."""
from fedbench.fl.aggregators import (FedAdam, FedAvgM, coordinate_median, fedavg, lora_factor_average, lora_stack,
                                     lora_svd, trimmed_mean)
from fedbench.fl.client import ClientUpdate, evaluate, predict, train_client
from fedbench.fl.seeding import derive_seed, rng_for
from fedbench.fl.server import (FederatedData, FederatedRun, prepare_data, prepare_validation, run_cached,
                                run_federated, sample_clients)
from fedbench.fl.store import ClientStore
from fedbench.fl.strategy import ClientInstruction, FedAvg, GlobalModel, LoraLayout, ServerStep

__all__ = ["ClientInstruction", "ClientStore", "ClientUpdate", "FedAdam", "FedAvg", "FedAvgM", "FederatedData",
           "FederatedRun", "GlobalModel", "LoraLayout", "ServerStep", "coordinate_median", "derive_seed", "evaluate", "fedavg",
           "lora_factor_average", "lora_stack", "lora_svd", "predict", "prepare_data", "prepare_validation", "rng_for", "run_cached",
           "run_federated", "sample_clients", "train_client", "trimmed_mean"]
