"""SwiGLU's gating ``SiLU(a) * b`` (``[a | b] = u``) fused: one read of ``u`` and one write of
``y`` forward, one read of ``u`` and ``dy`` and one write of ``du`` backward (the activation is
recomputed, not stored; optionally the output too, for :func:`vigla.ops.swiglu.swiglu_mlp`).

And fc1 with the gating in its epilogue (:func:`fc1_swiglu_triton`, half precision): each program
multiplies a ``[BM, C]`` row block of ``x`` by the matching ``BN`` columns of both halves of fc1's
weight on tensor cores (fp32 accumulators) and writes only ``SiLU(a) * b``: fc1's ``[rows, 2I]``
output is never written or read back, and the gating's launch is gone."""
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


# fc1 + gating tiles (rows x hidden columns x inner dim), chosen on an H200 over 28 tilings at ViG-T (C = 192,
# batch 1 to 128, 224² to 2048²), ViG-S (C = 384) and ViG-H-T stages 1-2 (C = 64, 128): the small tile was
# within 11% of each shape's best below C = 384 (a larger one within 2-10% at ViG-T's larger inputs), the
# large one best at ViG-S
FC1_NARROW = dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=2)
FC1_WIDE = dict(BM=128, BN=128, BK=32, num_warps=8, num_stages=4)  # C >= 384


@triton.jit
def _fc1_swiglu_kernel(x, w, y, M, C, I, sx, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n_tiles = tl.cdiv(I, BN)
    pid_m = tl.program_id(0) // n_tiles  # the column tiles of one row block run side by side: x read once
    pid_n = tl.program_id(0) - pid_m * n_tiles
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    xp = x + rm[:, None] * sx + rk[None, :]
    wa = w + rn[None, :].to(tl.int64) * C + rk[:, None]  # [BK, BN] of fc1's rows rn (the SiLU half)
    row_ok, col_ok = rm[:, None] < M, rn[None, :] < I
    acc_a = tl.zeros((BM, BN), dtype=tl.float32)
    acc_b = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, C, BK):
        k_ok = (k0 + rk) < C
        xt = tl.load(xp + k0, mask=row_ok & k_ok[None, :], other=0.0)
        at = tl.load(wa + k0, mask=k_ok[:, None] & col_ok, other=0.0)
        bt = tl.load(wa + I * C + k0, mask=k_ok[:, None] & col_ok, other=0.0)  # rows I + rn: the linear half
        acc_a = tl.dot(xt, at, acc_a)
        acc_b = tl.dot(xt, bt, acc_b)
    h = acc_a * tl.sigmoid(acc_a) * acc_b
    tl.store(y + rm[:, None] * I + rn[None, :], h.to(y.dtype.element_ty), mask=row_ok & col_ok)


def fc1_swiglu_triton(x: torch.Tensor, w1: torch.Tensor, wrap=direct) -> torch.Tensor:
    """``swiglu(x @ w1^T)`` in one kernel: ``x``: ``[..., C]``, ``w1``: ``[2I, C]``, both fp16 or both bf16 ->
    ``[..., I]`` in their dtype. The products are accumulated in float32 and gated before the one rounding
    (the unfused path rounds fc1's output first)."""
    rows = _rows(x)
    w1 = w1.contiguous()
    M, C = rows.shape
    I = w1.shape[0] // 2
    y = torch.empty(*x.shape[:-1], I, dtype=x.dtype, device=x.device)
    cfg = FC1_WIDE if C >= 384 else FC1_NARROW
    if M:
        grid = (cdiv(M, cfg["BM"]) * cdiv(I, cfg["BN"]),)
        wrap(_fc1_swiglu_kernel)[grid](rows, w1, y, M, C, I, rows.stride(0), **cfg)
    return y


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
