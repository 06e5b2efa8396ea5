"""Sequential reference for bidirectional gated linear attention (BiGLA).

This is the ground truth every other implementation is tested against. It runs ViG's two
recurrences (the forward and the backward scan of BiGLA) token by token, in whatever dtype it is given
(float64 included), with autograd.
"""
from __future__ import annotations

import torch


def bigla_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gf: torch.Tensor,
    log_gb: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Token-by-token BiGLA.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys.
        v: ``[B, T, H, V]`` values.
        log_gf, log_gb: ``[B, T, H, K]`` per-key-channel log decays (<= 0) of the forward and
            backward scans.
        scale: multiplies every readout ``q_t^T S_t``.

    Returns:
        ``[B, T, H, V]``: ``o_t = (o^f_t + o^b_t) / 2`` where
        ``S^f_t = diag(exp(log_gf_t)) S^f_{t-1} + k_t v_t^T``, ``o^f_t = scale * q_t^T S^f_t`` and
        ``S^b_t = diag(exp(log_gb_t)) S^b_{t+1} + k_t v_t^T``, ``o^b_t = scale * q_t^T S^b_t``.
        Computed in the common floating dtype of the inputs (at least float32).
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    dtype = torch.promote_types(dtype, log_gf.dtype)
    q, k, v, gf, gb = (t.to(dtype) for t in (q, k, v, log_gf, log_gb))
    B, T, H, K = q.shape
    V = v.shape[-1]

    def scan(order):
        S = q.new_zeros(B, H, K, V)
        out = [None] * T
        gates = gf if order is range_fwd else gb
        for t in order(T):
            S = gates[:, t, :, :, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            out[t] = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        return torch.stack(out, dim=1)

    return (scan(range_fwd) + scan(range_bwd)) * (0.5 * scale)


def range_fwd(n: int):
    return range(n)


def range_bwd(n: int):
    return range(n - 1, -1, -1)
