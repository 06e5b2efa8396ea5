"""``swiglu(u)``: ``SiLU(a) * b`` for ``[a | b] = u``, the gating of ViG's MLP; ``swiglu_mlp``: the
whole MLP. Fused kernels on CUDA (``triton_kernels.py``), the reference elsewhere
(``reference.py``); see :mod:`vigla.ops.dispatch`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import channels, floating
from ..dispatch import compute_dtype, run_eager, use_kernels, via_dispatcher
from ..tracing import exporting
from .op import SwiGLUFunction, SwiGLUMLPFunction, fc1_fused, swiglu_forward, swiglu_mlp_forward
from .reference import swiglu_reference, swiglu_reference_bwd

__all__ = ["swiglu", "swiglu_mlp", "swiglu_reference", "swiglu_reference_bwd"]


def swiglu(u: torch.Tensor) -> torch.Tensor:
    """``u``: ``[..., 2I]`` -> ``[..., I]`` = ``SiLU(u[..., :I]) * u[..., I:]``, in ``u.dtype``."""
    floating("swiglu", u=u)
    if u.dim() < 1 or u.shape[-1] % 2 or u.shape[-1] < 2:
        raise ValueError(f"swiglu: the last dim must be even and >= 2 ([..., 2I]), got shape {tuple(u.shape)}")
    if via_dispatcher():
        return torch.ops.vigla.swiglu(u)
    return run_eager(SwiGLUFunction, swiglu_forward, u)


def swiglu_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``F.linear(swiglu(F.linear(x, w1)), w2)``: ViG's MLP (no biases).

    ``x``: ``[..., C]``, ``w1``: ``[2I, C]`` (fc1), ``w2``: ``[C_out, I]`` (fc2) -> ``[..., C_out]``.
    With the CUDA kernels in eager mode only ``x`` (cast to the autocast dtype, as fc1 would) is
    kept for the backward, which recomputes fc1's ``[..., 2I]`` output with one more GEMM: for
    ViG-T that is 2 KB per token and block (a quarter of the block's activation memory) not
    stored. Gradients equal those of the composition, which is what runs elsewhere and what
    ``torch.compile`` traces (with the gating as the custom op ``vigla::swiglu``).
    """
    # torch.export / ONNX / TorchScript / torch.jit.trace: the plain formula (vigla.ops.tracing)
    if torch.jit.is_scripting() or exporting():
        return F.linear(swiglu_reference(F.linear(x, w1)), w2)
    floating("swiglu_mlp", x=x, w1=w1, w2=w2)
    channels("swiglu_mlp", "x", x)
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != x.shape[-1] or w1.shape[0] != 2 * w2.shape[1]:
        raise ValueError(f"swiglu_mlp: want w1 [2I, C] with C = {x.shape[-1]} (x's last dim) and w2 "
                         f"[C_out, I]; got w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if not (x.dtype == w1.dtype == w2.dtype or torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"swiglu_mlp: x, w1 and w2 must share a dtype outside autocast, got {x.dtype}, {w1.dtype}, "
                        f"{w2.dtype}")
    if use_kernels(x) and not via_dispatcher():
        return run_eager(SwiGLUMLPFunction, swiglu_mlp_forward, x, w1, w2)
    dtype = compute_dtype(x)
    if via_dispatcher() and fc1_fused(x, dtype):  # autocast does not reach a custom op: cast as fc1 would
        return F.linear(torch.ops.vigla.fc1_swiglu(x.to(dtype), w1.to(dtype)), w2)
    return F.linear(swiglu(F.linear(x, w1)), w2)
