"""Fused locality mix (two per-head RMSNorms, the sigmoid gate, the convex mix, the optional
SiLU) in one pass forward and one pass backward.

Rows are (token, head) pairs of ``d`` channels. ``o`` and the outputs are contiguous; ``x`` and
``z`` are read through a token stride, so ``z`` can be a column slice of a fused projection.
The backward recomputes the norms and the gate instead of storing them, and sums the two norm
weights' gradients per program (deterministic, summed by the caller).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import direct
from ..launcher import cdiv, persistent_programs, unit_stride

BLOCK_ROWS = 16  # rows per tile: 64-channel rows stay spill-free at 4 warps (ptxas -v, sm_90)


@triton.jit
def _load_rows(o, x, z, rows, cols, R, H, sx, sz, D: tl.constexpr):
    mask = (rows < R)[:, None]
    tok = rows // H
    off = (rows - tok * H)[:, None] * D + cols[None, :]  # head * D + channel
    a = tl.load(o + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x + tok[:, None] * sx + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(z + tok[:, None] * sz + off, mask=mask, other=0.0).to(tl.float32)
    return a, b, g, mask


@triton.jit
def _sigmoid(x):
    """``sigmoid(x)`` in five instructions: ``1 / w`` as the hardware's reciprocal square root of ``w^2``,
    ``w = 1 + 2^(-x log2(e))`` (``tl.sigmoid``'s ``exp`` and division take about twelve, range fix-ups included).
    Relative error ~2^-21; below ``x = -44.4``, where ``w^2`` overflows, 0 for values under ``6e-20``."""
    w = 1.0 + tl.exp2(x * -1.4426950408889634)
    return tl.rsqrt(w * w)


@triton.jit
def _normed(t, w, eps, D: tl.constexpr):
    r = tl.rsqrt(tl.sum(t * t, axis=1) / D + eps)
    return t * r[:, None] * w[None, :], r


@triton.jit
def mixed(a, b, g, w_o, w_l, eps, D: tl.constexpr, ACT: tl.constexpr):
    """``act(G * RMSNorm(a; w_o) + (1 - G) * RMSNorm(b; w_l))``, ``G = sigmoid(g)``, of ``[rows, D]`` fp32 tiles
    (``w_o``, ``w_l``: ``[D]`` fp32; ``act``: SiLU with ``ACT``); also BiGLA's output kernel's epilogue."""
    na, _ = _normed(a, w_o, eps, D)
    nb, _ = _normed(b, w_l, eps, D)
    u = nb + _sigmoid(g) * (na - nb)
    if ACT:
        u = u * _sigmoid(u)
    return u


@triton.jit
def _locality_mix_fwd_kernel(o, x, z, wo, wl, y, R, H, sx, sz, eps, D: tl.constexpr, BR: tl.constexpr,
                ACT: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # fp64 under Inductor
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, D)
    a, b, g, mask = _load_rows(o, x, z, rows, cols, R, H, sx, sz, D)
    u = mixed(a, b, g, tl.load(wo + cols).to(tl.float32), tl.load(wl + cols).to(tl.float32), eps, D, ACT)
    tl.store(y + rows[:, None] * D + cols[None, :], u.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(dn, t, r, w, D: tl.constexpr):
    m = dn * w[None, :]
    return r[:, None] * m - t * (r * r * r * tl.sum(m * t, axis=1) / D)[:, None]


@triton.jit
def _locality_mix_bwd_kernel(dy, o, x, z, wo, wl, do, dx, dz, parts, R, H, sx, sz, eps, D: tl.constexpr,
                BR: tl.constexpr, ACT: tl.constexpr):
    """``dy, do, dx, dz``: contiguous; ``parts``: fp32 partial sums, ``[programs, D]`` of ``w_o``'s gradient
    then as many of ``w_l``'s (summed elementwise over each program's rows, reduced over the tile's rows
    once at the end)."""
    eps = tl.cast(eps, tl.float32)  # fp64 under Inductor
    pid = tl.program_id(0)
    cols = tl.arange(0, D)
    w_o = tl.load(wo + cols).to(tl.float32)
    w_l = tl.load(wl + cols).to(tl.float32)
    acc_o = tl.zeros([BR, D], dtype=tl.float32)
    acc_l = tl.zeros([BR, D], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(R, BR), tl.num_programs(0)):
        rows = (blk * BR + tl.arange(0, BR)).to(tl.int64)
        a, b, g, mask = _load_rows(o, x, z, rows, cols, R, H, sx, sz, D)
        off = rows[:, None] * D + cols[None, :]
        du = tl.load(dy + off, mask=mask, other=0.0).to(tl.float32)
        na, ra = _normed(a, w_o, eps, D)
        nb, rb = _normed(b, w_l, eps, D)
        gate = _sigmoid(g)
        if ACT:
            u = nb + gate * (na - nb)
            s = _sigmoid(u)
            du = du * s * (1 + u * (1 - s))
        dna = du * gate
        dnb = du - dna
        acc_o += dna * a * ra[:, None]
        acc_l += dnb * b * rb[:, None]
        tl.store(dz + off, (du * (na - nb) * gate * (1 - gate)).to(dz.dtype.element_ty), mask=mask)
        tl.store(do + off, _norm_bwd(dna, a, ra, w_o, D).to(do.dtype.element_ty), mask=mask)
        tl.store(dx + off, _norm_bwd(dnb, b, rb, w_l, D).to(dx.dtype.element_ty), mask=mask)
    tl.store(parts + pid * D + cols, tl.sum(acc_o, axis=0))
    tl.store(parts + (tl.num_programs(0) + pid) * D + cols, tl.sum(acc_l, axis=0))


def _flat(o, x, z):
    """``o``: ``[R, d]`` rows; ``x``, ``z``: ``[tokens, C]`` with unit last stride."""
    h, d = o.shape[-2:]
    rows = o.reshape(-1, d).contiguous()
    x2, z2 = (t.reshape(-1, h * d) for t in (x, z))
    x2, z2 = (unit_stride(t) for t in (x2, z2))
    return rows, x2, z2, h, d


def locality_mix_fwd_triton(o, x, z, w_o, w_l, eps: float, act: bool, wrap=direct) -> torch.Tensor:
    rows, x2, z2, h, d = _flat(o, x, z)
    R = rows.shape[0]
    y = torch.empty(x.shape, dtype=o.dtype, device=o.device)
    wrap(_locality_mix_fwd_kernel)[(cdiv(R, BLOCK_ROWS),)](rows, x2, z2, w_o, w_l, y, R, h, x2.stride(0),
                                               z2.stride(0), eps, D=d, BR=BLOCK_ROWS, ACT=act,
                                               num_warps=4)
    return y


def locality_mix_bwd_triton(dy, o, x, z, w_o, w_l, eps: float, act: bool, wrap=direct):
    rows, x2, z2, h, d = _flat(o, x, z)
    R = rows.shape[0]
    dy = dy.contiguous()
    n = min(cdiv(R, BLOCK_ROWS), persistent_programs(o))
    do = torch.empty(o.shape, dtype=o.dtype, device=o.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=o.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=o.device)
    parts = torch.empty(2, n, d, dtype=torch.float32, device=o.device)
    wrap(_locality_mix_bwd_kernel)[(n,)](dy, rows, x2, z2, w_o, w_l, do, dx, dz, parts, R, h, x2.stride(0),
                      z2.stride(0), eps, D=d, BR=BLOCK_ROWS, ACT=act, num_warps=4)
    # one sum each: a custom op's outputs may not alias one another (views of one [2, D] sum would)
    return do, dx, dz, parts[0].sum(0).to(w_o.dtype), parts[1].sum(0).to(w_l.dtype)
