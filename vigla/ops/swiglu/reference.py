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
    return torch.cat([dy * b * s * (1 + a * (1 - s)), dy * a * s], dim=-1).to(u.dtype)
