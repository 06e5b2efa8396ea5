"""Castling-ViT: linear-angular kernel, mixer, auxiliary branch, models (spec castling.md §1, §2, §5)."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import vigla  # noqa: F401  (registers the models)
from vigla.layers import LinearAngularAttention
from vigla.models.castling import (
    AuxSchedule,
    CastlingVisionTransformer,
    evaluate_aux_switch,
    load_deit_weights,
    probe_aux,
)
from vigla.ops.linear_angular import (
    linear_angular_z,
    linear_angular_z_quadratic,
    masked_softmax_aux,
    normalize_heads,
    switch_certificate,
)

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=2, num_classes=10,
             qkv_bias=True)  # 64 patches + cls: 1/65 < 0.02, so the mask can empty


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _qkv(b=2, h=3, n=50, d=16, dtype=torch.float32):
    return [torch.randn(b, h, n, d, dtype=dtype) for _ in range(3)]


def _peaky(model_or_mixer, factor=40.0):
    """Scale the q/k rows of every qkv weight so that softmax attention is sharp (mask non-empty)."""
    with torch.no_grad():
        for mod in model_or_mixer.modules():
            if isinstance(mod, LinearAngularAttention):
                c = mod.qkv.in_features
                mod.qkv.weight[: 2 * c] *= factor


# ---- the kernel ---------------------------------------------------------------------------------
def test_angular_kernel_linear_part_plus_arcsin_series_float64():
    c = torch.linspace(-0.9, 0.9, 721, dtype=torch.float64)
    residual = 1 - torch.arccos(c) / math.pi - (0.5 + c / math.pi)
    series = torch.zeros_like(c)
    for n in range(1, 200):
        a_n = math.exp(math.lgamma(2 * n + 1) - n * math.log(4) - 2 * math.lgamma(n + 1)) / (2 * n + 1)
        series += a_n * c ** (2 * n + 1)
    torch.testing.assert_close(residual, series / math.pi, rtol=0, atol=1e-13)
    # the spec's checkpoints: a_1 = 1/6, |R| <= 1/2 - 1/pi, reached at c = ±1, R(0.3) ~ 0.0015
    ends = torch.tensor([-1 + 1e-7, 1 - 1e-7], dtype=torch.float64)
    r_ends = 1 - torch.arccos(ends) / math.pi - (0.5 + ends / math.pi)
    # arccos(1 - t) ~ sqrt(2t): the clamp at 1e-7 costs ~1.4e-4
    torch.testing.assert_close(r_ends.abs(), torch.full((2,), 0.5 - 1 / math.pi, dtype=torch.float64), atol=2e-4,
                               rtol=0)
    assert (residual.abs() < 0.5 - 1 / math.pi).all()
    r03 = 1 - math.acos(0.3) / math.pi - (0.5 + 0.3 / math.pi)
    assert abs(r03 - 0.0015) < 1e-4
    assert 0.5 - 1 / math.pi > 0.18  # the linear kernel is strictly positive


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_linear_order_equals_explicit_kernel(dtype, tol):
    q, k, v = _qkv(dtype=dtype)
    z = linear_angular_z(q, k, v)
    assert z.dtype == dtype
    assert _rel(z, linear_angular_z_quadratic(q, k, v)) < tol
    # independent float64 formula: Z_i = 0.5 v_i + (1/pi) sum_j cos(q_i, k_j) v_j
    qd, kd, vd = q.double(), k.double(), v.double()
    cos = (qd @ kd.transpose(-2, -1)) / (qd.norm(dim=-1)[..., :, None] * kd.norm(dim=-1)[..., None, :])
    assert _rel(z, 0.5 * vd + cos @ vd / math.pi) < tol


def test_zero_rows_give_zeros_not_nan():
    q, k, v = _qkv(n=8)
    q[:, :, 0] = 0
    k[:, :, 1] = 0
    v[:, :, 2] = 0
    z = linear_angular_z(q, k, v)
    torch.testing.assert_close(z[:, :, 0], 0.5 * v[:, :, 0])  # q = 0 row: only the skip term
    z[:, :, 3] = 0
    o = normalize_heads(z)
    assert torch.isfinite(o).all() and (o[:, :, 3] == 0).all()
    torch.testing.assert_close(o[:, :, 4].norm(dim=-1), torch.ones(2, 3))


def test_ops_reject_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        linear_angular_z(q[0], k, v)
    with pytest.raises(ValueError, match="same B, H, N"):
        linear_angular_z(q, k[:, :, :10], v)


def test_masked_softmax_branch_and_certificate_bound():
    q, k, v = _qkv(n=64)
    q, k = 3 * q, 3 * k  # sharp attention: many kept entries
    aux = masked_softmax_aux(q, k, v, threshold=0.02)
    p = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
    s = torch.where(p > 0.02, p, torch.zeros_like(p))
    torch.testing.assert_close(aux.sv, s @ v)
    torch.testing.assert_close(aux.row_mass, s.sum(-1))
    assert 0 < aux.density.item() == pytest.approx((p > 0.02).float().mean().item())
    assert (aux.row_mass < 1).any()  # not renormalised

    z = linear_angular_z(q, k, v)
    cert = switch_certificate(z, v, aux.row_mass)
    change = (normalize_heads(z + aux.sv) - normalize_heads(z)).norm(dim=-1)
    assert change.max() > 0
    assert (change <= 2 * cert + 1e-6).all()
    m = aux.row_mass.amax(-1)
    expected = (m * v.norm(dim=-1).amax(-1) / z.norm(dim=-1).amin(-1)).amax()
    torch.testing.assert_close(cert, expected)


def test_masked_softmax_gradient_flows_only_through_kept_entries():
    q, k, v = _qkv(b=1, h=2, n=16, d=8)
    q, k = (3 * t for t in (q, k))
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    masked_softmax_aux(qg, kg, v, threshold=0.05).sv.square().sum().backward()
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    p = torch.softmax(qr @ kr.transpose(-2, -1) / math.sqrt(8), dim=-1)
    mask = (p > 0.05).detach()  # the comparator is a constant
    ((p * mask) @ v).square().sum().backward()
    assert 0 < mask.float().mean() < 1
    torch.testing.assert_close(qg.grad, qr.grad)
    torch.testing.assert_close(kg.grad, kr.grad)
    # an empty mask (P uniform = 1/16, not > 1/16) gives an exact zero term and zero gradient
    q0 = torch.zeros_like(q, requires_grad=True)
    aux0 = masked_softmax_aux(q0, k, v, threshold=1 / 16)
    assert aux0.density.item() == 0 and (aux0.sv == 0).all()
    aux0.sv.sum().backward()
    assert (q0.grad == 0).all()


# ---- the mixer --------------------------------------------------------------------------------
def _official_forward(mixer: LinearAngularAttention, x: torch.Tensor, sparse: bool) -> torch.Tensor:
    """Transcription of the official ``LinAngularAttention.forward`` (float64, no eps, seq1d conv)."""
    w = {k: t.double() for k, t in mixer.state_dict().items()}
    x = x.double()
    b, n, c = x.shape
    h = mixer.num_heads
    qkv = F.linear(x, w["qkv.weight"], w.get("qkv.bias")).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if sparse:
        attn = ((q * mixer.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        sparse_attn = (attn > mixer.aux_eps) * attn
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    kk = w["dconv.weight"].shape[2]
    dconv_v = F.conv2d(v, w["dconv.weight"], padding=(kk // 2, 0), groups=h)
    out = 0.5 * v + 1.0 / math.pi * (q @ (k.transpose(-2, -1) @ v))
    if sparse:
        out = sparse_attn @ v + out
    out = out / out.norm(dim=-1, keepdim=True) + dconv_v
    return F.linear(out.transpose(1, 2).reshape(b, n, c), w["proj.weight"], w["proj.bias"])


@pytest.mark.parametrize("sparse", [False, True])
def test_mixer_matches_official_forward(sparse):
    mixer = LinearAngularAttention(48, num_heads=3, aux=True, aux_eps=0.02)
    _peaky(mixer, 10.0)
    x = torch.randn(2, 65, 48)
    mixer.train(sparse)
    with torch.no_grad():
        y = mixer(x)
    if sparse:
        assert mixer.stats()["mask_density"] > 0  # the branch really contributed
    assert _rel(y, _official_forward(mixer, x, sparse)) < 1e-5


def test_mixer_2d_dwconv_reference_and_prefix_passthrough():
    mixer = LinearAngularAttention(32, num_heads=2, dw_mode="2d", num_prefix_tokens=1)
    assert mixer.dconv.weight.shape == (32, 1, 3, 3)
    hw, n = (4, 6), 25
    v = torch.randn(2, 2, n, 16)
    out = mixer.dwconv(v, hw, 1)
    assert torch.equal(out[:, :, :1], v[:, :, :1])  # cls token unchanged by the conv
    grid = v[:, :, 1:].transpose(1, 2).reshape(2, 24, 32).transpose(1, 2).reshape(2, 32, 4, 6)
    ref = F.conv2d(grid, mixer.dconv.weight, padding=1, groups=32).reshape(2, 32, 24).transpose(1, 2)
    torch.testing.assert_close(out[:, :, 1:].transpose(1, 2).reshape(2, 24, 32), ref)
    v2 = v.clone()
    v2[:, :, 0] += 5.0  # the cls token does not leak into the patch outputs
    assert torch.equal(mixer.dwconv(v2, hw, 1)[:, :, 1:], out[:, :, 1:])
    # the faithful 1-D conv does mix cls with the first patches
    seq = LinearAngularAttention(32, num_heads=2)
    assert not torch.equal(seq.dwconv(v2, None, 1)[:, :, 1], seq.dwconv(v, None, 1)[:, :, 1])


def test_mixer_rejects_bad_input():
    with pytest.raises(ValueError, match="odd"):
        LinearAngularAttention(32, num_heads=2, dw_kernel_size=4)
    with pytest.raises(ValueError, match="qk_norm"):
        LinearAngularAttention(32, num_heads=2, qk_norm=True)
    with pytest.raises(ValueError, match="dw_mode"):
        LinearAngularAttention(32, num_heads=2, dw_mode="3d")
    mixer = LinearAngularAttention(32, num_heads=2, dw_mode="2d")
    with pytest.raises(ValueError, match=r"\[B, N, 32\]"):
        mixer(torch.randn(2, 17, 16))
    with pytest.raises(ValueError, match=r"hw=\(H, W\)"):
        mixer(torch.randn(2, 17, 32))
    with pytest.raises(ValueError, match="imply 13 tokens"):
        mixer(torch.randn(2, 17, 32), hw=(3, 4))


def test_aux_eps_warning_when_mask_cannot_empty():
    mixer = LinearAngularAttention(32, num_heads=2, aux=True, aux_eps=0.02).train()
    with pytest.warns(UserWarning, match="1/N_keys = 1/20"):
        mixer(torch.randn(1, 20, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixer(torch.randn(1, 50, 32))  # 0.02 >= 1/50: feasible
        mixer.eval()(torch.randn(1, 20, 32))  # branch not run in eval


def test_mixer_train_eval_bit_exact_when_mask_empty_and_not_otherwise():
    mixer = LinearAngularAttention(48, num_heads=3, aux=True)
    with torch.no_grad():
        mixer.qkv.weight.normal_(0, 0.02)  # ViT init: P ~ 1/N < eps
    x = torch.randn(2, 197, 48)
    y_train = mixer.train()(x)
    assert mixer.stats()["mask_density"] == 0.0
    y_eval = mixer.eval()(x)
    assert torch.equal(y_train, y_eval)
    _peaky(mixer, 300.0)
    y_train = mixer.train()(x)
    assert mixer.stats()["mask_density"] > 0
    assert not torch.equal(y_train, mixer.eval()(x))


@pytest.mark.parametrize("n", [3136, 16384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_close_to_fp32(n, dtype):
    mixer = LinearAngularAttention(192, num_heads=3).eval()
    x = torch.randn(1, n, 192) + 2.0 * torch.randn(192)  # a shared direction: keys align, Z grows with N
    with torch.no_grad():
        ref = mixer(x)
        q, k, v = mixer.qkv(x).reshape(1, n, 3, 3, 64).permute(2, 0, 3, 1, 4).unbind(0)
        assert (linear_angular_z(q, k, v) ** 2).sum(-1).max() > 65504  # |Z|^2 would overflow fp16
        with torch.autocast("cpu", dtype=dtype):
            y = mixer(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    assert _rel(y, ref) < 1e-2


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, torch
    from vigla.layers import LinearAngularAttention

    def peak_kib():  # the process's resident-set high-water mark
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    torch.set_num_threads(1)
    mixer = LinearAngularAttention(192, num_heads=3).eval()
    out = {}
    with torch.no_grad():
        mixer(torch.randn(1, 256, 192))
        for n in (4096, 16384):
            x = torch.randn(1, n, 192)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current RSS
            before = peak_kib()
            y = mixer(x)
            out[n] = (peak_kib() - before) * 1024
            assert torch.isfinite(y).all()
            del x, y
    print(json.dumps(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the RSS high-water mark from /proc")
def test_eval_memory_is_linear_in_tokens():
    """Peak RSS growth of an eval forward (fresh process) at N = 4096 and 16384, 3 heads: a quadratic path needs
    3 GiB for the fp32 N×N maps at 16384 and grows 16x from 4096; ours needs ~200 MiB (140 of them the CPU
    conv's im2col buffer) and grows ~4x."""
    # a fixed glibc mmap threshold returns every large freed block to the OS, so the peak RSS is the peak of
    # live memory rather than of what the heap happened to keep
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 0, res.stderr
    peaks = json.loads(res.stdout.strip().splitlines()[-1])
    small, large = peaks["4096"], peaks["16384"]
    assert large < 512 * 2**20 < 3 * 16384 * 16384 * 4, peaks
    assert small > 0 and large / small < 6, peaks


# ---- the schedule and the model-level API --------------------------------------------------------
def test_aux_schedule_values():
    s = AuxSchedule(lambda_max=0.1, eps=0.02, eps_end=0.05, aux_off=0.8)
    assert s.at(0.0) == (True, 0.0, 0.02)
    on, lam, eps = s.at(0.5)
    assert on and lam == pytest.approx(0.0625) and eps == pytest.approx(0.02 + 0.03 * 0.625)
    assert s.at(0.8) == pytest.approx((True, 0.1, 0.05))
    assert s.at(0.81)[0] is False and s.at(1.0)[0] is False
    plain = AuxSchedule(lambda_max=0.1, eps_end=0.04)
    assert plain.at(0.5) == pytest.approx((True, 0.05, 0.03))
    assert plain.at(1.0) == pytest.approx((True, 0.1, 0.04))
    assert AuxSchedule().at(1.0) == (True, 0.0, 0.02)  # the official code: constant eps, no regulariser
    with pytest.raises(ValueError, match="progress"):
        s.at(1.5)
    with pytest.raises(ValueError, match="aux_off"):
        AuxSchedule(aux_off=2.0)


def _small(**kw):
    return CastlingVisionTransformer(**{**SMALL, **kw})


def test_model_train_eval_bit_exact_when_masks_empty():
    model = _small()
    x = torch.randn(3, 3, 32, 32)
    y_train = model.train()(x)
    stats = model.aux_stats()
    assert stats["mask_density_mean"] == 0.0 and stats["certificate_max"] == 0.0
    assert torch.equal(y_train, model.eval()(x))
    _peaky(model)
    y_train = model.train()(x)
    assert model.aux_stats()["mask_density_mean"] > 0
    assert not torch.equal(y_train, model.eval()(x))


def test_model_regulariser_schedule_and_switch():
    model = _small(aux_schedule=dict(lambda_max=0.2, aux_off=0.5))
    _peaky(model)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model.set_aux_progress(0.0)
    model(x)
    loss = model.aux_loss()
    assert loss.dim() == 0 and loss.item() == 0.0  # lambda(0) = 0
    model.set_aux_progress(0.25)
    model(x)
    stats = model.aux_stats()
    assert stats["aux_lambda"] == pytest.approx(0.1)
    expected = 0.1 * sum(stats[f"blocks.{i}.kept_mass"] for i in range(2))
    loss = model.aux_loss()
    assert loss.item() == pytest.approx(expected, rel=1e-5) and loss.item() > 0
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.set_aux_progress(0.6)  # past aux_off: branch off, train == eval
    y = model(x)
    assert model.aux_loss().item() == 0.0
    assert "mask_density_mean" not in model.aux_stats() and model.aux_stats()["aux_enabled"] == 0.0
    assert torch.equal(y, model.eval()(x))
    model.train().set_aux_progress(0.25)
    model.set_aux(False)  # the master switch wins over the schedule
    model(x)
    assert model.aux_stats()["aux_enabled"] == 0.0 and model.aux_loss().item() == 0.0


def test_probe_and_switch_evaluation_on_a_tiny_dataset():
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,)))
    loader = DataLoader(data, batch_size=8)
    model = _small().train()
    res = evaluate_aux_switch(model, loader)
    assert model.training  # mode restored
    assert res["samples"] == 24 and res["certificate_max"] == 0.0
    assert res["top1_aux_on"] == res["top1_aux_off"] and res["prediction_agreement"] == 1.0
    with torch.no_grad():
        manual = sum(int((model.eval()(x).argmax(-1) == y).sum()) for x, y in loader)
    assert res["top1_aux_off"] == pytest.approx(100 * manual / 24)

    _peaky(model, 60.0)
    res = evaluate_aux_switch(model, loader)
    assert res["certificate_max"] > 0
    with torch.no_grad():  # branch on == a train-mode forward (no dropout in this model)
        on = sum(int((model.train()(x).argmax(-1) == y).sum()) for x, y in loader)
        off = sum(int((model.eval()(x).argmax(-1) == y).sum()) for x, y in loader)
    assert res["top1_aux_on"] == pytest.approx(100 * on / 24)
    assert res["top1_aux_off"] == pytest.approx(100 * off / 24)

    model.set_aux(False)
    model.eval()
    before = model.aux_stats()
    stats = probe_aux(model, data.tensors[0][:8])  # works with the switch off, in eval mode
    assert stats["certificate_max"] > 0 and set(stats) > {f"blocks.{i}.row_mass" for i in range(2)}
    assert not model.training and model.aux_stats() == before


# ---- timm surface, parameter counts, warm start --------------------------------------------------
def _count(name):
    with torch.device("meta"):  # shapes only: no allocation, no init
        return sum(p.numel() for p in timm.create_model(name).parameters())


def test_param_counts():
    tiny = _count("castling_deit_tiny")
    assert tiny == _count("deit_tiny_patch16_224") + 12 * 3 * 9 == 5_717_740
    assert abs(tiny / 5.6e6 - 1) < 0.03  # paper (QT-ViT Tab. 1): 5.6M
    assert _count("castling_deit_small") == _count("deit_small_patch16_224") + 12 * 6 * 9 == 22_051_312
    base = _count("castling_deit_base")
    assert base == _count("deit_base_patch16_224") + 12 * 12 * 9 == 86_568_952
    assert abs(base / 87.2e6 - 1) < 0.01  # paper: 87.2M


def test_macs_match_the_spec_count():
    """Spec §1.4: per layer the softmax core (2·N²·C MACs) becomes 2·N·C·d, plus the k=9 conv (9·N·C)."""
    from vigla.bench.flops import count_model_flops

    def macs(name):
        with torch.device("meta"):
            model = timm.create_model(name)
        return count_model_flops(model, 224)["macs"]

    n, c, d = 197, 192, 64
    castling, deit = macs("castling_deit_tiny"), macs("deit_tiny_patch16_224")
    assert castling == deit - 12 * 2 * n * n * c + 12 * (2 * n * c * d + 9 * n * c) == 1_137_033_984
    assert abs(castling / 1.18e9 - 1) < 0.05  # QT-ViT Tab. 1 quotes 1.18G


@pytest.mark.parametrize("dw_mode", ["seq1d", "2d"])
def test_timm_forward_surface(dw_mode):
    kw = dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=2, dw_mode=dw_mode)
    model = timm.create_model("castling_deit_tiny", **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 65, 48)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    final, inter = model.forward_intermediates(x, indices=[0, 2])
    assert [t.shape for t in inter] == [(2, 48, 8, 8)] * 2
    torch.testing.assert_close(final, feats)
    fo = timm.create_model("castling_deit_tiny", features_only=True, out_indices=(1, 2), **kw)
    assert [t.shape for t in fo(x)] == [(2, 48, 8, 8)] * 2
    dyn = timm.create_model("castling_deit_tiny", dynamic_img_size=True, **kw).eval()
    dyn.load_state_dict(model.state_dict())
    torch.testing.assert_close(dyn(x), model(x))
    y = dyn(torch.randn(2, 3, 24, 40))  # a 6x10 grid
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
    if dw_mode == "2d":
        assert dyn.blocks[0].attn.grid_size == (6, 10)
    y_plain = model.train()(x)
    model.set_grad_checkpointing(True)
    y_ckpt = model(x)
    torch.testing.assert_close(y_ckpt, y_plain)
    y_ckpt.sum().backward()
    assert model.blocks[0].attn.dconv.weight.grad is not None
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


def test_deit_warm_start(caplog, tmp_path):
    deit = timm.create_model("deit_tiny_patch16_224")
    model = timm.create_model("castling_deit_tiny")
    dconv_init = model.blocks[3].attn.dconv.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="vigla.models.castling"):
        new = load_deit_weights(model, deit.state_dict())
    assert new == [f"blocks.{i}.attn.dconv.weight" for i in range(12)]
    assert "blocks.11.attn.dconv.weight" in caplog.text
    own, ref = model.state_dict(), deit.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ref.items())
    assert torch.equal(own["blocks.3.attn.dconv.weight"], dconv_init)

    # the timm pretrained path (build_model_with_cfg -> checkpoint_filter_fn), with a resampled pos_embed
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": ref}, path)
    loaded = timm.create_model("castling_deit_tiny", pretrained=True, img_size=64,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(loaded.blocks[5].attn.qkv.weight, ref["blocks.5.attn.qkv.weight"])
    assert loaded.pos_embed.shape == (1, 17, 192)

    with pytest.raises(KeyError, match="qkv_bias=True"):
        with torch.device("meta"):
            no_bias = timm.create_model("castling_deit_tiny", qkv_bias=False)
        load_deit_weights(no_bias, ref)
    with pytest.raises(KeyError, match="blocks.0.norm1.weight"):
        load_deit_weights(model, {k: v for k, v in ref.items() if k != "blocks.0.norm1.weight"})


@pytest.mark.slow  # ~5 s alone, up to ~20 s on a loaded 2-core machine (five model builds)
@pytest.mark.filterwarnings("ignore:LinearAngularAttention. aux_eps")  # 5 tokens at 32x32: eps < 1/N
def test_gpu_benchmark_script_smoke_on_cpu(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import gpu_castling
    finally:
        sys.path.pop(0)
    assert gpu_castling.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "castling_vs_deit_tiny.json").read_text())
    part = {p: [r for r in result["rows"] if r["part"] == p] for p in ("infer", "ratio", "train", "mixer")}
    assert {r["model"] for r in part["infer"]} == {"deit_tiny_patch16_224", "castling_deit_tiny"}
    assert all(r["infer"]["status"] == "ok" for r in part["infer"])
    assert part["ratio"][0]["speed_ratio"] > 0
    assert [r["label"] for r in part["train"]] == ["deit", "castling_aux_off", "castling_aux_on"]
    assert all(r["finite"] and r["rel_err"] < 1e-2 for r in part["mixer"])
    assert result["git"]["commit"] and result["command"] and result["complete"] is True
