"""A stem's first layer in plain PyTorch: the ground truth of the fused kernel.

``y = act(LayerNorm_C(conv2d(x, W, b, stride, padding)))`` with the LayerNorm over the conv's output
channels at every pixel, returned channels-last ``[B, H', W', C]`` (the stems of ViG and ViG-H, Liao et
al., AAAI 2025: "patch embed v2" and ViG-H's stem, whose first conv is followed by LayerNorm2d and SiLU
or GELU). Under autocast the conv runs in autocast's dtype and the LayerNorm in float32, as ``nn.Conv2d``
and ``nn.LayerNorm`` would.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTS = ("none", "silu", "gelu")  # gelu: the exact (erf) form, nn.GELU's default


def activate(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(y)
    if act == "gelu":
        return F.gelu(y)
    return y


def conv_norm_reference(x, weight, bias, norm_weight, norm_bias, eps: float, stride: int, padding: int, act: str,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """``x``: ``[B, C_in, H, W]``; ``weight``: ``[C, C_in, kh, kw]``; ``bias``, ``norm_weight``, ``norm_bias``:
    ``[C]``. Returns ``[B, H', W', C]`` in ``out_dtype`` (a channels-last view, as the conv left it).

    The convolution in ``x``'s dtype (the parameters cast to it; autocast's when it is on), the norm and the
    activation in at least float32."""
    y = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), stride, padding).permute(0, 2, 3, 1)
    f = torch.promote_types(y.dtype, torch.float32)
    y = F.layer_norm(y.to(f), y.shape[-1:], norm_weight.to(f), norm_bias.to(f), eps)
    return activate(y, act).to(out_dtype)
