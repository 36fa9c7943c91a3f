"""Reading and writing IDX files (the MNIST family's file format).

Format (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``00 00 TT NN`` where ``TT``
is the element type code and ``NN`` the number of dimensions, then ``NN`` big-endian uint32
dimension sizes, then the elements in C order, big-endian. Type codes:

======  ==========
0x08    uint8
0x09    int8
0x0B    int16
0x0C    int32
0x0D    float32
0x0E    float64
======  ==========

Files may be gzip-compressed; compression is detected from the content (the gzip magic bytes
``1f 8b``), not the file name. Arrays are returned in native byte order and are writable.
"""

from __future__ import annotations

import gzip as _gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from kinkprop.data.errors import DataError

__all__ = ["IDX_TYPES", "PathLike", "read_idx", "write_idx"]

#: What the functions here accept as a file name.
PathLike = str | os.PathLike[str]

#: IDX type code -> numpy dtype (native byte order; IDX stores big-endian on disk).
IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(np.int16),
    0x0C: np.dtype(np.int32),
    0x0D: np.dtype(np.float32),
    0x0E: np.dtype(np.float64),
}
_CODE_OF: dict[np.dtype, int] = {dtype: code for code, dtype in IDX_TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> tuple[bytes, bool]:
    """Return the (decompressed) content of ``path`` and whether it was gzipped."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not raw.startswith(_GZIP_MAGIC):
        return raw, False
    try:
        return _gzip.decompress(raw), True
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data: {exc}") from exc


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file, gzipped or raw, into a native-endian, writable numpy array.

    Raises:
        DataError: the file is missing or unreadable, the gzip stream is corrupt, the magic
            number or type code is invalid, or the data is shorter or longer than the header
            says. The message starts with the file's path.
    """
    path = Path(path)
    data, gzipped = _read_bytes(path)
    what = " (after gunzip)" if gzipped else ""

    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file: only {len(data)} bytes{what}, need a "
                        "4-byte magic number")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file: bad magic number {data[:4].hex(' ')}"
                        f"{what} (expected 00 00 <type> <ndim>)")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        valid = ", ".join(f"0x{c:02X} {t.name}" for c, t in IDX_TYPES.items())
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (valid: {valid})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header says 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{path}: truncated header: {ndim} dimensions need {header_len} "
                        f"header bytes, file holds {len(data)}{what}")

    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        problem = "truncated" if actual < expected else "trailing bytes"
        shape = "x".join(map(str, dims))
        raise DataError(f"{path}: {problem}: header says {shape} {dtype.name} = {expected} "
                        f"bytes, file holds {actual} bytes after the {header_len}-byte "
                        f"header{what}")

    if dtype.itemsize == 1:  # copy into a bytearray so that the result is writable
        array = np.frombuffer(bytearray(memoryview(data)[header_len:]), dtype=dtype)
    else:  # astype copies, converting big-endian to native order
        array = np.frombuffer(data, dtype=dtype.newbyteorder(">"), offset=header_len)
        array = array.astype(dtype)
    return array.reshape(dims)


def write_idx(path: PathLike, array: np.ndarray, gzip: bool = False) -> None:
    """Write ``array`` to ``path`` as an IDX file, gzip-compressed if ``gzip`` is true.

    The array's dtype must be one of :data:`IDX_TYPES` (any byte order); it must have between
    1 and 255 dimensions, each smaller than 2**32. The file name is used as given (no ``.gz``
    suffix is added).
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODE_OF:
        names = ", ".join(t.name for t in IDX_TYPES.values())
        raise DataError(f"{path}: cannot store dtype {array.dtype} in IDX (supported: {names})")
    if not 1 <= array.ndim <= 255:
        raise DataError(f"{path}: IDX needs 1 to 255 dimensions, array has {array.ndim}")
    if any(d >= 2**32 for d in array.shape):
        raise DataError(f"{path}: dimension too large for IDX: {array.shape}")
    header = bytes([0, 0, _CODE_OF[native], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    if gzip:
        payload = _gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)
