"""``swiglu(u)``: ``SiLU(a) * b`` for ``[a | b] = u``, the gating of ViG's MLP.

Backends: ``reference`` (PyTorch, any device), ``triton`` (fused forward and backward; the custom
op ``vigla::swiglu`` under ``torch.compile``, a plain ``autograd.Function`` in eager mode);
``auto`` takes Triton for CUDA tensors (:mod:`vigla.ops.dispatch`).
"""
from __future__ import annotations

import torch

from ..dispatch import HAS_TRITON, register_cuda, resolve
from .reference import swiglu_reference, swiglu_reference_bwd

__all__ = ["swiglu", "swiglu_linear", "swiglu_reference", "swiglu_reference_bwd"]


@torch.library.custom_op("vigla::swiglu", mutates_args=())
def _swiglu_op(u: torch.Tensor) -> torch.Tensor:
    return swiglu_reference(u).contiguous()


@_swiglu_op.register_fake
def _(u):
    return u.new_empty(*u.shape[:-1], u.shape[-1] // 2)


@torch.library.custom_op("vigla::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return swiglu_reference_bwd(dy, u).contiguous()


@_swiglu_bwd_op.register_fake
def _(dy, u):
    return u.new_empty(u.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    return torch.ops.vigla.swiglu_bwd(dy, ctx.saved_tensors[0])


_swiglu_op.register_autograd(_backward, setup_context=_setup)

if HAS_TRITON:  # the CUDA implementations
    from .triton_kernels import swiglu_bwd_triton, swiglu_fwd_triton

    _SwiGLUFunction = register_cuda("_SwiGLUFunction", _swiglu_op, _swiglu_bwd_op, swiglu_fwd_triton,
                                    swiglu_bwd_triton, num_tensors=1)


    class _SwiGLULinearFunction(torch.autograd.Function):
        """``swiglu(u) @ w^T`` keeping only ``u`` for the backward: the gating output is recomputed
        there, in the pass that forms ``du``, instead of being stored for the weight gradient."""

        @staticmethod
        def forward(ctx, u, w):
            w_c = w.to(u.dtype)  # what autocast would multiply with
            ctx.save_for_backward(u, w_c)
            ctx.weight_dtype = w.dtype
            return torch.nn.functional.linear(swiglu_fwd_triton(u), w_c)

        @staticmethod
        def backward(ctx, dy):
            u, w_c = ctx.saved_tensors
            dy = dy.to(u.dtype)
            du, h = swiglu_bwd_triton(dy @ w_c, u, recompute=True)
            dw = None
            if ctx.needs_input_grad[1]:
                dw = (dy.reshape(-1, dy.shape[-1]).t() @ h.reshape(-1, h.shape[-1])).to(ctx.weight_dtype)
            return du, dw


def swiglu_linear(u: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``F.linear(swiglu(u), weight)``: SwiGLU's gating and its down projection (no bias).

    ``u``: ``[..., 2I]``, ``weight``: ``[C, I]`` -> ``[..., C]``. On the Triton path the product
    runs in ``u.dtype`` (under autocast: the low-precision fc1 output, as autocast would) and only
    ``u`` is kept for the backward: the ``[..., I]`` gating output is recomputed there, one fewer
    activation per block. Gradients equal those of the composition.
    """
    if weight.dim() != 2 or weight.shape[1] * 2 != u.shape[-1]:
        raise ValueError(f"swiglu_linear: weight must be [C, I] with 2I = {u.shape[-1]} (u's last "
                         f"dim), got {tuple(weight.shape)}")
    if resolve(backend, u, "swiglu_linear") == "triton" and not torch.compiler.is_compiling():
        return _SwiGLULinearFunction.apply(u, weight)
    return torch.nn.functional.linear(swiglu(u, backend), weight)


def swiglu(u: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``u``: ``[..., 2I]`` -> ``[..., I]`` = ``SiLU(u[..., :I]) * u[..., I:]``, in ``u.dtype``."""
    if u.dim() < 1 or u.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim must be even ([..., 2I]), got shape {tuple(u.shape)}")
    if resolve(backend, u, "swiglu") == "triton":
        if torch.compiler.is_compiling():  # the custom op: traced without a graph break
            return _swiglu_op(u)
        return _SwiGLUFunction.apply(u)
    return swiglu_reference(u)
