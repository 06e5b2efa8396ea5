"""BiGLA's compiled CPU kernels (``cpu_kernels.c``) against the float64 recurrence."""

import pytest
import torch

from vigla.ops.bigla import bigla, bigla_gated, bigla_naive, cpu_kernels, log_decays
from vigla.ops.bigla.cpu_kernels import bigla_bwd_cpu, bigla_fwd_cpu
from vigla.ops.dispatch import reference_ops

from test_bigla import make_inputs, rel_err

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler: BiGLA's CPU kernel is not built")

SHAPES = [  # B, T, H, K, V (V = 64: the register-blocked path, two tokens per pass and, for odd T, one; K = 32 there:
    # the transposed state in dq's pass, for any V; K = 20, 8: rows whose dot products' lanes are summed one by one
    # after those summed 16 or 8 at a time by the shuffle tree, or all of them)
    (1, 1, 1, 4, 4), (2, 5, 3, 8, 16), (1, 63, 2, 16, 32), (2, 196, 3, 32, 64), (1, 97, 2, 32, 64), (3, 49, 4, 16, 8),
    (1, 300, 1, 64, 128), (2, 50, 2, 20, 64), (1, 33, 1, 8, 64), (1, 40, 2, 32, 16), (2, 33, 1, 32, 100),
    (1, 21, 1, 128, 64),
]


def kernel_inputs(*x64):
    """float32 copies: what the kernel computes in."""
    return [t.float() for t in x64]


def grads_f64(x, do, scale):
    x = [t.detach().clone().requires_grad_() for t in x]
    out = bigla_naive(*x, scale)
    return out.detach(), torch.autograd.grad(out, x, do)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_against_float64(shape):
    B, T, H, K, V = shape
    x64 = make_inputs(*shape, gate_scale=2.0)
    do = torch.randn(B, T, H, V, dtype=torch.float64)
    ref, g_ref = grads_f64(x64, do, 0.3)
    x = kernel_inputs(*x64)
    out = bigla_fwd_cpu(*x, 0.3)
    assert out.dtype == torch.float32 and out.shape == (B, T, H, V)
    assert rel_err(out, ref) < 2e-6
    for name, g, r in zip(["q", "k", "v", "log_gf", "log_gb"], bigla_bwd_cpu(*x, do.float(), 0.3), g_ref):
        assert g.dtype == torch.float32
        if T == 1 and name.startswith("log"):  # one token: no decay is ever applied, the gradient is 0
            assert g.abs().max() < 1e-6
        else:
            assert rel_err(g, r) < 5e-6, name


def test_public_ops_use_it_with_autograd():
    x64 = make_inputs(2, 70, 3, 16, 32)
    x = [t.float().requires_grad_() for t in x64]
    out = bigla(*x)
    do = torch.randn(out.shape)
    with reference_ops():  # the chunked PyTorch path
        xr = [t.detach().clone().requires_grad_() for t in x]
        ref = bigla(*xr)
    assert rel_err(out, ref) < 2e-6
    for a, b in zip(torch.autograd.grad(out, x, do), torch.autograd.grad(ref, xr, do)):
        assert rel_err(a, b) < 5e-6


def test_strided_inputs_match_contiguous_ones_bitwise():
    """q, k, v and the gates as column slices of one projection (what the model passes)."""
    B, T, H, K, V = 2, 40, 3, 8, 16
    proj = torch.randn(B, T, H, 4 * K + V)
    q, k, zf, zb = (proj[..., i * K:(i + 1) * K] for i in range(4))
    v = proj[..., 4 * K:]
    strided = bigla_fwd_cpu(q, k, v, zf, zb, 0.5, 4.0)
    plain = bigla_fwd_cpu(*(t.contiguous() for t in (q, k, v, zf, zb)), 0.5, 4.0)
    assert torch.equal(strided, plain)
    do = torch.randn(B, T, H, V)
    for a, b in zip(bigla_bwd_cpu(q, k, v, zf, zb, do, 0.5, 4.0),
                    bigla_bwd_cpu(*(t.contiguous() for t in (q, k, v, zf, zb)), do, 0.5, 4.0)):
        assert torch.equal(a, b)


def test_gated_op_and_its_logit_gradients_against_float64():
    B, T, H, K, V = 2, 33, 2, 8, 8
    q, k, v, _, _ = make_inputs(B, T, H, K, V)
    zf, zb = torch.randn(B, T, H, K, dtype=torch.float64) * 4, torch.randn(B, T, H, K, dtype=torch.float64) * 4
    x64 = [t.requires_grad_() for t in (q, k, v, zf, zb)]
    ref = bigla_naive(q, k, v, log_decays(zf, 16.0), log_decays(zb, 16.0), K ** -0.5)
    x = [t.detach().float().requires_grad_() for t in x64]
    out = bigla_gated(*x, gate_normalizer=16.0)
    assert rel_err(out, ref) < 2e-6
    do = torch.randn(ref.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, x, do.float()), torch.autograd.grad(ref, x64, do)):
        assert rel_err(a, b) < 5e-6


@pytest.mark.parametrize("K, V", [(4, 4), (4, 64), (32, 64)])  # V = 64: the register-blocked path; K = 32 with it:
def test_extreme_and_tiny_decays_over_a_long_sequence(K, V):  # ViG's heads, the transposed state in dq's pass
    """-20 per token (only the diagonal survives; the states' scales fold into their rows every token) and
    -2e-8 per token over 8k tokens: a decay that rounds to 1 in float32 (a 1.6e-4 error if the states were
    multiplied by exp(-2e-8)); both stay at float32's accuracy, the output and q, k, v's gradients."""
    B, T, H = 1, 8192, 1
    q, k, v, _, _ = make_inputs(B, T, H, K, V)
    tiny = torch.full((B, T, H, K), -2e-8, dtype=torch.float64)
    steep = torch.full((B, T, H, K), -20.0, dtype=torch.float64)
    for gf, gb in [(tiny, tiny), (steep, tiny)]:
        ref = bigla_naive(q, k, v, gf, gb, 0.5)
        out = bigla_fwd_cpu(*kernel_inputs(q, k, v, gf, gb), 0.5)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < 2e-5
        # q, k, v's gradients over the first 1k tokens (the float64 reference's autograd is slow; the gates'
        # gradients are sums of nearly cancelling terms there: ill-conditioned)
        x64 = [t[:, :1024] for t in (q, k, v, gf, gb)]
        do = torch.randn(B, 1024, H, V, dtype=torch.float64)
        _, g_ref = grads_f64(x64, do, 0.5)
        for a, b in zip(bigla_bwd_cpu(*kernel_inputs(*x64), do.float(), 0.5)[:3], g_ref[:3]):
            assert rel_err(a, b) < 1e-4


def test_gates_near_one_over_a_long_sequence():
    """Logits 12 to 25 (decays within 4e-7 to 9e-13 of 1, log decays formed in float32) summed over 8k tokens in
    both directions: the decays' products stay at float32's accuracy against float64."""
    B, T, H, K, V = 1, 8192, 1, 4, 4
    q, k, v, _, _ = make_inputs(B, T, H, K, V)
    z = 12 + 13 * torch.rand(B, T, H, K, dtype=torch.float64)
    logsigmoid = torch.nn.functional.logsigmoid
    ref = bigla_naive(q, k, v, logsigmoid(z) / 16, logsigmoid(z.flip(1)) / 16, 0.5)
    out = bigla_fwd_cpu(*kernel_inputs(q, k, v, z, z.flip(1)), 0.5, 16.0)
    assert rel_err(out, ref) < 2e-5


@pytest.mark.parametrize("V", [16, 64])
def test_result_does_not_depend_on_the_thread_count(V):
    x = kernel_inputs(*make_inputs(3, 50, 5, 8, V))
    do = torch.randn(3, 50, 5, V)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (bigla_fwd_cpu(*x, 0.2), *bigla_bwd_cpu(*x, do, 0.2))
        torch.set_num_threads(max(2, threads))
        many = (bigla_fwd_cpu(*x, 0.2), *bigla_bwd_cpu(*x, do, 0.2))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32_and_return_their_dtype(dtype):
    x64 = make_inputs(2, 60, 2, 16, 16)
    x = [t.to(dtype).requires_grad_() for t in x64]
    out = bigla(*x)
    assert out.dtype == dtype
    ref = bigla_naive(*[t.to(dtype).double() for t in x64], 16 ** -0.5)  # the same rounded inputs
    assert rel_err(out, ref) < 1e-2
    assert all(g.dtype == dtype for g in torch.autograd.grad(out.float().sum(), x))


def test_extreme_gate_logits_against_float64():
    """Logits from -800 to 800 (decays from exp(-50) per token to within 1e-20 of 1; the kernel forms their log
    in float32 with its own exp and log1p and sums them in float64): output and logit gradients at float32's
    accuracy."""
    B, T, H, K, V = 1, 64, 2, 8, 8
    q, k, v, _, _ = make_inputs(B, T, H, K, V)
    levels = torch.tensor([-800.0, -100.0, -30.0, -3.0, 0.0, 3.0, 13.0, 30.0, 100.0, 800.0], dtype=torch.float64)
    zf, zb = (levels[torch.randint(len(levels), (B, T, H, K))] for _ in range(2))
    x64 = [t.clone().requires_grad_() for t in (q, k, v, zf, zb)]
    logsigmoid = torch.nn.functional.logsigmoid
    ref = bigla_naive(*x64[:3], logsigmoid(x64[3]) / 16, logsigmoid(x64[4]) / 16, K ** -0.5)
    x = [t.detach().float() for t in x64]
    out = bigla_fwd_cpu(*x, K ** -0.5, 16.0)
    assert rel_err(out, ref) < 2e-6
    do = torch.randn(ref.shape, dtype=torch.float64)
    grads = bigla_bwd_cpu(*x, do.float(), K ** -0.5, 16.0)
    for name, g, r in zip(["q", "k", "v", "zf", "zb"], grads, torch.autograd.grad(ref, x64, do)):
        assert torch.isfinite(g).all() and rel_err(g, r) < 5e-6, name


def test_infinite_negative_gate_logits_cut_the_scan():
    """A gate logit of -inf is a decay of exactly 0: the scan restarts there, as with a finite but very steep
    logit (-1e4: its decay also rounds to 0 in float64); finite outputs and q, k, v gradients, equal to those."""
    B, T, H, K, V = 1, 40, 2, 8, 16
    q, k, v, zf, zb = make_inputs(B, T, H, K, V)
    cut_f, cut_b = zf.clone(), zb.clone()
    for z, (t, h, c) in ((zf, (7, 0, 3)), (zb, (25, 1, 0)), (zf, (31, 1, 5))):
        z[0, t, h, c] = -float("inf")
    for z, src in ((cut_f, zf), (cut_b, zb)):
        z[torch.isinf(src)] = -1e4
    out = bigla_fwd_cpu(*kernel_inputs(q, k, v, zf, zb), 0.5, 16.0)
    ref = bigla_fwd_cpu(*kernel_inputs(q, k, v, cut_f, cut_b), 0.5, 16.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    do = torch.randn(B, T, H, V)
    grads = bigla_bwd_cpu(*kernel_inputs(q, k, v, zf, zb), do, 0.5, 16.0)
    grads_cut = bigla_bwd_cpu(*kernel_inputs(q, k, v, cut_f, cut_b), do, 0.5, 16.0)
    for name, g, r in zip("qkv", grads[:3], grads_cut[:3]):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("shape", [(2, 37, 3, 32, 64), (1, 5, 2, 16, 24), (3, 1, 1, 8, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", [True, False])
def test_bigla_with_the_locality_mix_in_one_pass(shape, act):
    """The inference path's BiGLA + locality mix on the CPU (``bigla_mix_forward``: the kernel mixes each token's
    output once both scans have passed it): the two kernels one after the other to float32's rounding (the
    compiler may order the norms' sums differently in the two), and the float64 BiGLA then the float64 mix within
    float32's error; the mix's gate a column slice of a wider tensor, as in the mixer."""
    from vigla.ops.bigla.op import bigla_forward, bigla_mix_forward
    from vigla.ops.locality_mix import locality_mix_reference
    from vigla.ops.locality_mix.op import locality_mix_forward

    B, T, H, K, V = shape
    q, k, v, _, _ = make_inputs(B, T, H, K, V)
    zf, zb = torch.randn(B, T, H, K, dtype=torch.float64) * 3, torch.randn(B, T, H, K, dtype=torch.float64) * 3
    x = 2 * torch.randn(B, T, H * V, dtype=torch.float64)
    z = torch.randn(B, T, 2 * H * V + 3, dtype=torch.float64)[..., 3:3 + H * V]
    w_o, w_l = torch.rand(V, dtype=torch.float64) + 0.5, torch.randn(V, dtype=torch.float64)
    args32 = [t.float() for t in (q, k, v, zf, zb)]
    mix32 = [t.float() for t in (x, z, w_o, w_l)]
    y = bigla_mix_forward(*args32, K ** -0.5, 16.0, *mix32, 1e-6, act)
    two = locality_mix_forward(bigla_forward(*args32, K ** -0.5, 16.0), *mix32, 1e-6, act)
    assert y.shape == (B, T, H * V) and y.dtype == torch.float32 and rel_err(y, two) < 1e-6
    o64 = bigla_naive(q, k, v, log_decays(zf, 16.0), log_decays(zb, 16.0), K ** -0.5)
    assert rel_err(y, locality_mix_reference(o64, x, z, w_o, w_l, 1e-6, act)) < 1e-5
    torch.library.opcheck(torch.ops.vigla.bigla_mix_cpu_fwd.default,  # its fake and schema
                          (*args32, *mix32, K ** -0.5, 16.0, 1e-6, act))
