"""The residual add and the pre-norm of a block in plain PyTorch: the ground truth of the fused kernels.

Per row of ``C`` channels (the tokens of a ViG block, Liao et al., AAAI 2025, Sec. 3):

    s = x + delta                       (the new residual stream, stored in x's dtype)
    y = norm(s) * w (+ b)               rms:   norm(s) = s / sqrt(mean(s^2) + eps)  (timm's RmsNorm)
                                        layer: norm(s) = (s - mean(s)) / sqrt(var(s) + eps)

The norm reads ``s`` as stored (rounded to x's dtype), so the fused op equals ``norm(x + delta)``
computed in two steps. Statistics in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _work(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def residual_sum(x: torch.Tensor, delta: Optional[torch.Tensor]) -> torch.Tensor:
    """``x + delta`` summed in float32 (float64) and stored in ``x.dtype``; ``x`` when ``delta`` is None."""
    if delta is None:
        return x
    f = _work(x)
    return (x.to(f) + delta.to(f)).to(x.dtype)


def rms_rstd(s: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row's reciprocal RMS ``rsqrt(mean(s^2) + eps)``, ``[..., 1]`` in ``s``'s dtype."""
    return torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)


def _normalize(s: torch.Tensor, eps: float, rms: bool):
    """``(n, r)``: the normalized rows and their reciprocal deviation ``[..., 1]``."""
    if rms:
        r = rms_rstd(s, eps)
        return s * r, r
    c = s - s.mean(-1, keepdim=True)
    r = torch.rsqrt(c.square().mean(-1, keepdim=True) + eps)
    return c * r, r


def add_norm_reference(x, delta, weight, bias, eps: float, rms: bool, out_dtype: torch.dtype):
    """``x``, ``delta``: ``[..., C]`` (``delta`` may be None); ``weight``, ``bias``: ``[C]`` (``bias``
    None for rms). Returns ``(s, y)``: ``s`` ``[..., C]`` in ``x.dtype``, ``y`` in ``out_dtype``."""
    s = residual_sum(x, delta)
    f = _work(s)
    shape = (s.shape[-1],)
    w, b = weight.to(f), None if bias is None else bias.to(f)
    # PyTorch's norms (the same numbers as the models' plain path), statistics in f
    y = F.rms_norm(s.to(f), shape, w, eps) if rms else F.layer_norm(s.to(f), shape, w, b, eps)
    if rms and b is not None:
        y = y + b
    return s, y.to(out_dtype)


def mlp_add_norm_reference(x, w1, w2, r, weight, bias, eps: float, rms: bool, out_dtype: torch.dtype,
                           row_scale=None):
    """A SwiGLU MLP, then :func:`add_norm_reference` with its output as ``delta``: ``s = r + (silu(a) * b) @ w2^T``
    with ``[a, b] = diag(row_scale) x @ w1^T`` (fc1's halves; ``row_scale`` ``[...]`` or None), ``y = norm(s)``;
    products in ``x``'s dtype. ``x``: ``[..., C]``, ``w1``: ``[2I, C]``, ``w2``: ``[C, I]``, ``r``: ``[..., C]``;
    returns ``(s, y)`` as :func:`add_norm_reference`."""
    u = x @ w1.t()
    if row_scale is not None:
        u = u * row_scale.unsqueeze(-1).to(u.dtype)
    a, b = u.chunk(2, dim=-1)
    return add_norm_reference(r, (F.silu(a) * b) @ w2.t(), weight, bias, eps, rms, out_dtype)


def add_norm_reference_bwd(dy, ds, s, weight, bias, eps: float, rms: bool):
    """Gradients of ``<dy, y> + <ds, s>`` (``ds`` may be None: ``s`` unused) written out, from the
    saved residual ``s``: ``(dx, dweight, dbias)``; ``dx`` (in ``s.dtype``) is also the gradient of
    ``delta``; ``dbias`` is None without a bias."""
    f = _work(s)
    n, r = _normalize(s.to(f), eps, rms)
    g = dy.to(f)
    dn = g * weight.to(f)
    d = dn - n * (dn * n).mean(-1, keepdim=True)
    if not rms:
        d = d - dn.mean(-1, keepdim=True)
    dx = r * d
    if ds is not None:
        dx = dx + ds.to(f)
    lead = tuple(range(s.dim() - 1))
    dbias = g.sum(lead).to(bias.dtype) if bias is not None else None
    return dx.to(s.dtype), (g * n).sum(lead).to(weight.dtype), dbias
