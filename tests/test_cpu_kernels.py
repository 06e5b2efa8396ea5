"""The compiled CPU kernels of the locality mix, SwiGLU, add + norm and the depthwise conv (``cpu_kernels.c``
beside each op, built by ``vigla.ops.cpu_build``) against their float64 references, forward and backward."""
import os
import subprocess
import sys

import pytest
import torch

from vigla.ops import cpu_build
from vigla.ops.add_norm import add_norm, add_norm_reference, add_norm_reference_bwd
from vigla.ops.add_norm import cpu_kernels as add_norm_cpu
from vigla.ops.dispatch import reference_ops
from vigla.ops.dwconv import cpu_kernels as dwconv_cpu
from vigla.ops.dwconv import dwconv_reference, dwconv_reference_bwd, dwconv_silu
from vigla.ops.locality_mix import cpu_kernels as mix_cpu
from vigla.ops.locality_mix import locality_mix, locality_mix_reference, locality_mix_reference_bwd
from vigla.ops.swiglu import cpu_kernels as swiglu_cpu
from vigla.ops.swiglu import swiglu, swiglu_reference, swiglu_reference_bwd

pytestmark = pytest.mark.skipif(cpu_build.compiler() is None, reason="no C compiler: the CPU kernels are not built")

FWD, BWD = 1e-6, 2e-6  # float32 kernels against float64, relative to the largest value


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def f32(*tensors):
    return [t.float() if t is not None else None for t in tensors]


def autograd_grads(fn, inputs, grad_out):
    """``(out, grads)`` of ``fn(*inputs)`` by autograd, on leaf copies of ``inputs`` (None stays None)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    outs, gos = (out, grad_out) if isinstance(out, tuple) else ((out,), (grad_out,))
    grads = torch.autograd.grad(outs, [t for t in leaves if t is not None], gos)
    return tuple(o.detach() for o in outs), grads


# ---------------------------------------------------------------------------------------------- locality mix
def mix_inputs(B, N, h, d):
    """o, x, z (x and z column slices of one wider tensor, as in the mixer), w_o, w_l; float64."""
    C = h * d
    o = 2 * torch.randn(B, N, h, d, dtype=torch.float64)
    wide = torch.randn(B, N, 3 * C + 5, dtype=torch.float64)
    x, z = 3 * wide[..., :C], 4 * wide[..., C + 5:2 * C + 5]
    return o, x, z, torch.rand(d, dtype=torch.float64) + 0.5, torch.randn(d, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 7, 3, 20), (3, 13, 2, 64), (1, 70, 5, 9)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", [False, True])
def test_locality_mix_kernels_against_float64(shape, act):
    x64 = mix_inputs(*shape)
    dy = torch.randn(*shape[:2], shape[2] * shape[3], dtype=torch.float64)
    ref = locality_mix_reference(*x64, 1e-6, act)
    out = mix_cpu.locality_mix_fwd_cpu(*f32(*x64), 1e-6, act)
    assert out.dtype == torch.float32 and out.shape == ref.shape and rel_err(out, ref) < FWD
    grads = mix_cpu.locality_mix_bwd_cpu(dy.float(), *f32(*x64), 1e-6, act)
    for name, g, r in zip(["o", "x", "z", "w_o", "w_l"], grads, locality_mix_reference_bwd(dy, *x64, 1e-6, act)):
        assert g.shape == r.shape and rel_err(g, r) < BWD, name


@pytest.mark.parametrize("act", [False, True])
def test_locality_mix_public_op_gradients_match_autograd_of_the_reference(act):
    x64 = mix_inputs(2, 9, 3, 12)
    dy = torch.randn(2, 9, 36, dtype=torch.float64)
    ref, g_ref = autograd_grads(lambda *t: locality_mix_reference(*t, 1e-6, act), x64, dy)
    out, grads = autograd_grads(lambda *t: locality_mix(*t, 1e-6, act), f32(*x64), dy.float())
    assert rel_err(out[0], ref[0]) < FWD
    assert all(rel_err(g, r) < BWD for g, r in zip(grads, g_ref))


# ---------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("shape", [(1, 2), (3, 5, 14), (2, 37, 1030)], ids=lambda s: "x".join(map(str, s)))
def test_swiglu_kernels_against_float64(shape):
    u = 4 * torch.randn(*shape, dtype=torch.float64)
    u[..., 0] = torch.tensor([-100.0, 100.0, -88.5, 0.0, 90.0, -3.0])[torch.arange(u[..., 0].numel()) % 6].reshape(
        u[..., 0].shape).double()  # beyond exp's clamp
    dy = torch.randn(*shape[:-1], shape[-1] // 2, dtype=torch.float64)
    out = swiglu_cpu.swiglu_fwd_cpu(u.float())
    assert out.shape == dy.shape and rel_err(out, swiglu_reference(u)) < FWD
    assert rel_err(swiglu_cpu.swiglu_bwd_cpu(dy.float(), u.float()), swiglu_reference_bwd(dy, u)) < BWD


def test_swiglu_public_op_on_a_column_slice_matches_autograd_of_the_reference():
    wide = torch.randn(4, 11, 40, dtype=torch.float64)
    u = wide[..., 3:33]  # row stride 40, not 30
    dy = torch.randn(4, 11, 15, dtype=torch.float64)
    ref, (g_ref,) = autograd_grads(swiglu_reference, [u], dy)
    out, (g,) = autograd_grads(swiglu, [u.float()], dy.float())
    assert rel_err(out[0], ref[0]) < FWD and rel_err(g, g_ref) < BWD


# ---------------------------------------------------------------------------------------------- add + norm
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("shape", [(1, 3), (2, 9, 100), (70, 192)], ids=lambda s: "x".join(map(str, s)))
def test_add_norm_kernels_against_float64(kind, with_delta, shape):
    rms = kind == "rms"
    x = 3 + torch.randn(*shape, dtype=torch.float64)  # an offset: LayerNorm's mean matters
    delta = torch.randn(*shape, dtype=torch.float64) if with_delta else None
    w, b = torch.randn(shape[-1], dtype=torch.float64), None if rms else torch.randn(shape[-1], dtype=torch.float64)
    dy, ds = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    s_ref, y_ref = add_norm_reference(x, delta, w, b, 1e-5, rms, torch.float64)
    s, y = add_norm_cpu.add_norm_fwd_cpu(*f32(x, delta, w, b), 1e-5, rms)
    assert rel_err(y, y_ref) < FWD
    assert rel_err(s, s_ref) < FWD if with_delta else s.shape == (0,)
    ds = ds if with_delta else None
    dx, dw, db = add_norm_cpu.add_norm_bwd_cpu(*f32(dy, ds, s_ref, w), b is not None, 1e-5, rms)
    dx_ref, dw_ref, db_ref = add_norm_reference_bwd(dy, ds, s_ref, w, b, 1e-5, rms)
    assert rel_err(dx, dx_ref) < BWD and rel_err(dw, dw_ref) < BWD
    assert rel_err(db, db_ref) < BWD if b is not None else db.shape == (0,)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_add_norm_public_op_gradients_match_autograd_of_the_reference(kind):
    x, delta = torch.randn(3, 10, 24, dtype=torch.float64), torch.randn(3, 10, 24, dtype=torch.float64)
    w, b = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64) if kind == "layer" else None
    dy, ds = torch.randn(3, 10, 24, dtype=torch.float64), torch.randn(3, 10, 24, dtype=torch.float64)
    inputs = [x, delta, w] + ([b] if b is not None else [])

    def op(add_norm_fn):
        return lambda x, d, w, b=None: add_norm_fn(x, d, w, b, 1e-6, kind)

    with reference_ops():
        ref, g_ref = autograd_grads(op(add_norm), inputs, (ds, dy))
    out, grads = autograd_grads(op(add_norm), f32(*inputs), (ds.float(), dy.float()))
    assert all(rel_err(a, r) < FWD for a, r in zip(out, ref))
    assert len(grads) == len(g_ref) and all(rel_err(g, r) < BWD for g, r in zip(grads, g_ref))


# ---------------------------------------------------------------------------------------------- depthwise conv
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 5, 7, 13), (3, 1, 6, 5), (1, 14, 14, 192)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", [False, True])
def test_dwconv_kernels_against_float64(shape, act):
    B, H, W, C = shape
    x = torch.randn(B, H * W, 2 * C + 1, dtype=torch.float64)[..., 1:C + 1]  # channel slice: token stride 2C + 1
    w = torch.randn(C, 1, 3, 3, dtype=torch.float64)
    dy = torch.randn(B, H * W, C, dtype=torch.float64)
    ref = dwconv_reference(x, w, (H, W), act, torch.float64)
    assert rel_err(dwconv_cpu.dwconv_fwd_cpu(*f32(x, w), H, W, act), ref) < FWD
    dx, dw = dwconv_cpu.dwconv_bwd_cpu(*f32(dy, x, w), H, W, act)
    dx_ref, dw_ref = dwconv_reference_bwd(dy, x, w, (H, W), act)
    assert dw.shape == w.shape and rel_err(dx, dx_ref) < BWD and rel_err(dw, dw_ref) < BWD


def test_dwconv_public_op_gradients_match_autograd_of_the_reference():
    x, w = torch.randn(2, 20, 6, dtype=torch.float64), torch.randn(6, 1, 3, 3, dtype=torch.float64)
    dy = torch.randn(2, 20, 6, dtype=torch.float64)
    ref, g_ref = autograd_grads(lambda x, w: dwconv_reference(x, w, (4, 5), True, torch.float64), [x, w], dy)
    out, grads = autograd_grads(lambda x, w: dwconv_silu(x, w, (4, 5)), f32(x, w), dy.float())
    assert out[0].dtype == torch.float32 and rel_err(out[0], ref[0]) < FWD
    assert all(rel_err(g, r) < BWD for g, r in zip(grads, g_ref))


# ---------------------------------------------------------------------------------------------- all four
def _backwards(threads):
    """Every kernel's backward (weight gradients summed over 100 / 300 rows) with ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x64 = mix_inputs(2, 50, 3, 8)
        mix = mix_cpu.locality_mix_bwd_cpu(torch.randn(2, 50, 24), *f32(*x64), 1e-6, True)
        s, w = torch.randn(300, 24), torch.randn(24)
        norm = add_norm_cpu.add_norm_bwd_cpu(torch.randn(300, 24), None, s, w, True, 1e-6, False)
        conv = dwconv_cpu.dwconv_bwd_cpu(torch.randn(2, 99, 5), torch.randn(2, 99, 5), torch.randn(5, 1, 3, 3), 9, 11,
                                         True)
        return (*mix, *norm, *conv)
    finally:
        torch.set_num_threads(previous)


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(1)
    one = _backwards(1)
    torch.manual_seed(1)
    two = _backwards(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def _add_norm_args():
    x, d, w = torch.randn(2, 6, 8), torch.randn(2, 6, 8), torch.rand(8) + 0.5
    return x, d, w, None, 1e-6, True


def test_eager_calls_skip_the_dispatcher_and_match_it(monkeypatch):
    """In eager mode a CPU kernel runs without its custom op's dispatch (its cost, not its result)."""
    op = add_norm_cpu.add_norm_fwd_cpu
    args = _add_norm_args()
    through = torch.ops.vigla.add_norm_cpu_fwd(*args)

    def refuse(*a):
        raise AssertionError("an eager call went through the dispatcher")

    monkeypatch.setattr(op, "op", refuse)
    direct = op(*args)
    assert all(torch.equal(a, b) for a, b in zip(direct, through))
    s, y = add_norm_reference(*[t.double() if t is not None else None for t in args[:4]], 1e-6, True,
                              torch.float64)
    assert rel_err(direct[1], y) < FWD and rel_err(direct[0], s) < FWD


def test_recorded_calls_go_through_the_custom_op():
    """A dispatch mode (fake tensors, FlopCounterMode, ...) and tensor subclasses see the opaque op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        add_norm_cpu.add_norm_fwd_cpu(*_add_norm_args())
    assert "vigla.add_norm_cpu_fwd.default" in seen.ops


def test_forward_mode_ad_goes_through_the_custom_op(monkeypatch):
    import torch.autograd.forward_ad as fwAD

    op = add_norm_cpu.add_norm_fwd_cpu
    seen = []
    monkeypatch.setattr(op, "op", lambda *a: seen.append(a) or "op")
    with fwAD.dual_level():
        assert op(*_add_norm_args()) == "op" and len(seen) == 1


def test_a_tensor_subclass_goes_through_the_custom_op(monkeypatch):
    class Sub(torch.Tensor):
        pass

    op = add_norm_cpu.add_norm_fwd_cpu
    seen = []
    monkeypatch.setattr(op, "op", lambda *a: seen.append(a) or "op")
    x, d, w, *rest = _add_norm_args()
    assert op(x.as_subclass(Sub), d, w, *rest) == "op" and len(seen) == 1
    assert op(x, d, w, *rest) != "op" and len(seen) == 1


def test_float64_runs_the_references(monkeypatch):
    """float64 is the ground truth: no op calls its kernels for it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CPU kernel ran on float64")

    for module, names in [(mix_cpu, ["locality_mix_fwd_cpu", "locality_mix_bwd_cpu"]),
                          (swiglu_cpu, ["swiglu_fwd_cpu", "swiglu_bwd_cpu"]),
                          (add_norm_cpu, ["add_norm_fwd_cpu", "add_norm_bwd_cpu"]),
                          (dwconv_cpu, ["dwconv_fwd_cpu", "dwconv_bwd_cpu"])]:
        for name in names:
            monkeypatch.setattr(module, name, refuse)
    o, x, z, w_o, w_l = (t.requires_grad_() for t in mix_inputs(1, 4, 2, 4))
    outs = [locality_mix(o, x, z, w_o, w_l), swiglu(x), add_norm(x, z, w_l.repeat(2))[1],
            dwconv_silu(x, torch.randn(8, 1, 3, 3, dtype=torch.float64), (2, 2))]
    sum(t.sum() for t in outs).backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float64 for t in (o, x, z, w_o, w_l))


def test_without_a_compiler_one_warning_and_the_references_run(tmp_path):
    """No C compiler: one warning for every op (BiGLA's included), nothing built, each op on its PyTorch path."""
    code = ("import warnings; warnings.simplefilter('always'); import torch\n"
            "from vigla.ops.bigla import bigla, bigla_naive\n"
            "from vigla.ops.locality_mix import locality_mix, locality_mix_reference\n"
            "from vigla.ops.swiglu import swiglu, swiglu_reference\n"
            "from vigla.ops.add_norm import add_norm\n"
            "from vigla.ops.dwconv import dwconv_silu, dwconv_reference\n"
            "o = torch.randn(2, 5, 3, 4, dtype=torch.float64); x = torch.randn(2, 5, 12, dtype=torch.float64)\n"
            "w = torch.rand(4, dtype=torch.float64); cw = torch.randn(12, 1, 3, 3, dtype=torch.float64)\n"
            "f = lambda *t: [a.float() for a in t]\n"
            "errs = [(locality_mix(*f(o, x, x, w, w)).double() - locality_mix_reference(o, x, x, w, w, 1e-6, False)),\n"
            "        (swiglu(*f(x)).double() - swiglu_reference(x)),\n"
            "        (add_norm(*f(x, x, w.repeat(3)))[1].double() - add_norm(x, x, w.repeat(3))[1]),\n"
            "        (dwconv_silu(*f(x, cw), (1, 5)).double() - "
            "dwconv_reference(x, cw, (1, 5), True, torch.float64))]\n"
            "q = [torch.randn(1, 9, 2, 4, dtype=torch.float64) for _ in range(3)]\n"
            "g = [-torch.rand(1, 9, 2, 4, dtype=torch.float64) for _ in range(2)]\n"
            "errs.append(bigla(*f(*q, *g), 0.5).double() - bigla_naive(*q, *g, 0.5))\n"
            "print('err', max(e.abs().max().item() for e in errs))\n")
    env = {**os.environ, "CC": "no-such-compiler", "VIGLA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("no C compiler ('no-such-compiler') found") == 1
    assert float(run.stdout.split()[-1]) < 1e-5
    assert not list(tmp_path.iterdir())  # nothing was built


def test_a_failed_build_warns_and_the_op_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("VIGLA_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return not_declared; }\n")
    lib = cpu_build.CpuLibrary(broken, "broken", "the broken op", lambda lib: None)
    with pytest.warns(UserWarning, match="building the broken op's CPU kernel failed .*not_declared"):
        assert not lib.available()
    assert not list(tmp_path.glob("broken_*.so"))


def test_a_built_library_is_cached_by_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("VIGLA_CACHE_DIR", str(tmp_path))
    source = tmp_path / "ok.c"
    source.write_text("int f(void) { return 7; }\n")
    first = cpu_build.CpuLibrary(source, "ok", "ok", lambda lib: None)
    assert first.available() and first.lib.f() == 7
    built = list(tmp_path.glob("ok_*.so"))
    assert len(built) == 1
    again = cpu_build.CpuLibrary(source, "ok", "ok", lambda lib: None)
    assert again.available() and list(tmp_path.glob("ok_*.so")) == built  # loaded, not rebuilt
    source.write_text("int f(void) { return 8; }\n")
    changed = cpu_build.CpuLibrary(source, "ok", "ok", lambda lib: None)
    assert changed.lib.f() == 8 and len(list(tmp_path.glob("ok_*.so"))) == 2
