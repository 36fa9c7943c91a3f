"""Small classification datasets as numpy arrays.

Conventions shared by every loader:

* inputs are float32, channel-first: images ``(N, 1, H, W)``, 1-D signals ``(N, 1, L)``;
* labels are int64 class indices in ``0 .. len(classes) - 1``;
* nothing is downloaded: IDX datasets are read from local files, MNIST-1D is generated locally
  (and cached), digits ships with scikit-learn;
* optional packages (mnist1d, scikit-learn) are imported inside the loaders that need them;
* every failure is a :class:`~kinkprop.data.errors.DataError` saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kinkprop.data.errors import DataError
from kinkprop.data.idx import PathLike, read_idx

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "IDX_FILES",
    "Dataset",
    "default_cache_dir",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dir",
    "load_kmnist",
    "load_mnist",
    "load_mnist1d",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Base names of the four IDX files; each may also carry a ``.gz`` suffix.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
DIGIT_CLASSES = [str(i) for i in range(10)]

_APT_HINT = "install with `sudo apt-get install dataset-fashion-mnist`"


@dataclass
class Dataset:
    """A train/test split of a classification dataset (see the module docstring)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    input_shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
                f"input_shape={self.input_shape}, classes={self.num_classes})")


# --------------------------------------------------------------------------------------------
# IDX directories (Fashion-MNIST, MNIST, KMNIST)


def _find_idx_files(data_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Map each :data:`IDX_FILES` key to an existing file; also return the missing base names."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, base in IDX_FILES.items():
        for candidate in (data_dir / base, data_dir / f"{base}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(f"{base}[.gz]")
    return found, missing


def _check_split(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path,
                 num_classes: int) -> None:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{image_path}: expected uint8 images of shape (N, H, W), got "
                        f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{label_path}: expected uint8 labels of shape (N,), got "
                        f"{labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{image_path} holds {len(images)} images but {label_path} holds "
                        f"{len(labels)} labels")
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{label_path}: labels must lie in 0..{num_classes - 1}, found "
                        f"{int(labels.max())}")


def load_idx_dir(data_dir: PathLike, name: str, classes: list[str] | None = None,
                 install_hint: str | None = None) -> Dataset:
    """Load an MNIST-style dataset from the four IDX files in ``data_dir``.

    The files are :data:`IDX_FILES`, each raw or gzipped (``.gz``). Images become float32 in
    [0, 1] of shape ``(N, 1, H, W)``; labels int64. ``classes`` defaults to ``"0".."9"``.
    ``install_hint`` is added to the missing-files message.
    """
    classes = list(DIGIT_CLASSES if classes is None else classes)
    data_dir = Path(data_dir).expanduser()
    found, missing = _find_idx_files(data_dir)
    if missing:
        where = "" if data_dir.is_dir() else " (the directory does not exist)"
        how = f"{install_hint} or pass" if install_hint else "pass"
        raise DataError(
            f"{name}: missing {', '.join(missing)} in {data_dir}{where}; {how} `--data-dir DIR` "
            f"for a directory holding the four files {', '.join(IDX_FILES.values())} "
            "(raw or .gz)")

    arrays = {key: read_idx(path) for key, path in found.items()}
    split = {}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        _check_split(images, labels, found[f"{part}_images"], found[f"{part}_labels"],
                     len(classes))
        x = images.astype(np.float32)[:, None]
        x /= np.float32(255.0)
        split[part] = (x, labels.astype(np.int64))
    if split["train"][0].shape[1:] != split["test"][0].shape[1:]:
        raise DataError(f"{name}: train images are {split['train'][0].shape[2:]} but test "
                        f"images are {split['test'][0].shape[2:]} in {data_dir}")
    (x_train, y_train), (x_test, y_test) = split["train"], split["test"]
    return Dataset(name, x_train, y_train, x_test, y_test, classes, tuple(x_train.shape[1:]))


def load_fashion_mnist(data_dir: PathLike | None = None) -> Dataset:
    """Fashion-MNIST: 60000/10000 images ``(1, 28, 28)``, 10 classes.

    ``data_dir`` defaults to :data:`FASHION_MNIST_DIR` (Debian's ``dataset-fashion-mnist``).
    """
    return load_idx_dir(FASHION_MNIST_DIR if data_dir is None else data_dir, "fashion-mnist",
                        FASHION_MNIST_CLASSES, install_hint=_APT_HINT)


def _require_dir(name: str, data_dir: PathLike | None) -> PathLike:
    if data_dir is None:
        raise DataError(f"{name}: no data directory given; pass `--data-dir DIR` for a "
                        f"directory holding {', '.join(IDX_FILES.values())} (raw or .gz)")
    return data_dir


def load_mnist(data_dir: PathLike | None = None) -> Dataset:
    """MNIST from the four IDX files in ``data_dir`` (required; there is no default)."""
    return load_idx_dir(_require_dir("mnist", data_dir), "mnist", DIGIT_CLASSES)


def load_kmnist(data_dir: PathLike | None = None) -> Dataset:
    """Kuzushiji-MNIST from the four IDX files in ``data_dir`` (required; no default)."""
    return load_idx_dir(_require_dir("kmnist", data_dir), "kmnist", KMNIST_CLASSES)


# --------------------------------------------------------------------------------------------
# MNIST-1D

_MNIST1D_FORMAT = 1  # bump when the cached arrays' meaning changes
_MNIST1D_KEYS = ("x_train", "y_train", "x_test", "y_test")


def default_cache_dir() -> Path:
    """``$KINKPROP_CACHE`` if set and non-empty, else ``~/.cache/kinkprop``."""
    env = os.environ.get("KINKPROP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kinkprop"


def _import_mnist1d() -> Any:
    try:
        import mnist1d.data
    except ImportError as exc:
        raise DataError(f"mnist1d: the mnist1d package could not be imported ({exc}); install "
                        "it with `pip install 'kinkprop[mnist1d]'`") from exc
    for attr in ("make_dataset", "get_dataset_args"):
        if not hasattr(mnist1d.data, attr):
            raise DataError(f"mnist1d: the installed mnist1d has no data.{attr}; install a "
                            "compatible version with `pip install 'kinkprop[mnist1d]'`")
    return mnist1d.data


def _mnist1d_args(mnist1d_data: Any, seed: int) -> tuple[Any, dict[str, Any]]:
    """mnist1d's default generation arguments with ``seed``; also a JSON-able copy for keys."""
    args = mnist1d_data.get_dataset_args()
    args.seed = seed
    key = {k: v for k, v in sorted(vars(args).items()) if k != "url"}
    return args, key


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if the file is absent or unusable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _MNIST1D_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"{path}: ignoring unreadable MNIST-1D cache ({exc}); rebuilding",
                      stacklevel=3)
        return None
    ok = (arrays["x_train"].shape == (len(arrays["y_train"]), 1, 40)
          and arrays["x_test"].shape == (len(arrays["y_test"]), 1, 40)
          and all(arrays[k].dtype == np.float32 for k in ("x_train", "x_test"))
          and all(arrays[k].dtype == np.int64 for k in ("y_train", "y_test")))
    if not ok:
        warnings.warn(f"{path}: ignoring MNIST-1D cache with unexpected arrays; rebuilding",
                      stacklevel=3)
        return None
    return arrays


def _write_atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` with np.savez via a temporary file and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_mnist1d(cache_dir: PathLike | None = None, seed: int = 42) -> Dataset:
    """MNIST-1D: 4000/1000 signals ``(1, 40)``, 10 classes, generated locally.

    Generated with ``mnist1d.data.make_dataset`` and mnist1d's default arguments (with
    ``seed``; 42 is mnist1d's own default), never downloaded. mnist1d seeds numpy's and
    Python's global random generators; their states are saved and restored around the call.
    The result is cached as ``.npz`` in ``cache_dir`` (default :func:`default_cache_dir`), in a
    file named after a hash of the generation arguments; an unreadable cache is rebuilt, and a
    cache directory that cannot be written only warns.
    """
    mnist1d_data = _import_mnist1d()
    args, key = _mnist1d_args(mnist1d_data, seed)
    digest = hashlib.sha256(json.dumps([_MNIST1D_FORMAT, key], sort_keys=True).encode())
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    path = cache_dir / f"mnist1d-seed{seed}-{digest.hexdigest()[:12]}.npz"

    arrays = _read_mnist1d_cache(path)
    if arrays is None:
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            raw = mnist1d_data.make_dataset(args)
        except ImportError as exc:  # e.g. scipy missing: mnist1d imports it lazily in places
            raise DataError(f"mnist1d: generating the dataset failed ({exc}); install the "
                            "dependencies with `pip install 'kinkprop[mnist1d]'`") from exc
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {
            "x_train": np.asarray(raw["x"], dtype=np.float32)[:, None, :],
            "y_train": np.asarray(raw["y"], dtype=np.int64),
            "x_test": np.asarray(raw["x_test"], dtype=np.float32)[:, None, :],
            "y_test": np.asarray(raw["y_test"], dtype=np.int64),
        }
        try:
            _write_atomic_npz(path, arrays)
        except OSError as exc:
            warnings.warn(f"{path}: could not write MNIST-1D cache ({exc})", stacklevel=2)

    return Dataset("mnist1d", arrays["x_train"], arrays["y_train"], arrays["x_test"],
                   arrays["y_test"], list(DIGIT_CLASSES), tuple(arrays["x_train"].shape[1:]))


# --------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits: 1437/360 images ``(1, 8, 8)`` in [0, 1], 10 classes.

    Pixel values 0..16 are divided by 16. The split is a permutation drawn from
    ``np.random.default_rng(seed)``, so it does not depend on the scikit-learn version.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DataError(f"digits: scikit-learn could not be imported ({exc}); install it with "
                        "`pip install 'kinkprop[digits]'`") from exc
    bunch = sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0))[:, None]
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[:1437], order[1437:]
    return Dataset("digits", x[train], y[train], x[test], y[test], list(DIGIT_CLASSES),
                   tuple(x.shape[1:]))


# --------------------------------------------------------------------------------------------
# Registry


def _digits_loader(data_dir: PathLike | None = None) -> Dataset:
    if data_dir is not None:
        raise DataError("digits: the dataset ships with scikit-learn; `--data-dir` is not used")
    return load_digits()


def _mnist1d_loader(data_dir: PathLike | None = None) -> Dataset:
    return load_mnist1d(cache_dir=data_dir)


#: Dataset name -> loader taking an optional data directory. For mnist1d the directory is the
#: cache directory; digits takes none; mnist and kmnist require one.
DATASETS: dict[str, Callable[[PathLike | None], Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist1d": _mnist1d_loader,
    "digits": _digits_loader,
    "mnist": load_mnist,
    "kmnist": load_kmnist,
}


def load_dataset(name: str, data_dir: PathLike | None = None) -> Dataset:
    """Load the dataset called ``name`` (a key of :data:`DATASETS`; ``_`` may stand for ``-``)."""
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[key](data_dir)
