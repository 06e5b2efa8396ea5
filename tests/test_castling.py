"""Castling-ViT (You et al., CVPR 2023): linear-angular kernel, mixer, auxiliary branch and its blockwise op, models,
the branch's schedule in vigla train, and the switch guard of vigla eval / vigla export."""
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
from timm.models import register_model
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
from vigla.notices import ViglaWarning
from vigla.ops.linear_angular import (
    linear_angular_z,
    linear_angular_z_quadratic,
    masked_softmax_aux,
    masked_softmax_aux_quadratic,
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
    # the series' checkpoints: a_1 = 1/6, |R| <= 1/2 - 1/pi, reached at c = ±1, R(0.3) ~ 0.0015
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
    q, k, v = _qkv(b=1, h=2, n=16, d=8, dtype=torch.float64)
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


@pytest.mark.parametrize("shape,block", [((2, 3, 37, 8, 5), 7), ((1, 2, 50, 16, 16), 256), ((2, 1, 33, 4, 6), 1),
                                         ((1, 2, 64, 8, 8), 16)])
@pytest.mark.parametrize("mask", ["partial", "empty", "full"])
def test_blockwise_masked_softmax_matches_quadratic_float64(shape, block, mask):
    """Outputs and gradients (through both S·V and the row mass) of the blockwise op against the [N, N]
    reference, float64, N not a multiple of the block (and N < block, block = 1); masks partial, empty
    (threshold above every P) and full (threshold below 0)."""
    b, h, n, d, dv = shape
    gen = torch.Generator().manual_seed(n * block)
    q, k = (3.0 * torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=gen, dtype=torch.float64)
    threshold = {"partial": 0.05, "empty": 1.0, "full": -1.0}[mask]
    grads_out = (torch.randn(b, h, n, dv, generator=gen, dtype=torch.float64),
                 torch.randn(b, h, n, generator=gen, dtype=torch.float64))
    results = []
    for fn, kw in ((masked_softmax_aux, dict(block_size=block)), (masked_softmax_aux_quadratic, {})):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        aux = fn(*leaves, threshold, **kw)
        loss = (aux.sv * grads_out[0]).sum() + (aux.row_mass * grads_out[1]).sum()
        results.append((aux, torch.autograd.grad(loss, leaves)))
    (blk, blk_grads), (ref, ref_grads) = results
    expected_density = {"empty": 0.0, "full": 1.0}.get(mask)
    assert blk.density.item() == ref.density.item()
    if expected_density is not None:
        assert blk.density.item() == expected_density
    else:
        assert 0 < blk.density.item() < 1
    torch.testing.assert_close(blk.sv, ref.sv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blk.row_mass, ref.row_mass, rtol=1e-12, atol=1e-12)
    for got, want in zip(blk_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if mask == "empty":
        assert (blk.sv == 0).all() and all((g == 0).all() for g in blk_grads)


def test_blockwise_masked_softmax_dtypes_and_input_checks():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(n=40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        aux = masked_softmax_aux(3 * q, 3 * k, v, 0.02, block_size=16)
    ref = masked_softmax_aux_quadratic((3 * q).double(), (3 * k).double(), v.double(), 0.02)
    assert aux.sv.dtype == aux.row_mass.dtype == torch.float32  # computed in fp32 whatever the input
    assert _rel(aux.sv, ref.sv) < 1e-5
    with pytest.raises(ValueError, match="block_size"):
        masked_softmax_aux(q, k, v, 0.02, block_size=0)
    with pytest.raises(ValueError, match="same B, H, N"):
        masked_softmax_aux(q, k[:, :, :5], v, 0.02)


def test_blockwise_masked_softmax_traces_whole_under_torch_compile(one_thread):
    """torch.compile (the compile suite trains Castling with the branch on) captures the autograd.Function in one
    graph, forward and backward, with the eager results."""
    def branch(q, k, v):
        aux = masked_softmax_aux(q, k, v, 0.02, block_size=16)
        return aux.sv.square().sum() + aux.row_mass.sum() + aux.density

    q, k, v = (3 * torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    eager = branch(q, k, v)
    compiled = torch.compile(branch, backend="aot_eager", fullgraph=True)(q, k, v)
    assert compiled.item() == eager.item()
    for got, want in zip(torch.autograd.grad(compiled, (q, k, v)), torch.autograd.grad(eager, (q, k, v))):
        assert torch.equal(got, want)


_AUX_MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, sys, torch
    from vigla.ops.linear_angular import masked_softmax_aux, masked_softmax_aux_quadratic

    def peak_kib():  # the process's resident-set high-water mark
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    torch.set_num_threads(1)
    fn = masked_softmax_aux if sys.argv[1] == "blockwise" else masked_softmax_aux_quadratic
    out = {}
    for n in (256, 1024, 4096):  # the first one only warms up
        q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        before = peak_kib()
        aux = fn(q, k, v, 0.02)
        (aux.sv.square().sum() + aux.row_mass.sum()).backward()
        out[n] = (peak_kib() - before) * 1024
        del q, k, v, aux
    print(json.dumps(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the RSS high-water mark from /proc")
def test_blockwise_masked_softmax_memory_is_linear_in_tokens():
    """Peak RSS growth of one forward + backward of the branch (fresh process, 2 heads, d = 16) at N = 1024 and
    4096: the [N, N] reference grows ~16x (546 MiB at 4096: its fp32 maps are 128 MiB each), the blockwise op
    ~4x (37 MiB at 4096: a few [B, H, N, 256] blocks) and stays under half of one map."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    peaks = {}
    for impl in ("blockwise", "quadratic"):
        res = subprocess.run([sys.executable, "-c", _AUX_MEMORY_SCRIPT, impl], capture_output=True, text=True,
                             timeout=120, env=env)
        assert res.returncode == 0, res.stderr
        peaks[impl] = json.loads(res.stdout.strip().splitlines()[-1])
    one_map = 2 * 4096 * 4096 * 4
    blockwise, quadratic = peaks["blockwise"], peaks["quadratic"]
    assert quadratic["4096"] > 2 * one_map and quadratic["4096"] / quadratic["1024"] > 10, peaks
    assert 0 < blockwise["4096"] < one_map / 2 and blockwise["4096"] / blockwise["1024"] < 6, peaks


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


def test_aux_eps_warning_names_each_setting_and_the_line_that_called_the_model():
    """The aux_eps warning named aux_eps alone, which `vigla train` has not (its setting is --castling-schedule
    eps=...), and its fixed stacklevel named a line of torch's Module.__call__. It names the layer's argument, the
    model's and the command's, with a threshold not below 1/N_keys that silences it, and the line of the test that
    called the model, through timm's blocks, torch's calls and a gradient-checkpointing recompute."""
    import linecache

    kw = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    x = torch.randn(1, 3, 32, 32)  # 4 patches and the class token: 1/N_keys = 1/5 > the default eps 0.02
    for checkpointing in (False, True):
        model = timm.create_model("castling_deit_tiny", **kw).train()  # each layer warns once (the recompute not)
        model.set_grad_checkpointing(checkpointing)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(x).sum().backward()
        assert len(caught) == 2 and all(w.category is ViglaWarning for w in caught)
        text = str(caught[0].message)
        assert text.startswith("LinearAngularAttention: aux_eps=0.02 < 1/N_keys = 1/5: every softmax row keeps")
        assert text.endswith("Set aux_eps >= 0.2, e.g. 2/N_keys (a Castling model: aux_schedule='eps=0.2'; vigla "
                             "train: --castling-schedule eps=0.2), or switch the branch off for this layer (vigla "
                             "train: --castling-schedule none).") and "\n" not in text
        assert {(w.filename, linecache.getline(w.filename, w.lineno).strip()) for w in caught} == \
            {(__file__, "model(x).sum().backward()")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        timm.create_model("castling_deit_tiny", aux_schedule="eps=0.2", **kw).train()(x)
    mixer = LinearAngularAttention(32, num_heads=2, aux=True, aux_eps=0.02).train()
    with pytest.warns(ViglaWarning, match=r"Set aux_eps >= 0\.0213, .* --castling-schedule eps=0\.0213\)") as got:
        mixer(torch.randn(1, 47, 32))  # 1/47 = 0.021277: rounded up, not to 0.02128
    assert got[0].filename == __file__
    mixer.aux_eps = 0.0213
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixer(torch.randn(1, 47, 32))


def test_aux_eps_warning_suggests_only_a_threshold_the_schedule_takes():
    """With one key the warning suggested aux_eps >= 1 (and with two, 2/N_keys = 1), which AuxSchedule refuses (eps
    below 1): every threshold it suggests is one that the schedule takes and that is not below 1/N_keys; with one key,
    where no threshold can empty the mask (its softmax entry is 1), it says so and suggests none."""
    import re

    def message(n_keys):
        mixer = LinearAngularAttention(32, num_heads=2, aux=True, aux_eps=0.0).train()
        with pytest.warns(ViglaWarning) as got:
            mixer(torch.randn(1, n_keys, 32))
        return str(got[0].message)

    one = message(1)
    assert "No aux_eps can empty a row of one key" in one and "Set aux_eps" not in one
    assert "aux_schedule=" not in one and "--castling-schedule eps" not in one
    assert "--castling-schedule none" in one
    assert "2/N_keys" not in message(2)
    for n_keys in (2, 3, 7, 47, 196, 1000):
        eps = float(re.search(r"--castling-schedule eps=([0-9.e-]+)\)", message(n_keys))[1])
        assert 1 / n_keys <= eps == AuxSchedule(eps=eps).eps < 1  # AuxSchedule raises for one it refuses


def test_aux_eps_warning_is_made_once_per_layer_and_number_of_keys(monkeypatch):
    """The warning was formatted, and the stack walked for the caller's line, in every training forward while aux_eps
    stayed below 1/N_keys (Python's filter then dropped the repeats): each layer makes it once per N_keys, an eps
    schedule's ramp (a new aux_eps every step) included, and it is still shown once."""
    import vigla.layers.linear_angular as mixer_module

    walks = []
    monkeypatch.setattr(mixer_module, "caller_stacklevel", lambda: walks.append(1) or 4)
    mixer = LinearAngularAttention(32, num_heads=2, aux=True, aux_eps=0.02).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            mixer.aux_eps = 0.02 + 0.001 * step
            mixer(torch.randn(1, 20, 32))
        assert len(walks) == len(caught) == 1 and "1/N_keys = 1/20" in str(caught[0].message)
        mixer(torch.randn(1, 10, 32))  # another number of keys: told once more
        mixer(torch.randn(1, 10, 32))
    assert len(walks) == len(caught) == 2 and "1/N_keys = 1/10" in str(caught[1].message)


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


def test_macs_match_the_linear_order_count():
    """Per layer the softmax core (2·N²·C MACs) becomes 2·N·C·d, plus the k=9 conv (9·N·C)."""
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
    headless = timm.create_model("castling_deit_tiny", pretrained=True, img_size=64, num_classes=0,
                                 pretrained_cfg_overlay=dict(file=str(path)))  # the checkpoint's head not used
    assert isinstance(headless.head, torch.nn.Identity)
    assert torch.equal(headless.blocks[5].attn.qkv.weight, ref["blocks.5.attn.qkv.weight"])

    with pytest.raises(KeyError, match="qkv_bias=True"):
        with torch.device("meta"):
            no_bias = timm.create_model("castling_deit_tiny", qkv_bias=False)
        load_deit_weights(no_bias, ref)
    with pytest.raises(KeyError, match="blocks.0.norm1.weight"):
        load_deit_weights(model, {k: v for k, v in ref.items() if k != "blocks.0.norm1.weight"})


@pytest.mark.slow  # ~10 s alone, up to ~40 s on a loaded 2-core machine (model builds at two sizes)
@pytest.mark.filterwarnings("ignore:LinearAngularAttention. aux_eps")  # 5 tokens at 32x32: eps < 1/N
def test_gpu_benchmark_script_smoke_on_cpu(tmp_path):
    gpu_castling = _gpu_castling()
    assert gpu_castling.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "castling_vs_deit_tiny.json").read_text())
    part = {p: [r for r in result["rows"] if r["part"] == p] for p in ("infer", "ratio", "train", "mixer")}
    assert {r["model"] for r in part["infer"]} == {"deit_tiny_patch16_224", "castling_deit_tiny"}
    assert all(r["infer"]["status"] == "ok" for r in part["infer"])
    assert part["ratio"][0]["speed_ratio"] > 0
    arms = ["deit", "castling_aux_off", "castling_aux_on", "castling_aux_on_quadratic"]
    assert [(r["label"], r["img_size"]) for r in part["train"]] == [(a, s) for s in (32, 64) for a in arms]
    assert all(r["train"]["status"] == "ok" for r in part["train"])
    assert all(r["finite"] and r["rel_err"] < 1e-2 for r in part["mixer"])
    assert result["git"]["commit"] and result["command"] and result["complete"] is True
    assert gpu_castling.mixer_module.masked_softmax_aux is masked_softmax_aux  # the quadratic arm restored it


def _gpu_castling():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import gpu_castling
    finally:
        sys.path.pop(0)
    return gpu_castling


@pytest.mark.slow  # two vigla train / vigla eval subprocesses of Castling-DeiT-T at 32 px
def test_gpu_benchmark_imagenette_part_smoke_on_cpu(tmp_path):
    from test_data import write_folder

    for split, n in (("train", 6), ("val", 2)):
        write_folder(str(tmp_path / "inette" / split), ["n0", "n1", "n2"], per_class=n, size=40)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "benchmarks/gpu_castling.py", "--device", "cpu", "--parts", "imagenette", "--imagenette",
            str(tmp_path / "inette"), "--epochs", "2", "--warmup-epochs", "0", "--img", "32", "--batch", "6",
            "--workers", "0", "--out", str(out)]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for model, extra in (("castling_deit_tiny", ["--extra", "--castling-schedule", "paper,aux_off=0.5"]),
                         ("deit_tiny_patch16_224", [])):
        name = f"castling_imagenette_{model.split('_')[0]}"
        proc = subprocess.run(base + ["--model", model, "--name", name, *extra], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = json.loads((out / "castling_imagenette_castling.json").read_text())["rows"][0]
    assert row["part"] == "imagenette" and row["epochs_done"] == 2
    assert [e["img_size"] for e in row["eval"]] == [32, 64, 128]
    switch = row["switch"]  # 6 steps, off after 3: on in epoch 1, off in epoch 2
    assert switch["switch"]["epoch"] == 1 and switch["after_switch"]["epoch"] == 2 and switch["end"]["epoch"] == 2
    assert switch["switch"]["top1_on"] == pytest.approx(float(row["epochs"][0]["val_top1_aux_on"]))
    page = (out / "castling_imagenette_deit.md").read_text().splitlines()
    assert page[0].startswith("`castling_imagenette_castling.json` (") and "`castling_imagenette_deit.json`" in page[0]
    assert len(page) == 6 and page[4].startswith("| castling_deit_tiny | 2 | ") and "(epoch 1, density" in page[4]
    assert page[5].startswith("| deit_tiny_patch16_224 | 2 | - | - | ")


# ---- the schedule's presets and specs ----------------------------------------------------------------
def test_schedule_presets_and_specs():
    from vigla.models.castling import OFFICIAL_SCHEDULE, PAPER_SCHEDULE, format_aux_schedule, parse_aux_schedule

    assert _small().aux_schedule == PAPER_SCHEDULE  # castling models follow the paper by default
    assert PAPER_SCHEDULE.lambda_max > 0 and PAPER_SCHEDULE.aux_off is not None and PAPER_SCHEDULE.aux_off < 1
    assert OFFICIAL_SCHEDULE == AuxSchedule() == parse_aux_schedule("official") == _small(
        aux_schedule="official").aux_schedule
    assert parse_aux_schedule("paper") == PAPER_SCHEDULE
    assert parse_aux_schedule("paper, aux_off=0.9") == AuxSchedule(PAPER_SCHEDULE.lambda_max, 0.02, None, 0.9)
    assert parse_aux_schedule("lambda=0.05,eps_end=0.04") == AuxSchedule(0.05, 0.02, 0.04, PAPER_SCHEDULE.aux_off)
    assert parse_aux_schedule("official,aux_off=none,lambda=0") == OFFICIAL_SCHEDULE
    for schedule in (PAPER_SCHEDULE, OFFICIAL_SCHEDULE, AuxSchedule(0.123456789, 1 / 3, 0.05, 0.7)):
        assert parse_aux_schedule(format_aux_schedule(schedule)) == schedule
    for bad, match in (("bogus", "unknown Castling schedule 'bogus'"), ("paper,lambda", "expected key=value"),
                       ("lambda", "or key=value items"),
                       ("paper,official", "preset name may only come first"), ("eps=abc", "not a number"),
                       ("lambda=none", "not a number"), ("", "empty"), ("aux_off=2", "aux_off must be")):
        with pytest.raises(ValueError, match=match):
            parse_aux_schedule(bad)


# ---- vigla train / eval / export with a Castling model ------------------------------------------------
if not timm.is_model("castling_test_micro"):
    @register_model
    def castling_test_micro(pretrained=False, **kwargs):  # kwargs: the model's and timm's cfg plumbing
        """One block, C 32, 2 heads; 32 px in 4 px patches: 65 tokens, so ε = 0.02 > 1/65 (the mask can empty)."""
        own = {k: v for k, v in kwargs.items()
               if k in ("num_classes", "img_size", "drop_path_rate", "aux", "aux_schedule", "dynamic_img_size")}
        model = CastlingVisionTransformer(**{**dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                                    qkv_bias=True), **own})
        model.pretrained_cfg = dict(first_conv="patch_embed.proj", classifier="head", input_size=(3, 32, 32))
        return model


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    from test_data import write_fake_fmnist

    return write_fake_fmnist(str(tmp_path_factory.mktemp("fmnist")), n_train=80, n_test=24)


def _train(fmnist, out, *flags, model="castling_test_micro"):
    from vigla import cli

    argv = ["train", "--model", model, "--fmnist-dir", fmnist, "--img-size", "32", "--epochs", "3",
            "--batch-size", "8", "--train-subset", "32", "--val-subset", "16", "--test-subset", "16", "--workers", "0",
            "--log-interval", "2", "--lr", "2e-3", "--warmup-epochs", "0.5", "--out", str(out), *flags]
    return cli.main(argv)


def test_train_reports_both_modes_while_the_branch_is_on(fmnist, tmp_path, one_thread):
    import csv

    from vigla.engine.checkpoint import read_meta

    # the paper's schedule, switched off after 40% of the 12 steps: on in the last steps of epoch 1 only
    assert _train(fmnist, tmp_path / "run", "--castling-schedule", "paper,aux_off=0.4,lambda=0.5") == 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "castling_schedule: lambda=0.5,eps=0.02,eps_end=none,aux_off=0.4" in config  # resolved, resumable
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(r["aux_aux_enabled"]) for r in rows] == [1.0, 0.0, 0.0]
    first = rows[0]
    assert float(first["val_top1_aux_off"]) == float(first["val_top1"])
    assert float(first["val_aux_gap"]) == pytest.approx(float(first["val_top1_aux_on"]) - float(first["val_top1"]))
    assert 0 <= float(first["val_aux_mask_density"]) <= 1 and 0 <= float(first["val_aux_kept_mass"]) <= 1
    assert all(math.isnan(float(r["val_top1_aux_on"])) for r in rows[1:])  # measured only while on
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    last = read_meta(str(tmp_path / "run" / "last.safetensors"))
    assert last["castling"]["aux_on"] is False and last["castling"]["schedule"]["aux_off"] == 0.4
    assert last["model_args"]["aux_schedule"] == dict(lambda_max=0.5, eps=0.02, eps_end=None, aux_off=0.4)


def test_train_schedule_flag_errors(fmnist, tmp_path, capsys):
    assert _train(fmnist, tmp_path / "a", "--castling-schedule", "paper,lambda=x") == 2
    assert "--castling-schedule 'paper,lambda=x': bad Castling schedule item 'lambda=x'" in capsys.readouterr().err
    assert _train(fmnist, tmp_path / "b", "--castling-schedule", "official", model="test_vit") == 2
    err = capsys.readouterr().err
    assert "applies to the castling_* models only, not test_vit" in err and "Traceback" not in err


def _castling_checkpoint(path, aux_on: bool, val_aux: dict | None = None, peaky: float = 0.0):
    """A vigla checkpoint of castling_test_micro as the trainer writes it, recorded with the branch on or off."""
    from test_eval import MEAN, STD

    from vigla.engine.checkpoint import save_weights

    torch.manual_seed(0)
    model = timm.create_model("castling_test_micro", num_classes=10)
    if peaky:
        _peaky(model, peaky)
    val = {"top1": 50.0, "top5": 90.0, "loss": 1.0, "images": 16}
    if val_aux is not None:
        val["aux"] = val_aux
    meta = {"model": "castling_test_micro", "model_args": {"num_classes": 10, "img_size": 32},
            "classes": [f"c{i}" for i in range(10)], "val": val, "epoch": 1, "global_step": 4,
            "castling": dict(model.aux_state(), aux_on=aux_on, progress=0.3),
            "data_config": {"mean": list(MEAN), "std": list(STD), "img_size": 32, "interpolation": "bilinear",
                            "crop_pct": 1.0}}
    save_weights(str(path), model.state_dict(), meta)
    return model


def test_eval_measures_the_gap_of_a_checkpoint_saved_with_the_branch_on(tmp_path, capsys, one_thread):
    from test_data import write_folder

    from vigla import cli

    classes = [f"c{i}" for i in range(10)]
    write_folder(str(tmp_path / "data" / "val"), classes, per_class=2, size=32)
    ckpt = tmp_path / "on.safetensors"
    model = _castling_checkpoint(ckpt, aux_on=True, peaky=60.0)
    assert cli.main(["eval", str(ckpt), "--data", str(tmp_path / "data"), "--img-size", "32", "64",
                     "--out", str(tmp_path / "on.json")]) == 0
    out = capsys.readouterr().out
    assert "was saved while Castling's auxiliary branch was still on (training progress 0.30" in out
    row = json.loads((tmp_path / "on.json").read_text())["results"][0]
    aux = row["aux_switch"]
    assert aux["measured"] and aux["top1_off"] == row["top1"] and aux["gap"] == aux["top1_on"] - aux["top1_off"]
    assert aux["mask_density"] > 0
    assert f"{aux['top1_on']:.2f}% with the branch on and {row['top1']:.2f}% off" in out
    # the same numbers as the model-level helper on the same images
    from test_eval import MEAN, STD

    from vigla.data import BatchPrep, TransformedDataset, collate, eval_transform, scan_image_folder
    ds = TransformedDataset(scan_image_folder(str(tmp_path / "data" / "val")),
                            eval_transform(32, crop_pct=1.0, interpolation="bilinear", mean=MEAN, std=STD))
    images, targets, _ = collate([ds[i] for i in range(len(ds))])
    ref = evaluate_aux_switch(model, [(BatchPrep(MEAN, STD, "cpu")(images), targets)])
    assert aux["top1_on"] == pytest.approx(ref["top1_aux_on"]) and row["top1"] == pytest.approx(ref["top1_aux_off"])

    from argparse import Namespace

    from vigla.engine.aux_branch import eval_switch_check
    assert eval_switch_check(model, {}, [], Namespace(checkpoint="x.pth", amp="off"), {}) == {}  # no vigla record
    assert capsys.readouterr().err.startswith("warning: x.pth does not record whether Castling's auxiliary branch")

    off = tmp_path / "off.safetensors"
    _castling_checkpoint(off, aux_on=False, peaky=60.0)
    assert cli.main(["eval", str(off), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "off.json")]) == 0
    assert "auxiliary branch" not in capsys.readouterr().out
    assert "aux_switch" not in json.loads((tmp_path / "off.json").read_text())["results"][0]


def test_export_notes_the_recorded_gap_or_warns(tmp_path, capsys, one_thread):
    from vigla import cli

    measured = tmp_path / "measured.safetensors"
    _castling_checkpoint(measured, aux_on=True, val_aux=dict(top1_on=56.25, top1_off=50.0, gap=6.25,
                                                             mask_density=0.031, kept_mass=0.2))
    assert cli.main(["export", str(measured), "--format", "torchscript"]) == 0
    out, err = capsys.readouterr()
    assert "top-1 56.25% with the branch on, 50.00% off (+6.25 points)" in out and "warning" not in err
    unmeasured = tmp_path / "unmeasured.safetensors"
    _castling_checkpoint(unmeasured, aux_on=True)
    assert cli.main(["export", str(unmeasured), "--format", "torchscript"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning:" in err and "was not measured" in err
    clean = tmp_path / "clean.safetensors"
    _castling_checkpoint(clean, aux_on=False)
    assert cli.main(["export", str(clean), "--format", "torchscript"]) == 0
    assert "auxiliary branch" not in "".join(capsys.readouterr())
