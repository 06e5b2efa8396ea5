"""Fused bidirectional GLA in Triton: both scans in one launch, forward and backward.

Inputs are read in place in the ``[B, T, H, D]`` layout, strided views included (q, k, v can be
column slices of one fused projection): no transposes, no flipped copies, no 2B batch, no 2x
output. A program owns one (value block, sequence segment, batch*head) and sweeps its segment in
chunks of ``CHUNK`` tokens, keeping ``[K, BV]`` fp32 states in registers:

* forward: a right-to-left sweep runs the backward scan and stores ``o^b``; a left-to-right
  sweep adds the forward scan's ``o^f``.
* backward: a right-to-left sweep carries the backward scan's state (for ``dq^b``) and the
  forward scan's state gradient (for ``dk^f, dv^f``); a left-to-right sweep carries the forward
  state (``dq^f``) and the backward state gradient (``dk^b, dv^b``), sums the parts and forms
  ``dlog_gb`` (prefix sums of ``q*dq^b - k*dk^b``); a last sweep turns ``q*dq^f - k*dk^f`` into
  its suffix sums, ``dlog_gf``.

Both directions share one chunk step: with ``p`` the in-chunk inclusive cumulative log decay in
the scan's order and ``D`` the chunk's total, the intra-chunk decay between query i and key j is
``exp(p_i - p_j)`` on the scan's triangle, the carried state enters as ``(q * exp(p)) S`` and the
chunk's keys leave as ``k * exp(D - p)``; every exponent there is <= 0.

Intra-chunk scores go through tensor cores, factored around the chunk's per-channel maximum of
``p`` (one factor <= 1, the other <= exp(spread)). A chunk whose spread exceeds ``SAFE_SPREAD``
(log decays below about -0.6 per token somewhere in it) is computed in sub-chunks of 16 tokens,
elementwise, with exponents <= 0 only. So every finite log decay gives the exact result.

Long sequences are cut into segments so that the grid fills the GPU: a summary kernel computes
each segment's state contribution and total decay (and, for the backward, its state-gradient
contribution), a scan kernel turns them into each segment's entering states, and (backward) a
carry kernel adds the other segments' gate-gradient totals.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Launch settings (module-level so that benchmarks/bench_bigla.py can compare them in one run).
CHUNK = 64  # tokens per chunk on the fast path (32 or 64; 32 for d_k = 128)
SUB = 16  # tokens per sub-chunk on the exact path
# tensor-core products for half-precision inputs: "tf32" (fp32 operands rounded to tf32) or
# "bf16" (operands rounded to bf16); fp32 inputs always take exact fp32 products ("ieee")
DOT_MODE = "tf32"
WARPS = {("fwd", 32): 4, ("fwd", 64): 8, ("bwd", 32): 4, ("bwd", 64): 8}  # per (pass, chunk)
SAFE_SPREAD = tl.constexpr(40.0)  # largest in-chunk decay spread the factored products take
_MODES = {"ieee": 0, "tf32": 1, "bf16": 2}


# ----------------------------------------------------------------------------------- helpers
@triton.jit
def _dot(a, b, MODE: tl.constexpr):
    """fp32-accumulated product; MODE 0: fp32 products, 1: tf32, 2: bf16 operands."""
    if MODE == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif MODE == 1:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load(ptr, rows, cols, stride, T):
    """``[len(rows), len(cols)]`` fp32 tile (zero past ``T``)."""
    mask = rows[:, None] < T
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, rows, cols, stride, T, x):
    tl.store(ptr + rows[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=rows[:, None] < T)


@triton.jit
def _tri(N: tl.constexpr, REVERSE: tl.constexpr):
    """``[N, N]`` keys a query sees within a chunk: ``j <= i`` (forward), ``j >= i`` (backward)."""
    o = tl.arange(0, N)
    if REVERSE:
        keep = o[:, None] <= o[None, :]
    else:
        keep = o[:, None] >= o[None, :]
    return keep


@triton.jit
def _positions(g, REVERSE: tl.constexpr):
    """``p``: in-chunk inclusive cumulative log decay in scan order ``[N, K]``; ``e``: the
    exclusive one in the opposite order (``e = D - p``, summed directly so that it stays accurate
    where it is small); ``D``: the chunk's total ``[K]``."""
    if REVERSE:
        p = tl.cumsum(g, axis=0, reverse=True)
        e = tl.cumsum(g, axis=0) - g
    else:
        p = tl.cumsum(g, axis=0)
        e = tl.cumsum(g, axis=0, reverse=True) - g
    return p, e, tl.sum(g, axis=0)


@triton.jit
def _spread(p):
    """Largest per-channel range of ``p`` over the chunk (a scalar)."""
    return tl.max(tl.max(p, axis=0) - tl.min(p, axis=0), axis=0)


@triton.jit
def _intra_terms(g, p, N: tl.constexpr, REVERSE: tl.constexpr, EXACT: tl.constexpr):
    """The decays ``exp(p_i - p_j)`` of query i and key j on the triangle (``g``: the chunk's
    log decays, ``p``: their cumulative sums from :func:`_positions`).

    Factored (``EXACT`` off): ``(fq, fk)`` with ``fq_i * fk_j = exp(p_i - p_j)``, ``fq <= 1``.
    ``EXACT``: the ``[N, N, K]`` tensor itself (zero off the triangle), twice.
    """
    if EXACT:
        fq = tl.exp(tl.where(_tri(N, REVERSE)[:, :, None], p[:, None, :] - p[None, :, :], float("-inf")))
        fk = fq
    else:
        hi = tl.max(p, axis=0)
        fq = tl.exp(p - hi[None, :])
        fk = tl.exp(hi[None, :] - p)
    return fq, fk


@triton.jit
def _scores(a, b, fq, fk, N: tl.constexpr, REVERSE: tl.constexpr, MODE: tl.constexpr,
            EXACT: tl.constexpr):
    """``[N, N]``: ``sum_c a_ic b_jc exp(p_ic - p_jc)`` on the triangle."""
    if EXACT:
        s = tl.sum(a[:, None, :] * b[None, :, :] * fq, axis=2)
    else:
        s = tl.where(_tri(N, REVERSE), _dot(a * fq, tl.trans(b * fk), MODE), 0.0)
    return s


@triton.jit
def _mix_rows(w, y, fq, fk, MODE: tl.constexpr, EXACT: tl.constexpr):
    """``[N, K]``: ``r_i = sum_j w_ij y_j exp(p_i - p_j)`` (``w`` zero off the triangle)."""
    if EXACT:
        r = tl.sum(w[:, :, None] * y[None, :, :] * fq, axis=1)
    else:
        r = _dot(w, y * fk, MODE) * fq
    return r


@triton.jit
def _mix_cols(w, y, fq, fk, MODE: tl.constexpr, EXACT: tl.constexpr):
    """``[N, K]``: ``r_j = sum_i w_ij y_i exp(p_i - p_j)`` (``w`` zero off the triangle)."""
    if EXACT:
        r = tl.sum(w[:, :, None] * y[:, None, :] * fq, axis=0)
    else:
        r = _dot(tl.trans(w), y * fq, MODE) * fk
    return r


@triton.jit
def _sub_index(s, NS: tl.constexpr, REVERSE: tl.constexpr):
    """The ``s``-th sub-chunk of a chunk in scan order."""
    if REVERSE:
        i = NS - 1 - s
    else:
        i = s
    return i


# ----------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tile(q, k, v, o, rows, T, sqt, svt, sot, ck, cv, g, p, e, D, state, hs,
              N: tl.constexpr, REVERSE: tl.constexpr, ACCUM: tl.constexpr, MODE: tl.constexpr,
              EXACT: tl.constexpr):
    """One direction's output for ``N`` rows (stored, or added to what ``o`` holds); returns the
    state passed on in scan order. ``g, p, e, D``: the rows' log decays and :func:`_positions`."""
    b_q = _load(q, rows, ck, sqt, T)
    b_k = _load(k, rows, ck, sqt, T)
    b_v = _load(v, rows, cv, svt, T)
    fq, fk = _intra_terms(g, p, N, REVERSE, EXACT)
    a = _scores(b_q, b_k, fq, fk, N, REVERSE, MODE, EXACT)
    out = (_dot(a, b_v, MODE) + _dot(b_q * tl.exp(p), state, MODE)) * hs
    if ACCUM:
        out += _load(o, rows, cv, sot, T)
    _store(o, rows, cv, sot, T, out)
    return state * tl.exp(D)[:, None] + _dot(tl.trans(b_k * tl.exp(e)), b_v, MODE)


@triton.jit
def _fwd_chunk(q, k, v, g, o, t0, T, sqt, svt, sgt, sot, ck, cv, state, hs,
               BT: tl.constexpr, BS: tl.constexpr, REVERSE: tl.constexpr, ACCUM: tl.constexpr,
               MODE: tl.constexpr):
    rows = t0 + tl.arange(0, BT)
    b_g = _load(g, rows, ck, sgt, T)
    p, e, D = _positions(b_g, REVERSE)
    if _spread(p) < SAFE_SPREAD:
        state = _fwd_tile(q, k, v, o, rows, T, sqt, svt, sot, ck, cv, b_g, p, e, D, state, hs,
                          BT, REVERSE, ACCUM, MODE, False)
    else:  # steep decays: sub-chunks in scan order, elementwise
        for s in tl.static_range(BT // BS):
            rows_s = t0 + _sub_index(s, BT // BS, REVERSE) * BS + tl.arange(0, BS)
            g_s = _load(g, rows_s, ck, sgt, T)
            p_s, e_s, D_s = _positions(g_s, REVERSE)
            state = _fwd_tile(q, k, v, o, rows_s, T, sqt, svt, sot, ck, cv, g_s, p_s, e_s, D_s,
                              state, hs, BS, REVERSE, ACCUM, MODE, True)
    return state


@triton.jit
def _load_state(ptr, i_bh, i_s, NSEG, ck, cv, V, K: tl.constexpr):
    """``[K, BV]`` slice of a ``[B*H, NSEG, K, V]`` fp32 state buffer."""
    return tl.load(ptr + ((i_bh * NSEG + i_s) * K + ck[:, None]) * V + cv[None, :])


@triton.jit(do_not_specialize=["T", "H", "scale", "L", "NSEG"])
def _fwd_kernel(q, k, v, gf, gb, o, s_f, s_b, T, H, scale, L, NSEG,
                sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh,
                V, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                BV: tl.constexpr, MODE: tl.constexpr, SEGMENTED: tl.constexpr):
    """``s_f`` / ``s_b``: each segment's entering forward / backward state (when SEGMENTED)."""
    i_v = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)  # int64 base offsets; in-sequence offsets stay int32
    i_b = i_bh // H
    i_h = i_bh % H
    q += i_b * sqb + i_h * sqh
    k += i_b * sqb + i_h * sqh
    v += i_b * svb + i_h * svh
    gf += i_b * sgb + i_h * sgh
    gb += i_b * sgb + i_h * sgh
    o += (i_b * T * H + i_h) * V
    sot = H * V
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    start = i_s * L
    n_chunks = tl.cdiv(tl.minimum(T - start, L), BT)
    hs = 0.5 * scale

    # right to left: the backward scan, o <- o^b
    state = tl.zeros([K, BV], dtype=tl.float32)
    if SEGMENTED:
        state = _load_state(s_b, i_bh, i_s, NSEG, ck, cv, V, K)
    for i in range(0, n_chunks):
        state = _fwd_chunk(q, k, v, gb, o, start + (n_chunks - 1 - i) * BT, T, sqt, svt, sgt, sot,
                           ck, cv, state, hs, BT, BS, True, False, MODE)
    tl.debug_barrier()
    # left to right: the forward scan, o <- o^b + o^f
    state = tl.zeros([K, BV], dtype=tl.float32)
    if SEGMENTED:
        state = _load_state(s_f, i_bh, i_s, NSEG, ck, cv, V, K)
    for i in range(0, n_chunks):
        state = _fwd_chunk(q, k, v, gf, o, start + i * BT, T, sqt, svt, sgt, sot,
                           ck, cv, state, hs, BT, BS, False, True, MODE)


# ----------------------------------------------------------------------------------- segments
@triton.jit(do_not_specialize=["T", "H", "scale", "L", "NSEG"])
def _summary_kernel(q, k, v, gf, gb, do, u_f, u_b, w_f, w_b, d_f, d_b, T, H, scale, L, NSEG,
                    sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh,
                    V, K: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                    MODE: tl.constexpr, GRAD: tl.constexpr):
    """Per segment: its contribution to the forward state at its end (``u_f``) and to the
    backward state at its start (``u_b``), its total log decays (``d_f``, ``d_b``) and, with
    ``GRAD``, its queries' contribution to the gradient of the forward state at its start
    (``w_f``) and of the backward state at its end (``w_b``). ``do``: contiguous ``[B, T, H, V]``."""
    i_v = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    q += i_b * sqb + i_h * sqh
    k += i_b * sqb + i_h * sqh
    v += i_b * svb + i_h * svh
    gf += i_b * sgb + i_h * sgh
    gb += i_b * sgb + i_h * sgh
    do += (i_b * T * H + i_h) * V
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    start = i_s * L
    hs = 0.5 * scale
    uf = tl.zeros([K, BV], dtype=tl.float32)
    ub = tl.zeros([K, BV], dtype=tl.float32)
    wf = tl.zeros([K, BV], dtype=tl.float32)
    wb = tl.zeros([K, BV], dtype=tl.float32)
    acc_f = tl.zeros([K], dtype=tl.float32)
    acc_b = tl.zeros([K], dtype=tl.float32)
    for n in range(0, tl.cdiv(tl.minimum(T - start, L), BT)):
        rows = start + n * BT + ot
        b_k = _load(k, rows, ck, sqt, T)
        b_v = _load(v, rows, cv, svt, T)
        p_f, e_f, D_f = _positions(_load(gf, rows, ck, sgt, T), False)
        p_b, e_b, D_b = _positions(_load(gb, rows, ck, sgt, T), True)
        uf = uf * tl.exp(D_f)[:, None] + _dot(tl.trans(b_k * tl.exp(e_f)), b_v, MODE)
        ub += _dot(tl.trans(b_k * tl.exp(acc_b[None, :] + e_b)), b_v, MODE)
        if GRAD:
            b_q = _load(q, rows, ck, sqt, T)
            b_do = _load(do, rows, cv, H * V, T) * hs
            wf += _dot(tl.trans(b_q * tl.exp(acc_f[None, :] + p_f)), b_do, MODE)
            wb = wb * tl.exp(D_b)[:, None] + _dot(tl.trans(b_q * tl.exp(p_b)), b_do, MODE)
        acc_f += D_f
        acc_b += D_b
    off = ((i_bh * NSEG + i_s) * K + ck[:, None]) * V + cv[None, :]
    tl.store(u_f + off, uf)
    tl.store(u_b + off, ub)
    if GRAD:
        tl.store(w_f + off, wf)
        tl.store(w_b + off, wb)
    if i_v == 0:
        tl.store(d_f + (i_bh * NSEG + i_s) * K + ck, acc_f)
        tl.store(d_b + (i_bh * NSEG + i_s) * K + ck, acc_b)


@triton.jit(do_not_specialize=["NSEG"])
def _scan_kernel(u_f, u_b, w_f, w_b, d_f, d_b, NSEG, V, K: tl.constexpr,
                 BV: tl.constexpr, GRAD: tl.constexpr):
    """In place, segment summaries -> each segment's entering states: ``u_f`` the forward state
    (from the left), ``u_b`` the backward state (from the right); with ``GRAD``, ``w_f`` the
    forward state gradient (from the right) and ``w_b`` the backward one (from the left)."""
    i_v = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    acc = tl.zeros([K, BV], dtype=tl.float32)
    acc_w = tl.zeros([K, BV], dtype=tl.float32)
    for m in range(0, NSEG):  # left to right
        row = i_bh * NSEG + m
        off = (row * K + ck[:, None]) * V + cv[None, :]
        u = tl.load(u_f + off)
        tl.store(u_f + off, acc)
        acc = acc * tl.exp(tl.load(d_f + row * K + ck))[:, None] + u
        if GRAD:
            w = tl.load(w_b + off)
            tl.store(w_b + off, acc_w)
            acc_w = acc_w * tl.exp(tl.load(d_b + row * K + ck))[:, None] + w
    acc = tl.zeros([K, BV], dtype=tl.float32)
    acc_w = tl.zeros([K, BV], dtype=tl.float32)
    for i in range(0, NSEG):  # right to left
        row = i_bh * NSEG + NSEG - 1 - i
        off = (row * K + ck[:, None]) * V + cv[None, :]
        u = tl.load(u_b + off)
        tl.store(u_b + off, acc)
        acc = acc * tl.exp(tl.load(d_b + row * K + ck))[:, None] + u
        if GRAD:
            w = tl.load(w_f + off)
            tl.store(w_f + off, acc_w)
            acc_w = acc_w * tl.exp(tl.load(d_f + row * K + ck))[:, None] + w


# ----------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_tile_rl(q, k, v, do, dq, dk, dv, rows, T, sqt, svt, sdt, skt, ck, cv,
                 g_f, p_f, e_f, D_f, g_b, p_b, e_b, D_b, s_b, ds_f, hs, N: tl.constexpr,
                 MODE: tl.constexpr, EXACT: tl.constexpr):
    """Right-to-left step: ``dq^b`` (through the backward state ``s_b``) and ``dk^f, dv^f``
    (through the forward state gradient ``ds_f``), stored as the first parts of dq, dk, dv."""
    b_q = _load(q, rows, ck, sqt, T)
    b_k = _load(k, rows, ck, sqt, T)
    b_v = _load(v, rows, cv, svt, T)
    b_do = _load(do, rows, cv, sdt, T) * hs
    d_a = _dot(b_do, tl.trans(b_v), MODE)  # [N(i), N(j)]: do_i . v_j

    fq, fk = _intra_terms(g_b, p_b, N, True, EXACT)
    dq_b = _mix_rows(tl.where(_tri(N, True), d_a, 0.0), b_k, fq, fk, MODE, EXACT)
    dq_b += _dot(b_do, tl.trans(s_b), MODE) * tl.exp(p_b)
    s_b = s_b * tl.exp(D_b)[:, None] + _dot(tl.trans(b_k * tl.exp(e_b)), b_v, MODE)

    fq, fk = _intra_terms(g_f, p_f, N, False, EXACT)
    k_dec = tl.exp(e_f)
    dk_f = _mix_cols(tl.where(_tri(N, False), d_a, 0.0), b_q, fq, fk, MODE, EXACT)
    dk_f += _dot(b_v, tl.trans(ds_f), MODE) * k_dec
    a_f = _scores(b_q, b_k, fq, fk, N, False, MODE, EXACT)
    dv_f = _dot(tl.trans(a_f), b_do, MODE) + _dot(b_k * k_dec, ds_f, MODE)
    ds_f = ds_f * tl.exp(D_f)[:, None] + _dot(tl.trans(b_q * tl.exp(p_f)), b_do, MODE)

    _store(dq, rows, ck, skt, T, dq_b)
    _store(dk, rows, ck, skt, T, dk_f)
    _store(dv, rows, cv, sdt, T, dv_f)
    return s_b, ds_f


@triton.jit
def _bwd_tile_lr(q, k, v, do, dq, dk, dv, dgf, dgb, rows, T, sqt, svt, sdt, skt, ck, cv,
                 g_f, p_f, e_f, D_f, g_b, p_b, e_b, D_b, s_f, ds_b, carry_b, hs,
                 N: tl.constexpr, MODE: tl.constexpr, EXACT: tl.constexpr):
    """Left-to-right step: ``dq^f`` (through ``s_f``) and ``dk^b, dv^b`` (through ``ds_b``),
    added to the stored parts; ``dgb`` (running prefix sum from ``carry_b``) and the terms
    ``q*dq^f - k*dk^f`` of ``dgf`` (into ``dgf``, summed by the last sweep)."""
    b_q = _load(q, rows, ck, sqt, T)
    b_k = _load(k, rows, ck, sqt, T)
    b_v = _load(v, rows, cv, svt, T)
    b_do = _load(do, rows, cv, sdt, T) * hs
    d_a = _dot(b_do, tl.trans(b_v), MODE)

    fq, fk = _intra_terms(g_f, p_f, N, False, EXACT)
    dq_f = _mix_rows(tl.where(_tri(N, False), d_a, 0.0), b_k, fq, fk, MODE, EXACT)
    dq_f += _dot(b_do, tl.trans(s_f), MODE) * tl.exp(p_f)
    s_f = s_f * tl.exp(D_f)[:, None] + _dot(tl.trans(b_k * tl.exp(e_f)), b_v, MODE)

    fq, fk = _intra_terms(g_b, p_b, N, True, EXACT)
    k_dec = tl.exp(e_b)
    dk_b = _mix_cols(tl.where(_tri(N, True), d_a, 0.0), b_q, fq, fk, MODE, EXACT)
    dk_b += _dot(b_v, tl.trans(ds_b), MODE) * k_dec
    a_b = _scores(b_q, b_k, fq, fk, N, True, MODE, EXACT)
    dv_b = _dot(tl.trans(a_b), b_do, MODE) + _dot(b_k * k_dec, ds_b, MODE)
    ds_b = ds_b * tl.exp(D_b)[:, None] + _dot(tl.trans(b_q * tl.exp(p_b)), b_do, MODE)

    dq_b = _load(dq, rows, ck, skt, T)
    dk_f = _load(dk, rows, ck, skt, T)
    w_b = b_q * dq_b - b_k * dk_b
    _store(dq, rows, ck, skt, T, dq_b + dq_f)
    _store(dk, rows, ck, skt, T, dk_f + dk_b)
    _store(dv, rows, cv, sdt, T, _load(dv, rows, cv, sdt, T) + dv_b)
    _store(dgb, rows, ck, skt, T, tl.cumsum(w_b, axis=0) + carry_b[None, :])
    _store(dgf, rows, ck, skt, T, b_q * dq_f - b_k * dk_f)
    return s_f, ds_b, carry_b + tl.sum(w_b, axis=0)


@triton.jit
def _bwd_chunk_rl(q, k, v, gf, gb, do, dq, dk, dv, t0, T, sqt, svt, sgt, sdt, skt, ck, cv,
                  s_b, ds_f, hs, BT: tl.constexpr, BS: tl.constexpr, MODE: tl.constexpr):
    rows = t0 + tl.arange(0, BT)
    g_f = _load(gf, rows, ck, sgt, T)
    g_b = _load(gb, rows, ck, sgt, T)
    p_f, e_f, D_f = _positions(g_f, False)
    p_b, e_b, D_b = _positions(g_b, True)
    if tl.maximum(_spread(p_f), _spread(p_b)) < SAFE_SPREAD:
        s_b, ds_f = _bwd_tile_rl(q, k, v, do, dq, dk, dv, rows, T, sqt, svt, sdt, skt, ck, cv,
                                 g_f, p_f, e_f, D_f, g_b, p_b, e_b, D_b, s_b, ds_f, hs, BT, MODE,
                                 False)
    else:
        for s in tl.static_range(BT // BS):  # steep decays: sub-chunks, elementwise
            rows_s = t0 + (BT // BS - 1 - s) * BS + tl.arange(0, BS)
            gf_s = _load(gf, rows_s, ck, sgt, T)
            gb_s = _load(gb, rows_s, ck, sgt, T)
            pf_s, ef_s, Df_s = _positions(gf_s, False)
            pb_s, eb_s, Db_s = _positions(gb_s, True)
            s_b, ds_f = _bwd_tile_rl(q, k, v, do, dq, dk, dv, rows_s, T, sqt, svt, sdt, skt, ck, cv,
                                     gf_s, pf_s, ef_s, Df_s, gb_s, pb_s, eb_s, Db_s, s_b, ds_f, hs,
                                     BS, MODE, True)
    return s_b, ds_f


@triton.jit
def _bwd_chunk_lr(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, t0, T, sqt, svt, sgt, sdt, skt,
                  ck, cv, s_f, ds_b, carry_b, hs, BT: tl.constexpr, BS: tl.constexpr,
                  MODE: tl.constexpr):
    rows = t0 + tl.arange(0, BT)
    g_f = _load(gf, rows, ck, sgt, T)
    g_b = _load(gb, rows, ck, sgt, T)
    p_f, e_f, D_f = _positions(g_f, False)
    p_b, e_b, D_b = _positions(g_b, True)
    if tl.maximum(_spread(p_f), _spread(p_b)) < SAFE_SPREAD:
        s_f, ds_b, carry_b = _bwd_tile_lr(q, k, v, do, dq, dk, dv, dgf, dgb, rows, T, sqt, svt,
                                          sdt, skt, ck, cv, g_f, p_f, e_f, D_f, g_b, p_b, e_b,
                                          D_b, s_f, ds_b, carry_b, hs, BT, MODE, False)
    else:
        for s in tl.static_range(BT // BS):  # steep decays: sub-chunks, elementwise
            rows_s = t0 + s * BS + tl.arange(0, BS)
            gf_s = _load(gf, rows_s, ck, sgt, T)
            gb_s = _load(gb, rows_s, ck, sgt, T)
            pf_s, ef_s, Df_s = _positions(gf_s, False)
            pb_s, eb_s, Db_s = _positions(gb_s, True)
            s_f, ds_b, carry_b = _bwd_tile_lr(q, k, v, do, dq, dk, dv, dgf, dgb, rows_s, T, sqt,
                                              svt, sdt, skt, ck, cv, gf_s, pf_s, ef_s, Df_s, gb_s,
                                              pb_s, eb_s, Db_s, s_f, ds_b, carry_b, hs, BS, MODE,
                                              True)
    return s_f, ds_b, carry_b


@triton.jit(do_not_specialize=["T", "H", "scale", "L", "NSEG", "PART"])
def _bwd_kernel(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, tot_f, tot_b, s_f, s_b, ds_f, ds_b,
                T, H, scale, L, NSEG, PART, sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh,
                V, K: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                BV: tl.constexpr, MODE: tl.constexpr, SEGMENTED: tl.constexpr):
    """``do``, ``dv``: contiguous ``[B, T, H, V]``; ``dq, dk, dgf, dgb``: contiguous
    ``[B, T, H, K]`` per value block, ``PART`` elements apart (the caller sums the blocks);
    ``tot_f, tot_b``: ``[NV, B*H, NSEG, K]`` fp32 per-segment gate-gradient totals;
    ``s_f, s_b, ds_f, ds_b``: entering states and state gradients (when SEGMENTED)."""
    i_v = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    q += i_b * sqb + i_h * sqh
    k += i_b * sqb + i_h * sqh
    v += i_b * svb + i_h * svh
    gf += i_b * sgb + i_h * sgh
    gb += i_b * sgb + i_h * sgh
    do += (i_b * T * H + i_h) * V
    dv += (i_b * T * H + i_h) * V
    off_k = i_v.to(tl.int64) * PART + (i_b * T * H + i_h) * K
    dq += off_k
    dk += off_k
    dgf += off_k
    dgb += off_k
    sdt = H * V
    skt = H * K
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    start = i_s * L
    n_chunks = tl.cdiv(tl.minimum(T - start, L), BT)
    hs = 0.5 * scale

    # right to left: backward state (dq^b), forward state gradient (dk^f, dv^f)
    st = tl.zeros([K, BV], dtype=tl.float32)
    ds = tl.zeros([K, BV], dtype=tl.float32)
    if SEGMENTED:
        st = _load_state(s_b, i_bh, i_s, NSEG, ck, cv, V, K)
        ds = _load_state(ds_f, i_bh, i_s, NSEG, ck, cv, V, K)
    for i in range(0, n_chunks):
        st, ds = _bwd_chunk_rl(q, k, v, gf, gb, do, dq, dk, dv, start + (n_chunks - 1 - i) * BT,
                               T, sqt, svt, sgt, sdt, skt, ck, cv, st, ds, hs, BT, BS, MODE)
    tl.debug_barrier()
    # left to right: forward state (dq^f), backward state gradient (dk^b, dv^b), dgb
    st = tl.zeros([K, BV], dtype=tl.float32)
    ds = tl.zeros([K, BV], dtype=tl.float32)
    if SEGMENTED:
        st = _load_state(s_f, i_bh, i_s, NSEG, ck, cv, V, K)
        ds = _load_state(ds_b, i_bh, i_s, NSEG, ck, cv, V, K)
    carry_b = tl.zeros([K], dtype=tl.float32)
    for i in range(0, n_chunks):
        st, ds, carry_b = _bwd_chunk_lr(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, start + i * BT,
                                        T, sqt, svt, sgt, sdt, skt, ck, cv, st, ds, carry_b, hs,
                                        BT, BS, MODE)
    tl.debug_barrier()
    # right to left: dgf_t = sum over r >= t (within the segment) of q*dq^f - k*dk^f
    carry_f = tl.zeros([K], dtype=tl.float32)
    for i in range(0, n_chunks):
        rows = start + (n_chunks - 1 - i) * BT + tl.arange(0, BT)
        w = _load(dgf, rows, ck, skt, T)
        _store(dgf, rows, ck, skt, T, tl.cumsum(w, axis=0, reverse=True) + carry_f[None, :])
        carry_f += tl.sum(w, axis=0)
    if SEGMENTED:
        off_tot = ((i_v * tl.num_programs(2) + i_bh) * NSEG + i_s) * K + ck
        tl.store(tot_f + off_tot, carry_f)
        tl.store(tot_b + off_tot, carry_b)


@triton.jit(do_not_specialize=["T", "H", "L", "NSEG", "PART"])
def _gate_carry_kernel(dgf, dgb, tot_f, tot_b, T, H, L, NSEG, PART, K: tl.constexpr,
                       BT: tl.constexpr):
    """Adds the other segments' totals: dgf += sum of later segments, dgb += sum of earlier ones."""
    i_v = tl.program_id(0)
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    ck = tl.arange(0, K)
    base = (i_v * tl.num_programs(2) + i_bh) * NSEG * K
    later = tl.zeros([K], dtype=tl.float32)
    for m in range(i_s + 1, NSEG):
        later += tl.load(tot_f + base + m * K + ck)
    earlier = tl.zeros([K], dtype=tl.float32)
    for m in range(0, i_s):
        earlier += tl.load(tot_b + base + m * K + ck)
    off = i_v.to(tl.int64) * PART + (i_b * T * H + i_h) * K
    start = i_s * L
    for n in range(0, tl.cdiv(tl.minimum(T - start, L), BT)):
        rows = start + n * BT + tl.arange(0, BT)
        _store(dgf + off, rows, ck, H * K, T, _load(dgf + off, rows, ck, H * K, T) + later[None, :])
        _store(dgb + off, rows, ck, H * K, T, _load(dgb + off, rows, ck, H * K, T) + earlier[None, :])


# ----------------------------------------------------------------------------------- launchers
def _check_dims(K: int, V: int):
    if K not in (16, 32, 64, 128) or V not in (16, 32, 64, 128, 256):
        raise ValueError(f"bigla triton backend supports d_k in (16, 32, 64, 128) and d_v in "
                         f"(16, 32, 64, 128, 256); got d_k={K}, d_v={V} (use backend='chunked')")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _plan(B: int, T: int, H: int, K: int, V: int, device: torch.device, segments: int | None):
    """Chunk, value block, number of segments and segment length (tokens) of a call."""
    chunk = CHUNK if K <= 64 else 32  # [chunk, K] fp32 tiles in registers
    BV = min(V, 64)
    NV = triton.cdiv(V, BV)
    n_chunks = triton.cdiv(T, chunk)
    if segments is None:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 1
        want = triton.cdiv(4 * sms, B * H * NV)  # about four programs per multiprocessor
        segments = min(want, n_chunks // 2)  # keep >= 2 chunks per segment
    nseg = max(1, min(segments, n_chunks))
    seg_chunks = triton.cdiv(n_chunks, nseg)
    nseg = triton.cdiv(n_chunks, seg_chunks)
    return chunk, BV, NV, nseg, seg_chunks * chunk


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


def _opts(q, chunk: int, backward: bool):
    mode = _MODES["ieee"] if q.dtype == torch.float32 else _MODES[DOT_MODE]
    return dict(MODE=mode, num_warps=WARPS["bwd" if backward else "fwd", chunk])


def _strides(q, v, g):
    return (*q.stride()[:3], *v.stride()[:3], *g.stride()[:3])


def _segment_states(q, k, v, gf, gb, do, scale, chunk, BV, NV, nseg, L, mode, grad):
    """Entering states of every segment (and, with ``grad``, state gradients), fp32
    ``[B*H, NSEG, K, V]`` each: ``(s_f, s_b, ds_f, ds_b)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    u_f, u_b = (torch.empty(B * H, nseg, K, V, **f32) for _ in range(2))
    w_f, w_b = (torch.empty(B * H, nseg, K, V, **f32) for _ in range(2)) if grad else (u_f, u_b)
    d_f, d_b = (torch.empty(B * H, nseg, K, **f32) for _ in range(2))
    _summary_kernel[(NV, nseg, B * H)](q, k, v, gf, gb, do if grad else v, u_f, u_b, w_f, w_b,
                                       d_f, d_b, T, H, scale, L, nseg, *_strides(q, v, gf),
                                       K=K, V=V, BT=chunk, BV=BV, MODE=mode, GRAD=grad, num_warps=4)
    _scan_kernel[(NV, B * H)](u_f, u_b, w_f, w_b, d_f, d_b, nseg, K=K, V=V, BV=BV, GRAD=grad,
                              num_warps=4)
    return u_f, u_b, w_f, w_b


def bigla_fwd_triton(q, k, v, log_gf, log_gb, scale: float, segments: int | None = None) -> torch.Tensor:
    """``[B, T, H, V]`` contiguous output in ``q.dtype``; inputs ``[B, T, H, K|V]`` (any strides
    with a unit last one).

    ``segments``: how many pieces the sequence is cut into (default: enough to fill the GPU).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_dims(K, V)
    q, k, v, log_gf, log_gb = _strided(q, k, v, log_gf, log_gb)
    chunk, BV, NV, nseg, L = _plan(B, T, H, K, V, q.device, segments)
    opts = _opts(q, chunk, backward=False)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    if nseg > 1:
        s_f, s_b, _, _ = _segment_states(q, k, v, log_gf, log_gb, None, scale, chunk, BV, NV, nseg,
                                         L, opts["MODE"], grad=False)
    else:
        s_f = s_b = o  # unused
    _fwd_kernel[(NV, nseg, B * H)](q, k, v, log_gf, log_gb, o, s_f, s_b, T, H, scale, L, nseg,
                                   *_strides(q, v, log_gf), K=K, V=V, BT=chunk, BS=SUB, BV=BV,
                                   SEGMENTED=nseg > 1, **opts)
    return o


def bigla_bwd_triton(q, k, v, log_gf, log_gb, do, scale: float, segments: int | None = None):
    """``(dq, dk, dv, dlog_gf, dlog_gb)``, contiguous, in the dtypes of the corresponding inputs."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_dims(K, V)
    q, k, v, log_gf, log_gb = _strided(q, k, v, log_gf, log_gb)
    do = do.contiguous()
    chunk, BV, NV, nseg, L = _plan(B, T, H, K, V, q.device, segments)
    opts = _opts(q, chunk, backward=True)
    dev = q.device
    if NV == 1:  # one value block: the kernel writes the results themselves
        dq, dk = torch.empty(B, T, H, K, dtype=q.dtype, device=dev), torch.empty(B, T, H, K, dtype=k.dtype, device=dev)
        dgf = torch.empty(B, T, H, K, dtype=log_gf.dtype, device=dev)
        dgb = torch.empty(B, T, H, K, dtype=log_gb.dtype, device=dev)
    else:  # per-block fp32 parts, summed below
        dq, dk, dgf, dgb = (torch.empty(NV, B, T, H, K, dtype=torch.float32, device=dev) for _ in range(4))
    dv = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    tot_f, tot_b = (torch.empty(NV, B * H, nseg, K, dtype=torch.float32, device=dev) for _ in range(2))
    if nseg > 1:
        states = _segment_states(q, k, v, log_gf, log_gb, do, scale, chunk, BV, NV, nseg, L,
                                 opts["MODE"], grad=True)
    else:
        states = (tot_f,) * 4  # unused
    part = B * T * H * K if NV > 1 else 0
    grid = (NV, nseg, B * H)
    _bwd_kernel[grid](q, k, v, log_gf, log_gb, do, dq, dk, dv, dgf, dgb, tot_f, tot_b, *states,
                      T, H, scale, L, nseg, part, *_strides(q, v, log_gf), K=K, V=V, BT=chunk,
                      BS=SUB, BV=BV, SEGMENTED=nseg > 1, **opts)
    if nseg > 1:
        _gate_carry_kernel[grid](dgf, dgb, tot_f, tot_b, T, H, L, nseg, part, K=K, BT=chunk,
                                 num_warps=4)
    if NV > 1:
        dq, dk, dgf, dgb = (x.sum(0).to(t.dtype) for x, t in zip((dq, dk, dgf, dgb), (q, k, log_gf, log_gb)))
    return dq, dk, dv, dgf, dgb
