"""``locality_mix``: ViG's output mix ``act(G * RMSNorm(o) + (1 - G) * RMSNorm(x))``, G = sigmoid(z).

Backends: ``reference`` (PyTorch, any device, autograd), ``triton`` (one fused kernel forward,
one backward; under ``torch.compile`` through the custom op ``vigla::locality_mix``, which it
traces without a graph break, in eager mode through a plain ``autograd.Function``, which costs
less to call); ``auto`` takes Triton for CUDA tensors (see :mod:`vigla.ops.dispatch`).
"""
from __future__ import annotations

import torch

from ..dispatch import HAS_TRITON, register_cuda, resolve
from ..tracing import exporting
from .reference import locality_mix_reference, locality_mix_reference_bwd

__all__ = ["locality_mix", "locality_mix_reference", "locality_mix_reference_bwd"]


@torch.library.custom_op("vigla::locality_mix", mutates_args=())
def _mix_op(o: torch.Tensor, x: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor, w_l: torch.Tensor,
            eps: float, act: bool) -> torch.Tensor:
    return locality_mix_reference(o, x, z, w_o, w_l, eps, act)


@_mix_op.register_fake
def _(o, x, z, w_o, w_l, eps, act):
    return x.new_empty(x.shape, dtype=o.dtype)


@torch.library.custom_op("vigla::locality_mix_bwd", mutates_args=())
def _mix_bwd_op(dy: torch.Tensor, o: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                w_o: torch.Tensor, w_l: torch.Tensor, eps: float, act: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t.contiguous() for t in locality_mix_reference_bwd(dy, o, x, z, w_o, w_l, eps, act))


@_mix_bwd_op.register_fake
def _(dy, o, x, z, w_o, w_l, eps, act):
    return (torch.empty_like(o, memory_format=torch.contiguous_format),
            x.new_empty(x.shape), z.new_empty(z.shape), torch.empty_like(w_o), torch.empty_like(w_l))


def _setup(ctx, inputs, output):
    o, x, z, w_o, w_l, eps, act = inputs
    ctx.save_for_backward(o, x, z, w_o, w_l)
    ctx.eps, ctx.act = eps, act


def _backward(ctx, dy):
    return (*torch.ops.vigla.locality_mix_bwd(dy, *ctx.saved_tensors, ctx.eps, ctx.act), None, None)


_mix_op.register_autograd(_backward, setup_context=_setup)

if HAS_TRITON:  # the CUDA implementations
    from .triton_kernels import locality_mix_bwd_triton, locality_mix_fwd_triton

    _MixFunction = register_cuda("_MixFunction", _mix_op, _mix_bwd_op, locality_mix_fwd_triton,
                                 locality_mix_bwd_triton, num_tensors=5)


def locality_mix(o: torch.Tensor, x: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor,
                 w_l: torch.Tensor, eps: float = 1e-6, act: bool = False,
                 backend: str = "auto") -> torch.Tensor:
    """ViG's 2-D gating locality injection.

    Args:
        o: ``[..., h, d]`` global branch (the BiGLA output).
        x: ``[..., h*d]`` local branch (the depthwise-conv output).
        z: ``[..., h*d]`` gate logits (a column slice of a wider projection is fine).
        w_o, w_l: ``[d]`` weights of the two RMSNorms (shared by the heads).
        eps: RMSNorm epsilon. act: SiLU on the result.

    Returns:
        ``[..., h*d]`` in ``o.dtype``: ``act(sigmoid(z) * rms(o) * w_o + (1 - sigmoid(z)) * rms(x) * w_l)``
        per head.
    """
    # torch.export / ONNX / TorchScript / torch.jit.trace: the plain formula (vigla.ops.tracing)
    if torch.jit.is_scripting() or exporting():
        return locality_mix_reference(o, x, z, w_o, w_l, eps, act)
    if o.dim() < 2 or x.shape != z.shape or x.shape[:-1] != o.shape[:-2] \
            or x.shape[-1] != o.shape[-2] * o.shape[-1]:
        raise ValueError(f"locality_mix: expected o [..., h, d] and x, z [..., h*d] with the same "
                         f"leading dims, got o {tuple(o.shape)}, x {tuple(x.shape)}, z {tuple(z.shape)}")
    if w_o.shape != (o.shape[-1],) or w_l.shape != (o.shape[-1],):
        raise ValueError(f"locality_mix: w_o and w_l must be [{o.shape[-1]}], got "
                         f"{tuple(w_o.shape)} and {tuple(w_l.shape)}")
    d = o.shape[-1]
    if backend == "auto" and (d & (d - 1) or d > 256):  # the kernel takes power-of-two heads
        backend = "reference"
    if resolve(backend, o, "locality_mix") == "triton":
        if torch.compiler.is_compiling():  # the custom op: traced without a graph break
            return _mix_op(o, x, z, w_o, w_l, float(eps), bool(act))
        return _MixFunction.apply(o, x, z, w_o, w_l, float(eps), bool(act))
    return locality_mix_reference(o, x, z, w_o, w_l, eps, act)
