"""Norm layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import RmsNorm as _TimmRmsNorm
from timm.layers.fast_norm import rms_norm

from ..ops.tracing import exporting

__all__ = ["RmsNorm"]


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
