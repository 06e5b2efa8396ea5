"""Chunk-parallel BiGLA in plain PyTorch (any device), with an explicit backward.

Within a chunk of ``C`` tokens the output is a masked matrix product; between chunks a
``[K, V]`` state is carried. Every exponent that is evaluated is <= 0, so the result is exact
and finite for any finite log decays (-20 per token included) and any sequence length:

* intra-chunk scores ``sum_c q_ic k_jc exp(b_ic - b_jc)`` (``j <= i``; ``b``: in-chunk cumulative
  log decay) are matrix products of ``q*exp(b - b_0)`` and ``k*exp(b_0 - b)`` (``b_0``: the chunk's
  first token, so one factor is <= 1 and the other <= exp(range)) in every chunk whose decay range
  is below ``FACTOR_RANGE``; steeper chunks take the exact ``[C, C, K]`` form with every exponent
  <= 0 (never the unstable ``q*exp(b)`` / ``k*exp(-b)`` split);
* the carried state enters as ``(q_i * exp(b_i)) S`` and a chunk's keys as
  ``k_j * exp(b_last - b_j)``.

The backward direction is the forward recurrence on the time-reversed sequence; this backend
computes both directions as one batch (it is the portable reference path, not the fast one).
``bigla_chunked`` differentiates through ordinary ops; ``bigla_chunked_bwd`` is the same
gradient written out by hand (it backs the custom op's CPU backward, which cannot use autograd).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 32
FACTOR_RANGE = 30.0  # exp(30) ~ 1e13: the factored intra-chunk path stays far from fp32 limits


def _chunks(q, k, v, g, chunk):
    *lead, T, K = q.shape
    n = T // chunk
    q, k, g = (t.reshape(*lead, n, chunk, K) for t in (q, k, g))
    return q, k, v.reshape(*lead, n, chunk, v.shape[-1]), g


def _intra_decay(b, chunk):
    """``[..., C, C, K]``: ``exp(b_i - b_j)`` for ``j <= i``, else 0 (never overflows)."""
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=b.device).tril()
    diff = b.unsqueeze(-2) - b.unsqueeze(-3)
    return torch.where(causal[..., None], diff, diff.new_tensor(float("-inf"))).exp()


def _factors(b):
    """``(exp(b - b_0), exp(b_0 - b), steep)`` per chunk (``b``: ``[..., n, C, K]``).

    ``b`` decreases within a chunk, so the first factor is <= 1 and the second <= exp(range): their
    product ``exp(b_i - b_j)`` (j <= i) is formed without overflow or underflow while the chunk's
    decay range ``b_0 - b_last`` stays below ``FACTOR_RANGE``, and the intra-chunk products become
    matrix products instead of ``[C, C, K]`` tensors. ``steep``: the indices of the chunks past that
    range (their second factor is clamped; the callers recompute them in the exact form).
    """
    first = b[..., :1, :]
    rise = first - b
    steep = (rise[..., -1, :].amax(-1) >= FACTOR_RANGE).nonzero(as_tuple=True)
    return (-rise).exp(), rise.clamp(max=FACTOR_RANGE).exp(), steep


def _states_before(chunk_decay, local):
    """Scan ``S_{n+1} = D_n * S_n + U_n`` from ``S_0 = 0``; returns ``[S_0 .. S_{N-1}]`` stacked."""
    state = torch.zeros_like(local[..., 0, :, :])
    before = []
    for i in range(local.shape[-3]):
        before.append(state)
        state = chunk_decay[..., i, :, :] * state + local[..., i, :, :]
    return torch.stack(before, dim=-3)


def _intra_scores(q, k, b, factors, chunk):
    """``[..., n, C, C]``: ``sum_c q_ic k_jc exp(b_ic - b_jc)`` for ``j <= i``, else 0
    (``factors``: :func:`_factors` of ``b``)."""
    down, up, steep = factors
    scores = ((q * down) @ (k * up).transpose(-1, -2)).tril()
    if steep[0].numel():  # steep decays: the exact form, every exponent <= 0
        exact = (q[steep].unsqueeze(-2) * k[steep].unsqueeze(-3) * _intra_decay(b[steep], chunk)).sum(-1)
        scores = scores.index_put(steep, exact)
    return scores


def _causal_gla(q, k, v, g, scale: float, chunk: int):
    """Causal GLA on ``[..., T, K]`` / ``[..., T, V]`` tensors, ``T`` a multiple of ``chunk``.

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``; returns ``scale * q_t^T S_t`` as ``[..., T, V]``.
    """
    shape = v.shape
    q, k, v, g = _chunks(q, k, v, g, chunk)
    b = g.cumsum(-2)  # in-chunk inclusive cumulative log decay, <= 0
    b_last = b[..., -1:, :]
    scores = _intra_scores(q, k, b, _factors(b), chunk)  # [..., n, C, C]
    local = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # [..., n, K, V]
    before = _states_before(b_last.transpose(-1, -2).exp(), local)
    out = scores @ v + (q * b.exp()) @ before
    return (out * scale).reshape(shape)


def _causal_gla_bwd(q, k, v, g, do, scale: float, chunk: int):
    """Gradients ``(dq, dk, dv, dg)`` of ``<do, _causal_gla(q, k, v, g)>``, same shapes as inputs."""
    shapes = [t.shape for t in (q, k, v, g)]
    q, k, v, g = _chunks(q, k, v, g, chunk)
    do = do.reshape(v.shape) * scale
    b = g.cumsum(-2)
    b_last = b[..., -1:, :]
    factors = _factors(b)
    scores = _intra_scores(q, k, b, factors, chunk)
    q_dec, k_dec = q * b.exp(), k * (b_last - b).exp()
    chunk_decay = b_last.transpose(-1, -2).exp()  # [..., n, K, 1]
    before = _states_before(chunk_decay, k_dec.transpose(-1, -2) @ v)

    # gradient w.r.t. the state after each chunk, scanned backwards: dS_{n+1} feeds chunk n+1's
    # readout and, decayed, every later state.
    d_after = []
    ds = torch.zeros_like(before[..., 0, :, :])
    for i in range(q.shape[-3] - 1, -1, -1):
        d_after.append(ds)
        ds = q_dec[..., i, :, :].transpose(-1, -2) @ do[..., i, :, :] + chunk_decay[..., i, :, :] * ds
    d_after = torch.stack(d_after[::-1], dim=-3)  # [..., n, K, V]

    d_scores = (do @ v.transpose(-1, -2)).tril()  # [..., n, C, C]
    down, up, steep = factors
    dq_intra = (d_scores @ (k * up)) * down
    dk_intra = (d_scores.transpose(-1, -2) @ (q * down)) * up
    if steep[0].numel():  # steep decays: the exact [M, C(i), C(j), K] form for those chunks
        t = d_scores[steep].unsqueeze(-1) * _intra_decay(b[steep], chunk)
        dq_intra = dq_intra.index_put(steep, (t * k[steep].unsqueeze(-3)).sum(-2))
        dk_intra = dk_intra.index_put(steep, (t * q[steep].unsqueeze(-2)).sum(-3))
    dq = dq_intra + (do @ before.transpose(-1, -2)) * b.exp()
    dk_inter = (v @ d_after.transpose(-1, -2)) * (b_last - b).exp()
    dk = dk_intra + dk_inter
    dv = scores.transpose(-1, -2) @ do + k_dec @ d_after
    # log-decay gradient: d b_i = q_i dq_i - k_i dk_i, plus the chunk-end terms on b_last
    db = q * dq - k * dk
    d_chunk_decay = (d_after * before).sum(-1) * chunk_decay.squeeze(-1)  # [..., n, K]
    db[..., -1, :] += (k * dk_inter).sum(-2) + d_chunk_decay
    dg = db.flip(-2).cumsum(-2).flip(-2)
    return tuple(x.reshape(s) for x, s in zip((dq, dk, dv, dg), shapes))


def _even_chunk(T: int, chunk: int) -> int:
    """The chunk length that covers ``T`` tokens in as many chunks as ``chunk`` needs, with the least
    padding (e.g. T = 196, chunk = 32: 7 chunks of 28, none padded; T = 16: one chunk of 16)."""
    n = -(-T // chunk)
    return -(-T // n)


def _prepare(tensors_and_flips, work, pad):
    """``[B, T, H, D]`` inputs -> ``[2, B, H, T+pad, D]``: index 0 as is, index 1 time-reversed."""
    def heads_first(x, flip):
        x = x.to(work)
        x = (x.flip(1) if flip else x).transpose(1, 2)
        return F.pad(x, (0, 0, 0, pad)) if pad else x
    return [torch.stack([heads_first(a, False), heads_first(b, True)]) for a, b in tensors_and_flips]


def _work_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def bigla_chunked(q, k, v, log_gf, log_gb, scale: float, chunk: int = DEFAULT_CHUNK):
    """Chunked BiGLA; same contract as :func:`vigla.ops.bigla.naive.bigla_naive`.

    Args:
        q, k, log_gf, log_gb: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        chunk: at most this many tokens per chunk; the sequence is cut into evenly long chunks
            (the result does not depend on it beyond rounding).

    Returns:
        ``[B, T, H, V]`` in ``q.dtype``; computed in float32 (float64 for float64 inputs).
    """
    T = q.shape[1]
    chunk = _even_chunk(T, chunk)
    pad = (-T) % chunk
    qs, ks, vs, gs = _prepare([(q, q), (k, k), (v, v), (log_gf, log_gb)], _work_dtype(q), pad)
    o = _causal_gla(qs, ks, vs, gs, scale, chunk)[..., :T, :]  # [2, B, H, T, V]
    o = (o[0] + o[1].flip(2)) * 0.5
    return o.transpose(1, 2).to(q.dtype)


def bigla_chunked_bwd(q, k, v, log_gf, log_gb, do, scale: float, chunk: int = DEFAULT_CHUNK):
    """Gradients ``(dq, dk, dv, dlog_gf, dlog_gb)`` of ``<do, bigla_chunked(...)>``, without autograd.

    Shapes and dtypes follow the inputs; ``do`` is ``[B, T, H, V]``.
    """
    T = q.shape[1]
    chunk = _even_chunk(T, chunk)
    pad = (-T) % chunk
    qs, ks, vs, gs, dos = _prepare([(q, q), (k, k), (v, v), (log_gf, log_gb), (do, do)],
                                   _work_dtype(q), pad)
    grads = _causal_gla_bwd(qs, ks, vs, gs, dos * 0.5, scale, chunk)

    def back(x, like):  # [2, B, H, T+pad, D] -> forward part + un-reversed backward part
        x = x[..., :T, :].transpose(2, 3)
        return (x[0] + x[1].flip(1)).to(like.dtype)

    dq, dk, dv, dg = grads
    dg = dg[..., :T, :].transpose(2, 3)
    return (back(dq, q), back(dk, k), back(dv, v), dg[0].to(log_gf.dtype),
            dg[1].flip(1).to(log_gb.dtype))
