"""The fused model ops (locality mix, SwiGLU gating) and the layers built on them.

* CPU: each written-out reference backward against autograd of its reference forward in float64;
  the Triton kernels through Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess);
  the layers against the plain maths.
* GPU (``pytest -m gpu``): the kernels against the float64 reference in fp32 / bf16 / fp16,
  ``torch.library.opcheck``, and whole ViG models on their fused paths against
  ``reference_ops()``.
"""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import vigla  # noqa: F401
from vigla.layers import RmsNorm, SwiGLU
from vigla.ops.dispatch import reference_ops, use_kernels
from vigla.ops.launcher import multiprocessors
from vigla.ops.locality_mix import locality_mix, locality_mix_reference, locality_mix_reference_bwd
from vigla.ops.swiglu import swiglu, swiglu_mlp, swiglu_reference, swiglu_reference_bwd
import triton_interpreter
from triton_interpreter import BF16_FIX


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _mix_inputs(B, N, h, d, dtype=torch.float64, device="cpu"):
    """o, x, z (z a column slice of a wider tensor, as in the mixer), w_o, w_l."""
    C = h * d
    o = torch.randn(B, N, h, d, dtype=dtype, device=device)
    x = 3 * torch.randn(B, N, C, dtype=dtype, device=device)
    z = torch.randn(B, N, 2 * C + 5, dtype=dtype, device=device)[..., C + 5:]
    w_o = torch.rand(d, dtype=dtype, device=device) + 0.5
    w_l = torch.rand(d, dtype=dtype, device=device) + 0.5
    return o, x, z, w_o, w_l


@pytest.mark.parametrize("act", [False, True])
def test_locality_mix_reference_backward_is_the_gradient(act):
    args = [t.clone().requires_grad_() for t in _mix_inputs(2, 9, 3, 8)]
    y = locality_mix_reference(*args, 1e-6, act)
    dy = torch.randn_like(y)
    auto = torch.autograd.grad(y, args, dy)
    written = locality_mix_reference_bwd(dy, *[a.detach() for a in args], 1e-6, act)
    for name, a, b in zip(["do", "dx", "dz", "dw_o", "dw_l"], written, auto):
        assert a.shape == b.shape and rel(a, b) < 1e-12, name


def test_locality_mix_is_the_vig_mix():
    o, x, z, w_o, w_l = _mix_inputs(2, 5, 2, 4)
    y = locality_mix(o, x, z, w_o, w_l, act=True)
    rms = lambda t, w: t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6) * w
    gate = torch.sigmoid(z.unflatten(-1, (2, 4)))
    expect = F.silu(gate * rms(o, w_o) + (1 - gate) * rms(x.unflatten(-1, (2, 4)), w_l)).flatten(-2)
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)


def test_locality_mix_rejects_bad_shapes():
    o, x, z, w_o, w_l = _mix_inputs(1, 4, 2, 4)
    with pytest.raises(ValueError, match="expected o"):
        locality_mix(o, x[..., :6], z[..., :6], w_o, w_l)
    with pytest.raises(ValueError, match="w_o and w_l"):
        locality_mix(o, x, z, w_o[:3], w_l)


def test_swiglu_reference_backward_is_the_gradient():
    u = torch.randn(3, 7, 2 * 6, dtype=torch.float64, requires_grad=True)
    y = swiglu_reference(u)
    dy = torch.randn_like(y)
    (auto,) = torch.autograd.grad(y, u, dy)
    assert rel(swiglu_reference_bwd(dy, u.detach()), auto) < 1e-12
    torch.testing.assert_close(y, F.silu(u[..., :6]) * u[..., 6:])
    with pytest.raises(ValueError, match="even"):
        swiglu(torch.randn(2, 5))


def test_dispatch_takes_the_reference_on_cpu_and_inside_reference_ops(monkeypatch):
    from vigla.ops import dispatch

    cpu = torch.zeros(1)
    assert not use_kernels(cpu)
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # as if on a GPU
    assert use_kernels(cpu)
    with reference_ops():
        assert not use_kernels(cpu)
    assert use_kernels(cpu)


def test_rmsnorm_layer_matches_timm_and_keeps_half_precision():
    norm = RmsNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ref = timm.layers.RmsNorm(16, eps=1e-6)
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(norm(x), ref(x), rtol=1e-6, atol=1e-6)
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16 and rel(y, ref(x)) < 1e-2


def test_swiglu_layer_state_dict_is_timms_glumlp():
    mlp = SwiGLU(8, 12)
    ref = timm.layers.GluMlp(8, 24, act_layer=torch.nn.SiLU, bias=False, gate_last=False)
    ref.load_state_dict(mlp.state_dict())  # same names and shapes
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(mlp(x), ref(x), rtol=1e-6, atol=1e-6)


def test_swiglu_mlp_is_the_composition_and_checks_the_weights():
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    u = F.linear(x, w1)
    ref = F.linear(F.silu(u[..., :6]) * u[..., 6:], w2)
    torch.testing.assert_close(swiglu_mlp(x, w1, w2), ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(swiglu_mlp, (x, w1, w2))
    with pytest.raises(ValueError, match=r"want w1 \[2I, C\] with C = 5"):
        swiglu_mlp(x, w1.t(), w2)
    with pytest.raises(ValueError, match=r"got w1 \(12, 5\), w2 \(4, 5\)"):
        swiglu_mlp(x, w1, w2[:, :5])


INTERPRETER_SCRIPT = r"""
import json, torch
from vigla.ops.locality_mix.triton_kernels import locality_mix_fwd_triton, locality_mix_bwd_triton
from vigla.ops.locality_mix import locality_mix_reference, locality_mix_reference_bwd
from vigla.ops.swiglu.triton_kernels import swiglu_fwd_triton, swiglu_bwd_triton
from vigla.ops.swiglu import swiglu_reference, swiglu_reference_bwd
torch.manual_seed(0)
rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
out = {}
for B, N, h, d, act in [(2, 37, 3, 64, True), (1, 70, 4, 32, False)]:
    C = h * d
    o, x = torch.randn(B, N, h, d, dtype=torch.float64), 3 * torch.randn(B, N, C, dtype=torch.float64)
    z = torch.randn(B, N, 2 * C + 5, dtype=torch.float64)[..., C + 5:]
    w = [torch.rand(d, dtype=torch.float64) + 0.5 for _ in range(2)]
    ref = locality_mix_reference(o, x, z, *w, 1e-6, act)
    dy = torch.randn_like(ref)
    gref = locality_mix_reference_bwd(dy, o, x, z, *w, 1e-6, act)
    f = [t.float() for t in (o, x, z, *w)]
    got = [locality_mix_fwd_triton(*f, 1e-6, act), *locality_mix_bwd_triton(dy.float(), *f, 1e-6, act)]
    out[f"mix{(B, N, h, d, act)}"] = [rel(a, b) for a, b in zip(got, [ref, *gref])]
    # a custom op's outputs may not share memory: 1.0 (a failure) when two of the gradients do
    storages = [t.untyped_storage().data_ptr() for t in got[1:]]
    out[f"mix{(B, N, h, d, act)} distinct outputs"] = [float(len(set(storages)) != len(storages))]
for shape in [(3, 17, 2 * 44), (5, 2 * 1024)]:
    u = torch.randn(*shape[:-1], shape[-1] + 8, dtype=torch.float64)[..., 4:4 + shape[-1]]
    ref = swiglu_reference(u)
    dy = torch.randn_like(ref)
    got = [swiglu_fwd_triton(u.float()), swiglu_bwd_triton(dy.float(), u.float()),
           *swiglu_bwd_triton(dy.float(), u.float(), recompute=True)]
    refs = [ref, swiglu_reference_bwd(dy, u), swiglu_reference_bwd(dy, u), ref]
    out[f"swiglu{shape}"] = [rel(a, b) for a, b in zip(got, refs)]
# the MLP Function (fc1 recomputed in its backward) around those kernels, fp32 leaves
from vigla.ops.swiglu.op import SwiGLUMLPFunction
x64, w1_64, w2_64 = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 9, 24), (64, 24), (16, 32)))
ref = torch.nn.functional.linear(swiglu_reference(torch.nn.functional.linear(x64, w1_64)), w2_64)
dy = torch.randn_like(ref)
gref = torch.autograd.grad(ref, (x64, w1_64, w2_64), dy)
leaves = [t.detach().float().requires_grad_() for t in (x64, w1_64, w2_64)]
y = SwiGLUMLPFunction.apply(*leaves)
out["swiglu_mlp"] = [rel(a, b) for a, b in zip([y, *torch.autograd.grad(y, leaves, dy.float())], [ref, *gref])]
print(json.dumps(out))
"""


def test_fused_kernels_in_interpreter_on_cpu():
    pytest.importorskip("triton", reason="Triton is not installed: the fused kernels cannot run")
    for case, errs in triton_interpreter.run(INTERPRETER_SCRIPT).items():
        assert max(errs) < 1e-5, f"{case}: relative errors {errs}"


FC1_SCRIPT = BF16_FIX + r"""
import json, torch
from vigla.ops.swiglu.triton_kernels import fc1_swiglu_tma, fc1_swiglu_triton
from vigla.ops.swiglu import swiglu_reference
torch.manual_seed(0)
out = {}
# the per-tile kernel: partial row, column and inner-dim tiles (37 rows, I = 88, C = 96), two row blocks
# (130 rows); the persistent TMA kernel on 3 programs (several tiles each): a single 64-wide inner step
# (256 x 64 tiles), a partial inner step and partial tiles (128 x 128, flattened loops), C = 384 (not
# flattened), rows of x 16-byte aligned but not contiguous
cases = [(37, 96, 88, torch.bfloat16, False), (130, 64, 64, torch.float16, False),
         (300, 64, 88, torch.float16, True), (200, 96, 136, torch.bfloat16, True), (130, 384, 64, torch.float16, True)]
for M, C, I, dtype, tma in cases:
    x = torch.randn(M, C + (8 if tma else 3), dtype=torch.float64)[:, :C].to(dtype)  # a strided row view
    w = (torch.randn(2 * I, C, dtype=torch.float64) / C ** 0.5).to(dtype)
    ref = swiglu_reference(x.double() @ w.double().t())
    if tma:
        y = torch.full((M, I), float("nan"), dtype=dtype)
        fc1_swiglu_tma(x, w, y, programs=3)
    else:
        y = fc1_swiglu_triton(x, w)
    out[f"{(M, C, I, str(dtype), tma)}"] = [list(y.shape) == [M, I] and y.dtype == dtype,
                                            ((y.double() - ref).norm() / ref.norm()).item()]
print(json.dumps(out))
"""


def test_fc1_swiglu_kernel_in_interpreter_on_cpu():
    """fc1 with the gating in its epilogue (half precision, the GPU's rounding), both kernels, against float64
    on the same values: within one rounding of the output (every element written: NaN would show)."""
    pytest.importorskip("triton", reason="Triton is not installed: the fused kernels cannot run")
    for case, (shape_ok, err) in triton_interpreter.run(FC1_SCRIPT).items():
        assert shape_ok and err < (8e-3 if "bfloat16" in case else 1e-3), f"{case}: relative error {err:.2e}"


# ----------------------------------------------------------------------------------------- GPU
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 196, 3, 64, True), (2, 3136, 3, 32, False), (1, 49, 24, 32, False)])
def test_locality_mix_kernel_on_gpu(shape, dtype):
    B, N, h, d, act = shape
    x64 = _mix_inputs(B, N, h, d, device="cuda")
    ref = locality_mix_reference(*x64, 1e-6, act)
    dy = torch.randn_like(ref)
    gref = locality_mix_reference_bwd(dy, *x64, 1e-6, act)
    x = [t.to(dtype).requires_grad_() for t in x64[:3]] + [t.float().requires_grad_() for t in x64[3:]]
    y = locality_mix(*x, act=act)
    assert y.dtype == dtype and rel(y, ref) < TOL[dtype]
    grads = torch.autograd.grad(y, x, dy.to(dtype))
    for name, a, b in zip(["do", "dx", "dz", "dw_o", "dw_l"], grads, gref):
        assert torch.isfinite(a).all() and rel(a, b) < 2 * TOL[dtype], f"{name}: {rel(a, b):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128 * 196, 2 * 512), (7, 33, 2 * 2752)])
def test_swiglu_kernel_on_gpu(shape, dtype):
    u64 = torch.randn(*shape, dtype=torch.float64, device="cuda")
    ref = swiglu_reference(u64)
    dy = torch.randn_like(ref)
    u = u64.to(dtype).requires_grad_()
    y = swiglu(u)
    assert y.dtype == dtype and rel(y, ref) < TOL[dtype]
    (du,) = torch.autograd.grad(y, u, dy.to(dtype))
    assert rel(du, swiglu_reference_bwd(dy, u64)) < 2 * TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(128 * 196, 192, 512), (20001, 128, 352), (40000, 64, 192), (17000, 384, 1024),
                                   (66, 128, 352), (5, 96, 88)])
def test_fc1_swiglu_kernel_on_gpu(shape, dtype):
    """fc1 + gating in one kernel against float64 on the same half-precision values, as the op routes it and,
    where there are at least as many tiles as multiprocessors on a GPU with TMA, the persistent kernel itself
    (ViG-T's MLP at batch 128; partial row and column tiles; a single inner step, C = 64; C >= 384, loops not
    flattened); the per-tile one with fewer tiles than multiprocessors; x a view of strided rows."""
    from vigla.ops.swiglu import triton_kernels as K

    M, C, I = shape
    x = torch.randn(M, C + 8, device="cuda").to(dtype)[:, :C]
    w1 = (torch.randn(2 * I, C, device="cuda") / C ** 0.5).to(dtype)
    ref = swiglu_reference(x.double() @ w1.double().t())
    y = K.fc1_swiglu_triton(x, w1)
    assert y.shape == (M, I) and y.dtype == dtype and rel(y, ref) < TOL[dtype]
    sms = multiprocessors(x.device.index)
    if K._has_tma(x.device.index) and K._fills_device(M, C, I, sms):
        y = torch.full((M, I), float("nan"), device="cuda", dtype=dtype)
        K.fc1_swiglu_tma(x, w1, y, sms)
        assert rel(y, ref) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_swiglu_mlp_on_gpu(amp):
    """The Triton path (fc1 and the gating recomputed in the backward) against float64; under bf16
    autocast with fp32 input and weights, as in the model."""
    x64 = torch.randn(4, 196, 192, dtype=torch.float64, device="cuda")
    w1_64 = torch.randn(1024, 192, dtype=torch.float64, device="cuda") / 192 ** 0.5
    w2_64 = torch.randn(192, 512, dtype=torch.float64, device="cuda") / 512 ** 0.5
    leaves64 = [t.requires_grad_() for t in (x64, w1_64, w2_64)]
    ref = F.linear(swiglu_reference(F.linear(x64, w1_64)), w2_64)
    dy = torch.randn_like(ref)
    gref = torch.autograd.grad(ref, leaves64, dy)
    leaves = [t.detach().float().requires_grad_() for t in leaves64]
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        y = swiglu_mlp(*leaves)
    tol = 1e-2 if amp else 1e-5
    assert y.dtype == (torch.bfloat16 if amp else torch.float32) and rel(y, ref) < tol
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    for g, g64 in zip(grads, gref):
        assert g.dtype == torch.float32 and rel(g, g64) < 2 * tol


@pytest.mark.gpu
def test_fused_ops_opcheck():
    o, x, z, w_o, w_l = (t.float().requires_grad_() for t in _mix_inputs(2, 10, 2, 32, device="cuda"))
    torch.library.opcheck(torch.ops.vigla.locality_mix.default, (o, x, z, w_o, w_l, 1e-6, True))
    u = torch.randn(3, 5, 64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.vigla.swiglu.default, (u,))
    x = torch.randn(3, 5, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(96, 64, device="cuda") / 8).to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(torch.ops.vigla.fc1_swiglu.default, (x, w1))
    # a dispatch mode sees the custom op: the FLOP counter counts fc1's GEMM through its formula
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        swiglu_mlp(x.float(), w1.float(), torch.randn(64, 48, device="cuda"))
    assert counter.get_total_flops() == 2 * 15 * 64 * 96 + 2 * 15 * 48 * 64


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vig_tiny", "vig_small", "vig_h_tiny"])
def test_fused_model_matches_reference_ops(name):
    """The model on its fused paths (Triton BiGLA, locality mix, SwiGLU) against the same weights
    through the PyTorch references: fp32 logits and gradients, and bf16 autocast logits."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).cuda().eval()  # eval: no drop path
    x = torch.randn(2, 3, 224, 224, device="cuda")

    def run(reference: bool, amp: bool):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            if reference:
                with reference_ops():
                    out = model(x)
            else:
                out = model(x)
        out.float().square().mean().backward()
        return out.float(), [p.grad.clone() for p in model.parameters()]

    torch.backends.cuda.matmul.allow_tf32 = False
    out_f, grads_f = run(False, False)
    out_r, grads_r = run(True, False)
    assert rel(out_f, out_r) < 1e-4
    assert rel(torch.cat([g.flatten() for g in grads_f]), torch.cat([g.flatten() for g in grads_r])) < 1e-3
    out_f, _ = run(False, True)
    out_r, _ = run(True, True)
    assert rel(out_f, out_r) < 3e-2


def test_folded_mlp_path_gives_the_models_logits(monkeypatch):
    """The GPU inference path's split of norm2 (the output projection, the residual add and each row's reciprocal
    RMS in one op; norm2's weight folded into fc1 and the RMS applied to fc1's output inside the MLP's op), taken
    here on the CPU through the ops' reference paths: the same logits as the model's (float32; norm weights away
    from one, so that a weight left out or applied twice would show), in every block; where the MLP is not fused,
    no folded copy of fc1 is built."""
    import vigla.layers.mlp as mlp_layer
    import vigla.models._vig_common as common

    torch.manual_seed(0)
    model = timm.create_model("vig_tiny", num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    taken = []
    folded = common.ViGBlock._folded_mlp
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):  # plain weights: projections deferrable
        monkeypatch.setattr(common, "linear_fused", lambda *a: True)
        expect = model(x)
        kept = lambda: [("fc_folded" in blk.mlp.__dict__.get("_inference_weights", {})) for blk in model.blocks]
        assert not any(kept())  # the MLP not fused (mlp_fused: CUDA only): no folded copy of fc1 built or kept
        monkeypatch.setattr(mlp_layer, "mlp_fused", lambda *a: True)
        monkeypatch.setattr(common.ViGBlock, "_folded_mlp", lambda *a: taken.append(1) or folded(*a))
        model = copy.deepcopy(model)  # the blocks' records (their choices of kernels) made anew, patched
        got = model(x)
        assert model(x).equal(got)  # the second call from the records
    assert len(taken) == len(model.blocks) and all(kept())
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-6), (got - expect).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_bf16_residual_stream_of_gpu_inference_is_as_accurate(name, monkeypatch):
    """Inference on the GPU, eager and compiled (Inductor), keeps the residual stream in bf16 under bf16 autocast
    (run_blocks): its logits are as close to the float64 model's (the references, every activation in float64)
    as those of the recording path, whose stream is float32. The whole MLP runs inside the next add + norm's
    kernel wherever it may (``vigla::mlp_add_norm``; taken here at any batch, counted in eager), in ViG-T with
    norm2 split around it (its weight inside fc1, each row's reciprocal RMS from the projection's kernel)."""
    import copy

    import vigla.ops.add_norm.op as add_norm_op

    calls = []
    kernel = add_norm_op.mlp_add_norm_fwd_triton
    monkeypatch.setattr(add_norm_op, "mlp_fills_device", lambda rows, index: True)
    monkeypatch.setattr(add_norm_op, "mlp_add_norm_fwd_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).cuda().eval()
    model.set_cuda_graphs(False)  # the eager path's kernel calls counted once each (a replay's capture runs it 3x)
    with torch.no_grad():  # weights of a trained model's scale: the blocks' branches move the stream
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad(), reference_ops():
        ref = copy.deepcopy(model).double()(x.double())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = model(x)
            eager_calls = len(calls)
            compiled = torch.compile(model, fullgraph=True)(x)
        recorded = model(x.clone().requires_grad_())
    # each MLP of 96 or 192 channels whose block is not a stage's last (its output goes to the downsampling)
    assert eager_calls == (12 if name == "vig_tiny" else 2)
    e_fast, e_compiled, e_rec = rel(fast, ref), rel(compiled, ref), rel(recorded, ref)
    assert e_fast < 1.5 * e_rec + 2e-3, f"bf16 stream {e_fast:.2e}, float32 stream {e_rec:.2e}"
    assert e_compiled < 1.5 * e_rec + 2e-3, f"compiled {e_compiled:.2e}, float32 stream {e_rec:.2e}"


@pytest.mark.gpu
def test_vig_block_compiles_without_graph_breaks():
    """The custom ops (BiGLA, locality mix, SwiGLU) let torch.compile trace a whole ViG block."""
    torch.manual_seed(0)
    block = timm.create_model("vig_tiny", num_classes=0).blocks[0].cuda()
    x = torch.randn(2, 196, 192, device="cuda", requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, got = block(x, (14, 14)), compiled(x, (14, 14))
    assert rel(got, eager) < 1e-2
    (g_eager,), (g_got,) = (torch.autograd.grad(y.float().sum(), x) for y in (eager, got))
    assert rel(g_got, g_eager) < 1e-2
