"""Norm layers."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import RmsNorm as _TimmRmsNorm
from timm.layers.fast_norm import rms_norm

from ..ops.add_norm import add_norm
from ..ops.inference import EAGER, InferenceOps
from ..ops.tracing import exporting
from .cast import MlpProjection, Projection, dense

__all__ = ["RmsNorm", "add_and_norm", "add_and_norm_inference", "fused_norm"]

torch.fx.wrap("add_norm")  # a leaf under torch.fx: its checks and kernels run as they are


class RmsNorm(_TimmRmsNorm):
    """timm's ``RmsNorm`` (same parameters and state dict) computed by PyTorch's fused
    ``rms_norm``, with the weight cast to the input's dtype: under autocast a bf16 input then
    takes the fused kernel (fp32 statistics, bf16 output) instead of a chain of elementwise ops
    with an fp32 result. ``[..., C]`` -> ``[..., C]``.

    Exported or traced (:func:`vigla.ops.tracing.exporting`), the formula is written out
    (timm's ``rms_norm``): ONNX has no ``RMSNormalization`` below opset 23, and the legacy exporter
    no translation of ``aten::rms_norm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        if not torch.jit.is_scripting() and exporting():
            return rms_norm(x, self.normalized_shape, weight, self.eps)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def add_and_norm(norm: nn.Module, x: torch.Tensor, delta: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, norm(x + delta))`` for an :class:`RmsNorm` or ``nn.LayerNorm`` over the last dim
    of ``[..., C]``, in one pass (:func:`vigla.ops.add_norm.add_norm`; ``delta`` None: just the
    norm). The normalized output is in ``out_dtype``, default the compute dtype (autocast's when it
    is on)."""
    fused = fused_norm(norm)
    if fused is None:
        return _unfused(norm, x, delta)
    return add_norm(x, delta, fused[0], fused[1], norm.eps, "rms" if fused[2] else "layer", out_dtype)


def _unfused(norm: nn.Module, x: torch.Tensor, delta: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The add and the norm one after the other (a norm :func:`add_and_norm` does not fuse)."""
    s = x if delta is None else x + delta
    return s, norm(s)


def fused_norm(norm: nn.Module) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor], bool]]:
    """``(weight, bias, rms)`` of a norm :func:`add_and_norm` fuses (an affine ``nn.LayerNorm`` or an
    :class:`RmsNorm` with a weight), else None."""
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        return norm.weight, norm.bias, False
    if isinstance(norm, RmsNorm) and norm.weight is not None:
        return norm.weight, None, True
    return None


@torch.jit.unused
def add_and_norm_inference(norm: nn.Module, x: torch.Tensor, delta: Optional[torch.Tensor],
                           out_dtype: torch.dtype, ops: InferenceOps = EAGER) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_and_norm` on an inference path (:func:`vigla.ops.inference.inference_ops` gave ``ops``): the
    op's forward implementation called directly in eager mode, its custom op when compiled (the shapes are the
    block's own), ``[..., C]`` tensors. ``delta`` may be a :class:`vigla.layers.cast.Projection`, the previous
    layer's output projection not yet computed, or a :class:`vigla.layers.cast.MlpProjection`, the previous MLP
    not yet computed: on CUDA in half precision they run in the same kernel as the add and the norm. The norm's
    output ``y`` is in ``out_dtype``."""
    fused = fused_norm(norm)
    if fused is not None and isinstance(delta, MlpProjection):
        return ops.mlp_add_norm(delta.rows, delta.w1, delta.w2, x, fused[0], fused[1], float(norm.eps), fused[2],
                                out_dtype, delta.row_scale)
    if fused is not None and isinstance(delta, Projection) and not delta.w.is_mkldnn:
        # delta.w: gemm_weights' [in, out] view of [out, in]
        return ops.linear_add_norm(delta.rows, delta.w.t(), x, fused[0], fused[1], float(norm.eps), fused[2],
                                   out_dtype)
    delta = dense(delta)
    if fused is None:
        return _unfused(norm, x, delta)
    s, y = ops.add_norm(x, delta, fused[0], fused[1], float(norm.eps), fused[2], out_dtype)
    return (x if delta is None else s), y
