"""BiGLA operator: every backend against the float64 naive recurrence."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from vigla.ops.bigla import (bigla, bigla_chunked, bigla_chunked_bwd, bigla_gated, bigla_macs, bigla_naive,
                             log_decays)
from vigla.ops.dispatch import reference_ops


def make_inputs(B, T, H, K, V, dtype=torch.float64, gate_scale=1.0, gate_shift=0.0, requires_grad=False):
    q = torch.randn(B, T, H, K, dtype=dtype)
    k = torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    gf = F.logsigmoid(torch.randn(B, T, H, K, dtype=dtype) * gate_scale + gate_shift)
    gb = F.logsigmoid(torch.randn(B, T, H, K, dtype=dtype) * gate_scale + gate_shift)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, gf, gb)]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def closed_form(q, k, v, gf, gb, scale):
    """BiGLA's closed form (ViG, Sec. 3.2: both scans' decayed sums written out), O(T^2), float64: the
    definition the recurrences must match."""
    B, T, H, K = q.shape
    cf = gf.cumsum(1)  # prod_{r=j+1..t} a_r = exp(cf_t - cf_j)
    cb = gb.flip(1).cumsum(1).flip(1)  # prod_{r=t..j-1} b_r = exp(cb_t - cb_j)
    i = torch.arange(T)
    fwd = (i[:, None] >= i[None, :])[None, :, :, None, None]
    bwd = (i[:, None] <= i[None, :])[None, :, :, None, None]
    df = torch.where(fwd, cf[:, :, None] - cf[:, None, :], -math.inf).exp()  # [B, t, j, H, K]
    db = torch.where(bwd, cb[:, :, None] - cb[:, None, :], -math.inf).exp()
    w = torch.einsum("bthk,bjhk,btjhk->bthj", q, k, df + db)
    return 0.5 * scale * torch.einsum("bthj,bjhv->bthv", w, v)


@pytest.mark.parametrize("T", [1, 2, 7, 33])
def test_naive_matches_closed_form(T):
    x = make_inputs(2, T, 2, 4, 3)
    torch.testing.assert_close(bigla_naive(*x, 0.5), closed_form(*x, 0.5), rtol=1e-12, atol=1e-12)


SHAPES = [  # B, T, H, K, V
    (1, 1, 1, 4, 4), (2, 2, 3, 8, 16), (1, 63, 2, 16, 32), (2, 64, 1, 32, 64), (1, 65, 3, 32, 64),
    (2, 196, 3, 32, 64), (1, 1000, 2, 16, 32), (3, 49, 4, 16, 8),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_forward_and_grads_float64(shape):
    B, T, H, K, V = shape
    x = make_inputs(*shape, requires_grad=True)
    ref = bigla_naive(*x, K ** -0.5)
    out = bigla_chunked(*x, K ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if T > 200:  # naive backward through 1000 steps is slow; forward above is the check there
        return
    do = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, x, do)
    g_out = torch.autograd.grad(out, x, do)
    g_man = bigla_chunked_bwd(*[t.detach() for t in x], do, K ** -0.5)
    for name, a, b, c in zip(["q", "k", "v", "log_gf", "log_gb"], g_out, g_man, g_ref):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9, msg=f"autograd d{name}")
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-9, msg=f"hand-written d{name}")


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
def test_chunk_size_does_not_change_result(chunk):
    x = make_inputs(2, 70, 2, 8, 8)
    torch.testing.assert_close(bigla_chunked(*x, 0.3, chunk=chunk), bigla_naive(*x, 0.3),
                               rtol=1e-11, atol=1e-11)


def test_op_path_forward_backward_against_naive():
    """The public op (chunked forward + hand-written backward on CPU)."""
    x = make_inputs(2, 45, 3, 8, 12, requires_grad=True)
    ref = bigla_naive(*x, 8 ** -0.5)
    out = bigla(*x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    do = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, x, do), torch.autograd.grad(ref, x, do)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gradcheck_chunked_and_op():
    x = make_inputs(1, 6, 2, 3, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: bigla_chunked(*t, 0.5), x)
    assert torch.autograd.gradcheck(lambda *t: bigla(*t), x)
    assert torch.autograd.gradcheck(lambda *t: torch.ops.vigla.bigla_fwd(*t, 0.5), x)
    assert torch.autograd.gradcheck(lambda *t: bigla_naive(*t, 0.5), x)


def test_extreme_gates_stay_exact():
    """log decay -20 per token (and ~0) over a long sequence: finite and equal to the reference."""
    B, T, H, K, V = 1, 300, 2, 8, 8
    q, k, v, _, _ = make_inputs(B, T, H, K, V)
    strong = torch.full((B, T, H, K), -20.0, dtype=torch.float64)
    weak = torch.full((B, T, H, K), -1e-6, dtype=torch.float64)
    mixed = torch.where(torch.rand(B, T, H, K) < 0.5, strong, weak)
    for gf, gb in [(strong, strong), (weak, weak), (mixed, strong), (weak, mixed)]:
        gf = gf.clone().requires_grad_()
        ref = bigla_naive(q, k, v, gf, gb, 0.5)
        out = bigla(q, k, v, gf, gb, 0.5)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
        g = torch.autograd.grad(out.sum(), gf)[0]
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, torch.autograd.grad(ref.sum(), gf)[0], rtol=1e-8, atol=1e-8)
    # with -20 per token only the diagonal survives in both directions: o_t = s * (q_t . k_t) v_t
    out = bigla(q, k, v, strong, strong, 0.5)
    torch.testing.assert_close(out, 0.5 * (q * k).sum(-1, keepdim=True) * v, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_tolerance(dtype, tol):
    x64 = make_inputs(2, 196, 3, 32, 64)
    ref = bigla_naive(*x64, 32 ** -0.5)
    x = [t.to(dtype) for t in x64]
    out = bigla(*x)
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    xg = [t.to(dtype).requires_grad_() for t in x64]
    xr = [t.clone().requires_grad_() for t in x64]
    do = torch.randn(ref.shape, dtype=torch.float64)
    ga = torch.autograd.grad(bigla(*xg), xg, do.to(dtype))
    gr = torch.autograd.grad(bigla_naive(*xr, 32 ** -0.5), xr, do)
    for a, b, t in zip(ga, gr, xg):
        assert a.dtype == t.dtype
        assert rel_err(a, b) < 5 * tol


def test_mixed_gate_dtype_under_autocast_style_inputs():
    """bf16 q/k/v with float32 gates (what autocast produces) are accepted; output is bf16."""
    q, k, v, gf, gb = make_inputs(1, 20, 2, 8, 8)
    out = bigla(q.bfloat16(), k.bfloat16(), v.bfloat16(), gf.float(), gb.float())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, bigla_naive(q, k, v, gf, gb, 8 ** -0.5)) < 1e-2


@pytest.mark.parametrize("bad,match", [
    (lambda x: (x[0][:, :, :, :-1], *x[1:]), "k must have q's shape"),
    (lambda x: (x[0], x[1], x[2][:, :-1], x[3], x[4]), "v must be"),
    (lambda x: (x[0][0], *x[1:]), "4-D"),
    (lambda x: (x[0].long(), *x[1:]), "floating-point"),
    (lambda x: (x[0].float(), *x[1:]), "share a dtype"),
])
def test_bad_input_errors(bad, match):
    x = make_inputs(1, 5, 2, 4, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        bigla(*bad(x))


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf")])
def test_log_decays_outside_their_range_are_refused(bad):
    """``bigla`` takes log decays <= 0: a positive or non-finite value is an error, not an output of
    1e12 (gate logits belong in ``bigla_gated``)."""
    q, k, v, gf, gb = make_inputs(1, 5, 1, 4, 4)
    gb = gb.clone()
    gb[0, 2, 0, 1] = bad
    with pytest.raises(ValueError, match=r"bigla: log_gb must hold finite log decays <= 0"):
        bigla(q, k, v, gf, gb)


def test_custom_op_opcheck_and_flop_formula():
    from torch.utils.flop_counter import FlopCounterMode

    x = make_inputs(2, 10, 3, 4, 6, dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.vigla.bigla_fwd.default, (*x, 0.5))
    assert bigla_macs((2, 10, 3, 4), (2, 10, 3, 6)) == 2 * 2 * 2 * 10 * 3 * 4 * 6
    with FlopCounterMode(display=False) as counter:
        bigla(*x).sum().backward()
    # forward 2*MACs, backward twice the forward
    assert counter.get_total_flops() == 3 * 2 * bigla_macs(x[0].shape, x[2].shape)


def test_compile_traces_without_graph_break():
    import torch._dynamo

    def f(q, k, v, gf, gb):
        return bigla(q * 2, k, v, gf, gb).relu()

    x = make_inputs(1, 9, 2, 4, 4, dtype=torch.float32)
    explained = torch._dynamo.explain(f)(*x)
    assert explained.graph_break_count == 0


# ---------------------------------------------------------------------------------------------
# bigla_gated: log decays logsigmoid(z) / normalizer formed inside the op

def _logits(B, T, H, K, shift=0.0, requires_grad=True):
    return [(torch.randn(B, T, H, K, dtype=torch.float64) * 3 + shift).requires_grad_(requires_grad)
            for _ in range(2)]


@pytest.mark.parametrize("via", ["function", "custom op"])
@pytest.mark.parametrize("shift, normalizer", [(0.0, 16.0), (10.0, 16.0), (-8.0, 1.0)])
def test_gated_equals_bigla_of_the_log_decays(via, shift, normalizer):
    q, k, v, _, _ = make_inputs(2, 40, 2, 8, 6, requires_grad=True)
    zf, zb = _logits(2, 40, 2, 8, shift)
    x = [q, k, v, zf, zb]
    if via == "function":
        out = bigla_gated(*x, normalizer)
    else:
        out = torch.ops.vigla.bigla_fwd(*x, 8 ** -0.5, normalizer)
    ref = bigla_naive(q, k, v, F.logsigmoid(zf) / normalizer, F.logsigmoid(zb) / normalizer, 8 ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    do = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, x, do), torch.autograd.grad(ref, x, do)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gated_gradcheck_of_the_op():
    q, k, v, _, _ = make_inputs(1, 6, 2, 3, 2, requires_grad=True)
    x = [q, k, v, *_logits(1, 6, 2, 3)]
    assert torch.autograd.gradcheck(lambda *t: bigla_gated(*t, 4.0), x)


def test_gated_takes_low_precision_logits_and_returns_their_dtype():
    q, k, v, _, _ = make_inputs(1, 20, 2, 4, 4, dtype=torch.float32)
    zf, zb = (z.detach().bfloat16().requires_grad_() for z in _logits(1, 20, 2, 4))
    out = bigla_gated(q, k, v, zf, zb, 16.0)
    ref = bigla(q, k, v, log_decays(zf, 16.0), log_decays(zb, 16.0))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    gf, gb = torch.autograd.grad(out.sum(), [zf, zb])
    assert gf.dtype == gb.dtype == torch.bfloat16


def test_gated_bad_input_names_the_logits():
    q, k, v, zf, zb = make_inputs(1, 5, 2, 4, 4)
    with pytest.raises(ValueError, match=r"bigla_gated: zb must have q's shape"):
        bigla_gated(q, k, v, zf, zb[:, :, :1], 16.0)
    with pytest.raises(TypeError, match=r"bigla_gated: zf must be a floating-point tensor"):
        bigla_gated(q, k, v, zf.long(), zb, 16.0)


@pytest.mark.parametrize("normalizer", [0.0, -1.0, None, "16", True, float("nan"), float("inf"), 1e-40, 1e-50])
def test_gated_rejects_a_bad_normalizer(normalizer):
    """Tiny normalizers included: float32 would hold 1e-50 as 0 and 1 / 1e-40 as inf (the CPU kernel then read
    the logits as log decays)."""
    q, k, v, zf, zb = make_inputs(1, 5, 1, 4, 4)
    with pytest.raises(ValueError, match=r"gate_normalizer must be a number in \[1.18e-38, 3.4e\+38\]"):
        bigla_gated(q, k, v, zf, zb, normalizer)


def test_gated_takes_numpy_and_extreme_normalizers():
    """Any real number in float32's normal range, numpy's included, against the float64 recurrence."""
    np = pytest.importorskip("numpy")
    q, k, v, zf, zb = make_inputs(1, 9, 2, 4, 4, dtype=torch.float32)
    for normalizer in (np.float32(2.0), 2e-38, 1e30):
        out = bigla_gated(q, k, v, zf, zb, normalizer)
        g = float(normalizer)
        ref = bigla_naive(q.double(), k.double(), v.double(), log_decays(zf.double(), g), log_decays(zb.double(), g),
                          0.5)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 5, 2, 3, 4), (2, 0, 2, 3, 4), (2, 5, 0, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reference", [False, True])
def test_empty_inputs(shape, dtype, reference):
    """No batch, tokens or heads: an empty output and empty gradients, on every path."""
    B, T, H, K, V = shape
    inputs = [t.requires_grad_() for t in make_inputs(B, T, H, K, V, dtype=dtype)]
    with reference_ops() if reference else contextlib.nullcontext():
        out = bigla(*inputs)
        grads = torch.autograd.grad(out.sum(), inputs)
    assert out.shape == (B, T, H, V) and out.dtype == dtype
    assert [g.shape for g in grads] == [t.shape for t in inputs]


@pytest.mark.parametrize("K, V", [(0, 4), (4, 0)])
def test_zero_width_heads_are_refused(K, V):
    q, k, v, gf, gb = make_inputs(1, 5, 2, K, V)
    with pytest.raises(ValueError, match="heads need d_k >= 1 and d_v >= 1"):
        bigla(q, k, v, gf, gb)


def test_gated_custom_op_opcheck():
    q, k, v, _, _ = make_inputs(2, 10, 3, 4, 6, dtype=torch.float32, requires_grad=True)
    zf, zb = (z.detach().float().requires_grad_() for z in _logits(2, 10, 3, 4))
    torch.library.opcheck(torch.ops.vigla.bigla_fwd.default, (q, k, v, zf, zb, 0.5, 16.0))


# ---------------------------------------------------------------------------------------------
# chunked: exact for any finite log decays, static control flow (torch.export with a dynamic T)

def _decay_patterns(B, T, H, K, generator):
    """Log decays that stress the chunked form: steep (-20 per token, the steepest ViG's gates
    reach in practice), ~0, far beyond the float32 range (-1000), per-token and per-channel
    mixtures of steep and flat, and steep-then-flat in every channel (long-range decay after
    a steep stretch: small exponents after large prefix sums)."""
    shape = (B, T, H, K)
    steep = torch.full(shape, -20.0, dtype=torch.float64)
    flat = torch.full(shape, -1e-6, dtype=torch.float64)
    tokens = torch.rand(shape, generator=generator) < 0.5
    channels = torch.rand(1, 1, H, K, generator=generator) < 0.5
    first_half = (torch.arange(T) < T // 2)[None, :, None, None]
    return {
        "steep": (steep, steep),
        "flat": (flat, flat),
        "beyond_float32": (torch.full(shape, -1000.0, dtype=torch.float64), flat),
        "per_token_mix": (torch.where(tokens, steep, flat), steep),
        "per_channel_mix": (torch.where(channels, steep, flat), torch.where(channels, flat, steep)),
        "steep_then_flat": (torch.where(first_half, steep, flat), torch.where(first_half, flat, steep)),
        "logsigmoid_x3": tuple(F.logsigmoid(torch.randn(shape, generator=generator, dtype=torch.float64) * 3)
                               for _ in range(2)),
    }


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("T", [1, 45, 97])
def test_chunked_exact_for_any_decay(dtype, tol, T):
    """Forward, autograd and the hand-written backward against the float64 recurrence, for every
    gate pattern; T = 45 and 97 are not multiples of the chunk. Gradients are compared relative
    to the largest gradient of their tensor family (steep gates make the log-decay gradients
    themselves tiny, so their relative error is meaningless)."""
    gen = torch.Generator().manual_seed(T)
    B, H, K, V = 2, 2, 8, 6
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    for name, (gf, gb) in _decay_patterns(B, T, H, K, gen).items():
        x_ref = [t.clone().requires_grad_() for t in (q, k, v, gf, gb)]
        ref = bigla_naive(*x_ref, 0.5)
        g_ref = torch.autograd.grad(ref, x_ref, do)
        x = [t.to(dtype).clone().requires_grad_() for t in (q, k, v, gf, gb)]
        out = bigla_chunked(*x, 0.5)
        assert out.dtype == dtype and torch.isfinite(out).all(), name
        assert rel_err(out, ref) < tol, (name, rel_err(out, ref))
        g_auto = torch.autograd.grad(out, x, do.to(dtype))
        g_hand = bigla_chunked_bwd(*[t.detach() for t in x], do.to(dtype), 0.5)
        scale = max(g.abs().max().item() for g in g_ref)
        for which, grads in (("autograd", g_auto), ("hand-written", g_hand)):
            for i, (a, b) in enumerate(zip(grads, g_ref)):
                assert a.dtype == dtype and torch.isfinite(a).all(), (name, which, i)
                err = (a.double() - b).abs().max().item() / scale
                assert err < 10 * tol, (name, which, i, err)


def test_chunked_decay_factors_in_float32_only_when_they_stay_in_range():
    """Eager float32 work keeps the intra-chunk decay factors in float32 when no chunk decays by more
    than e^-60 in total (ViG's gates), float64 past it and always while a dispatch mode or a tracer
    watches (no data-dependent branch there); the float32 choice still matches the recurrence."""
    from torch.utils.flop_counter import FlopCounterMode

    from vigla.ops.bigla.chunked import _factor_dtype

    gen = torch.Generator().manual_seed(7)
    vig = F.logsigmoid(torch.randn(2, 1, 2, 56, 8, generator=gen) * 4) / 16  # ViG's log decays
    assert _factor_dtype(vig, torch.float32, 2, 28) == torch.float32
    assert _factor_dtype(vig.double(), torch.float64, 2, 28) == torch.float64
    steep = vig.clone()
    steep[1, 0, 1, 30:33] = -21.0  # one chunk of one scan: 63 below zero in total
    assert _factor_dtype(steep, torch.float32, 2, 28) == torch.float64
    with FlopCounterMode(display=False):
        assert _factor_dtype(vig, torch.float32, 2, 28) == torch.float64
    x64 = make_inputs(2, 56, 2, 8, 6)
    x64[3], x64[4] = (F.logsigmoid(torch.randn(2, 56, 2, 8, generator=gen, dtype=torch.float64) * 4) / 16
                      for _ in range(2))
    xs = [t.requires_grad_() for t in x64]
    ref = bigla_naive(*xs, 0.5)
    do = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, xs, do)
    assert rel_err(bigla_chunked(*[t.detach().float() for t in xs], 0.5), ref) < 1e-6
    for a, b in zip(bigla_chunked_bwd(*[t.detach().float() for t in xs], do.float(), 0.5), g_ref):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_chunked_on_random_shapes(dtype, tol):
    """Fresh random shapes (B, T, H, K, V), T from 1 to 300, random chunk lengths."""
    gen = torch.Generator().manual_seed(1234)
    for _ in range(6):
        B, H = (int(torch.randint(1, 4, (), generator=gen)) for _ in range(2))
        T = int(torch.randint(1, 301, (), generator=gen))
        K, V = (int(torch.randint(1, 17, (), generator=gen)) for _ in range(2))
        chunk = int(torch.randint(1, 65, (), generator=gen))
        x64 = make_inputs(B, T, H, K, V, gate_scale=3.0)
        ref = bigla_naive(*x64, 0.7)
        out = bigla_chunked(*[t.to(dtype) for t in x64], 0.7, chunk=chunk)
        assert rel_err(out, ref) < tol, (B, T, H, K, V, chunk)
        if T <= 100:
            xs = [t.requires_grad_() for t in x64]
            do = torch.randn_like(ref)
            g_ref = torch.autograd.grad(bigla_naive(*xs, 0.7), xs, do)
            g_hand = bigla_chunked_bwd(*[t.detach().to(dtype) for t in xs], do.to(dtype), 0.7, chunk=chunk)
            for a, b in zip(g_hand, g_ref):
                assert rel_err(a, b) < 20 * tol, (B, T, H, K, V, chunk)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_chunked_long_sequence(dtype, tol):
    """T = 20000 (715 chunks): steep then flat in the forward scan (the flat half's decays
    accumulate after a large prefix sum), slowly decaying backward scan. (float32: a 715-step
    state recurrence rounds like the token-by-token one, ~1e-6.)"""
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 20000, 1, 4, 4
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    first_half = (torch.arange(T) < T // 2)[None, :, None, None]
    gf = torch.where(first_half, -20.0, -1e-4).to(torch.float64).expand(B, T, H, K)
    gb = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) - 6)
    ref = bigla_naive(q, k, v, gf, gb, 0.5)
    out = bigla_chunked(*(t.to(dtype) for t in (q, k, v, gf, gb)), 0.5)
    assert rel_err(out, ref) < tol


def test_chunked_torch_export_with_dynamic_length():
    """``torch.export`` of a function calling ``bigla_chunked`` with a dynamic sequence length
    (no data-dependent branch to trip on; T = 1 included): the program traced at T = 50 runs at
    other lengths, padded or not, one chunk or many, and matches the recurrence."""
    class Mixer(torch.nn.Module):
        def forward(self, q, k, v, gf, gb):
            return bigla_chunked(q, k, v, gf, gb, 0.25) * 2

    def inputs(T):
        gen = torch.Generator().manual_seed(T)
        x = [torch.randn(2, T, 2, d, generator=gen) for d in (4, 4, 6)]
        return x + [F.logsigmoid(torch.randn(2, T, 2, 4, generator=gen) * 4) for _ in range(2)]

    T = torch.export.Dim("T", min=1, max=100_000)
    program = torch.export.export(Mixer(), tuple(inputs(50)),
                                  dynamic_shapes={n: {1: T} for n in ("q", "k", "v", "gf", "gb")})
    for length in (1, 28, 29, 50, 196, 301):
        x = inputs(length)
        out = program.module()(*x)
        ref = bigla_naive(*[t.double() for t in x], 0.25) * 2
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 2e-6, length
