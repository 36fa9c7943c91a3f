"""Datasets and mini-batching for kinkprop, as plain numpy arrays.

Importing this package needs only numpy; optional dependencies (mnist1d, scikit-learn) are
imported by the loaders that use them. See :mod:`kinkprop.data.datasets` for the array
conventions.
"""

from kinkprop.data.datasets import (
    DATASETS,
    Dataset,
    default_cache_dir,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_dir,
    load_kmnist,
    load_mnist,
    load_mnist1d,
)
from kinkprop.data.errors import DataError
from kinkprop.data.idx import read_idx, write_idx
from kinkprop.data.loader import DataLoader

__all__ = [
    "DATASETS",
    "DataError",
    "DataLoader",
    "Dataset",
    "default_cache_dir",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dir",
    "load_kmnist",
    "load_mnist",
    "load_mnist1d",
    "read_idx",
    "write_idx",
]
