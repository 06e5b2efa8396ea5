"""ViG and ViG-H as the official code composes them, against vigla's, on one GPU in one run (vigla ÷ official).

    python benchmarks/official_design.py --img-size 224 512 --out benchmarks/results
    python -m benchmarks fla official       # ViG-T through the runner (installs the fla-core wheel of .whl/)
    python -m benchmarks fla official_h     # ViG-H-T (fla autotunes its kernels for every stage: minutes)

The official block (hustvl/ViG, models/vig.py, the training path): fla's RMSNorm (the second one with the
mixer's residual add fused, ``prenorm``), the depthwise conv as ``nn.Conv2d`` on NCHW then SiLU, q/k/v, the
low-rank decay projection and the mix gate as separate ``nn.Linear`` layers, ``logsigmoid / 16`` as its own op,
BiGLA as fla's causal ``chunk_gla`` on ``[x; flip(x)]`` (the official code trains with fla's
``fused_chunk_gla``, which fla now serves as ``chunk_gla``; its merged inference kernel is Triton 2.x code that
modern Triton does not run), fla RMSNorms on the output and the local branch, the mix, SiLU, the output
projection, and fla's ``swiglu_linear`` MLP. ViG-H's (models/vig_h.py, channel-first): LayerNorm2d (permute,
LayerNorm, permute) around every block branch, the stem and the downsamples, 1x1 convolutions for the
projections (but a Linear for the output projection), ``chunk_gla`` in stages 1-2 and ``fused_recurrent_gla`` in
stages 3-4 on ``[x; flip(x)]``, fla's ``swiglu`` between fc1 and fc2. :class:`OfficialViG` and
:class:`OfficialHierViG` run those compositions on the parameters of a vigla model (shared, not copied): the
same weights, so each pair agrees to bf16 rounding (checked here on every run). Without fla (the CPU) each fla
call is its PyTorch formula, which the CPU tests use to check the compositions against vigla's models in
float64.

Timing: eager inference (``inference_mode``, bf16 autocast) and eager training steps (forward, backward,
no optimizer) of both models, alternated window by window (``--rounds``), medians of CUDA-event-timed calls;
the ratio is taken per round and its median reported. The JSON is rewritten after every (model, size) row
(``complete`` once all are measured), and a line per window shows progress.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import vigla  # noqa: E402,F401
from vigla.bench.measure import make_input, summarize, time_calls  # noqa: E402
from vigla.bench.report import envelope, save_complete, write_json  # noqa: E402
from vigla.ops.bigla import HAS_FLA, bigla_fla, bigla_naive  # noqa: E402

if HAS_FLA:
    from fla.modules.activations import swiglu as fla_swiglu
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


def swiglu(a, b):
    """fla's ``swiglu(a, b)``: ``SiLU(a) * b``."""
    return fla_swiglu(a, b) if _fla(a) else F.silu(a) * b


def bigla(q, k, v, log_gf, log_gb, scale, recurrent: bool = False):
    """``[B, T, H, V]``: on CUDA fla's ``chunk_gla`` (``fused_recurrent_gla`` if ``recurrent``) on ``[x; flip(x)]``,
    the directions averaged; the recurrence elsewhere."""
    if not _fla(q):
        return bigla_naive(q, k, v, log_gf, log_gb, scale)
    return bigla_fla(q, k, v, log_gf, log_gb, scale, recurrent)


def layer_norm_2d(x, norm):
    """The official ``LayerNorm2d``: LayerNorm over the channels of ``[B, C, H, W]`` by two permutes."""
    return F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias,
                        norm.eps).permute(0, 3, 1, 2)


def conv1x1(x, layer):
    """The official ``Linear2d``: a Linear's weight as a 1x1 convolution over ``[B, C, H, W]``."""
    return F.conv2d(x, layer.weight[:, :, None, None], layer.bias)


class OfficialViG(nn.Module):
    """A vigla plain-ViG model (``vig_tiny`` / ``vig_small`` / ``vig_base``) run as the official code composes its
    blocks (module docstring); its stem, position embedding, final norm and head are the model's own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def mixer(self, m, a: torch.Tensor, hw) -> torch.Tensor:
        B, N, C = a.shape
        x_c = F.conv2d(a.transpose(1, 2).reshape(B, C, *hw), m.dwconv.weight.to(a.dtype), padding=1, groups=C)
        x_c = x_c.flatten(2).transpose(1, 2).contiguous()  # as the official code copies it
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
        for blk in model.blocks:  # the official GLABlock: the second norm fuses the first residual add
            residual = hidden
            hidden = self.mixer(blk.attn, rms_norm(hidden, blk.norm1.weight, blk.norm1.eps)[0], hw)
            a, residual = rms_norm(hidden, blk.norm2.weight, blk.norm2.eps, residual)
            u = F.linear(a, blk.mlp.fc1.weight)
            hidden = residual + swiglu_down(*u.chunk(2, dim=-1), blk.mlp.fc2.weight)
        return model.forward_head(rms_norm(hidden, model.norm.weight, model.norm.eps)[0])


class OfficialHierViG(nn.Module):
    """A vigla ViG-H model (``vig_h_tiny`` / ``_small`` / ``_base``) run as the official code composes it,
    channel-first (module docstring); its parameters are the model's own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def mixer(m, x: torch.Tensor, recurrent: bool) -> torch.Tensor:
        B, C, H, W = x.shape
        N, h, dk, dv, K = H * W, m.num_heads, m.head_k, m.head_v, m.key_dim
        xs = F.conv2d(x, m.dwconv.weight.to(x.dtype), padding=1, groups=C)
        if m.conv_act:
            xs = F.silu(xs)
        q, k, v = conv1x1(xs, m.qkv).flatten(2).split([K, K, C], dim=1)
        gf, gb = (F.logsigmoid(g) / m.gate_logit_normalizer
                  for g in conv1x1(conv1x1(xs, m.decay_down), m.decay_up).flatten(2).chunk(2, dim=1))
        heads = lambda t, d: t.reshape(B, h, d, N).permute(0, 3, 1, 2)  # noqa: E731  'b (h d) n -> b n h d'
        o = bigla(heads(q, dk), heads(k, dk), heads(v, dv), heads(gf, dk), heads(gb, dk), dk ** -0.5, recurrent)
        g = heads(torch.sigmoid(conv1x1(xs, m.mix_gate)).flatten(2), dv)
        o_n, _ = rms_norm(o, m.norm_out.weight, m.norm_out.eps)
        l_n, _ = rms_norm(heads(xs.flatten(2), dv), m.norm_local.weight, m.norm_local.eps)
        y = (o_n * g + l_n * (1 - g)).reshape(B, N, C)
        o = m.proj(F.silu(y) if m.out_act else y)
        return o.permute(0, 2, 1).reshape(B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> logits, as the wrapped model's ``forward``."""
        model, stem = self.model, self.model.stem
        x = layer_norm_2d(stem.conv2(stem.act(layer_norm_2d(stem.conv1(x), stem.norm1))), stem.norm2)
        for i, stage in enumerate(model.stages):
            if not isinstance(stage.downsample, nn.Identity):
                x = layer_norm_2d(stage.downsample.conv(x), stage.downsample.norm)
            for blk in stage.blocks:
                x = x + self.mixer(blk.attn, layer_norm_2d(x, blk.norm1), recurrent=i >= 2)
                u = conv1x1(layer_norm_2d(x, blk.norm2), blk.mlp.fc1)
                x = x + conv1x1(swiglu(*u.chunk(2, dim=1)), blk.mlp.fc2)
        return model.head(layer_norm_2d(x, model.norm).mean((2, 3)))


def official_design(model: nn.Module) -> nn.Module:
    """The official composition of a vigla ViG (:class:`OfficialViG`) or ViG-H (:class:`OfficialHierViG`)."""
    return OfficialHierViG(model) if hasattr(model, "stages") else OfficialViG(model)


def _time(fn, device, warmup: int, iters: int, batch: int) -> float:
    times, _ = time_calls(fn, device, warmup, iters)
    return summarize(times, batch)["median_ms"]


def measure(name: str, img: int, batch: int, rounds: int, iters: int, phases=("inference", "train")) -> dict:
    from timm import create_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    ours = create_model(name, img_size=img).to(device)
    official = official_design(ours)
    x = make_input(batch, img, device, channels_last=False)
    labels = torch.randint(0, 1000, (batch,), device=device)
    print(f"  {name} @{img}: first calls (fla compiles and autotunes its kernels) ({time.strftime('%H:%M:%S')})",
          flush=True)
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
        if phase not in phases:
            continue
        mode()
        ratios, t_ours, t_off = [], [], []
        for i in range(rounds):
            print(f"  {name} @{img} {phase}: window {i + 1}/{rounds} ({time.strftime('%H:%M:%S')})", flush=True)
            t_ours.append(_time(make(ours), device, 3, iters, batch))
            t_off.append(_time(make(official), device, 3, iters, batch))
            ratios.append(t_off[-1] / t_ours[-1])
        row[f"{phase}_vigla_ms"] = statistics.median(t_ours)
        row[f"{phase}_official_ms"] = statistics.median(t_off)
        row[f"{phase}_official_over_vigla"] = statistics.median(ratios)
        row[f"{phase}_rounds"] = ratios
        print(f"  {name} @{img} {phase}: vigla {row[f'{phase}_vigla_ms']:.2f} ms, "
              f"official {row[f'{phase}_official_ms']:.2f} ms, "
              f"official / vigla {row[f'{phase}_official_over_vigla']:.2f}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vig_tiny", "vig_h_tiny"],
                    help="ViG / ViG-H models (vig_tiny, vig_small, vig_base, vig_h_tiny, ...)")
    ap.add_argument("--img-size", nargs="+", type=int, default=[224, 512])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="alternating windows per phase")
    ap.add_argument("--iters", type=int, default=10, help="timed calls per window")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--name", default="fla_official_design")
    ap.add_argument("--phases", nargs="+", choices=["inference", "train"], default=["inference", "train"],
                    help="what to time (fla's cold autotuning of its backward kernels takes minutes more)")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and HAS_FLA):
        print("official_design.py needs a CUDA GPU and fla-core (pip install fla-core)", file=sys.stderr)
        return 2
    out = envelope(torch.device("cuda"), dict(models=args.models, img_size=args.img_size, batch_size=args.batch_size,
                                              rounds=args.rounds, iters=args.iters, phases=args.phases,
                                              amp="bf16"))
    print(f"{'model':10s} {'img':>5s} {'infer vigla':>12s} {'official':>9s} {'x':>5s} {'train vigla':>12s} "
          f"{'official':>9s} {'x':>5s} {'logits diff':>11s}")
    for name in args.models:
        for img in args.img_size:
            start = time.perf_counter()
            r = measure(name, img, args.batch_size, args.rounds, args.iters, args.phases)
            r["seconds"] = round(time.perf_counter() - start, 1)
            out["rows"].append(r)
            write_json(out, Path(args.out) / f"{args.name}.json")  # incomplete until the last row
            cols = "".join(f" {r.get(f'{p}_vigla_ms', float('nan')):12.2f}"
                           f" {r.get(f'{p}_official_ms', float('nan')):9.2f}"
                           f" {r.get(f'{p}_official_over_vigla', float('nan')):5.2f}" for p in ("inference", "train"))
            print(f"{name:10s} {img:5d}{cols} {r['logits_rel_diff_bf16']:11.1e}  ({r['seconds']:.0f} s)", flush=True)
    print(f"wrote {save_complete(out, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
