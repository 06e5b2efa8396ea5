"""``conv_norm_act``: a stem's first layer, ``act(LayerNorm(conv2d(x)))``, channels-last out.

The first layer of ViG's and ViG-H's stems (Liao et al., AAAI 2025; conv, LayerNorm2d, SiLU or GELU) in one
Triton kernel on CUDA (``triton_kernels.py``: an implicit-GEMM convolution with the norm and activation on
its accumulator); elsewhere PyTorch's convolution and LayerNorm (``reference.py``); see
:mod:`vigla.ops.dispatch`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..checks import floating
from ..dispatch import compute_dtype, run_eager, use_kernels, via_dispatcher
from ..tracing import exporting
from .op import ConvNormFunction, conv_norm_forward
from .reference import ACTS, conv_norm_reference, conv_norm_reference_bwd

__all__ = ["conv_norm_act", "conv_norm_reference", "conv_norm_reference_bwd"]


def conv_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                  norm_bias: torch.Tensor, eps: float, stride: int, padding: int, act: str = "none",
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``act(LayerNorm_C(conv2d(x, weight, bias, stride, padding)))``, the LayerNorm over the ``C`` output
    channels of every pixel.

    Args:
        x: ``[B, C_in, H, W]`` image batch (any strides, any float dtype).
        weight: ``[C, C_in, kh, kw]``; bias, norm_weight, norm_bias: ``[C]``.
        eps: the LayerNorm's epsilon. stride, padding: the convolution's (square, zero padding).
        act: ``"none"``, ``"silu"`` or ``"gelu"`` (exact, ``nn.GELU``'s default).
        out_dtype: dtype of the result; None: the compute dtype (autocast's for ``x``'s device when it is on,
            else ``x.dtype``).

    Returns:
        ``[B, H', W', C]`` channels-last, in ``out_dtype``; products in the compute dtype with float32
        accumulation, the norm in float32. Gradients flow to every tensor argument.
    """
    if torch.jit.is_scripting() or exporting():
        return conv_norm_reference(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act,
                                   x.dtype if out_dtype is None else out_dtype)
    floating("conv_norm_act", x=x, weight=weight, bias=bias, norm_weight=norm_weight, norm_bias=norm_bias)
    if act not in ACTS:
        raise ValueError(f"conv_norm_act: act must be 'none', 'silu' or 'gelu', got '{act}'")
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv_norm_act: expected x [B, C_in, H, W] and weight [C, C_in, kh, kw], got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if any(t.shape != weight.shape[:1] for t in (bias, norm_weight, norm_bias)):
        raise ValueError(f"conv_norm_act: bias, norm_weight and norm_bias must be [C] with C = {weight.shape[0]}, got "
                         f"{[tuple(t.shape) for t in (bias, norm_weight, norm_bias)]}")
    dtype = compute_dtype(x)
    args = (x, weight, bias, norm_weight, norm_bias, float(eps), int(stride), int(padding), act, dtype,
            out_dtype or dtype)
    if via_dispatcher():
        return torch.ops.vigla.conv_norm(*args)
    if use_kernels(x):
        return run_eager(ConvNormFunction, conv_norm_forward, *args)
    # no kernel (a CPU): PyTorch's layers under autograd, whose own backward is faster than the written-out one
    return conv_norm_forward(*args)
