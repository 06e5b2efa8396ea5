"""Depthwise 3x3 conv (padding 1) + optional SiLU on channels-last tokens, fused.

A tile is ``BT`` consecutive tokens of one image (row-major over the ``H x W`` grid) by ``BC``
channels; each of the 9 taps reads the tile's neighbours (masked at the image edges), mostly from
L1/L2. Forward: one kernel. Backward: with SiLU, one kernel forms ``g = dy * SiLU'(u)`` (the conv
recomputed) and the weight gradient, then the forward kernel with the taps flipped gives
``dx`` (the transposed conv of ``g``); without SiLU one kernel does both from ``dy``. The weight
gradient is one fp32 partial sum ``[C, 9]`` per program (a fixed number of programs looping over
the tiles), summed by the caller: deterministic, no atomics.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..dispatch import direct
from ..launcher import cdiv, next_power_of_2

TILE_FWD, TILE_BWD = 1024, 512  # tokens x channels per tile (at 4 warps: spill-free, ptxas sm_90)
WARPS = 4


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
def _dwconv_fwd_kernel(x, w, y, N, H, W, C, sb, sn, BT: tl.constexpr, BC: tl.constexpr, ACT: tl.constexpr,
                FLIP: tl.constexpr):
    """Grid ``(token tiles, channel blocks, B)``; ``x``: strides ``(sb, sn, 1)``; ``y``: contiguous."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2).to(tl.int64)
    cmask = cols < C
    mask = (rows < N)[:, None] & cmask[None, :]
    u = _conv(x + b * sb, w, rows, cols, mask, cmask, H, W, sn, BT, BC, FLIP)
    if ACT:
        u = u * tl.sigmoid(u)
    tl.store(y + b * N * C + rows[:, None] * C + cols[None, :], u.to(y.dtype.element_ty), mask=mask)


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
    tiles. ``dy``, ``g``, ``dx``: contiguous ``[B, N, C]``. ``ACT``: writes ``g = dy * SiLU'(u)`` (fp32);
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


@functools.lru_cache(maxsize=None)
def _programs(index: int) -> int:
    return 4 * torch.cuda.get_device_properties(index).multi_processor_count


def _tile(C: int, elements: int) -> tuple[int, int]:
    """``(BC, BT)``: channels (a divisor of ``C`` when one of 64, 32 is) and tokens of a tile of
    ``elements``."""
    bc = 64 if C % 64 == 0 else 32 if C % 32 == 0 else min(64, next_power_of_2(C))
    return bc, elements // bc


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit channel stride (a view when it has one)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _conv_launch(x, w, hw, act: bool, flip: bool, out_dtype: torch.dtype, wrap=direct) -> torch.Tensor:
    B, N, C = x.shape
    y = torch.empty(B, N, C, dtype=out_dtype, device=x.device)
    if y.numel():
        BC, BT = _tile(C, TILE_FWD)
        wrap(_dwconv_fwd_kernel)[(cdiv(N, BT), cdiv(C, BC), B)](
            x, w, y, N, hw[0], hw[1], C, x.stride(0), x.stride(1), BT=BT, BC=BC, ACT=act, FLIP=flip,
            num_warps=WARPS)
    return y


def dwconv_fwd_triton(x, weight, hw: tuple[int, int], act: bool, out_dtype: torch.dtype, wrap=direct):
    """``[B, H*W, C]`` in ``out_dtype``."""
    return _conv_launch(_tokens(x), weight.reshape(-1, 9), hw, act, False, out_dtype, wrap)


def dwconv_bwd_triton(dy, x, weight, hw: tuple[int, int], act: bool, wrap=direct):
    """``(dx, dweight)`` in ``x``'s and ``weight``'s dtypes."""
    x = _tokens(x)
    dy = dy.contiguous()
    B, N, C = x.shape
    w = weight.reshape(C, 9)
    BC, BT = _tile(C, TILE_BWD)
    tiles = cdiv(N, BT)
    n = max(1, min(B * tiles, _programs(x.device.index) if x.is_cuda else 4))
    # with SiLU the kernel writes g (fp32), else dx; the other pointer is never written (never an input)
    out = torch.empty(B, N, C, dtype=torch.float32 if act else x.dtype, device=x.device)
    dwp = (torch.empty if dy.numel() else torch.zeros)(n, C, 9, dtype=torch.float32, device=x.device)
    if dy.numel():
        wrap(_dwconv_bwd_kernel)[(n, cdiv(C, BC))](
            dy, x, w, out, out, dwp, N, hw[0], hw[1], C, x.stride(0), x.stride(1), tiles, B * tiles,
            BT=BT, BC=BC, ACT=act, num_warps=WARPS)
    dx = _conv_launch(out, w, hw, False, True, x.dtype, wrap) if act else out  # the transposed conv of g
    return dx, dwp.sum(0).view(weight.shape).to(weight.dtype)
