"""Fashion-MNIST read offline from the IDX files (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``).

The Debian package ``dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``; any folder
holding the four ``.gz`` files works (``--fmnist-dir``).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from .errors import DataError
from .sources import ArraySource

DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Parse one gzip-compressed IDX file into an array of its declared shape and type."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (expected magic 00 00 <type> <ndim>, got {raw[:4].hex(' ')})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header declares shape {dims} ({expected} bytes of data), "
                        f"the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def fmnist_files(root: str, split: str) -> tuple[str, str]:
    prefix = _SPLIT_PREFIX[split]
    return (os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"),
            os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))


def load_fashion_mnist(root: str = DEFAULT_FMNIST_DIR, split: str = "train") -> ArraySource:
    """Fashion-MNIST ``split`` ("train": 60000 images, "test": 10000) as an in-memory source.

    Images are uint8 ``[N, 28, 28]``; ``source.load(i)`` gives a 3-channel PIL image (grey copied to RGB).
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_path, labels_path = fmnist_files(root, split)
    missing = [p for p in (images_path, labels_path) if not os.path.isfile(p)]
    if missing:
        hint = ("install it with: sudo apt-get install dataset-fashion-mnist"
                if os.path.abspath(root) == DEFAULT_FMNIST_DIR else
                "point --fmnist-dir at a folder holding the four Fashion-MNIST .gz files")
        raise DataError(f"Fashion-MNIST not found: missing {', '.join(missing)}; {hint} "
                        f"(or train on your own images with --data PATH)")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{root}: expected images [N, H, W] and labels [N], got {images.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= len(FMNIST_CLASSES):
        raise DataError(f"{labels_path}: labels outside 0..{len(FMNIST_CLASSES) - 1}")
    return ArraySource(images, labels.astype(np.int64), list(FMNIST_CLASSES), name=f"fashion-mnist/{split}")
