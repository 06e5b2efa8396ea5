"""Data: image sources (ImageFolder trees, the embedded Fashion-MNIST), resumable datasets and samplers,
timm transforms."""
from .dataset import (ResumableDistributedSampler, ShardSampler, TransformedDataset, available_cpus, collate,
                      default_workers, stop_workers)
from .errors import DataError, DataWarning
from .fmnist import DEFAULT_FMNIST_DIR, FMNIST_CLASSES, load_fashion_mnist, read_idx
from .sources import ArraySource, FolderSource, Source, load_image_folder_pair, scan_image_folder
from .splits import DataSplits, load_splits
from .transforms import BatchPrep, eval_transform, train_transform

__all__ = [
    "available_cpus", "default_workers",
    "ArraySource", "BatchPrep", "DataError", "DataSplits", "DataWarning", "DEFAULT_FMNIST_DIR", "FMNIST_CLASSES",
    "FolderSource",
    "ResumableDistributedSampler", "ShardSampler", "Source", "TransformedDataset", "collate", "eval_transform",
    "load_fashion_mnist", "load_image_folder_pair", "load_splits", "read_idx", "scan_image_folder",
    "stop_workers", "train_transform",
]
