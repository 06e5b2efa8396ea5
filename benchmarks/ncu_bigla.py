"""One BiGLA forward + backward inside the NVTX range ``bigla``, for Nsight Compute (the ``ncu`` suite).

    ncu --nvtx --nvtx-include bigla ... python benchmarks/ncu_bigla.py --shape B T H K V

The model's call (``bigla_gated``: bf16 q, k, v ``[B, T, H, K|V]`` and bf16 gate logits, ViG's gate
normalizer 16) through the public op, so whatever kernels it launches today are the ones profiled:
``--warmup`` calls first (compilation and autotuning stay outside the range), then one call in it.
The range is a start/end range, not a push/pop one: those belong to one thread, and autograd runs the
backward's kernels from a thread of its own.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vigla.ops import bigla_gated  # noqa: E402

GATE_NORMALIZER = 16.0  # ViG's


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=5, type=int, required=True, metavar=("B", "T", "H", "K", "V"))
    ap.add_argument("--warmup", type=int, default=3, help="calls before the profiled one")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_bigla needs a CUDA GPU", file=sys.stderr)
        return 2
    B, T, H, K, V = args.shape
    q, k, zf, zb = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(4))
    v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)

    def call():
        out = bigla_gated(q, k, v, zf, zb, GATE_NORMALIZER)
        torch.autograd.grad(out, (q, k, v, zf, zb), do)

    for _ in range(args.warmup):
        call()
    torch.cuda.synchronize()
    bigla = torch.cuda.nvtx.range_start("bigla")
    call()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_end(bigla)
    print(f"bigla_gated forward + backward at B={B} T={T} H={H} K={K} V={V}: profiled call done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
