"""lipkern.data: IDX and CIFAR-10 files written here byte by byte (the formats' specifications are the
oracle), read back exactly; scikit-learn's digits against sklearn itself; clear errors."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from lipkern.data import DatasetError, fit_to_size, load_dataset, read_idx


def _write_idx(path, array: np.ndarray, magic: int | None = None, extra: bytes = b""):
    """The IDX format by its specification: 0x00 0x00, type 0x08, ndim, big-endian int32 sizes, bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim if magic is None else magic)
    header += b"".join(struct.pack(">i", s) for s in array.shape)
    data = header + array.astype(np.uint8).tobytes() + extra
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _mnist_split(rng, n, size=28):
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    splits = {"train": _mnist_split(rng, 7), "test": _mnist_split(rng, 5)}
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for split, (images, labels) in splits.items():
        suffix = ".gz" if gz else ""
        _write_idx(tmp_path / (names[split][0] + suffix), images)
        _write_idx(tmp_path / (names[split][1] + suffix), labels)
    for split, (images, labels) in splits.items():
        x, y = load_dataset("mnist", root=tmp_path, split=split)
        assert x.dtype == torch.float32 and x.shape == (len(labels), 1, 28, 28)
        assert y.dtype == torch.int64
        torch.testing.assert_close(x.double(), torch.from_numpy(images[:, None] / 255.0), rtol=0, atol=1e-7)
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
        assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_mnist_torchvision_layout_and_non_square(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    _write_idx(raw / "t10k-images-idx3-ubyte", images)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([3, 9], dtype=np.uint8))
    x, y = load_dataset("mnist", root=tmp_path, split="test")
    assert torch.equal((x * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(images))
    assert y.tolist() == [3, 9]


def test_idx_errors(tmp_path):
    good = np.zeros((2, 4, 4), dtype=np.uint8)
    _write_idx(tmp_path / "bad_magic", good, magic=0x00000903)  # type 0x09 = signed byte
    with pytest.raises(DatasetError, match="magic number 0x00000903"):
        read_idx(tmp_path / "bad_magic")
    _write_idx(tmp_path / "labels_as_images", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DatasetError, match="1 dimensions, expected 3"):
        read_idx(tmp_path / "labels_as_images", expected_dims=3)
    _write_idx(tmp_path / "long", good, extra=b"\x00")
    with pytest.raises(DatasetError, match=r"shape \(2, 4, 4\) \(32 bytes of data\), the file holds 33"):
        read_idx(tmp_path / "long")
    (tmp_path / "short").write_bytes(struct.pack(">Iiii", 0x0803, 2, 4, 4) + b"\x00" * 31)
    with pytest.raises(DatasetError, match="the file holds 31"):
        read_idx(tmp_path / "short")
    (tmp_path / "fake.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="could not be read"):
        read_idx(tmp_path / "fake.gz")


def test_mnist_missing_files_and_mismatch(tmp_path):
    with pytest.raises(DatasetError, match="needs root"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset("mnist", root=tmp_path / "nowhere")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 2, 2), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte \(or .gz\) not found.*download"):
        load_dataset("mnist", root=tmp_path, split="test")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8))
    with pytest.raises(DatasetError, match="3 images but .* 2 labels"):
        load_dataset("mnist", root=tmp_path, split="test")


def _write_cifar(path, data: np.ndarray, labels: list, bytes_keys=True):
    """A CIFAR-10 python batch as the dataset ships it: a protocol-2 pickle of {b'data', b'labels', ...}."""
    batch = {b"batch_label": b"testing batch", b"data": data, b"labels": labels, b"filenames": [b"a.png"]}
    if not bytes_keys:
        batch = {k.decode(): v for k, v in batch.items()}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = []
    for name, n in [*((f"data_batch_{i}", i) for i in range(1, 6)), ("test_batch", 3)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        _write_cifar(folder / name, data, labels, bytes_keys=name != "data_batch_3")
        batches.append((data, labels))
    x, y = load_dataset("cifar10", root=tmp_path, split="train")
    expect = np.concatenate([b[0] for b in batches[:5]]).reshape(-1, 3, 32, 32)  # row-major R, G, B planes
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x.double(), torch.from_numpy(expect / 255.0), rtol=0, atol=1e-7)
    assert y.tolist() == sum((b[1] for b in batches[:5]), [])
    x, y = load_dataset("cifar10", root=folder, split="test")
    expect = torch.from_numpy(batches[5][0].reshape(-1, 3, 32, 32))
    assert torch.equal((x * 255).round().to(torch.uint8), expect)
    assert y.tolist() == batches[5][1]


def test_cifar10_errors(tmp_path):
    with pytest.raises(DatasetError, match="test_batch not found.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", root=tmp_path, split="test")
    _write_cifar(tmp_path / "test_batch", np.zeros((2, 100), dtype=np.uint8), [0, 1])
    with pytest.raises(DatasetError, match=r"\(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path, split="test")
    _write_cifar(tmp_path / "test_batch", np.zeros((2, 3072), dtype=np.uint8), [0, 12])
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 9\]"):
        load_dataset("cifar10", root=tmp_path, split="test")

    class Evil:  # a pickle that would call os.system when loaded by an unrestricted unpickler
        def __reduce__(self):
            import os
            return os.system, ("echo pwned",)

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DatasetError, match="not allowed"):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_digits_matches_sklearn_with_a_fixed_disjoint_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_train, y_train = load_dataset("digits", split="train")
    assert torch.equal(load_dataset("digits")[0], x_train)  # the default split is 'train'
    x_test, y_test = load_dataset("digits", split="test")
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    # every image of sklearn appears exactly once, in one of the two splits, with its label
    flat = np.concatenate([x_train.numpy(), x_test.numpy()]).reshape(-1, 64) * 16
    labels = np.concatenate([y_train.numpy(), y_test.numpy()])
    key = np.lexsort(np.column_stack([flat, labels]).T)
    ref_key = np.lexsort(np.column_stack([digits.data, digits.target]).T)
    np.testing.assert_array_equal(flat[key], digits.data[ref_key])
    np.testing.assert_array_equal(labels[key], digits.target[ref_key])
    assert set(y_test.tolist()) == set(range(10))
    assert torch.equal(load_dataset("digits", split="test")[0], x_test)  # deterministic


def test_bad_names():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'.*digits, mnist, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="split must be one of"):
        load_dataset("digits", split="val")
    assert isinstance(DatasetError("x"), ValueError)


def test_fit_to_size():
    x = torch.rand(2, 3, 5, 4)
    padded = fit_to_size(x, 8)
    assert padded.shape == (2, 3, 8, 8)
    assert torch.equal(padded[:, :, 1:6, 2:6], x)  # (8-5)//2 = 1 above, (8-4)//2 = 2 left
    assert float(padded.abs().sum()) == pytest.approx(float(x.abs().sum()))
    # an isometry: pairwise distances are kept
    assert torch.allclose(torch.cdist(padded.flatten(1), padded.flatten(1)),
                          torch.cdist(x.flatten(1), x.flatten(1)))
    same = torch.rand(1, 1, 4, 4)
    assert fit_to_size(same, 4) is same
    const = torch.full((1, 1, 8, 8), 0.25)
    torch.testing.assert_close(fit_to_size(const, 16, mode="resize"), torch.full((1, 1, 16, 16), 0.25))
    torch.testing.assert_close(fit_to_size(torch.full((1, 1, 28, 28), 0.5), 14, mode="resize"),
                               torch.full((1, 1, 14, 14), 0.5))
    with pytest.raises(ValueError, match="cannot pad"):
        fit_to_size(x, 4)
    with pytest.raises(ValueError, match="mode must be"):
        fit_to_size(x, 8, mode="crop")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        fit_to_size(torch.rand(3, 5, 5), 8)
