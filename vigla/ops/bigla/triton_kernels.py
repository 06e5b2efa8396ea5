"""Chunk-parallel bidirectional GLA in Triton: forward and backward, both scans from one reading.

Notation (per batch*head): tokens are cut into chunks of ``BT``; in a chunk ``g`` are the log
decays (``[BT, K]``), ``P = cumsum(g)`` (inclusive) and ``G = sum(g)``. The forward scan's decay
from token j to i (j <= i) is ``exp(P_i - P_j)``, the backward scan's from j to i (j >= i)
``exp(c_j - c_i)`` with ``c = P - g`` (exclusive). Both scans include the token itself.

Forward, two launches (three for long sequences; one more with 64-token chunks, the steep pass of 3):

1. ``_bigla_walk_kernel`` computes the ``[K, V]`` state entering every chunk, for the forward scan
   (left to right over the chunks) and the backward scan (right to left) in one launch. The
   loop-carried work per chunk is one scaled add (``S <- exp(G) S + U``); the chunk's
   contribution ``U`` (one ``[K, BT] x [BT, V]`` product) does not depend on the state.
2. Long sequences are cut into segments walked in parallel from a zero state; ``_bigla_carry_kernel``
   then folds the segments' totals into the state entering each segment, which the next kernel
   adds to the chunk states (decayed by the stored in-segment decay).
3. ``_bigla_fwd_kernel``, one program per chunk: the intra-chunk part as one ``[BT, BT]`` score matrix
   (forward decays on and below the diagonal, backward on and above) on tensor cores, plus the
   two inter-chunk readouts ``q exp(P) S^f`` and ``q exp(R) S^b`` (``R = G - c``: inclusive suffix
   sums, so that the backward decay from j to i is also ``exp(R_i - R_j)``), accumulated by the products.
   With bf16 inputs and 64-token chunks ``P`` and ``R`` are formed on the tensor cores too (a triangle of ones
   times the gates in two bf16 parts, :func:`_prefix_sums`; so are the backward's exponents, and the walk's where
   it has more than one warp), elsewhere by ``tl.cumsum``.
   On the inference path (``MIX``) it also forms ViG's locality mix from that fp32 tile (one program holds a
   head's values): BiGLA's output is never written. With 64-token chunks it runs twice (``PASS``): first
   compiled without the exact path below (its code sets the register count of the whole kernel: 168 against
   128, fewer programs resident), for the chunks whose scans both factor, each program writing whether its
   chunk is steep; then for the steep chunks alone (the others' programs return at once).

Backward: the same walk kernel computes four chains in one launch (the two states again, and the
state gradients of both scans from ``q`` and ``do``), then ``_bigla_bwd_kernel``, one program per chunk,
twice: the forward scan's ``dq, dk, dv`` shares (fp32) and ``d gf``, then the backward scan's,
added to them, and ``d gb``. One scan per launch holds half the live tiles of a program doing both
(which spilled registers); with ``BiGLAConfig(steep_pass=True)`` each scan's launch is also split in two passes as
the forward's output kernel is (``PASS``: the chunks that factor, compiled without the exact path, then the steep
ones). The decay gradients are chunk-local: a suffix (forward scan) or prefix (backward scan) sum of ``q dq - k dk``
within the chunk plus the chunk-total term through the inter-chunk decays; no atomics, deterministic.

Exactness: every exponent formed outside the intra-chunk products is <= 0. Intra-chunk products
``sum_c a_ic b_jc exp(x_ic - x_jc)`` are factored as ``(a_ic exp(x_ic)) (b_jc exp(-x_jc))``: log
decays are <= 0, so ``x`` lies between 0 and the chunk's summed log decay ``G`` (forward: ``P``
falls from ``g_0`` to ``G``; backward: ``-c`` rises from 0 to ``g_last - G``) and both factors
stay within ``exp(+-G)`` of the inputs; when ``-G`` is below 60 that is inside fp32's and bf16's
range (no overflow or underflow); a steeper chunk takes an exact path, one token at a time, in which
every exponent is <= 0. So any finite log decay gives the exact result.

Base 2: the kernels hold log decays times ``log2(e)`` (formed as the gates are read) and take every
exponential as ``exp2``, one hardware instruction (``tl.exp`` of fp32 costs five: the scaling and the
subnormal range around ``ex2``); ``exp2`` flushes results below 2^-126 to zero, terms under fp32's
smallest normal relative to the unit diagonal term that every product has.

Inputs are read in place in the ``[B, T, H, D]`` layout with unit last stride (q, k, v may be
column slices of one projection; q and k share strides, as do the two gates). Gates are log
decays, or (``GATED``) logits ``z`` with log decays ``logsigmoid(z) / gate_normalizer`` formed inside
(the kernels take the normalizer's reciprocal, ``ginv``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..dispatch import direct, via_dispatcher
from ..launcher import cdiv, handoff_dtype, multiprocessors, planned, unit_stride
from ..locality_mix.triton_kernels import mixed

__all__ = ["BiGLAConfig", "bigla_fwd_triton", "bigla_bwd_triton", "mixes", "plan", "supports"]

LOG2E = tl.constexpr(1.4426950408889634)
# factored intra-chunk products: factors within exp(+-60) of the inputs (60 in base-2 units)
RANGE_LIMIT = tl.constexpr(60.0 * LOG2E.value)


def supports(K: int, V: int) -> bool:
    """Whether the kernels take heads of ``d_k = K`` and ``d_v = V``."""
    return K in (16, 32, 64, 128) and V in (16, 32, 64, 128, 256)


# ----------------------------------------------------------------------------------- helpers
@triton.jit
def _load_raw(ptr, rows, cols, stride, T):
    """``[BT, len(cols)]`` tile of ``rows`` in the tensor's dtype (zero past ``T``): half-precision
    tiles stay half until they are used (half the registers)."""
    mask = rows[:, None] < T
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_rows(ptr, rows, cols, stride, T):
    """``[BT, len(cols)]`` fp32 tile of ``rows`` (zero past ``T``)."""
    return _load_raw(ptr, rows, cols, stride, T).to(tl.float32)


@triton.jit
def _store_rows(ptr, rows, cols, stride, T, x):
    tl.store(ptr + rows[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=rows[:, None] < T)


@triton.jit
def _log1p_unit(t):
    """``log1p(t)`` for ``t`` in [0, 1] to a few ulp in a dozen instructions (libdevice's accurate ``log``
    and a division take ~40): ``2 atanh(s) = 2 (s + s^3/3 + ... + s^13/13)`` with
    ``s = t / (2 + t) <= 1/3`` (the next term is below 2e-8 relative), the quotient through the
    hardware's reciprocal square root of ``(2 + t)^2``, which lies in [4, 9]."""
    w = 2.0 + t
    s = t * tl.rsqrt(w * w)
    s2 = s * s
    p = s2 * (1.0 / 13.0) + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    return (2.0 * s) * (p * s2 + 1.0)


@triton.jit
def _load_gate(ptr, rows, cols, stride, T, ginv, GATED: tl.constexpr):
    """``[BT, len(cols)]`` fp32 log decays in base 2 (times ``log2(e)``): of the stored values (``GATED`` 0),
    or of ``logsigmoid(z) * ginv`` of stored logits ``z`` (``ginv``: the reciprocal of the gate normalizer);
    zero past ``T`` either way. ``log1p(t)`` of ``logsigmoid(z) = min(z, 0) - log1p(t)``, ``t = exp(-|z|)``:
    ``GATED`` 1, the few-ulp series of :func:`_log1p_unit`; 2 (half-precision inputs on a GPU), the hardware's
    approximate ``log2`` of the rounded ``1 + t`` (half the instructions; absolute error below 3e-7 before
    ``ginv``, a thousandth of what a bf16 logit's rounding moves the log decay)."""
    x = _load_rows(ptr, rows, cols, stride, T)
    if GATED:
        t = tl.exp2(-tl.abs(x) * LOG2E)
        if GATED == 2:
            x = tl.minimum(x, 0.0) * (ginv * LOG2E) - libdevice.fast_log2f(1.0 + t) * ginv
        else:
            x = (tl.minimum(x, 0.0) - _log1p_unit(t)) * (ginv * LOG2E)
        x = tl.where(rows[:, None] < T, x, 0.0)
    else:
        x = x * LOG2E
    return x


@triton.jit
def _sigmoid_neg(z):
    """``sigmoid(-z) = d logsigmoid(z) / dz``, without overflow: ``exp(-|z|)`` or 1 over ``1 + exp(-|z|)``."""
    t = tl.exp2(-tl.abs(z) * LOG2E)
    w = 1.0 + t
    return tl.where(z > 0, t, 1.0) * tl.rsqrt(w * w)


@triton.jit
def _dot(a, b, HALF_DOTS: tl.constexpr, acc=None):
    """fp32 accumulation (into ``acc`` when given); ``HALF_DOTS`` 1 or 2 (fp16 or bf16 inputs): tf32 products
    on the tensor cores (finer than the inputs themselves), else exact fp32 products."""
    if HALF_DOTS >= 1:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    else:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return r


@triton.jit
def _dot_raw(a, b, HALF_DOTS: tl.constexpr):
    """``_dot`` of two tiles as they are: two half-precision tiles of one dtype multiply as they are
    (exact products, fp32 accumulation) with half the registers and shared memory of tf32."""
    if HALF_DOTS >= 1 and a.dtype == b.dtype:
        r = tl.dot(a, b)
    else:
        r = _dot(a, b, HALF_DOTS)
    return r


@triton.jit
def _hdot(a, b, HALF_DOTS: tl.constexpr, acc=None):
    """``a @ b`` in the inputs' precision: bf16 operands for bf16 inputs (``HALF_DOTS`` 2; fp32
    accumulation; bf16 has fp32's range, so the factored score operands, up to ``exp(60)`` times an
    input, fit), else as ``_dot`` (fp16 lacks the range, and its inputs' 11 bits would lose 3). For the
    products whose rounding reaches neither the gate gradients nor a difference of nearly equal terms.
    With ``acc``: accumulated into it by the product itself."""
    if HALF_DOTS == 2:
        r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        r = _dot(a, b, HALF_DOTS, acc)
    return r


@triton.jit
def _prefix_sums(x, tri, BT: tl.constexpr, REVERSE: tl.constexpr, MMA: tl.constexpr):
    """Inclusive prefix sums (``REVERSE``: suffix sums) down the rows of a ``[BT, N]`` fp32 tile. With ``MMA`` (the
    plan's ``mma``: bf16 inputs at 64-token chunks) on the tensor cores: a triangle of ones (``tri``,
    :func:`triangles`; read from memory, which costs fewer instructions than forming it) times ``x`` split into
    two bf16 parts (``x = hi + lo`` to 16 bits: each element within 2^-18 of itself), the products exact, their
    sums fp32; ``tl.cumsum`` over rows spread across lanes and warps took a third of the forward kernel's
    instructions. Else ``tl.cumsum``. Error: within ~2^-17 of the summed magnitudes; for log decays (all of one
    sign) that is of ``|P_i - P_j|`` itself, so a weight ``exp2(P_i - P_j)`` or a factored ``exp2(P_i)`` with an
    exponent within the 60 the factored products allow is within ~4e-4 of itself, a tenth of a bf16 output's ulp
    (a third part, to fp32's 24 bits, cost 160 of the forward's ~1800 instructions and 2-3% of its time)."""
    if MMA:
        o = tl.arange(0, BT)
        ones = tl.load(tri + (BT * BT if REVERSE else 0) + o[:, None] * BT + o[None, :])
        hi = x.to(tl.bfloat16)
        lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
        r = tl.dot(ones, lo, tl.dot(ones, hi))
    else:
        r = tl.cumsum(x, axis=0, reverse=REVERSE)
    return r


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
    return tl.exp2(tl.where(keep[:, None], x - x_j[None, :], float("-inf")))


@triton.jit
def _factored(tot):
    """Whether a chunk's intra-chunk products may be factored (``tot``: its summed log decays, base 2, ``[K]``)."""
    return tl.max(-tot, axis=0) < RANGE_LIMIT


# The exact paths below (chunks whose summed log decay reaches -RANGE_LIMIT) walk the chunk one token at
# a time on [BT, K] tiles: a [BT, BT, K] tensor would set the register budget of the whole kernel.
@triton.jit
def _scores(a, b, x, safe, BT: tl.constexpr, UPPER: tl.constexpr, HALF_DOTS: tl.constexpr):
    """``[BT, BT]``: ``sum_c a_ic b_jc exp(x_ic - x_jc)`` on the triangle (``safe = _factored(tot)``);
    products as ``_hdot``'s (the forward's output and the values' gradient use them)."""
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    if safe:
        s = _hdot(a * tl.exp2(x), tl.trans(b * tl.exp2(-x)), HALF_DOTS)
        s = tl.where(_triangle(BT, UPPER), s, 0.0)
    else:
        s = tl.zeros([BT, BT], dtype=tl.float32)
        for j in range(0, BT):
            e = _decay_to(x, _row(x, j, BT), j, BT, UPPER)
            col = tl.sum(a * _row(b, j, BT)[None, :] * e, axis=1)
            s = tl.where((tl.arange(0, BT) == j)[None, :], col[:, None], s)
    return s


@triton.jit
def _mix_rows(w, y, x, safe, BT: tl.constexpr, UPPER: tl.constexpr, HALF_DOTS: tl.constexpr):
    """``[BT, K]``: ``r_i = sum_j w_ij y_j exp(x_i - x_j)`` (``w`` zero off the triangle)."""
    y = y.to(tl.float32)
    if safe:
        r = _dot(w, y * tl.exp2(-x), HALF_DOTS) * tl.exp2(x)
    else:
        r = tl.zeros_like(x)
        for j in range(0, BT):
            e = _decay_to(x, _row(x, j, BT), j, BT, UPPER)
            r += _col(w, j, BT)[:, None] * _row(y, j, BT)[None, :] * e
    return r


@triton.jit
def _mix_cols(w, y, x, safe, BT: tl.constexpr, UPPER: tl.constexpr, HALF_DOTS: tl.constexpr):
    """``[BT, K]``: ``r_j = sum_i w_ij y_i exp(x_i - x_j)`` (``w`` zero off the triangle)."""
    y = y.to(tl.float32)
    if safe:
        r = _dot(tl.trans(w), y * tl.exp2(x), HALF_DOTS) * tl.exp2(-x)
    else:
        r = tl.zeros_like(x)
        o = tl.arange(0, BT)
        for i in range(0, BT):
            keep = o >= i if UPPER else o <= i  # the tokens j that token i reaches
            e = tl.exp2(tl.where(keep[:, None], _row(x, i, BT)[None, :] - x, float("-inf")))
            r += _row(w, i, BT)[:, None] * _row(y, i, BT)[None, :] * e
    return r


@triton.jit
def _state(h, hs, dec, w, i_bh, BH, n, NT, SEG, NSEG, ck, cv,
           K: tl.constexpr, V: tl.constexpr, SEGMENTED: tl.constexpr):
    """``[K, BV]`` state of chain ``w`` entering chunk ``n``: the stored one in its storage dtype, or
    (``SEGMENTED``, fp32) plus the state entering its segment decayed by the in-segment decay before
    the chunk."""
    chain = (w * BH + i_bh).to(tl.int64)
    s = tl.load(h + (chain * NT + n) * K * V + ck[:, None] * V + cv[None, :])
    if SEGMENTED:
        carry = tl.load(hs + (chain * NSEG + n // SEG) * K * V + ck[:, None] * V + cv[None, :])
        s = s.to(tl.float32) + tl.exp2(tl.load(dec + (chain * (NT + NSEG) + n) * K + ck))[:, None] * carry
    return s


# ----------------------------------------------------------------------------------- walks
@triton.jit(do_not_specialize=["T", "H", "NT", "SEG", "NSEG", "ginv", "half_scale"])
def _bigla_walk_kernel(q, k, v, do, gf, gb, h, hs, dec, tri, T, H, NT, SEG, NSEG, ginv, half_scale,
                 sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh,
                 K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                 NV: tl.constexpr, GATED: tl.constexpr, HALF_DOTS: tl.constexpr, SEGMENTED: tl.constexpr,
                 MMA: tl.constexpr):
    """The state entering every chunk, for chain ``w``:

    * 0, ``S^f``: left to right, ``U = sum_j exp(G - P_j) k_j v_j^T``;
    * 1, ``S^b``: right to left, ``U = sum_j exp(c_j) k_j v_j^T``;
    * 2, ``dS^f`` (gradient of the forward state after the chunk): right to left,
      ``U = sum_i exp(P_i) q_i do_i^T * half_scale`` (gf);
    * 3, ``dS^b`` (gradient of the backward state after the chunk, i.e. entering its left
      neighbour): left to right, ``U = sum_i exp(G - c_i) q_i do_i^T * half_scale`` (gb);

    each ``S <- exp(G) S + U`` per chunk. ``h``: ``[W, BH, NT, K, V]`` in its own dtype; with
    ``SEGMENTED`` the walk starts from zero at every segment of ``SEG`` chunks, and writes the
    segment's total to ``hs`` (``[W, BH, NSEG, K, V]`` fp32) and the summed base-2 log decays (in the
    segment, before each chunk, ``[W, BH, NT + NSEG, K]`` fp32, totals at ``NT + s``) to ``dec``. ``MMA``,
    ``tri``: the chunk's prefix sums on the tensor cores (:func:`_prefix_sums`).
    """
    ginv, half_scale = tl.cast(ginv, tl.float32), tl.cast(half_scale, tl.float32)  # fp64 under Inductor
    i_wv = tl.program_id(0)
    i_w = i_wv // NV
    i_v = i_wv % NV
    i_s = tl.program_id(1)
    i_bh = tl.program_id(2)
    BH = tl.num_programs(2)
    i_b = i_bh // H
    i_h = i_bh % H
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    grad = i_w >= 2
    ltr = (i_w == 0) | (i_w == 3)
    i_b64 = i_b.to(tl.int64)
    # chains 0, 1 read k and v; 2, 3 read q and do (contiguous [B, T, H, V])
    a_ptr = tl.where(grad, q, k) + i_b64 * sqb + i_h * sqh
    b_ptr = tl.where(grad, do + (i_b64 * T * H + i_h) * V, v + i_b64 * svb + i_h * svh)
    b_st = tl.where(grad, H * V, svt)
    mult = tl.where(grad, half_scale, 1.0)
    g_ptr = tl.where((i_w == 0) | (i_w == 2), gf, gb) + i_b64 * sgb + i_h * sgh
    chain = (i_w * BH + i_bh).to(tl.int64)
    first = i_s * SEG
    count = tl.minimum(NT - first, SEG)
    # the chain's exponents from P, g and G: exclusive suffix sums G - P (0), exclusive prefix sums
    # P - g (1), inclusive prefix sums P (2), inclusive suffix sums G - P + g (3)
    c_p = tl.where(ltr, -1.0, 1.0)
    c_g = tl.where(i_w == 1, -1.0, tl.where(i_w == 3, 1.0, 0.0))
    c_t = tl.where(ltr, 1.0, 0.0)
    state = tl.zeros([K, BV], dtype=tl.float32)
    acc = tl.zeros([K], dtype=tl.float32)
    for i in range(0, count):
        n = tl.where(ltr, first + i, first + count - 1 - i)
        tl.store(h + (chain * NT + n) * K * V + ck[:, None] * V + cv[None, :], state.to(h.dtype.element_ty))
        if SEGMENTED:
            if i_v == 0:
                tl.store(dec + (chain * (NT + NSEG) + n) * K + ck, acc)
        rows = n * BT + ot
        a = _load_raw(a_ptr, rows, ck, sqt, T)
        b = _load_raw(b_ptr, rows, cv, b_st, T)
        g = _load_gate(g_ptr, rows, ck, sgt, T, ginv, GATED)
        p = _prefix_sums(g, tri, BT, False, MMA)
        tot = tl.sum(g, axis=0)
        x = c_p * p + (c_g * g + c_t * tot[None, :])
        u = tl.trans(a.to(tl.float32) * tl.exp2(x))  # [K, BT]: the chunk's keys (queries) decayed, <= |a|
        contrib = _dot_raw(u.to(b.dtype), b, HALF_DOTS)  # half inputs: both operands in their dtype
        state = state * tl.exp2(tot)[:, None] + contrib * mult
        acc += tot
    if SEGMENTED:
        tl.store(hs + (chain * NSEG + i_s) * K * V + ck[:, None] * V + cv[None, :], state)
        if i_v == 0:
            tl.store(dec + (chain * (NT + NSEG) + NT + i_s) * K + ck, acc)


@triton.jit(do_not_specialize=["NT", "NSEG"])
def _bigla_carry_kernel(hs, dec, NT, NSEG, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                  NV: tl.constexpr):
    """Replace each segment's total in ``hs`` by the state entering the segment (the totals of
    the segments before it, in the chain's direction, folded with their decays)."""
    i_wv = tl.program_id(0)
    i_w = i_wv // NV
    i_v = i_wv % NV
    i_bh = tl.program_id(1)
    chain = (i_w * tl.num_programs(1) + i_bh).to(tl.int64)
    ltr = (i_w == 0) | (i_w == 3)
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    carry = tl.zeros([K, BV], dtype=tl.float32)
    tile = ck[:, None] * V + cv[None, :]
    step = tl.where(ltr, 1, -1)
    s = tl.where(ltr, 0, NSEG - 1)
    total = tl.load(hs + (chain * NSEG + s) * K * V + tile)
    d = tl.load(dec + (chain * (NT + NSEG) + NT + s) * K + ck)
    for j in range(0, NSEG):
        # the next segment's total and decay are loaded before this one is folded: one memory latency
        # per segment overlapped with the fold instead of added to it (the last step reloads its own)
        s_next = tl.where(j + 1 < NSEG, s + step, s)
        total_next = tl.load(hs + (chain * NSEG + s_next) * K * V + tile)
        d_next = tl.load(dec + (chain * (NT + NSEG) + NT + s_next) * K + ck)
        tl.store(hs + (chain * NSEG + s) * K * V + tile, carry)
        carry = carry * tl.exp2(d)[:, None] + total
        s, total, d = s_next, total_next, d_next


# ----------------------------------------------------------------------------------- outputs
@triton.jit
def _chunk_coords(i_v, i_t, i_bh, H, sqb, sqh, svb, svh, sgb, sgh, K: tl.constexpr, BT: tl.constexpr,
                  BV: tl.constexpr):
    """Where a per-chunk program (chunk ``i_t``, value block ``i_v``, batch-head ``i_bh``) reads and writes:
    ``(i_b, i_h, ck, cv, rows, off_q, off_v, off_g)``: batch (int64) and head, the key and value columns, the chunk's
    rows, and the offsets of this batch-head in ``q`` and ``k``, ``v``, the gates.

    Scalars in, scalars out, and the tiles read apart (:func:`_qkv_tiles`): ``torch.compile`` finds what a kernel
    writes by tracing its stores' addresses back through its TTIR, and through a call to every argument of the
    call, so an address computed by a helper that also took ``q`` would mark ``q`` as written (Inductor would then
    copy the inputs, and under CUDA graphs it got the gradients wrong)."""
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    rows = i_t * BT + tl.arange(0, BT)
    return (i_b, i_h, tl.arange(0, K), i_v * BV + tl.arange(0, BV), rows, i_b * sqb + i_h * sqh,
            i_b * svb + i_h * svh, i_b * sgb + i_h * sgh)


@triton.jit
def _qkv_tiles(q, k, v, off_q, off_v, rows, ck, cv, sqt, svt, T):
    """The chunk's ``q``, ``k`` (``[BT, K]``) and ``v`` (``[BT, BV]``) tiles in their dtype, zero past ``T``."""
    return (_load_raw(q + off_q, rows, ck, sqt, T), _load_raw(k + off_q, rows, ck, sqt, T),
            _load_raw(v + off_v, rows, cv, svt, T))


@triton.jit(do_not_specialize=["T", "H", "NT", "SEG", "NSEG", "ginv", "half_scale", "eps"])
def _bigla_fwd_kernel(q, k, v, gf, gb, o, h, hs, dec, steep, tri, T, H, NT, SEG, NSEG, ginv, half_scale,
                sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh, x, z, w_o, w_l, eps, sxb, sxt, szb, szt,
                K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                GATED: tl.constexpr, HALF_DOTS: tl.constexpr, SEGMENTED: tl.constexpr, MIX: tl.constexpr,
                ACT: tl.constexpr, PASS: tl.constexpr, MMA: tl.constexpr):
    """``o`` (contiguous ``[B, T, H, V]``) of one chunk and value block. With ``MIX`` (one value block, ``BV = V``)
    ViG's locality mix of the chunk's output instead, written to ``o``: per token and head
    ``act(G * RMSNorm(o; w_o) + (1 - G) * RMSNorm(x; w_l))``, ``G = sigmoid(z)`` (``act``: SiLU with ``ACT``);
    ``x``, ``z``: ``[B, T, H * V]`` with strides ``(sxb, sxt, 1)``, ``(szb, szt, 1)``.

    ``PASS`` 0: every chunk, a steep scan's scores through the exact path in the same program. 1: the chunks whose
    two scans both factor, without the exact path's code (fewer registers: more programs resident); each program
    writes whether its chunk is steep to ``steep`` (``[BH, NT, NV]`` int8). 2: the chunks pass 1 left. ``MMA``: the
    in-chunk prefix sums on the tensor cores, ``tri`` their triangles (:func:`_prefix_sums`; else ``tri`` unread)."""
    # fp64 under Inductor; cast before the branch (rebound inside a runtime branch, a scalar specialised as a
    # constexpr, as PyTorch 2.11's access analysis lowers it, would not compile)
    ginv, half_scale = tl.cast(ginv, tl.float32), tl.cast(half_scale, tl.float32)
    i_v = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2)
    flag = steep + (i_bh * NT + i_t) * tl.num_programs(0) + i_v
    if (tl.load(flag) != 0) if PASS == 2 else True:
        BH = tl.num_programs(2)
        i_b, i_h, ck, cv, rows, off_q, off_v, off_g = _chunk_coords(i_v, i_t, i_bh, H, sqb, sqh, svb, svh, sgb,
                                                                     sgh, K, BT, BV)
        b_q, b_k, b_v = _qkv_tiles(q, k, v, off_q, off_v, rows, ck, cv, sqt, svt, T)
        # the scans' exponents: inclusive prefix sums P (forward) and inclusive suffix sums R = G - c
        # (backward: exp(c_j - c_i) = exp(R_i - R_j)), both <= 0, each factored product's range their minimum
        p = _prefix_sums(_load_gate(gf + off_g, rows, ck, sgt, T, ginv, GATED), tri, BT, False, MMA)
        r = _prefix_sums(_load_gate(gb + off_g, rows, ck, sgt, T, ginv, GATED), tri, BT, True, MMA)
        fine_f = -tl.min(p) < RANGE_LIMIT
        fine_b = -tl.min(r) < RANGE_LIMIT
        fine = True
        if PASS == 1:  # this pass takes the chunks that factor, its scores compiled for them alone
            fine = fine_f & fine_b
            tl.store(flag, tl.where(fine, 0, 1).to(tl.int8))
            fine_f, fine_b = True, True
        if fine:
            _fwd_out(b_q, b_k, b_v, p, r, o, h, hs, dec, T, H, NT, SEG, NSEG, half_scale, x, z, w_o, w_l, eps, sxb,
                     sxt, szb, szt, i_b, i_h, i_bh, BH, i_t, ck, cv, rows, fine_f, fine_b, K, V, BT, HALF_DOTS,
                     SEGMENTED, MIX, ACT)


@triton.jit
def _fwd_out(b_q, b_k, b_v, p, r, o, h, hs, dec, T, H, NT, SEG, NSEG, half_scale, x, z, w_o, w_l, eps, sxb, sxt,
             szb, szt, i_b, i_h, i_bh, BH, i_t, ck, cv, rows, fine_f, fine_b,
             K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, HALF_DOTS: tl.constexpr,
             SEGMENTED: tl.constexpr, MIX: tl.constexpr, ACT: tl.constexpr):
    """A chunk's output from its tiles and exponents (``fine_f``, ``fine_b``: whether each scan's products factor;
    constant True on pass 1, where the exact path is not compiled)."""
    # both scans' intra-chunk scores in one matrix (forward on and below the diagonal, backward on and above)
    a = _scores(b_q, b_k, p, fine_f, BT, False, HALF_DOTS)
    a += _scores(b_q, b_k, r, fine_b, BT, True, HALF_DOTS)
    out = _hdot(a, b_v, HALF_DOTS)
    # the states entering the chunk, read by q exp(P) and q exp(R): decayed queries, <= |q|
    s_f = _state(h, hs, dec, 0, i_bh, BH, i_t, NT, SEG, NSEG, ck, cv, K, V, SEGMENTED)
    out = _hdot(b_q.to(tl.float32) * tl.exp2(p), s_f, HALF_DOTS, out)
    s_b = _state(h, hs, dec, 1, i_bh, BH, i_t, NT, SEG, NSEG, ck, cv, K, V, SEGMENTED)
    out = _hdot(b_q.to(tl.float32) * tl.exp2(r), s_b, HALF_DOTS, out)
    out = out * half_scale
    if MIX:
        out = _mix(out, x + i_b * sxb + i_h * V, z + i_b * szb + i_h * V, w_o, w_l, eps, rows, cv, sxt, szt, T,
                   V, ACT)
    _store_rows(o + (i_b * T * H + i_h) * V, rows, cv, H * V, T, out)


@triton.jit
def _mix(a, x, z, w_o, w_l, eps, rows, cols, sxt, szt, T, V: tl.constexpr, ACT: tl.constexpr):
    """The locality mix of one head's ``[BT, V]`` fp32 output ``a`` (``x``, ``z``: the head's first channel of
    the chunk's image)."""
    eps = tl.cast(eps, tl.float32)  # fp64 under Inductor
    return mixed(a, _load_rows(x, rows, cols, sxt, T), _load_rows(z, rows, cols, szt, T),
                 tl.load(w_o + cols).to(tl.float32), tl.load(w_l + cols).to(tl.float32), eps, V, ACT)


@triton.jit(do_not_specialize=["T", "H", "NT", "SEG", "NSEG", "ginv", "half_scale"])
def _bigla_bwd_kernel(q, k, v, g, do, dq, dk, dv, dg, pq, pk, pv, h, hs, dec, steep, tri, T, H, NT, SEG, NSEG, ginv,
                half_scale, sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh,
                K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                GATED: tl.constexpr, HALF_DOTS: tl.constexpr, SEGMENTED: tl.constexpr,
                UPPER: tl.constexpr, PASS: tl.constexpr, MMA: tl.constexpr, ORDER: tl.constexpr):
    """One scan's gradients of one chunk and value block: the forward scan's (``UPPER`` 0, gate
    ``g = gf``) or the backward scan's (``UPPER`` 1, ``g = gb``). ``PASS`` as the forward's output kernel's
    (:func:`_bigla_fwd_kernel`), for this scan's chunks: 0 every chunk; 1 those whose products factor, writing the
    others' flags to ``steep`` (``[BH, NT, NV]`` int8); 2 the chunks pass 1 left. ``MMA``, ``tri``: the in-chunk
    exponents' prefix sums on the tensor cores, as the forward's (the gate gradients' suffix sums keep ``tl.cumsum``:
    on the tensor cores they were no faster on an H100, the tile as the first operand, and faulted as the second).
    ``ORDER``: dv, dq, dk each stored as soon as it is formed (fewer tiles live at once: at 64-token chunks no
    spills), else all three formed, then stored (what spilled less under the 80-register cap at 16-token chunks);
    the plan's ``bwd_order`` picks.

    Writes ``dv`` (``[B, T, H, V]``) and, for this value block, ``dq, dk, dg`` (``[NV, B, T, H, K]``
    contiguous; the caller sums the blocks). The backward scan's launch adds the forward scan's shares
    ``pq, pk, pv`` (same layouts, bf16 for bf16 inputs else fp32, written by the first launch) to ``dq, dk,
    dv``: the backward is two launches, one per scan, each holding half the live tiles of one program doing
    both (which spilled registers), and deterministic.

    Notation: ``x`` is the scan's in-chunk exponent (forward: ``P``, backward: ``-c``) and ``a`` its
    offset (forward: 0, backward: ``G``), so that a query reads the state entering the chunk with
    ``exp(x + a)`` and a key enters the state leaving it with ``exp(G - a - x)``.
    """
    ginv, half_scale = tl.cast(ginv, tl.float32), tl.cast(half_scale, tl.float32)  # fp64 under Inductor
    i_v = tl.program_id(0)
    i_t = tl.program_id(1)
    i_bh = tl.program_id(2)
    flag = steep + (i_bh * NT + i_t) * tl.num_programs(0) + i_v
    if (tl.load(flag) != 0) if PASS == 2 else True:
        _bwd_chunk(q, k, v, g, do, dq, dk, dv, dg, pq, pk, pv, h, hs, dec, flag, tri, T, H, NT, SEG, NSEG, ginv,
                   half_scale, sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh, i_v, i_t, i_bh, K, V, BT, BV, GATED,
                   HALF_DOTS, SEGMENTED, UPPER, PASS, MMA, ORDER)


@triton.jit
def _bwd_chunk(q, k, v, g, do, dq, dk, dv, dg, pq, pk, pv, h, hs, dec, flag, tri, T, H, NT, SEG, NSEG, ginv,
               half_scale, sqb, sqt, sqh, svb, svt, svh, sgb, sgt, sgh, i_v, i_t, i_bh, K: tl.constexpr,
               V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, HALF_DOTS: tl.constexpr,
               SEGMENTED: tl.constexpr, UPPER: tl.constexpr, PASS: tl.constexpr, MMA: tl.constexpr,
               ORDER: tl.constexpr):
    """:func:`_bigla_bwd_kernel`'s work for one chunk and value block."""
    BH = tl.num_programs(2)
    # q, k, v, do stay in their dtype: products with them convert (f32) where they happen
    i_b, i_h, ck, cv, rows, off_q, off_v, off_g = _chunk_coords(i_v, i_t, i_bh, H, sqb, sqh, svb, svh, sgb, sgh,
                                                                 K, BT, BV)
    b_q, b_k, b_v = _qkv_tiles(q, k, v, off_q, off_v, rows, ck, cv, sqt, svt, T)
    off_o = (i_b * T * H + i_h) * V
    off_k = (i_v.to(tl.int64) * BH * T + i_b * T * H + i_h) * K  # this value block's slice of dq, dk, dg
    b_do = _load_raw(do + off_o, rows, cv, H * V, T)  # times half_scale below: d = do * scale / 2

    b_g = _load_gate(g + off_g, rows, ck, sgt, T, ginv, GATED)
    tot = tl.sum(b_g, axis=0)
    if UPPER:
        x = b_g - _prefix_sums(b_g, tri, BT, False, MMA)  # -c
        a = tot
    else:
        x = _prefix_sums(b_g, tri, BT, False, MMA)  # P
        a = tl.zeros_like(tot)
    safe = _factored(tot)
    go = True
    if PASS == 1:  # this pass takes the chunks whose products factor, compiled for them alone
        go = safe
        tl.store(flag, tl.where(safe, 0, 1).to(tl.int8))
        safe = True
    if go:
        # the states as stored: their products with do and v are exact (as tf32 of the same values was)
        ds = _state(h, hs, dec, 2 + UPPER, i_bh, BH, i_t, NT, SEG, NSEG, ck, cv, K, V, SEGMENTED)
        key_out = tl.exp2(tot[None, :] - a[None, :] - x)  # a key's decay into the state leaving the chunk
        if ORDER:  # dv, then dq, then dk, each stored as it is formed
            b_dv = _grad_v(b_q, b_k, b_do, ds, x, key_out, safe, half_scale, BT, UPPER, HALF_DOTS)
            _store_grad(dv, pv, off_o, rows, cv, H * V, T, b_dv, UPPER)
            s = _state(h, hs, dec, UPPER, i_bh, BH, i_t, NT, SEG, NSEG, ck, cv, K, V, SEGMENTED)
            extra = _carried(s, ds, tot)
            w = tl.where(_triangle(BT, UPPER), _dot_raw(b_do, tl.trans(b_v), HALF_DOTS) * half_scale, 0.0)
            b_dq, extra = _grad_q(b_q, b_k, b_do, s, w, x, a, safe, half_scale, extra, BT, UPPER, HALF_DOTS)
            u = b_q.to(tl.float32) * b_dq
            _store_grad(dq, pq, off_k, rows, ck, H * K, T, b_dq, UPPER)
            b_dk, extra = _grad_k(b_q, b_k, b_v, ds, w, x, key_out, safe, extra, BT, UPPER, HALF_DOTS)
            u -= b_k.to(tl.float32) * b_dk
            _store_grad(dk, pk, off_k, rows, ck, H * K, T, b_dk, UPPER)
        else:  # all three formed, then stored
            s = _state(h, hs, dec, UPPER, i_bh, BH, i_t, NT, SEG, NSEG, ck, cv, K, V, SEGMENTED)
            extra = _carried(s, ds, tot)
            w = tl.where(_triangle(BT, UPPER), _dot_raw(b_do, tl.trans(b_v), HALF_DOTS) * half_scale, 0.0)
            b_dq, extra = _grad_q(b_q, b_k, b_do, s, w, x, a, safe, half_scale, extra, BT, UPPER, HALF_DOTS)
            b_dk, extra = _grad_k(b_q, b_k, b_v, ds, w, x, key_out, safe, extra, BT, UPPER, HALF_DOTS)
            b_dv = _grad_v(b_q, b_k, b_do, ds, x, key_out, safe, half_scale, BT, UPPER, HALF_DOTS)
            u = b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk
        # d/dx_i = u_i = q dq - k dk, plus the chunk total's share (extra)
        d_g = tl.sum(u, axis=0)[None, :] - tl.cumsum(u, axis=0)  # exclusive suffix sums
        if UPPER:  # x = -c: d/dg_j = -(sum over the tokens after j)
            d_g = -d_g
        else:  # x = P: d/dg_j = sum over the tokens from j on
            d_g += u
        d_g += extra[None, :]
        if GATED:  # d logsigmoid(z) / dz = sigmoid(-z)
            d_g *= _sigmoid_neg(_load_rows(g + off_g, rows, ck, sgt, T)) * ginv
        _store_rows(dg + off_k, rows, ck, H * K, T, d_g)
        if not ORDER:
            _store_grad(dq, pq, off_k, rows, ck, H * K, T, b_dq, UPPER)
            _store_grad(dk, pk, off_k, rows, ck, H * K, T, b_dk, UPPER)
            _store_grad(dv, pv, off_o, rows, cv, H * V, T, b_dv, UPPER)


@triton.jit
def _carried(s, ds, tot):
    """``[K]``: the chunk total G's share of its gate gradients through the state it carries into the next chunk
    (both scans): ``exp(G) sum_v s * ds``."""
    return tl.exp2(tot) * tl.sum(s.to(tl.float32) * ds.to(tl.float32), axis=1)


@triton.jit
def _grad_q(b_q, b_k, b_do, s, w, x, a, safe, half_scale, extra, BT: tl.constexpr, UPPER: tl.constexpr,
            HALF_DOTS: tl.constexpr):
    """``(dq, extra)``: dq ``[BT, K]`` fp32 (``w``: the masked ``do v^T``), and for the backward scan ``extra``
    plus every query's readout's share of G's gradient (``[K]``)."""
    dq_inter = _dot_raw(b_do, tl.trans(s), HALF_DOTS) * (half_scale * tl.exp2(x + a[None, :]))
    if UPPER:
        extra += tl.sum(b_q.to(tl.float32) * dq_inter, axis=0)
    return _mix_rows(w, b_k, x, safe, BT, UPPER, HALF_DOTS) + dq_inter, extra


@triton.jit
def _grad_k(b_q, b_k, b_v, ds, w, x, key_out, safe, extra, BT: tl.constexpr, UPPER: tl.constexpr,
            HALF_DOTS: tl.constexpr):
    """``(dk, extra)``: dk ``[BT, K]`` fp32, and for the forward scan ``extra`` plus every key's share of G's
    gradient (``[K]``)."""
    dk_inter = _dot_raw(b_v, tl.trans(ds), HALF_DOTS) * key_out
    if not UPPER:
        extra += tl.sum(b_k.to(tl.float32) * dk_inter, axis=0)
    return _mix_cols(w, b_q, x, safe, BT, UPPER, HALF_DOTS) + dk_inter, extra


@triton.jit
def _grad_v(b_q, b_k, b_do, ds, x, key_out, safe, half_scale, BT: tl.constexpr, UPPER: tl.constexpr,
            HALF_DOTS: tl.constexpr):
    """dv, ``[BT, BV]`` fp32: the in-chunk scores' transpose times ``do``, plus the decayed keys times ``ds``."""
    b_dv = _hdot(tl.trans(_scores(b_q, b_k, x, safe, BT, UPPER, HALF_DOTS)), b_do, HALF_DOTS) * half_scale
    return b_dv + _dot_raw((b_k.to(tl.float32) * key_out).to(b_k.dtype), ds, HALF_DOTS)  # decayed keys: <= |k|


@triton.jit
def _store_grad(ptr, share, off, rows, cols, stride, T, x, ADD: tl.constexpr):
    """Store one gradient tile at ``ptr + off``; with ``ADD`` (the backward scan's launch) plus the forward scan's
    share of it at ``share + off``."""
    if ADD:
        x += _load_rows(share + off, rows, cols, stride, T)
    _store_rows(ptr + off, rows, cols, stride, T, x)


# ----------------------------------------------------------------------------------- launchers
@dataclass(frozen=True)
class BiGLAConfig:
    """How a call is launched; ``None`` fields are chosen by :func:`plan`.

    chunk: tokens per chunk (16, 32 or 64). segments: how many pieces each walk is cut into
    (1: no carry kernel). state_dtype: storage of the chunk states between the kernels,
    ``"bf16"`` (default for bf16 inputs) or ``"fp32"`` (default otherwise). bv: value block of the
    per-chunk kernels. warps_walk / warps_chunk: ``num_warps`` of the walk and per-chunk kernels.
    regs: register cap (``maxnreg``) of the per-chunk kernels, 0 for none: a lower cap lets more
    programs share a multiprocessor. bwd_regs: the backward's per-chunk kernel's own cap (default: ``regs``).
    steep_pass: whether the forward's output kernel (and each scan's launch of the backward's per-chunk kernel) runs
    twice, first without the exact path's code (the chunks whose scans factor), then for the steep chunks it left
    (default: the forward's, with 64-token chunks, where the exact path's registers cost resident programs; the
    backward's split gained 2-3% of the backward at 32-token chunks and lost 2% at 64 on an H100,
    ``kernel_bigla_bwd_steep_ab.json``: not on by default). walk_regs: register cap of the walk kernel (0: none);
    walk_stages: the walk loop's software-pipelining depth (Triton's
    ``num_stages``, 0: Triton's default, 3: the next chunks' loads issued while one is folded in, at the cost of
    registers and shared memory); defaults: :func:`default_walk`.
    """
    chunk: int | None = None
    segments: int | None = None
    state_dtype: str | None = None
    bv: int | None = None
    warps_walk: int | None = None
    warps_chunk: int | None = None
    regs: int | None = None
    bwd_regs: int | None = None
    steep_pass: bool | None = None
    walk_regs: int | None = None
    walk_stages: int | None = None


_DEFAULT = BiGLAConfig()  # the automatic plan (one instance: a dataclass costs microseconds to build and hash)


@dataclass(frozen=True)
class _Plan:
    BT: int
    NT: int
    BV: int
    NV: int
    BVW: int
    NVW: int
    seg: int
    nseg: int
    warps_walk: int
    warps_chunk: int
    regs: int
    state_fp32: bool
    steep_pass: bool
    walk_regs: int
    walk_stages: int
    mma: bool  # the in-chunk exponents' prefix sums on the tensor cores (the forward's per-chunk kernel)
    walk_mma: bool  # the same in the walk
    bwd_mma: bool  # the same in the backward's per-chunk kernel
    bwd_order: bool  # the backward's per-chunk kernel stores each gradient as soon as it is formed (its ORDER)


def default_launch(T: int, K: int, V: int, bf16: bool, chains: int) -> tuple[int, int, int]:
    """``(chunk, warps, regs)`` of one pass's per-chunk kernel: tokens per chunk, its ``num_warps`` and
    register cap (0: none), chosen by measurement (``python -m benchmarks kernel tune`` and ``tune_warps``;
    ``kernel_bigla_tune.json`` and ``kernel_bigla_tune_warps*.json`` hold the figures).

    Measured (bf16, d_v <= 64: ViG-T/S and ViG-H's stages):

    * d_k = 16 heads (ViG-H): 16-token chunks; the forward at one warp (T = 49 to 16384) capped at 128
      registers (uncapped, ptxas gave its variant for segmented walks 168 and it ran 9-17% slower at ViG-H-T's
      stage 1, ``kernel_bigla_h_regs_ab.json``), the backward at
      two up to T = 4096 (T = 49 to 3136: 12-18% off forward+backward against 4 warps) capped at 80
      registers (another 5-6%, ``kernel_bigla_tune_regs.json``), beyond it 64-token chunks at 4 warps
      capped at 168 registers (5% faster at T = 16384);
    * d_k = 32, forward (``chains`` 2): 32-token chunks capped at 96 registers for short sequences
      (T <= 256: 196 pads to 224 instead of 256; five programs per multiprocessor instead of four, no spills:
      4-5% off the forward of ViG-T and ViG-S at 224 against 128, ``kernel_bigla_steep_ab.json``), else 64
      capped at 128 (four programs per multiprocessor instead of three, no spills: the forward + mix kernel
      163 -> 128 registers: ViG-T's inference path 7-8% faster at 512 and 1024, 9-11% with the prefix sums on the
      tensor cores; BiGLA's forward alone 3-4% faster with both, 1-3% slower with those sums at 134 registers
      uncapped: ``kernel_ops_prefix_ab.json``, ``kernel_bigla_prefix_ab.json``); backward (``chains`` 4, one scan
      per launch): 16-token chunks capped at 80 registers for T <= 256 (more programs resident: 5% off
      forward+backward for ViG-T and ViG-S at 224, ``kernel_bigla_tune_regs.json``), else 64; 4 warps.

    Other bf16 heads up to 64 x 128: 32-token chunks for short sequences, else 64; fp32 inputs and
    wider heads: 32 (fp32 products need twice the registers and shared memory); 8 warps for d_k > 32
    and for the backward. The backward recomputes the states from the inputs, so the
    two passes need not agree."""
    if bf16 and K <= 16 and V <= 64:
        if chains == 2:
            return 16, 1, 128
        return (16, 2, 80) if T <= 4096 else (64, 4, 168)
    if bf16 and K <= 32 and V <= 64:
        short = T <= 256
        if chains == 2:
            return (32, 4, 96) if short else (64, 4, 128)
        return (16, 4, 80) if short else (64, 4, 0)
    warps = 8 if K > 32 or chains == 4 else 4
    if not (bf16 and K <= 64 and V <= 128):
        return 32, warps, 0
    return (32 if T <= 256 and K >= 32 else 64), warps, 0


def default_walk(T: int, K: int, V: int, bf16: bool) -> tuple[int, int]:
    """``(regs, stages)`` of the walk kernel: its register cap and pipelining depth (0: none, Triton's default),
    chosen by measurement (``kernel_bigla_walk_stages_ab.json``, ``kernel_bigla_walk_h_ab.json``; H100, forward +
    backward in CUDA-graph replays). bf16 heads up to 32 x 64: short sequences (T <= 256) capped at 128 registers
    (ViG-T at 224: 5% off forward+backward, in three runs; ViG-H-T stage 3: 3%; the forward's walk takes 168
    registers uncapped and 128 without spills); ViG-H's d_k = 16 heads up to T = 4096 also at two stages instead of
    three (stage 1 at 224, T = 3136: 7% off forward+backward, 9% off the forward; stage 2, T = 784: 3%; at T = 16384,
    stage 1 at 512, the forward was 7% slower: the bound between is :func:`default_launch`'s for these heads, not
    measured). Other sequences and heads keep Triton's choices (at ViG-T 512-2048 the cap and depth were equal or
    slower)."""
    if not (bf16 and K <= 32 and V <= 64):
        return 0, 0
    if T <= 256:
        return 128, 0
    return (128, 2) if K <= 16 and T <= 4096 else (0, 0)


# the backward's walks (four chains) are not cut into segments up to this many chunks: on an H100 at T = 1024 and
# 4096 (16 and 64 chunks) whole walks took 4-17% off BiGLA's forward + backward (48 x 1024, 12 and 32 x 4096); at
# T = 16384 (256 chunks) cutting them still paid, 14-25% (kernel_bigla_bwd_segments_ab.json)
BWD_WHOLE_WALK = 64


def _walk_steps(programs: int, NT: int, nseg: int, sms: int) -> int:
    """The chunk steps one after another in a forward walk of ``programs`` chains cut into ``nseg`` segments: waves of
    about three 4-warp walk programs per multiprocessor (~130-140 registers) times the chunks of a segment, plus the
    carry kernel's step per segment. Where cutting saves none, the walk is left whole: at ViG-T's 48 x 1024 (4
    segments of 4 chunks) that took 11% off the forward, at 128 x 1024 it was even, at T = 4096 cutting paid
    (H100, ``kernel_bigla_walk_plan_ab.json``)."""
    seg = cdiv(NT, nseg)
    nseg = cdiv(NT, seg)
    return cdiv(programs * nseg, 3 * sms) * seg + (nseg if nseg > 1 else 0)


@functools.lru_cache(maxsize=1024)
def plan(B: int, T: int, H: int, K: int, V: int, bf16: bool, sms: int, chains: int,
         config: BiGLAConfig | None = None) -> _Plan:
    """Launch plan for one shape (cached: the checks and choices happen once per shape).

    ``chains``: 2 (forward) or 4 (backward); ``sms``: multiprocessors of the device. The walks
    are cut into segments when their ``chains * B * H`` programs would leave the multiprocessors
    short of work (Nsight Compute: each walk's chain of chunks is bound by latency, not bytes),
    at most about ``sqrt(chunks)`` of them, since the carry kernel folds the segments one after
    the other, and a forward walk of d_k >= 32 stays whole where cutting it shortens no chain of chunk steps
    (:func:`_walk_steps`); the backward's walks are left whole up to :data:`BWD_WHOLE_WALK` chunks (its per-chunk kernel
    then reads each of its four states as stored, not plus a segment's carried fp32 state); a walk left whole
    runs two warps per program when its programs fill every multiprocessor four times over, else four (bf16
    d_k = 16 heads: one, measured fastest at every ViG-H-T stage). Chunk lengths, warps and register caps of the
    per-chunk kernels: :func:`default_launch`; the walk's register cap and pipelining depth: :func:`default_walk`.
    Each is overridden by its ``config`` field (a default register cap or depth is kept only with the default chunk
    length it was measured with).
    """
    if not supports(K, V):
        raise ValueError(f"bigla: the Triton kernels take d_k in (16, 32, 64, 128) and d_v in "
                         f"(16, 32, 64, 128, 256); got d_k={K}, d_v={V}")
    config = config or _DEFAULT
    chunk, warps, regs = default_launch(T, K, V, bf16, chains)
    BT = config.chunk or chunk
    if BT not in (16, 32, 64):
        raise ValueError(f"bigla: chunk must be 16, 32 or 64, got {BT}")
    if config.state_dtype not in (None, "bf16", "fp32"):
        raise ValueError(f"bigla: state_dtype must be 'bf16' or 'fp32', got {config.state_dtype!r}")
    NT = cdiv(T, BT)
    BV = min(config.bv or 64, V)
    BVW = min(V, 64)
    programs = chains * B * H * (V // BVW)
    nseg = config.segments
    if nseg is None:
        whole = programs >= 8 * sms or NT < 8 or (chains == 4 and NT <= BWD_WHOLE_WALK)
        nseg = 1 if whole else min(cdiv(8 * sms, programs), math.isqrt(NT) + 1)
        if chains == 2 and K >= 32 and nseg > 1:  # a forward walk: whole where cutting shortens no chain of steps
            nseg = nseg if _walk_steps(programs, NT, nseg, sms) < _walk_steps(programs, NT, 1, sms) else 1
    seg = cdiv(NT, max(1, min(nseg, NT)))
    # walks not cut into segments and at least four programs per multiprocessor: two warps each (more of
    # them resident; measured 3-5% faster at 224 for ViG-T / ViG-S / ViG-H-T stage 3, kernel_bigla_tune_walk);
    # segmented walks (few, long chains) keep four (two were 15% slower for ViG-T at 1024)
    warps_walk = 2 if seg >= NT and programs >= 4 * sms else 4
    if bf16 and K <= 16 and V <= 64:  # ViG-H's heads: one warp per walk (3-7% off forward+backward at every
        warps_walk = 1  # ViG-H-T stage, T = 196 to 16384; kernel_bigla_tune_walk_h.json)
    if BV > 64:  # an explicit value block above 64
        warps = 8
    walk_regs, walk_stages = default_walk(T, K, V, bf16)
    cap = config.bwd_regs if chains == 4 and config.bwd_regs is not None else config.regs
    if BT != chunk:  # the default caps and depth were measured with the default chunk length
        regs = walk_regs = walk_stages = 0
    warps_walk = config.warps_walk or warps_walk
    # the in-chunk prefix sums on the tensor cores: bf16 at 64-token chunks; in the walk only with more than one
    # warp (one holds the whole [BT, BT] triangle: ViG-H-T stage 1's backward walk @512, d_k = 16, took 255
    # registers and spilled, against 142 without, and its forward + backward read 7% slower); in the backward's
    # per-chunk kernel only at d_k >= 32 (that layer's backward kernel read 4% slower with them at d_k = 16:
    # kernel_bigla_k16_ab.json)
    mma = bf16 and BT == 64
    nseg = cdiv(NT, seg)
    # the backward's per-chunk kernel stores each gradient as it is formed at 64-token chunks of whole walks (ViG-T
    # @512, @1024: no spills left, forward + backward -5.2 to -5.6% on an H100) and of d_k = 16's segmented ones
    # (ViG-H-T stage 1 @512: -3.3%); elsewhere it stores all three at the end (with the early stores ViG-T @2048 b8,
    # segmented, read +2.0%: kernel_bigla_bwd_order_rule_ab.json; 16-token chunks under the 80-register cap spilled
    # more and read +8.5 to +24%: kernel_bigla_bwd_order_ab.json)
    return _Plan(BT=BT, NT=NT, BV=BV, NV=V // BV, BVW=BVW, NVW=V // BVW, seg=seg,
                 nseg=nseg, warps_walk=warps_walk,
                 warps_chunk=config.warps_chunk or warps, regs=regs if cap is None else cap,
                 state_fp32=not bf16 or config.state_dtype == "fp32",
                 steep_pass=BT == 64 and chains == 2 if config.steep_pass is None else bool(config.steep_pass),
                 walk_regs=walk_regs if config.walk_regs is None else config.walk_regs,
                 walk_stages=walk_stages if config.walk_stages is None else config.walk_stages,
                 mma=mma, walk_mma=mma and warps_walk > 1, bwd_mma=mma and K >= 32,
                 bwd_order=BT == 64 and (nseg == 1 or K <= 16))


def _plan_for(q: torch.Tensor, V: int, chains: int, config: BiGLAConfig | None) -> _Plan:
    B, T, H, K = q.shape
    index = q.device.index
    sms = multiprocessors(index if index is not None else torch.cuda.current_device()) if q.is_cuda else 132
    return planned(plan, B, T, H, K, V, q.dtype == torch.bfloat16, sms, chains, config)


def _strided(q, k, v, gf, gb):
    """The inputs as the kernels read them: unit last stride; q and k, gf and gb sharing strides
    (true of column slices of one projection); copies only where that fails."""
    sq, sg = q.stride(), gf.stride()
    if sq[-1] == 1 and sg[-1] == 1 and v.stride(-1) == 1 and sq == k.stride() and sg == gb.stride():
        return q, k, v, gf, gb  # the model's layout: checked in one pass
    q, k, v, gf, gb = (unit_stride(t) for t in (q, k, v, gf, gb))
    if q.stride() != k.stride():
        q, k = q.contiguous(), k.contiguous()
    if gf.stride() != gb.stride():
        gf, gb = gf.contiguous(), gb.contiguous()
    return q, k, v, gf, gb


_HALF_DOTS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _half_dots(q: torch.Tensor) -> int:
    """The kernels' ``HALF_DOTS`` (see ``_dot``, ``_hdot``): 0, 1, 2 for fp32, fp16, bf16 inputs."""
    return _HALF_DOTS[q.dtype]


def _gated(q: torch.Tensor, gate_normalizer: float | None) -> int:
    """The kernels' ``GATED`` (see ``_load_gate``): 0 for log decays; for gate logits 2 with half-precision
    inputs on a GPU (the hardware logarithm), else 1."""
    if gate_normalizer is None:
        return 0
    return 2 if q.is_cuda and q.dtype != torch.float32 else 1


def _options(regs: int, stages: int = 0) -> dict:
    """Triton launch options: a register cap (``maxnreg``) and a software-pipelining depth (``num_stages``), each
    where set (0: Triton's default)."""
    return {**({"maxnreg": regs} if regs else {}), **({"num_stages": stages} if stages else {})}


_TRIANGLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def triangles(BT: int, device: torch.device) -> torch.Tensor:
    """``[2, BT, BT]`` bf16: the lower triangle of ones (diagonal included) and the upper one, what
    :func:`_prefix_sums` multiplies by; made once per chunk length and device. Not kept when made while tracing or
    under a dispatch mode (fake tensors must not meet a real one) or while a CUDA graph is captured (its fill would
    run only in replays: an eager call after would read unwritten memory); then made in the graph."""
    traced, key = via_dispatcher(), (BT, device)
    if not traced and key in _TRIANGLES:
        return _TRIANGLES[key]
    ones = torch.ones(BT, BT, dtype=torch.bfloat16, device=device)
    tri = torch.stack([ones.tril(), ones.triu()])
    if not (traced or _capturing(device)):
        _TRIANGLES[key] = tri
    return tri


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _walks(q, k, v, do, gf, gb, p: _Plan, chains: int, ginv: float, half_scale: float, gated: int,
           wrap):
    """Launch the walk (and carry) kernels; returns ``(h, hs, dec)`` for the per-chunk kernels."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    BH = B * H
    f32 = dict(dtype=torch.float32, device=q.device)
    h = torch.empty(chains, BH, p.NT, K, V, dtype=torch.float32 if p.state_fp32 else q.dtype,
                    device=q.device)
    segmented = p.nseg > 1
    hs = torch.empty(chains, BH, p.nseg, K, V, **f32) if segmented else h
    dec = torch.empty(chains, BH, p.NT + p.nseg, K, **f32) if segmented else h
    tri = triangles(p.BT, q.device) if p.walk_mma else h
    wrap(_bigla_walk_kernel)[(chains * p.NVW, p.nseg, BH)](
        q, k, v, v if do is None else do, gf, gb, h, hs, dec, tri, T, H, p.NT, p.seg, p.nseg, ginv, half_scale,
        *q.stride()[:3], *v.stride()[:3], *gf.stride()[:3],
        K=K, V=V, BT=p.BT, BV=p.BVW, NV=p.NVW, GATED=gated, HALF_DOTS=_half_dots(q),
        SEGMENTED=segmented, MMA=p.walk_mma, num_warps=p.warps_walk, **_options(p.walk_regs, p.walk_stages))
    if segmented:
        wrap(_bigla_carry_kernel)[(chains * p.NVW, BH)](hs, dec, p.NT, p.nseg, K=K, V=V, BV=p.BVW,
                                                  NV=p.NVW, num_warps=4)
    return h, hs, dec


def bigla_fwd_triton(q, k, v, gf, gb, scale: float, gate_normalizer: float | None = None,
                     config: BiGLAConfig | None = None, wrap=direct, mix: tuple | None = None) -> torch.Tensor:
    """``[B, T, H, V]`` contiguous output in ``q.dtype``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; gf, gb: ``[B, T, H, K]`` log decays, or with
            ``gate_normalizer`` gate logits (log decays ``logsigmoid(z) / gate_normalizer``).
            Read in place when their last stride is 1.
        config: launch choices (:class:`BiGLAConfig`), default :func:`plan`'s.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``, else the kernels themselves.
        mix: ``(x, z, w_o, w_l, eps, act)``: the output is ViG's locality mix of BiGLA's
            (:func:`vigla.ops.locality_mix.locality_mix`; ``x``, ``z``: ``[B, T, H * V]``, read in place when their
            last stride is 1), formed by the output kernel from its fp32 tile (:func:`mixes` says where it applies).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, gf, gb = _strided(q, k, v, gf, gb)
    p = _plan_for(q, V, 2, config)
    gated = _gated(q, gate_normalizer)
    ginv = 1.0 / float(gate_normalizer) if gated else 1.0
    h, hs, dec = _walks(q, k, v, None, gf, gb, p, 2, ginv, 0.5 * scale, gated, wrap)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    if mix is None:
        x, z, w_o, w_l, eps, act = o, o, o, o, 0.0, False
    else:
        x, z, w_o, w_l, eps, act = mix
        x, z = (unit_stride(t.reshape(B, T, H * V)) for t in (x, z))
        w_o, w_l = w_o.contiguous(), w_l.contiguous()
        if p.NV != 1:
            raise ValueError(f"bigla: the locality mix needs one value block per head (d_v <= 64), got d_v={V}")
    # with a steep pass: pass 1 writes each chunk's steep flag, pass 2 reads it
    steep = torch.empty(B * H * p.NT * p.NV, dtype=torch.int8, device=q.device) if p.steep_pass else o
    tri = triangles(p.BT, q.device) if p.mma else o
    for step in (1, 2) if p.steep_pass else (0,):
        wrap(_bigla_fwd_kernel)[(p.NV, p.NT, B * H)](
            q, k, v, gf, gb, o, h, hs, dec, steep, tri, T, H, p.NT, p.seg, p.nseg, ginv, 0.5 * scale,
            *q.stride()[:3], *v.stride()[:3], *gf.stride()[:3], x, z, w_o, w_l, eps, *x.stride()[:2],
            *z.stride()[:2], K=K, V=V, BT=p.BT, BV=p.BV, GATED=gated, HALF_DOTS=_half_dots(q),
            SEGMENTED=p.nseg > 1, MIX=mix is not None, ACT=act, PASS=step, MMA=p.mma, num_warps=p.warps_chunk,
            **_options(p.regs))
    return o


def mixes(K: int, V: int) -> bool:
    """Whether :func:`bigla_fwd_triton` forms the locality mix for heads of ``d_k = K``, ``d_v = V`` (a head's
    values in one program: the default value block, 64)."""
    return supports(K, V) and V <= 64


def bigla_bwd_triton(q, k, v, gf, gb, do, scale: float, gate_normalizer: float | None = None,
                     config: BiGLAConfig | None = None, wrap=direct):
    """``(dq, dk, dv, dgf, dgb)`` of ``<do, bigla_fwd_triton(...)>`` in the inputs' dtypes (with
    ``gate_normalizer``: the gradients of the gate logits). ``do``: ``[B, T, H, V]``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, gf, gb = _strided(q, k, v, gf, gb)
    do = do.to(q.dtype).contiguous()
    p = _plan_for(q, V, 4, config)
    gated = _gated(q, gate_normalizer)
    ginv = 1.0 / float(gate_normalizer) if gated else 1.0
    h, hs, dec = _walks(q, k, v, do, gf, gb, p, 4, ginv, 0.5 * scale, gated, wrap)
    f32 = dict(dtype=torch.float32, device=q.device)
    part = (p.NV, B, T, H, K)
    # the forward scan's shares, then the backward scan's added to them
    shares = dict(f32, dtype=handoff_dtype(q.dtype))
    pq, pk, pv = torch.empty(part, **shares), torch.empty(part, **shares), torch.empty(B, T, H, V, **shares)
    dv = torch.empty(B, T, H, V, dtype=v.dtype, device=q.device)
    if p.NV == 1:  # written in the outputs' dtypes directly
        dq, dk = q.new_empty(part), k.new_empty(part)
        dgf, dgb = gf.new_empty(part), gb.new_empty(part)
    else:  # fp32 partials per value block, summed below
        dq, dk, dgf, dgb = (torch.empty(part, **f32) for _ in range(4))
    # with a steep pass, each scan's pass 1 writes the chunks' steep flags and its pass 2 reads them
    steep = torch.empty(B * H * p.NT * p.NV, dtype=torch.int8, device=q.device) if p.steep_pass else dv
    tri = triangles(p.BT, q.device) if p.bwd_mma else dv
    for upper, g, outs, dg in ((0, gf, (pq, pk, pv), dgf), (1, gb, (dq, dk, dv), dgb)):
        for step in (1, 2) if p.steep_pass else (0,):
            wrap(_bigla_bwd_kernel)[(p.NV, p.NT, B * H)](
                q, k, v, g, do, *outs, dg, pq, pk, pv, h, hs, dec, steep, tri, T, H, p.NT, p.seg, p.nseg, ginv,
                0.5 * scale, *q.stride()[:3], *v.stride()[:3], *gf.stride()[:3],
                K=K, V=V, BT=p.BT, BV=p.BV, GATED=gated, HALF_DOTS=_half_dots(q),
                SEGMENTED=p.nseg > 1, UPPER=upper, PASS=step, MMA=p.bwd_mma, ORDER=p.bwd_order,
                num_warps=p.warps_chunk,
                **_options(p.regs))
    if p.NV == 1:
        return dq[0], dk[0], dv, dgf[0], dgb[0]
    return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, dgf.sum(0).to(gf.dtype),
            dgb.sum(0).to(gb.dtype))
