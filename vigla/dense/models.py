"""Dense-prediction models on :class:`~vigla.dense.backbone.BackboneFPN`: torchvision's detectors and a semantic
segmentation model with a light FPN decoder.

* :func:`build_detector`: torchvision's ``FasterRCNN`` / ``MaskRCNN`` (trunk strides 4-32 + a stride-64 "pool"
  level: the five levels of their default anchors and RoI pooling) or ``RetinaNet`` (strides 8-32 + P6, P7,
  as torchvision's own RetinaNet). Labels ``1..K`` with 0 the background, so ``num_classes = K + 1`` for all
  three. They take lists of ``[3, H, W]`` images in ``[0, 1]`` and resize and normalize them themselves.
* :class:`SegmentationModel`: the semantic branch of Panoptic FPN (Kirillov et al., "Panoptic Feature Pyramid
  Networks", CVPR 2019, Sec. 3.2 and Fig. 3) on the FPN levels: each level through 3x3 conv + GroupNorm + ReLU
  stages, upsampled 2x after each, to the finest stride; the sum through a 1x1 conv to class logits,
  bilinearly upsampled to the input. ``[B, 3, H, W]`` images in ``[0, 1]`` (any ``H, W``) ->
  ``[B, num_classes, H, W]`` logits. The ViG paper reports ADE20K with UperNet (Liao et al., AAAI 2025);
  this decoder is lighter, so its mIoU is not comparable with the paper's.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .backbone import PYRAMID_STRIDES, BackboneFPN, backbone_with_fpn

__all__ = ["DETECTORS", "MaskTransform", "SemanticFPNHead", "SegmentationModel", "build_detector", "build_segmenter",
           "paste_masks_in_image"]

DETECTORS = ("mask_rcnn", "faster_rcnn", "retinanet")


def _backbone(backbone: Union[str, nn.Module, BackboneFPN], strides: Sequence[int], extra_blocks: str,
              **kwargs) -> BackboneFPN:
    if isinstance(backbone, BackboneFPN):
        if kwargs.get("pretrained") or kwargs.get("weights"):
            raise ValueError("pretrained / weights apply to a model name, not a BackboneFPN")
        return backbone
    return backbone_with_fpn(backbone, strides=strides, extra_blocks=extra_blocks, **kwargs)


def build_detector(kind: str, backbone: Union[str, nn.Module, BackboneFPN], num_classes: int, *,
                   min_size: Union[int, Sequence[int]] = 800, max_size: int = 1333,
                   detector_kwargs: Optional[dict] = None, **backbone_kwargs) -> nn.Module:
    """torchvision's ``kind`` detector (:data:`DETECTORS`) on a vigla / timm backbone.

    Args:
        backbone: a model name or model (wrapped by :func:`~vigla.dense.backbone.backbone_with_fpn` with the
            levels ``kind`` needs), or a :class:`BackboneFPN` built already.
        num_classes: object classes + 1 (the background, label 0).
        min_size, max_size: the detector's resize (shorter side; a tuple: torchvision picks one at random per
            training image, and pads the batch to its largest; the last one at evaluation), longer-side cap.
        detector_kwargs: more arguments for the torchvision class (``box_detections_per_img``,
            ``rpn_post_nms_top_n_train``, ...).
        **backbone_kwargs: for :func:`backbone_with_fpn` (``out_channels``, ``pretrained``, ``weights``,
            ``grad_checkpointing``, model arguments).
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet

    if kind not in DETECTORS:
        raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {kind!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background: at least 2, got {num_classes}")
    retina = kind == "retinanet"
    bb = _backbone(backbone, (8, 16, 32) if retina else PYRAMID_STRIDES, "p6p7" if retina else "pool",
                   **backbone_kwargs)
    common = dict(min_size=min_size, max_size=max_size, image_mean=bb.mean, image_std=bb.std,
                  size_divisible=bb.size_divisible, **(detector_kwargs or {}))
    cls = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN, "retinanet": RetinaNet}[kind]
    _check_kwargs(cls, detector_kwargs or {})
    model = cls(bb, num_classes=num_classes, **common)
    if kind == "mask_rcnn":
        t = model.transform
        model.transform = MaskTransform(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible,
                                        t.fixed_size, _skip_resize=t._skip_resize)
    return model


def paste_masks_in_image(masks: torch.Tensor, boxes: torch.Tensor, img_shape: tuple[int, int],
                         padding: int = 1) -> torch.Tensor:
    """torchvision's ``paste_masks_in_image`` (the same pixels) with the boxes read back once: ``[N, 1, M, M]``
    mask probabilities in ``[N, 4]`` boxes -> ``[N, 1, H, W]``. torchvision's reads every box's corners
    back from the device one by one, about ten waits for the device per detected mask."""
    masks, scale = expand_masks(masks, padding=padding)
    im_h, im_w = img_shape
    out = masks.new_zeros((masks.shape[0], 1, im_h, im_w))
    for k, (x0, y0, x1, y1) in enumerate(expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        mask = F.interpolate(masks[k:k + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        xa, xb, ya, yb = max(x0, 0), min(x1 + 1, im_w), max(y0, 0), min(y1 + 1, im_h)
        out[k, 0, ya:yb, xa:xb] = mask[ya - y0:yb - y0, xa - x0:xb - x0]
    return out


class MaskTransform(GeneralizedRCNNTransform):
    """torchvision's ``GeneralizedRCNNTransform`` (resize, normalize, batch; boxes back to the original sizes)
    whose ``postprocess`` pastes the masks with :func:`paste_masks_in_image` in eager mode (torchvision's own
    paste when scripted or traced). No parameters of its own: the state dict is torchvision's."""

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training or torch.jit.is_scripting() or torchvision._is_tracing():
            return super().postprocess(result, image_shapes, original_image_sizes)  # torchvision's own paste
        return self._postprocess_eager(result, image_shapes, original_image_sizes)

    @torch.jit.unused
    def _postprocess_eager(self, result, image_shapes, original_image_sizes):
        masks = [r.pop("masks", None) for r in result]
        result = super().postprocess(result, image_shapes, original_image_sizes)
        for r, m, size in zip(result, masks, original_image_sizes):
            if m is not None:
                r["masks"] = paste_masks_in_image(m, r["boxes"], size)
        return result


def _check_kwargs(cls: type, kwargs: dict) -> None:
    """torchvision's detectors pass unknown keyword arguments on to their transform, which ignores them: refuse
    those no class of ``cls``'s hierarchy names (or the transform's ``fixed_size``)."""
    known = {"fixed_size"}
    for c in cls.__mro__:
        if "__init__" in vars(c) and c.__module__.startswith("torchvision.models.detection"):
            known |= set(inspect.signature(c.__init__).parameters)
    unknown = sorted(set(kwargs) - known - {"self", "kwargs", "backbone", "num_classes"})
    if unknown:
        raise ValueError(f"{cls.__name__} takes no argument {', '.join(unknown)}")


class SemanticFPNHead(nn.Module):
    """Panoptic FPN's semantic branch (Kirillov et al., CVPR 2019, Sec. 3.2): FPN maps ``[B, C, H/s, W/s]`` at
    ``strides`` -> logits ``[B, num_classes, H/s0, W/s0]`` at the finest stride ``s0``."""

    def __init__(self, in_channels: int, strides: Sequence[int], num_classes: int, channels: int = 128):
        super().__init__()
        self.strides = tuple(strides)
        s0 = min(self.strides)
        self.paths = nn.ModuleList()
        for s in self.strides:
            ups = int(math.log2(s // s0))
            if 2 ** ups * s0 != s:
                raise ValueError(f"SemanticFPNHead: strides must be powers of 2 apart, got {self.strides}")
            layers = []
            for i in range(max(ups, 1)):
                layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                           nn.GroupNorm(min(32, channels), channels), nn.ReLU(inplace=True)]
                if ups:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.paths.append(nn.Sequential(*layers))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.paths[0](feats[0])
        for path, f in zip(self.paths[1:], feats[1:]):
            x = x + path(f)
        return self.classifier(x)


class SegmentationModel(nn.Module):
    """Semantic segmentation: :class:`BackboneFPN` + :class:`SemanticFPNHead`.

    ``forward(images)``: ``[B, 3, H, W]`` in ``[0, 1]``, any ``H, W`` -> logits ``[B, num_classes, H, W]``.
    Normalization (the trunk's mean and std) happens inside, as in torchvision's detectors.
    """

    def __init__(self, backbone: BackboneFPN, num_classes: int, head_channels: int = 128):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background: at least 2, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        n = len(backbone.trunk.strides)  # the FPN levels of the trunk, not the extra ones
        self.head = SemanticFPNHead(backbone.out_channels, backbone.strides[:n], num_classes, head_channels)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        feats = list(self.backbone((images - self.mean) / self.std).values())
        logits = self.head(feats[:len(self.head.strides)])
        s0 = min(self.head.strides)
        logits = F.interpolate(logits, scale_factor=s0, mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


def build_segmenter(backbone: Union[str, nn.Module, BackboneFPN], num_classes: int, head_channels: int = 128,
                    **backbone_kwargs) -> SegmentationModel:
    """A :class:`SegmentationModel` on a model name / model (trunk strides 4-32, no extra level) or a
    :class:`BackboneFPN`; ``num_classes`` includes the background (class 0)."""
    bb = _backbone(backbone, PYRAMID_STRIDES, "none", **backbone_kwargs)
    return SegmentationModel(bb, num_classes, head_channels)
