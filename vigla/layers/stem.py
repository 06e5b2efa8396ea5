"""Convolutional stems and the stage downsample of ViG / ViG-H (ViG, Liao et al., AAAI 2025,
section "Architecture"; the official code's "patch embed v2" and ViG-H stem).

Both stems are ``conv1 -> LayerNorm -> act -> conv2 (3x3, stride 2) -> LayerNorm`` and return
channels-last ``[B, H', W', C]`` maps: plain ViG's "patch embed v2" (conv1 9x9 stride 8, SiLU;
stride 16 in all) and ViG-H's stem (conv1 3x3 stride 2, GELU; stride 4). LayerNorm eps is 1e-5,
PyTorch's default, as in the official code.
"""
from __future__ import annotations

from typing import Type

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

from ..ops.conv_norm import conv_norm_act
from .cast import plain_leaves
from .norm import add_and_norm, layer_norm_dtype

_LEAVES = (("conv1", nn.Conv2d), ("norm1", LayerNorm2d))  # what ConvStem's fused first op reads

__all__ = ["ConvStem", "ConvDownsample", "check_image_batch"]

torch.fx.wrap("conv_norm_act")  # a leaf under torch.fx: the traced graph calls the op as it is


@torch.fx.wrap  # a leaf under torch.fx: it runs, with real tensors, when the traced graph runs
def check_image_batch(x: torch.Tensor, in_chans: int, min_size: int, where: str) -> None:
    """Raise a readable error unless ``x`` is a floating ``[B, in_chans, H, W]`` batch with
    ``H, W >= min_size`` (scriptable: shapes printed as lists)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor image batch, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{where}: expected a 4-D image batch [B, {in_chans}, H, W], got shape {list(x.shape)}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{where}: expected {in_chans} input channels [B, {in_chans}, H, W], "
            f"got {x.shape[1]} (shape {list(x.shape)})"
        )
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f"{where}: images must be at least {min_size}x{min_size} pixels (the stem's first "
            f"convolution needs them), got {x.shape[2]}x{x.shape[3]}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point image batch, got {x.dtype}")


def _conv_out(size: int, kernel_size: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel_size) // stride + 1


class ConvStem(nn.Module):
    """``[B, in_chans, H, W]`` -> channels-last ``[B, H', W', embed_dim]``.

    ``conv1`` (``kernel_size``, ``stride``, padding 1, to ``embed_dim // 2``) -> LayerNorm2d -> act
    -> ``conv2`` (3x3, stride 2, padding 1, to ``embed_dim``) -> LayerNorm.
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        kernel_size: int,
        stride: int,
        act_layer: Type[nn.Module],
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.kernel_size = kernel_size
        self.stride = stride
        self.conv1 = nn.Conv2d(in_chans, embed_dim // 2, kernel_size, stride, padding=1)
        self.norm1 = LayerNorm2d(embed_dim // 2, eps=norm_eps)
        self.act = act_layer()
        # the activation as conv_norm_act names it ("": one it lacks, the layers run one by one)
        exact_gelu = isinstance(self.act, nn.GELU) and self.act.approximate == "none"
        self.fused_act = "silu" if isinstance(self.act, nn.SiLU) else "gelu" if exact_gelu else ""
        self.conv2 = nn.Conv2d(embed_dim // 2, embed_dim, 3, 2, padding=1)
        self.norm2 = nn.LayerNorm(embed_dim, eps=norm_eps)

    @property
    def min_input_size(self) -> int:
        """Smallest image side that gives a non-empty grid."""
        return max(self.kernel_size - 2, 1)

    def grid_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Output grid ``(H', W')`` for an ``img_size = (H, W)`` input."""
        return tuple(
            _conv_out(_conv_out(s, self.kernel_size, self.stride, 1), 3, 2, 1) for s in img_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_chans, self.min_input_size, "ConvStem")
        if torch.jit.is_scripting():
            return self.forward_layers(x)
        if not self.fused_act or not self._reads_leaves():
            return self.forward_layers(x)
        return self._fused(x)

    @torch.jit.unused
    def _reads_leaves(self) -> bool:
        """Whether the fused path may read conv1's and norm1's parameters (:func:`vigla.layers.cast.plain_leaves`;
        conv2 and norm2 are called either way)."""
        return plain_leaves(self, _LEAVES)

    def forward_layers(self, x: torch.Tensor) -> torch.Tensor:
        """The layers one by one, as PyTorch runs them (what the fused path replaces; TorchScript's path)."""
        x = self.act(self.norm1(self.conv1(x)))
        return self.norm2(self.conv2(x).permute(0, 2, 3, 1))

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same layers, channels-last throughout: conv1 + LayerNorm + act as one op (one kernel on
        CUDA, where cuDNN would first copy the 3-channel image to a padded channels-last layout), conv2 on
        its channels-last output, and the fused LayerNorm, in at least fp32 as ``nn.LayerNorm`` returns
        under autocast."""
        conv, norm = self.conv1, self.norm1
        y = conv_norm_act(x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps, self.stride, 1,
                          self.fused_act)
        y = self.conv2(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return add_and_norm(self.norm2, y, out_dtype=layer_norm_dtype(y))[1]


class ConvDownsample(nn.Module):
    """ViG-H stage downsample ("v3"): ``[B, in_dim, H, W]`` -> conv 3x3 stride 2 (padding 1) ->
    LayerNorm over the channels -> ``[B, out_dim, ceil(H/2), ceil(W/2)]`` (a channels-last view)."""

    def __init__(self, in_dim: int, out_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, 2, padding=1)
        self.norm = nn.LayerNorm(out_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).permute(0, 2, 3, 1)
        if torch.jit.is_scripting():
            return self.norm(t).permute(0, 3, 1, 2)
        return self._norm(t).permute(0, 3, 1, 2)

    @torch.jit.unused
    def _norm(self, t: torch.Tensor) -> torch.Tensor:
        """The fused LayerNorm (:func:`vigla.layers.norm.add_and_norm`), in at least fp32 as
        ``nn.LayerNorm`` returns under autocast: the stage's residual stream."""
        return add_and_norm(self.norm, t, out_dtype=layer_norm_dtype(t))[1]
