"""Checkpoints that cannot run code when loaded: one ``.npz`` (``allow_pickle=False``) holding
arrays under ``model/``, ``optim/`` and ``sched/`` prefixes and a JSON ``meta`` string, written
atomically (a temporary file in the same folder, then ``os.replace``)."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    pass


def save_checkpoint(path, meta: dict, **groups: dict) -> None:
    """Write ``meta`` (JSON-serialisable) and each group of arrays to ``path`` atomically."""
    path = Path(path)
    arrays = {"meta": np.asarray(json.dumps(meta))}
    for group, items in groups.items():
        for key, value in items.items():
            arrays[f"{group}/{key}"] = np.asarray(value)
    for key, value in arrays.items():
        if value.dtype == object:
            raise CheckpointError(f"checkpoint entry {key} is not a plain array")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **_encode(arrays))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """``(meta, groups)`` from a checkpoint; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable kinkprop checkpoint ({e})") from None
    arrays = _decode(arrays)
    if "meta" not in arrays:
        raise CheckpointError(f"{path}: no 'meta' entry; not a kinkprop checkpoint")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as e:
        raise CheckpointError(f"{path}: its 'meta' entry is not JSON ({e}); not a readable "
                              "kinkprop checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its 'meta' entry is {json.dumps(meta)[:40]}, not a JSON "
                              "object; not a readable kinkprop checkpoint")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        group, _, name = key.partition("/")
        groups.setdefault(group, {})[name] = value
    return meta, groups


# bfloat16 / float8 arrays are stored as raw bits with their dtype name, so loading needs no pickle
_BITS = "__bits__"


def _encode(arrays):
    out = {}
    for k, v in arrays.items():
        if v.dtype.kind == "V" or v.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            out[f"{k}{_BITS}{v.dtype.name}"] = v.view(np.uint8 if v.itemsize == 1 else np.uint16)
        else:
            out[k] = v
    return out


def _decode(arrays):
    import ml_dtypes

    out = {}
    for k, v in arrays.items():
        if _BITS in k:
            k, name = k.split(_BITS)
            v = v.view(np.dtype(getattr(ml_dtypes, name)))
        out[k] = v
    return out
