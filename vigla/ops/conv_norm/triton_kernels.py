"""The stems' first layer in one Triton kernel: a direct convolution as an implicit GEMM (the
``[pixels, C_in*kh*kw]`` patches read from the NCHW image tile by tile, never written out), then the
bias, the LayerNorm over the output channels and the activation on the accumulator, stored channels-last.

Where the stride ``S`` is a power of two of at least 4 and the window holds the ``S x S`` block of taps from
``(padding, padding)`` (ViG's 9 x 9 at stride 8, padding 1), each output pixel's block covers whole aligned
runs of ``S`` pixels of ``S`` image rows: per input channel it is read as vectors, coalesced across
neighbouring output pixels, and is one product; only the taps outside the block (17 of ViG's 81) are
gathered one by one. Elsewhere (ViG-H's 3 x 3 at stride 2) every tap is gathered.

It replaces cuDNN's convolution of a 3-channel NCHW image (a layout conversion that pads the channels
to 8, then the convolution), the LayerNorm2d's permutes and the activation's pass: four to six kernels
and their round trips through memory, one kernel here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dispatch import direct
from ..launcher import cdiv

__all__ = ["conv_norm_fwd_triton"]

_ACT = {"none": 0, "silu": 1, "gelu": 2}


@triton.jit
def _mma(a, wt, acc, DOT: tl.constexpr):
    """``acc + a @ wt``: ``DOT`` 0 fp32 operands (exact products), 1 fp16, 2 bf16 (rounded to it, as autocast's
    convolution does); fp32 accumulation."""
    if DOT == 2:
        return tl.dot(a.to(tl.bfloat16), wt.to(tl.bfloat16), acc)
    elif DOT == 1:
        return tl.dot(a.to(tl.float16), wt.to(tl.float16), acc)
    return tl.dot(a.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _taps(k, KH: tl.constexpr, KW: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr):
    """``(c_in, i, j)`` of gathered tap ``k``. With ``BLOCK`` the taps outside the ``S x S`` block at
    ``(PAD, PAD)``, per input channel first the ``KH - S`` rows outside it (all ``KW`` columns), then the
    block's ``S`` rows outside it (``KW - S`` columns each); else all ``KH * KW`` taps, row-major."""
    if BLOCK:
        E: tl.constexpr = KH * KW - S * S
        ROWS: tl.constexpr = (KH - S) * KW
        DW: tl.constexpr = max(KW - S, 1)
        ci, e = k // E, k % E
        r, c = e // KW, (e - ROWS) % DW
        i = tl.where(e < ROWS, tl.where(r < PAD, r, r + S), PAD + (e - ROWS) // DW)
        j = tl.where(e < ROWS, e % KW, tl.where(c < PAD, c, c + S))
        return ci, i, j
    return k // (KH * KW), (k % (KH * KW)) // KW, k % KW


@triton.jit
def _conv_norm_fwd_kernel(x, w, b, nw, nb, y, P, HWO, WO, H, W, sxb, sxc, sxh, sxw, eps,
                          C_IN: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr,
                          BLOCK: tl.constexpr, C: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                          BK: tl.constexpr, ACT: tl.constexpr, DOT: tl.constexpr):
    """``BP`` output pixels (of ``P = B * H' * W'``), all ``C`` channels: ``y[p, :]``. ``w``: the weight as
    ``[C_in * KH * KW, C]`` (row ``(c_in * KH + i) * KW + j``), contiguous.

    ``BLOCK``: the ``S x S`` taps from ``(PAD, PAD)`` (rows ``S * oy + dy``, columns ``S * ox + dx``: whole
    aligned runs of a row, loaded as vectors) as one product per input channel, the other taps gathered one
    by one; else every tap gathered."""
    eps = tl.cast(eps, tl.float32)
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    live = p < P
    img = (p // HWO).to(tl.int64)
    oy = (p % HWO) // WO
    ox = p % WO
    n = tl.arange(0, BN)
    keep = n < C
    xi = x + img[:, None] * sxb
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    if BLOCK:
        kb = tl.arange(0, S * S)
        ry = oy[:, None] * S + (kb // S)[None, :]
        rx = ox[:, None] * S + (kb % S)[None, :]
        in_image = live[:, None] & (ry < H) & (rx < W)
        rows = ((PAD + kb // S) * KW + PAD + kb % S)[:, None] * C + n[None, :]
        for c_in in range(C_IN):
            a = tl.load(xi + c_in * sxc + ry * sxh + rx * sxw, mask=in_image, other=0.0)
            wt = tl.load(w + c_in * KH * KW * C + rows, mask=keep[None, :], other=0.0)
            acc = _mma(a, wt, acc, DOT)
    NX: tl.constexpr = C_IN * (KH * KW - S * S) if BLOCK else C_IN * KH * KW
    if NX > 0:  # the taps outside the block, or all of them
        for k0 in range(0, NX, BK):
            k = k0 + tl.arange(0, BK)
            ci, i, j = _taps(k, KH, KW, S, PAD, BLOCK)
            iy = oy[:, None] * S - PAD + i[None, :]
            ix = ox[:, None] * S - PAD + j[None, :]
            inside = live[:, None] & (k < NX)[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            a = tl.load(xi + ci[None, :] * sxc + iy * sxh + ix * sxw, mask=inside, other=0.0)
            row = (ci * KH + i) * KW + j
            wt = tl.load(w + row[:, None] * C + n[None, :], mask=(k < NX)[:, None] & keep[None, :], other=0.0)
            acc = _mma(a, wt, acc, DOT)
    acc += tl.load(b + n, mask=keep, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(acc, axis=1) / C  # padded channels hold zeros
    d = tl.where(keep[None, :], acc - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    out = d * rstd[:, None] * tl.load(nw + n, mask=keep, other=0.0).to(tl.float32)[None, :] \
        + tl.load(nb + n, mask=keep, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        out = out / (1.0 + tl.exp(-out))
    elif ACT == 2:
        out = 0.5 * out * (1.0 + tl.erf(out * 0.7071067811865476))
    tl.store(y + p[:, None].to(tl.int64) * C + n[None, :], out.to(y.dtype.element_ty),
             mask=live[:, None] & keep[None, :])


def _block(kh: int, kw: int, stride: int, padding: int) -> bool:
    """Whether the kernel takes an ``S x S`` block of taps (``S = stride``) as whole row runs: ``S`` a power of
    two of at least 4 (a product's reduction of ``S * S >= 16``) and the block inside the ``kh x kw`` window
    from ``(padding, padding)`` (ViG's 9 x 9, stride 8, padding 1)."""
    return stride >= 4 and stride & (stride - 1) == 0 and padding + stride <= min(kh, kw)


def _tiles(bn: int) -> tuple[int, int, int]:
    """``(BP, warps, stages)`` for ``bn`` (padded) output channels: with the taps in blocks, pipeline stages
    (each an fp32 ``[BP, 64]`` image tile and a ``[64, bn]`` weight tile) that leave room for two programs per
    SM. Timed on an H200 (``benchmarks/bench_stem.py --alt``): ViG-T's 96 channels 0.36 ms at 512 against
    0.47 at (128, 8, 2) and 0.71 before the blocks; ViG-S's 192: (64, 4, 2) 0.49 ms against 0.73 at 3 stages."""
    return (128, 4, 3) if bn <= 64 else (64, 4, 3) if bn <= 128 else (64, 4, 2) if bn <= 256 else (64, 8, 2)


def conv_norm_fwd_triton(x, weight, bias, norm_weight, norm_bias, eps: float, stride: int, padding: int, act: str,
                         dtype: torch.dtype, out_dtype: torch.dtype, wrap=direct) -> torch.Tensor:
    """``[B, H', W', C]`` contiguous in ``out_dtype`` (see :func:`vigla.ops.conv_norm.conv_norm_act`); the
    products in ``dtype`` (autocast's, or the inputs')."""
    B, C_in, H, W = x.shape
    C, _, kh, kw = weight.shape
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    y = torch.empty(B, Ho, Wo, C, dtype=out_dtype, device=x.device)
    P = B * Ho * Wo
    BN = max(16, triton.next_power_of_2(C))
    BP, warps, stages = _tiles(BN)
    packed = weight.reshape(C, -1).t().to(dtype).contiguous()  # [C_in*kh*kw, C]: a tile's rows are contiguous
    wrap(_conv_norm_fwd_kernel)[(cdiv(P, BP),)](
        x, packed, bias, norm_weight, norm_bias, y, P, Ho * Wo, Wo, H, W, *x.stride(), eps,
        C_IN=C_in, KH=kh, KW=kw, S=stride, PAD=padding, BLOCK=_block(kh, kw, stride, padding), C=C, BN=BN, BP=BP, BK=32,
        ACT=_ACT[act], DOT={torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype],
        num_warps=warps, num_stages=stages)
    return y
