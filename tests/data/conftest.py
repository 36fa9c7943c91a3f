"""Shared fixtures for the kinkprop.data tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kinkprop.data import write_idx


def make_idx_dir(directory: Path, n_train: int = 12, n_test: int = 5, size: int = 4,
                 gzip: bool = True, seed: int = 0) -> Path:
    """Write the four MNIST-style IDX files (tiny, random) into ``directory``."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzip else ""
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{part}-images-idx3-ubyte{suffix}", images, gzip=gzip)
        write_idx(directory / f"{part}-labels-idx1-ubyte{suffix}", labels, gzip=gzip)
    return directory


@pytest.fixture
def make_idx() -> Callable[..., Path]:
    """:func:`make_idx_dir`, as a fixture (test modules should not import conftest)."""
    return make_idx_dir


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    """A directory holding tiny gzipped Fashion-MNIST-style IDX files."""
    return make_idx_dir(tmp_path / "fmnist")
