"""BiGLA with static control flow: the formulation an exported or scripted graph holds.

Same contract as :func:`vigla.ops.bigla.naive.bigla_naive`, written with ordinary tensor ops only:
no custom op, no Python branch on data, no Python loop over the (possibly symbolic) number of
chunks, so ``torch.export`` with dynamic sizes, both ONNX exporters and TorchScript record it as
it is. Each direction is a causal gated linear attention (ViG, Liao et al., AAAI 2025, section
"Bidirectional Gated Linear Attention": ``S_t = diag(α_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t``),
computed in chunks of ``C`` tokens:

* every decay factor is ``exp`` of a sum of log decays over a token range, formed as a masked
  cumulative sum over that range (a "segment sum"), never as a difference of two long prefix sums:
  all exponents are <= 0 and carry no cancellation error, so steep gates (down to -20 per token)
  stay exact without the data-dependent branch of :mod:`vigla.ops.bigla.chunked`;
* inside a chunk: scores ``sum_c q_ic k_jc exp(seg_ijc)`` from the ``[C, C, K]`` decays;
* between chunks: the state after chunk ``i`` is ``sum_{j<=i} exp(seg'_ij) U_j`` (``U_j``: chunk
  ``j``'s own ``[K, V]`` state, ``seg'``: the segment sums of the chunks' total log decays), one
  batched matrix product over the ``[n, n]`` chunk pairs instead of a sequential scan.

Cost per head and direction: ``T * C * K`` for the intra-chunk decays and ``(T / C)^2 * K * V`` for
the inter-chunk states (small next to the model's linear layers up to ~4k tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bigla_static", "bigla_gated_static"]

CHUNK = 16  # fastest here (ONNX Runtime, 1 CPU thread: T=196 and 1024 against 8 and 32)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _directions(fwd: torch.Tensor, bwd: torch.Tensor, n: int, chunk: int) -> torch.Tensor:
    """``[B, T, H, D]`` x 2 -> ``[2, B, H, n, C, D]``: ``fwd`` as is and ``bwd`` time-reversed, each
    followed by zero tokens up to ``n * C``.

    One gather with an ``[n, C]`` index instead of flip / pad / reshape: every size is then exact
    in symbolic shape arithmetic, where ``T + pad`` split into chunks would leave ``torch.export``
    guards on ``T % C`` that it cannot prove."""
    T = fwd.shape[1]
    idx = torch.arange(n, device=fwd.device)[:, None] * chunk + torch.arange(chunk, device=fwd.device)
    valid = (idx < T).to(fwd.dtype)[:, :, None, None]  # [n, C, 1, 1]
    x = torch.stack([fwd[:, idx.clamp(max=T - 1)], bwd[:, (T - 1 - idx).clamp(min=0)]]) * valid
    return x.permute(0, 1, 4, 2, 3, 5)  # [2, B, n, C, H, D] -> [2, B, H, n, C, D]


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """``[..., L, K]`` -> ``[..., L, L, K]``: ``out[i, j] = sum_{j < l <= i} g_l`` (0 for ``j >= i``)."""
    length = g.shape[-2]
    strict = torch.ones(length, length, dtype=torch.bool, device=g.device).tril(-1)
    return torch.where(strict.unsqueeze(-1), g.unsqueeze(-2), 0.0).cumsum(-3)


def _causal_decays(g: torch.Tensor) -> torch.Tensor:
    """``[..., L, K]`` log decays -> ``[..., L, L, K]``: ``exp(sum_{j < l <= i} g_l)`` for ``j <= i``, else 0."""
    length = g.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool, device=g.device).tril()
    return torch.where(causal.unsqueeze(-1), _segment_sums(g).exp(), 0.0)


def _causal_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Causal GLA on chunked ``[2, B, H, n, C, K]`` / ``[2, B, H, n, C, V]`` tensors -> ``[2, B, H, n,
    C, V]`` (``q_t^T S_t``, unscaled)."""
    decay = _causal_decays(g)  # [..., n, C(i), C(j), K]
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3) * decay).sum(-1)  # [..., n, C, C]
    # chunk j's own state, decayed to the chunk's end: sum_t exp(sum_{t < l < C} g_l) k_t v_t^T
    local = (k * decay[..., -1, :, :]).transpose(-1, -2) @ v  # [..., n, K, V]
    # state after chunk i: sum_{j <= i} exp(sum_{j < m <= i} total_m) local_j, as [K] batched matmuls
    total = g.sum(-2)  # [..., n, K] each chunk's total log decay
    weights = _causal_decays(total).permute(0, 1, 2, 5, 3, 4)  # [2, B, H, K, n(i), n(j)]
    after = (weights @ local.transpose(-3, -2)).transpose(-3, -2)  # [..., n, K, V]
    before = torch.cat([torch.zeros_like(after[..., :1, :, :]), after[..., :-1, :, :]], dim=-3)
    return scores @ v + (q * g.cumsum(-2).exp()) @ before


def bigla_static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gf: torch.Tensor,
                 log_gb: torch.Tensor, scale: float, chunk: int = CHUNK) -> torch.Tensor:
    """BiGLA (:func:`vigla.ops.bigla.bigla`'s contract) with static control flow.

    Args:
        q, k, log_gf, log_gb: ``[B, T, H, K]``; v: ``[B, T, H, V]``; log decays finite and <= 0.
        scale: readout scale. chunk: tokens per chunk (``T`` is zero-padded to a multiple, by at
            least one token).

    Returns:
        ``[B, T, H, V]`` in ``q.dtype``, computed in float32 (float64 for float64 inputs).
    """
    T = q.shape[1]
    # at least two chunks and C + 1 zero tokens after the last one, whatever T: no size-1 chunk axis
    # and no empty padding, which torch.export would specialize the graph on
    n = T // chunk + 2
    dtype = _work_dtype(q)
    K, V = q.shape[-1], v.shape[-1]
    qkv = [q.to(dtype), k.to(dtype), v.to(dtype)]  # both directions gathered at once
    x = _directions(torch.cat(qkv + [log_gf.to(dtype)], -1), torch.cat(qkv + [log_gb.to(dtype)], -1), n, chunk)
    qc, kc, vc, gc = x.split([K, K, V, K], dim=-1)
    o = _causal_gla(qc, kc, vc, gc).flatten(3, 4)  # [2, B, H, n*C, V]
    t = torch.arange(T, device=o.device)
    o = (o[0].index_select(2, t) + o[1].index_select(2, T - 1 - t)) * (0.5 * scale)
    return o.transpose(1, 2).to(q.dtype)


def bigla_gated_static(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, zf: torch.Tensor,
                       zb: torch.Tensor, gate_normalizer: float, scale: float,
                       chunk: int = CHUNK) -> torch.Tensor:
    """:func:`bigla_static` with log decays ``logsigmoid(z) / gate_normalizer`` of gate logits
    (:func:`vigla.ops.bigla.bigla_gated`'s contract)."""
    dtype = _work_dtype(zf)  # as vigla.ops.bigla.op.log_decays
    log_gf = F.logsigmoid(zf.to(dtype)) / gate_normalizer
    log_gb = F.logsigmoid(zb.to(dtype)) / gate_normalizer
    return bigla_static(q, k, v, log_gf, log_gb, scale, chunk)
