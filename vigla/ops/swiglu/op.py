"""SwiGLU's gating as one op: ``SwiGLUFunction`` (eager) and ``vigla::swiglu`` (traced); and
``SwiGLUMLPFunction``, the eager MLP that keeps only its input for the backward. Fused kernels
for CUDA tensors (in half precision fc1 and the gating as one kernel: :func:`fc1_fused`), compiled
ones for float32 CPU tensors (``cpu_kernels.c``), the reference elsewhere (:mod:`vigla.ops.dispatch`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ..amp import mm_to
from ..dispatch import (HAS_TRITON, compute_dtype, direct, fused_op, recorded_backward, use_cpu_kernels,
                        use_kernels, wrap)
from . import cpu_kernels
from .reference import swiglu_reference, swiglu_reference_bwd

if HAS_TRITON:
    from .triton_kernels import fc1_swiglu_triton, swiglu_bwd_triton, swiglu_fwd_triton

__all__ = ["SwiGLUFunction", "SwiGLUMLPFunction", "swiglu_forward", "swiglu_backward", "swiglu_mlp_forward",
           "fc1_fused", "fc1_swiglu_forward"]

_HALF = (torch.float16, torch.bfloat16)


def fc1_fused(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether fc1 and the gating run as one kernel for an input like ``x`` multiplied in ``dtype``: the CUDA
    kernels in half precision (float32 keeps cuBLAS, which follows PyTorch's TF32 switches)."""
    return dtype in _HALF and use_kernels(x)


def fc1_swiglu_forward(x: torch.Tensor, w1: torch.Tensor, launch=direct) -> torch.Tensor:
    """``swiglu(x @ w1^T)``: ``[..., C]``, ``[2I, C]`` (both in the compute dtype) -> ``[..., I]``; one
    kernel where :func:`fc1_fused`, else fc1's GEMM and the gating."""
    if fc1_fused(x, x.dtype):
        return fc1_swiglu_triton(x, w1, wrap=launch)
    return swiglu_forward(F.linear(x, w1), launch)


def swiglu_forward(u: torch.Tensor, launch=direct) -> torch.Tensor:
    """``[..., 2I]`` -> ``[..., I]``.
    Without autograd: the Function's forward, and the op itself when nothing needs a gradient."""
    if use_kernels(u):
        return swiglu_fwd_triton(u, wrap=launch)
    if use_cpu_kernels(u) and cpu_kernels.supports(u):
        return cpu_kernels.swiglu_fwd_cpu(u)
    return swiglu_reference(u).contiguous()


def swiglu_backward(dy: torch.Tensor, u: torch.Tensor, launch=direct) -> torch.Tensor:
    """``du`` (``[..., 2I]``) of ``<dy, swiglu(u)>``."""
    if use_kernels(u):
        return swiglu_bwd_triton(dy, u, wrap=launch)
    if use_cpu_kernels(u) and cpu_kernels.supports(dy, u):
        return cpu_kernels.swiglu_bwd_cpu(dy, u)
    return swiglu_reference_bwd(dy, u).contiguous()


class SwiGLUFunction(torch.autograd.Function):
    """Eager gating: ``apply(u)``."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return swiglu_forward(u)

    @staticmethod
    @recorded_backward
    def backward(ctx, dy):
        return swiglu_backward(dy, ctx.saved_tensors[0])


@fused_op("vigla::swiglu", lambda u: u.new_empty(*u.shape[:-1], u.shape[-1] // 2))
def swiglu_op(u: torch.Tensor) -> torch.Tensor:
    """The custom op: :class:`SwiGLUFunction`'s forward."""
    return swiglu_forward(u, wrap)


@fused_op("vigla::swiglu_bwd", lambda dy, u: u.new_empty(u.shape))
def swiglu_bwd_op(dy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Its backward: ``du``."""
    return swiglu_backward(dy, u, wrap)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _op_backward(ctx, dy):
    return torch.ops.vigla.swiglu_bwd(dy, ctx.saved_tensors[0])


swiglu_op.register_autograd(_op_backward, setup_context=_setup)


@fused_op("vigla::fc1_swiglu", lambda x, w1: x.new_empty(*x.shape[:-1], w1.shape[0] // 2))
def fc1_swiglu_op(x: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """fc1 and the gating as one custom op (what ``torch.compile`` traces where :func:`fc1_fused`); its
    backward keeps ``x`` and ``w1`` and recomputes fc1's output, as :class:`SwiGLUMLPFunction` does."""
    return fc1_swiglu_forward(x, w1, wrap)


def _fc1_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _fc1_backward(ctx, dy):
    x, w1 = ctx.saved_tensors
    du = torch.ops.vigla.swiglu_bwd(dy, F.linear(x, w1))
    return du @ w1, _weight_grad(du, x)


fc1_swiglu_op.register_autograd(_fc1_backward, setup_context=_fc1_setup)


@register_flop_formula(torch.ops.vigla.fc1_swiglu)
def _fc1_flops(x_shape, w1_shape, *args, out_shape=None, **kwargs):
    return 2 * math.prod(x_shape[:-1]) * w1_shape[0] * w1_shape[1]  # fc1's GEMM, as F.linear counts it


def _weight_grad(dy: torch.Tensor, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``sum over rows of dy^T x``: ``[..., O]``, ``[..., I]`` -> ``[O, I]``, in ``dtype`` (default ``dy``'s; float32
    from half-precision inputs written by the GEMM itself on CUDA: :func:`vigla.ops.amp.mm_to`)."""
    return mm_to(dy.reshape(-1, dy.shape[-1]).t(), x.reshape(-1, x.shape[-1]), dtype or dy.dtype)


def swiglu_mlp_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``swiglu(x @ w1^T) @ w2^T`` with the kernels, in the compute dtype, without autograd (CUDA):
    ``[..., C]`` -> ``[..., C_out]``."""
    dtype = compute_dtype(x)  # what autocast would multiply in
    return F.linear(fc1_swiglu_forward(x.to(dtype), w1.to(dtype)), w2.to(dtype))


class SwiGLUMLPFunction(torch.autograd.Function):
    """``swiglu(x @ w1^T) @ w2^T`` keeping only ``x`` (in the compute dtype) for the backward:
    fc1's ``[..., 2I]`` output is recomputed there by one more GEMM, and the gating output by
    the kernel pass that forms ``du``, instead of both being stored (CUDA, with the kernels)."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        dtype = compute_dtype(x)  # what autocast would multiply in
        x_c, w1_c, w2_c = x.to(dtype), w1.to(dtype), w2.to(dtype)
        ctx.save_for_backward(x_c, w1_c, w2_c)
        ctx.dtypes = (x.dtype, w1.dtype, w2.dtype)
        ctx.cast = any(a is not b for a, b in ((x, x_c), (w1, w1_c), (w2, w2_c)))  # copies: not the inputs
        return F.linear(fc1_swiglu_forward(x_c, w1_c), w2_c)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # autograd records the backward: a second derivative
            return _recorded_mlp_backward(ctx, dy)
        x_c, w1_c, w2_c = ctx.saved_tensors
        x_dtype, w1_dtype, w2_dtype = ctx.dtypes
        dy = dy.to(x_c.dtype)
        du, h = swiglu_bwd_triton(dy @ w2_c, F.linear(x_c, w1_c), recompute=True)  # fc1 again
        dx = dw1 = dw2 = None
        if ctx.needs_input_grad[0]:
            dx = (du @ w1_c).to(x_dtype)
        if ctx.needs_input_grad[1]:
            dw1 = _weight_grad(du, x_c, w1_dtype)
        if ctx.needs_input_grad[2]:
            dw2 = _weight_grad(dy, h, w2_dtype)
        return dx, dw1, dw2


def _recorded_mlp_backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`SwiGLUMLPFunction`'s gradients ``(dx, dw1, dw2)`` as ops autograd records (the reference's), for a
    second derivative: the saved tensors are then the inputs themselves. Under autocast they are copies in the
    autocast dtype, which a second derivative cannot follow back to the inputs: one error line instead."""
    if ctx.cast:
        raise RuntimeError("swiglu_mlp: no second derivative under autocast on CUDA (the backward keeps x, w1 and w2 "
                           "only as their autocast copies); take it in float32 or under vigla.ops.reference_ops()")
    x, w1, w2 = ctx.saved_tensors
    u = F.linear(x, w1)
    du = swiglu_reference_bwd(dy @ w2, u)
    return du @ w1, _weight_grad(du, x), _weight_grad(dy, swiglu_reference(u))
