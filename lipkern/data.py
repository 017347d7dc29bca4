"""Datasets for ``lipkern train`` and ``lipkern certify``: in-memory tensors, no download.

- ``"digits"`` (default): scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), pixel
  values 0..16 scaled by 1/16; a fixed train/test split (1,437 / 360 images) from a seeded permutation
  (``numpy.random.RandomState(0)``, whose stream NumPy keeps stable across versions).
- ``"mnist"``: the four IDX files of MNIST (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``) in ``root`` (or in
  ``root/MNIST/raw``, torchvision's layout). The IDX header is parsed here: magic number (two zero bytes, the
  type code 0x08 = unsigned byte, the number of dimensions), big-endian int32 sizes, then the data, whose
  length must match.
- ``"cifar10"``: the python version of CIFAR-10 (``data_batch_1`` … ``data_batch_5``, ``test_batch``) in
  ``root`` (or ``root/cifar-10-batches-py``). The batches are pickles; they are read with an unpickler that
  accepts only the NumPy array reconstruction the files need, so a tampered file cannot run code.

:func:`load_dataset` returns ``(x, y)``: x float32 (N, C, H, W) with values in [0, 1], y int64 (N,).
:func:`fit_to_size` zero-pads (centered) or resizes images to a model's input size.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "DATASET_CLASSES", "DatasetError", "fit_to_size", "load_dataset", "read_idx",
           "read_torch_file"]

DATASETS = ("digits", "mnist", "cifar10")
DATASET_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10}
SPLITS = ("train", "test")
DIGITS_TEST_SIZE = 360
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/ (or http://yann.lecun.com/exdb/mnist/)"
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it; point root at the folder)"
_IDX_UBYTE = 0x08


class DatasetError(ValueError):
    """A dataset that cannot be loaded: unknown name, missing or malformed files (the message says which)."""


# --- IDX (MNIST) --------------------------------------------------------------------------------------------
def read_idx(path, expected_dims: int | None = None) -> np.ndarray:
    """An unsigned-byte IDX file (gzip-compressed when the name ends in .gz) as a uint8 array of its shape.

    Raises :class:`DatasetError` for a bad magic number (not two zero bytes, a type other than 0x08, or
    another number of dimensions than ``expected_dims``) and for data shorter or longer than the header says.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: could not be read ({err})") from None
    if len(raw) < 4:
        raise DatasetError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero0, zero1, type_code, ndim = raw[:4]
    magic = int.from_bytes(raw[:4], "big")
    if zero0 or zero1 or type_code != _IDX_UBYTE or ndim == 0:
        raise DatasetError(f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x000008NN: unsigned "
                           f"bytes, "
                           f"NN dimensions); not an uncompressed IDX file of bytes")
    if expected_dims is not None and ndim != expected_dims:
        raise DatasetError(f"{path}: IDX magic number 0x{magic:08x} says {ndim} dimensions, expected "
                           f"{expected_dims} (0x{0x800 + expected_dims:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} sizes expected)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: the header says shape {shape} ({expected} bytes of data), the file "
                           f"holds "
                           f"{len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, name: str, subdirs: tuple[str, ...], gz: bool) -> Path | None:
    for folder in (root, *(root / s for s in subdirs)):
        for candidate in ((name, name + ".gz") if gz else (name,)):
            if (folder / candidate).is_file():
                return folder / candidate
    return None


def _require_root(name: str, root, url: str) -> Path:
    if root is None:
        raise DatasetError(f"dataset {name!r} needs root=<folder with its files> (--data-root); get them "
                           f"from "
                           f"{url}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset {name!r}: root {root} is not a directory")
    return root


def _split_files(dataset: str, root, split: str, files, subdir: str, url: str, gz: bool) -> list[Path]:
    """The paths of a split's files under ``root`` or ``root/subdir`` (``.gz`` too when ``gz``), or a
    DatasetError naming every missing file and where to download it."""
    root = _require_root(dataset, root, url)
    paths = [_find(root, f, (subdir,), gz=gz) for f in files]
    missing = [f for f, p in zip(files, paths) if p is None]
    if missing:
        raise DatasetError(f"{dataset} {split} split: {', '.join(missing)}{' (or .gz)' if gz else ''} not found "
                           f"in {root} or {root / subdir}; download them from {url}")
    return paths


def _load_mnist(root, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = _split_files("mnist", root, split, MNIST_FILES[split], "MNIST/raw", MNIST_URL, gz=True)
    images, labels = read_idx(paths[0], expected_dims=3), read_idx(paths[1], expected_dims=1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"mnist: {paths[0]} holds {images.shape[0]} images but {paths[1]} "
                           f"{labels.shape[0]} labels")
    return images[:, None], labels


# --- CIFAR-10 python batches --------------------------------------------------------------------------------
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays only (what the CIFAR batches contain)."""

    def find_class(self, module, name):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as err:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: a CIFAR-10 batch is a dict, found {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(f"{path}: a CIFAR-10 batch has keys 'data' and 'labels', found {sorted(batch)}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: 'labels' must be {data.shape[0]} integers, got {labels.dtype} "
                           f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: labels must lie in [0, 9], found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = _split_files("cifar10", root, split, CIFAR10_FILES[split], "cifar-10-batches-py", CIFAR10_URL,
                         gz=False)
    batches = [_cifar_batch(p) for p in paths]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


# --- digits -------------------------------------------------------------------------------------------------
def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("dataset 'digits' needs scikit-learn: pip install 'lipkern[data]' (or pip install "
                           "scikit-learn)") from None
    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    keep = order[-DIGITS_TEST_SIZE:] if split == "test" else order[:-DIGITS_TEST_SIZE]
    return digits.images[keep, None] / 16.0, digits.target[keep]


# --- public -------------------------------------------------------------------------------------------------
def load_dataset(name: str = "digits", root=None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``split`` ('train' | 'test') of dataset ``name`` ('digits' | 'mnist' | 'cifar10') as tensors.

    Returns x float32 (N, C, H, W) in [0, 1] (digits: (N, 1, 8, 8); mnist: (N, 1, 28, 28); cifar10:
    (N, 3, 32, 32)) and y int64 (N,). ``root`` is the folder holding the files of 'mnist' / 'cifar10' (unused
    by 'digits'). Raises :class:`DatasetError` (a ValueError) naming the problem: unknown name or split,
    missing files (with where to get them), bad IDX magic numbers or sizes, malformed CIFAR batches.
    """
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    name = name.lower()
    if name == "digits":
        images, labels = _load_digits(split)
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    else:
        images, labels = (_load_mnist if name == "mnist" else _load_cifar10)(root, split)
        x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)  # a writable copy
    return x, torch.from_numpy(np.array(labels, dtype=np.int64))


def fit_to_size(x: torch.Tensor, size: int, mode: str = "pad") -> torch.Tensor:
    """Images (N, C, H, W) brought to (N, C, size, size).

    mode='pad': zero padding around the image, centered (an isometry: distances between inputs, hence
    certified radii, are those of the original images); only for size >= H, W. mode='resize': bilinear
    interpolation (antialiased when shrinking), which changes the input metric: a radius certified on resized
    inputs is not one on the originals.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"fit_to_size: x must be an (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"fit_to_size: size must be a positive int, got {size!r}")
    height, width = x.shape[-2:]
    if (height, width) == (size, size):
        return x
    if mode == "pad":
        if size < height or size < width:
            raise ValueError(f"fit_to_size: cannot pad {height}×{width} images to {size}×{size} (smaller); "
                             f"use "
                             f"mode='resize'")
        top, left = (size - height) // 2, (size - width) // 2
        return F.pad(x, (left, size - width - left, top, size - height - top))
    if mode == "resize":
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=size < max(height, width))
    raise ValueError(f"fit_to_size: mode must be 'pad' or 'resize', got {mode!r}")


def read_torch_file(path, label: str, error: type[Exception] = ValueError):
    """``torch.load(path, map_location="cpu", weights_only=True)``; a missing or unreadable file raises
    ``error`` with ``label`` (e.g. "--data FILE") and the reason."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{label}: no such file") from None
    except IsADirectoryError:
        raise error(f"{label} is a folder, not a file") from None
    except Exception as err:  # pickle errors, weights_only refusals, ...
        raise error(f"{label} {_why_unreadable(path, err)}") from None


def _why_unreadable(path, err: Exception) -> str:
    """Why torch.load(weights_only=True) could not read ``path``, in words (not PyTorch's advice to load
    arbitrary pickles with weights_only=False: lipkern never does that)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as os_err:
        return f"could not be read: {os_err}"
    if not head:
        return "is empty (0 bytes): not a file written by torch.save"
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip archive, or a legacy pickle
        kind = ", text: JSON?" if head.lstrip()[:1] in (b"{", b"[") else ""
        return f"is not a file written by torch.save (it starts with {head[:16]!r}{kind})"
    message = str(err)
    if "weights only" in message.lower() or "weights_only" in message:
        return ("holds Python objects besides tensors and plain containers; lipkern reads files with "
                "torch.load(weights_only=True) only (a file of tensors, dicts, lists and numbers)")
    first = message.split(". ")[0].splitlines()[0] if message else type(err).__name__
    if "zip archive" in message:
        return f"is a damaged or truncated torch.save file ({first})"
    return f"could not be read with torch.load(weights_only=True): {first}"
