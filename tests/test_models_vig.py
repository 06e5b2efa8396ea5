"""ViG / ViG-H models: sizes, init, the mixer against its maths in float64 (ViG, Liao et al., AAAI 2025:
sections "Bidirectional Gated Linear Attention" and "2D Gating Locality Injection", as the official
code computes them), and the timm surface."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F

import vigla  # noqa: F401  (registers the models)
from vigla.layers import BiGLAMixer
from vigla.layers.cast import gemm
from vigla.ops.bigla import bigla_naive

KEYS_DIR = Path(__file__).resolve().parent / "data" / "vig_official_keys"  # key lists of the official checkpoints
PLAIN = ["vig_tiny", "vig_small", "vig_base"]
HIER = ["vig_h_tiny", "vig_h_small", "vig_h_base"]
# parameters of the official configs, in millions (counted from the official code's shapes)
SPEC_PARAMS_M = dict(vig_tiny=5.83, vig_small=22.62, vig_base=89.02,
                     vig_h_tiny=28.60, vig_h_small=50.05, vig_h_base=88.90)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run best on one thread


def official_param_count(name: str) -> int:
    header = (KEYS_DIR / f"{name}.txt").read_text().splitlines()[0]
    return int(re.search(r"(\d+) parameters", header).group(1))


def small(name: str, **kwargs):
    """A shallow (ViG-H: also narrow, d_v still 32) model of the family: same code paths, fast."""
    shallow = (dict(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8))
               if name.startswith("vig_h") else dict(depth=2))
    return timm.create_model(name, **dict(shallow, **kwargs)).eval()


# ------------------------------------------------------------------------------------------------
# registry, sizes, configs

@pytest.mark.parametrize("name", PLAIN + HIER)
def test_create_and_param_count(name):
    assert name in timm.list_models("vig*")
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - SPEC_PARAMS_M[name]) / SPEC_PARAMS_M[name] < 1e-3
    assert n == official_param_count(name)
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 1000 and tuple(cfg["input_size"]) == (3, 224, 224)
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert tuple(cfg["mean"]) == timm.data.IMAGENET_DEFAULT_MEAN
    assert tuple(cfg["std"]) == timm.data.IMAGENET_DEFAULT_STD
    assert not cfg.get("url") and not cfg.get("hf_hub_id")


def test_per_config_differences():
    with torch.device("meta"):
        t, s = timm.create_model("vig_tiny"), timm.create_model("vig_small")
        ht, hb = timm.create_model("vig_h_tiny"), timm.create_model("vig_h_base")
    assert t.blocks[0].attn.conv_act is True and t.blocks[0].attn.out_act is True
    assert s.blocks[0].attn.conv_act is False and s.blocks[0].attn.out_act is False
    assert isinstance(t.blocks[-1].drop_path1, torch.nn.Identity)  # ViG-T: drop path 0
    assert s.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert s.blocks[0].attn.head_k == 32 and s.blocks[0].attn.head_v == 64
    assert s.blocks[0].mlp.fc2.in_features == 1024
    assert hb.stages[3].blocks[0].mlp.fc2.in_features == 2752
    assert ht.stages[2].blocks[0].attn.head_k == 16 and ht.stages[2].blocks[0].attn.head_v == 32
    assert ht.stages[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert ht.stages[0].blocks[0].norm1.eps == 1e-5 and ht.stages[0].blocks[0].attn.norm_out.eps == 1e-6


# ------------------------------------------------------------------------------------------------
# the mixer against a direct implementation of its maths, step by step: DWConv (2), projections (3),
# direction-wise gates (4), BiGLA (5), locality-injection mix (7), output (8)

def _rms(t, w):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def reference_mixer(m: BiGLAMixer, x: torch.Tensor, hw, conv_act: bool, out_act: bool):
    B, N, C = x.shape
    H, W = hw
    h = m.num_heads
    K = C // 2
    a = x.transpose(1, 2).reshape(B, C, H, W)
    xc = F.conv2d(a, m.dwconv.weight, padding=1, groups=C)  # step 2
    xc = F.silu(xc) if conv_act else xc
    xc = xc.flatten(2).transpose(1, 2)
    qkv = xc @ m.qkv.weight.T  # step 3
    q, k, v = qkv[..., :K], qkv[..., K:2 * K], qkv[..., 2 * K:]
    z = (xc @ m.decay_down.weight.T) @ m.decay_up.weight.T + m.decay_up.bias  # step 4
    log_f, log_b = F.logsigmoid(z[..., :K]) / 16, F.logsigmoid(z[..., K:]) / 16
    heads = lambda t: t.reshape(B, N, h, -1)  # noqa: E731
    o = bigla_naive(heads(q), heads(k), heads(v), heads(log_f), heads(log_b), (K // h) ** -0.5)  # step 5
    g = torch.sigmoid(xc @ m.mix_gate.weight.T + m.mix_gate.bias)  # step 7
    y = heads(g) * _rms(o, m.norm_out.weight) + (1 - heads(g)) * _rms(heads(xc), m.norm_local.weight)
    y = y.reshape(B, N, C)  # step 8
    y = F.silu(y) if out_act else y
    return y @ m.proj.weight.T


@pytest.mark.parametrize("acts", [(True, True), (False, False)])
def test_mixer_matches_spec_float64(acts):
    conv_act, out_act = acts
    m = BiGLAMixer(24, num_heads=2, conv_act=conv_act, out_act=out_act).double()
    with torch.no_grad():  # non-trivial biases and norm weights
        for p in (m.decay_up.bias, m.mix_gate.bias):
            p.normal_()
        for p in (m.norm_out.weight, m.norm_local.weight):
            p.uniform_(0.5, 1.5)
        m.decay_up.weight.mul_(20)  # decays spread well away from 0.96
    hw = (3, 5)
    x = torch.randn(2, 15, 24, dtype=torch.float64, requires_grad=True)
    out = m(x, hw)
    ref = reference_mixer(m, x, hw, conv_act, out_act)
    assert out.shape == (2, 15, 24)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # gradients through the op's hand-written backward vs autograd through the naive recurrence
    go = torch.randn_like(out)
    params = [x] + list(m.parameters())
    g_out = torch.autograd.grad(out, params, go)
    g_ref = torch.autograd.grad(ref, params, go)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_mixer_bf16_autocast():
    m = BiGLAMixer(64, num_heads=2)
    x = torch.randn(2, 20, 64)
    with torch.no_grad():
        ref = m(x, (4, 5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, (4, 5))
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


def _mixer_and_input(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A small mixer (heads of d_k = 16, d_v = 32, as ViG-H's) with non-trivial biases, norm weights and decays, and a
    fresh input that needs a gradient."""
    torch.manual_seed(0)
    m = BiGLAMixer(64, num_heads=2, conv_act=True, out_act=True).to(device, dtype)
    with torch.no_grad():
        for p in (m.decay_up.bias, m.mix_gate.bias):
            p.normal_()
        for p in (m.norm_out.weight, m.norm_local.weight):
            p.uniform_(0.5, 1.5)
        m.decay_up.weight.mul_(20)
    x = torch.randn(2, 30, 64, dtype=dtype).to(device).requires_grad_(True)
    return m, x, (5, 6)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _mixer_grads(m, x, hw, go, per_op: bool, monkeypatch, autocast: bool = False):
    """The mixer's output and the gradients of ``<go, output>`` by ``x`` and each parameter that needs one, by the
    fused training path (:class:`MixerFunction`) or the per-op path."""
    from vigla.layers import bigla_mixer
    with monkeypatch.context() as patch, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        if per_op:
            patch.setattr(bigla_mixer, "eager_training", lambda *tensors: False)
        out = m(x, hw)
        assert (type(out.grad_fn).__name__ == "MixerFunctionBackward") != per_op
        params = [t for t in (x, *m.parameters()) if t.requires_grad]
        return out, torch.autograd.grad(out, params, go)


@pytest.mark.parametrize("device, dtype, autocast, tol", [
    ("cpu", torch.float64, False, 1e-12), ("cpu", torch.float32, False, 2e-6), ("cpu", torch.float32, True, 2e-2),
    pytest.param("cuda", torch.float32, False, 2e-3, marks=pytest.mark.gpu),  # TF32 products
    pytest.param("cuda", torch.float32, True, 2e-2, marks=pytest.mark.gpu)])
def test_mixer_training_is_one_node_with_the_per_op_paths_gradients(device, dtype, autocast, tol, monkeypatch):
    """In eager training the mixer is one autograd node (MixerFunction: the ops' forward and backward implementations
    and the projections' GEMMs called in turn) with the per-op path's output and gradients by the input and every
    parameter: float64 (the references) to its rounding, float32 (the CPU kernels) to float32's, on CUDA to TF32's,
    under bfloat16 autocast to bfloat16's; and no further from the float64 model than the per-op path is."""
    m, x, hw = _mixer_and_input(dtype, device)
    go = torch.randn(2, 30, 64, dtype=dtype).to(device)
    out, grads = _mixer_grads(m, x, hw, go, False, monkeypatch, autocast)
    ref_out, ref_grads = _mixer_grads(m, x, hw, go, True, monkeypatch, autocast)
    exact, x64 = _mixer_and_input(torch.float64)[0], x.detach().cpu().double().requires_grad_(True)
    _, exact_grads = _mixer_grads(exact, x64, hw, go.cpu().double(), False, monkeypatch)
    assert out.dtype == ref_out.dtype and _rel(out, ref_out) <= tol
    assert len(grads) == 11
    for got, want, truth in zip(grads, ref_grads, exact_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert _rel(got, want) <= tol
        assert _rel(got.cpu(), truth) <= 1.5 * _rel(want.cpu(), truth) + tol / 10


def test_mixer_training_with_frozen_parameters(monkeypatch):
    """Parameters that need no gradient (fine-tuning part of a mixer) get none; the others are the per-op path's."""
    m, x, hw = _mixer_and_input()
    m.qkv.weight.requires_grad_(False)
    m.norm_local.weight.requires_grad_(False)
    go = torch.randn(2, 30, 64)
    _, grads = _mixer_grads(m, x, hw, go, False, monkeypatch)
    _, ref_grads = _mixer_grads(m, x, hw, go, True, monkeypatch)
    assert len(grads) == 9
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) <= 2e-6
    m(x, hw).sum().backward()
    assert m.qkv.weight.grad is None and m.norm_local.weight.grad is None and m.proj.weight.grad is not None


@pytest.mark.parametrize("autocast", [False, True])
def test_mixer_second_derivative_is_the_per_op_paths(autocast, monkeypatch):
    """Where autograd records the backward (a gradient penalty), MixerFunction differentiates the per-op path
    recomputed from its inputs under the forward's autocast: the penalty's gradients are the per-op path's."""
    from vigla.layers import bigla_mixer
    m, x, hw = _mixer_and_input()
    go = torch.randn(2, 30, 64)
    results = []
    for per_op in (False, True):
        with monkeypatch.context() as patch:
            if per_op:
                patch.setattr(bigla_mixer, "eager_training", lambda *tensors: False)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = m(x, hw)
            (dx,) = torch.autograd.grad(out, x, go, create_graph=True)
            results.append(torch.autograd.grad(dx.float().square().sum(), [x, *m.parameters()], allow_unused=True))
    assert sum(g is not None for g in results[1]) >= 10
    for got, want in zip(*results):
        assert (got is None) == (want is None)
        if want is not None:
            assert _rel(got, want) <= (2e-2 if autocast else 1e-5)


def test_mixer_runs_its_ops_one_by_one_where_something_watches():
    """Under a dispatch mode (FlopCounterMode counts BiGLA's custom op) and inside reference_ops() the mixer records
    its ops one by one (the per-op path), each seen by what watches it; forward-mode AD and no grad mode do not take
    the fused training path either."""
    import torch.autograd.forward_ad as fwAD
    from torch.utils.flop_counter import FlopCounterMode
    from vigla.ops import reference_ops
    from vigla.ops.dispatch import eager_training

    m, x, hw = _mixer_and_input()
    with FlopCounterMode(display=False) as counter:
        out = m(x, hw)
    assert type(out.grad_fn).__name__ != "MixerFunctionBackward"
    assert counter.get_flop_counts()["Global"][torch.ops.vigla.bigla_fwd] > 0
    with reference_ops():
        assert type(m(x, hw).grad_fn).__name__ != "MixerFunctionBackward"
    assert eager_training(x)
    with fwAD.dual_level():
        assert not eager_training(x)
    with torch.no_grad():
        assert not eager_training(x)


def test_mixer_folded_in_projection_is_the_low_rank_pair():
    """The GPU's inference in-projection (decay projection folded in, :meth:`BiGLAMixer._folded_weights`) gives
    q, k, v, the decay logits ``(x W_1) W_2 + b_2`` and the mix gate's logits of the separate projections."""
    torch.manual_seed(0)
    m = BiGLAMixer(24, num_heads=2).double()
    with torch.no_grad():
        for p in (m.decay_up.bias, m.mix_gate.bias):
            p.normal_()
    x = torch.randn(7, 24, dtype=torch.float64)
    with torch.no_grad():
        w_in, b_in, w_out = m._folded_weights(torch.float64, rows=7)
        K, C = m.key_dim, m.dim
        q, k, v, logits, gate = gemm(x, w_in, b_in).split([K, K, C, 2 * K, C], dim=-1)
        qkv = x @ m.qkv.weight.T
        expect = [qkv[:, :K], qkv[:, K:2 * K], qkv[:, 2 * K:], m.decay_up(m.decay_down(x)), m.mix_gate(x)]
    for got, want in zip([q, k, v, logits, gate], expect):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gemm(x, w_out), x @ m.proj.weight.T, rtol=1e-12, atol=1e-12)


def test_mixer_inference_weight_cache():
    """Without autograd the fused in-projection weight and the other projections are built once per
    compute dtype and rebuilt when a parameter changes; outputs equal the uncached (autograd)
    path's up to float32 rounding (the inference GEMMs may run oneDNN's, the autograd path MKL's)."""
    torch.manual_seed(0)
    m = BiGLAMixer(32, num_heads=2)
    x = torch.randn(2, 16, 32)
    fp32 = dict(rtol=1e-5, atol=1e-6)

    def fresh():
        with torch.enable_grad():
            return m(x, (4, 4)).detach()

    def cached(slot):
        return m._inference_weights[slot]

    with torch.no_grad():
        out = m(x, (4, 4))
        entry = cached("in_proj")
        torch.testing.assert_close(m(x, (4, 4)), out, rtol=0, atol=0)
        assert cached("in_proj") is entry  # reused
        torch.testing.assert_close(out, fresh(), **fp32)
        m.mix_gate.bias.add_(0.5)  # an in-place update (as an optimizer step makes)
        out2 = m(x, (4, 4))
        assert cached("in_proj") is not entry
        torch.testing.assert_close(out2, fresh(), **fp32)
        assert not torch.equal(out2, out)
        out_entry = cached("out")
        m.proj.weight.mul_(2.0)
        torch.testing.assert_close(m(x, (4, 4)), fresh(), **fp32)
        assert cached("out") is not out_entry
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = m(x, (4, 4))
            assert all(t.dtype == torch.bfloat16 for t in cached("in_proj")[1] + cached("out")[1])
            with torch.enable_grad():
                ref_bf16 = m(x, (4, 4)).detach()
        # no kernels for bf16 on the CPU: the inference path runs each op's reference (float32 sums, rounded
        # once), the recording path PyTorch's autocast ops (bf16 convolution): equal up to bf16 rounding
        torch.testing.assert_close(out_bf16, ref_bf16, rtol=2 ** -7, atol=2 ** -8)


def test_swiglu_inference_weight_cache():
    """The MLP's weights are cast once for inference (rebuilt after an update); same outputs."""
    from vigla.layers import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(16, 24)
    x = torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
        entry = mlp._inference_weights["fc"]
        assert entry[1][0].dtype == torch.bfloat16 and mlp(x).equal(y) and mlp._inference_weights["fc"] is entry
        mlp.fc2.weight.zero_()
        assert mlp(x).abs().max() == 0 and mlp._inference_weights["fc"] is not entry
        with torch.enable_grad():
            assert mlp(x).abs().max() == 0


@pytest.mark.parametrize("grad", [False, True])
def test_mixer_bad_grid(grad):
    """Tokens that do not fit the grid or the layer's width fail with one line on every path (the fused ones read
    the parameters with x's sizes: a wider x read past the depthwise conv's weight, then failed in oneDNN)."""
    m = BiGLAMixer(16, num_heads=2)
    with torch.set_grad_enabled(grad):
        with pytest.raises(ValueError, match="12 tokens do not form the given 3x3 grid"):
            m(torch.randn(1, 12, 16), (3, 3))
        for shape in ((1, 9, 32), (1, 9, 8), (9, 16)):
            with pytest.raises(ValueError, match=r"expected x of shape \[B, N, 16\]"):
                m(torch.randn(*shape, requires_grad=grad), (3, 3))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        BiGLAMixer(18, num_heads=4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("grad", [False, True])
def test_layers_refuse_an_input_on_another_device(device, grad):
    """A mixer, an MLP or a block whose parameters are on another device than its input fails with one line naming
    both, on the recording and the inference path (the fused paths hand kernels addresses: a CUDA input with a layer
    left on the CPU faulted the device). On the CPU the layers sit on the meta device; on the GPU on the CPU."""
    from vigla.layers import SwiGLU
    from vigla.models._vig_common import ViGBlock
    from vigla.layers import RmsNorm

    params, data = ("meta", "cpu") if device == "cpu" else ("cpu", "cuda")
    # the recording path of the MLP and the block meets the public ops' own check first (test_op_inputs.py)
    layers = [(BiGLAMixer(16, num_heads=2), lambda m, x: m(x, (3, 3)), "BiGLAMixer: x is on", "BiGLAMixer: x is on"),
              (SwiGLU(16, 32), lambda m, x: m(x), "SwiGLU: parameter fc1.weight is on", "swiglu_mlp: w1 is on"),
              (ViGBlock(16, 2, 32, norm_layer=RmsNorm), lambda m, x: m(x, (3, 3)), "ViGBlock: parameter norm1",
               "add_norm: weight is on")]
    for layer, call, inference, recording in layers:
        layer = layer.to(params).train(grad)
        x = torch.randn(1, 9, 16, device=data, requires_grad=grad)
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=f"^{recording if grad else inference}"):
            call(layer, x)


# ------------------------------------------------------------------------------------------------
# init

def _xavier_std(w, gain=2 ** -2.5):
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(w)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def test_init_plain():
    model = timm.create_model("vig_tiny")
    attn = model.blocks[3].attn
    for w in (attn.qkv.weight, attn.mix_gate.weight, attn.proj.weight, attn.dwconv.weight):
        assert w.std().item() == pytest.approx(_xavier_std(w), rel=0.06)
        assert w.abs().max().item() <= math.sqrt(3) * _xavier_std(w) + 1e-7  # uniform bound
    assert attn.decay_up.bias.abs().max() == 0 and attn.mix_gate.bias.abs().max() == 0
    for w in (model.blocks[3].mlp.fc1.weight, model.blocks[3].mlp.fc2.weight, model.head.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.head.bias.abs().max() == 0
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.blocks[0].norm1.weight == 1) and torch.all(attn.norm_out.weight == 1)


def test_init_hier():
    model = timm.create_model("vig_h_tiny", depths=(1, 1, 1, 1))
    attn = model.stages[1].blocks[0].attn
    mlp = model.stages[1].blocks[0].mlp
    for w in (attn.qkv.weight, attn.mix_gate.weight, attn.proj.weight, mlp.fc1.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.06)
    w = model.stages[2].blocks[0].attn.dwconv.weight  # only the DWConv keeps the Xavier init
    assert w.std().item() == pytest.approx(_xavier_std(w), rel=0.1)
    assert attn.decay_up.bias.abs().max() == 0
    assert torch.all(model.stages[0].blocks[0].norm1.bias == 0)
    conv = model.stem.conv1  # PyTorch default: kaiming-uniform(a=sqrt(5)), bound 1/sqrt(fan_in)
    assert conv.weight.abs().max().item() <= 1 / math.sqrt(27) + 1e-7


# ------------------------------------------------------------------------------------------------
# forward, features, timm surface

def test_forward_shapes_plain():
    model = small("vig_tiny")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 16, 192)  # 64 px -> 8 -> 4x4 grid
        assert model.forward_head(feats, pre_logits=True).shape == (2, 192)
        assert model(x).shape == (2, 1000)


def test_forward_shapes_hier():
    model = small("vig_h_tiny")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 256, 2, 2)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
        assert model(x).shape == (2, 1000)


def test_features_only_hier():
    model = timm.create_model("vig_h_tiny", depths=(1, 1, 1, 1), features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [96, 192, 384, 768]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 16, 16), (1, 192, 8, 8), (1, 384, 4, 4), (1, 768, 2, 2)]


def test_features_only_plain():
    model = timm.create_model("vig_tiny", depth=4, features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.reduction() == [16, 16]
    assert model.feature_info.channels() == [192, 192]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 96, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 192, 6, 4), (1, 192, 6, 4)]


def test_forward_intermediates_plain():
    model = small("vig_tiny", depth=3)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert len(inters) == 3 and inters[-1].shape == (1, 192, 4, 3)
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0].flatten(2).transpose(1, 2), final, rtol=0, atol=0)
        nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", stop_early=True,
                                          intermediates_only=True)
        assert len(nlc) == 2 and nlc[0].shape == (1, 12, 192)
        torch.testing.assert_close(nlc[0], inters[1].flatten(2).transpose(1, 2), rtol=0, atol=0)
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NHWC")
        take = model.prune_intermediate_layers(indices=[1])
        assert take == [1] and len(model.blocks) == 2
        pruned = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        torch.testing.assert_close(pruned[0], inters[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
@pytest.mark.parametrize("device, autocast", [("cpu", False), ("cpu", True),
                                              pytest.param("cuda", True, marks=pytest.mark.gpu)])
def test_deferred_residual_adds_change_nothing(name, device, autocast, monkeypatch):
    """run_blocks (each block's closing add inside the next block's add + norm) against the blocks called
    one by one: the same outputs and gradients in float32 and under bf16 autocast (a float32 residual
    stream), with stochastic depth on (the same random draws); on CUDA through the fused kernels."""
    import vigla.models.vig
    import vigla.models.vig_h

    model = small(name, drop_path_rate=0.2).train().to(device)
    x = torch.randn(2, 3, 64, 64, device=device)

    def run():
        torch.manual_seed(1)
        model.zero_grad()
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().square().sum().backward()
        return out, [p.grad.clone() for p in model.parameters()]

    fused, fused_grads = run()

    def one_by_one(blocks, x, hw, norm=None):
        for blk in blocks:
            x = blk(x, hw)
        return x if norm is None else norm(x)

    for module in (vigla.models.vig, vigla.models.vig_h):
        monkeypatch.setattr(module, "run_blocks", one_by_one)
    plain, plain_grads = run()
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-5, atol=1e-7)  # a GEMM may change algorithm
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
@pytest.mark.parametrize("device, dtype, autocast", [("cpu", torch.float32, False), ("cpu", torch.float64, False),
                                                     pytest.param("cuda", torch.float32, True, marks=pytest.mark.gpu)])
def test_inference_path_matches_recording_path(name, device, dtype, autocast, monkeypatch):
    """With grad mode off the blocks call their ops' forward implementations directly (eager_inference):
    the same logits as the recording path (autograd through the public ops) on a fresh input, whether
    the ops run the CPU kernels (float32), their references (float64) or the CUDA kernels (bf16
    autocast); and the public ops are indeed not called then."""
    import vigla.layers.bigla_mixer
    import vigla.layers.mlp
    import vigla.models._vig_common

    torch.manual_seed(0)
    model = small(name).eval().to(device, dtype)
    x = torch.randn(2, 3, 64, 64, device=device, dtype=dtype)
    with torch.autocast(device, torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            fast = model(x)
        recorded = model(x.clone().requires_grad_()).detach()
    assert recorded.abs().max() > 0
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}[dtype]
    torch.testing.assert_close(fast, recorded, **(dict(rtol=2e-2, atol=2e-2 * recorded.abs().max().item())
                                                  if autocast else tol))

    def refuse(*args, **kwargs):
        raise AssertionError("a public op was called on the inference path")

    for module, names in ((vigla.layers.bigla_mixer, ("bigla_gated", "locality_mix", "dwconv_silu")),
                          (vigla.layers.mlp, ("swiglu_mlp",)), (vigla.models._vig_common, ("add_and_norm",))):
        for fn in names:
            monkeypatch.setattr(module, fn, refuse)
    with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=autocast):
        torch.testing.assert_close(model(x), fast, rtol=0, atol=0)


def test_wrapped_or_hooked_blocks_run_one_by_one():
    """A wrapper around a block (here activation checkpointing's) and backward hooks keep working: the
    blocks are called as modules then."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = small("vig_tiny", depth=3).train()
    x = torch.randn(1, 3, 32, 32)
    ref = model(x)
    grads = []
    model.blocks[2].register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0]))
    out = model(x)
    out.sum().backward()
    assert len(grads) == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    calls = []
    wrapped = checkpoint_wrapper(model.blocks[0])
    original = wrapped.forward
    wrapped.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    model.blocks[0] = wrapped
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert calls == [1]


def test_hooks_on_a_blocks_layers_fire_in_inference():
    """The blocks' inference path (grad mode off) skips the mixer's and the MLP's ``__call__`` only when nothing
    watches them: a forward hook on either still sees its call, with the same output."""
    model = small("vig_tiny", depth=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        seen = []
        for layer in (model.blocks[1].attn, model.blocks[1].mlp):
            layer.register_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__))
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert seen == ["BiGLAMixer", "SwiGLU"]


def test_block_hooks_still_see_every_block():
    """A forward hook on a block sees its input and output tensors, whichever way the blocks run."""
    model = small("vig_tiny", depth=3)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, inters = model.forward_intermediates(x, output_fmt="NLC")
        seen = []
        model.blocks[1].register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
        model.forward_features(x)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0], inters[0], rtol=0, atol=0)
    torch.testing.assert_close(seen[0][1], inters[1], rtol=0, atol=0)


def test_forward_intermediates_hier():
    model = small("vig_h_tiny")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert [tuple(i.shape[1:]) for i in inters] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final, rtol=0, atol=0)
        nhwc = model.forward_intermediates(x, indices=[1], output_fmt="NHWC", stop_early=True,
                                           intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inters[1].permute(0, 2, 3, 1), rtol=0, atol=0)
        model.prune_intermediate_layers(indices=[0, 1])
        assert len(model.stages) == 2
        pruned = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(pruned[1], inters[1], rtol=0, atol=0)


@pytest.mark.parametrize("size", [(160, 160), (288, 288), (160, 288)])
def test_dynamic_size_resamples_pos_embed(size):
    model = small("vig_tiny", depth=1)
    x = torch.randn(1, 3, *size)
    grid = tuple((((s + 2 - 9) // 8 + 1) + 2 - 3) // 2 + 1 for s in size)
    with torch.no_grad():
        assert model.forward_features(x).shape == (1, grid[0] * grid[1], 192)
        assert model(x).shape == (1, 1000)
        pos = model._pos_embed(grid)
    # official resize: bicubic, align_corners=False, no antialias, from the 14x14 grid
    expect = F.interpolate(model.pos_embed.detach().reshape(1, 14, 14, 192).permute(0, 3, 1, 2),
                           size=grid, mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos, expect.flatten(2).transpose(1, 2))
    assert model._pos_embed((14, 14)) is model.pos_embed


def test_dynamic_size_hier():
    model = small("vig_h_tiny")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70)).shape == (1, 1000)
        assert model.forward_features(torch.randn(1, 3, 50, 70)).shape == (1, 256, 2, 3)


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_reset_classifier(name):
    model = small(name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(10)
        assert model(x).shape == (1, 10) and model.num_classes == 10
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled, rtol=0, atol=0)
        model.reset_classifier(5, global_pool="")  # per token / position, in forward_features' layout
        assert model(x).shape == ((1, 16, 5) if name == "vig_tiny" else (1, 5, 2, 2))
        model.reset_classifier(0, global_pool="")
        torch.testing.assert_close(model(x), model.forward_features(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="global_pool must be one of 'avg', 'max', 'avgmax' or ''"):
        model.reset_classifier(5, global_pool="token")  # no class token
    assert small(name, num_classes=10).head.out_features == 10


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_grad_checkpointing(name, monkeypatch):
    """Checkpointed blocks run twice (forward, then again in the backward) but BiGLA's forward
    only once (its output is kept); outputs and gradients equal the plain run's."""
    from vigla.ops.bigla import op as bigla_op

    bigla_calls = []
    for module, name_ in ((bigla_op, "bigla_chunked"), (bigla_op.cpu_kernels, "bigla_fwd_cpu")):  # either CPU path
        fn = getattr(module, name_)
        monkeypatch.setattr(module, name_, lambda *a, fn=fn: bigla_calls.append(1) or fn(*a))
    torch.manual_seed(0)
    model = small(name).train()
    x = torch.randn(2, 3, 32, 32)

    def run():
        model.zero_grad()
        torch.manual_seed(1)  # same drop-path draws (ViG-H-T has drop path 0.2)
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    first = model.blocks[0] if name == "vig_tiny" else model.stages[0].blocks[0]
    first.register_forward_pre_hook(lambda *_: calls.append(1))
    ref_out, ref_grads = run()
    assert len(calls) == 1
    n_bigla = len(bigla_calls)
    assert n_bigla == len(model.blocks if name == "vig_tiny" else [b for s in model.stages for b in s.blocks])
    model.set_grad_checkpointing(True)
    out, grads = run()
    assert len(calls) == 3  # one forward + one recomputation in backward
    assert len(bigla_calls) == 2 * n_bigla  # this run's forward only
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_no_weight_decay_and_groups():
    plain, hier = small("vig_tiny"), small("vig_h_tiny")
    assert plain.no_weight_decay() == {"pos_embed"} and hier.no_weight_decay() == set()
    groups = timm.models.group_parameters(plain, plain.group_matcher())
    assert len(groups) == 2 + 2  # stem (+pos_embed), 2 blocks, final norm (head goes last)
    assert "pos_embed" in groups[0] and "patch_embed.conv1.weight" in groups[0]
    hgroups = timm.models.group_parameters(hier, hier.group_matcher(coarse=True))
    assert len(hgroups) == 1 + 4 + 1
    opt = timm.optim.create_optimizer_v2(plain, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(plain.pos_embed) in no_decay


# ------------------------------------------------------------------------------------------------
# input errors

@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_bad_input_errors(name):
    model = small(name)
    with pytest.raises(ValueError, match=r"expected 3 input channels .* got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"4-D image batch \[B, 3, H, W\], got shape \[3, 64, 64\]"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_too_small_image():
    model = small("vig_tiny")
    with pytest.raises(ValueError, match=r"at least 7x7 pixels .* got 6x32"):
        model(torch.randn(1, 3, 6, 32))
    with torch.no_grad():  # the smallest accepted size gives a 1x1 grid
        assert model.forward_features(torch.randn(1, 3, 7, 7)).shape == (1, 1, 192)
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("vig_tiny", global_pool="token")


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_whole_model_traces_under_torch_compile(name):
    """torch.compile (AOTAutograd, eager backend: what Inductor receives, without its code generation) traces
    a whole model in one graph, forward and backward, through every custom op (the stem's conv + norm,
    BiGLA's CPU kernel, the fused block ops), and gives eager's outputs and gradients."""
    torch.manual_seed(0)
    model = small(name, num_classes=10, drop_path_rate=0.0).train()  # no stochastic depth: one function
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, expect = compiled(x), model(x)
    assert torch.allclose(out, expect, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(expect.square().sum(), params)
    assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-6) for g, w in zip(got, want))


def _compiled_ops(model, x) -> tuple[torch.Tensor, list[str]]:
    """``model(x)`` compiled whole with a backend that records the calls in Dynamo's graph: (output, op names)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    return torch.compile(model, backend=backend, fullgraph=True)(x), seen


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_compiled_inference_takes_the_inference_path(name, monkeypatch):
    """Compiled inference (grad mode off) calls the inference path's ops as custom ops (vigla.ops.inference.TRACED:
    each output projection inside the next add + norm, ``vigla::linear_add_norm``) and gives eager inference's
    logits; with autograd recording it traces the recording path's ops. That path is the GPU's (``_graph_device``):
    lifted here to run it on the CPU, where it is checked to be off by default."""
    import vigla.ops.inference as inference

    torch.manual_seed(0)
    model = small(name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expect = model(x)
        _, default_ops = _compiled_ops(model, x)
        monkeypatch.setattr(inference, "_graph_device", lambda t: True)
        torch._dynamo.reset()
        got, ops = _compiled_ops(model, x)
    assert not any("linear_add_norm" in op for op in default_ops)
    n_blocks = sum(1 for m in model.modules() if type(m).__name__ == "ViGBlock")
    n_runs = len(model.stages) if hasattr(model, "stages") else 1  # a stage's last fc2 is added after its blocks
    assert sum("linear_add_norm" in op for op in ops) == 2 * n_blocks - n_runs
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-5), (got - expect).abs().max()
    torch._dynamo.reset()
    _, recording = _compiled_ops(model, x.requires_grad_())
    assert not any("linear_add_norm" in op for op in recording)


@pytest.mark.gpu
# max-autotune times Inductor's GEMM candidates for every product: 140-232 s cold on an H100 beside the other workers
# (the suite's 300-s per-test cap, logs/tests_ops.log), so it gets a cap of its own
@pytest.mark.parametrize("mode", ["reduce-overhead", pytest.param("max-autotune", marks=pytest.mark.timeout(540))])
def test_inductor_modes_on_gpu(mode):
    """``torch.compile(model, mode=...)`` with Inductor on CUDA, the modes users pick for speed (both replay CUDA
    graphs): training steps (forward, backward) and inference under bf16 autocast give eager's outputs and
    gradients to bf16's precision, through the Triton kernels launched from Inductor's code."""
    torch.manual_seed(0)
    model = small("vig_tiny", num_classes=10).cuda().train()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = torch.compile(model, mode=mode, fullgraph=True)

    def step(fn):
        with torch.autocast("cuda", torch.bfloat16):
            out = fn(x)
        grads = torch.autograd.grad(out.float().square().sum(), params)
        return out.detach().float().clone(), [g.clone() for g in grads]

    def close(a, b, tol):
        return (a - b).norm() <= tol * b.norm()

    want_out, want_grads = step(model)
    for _ in range(3):  # warm-up, recording, replay
        got_out, got_grads = step(compiled)
    assert close(got_out, want_out, 2e-2)
    assert all(close(g, w, 5e-2) for g, w in zip(got_grads, want_grads))
    model.eval()
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        want = model(x).float()
        for _ in range(3):
            got = compiled(x).float().clone()
    assert close(got, want, 2e-2)


def _penalty_grads(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The parameters' gradients of a gradient penalty, ``||d sum(model(x)^2) / dx||^2``: a second derivative."""
    x = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    model.zero_grad()
    dx.square().sum().backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_gradient_penalty_through_the_fused_ops_is_the_references(name, device):
    """A second derivative through the fused ops' eager path: each op's backward records its reference's ops where
    autograd asks for the backward's graph (the CPU kernels' gradients failed in the second backward, "no autograd
    formula"; the Triton launchers' passed as constants): every parameter's gradient that of the model under
    reference_ops(), in float32 (on CUDA within TF32's rounding)."""
    from vigla.ops import reference_ops

    torch.manual_seed(0)
    model = small(name, img_size=64, num_classes=4, drop_path_rate=0.0).train().to(device)  # the same function twice
    x = torch.randn(2, 3, 64, 64, device=device)
    fused = _penalty_grads(model, x)
    with reference_ops():
        reference = _penalty_grads(model, x)
    assert all(g is not None and g.norm() > 0 for g in reference)
    tol = 1e-4 if device == "cpu" else 3e-3  # the Triton kernels' float32 products run in TF32 (a dropped term: O(1))
    for got, want in zip(fused, reference):
        assert (got - want).norm() <= tol * want.norm()


@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_the_references_second_derivative_is_the_finite_difference(name):
    """What the fused ops' recorded backward is checked against: in float64 (the references on every op) the gradient
    penalty's derivative by each kind of parameter (stem, norms, the mixer's projections and gates, the MLP, the head),
    at its largest entry, equals a central finite difference."""
    torch.manual_seed(0)
    model = small(name, img_size=64, num_classes=4, drop_path_rate=0.0).train().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def penalty() -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        (dx,) = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        return dx.square().sum()

    penalty().backward()
    kinds = ("stem", "norm", "qkv", "decay_up", "mix_gate", "fc1", "head")
    params = [(n, p) for n, p in model.named_parameters() if any(k in n for k in kinds)]
    assert len(params) >= 10 and all(p.grad is not None for n, p in params)
    for n, p in params:
        i = int(p.grad.abs().argmax())
        with torch.no_grad():
            p.view(-1)[i] += 1e-5
        up = float(penalty().detach())
        with torch.no_grad():
            p.view(-1)[i] -= 2e-5
        down = float(penalty().detach())
        with torch.no_grad():
            p.view(-1)[i] += 1e-5
        fd = (up - down) / 2e-5
        assert abs(p.grad.view(-1)[i] - fd) <= 1e-4 * abs(fd) + 1e-9, n


def test_a_second_derivative_through_the_custom_ops_fails_in_one_line():
    """Gradient checkpointing's path runs the custom ops, whose backward ops have no derivative: one error line naming
    the op and the ways that have one (was: "no autograd formula was registered. Please use register_autograd")."""
    torch.manual_seed(0)
    model = small("vig_tiny", img_size=64, num_classes=4).train()
    model.set_grad_checkpointing(True)
    expected = (r"^vigla::\w+_bwd: no second derivative through vigla's custom ops \(the path gradient checkpointing "
                r".* under vigla\.ops\.reference_ops\(\)$")
    with pytest.raises(RuntimeError, match=expected):
        _penalty_grads(model, torch.randn(2, 3, 64, 64))


@pytest.mark.filterwarnings("ignore::vigla.notices.ViglaWarning")  # aux_eps < 1/N_keys at 5 keys
def test_castlings_auxiliary_softmax_refuses_a_second_derivative():
    """Castling's auxiliary masked softmax (training only) saves its row normaliser as a constant and works in place:
    once-differentiable, said as such (was: an in-place modification error inside the first backward)."""
    model = timm.create_model("castling_deit_tiny", img_size=32, patch_size=16, embed_dim=32, depth=2,
                              num_heads=2).train()
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        _penalty_grads(model, torch.randn(2, 3, 32, 32))
