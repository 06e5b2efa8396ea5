"""The residual add and norm as one op: ``AddNormFunction`` (eager) and ``vigla::add_norm``
(traced); the fused kernels for CUDA tensors, the compiled ones for float32 CPU tensors
(``cpu_kernels.c``), the reference elsewhere (:mod:`vigla.ops.dispatch`).

Both return ``(s, y)`` with ``s`` empty (``[0]``) when there is no ``delta`` (the residual is then
``x`` itself, which a custom op may not return). The backward needs only the residual ``s``
(``x`` without ``delta``), saved instead of ``x`` and ``delta``.

For the inference path only (no autograd formula), the add + norm with the layer before it in the same kernel
on CUDA: ``vigla::linear_add_norm`` (an output projection, ``delta = h @ wl^T``) and ``vigla::mlp_add_norm``
(a whole SwiGLU MLP, ``delta = swiglu(x @ w1^T) @ w2^T``); elsewhere the layer, then the add + norm. Between
the two, an RMSNorm can be split: ``linear_add_norm`` without a weight forms only each row's reciprocal RMS,
and ``mlp_add_norm`` takes the un-normalized rows with that ``row_scale`` and the norm's weight folded into
fc1 (the normalized rows never go to memory).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import (HAS_TRITON, direct, fused_op, issued_eagerly, recorded_backward, use_cpu_kernels,
                        use_kernels, wrap)
from ..swiglu.op import fc1_swiglu_forward
from . import cpu_kernels
from .reference import add_norm_reference, add_norm_reference_bwd, residual_sum, rms_rstd

if HAS_TRITON:
    from .triton_kernels import (LINEAR_MAX_C, LINEAR_MAX_K, MAX_C, MLP_MAX_C, add_norm_bwd_triton,
                                 add_norm_fwd_triton, linear_add_norm_fwd_triton, mlp_add_norm_fwd_triton,
                                 mlp_fills_device)

__all__ = ["AddNormFunction", "add_norm_forward", "add_norm_backward", "cpu_forward", "linear_fused",
           "linear_add_norm_forward", "linear_add_norm_op", "mlp_fused", "mlp_add_norm_forward", "mlp_add_norm_op",
           "scale_rows"]


def _kernels(x: torch.Tensor) -> bool:
    return use_kernels(x) and x.shape[-1] <= MAX_C


def cpu_forward(x, delta, weight, bias, out_dtype: torch.dtype) -> bool:
    """Whether the forward runs the compiled CPU kernels: float32 CPU tensors and ``out_dtype``."""
    return use_cpu_kernels(x) and out_dtype == torch.float32 and cpu_kernels.supports(x, delta, weight, bias)


def add_norm_forward(x, delta, weight, bias, eps: float, rms: bool, out_dtype: torch.dtype, launch=direct):
    """``(s, y)``: ``s`` ``[..., C]`` in ``x.dtype`` (``[0]`` without ``delta``), ``y`` in ``out_dtype``.
    Without autograd: the Function's forward, and the op itself when nothing needs a gradient."""
    if _kernels(x):
        return add_norm_fwd_triton(x, delta, weight, bias, eps, rms, out_dtype, wrap=launch)
    if cpu_forward(x, delta, weight, bias, out_dtype):
        return cpu_kernels.add_norm_fwd_cpu(x, delta, weight, bias, eps, rms)
    s, y = add_norm_reference(x, delta, weight, bias, eps, rms, out_dtype)
    return (s.contiguous() if delta is not None else x.new_empty(0)), y.contiguous()


def linear_fused(x: torch.Tensor, h: torch.Tensor, wl: torch.Tensor) -> bool:
    """Whether :func:`linear_add_norm_forward` runs one kernel for these: CUDA with the kernels, ``h`` and ``wl``
    (``[C, K]``) in one half-precision dtype, ``C`` and ``K`` at most 256 (wider products: cuBLAS's GEMM then
    the add + norm kernel took less time)."""
    return (use_kernels(x) and h.dtype in (torch.float16, torch.bfloat16) and wl.dtype == h.dtype
            and wl.shape[0] <= LINEAR_MAX_C and wl.shape[1] <= LINEAR_MAX_K)


def linear_add_norm_forward(h, wl, x, weight, bias, eps: float, rms: bool, out_dtype: torch.dtype, launch=direct):
    """``(s, y)``: ``s = x + h @ wl^T``, ``y = norm(s)`` (``h``: ``[..., K]``, ``wl``: ``[C, K]``, ``x``: ``[..., C]``),
    without autograd: one kernel where :func:`linear_fused`, else the product then :func:`add_norm_forward`. Without
    a ``weight`` (RMSNorm only, its weight folded into the product after it: :func:`mlp_add_norm_forward`'s
    ``row_scale``), ``y`` is ``[...]`` in float32, the rows' reciprocal RMS ``rsqrt(mean(s^2) + eps)``."""
    if weight is None and not rms:
        raise ValueError("linear_add_norm: without a weight only RMSNorm's statistic is formed; pass rms=True")
    if linear_fused(x, h, wl):
        return linear_add_norm_fwd_triton(h, wl, x, weight, bias, eps, rms, out_dtype, wrap=launch)
    delta = (h @ wl.t()).view(x.shape)
    if weight is None:
        s = residual_sum(x, delta).contiguous()
        return s, rms_rstd(s.float(), eps).squeeze(-1)  # float32, as the kernel's
    return add_norm_forward(x, delta, weight, bias, eps, rms, out_dtype, launch)


def mlp_fused(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether :func:`mlp_add_norm_forward` runs one kernel: CUDA with the kernels, ``x`` (``[..., C]``), ``w1``
    (``[2I, C]``) and ``w2`` (``[C, I]``) in one half-precision dtype, ``C`` at most 192; and either a call issued
    eagerly (:func:`vigla.ops.dispatch.issued_eagerly`), or at least one 128-row tile per multiprocessor. Traced by
    ``torch.compile`` or captured into a CUDA graph (little host time to save), fewer rows (e.g. batch 1) take
    fc1 + SwiGLU, fc2 and the add + norm as separate kernels, which spread the work over more multiprocessors;
    issued eagerly, where so few rows leave the device waiting on the host, one launch and its Python cost less (a
    ViG block's second half: two kernels instead of three)."""
    return (use_kernels(x) and x.dtype in (torch.float16, torch.bfloat16) and w1.dtype == w2.dtype == x.dtype
            and w2.shape[0] <= MLP_MAX_C and (issued_eagerly()
                                              or mlp_fills_device(x.numel() // max(x.shape[-1], 1), x.device.index)))


def scale_rows(x: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """``diag(row_scale) x`` in ``x``'s dtype (multiplied in float32 or wider): ``x`` ``[..., C]``, ``row_scale``
    ``[...]`` (or its rows flattened). The unfused form of :func:`mlp_add_norm_forward`'s ``row_scale``."""
    f = torch.promote_types(x.dtype, torch.float32)
    return (x.to(f) * row_scale.reshape(*x.shape[:-1], 1).to(f)).to(x.dtype)


def mlp_add_norm_forward(x, w1, w2, r, weight, bias, eps: float, rms: bool, out_dtype: torch.dtype,
                         row_scale: Optional[torch.Tensor] = None, launch=direct):
    """``(s, y)``: ``s = r + swiglu(diag(row_scale) x @ w1^T) @ w2^T``, ``y = norm(s)`` (``x``: ``[..., C]``, ``w1``:
    ``[2I, C]``, ``w2``: ``[C, I]``, ``r``: ``[..., C]``, ``row_scale``: ``[...]`` float32 or None; ``s`` in
    ``r.dtype``, ``y`` in ``out_dtype``), without autograd: a SwiGLU MLP (ViG's, fc1's halves SiLU-gate then
    linear) and the residual add + norm after it, one kernel where :func:`mlp_fused`, else fc1 + SwiGLU then
    :func:`linear_add_norm_forward`. With ``row_scale`` the MLP's input is an RMSNorm's output whose weight ``w1``
    holds: ``x`` its input, ``row_scale`` the reciprocal RMS (:func:`linear_add_norm_forward` without a weight)."""
    if mlp_fused(x, w1, w2):
        return mlp_add_norm_fwd_triton(x, w1, w2, r, weight, bias, eps, rms, out_dtype, row_scale, wrap=launch)
    if row_scale is not None:
        x = scale_rows(x, row_scale)
    return linear_add_norm_forward(fc1_swiglu_forward(x, w1, launch), w2, r, weight, bias, eps, rms, out_dtype,
                                   launch)


def add_norm_backward(dy, ds, s, weight, bias, eps: float, rms: bool, delta_dtype: Optional[torch.dtype],
                      launch=direct):
    """``(dx, ddelta, dweight, dbias)``: ``ddelta`` only when ``delta_dtype`` differs from ``s.dtype``
    and ``dbias`` only with a bias; ``[0]`` otherwise."""
    if _kernels(s):
        return add_norm_bwd_triton(dy, ds, s, weight, bias, eps, rms, delta_dtype, wrap=launch)
    if use_cpu_kernels(s) and cpu_kernels.supports(dy, ds, s, weight, bias):
        dx, dw, db = cpu_kernels.add_norm_bwd_cpu(dy, ds, s, weight, bias is not None, eps, rms)
    else:
        dx, dw, db = add_norm_reference_bwd(dy, ds, s, weight, bias, eps, rms)
    ddelta = dx.to(delta_dtype) if delta_dtype is not None and delta_dtype != s.dtype else dx.new_empty(0)
    return dx.contiguous(), ddelta, dw, db if db is not None else dw.new_empty(0)


def _input_grads(dx, ddelta, dw, db, delta_dtype, has_bias: bool):
    """The gradients of ``(x, delta, weight, bias)`` from the backward's outputs."""
    dd = None if delta_dtype is None else (ddelta if delta_dtype != dx.dtype else dx)
    return dx, dd, dw, db if has_bias else None


class AddNormFunction(torch.autograd.Function):
    """Eager add + norm: ``apply(x, delta, weight, bias, eps, rms, out_dtype)`` -> ``(s, y)``."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, eps, rms, out_dtype):
        s, y = add_norm_forward(x, delta, weight, bias, eps, rms, out_dtype)
        ctx.save_for_backward(s if delta is not None else x, weight, bias)
        ctx.eps, ctx.rms = eps, rms
        ctx.delta_dtype = delta.dtype if delta is not None else None
        return s, y

    @staticmethod
    @recorded_backward
    def backward(ctx, ds, dy):
        s, weight, bias = ctx.saved_tensors
        ds = ds if ctx.delta_dtype is not None else None
        grads = add_norm_backward(dy, ds, s, weight, bias, ctx.eps, ctx.rms, ctx.delta_dtype)
        return (*_input_grads(*grads, ctx.delta_dtype, bias is not None), None, None, None)


def _fake(x, delta, weight, bias, eps, rms, out_dtype):
    return x.new_empty(x.shape if delta is not None else (0,)), x.new_empty(x.shape, dtype=out_dtype)


def _bwd_fake(dy, ds, s, weight, bias, eps, rms, delta_dtype):
    store_dd = delta_dtype is not None and delta_dtype != s.dtype
    return (s.new_empty(s.shape), s.new_empty(s.shape if store_dd else (0,), dtype=delta_dtype or s.dtype),
            torch.empty_like(weight), bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0))


@fused_op("vigla::add_norm", _fake)
def add_norm_op(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                bias: Optional[torch.Tensor], eps: float, rms: bool, out_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The custom op: :class:`AddNormFunction`'s forward."""
    return add_norm_forward(x, delta, weight, bias, eps, rms, out_dtype, wrap)


@fused_op("vigla::add_norm_bwd", _bwd_fake)
def add_norm_bwd_op(dy: torch.Tensor, ds: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor], eps: float, rms: bool, delta_dtype: Optional[torch.dtype]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Its backward: ``(dx, ddelta, dweight, dbias)`` (see :func:`add_norm_backward`)."""
    return tuple(add_norm_backward(dy, ds, s, weight, bias, eps, rms, delta_dtype, wrap))


def _setup(ctx, inputs, output):
    x, delta, weight, bias, eps, rms, _ = inputs
    ctx.save_for_backward(output[0] if delta is not None else x, weight, bias)
    ctx.eps, ctx.rms = eps, rms
    ctx.delta_dtype = delta.dtype if delta is not None else None


def _op_backward(ctx, ds, dy):
    s, weight, bias = ctx.saved_tensors
    ds = ds if ctx.delta_dtype is not None else None
    grads = torch.ops.vigla.add_norm_bwd(dy, ds, s, weight, bias, ctx.eps, ctx.rms, ctx.delta_dtype)
    return (*_input_grads(*grads, ctx.delta_dtype, bias is not None), None, None, None)


add_norm_op.register_autograd(_op_backward, setup_context=_setup)


def _linear_fake(h, wl, x, weight, bias, eps, rms, out_dtype):
    if weight is None:
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype)


@fused_op("vigla::linear_add_norm", _linear_fake)
def linear_add_norm_op(h: torch.Tensor, wl: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float, rms: bool, out_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_add_norm_forward` as a custom op, for inference only (no autograd formula): what a compiled
    model's inference path calls (:mod:`vigla.ops.inference`)."""
    return linear_add_norm_forward(h, wl, x, weight, bias, eps, rms, out_dtype, wrap)


def _mlp_fake(x, w1, w2, r, weight, bias, eps, rms, out_dtype, row_scale=None):
    return r.new_empty(r.shape), r.new_empty(r.shape, dtype=out_dtype)


@fused_op("vigla::mlp_add_norm", _mlp_fake)
def mlp_add_norm_op(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor], eps: float, rms: bool, out_dtype: torch.dtype,
                    row_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mlp_add_norm_forward` as a custom op, for inference only (no autograd formula): what a compiled
    model's inference path calls (:mod:`vigla.ops.inference`)."""
    return mlp_add_norm_forward(x, w1, w2, r, weight, bias, eps, rms, out_dtype, row_scale, wrap)
