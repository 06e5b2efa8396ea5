"""Image sources: indexable collections of (PIL image, class index) before any transform.

A source has ``classes``, ``targets`` (int64 ``[N]``), ``name``, ``load(i) -> PIL.Image`` (RGB) and
``describe(i)`` (what to name in an error: a path, or ``name[i]``). Loading may raise for a corrupt
file; the training dataset (``vigla.data.dataset``) decides whether to skip or stop.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from .errors import DataError, DataWarning

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class Source:
    classes: list[str]
    targets: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def select(self, indices) -> "Source":
        """The sub-source of the given indices (in that order)."""
        return SubsetSource(self, np.asarray(indices, dtype=np.int64))


class ArraySource(Source):
    """In-memory uint8 images ``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (RGB), or a list of such arrays."""

    def __init__(self, images, targets, classes, name: str = "array"):
        self.images, self.targets, self.classes, self.name = images, np.asarray(targets, np.int64), classes, name
        if len(self.images) != len(self.targets):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} targets")

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")


class SubsetSource(Source):
    def __init__(self, base: Source, indices: np.ndarray):
        self.base, self.indices = base, indices
        self.classes, self.targets, self.name = base.classes, base.targets[indices], base.name

    def load(self, i: int) -> Image.Image:
        return self.base.load(int(self.indices[i]))

    def describe(self, i: int) -> str:
        return self.base.describe(int(self.indices[i]))


class FolderSource(Source):
    """``root/<class>/<image>`` files, decoded lazily (or all at once with :meth:`decode_all`)."""

    def __init__(self, paths: list[str], targets, classes: list[str], name: str):
        self.paths, self.targets, self.classes, self.name = paths, np.asarray(targets, np.int64), classes, name

    def load(self, i: int) -> Image.Image:
        with open(self.paths[i], "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # convert() forces the decode, so a corrupt file raises here

    def describe(self, i: int) -> str:
        return self.paths[i]

    def decode_all(self, threads: int, strict: bool) -> ArraySource:
        """Decode every image once into memory (uint8 RGB arrays); unreadable files are dropped with a warning,
        or raise :class:`DataError` when ``strict``."""
        def decode(i):
            try:
                return np.asarray(self.load(i)), None
            except Exception as e:  # noqa: BLE001  (PIL raises many types for bad files)
                return None, f"{self.paths[i]}: {e}"

        with ThreadPoolExecutor(max(1, threads)) as pool:
            results = list(pool.map(decode, range(len(self))))
        bad = [err for _, err in results if err is not None]
        if bad and strict:
            raise DataError(f"unreadable image {bad[0]} (--strict-data stops at the first bad file)")
        if bad:
            warnings.warn(f"{self.name}: skipped {len(bad)} unreadable image(s), e.g. {bad[0]}", DataWarning,
                          stacklevel=2)
        keep = [i for i, (arr, _) in enumerate(results) if arr is not None]
        if not keep:
            raise DataError(f"{self.name}: none of the {len(self)} images could be read")
        return ArraySource([results[i][0] for i in keep], self.targets[keep], self.classes, name=self.name)


def scan_image_folder(root: str, require_all_classes: bool = True) -> FolderSource:
    """List ``root/<class>/**/<image>``; classes are the sorted sub-folder names. A class folder without images is a
    :class:`DataError`, or with ``require_all_classes=False`` (an evaluation folder) a :class:`DataWarning`."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} does not exist (expected {root}/<class name>/<image files>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders (expected {root}/<class name>/<image files>)")
    paths, targets, empty = [], [], []
    seen = {os.path.realpath(root): root}
    for c, cls in enumerate(classes):
        found = sorted(_list_images(os.path.join(root, cls), seen))
        if not found:
            empty.append(cls)
        paths += found
        targets += [c] * len(found)
    if not paths:
        raise DataError(f"{root}: no image files in its {len(classes)} class folders "
                        f"(looked for {', '.join(IMG_EXTENSIONS)})")
    if empty:
        msg = f"{root}: class folder(s) without images: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}"
        if require_all_classes:
            raise DataError(msg)
        warnings.warn(f"{msg}; the accuracy covers the other classes only (add images to measure these too)",
                      DataWarning, stacklevel=2)
    return FolderSource(paths, targets, classes, name=root)


def _list_images(folder: str, seen: dict[str, str]) -> list[str]:
    """The image files under ``folder``, symbolic links followed. ``seen`` maps the real path of every folder
    listed so far to its name; a folder reached twice (a link back up the tree, or into another class
    folder) would count images twice or under the wrong class, and is a :class:`DataError`."""
    found = []
    for d, _, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            raise DataError(f"{d} is the folder {seen[real]} again (a symbolic link back up the tree or into "
                            f"another class folder): its images would count twice or under the wrong class; "
                            f"remove the link")
        seen[real] = d
        found += [os.path.join(d, f) for f in files if f.lower().endswith(IMG_EXTENSIONS)]
    return found


def load_image_folder_pair(root: str) -> tuple[FolderSource, FolderSource]:
    """``root/train`` and ``root/val`` as sources; their class folders must be the same."""
    if not os.path.isdir(root):
        raise DataError(f"--data {root}: no such folder (expected {root}/train/<class>/... and {root}/val/<class>/...)")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"--data {root}: missing the {split}/ folder (expected {root}/train/<class>/... "
                            f"and {root}/val/<class>/...)")
    train = scan_image_folder(os.path.join(root, "train"))
    if len(train.classes) < 2:
        raise DataError(f"--data {root}: train/ has one class folder ({train.classes[0]}); a classifier needs at "
                        f"least two")
    val = scan_image_folder(os.path.join(root, "val"), require_all_classes=False)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"--data {root}: class folders differ between train/ and val/: "
                        f"only in train/: {only_train or 'none'}; only in val/: {only_val or 'none'}")
    return train, val
