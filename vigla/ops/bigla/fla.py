"""BiGLA the way the official ViG code trains it: fla's causal ``chunk_gla`` on ``[x; flip(x)]``.

Only for benchmarks and cross-checks (needs the optional ``fla-core`` package and CUDA). It
materialises the flipped copies, the 2B batch and a 2x output: exactly what the fused kernel
avoids.
"""
from __future__ import annotations

import torch

try:
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    HAS_FLA = True
except ImportError:  # optional dependency
    chunk_gla = fused_recurrent_gla = None
    HAS_FLA = False


def bigla_fla(q, k, v, log_gf, log_gb, scale: float, recurrent: bool = False) -> torch.Tensor:
    """``[B, T, H, V]``; inputs ``[B, T, H, K|V]`` (fla's layout). ``recurrent``: fla's ``fused_recurrent_gla``
    instead of ``chunk_gla`` (what the official ViG-H runs in its last two stages)."""
    if not HAS_FLA:
        raise RuntimeError("bigla_fla needs the fla-core package (pip install fla-core)")
    B = q.shape[0]
    both = [torch.cat([x, x.flip(1)]) for x in (q, k, v)]
    gates = torch.cat([log_gf, log_gb.flip(1)]).to(q.dtype)
    o, _ = (fused_recurrent_gla if recurrent else chunk_gla)(*both, gates, scale=scale)
    return (o[:B] + o[B:].flip(1)) * 0.5
