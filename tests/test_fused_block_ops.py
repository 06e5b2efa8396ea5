"""The fused block ops: the residual add + norm (``add_norm``) and the depthwise conv + SiLU
(``dwconv_silu``).

* CPU: each written-out reference backward against autograd of its reference forward in float64,
  the public functions against the plain PyTorch layers, the dtype rules; the Triton kernels through
  Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess).
* GPU (``pytest -m gpu``): the kernels against the float64 reference in fp32 / bf16 / fp16 at the
  models' shapes, ``torch.library.opcheck``, ``torch.compile(fullgraph=True)``, determinism.
"""

import pytest
import torch
import torch.nn.functional as F

from vigla.ops.add_norm import add_norm, add_norm_reference, add_norm_reference_bwd
from vigla.ops.dwconv import dwconv_reference, dwconv_reference_bwd, dwconv_silu
import triton_interpreter
from triton_interpreter import BF16_FIX


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _norm_inputs(shape, rms, delta=True, bias=True, dtype=torch.float64, device="cpu"):
    """x, delta (or None), weight, bias (None for rms)."""
    C = shape[-1]
    x = 2 * torch.randn(*shape, dtype=dtype, device=device) + 0.5
    d = torch.randn(*shape, dtype=dtype, device=device) if delta else None
    w = torch.rand(C, dtype=dtype, device=device) + 0.5
    b = torch.randn(C, dtype=dtype, device=device) if bias and not rms else None
    return x, d, w, b


def _torch_norm(s, w, b, rms, eps):
    return F.rms_norm(s, s.shape[-1:], w, eps) if rms else F.layer_norm(s, s.shape[-1:], w, b, eps)


# ------------------------------------------------------------------------------------- add_norm
@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("has_ds", [True, False])
def test_add_norm_reference_backward_is_the_gradient(rms, has_ds):
    x, d, w, b = (t.requires_grad_() if t is not None else None for t in _norm_inputs((2, 7, 24), rms))
    s, y = add_norm_reference(x, d, w, b, 1e-6, rms, torch.float64)
    dy, ds = torch.randn_like(y), torch.randn_like(s) if has_ds else None
    leaves = [t for t in (x, w, b) if t is not None]
    auto = torch.autograd.grad([y, s] if has_ds else [y], leaves, [dy, ds] if has_ds else [dy])
    dx, dw, db = add_norm_reference_bwd(dy, ds, s.detach(), w.detach(), b, 1e-6, rms)
    for name, a, e in zip(["dx", "dweight", "dbias"], [dx, dw, db], auto):
        assert a.shape == e.shape and rel(a, e) < 1e-12, name


@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("delta", [True, False])
def test_add_norm_is_the_add_and_the_torch_norm(rms, delta):
    x, d, w, b = _norm_inputs((3, 5, 40), rms, delta)
    s, y = add_norm(x, d, w, b, 1e-5, "rms" if rms else "layer")
    expect = x + d if delta else x
    assert (s is x) if not delta else torch.equal(s, expect)
    torch.testing.assert_close(y, _torch_norm(expect, w, b, rms, 1e-5), rtol=1e-12, atol=1e-12)
    args = tuple(t.requires_grad_() for t in (x, d, w, b) if t is not None)

    def fn(*a):
        it = iter(a)
        return add_norm(next(it), next(it) if delta else None, next(it), next(it) if b is not None else None,
                        1e-5, "rms" if rms else "layer")
    assert torch.autograd.gradcheck(fn, args)


def test_add_norm_dtypes():
    """s keeps x's dtype (summed in fp32); y is in the compute dtype, or out_dtype; grads keep the
    inputs' dtypes."""
    x, d, w, b = _norm_inputs((4, 32), rms=False, dtype=torch.float32)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    d = d.bfloat16().requires_grad_()
    s, y = add_norm(x, d, w, b, 1e-5, "layer")
    assert s.dtype == y.dtype == torch.float32
    torch.testing.assert_close(s, x + d.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, y = add_norm(x, d, w, b, 1e-5, "layer")
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert rel(y, _torch_norm(x + d.float(), w, b, False, 1e-5)) < 1e-2
    (y.float().sum() + s.sum()).backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32 and d.grad.dtype == torch.bfloat16
    assert rel(d.grad, x.grad) < 1e-2
    _, y = add_norm(x.bfloat16(), None, w, None, 1e-6, "rms", out_dtype=torch.float32)
    assert y.dtype == torch.float32


def test_add_and_norm_layer_fuses_affine_norms_only():
    """vigla.layers.norm.add_and_norm on a norm layer: an affine LayerNorm through the fused op, one without
    weights as the add then the norm (the same values), with grad mode on and off (the blocks' inference path)."""
    from vigla.layers.norm import add_and_norm, add_and_norm_inference

    x, d = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    for norm in (torch.nn.LayerNorm(8, dtype=torch.float64), torch.nn.LayerNorm(8, elementwise_affine=False)):
        with torch.no_grad():
            torch.nn.init.normal_(norm.weight) if norm.weight is not None else None
        want = F.layer_norm(x + d, (8,), norm.weight, norm.bias, norm.eps)
        for s, y in (add_and_norm(norm, x, d), add_and_norm_inference(norm, x, d, torch.float64)):
            torch.testing.assert_close(s, x + d, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


def test_add_norm_rejects_bad_inputs():
    x, d, w, b = _norm_inputs((2, 8), rms=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        add_norm(x, d, w, b, kind="batch")
    with pytest.raises(ValueError, match=r"weight \[C\]"):
        add_norm(x, d, w[:4], b, kind="layer")
    with pytest.raises(ValueError, match="delta must have x's shape"):
        add_norm(x, d[:1], w, b, kind="layer")
    with pytest.raises(ValueError, match="bias must be None for kind='rms'"):
        add_norm(x, d, w, b, kind="rms")


# --------------------------------------------------------------------------------------- dwconv
def test_kernel_choices_know_when_the_host_issues_the_launches():
    """Where a kernel choice weighs the host's launch time (:func:`vigla.ops.add_norm.op.mlp_fused`), a call is
    issued eagerly outside ``torch.compile`` and not while it traces (no graph break: the compiled function takes
    the other branch)."""
    from vigla.ops.dispatch import issued_eagerly

    assert issued_eagerly()
    fn = torch.compile(lambda x: x + 1 if issued_eagerly() else x - 1, backend="eager", fullgraph=True)
    assert fn(torch.zeros(2)).tolist() == [-1.0, -1.0]


def test_dwconv_launch_plan_takes_symbolic_grid_sizes():
    """A model compiled at one image size and called at another is traced again with the grid's height and width
    symbolic (batch and channels static): the forward's launch plan must not hash them into its cache (it raised
    ``unhashable type: non-nested SymInt`` under Inductor), and gives the plan of the concrete sizes."""
    pytest.importorskip("triton")
    from torch.fx.experimental.proxy_tensor import make_fx
    from vigla.ops.dwconv.triton_kernels import _plan, _sweep

    plans = []

    def trace(x):
        _, H, W, _ = x.shape
        plans.append(_plan(2, H, W, 192, x))
        return x + 1

    make_fx(trace, tracing_mode="symbolic")(torch.empty(2, 14, 10, 192))
    assert plans == [_sweep(2, 14, 10, 192, 1)]


def _conv_inputs(B, H, W, C, dtype=torch.float64, device="cpu"):
    """x (a channel slice of a wider tensor: strided tokens) and the weight."""
    x = torch.randn(B, H * W, C + 8, dtype=dtype, device=device)[..., 4:C + 4]
    return x, torch.randn(C, 1, 3, 3, dtype=dtype, device=device) / 3


@pytest.mark.parametrize("act", [True, False])
def test_dwconv_reference_is_conv2d_and_its_backward_the_gradient(act):
    B, H, W, C = 2, 5, 3, 8
    x, w = (t.requires_grad_() for t in _conv_inputs(B, H, W, C))
    conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    u = conv(x.detach().reshape(B, H, W, C).permute(0, 3, 1, 2))
    expect = (F.silu(u) if act else u).permute(0, 2, 3, 1).reshape(B, H * W, C)
    y = dwconv_reference(x, w, (H, W), act, torch.float64)
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dwconv_silu(x, w, (H, W), act), expect, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    auto = torch.autograd.grad(y, (x, w), dy)
    for name, a, e in zip(["dx", "dweight"], dwconv_reference_bwd(dy, x.detach(), w.detach(), (H, W), act), auto):
        assert a.shape == e.shape and rel(a, e) < 1e-12, name
    assert torch.autograd.gradcheck(lambda a, b: dwconv_silu(a, b, (H, W), act), (x, w))


def test_dwconv_dtypes_and_bad_inputs():
    x, w = (t.float() for t in _conv_inputs(1, 2, 2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dwconv_silu(x, w, (2, 2)).dtype == torch.bfloat16
    assert dwconv_silu(x, w, (2, 2), out_dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match=r"expected x \[B, H\*W, C\] with hw"):
        dwconv_silu(x, w, (3, 2))
    with pytest.raises(ValueError, match=r"weight must be \[C, 1, 3, 3\] with C = 8"):
        dwconv_silu(x, w[:, :, :2], (2, 2))


# ---------------------------------------------------------------------------------- interpreter
# the interpreter with the GPU's bf16 rounding (for the bf16 ddelta case)
INTERPRETER_SCRIPT = BF16_FIX + r"""
import json, torch
from vigla.ops.add_norm.triton_kernels import add_norm_fwd_triton, add_norm_bwd_triton
from vigla.ops.add_norm import add_norm_reference, add_norm_reference_bwd
from vigla.ops.dwconv.triton_kernels import dwconv_fwd_triton, dwconv_bwd_triton
from vigla.ops.dwconv import dwconv_reference, dwconv_reference_bwd
torch.manual_seed(0)
rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
f = lambda t: None if t is None else t.float()
out = {}
# rows, C, rms, delta, bias: non-power-of-two C (ViG-H's 96), several tiles and a partial one
for R, C, rms, hasd, hasb in [(37, 96, False, True, True), (20, 192, True, True, False),
                              (5, 48, False, False, True), (3, 1024, True, False, False)]:
    x = 2 * torch.randn(R, C, dtype=torch.float64) + 0.5
    d = torch.randn(R, C, dtype=torch.float64) if hasd else None
    w = torch.rand(C, dtype=torch.float64) + 0.5
    b = torch.randn(C, dtype=torch.float64) if hasb else None
    s, y = add_norm_reference(x, d, w, b, 1e-6, rms, torch.float64)
    dy, ds = torch.randn_like(y), (torch.randn_like(y) if hasd else None)
    dx, dw, db = add_norm_reference_bwd(dy, ds, s, w, b, 1e-6, rms)
    s2, y2 = add_norm_fwd_triton(f(x), f(d), f(w), f(b), 1e-6, rms, torch.float32)
    grads = add_norm_bwd_triton(f(dy), f(ds), f(s), f(w), f(b), 1e-6, rms, torch.float32 if hasd else None)
    gx, _, gw, gb = grads
    errs = [rel(y2, y), rel(gx, dx), rel(gw, dw)] + ([rel(s2, s)] if hasd else []) + ([rel(gb, db)] if hasb else [])
    # a custom op's outputs may not share memory: 1.0 (a failure) when two of the gradients do
    storages = [t.untyped_storage().data_ptr() for t in grads if t.numel()]
    errs.append(float(len(set(storages)) != len(storages)))
    out[f"add_norm{(R, C, rms, hasd, hasb)}"] = errs
# ddelta in its own dtype (bf16) when it differs from x's: within bf16 rounding of dx
_, dd, _, _ = add_norm_bwd_triton(dy.float(), ds, s.float(), w.float(), None, 1e-6, True, torch.bfloat16)
bf16 = {"add_norm_ddelta": [rel(dd, dx) if dd.dtype == torch.bfloat16 else 1.0]}
# B, H, W, C, act: a 1x1 image, odd sizes, C not a multiple of 32 (masked channels), strided x, rows in
# several bands, columns in several blocks (the forward's tiles are 1024 // 64 = 16 columns wide)
for B, H, W, C, act in [(2, 5, 7, 64, True), (1, 1, 1, 32, False), (1, 3, 20, 40, True), (2, 9, 4, 96, False),
                        (1, 11, 70, 64, True)]:
    x = torch.randn(B, H * W, C + 3, dtype=torch.float64)[..., :C]
    w = torch.randn(C, 1, 3, 3, dtype=torch.float64)
    ref = dwconv_reference(x, w, (H, W), act, torch.float64)
    dy = torch.randn_like(ref)
    dx, dw = dwconv_reference_bwd(dy, x, w, (H, W), act)
    y = dwconv_fwd_triton(x.float(), w.float(), (H, W), act, torch.float32)
    gx, gw = dwconv_bwd_triton(dy.float(), x.float(), w.float(), (H, W), act)
    out[f"dwconv{(B, H, W, C, act)}"] = [rel(y, ref), rel(gx, dx), rel(gw, dw)]
# bf16 tokens with SiLU: the gradient g = dy * SiLU'(u) passed between the backward's two kernels in bf16
x = torch.randn(2, 9 * 13, 64, dtype=torch.float64)
w = torch.randn(64, 1, 3, 3, dtype=torch.float64)
dy = torch.randn(2, 9 * 13, 64, dtype=torch.float64)
dx, dw = dwconv_reference_bwd(dy, x.bfloat16().double(), w, (9, 13), True)
gx, gw = dwconv_bwd_triton(dy.bfloat16(), x.bfloat16(), w.float(), (9, 13), True)
bf16["dwconv_bf16"] = [rel(gx, dx) if gx.dtype == torch.bfloat16 else 1.0, rel(gw, dw)]
print(json.dumps({"fp32": out, "bf16": bf16}))
"""


def test_block_kernels_in_interpreter_on_cpu():
    pytest.importorskip("triton", reason="Triton is not installed: the fused kernels cannot run")
    result = triton_interpreter.run(INTERPRETER_SCRIPT)
    errors = {f"{case} ({kind})": max(errs) / tol for kind, tol in [("fp32", 1e-5), ("bf16", 1e-2)]
              for case, errs in result[kind].items()}
    assert max(errors.values()) < 1, f"relative errors / tolerance: {errors}"


LINEAR_SCRIPT = BF16_FIX + r"""
import json, torch
from vigla.ops.add_norm.triton_kernels import linear_add_norm_fwd_triton
from vigla.ops.add_norm import add_norm_reference
torch.manual_seed(0)
rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
out = {}
# rows, K, C, rms, residual dtype: a partial row tile, K and C not powers of two, LayerNorm with a bias
for R, K, C, rms, xdt in [(37, 96, 96, True, torch.bfloat16), (70, 160, 48, False, torch.float32)]:
    h = torch.randn(R, K + 5)[:, :K].to(torch.bfloat16)  # a strided row view
    wl = (torch.randn(C, K) / K ** 0.5).to(torch.bfloat16)
    x = (2 * torch.randn(R, C)).to(xdt)
    w, b = torch.rand(C) + 0.5, (None if rms else torch.randn(C))
    s, y = linear_add_norm_fwd_triton(h, wl, x, w, b, 1e-6, rms, torch.bfloat16)
    s64, y64 = add_norm_reference(x.double(), h.double() @ wl.double().t(), w.double(),
                                  None if b is None else b.double(), 1e-6, rms, torch.float64)
    out[str((R, K, C, rms, str(xdt)))] = [s.dtype == xdt and y.dtype == torch.bfloat16, rel(s, s64), rel(y, y64)]
# no norm weight (RMSNorm's weight folded into the next product): y is each row's reciprocal RMS of the stored s
s, y = linear_add_norm_fwd_triton(h, wl, x, None, None, 1e-6, True, torch.bfloat16)
rstd64 = torch.rsqrt(s.double().square().mean(-1) + 1e-6)
out["statistic"] = [y.dtype == torch.float32 and y.shape == (R,), rel(s, s64), rel(y, rstd64)]
print(json.dumps(out))
"""


def test_linear_add_norm_kernel_in_interpreter_on_cpu():
    """A projection, the residual add and the norm in one kernel (GPU inference), against float64 on the same
    half-precision values: within one rounding of the residual's dtype and of the bf16 output; without a norm
    weight, each row's reciprocal RMS in float32 (1e-6)."""
    pytest.importorskip("triton", reason="Triton is not installed: the fused kernels cannot run")
    for case, (dtypes_ok, err_s, err_y) in triton_interpreter.run(LINEAR_SCRIPT).items():
        tol_s = 8e-3 if "bfloat16" in case else 1e-6
        tol_y = 1e-6 if case == "statistic" else 8e-3
        assert dtypes_ok and err_s < tol_s and err_y < tol_y, f"{case}: {err_s:.2e} {err_y:.2e}"

MLP_SCRIPT = BF16_FIX + r"""
import json, torch
from vigla.ops.add_norm.triton_kernels import mlp_add_norm_fwd_triton
from vigla.ops.add_norm.reference import mlp_add_norm_reference
torch.manual_seed(0)
rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
out = {}
# rows, C, I, rms, residual dtype: ViG-T's MLP (three 64-wide inner tiles), ViG-H-T stage 1's (C = 96: a partial
# one; LayerNorm with a bias), a partial row tile, hidden widths not a multiple of the 64-unit step
for R, C, I, rms, xdt in [(150, 192, 200, True, torch.bfloat16), (37, 96, 256, False, torch.float32),
                          (20, 64, 72, True, torch.float32)]:
    x = torch.randn(R, C + 8)[:, :C].to(torch.bfloat16)  # a strided row view
    w1 = (torch.randn(2 * I, C) / C ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(C, I) / I ** 0.5).to(torch.bfloat16)
    r = (2 * torch.randn(R, C)).to(xdt)
    w, b = torch.rand(C) + 0.5, (None if rms else torch.randn(C))
    s, y = mlp_add_norm_fwd_triton(x, w1, w2, r, w, b, 1e-6, rms, torch.bfloat16)
    s64, y64 = mlp_add_norm_reference(x.double(), w1.double(), w2.double(), r.double(), w.double(),
                                      None if b is None else b.double(), 1e-6, rms, torch.float64)
    out[str((R, C, I, rms, str(xdt)))] = [s.dtype == xdt and y.dtype == torch.bfloat16, rel(s, s64), rel(y, y64)]
# a row scale on fc1's output (an RMSNorm's reciprocal RMS, its weight folded into w1), a partial row tile
rs = torch.rand(R) + 0.25
s, y = mlp_add_norm_fwd_triton(x, w1, w2, r, w, None, 1e-6, True, torch.bfloat16, rs)
s64, y64 = mlp_add_norm_reference(x.double(), w1.double(), w2.double(), r.double(), w.double(), None, 1e-6, True,
                                  torch.float64, rs.double())
out["row scale"] = [s.dtype == r.dtype and y.dtype == torch.bfloat16, rel(s, s64), rel(y, y64)]
print(json.dumps(out))
"""


def test_mlp_add_norm_kernel_in_interpreter_on_cpu():
    """ViG's SwiGLU MLP, the residual add and the norm in one kernel (GPU inference), against float64 on the same
    half-precision values: within one bf16 rounding of the gated hidden (the kernel multiplies it into fc2 in
    bf16, as the unfused path does), of the residual's dtype and of the bf16 output."""
    pytest.importorskip("triton", reason="Triton is not installed: the fused kernels cannot run")
    for case, (dtypes_ok, err_s, err_y) in triton_interpreter.run(MLP_SCRIPT).items():
        tol_s = 2e-3 if "float32" in case else 8e-3
        assert dtypes_ok and err_s < tol_s and err_y < 8e-3, f"{case}: {err_s:.2e} {err_y:.2e}"


@pytest.mark.parametrize("rms, scaled", [(True, False), (False, False), (True, True)])
def test_mlp_add_norm_custom_op_on_cpu(rms, scaled):
    """``vigla::mlp_add_norm`` (what compiled inference calls): opcheck's fake, schema and tracing checks, and on
    the CPU (fc1 + SwiGLU, fc2, then add + norm; with a row scale, the rows scaled first) the float64 reference."""
    from vigla.ops.add_norm.reference import mlp_add_norm_reference

    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    x, r = torch.randn(2, 7, 16, **f64), torch.randn(2, 7, 16, **f64)
    w1, w2 = torch.randn(40, 16, **f64), torch.randn(16, 20, **f64)
    w, b = torch.rand(16, **f64) + 0.5, None if rms else torch.randn(16, **f64)
    args = (x, w1, w2, r, w, b, 1e-6, rms, torch.float64) + ((torch.rand(2, 7, **f64) + 0.5,) if scaled else ())
    torch.library.opcheck(torch.ops.vigla.mlp_add_norm.default, args)
    s, y = torch.ops.vigla.mlp_add_norm(*args)
    s64, y64 = mlp_add_norm_reference(*args)
    assert torch.allclose(s, s64, rtol=1e-12, atol=1e-12) and torch.allclose(y, y64, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------- GPU
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
# ViG-T/S/B blocks (rms, 192/384/768), ViG-H stages and downsamples (layer, 96..1024; 48 and 64:
# the stems), a 1-token-row edge case
NORM_SHAPES = [((8, 196, 192), True, True), ((4, 196, 384), True, False), ((2, 49, 768), True, True),
               ((4, 3136, 96), False, True), ((4, 784, 192), False, False), ((2, 49, 1024), False, True),
               ((2, 3136, 48), False, False), ((3, 5, 64), False, True), ((1, 1, 32), True, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,rms,delta", NORM_SHAPES)
def test_add_norm_kernel_on_gpu(shape, rms, delta, dtype):
    x64, d64, w64, b64 = _norm_inputs(shape, rms, delta, device="cuda")
    s64, y64 = add_norm_reference(x64, d64, w64, b64, 1e-6, rms, torch.float64)
    dy, ds = torch.randn_like(y64), torch.randn_like(y64) if delta else None
    dx64, dw64, db64 = add_norm_reference_bwd(dy, ds, s64, w64, b64, 1e-6, rms)
    x = x64.to(dtype).requires_grad_()
    d = d64.to(dtype).requires_grad_() if delta else None
    w, b = (t.float().requires_grad_() if t is not None else None for t in (w64, b64))
    s, y = add_norm(x, d, w, b, 1e-6, "rms" if rms else "layer")
    assert s.dtype == y.dtype == dtype and rel(y, y64) < TOL[dtype] and rel(s, s64) < TOL[dtype]
    leaves = [t for t in (x, d, w, b) if t is not None]
    grads = torch.autograd.grad([y, s] if delta else [y], leaves,
                                [dy.to(dtype), ds.to(dtype)] if delta else [dy.to(dtype)])
    expect = [dx64] + ([dx64] if delta else []) + [dw64] + ([db64] if b is not None else [])
    for a, e, t in zip(grads, expect, leaves):
        assert a.dtype == t.dtype and torch.isfinite(a).all() and rel(a, e) < 2 * TOL[dtype], f"{rel(a, e):.2e}"


@pytest.mark.gpu
def test_add_norm_under_autocast_on_gpu():
    """The model's case: an fp32 residual, a bf16 branch output, bf16 out; gradients in each dtype."""
    x64, d64, w64, b64 = _norm_inputs((8, 196, 192), rms=False, device="cuda")
    s64, y64 = add_norm_reference(x64, d64, w64, b64, 1e-5, False, torch.float64)
    dy = torch.randn_like(y64)
    dx64, dw64, db64 = add_norm_reference_bwd(dy, None, s64, w64, b64, 1e-5, False)
    x, w, b = (t.float().requires_grad_() for t in (x64, w64, b64))
    d = d64.bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        s, y = add_norm(x, d, w, b, 1e-5, "layer")
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert rel(s, x + d.float()) < 1e-7 and rel(y, y64) < 1e-2
    gx, gd, gw, gb = torch.autograd.grad(y, (x, d, w, b), dy.bfloat16())
    assert gd.dtype == torch.bfloat16 and gx.dtype == torch.float32
    for a, e in [(gx, dx64), (gd, dx64), (gw, dw64), (gb, db64)]:
        assert rel(a, e) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R, K, C, rms", [(128 * 196, 192, 192, True), (4 * 3136, 192, 64, False),
                                          (300, 256, 128, False), (5, 96, 96, True), (64, 512, 192, True)])
def test_linear_add_norm_kernel_on_gpu(R, K, C, rms, xdt):
    """ViG-T's output projection with norm2, ViG-H-T's stage-1 fc2 with LayerNorm, partial tiles, and a
    product too wide for the kernel (the GEMM then add + norm); a float32 or bf16 residual stream: against
    float64 on the same values."""
    from vigla.ops.add_norm.op import linear_add_norm_forward, linear_fused

    h = torch.randn(R, K, device="cuda").bfloat16()
    wl = (torch.randn(C, K, device="cuda") / K ** 0.5).bfloat16()
    x = (2 * torch.randn(R, C, device="cuda")).to(xdt)
    w, b = torch.rand(C, device="cuda") + 0.5, (None if rms else torch.randn(C, device="cuda"))
    fused = linear_fused(x, h, wl)
    assert fused == (K <= 256)
    s, y = linear_add_norm_forward(h, wl, x, w, b, 1e-6, rms, torch.bfloat16)
    # one kernel keeps the product in fp32; the fallback adds cuBLAS's bf16 product, as the unfused layers do
    d64 = h.double() @ wl.double().t() if fused else (h @ wl.t()).double()
    s64, y64 = add_norm_reference(x.double(), d64, w.double(), None if b is None else b.double(), 1e-6, rms,
                                  torch.float64)
    assert s.dtype == xdt and y.dtype == torch.bfloat16
    assert rel(s, s64) < TOL[xdt] and rel(y, y64) < TOL[torch.bfloat16]
    if rms:  # no weight: each row's reciprocal RMS of the stored residual, float32
        s, rstd = linear_add_norm_forward(h, wl, x, None, None, 1e-6, True, torch.bfloat16)
        assert rstd.dtype == torch.float32 and rstd.shape == (R,)
        assert rel(s, s64) < TOL[xdt] and rel(rstd, s.double().square().mean(-1).add(1e-6).rsqrt()) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R, C, I, rms, xdt", [
    (128 * 1024, 192, 512, True, "half"), (128 * 196, 192, 512, True, "half"), (64 * 3136, 96, 256, False, "half"),
    (200 * 196 + 5, 192, 520, True, "fp32"), (196, 192, 512, True, "half"), (128 * 196, 384, 1024, True, "half"),
    (128 * 1024, 192, 512, True, "scaled"), (200 * 196 + 5, 192, 520, True, "scaled"), (196, 192, 512, True, "scaled"),
    (128 * 196, 384, 1024, True, "scaled")])
def test_mlp_add_norm_kernel_on_gpu(R, C, I, rms, xdt, dtype):
    """ViG-T's MLP with the next RMSNorm at 512² and 224² (batch 128), ViG-H-T stage 1's with LayerNorm, a partial
    row tile with a float32 residual and a hidden width off the 64-unit step, batch 1 (one kernel when issued
    eagerly, three under CUDA-graph capture) and ViG-S's C = 384 (three kernels: :func:`mlp_fused`); with a row
    scale (an RMSNorm's reciprocal RMS, its weight in fc1) at 512², a partial tile, batch 1 and C = 384 (the row
    scaling outside the kernels): against float64 on the same values."""
    from vigla.ops.add_norm.op import mlp_add_norm_forward, mlp_fused
    from vigla.ops.add_norm.reference import mlp_add_norm_reference

    x = torch.randn(R, C, device="cuda").to(dtype)
    w1 = (torch.randn(2 * I, C, device="cuda") / C ** 0.5).to(dtype)
    w2 = (torch.randn(C, I, device="cuda") / I ** 0.5).to(dtype)
    r = (2 * torch.randn(R, C, device="cuda")).to(torch.float32 if xdt == "fp32" else dtype)
    w, b = torch.rand(C, device="cuda") + 0.5, (None if rms else torch.randn(C, device="cuda"))
    rs = torch.rand(R, device="cuda") + 0.25 if xdt == "scaled" else None
    tiles = -(-R // 128)
    assert mlp_fused(x, w1, w2) == (C <= 192)  # issued eagerly: one kernel at any row count
    with torch.cuda.graph(torch.cuda.CUDAGraph()):  # under capture: one kernel where it fills the device
        fused_captured = mlp_fused(x, w1, w2)
        torch.zeros(1, device="cuda")  # not an empty graph (PyTorch warns on one)
    assert fused_captured == (C <= 192 and tiles >= torch.cuda.get_device_properties(0).multi_processor_count)
    s, y = mlp_add_norm_forward(x, w1, w2, r, w, b, 1e-6, rms, dtype, rs)
    s64, y64 = mlp_add_norm_reference(x.double(), w1.double(), w2.double(), r.double(), w.double(),
                                      None if b is None else b.double(), 1e-6, rms, torch.float64,
                                      None if rs is None else rs.double())
    assert s.dtype == r.dtype and y.dtype == dtype
    # the gated hidden is rounded to the weights' dtype before fc2 (as in the unfused path): that dtype's tolerance
    assert rel(s, s64) < TOL[dtype] and rel(y, y64) < TOL[dtype], (rel(s, s64), rel(y, y64))


# ViG-T/S/B and ViG-H stages; several column blocks with a partial one (130 columns), odd channels, 1 x 1
CONV_SHAPES = [(8, 14, 14, 192, True), (4, 56, 56, 96, False), (4, 28, 28, 192, False), (2, 7, 7, 768, False),
               (4, 32, 32, 384, True), (2, 37, 130, 64, True), (2, 5, 9, 40, True), (3, 1, 1, 64, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_dwconv_kernel_on_gpu(shape, dtype):
    B, H, W, C, act = shape
    x64, w64 = _conv_inputs(B, H, W, C, device="cuda")
    y64 = dwconv_reference(x64, w64, (H, W), act, torch.float64)
    dy = torch.randn_like(y64)
    dx64, dw64 = dwconv_reference_bwd(dy, x64, w64, (H, W), act)
    x, w = x64.to(dtype).requires_grad_(), w64.float().requires_grad_()
    y = dwconv_silu(x, w, (H, W), act)
    assert y.dtype == dtype and rel(y, y64) < TOL[dtype]
    gx, gw = torch.autograd.grad(y, (x, w), dy.to(dtype))
    assert gx.dtype == dtype and gw.dtype == torch.float32
    assert rel(gx, dx64) < 2 * TOL[dtype] and rel(gw, dw64) < 2 * TOL[dtype], (rel(gx, dx64), rel(gw, dw64))


@pytest.mark.gpu
def test_block_ops_are_deterministic_on_gpu():
    x, w = (t.float().requires_grad_() for t in _conv_inputs(8, 14, 14, 192, device="cuda"))
    xn, dn, wn, bn = (t.float().requires_grad_() for t in _norm_inputs((8, 196, 96), rms=False, device="cuda"))
    dy = torch.randn(8, 196, 192, device="cuda")

    def grads():
        g1 = torch.autograd.grad(dwconv_silu(x, w, (14, 14), True), (x, w), dy)
        g2 = torch.autograd.grad(add_norm(xn, dn, wn, bn, 1e-5, "layer")[1], (xn, wn, bn), dy[..., :96])
        return g1 + g2
    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rms", [True, False])
def test_linear_add_norm_custom_op_on_cpu(rms):
    """``vigla::linear_add_norm`` (what compiled inference calls): opcheck's fake, schema and tracing checks, and on
    the CPU (the product, then add + norm) the float64 composition ``s = x + h wl^T``, ``y = norm(s)``."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    h, wl, x = torch.randn(2, 7, 24, **f64), torch.randn(16, 24, **f64), torch.randn(2, 7, 16, **f64)
    w, b = torch.rand(16, **f64) + 0.5, None if rms else torch.randn(16, **f64)
    args = (h, wl, x, w, b, 1e-6, rms, torch.float64)
    torch.library.opcheck(torch.ops.vigla.linear_add_norm.default, args)
    s, y = torch.ops.vigla.linear_add_norm(*args)
    want = x + h @ wl.t()
    norm = F.rms_norm(want, (16,), w, 1e-6) if rms else F.layer_norm(want, (16,), w, b, 1e-6)
    assert torch.allclose(s, want, rtol=1e-12, atol=1e-12) and torch.allclose(y, norm, rtol=1e-10, atol=1e-10)
    if rms:  # no weight: the add and each row's reciprocal RMS (float32), for an MLP holding the norm's weight
        args = (h, wl, x, None, None, 1e-6, True, torch.float64)
        torch.library.opcheck(torch.ops.vigla.linear_add_norm.default, args)
        s, rstd = torch.ops.vigla.linear_add_norm(*args)
        assert torch.allclose(s, want, rtol=1e-12, atol=1e-12) and rstd.dtype == torch.float32
        assert torch.allclose(rstd.double(), want.square().mean(-1).add(1e-6).rsqrt(), rtol=1e-6)
    else:
        with pytest.raises(ValueError, match="rms=True"):
            torch.ops.vigla.linear_add_norm(h, wl, x, None, None, 1e-6, False, torch.float64)


@pytest.mark.gpu
def test_block_ops_opcheck():
    x, d, w, b = (t.float().requires_grad_() for t in _norm_inputs((2, 10, 96), rms=False, device="cuda"))
    torch.library.opcheck(torch.ops.vigla.add_norm.default, (x, d, w, b, 1e-5, False, torch.bfloat16))
    torch.library.opcheck(torch.ops.vigla.add_norm.default, (x, None, w, None, 1e-6, True, torch.float32))
    xc, wc = (t.float().requires_grad_() for t in _conv_inputs(2, 4, 5, 64, device="cuda"))
    torch.library.opcheck(torch.ops.vigla.dwconv.default, (xc, wc, 4, 5, True, torch.float32))
    torch.library.opcheck(torch.ops.vigla.dwconv.default, (xc, wc, 4, 5, False, torch.bfloat16))
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    h = torch.randn(2, 10, 64, **bf16)
    wl = torch.randn(96, 64, **bf16)
    xb = x.detach().to(torch.bfloat16)
    torch.library.opcheck(torch.ops.vigla.linear_add_norm.default,  # the fused kernel (inference only: no grads)
                          (h, wl, xb, w.detach(), b.detach(), 1e-5, False, torch.bfloat16))
    rows = torch.randn(128 * 132, 96, device="cuda", dtype=torch.bfloat16)  # enough rows for the fused MLP
    w1, w2 = torch.randn(512, 96, **bf16) / 10, torch.randn(96, 256, **bf16) / 16
    args = (rows, w1, w2, torch.randn_like(rows), w.detach(), b.detach(), 1e-5, False, torch.bfloat16)
    torch.library.opcheck(torch.ops.vigla.mlp_add_norm.default, args)
    rstd = torch.rand(rows.shape[0], device="cuda") + 0.5  # a row scale (RMSNorm's weight folded into fc1)
    torch.library.opcheck(torch.ops.vigla.mlp_add_norm.default, args[:5] + (None, 1e-6, True, torch.bfloat16, rstd))
    torch.library.opcheck(torch.ops.vigla.linear_add_norm.default,  # the add and the rows' reciprocal RMS
                          (h, wl, xb, None, None, 1e-6, True, torch.bfloat16))


@pytest.mark.gpu
def test_block_ops_compile_fullgraph():
    """A ViG block's local path (add + norm, the depthwise conv + SiLU, the next add + norm) compiles
    without graph breaks and matches eager, forward and backward, under bf16 autocast."""
    x, d, w1 = (t.float().requires_grad_() for t in _norm_inputs((4, 196, 192), rms=True, device="cuda")[:3])
    _, wc = _conv_inputs(4, 14, 14, 192, device="cuda")
    wc, w2 = wc.float().requires_grad_(), (torch.rand(192, device="cuda") + 0.5).requires_grad_()
    b2 = torch.randn(192, device="cuda", requires_grad=True)

    def local(x, d):
        s, y = add_norm(x, d, w1, None, 1e-6, "rms")
        u = dwconv_silu(y, wc, (14, 14), True)
        s2, y2 = add_norm(s, u, w2, b2, 1e-5, "layer")
        return s2, y2

    compiled = torch.compile(local, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, got = local(x, d), compiled(x, d)
    leaves = (x, d, w1, wc, w2, b2)
    for a, b in zip(got, eager):
        assert a.dtype == b.dtype and rel(a, b) < 1e-2
    g_eager = torch.autograd.grad([t.float().sum() for t in eager], leaves)
    g_got = torch.autograd.grad([t.float().sum() for t in got], leaves)
    for a, b in zip(g_got, g_eager):
        assert rel(a, b) < 1e-2

