"""Any timm or vigla model as a multi-scale backbone with a feature pyramid, for torchvision's detectors
and vigla's segmentation model.

Two kinds of trunk, told apart by the model's ``feature_info``:

* **hierarchical** (ViG-H, ConvNeXt, Swin, ResNet: outputs at several strides): the stage outputs at the
  strides asked for (``forward_intermediates``), each through a LayerNorm of its own, as the official
  ViG-H detection backbone (``Backbone_HierViG``'s per-stage "outnorm", github.com/hustvl/ViG) and Swin's
  detection backbone do;
* **plain** (ViG, Castling-DeiT, DeiT / ViT: one stride, 16): the last block's map, with the model's final
  norm, into a *simple feature pyramid* built from it alone (ViTDet: Li et al., "Exploring Plain Vision
  Transformer Backbones for Object Detection", ECCV 2022, Sec. 3 and Fig. 2c): two 2x2 transposed convs to
  stride 4, one to stride 8, the map itself at 16, 2x2 max-pooling to 32.

Then torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` (Lin et al., CVPR 2017: lateral 1x1
convs, top-down sum, 3x3 output convs) to ``out_channels`` at every level, and its extra block:
``LastLevelMaxPool`` (the R-CNNs' stride-64 "pool" level) or ``LastLevelP6P7`` (RetinaNet's P6, P7).
ViTDet applies its per-level convs without the top-down sum; vigla keeps torchvision's FPN for every
trunk, so that plain and hierarchical backbones differ only in the trunk.

Any input size: the batch is zero-padded at the bottom and right to a multiple of the coarsest trunk
stride, so every level is exactly ``padded size / stride`` and box coordinates are unchanged.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.layers import LayerNorm2d
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

import vigla  # noqa: F401  (registers vigla's models with timm)

__all__ = ["BackboneFPN", "MultiScaleTrunk", "SimpleFeaturePyramid", "backbone_with_fpn", "pad_to_multiple"]

PYRAMID_STRIDES = (4, 8, 16, 32)
EXTRA_BLOCKS = ("pool", "p6p7", "none")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, ceil(H / m) * m, ceil(W / m) * m]``, zeros at the bottom and right."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., ECCV 2022, Sec. 3): ``[B, C, H/16, W/16]`` -> one map per
    stride in ``strides`` (any of 4, 8, 16, 32), with ``C/4, C/2, C, C`` channels."""

    def __init__(self, dim: int, strides: Sequence[int] = PYRAMID_STRIDES):
        super().__init__()
        self.strides = tuple(strides)
        self.channels = []
        self.scales = nn.ModuleList()
        for s in self.strides:
            if s == 4:
                op = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2), nn.GELU(),
                                   nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
                self.channels.append(dim // 4)
            elif s == 8:
                op = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
                self.channels.append(dim // 2)
            elif s == 16:
                op = nn.Identity()
                self.channels.append(dim)
            elif s == 32:
                op = nn.MaxPool2d(2, 2)
                self.channels.append(dim)
            else:
                raise ValueError(f"SimpleFeaturePyramid: strides must be among {PYRAMID_STRIDES}, got {s}")
            self.scales.append(op)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [op(x) for op in self.scales]


def _feature_reductions(model: nn.Module) -> list[int]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    return [f["reduction"] for f in info] if isinstance(info, list) else list(info.reduction())


class MultiScaleTrunk(nn.Module):
    """A timm / vigla model -> feature maps ``[B, C_i, H / s_i, W / s_i]`` at ``strides`` (input ``[B, 3, H, W]``
    with ``H, W`` multiples of the coarsest stride; :class:`BackboneFPN` pads it).

    Hierarchical models give their stage outputs (``forward_intermediates``), each layer-normalized; plain
    models (a single stride) their last block's normalized map through a :class:`SimpleFeaturePyramid`. The
    model's classifier (and, for hierarchical models, its final norm and unused stages) are pruned.
    """

    def __init__(self, model: nn.Module, strides: Sequence[int] = PYRAMID_STRIDES):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{type(model).__name__} has no forward_intermediates(): it cannot serve as a "
                             f"dense backbone (timm's ConvNeXt, Swin, ResNet, ViT and vigla's models can)")
        reductions = _feature_reductions(model)
        if not reductions:
            raise ValueError(f"{type(model).__name__} has no feature_info: its feature strides are unknown")
        self.strides = tuple(strides)
        self.model = model
        self.plain = len(set(reductions)) == 1
        if self.plain:
            self.model_stride = reductions[-1]
            if self.model_stride != 16:
                raise ValueError(f"the simple feature pyramid needs a stride-16 plain model, "
                                 f"{type(model).__name__} has stride {self.model_stride}")
            self.indices = [len(reductions) - 1]
            model.prune_intermediate_layers(self.indices, prune_norm=False, prune_head=True)
            self.pyramid = SimpleFeaturePyramid(_feature_channels(model)[-1], self.strides)
            self.channels = list(self.pyramid.channels)
            self.norms = None
        else:
            missing = [s for s in self.strides if s not in reductions]
            if missing:
                raise ValueError(f"{type(model).__name__} has no stage at stride(s) {missing} "
                                 f"(its strides: {sorted(set(reductions))})")
            self.indices = [reductions.index(s) for s in self.strides]
            model.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
            self.channels = [_feature_channels(model)[i] for i in self.indices]
            self.pyramid = None
            self.norms = nn.ModuleList([LayerNorm2d(c) for c in self.channels])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.plain:
            (last,) = self.model.forward_intermediates(x, indices=self.indices, norm=True, output_fmt="NCHW",
                                                       intermediates_only=True)
            return self.pyramid(last)
        feats = self.model.forward_intermediates(x, indices=self.indices, output_fmt="NCHW",
                                                 intermediates_only=True)
        return [norm(f) for norm, f in zip(self.norms, feats)]


def _feature_channels(model: nn.Module) -> list[int]:
    info = model.feature_info
    return [f["num_chs"] for f in info] if isinstance(info, list) else list(info.channels())


class BackboneFPN(nn.Module):
    """Trunk + torchvision FPN: ``[B, 3, H, W]`` (any ``H, W``) -> ``OrderedDict`` of float32
    ``[B, out_channels, H' / s, W' / s]`` maps, keys ``"0", "1", ...`` for the trunk strides (``H', W'``:
    ``H, W`` padded to a multiple of the coarsest of them), then ``"pool"`` (stride 2x the last) or
    ``"p6", "p7"``. The interface torchvision's ``FasterRCNN``, ``MaskRCNN`` and ``RetinaNet`` take.

    Attributes: ``out_channels``; ``strides`` (one per output, in order); ``size_divisible`` (the padding
    multiple); ``mean``, ``std`` (the trunk's input normalization, for the detectors' transform).
    """

    def __init__(self, trunk: MultiScaleTrunk, out_channels: int = 256, extra_blocks: str = "pool",
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        super().__init__()
        if extra_blocks not in EXTRA_BLOCKS:
            raise ValueError(f"extra_blocks must be one of {', '.join(EXTRA_BLOCKS)}, got {extra_blocks!r}")
        self.trunk = trunk
        self.out_channels = out_channels
        self.size_divisible = max(trunk.strides)
        self.mean, self.std = list(mean), list(std)
        extra = {"pool": LastLevelMaxPool(), "p6p7": LastLevelP6P7(out_channels, out_channels), "none": None}
        self.fpn = FeaturePyramidNetwork(trunk.channels, out_channels, extra_blocks=extra[extra_blocks])
        n_extra = {"pool": 1, "p6p7": 2, "none": 0}[extra_blocks]
        last = max(trunk.strides)
        self.strides = list(trunk.strides) + [last * 2 ** (i + 1) for i in range(n_extra)]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.trunk(pad_to_multiple(x, self.size_divisible))
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        # float32 maps: torchvision's detectors build their anchors in the maps' dtype, which under bf16 autocast
        # would put box coordinates on a grid of 2 px at 256-512 px (8 bits of mantissa)
        return OrderedDict((k, v.float()) for k, v in out.items())

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the trunk's blocks in the backward (the model's own ``set_grad_checkpointing``)."""
        self.trunk.model.set_grad_checkpointing(enable)


def _create(name: str, pretrained: bool, weights: Optional[str], model_kwargs: dict) -> nn.Module:
    """``timm.create_model(name, num_classes=0, ...)``; ViT-style models get ``dynamic_img_size=True`` (their
    position embedding resized to any input), the others, which do not take it, are built without it."""
    kwargs = dict(num_classes=0, pretrained=pretrained or weights is not None, **model_kwargs)
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=weights)
    try:
        return timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
    return timm.create_model(name, **kwargs)


def backbone_with_fpn(
    model: Union[str, nn.Module],
    out_channels: int = 256,
    strides: Sequence[int] = PYRAMID_STRIDES,
    extra_blocks: str = "pool",
    pretrained: bool = False,
    weights: Optional[str] = None,
    grad_checkpointing: bool = False,
    **model_kwargs,
) -> BackboneFPN:
    """A timm / vigla model (a name, or a model built already) as a :class:`BackboneFPN`.

    Args:
        model: e.g. ``"vig_h_tiny"``, ``"vig_tiny"``, ``"castling_deit_tiny"``, ``"convnext_tiny"``; a model
            object must have ``forward_intermediates`` and ``feature_info`` (ViTs built with
            ``dynamic_img_size=True``).
        out_channels: FPN width.
        strides: trunk strides to use, among 4, 8, 16, 32 (RetinaNet: 8, 16, 32).
        extra_blocks: ``"pool"`` (R-CNNs), ``"p6p7"`` (RetinaNet) or ``"none"``.
        pretrained, weights: timm's pretrained weights, or a checkpoint file (vigla ``.safetensors``, an official
            release) loaded through the model's checkpoint filter; the classifier is dropped.
        grad_checkpointing: recompute the trunk's blocks in the backward.
        **model_kwargs: for ``timm.create_model`` (``drop_path_rate``, ``depths``, ...).
    """
    strides = tuple(sorted(strides))
    if not strides or any(s not in PYRAMID_STRIDES for s in strides):
        raise ValueError(f"strides must be a subset of {PYRAMID_STRIDES}, got {strides}")
    if isinstance(model, str):
        model = _create(model, pretrained, weights, model_kwargs)
    elif pretrained or weights or model_kwargs:
        raise ValueError("pretrained, weights and model arguments apply to a model name, not a model object")
    if getattr(model, "dynamic_img_size", True) is False:
        raise ValueError(f"{type(model).__name__} has a fixed input size: build it with dynamic_img_size=True")
    if hasattr(model, "set_aux"):  # Castling-ViT: the training-only softmax branch is quadratic in tokens
        model.set_aux(False)
    cfg = resolve_model_data_config(model)
    backbone = BackboneFPN(MultiScaleTrunk(model, strides), out_channels, extra_blocks, cfg["mean"], cfg["std"])
    if grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


def feature_sizes(backbone: BackboneFPN, height: int, width: int) -> list[tuple[int, int]]:
    """The ``(h, w)`` of each output of ``backbone`` for an ``height x width`` input (shape arithmetic only)."""
    m = backbone.size_divisible
    ph, pw = math.ceil(height / m) * m, math.ceil(width / m) * m
    sizes = []
    for s in backbone.strides:
        if s <= m:
            sizes.append((ph // s, pw // s))
        else:  # the extra levels: stride-2 pooling / 3x3 stride-2 convs of the previous one
            h, w = sizes[-1]
            sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes
