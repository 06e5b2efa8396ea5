"""ViG's 2-D gating locality injection in plain PyTorch: the ground truth of the fused kernel.

Per token and head (``d`` channels each):

    y = act( G * RMSNorm(o; w_o) + (1 - G) * RMSNorm(x; w_l) ),   G = sigmoid(z)

(``act``: SiLU or identity). ``o`` is the BiGLA output, ``x`` the depthwise-conv output that is
also the local branch, ``z`` the gate logits. Computed in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import silu_slope


def _work(o: torch.Tensor) -> torch.dtype:
    return torch.float64 if o.dtype == torch.float64 else torch.float32


def _heads(o, x, z, w_o, w_l):
    h, d = o.shape[-2:]
    f = _work(o)
    return (o.to(f), x.unflatten(-1, (h, d)).to(f), z.unflatten(-1, (h, d)).to(f),
            w_o.to(f), w_l.to(f))


def _rms(t: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(t.square().mean(-1, keepdim=True) + eps)


def locality_mix_reference(o, x, z, w_o, w_l, eps: float, act: bool) -> torch.Tensor:
    """``o``: ``[..., h, d]``; ``x``, ``z``: ``[..., h*d]``; ``w_o``, ``w_l``: ``[d]``.
    Returns ``[..., h*d]`` in ``o.dtype``."""
    a, b, g, w_o, w_l = _heads(o, x, z, w_o, w_l)
    u = torch.lerp(b * _rms(b, eps) * w_l, a * _rms(a, eps) * w_o, torch.sigmoid(g))
    return (F.silu(u) if act else u).flatten(-2).to(o.dtype)


def locality_mix_reference_bwd(dy, o, x, z, w_o, w_l, eps: float, act: bool):
    """Gradients ``(do, dx, dz, dw_o, dw_l)`` of ``<dy, locality_mix_reference(...)>``, written
    out (the reference of the fused backward); dtypes follow the inputs."""
    a, b, g, wo, wl = _heads(o, x, z, w_o, w_l)
    dy = dy.unflatten(-1, a.shape[-2:]).to(a.dtype)
    ra, rb = _rms(a, eps), _rms(b, eps)
    na, nb = a * ra * wo, b * rb * wl
    gate = torch.sigmoid(g)
    if act:
        u = nb + gate * (na - nb)
        dy = dy * silu_slope(u)
    dz = dy * (na - nb) * gate * (1 - gate)
    dna, dnb = dy * gate, dy * (1 - gate)

    def norm_bwd(dn, t, r, w):
        m = dn * w
        return r * m - t * r.pow(3) * (m * t).mean(-1, keepdim=True)

    lead = tuple(range(a.dim() - 1))
    return (norm_bwd(dna, a, ra, wo).to(o.dtype), norm_bwd(dnb, b, rb, wl).flatten(-2).to(x.dtype),
            dz.flatten(-2).to(z.dtype), (dna * a * ra).sum(lead).to(w_o.dtype),
            (dnb * b * rb).sum(lead).to(w_l.dtype))
