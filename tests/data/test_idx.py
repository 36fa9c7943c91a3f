"""IDX reading and writing."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from kinkprop.data import DataError, read_idx, write_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def sample(dtype: type, shape: tuple[int, ...] = (3, 4, 5)) -> np.ndarray:
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    values = np.linspace(float(info.min) / 2, float(info.max) / 2, num=int(np.prod(shape)))
    array = values.astype(dtype).reshape(shape)
    array.flat[0] = info.min  # the extremes survive the round trip too
    array.flat[-1] = info.max
    return array


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path: Path, dtype: type, compress: bool) -> None:
    array = sample(dtype)
    path = tmp_path / "a.idx"
    write_idx(path, array, gzip=compress)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if compress else b"\x00\x00")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype)
    assert back.dtype.isnative
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[0, 0, 0] = back[1, 1, 1]  # writable


@pytest.mark.parametrize("shape", [(7,), (2, 3), (1, 2, 3, 4), (0, 5)])
def test_round_trip_shapes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    array = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    write_idx(tmp_path / "a", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)


def test_big_endian_on_disk(tmp_path: Path) -> None:
    write_idx(tmp_path / "a", np.array([1, 258], dtype=np.int16))
    assert (tmp_path / "a").read_bytes() == bytes.fromhex("0000 0b01 00000002 0001 0102")


def test_non_native_input_dtype(tmp_path: Path) -> None:
    array = np.array([1.5, -2.25], dtype=">f8")
    write_idx(tmp_path / "a", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)


def test_gzip_detected_by_content_not_suffix(tmp_path: Path) -> None:
    array = sample(np.float32)
    write_idx(tmp_path / "gz-without-suffix", array, gzip=True)
    write_idx(tmp_path / "raw-with-suffix.gz", array, gzip=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "gz-without-suffix"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-with-suffix.gz"), array)


def write_bytes(path: Path, data: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def header(code: int, *dims: int) -> bytes:
    return bytes([0, 0, code, len(dims)]) + np.asarray(dims, dtype=">u4").tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_truncated(tmp_path: Path, compress: bool) -> None:
    path = write_bytes(tmp_path / "train-images-idx3-ubyte.gz",
                       header(0x08, 60000, 28, 28) + bytes(1000), compress)
    with pytest.raises(DataError) as info:
        read_idx(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "truncated" in message
    assert "60000x28x28 uint8 = 47040000 bytes" in message
    assert "1000 bytes" in message


@pytest.mark.parametrize("compress", [False, True])
def test_trailing_bytes(tmp_path: Path, compress: bool) -> None:
    path = write_bytes(tmp_path / "labels", header(0x0C, 3) + bytes(12 + 1), compress)
    with pytest.raises(DataError, match="trailing bytes") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "3 int32 = 12 bytes" in str(info.value)


def test_truncated_header(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "f", bytes([0, 0, 0x08, 3]) + bytes(5), False)
    with pytest.raises(DataError, match="truncated header") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("data", [b"PK\x03\x04" + bytes(20), b"\x00\x01\x08\x01" + bytes(8),
                                  b"\x00\x00"])
def test_bad_magic(tmp_path: Path, data: bytes) -> None:
    path = write_bytes(tmp_path / "bad", data, False)
    with pytest.raises(DataError, match="not an IDX file") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("code", [0x00, 0x0A, 0x0F, 0xFF])
def test_wrong_type_code(tmp_path: Path, code: int) -> None:
    path = write_bytes(tmp_path / "bad", header(code, 2) + bytes(2), False)
    with pytest.raises(DataError, match=f"unknown IDX type code 0x{code:02X}") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_zero_dimensions(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "bad", bytes([0, 0, 0x08, 0]) + bytes(1), False)
    with pytest.raises(DataError, match="0 dimensions"):
        read_idx(path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    good = gzip.compress(header(0x08, 100) + bytes(100))
    path = write_bytes(tmp_path / "bad.gz", good[: len(good) // 2], False)
    with pytest.raises(DataError, match="corrupt gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file") as info:
        read_idx(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("array", [np.zeros(3, dtype=np.int64), np.zeros(3, dtype=bool),
                                   np.zeros(3, dtype=np.uint16), np.float64(1.0)])
def test_write_rejects_unsupported(tmp_path: Path, array: np.ndarray) -> None:
    with pytest.raises(DataError):
        write_idx(tmp_path / "a", array)
