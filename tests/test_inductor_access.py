"""What ``torch.compile`` believes each Triton kernel writes.

The custom ops launch their kernels through ``torch.library.wrap_triton``; Inductor finds the tensors a kernel
writes by tracing its stores' addresses back through the kernel's TTIR (and through a call to a ``@triton.jit``
helper, to every argument of the call). A tensor it wrongly takes for written is copied before the launch and
handled as a new value after it: a read-only input of a BiGLA kernel taken for written once cost a compiled ViG
block an illegal memory access and CUDA-graph training its gradients. Here every kernel that the launchers issue for
ViG's ops (several launch plans of BiGLA, the locality mix, SwiGLU, the depthwise conv, conv + norm, add + norm) is
analysed as Inductor analyses it: it must write something, and nothing the caller passed in.

CPU: the kernels are lowered to TTIR for a Hopper target (no GPU needed; Triton's NVIDIA backend); on a GPU
machine, for the device itself.
"""
from __future__ import annotations

import importlib
import inspect

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels' TTIR needs Triton")
wrap_module = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap",
                                  reason="this PyTorch has no analysis of user Triton kernels")

bigla = importlib.import_module("vigla.ops.bigla.triton_kernels")
add_norm = importlib.import_module("vigla.ops.add_norm.triton_kernels")
conv_norm = importlib.import_module("vigla.ops.conv_norm.triton_kernels")
dwconv = importlib.import_module("vigla.ops.dwconv.triton_kernels")
locality_mix = importlib.import_module("vigla.ops.locality_mix.triton_kernels")
swiglu = importlib.import_module("vigla.ops.swiglu.triton_kernels")

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _hopper_target(monkeypatch):
    """Without a GPU, Triton's active driver reports an sm_90 target (only its ``get_current_target`` is used)."""
    if torch.cuda.is_available():
        return
    from triton.backends.compiler import GPUTarget

    class Target:
        @staticmethod
        def get_current_target():
            return GPUTarget("cuda", 90, 32)

    monkeypatch.setattr(triton.runtime.driver, "_active", Target())


def _written(fn, kwargs: dict) -> list[str]:
    """The arguments of ``fn`` that Inductor takes as written by a launch with ``kwargs``."""
    if hasattr(wrap_module, "identify_accessed_tensors"):  # PyTorch >= 2.12
        accesses = wrap_module.identify_accessed_tensors(fn, dict(kwargs), {})
        return sorted(dep.name for dep in accesses.read_writes.writes)
    return sorted(wrap_module.identify_mutated_tensors(fn, dict(kwargs), {}))


def _ttir_with_scalars_as_constants(fn, kwargs: dict):
    """``fn`` lowered to TTIR for the target with every argument that is not a tensor as a constexpr, as PyTorch
    <= 2.11's analysis lowers a kernel (newer ones keep them runtime scalars): a name rebound inside a runtime branch
    then fails to compile, and Inductor takes every input for written. Triton's API as PyTorch calls it (Triton
    3.4 to 3.8)."""
    import triton.compiler.compiler as tc
    from triton.compiler import ASTSource

    try:
        from triton.runtime.jit import mangle_type
    except ImportError:
        pytest.skip(reason="this Triton has no triton.runtime.jit.mangle_type (an older Triton): its kernels lower "
                           "through another API, which this check does not follow")
    target = triton.runtime.driver.active.get_current_target()
    backend = tc.make_backend(target)
    options = backend.parse_options({})
    signature, constants = {}, {}
    for i, name in enumerate(fn.arg_names):
        a = kwargs[name]
        signature[name] = mangle_type(a) if isinstance(a, torch.Tensor) else "constexpr"
        if not isinstance(a, torch.Tensor):
            constants[(i,)] = a
    context = triton._C.libtriton.ir.context()
    triton._C.libtriton.ir.load_dialects(context)
    backend.load_dialects(context)
    takes_options = len(inspect.signature(backend.get_codegen_implementation).parameters) == 1
    codegen = backend.get_codegen_implementation(*([options] if takes_options else []))
    source = ASTSource(fn, signature, constants)
    args = (options, codegen, backend.get_module_map(), context)
    return source.make_ir(*((target,) if len(inspect.signature(source.make_ir).parameters) == 5 else ()), *args)


def _launches(run) -> list[tuple]:
    """``(kernel, kwargs)`` of each launch ``run(wrap)`` issues, with nothing launched."""
    seen = []

    def wrap(fn):
        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    seen.append((fn, {**dict(zip(fn.arg_names, args)), **kwargs}))
                return launch
        return Grid()

    run(wrap)
    return seen


def _r(*shape, dtype=BF16):
    return torch.randn(*shape, dtype=dtype)


def _bigla(B, T, H, K, V, dtype=BF16, config=None, backward=False, mix=False):
    q, k, gf, gb = (_r(B, T, H, K, dtype=dtype) for _ in range(4))
    v, do = _r(B, T, H, V, dtype=dtype), _r(B, T, H, V, dtype=dtype)
    extra = {}
    if mix:
        w = torch.randn(V)
        extra["mix"] = (_r(B, T, H * V, dtype=dtype), _r(B, T, H * V, dtype=dtype), w, w.clone(), 1e-5, True)
    if backward:
        return (q, k, v, gf, gb, do), lambda wrap: bigla.bigla_bwd_triton(q, k, v, gf, gb, do, 0.1, 16.0, config,
                                                                           wrap=wrap)
    return (q, k, v, gf, gb, *extra.get("mix", ())[:4]), lambda wrap: bigla.bigla_fwd_triton(
        q, k, v, gf, gb, 0.1, 16.0, config, wrap=wrap, **extra)


def _locality_mix(backward):
    o, x, z, dy = _r(2, 49, 3, 64), _r(2, 49, 192), _r(2, 49, 192), _r(2, 49, 192)
    w_o, w_l = torch.randn(64), torch.randn(64)
    if backward:
        return (dy, o, x, z, w_o, w_l), lambda wrap: locality_mix.locality_mix_bwd_triton(
            dy, o, x, z, w_o, w_l, 1e-5, True, wrap=wrap)
    return (o, x, z, w_o, w_l), lambda wrap: locality_mix.locality_mix_fwd_triton(o, x, z, w_o, w_l, 1e-5, True,
                                                                                   wrap=wrap)


def _swiglu(which):
    x, w1, u, dy = _r(98, 192), _r(2 * 512, 192), _r(98, 1024), _r(98, 512)
    return {"fc1": ((x, w1), lambda wrap: swiglu.fc1_swiglu_triton(x, w1, wrap=wrap)),
            "fwd": ((u,), lambda wrap: swiglu.swiglu_fwd_triton(u, wrap=wrap)),
            "bwd": ((dy, u), lambda wrap: swiglu.swiglu_bwd_triton(dy, u, recompute=True, wrap=wrap))}[which]


def _dwconv(backward, act):
    x, w, dy = _r(2, 49, 192), torch.randn(192, 1, 3, 3), _r(2, 49, 192)
    if backward:
        return (dy, x, w), lambda wrap: dwconv.dwconv_bwd_triton(dy, x, w, (7, 7), act, wrap=wrap)
    return (x, w), lambda wrap: dwconv.dwconv_fwd_triton(x, w, (7, 7), act, BF16, wrap=wrap)


def _conv_norm():
    x, w, b, nw, nb = torch.randn(2, 3, 32, 32), torch.randn(96, 3, 4, 4), *(torch.randn(96) for _ in range(3))
    return (x, w, b, nw, nb), lambda wrap: conv_norm.conv_norm_fwd_triton(x, w, b, nw, nb, 1e-6, 4, 0, "none", BF16,
                                                                          BF16, wrap=wrap)


def _add_norm(which):
    x, delta, dy, ds = _r(2, 49, 192), _r(2, 49, 192), _r(2, 49, 192), _r(2, 49, 192)
    weight, bias = torch.randn(192), torch.randn(192)
    h, wl, w1, w2 = _r(2, 49, 64), _r(192, 64), _r(2 * 512, 192), _r(192, 512)
    return {"fwd": ((x, delta, weight, bias), lambda wrap: add_norm.add_norm_fwd_triton(
                x, delta, weight, bias, 1e-6, False, BF16, wrap=wrap)),
            "bwd": ((dy, ds, x, weight, bias), lambda wrap: add_norm.add_norm_bwd_triton(
                dy, ds, x, weight, bias, 1e-6, False, torch.float32, wrap=wrap)),
            "linear": ((h, wl, x, weight), lambda wrap: add_norm.linear_add_norm_fwd_triton(
                h, wl, x, weight, None, 1e-6, True, BF16, wrap=wrap)),
            "mlp": ((x, w1, w2, delta, weight), lambda wrap: add_norm.mlp_add_norm_fwd_triton(
                x, w1, w2, delta, weight, None, 1e-6, True, BF16, wrap=wrap))}[which]


CASES = {
    "bigla fwd ViG-T@224": lambda: _bigla(2, 196, 3, 32, 64),
    "bigla fwd+mix ViG-T@224": lambda: _bigla(2, 196, 3, 32, 64, mix=True),
    "bigla bwd ViG-T@224": lambda: _bigla(2, 196, 3, 32, 64, backward=True),
    "bigla fwd segmented, steep pass": lambda: _bigla(1, 4096, 3, 32, 64, config=bigla.BiGLAConfig(
        segments=4, steep_pass=True)),
    "bigla bwd segmented, steep pass": lambda: _bigla(1, 4096, 3, 32, 64, backward=True,
                                                      config=bigla.BiGLAConfig(segments=4, steep_pass=True)),
    "bigla fp32, two value blocks": lambda: _bigla(2, 100, 2, 16, 128, dtype=torch.float32),
    "bigla bwd fp32, two value blocks": lambda: _bigla(2, 100, 2, 16, 128, dtype=torch.float32, backward=True),
    "locality mix fwd": lambda: _locality_mix(False),
    "locality mix bwd": lambda: _locality_mix(True),
    "swiglu fc1": lambda: _swiglu("fc1"),
    "swiglu fwd": lambda: _swiglu("fwd"),
    "swiglu bwd": lambda: _swiglu("bwd"),
    "dwconv fwd": lambda: _dwconv(False, True),
    "dwconv bwd silu": lambda: _dwconv(True, True),
    "dwconv bwd": lambda: _dwconv(True, False),
    "conv norm fwd": _conv_norm,
    "add norm fwd": lambda: _add_norm("fwd"),
    "add norm bwd": lambda: _add_norm("bwd"),
    "linear add norm": lambda: _add_norm("linear"),
    "mlp add norm": lambda: _add_norm("mlp"),
}


def _check_access(case: str) -> None:
    inputs, run = CASES[case]()
    given = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    launches = _launches(run)
    assert launches
    for fn, kwargs in launches:
        written = _written(fn, kwargs)
        name = fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__
        assert written, f"{name}: no tensor written (the analysis failed?)"
        clobbered = [n for n in written if kwargs[n].untyped_storage().data_ptr() in given]
        assert not clobbered, f"{name}: Inductor takes the inputs {clobbered} for written"


def _check_lowering(case: str) -> None:
    for fn, kwargs in _launches(CASES[case]()[1]):
        assert _ttir_with_scalars_as_constants(fn, kwargs).verify()


@pytest.mark.parametrize("case", CASES)
def test_inductor_sees_each_kernel_write_only_its_outputs(case):
    """Each launch's kernel, lowered to TTIR with the launch's arguments and analysed as Inductor analyses it,
    writes at least one tensor and none that the caller passed in (their storages)."""
    _check_access(case)


@pytest.mark.parametrize("case", CASES)
def test_each_kernel_lowers_with_its_scalars_as_constants(case):
    """Older PyTorch (2.11, the GPU machine's) lowers a kernel for its analysis with every scalar argument a
    constexpr; each launch's kernel must lower that way too (else every input is taken for written)."""
    _check_lowering(case)


@pytest.mark.gpu
def test_the_analysis_on_the_device():
    """Both checks with the device's own Triton target and this PyTorch's analysis (the GPU suite's ops part)."""
    for case in CASES:
        _check_access(case)
        _check_lowering(case)
