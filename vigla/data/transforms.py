"""timm transforms, wired for vigla: per-sample PIL work on the loader side (crop, flip, RandAugment),
uint8 out; normalisation and RandomErasing batched on the device (as timm's prefetcher does)."""
from __future__ import annotations

import torch
from PIL import Image
from timm.data import auto_augment as timm_augment, create_transform
from timm.data.random_erasing import RandomErasing


def train_transform(img_size: int, *, scale_min: float, hflip: float, color_jitter: float, auto_augment: str | None,
                    interpolation: str, mean, std):
    """RandomResizedCrop(img_size, scale=(scale_min, 1)) + flip + RandAugment (or colour jitter) -> uint8 ``[3, H, W]``.

    timm skips colour jitter when RandAugment is on, as in the ViG recipe."""
    transform = create_transform(img_size, is_training=True, scale=(scale_min, 1.0), hflip=hflip,
                                 color_jitter=color_jitter or None, auto_augment=auto_augment or None,
                                 interpolation=interpolation, mean=mean, std=std, use_prefetcher=True)
    for op in _augment_ops(transform):
        if op.aug_fn is timm_augment.posterize:
            op.aug_fn = posterize
    return transform


def _augment_ops(transform) -> list:
    """The ``AugmentOp``s of timm's RandAugment / AutoAugment / AugMix inside ``transform`` (a Compose)."""
    ops = []
    for t in getattr(transform, "transforms", [transform]):
        ops += list(getattr(t, "ops", []))
        for sub in getattr(t, "policy", []):
            ops += list(sub) if isinstance(sub, (list, tuple)) else [sub]
    return [op for op in ops if hasattr(op, "aug_fn")]


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize with 0 bits kept giving a black image, as Pillow did before 13 (which refuses 0 bits):
    timm's increasing posterize keeps 4 - 4 * magnitude / 10 bits, 0 at magnitude 10, which the recipe's
    ``rand-m9-mstd0.5`` draws (a ValueError in the loader a few epochs into a run)."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return timm_augment.posterize(img, bits_to_keep, **kwargs)


def eval_transform(img_size: int, *, crop_pct: float, interpolation: str, mean, std):
    """Resize the short side to ``img_size / crop_pct``, centre-crop ``img_size`` -> uint8 ``[3, H, W]``."""
    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=mean, std=std, use_prefetcher=True)


class BatchPrep:
    """On the device: uint8 ``[B, 3, H, W]`` -> normalised float ``[B, 3, H, W]``, then RandomErasing (training)."""

    def __init__(self, mean, std, device: torch.device, re_prob: float = 0.0):
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.erase = (RandomErasing(re_prob, mode="pixel", max_count=1, device=self.device)
                      if re_prob > 0 else None)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        return self.erase(x) if self.erase is not None else x
