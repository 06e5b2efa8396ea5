"""timm's model contract (what timm's tests/test_models.py checks), for every registered vigla model.

Forward and backward, the default cfg (pool_size, first_conv, classifier, num_features, head_hidden_size),
the classifier reset and global pooling, features_only (getter and FX), forward_intermediates and
prune_intermediate_layers, set_input_size and img_size, TorchScript, torch.fx (forward, backward, then
scripted) and torch.export with dynamic height and width.

Each variant with its own widths and heads at a small image size (64 px for ViG and ViG-H, which take
any size; Castling-DeiT, a fixed-size ViT, built with img_size=64), and with one block per stage (three
for the isotropic models, so that features and pruning have blocks to choose from) but in one forward
test: the same code at a fraction of the time.
"""
from __future__ import annotations

import io
import math

import pytest
import timm
import torch
from timm.models import get_model_input_config
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import vigla  # noqa: F401  (registers the models)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MODELS = sorted(n for n in timm.list_models()
                if timm.models.model_entrypoint(n).__module__.startswith("vigla."))
SIZE = 64


def family(name: str) -> str:
    return "castling" if name.startswith("castling") else "vig_h" if name.startswith("vig_h") else "vig"


def create(name: str, full: bool = False, **kwargs) -> torch.nn.Module:
    """The registered model at ``SIZE`` px, with one block per stage unless ``full`` (the variant's
    widths and heads kept: the same code, a fraction of the time), weights perturbed away from the
    init (its zero biases and unit norms hide differences between code paths), in eval mode."""
    if family(name) == "castling":
        kwargs.setdefault("img_size", SIZE)
    if not full:
        kwargs = dict(dict(depths=(1, 1, 1, 1)) if family(name) == "vig_h" else dict(depth=3), **kwargs)
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def images(batch: int = 1, size=(SIZE, SIZE)) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, *size)


def grid(name: str, size=(SIZE, SIZE)) -> tuple[int, int]:
    """Spatial size of forward_features' output (stride 16, ViG-H 32)."""
    if family(name) == "vig_h":
        return tuple(math.ceil(s / 32) for s in size)
    if family(name) == "castling":
        return tuple(s // 16 for s in size)
    return tuple((((s + 2 - 9) // 8 + 1) + 2 - 3) // 2 + 1 for s in size)


def unpooled_shape(name: str, model, batch: int, size=(SIZE, SIZE)) -> tuple[int, ...]:
    """forward_features' layout: tokens [B, N, C] (ViG; Castling with the class token) or [B, C, h, w]."""
    h, w = grid(name, size)
    if family(name) == "vig_h":
        return (batch, model.num_features, h, w)
    return (batch, h * w + int(family(name) == "castling"), model.num_features)


def assert_close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp_min(1e-12)
    assert ((a - b).abs().max() / scale).item() <= rtol


# ------------------------------------------------------------------------------------------------
# forward, backward, default cfg

@pytest.mark.parametrize("name", MODELS)
def test_forward_full_depth(name):
    kwargs = dict(img_size=SIZE) if family(name) == "castling" else {}
    with torch.no_grad():
        out = timm.create_model(name, **kwargs).eval()(images(2))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_same_output(name):
    model = create(name)
    x = images(2)
    out = model(x)
    model.set_grad_checkpointing()
    assert_close(model(x), out, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in MODELS if n.endswith("tiny")])
def test_grad_checkpointing_same_step_under_cpu_autocast(name):
    """bf16 autocast on the CPU: the checkpointed blocks (replayed through the custom ops, which a dispatch mode
    sees) give the eager path's output exactly and its gradients within bf16's own noise: the backward formulas
    differ (the depthwise conv's eager form rounds differently), so each gradient may move, by no more than bf16
    itself moves the further of the two from the float32 step (at most twice that by the triangle inequality; measured
    about half of it, ViG-H-T's stem norm; a wrong recomputation moves a gradient by its own size)."""
    def step(checkpointed, autocast):
        model = create(name).train()
        model.set_grad_checkpointing(checkpointed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(images(2))
        out.float().square().mean().backward()
        return out, [p.grad for p in model.parameters()]

    (a, grads_a), (b, grads_b) = step(False, True), step(True, True)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    for ga, gb, g32 in zip(grads_a, grads_b, step(False, False)[1]):
        noise = max((ga - g32).abs().max(), (gb - g32).abs().max())  # bf16's distance from the float32 step
        assert (gb - ga).abs().max() <= noise + 1e-6 * g32.abs().max()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(name, dtype):
    """``model.to(dtype)`` without autocast, as timm's models run: eval and a training step in that dtype, the
    output within the dtype's rounding of the float64 model's (nn.LayerNorm keeps the input's dtype then)."""
    model = create(name)
    x = images(2)
    with torch.no_grad():
        ref = create(name).double()(x.double())
    half = model.to(dtype)
    with torch.no_grad():
        out = half(x.to(dtype))
    assert out.dtype == dtype
    assert_close(out.double(), ref, rtol=5e-2 if dtype == torch.bfloat16 else 1e-2)  # a half residual stream
    half.train()
    half(x.to(dtype)).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and bool(p.grad.isfinite().all())
               for p in half.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", MODELS)
def test_whole_model_saves_and_loads(name):
    """``torch.save(model)`` / ``torch.load``: the same class and output (Castling's layers were of a local class,
    which pickle cannot name)."""
    model, x = create(name), images(2)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model = create(name, num_classes=42).train()
    out = model(images(2))
    out.mean().backward()
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_and_heads(name):
    model = create(name)
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"] == 1000
    assert model.num_features > 0 and model.head_hidden_size == model.num_features
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    assert cfg["pool_size"] == grid(name, cfg["input_size"][1:])  # the unpooled grid at the default size
    assert model.default_cfg["input_size"] == (3, 224, 224)

    x = images(1)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == unpooled_shape(name, model, 1)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert_close(model(x), pre, rtol=0)
        model.reset_classifier(0, "")  # no pooling: forward_features' layout
        assert_close(model(x), feats, rtol=0)
        model.reset_classifier(7, "")
        per_position = model(x)
        model.reset_classifier(7, "token" if family(name) == "castling" else "avg")
        assert model(x).shape == (1, 7)
    expect = list(unpooled_shape(name, model, 1))
    expect[1 if family(name) == "vig_h" else 2] = 7
    assert per_position.shape == tuple(expect)
    bare = create(name, num_classes=0, global_pool="")
    with torch.no_grad():
        assert bare(x).shape == feats.shape
    # timm's max and avgmax pools (what its ViTs take), against the unpooled features
    dims = (2, 3) if family(name) == "vig_h" else (1,)
    for pool, expect in (("max", feats.amax(dims)), ("avgmax", 0.5 * (feats.mean(dims) + feats.amax(dims)))):
        if family(name) == "castling":
            expect = None  # timm's own pooling (prefix tokens excluded): only the shape here
        model.reset_classifier(0, pool)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (1, model.num_features)
        if expect is not None:
            assert_close(out, expect, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# input size

@pytest.mark.parametrize("name", MODELS)
def test_img_size_and_set_input_size(name):
    model = create(name, img_size=96)
    assert get_model_input_config(model)["input_size"] == (3, 96, 96)
    with torch.no_grad():
        assert model.forward_features(images(1, (96, 96))).shape == unpooled_shape(name, model, 1, (96, 96))
        x = images(1, (128, 160))
        reference = model(x) if family(name) != "castling" else None  # ViG resizes on the fly
        model.set_input_size((128, 160))
        assert get_model_input_config(model)["input_size"] == (3, 128, 160)
        out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    if reference is not None:  # laying the embedding out anew equals resizing it per forward
        assert_close(out, reference, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# features and intermediates

@pytest.mark.parametrize("name", MODELS)
def test_features_only_getter_and_fx(name):
    getter = create(name, features_only=True)
    fx = create(name, features_only=True, feature_cls="fx")  # the same weights where both have them
    fx.graph_module.load_state_dict(getter.model.state_dict(), strict=False)
    x = images(1)
    with torch.no_grad():
        outs, fx_outs = getter(x), fx(x)
    channels, reductions = getter.feature_info.channels(), getter.feature_info.reduction()
    assert len(outs) == len(fx_outs) == len(channels) >= 3
    for out, fx_out, c, r in zip(outs, fx_outs, channels, reductions):
        assert out.shape[:2] == (1, c) and out.shape[2:] == tuple(math.ceil(SIZE / r) for _ in range(2))
        # FX returns the blocks' own outputs: NCHW maps for ViG-H, tokens for the isotropic models
        if fx_out.dim() == 3:
            fx_out = fx_out[:, fx_out.shape[1] - out.shape[2] * out.shape[3]:]  # without the class token
            fx_out = fx_out.transpose(1, 2).reshape(out.shape)
        # the traced graph runs the recording path (PyTorch's GEMMs), the getter the inference path
        # (on the CPU oneDNN's GEMMs on packed weights): float32 rounding apart
        assert_close(fx_out, out, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_and_pruning(name):
    model = create(name)
    x = images(1)
    n = len(model.feature_info)
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        assert_close(final, model.forward_features(x), rtol=0)
        assert len(inters) == n
        for t, info in zip(inters, model.feature_info):
            assert t.shape == (1, info["num_chs"], *(math.ceil(SIZE / info["reduction"]) for _ in range(2)))
        model.set_grad_checkpointing()
        assert_close(model.forward_intermediates(x)[0], final, rtol=1e-5)
        model.set_grad_checkpointing(False)
        take = model.prune_intermediate_layers([0, n - 2])  # drops the last block / stage
        assert take == [0, n - 2]
        pruned = model.forward_intermediates(x, indices=take, intermediates_only=True)
        assert_close(pruned[0], inters[0], rtol=0)
        assert_close(pruned[1], inters[n - 2], rtol=0)
        assert model(x).shape[0] == 1  # the pruned model still runs (no head)


# ------------------------------------------------------------------------------------------------
# TorchScript, FX, torch.export

@pytest.mark.parametrize("name", MODELS)
def test_torchscript(name):
    model = create(name)
    scripted = torch.jit.script(model)
    x = images(2, (SIZE, SIZE + 32) if family(name) != "castling" else (SIZE, SIZE))
    with torch.no_grad():
        assert_close(scripted(x), model(x), rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_fx_forward_backward_and_scripted(name):
    model = create(name)
    traced = torch.fx.symbolic_trace(model)
    x = images(2)
    with torch.no_grad():
        out = model(x)
        assert_close(traced(x), out, rtol=1e-5)  # the ops are leaves; GEMMs as in test_features_only_getter_and_fx
        assert_close(torch.jit.script(traced)(x), out, rtol=1e-4)
    # timm's FX training graph (torchvision's feature extractor, both modes traced)
    train_nodes, _ = get_graph_node_names(model)
    extractor = create_feature_extractor(model.train(), return_nodes=[train_nodes[-1]])
    logits = next(iter(extractor(x).values()))
    logits.mean().backward()
    assert logits.shape == (2, 1000) and all(p.grad is not None for p in extractor.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_dynamic_height_and_width(name):
    from torch.export import Dim

    model = create(name, **(dict(depths=(1, 1, 1, 1)) if family(name) == "vig_h" else dict(depth=1)),
                   **(dict(dynamic_img_size=True) if family(name) == "castling" else {}))
    dyn = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    program = torch.export.export(model, (images(2),), dynamic_shapes=(dyn,))
    assert not [n for n in program.graph.nodes if str(n.target).startswith("vigla.")]  # aten ops only
    for x in (images(1, (SIZE + 32, SIZE + 64)), images(3, (SIZE, SIZE))):
        with torch.no_grad():
            assert_close(program.module()(x), model(x), rtol=1e-4)
