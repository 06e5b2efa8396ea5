"""The stems of ViG and ViG-H on one GPU: the fused path (``conv_norm_act``, conv2 on its channels-last output,
the fused LayerNorm) against the same layers run one by one (``nn.Conv2d`` on the NCHW image, timm's
LayerNorm2d, the activation, ``nn.Conv2d``, ``nn.LayerNorm``), in one run. bf16 autocast, inference.

    python benchmarks/bench_stem.py --out benchmarks/results        # or: python -m benchmarks kernel stem

Per model and size: CUDA-graph replays (``triton.testing.do_bench_cudagraph``) of each path and the largest
relative difference of the fused output from the layers' (bf16 rounding: ~4e-3).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import vigla  # noqa: E402,F401
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.engine.modeling import create_model  # noqa: E402

STEMS = {"vig_tiny": "patch_embed", "vig_small": "patch_embed", "vig_h_tiny": "stem"}


def main() -> int:
    from triton.testing import do_bench_cudagraph

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(STEMS), choices=list(STEMS))
    ap.add_argument("--img-size", nargs="+", type=int, default=[224, 512])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--name", default="bench_stem")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_stem needs a CUDA GPU", file=sys.stderr)
        return 2
    out = envelope(torch.device("cuda"), dict(what="stem: fused path vs its layers one by one", amp="bf16",
                                              batch_size=args.batch_size, timing="do_bench_cudagraph, ms"))
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
                       speedup=one_by_one / fused, rel_diff=diff)
            out["rows"].append(row)
            print(f"{name} @{img} b{args.batch_size}: fused {fused:.3f} ms, layers {one_by_one:.3f} ms "
                  f"(x{one_by_one / fused:.1f}), relative difference {diff:.1e}", flush=True)
    print(f"wrote {save_complete(out, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
