"""Residual add + RMSNorm / LayerNorm fused: one pass forward (read ``x`` and ``delta``, write the
residual ``s`` and the normalized ``y``), one pass backward (read ``s``, ``dy`` and ``ds``, write
``dx``) with the statistics recomputed from ``s``.

Rows of ``C`` channels, a tile of ``BR`` rows by ``BC = next_pow2(C)`` columns per step (masked
beyond ``C``: ViG-H's 96/192/384/768 channels). The backward runs a fixed number of programs over
the row tiles and writes the weight (and bias) gradients as one fp32 partial sum per program,
summed by the caller: deterministic, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import direct
from ..launcher import cdiv, multiprocessors, next_power_of_2, persistent_programs, rows as _rows

TILE_FWD, TILE_BWD = 2048, 1024  # elements per tile (BR * BC): 16 values a thread forward, 4 backward
WARPS_FWD, WARPS_BWD = 4, 8  # spill-free for C <= 4096 (ptxas, sm_90)
MAX_C = 4096  # widest row the kernels take (one row a tile)


@triton.jit
def _normalize(s, cmask, eps, C: tl.constexpr, RMS: tl.constexpr):
    """``s``: ``[BR, BC]`` fp32, zero beyond ``C``. Returns ``(n, r)``: the normalized rows (zero
    beyond ``C``) and the reciprocal deviations ``[BR]``."""
    if RMS:
        c = s
    else:
        c = tl.where(cmask[None, :], s - (tl.sum(s, axis=1) / C)[:, None], 0.0)
    r = tl.rsqrt(tl.sum(c * c, axis=1) / C + eps)
    return c * r[:, None], r


@triton.jit
def _store_norm(v, w, b, y, off, mask, cols, cmask, eps, C: tl.constexpr, RMS: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """Store ``norm(v) * w (+ b)`` at ``y + off``: ``v`` the residual rows ``[BR, BC]`` (zero beyond ``C``)."""
    n, _ = _normalize(v.to(tl.float32), cmask, eps, C, RMS)
    out = n * tl.load(w + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(b + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y + off, out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_fwd_kernel(x, delta, w, b, s, y, R, sx, sd, eps, C: tl.constexpr, BC: tl.constexpr,
                BR: tl.constexpr, RMS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``x``, ``delta``: rows with strides ``sx``, ``sd``; ``s``, ``y``: contiguous ``[R, C]``."""
    eps = tl.cast(eps, tl.float32)  # Inductor passes float scalars as fp64
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BC)
    cmask = cols < C
    mask = (rows < R)[:, None] & cmask[None, :]
    off = rows[:, None] * C + cols[None, :]
    v = tl.load(x + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta + rows[:, None] * sd + cols[None, :], mask=mask, other=0.0)
        v = (v.to(tl.float32) + d.to(tl.float32)).to(s.dtype.element_ty)  # the stored residual
        tl.store(s + off, v, mask=mask)
    _store_norm(v, w, b, y, off, mask, cols, cmask, eps, C, RMS, HAS_BIAS)


@triton.jit
def _add_norm_bwd_kernel(dy, ds, s, w, dx, ddelta, parts, R, eps, C: tl.constexpr, BC: tl.constexpr,
                BR: tl.constexpr, RMS: tl.constexpr, HAS_DS: tl.constexpr, HAS_BIAS: tl.constexpr,
                STORE_DDELTA: tl.constexpr):
    """All row tensors contiguous ``[R, C]``; ``parts``: fp32 partial sums, ``[programs, C]`` of the weight's
    gradient then (``HAS_BIAS``) as many of the bias's, summed over each program's rows elementwise and
    reduced over the tile's rows once at the end.
    ``dx = norm'(s)^T (dy * w) + ds``, also written to ``ddelta`` in its dtype (``STORE_DDELTA``)."""
    eps = tl.cast(eps, tl.float32)  # Inductor passes float scalars as fp64
    pid = tl.program_id(0)
    cols = tl.arange(0, BC)
    cmask = cols < C
    wt = tl.load(w + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BR, BC], dtype=tl.float32)
    acc_b = tl.zeros([BR, BC], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(R, BR), tl.num_programs(0)):
        rows = (blk * BR + tl.arange(0, BR)).to(tl.int64)
        mask = (rows < R)[:, None] & cmask[None, :]
        off = rows[:, None] * C + cols[None, :]
        n, r = _normalize(tl.load(s + off, mask=mask, other=0.0).to(tl.float32), cmask, eps, C, RMS)
        g = tl.load(dy + off, mask=mask, other=0.0).to(tl.float32)
        acc_w += g * n
        if HAS_BIAS:
            acc_b += g
        dn = g * wt[None, :]
        d = dn - n * (tl.sum(dn * n, axis=1) / C)[:, None]
        if not RMS:
            d -= (tl.sum(dn, axis=1) / C)[:, None]
        d = d * r[:, None]
        if HAS_DS:
            d += tl.load(ds + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx + off, d.to(dx.dtype.element_ty), mask=mask)
        if STORE_DDELTA:
            tl.store(ddelta + off, d.to(ddelta.dtype.element_ty), mask=mask)
    tl.store(parts + pid * C + cols, tl.sum(acc_w, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(parts + (tl.num_programs(0) + pid) * C + cols, tl.sum(acc_b, axis=0), mask=cmask)


@triton.jit
def _add_residual(acc, x, s, off, mask):
    """A product's residual add: ``s = x + acc`` at ``off`` (``acc`` the fp32 ``[BR, BC]`` tile, zero past the
    columns; ``x``, ``s`` contiguous ``[R, C]``) stored in ``s``'s dtype; returns the stored tile. The offsets come
    in rather than out: ``torch.compile`` traces a store's address back through a helper's call to all its
    arguments, and would take ``x`` for written had ``off`` come from a call that read it."""
    v = (tl.load(x + off, mask=mask, other=0.0).to(tl.float32) + acc).to(s.dtype.element_ty)
    tl.store(s + off, v, mask=mask)
    return v


@triton.jit
def _add_and_norm(acc, x, w, b, s, y, rows, rmask, cols, cmask, eps, C: tl.constexpr, RMS: tl.constexpr,
                  HAS_BIAS: tl.constexpr):
    """A product's epilogue: :func:`_add_residual`, then ``y = norm(s)`` as stored (``y`` contiguous ``[R, C]``)."""
    off = rows[:, None] * C + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    v = _add_residual(acc, x, s, off, mask)
    _store_norm(v, w, b, y, off, mask, cols, cmask, eps, C, RMS, HAS_BIAS)


@triton.jit
def _linear_add_norm_kernel(h, wl, x, w, b, s, y, R, K, sh, eps, C: tl.constexpr, BC: tl.constexpr,
                            BR: tl.constexpr, BK: tl.constexpr, RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                            AFFINE: tl.constexpr):
    """``s = x + h @ wl^T`` and ``y = norm(s)``: ``h`` rows ``[R, K]`` (stride ``sh``), ``wl`` ``[C, K]``
    contiguous, ``x``, ``s``, ``y`` contiguous ``[R, C]``. A program owns ``BR`` whole rows: the product on
    tensor cores (fp32 accumulators), then the add and the norm of :func:`_add_norm_fwd_kernel` on it. Not
    ``AFFINE`` (RMSNorm whose weight the next product holds): ``y`` ``[R]`` fp32, the rows' reciprocal RMS."""
    eps = tl.cast(eps, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BC)
    ks = tl.arange(0, BK)
    rmask, cmask = rows < R, cols < C
    hp = h + rows[:, None] * sh + ks[None, :]
    wp = wl + cols[None, :] * K + ks[:, None]  # [BK, BC] of wl^T
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + ks) < K
        ht = tl.load(hp + k0, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wt = tl.load(wp + k0, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(ht, wt, acc)
    if AFFINE:
        _add_and_norm(acc, x, w, b, s, y, rows, rmask, cols, cmask, eps, C, RMS, HAS_BIAS)
    else:
        v = _add_residual(acc, x, s, rows[:, None] * C + cols[None, :], rmask[:, None] & cmask[None, :])
        _, rstd = _normalize(v.to(tl.float32), cmask, eps, C, True)
        tl.store(y + rows, rstd, mask=rmask)


# projection + add + norm: 64-row tiles, chosen on an H200 over 24 tilings at ViG-T's shapes (224² to 2048²). Against
# cuBLAS's GEMM then the add + norm kernel it took 9-11% less time for the mixer's output projection (K = C = 192)
# and 9% more for fc2 (K = 512): the kernels take K and C up to 256 (the product's [rows, C] fp32 tile in registers)
LINEAR_ROWS, LINEAR_BK, LINEAR_WARPS, LINEAR_STAGES = 64, 64, 4, 2
LINEAR_MAX_C = LINEAR_MAX_K = 256


def linear_add_norm_fwd_triton(h, wl, x, weight, bias, eps: float, rms: bool, out_dtype: torch.dtype,
                               wrap=direct):
    """``(s, y)``: ``s = x + h @ wl^T`` (``[..., C]`` in ``x.dtype``) and ``y = norm(s)`` (in ``out_dtype``) in one
    kernel. ``h``: ``[..., K]`` and ``wl``: ``[C, K]`` in one half-precision dtype; ``x``: ``[..., C]``. Without a
    ``weight`` (RMSNorm only: its weight folded into the product after it), ``y`` is ``[...]`` in float32, the
    rows' reciprocal RMS ``rsqrt(mean(s^2) + eps)``."""
    C, K = wl.shape
    h2 = _rows(h)
    x2, s, y = _residual_and_outputs(x, C, out_dtype if weight is not None else None)
    R = h2.shape[0]
    if R:
        wrap(_linear_add_norm_kernel)[(cdiv(R, LINEAR_ROWS),)](
            h2, wl.contiguous(), x2, _or(weight, y), _or(bias, y), s, y, R, K, h2.stride(0), eps, C=C,
            BC=next_power_of_2(C), BR=LINEAR_ROWS, BK=LINEAR_BK, RMS=rms, HAS_BIAS=bias is not None,
            AFFINE=weight is not None, num_warps=LINEAR_WARPS, num_stages=LINEAR_STAGES)
    return s, y


@triton.jit
def _x_tile(x, rows, rmask, sx, k0: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """Columns ``k0 .. k0 + BK`` of the rows ``rows`` of ``x`` (row stride ``sx``), zero past ``C``: ``[BR, BK]``."""
    ks = k0 + tl.arange(0, BK)
    return tl.load(x + rows[:, None] * sx + ks[None, :], mask=rmask[:, None] & (ks[None, :] < C), other=0.0)


@triton.jit
def _fc1_step(xt, w1, j, I, k0: tl.constexpr, ga, gb, C: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr):
    """``(ga, gb)`` plus ``xt @ w1[n, k0:k0 + BK]^T`` for the hidden units ``n = j .. j + BH`` of fc1's two halves
    (rows ``n`` and ``I + n`` of ``w1``, ``[2I, C]``); units past ``I`` read zeros."""
    hs = j + tl.arange(0, BH)
    ks = k0 + tl.arange(0, BK)
    p = w1 + hs[None, :].to(tl.int64) * C + ks[:, None]  # [BK, BH] of w1^T
    m = (hs[None, :] < I) & (ks[:, None] < C)
    ga = tl.dot(xt, tl.load(p, mask=m, other=0.0), ga)
    gb = tl.dot(xt, tl.load(p + I * C, mask=m, other=0.0), gb)
    return ga, gb


@triton.jit
def _mlp_add_norm_kernel(x, w1, w2, r, w, b, s, y, rs, R, I, sx, eps, C: tl.constexpr, BC: tl.constexpr,
                         BR: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, RMS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr):
    """``s = r + swiglu(diag(rs) x @ w1^T) @ w2^T`` and ``y = norm(s)``: ``x`` rows ``[R, C]`` (stride ``sx``),
    ``w1`` ``[2I, C]`` and ``w2`` ``[C, I]`` contiguous, ``r``, ``s``, ``y`` contiguous ``[R, C]``, ``C <= 3 BK``;
    ``rs`` ``[R]`` fp32 (``ROW_SCALE``, else ones). A program owns ``BR`` whole rows: their ``x`` stays in registers
    while the hidden units are walked ``BH`` at a time (fc1's two halves on tensor cores, scaled by ``rs`` and gated
    in fp32, the gated ``[BR, BH]`` rounded to ``x``'s dtype and multiplied into the ``[BR, C]`` fp32 accumulator of
    fc2), so the ``[R, I]`` hidden never goes to memory; then the add and the norm of
    :func:`_add_norm_fwd_kernel`."""
    eps = tl.cast(eps, tl.float32)
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rmask = rows < R
    cols = tl.arange(0, BC)
    cmask = cols < C
    x0 = _x_tile(x, rows, rmask, sx, 0, C, BK)
    if C > BK:
        x1 = _x_tile(x, rows, rmask, sx, BK, C, BK)
    if C > 2 * BK:
        x2 = _x_tile(x, rows, rmask, sx, 2 * BK, C, BK)
    if ROW_SCALE:
        scale = tl.load(rs + rows, mask=rmask, other=0.0)[:, None]
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for j in range(0, I, BH):
        ga = tl.zeros((BR, BH), dtype=tl.float32)
        gb = tl.zeros((BR, BH), dtype=tl.float32)
        ga, gb = _fc1_step(x0, w1, j, I, 0, ga, gb, C, BH, BK)
        if C > BK:
            ga, gb = _fc1_step(x1, w1, j, I, BK, ga, gb, C, BH, BK)
        if C > 2 * BK:
            ga, gb = _fc1_step(x2, w1, j, I, 2 * BK, ga, gb, C, BH, BK)
        if ROW_SCALE:
            ga, gb = ga * scale, gb * scale
        h = (ga * tl.sigmoid(ga) * gb).to(x.dtype.element_ty)
        hs = j + tl.arange(0, BH)
        w2t = tl.load(w2 + cols[None, :] * I + hs[:, None], mask=(hs[:, None] < I) & cmask[None, :], other=0.0)
        acc = tl.dot(h, w2t, acc)
    _add_and_norm(acc, r, w, b, s, y, rows, rmask, cols, cmask, eps, C, RMS, HAS_BIAS)


# SwiGLU MLP + add + norm: 128-row tiles, 64 hidden units a step, 8 warps, 2 stages, chosen on an H200 over the
# tilings and variants in benchmarks/results/kernel_mlp_add_norm_ab.json at ViG-T's MLP (C = 192, I = 512): 14% less
# time than fc1 + SwiGLU, cuBLAS's fc2 and the add + norm kernel at 512² (batch 128), within 3% at 224² (196 row
# tiles on 132 multiprocessors). Rows up to three 64-wide tiles (C <= 192): ViG-S's C = 384 would need a
# [128, 512] fp32 accumulator, beyond the registers. Below one row tile per multiprocessor (e.g. batch 1) the three
# kernels spread the work wider on the device, but an eager forward that small waits on the host's launches: there
# one kernel took ViG-T's batch-1 forward from 5.07 to 4.17 ms (H200, models_vig_t_mlp_rule_ab.json; op.mlp_fused).
MLP_ROWS, MLP_BH, MLP_BK, MLP_WARPS, MLP_STAGES = 128, 64, 64, 8, 2
MLP_MAX_C = 3 * MLP_BK


def mlp_fills_device(R: int, index: int) -> bool:
    """Whether ``R`` rows make at least one row tile per multiprocessor of CUDA device ``index``."""
    return cdiv(R, MLP_ROWS) >= multiprocessors(index)


def mlp_add_norm_fwd_triton(x, w1, w2, r, weight, bias, eps: float, rms: bool, out_dtype: torch.dtype,
                            row_scale=None, wrap=direct):
    """``(s, y)``: ``s = r + swiglu(diag(row_scale) x @ w1^T) @ w2^T`` (``[..., C]`` in ``r.dtype``) and ``y =
    norm(s)`` (in ``out_dtype``) in one kernel. ``x``: ``[..., C]``, ``w1``: ``[2I, C]``, ``w2``: ``[C, I]``, all
    three in one half-precision dtype, ``C <= MLP_MAX_C``; ``r``: ``[..., C]``; ``row_scale``: ``[...]`` float32 or
    None (ones)."""
    C, I = w2.shape
    x2 = _rows(x)
    r2, s, y = _residual_and_outputs(r, C, out_dtype)
    R = x2.shape[0]
    if R:
        wrap(_mlp_add_norm_kernel)[(cdiv(R, MLP_ROWS),)](
            x2, w1.contiguous(), w2.contiguous(), r2, weight, _or(bias, weight), s, y,
            row_scale.reshape(-1).contiguous() if row_scale is not None else weight, R, I, x2.stride(0), eps,
            C=C, BC=next_power_of_2(C), BR=MLP_ROWS, BH=MLP_BH, BK=MLP_BK, RMS=rms, HAS_BIAS=bias is not None,
            ROW_SCALE=row_scale is not None, num_warps=MLP_WARPS, num_stages=MLP_STAGES)
    return s, y


def _tile(C: int, elements: int) -> tuple[int, int]:
    """``(BC, BR)``: columns (the next power of two) and rows of a tile of about ``elements``."""
    bc = next_power_of_2(C)
    return bc, max(1, elements // bc)


def _residual_and_outputs(x: torch.Tensor, C: int, out_dtype: torch.dtype | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x2, s, y)`` of a product + add + norm: the residual ``x`` as contiguous ``[R, C]`` rows, ``s`` (``x``'s
    dtype) and ``y`` (``out_dtype``) empty in ``x``'s shape; ``out_dtype`` None: ``y`` one float32 per row."""
    y = (torch.empty(x.shape, dtype=out_dtype, device=x.device) if out_dtype is not None
         else torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device))
    return x.reshape(-1, C).contiguous(), torch.empty(x.shape, dtype=x.dtype, device=x.device), y


def _or(t: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """``t``, or for a kernel pointer argument it never reads, ``other``."""
    return t if t is not None else other


def add_norm_fwd_triton(x, delta, weight, bias, eps: float, rms: bool, out_dtype: torch.dtype,
                        wrap=direct):
    """``(s, y)``; ``s`` is empty (``[0]``) without ``delta``."""
    C = x.shape[-1]
    x2 = _rows(x)
    d2 = _rows(delta) if delta is not None else x2
    R = x2.shape[0]
    s = torch.empty(x.shape if delta is not None else (0,), dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if R:
        BC, BR = _tile(C, TILE_FWD)
        wrap(_add_norm_fwd_kernel)[(cdiv(R, BR),)](
            x2, d2, weight, _or(bias, weight), s, y, R, x2.stride(0), d2.stride(0), eps,
            C=C, BC=BC, BR=BR, RMS=rms, HAS_DELTA=delta is not None, HAS_BIAS=bias is not None, num_warps=WARPS_FWD)
    return s, y


def add_norm_bwd_triton(dy, ds, s, weight, bias, eps: float, rms: bool, delta_dtype, wrap=direct):
    """``(dx, ddelta, dweight, dbias)``: ``dx`` in ``s.dtype``; ``ddelta`` in ``delta_dtype`` when that
    differs from ``s.dtype`` (else empty: ``dx`` is the gradient of ``delta`` too); ``dbias`` empty
    without a bias."""
    C = s.shape[-1]
    s2 = s.reshape(-1, C).contiguous()
    R = s2.shape[0]
    BC, BR = _tile(C, TILE_BWD)
    n = max(1, min(cdiv(R, BR), persistent_programs(s)))
    store_dd = delta_dtype is not None and delta_dtype != s.dtype
    dx = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    ddelta = torch.empty(s.shape if store_dd else (0,), dtype=delta_dtype or s.dtype, device=s.device)
    alloc = torch.empty if R else torch.zeros  # every program writes its row(s) of partial sums
    parts = alloc(2 if bias is not None else 1, n, C, dtype=torch.float32, device=s.device)
    if R:
        wrap(_add_norm_bwd_kernel)[(n,)](
            dy.contiguous(), ds.contiguous() if ds is not None else s2, s2, weight, dx, ddelta if store_dd else dx,
            parts, R, eps, C=C, BC=BC, BR=BR, RMS=rms, HAS_DS=ds is not None,
            HAS_BIAS=bias is not None, STORE_DDELTA=store_dd, num_warps=WARPS_BWD)
    # one sum each: a custom op's outputs may not alias one another (views of one [2, C] sum would)
    db = parts[1].sum(0).to(bias.dtype) if bias is not None else parts.new_empty(0)
    return dx, ddelta, parts[0].sum(0).to(weight.dtype), db
