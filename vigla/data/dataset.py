"""Torch datasets and samplers on top of a source, built for exact resume.

* :class:`TransformedDataset` applies a (timm) transform. With ``seed`` set, each sample's random
  augmentation is seeded by ``(seed, epoch, index)``, so it does not depend on worker count, batch order
  or where a run was resumed. A sample that fails to load is replaced by the next readable one and
  reported to the main process in the batch (third element), which counts it or stops (``--strict-data``).
* :class:`ResumableDistributedSampler` is a ``DistributedSampler`` whose keys carry the epoch and which can
  start part-way into an epoch (``skip`` samples of the global order already consumed).
* :class:`ShardSampler` splits evaluation data across ranks without padding (so no image counts twice).
"""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from .sources import Source

_MAX_REPLACEMENTS = 16


@contextmanager
def isolated_rng(seed: int):
    """Seed python / numpy / torch CPU generators for the block, then put their previous states back."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


class TransformedDataset(Dataset):
    """``dataset[i]`` or ``dataset[(epoch, i)]`` -> (transform(image), target, [load errors]).

    The transform should return a uint8 tensor ``[3, H, W]`` (timm's ``use_prefetcher=True`` transforms);
    normalisation happens on the device, batched (:class:`vigla.data.transforms.BatchPrep`).
    """

    def __init__(self, source: Source, transform, seed: int | None = None):
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        errors = []
        for attempt in range(_MAX_REPLACEMENTS):
            j = (index + attempt) % len(self.source)
            try:
                image = self.source.load(j)
                break
            except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files)
                errors.append(f"{self.source.describe(j)}: {type(e).__name__}: {e}")
        else:
            raise RuntimeError(f"{_MAX_REPLACEMENTS} unreadable images in a row from {self.source.describe(index)} on: "
                               + "; ".join(errors[:3]))
        if self.seed is None:
            return self.transform(image), int(self.source.targets[j]), errors
        with isolated_rng(sample_seed(self.seed, epoch, index)):
            return self.transform(image), int(self.source.targets[j]), errors


def collate(batch):
    """-> (uint8 images ``[B, 3, H, W]``, int64 targets ``[B]``, list of load errors in this batch)."""
    images, targets, errors = zip(*batch)
    return torch.stack(images), torch.tensor(targets, dtype=torch.int64), [e for errs in errors for e in errs]


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (same seeding, shuffling and padding) that yields ``(epoch, index)`` keys and can
    skip the first ``skip`` samples of the epoch's global order (``skip`` = batches done x global batch).

    Samples are dealt to ranks after skipping, so a resume with a different number of processes still sees
    each remaining sample once; with the same number of processes every rank gets exactly the batches it
    would have had. The per-rank tail is trimmed so that all ranks have the same count.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def _global_order(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        pad = self.total_size - n
        order += (order * (pad // n + 1))[:pad]
        rest = order[self.skip:]
        return rest[:len(rest) - len(rest) % self.num_replicas]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self._global_order()[self.rank::self.num_replicas]])

    def __len__(self) -> int:
        return max(0, self.total_size - self.skip) // self.num_replicas


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...``: every sample once across ranks, no padding."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        self.n, self.num_replicas, self.rank = n, num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))
