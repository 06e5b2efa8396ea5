"""Chunk-parallel BiGLA in plain PyTorch (any device), with an explicit backward.

The CPU path of every ViG model and the form ``torch.export`` / ONNX trace: the number and the
shapes of the tensor ops depend on the sequence length only (no data-dependent branch, no loop
over chunks), and the result is exact for any finite log decays <= 0.

BiGLA (ViG, Liao et al., AAAI 2025, arXiv 2405.18425, Sec. 3.2) averages two gated linear
attention scans: the forward one, ``o^f_i = sum_{j<=i} q_i^T diag(exp(F_i - F_j)) k_j v_j^T`` with
``F`` the cumulative forward log decays, and the backward one, the same over ``j >= i`` with the
decays ``sum_{r=i}^{j-1}`` of the backward log decays. Shifting the backward gates by one token
turns those into ``exp(X_j - X_i)`` with ``X`` their inclusive cumulative sum, so one cumulative
sum serves both scans, which run as one batch (a leading dimension of 2; no flipped copies).

The sequence is cut into chunks of ``C`` tokens:

* within a chunk, the decay of a pair is split as ``exp(X_i - c) * exp(c - X_j)`` around the
  middle ``c`` of the chunk's range: the scores are one matrix product per chunk, shared by the
  two scans (forward in the lower, backward in the upper triangle). The two factors are formed in
  float64, where they stay in range: per-token log decays are clamped at ``-G`` (22 for float32
  inputs, 40 for float64), so that ``|X - c| <= (C - 1) G / 2`` (297 for ``C = 28``, e^297 ~ 1e129,
  far inside float64's e^709). The clamp changes nothing representable: a pair across a token
  whose log decay is below ``-G`` has decayed by less than ``e^-G`` (float32: 3e-10). On the CPU in
  eager mode, float32 inputs whose chunks each decay by at most ``e^-60`` in total keep the factors in
  float32 instead (ViG's ``logsigmoid(z) / 16`` unless a chunk's gate logits average below -34):
  ``|X - c| <= 30``, so a product of two stays below ``e^60``, far inside float32's ``e^88`` (one
  reduction decides);
* between chunks, each scan carries a ``[K, V]`` state per chunk (keys decayed to the chunk's end,
  queries from its start, all factors <= 1), mixed by the per-channel ``[n, n]`` matrix of decays
  between chunks: one batched product instead of a sequential scan. Its sums of chunk totals are
  float64 cumulative sums of only the terms they need (no difference of prefix sums, whose
  rounding would swamp the small totals that follow a steep stretch).

``bigla_chunked`` differentiates through ordinary ops; ``bigla_chunked_bwd`` is the same gradient
written out (it backs the custom op's CPU backward, which cannot use autograd).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..dispatch import via_dispatcher

DEFAULT_CHUNK = 28  # ViG at 224^2: 196 tokens = 7 chunks, no padding
# per-token log decays are clamped at -G: a pair across such a token decays by < e^-G
_CLAMP = {torch.float32: 22.0, torch.float64: 40.0}
# longest chunk per work dtype: (C - 1) * G / 2 <= 540 keeps the factors below e^540 (float64: e^709)
_MAX_CHUNK = {torch.float32: 50, torch.float64: 28}
# float32 factors when no chunk's log decays sum below -_FP32_SPAN: |X - c| <= 30, products <= e^60
_FP32_SPAN = 60.0


# ---------------------------------------------------------------------------------------------
# layout

def _work_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads_first(x, T_pad, dtype, shift: int = 0):
    """``[B, T, H, D]`` -> contiguous ``[B, H, T_pad, D]`` in ``dtype``, zero-padded; ``shift = 1``
    moves every token one place later (token ``T - 1`` drops out if ``T_pad == T``)."""
    x = F.pad(x.transpose(1, 2).to(dtype), (0, 0, shift, T_pad - x.shape[1]))
    return x.narrow(2, 0, T_pad) if shift else x


def _tokens_last(x, T, dtype, shift: int = 0):
    """``[B, H, T_pad, D]`` -> contiguous ``[B, T, H, D]`` in ``dtype``: tokens ``shift .. T + shift - 1``
    (zeros past the end), as a gather: no slice of the padded length, whose size checks would pin a
    symbolic ``T`` under ``torch.export``."""
    if shift:
        x = F.pad(x, (0, 0, 0, shift))
    tokens = torch.arange(shift, T + shift, device=x.device)
    return x.transpose(1, 2).index_select(1, tokens).to(dtype)


def _num_chunks(T, C: int):
    """``ceil(T / C)``. Under ``torch.export`` a fresh size symbol with the same value (asserted at
    run time): PyTorch reasons about it for every size, where it would otherwise pin the
    expression ``(T + C - 1) // C`` to >= 2 (and then ``T`` to the traced value)."""
    n = (T + C - 1) // C
    if torch.compiler.is_exporting() and isinstance(n, torch.SymInt):
        n = torch.scalar_tensor(n, dtype=torch.int64).item()
        torch._check(n >= 1)
        torch._check(n * C >= T)
        torch._check(n * C < T + C)
    return n


def _cached(fn):
    """``fn`` memoized per shape in eager mode; rebuilt in the graph while tracing or under a
    dispatch mode (fake tensors must not meet the cached real ones)."""
    cached = functools.lru_cache(maxsize=32)(fn)

    @functools.wraps(fn)
    def get(*args):
        return fn(*args) if via_dispatcher() else cached(*args)
    return get


@_cached
def _causal(C: int, device):
    """``[2, 1, 1, 1, C, C]``: the forward scan's pairs (``j <= i``) and the backward one's (``j >= i``)."""
    full = torch.ones(C, C, dtype=torch.bool, device=device)
    return torch.stack([full.tril(), full.triu()]).view(2, 1, 1, 1, C, C)


@_cached
def _chunk_masks(n, device):
    """``([n, n], [2, 1, 1, 1, n, n])``: ``c > m``, and which chunk ``m`` feeds chunk ``c``'s state
    (forward scan: ``m < c``, backward: ``m > c``)."""
    full = torch.ones(n, n, device=device, dtype=torch.bool)
    return full.tril(-1), torch.stack([full.tril(-1), full.triu(1)]).view(2, 1, 1, 1, n, n)


# ---------------------------------------------------------------------------------------------
# the decay factors

def _decays(g, n, C):
    """Decay factors of the log decays ``g [2, B, H, n*C, K]`` (forward; backward shifted by one).

    Returns a dict of (``X``: the chunk-local inclusive cumulative sum, ``c`` the middle of its
    range, ``E`` the chunk's total, in ``g``'s dtype):
      * ``e [2, B, H, n, C, K]``: ``exp(s (X - c))``, ``s = +1`` (f) / ``-1`` (b): query factor
        ``e``, key factor ``1 / e`` of the products within a chunk;
      * ``to_state [2, ..., n, 1, K]``: ``e^(E - c)`` (f) / ``e^c`` (b): turns the key factor into
        the decay to the chunk's end (f) / from its start (b); ``from_state``, the other one, turns
        the query factor into the decay from the chunk's start (f) / to its end (b);
      * ``chunk [2, B, H, K, n, n]``: decays between chunks (:func:`_chunk_decays`);
      * ``total [2, B, H, n, K]``: ``E``.
    """
    X = g.unflatten(-2, (n, C)).cumsum(-2)
    E = X[..., -1, :]
    centre = ((X[..., 0, :] + E) * 0.5).detach()  # any value works; the middle keeps factors in range
    sign = torch.tensor([1.0, -1.0], dtype=g.dtype, device=g.device).view(2, 1, 1, 1, 1, 1)
    e = torch.exp((X - centre.unsqueeze(-2)) * sign)
    end, start = torch.exp(E - centre), torch.exp(centre)
    to_state = torch.stack([end[0], start[1]]).unsqueeze(-2)
    from_state = torch.stack([start[0], end[1]]).unsqueeze(-2)
    traced = torch.compiler.is_compiling()
    return {"e": e, "to_state": to_state, "from_state": from_state, "total": E,
            "chunk": _chunk_decays(E, n, g.device) if traced else None}


def _chunk_decays(total, n, device):
    """``[2, B, H, K, n, n]``: at ``[c, m]``, ``exp(sum of the chunk totals strictly between m and
    c)`` where ``m`` feeds ``c`` (f: ``m < c``, b: ``m > c``), else 0. Each sum accumulates only its
    own terms (a cumulative sum down a masked matrix): after a steep stretch a prefix sum is large,
    and the small totals of later chunks would drown in its rounding."""
    later, feeds = _chunk_masks(n, device)
    X = torch.where(later, total.transpose(-1, -2).unsqueeze(-1), 0.0)  # [c, m]: c's total if c > m
    Z = X.cumsum(-2) - X  # [c, m]: sum over m < m' < c
    logs = torch.stack([Z[0], Z[1].transpose(-1, -2)])  # b: the same, transposed
    return torch.where(feeds, logs, -torch.inf).exp()


def _pair(x, dtype):
    """``[2, B, H, n, C, K]`` (scans first) -> ``[B, H, n, C, 2K]`` in ``dtype`` (the two scans side by
    side in the channels: one product then serves both, and sums them)."""
    B, H, n, C, K = x.shape[1:]
    return torch.empty(B, H, n, C, 2, K, dtype=dtype, device=x.device).copy_(x.permute(1, 2, 3, 4, 0, 5)).flatten(-2)


def _unpair(x):
    """``[B, H, n, C, 2K]`` -> ``[2, B, H, n, C, K]`` (a view)."""
    return x.unflatten(-1, (2, -1)).permute(4, 0, 1, 2, 3, 5)


def _carry(U, f, reverse: bool):
    """States between chunks: ``S[c] = sum_m D[c, m] U[m]`` (``D``: the decays between chunks) for
    ``U [B, H, n, 2K, V]`` (forward scan in channels ``:K``, backward in ``K:``); ``reverse``: the
    transposed map (the backward pass). Eager mode scans the chunks (O(n K V)); traced, one batched
    product with the ``[n, n]`` decay matrix, whose shapes stay symbolic."""
    B, H, n, K2, V = U.shape
    if f["chunk"] is not None:
        D = f["chunk"].to(U.dtype)
        D = D.transpose(-1, -2) if reverse else D
        Ux = U.unflatten(-2, (2, -1)).permute(3, 0, 1, 4, 2, 5).clone(memory_format=torch.contiguous_format)
        S = torch.bmm(D.reshape(-1, n, n), Ux.view(-1, n, V)).view(2, B, H, K2 // 2, n, V)
        return S.permute(1, 2, 4, 0, 3, 5).reshape(B, H, n, K2, V)
    decay = f["total"].exp().to(U.dtype).permute(1, 2, 3, 0, 4).reshape(B, H, n, K2, 1)
    K = K2 // 2
    # forward scan: S[c] = decay[c-1] S[c-1] + U[c-1]; backward scan: the same from the end
    later = [(slice(0, K), False), (slice(K, K2), True)]
    parts = []
    for channels, backward in later:
        backward ^= reverse
        order = range(n - 1, -1, -1) if backward else range(n)
        state = U.new_zeros(B, H, K, V)
        states = []
        for c in order:
            states.append(state)
            state = torch.addcmul(U[:, :, c, channels], decay[:, :, c, channels], state)
        parts.append(torch.stack(states[::-1] if backward else states, dim=2) if n else U[:, :, :, channels])
    return torch.cat(parts, dim=-2)


# ---------------------------------------------------------------------------------------------
# forward and backward

def _factor_dtype(g, work, n: int, C: int):
    """The dtype of the cumulative sums and decay factors for the clamped log decays ``g [2, B, H, n*C, K]``:
    float32 for float32 work on the CPU in eager mode when every chunk's total is at least ``-_FP32_SPAN``
    (one reduction, read on the host), else float64: always while tracing (no data-dependent branch) and
    on an accelerator (no host read, e.g. inside a CUDA graph's capture)."""
    if work == torch.float64 or g.device.type != "cpu" or via_dispatcher():
        return torch.float64
    if g.numel() == 0:  # no tokens (or no batch, heads, channels): nothing to reduce
        return torch.float32
    return torch.float32 if bool(g.unflatten(-2, (n, C)).sum(-2).min() >= -_FP32_SPAN) else torch.float64


def _setup(q, k, v, log_gf, log_gb, chunk):
    """Head-first padded work tensors (``[B, H, n, C, D]``), the clamped log decays ``[2, B, H, n*C, K]``
    (in the factors' dtype, :func:`_factor_dtype`) and the decay factors (:func:`_decays`)."""
    work = _work_dtype(q)
    T, C = q.shape[1], min(chunk, _MAX_CHUNK[work])
    if isinstance(T, int) and T > 0:  # as many chunks as C needs, evened out: the least padding
        C = -(-T // -(-T // C))
    n = _num_chunks(T, C)
    T_pad = n * C
    qh, kh, vh = (_heads_first(x, T_pad, work).unflatten(2, (n, C)) for x in (q, k, v))
    g = torch.stack([_heads_first(log_gf, T_pad, work), _heads_first(log_gb, T_pad, work, shift=1)])
    g = g.clamp(min=-_CLAMP[work])
    g = g.to(_factor_dtype(g, work, n, C))
    return T, n, C, qh, kh, vh, g, _decays(g, n, C)


def _forward(qh, kh, vh, f, causal, scale):
    """``o [B, H, n, C, V]`` and what the backward reuses."""
    half = scale * 0.5
    e = f["e"]
    qd, kd = qh * e, kh / e  # [2, B, H, n, C, K], in the factors' dtype
    scores = torch.matmul(qd, kd.transpose(-1, -2))  # [2, B, H, n, C, C]
    A = torch.where(causal, scores, 0.0).sum(0, dtype=vh.dtype) * half
    o = torch.matmul(A, vh)
    if isinstance(qh.shape[-3], int) and qh.shape[-3] == 1:  # one chunk: no state passes between chunks
        return o, {"qd": qd, "kd": kd, "A": A, "S": None}
    # between chunks: keys decayed to the chunk's end (f) / start (b), queries from its start (f) /
    # to its end (b), both <= 1
    q_state = _pair(qd * (f["from_state"] * half), vh.dtype)  # [B, H, n, C, 2K]
    k_state = _pair(kd * f["to_state"], vh.dtype)
    S = _carry(torch.matmul(k_state.transpose(-1, -2), vh), f, reverse=False)  # [B, H, n, 2K, V]
    o = o + torch.matmul(q_state, S)
    return o, {"qd": qd, "kd": kd, "A": A, "S": S, "q_state": q_state, "k_state": k_state}


def bigla_chunked(q, k, v, log_gf, log_gb, scale: float, chunk: int = DEFAULT_CHUNK):
    """Chunked BiGLA; same contract as :func:`vigla.ops.bigla.naive.bigla_naive`.

    Args:
        q, k, log_gf, log_gb: ``[B, T, H, K]``; v: ``[B, T, H, V]``; log decays finite and <= 0.
        scale: readout scale.
        chunk: the most tokens per chunk (at most 50 for float32 work, 28 for float64, where longer
            chunks would take the decay factors out of float64's range); in eager mode the chunks it
            takes are evened out (T = 49, chunk 28: two of 25), the last one zero-padded. The result
            does not depend on it beyond rounding.

    Returns:
        ``[B, T, H, V]`` in ``q.dtype``; computed in float32 (float64 for float64 inputs), the
        decay factors within a chunk in float64 (float32 on the CPU in eager mode when they stay in its range).
    """
    T, n, C, qh, kh, vh, g, f = _setup(q, k, v, log_gf, log_gb, chunk)
    o, _ = _forward(qh, kh, vh, f, _causal(C, q.device), scale)
    return _tokens_last(o.flatten(2, 3), T, q.dtype)


def _between_chunks_bwd(p, f, doh, vh, dqd, dkd, dv, half: float, K: int):
    """The gradients through the states passed between chunks, added to ``dqd``, ``dkd`` and ``dv``, and
    ``straddle [2, B, H, n, K]``: each chunk total's share of the log-decay gradient (it enters the state
    the chunk leaves, keys (f) / queries (b) decayed to its end, and the decay of the states that pass
    through it)."""
    dS = torch.matmul(p["q_state"].transpose(-1, -2), doh)  # d(state read by chunk c)
    dq_state = torch.matmul(doh, p["S"].transpose(-1, -2))  # [B, H, n, C, 2K]
    dU = _carry(dS, f, reverse=True)  # d(state left by chunk m)
    dk_state = torch.matmul(vh, dU.transpose(-1, -2))
    dv = dv + torch.matmul(p["k_state"], dU)
    dqd = dqd + _unpair(dq_state) * (f["from_state"] * half)
    dkd = dkd + _unpair(dk_state) * f["to_state"]
    ends = torch.cat([(p["k_state"] * dk_state)[..., :K], (p["q_state"] * dq_state)[..., K:]], dim=-1).sum(-2)
    passing = (dU * p["S"]).sum(-1)  # [B, H, n, 2K]
    scans_first = lambda x: x.unflatten(-1, (2, K)).permute(3, 0, 1, 2, 4)  # noqa: E731
    return dqd, dkd, dv, scans_first(ends) + scans_first(passing) * f["total"].exp()


def bigla_chunked_bwd(q, k, v, log_gf, log_gb, do, scale: float, chunk: int = DEFAULT_CHUNK):
    """Gradients ``(dq, dk, dv, dlog_gf, dlog_gb)`` of ``<do, bigla_chunked(...)>``, without autograd.

    Shapes and dtypes follow the inputs; ``do`` is ``[B, T, H, V]``.
    """
    T, n, C, qh, kh, vh, g, f = _setup(q, k, v, log_gf, log_gb, chunk)
    causal = _causal(C, q.device)
    _, p = _forward(qh, kh, vh, f, causal, scale)
    half = scale * 0.5
    doh = _heads_first(do, n * C, vh.dtype).unflatten(2, (n, C))

    # within chunks: o = A v, A = sum over the scans of the masked scores qd kd^T (times scale/2)
    dv = torch.matmul(p["A"].transpose(-1, -2), doh)
    dA = torch.matmul(doh, vh.transpose(-1, -2)).to(g.dtype) * half  # [B, H, n, C, C]
    d_scores = torch.where(causal, dA, 0.0)  # [2, B, H, n, C, C]
    dqd = torch.matmul(d_scores, p["kd"])
    dkd = torch.matmul(d_scores.transpose(-1, -2), p["qd"])

    straddle = None
    if p["S"] is not None:
        dqd, dkd, dv, straddle = _between_chunks_bwd(p, f, doh, vh, dqd, dkd, dv, half, q.shape[-1])

    # log decays: the pair (i, j) decays by exp(+-(X_i - X_j)), so dL/dX_t = +-(q_t dq_t - k_t dk_t)
    # (= qd dqd - kd dkd), and a gate moves X at and after its token within the chunk
    sign = torch.tensor([1.0, -1.0], dtype=g.dtype, device=q.device).view(2, 1, 1, 1, 1, 1)
    term = (p["qd"] * dqd - p["kd"] * dkd) * sign
    dg = term.sum(-2, keepdim=True) - term.cumsum(-2) + term  # sum over t >= r in the chunk
    if straddle is not None:
        dg = dg + straddle.unsqueeze(-2)
    dg = dg.flatten(3, 4)
    dg = dg * (g > -_CLAMP[_work_dtype(q)])  # the clamp passes no gradient
    e = f["e"]
    dq, dk = (dqd * e).sum(0).flatten(2, 3), (dkd / e).sum(0).flatten(2, 3)
    return (_tokens_last(dq, T, q.dtype), _tokens_last(dk, T, k.dtype),
            _tokens_last(dv.flatten(2, 3), T, v.dtype), _tokens_last(dg[0], T, log_gf.dtype),
            _tokens_last(dg[1], T, log_gb.dtype, shift=1))
