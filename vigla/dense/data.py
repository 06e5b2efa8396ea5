"""COCO-format folders for detection and semantic segmentation, and their torch datasets.

Layout of a data folder (``vigla dense data`` writes one)::

    ROOT/train/annotations.json   COCO "instances" json: images, annotations (bbox, segmentation), categories
    ROOT/train/images/            the files named by the json's ``file_name``
    ROOT/train/masks/<stem>.png   segmentation only: one uint8 PNG per image, the pixel value a category id,
                                  0 the background, 255 ignored
    ROOT/val/...                  the same

Labels are contiguous: the categories sorted by id are classes ``1..K`` (0 is the background), for the
detectors' targets and for the segmentation masks alike (a mask's category ids are mapped the same way).

A sample is read whole or not at all: an unreadable image or mask, or a mask whose size is not its image's,
becomes an error string in the batch, which the training loop skips (with a warning) or stops on
(``--strict-data``), as classification does. A missing ``masks/`` folder or mask file is told before that, when a
:class:`SegmentationDataset` is made.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vigla.data.dataset import sample_seed
from vigla.data.errors import DataError

__all__ = ["ANNOTATIONS", "CocoSplit", "DetectionDataset", "SegmentationDataset", "collate_detection",
           "collate_segmentation", "require_pycocotools", "resize_shape"]

ANNOTATIONS = "annotations.json"
IGNORE = 255


def require_pycocotools():
    """``pycocotools.mask``, or a :class:`DataError` saying how to install it."""
    try:
        from pycocotools import mask
    except ImportError:
        raise DataError("vigla dense needs pycocotools (COCO masks and mAP): pip install 'vigla[dense]' "
                        "or pip install pycocotools") from None
    return mask


def quiet():
    """pycocotools prints progress on stdout: keep it out of the run's output."""
    return contextlib.redirect_stdout(io.StringIO())


class CocoSplit:
    """One split of a COCO-format folder: its json checked on load, images and masks read on demand.

    Attributes: ``classes`` (category names, label ``i + 1`` each), ``cat_ids`` (COCO category ids in label
    order), ``images`` (the json's image entries), ``coco`` (the json as a dict), ``folder``.
    """

    def __init__(self, root: str, split: str):
        self.folder = os.path.join(root, split)
        path = os.path.join(self.folder, ANNOTATIONS)
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: a dense data folder holds {split}/{ANNOTATIONS}, {split}/images/ "
                            f"(and {split}/masks/ for segmentation); `vigla dense data` makes one (docs/dense.md)")
        try:
            with open(path) as f:
                coco = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a readable COCO json ({e})") from None
        self.path, self.coco = path, coco
        self._check_keys()
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        if not cats:
            raise DataError(f"{path}: no categories")
        self.cat_ids = [c["id"] for c in cats]
        self.classes = [str(c.get("name", c["id"])) for c in cats]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.images = coco["images"]
        if not self.images:
            raise DataError(f"{path}: no images")
        ids = {img["id"] for img in self.images}
        self.anns: dict[Any, list[dict]] = {i: [] for i in ids}
        for ann in coco["annotations"]:
            if ann.get("image_id") not in ids:
                raise DataError(f"{path}: annotation {ann.get('id')} names image_id {ann.get('image_id')!r}, "
                                f"which is not among the images")
            if ann.get("category_id") not in self.label_of:
                raise DataError(f"{path}: annotation {ann.get('id')} has category_id {ann.get('category_id')!r}, "
                                f"which is not among the categories")
            self.anns[ann["image_id"]].append(ann)

    def _check_keys(self) -> None:
        for key in ("images", "annotations", "categories"):
            if not isinstance(self.coco.get(key), list):
                raise DataError(f"{self.path}: a COCO json needs a list {key!r}")
        for img in self.coco["images"]:
            missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
            if missing:
                raise DataError(f"{self.path}: image entry {img.get('id', img)} lacks {', '.join(missing)}")
        for ann in self.coco["annotations"]:
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4):
                raise DataError(f"{self.path}: annotation {ann.get('id')} has no bbox [x, y, w, h]")

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, i: int) -> str:
        return os.path.join(self.folder, "images", self.images[i]["file_name"])

    def mask_path(self, i: int) -> str:
        stem = os.path.splitext(os.path.basename(self.images[i]["file_name"]))[0]
        return os.path.join(self.folder, "masks", stem + ".png")

    def check_masks(self) -> None:
        """A :class:`DataError` naming what is missing unless ``masks/`` holds a file for every image."""
        folder = os.path.join(self.folder, "masks")
        if not os.path.isdir(folder):
            raise DataError(f"{folder}/ not found: segmentation needs one mask PNG per image (masks/<image "
                            f"stem>.png; `vigla dense data` writes them)")
        present = set(os.listdir(folder))
        missing = [path for path in map(self.mask_path, range(len(self))) if os.path.basename(path) not in present]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            have = "has" if len(missing) == 1 else "have"
            raise DataError(f"{len(missing)} of {len(self)} images of {self.path} {have} no mask: {shown}: add the "
                            f"missing masks (masks/<image stem>.png) or leave those images out of {ANNOTATIONS}")

    def has_masks(self) -> bool:
        """Every non-crowd annotation has a segmentation (what Mask R-CNN needs)."""
        return all("segmentation" in a for anns in self.anns.values() for a in anns if not a.get("iscrowd", 0))

    def load_image(self, i: int) -> np.ndarray:
        """uint8 ``[H, W, 3]``; raises for an unreadable file or one whose size is not the json's."""
        entry = self.images[i]
        with open(self.describe(i), "rb") as f:
            img = np.array(Image.open(f).convert("RGB"))
        if img.shape[:2] != (entry["height"], entry["width"]):
            raise ValueError(f"the image is {img.shape[1]}x{img.shape[0]}, the json says "
                             f"{entry['width']}x{entry['height']}")
        return img

    def target(self, i: int, masks: bool) -> dict[str, torch.Tensor]:
        """``boxes`` float ``[N, 4]`` (x1, y1, x2, y2), ``labels`` int64 ``[N]``, ``masks`` uint8 ``[N, H, W]``
        (when asked), ``image_id``; crowd regions and boxes under a pixel wide are left out."""
        entry = self.images[i]
        h, w = entry["height"], entry["width"]
        anns = [a for a in self.anns[entry["id"]] if not a.get("iscrowd", 0) and a["bbox"][2] >= 1
                and a["bbox"][3] >= 1]
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        out = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                                      dtype=torch.int64),
               "image_id": torch.tensor(i)}
        if masks:
            out["masks"] = torch.from_numpy(np.stack([decode_segmentation(a, h, w) for a in anns]) if anns
                                            else np.zeros((0, h, w), np.uint8))
        return out

    def semantic(self, i: int) -> np.ndarray:
        """uint8 ``[H, W]`` labels: the PNG's category ids mapped to ``1..K``, 0 background, 255 ignored."""
        with open(self.mask_path(i), "rb") as f:
            raw = np.asarray(Image.open(f))
        entry = self.images[i]
        if raw.ndim != 2:
            raise ValueError(f"a mask must be a one-channel PNG, got shape {raw.shape}")
        if raw.shape != (entry["height"], entry["width"]):
            raise ValueError(f"the mask is {raw.shape[1]}x{raw.shape[0]}, its image {entry['width']}x{entry['height']}")
        lut = np.full(256, IGNORE, np.uint8)
        lut[0] = 0
        for cid, label in self.label_of.items():
            if 0 < cid < IGNORE:
                lut[cid] = label
        return lut[raw.astype(np.uint8)]


def decode_segmentation(ann: dict, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or compressed RLE) -> uint8 ``[h, w]`` mask."""
    mask = require_pycocotools()
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rle = mask.merge(mask.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask.frPyObjects(seg, h, w)
    else:
        rle = dict(seg, counts=seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"])
    return mask.decode(rle).astype(np.uint8)


def _rng(seed: Optional[int], epoch: int, index: int) -> Optional[np.random.Generator]:
    return None if seed is None else np.random.default_rng(sample_seed(seed, epoch, index))


class DetectionDataset(Dataset):
    """``dataset[(epoch, i)]`` -> (uint8 ``[3, H, W]``, target of :meth:`CocoSplit.target`, error or None).

    ``seed`` (training): a horizontal flip with probability ``hflip``, drawn from ``(seed, epoch, i)`` alone,
    so that it does not depend on workers or on where a run resumed. The detector resizes and normalizes.
    """

    def __init__(self, split: CocoSplit, masks: bool, hflip: float = 0.0, seed: Optional[int] = None):
        self.split, self.masks, self.hflip, self.seed = split, masks, hflip, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        try:
            image = torch.from_numpy(self.split.load_image(i)).permute(2, 0, 1)
            target = self.split.target(i, self.masks)
        except Exception as e:  # noqa: BLE001  (PIL, pycocotools and the size checks raise many types)
            return None, None, f"{self.split.describe(i)}: {type(e).__name__}: {e}"
        rng = _rng(self.seed, epoch, i)
        if rng is not None and rng.random() < self.hflip:
            w = image.shape[-1]
            image = image.flip(-1)
            target["boxes"] = torch.stack([w - target["boxes"][:, 2], target["boxes"][:, 1],
                                           w - target["boxes"][:, 0], target["boxes"][:, 3]], 1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image.contiguous(), target, None


def resize_shape(h: int, w: int, short: float, long_max: float) -> tuple[int, int]:
    """``(h', w')``: the shorter side ``short``, the longer at most ``long_max``, the aspect ratio kept."""
    scale = min(short / min(h, w), long_max / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


class SegmentationDataset(Dataset):
    """``dataset[(epoch, i)]`` -> (uint8 ``[3, h, w]`` resized image, int64 ``[h', w']`` labels, error or None).

    The image is resized (bilinear) to a shorter side of ``img_size`` (longer side at most ``max_size``). In
    training (``seed`` set) the size is scaled by a factor drawn from ``scale_range``, the pair is flipped with
    probability ``hflip`` and the labels are resized with it (nearest); in evaluation the labels keep the
    original resolution, where mIoU is measured.
    """

    def __init__(self, split: CocoSplit, img_size: int, max_size: int, hflip: float = 0.0,
                 scale_range: tuple[float, float] = (1.0, 1.0), seed: Optional[int] = None):
        split.check_masks()
        self.split, self.img_size, self.max_size = split, img_size, max_size
        self.hflip, self.scale_range, self.seed = hflip, scale_range, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        try:
            image, labels = self.split.load_image(i), self.split.semantic(i)
        except Exception as e:  # noqa: BLE001
            return None, None, f"{self.split.describe(i)}: {type(e).__name__}: {e}"
        rng = _rng(self.seed, epoch, i)
        factor = 1.0 if rng is None else rng.uniform(*self.scale_range)
        h, w = resize_shape(*labels.shape, self.img_size * factor, self.max_size * factor)
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        if rng is not None:
            labels = np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))
            if rng.random() < self.hflip:
                image, labels = image[:, ::-1], labels[:, ::-1]
        return (torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous(),
                torch.from_numpy(labels.astype(np.int64)), None)


def _split_errors(batch):
    ok = [b for b in batch if b[2] is None]
    return ok, [b[2] for b in batch if b[2] is not None]


def collate_detection(batch):
    """-> (list of uint8 images, list of targets, list of errors): unreadable samples are left out."""
    ok, errors = _split_errors(batch)
    return [b[0] for b in ok], [b[1] for b in ok], errors


def collate_segmentation(batch, train: bool = True):
    """-> (uint8 ``[B, 3, H, W]`` images zero-padded to the largest, labels, the images' ``(h, w)``, errors).
    Labels: in training one int64 ``[B, H, W]`` tensor padded with 255 (ignored); in evaluation the list of
    label maps at their original size. Unreadable samples are left out."""
    ok, errors = _split_errors(batch)
    if not ok:
        return None, None, [], errors
    sizes = [tuple(b[0].shape[-2:]) for b in ok]
    hmax, wmax = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.zeros(len(ok), 3, hmax, wmax, dtype=torch.uint8)
    for k, (img, _, _) in enumerate(ok):
        images[k, :, :img.shape[1], :img.shape[2]] = img
    labels = [b[1] for b in ok]
    if train:
        padded = torch.full((len(ok), hmax, wmax), IGNORE, dtype=torch.int64)
        for k, lab in enumerate(labels):
            padded[k, :lab.shape[0], :lab.shape[1]] = lab
        labels = padded
    return images, labels, sizes, errors
