"""The eager path's host shortcuts: compiled Triton kernels reused per argument signature
(:mod:`vigla.ops.launcher`) and ops that skip ``autograd.Function.apply`` when nothing needs a
gradient (:func:`vigla.ops.dispatch.records`).

* CPU: the signature separates what Triton specialises on (dtype, 16-byte alignment, int values,
  constexprs, TMA descriptors' dtype and block); ``records``; a model's no-grad forward (no Function)
  equals its grad-mode one.
* GPU (``pytest -m gpu``): replayed launches compute what Triton's own launch computes, on aligned
  and misaligned inputs, and a ViG-T forward under ``no_grad`` equals the recorded one to bf16 rounding
  (its replays bit for bit).
"""
import pytest
import torch

import timm

import vigla  # noqa: F401
from vigla.ops.dispatch import records
from vigla.ops.swiglu import swiglu_reference

triton = pytest.importorskip("triton", reason="the launcher wraps Triton kernels")
from vigla.ops import launcher  # noqa: E402


def _key(args: tuple, meta: dict) -> tuple:
    return launcher._signature(args, meta)[0]


def test_a_replayed_launch_passes_each_tensor_by_its_address():
    """Triton's launcher takes an int for a pointer as it is (a tensor costs it a ``data_ptr`` call and a driver
    query): a replayed launch's arguments are the given ones with each tensor replaced by its address; a layout
    with a TMA descriptor keeps them as given."""
    x, y = torch.zeros(64), torch.ones(8, 8)
    _, args = launcher._signature((x, 3, y[1:], 1.5, None, True), {"BLOCK": 32})
    assert args == (x.data_ptr(), 3, y[1:].data_ptr(), 1.5, None, True)
    assert [type(a) for a in args] == [int, int, int, float, type(None), bool]
    TensorDescriptor = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    given = (TensorDescriptor.from_tensor(torch.zeros(64, 64, dtype=torch.bfloat16), [16, 32]), x)
    assert launcher._signature(given, {})[1] is given


def test_signature_tells_apart_what_triton_specialises_on():
    x = torch.zeros(64)
    same_layout = torch.ones(64)
    key = _key((x, 64, 1.5), {"BLOCK": 32})
    assert key == _key((same_layout, 64, 1.5), {"BLOCK": 32})  # data differ: one kernel
    assert key != _key((x[1:], 64, 1.5), {"BLOCK": 32})  # 4-byte offset: not 16-aligned
    assert key != _key((x.double(), 64, 1.5), {"BLOCK": 32})  # dtype
    assert key != _key((x, 63, 1.5), {"BLOCK": 32})  # int value (divisibility by 16)
    assert key != _key((x, 64, 1.5), {"BLOCK": 64})  # constexpr
    assert key != _key((x, 64, 1.5), {"BLOCK": 32, "num_warps": 8})  # launch option
    assert _key((x, 1), {"FLAG": 1}) != _key((x, True), {"FLAG": 1})  # i32 vs i1
    assert _key((x, 1), {"FLAG": 1}) != _key((x, 1), {"FLAG": True})
    assert _key((x, 1), {"FLAG": 1}) != _key((x, 1.0), {"FLAG": 1})  # i32 vs fp32
    assert _key((x, None), {}) != _key((x, 0), {})  # a constexpr None


def test_signature_tells_apart_argument_layouts(monkeypatch):
    """The same values at other positions make another key, also after the layout table starts again (a layout's
    number is never reused)."""
    x = torch.zeros(64)
    monkeypatch.setattr(launcher, "_LAYOUTS", {})
    first = _key((x, 1, 2), {})
    assert first != _key((1, x, 2), {}) and first == _key((x, 1, 2), {})
    launcher._LAYOUTS.clear()
    assert _key((1, 2, x), {}) != first


def test_signature_of_tma_descriptors_is_their_dtype_and_block():
    """Host-side TMA descriptors (the persistent fc1 kernel's arguments) are keyed by what Triton specialises
    them on; their base, shape and strides go to every launch."""
    TensorDescriptor = pytest.importorskip("triton.tools.tensor_descriptor").TensorDescriptor
    a, b = torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(128, 32, dtype=torch.bfloat16)
    key = _key((TensorDescriptor.from_tensor(a, [16, 32]),), {})
    assert key == _key((TensorDescriptor.from_tensor(b, [16, 32]),), {})  # other tensor and shape
    assert key != _key((TensorDescriptor.from_tensor(b, [32, 32]),), {})  # block
    assert key != _key((TensorDescriptor.from_tensor(a.half(), [16, 32]),), {})  # dtype


def test_grid_arithmetic_matches_tritons():
    for n in range(1, 2100):
        assert launcher.next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64):
            assert launcher.cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_direct_wraps_jit_functions_only():
    from vigla.ops.swiglu.triton_kernels import _swiglu_fwd_kernel

    if not isinstance(_swiglu_fwd_kernel, launcher.JITFunction):  # Triton's interpreter
        assert launcher.direct(_swiglu_fwd_kernel) is _swiglu_fwd_kernel
        return
    fast = launcher.direct(_swiglu_fwd_kernel)
    assert isinstance(fast, launcher.FastKernel) and launcher.direct(_swiglu_fwd_kernel) is fast
    assert fast.names[:5] == ("u", "y", "N", "I", "su")
    plain = object()
    assert launcher.direct(plain) is plain


@pytest.mark.skipif(launcher._knobs is None, reason="a Triton without knobs (< 3.4) never replays launches")
def test_launch_hooks_take_tritons_path():
    """A profiler's launch hook must see every launch: the replay is only for an empty hook chain."""
    assert not launcher._hooked()
    for chain in (launcher._knobs.runtime.launch_enter_hook, launcher._knobs.runtime.launch_exit_hook):
        if not hasattr(chain, "add"):  # a Triton whose hook is a plain attribute
            continue
        hook = lambda *args: None  # noqa: E731
        chain.add(hook)
        try:
            assert launcher._hooked()
        finally:
            chain.remove(hook)
        assert not launcher._hooked()


def test_records():
    a = torch.zeros(2)
    w = torch.zeros(2, requires_grad=True)
    assert not records(a, None)
    assert records(a, w, None)
    with torch.no_grad():
        assert not records(a, w)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():  # forward-mode AD goes through Function.apply, which refuses it clearly
        assert records(fwAD.make_dual(a, torch.ones(2)))


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_inference_skips_autograd_with_the_same_result(name, one_thread):
    """Under no_grad every fused op runs its forward without autograd.Function: the same numbers up to
    float32 rounding (the inference path's projections run oneDNN's GEMMs on packed weights on the CPU)."""
    model = timm.create_model(name, num_classes=7, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    recorded = model(x)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        plain = model(x)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, recorded.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replayed_launches_match_the_reference(dtype, monkeypatch):
    from vigla.ops.swiglu.triton_kernels import _swiglu_fwd_kernel, swiglu_fwd_triton

    fast = launcher.direct(_swiglu_fwd_kernel)
    fast.compiled.clear()
    first = []
    slow = launcher.FastKernel._first
    monkeypatch.setattr(launcher.FastKernel, "_first", lambda self, *a: first.append(1) or slow(self, *a))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    for offset in (0, 1, 0, 1, 0):  # offset 1: a 2- or 4-byte shift, another specialisation
        u = torch.randn(37, 2 * 96 + 1, device="cuda", dtype=dtype)[:, offset:offset + 2 * 96]
        y = swiglu_fwd_triton(u)
        torch.testing.assert_close(y.double(), swiglu_reference(u.double()), **tol)
    assert len(fast.compiled) == 2 and len(first) == 2  # Triton's path once per signature, then replays


@pytest.mark.gpu
def test_model_no_grad_matches_recorded_forward_on_cuda():
    """Under bf16 autocast the no-grad forward takes the inference path (a bf16 residual stream, each output
    projection inside the next add + norm's kernel): the recorded forward's logits and features (in float32,
    as the recording path's final norm returns them) to bf16 rounding, and its replays bit for bit."""
    model = timm.create_model("vig_tiny", num_classes=10).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        recorded, features = model(x), model.forward_features(x)
        with torch.no_grad():
            plain, plain_features = model(x), model.forward_features(x)
            again = model(x)  # replays of the cached launches
    for a, b in ((plain, recorded), (plain_features, features)):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert a.dtype == b.dtype and err < 1e-2, (a.dtype, b.dtype, err)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def test_planned_takes_symbolic_sizes_past_the_cache():
    """``planned``: a cached launch plan called with a symbolic size (torch.compile with dynamic shapes) runs
    uncached with the concrete answer, and leaves the cache as it was; hashable sizes go through the cache."""
    import functools

    from torch.fx.experimental.proxy_tensor import make_fx

    from vigla.ops.launcher import planned

    @functools.lru_cache(maxsize=None)
    def plan(rows: int, cols: int) -> int:
        return rows * 100 + cols

    got = []

    def trace(x):
        got.append(planned(plan, x.shape[0], 7))
        return x + 1

    make_fx(trace, tracing_mode="symbolic")(torch.empty(5, 3))
    assert got == [507] and plan.cache_info().currsize == 0
    assert planned(plan, 5, 7) == 507 and plan.cache_info().currsize == 1


def test_multiprocessors_asks_once_per_device_and_compiles_without_warnings(monkeypatch):
    """``multiprocessors``: eager calls ask the device once per index; ``torch.compile`` traces a caller (the
    inference path's op choices) in one graph, the count a constant, without Dynamo's warning about tracing through
    a cached function and without touching the eager cache (a guard on a dict the trace fills failed on the
    compiled ViG-T's first frame under PyTorch 2.11); the persistent kernels' program count is four per
    multiprocessor, four under the CPU interpreter."""
    import warnings
    from types import SimpleNamespace

    asked = []

    def props(index):
        asked.append(index)
        return SimpleNamespace(multi_processor_count=132 + index)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(launcher, "_MULTIPROCESSORS", {})

    def choose(x):
        return x * launcher.multiprocessors(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(choose, backend="eager", fullgraph=True)(torch.ones(3))
    assert out.tolist() == [133.0] * 3
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert launcher._MULTIPROCESSORS == {}
    asked.clear()
    assert [launcher.multiprocessors(i) for i in (1, 0, 1, 0)] == [133, 132, 133, 132] and asked == [1, 0]
    assert launcher.persistent_programs(torch.empty(1)) == 4
