"""Fused bidirectional GLA in Triton: both scans in one launch, forward and backward.

Layout ``[B, T, H, D]`` is read in place (no transposes, no flipped copies, no 2B batch). One
program owns one (batch, head, value-block): it walks the sequence in chunks of ``BT`` tokens,
keeping the ``[K, BV]`` fp32 state in registers.

Forward: a right-to-left pass computes the backward scan and stores ``o^b``; a left-to-right pass
adds the forward scan. Backward: a right-to-left pass carries the backward scan's state ``S^b``
(for ``dq^b``) and the forward scan's state gradient ``dS^f`` (for ``dk^f, dv^f``); a
left-to-right pass carries ``S^f`` (for ``dq^f``) and ``dS^b`` (for ``dk^b, dv^b``), adds the
stored partials and forms the log-decay gradients, which are prefix sums of
``q*dq - k*dk`` per direction. Nothing but the inputs, the output and the gradients touches
memory.

Stability: inside a chunk the decay between tokens i and j is formed per channel as
``exp(b_i - b_j)`` with the exponent <= 0 (a ``[BT, BT, K]`` broadcast on CUDA cores); across
chunks only ``exp(<= 0)`` factors appear. So any finite log decay (-20 per token included) is
exact, as in the chunked reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BT = 16  # tokens per chunk


@triton.jit
def _load_rows(ptr, rows, cols, stride, T, other: tl.constexpr = 0.0):
    """``[BT, len(cols)]`` fp32 tile of rows ``rows`` (masked past T)."""
    mask = rows[:, None] < T
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=other).to(tl.float32)


@triton.jit
def _store_rows(ptr, rows, cols, stride, T, x):
    tl.store(ptr + rows[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=rows[:, None] < T)


@triton.jit
def _decay3(x, sign: tl.constexpr, upper: tl.constexpr, BT: tl.constexpr):
    """``[BT(i), BT(j), K]``: ``exp(sign * (x_i - x_j))`` on the causal (``upper=False``: j <= i)
    or anti-causal (``upper=True``: j >= i) triangle, 0 elsewhere."""
    o = tl.arange(0, BT)
    keep = (o[:, None] >= o[None, :]) if not upper else (o[:, None] <= o[None, :])
    diff = (x[:, None, :] - x[None, :, :]) * sign
    return tl.exp(tl.where(keep[:, :, None], diff, float("-inf")))


@triton.jit(do_not_specialize=["T", "H", "scale"])
def _bigla_fwd_kernel(q, k, v, gf, gb, o, T, H, scale,
                      K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                      PREC: tl.constexpr):
    i_v = tl.program_id(0).to(tl.int64)  # int64: offsets can pass 2**31 elements
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    off_k = (i_b * T * H + i_h) * K
    off_v = (i_b * T * H + i_h) * V
    sk = H * K
    sv = H * V
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    NT = tl.cdiv(T, BT)
    half_scale = 0.5 * scale

    # right to left: the backward scan, o <- o^b
    state = tl.zeros([K, BV], dtype=tl.float32)
    for i in range(0, NT):
        rows = (NT - 1 - i) * BT + ot
        b_q = _load_rows(q + off_k, rows, ck, sk, T)
        b_k = _load_rows(k + off_k, rows, ck, sk, T)
        b_v = _load_rows(v + off_v, rows, cv, sv, T)
        b_g = _load_rows(gb + off_k, rows, ck, sk, T)
        c = tl.cumsum(b_g, axis=0) - b_g  # exclusive: decay from the chunk start to j is exp(c_j)
        tot = tl.sum(b_g, axis=0)
        scores = tl.sum(b_q[:, None, :] * b_k[None, :, :] * _decay3(c, -1.0, True, BT), axis=2)
        out = tl.dot(scores, b_v, input_precision=PREC)
        out += tl.dot(b_q * tl.exp(tot[None, :] - c), state, input_precision=PREC)
        state = state * tl.exp(tot)[:, None] + tl.dot(tl.trans(b_k * tl.exp(c)), b_v, input_precision=PREC)
        _store_rows(o + off_v, rows, cv, sv, T, out * half_scale)
    tl.debug_barrier()

    # left to right: the forward scan, o <- o^b + o^f
    state = tl.zeros([K, BV], dtype=tl.float32)
    for n in range(0, NT):
        rows = n * BT + ot
        b_q = _load_rows(q + off_k, rows, ck, sk, T)
        b_k = _load_rows(k + off_k, rows, ck, sk, T)
        b_v = _load_rows(v + off_v, rows, cv, sv, T)
        b_g = _load_rows(gf + off_k, rows, ck, sk, T)
        b = tl.cumsum(b_g, axis=0)  # inclusive: decay from j to i is exp(b_i - b_j)
        last = tl.sum(b_g, axis=0)
        scores = tl.sum(b_q[:, None, :] * b_k[None, :, :] * _decay3(b, 1.0, False, BT), axis=2)
        out = tl.dot(scores, b_v, input_precision=PREC)
        out += tl.dot(b_q * tl.exp(b), state, input_precision=PREC)
        state = state * tl.exp(last)[:, None] + tl.dot(tl.trans(b_k * tl.exp(last[None, :] - b)), b_v,
                                                       input_precision=PREC)
        prev = _load_rows(o + off_v, rows, cv, sv, T)
        _store_rows(o + off_v, rows, cv, sv, T, prev + out * half_scale)


@triton.jit(do_not_specialize=["T", "H", "scale"])
def _bigla_bwd_kernel(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, T, H, scale,
                      K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                      PREC: tl.constexpr):
    """dq, dk, dgf, dgb: fp32 ``[NV, B, T, H, K]`` partials (summed over value blocks by the
    caller); dv: fp32 ``[B, T, H, V]``."""
    i_v = tl.program_id(0).to(tl.int64)  # int64: offsets can pass 2**31 elements
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    B = tl.num_programs(1) // H
    off_k = (i_b * T * H + i_h) * K
    off_v = (i_b * T * H + i_h) * V
    off_part = i_v * B * T * H * K + off_k  # this value block's slice of the partial buffers
    sk = H * K
    sv = H * V
    ck = tl.arange(0, K)
    cv = i_v * BV + tl.arange(0, BV)
    ot = tl.arange(0, BT)
    NT = tl.cdiv(T, BT)
    half_scale = 0.5 * scale

    # right to left: S^b (for dq^b) and dS^f (for dk^f, dv^f)
    s_b = tl.zeros([K, BV], dtype=tl.float32)
    ds_f = tl.zeros([K, BV], dtype=tl.float32)
    for i in range(0, NT):
        rows = (NT - 1 - i) * BT + ot
        b_q = _load_rows(q + off_k, rows, ck, sk, T)
        b_k = _load_rows(k + off_k, rows, ck, sk, T)
        b_v = _load_rows(v + off_v, rows, cv, sv, T)
        b_do = _load_rows(do + off_v, rows, cv, sv, T) * half_scale
        g_f = _load_rows(gf + off_k, rows, ck, sk, T)
        g_b = _load_rows(gb + off_k, rows, ck, sk, T)
        b = tl.cumsum(g_f, axis=0)
        last = tl.sum(g_f, axis=0)
        c = tl.cumsum(g_b, axis=0) - g_b
        tot = tl.sum(g_b, axis=0)
        d_scores = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)  # [BT(i), BT(j)]: do_i . v_j

        # forward scan: dk^f, dv^f (intra + through dS^f)
        e_f = _decay3(b, 1.0, False, BT)
        scores_f = tl.sum(b_q[:, None, :] * b_k[None, :, :] * e_f, axis=2)
        dk_f = tl.sum(d_scores[:, :, None] * b_q[:, None, :] * e_f, axis=0)
        k_dec = tl.exp(last[None, :] - b)
        dk_f += tl.dot(b_v, tl.trans(ds_f), input_precision=PREC) * k_dec
        dv_f = tl.dot(tl.trans(scores_f), b_do, input_precision=PREC)
        dv_f += tl.dot(b_k * k_dec, ds_f, input_precision=PREC)
        ds_f = ds_f * tl.exp(last)[:, None] + tl.dot(tl.trans(b_q * tl.exp(b)), b_do, input_precision=PREC)

        # backward scan: dq^b (intra + through S^b)
        e_b = _decay3(c, -1.0, True, BT)
        dq_b = tl.sum(d_scores[:, :, None] * b_k[None, :, :] * e_b, axis=1)
        dq_b += tl.dot(b_do, tl.trans(s_b), input_precision=PREC) * tl.exp(tot[None, :] - c)
        s_b = s_b * tl.exp(tot)[:, None] + tl.dot(tl.trans(b_k * tl.exp(c)), b_v, input_precision=PREC)

        _store_rows(dq + off_part, rows, ck, sk, T, dq_b)
        _store_rows(dk + off_part, rows, ck, sk, T, dk_f)
        _store_rows(dv + off_v, rows, cv, sv, T, dv_f)
    tl.debug_barrier()

    # left to right: S^f (for dq^f) and dS^b (for dk^b, dv^b); totals and gate gradients
    s_f = tl.zeros([K, BV], dtype=tl.float32)
    ds_b = tl.zeros([K, BV], dtype=tl.float32)
    carry_b = tl.zeros([K], dtype=tl.float32)
    carry_f = tl.zeros([K], dtype=tl.float32)
    for n in range(0, NT):
        rows = n * BT + ot
        b_q = _load_rows(q + off_k, rows, ck, sk, T)
        b_k = _load_rows(k + off_k, rows, ck, sk, T)
        b_v = _load_rows(v + off_v, rows, cv, sv, T)
        b_do = _load_rows(do + off_v, rows, cv, sv, T) * half_scale
        g_f = _load_rows(gf + off_k, rows, ck, sk, T)
        g_b = _load_rows(gb + off_k, rows, ck, sk, T)
        b = tl.cumsum(g_f, axis=0)
        c = tl.cumsum(g_b, axis=0) - g_b
        tot = tl.sum(g_b, axis=0)
        d_scores = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)

        # forward scan: dq^f
        e_f = _decay3(b, 1.0, False, BT)
        dq_f = tl.sum(d_scores[:, :, None] * b_k[None, :, :] * e_f, axis=1)
        dq_f += tl.dot(b_do, tl.trans(s_f), input_precision=PREC) * tl.exp(b)
        last = tl.sum(g_f, axis=0)
        s_f = s_f * tl.exp(last)[:, None] + tl.dot(tl.trans(b_k * tl.exp(last[None, :] - b)), b_v,
                                                   input_precision=PREC)

        # backward scan: dk^b, dv^b
        e_b = _decay3(c, -1.0, True, BT)
        scores_b = tl.sum(b_q[:, None, :] * b_k[None, :, :] * e_b, axis=2)
        dk_b = tl.sum(d_scores[:, :, None] * b_q[:, None, :] * e_b, axis=0)
        dk_b += tl.dot(b_v, tl.trans(ds_b), input_precision=PREC) * tl.exp(c)
        dv_b = tl.dot(tl.trans(scores_b), b_do, input_precision=PREC)
        dv_b += tl.dot(b_k * tl.exp(c), ds_b, input_precision=PREC)
        ds_b = ds_b * tl.exp(tot)[:, None] + tl.dot(tl.trans(b_q * tl.exp(tot[None, :] - c)), b_do,
                                                    input_precision=PREC)

        dq_b = _load_rows(dq + off_part, rows, ck, sk, T)
        dk_f = _load_rows(dk + off_part, rows, ck, sk, T)
        dv_f = _load_rows(dv + off_v, rows, cv, sv, T)
        # log-decay gradients: dgb_t = sum_{r<=t} w^b_r, dgf_t = sum_{r>=t} w^f_r (finished below)
        w_b = b_q * dq_b - b_k * dk_b
        w_f = b_q * dq_f - b_k * dk_f
        cw_b = tl.cumsum(w_b, axis=0) + carry_b[None, :]
        carry_b += tl.sum(w_b, axis=0)
        cw_f = tl.cumsum(w_f, axis=0) + carry_f[None, :]  # exclusive-of-nothing prefix of w^f
        carry_f += tl.sum(w_f, axis=0)
        _store_rows(dq + off_part, rows, ck, sk, T, dq_b + dq_f)
        _store_rows(dk + off_part, rows, ck, sk, T, dk_f + dk_b)
        _store_rows(dv + off_v, rows, cv, sv, T, dv_f + dv_b)
        _store_rows(dgb + off_part, rows, ck, sk, T, cw_b)
        _store_rows(dgf + off_part, rows, ck, sk, T, cw_f - w_f)  # prefix sum before t
    tl.debug_barrier()
    # dgf_t = total - (prefix before t), in one more light pass
    for n in range(0, NT):
        rows = n * BT + ot
        before = _load_rows(dgf + off_part, rows, ck, sk, T)
        _store_rows(dgf + off_part, rows, ck, sk, T, carry_f[None, :] - before)


def _check_dims(K: int, V: int):
    if K not in (16, 32, 64, 128) or V not in (16, 32, 64, 128, 256):
        raise ValueError(f"bigla triton backend supports d_k in (16, 32, 64, 128) and d_v in "
                         f"(16, 32, 64, 128, 256); got d_k={K}, d_v={V} (use backend='chunked')")


def _launch_config(K: int, V: int, dtype: torch.dtype):
    BV = min(V, 64)
    prec = "ieee" if dtype == torch.float32 else "tf32"
    num_warps = 4 if K <= 32 else 8
    return BV, prec, num_warps


def bigla_fwd_triton(q, k, v, log_gf, log_gb, scale: float) -> torch.Tensor:
    """``[B, T, H, V]`` output in ``q.dtype``; inputs ``[B, T, H, K|V]`` (made contiguous)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_dims(K, V)
    q, k, v, log_gf, log_gb = (t.contiguous() for t in (q, k, v, log_gf, log_gb))
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    BV, prec, num_warps = _launch_config(K, V, q.dtype)
    grid = (triton.cdiv(V, BV), B * H)
    _bigla_fwd_kernel[grid](q, k, v, log_gf, log_gb, o, T, H, scale, K=K, V=V, BT=BT, BV=BV,
                            PREC=prec, num_warps=num_warps)
    return o


def bigla_bwd_triton(q, k, v, log_gf, log_gb, do, scale: float):
    """``(dq, dk, dv, dlog_gf, dlog_gb)`` in the dtypes of the corresponding inputs."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_dims(K, V)
    q, k, v, log_gf, log_gb, do = (t.contiguous() for t in (q, k, v, log_gf, log_gb, do))
    BV, prec, num_warps = _launch_config(K, V, q.dtype)
    NV = triton.cdiv(V, BV)
    part = dict(dtype=torch.float32, device=q.device)
    dq, dk, dgf, dgb = (torch.empty(NV, B, T, H, K, **part) for _ in range(4))
    dv = torch.empty(B, T, H, V, **part)
    _bigla_bwd_kernel[(NV, B * H)](q, k, v, log_gf, log_gb, do, dq, dk, dv, dgf, dgb, T, H, scale,
                                   K=K, V=V, BT=BT, BV=BV, PREC=prec, num_warps=num_warps)
    sums = [x[0] if NV == 1 else x.sum(0) for x in (dq, dk, dgf, dgb)]
    return (sums[0].to(q.dtype), sums[1].to(k.dtype), dv.to(v.dtype), sums[2].to(log_gf.dtype),
            sums[3].to(log_gb.dtype))
