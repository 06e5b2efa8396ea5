"""The locality mix as one op: ``LocalityMixFunction`` (eager) and ``vigla::locality_mix`` (traced);
the fused kernel for CUDA tensors, the compiled ones for float32 CPU tensors (``cpu_kernels.c``), the
reference elsewhere (:mod:`vigla.ops.dispatch`)."""
from __future__ import annotations

import torch

from ..dispatch import HAS_TRITON, direct, fused_op, recorded_backward, use_cpu_kernels, use_kernels, wrap
from . import cpu_kernels
from .reference import locality_mix_reference, locality_mix_reference_bwd

if HAS_TRITON:
    from .triton_kernels import locality_mix_bwd_triton, locality_mix_fwd_triton

__all__ = ["LocalityMixFunction", "locality_mix_forward", "locality_mix_backward"]


def _kernels(o: torch.Tensor) -> bool:
    d = o.shape[-1]
    return use_kernels(o) and not d & (d - 1) and d <= 256  # power-of-two heads


def _cpu_kernels(*tensors: torch.Tensor) -> bool:
    return use_cpu_kernels(tensors[0]) and cpu_kernels.supports(*tensors)


def locality_mix_forward(o, x, z, w_o, w_l, eps: float, act: bool, launch=direct):
    """``[..., h*d]`` in ``o.dtype`` (see :func:`vigla.ops.locality_mix.locality_mix`).
    Without autograd: the Function's forward, and the op itself when nothing needs a gradient."""
    if _kernels(o):
        return locality_mix_fwd_triton(o, x, z, w_o, w_l, eps, act, wrap=launch)
    if _cpu_kernels(o, x, z, w_o, w_l):
        return cpu_kernels.locality_mix_fwd_cpu(o, x, z, w_o, w_l, eps, act)
    return locality_mix_reference(o, x, z, w_o, w_l, eps, act)


def locality_mix_backward(dy, o, x, z, w_o, w_l, eps: float, act: bool, launch=direct):
    """``(do, dx, dz, dw_o, dw_l)`` in the inputs' dtypes."""
    if _kernels(o):
        return locality_mix_bwd_triton(dy, o, x, z, w_o, w_l, eps, act, wrap=launch)
    if _cpu_kernels(o, x, z, w_o, w_l, dy):
        return cpu_kernels.locality_mix_bwd_cpu(dy, o, x, z, w_o, w_l, eps, act)
    return tuple(t.contiguous() for t in locality_mix_reference_bwd(dy, o, x, z, w_o, w_l, eps, act))


class LocalityMixFunction(torch.autograd.Function):
    """Eager locality mix: ``apply(o, x, z, w_o, w_l, eps, act)``."""

    @staticmethod
    def forward(ctx, o, x, z, w_o, w_l, eps, act):
        ctx.save_for_backward(o, x, z, w_o, w_l)
        ctx.eps, ctx.act = eps, act
        return locality_mix_forward(o, x, z, w_o, w_l, eps, act)

    @staticmethod
    @recorded_backward
    def backward(ctx, dy):
        return (*locality_mix_backward(dy, *ctx.saved_tensors, ctx.eps, ctx.act), None, None)


def _fake(o, x, z, w_o, w_l, eps, act):
    return x.new_empty(x.shape, dtype=o.dtype)


def _bwd_fake(dy, o, x, z, w_o, w_l, eps, act):
    return (torch.empty_like(o, memory_format=torch.contiguous_format),
            x.new_empty(x.shape), z.new_empty(z.shape), torch.empty_like(w_o), torch.empty_like(w_l))


@fused_op("vigla::locality_mix", _fake)
def locality_mix_op(o: torch.Tensor, x: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor,
                    w_l: torch.Tensor, eps: float, act: bool) -> torch.Tensor:
    """The custom op: :class:`LocalityMixFunction`'s forward."""
    return locality_mix_forward(o, x, z, w_o, w_l, eps, act, wrap)


@fused_op("vigla::locality_mix_bwd", _bwd_fake)
def locality_mix_bwd_op(dy: torch.Tensor, o: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                        w_o: torch.Tensor, w_l: torch.Tensor, eps: float, act: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Its backward: ``(do, dx, dz, dw_o, dw_l)``."""
    return tuple(locality_mix_backward(dy, o, x, z, w_o, w_l, eps, act, wrap))


def _setup(ctx, inputs, output):
    o, x, z, w_o, w_l, eps, act = inputs
    ctx.save_for_backward(o, x, z, w_o, w_l)
    ctx.eps, ctx.act = eps, act


def _op_backward(ctx, dy):
    return (*torch.ops.vigla.locality_mix_bwd(dy, *ctx.saved_tensors, ctx.eps, ctx.act), None, None)


locality_mix_op.register_autograd(_op_backward, setup_context=_setup)
