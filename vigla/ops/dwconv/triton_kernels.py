"""Depthwise 3x3 conv (padding 1) + optional SiLU on channels-last tokens, fused.

Forward: a program owns a band of image rows, ``BW`` columns and ``BC`` channels of one image and sweeps the
band top to bottom. Each input row is read once, as three horizontally shifted ``[BW, BC]`` tiles (the
shifted two mostly from L1), and reaches the three output rows around it through the three rows of taps;
a band also reads the row above and the row below it. The next row's loads are issued before the current
row's sums (a software pipeline of one row: twice the loads in flight; -24% at ViG-T @512 on an H200). Per
element: three loads and nine fused multiply-adds, no per-tap index arithmetic.

Backward: a tile is ``BT`` consecutive tokens by ``BC`` channels, each of the 9 taps read from its
neighbours (masked at the image edges). With SiLU one kernel forms ``g = dy * SiLU'(u)`` (the conv
recomputed) and the weight gradient, then the forward kernel with the taps flipped gives ``dx`` (the
transposed conv of ``g``, passed between the two in bf16 for bf16 tokens: half the bytes of fp32, one
rounding more of ``dx``'s terms, the weight gradient summing ``g`` in fp32; else in fp32); without SiLU one
kernel does both from ``dy``. The weight gradient is one fp32
partial sum ``[C, 9]`` per program (a fixed number of programs looping over the tiles), summed by the
caller: deterministic, no atomics. (A row-sweeping backward holding the last three input rows and the nine
weight-gradient sums spilled and ran slower than this one on an H200.)
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..dispatch import direct
from ..launcher import (cdiv, handoff_dtype, multiprocessors, next_power_of_2, persistent_programs, planned,
                        unit_stride)

TILE_FWD = 1024  # the forward's tile: columns x channels
TILE_BWD = 512  # the backward's tile: tokens x channels (at 4 warps: spill-free, ptxas sm_90)
WARPS = 4
PROGRAMS_PER_SM = 4  # the forward's bands are as tall as keep this many programs per SM busy
MIN_BAND = 2  # but at least this many rows: each band also reads the row above and the row below it


@triton.jit
def _shifted(ptr, ir, cols, ch, ok, W, sn):
    """Input row ``ir`` (``ptr``: the image's first token) at the ``[BW]`` image columns ``cols`` by the
    ``[BC]`` channels ``ch``, as an fp32 tile; zero where ``ok`` (``[BW, BC]``) is false."""
    return tl.load(ptr + (ir * W + cols)[:, None] * sn + ch[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _row(xb, ir, cols, ch, inside, left, right, H, W, sn, last):
    """Input row ``ir``'s three shifted tiles (zeros outside the image and past row ``last``)."""
    valid = (ir >= 0) & (ir < H) & (ir <= last)
    return (_shifted(xb, ir, cols - 1, ch, left & valid, W, sn), _shifted(xb, ir, cols, ch, inside & valid, W, sn),
            _shifted(xb, ir, cols + 1, ch, right & valid, W, sn))


@triton.jit
def _wrow(w, ch, cmask, r: tl.constexpr, FLIP: tl.constexpr):
    """Row ``r`` of the taps, ``(w[c, 3r], w[c, 3r + 1], w[c, 3r + 2])`` as fp32 ``[BC]`` (the flipped
    kernel's with ``FLIP``: the transposed conv)."""
    k0: tl.constexpr = 8 - 3 * r if FLIP else 3 * r
    step: tl.constexpr = -1 if FLIP else 1
    return (tl.load(w + ch * 9 + k0, mask=cmask, other=0.0).to(tl.float32)[None, :],
            tl.load(w + ch * 9 + k0 + step, mask=cmask, other=0.0).to(tl.float32)[None, :],
            tl.load(w + ch * 9 + k0 + 2 * step, mask=cmask, other=0.0).to(tl.float32)[None, :])


@triton.jit
def _dwconv_fwd_kernel(x, w, y, H, W, C, sb, sn, RB, NCB, BW: tl.constexpr, BC: tl.constexpr,
                       ACT: tl.constexpr, FLIP: tl.constexpr):
    """Grid ``(bands * NCB, channel blocks, B)``: a program sweeps the ``RB`` image rows of its band, top to
    bottom, over ``BW`` columns and ``BC`` channels. Each input row is read once (three horizontal shifts,
    two of them mostly from L1) and added, through the three rows of taps, to the three output rows it
    reaches; an output row is stored when its last input row has been read (rows above and below the
    band: its two halo rows). ``x``: strides ``(sb, sn, 1)``; ``y``: contiguous ``[B, H*W, C]``."""
    band = tl.program_id(0) // NCB
    cols = (tl.program_id(0) % NCB) * BW + tl.arange(0, BW)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    cmask = ch < C
    inside = (cols < W)[:, None] & cmask[None, :]
    left = inside & (cols >= 1)[:, None]
    right = inside & (cols + 1 < W)[:, None]
    w0, w1, w2 = _wrow(w, ch, cmask, 0, FLIP)  # taps of the row above the output (reach row ir + 1)
    w3, w4, w5 = _wrow(w, ch, cmask, 1, FLIP)  # of the output's own row
    w6, w7, w8 = _wrow(w, ch, cmask, 2, FLIP)  # of the row below (reach row ir - 1)
    xb = x + b * sb
    yb = y + b * H * W * C + cols[:, None] * C + ch[None, :]
    top = band * RB
    last = tl.minimum(top + RB, H)  # the band's rows: [top, last)
    mid = tl.zeros([BW, BC], dtype=tl.float32)  # partial sums of output rows ir and ir + 1
    low = tl.zeros([BW, BC], dtype=tl.float32)
    nl, nc, nr = _row(xb, top - 1, cols, ch, inside, left, right, H, W, sn, last)
    for ir in range(top - 1, last + 1):
        xl, xc, xr = nl, nc, nr
        nl, nc, nr = _row(xb, ir + 1, cols, ch, inside, left, right, H, W, sn, last)  # in flight meanwhile
        u = mid + (w6 * xl + w7 * xc + w8 * xr)  # output row ir - 1, complete
        mid = low + (w3 * xl + w4 * xc + w5 * xr)
        low = w0 * xl + w1 * xc + w2 * xr
        if ACT:
            u = u * tl.sigmoid(u)
        ro = ir - 1
        tl.store(yb + ro * W * C, u.to(y.dtype.element_ty), mask=inside & (ro >= top) & (ro < last))


@triton.jit
def _tap(ptr, rows, cols, mask, H, W, sn, K: tl.constexpr):
    """The ``[BT, BC]`` fp32 tile of one image (``ptr``: its first token) shifted by tap ``K``
    (``(K // 3 - 1, K % 3 - 1)``), zero outside; 32-bit offsets within the image."""
    DI: tl.constexpr = K // 3 - 1
    DJ: tl.constexpr = K % 3 - 1
    hh = rows // W + DI
    ww = rows % W + DJ
    ok = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    nb = rows + DI * W + DJ
    return tl.load(ptr + nb[:, None] * sn + cols[None, :], mask=mask & ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _conv(ptr, w, rows, cols, mask, cmask, H, W, sn, BT: tl.constexpr, BC: tl.constexpr,
          FLIP: tl.constexpr):
    """``sum_k w[c, k] * tap_k`` (``w[c, 8 - k]`` with ``FLIP``: the transposed conv)."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for k in tl.static_range(9):
        wk = tl.load(w + cols * 9 + (8 - k if FLIP else k), mask=cmask, other=0.0).to(tl.float32)
        acc += wk[None, :] * _tap(ptr, rows, cols, mask, H, W, sn, k)
    return acc


@triton.jit
def _taps(ptr, rows, cols, mask, H, W, sn):
    """The nine shifted ``[BT, BC]`` fp32 tiles of :func:`_tap`, each loaded once."""
    return (_tap(ptr, rows, cols, mask, H, W, sn, 0), _tap(ptr, rows, cols, mask, H, W, sn, 1),
            _tap(ptr, rows, cols, mask, H, W, sn, 2), _tap(ptr, rows, cols, mask, H, W, sn, 3),
            _tap(ptr, rows, cols, mask, H, W, sn, 4), _tap(ptr, rows, cols, mask, H, W, sn, 5),
            _tap(ptr, rows, cols, mask, H, W, sn, 6), _tap(ptr, rows, cols, mask, H, W, sn, 7),
            _tap(ptr, rows, cols, mask, H, W, sn, 8))


@triton.jit
def _weights(w, cols, cmask):
    """The nine ``[BC]`` fp32 weight vectors ``w[cols, k]``."""
    return (tl.load(w + cols * 9 + 0, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + cols * 9 + 1, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + cols * 9 + 2, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + cols * 9 + 3, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + cols * 9 + 4, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + cols * 9 + 5, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + cols * 9 + 6, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + cols * 9 + 7, mask=cmask, other=0.0).to(tl.float32),
            tl.load(w + cols * 9 + 8, mask=cmask, other=0.0).to(tl.float32))


@triton.jit
def _store_dw(dwp, k: tl.constexpr, acc, cols, cmask):
    tl.store(dwp + cols * 9 + k, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _dwconv_bwd_kernel(dy, x, w, g, dx, dwp, N, H, W, C, sb, sn, TILES, TOTAL, BT: tl.constexpr, BC: tl.constexpr,
                ACT: tl.constexpr):
    """Grid ``(programs, channel blocks)``, each program looping over the ``TOTAL = B * TILES`` token
    tiles. ``dy``, ``g``, ``dx``: contiguous ``[B, N, C]``. ``ACT``: writes ``g = dy * SiLU'(u)`` (``g``'s dtype);
    else writes ``dx``, the transposed conv of ``dy``. Either way adds ``sum g * tap_k(x)`` to the
    program's partial weight gradient ``dwp[program, c, k]``. Each tile's nine taps of ``x`` are loaded
    once (for ``u`` and the weight gradient), the weights once per program, and the products
    ``g * tap_k`` summed over tokens elementwise, reduced over the tile's rows once at the end."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = _weights(w, cols, cmask)
    a0 = tl.zeros([BT, BC], dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7, a8 = a0, a0, a0, a0, a0, a0, a0, a0
    for t in range(pid, TOTAL, tl.num_programs(0)):
        img = t // TILES
        rows = (t - img * TILES) * BT + tl.arange(0, BT)
        b = img.to(tl.int64)
        xb = x + b * sb
        mask = (rows < N)[:, None] & cmask[None, :]
        off = rows[:, None] * C + cols[None, :]
        gg = tl.load(dy + b * N * C + off, mask=mask, other=0.0).to(tl.float32)
        x0, x1, x2, x3, x4, x5, x6, x7, x8 = _taps(xb, rows, cols, mask, H, W, sn)
        if ACT:
            u = (w0[None, :] * x0 + w1[None, :] * x1 + w2[None, :] * x2 + w3[None, :] * x3 + w4[None, :] * x4
                 + w5[None, :] * x5 + w6[None, :] * x6 + w7[None, :] * x7 + w8[None, :] * x8)
            s = tl.sigmoid(u)
            gg = gg * s * (1 + u * (1 - s))
            tl.store(g + b * N * C + off, gg, mask=mask)
        else:
            dxt = _conv(dy + b * N * C, w, rows, cols, mask, cmask, H, W, C, BT, BC, True)
            tl.store(dx + b * N * C + off, dxt.to(dx.dtype.element_ty), mask=mask)
        a0 += gg * x0
        a1 += gg * x1
        a2 += gg * x2
        a3 += gg * x3
        a4 += gg * x4
        a5 += gg * x5
        a6 += gg * x6
        a7 += gg * x7
        a8 += gg * x8
    base = dwp + pid * 9 * C
    _store_dw(base, 0, a0, cols, cmask)
    _store_dw(base, 1, a1, cols, cmask)
    _store_dw(base, 2, a2, cols, cmask)
    _store_dw(base, 3, a3, cols, cmask)
    _store_dw(base, 4, a4, cols, cmask)
    _store_dw(base, 5, a5, cols, cmask)
    _store_dw(base, 6, a6, cols, cmask)
    _store_dw(base, 7, a7, cols, cmask)
    _store_dw(base, 8, a8, cols, cmask)


def _tile(C: int, elements: int) -> tuple[int, int]:
    """The backward's ``(BC, BT)``: channels (a divisor of ``C`` when one of 64, 32 is) and tokens of a tile
    of ``elements``."""
    bc = 64 if C % 64 == 0 else 32 if C % 32 == 0 else min(64, next_power_of_2(C))
    return bc, elements // bc


def _plan(B, H: int, W: int, C, x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """:func:`_sweep` for ``x``'s device (one "multiprocessor" under Triton's CPU interpreter)."""
    return planned(_sweep, B, H, W, C, multiprocessors(x.device.index) if x.is_cuda else 1)


@functools.lru_cache(maxsize=1024)
def _sweep(B: int, H: int, W: int, C: int, sms: int) -> tuple[int, int, int, int, int]:
    """The forward's ``(BC, BW, column blocks, rows per band, warps)``: a ``[BW, BC]`` tile of up to
    ``TILE_FWD`` elements, ``BC`` a divisor of ``C`` when one of 64, 32, 16 is (the widest that still leaves
    16 columns, or ``W``'s), fewer warps for small tiles; bands as tall as keep ``PROGRAMS_PER_SM`` programs
    per SM busy over ``B`` images, at least ``MIN_BAND`` rows."""
    cols = min(next_power_of_2(W), 16)
    bc = next((c for c in (64, 32, 16) if C % c == 0 and TILE_FWD // c >= cols), None)
    bc = bc or next((c for c in (16, 32, 64) if C % c == 0), min(64, next_power_of_2(C)))
    bw = min(next_power_of_2(W), max(1, TILE_FWD // bc))
    ncb = cdiv(W, bw)
    per_band = B * ncb * cdiv(C, bc)
    bands = max(1, min(cdiv(H, MIN_BAND), cdiv(PROGRAMS_PER_SM * sms, per_band)))
    warps = max(1, min(WARPS, bw * bc // 256))
    return bc, bw, ncb, cdiv(H, bands), warps


def _conv_launch(x, w, hw, act: bool, flip: bool, out_dtype: torch.dtype, wrap=direct) -> torch.Tensor:
    B, N, C = x.shape
    y = torch.empty(B, N, C, dtype=out_dtype, device=x.device)
    if y.numel():
        H, W = hw
        BC, BW, ncb, rb, warps = _plan(B, H, W, C, x)
        wrap(_dwconv_fwd_kernel)[(cdiv(H, rb) * ncb, cdiv(C, BC), B)](
            x, w, y, H, W, C, x.stride(0), x.stride(1), rb, ncb, BW=BW, BC=BC, ACT=act, FLIP=flip,
            num_warps=warps)
    return y


def dwconv_fwd_triton(x, weight, hw: tuple[int, int], act: bool, out_dtype: torch.dtype, wrap=direct):
    """``[B, H*W, C]`` in ``out_dtype``."""
    return _conv_launch(unit_stride(x), weight.reshape(-1, 9), hw, act, False, out_dtype, wrap)


def dwconv_bwd_triton(dy, x, weight, hw: tuple[int, int], act: bool, wrap=direct):
    """``(dx, dweight)`` in ``x``'s and ``weight``'s dtypes."""
    x = unit_stride(x)
    dy = dy.contiguous()
    B, N, C = x.shape
    w = weight.reshape(C, 9)
    BC, BT = _tile(C, TILE_BWD)
    tiles = cdiv(N, BT)
    n = max(1, min(B * tiles, persistent_programs(x)))  # each looping over token tiles
    # with SiLU the kernel writes g, else dx; the other pointer is never written (never an input)
    out = torch.empty(B, N, C, dtype=handoff_dtype(x.dtype) if act else x.dtype, device=x.device)
    dwp = (torch.empty if dy.numel() else torch.zeros)(n, C, 9, dtype=torch.float32, device=x.device)
    if dy.numel():
        wrap(_dwconv_bwd_kernel)[(n, cdiv(C, BC))](
            dy, x, w, out, out, dwp, N, hw[0], hw[1], C, x.stride(0), x.stride(1), tiles, B * tiles,
            BT=BT, BC=BC, ACT=act, num_warps=WARPS)
    dx = _conv_launch(out, w, hw, False, True, x.dtype, wrap) if act else out  # the transposed conv of g
    return dx, dwp.sum(0).view(weight.shape).to(weight.dtype)
