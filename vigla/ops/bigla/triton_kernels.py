"""Fused bidirectional GLA in Triton: both scans in one launch, forward and backward.

Inputs are read in place in the ``[B, T, H, D]`` layout, strided views included (q, k, v can be
column slices of one fused projection): no transposes, no flipped copies, no 2B batch, no 2x
output. Work is split over (value block, sequence segment, batch*head) programs. A program walks
its segment in chunks of ``BT`` tokens keeping ``[K, BV]`` fp32 states in registers:

* forward: a right-to-left pass computes the backward scan and stores ``o^b``; a left-to-right
  pass adds the forward scan.
* backward: a right-to-left pass carries the backward scan's state ``S^b`` (for ``dq^b``) and the
  forward scan's state gradient ``dS^f`` (for ``dk^f, dv^f``); a left-to-right pass carries
  ``S^f`` (``dq^f``) and ``dS^b`` (``dk^b, dv^b``), adds the stored partials and forms the
  log-decay gradients, prefix sums of ``q*dq - k*dk`` per direction.

Long sequences are cut into segments so that the grid fills the GPU: a summary kernel computes
each segment's state contribution and total decay (and, for the backward, its state-gradient
contribution); a program folds the summaries of the segments before/after it into its incoming
states (states only, ``[K, BV]`` each), and a last light kernel adds the gate-gradient carries.

Intra-chunk scores ``sum_c q_ic k_jc exp(x_ic - x_jc)`` go through tensor cores, factored around
the chunk's per-channel maximum of ``x`` so that one factor is <= 1 and the other <= exp(range);
a chunk whose in-chunk decay range exceeds 30 (e.g. log decays of -20 per token) takes
an exact path, one token at a time, in which every exponent is <= 0. Across chunks and segments only
``exp(<= 0)`` factors appear. So every finite log decay gives the exact result.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .op import supports

BT = 16  # tokens per chunk


# ----------------------------------------------------------------------------------- helpers
@triton.jit
def _load_rows(ptr, rows, cols, stride, T):
    """``[BT, len(cols)]`` fp32 tile of ``rows`` (zero past ``T``)."""
    mask = rows[:, None] < T
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, rows, cols, stride, T, x):
    tl.store(ptr + rows[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=rows[:, None] < T)


@triton.jit
def _load_gate(ptr, rows, cols, stride, T, gnorm, GATED: tl.constexpr):
    """``[BT, len(cols)]`` fp32 log decays: the stored values, or (``GATED``) ``logsigmoid(z) / gnorm``
    of stored logits ``z``; zero past ``T`` either way."""
    x = _load_rows(ptr, rows, cols, stride, T)
    if GATED:
        # logsigmoid(z) = min(z, 0) - log1p(exp(-|z|)), with log1p(t) = t * log(u) / (u - 1), u = 1 + t
        # (accurate where 1 + t rounds, i.e. for strong positive logits)
        t = tl.exp(-tl.abs(x))
        u = 1.0 + t
        log1p = tl.where(u == 1.0, t, t * tl.log(u) / tl.where(u == 1.0, 1.0, u - 1.0))
        x = tl.where(rows[:, None] < T, (tl.minimum(x, 0.0) - log1p) / gnorm, 0.0)
    return x


@triton.jit
def _dot(a, b, TF32: tl.constexpr):
    """fp32 operands and accumulation; ``TF32``: tensor-core tf32 products (half-precision inputs)."""
    if TF32:
        return tl.dot(a, b, input_precision="tf32")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _triangle(BT: tl.constexpr, UPPER: tl.constexpr):
    o = tl.arange(0, BT)
    if UPPER:
        return o[:, None] <= o[None, :]  # j >= i: the backward scan
    return o[:, None] >= o[None, :]  # j <= i: the forward scan


@triton.jit
def _row(t, i, BT: tl.constexpr):
    """Row ``i`` of a ``[BT, N]`` tile, as ``[N]``."""
    return tl.sum(tl.where((tl.arange(0, BT) == i)[:, None], t, 0.0), axis=0)


@triton.jit
def _col(t, j, BT: tl.constexpr):
    """Column ``j`` of a ``[BT, BT]`` tile, as ``[BT]``."""
    return tl.sum(tl.where((tl.arange(0, BT) == j)[None, :], t, 0.0), axis=1)


@triton.jit
def _decay_to(x, x_j, j, BT: tl.constexpr, UPPER: tl.constexpr):
    """``[BT(i), K]``: ``exp(x_i - x_j)`` for the rows ``i`` that token ``j`` reaches (``i <= j`` when
    ``UPPER``, else ``i >= j``), 0 for the others; every kept exponent is <= 0."""
    o = tl.arange(0, BT)
    keep = o <= j if UPPER else o >= j
    return tl.exp(tl.where(keep[:, None], x - x_j[None, :], float("-inf")))


@triton.jit
def _is_safe(x):
    """Per-channel max of ``x`` over the chunk and whether the factored path is safe."""
    hi = tl.max(x, axis=0)
    rng = tl.max(hi - tl.min(x, axis=0), axis=0)
    return hi, rng < 30.0  # exp(30) keeps every factor far inside the fp32/bf16 range


# The exact paths below (chunks with an in-chunk decay range >= 30) walk the chunk one token at a
# time on [BT, K] tiles: a [BT, BT, K] tensor would set the register budget of the whole kernel.
@triton.jit
def _scores(a, b, x, hi, safe, BT: tl.constexpr, UPPER: tl.constexpr, TF32: tl.constexpr):
    """``[BT, BT]``: ``sum_c a_ic b_jc exp(x_ic - x_jc)`` on the triangle (``hi, safe = _is_safe(x)``)."""
    if safe:
        s = _dot(a * tl.exp(x - hi[None, :]), tl.trans(b * tl.exp(hi[None, :] - x)), TF32)
        s = tl.where(_triangle(BT, UPPER), s, 0.0)
    else:
        s = tl.zeros([BT, BT], dtype=tl.float32)
        for j in range(0, BT):
            e = _decay_to(x, _row(x, j, BT), j, BT, UPPER)
            col = tl.sum(a * _row(b, j, BT)[None, :] * e, axis=1)
            s = tl.where((tl.arange(0, BT) == j)[None, :], col[:, None], s)
    return s


@triton.jit
def _mix_rows(w, y, x, hi, safe, BT: tl.constexpr, UPPER: tl.constexpr, TF32: tl.constexpr):
    """``[BT, K]``: ``r_i = sum_j w_ij y_j exp(x_i - x_j)`` (``w`` zero off the triangle)."""
    if safe:
        r = _dot(w, y * tl.exp(hi[None, :] - x), TF32) * tl.exp(x - hi[None, :])
    else:
        r = tl.zeros_like(x)
        for j in range(0, BT):
            e = _decay_to(x, _row(x, j, BT), j, BT, UPPER)
            r += _col(w, j, BT)[:, None] * _row(y, j, BT)[None, :] * e
    return r


@triton.jit
def _mix_cols(w, y, x, hi, safe, BT: tl.constexpr, UPPER: tl.constexpr, TF32: tl.constexpr):
    """``[BT, K]``: ``r_j = sum_i w_ij y_i exp(x_i - x_j)`` (``w`` zero off the triangle)."""
    if safe:
        r = _dot(tl.trans(w), y * tl.exp(x - hi[None, :]), TF32) * tl.exp(hi[None, :] - x)
    else:
        r = tl.zeros_like(x)
        o = tl.arange(0, BT)
        for i in range(0, BT):
            keep = o >= i if UPPER else o <= i  # the tokens j that token i reaches
            e = tl.exp(tl.where(keep[:, None], _row(x, i, BT)[None, :] - x, float("-inf")))
            r += _row(w, i, BT)[:, None] * _row(y, i, BT)[None, :] * e
    return r


@triton.jit
def _fold(state, u_ptr, d_ptr, first, count, step, ck, cv, V: tl.constexpr, K: tl.constexpr):
    """``state <- exp(d_m) * state + u_m`` for m = first, first+step, ... (count terms).

    ``u_ptr``: ``[NSEG, K, V]`` fp32 summaries of one batch*head; ``d_ptr``: ``[NSEG, K]``.
    """
    for i in range(0, count):
        m = first + i * step
        d = tl.load(d_ptr + m * K + ck)
        u = tl.load(u_ptr + m * K * V + ck[:, None] * V + cv[None, :])
        state = state * tl.exp(d)[:, None] + u
    return state


# ----------------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["T", "H", "L", "NSEG"])
def _summary_kernel(k, v, gf, gb, uf, ub, df, db, T, H, L, NSEG, gnorm,
                    sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                    TF32: tl.constexpr, GATED: tl.constexpr):
    """Per segment: its contribution to the forward state at its end (``uf``) and to the backward
    state at its start (``ub``), and its total log decays (``df``, ``db``)."""
    i_v = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    off_q = i_b * sqb + i_h * sqh  # the (possibly strided) inputs
    off_x = i_b * svb + i_h * svh
    off_g = i_b * sgb + i_h * sgh
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    start = i_s * L
    n_chunks = tl.cdiv(tl.minimum(T - start, L), BT)
    s_f = tl.zeros([K, BV], dtype=tl.float32)
    s_b = tl.zeros([K, BV], dtype=tl.float32)
    acc_f = tl.zeros([K], dtype=tl.float32)
    acc_b = tl.zeros([K], dtype=tl.float32)
    for n in range(0, n_chunks):
        rows = start + n * BT + ot
        b_k = _load_rows(k + off_q, rows, ck, sqt, T)
        b_v = _load_rows(v + off_x, rows, cv, svt, T)
        g_f = _load_gate(gf + off_g, rows, ck, sgt, T, gnorm, GATED)
        g_b = _load_gate(gb + off_g, rows, ck, sgt, T, gnorm, GATED)
        b = tl.cumsum(g_f, axis=0)
        last = tl.sum(g_f, axis=0)
        s_f = s_f * tl.exp(last)[:, None] + _dot(tl.trans(b_k * tl.exp(last[None, :] - b)), b_v, TF32)
        acc_f += last
        c = tl.cumsum(g_b, axis=0) - g_b + acc_b[None, :]  # decay from the segment start
        s_b += _dot(tl.trans(b_k * tl.exp(c)), b_v, TF32)
        acc_b += tl.sum(g_b, axis=0)
    off_u = (i_bh * NSEG + i_s) * K * V
    tl.store(uf + off_u + ck[:, None] * V + cv[None, :], s_f)
    tl.store(ub + off_u + ck[:, None] * V + cv[None, :], s_b)
    if i_v == 0:
        tl.store(df + (i_bh * NSEG + i_s) * K + ck, acc_f)
        tl.store(db + (i_bh * NSEG + i_s) * K + ck, acc_b)


@triton.jit(do_not_specialize=["T", "H", "scale", "L", "NSEG"])
def _fwd_kernel(q, k, v, gf, gb, o, uf, ub, df, db, T, H, scale, L, NSEG, gnorm,
                sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                TF32: tl.constexpr, GATED: tl.constexpr):
    i_v = tl.program_id(0).to(tl.int64)  # int64: offsets can pass 2**31 elements
    i_s = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    off_v = (i_b * T * H + i_h) * V  # contiguous [B, T, H, V] buffers
    off_q = i_b * sqb + i_h * sqh  # the (possibly strided) inputs
    off_x = i_b * svb + i_h * svh
    off_g = i_b * sgb + i_h * sgh
    sv = H * V
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    start = i_s * L
    n_chunks = tl.cdiv(tl.minimum(T - start, L), BT)
    half_scale = 0.5 * scale
    off_sum = i_bh * NSEG

    # right to left: the backward scan, o <- o^b; entering state = the segments to the right
    state = tl.zeros([K, BV], dtype=tl.float32)
    state = _fold(state, ub + off_sum * K * V, db + off_sum * K, NSEG - 1, NSEG - 1 - i_s, -1, ck, cv, V, K)
    for i in range(0, n_chunks):
        rows = start + (n_chunks - 1 - i) * BT + ot
        b_q = _load_rows(q + off_q, rows, ck, sqt, T)
        b_k = _load_rows(k + off_q, rows, ck, sqt, T)
        b_v = _load_rows(v + off_x, rows, cv, svt, T)
        b_g = _load_gate(gb + off_g, rows, ck, sgt, T, gnorm, GATED)
        c = tl.cumsum(b_g, axis=0) - b_g  # exclusive: decay from the chunk start to j is exp(c_j)
        tot = tl.sum(b_g, axis=0)
        hi, safe = _is_safe(-c)
        out = _dot(_scores(b_q, b_k, -c, hi, safe, BT, True, TF32), b_v, TF32)
        out += _dot(b_q * tl.exp(tot[None, :] - c), state, TF32)
        state = state * tl.exp(tot)[:, None] + _dot(tl.trans(b_k * tl.exp(c)), b_v, TF32)
        _store_rows(o + off_v, rows, cv, sv, T, out * half_scale)
    tl.debug_barrier()

    # left to right: the forward scan, o <- o^b + o^f; entering state = the segments to the left
    state = tl.zeros([K, BV], dtype=tl.float32)
    state = _fold(state, uf + off_sum * K * V, df + off_sum * K, 0, i_s, 1, ck, cv, V, K)
    for n in range(0, n_chunks):
        rows = start + n * BT + ot
        b_q = _load_rows(q + off_q, rows, ck, sqt, T)
        b_k = _load_rows(k + off_q, rows, ck, sqt, T)
        b_v = _load_rows(v + off_x, rows, cv, svt, T)
        b_g = _load_gate(gf + off_g, rows, ck, sgt, T, gnorm, GATED)
        b = tl.cumsum(b_g, axis=0)  # inclusive: decay from j to i is exp(b_i - b_j)
        last = tl.sum(b_g, axis=0)
        hi, safe = _is_safe(b)
        out = _dot(_scores(b_q, b_k, b, hi, safe, BT, False, TF32), b_v, TF32)
        out += _dot(b_q * tl.exp(b), state, TF32)
        state = state * tl.exp(last)[:, None] + _dot(tl.trans(b_k * tl.exp(last[None, :] - b)), b_v, TF32)
        prev = _load_rows(o + off_v, rows, cv, sv, T)
        _store_rows(o + off_v, rows, cv, sv, T, prev + out * half_scale)


# ----------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["T", "H", "scale", "L", "NSEG"])
def _grad_summary_kernel(q, do, gf, gb, wf, wb, T, H, scale, L, NSEG, gnorm,
                         sqb, sqt, sqh, sgb, sgt, sgh, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                         TF32: tl.constexpr, GATED: tl.constexpr):
    """Per segment: its queries' contribution to the gradient of the forward state before it
    (``wf``) and of the backward state after it (``wb``)."""
    i_v = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    off_v = (i_b * T * H + i_h) * V  # contiguous [B, T, H, V] buffers
    off_q = i_b * sqb + i_h * sqh  # the (possibly strided) inputs
    off_g = i_b * sgb + i_h * sgh
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    start = i_s * L
    n_chunks = tl.cdiv(tl.minimum(T - start, L), BT)
    half_scale = 0.5 * scale
    g_fwd = tl.zeros([K, BV], dtype=tl.float32)
    g_bwd = tl.zeros([K, BV], dtype=tl.float32)
    acc_f = tl.zeros([K], dtype=tl.float32)
    for n in range(0, n_chunks):
        rows = start + n * BT + ot
        b_q = _load_rows(q + off_q, rows, ck, sqt, T)
        b_do = _load_rows(do + off_v, rows, cv, H * V, T) * half_scale
        g_f = _load_gate(gf + off_g, rows, ck, sgt, T, gnorm, GATED)
        g_b = _load_gate(gb + off_g, rows, ck, sgt, T, gnorm, GATED)
        b = tl.cumsum(g_f, axis=0) + acc_f[None, :]
        g_fwd += _dot(tl.trans(b_q * tl.exp(b)), b_do, TF32)
        acc_f += tl.sum(g_f, axis=0)
        c = tl.cumsum(g_b, axis=0) - g_b
        tot = tl.sum(g_b, axis=0)
        g_bwd = g_bwd * tl.exp(tot)[:, None] + _dot(tl.trans(b_q * tl.exp(tot[None, :] - c)), b_do, TF32)
    off_u = (i_bh * NSEG + i_s) * K * V
    tl.store(wf + off_u + ck[:, None] * V + cv[None, :], g_fwd)
    tl.store(wb + off_u + ck[:, None] * V + cv[None, :], g_bwd)


@triton.jit(do_not_specialize=["T", "H", "scale", "L", "NSEG"])
def _bwd_kernel(q, k, v, gf, gb, do, dq, dk, dv, pq, pk, pv, dgf, dgb, tot_wf, tot_wb,
                uf, ub, df, db, wf, wb, T, H, scale, L, NSEG, gnorm,
                sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                TF32: tl.constexpr, GATED: tl.constexpr):
    """dq, dk: ``[NV, B, T, H, K]`` per value block (summed by the caller when NV > 1); dv:
    ``[B, T, H, V]``; pq, pk, pv: fp32 scratch of their shapes (the right-to-left pass's partials,
    kept in fp32 because the gate gradients are differences of their products); dgf, dgb: fp32 ``[NV, B, T, H, K]`` in-segment prefix sums of the gate-gradient
    terms (exclusive for dgf, inclusive for dgb: _gate_carry_kernel finishes them); tot_wf, tot_wb:
    fp32 ``[NV, B*H, NSEG, K]`` per-segment totals of those terms."""
    i_v = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    BH = tl.num_programs(2)
    off_k = (i_b * T * H + i_h) * K  # contiguous [B, T, H, K] buffers (outputs, partials)
    off_v = (i_b * T * H + i_h) * V  # contiguous [B, T, H, V] buffers
    off_q = i_b * sqb + i_h * sqh  # the (possibly strided) inputs
    off_x = i_b * svb + i_h * svh
    off_g = i_b * sgb + i_h * sgh
    off_part = i_v * BH * T * K + off_k  # this value block's slice of the partial buffers
    sk = H * K
    sv = H * V
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    start = i_s * L
    n_chunks = tl.cdiv(tl.minimum(T - start, L), BT)
    half_scale = 0.5 * scale
    off_sum = i_bh * NSEG

    # right to left: S^b (for dq^b) and dS^f (for dk^f, dv^f)
    s_b = tl.zeros([K, BV], dtype=tl.float32)
    s_b = _fold(s_b, ub + off_sum * K * V, db + off_sum * K, NSEG - 1, NSEG - 1 - i_s, -1, ck, cv, V, K)
    ds_f = tl.zeros([K, BV], dtype=tl.float32)
    ds_f = _fold(ds_f, wf + off_sum * K * V, df + off_sum * K, NSEG - 1, NSEG - 1 - i_s, -1, ck, cv, V, K)
    for i in range(0, n_chunks):
        rows = start + (n_chunks - 1 - i) * BT + ot
        b_q = _load_rows(q + off_q, rows, ck, sqt, T)
        b_k = _load_rows(k + off_q, rows, ck, sqt, T)
        b_v = _load_rows(v + off_x, rows, cv, svt, T)
        b_do = _load_rows(do + off_v, rows, cv, sv, T) * half_scale
        g_f = _load_gate(gf + off_g, rows, ck, sgt, T, gnorm, GATED)
        g_b = _load_gate(gb + off_g, rows, ck, sgt, T, gnorm, GATED)
        b = tl.cumsum(g_f, axis=0)
        last = tl.sum(g_f, axis=0)
        c = tl.cumsum(g_b, axis=0) - g_b
        tot = tl.sum(g_b, axis=0)
        d_scores = _dot(b_do, tl.trans(b_v), TF32)  # [BT(i), BT(j)]: do_i . v_j
        hi_f, safe_f = _is_safe(b)  # once per chunk and direction, shared by the helpers below
        hi_b, safe_b = _is_safe(-c)

        # forward scan: dk^f, dv^f (within the chunk, and through dS^f)
        tri_f = _triangle(BT, False)
        k_dec = tl.exp(last[None, :] - b)
        dk_f = _mix_cols(tl.where(tri_f, d_scores, 0.0), b_q, b, hi_f, safe_f, BT, False, TF32)
        dk_f += _dot(b_v, tl.trans(ds_f), TF32) * k_dec
        dv_f = _dot(tl.trans(_scores(b_q, b_k, b, hi_f, safe_f, BT, False, TF32)), b_do, TF32)
        dv_f += _dot(b_k * k_dec, ds_f, TF32)
        ds_f = ds_f * tl.exp(last)[:, None] + _dot(tl.trans(b_q * tl.exp(b)), b_do, TF32)

        # backward scan: dq^b (within the chunk, and through S^b)
        tri_b = _triangle(BT, True)
        dq_b = _mix_rows(tl.where(tri_b, d_scores, 0.0), b_k, -c, hi_b, safe_b, BT, True, TF32)
        dq_b += _dot(b_do, tl.trans(s_b), TF32) * tl.exp(tot[None, :] - c)
        s_b = s_b * tl.exp(tot)[:, None] + _dot(tl.trans(b_k * tl.exp(c)), b_v, TF32)

        _store_rows(pq + off_part, rows, ck, sk, T, dq_b)
        _store_rows(pk + off_part, rows, ck, sk, T, dk_f)
        _store_rows(pv + off_v, rows, cv, sv, T, dv_f)
    tl.debug_barrier()

    # left to right: S^f (for dq^f) and dS^b (for dk^b, dv^b); totals and gate gradients
    s_f = tl.zeros([K, BV], dtype=tl.float32)
    s_f = _fold(s_f, uf + off_sum * K * V, df + off_sum * K, 0, i_s, 1, ck, cv, V, K)
    ds_b = tl.zeros([K, BV], dtype=tl.float32)
    ds_b = _fold(ds_b, wb + off_sum * K * V, db + off_sum * K, 0, i_s, 1, ck, cv, V, K)
    carry_b = tl.zeros([K], dtype=tl.float32)
    carry_f = tl.zeros([K], dtype=tl.float32)
    for n in range(0, n_chunks):
        rows = start + n * BT + ot
        b_q = _load_rows(q + off_q, rows, ck, sqt, T)
        b_k = _load_rows(k + off_q, rows, ck, sqt, T)
        b_v = _load_rows(v + off_x, rows, cv, svt, T)
        b_do = _load_rows(do + off_v, rows, cv, sv, T) * half_scale
        g_f = _load_gate(gf + off_g, rows, ck, sgt, T, gnorm, GATED)
        g_b = _load_gate(gb + off_g, rows, ck, sgt, T, gnorm, GATED)
        b = tl.cumsum(g_f, axis=0)
        last = tl.sum(g_f, axis=0)
        c = tl.cumsum(g_b, axis=0) - g_b
        tot = tl.sum(g_b, axis=0)
        d_scores = _dot(b_do, tl.trans(b_v), TF32)
        hi_f, safe_f = _is_safe(b)
        hi_b, safe_b = _is_safe(-c)

        # forward scan: dq^f
        tri_f = _triangle(BT, False)
        dq_f = _mix_rows(tl.where(tri_f, d_scores, 0.0), b_k, b, hi_f, safe_f, BT, False, TF32)
        dq_f += _dot(b_do, tl.trans(s_f), TF32) * tl.exp(b)
        s_f = s_f * tl.exp(last)[:, None] + _dot(tl.trans(b_k * tl.exp(last[None, :] - b)), b_v, TF32)

        # backward scan: dk^b, dv^b
        tri_b = _triangle(BT, True)
        dk_b = _mix_cols(tl.where(tri_b, d_scores, 0.0), b_q, -c, hi_b, safe_b, BT, True, TF32)
        dk_b += _dot(b_v, tl.trans(ds_b), TF32) * tl.exp(c)
        dv_b = _dot(tl.trans(_scores(b_q, b_k, -c, hi_b, safe_b, BT, True, TF32)), b_do, TF32)
        dv_b += _dot(b_k * tl.exp(c), ds_b, TF32)
        ds_b = ds_b * tl.exp(tot)[:, None] + _dot(tl.trans(b_q * tl.exp(tot[None, :] - c)), b_do, TF32)

        dq_b = _load_rows(pq + off_part, rows, ck, sk, T)
        dk_f = _load_rows(pk + off_part, rows, ck, sk, T)
        dv_f = _load_rows(pv + off_v, rows, cv, sv, T)
        # log-decay gradients (within the segment): dgb_t = sum_{r<=t} w^b_r, dgf_t = sum_{r>=t} w^f_r
        w_b = b_q * dq_b - b_k * dk_b
        w_f = b_q * dq_f - b_k * dk_f
        cw_b = tl.cumsum(w_b, axis=0) + carry_b[None, :]
        carry_b += tl.sum(w_b, axis=0)
        cw_f = tl.cumsum(w_f, axis=0) + carry_f[None, :]
        carry_f += tl.sum(w_f, axis=0)
        _store_rows(dq + off_part, rows, ck, sk, T, dq_b + dq_f)
        _store_rows(dk + off_part, rows, ck, sk, T, dk_f + dk_b)
        _store_rows(dv + off_v, rows, cv, sv, T, dv_f + dv_b)
        _store_rows(dgb + off_part, rows, ck, sk, T, cw_b)
        _store_rows(dgf + off_part, rows, ck, sk, T, cw_f - w_f)  # prefix sum before t
    off_tot = ((i_v * BH + i_bh) * NSEG + i_s) * K
    tl.store(tot_wf + off_tot + ck, carry_f)
    tl.store(tot_wb + off_tot + ck, carry_b)


@triton.jit(do_not_specialize=["T", "H", "L", "NSEG", "gnorm"])
def _gate_carry_kernel(dgf, dgb, tot_wf, tot_wb, gf, gb, out_f, out_b, T, H, L, NSEG, gnorm,
                       sgb, sgt, sgh, K: tl.constexpr, BT: tl.constexpr, GATED: tl.constexpr):
    """The log-decay gradients from _bwd_kernel's in-segment prefix sums and the segments' totals:
    ``out_f = (this and later segments' totals) - dgf``, ``out_b = dgb + earlier segments' totals``;
    ``GATED``: then the chain rule through ``logsigmoid(z) / gnorm``, ``dz = dg * sigmoid(-z) / gnorm``.
    ``out_f, out_b``: ``[NV, B, T, H, K]`` like dgf, dgb (the same tensors, or the gates' dtype)."""
    i_v = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    BH = tl.num_programs(2)
    i_b = i_bh // H
    i_h = i_bh % H
    ck = tl.arange(0, K)
    ot = tl.arange(0, BT)
    base = (i_v * BH + i_bh) * NSEG * K
    later = tl.zeros([K], dtype=tl.float32)
    for m in range(i_s, NSEG):
        later += tl.load(tot_wf + base + m * K + ck)
    earlier = tl.zeros([K], dtype=tl.float32)
    for m in range(0, i_s):
        earlier += tl.load(tot_wb + base + m * K + ck)
    off = i_v * BH * T * K + (i_b * T * H + i_h) * K
    off_g = i_b * sgb + i_h * sgh
    start = i_s * L
    for n in range(0, tl.cdiv(tl.minimum(T - start, L), BT)):
        rows = start + n * BT + ot
        d_f = later[None, :] - _load_rows(dgf + off, rows, ck, H * K, T)
        d_b = _load_rows(dgb + off, rows, ck, H * K, T) + earlier[None, :]
        if GATED:
            d_f *= 1.0 / (1.0 + tl.exp(_load_rows(gf + off_g, rows, ck, sgt, T))) / gnorm
            d_b *= 1.0 / (1.0 + tl.exp(_load_rows(gb + off_g, rows, ck, sgt, T))) / gnorm
        _store_rows(out_f + off, rows, ck, H * K, T, d_f)
        _store_rows(out_b + off, rows, ck, H * K, T, d_b)


# ----------------------------------------------------------------------------------- launchers
def _check_dims(K: int, V: int):
    if not supports(K, V):
        raise ValueError(f"bigla triton backend supports d_k in (16, 32, 64, 128) and d_v in "
                         f"(16, 32, 64, 128, 256); got d_k={K}, d_v={V} (use backend='chunked')")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _plan(q: torch.Tensor, V: int, segments: int | None = None, backward: bool = False):
    """Value block, number of segments and segment length (tokens) for a call.

    Default segments (timed on an H200 by benchmarks/tune_bigla.py, tune_bigla.json at 6a185bf):
    none while the batch*head programs alone give >= 2 per multiprocessor (a summary pass costs
    more than it saves); else enough for ~8 programs per multiprocessor, with >= 4 chunks per
    segment, and bounded because every program folds the other segments' summaries one after
    the other: the forward at ``max(8, sqrt(chunks / 2))`` segments, the backward (more work per
    chunk) at ``min(sqrt(2 * chunks), 24)``. Measured at ViG-T shapes: T = 4096 forward 11
    segments 0.23 ms vs 22 0.26 ms, backward 22 segments 0.79 ms vs 11 0.90 ms; T = 16384
    backward 22 segments 1.00 ms vs 45 1.31 ms.
    """
    B, T, H, K = q.shape
    BV = min(V, 64)
    NV = triton.cdiv(V, BV)
    n_chunks = triton.cdiv(T, BT)
    if segments is None:
        sms = _sm_count(q.device.index) if q.is_cuda else 1
        programs = B * H * NV
        segments = 1
        if programs < 2 * sms:
            bound = min(math.isqrt(2 * n_chunks), 24) if backward else max(8, math.isqrt(n_chunks // 2))
            segments = min(triton.cdiv(8 * sms, programs), bound, n_chunks // 4)
    nseg = max(1, min(segments, n_chunks))
    seg_chunks = triton.cdiv(n_chunks, nseg)
    nseg = triton.cdiv(n_chunks, seg_chunks)
    return BV, NV, nseg, seg_chunks * BT


def _common(q, gate_normalizer: float | None):
    # fp32 inputs keep exact fp32 products; bf16/fp16 inputs multiply in tf32 (10-bit mantissa,
    # finer than the inputs themselves)
    if gate_normalizer is not None and not gate_normalizer > 0:
        raise ValueError(f"bigla: gate_normalizer must be > 0, got {gate_normalizer}")
    # warps timed at d_k = 32 on an H200 (tune_bigla.json): 4 for both passes at every length;
    # d_k > 32 keeps 8 (register pressure; ptxas -v for sm_90)
    warps = 8 if q.shape[-1] > 32 else 4
    return dict(TF32=q.dtype != torch.float32, GATED=gate_normalizer is not None,
                gnorm=float(gate_normalizer or 1.0), num_warps=warps)


def _strided(q, k, v, log_gf, log_gb):
    """The inputs as the kernels read them: unit last stride; q and k, log_gf and log_gb sharing
    strides (true of column slices of one projection); copies only where that fails."""
    def unit(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v, log_gf, log_gb = (unit(t) for t in (q, k, v, log_gf, log_gb))
    if q.stride() != k.stride():
        q, k = q.contiguous(), k.contiguous()
    if log_gf.stride() != log_gb.stride():
        log_gf, log_gb = log_gf.contiguous(), log_gb.contiguous()
    return q, k, v, log_gf, log_gb


def _summaries(k, v, log_gf, log_gb, BV, NV, nseg, L, opts):
    B, T, H, K = k.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=k.device)
    uf, ub = (torch.empty(B * H, nseg, K, V, **f32) for _ in range(2))
    df, db = (torch.empty(B * H, nseg, K, **f32) for _ in range(2))
    if nseg > 1:
        _summary_kernel[(NV, nseg, B * H)](k, v, log_gf, log_gb, uf, ub, df, db, T, H, L, nseg,
                                          opts["gnorm"], *k.stride()[:3], *v.stride()[:3],
                                          *log_gf.stride()[:3], K=K, V=V, BT=BT, BV=BV,
                                          **_launch(opts))
    return uf, ub, df, db


def _launch(opts):
    return {k: v for k, v in opts.items() if k != "gnorm"}


def bigla_fwd_triton(q, k, v, log_gf, log_gb, scale: float, segments: int | None = None,
                     gate_normalizer: float | None = None) -> torch.Tensor:
    """``[B, T, H, V]`` contiguous output in ``q.dtype``; inputs ``[B, T, H, K|V]``, read in place
    when their last stride is 1 (column slices of a fused projection included).

    ``segments``: how many pieces the sequence is cut into (default: enough to fill the GPU).
    ``gate_normalizer``: the gate inputs are logits ``z`` (any float dtype) and the log decays are
    ``logsigmoid(z) / gate_normalizer``, formed in fp32 inside the kernels.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_dims(K, V)
    q, k, v, log_gf, log_gb = _strided(q, k, v, log_gf, log_gb)
    BV, NV, nseg, L = _plan(q, V, segments)
    opts = _common(q, gate_normalizer)
    uf, ub, df, db = _summaries(k, v, log_gf, log_gb, BV, NV, nseg, L, opts)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    _fwd_kernel[(NV, nseg, B * H)](q, k, v, log_gf, log_gb, o, uf, ub, df, db, T, H, scale, L, nseg,
                                   opts["gnorm"], *q.stride()[:3], *v.stride()[:3],
                                   *log_gf.stride()[:3], K=K, V=V, BT=BT, BV=BV, **_launch(opts))
    return o


def _output(partial: torch.Tensor, dtype: torch.dtype, summed: bool) -> torch.Tensor:
    """Where a kernel writes a gradient: its fp32 partial buffer itself when the gradient is fp32 or
    still to be summed over value blocks, else a buffer in ``dtype`` (so no cast kernel follows)."""
    return partial if summed or dtype == torch.float32 else torch.empty_like(partial, dtype=dtype)


def bigla_bwd_triton(q, k, v, log_gf, log_gb, do, scale: float, segments: int | None = None,
                     gate_normalizer: float | None = None):
    """``(dq, dk, dv, dlog_gf, dlog_gb)`` in the dtypes of the corresponding inputs (with
    ``gate_normalizer``: the gradients of the gate logits)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_dims(K, V)
    q, k, v, log_gf, log_gb = _strided(q, k, v, log_gf, log_gb)
    do = do.contiguous()
    BV, NV, nseg, L = _plan(q, V, segments, backward=True)
    opts = _common(q, gate_normalizer)
    uf, ub, df, db = _summaries(k, v, log_gf, log_gb, BV, NV, nseg, L, opts)
    f32 = dict(dtype=torch.float32, device=q.device)
    wf, wb = (torch.empty(B * H, nseg, K, V, **f32) for _ in range(2))
    grid = (NV, nseg, B * H)
    gnorm, launch = opts["gnorm"], _launch(opts)
    if nseg > 1:
        _grad_summary_kernel[grid](q, do, log_gf, log_gb, wf, wb, T, H, scale, L, nseg, gnorm,
                                   *q.stride()[:3], *log_gf.stride()[:3],
                                   K=K, V=V, BT=BT, BV=BV, **launch)
    pq, pk, dgf, dgb = (torch.empty(NV, B, T, H, K, **f32) for _ in range(4))
    pv = torch.empty(B, T, H, V, **f32)
    summed = NV > 1  # dq, dk and the gate gradients: one slice per value block, added up below
    dq, dk, dv = _output(pq, q.dtype, summed), _output(pk, k.dtype, summed), _output(pv, v.dtype, False)
    tot_wf, tot_wb = (torch.empty(NV, B * H, nseg, K, **f32) for _ in range(2))
    _bwd_kernel[grid](q, k, v, log_gf, log_gb, do, dq, dk, dv, pq, pk, pv, dgf, dgb, tot_wf, tot_wb,
                      uf, ub, df, db, wf, wb, T, H, scale, L, nseg, gnorm,
                      *q.stride()[:3], *v.stride()[:3], *log_gf.stride()[:3],
                      K=K, V=V, BT=BT, BV=BV, **launch)
    out_f, out_b = _output(dgf, log_gf.dtype, summed), _output(dgb, log_gb.dtype, summed)
    _gate_carry_kernel[grid](dgf, dgb, tot_wf, tot_wb, log_gf, log_gb, out_f, out_b, T, H, L, nseg, gnorm,
                             *log_gf.stride()[:3], K=K, BT=BT, GATED=launch["GATED"], num_warps=2)
    sums = [x[0] if NV == 1 else x.sum(0) for x in (dq, dk, out_f, out_b)]
    return (sums[0].to(q.dtype), sums[1].to(k.dtype), dv.to(v.dtype), sums[2].to(log_gf.dtype),
            sums[3].to(log_gb.dtype))
