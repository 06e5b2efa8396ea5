"""``torch.ops.vigla.bigla_fwd`` / ``bigla_bwd``: BiGLA as PyTorch custom ops.

One op, dispatched by device: the Triton kernels register a CUDA implementation (see
``triton_kernels.py``); every other device runs the chunked reference. Going through a custom op
lets ``torch.compile`` trace a whole model without a graph break and lets
``torch.utils.flop_counter`` count the op with the analytic formula below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ..dispatch import register_cuda
from .chunked import bigla_chunked, bigla_chunked_bwd


def bigla_macs(q_shape, v_shape) -> int:
    """Multiply-accumulates of one BiGLA forward, counted in the recurrent form.

    Per token, head and direction: the state update ``k_t v_t^T`` (K*V) and the readout
    ``q_t^T S_t`` (K*V); two directions. ``q_shape = [B, T, H, K]``, ``v_shape = [B, T, H, V]``.
    """
    B, T, H, K = q_shape
    return 2 * 2 * B * T * H * K * v_shape[-1]


def log_decays(z: torch.Tensor, gate_normalizer: float) -> torch.Tensor:
    """``logsigmoid(z) / gate_normalizer`` in at least float32: what the fused kernels form from
    gate logits inside the kernel (``[B, T, H, K]`` in, same shape out)."""
    return F.logsigmoid(z.to(torch.promote_types(z.dtype, torch.float32))) / gate_normalizer


@torch.library.custom_op("vigla::bigla_fwd", mutates_args=())
def bigla_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gf: torch.Tensor, gb: torch.Tensor,
    scale: float, gate_normalizer: float | None = None,
) -> torch.Tensor:
    """``[B, T, H, V]`` BiGLA output (see :func:`vigla.ops.bigla.bigla`); ``gf``, ``gb``: log decays,
    or with ``gate_normalizer`` gate logits (see :func:`vigla.ops.bigla.bigla_gated`)."""
    with torch.no_grad():
        if gate_normalizer is not None:
            gf, gb = log_decays(gf, gate_normalizer), log_decays(gb, gate_normalizer)
        return bigla_chunked(q, k, v, gf, gb, scale).contiguous()


@bigla_fwd.register_fake
def _(q, k, v, gf, gb, scale, gate_normalizer=None):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("vigla::bigla_bwd", mutates_args=())
def bigla_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gf: torch.Tensor,
    gb: torch.Tensor, scale: float, gate_normalizer: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dgf, dgb)`` of ``<do, bigla_fwd(...)>`` (reference path)."""
    if gate_normalizer is None:
        return tuple(g.contiguous() for g in bigla_chunked_bwd(q, k, v, gf, gb, do, scale))
    log_gf, log_gb = log_decays(gf, gate_normalizer), log_decays(gb, gate_normalizer)
    dq, dk, dv, dlf, dlb = bigla_chunked_bwd(q, k, v, log_gf, log_gb, do, scale)
    # d logsigmoid(z) / dz = sigmoid(-z)
    dzf, dzb = ((d * torch.sigmoid(-z.to(d.dtype)) / gate_normalizer).to(z.dtype)
                for d, z in ((dlf, gf), (dlb, gb)))
    return tuple(g.contiguous() for g in (dq, dk, dv, dzf, dzb))


@bigla_bwd.register_fake
def _(do, q, k, v, gf, gb, scale, gate_normalizer=None):
    return tuple(torch.empty_like(t) for t in (q, k, v, gf, gb))


def _setup_context(ctx, inputs, output):
    q, k, v, gf, gb, scale, gate_normalizer = inputs
    ctx.save_for_backward(q, k, v, gf, gb)
    ctx.scale = scale
    ctx.gate_normalizer = gate_normalizer


def _backward(ctx, do):
    grads = torch.ops.vigla.bigla_bwd(do.contiguous(), *ctx.saved_tensors, ctx.scale,
                                      ctx.gate_normalizer)
    return (*grads, None, None)


bigla_fwd.register_autograd(_backward, setup_context=_setup_context)


class KeptOutputFunction(torch.autograd.Function):
    """BiGLA whose output is already known (``kept``, stored by :func:`vigla.ops.recompute.recompute`):
    the forward returns it, the backward is the op's (``vigla::bigla_bwd``)."""

    @staticmethod
    def forward(ctx, kept, q, k, v, gf, gb, scale, gate_normalizer):
        ctx.save_for_backward(q, k, v, gf, gb)
        ctx.scale, ctx.gate_normalizer = scale, gate_normalizer
        return kept.view_as(kept)

    @staticmethod
    def backward(ctx, do):
        return None, *_backward(ctx, do)


@register_flop_formula(torch.ops.vigla.bigla_fwd)
def _fwd_flops(q_shape, k_shape, v_shape, gf_shape, gb_shape, scale, *args, out_shape=None, **kwargs):
    return 2 * bigla_macs(q_shape, v_shape)


@register_flop_formula(torch.ops.vigla.bigla_bwd)
def _bwd_flops(do_shape, q_shape, k_shape, v_shape, gf_shape, gb_shape, scale, *args, out_shape=None,
               **kwargs):
    # dq, dk, dv: three products of the forward's size, plus the gate terms (same order).
    return 2 * 2 * bigla_macs(q_shape, v_shape)


def supports(K: int, V: int) -> bool:
    """Whether the Triton kernels take heads of ``d_k = K`` and ``d_v = V``."""
    return K in (16, 32, 64, 128) and V in (16, 32, 64, 128, 256)


def _register_triton():
    """Give the ops their CUDA implementation, the fused Triton kernels (if Triton imports), and
    return the same kernels as an eager ``autograd.Function`` (``None`` without Triton)."""
    try:
        from .triton_kernels import bigla_bwd_triton, bigla_fwd_triton
    except ImportError:
        return None

    def fwd_cuda(q, k, v, gf, gb, scale, gate_normalizer=None):
        return bigla_fwd_triton(q, k, v, gf, gb, scale, gate_normalizer=gate_normalizer)

    def bwd_cuda(do, q, k, v, gf, gb, scale, gate_normalizer=None):
        return bigla_bwd_triton(q, k, v, gf, gb, do, scale, gate_normalizer=gate_normalizer)

    return register_cuda("BiGLAFunction", bigla_fwd, bigla_bwd, fwd_cuda, bwd_cuda, num_tensors=5)


# what eager mode calls on CUDA: the kernels without the custom op's dispatch cost
BiGLAFunction = _register_triton()
HAS_TRITON = BiGLAFunction is not None
