"""The stems of ViG and ViG-H on one GPU: the fused path (``conv_norm_act``, conv2 on its channels-last output,
the fused LayerNorm) against the same layers run one by one (``nn.Conv2d`` on the NCHW image, timm's
LayerNorm2d, the activation, ``nn.Conv2d``, ``nn.LayerNorm``), in one run. bf16 autocast, inference.

    python benchmarks/bench_stem.py --out benchmarks/results        # or: python -m benchmarks kernel stem

Per model and size: CUDA-graph replays (``triton.testing.do_bench_cudagraph``) of each path and the largest
relative difference of the fused output from the layers' (bf16 rounding: ~4e-3); the stem's first op alone
(``conv_norm_act``: conv1, its LayerNorm and activation) against its byte floor (the fp32 image read once, the
bf16 output written once, at the device-to-device copy bandwidth measured in the same run).
``--alt FILE [FILE ...]``: other versions of ``vigla/ops/conv_norm/triton_kernels.py``, their first op timed
beside (``alt:<file stem>_conv1_ms``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import vigla  # noqa: E402,F401
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.engine.modeling import create_model  # noqa: E402
from vigla.ops.conv_norm import conv_norm_act  # noqa: E402
from benchmarks.bench_bigla import copy_bandwidth, load_alt  # noqa: E402

STEMS = {"vig_tiny": "patch_embed", "vig_small": "patch_embed", "vig_h_tiny": "stem"}


def first_op(stem, x: torch.Tensor, bw: float, alts=()) -> dict:
    """The stem's first op (``conv_norm_act`` under bf16 autocast) timed alone, against its byte floor; each of
    ``alts`` (``(label, module)``, modules of the conv_norm kernels) timed beside, with the relative difference
    of its output."""
    from triton.testing import do_bench_cudagraph

    conv, norm = stem.conv1, stem.norm1
    args = (conv.weight, conv.bias, norm.weight, norm.bias, norm.eps, stem.stride, 1, stem.fused_act)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = conv_norm_act(x, *args)
        ms = do_bench_cudagraph(lambda: conv_norm_act(x, *args), rep=100)
    floor_ms = (x.numel() * x.element_size() + y.numel() * y.element_size()) / bw * 1e3
    row = dict(conv1_ms=ms, floor_conv1_ms=floor_ms, conv1_over_floor=ms / floor_ms)
    for label, module in alts:
        def call(module=module):
            return module.conv_norm_fwd_triton(x, *args, torch.bfloat16, torch.bfloat16)

        with torch.no_grad():
            theirs = call()
            row[f"alt:{label}_conv1_ms"] = do_bench_cudagraph(call, rep=100)
        row[f"alt:{label}_rel_diff"] = ((theirs.float() - y.float()).norm() / y.float().norm()).item()
    return row


def main() -> int:
    from triton.testing import do_bench_cudagraph

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(STEMS), choices=list(STEMS))
    ap.add_argument("--img-size", nargs="+", type=int, default=[224, 512])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--name", default="bench_stem")
    ap.add_argument("--alt", nargs="+", default=[], metavar="FILE",
                    help="other versions of vigla/ops/conv_norm/triton_kernels.py, timed beside")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_stem needs a CUDA GPU", file=sys.stderr)
        return 2
    alts = [(Path(f).stem, load_alt(f, "vigla.ops.conv_norm")) for f in args.alt]
    bw = copy_bandwidth()
    out = envelope(torch.device("cuda"), dict(what="stem: fused path vs its layers one by one", amp="bf16",
                                              batch_size=args.batch_size, timing="do_bench_cudagraph, ms",
                                              copy_bandwidth_TBps=bw / 1e12, alt=[Path(f).name for f in args.alt]))
    for name in args.models:
        stem = getattr(create_model(name).cuda().eval(), STEMS[name])
        for img in args.img_size:
            x = torch.randn(args.batch_size, 3, img, img, device="cuda")
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                ref = stem.forward_layers(x).float()
                diff = ((stem(x).float() - ref).norm() / ref.norm()).item()
                fused = do_bench_cudagraph(lambda: stem(x), rep=100)
                one_by_one = do_bench_cudagraph(lambda: stem.forward_layers(x), rep=100)
            row = dict(model=name, img_size=img, batch_size=args.batch_size, fused_ms=fused, layers_ms=one_by_one,
                       speedup=one_by_one / fused, rel_diff=diff, **first_op(stem, x, bw, alts))
            out["rows"].append(row)
            alt_note = "".join(f", {label} {row[f'alt:{label}_conv1_ms']:.3f} ms" for label, _ in alts)
            print(f"{name} @{img} b{args.batch_size}: fused {fused:.3f} ms, layers {one_by_one:.3f} ms "
                  f"(x{one_by_one / fused:.1f}), relative difference {diff:.1e}; first op {row['conv1_ms']:.3f} ms "
                  f"= {row['conv1_over_floor']:.1f}x its floor{alt_note}", flush=True)
    print(f"wrote {save_complete(out, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
