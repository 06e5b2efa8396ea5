"""The public ops' input contract on the CPU: a clear one-line error for what they cannot take (integer tensors,
zero-width rows, mixed dtypes where no autocast casts them, non-integer grid sizes), and correct results at the
edges they can take (mixed dtypes rounded as documented, empty batches, double backward in float64)."""

import pytest
import torch

from vigla.ops.add_norm import add_norm
from vigla.ops.conv_norm import conv_norm_act
from vigla.ops.dwconv import dwconv_reference, dwconv_silu
from vigla.ops.linear_angular import (linear_angular_z, linear_angular_z_quadratic, masked_softmax_aux,
                                      masked_softmax_aux_quadratic)
from vigla.ops.locality_mix import locality_mix
from vigla.ops.swiglu import swiglu, swiglu_mlp


def _ints(*shape):
    return torch.randint(-3, 4, shape)


@pytest.mark.parametrize("call, message", [
    (lambda: conv_norm_act(_ints(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4), torch.ones(4),
                           torch.zeros(4), 1e-5, 1, 1), "conv_norm_act: x must be a floating-point tensor"),
    (lambda: add_norm(_ints(2, 8), None, torch.ones(8)), "add_norm: x must be a floating-point tensor"),
    (lambda: dwconv_silu(_ints(1, 12, 4), torch.randn(4, 1, 3, 3), (3, 4)),
     "dwconv_silu: x must be a floating-point tensor"),
    (lambda: locality_mix(torch.randn(2, 3, 4), _ints(2, 12), torch.randn(2, 12), torch.ones(4), torch.ones(4)),
     "locality_mix: x must be a floating-point tensor"),
    (lambda: locality_mix(torch.randn(2, 3, 4), torch.randn(2, 12), torch.randn(2, 12), [1.0] * 4, torch.ones(4)),
     "locality_mix: w_o must be a torch.Tensor, got list"),
    (lambda: swiglu(_ints(3, 4)), "swiglu: u must be a floating-point tensor"),
    (lambda: swiglu_mlp(torch.randn(3, 4), torch.randn(8, 4, dtype=torch.float64), torch.randn(5, 4)),
     "swiglu_mlp: x, w1 and w2 must share a dtype outside autocast"),
], ids=["conv_norm-int", "add_norm-int", "dwconv-int", "mix-int", "mix-list", "swiglu-int", "mlp-mixed"])
def test_wrong_types_are_refused(call, message):
    with pytest.raises(TypeError, match=message):
        call()


@pytest.mark.parametrize("call, message", [
    (lambda: add_norm(torch.randn(2, 0), None, torch.ones(0)), "add_norm: x needs a last dim of at least 1"),
    (lambda: locality_mix(torch.randn(2, 3, 0), torch.randn(2, 0), torch.randn(2, 0), torch.ones(0), torch.ones(0)),
     r"locality_mix: o must be \[..., h, d\] with h, d >= 1"),
    (lambda: swiglu(torch.randn(3, 0)), r"swiglu: the last dim must be even and >= 2"),
    (lambda: swiglu_mlp(torch.tensor(1.0), torch.randn(4, 1), torch.randn(1, 2)),
     "swiglu_mlp: x needs a last dim of at least 1"),
    (lambda: dwconv_silu(torch.randn(1, 30, 4), torch.randn(4, 1, 3, 3), (5.5, 6)),
     r"dwconv_silu: hw must be two whole numbers \(H, W\), got \(5.5, 6\)"),
], ids=["add_norm-C0", "mix-d0", "swiglu-0", "mlp-0d", "dwconv-hw"])
def test_shapes_without_channels_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _other(device: str):
    """A tensor maker on ``device``: the meta device on the CPU (any second device shows the check), a CPU tensor among
    CUDA ones on the GPU (its kernels read every tensor through its address: Triton's launcher is not asked to check
    them, so before the check a CPU tensor there faulted the device)."""
    if device == "cpu":
        return lambda *shape: torch.ones(*shape, device="meta")
    return lambda *shape: torch.ones(*shape)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tensors_on_two_devices_are_refused(device):
    """Every public op names the argument on another device than the first (one line, before any kernel)."""
    dev = "cpu" if device == "cpu" else "cuda"
    other = _other(device)
    r = lambda *shape: torch.randn(*shape, device=dev)  # noqa: E731
    calls = [
        (lambda: add_norm(r(2, 8), r(2, 8), other(8)), "add_norm: weight is on"),
        (lambda: locality_mix(r(2, 3, 4), r(2, 12), other(2, 12), r(4), r(4)), "locality_mix: z is on"),
        (lambda: dwconv_silu(r(1, 12, 4), other(4, 1, 3, 3), (3, 4)), "dwconv_silu: weight is on"),
        (lambda: swiglu_mlp(r(3, 4), r(8, 4), other(5, 4)), "swiglu_mlp: w2 is on"),
        (lambda: conv_norm_act(r(1, 3, 8, 8), r(4, 3, 3, 3), r(4), other(4), r(4), 1e-5, 1, 1),
         "conv_norm_act: norm_weight is on"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=message + r" .* but .* is on .*; move them to one device"):
            call()


@pytest.mark.parametrize("x_dtype, delta_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
def test_add_norm_rounds_the_sum_to_x_dtype_once(x_dtype, delta_dtype):
    """``s`` in ``x``'s dtype, the exact sum rounded once, and ``y`` the norm of ``s`` as stored, whatever
    ``delta``'s dtype."""
    x, delta, w = torch.randn(4, 16).to(x_dtype), torch.randn(4, 16).to(delta_dtype), torch.rand(16) + 0.5
    s, y = add_norm(x, delta, w)
    expect = (x.double() + delta.double()).to(x_dtype)
    assert s.dtype == x_dtype and torch.equal(s, expect)
    s64 = s.double()
    ref = s64 * torch.rsqrt(s64.square().mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-2 if x_dtype == torch.bfloat16 else 1e-6, atol=1e-5)


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
def test_dwconv_takes_a_weight_of_another_dtype(x_dtype, w_dtype):
    """Products in the compute dtype (``x``'s outside autocast), the weight's gradient in its own dtype."""
    x = torch.randn(2, 12, 8).to(x_dtype).requires_grad_()
    w = torch.randn(8, 1, 3, 3, dtype=w_dtype, requires_grad=True)
    y = dwconv_silu(x, w, (3, 4))
    assert y.dtype == x_dtype
    ref = dwconv_reference(x.detach().double(), w.detach().double(), (3, 4), True, torch.float64)
    torch.testing.assert_close(y.double(), ref, rtol=2e-2 if x_dtype == torch.bfloat16 else 1e-5, atol=2e-2)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.dtype == x_dtype and dw.dtype == w_dtype and bool(dw.isfinite().all())


def test_linear_angular_ops_take_no_tokens():
    """N = 0: empty results (and a density of 0, not 0 / 0), as the quadratic references give."""
    q, k, v = (torch.randn(1, 2, 0, 4) for _ in range(3))
    assert linear_angular_z(q, k, v).shape == linear_angular_z_quadratic(q, k, v).shape == (1, 2, 0, 4)
    for aux in (masked_softmax_aux(q, k, v, 0.1), masked_softmax_aux_quadratic(q, k, v, 0.1)):
        assert aux[0].shape == (1, 2, 0, 4) and aux[1].shape == (1, 2, 0) and float(aux[2]) == 0.0


def test_swiglu_has_a_second_derivative_in_float64():
    """The written-out backward records its ops when autograd asks for a graph (``create_graph``)."""
    u = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(swiglu, (u,))
    x, w1, w2 = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 4), (8, 4), (5, 4)))
    assert torch.autograd.gradgradcheck(swiglu_mlp, (x, w1, w2))


def test_the_cuda_mlp_function_has_a_second_derivative_and_refuses_one_under_autocast():
    """SwiGLUMLPFunction (the CUDA kernels' eager MLP, which keeps only x for its backward): where autograd records
    the backward it runs the reference's ops (its kernels' gradients carried no graph, so a second derivative dropped
    their terms without a word): gradgradcheck in float64 (called directly: on the CPU nothing else reaches it).
    Under autocast its saved tensors are copies a second derivative cannot follow: one error line."""
    from vigla.ops.swiglu import SwiGLUMLPFunction

    x, w1, w2 = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 4), (8, 4), (5, 4)))
    assert torch.autograd.gradgradcheck(SwiGLUMLPFunction.apply, (x, w1, w2))
    x, w1, w2 = (t.detach().float().requires_grad_() for t in (x, w1, w2))
    with torch.autocast("cpu", torch.bfloat16):
        y = SwiGLUMLPFunction.apply(x, w1, w2)
    with pytest.raises(RuntimeError, match=r"^swiglu_mlp: no second derivative under autocast on CUDA .*"
                                           r"under vigla\.ops\.reference_ops\(\)$"):
        torch.autograd.grad(y.float().sum(), x, create_graph=True)
