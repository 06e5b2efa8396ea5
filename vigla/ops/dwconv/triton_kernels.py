"""Depthwise 3x3 conv (padding 1) + optional SiLU on channels-last tokens, fused.

A tile is ``BT`` consecutive tokens of one image (row-major over the ``H x W`` grid) by ``BC``
channels; each of the 9 taps reads the tile's neighbours (masked at the image edges), mostly from
L1/L2. Forward: one kernel. Backward: with SiLU, one kernel forms ``g = dy * SiLU'(u)`` (the conv
recomputed) and the weight gradient, then the forward kernel with the taps flipped gives
``dx`` (the transposed conv of ``g``); without SiLU one kernel does both from ``dy``. The weight
gradient is one fp32 partial sum ``[9, C]`` per program (a fixed number of programs looping over
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
def _dwconv_bwd_kernel(dy, x, w, g, dx, dwp, N, H, W, C, sb, sn, TILES, TOTAL, BT: tl.constexpr, BC: tl.constexpr,
                ACT: tl.constexpr):
    """Grid ``(programs, channel blocks)``, each program looping over the ``TOTAL = B * TILES`` token
    tiles. ``dy``, ``g``, ``dx``: contiguous ``[B, N, C]``. ``ACT``: writes ``g = dy * SiLU'(u)`` (fp32);
    else writes ``dx``, the transposed conv of ``dy``. Either way adds ``sum g * tap_k(x)`` to the
    program's partial weight gradient ``dwp[program, k, c]``."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    taps = tl.arange(0, 16)
    acc = tl.zeros([16, BC], dtype=tl.float32)  # rows 0..8: the taps
    for t in range(pid, TOTAL, tl.num_programs(0)):
        img = t // TILES
        rows = (t - img * TILES) * BT + tl.arange(0, BT)
        b = img.to(tl.int64)
        xb = x + b * sb
        mask = (rows < N)[:, None] & cmask[None, :]
        off = rows[:, None] * C + cols[None, :]
        gg = tl.load(dy + b * N * C + off, mask=mask, other=0.0).to(tl.float32)
        if ACT:
            u = _conv(xb, w, rows, cols, mask, cmask, H, W, sn, BT, BC, False)
            s = tl.sigmoid(u)
            gg = gg * s * (1 + u * (1 - s))
            tl.store(g + b * N * C + off, gg, mask=mask)
        else:
            dxt = _conv(dy + b * N * C, w, rows, cols, mask, cmask, H, W, C, BT, BC, True)
            tl.store(dx + b * N * C + off, dxt.to(dx.dtype.element_ty), mask=mask)
        for k in tl.static_range(9):
            part = tl.sum(gg * _tap(xb, rows, cols, mask, H, W, sn, k), axis=0)
            acc += tl.where(taps[:, None] == k, part[None, :], 0.0)
    tl.store(dwp + pid * 9 * C + taps[:, None] * C + cols[None, :], acc,
             mask=(taps < 9)[:, None] & cmask[None, :])


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
    dwp = (torch.empty if dy.numel() else torch.zeros)(n, 9, C, dtype=torch.float32, device=x.device)
    if dy.numel():
        wrap(_dwconv_bwd_kernel)[(n, cdiv(C, BC))](
            dy, x, w, out, out, dwp, N, hw[0], hw[1], C, x.stride(0), x.stride(1), tiles, B * tiles,
            BT=BT, BC=BC, ACT=act, num_warps=WARPS)
    dx = _conv_launch(out, w, hw, False, True, x.dtype, wrap) if act else out  # the transposed conv of g
    return dx, dwp.sum(0).t().reshape(weight.shape).to(weight.dtype)
