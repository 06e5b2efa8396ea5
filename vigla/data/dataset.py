"""Torch datasets and samplers on top of a source, built for exact resume.

* :class:`TransformedDataset` applies a (timm) transform. With ``seed`` set, each sample's random
  augmentation is seeded by ``(seed, epoch, index)``, so it does not depend on worker count, batch order
  or where a run was resumed. A sample that fails to load is reported to the main process in the batch
  (third element), which counts it or stops (``--strict-data``); for training it is replaced by the next
  readable one (the batch keeps its size), for evaluation it is left out (no image counts twice).
* :class:`ResumableDistributedSampler` is a ``DistributedSampler`` whose keys carry the epoch and which can
  start part-way into an epoch (``skip`` samples of the global order already consumed).
* :class:`ShardSampler` splits evaluation data across ranks without padding (so no image counts twice).
* :func:`stop_workers` ends a loader's worker processes at once, on any path out of a run.
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from .sources import Source

_MAX_REPLACEMENTS = 16
#: loader processes per device by default: one per spare core up to this (15 workers fed a replayed ViG-T
#: training step at 224 twice as fast as 8 on a 16-core H200 host, benchmarks/results/train_cuda_graph*.json)
MAX_DEFAULT_WORKERS = 16


def available_cpus() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(processes: int = 1) -> int:
    """Loader processes for each of ``processes`` processes on this machine: one per spare core, at most
    :data:`MAX_DEFAULT_WORKERS`, at least one."""
    return min(MAX_DEFAULT_WORKERS, max(1, available_cpus() // processes - 1))


@contextmanager
def isolated_rng(seed: int):
    """Seed python / numpy / torch CPU generators for the block, then put their previous states back.

    Only the CPU generator: ``torch.manual_seed`` would also queue a CUDA seeding in a process that has not
    initialised CUDA, formatting the caller's stack each time (about half a CPU loader's time per image)."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
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
    With ``replace_unreadable=False`` an unreadable image gives ``(None, -1, [its error])``, which
    :func:`collate` leaves out of the batch.
    """

    def __init__(self, source: Source, transform, seed: int | None = None, replace_unreadable: bool = True):
        self.source, self.transform, self.seed = source, transform, seed
        self.replace_unreadable = replace_unreadable

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        errors = []
        if not self.replace_unreadable:
            try:
                image = self.source.load(index)
            except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files)
                return None, -1, [f"{self.source.describe(index)}: {type(e).__name__}: {e}"]
            return self.transform(image), int(self.source.targets[index]), errors
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
    """-> (uint8 images ``[B, 3, H, W]``, int64 targets ``[B]``, list of load errors in this batch).

    Samples without an image (unreadable, see :class:`TransformedDataset`) are left out: ``B`` may be smaller
    than the batch, or 0."""
    errors = [e for _, _, errs in batch for e in errs]
    kept = [(image, target) for image, target, _ in batch if image is not None]
    if not kept:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), errors
    images, targets = zip(*kept)
    return torch.stack(images), torch.tensor(targets, dtype=torch.int64), errors


def stop_workers(loader: DataLoader) -> None:
    """End the worker processes of ``loader`` (a persistent iterator's) now, not when the garbage collector
    gets to them: the graceful shutdown of PyTorch, then SIGKILL for a worker still alive (loader workers
    ignore SIGTERM, see ``vigla.engine.run``). Without this, an exception that keeps the iterator
    referenced from its traceback leaves the process waiting for its workers at exit."""
    it = getattr(loader, "_iterator", None)
    if it is None:
        return
    workers = list(getattr(it, "_workers", []))
    try:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(1.0)
        loader._iterator = None


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
