"""Dataset loaders."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from kinkprop.data import (
    DATASETS,
    DataError,
    Dataset,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_dir,
    load_mnist1d,
    read_idx,
    write_idx,
)

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
MakeIdx = Callable[..., Path]


# --------------------------------------------------------------------------------------------
# IDX directories


def test_fashion_mnist_from_fixture(idx_dir: Path) -> None:
    ds = load_fashion_mnist(idx_dir)
    assert isinstance(ds, Dataset)
    assert ds.name == "fashion-mnist"
    assert ds.x_train.shape == (12, 1, 4, 4) and ds.x_test.shape == (5, 1, 4, 4)
    assert ds.y_train.shape == (12,) and ds.y_test.shape == (5,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.input_shape == (1, 4, 4)
    assert ds.num_classes == 10 and ds.classes[0] == "T-shirt/top"
    raw = read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    np.testing.assert_allclose(ds.x_train[:, 0] * 255, raw, atol=1e-4)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    np.testing.assert_array_equal(ds.y_train, np.arange(12) % 10)


def test_raw_and_gzipped_files_mixed(make_idx: MakeIdx, tmp_path: Path) -> None:
    make_idx(tmp_path, gzip=False)
    raw_labels = tmp_path / "t10k-labels-idx1-ubyte"
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", read_idx(raw_labels), gzip=True)
    raw_labels.unlink()
    ds = load_idx_dir(tmp_path, "mnist")
    assert ds.x_test.shape == (5, 1, 4, 4)
    assert ds.classes == [str(i) for i in range(10)]


def test_missing_files_message(make_idx: MakeIdx, tmp_path: Path) -> None:
    make_idx(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "--data-dir DIR" in message
    assert str(tmp_path) in message
    assert "train-labels-idx1-ubyte" in message and "t10k-images-idx3-ubyte" in message
    missing_part = message.split(" in ")[0]
    assert "train-images" not in missing_part and "t10k-labels" not in missing_part


def test_missing_directory_message(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        load_fashion_mnist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_count_mismatch(make_idx: MakeIdx, tmp_path: Path) -> None:
    make_idx(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8), gzip=True)
    with pytest.raises(DataError, match="12 images but .* 11 labels"):
        load_fashion_mnist(tmp_path)


def test_label_out_of_range(make_idx: MakeIdx, tmp_path: Path) -> None:
    make_idx(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 10], np.uint8),
              gzip=True)
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9, found 10") as info:
        load_fashion_mnist(tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)


def test_wrong_image_layout(make_idx: MakeIdx, tmp_path: Path) -> None:
    make_idx(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((12, 16), np.uint8), gzip=True)
    with pytest.raises(DataError, match=r"expected uint8 images of shape \(N, H, W\)"):
        load_fashion_mnist(tmp_path)


def test_corrupt_file_named(make_idx: MakeIdx, tmp_path: Path) -> None:
    make_idx(tmp_path, gzip=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated") as info:
        load_fashion_mnist(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    ds = load_fashion_mnist()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert 0.45 < float(np.mean(ds.x_train == 0)) < 0.55
    np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 6000))


# --------------------------------------------------------------------------------------------
# MNIST-1D


@pytest.fixture
def mnist1d_data() -> ModuleType:
    return pytest.importorskip("mnist1d.data")


def test_mnist1d_shapes_and_determinism(tmp_path: Path, mnist1d_data: ModuleType) -> None:
    np.random.seed(1234)
    random.seed(1234)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(1234)
    random.seed(1234)

    a = load_mnist1d(cache_dir=tmp_path / "a")
    assert (np.random.rand(), random.random()) == (expected_np, expected_py)  # restored
    assert a.name == "mnist1d" and a.input_shape == (1, 40) and a.num_classes == 10
    assert a.x_train.shape == (4000, 1, 40) and a.x_test.shape == (1000, 1, 40)
    assert a.y_train.shape == (4000,) and a.y_test.shape == (1000,)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert set(np.unique(a.y_train)) == set(range(10))
    assert len(list((tmp_path / "a").glob("*.npz"))) == 1
    assert not list((tmp_path / "a").glob("*.tmp"))

    b = load_mnist1d(cache_dir=tmp_path / "b")  # an independent second build
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


def test_mnist1d_cache_hit(tmp_path: Path, mnist1d_data: ModuleType,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = mnist1d_data.make_dataset

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mnist1d_data, "make_dataset", counting)
    monkeypatch.setenv("KINKPROP_CACHE", str(tmp_path))
    first = load_mnist1d()
    assert len(calls) == 1
    (cached,) = tmp_path.glob("mnist1d-seed42-*.npz")
    with np.load(cached, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("make_dataset called despite a cache hit")

    monkeypatch.setattr(mnist1d_data, "make_dataset", forbidden)
    second = load_dataset("mnist1d")
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)

    # a different seed is a different cache entry; a corrupt entry is rebuilt
    monkeypatch.setattr(mnist1d_data, "make_dataset", counting)
    cached.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.warns(UserWarning, match="rebuilding"):
        third = load_mnist1d()
    assert len(calls) == 2
    np.testing.assert_array_equal(first.x_train, third.x_train)


def test_mnist1d_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(DataError, match=r"pip install 'kinkprop\[mnist1d\]'"):
        load_mnist1d()


# --------------------------------------------------------------------------------------------
# digits and the registry


def test_digits() -> None:
    pytest.importorskip("sklearn")
    ds = load_digits()
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.y_train.shape == (1437,) and ds.y_test.shape == (360,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.input_shape == (1, 8, 8)
    again = load_dataset("digits")
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    np.testing.assert_array_equal(ds.y_train, again.y_train)


def test_digits_missing_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match=r"pip install 'kinkprop\[digits\]'"):
        load_digits()


def test_registry_names() -> None:
    assert set(DATASETS) == {"fashion-mnist", "mnist1d", "digits", "mnist", "kmnist"}


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'") as info:
        load_dataset("cifar")
    for name in DATASETS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["mnist", "kmnist"])
def test_mnist_and_kmnist_need_data_dir(make_idx: MakeIdx, name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset(name)
    make_idx(tmp_path)
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.name == name and ds.x_train.shape == (12, 1, 4, 4)


def test_load_dataset_by_name(idx_dir: Path) -> None:
    ds = load_dataset("Fashion_MNIST", data_dir=idx_dir)
    assert ds.name == "fashion-mnist" and len(ds.x_train) == 12


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = ("import sys, kinkprop.data; "
            "bad = [m for m in ('sklearn', 'mnist1d') "
            "if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
