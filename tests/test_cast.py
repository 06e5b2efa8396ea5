"""The inference paths' prepared weights (vigla.layers.cast): GEMMs against float64, the cache's life,
and models that hold a cache still copy, pickle and script."""
import copy
import io

import pytest
import timm
import torch
import torch.nn.utils.prune

import vigla  # noqa: F401  (registers the models)
from vigla.layers.cast import _PREPARED, _onednn, gemm, gemm_swiglu, gemm_weights, inference_weights, memoized
from vigla.layers.mlp import SwiGLU


def _reference(x, w, b=None):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_float64(dtype, bias):
    """Prepared matrices (packed for oneDNN in float32 on the CPU, the transposed view otherwise) give
    ``x @ W^T + b`` on fresh inputs, also for a column slice of a wider tensor as ``x``."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    w = torch.randn(48, 40, dtype=dtype)
    b = torch.randn(48, dtype=dtype) if bias else None
    prepared = gemm_weights(module, "fc", (w,) if b is None else (w, b), rows=7)
    assert prepared[0].is_mkldnn == (dtype == torch.float32 and _onednn())
    wide = torch.randn(7, 64, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for x in (torch.randn(7, 40, dtype=dtype), torch.randn(300, 40, dtype=dtype), wide[:, 10:50]):
        out = gemm(x, prepared[0], None if b is None else prepared[1])
        assert out.shape == (x.shape[0], 48) and out.dtype == dtype
        torch.testing.assert_close(out.double(), _reference(x, w, b), **tol)


def _swiglu_reference(x, w1, w2=None):
    a, b = (x.double() @ w1.double().t()).chunk(2, dim=-1)
    h = torch.nn.functional.silu(a) * b
    return h if w2 is None else h @ w2.double().t()


@pytest.mark.skipif(not _onednn(), reason="this PyTorch has no oneDNN prepacked linear")
def test_gemm_swiglu_matches_float64():
    """fc1's two halves packed for oneDNN, the gating in the GEMMs' epilogues: ``SiLU(x Wg^T) * (x Wv^T)`` on fresh
    inputs (a few rows, many rows, a column slice of a wider tensor), float32 accuracy."""
    torch.manual_seed(0)
    w1 = torch.randn(2 * 24, 40) * 0.3
    gate, value = gemm_weights(torch.nn.Module(), "fc", (w1[:24], w1[24:]), rows=7)
    assert gate.is_mkldnn and value.is_mkldnn
    wide = torch.randn(7, 64)
    for x in (torch.randn(7, 40), torch.randn(300, 40), wide[:, 10:50]):
        out = gemm_swiglu(x, gate, value)
        assert out.shape == (x.shape[0], 24) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), _swiglu_reference(x, w1), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # what torch.backends.mkldnn.flags says on a CPU
@pytest.mark.parametrize("onednn", [
    pytest.param(True, marks=pytest.mark.skipif(not _onednn(), reason="this PyTorch has no oneDNN prepacked linear")),
    False])
def test_swiglu_eager_inference_on_the_cpu(onednn):
    """SwiGLU's eager inference path on the CPU: with oneDNN the gating in fc1's GEMM epilogues (fc1 kept as two
    packed halves, no packed copy of the whole), without it fc1's GEMM then the gating kernel; both match the float64
    MLP and the recording path's output."""
    torch.manual_seed(0)
    mlp = SwiGLU(40, 24).eval()
    x = torch.randn(3, 50, 40)
    with torch.backends.mkldnn.flags(enabled=onednn), torch.inference_mode():
        params = mlp.inference_params(x, torch.float32)
        out = mlp(x)
    assert (params.fc1_halves is not None) == onednn and (params.w1_gemm is None) == onednn
    expected = _swiglu_reference(x, mlp.fc1.weight, mlp.fc2.weight)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    recorded = mlp(x.clone().requires_grad_())  # grad mode on: the recording path (fc1, the gating op, fc2)
    assert recorded.requires_grad
    torch.testing.assert_close(out, recorded.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # what torch.backends.mkldnn.flags says on a CPU
def test_gemm_weights_cache_life():
    """Kept while the cast tuple is the same object, rebuilt with it; oneDNN switched off gives views."""
    module = torch.nn.Linear(8, 6)
    cast = inference_weights(module, "fc", (module.weight, module.bias), torch.float32)
    first = gemm_weights(module, "fc", cast, rows=4)
    assert gemm_weights(module, "fc", cast, rows=4) is first
    assert first[1] is cast[1]  # vectors as they are
    with torch.no_grad():
        module.weight.mul_(2)  # an in-place update: a new cast tuple, so new prepared weights
    recast = inference_weights(module, "fc", (module.weight, module.bias), torch.float32)
    again = gemm_weights(module, "fc", recast, rows=4)
    assert again is not first
    x = torch.randn(4, 8)
    torch.testing.assert_close(gemm(x, again[0], again[1]).double(), _reference(x, module.weight, module.bias),
                               rtol=1e-5, atol=1e-5)
    with torch.backends.mkldnn.flags(enabled=False):
        plain = gemm_weights(torch.nn.Module(), "fc", recast, rows=4)
    assert not plain[0].is_mkldnn and plain[0].equal(module.weight.t())


def test_model_with_prepared_weights_copies_pickles_and_scripts():
    """After an inference call (which packs the weights on the CPU) a ViG still deep-copies, saves and
    scripts; the copy, the reloaded and the scripted model give the same logits, the copy with its own
    cache."""
    torch.manual_seed(0)
    model = timm.create_model("vig_tiny", num_classes=5, depth=2, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        twin = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for other in (twin, loaded):
            torch.testing.assert_close(other(x), ref, rtol=0, atol=0)
        scripted = torch.jit.script(model)  # the recording path's ops (MKL's GEMMs): float32 rounding apart
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-6)
    assert set(_PREPARED[twin.blocks[0].attn]) == {"in_proj", "out"}
    assert _PREPARED[twin.blocks[0].attn]["in_proj"] is not _PREPARED[model.blocks[0].attn]["in_proj"]


@pytest.mark.parametrize("fused", [True, False])
def test_inference_after_optimizer_steps_reads_the_new_weights(fused):
    """PyTorch's fused AdamW updates parameters without moving their version counters, on which the
    inference casts are keyed: vigla's optimizer step post-hook moves them, so an evaluation between
    training steps gives the trained model's logits, not those of the weights cached before."""
    torch.manual_seed(0)
    model = timm.create_model("vig_tiny", num_classes=5, img_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    x = torch.randn(2, 3, 32, 32)

    def infer(m):
        m.eval()
        with torch.no_grad():
            out = m(x)
        m.train()
        return out

    before = infer(model)  # fills the cache
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    twin = copy.deepcopy(model)  # no cache: casts the weights as they are now
    after = infer(model)
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, infer(twin), rtol=0, atol=0)


def test_writes_through_data_are_seen_after_forget_inference_weights():
    """A write through ``.data`` (an older EMA's ``p.data.mul_``) moves no version counter: the inference path keeps
    the copies it prepared (packed, folded, cast; the parameters it reads as they are do change) until
    ``forget_inference_weights()``, after which it gives the logits of a copy that never cached anything."""
    from vigla.layers.cast import forget_inference_weights

    torch.manual_seed(0)
    model = timm.create_model("vig_tiny", num_classes=5, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)  # fills the caches
        for p in model.parameters():
            p.data.mul_(1.5)
        twin = copy.deepcopy(model)  # no cache
        want = twin(x)
        assert not torch.allclose(want, before, atol=1e-4)
        assert not torch.allclose(model(x), want, atol=1e-3)  # the prepared copies are stale: the limitation
        forget_inference_weights()
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_memoized_record_life():
    """A record is reused while its key and the module's parameters stay; rebuilt after an in-place update, a new
    storage (``.data``), a replaced parameter or submodule, or another key; built anew on each traced call."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    builds = []

    def record(key=("bf16",)):
        return memoized(module, key, lambda: builds.append(1) or len(builds))

    assert record() == 1 and record() == 1  # reused
    assert record(("fp16",)) == 2 and record(("fp16",)) == 2  # another key: rebuilt
    with torch.no_grad():
        module[1].bias.add_(1)  # in place: the version counter moves
    assert record(("fp16",)) == 3 and record(("fp16",)) == 3
    module[0].weight.data = torch.randn(4, 4)  # a new storage, same version
    assert record(("fp16",)) == 4
    module[0].bias = torch.nn.Parameter(torch.zeros(4))  # a replaced parameter
    assert record(("fp16",)) == 5
    module[1] = torch.nn.LayerNorm(4)  # a replaced submodule
    assert record(("fp16",)) == 6 and record(("fp16",)) == 6
    twin = copy.deepcopy(module)  # copies start without a record
    assert memoized(twin, ("fp16",), lambda: "twin") == "twin"
    assert torch.compile(lambda: record(("fp16",)), backend="eager", fullgraph=False)() == 7  # traced: built


def test_eager_inference_sees_replaced_weights():
    """A ViG's eager inference path (its blocks' memoized records) follows a replaced submodule, a replaced
    parameter and an in-place update: its logits equal the recording path's after each."""
    torch.manual_seed(0)
    model = timm.create_model("vig_tiny", num_classes=5, depth=2, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)

    def check():
        with torch.no_grad():
            eager = model(x)
        with torch.enable_grad():
            recorded = model(x).detach()
        torch.testing.assert_close(eager, recorded, rtol=1e-4, atol=1e-5)
        return eager

    first = check()
    model.blocks[0].mlp.fc2 = torch.nn.Linear(*model.blocks[0].mlp.fc2.weight.shape[::-1], bias=False)
    second = check()
    model.blocks[1].attn.proj.weight = torch.nn.Parameter(torch.randn_like(model.blocks[1].attn.proj.weight))
    third = check()
    with torch.no_grad():
        model.blocks[1].norm2.weight.mul_(3)
    fourth = check()
    assert not any(torch.allclose(a, b) for a, b in ((first, second), (second, third), (third, fourth)))


@pytest.mark.parametrize("name, kwargs", [("vig_tiny", dict(depth=2)), ("vig_h_tiny", {})])
def test_eager_inference_follows_functional_call(name, kwargs):
    """Parameters swapped in by ``torch.func.functional_call`` (no registration hook runs) are the ones used, not
    the records built from the module's own, and the module's own are used again after."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, **kwargs).eval()
    other = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        own = model(x)  # builds the records
        swapped = torch.func.functional_call(model, dict(other.named_parameters()), (x,))
        torch.testing.assert_close(swapped, other(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), own, rtol=0, atol=0)


def _perturbed(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


class _Adapter(torch.nn.Module):
    """A LoRA-like wrapper: the layer plus a learned weight delta (what PEFT puts in a Linear's place)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.delta = torch.nn.Parameter(torch.randn_like(base.weight) * 0.01)

    def forward(self, x):
        return self.base(x) + torch.nn.functional.linear(x, self.delta)


@pytest.mark.parametrize("name, kwargs", [("vig_tiny", dict(depth=2)), ("vig_h_tiny", dict(depths=(1, 1, 1, 1)))])
def test_blocks_call_their_layers_when_watched(name, kwargs):
    """A forward hook on any layer (Linear, conv, norm: the stem's, the blocks', the head's) fires, in eval and in
    training, and the output is the fused paths' (the layers then run as modules, BiGLAMixer.forward_layers)."""
    model, x = _perturbed(name, **kwargs), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
    fired = set()
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, timm.layers.LayerNorm2d, vigla.layers.RmsNorm)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    for n, m in layers.items():
        m.register_forward_hook(lambda module, args, out, n=n: fired.add(n))
    with torch.no_grad():
        watched = model(x)
    assert fired == set(layers)
    # float32 sums in another order: errors scale with the output's magnitude (ViG-H-T's reaches ~3.4 here; its
    # largest difference read 7e-6 and 1.1e-5 on two hosts), so the absolute tolerance does too
    torch.testing.assert_close(watched, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    fired.clear()
    model.train()(x).sum().backward()
    assert fired == set(layers)


def test_replaced_layers_are_used():
    """A layer replaced by a wrapper (a LoRA-like adapter) is what runs, in eval and with gradients to it; pruning
    (a pre-hook recomputing the weight) trains step after step; dynamic quantization runs."""
    model, x = _perturbed("vig_tiny", depth=2), torch.randn(2, 3, 64, 64)
    adapted, merged = copy.deepcopy(model), copy.deepcopy(model)
    adapted.blocks[0].attn.qkv = _Adapter(adapted.blocks[0].attn.qkv)
    adapted.blocks[1].mlp.fc2 = _Adapter(adapted.blocks[1].mlp.fc2)
    with torch.no_grad():
        merged.blocks[0].attn.qkv.weight.add_(adapted.blocks[0].attn.qkv.delta)
        merged.blocks[1].mlp.fc2.weight.add_(adapted.blocks[1].mlp.fc2.delta)
        torch.testing.assert_close(adapted(x), merged(x), rtol=1e-5, atol=1e-5)
        assert (adapted(x) - model(x)).abs().max() > 1e-3
    adapted.train()(x).sum().backward()
    assert adapted.blocks[0].attn.qkv.delta.grad.abs().sum() > 0

    pruned = copy.deepcopy(model).train()
    torch.nn.utils.prune.l1_unstructured(pruned.blocks[0].attn.qkv, "weight", amount=0.5)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.blocks[0].attn.qkv.weight.copy_(pruned.blocks[0].attn.qkv.weight)
        torch.testing.assert_close(pruned.eval()(x), masked(x), rtol=1e-5, atol=1e-5)
    optimizer = torch.optim.SGD(pruned.parameters(), lr=1e-3)
    for _ in range(2):  # the second step once failed: the weight's graph from the first was reused
        optimizer.zero_grad()
        pruned.train()(x).sum().backward()
        optimizer.step()

    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear})
    with torch.no_grad():
        ref = model(x)
        assert ((quantized(x) - ref).abs().max() / ref.abs().max()).item() < 0.1
