"""Norm layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import RmsNorm as _TimmRmsNorm

__all__ = ["RmsNorm"]


class RmsNorm(_TimmRmsNorm):
    """timm's ``RmsNorm`` (same parameters and state dict) computed by PyTorch's fused
    ``rms_norm``, with the weight cast to the input's dtype: under autocast a bf16 input then
    takes the fused kernel (fp32 statistics, bf16 output) instead of a chain of elementwise ops
    with an fp32 result. ``[..., C]`` -> ``[..., C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)
