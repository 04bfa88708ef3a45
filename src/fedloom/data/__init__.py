"""Datasets from their official files, and partitioners that split them among clients."""

from .datasets import DATASETS, Dataset, dataset_status, load_dataset
from .federated import PARTITIONS, ClientData, FederatedData, federate

__all__ = ["DATASETS", "PARTITIONS", "ClientData", "Dataset", "FederatedData", "dataset_status", "federate",
           "load_dataset"]
