"""The fused Triton kernel against the float64 recurrence.

* On CPU: a few small shapes through Triton's interpreter (``TRITON_INTERPRET=1``, in a
  subprocess because the flag must be set before Triton is imported).
* On a GPU (``pytest -m gpu``): 90 random shapes (every T class from 1 to 16384, K 16-128, V 32-256,
  three dtypes, strided and contiguous), forward and all five gradients, gates from ~0 to -25 per
  token; ``torch.library.opcheck``; ``torch.compile`` of the op; determinism.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from vigla.ops import reference_ops
from vigla.ops.bigla import bigla, bigla_chunked, bigla_gated, bigla_naive
import triton_interpreter
from triton_interpreter import BF16_FIX

pytest.importorskip("triton", reason="Triton is not installed: the fused kernel cannot be tested")

INTERPRETER_SCRIPT = BF16_FIX + r"""
import json, sys, torch, torch.nn.functional as F
from vigla.ops.bigla.triton_kernels import BiGLAConfig, bigla_fwd_triton, bigla_bwd_triton
from vigla.ops.bigla import bigla_naive
torch.manual_seed(int(sys.argv[1]))
res = []
def gate(shape, kind):
    z = F.logsigmoid(torch.randn(shape, dtype=torch.float64) * 3)
    strong = -20 * torch.rand(shape, dtype=torch.float64)
    return {"normal": z / 16, "mid": -1.5 * torch.rand(shape, dtype=torch.float64), "strong": strong,
            "mixed": torch.where(torch.rand(shape) < 0.5, z, strong)}[kind]
logits = {"normal": lambda s: torch.randn(s, dtype=torch.float64) * 3,  # gate logits z
          "weak": lambda s: torch.randn(s, dtype=torch.float64) + 12,  # logsigmoid(z) ~ -6e-6
          "strong": lambda s: -25 * torch.rand(s, dtype=torch.float64)}
for B, T, H, K, V, kind, segments, strided, norm, dtype, chunk, *steep in json.loads(sys.argv[2]):
    make = (lambda s: gate(s, kind)) if norm is None else logits[kind]
    dt = getattr(torch, dtype)  # the kernel's inputs; the reference takes the same values in float64
    if strided:  # q, k, v: column slices of one projection; the gates: slices of one tensor
        qkv = torch.randn(B, T, H, 2 * K + V + 3, dtype=torch.float64).to(dt)
        q, k, v = qkv[..., :K], qkv[..., K:2 * K], qkv[..., 2 * K:2 * K + V]
        gf, gb = torch.stack([make((B, T, H, K)), make((B, T, H, K))], -2).to(dt).unbind(-2)
    else:
        q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
        v = torch.randn(B, T, H, V, dtype=torch.float64)
        q, k, v, gf, gb = (t.to(dt) for t in (q, k, v, make((B, T, H, K)), make((B, T, H, K))))
    xk = [q, k, v, gf, gb]
    x = [t.detach().double().requires_grad_() for t in xk]
    if norm is None:
        ref = bigla_naive(*x, K ** -0.5)
    else:  # the kernels take the logits; the reference forms the log decays in float64
        ref = bigla_naive(*x[:3], F.logsigmoid(x[3]) / norm, F.logsigmoid(x[4]) / norm, K ** -0.5)
    do = torch.randn_like(ref).to(dt)
    gref = torch.autograd.grad(ref, x, do.double())
    cfg = BiGLAConfig(chunk=chunk, segments=segments, steep_pass=steep[0] if steep else None)
    out = bigla_fwd_triton(*xk, K ** -0.5, gate_normalizer=norm, config=cfg)
    grads = bigla_bwd_triton(*xk, do, K ** -0.5, gate_normalizer=norm, config=cfg)
    assert [t.dtype for t in (out, *grads)] == [dt] * 6, [t.dtype for t in (out, *grads)]
    err = lambda a, b, d: ((a.double() - b).norm() / d).item()
    term = (x[0] * gref[0]).norm()  # gate gradients are sums of such terms (zero when T = 1)
    dens = [ref.norm()] + [b.norm() for b in gref[:3]] + [max(b.norm(), term) for b in gref[3:]]
    res.append([err(a, b, d) for a, b, d in zip([out, *grads], [ref, *gref], dens)])
print(json.dumps(res))
"""


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-6)).item()


def test_triton_kernel_in_interpreter_on_cpu():
    """Every path of the kernels: factored tensor-core chunks ("normal", "mid"), the elementwise
    exact path for steep decays ("strong", "mixed"), walks in one and several segments (the carry
    kernel), several value blocks (V = 128, 256), K = 64 / 128, strided inputs (column slices of
    one projection), ragged last chunks, T = 1, chunks of 16, 32 and 64 tokens, the steep pass of the output kernel
    (default with 64-token chunks) and of the backward (forced on at 32 in the next-to-last case; both off at 64 in the
    last); gate logits turned
    into log decays inside the kernels (the normalizer field), from gates near 1 (where log1p
    matters) to -25 per token; bf16 inputs (outputs and all five gradients in bf16, states stored
    in bf16; the forward's and the values' gradient's products on bf16 operands) and fp16 inputs (tf32
    products), both through the tensor-core path (``HALF_DOTS``; the interpreter with the GPU's bf16
    arithmetic, ``triton_interpreter.BF16_FIX``), against float64 on the same values. bf16 outputs
    round to 2^-9: the errors are ~1.7e-3 from that alone, ~3e-3 with the bf16 products."""
    f32, bf16, f16 = "float32", "bfloat16", "float16"
    shapes = [(1, 1, 1, 16, 16, "normal", None, False, None, f32, 64),
              (2, 7, 2, 16, 32, "normal", None, True, None, f32, 16),
              (1, 200, 1, 32, 64, "mid", None, False, None, f32, 64),
              (1, 200, 1, 32, 64, "strong", None, True, None, f32, 64),
              (1, 300, 1, 32, 64, "mixed", 3, True, None, f32, 64),
              (1, 140, 2, 16, 128, "mixed", 2, True, None, f32, 32),
              (1, 129, 1, 128, 64, "normal", 2, False, None, f32, 64),
              (1, 70, 1, 64, 256, "mid", None, False, None, f32, 16),
              (1, 200, 1, 32, 64, "weak", 3, True, 16.0, f32, 64),
              (1, 150, 1, 32, 128, "strong", 2, False, 1.0, f32, 32),
              (2, 90, 2, 32, 64, "normal", 3, True, 16.0, bf16, 64),
              (1, 70, 1, 16, 128, "mixed", None, False, None, bf16, 32),
              (1, 130, 1, 32, 64, "mid", None, False, None, bf16, 64),  # bf16 factors up to e^+-48
              (2, 90, 2, 32, 64, "normal", 3, True, 16.0, f16, 32),
              (1, 100, 1, 16, 128, "mixed", 2, False, None, f16, 64),
              (1, 160, 1, 32, 64, "mixed", None, True, None, f32, 32, True),
              (1, 200, 1, 32, 64, "strong", 2, True, None, f32, 64, False)]
    errors = triton_interpreter.run(INTERPRETER_SCRIPT, "0", json.dumps(shapes))
    for shape, errs in zip(shapes, errors):
        tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 6e-3}[shape[9]]
        assert max(errs) < tol, f"{shape}: relative errors (o, dq, dk, dv, dgf, dgb) = {errs}"


GATE_SCRIPT = r"""
import json, math, torch, triton, triton.language as tl
from vigla.ops.bigla.triton_kernels import _load_gate, _sigmoid_neg

@triton.jit
def gates(z, la, slope, ginv):
    rows, cols = tl.program_id(0) * 64 + tl.arange(0, 64), tl.arange(0, 16)
    tl.store(la + rows[:, None] * 16 + cols[None, :], _load_gate(z, rows, cols, 16, 1 << 30, ginv, 1))
    x = tl.load(z + rows[:, None] * 16 + cols[None, :])
    tl.store(slope + rows[:, None] * 16 + cols[None, :], _sigmoid_neg(x))

z = torch.cat([torch.linspace(-100, 100, 2 ** 15), torch.randn(2 ** 15) * 4,
               torch.logspace(-30, 2, 2 ** 14), -torch.logspace(-30, 2, 2 ** 14)]).float()
la, slope = torch.empty_like(z), torch.empty_like(z)
gates[(z.numel() // 1024,)](z, la, slope, 1 / 16)
zd = z.double()
# relative error (float32 normals) over its bound: a few ulp, plus what exp2 turns the error of its argument
# -|z| log2(e) into (log2(e) and the product each rounded to float32: up to |z| 2^-24 each, relative, after exp2)
bound = 4e-7 + 1.2e-7 * zd.abs()
rel = lambda a, b: ((a.double() - b).abs() / b.abs().clamp_min(2 ** -126) / bound).max().item()
log2e = 1 / math.log(2)  # the kernels' log decays are in base 2
print(json.dumps([rel(la, torch.nn.functional.logsigmoid(zd) / 16 * log2e), rel(slope, torch.sigmoid(-zd))]))
"""


def test_gate_forms_in_interpreter_on_cpu():
    """The kernels' base-2 log decays ``logsigmoid(z) / 16`` (``_load_gate``: the series for ``log1p``) and the logits'
    gradient factor ``sigmoid(-z)`` (``_sigmoid_neg``) against float64, elementwise relative error, over logits
    from -100 to 100, 1e-30 to 100 in magnitude either way and random ones: a few float32 ulp wherever the
    value is a float32 normal, including the weak gates (large positive ``z``) where ``1 + exp(-z)`` rounds to
    1 (below 2^-126 the error is measured against 2^-126: subnormal results keep fewer bits, as they did with
    the accurate ``log``), plus what ``exp2(-|z| log2(e))`` loses to its rounded argument (up to ``|z|`` 1.2e-7
    relative, as ``tl.exp`` did on the GPU). The interpreter's reciprocal square root and ``exp2`` are exact, the GPU's
    within 2^-22.9 and 2 ulp: an ulp or two more there."""
    la_err, slope_err = triton_interpreter.run(GATE_SCRIPT)  # errors over their bounds
    assert la_err < 1 and slope_err < 1, (la_err, slope_err)


PREFIX_SCRIPT = BF16_FIX + r"""
import json, torch, triton, triton.language as tl
from vigla.ops.bigla.triton_kernels import _prefix_sums, triangles

@triton.jit
def prefix(x, out, tri, BT: tl.constexpr, N: tl.constexpr, REVERSE: tl.constexpr):
    rows, cols = tl.program_id(0) * BT + tl.arange(0, BT), tl.arange(0, N)
    t = tl.load(x + rows[:, None] * N + cols[None, :])
    tl.store(out + rows[:, None] * N + cols[None, :], _prefix_sums(t, tri, BT, REVERSE, True))

torch.manual_seed(0)
res = []
for BT in (16, 32, 64):
    # base-2 log decays: gentle, steep (down to -29 a token) and mixed in magnitude, and logits' gradients of both signs
    x = torch.cat([-torch.rand(4 * BT, 32) * 0.05, -torch.rand(4 * BT, 32) * 29,
                   -torch.logspace(-6, 1.5, 4 * BT * 32).view(4 * BT, 32)[torch.randperm(4 * BT)],
                   torch.randn(4 * BT, 32) * 100]).float()
    for rev in (False, True):
        out = torch.empty_like(x)
        prefix[(x.shape[0] // BT,)](x, out, triangles(BT, x.device), BT=BT, N=32, REVERSE=rev)
        xd = x.double().view(-1, BT, 32)
        want = (xd.flip(1).cumsum(1).flip(1) if rev else xd.cumsum(1)).view(-1, 32)
        scale = (xd.abs().flip(1).cumsum(1).flip(1) if rev else xd.abs().cumsum(1)).view(-1, 32)
        res.append(((out.double() - want).abs() / scale).max().item())  # error over the sum of magnitudes
print(json.dumps(res))
"""


def test_prefix_sums_on_the_tensor_cores_in_interpreter_on_cpu():
    """``_prefix_sums`` on its bf16 path (a triangle of ones times the tile split into two bf16 parts), forward and
    reverse, at 16-, 32- and 64-row chunks, against float64 prefix sums: within 2^-16 of the summed magnitudes (two
    bf16 parts hold each element to 2^-18 of itself; the fp32 sums add a few ulp), over gentle and steep log decays,
    values spread over seven decades and signed ones (the interpreter's products and sums in float32, as the tensor
    cores' are). A lost part (one bf16 rounding, 2^-9) or a wrong triangle fails it."""
    errs = triton_interpreter.run(PREFIX_SCRIPT)
    assert max(errs) < 2 ** -16, errs


def test_triangles_are_kept_only_outside_tracing_and_graph_capture(monkeypatch):
    """The prefix sums' triangles of ones: right, made once per chunk length and device; made anew (not kept) under
    a dispatch mode or while a CUDA graph is captured, where a kept tensor would be fake or filled only in replays."""
    from vigla.ops.bigla import triton_kernels as tk

    monkeypatch.setattr(tk, "_TRIANGLES", {})
    cpu = torch.device("cpu")
    tri = tk.triangles(16, cpu)
    ones = torch.ones(16, 16)
    assert tri.dtype == torch.bfloat16 and torch.equal(tri.float(), torch.stack([ones.tril(), ones.triu()]))
    assert tk.triangles(16, cpu) is tri
    for name in ("via_dispatcher", "_capturing"):
        with monkeypatch.context() as m:
            m.setattr(tk, name, lambda *args: True)
            made = tk.triangles(32, cpu)
            assert made.shape == (2, 32, 32) and tk.triangles(32, cpu) is not made and (32, cpu) not in tk._TRIANGLES
    with monkeypatch.context() as m:  # a traced call never gets the kept (real) tensor
        m.setattr(tk, "via_dispatcher", lambda: True)
        assert tk.triangles(16, cpu) is not tri
    assert tk.triangles(16, cpu) is tri


MIX_SCRIPT = BF16_FIX + r"""
import json, sys, torch, torch.nn.functional as F
from vigla.ops.bigla.triton_kernels import BiGLAConfig, bigla_fwd_triton
from vigla.ops.bigla import bigla_naive
from vigla.ops.locality_mix.reference import locality_mix_reference
torch.manual_seed(0)
res = []
for B, T, H, K, V, dtype, act, chunk, segments in json.loads(sys.argv[1]):
    dt = getattr(torch, dtype)
    C = H * V
    proj = torch.randn(B, T, H * (2 * K + V) + 2 * H * K + C + 5, dtype=torch.float64).to(dt)  # one projection
    q, k, v, zf, zb, z = proj.split([H * K, H * K, H * V, H * K, H * K, C + 5], -1)
    q, k, zf, zb = (t.unflatten(-1, (H, K)) for t in (q, k, zf, zb))
    v, z = v.unflatten(-1, (H, V)), z[..., 3:3 + C]  # the mix gate's logits: a column slice
    x = torch.randn(B, T, C, dtype=torch.float64).to(dt)  # the local branch
    w_o, w_l = torch.rand(V) + 0.5, torch.rand(V) + 0.5
    y = bigla_fwd_triton(q, k, v, zf, zb, K ** -0.5, 16.0, BiGLAConfig(chunk=chunk, segments=segments),
                         mix=(x, z, w_o, w_l, 1e-6, act))
    d = lambda t: t.double()
    o = bigla_naive(d(q), d(k), d(v), F.logsigmoid(d(zf)) / 16, F.logsigmoid(d(zb)) / 16, K ** -0.5)
    ref = locality_mix_reference(o, d(x), d(z), d(w_o), d(w_l), 1e-6, act)
    res.append([str(y.dtype), list(y.shape), ((y.double().flatten(2) - ref).norm() / ref.norm()).item()])
print(json.dumps(res))
"""


def test_bigla_mix_in_interpreter_on_cpu():
    """BiGLA's output kernel forming ViG's locality mix (the inference path's ``vigla::bigla_mix``): gate logits,
    the mix gate a column slice of a wider projection, SiLU on and off, d_v = 64 and 32, several chunks and
    segments, a ragged last chunk, float32 and bf16; against float64 BiGLA followed by the float64 mix on the same
    values."""
    f32, bf16 = "float32", "bfloat16"
    shapes = [(2, 70, 3, 32, 64, f32, True, 32, 1), (1, 130, 2, 16, 32, f32, False, 16, 3),
              (2, 90, 2, 32, 64, bf16, True, 64, 2)]
    for shape, (dtype, out_shape, err) in zip(shapes, triton_interpreter.run(MIX_SCRIPT, json.dumps(shapes))):
        B, T, H, K, V = shape[:5]
        assert dtype == f"torch.{shape[5]}" and out_shape == [B, T, H, V], (shape, dtype, out_shape)
        assert err < {f32: 1e-5, bf16: 6e-3}[shape[5]], f"{shape}: relative error {err:.2e}"


@pytest.mark.parametrize("B, T, chunk, segments", [(128, 196, 32, 1), (48, 1024, 64, 1), (16, 1024, 64, 4),
                                                   (12, 4096, 64, 8), (4, 16384, 64, 16), (1, 40, 32, 1),
                                                   (1, 100000, 64, 40)])
def test_launch_plan(B, T, chunk, segments):
    """The default plan at ViG-T layer shapes on a 132-multiprocessor H200 (walks cut into segments
    only when their programs would leave the GPU idle and cutting shortens the chain of chunk steps: at 48 x 1024
    four segments of four chunks save none) and the plan's invariants: whole chunks per
    segment, every chunk in exactly one segment, explicit choices honoured and checked."""
    from vigla.ops.bigla.triton_kernels import BWD_WHOLE_WALK, BiGLAConfig, plan

    p = plan(B, T, 3, 32, 64, True, 132, 2)
    assert (p.BT, p.BV, p.NV, p.nseg) == (chunk, 64, 1, segments), p
    assert p.NT == -(-T // chunk) and (p.nseg - 1) * p.seg < p.NT <= p.nseg * p.seg
    assert not p.state_fp32 and plan(B, T, 3, 32, 64, False, 132, 2).state_fp32
    # the forward's prefix sums on the tensor cores: bf16 at 64-token chunks only (fp32 products: never)
    assert p.mma == (chunk == 64) and not plan(B, T, 3, 32, 64, False, 132, 2, BiGLAConfig(chunk=64)).mma
    # ... and in the walk where it has more than one warp (ViG-H's d_k = 16 walks have one)
    assert p.walk_mma == p.mma and not plan(B, T, 3, 16, 32, True, 132, 4, BiGLAConfig(chunk=64)).walk_mma
    # ... and in the backward's per-chunk kernel at d_k >= 32 (ViG-H's d_k = 16: off)
    assert p.bwd_mma == p.mma and not plan(B, T, 3, 16, 32, True, 132, 4, BiGLAConfig(chunk=64)).bwd_mma
    # the backward's walks: whole up to BWD_WHOLE_WALK chunks, cut as the forward's beyond
    bwd = plan(B, T, 3, 32, 64, True, 132, 4)
    assert bwd.nseg == 1 if bwd.NT <= BWD_WHOLE_WALK else bwd.nseg > 1, bwd
    # its per-chunk kernel stores each gradient early at 64-token chunks of whole walks (d_k = 32: T = 1024, 4096
    # here; T <= 256 takes 16-token chunks, T >= 16384 segmented walks) and of d_k = 16's segmented walks
    assert bwd.bwd_order == (T in (1024, 4096)), bwd
    assert plan(B, T, 3, 16, 32, True, 132, 4, BiGLAConfig(chunk=64)).bwd_order  # segmented from T = 16384
    for n in (1, 3, 1000):  # an explicit count, clipped to the chunks there are
        p = plan(B, T, 3, 32, 256, True, 132, 4, BiGLAConfig(chunk=32, segments=n, bv=128))
        assert (p.BT, p.BV, p.NV) == (32, 128, 2)
        assert p.nseg <= min(n, p.NT) and (p.nseg - 1) * p.seg < p.NT <= p.nseg * p.seg
    with pytest.raises(ValueError, match="chunk must be 16, 32 or 64"):
        plan(B, T, 3, 32, 64, True, 132, 2, BiGLAConfig(chunk=48))
    with pytest.raises(ValueError, match="d_k in"):
        plan(B, T, 3, 24, 64, True, 132, 2)


def test_default_launch():
    """The measured choices (chunk, warps, register cap) per pass: ViG-H's d_k = 16 heads and ViG-T/S's
    d_k = 32 heads, short and long sequences; the old rules, uncapped, for shapes not measured; a
    default cap is dropped with an explicit chunk length and kept with an explicit warp count; the walk's cap and
    depth, and the launch options they become."""
    from vigla.ops.bigla.triton_kernels import BiGLAConfig, _options, default_launch, plan

    assert {default_launch(T, 16, 32, True, 2) for T in (49, 784, 3136, 16384)} == {(16, 1, 128)}
    assert [default_launch(T, 16, 32, True, 4) for T in (49, 3136, 4096, 4097, 16384)] == [(16, 2, 80)] * 3 + [
        (64, 4, 168)] * 2
    assert [default_launch(T, 32, 64, True, 2) for T in (196, 256, 257)] == [(32, 4, 96)] * 2 + [(64, 4, 128)]
    assert [default_launch(T, 32, 64, True, 4) for T in (196, 256, 257)] == [(16, 4, 80)] * 2 + [(64, 4, 0)]
    assert default_launch(196, 64, 128, True, 2) == (32, 8, 0) and default_launch(4096, 32, 128, True, 4) == (64, 8, 0)
    assert {default_launch(T, K, V, False, c)[0] for T in (1, 196, 4096) for c in (2, 4)
            for K, V in ((16, 32), (32, 64), (128, 64))} == {32}
    p = plan(128, 196, 3, 32, 64, True, 132, 2)
    assert (p.BT, p.warps_chunk, p.regs) == (32, 4, 96)
    p = plan(128, 196, 3, 32, 64, True, 132, 2, BiGLAConfig(chunk=64))
    assert (p.BT, p.regs) == (64, 0)
    p = plan(128, 196, 3, 32, 64, True, 132, 2, BiGLAConfig(warps_chunk=8, regs=0))
    assert (p.BT, p.warps_chunk, p.regs) == (32, 8, 0)
    p = plan(128, 3136, 3, 16, 32, True, 132, 2)
    assert (p.BT, p.warps_chunk, p.regs, p.warps_walk) == (16, 1, 128, 1)
    assert plan(128, 3136, 3, 16, 32, True, 132, 2, BiGLAConfig(warps_walk=4)).warps_walk == 4
    assert plan(128, 196, 3, 32, 64, True, 132, 4).regs == 80
    assert [plan(128, 196, 3, 32, 64, True, 132, c, BiGLAConfig(regs=96, bwd_regs=0)).regs for c in (2, 4)] == [96, 0]
    assert [plan(128, 196, 3, 32, 64, True, 132, c, BiGLAConfig(bwd_regs=64)).regs for c in (2, 4)] == [96, 64]
    # the output kernel's steep pass: with 64-token chunks, unless the config says otherwise; the backward's on request
    assert plan(48, 1024, 3, 32, 64, True, 132, 4).steep_pass is False
    assert plan(48, 196, 3, 32, 64, True, 132, 4, BiGLAConfig(steep_pass=True)).steep_pass is True
    assert [plan(48, T, 3, 32, 64, True, 132, 2).steep_pass for T in (196, 1024)] == [False, True]
    assert plan(48, 1024, 3, 32, 64, True, 132, 2, BiGLAConfig(steep_pass=False)).steep_pass is False
    assert plan(48, 196, 3, 32, 64, True, 132, 2, BiGLAConfig(steep_pass=True)).steep_pass is True
    # the walk: 128 registers for short sequences, two stages too for ViG-H's d_k = 16 heads up to T = 4096;
    # config fields override (0: none, Triton's default depth); another chunk length drops the defaults
    walks = {(T, K): plan(128, T, 3, K, 2 * K, True, 132, 2) for T in (196, 784, 4096, 16384) for K in (16, 32)}
    assert {tk: (p.walk_regs, p.walk_stages) for tk, p in walks.items()} == {
        (196, 16): (128, 0), (196, 32): (128, 0), (784, 16): (128, 2), (784, 32): (0, 0), (4096, 16): (128, 2),
        (4096, 32): (0, 0), (16384, 16): (0, 0), (16384, 32): (0, 0)}
    assert plan(128, 196, 3, 32, 64, False, 132, 2).walk_regs == 0  # fp32: not measured, Triton's choices
    assert plan(128, 196, 3, 64, 128, True, 132, 2).walk_regs == 0  # wider heads: the cap would spill
    assert [plan(48, 196, 3, 32, 64, True, 132, 4, BiGLAConfig(walk_regs=w)).walk_regs for w in (None, 0, 88)] == [
        128, 0, 88]
    assert [plan(48, 784, 3, 16, 32, True, 132, 4, BiGLAConfig(walk_stages=w)).walk_stages for w in (None, 0, 4)] == [
        2, 0, 4]
    assert (lambda p: (p.walk_regs, p.walk_stages))(plan(48, 784, 3, 16, 32, True, 132, 2, BiGLAConfig(chunk=64))) == (
        0, 0)
    walks = [plan(128, T, 3, 16, 32, True, 132, 4) for T in (196, 3136, 16384)]
    assert [_options(p.walk_regs, p.walk_stages) for p in walks] == [
        {"maxnreg": 128}, {"maxnreg": 128, "num_stages": 2}, {}]


# ----------------------------------------------------------------------------------------- GPU
def _random_shapes(n, seed=0):
    """``n`` cases: every T class (1 to 16384, then random up to 3000), the model's head sizes and
    the kernels' extremes (K 16-128, V 32-256), three dtypes, strided and contiguous inputs, all
    gate kinds; head sizes and dtypes cycle so that each kernel variant compiles once or twice."""
    g = torch.Generator().manual_seed(seed)
    fixed_T = [1, 7, 63, 64, 65, 196, 784, 3136, 4096, 16384]
    heads = [(32, 64), (16, 32), (64, 128), (128, 64), (32, 256)]
    shapes = []
    for i in range(n):
        T = fixed_T[i % len(fixed_T)] if i < 3 * len(fixed_T) else int(torch.randint(1, 3000, (1,), generator=g))
        K, V = heads[i % len(heads)]
        budget = max(1, 2 ** 21 // (T * (K + V)))  # keep each case small enough for the reference
        B = int(torch.randint(1, 4, (1,), generator=g))
        H = int(torch.randint(1, 5, (1,), generator=g))
        while B * H > budget and (B > 1 or H > 1):
            B, H = (B - 1, H) if B > 1 else (B, H - 1)
        gate = ["weak", "init", "mid", "mixed", "strong"][i % 5]
        dtype = [torch.float32, torch.bfloat16, torch.float16][(i // 5) % 3]
        shapes.append((B, T, H, K, V, gate, dtype, i % 2 == 1))
    return shapes


def _gates(shape, kind, device):
    z = torch.randn(shape, device=device, dtype=torch.float64)
    if kind == "weak":  # decay ~ 1 per token
        return F.logsigmoid(z + 12) / 16
    if kind == "init":  # ViG at init: logsigmoid(~0)/16
        return F.logsigmoid(z) / 16
    if kind == "mid":  # too steep for one 64-token chunk, fine for 16-token sub-chunks
        return -1.5 * torch.rand(shape, device=device, dtype=torch.float64)
    if kind == "strong":
        return torch.full(shape, -20.0, device=device, dtype=torch.float64) * \
            torch.rand(shape, device=device, dtype=torch.float64)
    return torch.where(torch.rand(shape, device=device) < 0.5, F.logsigmoid(z * 4),
                       -20 * torch.rand(shape, device=device, dtype=torch.float64))


TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _reference(x64, scale):
    T = x64[0].shape[1]
    # the naive recurrence is the ground truth; past 512 tokens its per-token Python loop is slow,
    # so the float64 chunked path (equal to it to 1e-10 in the CPU suite) stands in
    fn = bigla_naive if T <= 512 else bigla_chunked
    return fn(*x64, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _random_shapes(60), ids=lambda c: "B{}T{}H{}K{}V{}-{}-{}{}".format(
    *c[:6], str(c[6]).split(".")[-1], "-strided" if c[7] else ""))
def test_triton_matches_float64_reference(case):
    B, T, H, K, V, gate, dtype, strided = case
    dev = "cuda"
    x64 = [torch.randn(B, T, H, K, device=dev, dtype=torch.float64),
           torch.randn(B, T, H, K, device=dev, dtype=torch.float64),
           torch.randn(B, T, H, V, device=dev, dtype=torch.float64),
           _gates((B, T, H, K), gate, dev), _gates((B, T, H, K), gate, dev)]
    x64 = [t.requires_grad_() for t in x64]
    ref = _reference(x64, K ** -0.5)
    do = torch.randn_like(ref)
    gref = torch.autograd.grad(ref, x64, do)

    x = [t.detach().to(dtype).requires_grad_() for t in x64[:3]] + \
        [t.detach().float().requires_grad_() for t in x64[3:]]
    if strided:  # as in the model: q, k, v column slices of one projection, gates of one tensor
        qkv = torch.cat([t.detach() for t in x[:3]], -1).requires_grad_()
        g2 = torch.stack([t.detach() for t in x[3:]], -2).requires_grad_()
        x = [*qkv.split([K, K, V], -1), *g2.unbind(-2)]
    out = bigla(*x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype], f"forward rel err {rel_err(out, ref):.2e}"
    grads = torch.autograd.grad(out, x, do.to(dtype))
    for name, a, b, t in zip(["dq", "dk", "dv", "dlog_gf", "dlog_gb"], grads, gref, x):
        assert a.dtype == t.dtype and torch.isfinite(a).all(), name
        # gate gradients are sums of many products of both signs: judge them against the size
        # of the terms, i.e. relative to the norm of q*dq (same scale as the sum)
        denom = b.norm() if name in ("dq", "dk", "dv") else max(b.norm(), (x64[0] * gref[0]).norm())
        err = ((a.double() - b).norm() / denom.clamp_min(1e-6)).item()
        assert err < TOL[dtype] * (1 if name in ("dq", "dk", "dv") else 2), f"{name} rel err {err:.2e}"


def _logits(shape, kind, device):
    """Gate logits ``z`` and a normalizer: log decays ``logsigmoid(z) / n`` from ~0 to -25."""
    z = torch.randn(shape, device=device, dtype=torch.float64)
    if kind == "weak":
        return z + 12, 16.0
    if kind == "init":
        return z, 16.0
    if kind == "mid":
        return 2 * z - 1, 1.0
    if kind == "strong":
        return -25 * torch.rand(shape, device=device, dtype=torch.float64), 1.0
    return torch.where(torch.rand(shape, device=device) < 0.5, 4 * z, -25 * z.abs()), 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("case", _random_shapes(30, seed=1), ids=lambda c: "B{}T{}H{}K{}V{}-{}-{}{}".format(
    *c[:6], str(c[6]).split(".")[-1], "-strided" if c[7] else ""))
def test_triton_gated_matches_float64_reference(case):
    """``bigla_gated``: logits in the inputs' dtype (as under autocast), log decays formed in the
    kernels, gradients of the logits; against float64 with the same (rounded) logits."""
    B, T, H, K, V, kind, dtype, strided = case
    dev = "cuda"
    (zf, norm), (zb, _) = _logits((B, T, H, K), kind, dev), _logits((B, T, H, K), kind, dev)
    x64 = [torch.randn(B, T, H, K, device=dev, dtype=torch.float64),
           torch.randn(B, T, H, K, device=dev, dtype=torch.float64),
           torch.randn(B, T, H, V, device=dev, dtype=torch.float64), zf, zb]
    x64 = [t.to(dtype).double().requires_grad_() for t in x64]  # what the kernel sees
    ref = _reference(x64[:3] + [F.logsigmoid(z) / norm for z in x64[3:]], K ** -0.5)
    do = torch.randn_like(ref)
    gref = torch.autograd.grad(ref, x64, do)
    x = [t.detach().to(dtype) for t in x64]
    if strided:  # as in the model: column slices of one projection, logits of one projection
        qkv = torch.cat(x[:3], -1).requires_grad_()
        z2 = torch.stack(x[3:], -2).requires_grad_()
        x = [*qkv.split([K, K, V], -1), *z2.unbind(-2)]
    else:
        x = [t.requires_grad_() for t in x]
    out = bigla_gated(*x, norm)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype], f"forward rel err {rel_err(out, ref):.2e}"
    grads = torch.autograd.grad(out, x, do.to(dtype))
    for name, a, b, t in zip(["dq", "dk", "dv", "dzf", "dzb"], grads, gref, x):
        assert a.dtype == t.dtype and torch.isfinite(a).all(), name
        denom = b.norm() if name in ("dq", "dk", "dv") else max(b.norm(), (x64[0] * gref[0]).norm() / norm)
        err = ((a.double() - b).norm() / denom.clamp_min(1e-6)).item()
        assert err < TOL[dtype] * (1 if name in ("dq", "dk", "dv") else 2), f"{name} rel err {err:.2e}"


MIX_CASES = [(2, 196, 3, 32, 64, torch.bfloat16, True), (2, 3136, 1, 16, 32, torch.bfloat16, False),
             (1, 4096, 2, 32, 64, torch.float16, True), (1, 300, 2, 32, 64, torch.float32, False),
             (3, 65, 2, 16, 16, torch.bfloat16, True), (2, 1, 2, 32, 64, torch.bfloat16, True),
             (1, 200, 2, 64, 128, torch.bfloat16, True)]  # d_v = 128: BiGLA, then the mix kernel


@pytest.mark.gpu
@pytest.mark.parametrize("case", MIX_CASES, ids=lambda c: "B{}T{}H{}K{}V{}-{}-act{}".format(
    *c[:5], str(c[5]).split(".")[-1], int(c[6])))
def test_bigla_mix_matches_float64_reference(case):
    """``vigla::bigla_mix`` (the inference path: BiGLA's output kernel forming the locality mix, or the two ops
    for d_v > 64) against float64 BiGLA then the float64 mix on the same values; q, k, v, the gate logits and the
    mix gate column slices of one projection, as in the model; ``torch.library.opcheck`` of the op."""
    from vigla.ops.locality_mix.reference import locality_mix_reference

    B, T, H, K, V, dtype, act = case
    C = H * V
    proj = torch.randn(B, T, 4 * H * K + H * V + C + 8, device="cuda", dtype=torch.float64).to(dtype)
    q, k, zf, zb, v, z = proj.split([H * K] * 4 + [H * V, C + 8], -1)
    q, k, zf, zb = (t.unflatten(-1, (H, K)) for t in (q, k, zf, zb))
    v, z = v.unflatten(-1, (H, V)), z[..., 5:5 + C]
    x = torch.randn(B, T, C, device="cuda", dtype=dtype)
    w_o, w_l = torch.rand(V, device="cuda") + 0.5, torch.rand(V, device="cuda") + 0.5
    args = (q, k, v, zf, zb, K ** -0.5, 16.0, x, z, w_o, w_l, 1e-6, act)
    y = torch.ops.vigla.bigla_mix(*args)
    d = [t.double() for t in (q, k, v, zf, zb, x, z, w_o, w_l)]
    o = _reference(d[:3] + [F.logsigmoid(g) / 16 for g in d[3:5]], K ** -0.5)
    ref = locality_mix_reference(o, d[5], d[6], d[7], d[8], 1e-6, act)
    assert y.dtype == dtype and y.shape == (B, T, C) and torch.isfinite(y).all()
    assert rel_err(y, ref) < TOL[dtype], f"rel err {rel_err(y, ref):.2e}"
    if T <= 300:
        torch.library.opcheck(torch.ops.vigla.bigla_mix.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steep_pass_matches_float64_reference(chunk, dtype):
    """The output kernel and the backward's per-chunk kernel each split in two passes (``BiGLAConfig(steep_pass=True)``:
    the chunks whose products factor, then the steep ones through the exact path) and in one, against float64: gate
    logits down to -25 in the first half of the sequence (steep chunks), near 3 in the second (chunks that factor)."""
    from vigla.ops.bigla.triton_kernels import BiGLAConfig, bigla_bwd_triton, bigla_fwd_triton

    B, T, H, K, V = 2, 300, 3, 32, 64
    first = (torch.arange(T, device="cuda") < T // 2)[None, :, None, None]
    z = [torch.where(first, -25.0 * torch.rand(B, T, H, K, device="cuda", dtype=torch.float64),
                     3 + torch.randn(B, T, H, K, device="cuda", dtype=torch.float64)) for _ in range(2)]
    x64 = [torch.randn(B, T, H, D, device="cuda", dtype=torch.float64) for D in (K, K, V)] + z
    x64 = [t.to(dtype).double().requires_grad_() for t in x64]  # what the kernels see
    ref = _reference(x64[:3] + [F.logsigmoid(g) for g in x64[3:]], K ** -0.5)
    do = torch.randn_like(ref)
    gref = torch.autograd.grad(ref, x64, do)
    x = [t.detach().to(dtype) for t in x64]
    for steep in (True, False):
        cfg = BiGLAConfig(chunk=chunk, steep_pass=steep)
        out = bigla_fwd_triton(*x, K ** -0.5, 1.0, cfg)
        assert rel_err(out, ref) < TOL[dtype], f"steep_pass={steep}: forward rel err {rel_err(out, ref):.2e}"
        grads = bigla_bwd_triton(*x, do.to(dtype), K ** -0.5, 1.0, cfg)
        for name, a, b in zip(["dq", "dk", "dv", "dzf", "dzb"], grads, gref):
            denom = b.norm() if name in ("dq", "dk", "dv") else max(b.norm(), (x64[0] * gref[0]).norm())
            err = ((a.double() - b).norm() / denom.clamp_min(1e-6)).item()
            assert err < TOL[dtype] * (1 if name in ("dq", "dk", "dv") else 2), f"steep_pass={steep}: {name} {err:.2e}"


@pytest.mark.gpu
def test_triton_gated_opcheck_and_compile():
    x = [torch.randn(2, 70, 2, 16, device="cuda", requires_grad=True) for _ in range(2)]
    v = torch.randn(2, 70, 2, 32, device="cuda", requires_grad=True)
    z = [torch.randn(2, 70, 2, 16, device="cuda", requires_grad=True) for _ in range(2)]
    torch.library.opcheck(torch.ops.vigla.bigla_fwd.default, (x[0], x[1], v, *z, 0.25, 16.0))

    def f(q, k, v, zf, zb):
        return bigla_gated(q, k, v, zf, zb, 16.0).square().sum()

    eager = torch.autograd.grad(f(*x, v, *z), [*x, v, *z])
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*x, v, *z), [*x, v, *z])
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_triton_is_deterministic():
    x = [torch.randn(2, 500, 3, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    v = torch.randn(2, 500, 3, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = [F.logsigmoid(torch.randn(2, 500, 3, 32, device="cuda")).requires_grad_() for _ in range(2)]
    runs = []
    for _ in range(2):
        out = bigla(x[0], x[1], v, *g)
        runs.append([out] + list(torch.autograd.grad(out.float().square().sum(), [*x, v, *g])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_triton_custom_op_opcheck_and_compile():
    x = [torch.randn(2, 70, 2, 16, device="cuda", requires_grad=True) for _ in range(2)]
    v = torch.randn(2, 70, 2, 32, device="cuda", requires_grad=True)
    g = [F.logsigmoid(torch.randn(2, 70, 2, 16, device="cuda")).requires_grad_() for _ in range(2)]
    torch.library.opcheck(torch.ops.vigla.bigla_fwd.default, (x[0], x[1], v, *g, 0.25))

    def f(q, k, v, gf, gb):
        return bigla(q, k, v, gf, gb).square().sum()

    eager = torch.autograd.grad(f(*x, v, *g), [*x, v, *g])
    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(*x, v, *g), [*x, v, *g])
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_runs_the_kernels_and_reference_ops_the_chunked_path(monkeypatch):
    from vigla.ops.bigla import op

    calls = []
    launcher = op.bigla_fwd_triton
    monkeypatch.setattr(op, "bigla_fwd_triton", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    x = torch.randn(1, 20, 1, 16, device="cuda")
    g = F.logsigmoid(torch.randn(1, 20, 1, 16, device="cuda"))
    fused = bigla(x, x, x, g, g)
    assert calls == [1]
    with reference_ops():
        plain = bigla(x, x, x, g, g)
    assert calls == [1]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
