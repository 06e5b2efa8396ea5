"""The three splits a training run uses: train, val (checked every epoch) and test (checked at the end)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .fmnist import load_fashion_mnist
from .sources import Source, load_image_folder_pair


@dataclass
class DataSplits:
    train: Source
    val: Source
    test: Source
    name: str  # "fashion-mnist" or the folder path

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def _subset(source: Source, n: int, rng: np.random.Generator) -> Source:
    if n <= 0 or n >= len(source):
        return source
    return source.select(np.sort(rng.permutation(len(source))[:n]))


def load_splits(data: str | None, *, fmnist_dir: str, train_subset: int = 0, val_subset: int = 0,
                test_subset: int = 0, seed: int = 0, in_memory: bool = False, strict: bool = False,
                threads: int = 8) -> DataSplits:
    """Fashion-MNIST (``data=None``) or an ImageFolder tree ``data/{train,val}/<class>/<images>``.

    Fashion-MNIST: val is ``val_subset`` images held out of the training file (none: the test set), and
    train is ``train_subset`` of the rest (0: all); test is the 10000-image test file.
    ImageFolder: val is ``val_subset`` images of ``val/`` (0: all), test is all of ``val/``.
    ``test_subset`` > 0 tests on that many images only. Subsets are fixed by ``seed``.
    """
    rng = np.random.default_rng(seed)
    if data is None:
        full, test = load_fashion_mnist(fmnist_dir, "train"), load_fashion_mnist(fmnist_dir, "test")
        order = rng.permutation(len(full))
        if val_subset >= len(full):
            raise DataError(f"--val-subset {val_subset} leaves no Fashion-MNIST training images (it has {len(full)})")
        val = full.select(np.sort(order[:val_subset])) if val_subset > 0 else test
        rest = order[val_subset:]
        train = full.select(np.sort(rest[:train_subset] if train_subset > 0 else rest))
        return DataSplits(train, val, _subset(test, test_subset, rng), "fashion-mnist")
    train, test = load_image_folder_pair(data)
    if in_memory:
        train, test = train.decode_all(threads, strict), test.decode_all(threads, strict)
    train = _subset(train, train_subset, rng)
    return DataSplits(train, _subset(test, val_subset, rng), _subset(test, test_subset, rng), data)
