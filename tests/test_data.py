"""Data readers on small files written in the real formats; bundled data; every error names its path."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from optmech.data import DATASETS, DataFileError, DatasetNotFoundError, load
from optmech.data.bundled import read_mnist5k


def _write_idx(path, array, magic, gz=False):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _make_mnist(root, n_train=12, n_test=6, gz=False):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    out = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(root / f"{stem}-images-idx3-ubyte{ext}", images, 2051, gz)
        _write_idx(root / f"{stem}-labels-idx1-ubyte{ext}", labels, 2049, gz)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip_and_normalisation(tmp_path, gz):
    written = _make_mnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = load("mnist", root=tmp_path, split=split)
        images, labels = written[split]
        assert ds.inputs.shape == (len(labels), 1, 28, 28) and ds.inputs.dtype == torch.float32
        expected = (torch.from_numpy(images.astype(np.float32)) / 255 - 0.1307) / 0.3081
        assert torch.allclose(ds.inputs[:, 0], expected, atol=1e-6)
        assert ds.targets.tolist() == labels.tolist() and ds.input_shape == (1, 28, 28)


def test_torchvision_layout_and_fashion_root(tmp_path):
    _make_mnist(tmp_path / "MNIST" / "raw", gz=True)
    assert len(load("mnist", root=tmp_path)) == 12
    _make_mnist(tmp_path / "fm")
    ds = load("fashion-mnist", root=tmp_path / "fm", split="test")
    assert len(ds) == 6 and abs(float(ds.inputs.mean()) * 0.3530 + 0.2860 - 0.5) < 0.1


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nowhere")):
        load("mnist", root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        load("mnist", root=tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load("cifar10")


def test_truncated_and_corrupt_idx(tmp_path):
    _make_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    data = images.read_bytes()
    images.write_bytes(data[:-100])
    with pytest.raises(DataFileError, match=r"header declares shape \(12, 28, 28\)"):
        load("mnist", root=tmp_path)
    images.write_bytes(struct.pack(">I", 2049) + data[4:])
    with pytest.raises(DataFileError, match="expected IDX magic number 2051"):
        load("mnist", root=tmp_path)
    images.write_bytes(data)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), 2049)
    with pytest.raises(DataFileError, match="expected 12 labels"):
        load("mnist", root=tmp_path)


def test_truncated_gzip(tmp_path):
    _make_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DataFileError, match="t10k-labels-idx1-ubyte.gz: could not read the file"):
        load("mnist", root=tmp_path, split="test")


def _write_cifar(root, n=4):
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh)
        batches[name] = batch
    return batches


def test_cifar_pickle_reader(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    train = load("cifar10", root=tmp_path)
    assert train.inputs.shape == (20, 3, 32, 32) and len(load("cifar10", root=tmp_path, split="test")) == 4
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32).astype(np.float32) / 255
    mean = np.array(DATASETS["cifar10"]["mean"], np.float32)[:, None, None]
    std = np.array(DATASETS["cifar10"]["std"], np.float32)[:, None, None]
    assert np.allclose(train.inputs[0].numpy(), (first - mean) / std, atol=1e-5)
    assert train.targets[:4].tolist() == batches["data_batch_1"][b"labels"]


def test_cifar_corrupt_and_missing(tmp_path):
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataFileError, match="data_batch_3: could not unpickle"):
        load("cifar10", root=tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load("cifar10", root=tmp_path / "c")
    with open(tmp_path / "c" / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DataFileError, match=r"expected b'data' of shape \(N, 3072\)"):
        load("cifar10", root=tmp_path / "c", split="test")


def test_mnist5k_is_real_stratified_and_deterministic():
    images, labels = read_mnist5k()
    assert images.shape == (5000, 28, 28) and np.bincount(labels).tolist() == [500] * 10
    train, test = load("mnist5k"), load("mnist5k", split="test")
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(test.targets).tolist() == [100] * 10
    assert torch.equal(load("mnist5k", split="test").inputs, test.inputs)
    # held-out and training images are disjoint
    tr = {bytes(r) for r in train.inputs.flatten(1).numpy()}
    assert not any(bytes(r) in tr for r in test.inputs.flatten(1).numpy())


def test_mnist5k_corrupt_file(tmp_path):
    bad = tmp_path / "m.csv.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write("1,2,3\n4,5,6\n")
    read_mnist5k.cache_clear()
    with pytest.raises(DataFileError, match="expected rows of 784 pixels"):
        read_mnist5k(bad)


def test_digits():
    train, test = load("digits"), load("digits", split="test")
    assert train.input_shape == (1, 8, 8) and len(train) + len(test) == 1797
    assert abs(float(train.inputs.mean())) < 0.05


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="unknown name 'svhn'"):
        load("svhn")
    with pytest.raises(ValueError, match="split: expected one of"):
        load("digits", split="validation")
