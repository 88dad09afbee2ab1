"""The loop: client training, the client store, the default strategy (FedAvg with the registered rules) and the
round loop. The rules' math is :mod:`fedbench.merging`; the paper strategies are :mod:`fedbench.strategies`."""
from fedbench.fl.client import ClientUpdate, evaluate, predict, train_client
from fedbench.fl.data import FederatedData, prepare_data, prepare_validation
from fedbench.fl.seeding import derive_seed, rng_for
from fedbench.fl.server import FederatedRun, run_cached, run_federated, sample_clients
from fedbench.fl.store import ClientStore
from fedbench.fl.strategy import ClientInstruction, FedAvg, GlobalModel, LoraLayout, ServerStep

__all__ = ["ClientInstruction", "ClientStore", "ClientUpdate", "FedAvg", "FederatedData",
           "FederatedRun", "GlobalModel", "LoraLayout", "ServerStep", "derive_seed", "evaluate",
           "predict", "prepare_data", "prepare_validation", "rng_for", "run_cached",
           "run_federated", "sample_clients", "train_client"]
