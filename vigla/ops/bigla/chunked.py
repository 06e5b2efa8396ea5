"""Chunk-parallel BiGLA in plain PyTorch (any device, autograd through ordinary ops).

Within a chunk of ``C`` tokens the output is a masked matrix product; between chunks a
``[K, V]`` state is carried. Every exponent that is evaluated is <= 0, so the result is exact
and finite for any finite log decays (-20 per token included) and any sequence length:

* intra-chunk scores use ``exp(b_i - b_j)`` for ``j <= i`` only (``b``: in-chunk cumulative
  log decay), formed per key channel instead of the unstable ``q*exp(b)`` / ``k*exp(-b)`` split;
* the carried state enters as ``(q_i * exp(b_i)) S`` and a chunk's keys as
  ``k_j * exp(b_last - b_j)``.

The backward direction is the forward recurrence on the time-reversed sequence; this backend
computes both directions as one batch (it is the portable reference path, not the fast one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 32


def _causal_gla(q, k, v, g, scale: float, chunk: int):
    """Causal GLA on ``[..., T, K]`` / ``[..., T, V]`` tensors, ``T`` a multiple of ``chunk``.

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``; returns ``scale * q_t^T S_t`` as ``[..., T, V]``.
    """
    *lead, T, K = q.shape
    V = v.shape[-1]
    n = T // chunk
    q, k, g = (t.reshape(*lead, n, chunk, K) for t in (q, k, g))
    v = v.reshape(*lead, n, chunk, V)

    b = g.cumsum(-2)  # in-chunk inclusive cumulative log decay, <= 0
    b_last = b[..., -1:, :]

    # intra-chunk: A_ij = sum_c q_ic k_jc exp(b_ic - b_jc), j <= i
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    diff = b.unsqueeze(-2) - b.unsqueeze(-3)  # [..., n, C(i), C(j), K]
    decay = torch.where(causal[..., None], diff, diff.new_tensor(float("-inf"))).exp()
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3) * decay).sum(-1)  # [..., n, C, C]
    out = scores @ v

    # inter-chunk: carry S across chunks
    q_dec = q * b.exp()
    k_dec = k * (b_last - b).exp()
    local = k_dec.transpose(-1, -2) @ v  # [..., n, K, V]: chunk's own contribution
    chunk_decay = b_last.squeeze(-2).exp().unsqueeze(-1)  # [..., n, K, 1]
    state = local.new_zeros(*lead, K, V)
    before = []
    for i in range(n):
        before.append(state)
        state = chunk_decay[..., i, :, :] * state + local[..., i, :, :]
    out = out + q_dec @ torch.stack(before, dim=-3)
    return (out * scale).reshape(*lead, T, V)


def bigla_chunked(q, k, v, log_gf, log_gb, scale: float, chunk: int = DEFAULT_CHUNK):
    """Chunked BiGLA; same contract as :func:`vigla.ops.bigla.naive.bigla_naive`.

    Args:
        q, k, log_gf, log_gb: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        chunk: tokens per chunk (the result does not depend on it beyond rounding).

    Returns:
        ``[B, T, H, V]`` in ``q.dtype``; computed in float32 (float64 for float64 inputs).
    """
    out_dtype = q.dtype
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    T = q.shape[1]
    pad = (-T) % chunk

    def heads_first(x, flip):
        x = x.to(work)
        if flip:
            x = x.flip(1)
        x = x.transpose(1, 2)  # [B, H, T, D]
        return F.pad(x, (0, 0, 0, pad)) if pad else x

    # both directions as one batch: index 0 = forward scan, 1 = backward scan (time-reversed)
    qs = torch.stack([heads_first(q, False), heads_first(q, True)])
    ks = torch.stack([heads_first(k, False), heads_first(k, True)])
    vs = torch.stack([heads_first(v, False), heads_first(v, True)])
    gs = torch.stack([heads_first(log_gf, False), heads_first(log_gb, True)])
    o = _causal_gla(qs, ks, vs, gs, scale, chunk)[..., :T, :]  # [2, B, H, T, V]
    o = (o[0] + o[1].flip(2)) * 0.5
    return o.transpose(1, 2).to(out_dtype)
