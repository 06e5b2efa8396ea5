"""The depthwise conv (+ SiLU) as one op: ``DWConvFunction`` (eager) and ``vigla::dwconv`` (traced);
the fused kernels for CUDA tensors, the compiled ones for float32 CPU tensors (``cpu_kernels.c``), the
reference elsewhere (:mod:`vigla.ops.dispatch`)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..dispatch import HAS_TRITON, direct, fused_op, recorded_backward, use_cpu_kernels, use_kernels, wrap
from . import cpu_kernels
from .reference import dwconv_reference, dwconv_reference_bwd

if HAS_TRITON:
    from .triton_kernels import dwconv_bwd_triton, dwconv_fwd_triton

__all__ = ["DWConvFunction", "cpu_forward", "dwconv_forward", "dwconv_backward"]


def cpu_forward(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the forward runs the compiled CPU kernels: float32 CPU tensors and ``out_dtype``."""
    return use_cpu_kernels(x) and out_dtype == torch.float32 and cpu_kernels.supports(x, weight)


def dwconv_forward(x, weight, H: int, W: int, act: bool, out_dtype: torch.dtype, launch=direct):
    """``[B, H*W, C]`` in ``out_dtype`` (see :func:`vigla.ops.dwconv.dwconv_silu`).
    Without autograd: the Function's forward, and the op itself when nothing needs a gradient."""
    if use_kernels(x):
        return dwconv_fwd_triton(x, weight, (H, W), act, out_dtype, wrap=launch)
    if cpu_forward(x, weight, out_dtype):
        return cpu_kernels.dwconv_fwd_cpu(x, weight, H, W, act)
    return dwconv_reference(x, weight, (H, W), act, out_dtype).contiguous()


def dwconv_backward(dy, x, weight, H: int, W: int, act: bool, launch=direct):
    """``(dx, dweight)`` in the inputs' dtypes."""
    if use_kernels(x):
        return dwconv_bwd_triton(dy, x, weight, (H, W), act, wrap=launch)
    if use_cpu_kernels(x) and cpu_kernels.supports(dy, x, weight):
        return cpu_kernels.dwconv_bwd_cpu(dy, x, weight, H, W, act)
    return tuple(t.contiguous() for t in dwconv_reference_bwd(dy, x, weight, (H, W), act))


class DWConvFunction(torch.autograd.Function):
    """Eager depthwise conv: ``apply(x, weight, H, W, act, out_dtype)``."""

    @staticmethod
    def forward(ctx, x, weight, H, W, act, out_dtype):
        ctx.save_for_backward(x, weight)
        ctx.H, ctx.W, ctx.act = H, W, act
        return dwconv_forward(x, weight, H, W, act, out_dtype)

    @staticmethod
    @recorded_backward
    def backward(ctx, dy):
        return (*dwconv_backward(dy, *ctx.saved_tensors, ctx.H, ctx.W, ctx.act), None, None, None, None)


def _fake(x, weight, H, W, act, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _bwd_fake(dy, x, weight, H, W, act):
    return x.new_empty(x.shape), torch.empty_like(weight, memory_format=torch.contiguous_format)


@fused_op("vigla::dwconv", _fake)
def dwconv_op(x: torch.Tensor, weight: torch.Tensor, H: int, W: int, act: bool, out_dtype: torch.dtype
              ) -> torch.Tensor:
    """The custom op: :class:`DWConvFunction`'s forward."""
    return dwconv_forward(x, weight, H, W, act, out_dtype, wrap)


@fused_op("vigla::dwconv_bwd", _bwd_fake)
def dwconv_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, H: int, W: int, act: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Its backward: ``(dx, dweight)``."""
    return tuple(dwconv_backward(dy, x, weight, H, W, act, wrap))


def _setup(ctx, inputs, output):
    x, weight, H, W, act, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.H, ctx.W, ctx.act = H, W, act


def _op_backward(ctx, dy):
    return (*torch.ops.vigla.dwconv_bwd(dy, *ctx.saved_tensors, ctx.H, ctx.W, ctx.act), None, None, None, None)


dwconv_op.register_autograd(_op_backward, setup_context=_setup)


@register_flop_formula(torch.ops.vigla.dwconv)
def _fwd_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs):
    # nine multiply-adds per output element, as for the nn.Conv2d it replaces
    return 2 * 9 * x_shape[0] * x_shape[1] * x_shape[2]


@register_flop_formula(torch.ops.vigla.dwconv_bwd)
def _bwd_flops(dy_shape, *args, out_shape=None, **kwargs):
    return 2 * 2 * 9 * dy_shape[0] * dy_shape[1] * dy_shape[2]  # dx and dweight
