"""Datasets from their official files, your own arrays and files, and partitioners that split them among
clients."""

from .custom import from_arrays, from_client_arrays, load_file, register_dataset
from .datasets import DATASETS, Dataset, dataset_status, load_dataset
from .federated import PARTITIONS, ClientData, FederatedData, federate

__all__ = ["DATASETS", "PARTITIONS", "ClientData", "Dataset", "FederatedData", "dataset_status", "federate",
           "from_arrays", "from_client_arrays", "load_dataset", "load_file", "register_dataset"]
