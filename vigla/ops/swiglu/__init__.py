"""``swiglu(u)``: ``SiLU(a) * b`` for ``[a | b] = u``, the gating of ViG's MLP.

Backends: ``reference`` (PyTorch, any device), ``triton`` (fused forward and backward; the custom
op ``vigla::swiglu`` under ``torch.compile``, a plain ``autograd.Function`` in eager mode);
``auto`` takes Triton for CUDA tensors (:mod:`vigla.ops.dispatch`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import HAS_TRITON, compute_dtype, register_cuda, resolve
from ..recompute import replaying
from ..tracing import exporting
from .reference import swiglu_reference, swiglu_reference_bwd

__all__ = ["swiglu", "swiglu_mlp", "swiglu_reference", "swiglu_reference_bwd"]


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


    class _SwiGLUMLPFunction(torch.autograd.Function):
        """``swiglu(x @ w1^T) @ w2^T`` keeping only ``x`` (in the compute dtype) for the backward:
        fc1's ``[..., 2I]`` output is recomputed there by one more GEMM, and the gating output by
        the pass that forms ``du``, instead of both being stored."""

        @staticmethod
        def forward(ctx, x, w1, w2):
            dtype = compute_dtype(x)  # what autocast would multiply in
            x_c, w1_c, w2_c = x.to(dtype), w1.to(dtype), w2.to(dtype)
            u = F.linear(x_c, w1_c)
            # within a recompute replay (vigla.ops.recompute) nothing outlives the block's
            # backward: keep u rather than run fc1 a third time
            ctx.save_for_backward(x_c, w1_c, w2_c, *((u,) if replaying() else ()))
            ctx.dtypes = (x.dtype, w1.dtype, w2.dtype)
            return F.linear(swiglu_fwd_triton(u), w2_c)

        @staticmethod
        def backward(ctx, dy):
            x_c, w1_c, w2_c, *kept = ctx.saved_tensors
            x_dtype, w1_dtype, w2_dtype = ctx.dtypes
            dy = dy.to(x_c.dtype)
            u = kept[0] if kept else F.linear(x_c, w1_c)  # fc1 again
            du, h = swiglu_bwd_triton(dy @ w2_c, u, recompute=True)
            dx = dw1 = dw2 = None
            if ctx.needs_input_grad[0]:
                dx = (du @ w1_c).to(x_dtype)
            if ctx.needs_input_grad[1]:
                dw1 = _weight_grad(du, x_c).to(w1_dtype)
            if ctx.needs_input_grad[2]:
                dw2 = _weight_grad(dy, h).to(w2_dtype)
            return dx, dw1, dw2


def _weight_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum over rows of dy^T x``: ``[..., O]``, ``[..., I]`` -> ``[O, I]``."""
    return dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def swiglu_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``F.linear(swiglu(F.linear(x, w1)), w2)``: ViG's MLP (no biases).

    ``x``: ``[..., C]``, ``w1``: ``[2I, C]`` (fc1), ``w2``: ``[C_out, I]`` (fc2) -> ``[..., C_out]``.
    In eager mode on the Triton path only ``x`` (cast to the autocast dtype, as fc1 would) is kept
    for the backward, which recomputes fc1's ``[..., 2I]`` output with one more GEMM: for ViG-T
    that is 2 KB per token and block (a quarter of the block's activation memory) not stored.
    Gradients equal those of the composition. Under ``torch.compile`` the composition is traced
    (the gating as the custom op ``vigla::swiglu``).
    """
    # torch.export / ONNX / TorchScript / torch.jit.trace: the plain formula (vigla.ops.tracing)
    if torch.jit.is_scripting() or exporting():
        return F.linear(swiglu_reference(F.linear(x, w1)), w2)
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != x.shape[-1] or w1.shape[0] != 2 * w2.shape[1]:
        raise ValueError(f"swiglu_mlp: want w1 [2I, C] with C = {x.shape[-1]} (x's last dim) and w2 "
                         f"[C_out, I]; got w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if resolve(backend, x, "swiglu_mlp") == "triton" and not torch.compiler.is_compiling():
        return _SwiGLUMLPFunction.apply(x, w1, w2)
    return F.linear(swiglu(F.linear(x, w1), backend), w2)


def swiglu(u: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``u``: ``[..., 2I]`` -> ``[..., I]`` = ``SiLU(u[..., :I]) * u[..., I:]``, in ``u.dtype``."""
    if u.dim() < 1 or u.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim must be even ([..., 2I]), got shape {tuple(u.shape)}")
    if resolve(backend, u, "swiglu") == "triton":
        if torch.compiler.is_compiling():  # the custom op: traced without a graph break
            return _swiglu_op(u)
        return _SwiGLUFunction.apply(u)
    return swiglu_reference(u)
