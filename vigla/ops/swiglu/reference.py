"""SwiGLU's gating in plain PyTorch: ``y = SiLU(a) * b`` with ``[a | b] = u`` (the fc1 output)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(u: torch.Tensor) -> torch.Tensor:
    """``u``: ``[..., 2I]`` -> ``[..., I]`` in ``u.dtype``."""
    a, b = u.chunk(2, dim=-1)
    return F.silu(a) * b


def swiglu_reference_bwd(dy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``du`` (``[..., 2I]``) of ``<dy, swiglu_reference(u)>``, written out."""
    f = torch.float64 if u.dtype == torch.float64 else torch.float32
    a, b = (t.to(f) for t in u.chunk(2, dim=-1))
    dy = dy.to(f)
    s = torch.sigmoid(a)
    silu = a * s
    if torch.is_grad_enabled():  # a backward that records (create_graph): out-of-place ops autograd can follow
        return torch.cat([dy * b * torch.addcmul(s, silu, 1 - s), dy * silu], dim=-1).to(u.dtype)
    du = torch.empty(u.shape, dtype=f, device=u.device)
    da, db = du.chunk(2, dim=-1)  # written in place: no concatenation, fewer temporaries (the CPU's path)
    torch.mul(dy, silu, out=db)
    torch.mul(dy, b, out=da).mul_(torch.addcmul(s, silu, 1 - s))  # silu'(a) = s (1 + a (1 - s)) = s + silu (1 - s)
    return du.to(u.dtype)
