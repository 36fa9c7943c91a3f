"""DataLoader batching, shuffling and resuming."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kinkprop.data import DataLoader


def data(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return x, np.arange(n, dtype=np.int64)


def epoch_order(loader: DataLoader) -> np.ndarray:
    return np.concatenate([yb for _, yb in loader])


def test_batching_in_order() -> None:
    x, y = data(10)
    loader = DataLoader(x, y, batch_size=4)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(yb) for _, yb in batches] == [4, 4, 2]
    for xb, yb in batches:
        np.testing.assert_array_equal(xb, x[yb])
    np.testing.assert_array_equal(epoch_order(loader), y)


@pytest.mark.parametrize("n,bs,drop_last,expected", [
    (10, 4, True, [4, 4]), (10, 5, True, [5, 5]), (10, 5, False, [5, 5]),
    (3, 4, True, []), (3, 4, False, [3]), (0, 2, False, []), (10, 1, False, [1] * 10),
])
def test_drop_last(n: int, bs: int, drop_last: bool, expected: list[int]) -> None:
    loader = DataLoader(*data(n), batch_size=bs, shuffle=True, drop_last=drop_last, seed=0)
    assert [len(yb) for _, yb in loader] == expected
    assert len(loader) == len(expected)


def test_shuffle_each_sample_once_per_epoch() -> None:
    x, y = data(103)
    loader = DataLoader(x, y, batch_size=8, shuffle=True, seed=1)
    orders = []
    for _ in range(3):
        seen = []
        for xb, yb in loader:
            np.testing.assert_array_equal(xb, x[yb])  # x and y stay paired
            seen.append(yb)
        order = np.concatenate(seen)
        np.testing.assert_array_equal(np.sort(order), y)
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    assert not np.array_equal(orders[0], y)


def test_seeded_shuffle_is_deterministic() -> None:
    a = DataLoader(*data(50), batch_size=7, shuffle=True, seed=123)
    b = DataLoader(*data(50), batch_size=7, shuffle=True, seed=123)
    c = DataLoader(*data(50), batch_size=7, shuffle=True, seed=124)
    for _ in range(3):
        order = epoch_order(a)
        np.testing.assert_array_equal(order, epoch_order(b))
        assert not np.array_equal(order, epoch_order(c))


def test_generator_seed_is_used_as_is() -> None:
    rng = np.random.default_rng(5)
    loader = DataLoader(*data(20), batch_size=3, shuffle=True, seed=rng)
    assert loader.rng is rng
    np.testing.assert_array_equal(epoch_order(loader),
                                  np.random.default_rng(5).permutation(20))


def test_resume_from_saved_state() -> None:
    x, y = data(37)
    run = DataLoader(x, y, batch_size=5, shuffle=True, seed=7)
    epoch_order(run)
    saved = json.dumps(run.state)  # checkpointed between epochs 1 and 2
    expected = [epoch_order(run) for _ in range(2)]

    resumed = DataLoader(x, y, batch_size=5, shuffle=True, seed=999)
    resumed.load_state(json.loads(saved))
    for order in expected:
        np.testing.assert_array_equal(epoch_order(resumed), order)

    other = DataLoader(x, y, batch_size=5, shuffle=True)
    other.state = json.loads(saved)  # the setter works too
    np.testing.assert_array_equal(epoch_order(other), expected[0])


def test_order_is_drawn_when_the_epoch_starts() -> None:
    loader = DataLoader(*data(9), batch_size=2, shuffle=True, seed=3)
    before = loader.state
    iterator = iter(loader)
    assert loader.state != before  # drawn eagerly in __iter__, not at the first next()
    saved = loader.state
    first = np.concatenate([yb for _, yb in iterator])
    loader.load_state(before)
    np.testing.assert_array_equal(epoch_order(loader), first)
    assert loader.state == saved


def test_state_is_a_copy() -> None:
    loader = DataLoader(*data(9), batch_size=2, shuffle=True, seed=3)
    state = loader.state
    state["state"]["state"] = 0
    assert loader.state["state"]["state"] != 0


def test_bad_state() -> None:
    loader = DataLoader(*data(9), batch_size=2, shuffle=True, seed=3)
    with pytest.raises(ValueError, match="bit generator"):
        loader.load_state({"bit_generator": "MT19937", "state": {}})
    with pytest.raises(ValueError):
        loader.load_state({"bit_generator": "PCG64", "state": {}})


@pytest.mark.parametrize("bs", [0, -1])
def test_batch_size_validated(bs: int) -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DataLoader(*data(4), batch_size=bs)


@pytest.mark.parametrize("bs", [2.0, True, "2"])
def test_batch_size_type(bs: object) -> None:
    with pytest.raises(TypeError, match="batch_size"):
        DataLoader(*data(4), batch_size=bs)  # type: ignore[arg-type]


def test_lengths_validated() -> None:
    x, y = data(5)
    with pytest.raises(ValueError, match=r"len\(x\)=5, len\(y\)=4"):
        DataLoader(x, y[:4], batch_size=2)


def test_seed_validated() -> None:
    with pytest.raises(TypeError, match="seed"):
        DataLoader(*data(4), batch_size=2, seed=1.5)  # type: ignore[arg-type]
