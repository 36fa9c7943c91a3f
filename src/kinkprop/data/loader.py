"""Mini-batch iteration over in-memory numpy arrays."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["DataLoader"]

Seed = int | np.random.Generator | None


class DataLoader:
    """Iterate over ``(x, y)`` in mini-batches along the first axis.

    Each ``iter(loader)`` (each ``for`` loop) is one epoch. With ``shuffle=True`` the epoch's
    order is a permutation drawn from the loader's generator when the iteration starts
    (eagerly, in ``__iter__``), so every epoch has a fresh order and a given seed gives the same
    sequence of epoch orders. Every sample appears exactly once per epoch, except that
    ``drop_last=True`` skips the final short batch.

    Resuming: :attr:`state` is the generator's ``bit_generator.state`` (a JSON-serialisable
    dict). Save it between epochs and assign it back (or call :meth:`load_state`) on a loader
    built over the same data to get the same next epoch order as the uninterrupted run.

    Args:
        x, y: arrays with the same length along axis 0.
        batch_size: samples per batch, at least 1.
        shuffle: reshuffle at the start of every epoch; otherwise iterate in order.
        drop_last: drop the last batch if it holds fewer than ``batch_size`` samples.
        seed: an int, ``None`` (fresh OS entropy) or a ``np.random.Generator``, which is used
            (and advanced) as is, not copied.

    Batches are numpy arrays. Unshuffled batches are views into ``x`` and ``y``; shuffled ones
    are copies. Do not modify them in place.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: Seed = None,
    ) -> None:
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 0 or y.ndim == 0:
            raise ValueError("DataLoader: x and y must have at least one dimension "
                             f"(got x.shape={x.shape}, y.shape={y.shape})")
        if len(x) != len(y):
            raise ValueError(f"DataLoader: x and y differ in length: len(x)={len(x)}, "
                             f"len(y)={len(y)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"DataLoader: batch_size must be an int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be >= 1, got {batch_size}")
        if isinstance(seed, np.random.Generator):
            rng = seed
        elif seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
            rng = np.random.default_rng(seed)
        else:
            raise TypeError("DataLoader: seed must be None, an int or a numpy Generator, got "
                            f"{seed!r}")
        self.x = x
        self.y = y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rng = rng

    @property
    def num_samples(self) -> int:
        """Number of samples in the data (including any a ``drop_last`` epoch skips)."""
        return len(self.x)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Start an epoch: draw its order now and return an iterator over its batches."""
        order = self.rng.permutation(self.num_samples) if self.shuffle else None
        return self._batches(order)

    def _batches(self, order: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        bs = self.batch_size
        for i in range(len(self)):
            if order is None:
                yield self.x[i * bs:(i + 1) * bs], self.y[i * bs:(i + 1) * bs]
            else:
                idx = order[i * bs:(i + 1) * bs]
                yield self.x[idx], self.y[idx]

    @property
    def state(self) -> dict[str, Any]:
        """The generator's ``bit_generator.state``: a JSON-serialisable dict (a copy)."""
        return copy.deepcopy(self.rng.bit_generator.state)

    @state.setter
    def state(self, state: dict[str, Any]) -> None:
        self.load_state(state)

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a generator state previously read from :attr:`state`."""
        expected = type(self.rng.bit_generator).__name__
        got = state.get("bit_generator") if isinstance(state, dict) else None
        if got != expected:
            raise ValueError(f"DataLoader: state is for bit generator {got!r}, this loader "
                             f"uses {expected!r}")
        try:
            self.rng.bit_generator.state = copy.deepcopy(state)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"DataLoader: invalid generator state: {exc}") from exc

    def __repr__(self) -> str:
        return (f"DataLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, drop_last={self.drop_last}, batches={len(self)})")
