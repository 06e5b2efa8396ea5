"""The stems' first layer in one Triton kernel: a direct convolution as an implicit GEMM (the
``[pixels, C_in*kh*kw]`` patches gathered from the NCHW image tile by tile, never written out), then the
bias, the LayerNorm over the output channels and the activation on the accumulator, stored channels-last.

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
def _conv_norm_fwd_kernel(x, w, b, nw, nb, y, P, HWO, WO, H, W, sxb, sxc, sxh, sxw, eps,
                          KRED: tl.constexpr, KHW: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr,
                          PAD: tl.constexpr, C: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
                          ACT: tl.constexpr, DOT: tl.constexpr):
    """``BP`` output pixels (of ``P = B * H' * W'``), all ``C`` channels: ``y[p, :]``. ``w``: the weight as
    ``[KRED, C]`` (``KRED = C_in * kh * kw``, row ``k = (c_in * kh + i) * kw + j``), contiguous.

    ``DOT``: 0 fp32 operands (exact products), 1 fp16, 2 bf16 (the image and weights rounded to it, as
    autocast's convolution does; fp32 accumulation either way)."""
    eps = tl.cast(eps, tl.float32)
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    live = p < P
    img = (p // HWO).to(tl.int64)
    oy = (p % HWO) // WO
    ox = p % WO
    n = tl.arange(0, BN)
    keep = n < C
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    for k0 in range(0, KRED, BK):
        k = k0 + tl.arange(0, BK)
        ci = k // KHW
        iy = oy[:, None] * STRIDE - PAD + ((k % KHW) // KW)[None, :]
        ix = ox[:, None] * STRIDE - PAD + (k % KW)[None, :]
        inside = live[:, None] & (k < KRED)[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        a = tl.load(x + img[:, None] * sxb + ci[None, :] * sxc + iy * sxh + ix * sxw, mask=inside, other=0.0)
        wt = tl.load(w + k[:, None] * C + n[None, :], mask=(k < KRED)[:, None] & keep[None, :], other=0.0)
        if DOT == 2:
            acc += tl.dot(a.to(tl.bfloat16), wt.to(tl.bfloat16))
        elif DOT == 1:
            acc += tl.dot(a.to(tl.float16), wt.to(tl.float16))
        else:
            acc += tl.dot(a.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
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
    tl.store(y + p[:, None].to(tl.int64) * C + n[None, :], out.to(y.dtype.element_ty), mask=live[:, None] & keep[None, :])


def conv_norm_fwd_triton(x, weight, bias, norm_weight, norm_bias, eps: float, stride: int, padding: int, act: str,
                         dtype: torch.dtype, out_dtype: torch.dtype, wrap=direct) -> torch.Tensor:
    """``[B, H', W', C]`` contiguous in ``out_dtype`` (see :func:`vigla.ops.conv_norm.conv_norm_act`); the
    products in ``dtype`` (autocast's, or the inputs')."""
    B, C_in, H, W = x.shape
    C, _, kh, kw = weight.shape
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    y = torch.empty(B, Ho, Wo, C, dtype=out_dtype, device=x.device)
    P = B * Ho * Wo
    BP, BN = 128, max(16, triton.next_power_of_2(C))
    packed = weight.reshape(C, -1).t().to(dtype).contiguous()  # [C_in*kh*kw, C]: a tile's rows are contiguous
    wrap(_conv_norm_fwd_kernel)[(cdiv(P, BP),)](
        x, packed, bias, norm_weight, norm_bias, y, P, Ho * Wo, Wo, H, W, *x.stride(), eps,
        KRED=C_in * kh * kw, KHW=kh * kw, KW=kw, STRIDE=stride, PAD=padding, C=C, BN=BN, BP=BP, BK=32,
        ACT=_ACT[act], DOT={torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype],
        num_warps=4 if BN <= 64 else 8)
    return y
