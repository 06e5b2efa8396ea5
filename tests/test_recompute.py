"""vigla.ops.recompute: selective activation checkpointing that keeps BiGLA's outputs."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import vigla  # noqa: F401  (registers the models)
from vigla.ops import bigla_gated
from vigla.ops.recompute import recompute


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _layer(dim=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.GELU(), torch.nn.Dropout(0.3),
                               torch.nn.Linear(16, dim)).double()


def _grads(fn, x, params, dy):
    y = fn(x)
    return y, torch.autograd.grad(y, [x, *params], dy)


def test_recompute_is_exact_with_dropout():
    """Same output and gradients as the plain call (dropout draws replayed)."""
    layer = _layer()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 8, dtype=torch.float64)
    params = list(layer.parameters())
    torch.manual_seed(5)
    y_ref, g_ref = _grads(layer, x, params, dy)
    torch.manual_seed(5)
    y, g = _grads(lambda t: recompute(layer, t), x, params, dy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_recompute_cpu_autocast_and_frozen_parameters():
    """The backward replays under the forward's autocast; parameters without gradients get none."""
    layer = _layer().float().eval()
    layer[0].weight.requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # its own region, as in a training step
        y = recompute(layer, x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    dy = torch.randn_like(y)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(y_ref, [x, *trainable], dy)
    g = torch.autograd.grad(y, [x, *trainable], dy, retain_graph=True)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    y.backward(dy)  # the frozen weight gets no gradient
    assert layer[0].weight.grad is None and layer[3].weight.grad is not None


def test_recompute_without_grad_is_the_plain_call():
    layer = _layer()
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        y = recompute(layer.eval(), x)
    assert y.grad_fn is None
    torch.testing.assert_close(y, layer(x))


def test_bigla_output_is_kept_not_recomputed(monkeypatch):
    """Inside recompute, BiGLA's forward runs once; the recomputation takes the kept output and
    the gradients equal the plain call's (float64, CPU reference op)."""
    from vigla.ops.bigla import op as bigla_op

    calls = []
    forward = bigla_op.bigla_forward
    monkeypatch.setattr(bigla_op, "bigla_forward", lambda *a: calls.append(1) or forward(*a))
    torch.manual_seed(0)
    B, T, H, K, V = 2, 19, 2, 4, 6
    x = torch.randn(B, T, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, H * (4 * K + V), dtype=torch.float64, requires_grad=True)
    runs = []

    def fn(t):
        runs.append(1)
        q, k, zf, zb, v = (t @ w).split([H * K] * 4 + [H * V], -1)
        heads = [s.unflatten(-1, (H, -1)) for s in (q, k, v, zf, zb)]
        return bigla_gated(*heads, 16.0).square()

    dy = torch.randn(B, T, H, V, dtype=torch.float64)
    y_ref, g_ref = _grads(fn, x, [w], dy)
    assert len(calls) == 1
    y, g = _grads(lambda t: recompute(fn, t), x, [w], dy)
    assert len(calls) == 2 and len(runs) == 3  # fn ran again in the backward, BiGLA did not
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vig_tiny", "vig_h_tiny"])
def test_grad_checkpointing_on_gpu_matches(name):
    """CUDA, fused kernels, bf16 autocast, drop path on: checkpointed training gives the plain
    run's loss and gradients (same kernels, same draws) and keeps far less for the backward
    (memory held between the forward and the backward)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.1).cuda().train()
    x = torch.randn(8, 3, 224, 224, device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), torch.arange(8, device="cuda") % 10)
        kept = torch.cuda.memory_allocated() - before
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]), kept

    loss_ref, g_ref, kept_ref = run()
    model.set_grad_checkpointing(True)
    loss, g, kept = run()
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    assert rel(g, g_ref) < 1e-2
    assert kept < 0.6 * kept_ref, f"kept for the backward: {kept / 2**20:.0f} MiB vs {kept_ref / 2**20:.0f} MiB"
