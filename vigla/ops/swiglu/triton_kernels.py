"""SwiGLU's gating ``SiLU(a) * b`` (``[a | b] = u``) fused: one read of ``u`` and one write of
``y`` forward, one read of ``u`` and ``dy`` and one write of ``du`` backward (the activation is
recomputed, not stored; optionally the output too, for :func:`vigla.ops.swiglu.swiglu_mlp`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import direct
from ..launcher import cdiv

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(u, y, N, I, su, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    row = idx // I
    col = idx - row * I
    a = tl.load(u + row * su + col, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(u + row * su + I + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(y + idx, (a * tl.sigmoid(a) * b).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy, u, du, y, N, I, su, BLOCK: tl.constexpr, STORE_Y: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    row = idx // I
    col = idx - row * I
    a = tl.load(u + row * su + col, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(u + row * su + I + col, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    out = du + row * 2 * I + col
    tl.store(out, (g * b * s * (1 + a * (1 - s))).to(du.dtype.element_ty), mask=mask)
    tl.store(out + I, (g * a * s).to(du.dtype.element_ty), mask=mask)
    if STORE_Y:  # the forward's output, recomputed (for the next layer's weight gradient)
        tl.store(y + idx, (a * s * b).to(y.dtype.element_ty), mask=mask)


def _rows(u: torch.Tensor) -> torch.Tensor:
    u2 = u.reshape(-1, u.shape[-1])
    return u2 if u2.stride(-1) == 1 else u2.contiguous()


def swiglu_fwd_triton(u: torch.Tensor, wrap=direct) -> torch.Tensor:
    u2 = _rows(u)
    I = u.shape[-1] // 2
    y = torch.empty(*u.shape[:-1], I, dtype=u.dtype, device=u.device)
    n = u2.shape[0] * I
    wrap(_swiglu_fwd_kernel)[(cdiv(n, BLOCK),)](u2, y, n, I, u2.stride(0), BLOCK=BLOCK, num_warps=4)
    return y


def swiglu_bwd_triton(dy: torch.Tensor, u: torch.Tensor, recompute: bool = False, wrap=direct):
    """``du`` (``u``'s shape) of ``<dy, swiglu(u)>``; ``recompute``: ``(du, swiglu(u))`` from the
    same pass over ``u``."""
    u2 = _rows(u)
    I = u.shape[-1] // 2
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    y = torch.empty(*u.shape[:-1], I, dtype=u.dtype, device=u.device) if recompute else du
    n = u2.shape[0] * I
    wrap(_swiglu_bwd_kernel)[(cdiv(n, BLOCK),)](dy.contiguous(), u2, du, y, n, I, u2.stride(0), BLOCK=BLOCK,
                                          STORE_Y=recompute, num_warps=4)
    return (du, y) if recompute else du
