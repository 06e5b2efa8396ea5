"""BiGLA as one op: ``BiGLAFunction`` (eager) and the custom op ``vigla::bigla_fwd`` (traced).

Both run the same implementation, chosen by :mod:`vigla.ops.dispatch`: the chunk-parallel Triton
kernels (``triton_kernels.py``) for CUDA tensors, the compiled recurrences of ``cpu_kernels.c`` for
CPU tensors (float32 work), the chunked PyTorch reference (``chunked.py``, with its hand-written
backward) elsewhere: float64, without a C compiler, inside ``reference_ops()``. The custom op
carries the analytic FLOP formula for ``torch.utils.flop_counter``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from ..dispatch import HAS_TRITON, direct, fused_op, recorded_backward, use_cpu_kernels, use_kernels, wrap
from ..locality_mix.op import locality_mix_forward
from . import cpu_kernels
from .chunked import bigla_chunked, bigla_chunked_bwd

if HAS_TRITON:
    from .triton_kernels import bigla_bwd_triton, bigla_fwd_triton, mixes, supports
else:
    def supports(K: int, V: int) -> bool:
        return False

    mixes = supports

__all__ = ["BiGLAFunction", "bigla_forward", "bigla_backward", "bigla_mix_forward", "bigla_macs", "log_decays",
           "supports"]


def bigla_macs(q_shape, v_shape) -> int:
    """Multiply-accumulates of one BiGLA forward, counted in the recurrent form.

    Per token, head and direction: the state update ``k_t v_t^T`` (K*V) and the readout
    ``q_t^T S_t`` (K*V); two directions. ``q_shape = [B, T, H, K]``, ``v_shape = [B, T, H, V]``.
    """
    B, T, H, K = q_shape
    return 2 * 2 * B * T * H * K * v_shape[-1]


def log_decays(z: torch.Tensor, gate_normalizer: float) -> torch.Tensor:
    """``logsigmoid(z) / gate_normalizer`` in at least float32: what the fused kernels form from
    gate logits inside the kernel (``[B, T, H, K]`` in, same shape out).

    Computed as ``min(z, 0) - log1p(t)``, ``t = exp(-|z|)``, with ``log1p(t) = t log(u) / (u - 1)``,
    ``u = 1 + t`` (exact to an ulp, and vectorised on a CPU, where PyTorch's ``logsigmoid`` and
    ``log1p`` are not; the Triton kernels use a short series for the same ``log1p``, to a few ulp)."""
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    t = torch.exp(-z.abs())
    u = 1 + t
    d = u - 1
    tiny = d == 0  # t below half an ulp of 1: log1p(t) = t
    log1p = torch.where(tiny, t, t * torch.log(u) / torch.where(tiny, 1.0, d))
    return (z.clamp(max=0) - log1p) / gate_normalizer


def _gate_grads(grads: tuple, gf: torch.Tensor, gb: torch.Tensor, gate_normalizer: Optional[float]) -> tuple:
    """``(dq, dk, dv, dlog_gf, dlog_gb)`` -> the same with the gates' gradients in the gates' dtypes: the
    logits' (``d logsigmoid(z) / dz = sigmoid(-z)``) when ``gate_normalizer`` is given."""
    if gate_normalizer is None:
        return (*grads[:3], grads[3].to(gf.dtype), grads[4].to(gb.dtype))
    return (*grads[:3], *((d * torch.sigmoid(-z.to(d.dtype)) / gate_normalizer).to(z.dtype)
                          for d, z in zip(grads[3:], (gf, gb))))


def _kernels(q: torch.Tensor, v: torch.Tensor) -> bool:
    return use_kernels(q) and supports(q.shape[-1], v.shape[-1])


def _cpu_kernels(q: torch.Tensor, v: torch.Tensor) -> bool:
    return use_cpu_kernels(q) and q.dtype != torch.float64 and cpu_kernels.supports(v.shape[-1])


def bigla_forward(q, k, v, gf, gb, scale: float, gate_normalizer: Optional[float], launch=direct):
    """``[B, T, H, V]`` output (see :func:`vigla.ops.bigla.bigla`; ``gf``, ``gb`` are gate logits
    when ``gate_normalizer`` is given), without autograd: :class:`BiGLAFunction`'s forward, and the
    op itself when nothing needs a gradient. ``launch``: how kernels are launched (``wrap`` inside
    the custom op)."""
    if _kernels(q, v):
        return bigla_fwd_triton(q, k, v, gf, gb, scale, gate_normalizer, wrap=launch)
    with torch.no_grad():
        if _cpu_kernels(q, v):
            return cpu_kernels.bigla_fwd_cpu(q, k, v, gf, gb, scale, gate_normalizer)
        if gate_normalizer is not None:
            gf, gb = log_decays(gf, gate_normalizer), log_decays(gb, gate_normalizer)
        return bigla_chunked(q, k, v, gf, gb, scale).contiguous()


def bigla_mix_forward(q, k, v, zf, zb, scale: float, gate_normalizer: float, x, z, w_o, w_l, eps: float, act: bool,
                      launch=direct):
    """ViG's locality mix of BiGLA's output, ``locality_mix(bigla_gated(q, k, v, zf, zb), x, z, ...)``
    (:func:`vigla.ops.locality_mix.locality_mix`'s arguments after the first), without autograd: the inference
    path's op. ``[B, T, H * V]`` in ``q.dtype``. On CUDA (heads up to ``d_v = 64``) BiGLA's output kernel forms
    the mix from its float32 output tile: BiGLA's output is never written (the unfused path rounds it to
    ``q.dtype`` before the mix). On the CPU, float32, BiGLA's compiled kernel mixes each token's output as soon as
    it is whole (the mix kernel's formula). Elsewhere the two ops one after the other."""
    if use_kernels(q) and mixes(q.shape[-1], v.shape[-1]):
        y = bigla_fwd_triton(q, k, v, zf, zb, scale, gate_normalizer, wrap=launch,
                             mix=(x, z, w_o, w_l, eps, act))
        return y.view(x.shape)
    if _cpu_kernels(q, v) and all(t.dtype == torch.float32 for t in (q, x, z, w_o, w_l)):
        return cpu_kernels.bigla_mix_fwd_cpu(q, k, v, zf, zb, x, z, w_o, w_l, scale, gate_normalizer, eps, act)
    return locality_mix_forward(bigla_forward(q, k, v, zf, zb, scale, gate_normalizer, launch), x, z, w_o, w_l,
                                eps, act, launch)


def bigla_backward(do, q, k, v, gf, gb, scale: float, gate_normalizer: Optional[float], launch=direct):
    """``(dq, dk, dv, dgf, dgb)`` of ``<do, bigla_forward(...)>``, in the inputs' dtypes."""
    if _kernels(q, v):
        return bigla_bwd_triton(q, k, v, gf, gb, do, scale, gate_normalizer, wrap=launch)
    gn = gate_normalizer
    if _cpu_kernels(q, v):
        grads = cpu_kernels.bigla_bwd_cpu(q, k, v, gf, gb, do, scale, gn)
    else:
        log_gf, log_gb = (gf, gb) if gn is None else (log_decays(gf, gn), log_decays(gb, gn))
        grads = _gate_grads(bigla_chunked_bwd(q, k, v, log_gf, log_gb, do, scale), gf, gb, gn)
    return tuple(g.contiguous() for g in grads)


class BiGLAFunction(torch.autograd.Function):
    """Eager BiGLA: ``apply(q, k, v, gf, gb, scale, gate_normalizer)`` -> ``[B, T, H, V]``."""

    @staticmethod
    def forward(ctx, q, k, v, gf, gb, scale, gate_normalizer):
        ctx.save_for_backward(q, k, v, gf, gb)
        ctx.scale, ctx.gate_normalizer = scale, gate_normalizer
        return bigla_forward(q, k, v, gf, gb, scale, gate_normalizer)

    @staticmethod
    @recorded_backward
    def backward(ctx, do):
        return (*bigla_backward(do, *ctx.saved_tensors, ctx.scale, ctx.gate_normalizer), None, None)


def _fwd_fake(q, k, v, gf, gb, scale, gate_normalizer=None):
    return q.new_empty(*q.shape[:3], v.shape[-1])


def _bwd_fake(do, q, k, v, gf, gb, scale, gate_normalizer=None):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, gf, gb))


@fused_op("vigla::bigla_fwd", _fwd_fake)
def bigla_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gf: torch.Tensor, gb: torch.Tensor,
              scale: float, gate_normalizer: Optional[float] = None) -> torch.Tensor:
    """The custom op: :class:`BiGLAFunction`'s forward."""
    return bigla_forward(q, k, v, gf, gb, scale, gate_normalizer, wrap)


@fused_op("vigla::bigla_bwd", _bwd_fake)
def bigla_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gf: torch.Tensor,
              gb: torch.Tensor, scale: float, gate_normalizer: Optional[float] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Its backward: ``(dq, dk, dv, dgf, dgb)``."""
    return tuple(bigla_backward(do.contiguous(), q, k, v, gf, gb, scale, gate_normalizer, wrap))


@fused_op("vigla::bigla_mix", lambda q, k, v, zf, zb, scale, gn, x, *args: x.new_empty(x.shape, dtype=q.dtype))
def bigla_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, zf: torch.Tensor, zb: torch.Tensor, scale: float,
              gate_normalizer: float, x: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor, w_l: torch.Tensor,
              eps: float, act: bool) -> torch.Tensor:
    """The inference path's custom op: :func:`bigla_mix_forward` (no autograd)."""
    return bigla_mix_forward(q, k, v, zf, zb, scale, gate_normalizer, x, z, w_o, w_l, eps, act, wrap)


def _setup_context(ctx, inputs, output):
    q, k, v, gf, gb, scale, gate_normalizer = inputs
    ctx.save_for_backward(q, k, v, gf, gb)
    ctx.scale, ctx.gate_normalizer = scale, gate_normalizer


def _op_backward(ctx, do):
    grads = torch.ops.vigla.bigla_bwd(do, *ctx.saved_tensors, ctx.scale, ctx.gate_normalizer)
    return (*grads, None, None)


bigla_fwd.register_autograd(_op_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.vigla.bigla_fwd)
def _fwd_flops(q_shape, k_shape, v_shape, gf_shape, gb_shape, scale, *args, out_shape=None, **kwargs):
    return 2 * bigla_macs(q_shape, v_shape)


@register_flop_formula(torch.ops.vigla.bigla_mix)
def _mix_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
    return 2 * bigla_macs(q_shape, v_shape)  # BiGLA's; the mix is elementwise (as locality_mix, uncounted)


@register_flop_formula(torch.ops.vigla.bigla_bwd)
def _bwd_flops(do_shape, q_shape, k_shape, v_shape, gf_shape, gb_shape, scale, *args, out_shape=None,
               **kwargs):
    # dq, dk, dv: three products of the forward's size, plus the gate terms (same order).
    return 2 * 2 * bigla_macs(q_shape, v_shape)
