"""Depthwise 3x3 conv (padding 1) + optional SiLU on channels-last tokens, fused.

Both kernels sweep image rows: a program owns a band of rows, ``BW`` columns and ``BC`` channels of one
image (the backward: of a group of images) and walks the band top to bottom. Each input row is read once,
as three horizontally shifted ``[BW, BC]`` tiles (the shifted two mostly from L1), and reaches the three
output rows around it through the three rows of taps; a band also reads the row above and below it. Per
element that is three loads and nine fused multiply-adds, no per-tap index arithmetic.

Forward: one kernel. Backward: one kernel forms ``g = dy * SiLU'(u)`` (``u``, the conv, recomputed; ``g = dy``
without SiLU) and the weight gradient, then the forward kernel with the taps flipped gives ``dx`` (the
transposed conv of ``g``). The weight gradient is one fp32 partial sum ``[C, 9]`` per program, summed by
the caller: deterministic, no atomics.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..dispatch import direct
from ..launcher import cdiv, next_power_of_2

TILE_FWD, TILE_BWD = 1024, 512  # columns x channels per tile (the backward holds ~23 tiles)
WARPS = 4
PROGRAMS_FWD, PROGRAMS_BWD = 4, 8  # programs per SM the bands (and the backward's image groups) aim at
MIN_BAND = 2  # rows: each band also reads the two rows around it


@triton.jit
def _shifted(ptr, ir, cols, ch, ok, W, sn):
    """Input row ``ir`` (``ptr``: the image's first token) at the ``[BW]`` image columns ``cols`` by the
    ``[BC]`` channels ``ch``, as an fp32 tile; zero where ``ok`` (``[BW, BC]``) is false."""
    return tl.load(ptr + (ir * W + cols)[:, None] * sn + ch[None, :], mask=ok, other=0.0).to(tl.float32)


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
    for ir in range(top - 1, last + 1):
        valid = (ir >= 0) & (ir < H)
        xl = _shifted(xb, ir, cols - 1, ch, left & valid, W, sn)
        xc = _shifted(xb, ir, cols, ch, inside & valid, W, sn)
        xr = _shifted(xb, ir, cols + 1, ch, right & valid, W, sn)
        u = mid + (w6 * xl + w7 * xc + w8 * xr)  # output row ir - 1, complete
        mid = low + (w3 * xl + w4 * xc + w5 * xr)
        low = w0 * xl + w1 * xc + w2 * xr
        if ACT:
            u = u * tl.sigmoid(u)
        ro = ir - 1
        tl.store(yb + ro * W * C, u.to(y.dtype.element_ty), mask=inside & (ro >= top) & (ro < last))


@triton.jit
def _dwconv_bwd_kernel(dy, x, w, g, dwp, H, W, C, sb, sn, RB, NCB, B, BW: tl.constexpr, BC: tl.constexpr,
                       ACT: tl.constexpr):
    """Grid ``(bands * NCB, channel blocks, image groups)``: the program of group ``i`` sweeps its band in the
    images ``i, i + groups, ...``. With ``ACT`` writes ``g = dy * SiLU'(u)`` (contiguous ``[B, H*W, C]``, fp32;
    without, ``g`` is ``dy`` and nothing is written); adds ``sum g_r * x_{r + di}(c + dj)`` over its rows to its partial weight
    gradient ``dwp[program, c, 3 (di + 1) + dj + 1]``. ``x``: strides ``(sb, sn, 1)``; ``dy`` contiguous.
    Holds the last three input rows (nine shifted tiles) and nine accumulators."""
    pid = tl.program_id(0)
    band = pid // NCB
    cols = (pid % NCB) * BW + tl.arange(0, BW)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = ch < C
    inside = (cols < W)[:, None] & cmask[None, :]
    left = inside & (cols >= 1)[:, None]
    right = inside & (cols + 1 < W)[:, None]
    w0, w1, w2 = _wrow(w, ch, cmask, 0, False)
    w3, w4, w5 = _wrow(w, ch, cmask, 1, False)
    w6, w7, w8 = _wrow(w, ch, cmask, 2, False)
    top = band * RB
    last = tl.minimum(top + RB, H)
    tile = cols[:, None] * C + ch[None, :]
    zero = tl.zeros([BW, BC], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for img in range(tl.program_id(2), B, tl.num_programs(2)):
        b = tl.cast(img, tl.int64)
        xb = x + b * sb
        mid, low = zero, zero
        # the last two input rows (shifted left, centre, right), each its own zero tile: Triton carries a name
        # through the loop only if the body binds it to another object than it entered with, and the body's
        # `l2 = l1` would bind l2 to the very tile it entered with if the two started as one object
        l1, c1, r1 = _zeros(BW, BC), _zeros(BW, BC), _zeros(BW, BC)  # input row ir - 1
        l2, c2, r2 = _zeros(BW, BC), _zeros(BW, BC), _zeros(BW, BC)  # input row ir - 2
        for ir in range(top - 1, last + 1):
            valid = (ir >= 0) & (ir < H)
            xl = _shifted(xb, ir, cols - 1, ch, left & valid, W, sn)
            xc = _shifted(xb, ir, cols, ch, inside & valid, W, sn)
            xr = _shifted(xb, ir, cols + 1, ch, right & valid, W, sn)
            u = mid + (w6 * xl + w7 * xc + w8 * xr)  # output row ir - 1
            mid = low + (w3 * xl + w4 * xc + w5 * xr)
            low = w0 * xl + w1 * xc + w2 * xr
            ro = ir - 1
            keep = inside & (ro >= top) & (ro < last)
            off = b * H * W * C + ro * W * C + tile
            gg = tl.load(dy + off, mask=keep, other=0.0).to(tl.float32)
            if ACT:
                sg = tl.sigmoid(u)
                gg = gg * sg * (1 + u * (1 - sg))
                tl.store(g + off, gg, mask=keep)
            a0 += gg * l2
            a1 += gg * c2
            a2 += gg * r2
            a3 += gg * l1
            a4 += gg * c1
            a5 += gg * r1
            a6 += gg * xl
            a7 += gg * xc
            a8 += gg * xr
            l2, c2, r2 = l1, c1, r1
            l1, c1, r1 = xl, xc, xr
    base = dwp + (tl.program_id(2) * tl.num_programs(0) + pid).to(tl.int64) * tl.num_programs(1) * BC * 9
    base += ch * 9
    _store_dw(base, 0, a0, cmask)
    _store_dw(base, 1, a1, cmask)
    _store_dw(base, 2, a2, cmask)
    _store_dw(base, 3, a3, cmask)
    _store_dw(base, 4, a4, cmask)
    _store_dw(base, 5, a5, cmask)
    _store_dw(base, 6, a6, cmask)
    _store_dw(base, 7, a7, cmask)
    _store_dw(base, 8, a8, cmask)


@triton.jit
def _zeros(BW: tl.constexpr, BC: tl.constexpr):
    return tl.zeros([BW, BC], dtype=tl.float32)


@triton.jit
def _store_dw(ptr, k: tl.constexpr, acc, cmask):
    tl.store(ptr + k, tl.sum(acc, axis=0), mask=cmask)


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _plan(B, H: int, W: int, C, x: torch.Tensor, tile: int, per_sm: int) -> tuple[int, int, int, int, int]:
    """:func:`_sweep` for ``x``'s device (one "multiprocessor" under Triton's CPU interpreter)."""
    sms = _sms(x.device.index) if x.is_cuda else 1
    if type(B) is int and type(C) is int:
        return _sweep(B, H, W, C, sms, tile, per_sm)
    return _sweep.__wrapped__(B, H, W, C, sms, tile, per_sm)  # symbolic sizes (torch.compile, dynamic): not hashable


@functools.lru_cache(maxsize=1024)
def _sweep(B: int, H: int, W: int, C: int, sms: int, tile: int, per_sm: int) -> tuple[int, int, int, int, int]:
    """``(BC, BW, column blocks, rows per band, warps)``: a ``[BW, BC]`` tile of up to ``tile`` elements, ``BC``
    a divisor of ``C`` when one of 64, 32, 16 is (the widest that still leaves 16 columns, or ``W``'s), fewer
    warps for small tiles; bands as tall as keep ``per_sm`` programs per SM busy over ``B``
    images, at least ``MIN_BAND`` rows (each band reads two halo rows)."""
    cols = min(next_power_of_2(W), 16)
    bc = next((c for c in (64, 32, 16) if C % c == 0 and tile // c >= cols), None)
    bc = bc or next((c for c in (16, 32, 64) if C % c == 0), min(64, next_power_of_2(C)))
    bw = min(next_power_of_2(W), max(1, tile // bc))
    ncb = cdiv(W, bw)
    per_band = B * ncb * cdiv(C, bc)
    bands = max(1, min(cdiv(H, MIN_BAND), cdiv(per_sm * sms, per_band)))
    warps = max(1, min(WARPS, bw * bc // 256))
    return bc, bw, ncb, cdiv(H, bands), warps


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit channel stride (a view when it has one)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _conv_launch(x, w, hw, act: bool, flip: bool, out_dtype: torch.dtype, wrap=direct) -> torch.Tensor:
    B, N, C = x.shape
    y = torch.empty(B, N, C, dtype=out_dtype, device=x.device)
    if y.numel():
        H, W = hw
        BC, BW, ncb, rb, warps = _plan(B, H, W, C, x, TILE_FWD, PROGRAMS_FWD)
        wrap(_dwconv_fwd_kernel)[(cdiv(H, rb) * ncb, cdiv(C, BC), B)](
            x, w, y, H, W, C, x.stride(0), x.stride(1), rb, ncb, BW=BW, BC=BC, ACT=act, FLIP=flip,
            num_warps=warps)
    return y


def dwconv_fwd_triton(x, weight, hw: tuple[int, int], act: bool, out_dtype: torch.dtype, wrap=direct):
    """``[B, H*W, C]`` in ``out_dtype``."""
    return _conv_launch(_tokens(x), weight.reshape(-1, 9), hw, act, False, out_dtype, wrap)


def dwconv_bwd_triton(dy, x, weight, hw: tuple[int, int], act: bool, wrap=direct):
    """``(dx, dweight)`` in ``x``'s and ``weight``'s dtypes."""
    x = _tokens(x)
    dy = dy.contiguous()
    B, N, C = x.shape
    H, W = hw
    w = weight.reshape(C, 9)
    BC, BW, ncb, rb, warps = _plan(1, H, W, C, x, TILE_BWD, PROGRAMS_BWD)
    grid0, nch = cdiv(H, rb) * ncb, cdiv(C, BC)
    groups = max(1, min(B, cdiv(PROGRAMS_BWD * (_sms(x.device.index) if x.is_cuda else 1), grid0 * nch)))
    g = torch.empty(B, N, C, dtype=torch.float32, device=x.device) if act else dy
    # every program writes its [C, 9] partial sums (all of them when there is any token)
    dwp = (torch.empty if dy.numel() else torch.zeros)(groups * grid0, nch * BC, 9, dtype=torch.float32,
                                                        device=x.device)
    if dy.numel():  # without SiLU the kernel's g pointer (never written then) is dwp's, not an input's
        wrap(_dwconv_bwd_kernel)[(grid0, nch, groups)](
            dy, x, w, g if act else dwp, dwp, H, W, C, x.stride(0), x.stride(1), rb, ncb, B, BW=BW, BC=BC, ACT=act,
            num_warps=warps)
    dx = _conv_launch(g, w, hw, False, True, x.dtype, wrap)  # the transposed conv of g
    return dx, dwp[:, :C].sum(0).view(weight.shape).to(weight.dtype)
