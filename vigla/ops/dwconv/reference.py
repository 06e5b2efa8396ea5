"""ViG's local branch in plain PyTorch: the ground truth of the fused kernels.

``x_c = act(DWConv3x3(x))`` on the ``H x W`` token grid (Liao et al., AAAI 2025, Sec. 3.2, the 2-D
gating locality injection; SiLU after the conv in ViG-T): per channel ``c``,

    u[h, w, c] = sum_{i, j in 0..2} weight[c, 0, i, j] * x[h + i - 1, w + j - 1, c]   (zero outside)
    y = SiLU(u) if act else u

Computed in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import silu_slope


def _work(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _image(t: torch.Tensor, hw: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``[B, H*W, C]`` tokens -> ``[B, C, H, W]``."""
    B, _, C = t.shape
    return t.to(dtype).reshape(B, *hw, C).permute(0, 3, 1, 2)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]``."""
    return t.permute(0, 2, 3, 1).flatten(1, 2)


def _conv(x: torch.Tensor, weight: torch.Tensor, hw: tuple[int, int]):
    """``(image, u)``: ``x`` as ``[B, C, H, W]`` and the conv's output, both in the work dtype
    (autocast off: the convs here run in it)."""
    f = _work(x)
    img = _image(x, hw, f)
    with torch.autocast(x.device.type, enabled=False):
        return img, F.conv2d(img, weight.to(f), padding=1, groups=x.shape[-1])


def dwconv_reference(x, weight, hw: tuple[int, int], act: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """``x``: ``[B, H*W, C]``; ``weight``: ``[C, 1, 3, 3]``. Returns ``[B, H*W, C]`` in ``out_dtype``."""
    _, u = _conv(x, weight, hw)
    return _tokens(F.silu(u) if act else u).to(out_dtype)


def dwconv_reference_bwd(dy, x, weight, hw: tuple[int, int], act: bool):
    """``(dx, dweight)`` of ``<dy, dwconv_reference(x, weight, hw, act)>``, written out: ``dx`` is the
    transposed conv of ``g = dy * SiLU'(u)`` (``dy`` without ``act``), ``dweight[c, 0, i, j]`` the sum
    of ``g * x`` shifted by ``(i - 1, j - 1)``. Dtypes follow ``x`` and ``weight``."""
    img, u = _conv(x, weight, hw)
    g = _image(dy, hw, img.dtype)
    if act:
        g = g * silu_slope(u)
    H, W = hw
    with torch.autocast(x.device.type, enabled=False):
        dx = F.conv_transpose2d(g, weight.to(img.dtype), padding=1, groups=img.shape[1])
    padded = F.pad(img, (1, 1, 1, 1))
    dw = torch.stack([(g * padded[:, :, i:i + H, j:j + W]).sum((0, 2, 3)) for i in range(3) for j in range(3)], 1)
    return _tokens(dx).to(x.dtype), dw.reshape(weight.shape).to(weight.dtype)
