"""``dwconv_silu``: ViG's local branch, a depthwise 3x3 conv (+ SiLU) on channels-last tokens.

``x_c = SiLU(DWConv3x3(x))`` (ViG, Liao et al., AAAI 2025: the 2-D gating locality injection reads
it; the SiLU is ViG-T's) in one kernel each way on CUDA (``triton_kernels.py``) and for float32 CPU
tensors (``cpu_kernels.c``), with no NCHW permutes or casts; elsewhere PyTorch's convolution on an
NCHW view of the tokens (``reference.py``
is the written-out form behind the custom op); see :mod:`vigla.ops.dispatch`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

import torch.nn.functional as F

from ..checks import channels, floating
from ..dispatch import compute_dtype, run_eager, use_kernels, via_dispatcher
from ..tracing import exporting
from .op import DWConvFunction, cpu_forward, dwconv_forward
from .reference import dwconv_reference, dwconv_reference_bwd

__all__ = ["dwconv_silu", "dwconv_reference", "dwconv_reference_bwd"]


def dwconv_silu(x: torch.Tensor, weight: torch.Tensor, hw: tuple[int, int], act: bool = True,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Depthwise 3x3 conv (stride 1, zero padding 1, no bias), then SiLU if ``act``.

    Args:
        x: ``[B, H*W, C]`` tokens of an ``H x W`` grid in row-major order (any float dtype; the
            channel stride must be 1 for the kernels to read it in place).
        weight: ``[C, 1, 3, 3]`` (``nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False).weight``).
        hw: ``(H, W)``, each >= 1.
        act: SiLU on the conv's output.
        out_dtype: dtype of the result; None: the compute dtype (autocast's for ``x``'s device when
            it is on, else ``x.dtype``), what ``nn.Conv2d`` would return.

    Returns:
        ``[B, H*W, C]`` in ``out_dtype``, accumulated in float32. Gradients flow to ``x`` (in its
        dtype) and ``weight`` (in its dtype).
    """
    if torch.jit.is_scripting() or exporting():
        return _conv_tokens(x, weight, hw, act)
    floating("dwconv_silu", x=x, weight=weight)
    H, W = int(hw[0]), int(hw[1])
    if len(hw) != 2 or H != hw[0] or W != hw[1]:
        raise ValueError(f"dwconv_silu: hw must be two whole numbers (H, W), got {tuple(hw)}")
    if x.dim() != 3 or H < 1 or W < 1 or x.shape[1] != H * W:
        raise ValueError(f"dwconv_silu: expected x [B, H*W, C] with hw=(H, W) >= 1, got x {tuple(x.shape)}, "
                         f"hw {tuple(hw)}")
    if weight.shape != (x.shape[-1], 1, 3, 3):
        raise ValueError(f"dwconv_silu: weight must be [C, 1, 3, 3] with C = {x.shape[-1]}, got "
                         f"{tuple(weight.shape)}")
    channels("dwconv_silu", "x", x)
    args = (x, weight, H, W, bool(act), out_dtype or compute_dtype(x))
    if via_dispatcher():
        return torch.ops.vigla.dwconv(*args)
    if use_kernels(x) or cpu_forward(x, weight, args[-1]):
        return run_eager(DWConvFunction, dwconv_forward, *args)
    # PyTorch's conv with autograd, in float32 (float64 for float64) as the kernels and the reference accumulate,
    # rounded once to out_dtype: the same values as the custom op, which a dispatch mode (checkpointing) sees
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        y = _conv_tokens(x.to(work), weight.to(work), (H, W), act)
    return y.to(args[-1])


def _conv_tokens(x: torch.Tensor, weight: torch.Tensor, hw: Tuple[int, int], act: bool) -> torch.Tensor:
    """PyTorch's depthwise convolution on an NCHW view of the channels-last tokens (no copy in, none
    out when the conv keeps the channels-last memory format), with autograd; scriptable."""
    B, N, C = x.shape
    y = F.conv2d(x.reshape(B, hw[0], hw[1], C).permute(0, 3, 1, 2), weight, padding=1, groups=C)
    if act:
        y = F.silu(y)
    return y.permute(0, 2, 3, 1).reshape(B, N, C)
