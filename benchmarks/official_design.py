"""Plain ViG as the official code composes it, against vigla's, on one GPU in one run: "vigla ÷ official design".

    python benchmarks/official_design.py --img-size 224 512 --out benchmarks/results
    python -m benchmarks fla official      # the same through the runner (installs the fla-core wheel of .whl/)

The official block (hustvl/ViG, models/vig.py, the training path): fla's RMSNorm with the residual add fused
(``prenorm``), the depthwise conv as ``nn.Conv2d`` on NCHW then SiLU, q/k/v, the low-rank decay projection and
the mix gate as separate ``nn.Linear`` layers, ``logsigmoid / 16`` as its own op, BiGLA as fla's causal
``chunk_gla`` on ``[x; flip(x)]`` (what the official code trains with: its merged inference kernel is Triton
2.x code that modern Triton does not run), fla RMSNorms on the output and the local branch, the mix, SiLU,
the output projection, and fla's ``swiglu_linear`` MLP. :class:`OfficialViG` runs that composition on the
parameters of a vigla ViG model (shared, not copied): the same weights, so the two agree to bf16 rounding
(checked here on every run). Without fla (the CPU) each fla call is its PyTorch formula, which the CPU tests
use to check the composition against vigla's model in float64.

Timing: eager inference (``inference_mode``, bf16 autocast) and eager training steps (forward, backward,
no optimizer) of both models, alternated window by window (``--rounds``), medians of CUDA-event-timed calls;
the ratio is taken per round and its median reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import vigla  # noqa: E402,F401
from vigla.bench.measure import make_input, summarize, time_calls  # noqa: E402
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.ops.bigla import HAS_FLA, bigla_fla, bigla_naive  # noqa: E402

if HAS_FLA:
    from fla.modules.activations import swiglu_linear
    from fla.modules.layernorm import rms_norm as fla_rms_norm


def _fla(x: torch.Tensor) -> bool:
    return HAS_FLA and x.is_cuda


def rms_norm(x, weight, eps, residual=None):
    """fla's ``rms_norm(x, weight, None, residual, eps, prenorm=True)``: ``(norm(x + residual), x + residual)``."""
    if _fla(x):
        return fla_rms_norm(x, weight, None, residual, eps, prenorm=True)
    s = x if residual is None else x + residual
    return F.rms_norm(s, weight.shape, weight.to(s.dtype), eps), s


def swiglu_down(a, b, w):
    """fla's ``swiglu_linear(a, b, w, None)``: ``(SiLU(a) * b) @ w^T``."""
    return swiglu_linear(a, b, w, None) if _fla(a) else F.linear(F.silu(a) * b, w)


def bigla(q, k, v, log_gf, log_gb, scale):
    """``[B, T, H, V]``: fla's ``chunk_gla`` on ``[x; flip(x)]`` on CUDA, the recurrence elsewhere."""
    if _fla(q):
        return bigla_fla(q, k, v, log_gf, log_gb, scale)
    return bigla_naive(q, k, v, log_gf, log_gb, scale)


class OfficialViG(nn.Module):
    """A vigla plain-ViG model (``vig_tiny`` / ``vig_small`` / ``vig_base``) run as the official code composes its
    blocks (module docstring); its stem, position embedding, final norm and head are the model's own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def mixer(self, m, a: torch.Tensor, hw) -> torch.Tensor:
        B, N, C = a.shape
        x_c = F.conv2d(a.transpose(1, 2).reshape(B, C, *hw), m.dwconv.weight.to(a.dtype), padding=1, groups=C)
        x_c = x_c.flatten(2).transpose(1, 2)
        if m.conv_act:
            x_c = F.silu(x_c)
        h, dk, dv = m.num_heads, m.head_k, m.head_v
        q, k, v = m.qkv(x_c).split([m.key_dim, m.key_dim, C], dim=-1)
        gf, gb = (F.logsigmoid(g.float()) / m.gate_logit_normalizer
                  for g in m.decay_up(m.decay_down(x_c)).chunk(2, dim=-1))
        heads = lambda t, d: t.reshape(B, N, h, d)  # noqa: E731
        o = bigla(heads(q, dk), heads(k, dk), heads(v, dv), heads(gf, dk), heads(gb, dk), dk ** -0.5)
        o_n, _ = rms_norm(o, m.norm_out.weight, m.norm_out.eps)
        l_n, _ = rms_norm(heads(x_c, dv), m.norm_local.weight, m.norm_local.eps)
        g = torch.sigmoid(m.mix_gate(x_c)).reshape(B, N, h, dv)
        y = (g * o_n + (1 - g) * l_n).reshape(B, N, C)
        return m.proj(F.silu(y) if m.out_act else y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> logits, as the wrapped model's ``forward``."""
        model = self.model
        hidden, hw = model._embed(x)
        residual = None
        for blk in model.blocks:
            a, residual = rms_norm(hidden, blk.norm1.weight, blk.norm1.eps, residual)
            hidden = self.mixer(blk.attn, a, hw)
            a, residual = rms_norm(hidden, blk.norm2.weight, blk.norm2.eps, residual)
            u = F.linear(a, blk.mlp.fc1.weight)
            hidden = swiglu_down(*u.chunk(2, dim=-1), blk.mlp.fc2.weight)
        return model.forward_head(model.norm(hidden + residual))


def _time(fn, device, warmup: int, iters: int, batch: int) -> float:
    times, _ = time_calls(fn, device, warmup, iters)
    return summarize(times, batch)["median_ms"]


def measure(name: str, img: int, batch: int, rounds: int, iters: int) -> dict:
    from timm import create_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    ours = create_model(name, img_size=img).to(device)
    official = OfficialViG(ours)
    x = make_input(batch, img, device, channels_last=False)
    labels = torch.randint(0, 1000, (batch,), device=device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours.eval()
        a, b = ours(x).float(), official(x).float()
    rel = ((a - b).norm() / b.norm()).item()

    def infer(model):
        def call():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)
        return call

    def train(model):
        def call():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), labels)
            loss.backward()
            for p in ours.parameters():
                p.grad = None
        return call

    row = dict(model=name, img_size=img, batch_size=batch, logits_rel_diff_bf16=rel)
    for phase, make, mode in (("inference", infer, ours.eval), ("train", train, ours.train)):
        mode()
        ratios, t_ours, t_off = [], [], []
        for _ in range(rounds):
            t_ours.append(_time(make(ours), device, 3, iters, batch))
            t_off.append(_time(make(official), device, 3, iters, batch))
            ratios.append(t_off[-1] / t_ours[-1])
        row[f"{phase}_vigla_ms"] = statistics.median(t_ours)
        row[f"{phase}_official_ms"] = statistics.median(t_off)
        row[f"{phase}_official_over_vigla"] = statistics.median(ratios)
        row[f"{phase}_rounds"] = ratios
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vig_tiny"],
                    help="plain ViG models (vig_tiny, vig_small, vig_base)")
    ap.add_argument("--img-size", nargs="+", type=int, default=[224, 512])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="alternating windows per phase")
    ap.add_argument("--iters", type=int, default=10, help="timed calls per window")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--name", default="fla_official_design")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and HAS_FLA):
        print("official_design.py needs a CUDA GPU and fla-core (pip install fla-core)", file=sys.stderr)
        return 2
    out = envelope(torch.device("cuda"), dict(models=args.models, img_size=args.img_size, batch_size=args.batch_size,
                                              rounds=args.rounds, iters=args.iters, amp="bf16"))
    print(f"{'model':10s} {'img':>5s} {'infer vigla':>12s} {'official':>9s} {'x':>5s} {'train vigla':>12s} "
          f"{'official':>9s} {'x':>5s} {'logits diff':>11s}")
    for name in args.models:
        for img in args.img_size:
            r = measure(name, img, args.batch_size, args.rounds, args.iters)
            out["rows"].append(r)
            print(f"{name:10s} {img:5d} {r['inference_vigla_ms']:12.2f} {r['inference_official_ms']:9.2f} "
                  f"{r['inference_official_over_vigla']:5.2f} {r['train_vigla_ms']:12.2f} "
                  f"{r['train_official_ms']:9.2f} {r['train_official_over_vigla']:5.2f} "
                  f"{r['logits_rel_diff_bf16']:11.1e}", flush=True)
    print(f"wrote {save_complete(out, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
