"""A small detection / segmentation data set made from real photos: Imagenette objects pasted onto canvases.

The layout is synthetic, the pixels are real. Each canvas (``canvas`` x ``canvas`` px) is:

* a background: a random crop (half to all of its side) of a random photo of the pool, resized to the canvas
  and blurred (Gaussian, radius ``canvas / 128``) so that its own subject reads as clutter, not as an object;
* 1 to ``max_objects`` objects: each the centre of a photo (a square crop of 55-90% of its side, so the subject,
  which Imagenette photos centre, is mostly inside) cut out by the **ellipse** inscribed in that crop,
  resized to a side of ``min_scale``-``max_scale`` x the canvas with an aspect ratio in [3/4, 4/3], and pasted
  at a random position inside the canvas. A placement that would cover more than ``max_overlap`` of a
  smaller box (or be covered that much) is drawn again, up to 30 times, then dropped.

The class of an object is its photo's class. Objects pasted later hide the earlier ones: every annotation is
the *visible* part of its ellipse (its mask, its pixel area, and its box: the tight box of that mask), so
boxes and masks are exact. Each split draws its photos from the matching Imagenette split (train from
``train/``, val from ``val/``), so no photo is in both.

Written per split (see :mod:`vigla.dense.data`): ``images/NNNNNN.jpg`` (JPEG quality 95),
``masks/NNNNNN.png`` (the category id of each pixel's visible object, 0 for the background) and
``annotations.json`` (COCO: boxes, RLE masks, areas, categories, and an ``info`` entry recording the
generator's settings), the json last, so that a folder with a json is complete. Canvas ``i`` of a split
depends only on ``(seed, split, i)`` and the photo pool: the same command writes the same files.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vigla.data.errors import DataError

from .data import ANNOTATIONS, require_pycocotools

__all__ = ["IMAGENETTE_CLASSES", "ComposeSettings", "PhotoPool", "compose_canvas", "imagenette_pool",
           "check_free", "make_dataset", "split_sizes", "write_split"]

#: Imagenette's wnids -> class names, in label order
IMAGENETTE_CLASSES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck",
    "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute",
}
_SPLIT_CODES = {"train": 0, "val": 1}
_TRIES = 30


@dataclass(frozen=True)
class ComposeSettings:
    canvas: int = 384
    max_objects: int = 4
    min_scale: float = 0.15
    max_scale: float = 0.5
    max_overlap: float = 0.3
    seed: int = 0

    def check(self) -> None:
        if self.canvas < 32:
            raise ValueError(f"canvas must be at least 32 px, got {self.canvas}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")
        if not 0 <= self.max_overlap <= 1:
            raise ValueError(f"max_overlap must be in [0, 1], got {self.max_overlap}")


class PhotoPool:
    """Photos with a class: ``len``, ``load(i) -> PIL RGB image``, ``labels[i]`` (0-based), ``classes``."""

    def __init__(self, loaders: Sequence[Callable[[], Image.Image]], labels: Sequence[int], classes: list[str],
                 name: str):
        if not loaders:
            raise DataError(f"{name}: no photos")
        self._loaders, self.labels, self.classes, self.name = list(loaders), list(labels), classes, name

    def __len__(self) -> int:
        return len(self._loaders)

    def load(self, i: int) -> Image.Image:
        return self._loaders[i]().convert("RGB")


def imagenette_pool(root: str, split: str) -> PhotoPool:
    """The photos of one Imagenette split, from its tar shards (``train-*.tar`` / ``val.tar``, read in place)
    or an unpacked folder (``root/<split>/<wnid>/*``), in sorted path order."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"--imagenette {root}: no such folder (give the folder holding Imagenette's tar shards "
                        f"or its unpacked train/ and val/)")
    tars = sorted(root_path.glob(f"{split}*.tar"))
    entries: list[tuple[str, Callable[[], Image.Image]]] = []
    if tars:
        for tar_path in tars:
            entries += _tar_entries(tar_path, split)
    elif (root_path / split).is_dir():
        for path in sorted((root_path / split).glob("*/*")):
            if path.parent.name in IMAGENETTE_CLASSES and path.is_file():
                entries.append((str(path.relative_to(root_path)), lambda p=path: _open(p.read_bytes())))
    if not entries:
        raise DataError(f"--imagenette {root}: no {split} photos (expected {split}*.tar shards or "
                        f"{split}/<wnid>/ folders of Imagenette's ten classes)")
    entries.sort(key=lambda e: e[0])
    wnids = list(IMAGENETTE_CLASSES)
    labels = [wnids.index(Path(name).parent.name) for name, _ in entries]
    return PhotoPool([load for _, load in entries], labels, list(IMAGENETTE_CLASSES.values()),
                     f"imagenette {split}")


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _tar_entries(tar_path: Path, split: str) -> list[tuple[str, Callable[[], Image.Image]]]:
    try:
        with tarfile.open(tar_path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(f"{split}/")
                       and Path(m.name).parent.name in IMAGENETTE_CLASSES]
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{tar_path}: not a readable tar file ({e})") from None
    handle: dict[str, tarfile.TarFile] = {}

    def loader(member: tarfile.TarInfo) -> Callable[[], Image.Image]:
        def load() -> Image.Image:
            if "tar" not in handle:  # one open file per process (pools may run in worker processes)
                handle["tar"] = tarfile.open(tar_path)
            return _open(handle["tar"].extractfile(member).read())
        return load

    return [(m.name, loader(m)) for m in members]


def _ellipse(w: int, h: int) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse((0, 0, w - 1, h - 1), fill=255)
    return mask


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], limit: float) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in boxes:
        iw, ih = min(x1, a1) - max(x0, a0), min(y1, b1) - max(y0, b0)
        if iw > 0 and ih > 0:
            smaller = min((x1 - x0) * (y1 - y0), (a1 - a0) * (b1 - b0))
            if iw * ih > limit * smaller:
                return True
    return False


def compose_canvas(pool: PhotoPool, settings: ComposeSettings, rng: np.random.Generator
                   ) -> tuple[Image.Image, list[tuple[int, np.ndarray]]]:
    """One canvas -> (RGB image, [(0-based class, visible mask bool ``[canvas, canvas]``), ...]) in paste
    order; objects hidden entirely by later ones are left out."""
    c = settings.canvas
    bg = pool.load(int(rng.integers(len(pool))))
    side = min(bg.size) * rng.uniform(0.5, 1.0)
    x0, y0 = rng.uniform(0, bg.size[0] - side), rng.uniform(0, bg.size[1] - side)
    canvas = bg.resize((c, c), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    canvas = canvas.filter(ImageFilter.GaussianBlur(c / 128))
    placed, boxes = [], []
    for _ in range(int(rng.integers(1, settings.max_objects + 1))):
        i = int(rng.integers(len(pool)))
        photo = pool.load(i)
        crop = min(photo.size) * rng.uniform(0.55, 0.9)
        cx = photo.size[0] / 2 + rng.uniform(-0.05, 0.05) * photo.size[0]
        cy = photo.size[1] / 2 + rng.uniform(-0.05, 0.05) * photo.size[1]
        crop_box = (cx - crop / 2, cy - crop / 2, cx + crop / 2, cy + crop / 2)
        for _ in range(_TRIES):
            size = rng.uniform(settings.min_scale, settings.max_scale) * c
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w, h = max(2, min(c, round(size * aspect ** 0.5))), max(2, min(c, round(size / aspect ** 0.5)))
            x, y = int(rng.integers(0, c - w + 1)), int(rng.integers(0, c - h + 1))
            if not _overlaps((x, y, x + w, y + h), boxes, settings.max_overlap):
                break
        else:
            continue
        obj = photo.resize((w, h), Image.BILINEAR, box=crop_box)
        ellipse = _ellipse(w, h)
        canvas.paste(obj, (x, y), ellipse)
        full = np.zeros((c, c), bool)
        full[y:y + h, x:x + w] = np.asarray(ellipse) > 0
        for _, mask in placed:
            mask &= ~full
        placed.append((pool.labels[i], full))
        boxes.append((x, y, x + w, y + h))
    return canvas, [(label, mask) for label, mask in placed if mask.any()]


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray, mask_api) -> dict:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()),
            "segmentation": {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode()}}


def write_split(pool: PhotoPool, out: str, split: str, count: int, settings: ComposeSettings,
                info: Optional[dict] = None, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Write ``count`` canvases of ``split`` into ``out/split/`` (images, masks, annotations.json) -> the json.

    Category ids are ``1..len(pool.classes)``, in the pool's class order."""
    from vigla.bench.report import write_json

    settings.check()
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_CODES)}, got {split!r}")
    mask_api = require_pycocotools()
    check_free(out, [split])
    folder = Path(out) / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([settings.seed, _SPLIT_CODES[split], i])
        canvas, objects = compose_canvas(pool, settings, rng)
        name = f"{i:06d}"
        canvas.save(folder / "images" / f"{name}.jpg", quality=95)
        semantic = np.zeros((settings.canvas, settings.canvas), np.uint8)
        for label, mask in objects:
            semantic[mask] = label + 1
            annotations.append(_annotation(len(annotations) + 1, i, label + 1, mask, mask_api))
        Image.fromarray(semantic).save(folder / "masks" / f"{name}.png")
        images.append({"id": i, "file_name": f"{name}.jpg", "width": settings.canvas, "height": settings.canvas})
        if progress is not None:
            progress(1)
    coco = {"info": {"description": "synthetic layout, real photos: objects cut from photos by an ellipse and "
                                    "pasted onto blurred photo backgrounds (vigla.dense.synth)",
                     "source": pool.name, "split": split, "settings": asdict(settings), **(info or {})},
            "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": name} for k, name in enumerate(pool.classes)]}
    write_json(coco, folder / ANNOTATIONS)
    return coco


def check_free(out: str, splits: list[str]) -> None:
    """Raise :class:`DataError` when a split of ``out`` holds a data set already (its json)."""
    for split in splits:
        if (Path(out) / split / ANNOTATIONS).exists():
            raise DataError(f"{Path(out) / split} already holds a data set ({ANNOTATIONS}): choose another --out")


def split_sizes(train: int, val: int) -> dict[str, int]:
    if train < 1 or val < 1:
        raise ValueError(f"--train and --val must be at least 1, got {train} and {val}")
    return {"train": train, "val": val}


def make_dataset(pools: dict[str, PhotoPool], out: str, sizes: dict[str, int], settings: ComposeSettings,
                 info: Optional[dict] = None, progress: Optional[Callable[[int], None]] = None) -> dict[str, int]:
    """Every split of ``sizes`` from its pool -> {split: annotations written}. The pools must share classes."""
    classes = {tuple(p.classes) for p in pools.values()}
    if len(classes) != 1:
        raise DataError("the photo pools of the splits have different classes")
    check_free(out, list(sizes))
    os.makedirs(out, exist_ok=True)
    return {split: len(write_split(pools[split], out, split, n, settings, info, progress)["annotations"])
            for split, n in sizes.items()}
