"""Column sums of a half-precision ``[R, C]`` gradient into float32 (a bias's gradient): reduction against GEMM.

    python benchmarks/colsum_ab.py --out benchmarks/results --name kernel_colsum_ab

A linear layer's bias gradient is the column sum of its output gradient, ``[R, C]`` (``R`` = batch x tokens) in
bf16, summed in float32. ``x.sum(0, dtype=torch.float32)`` runs PyTorch's reduction over the outer dimension;
:func:`vigla.ops.amp.mm_to` with a row of ones runs the same sum as a ``[1, R] @ [R, C]`` GEMM writing float32
(cuBLAS, float32 accumulation). For each shape (ViG's training shapes at batch 128) both are timed with
``triton.testing.do_bench`` and checked against the float64 sum. Results: ``OUT/NAME.json``
(:func:`vigla.bench.report.envelope`).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.ops.amp import colsum  # noqa: E402

# (R, C): ViG-T / ViG-S / ViG-B at 224 (128 x 196 tokens), ViG-H-T's stages 1-2, ViG-T at 512
SHAPES = [(25088, 192), (25088, 384), (25088, 768), (401408, 64), (100352, 128), (131072, 192)]


def candidates(x: torch.Tensor) -> dict:
    ones = x.new_ones(1, x.shape[0])
    return {
        "reduce": lambda: x.sum(0, dtype=torch.float32),
        "gemm_ones": lambda: torch.mm(ones, x, out_dtype=torch.float32),
        "colsum": lambda: colsum(x, torch.float32),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="kernel_colsum_ab")
    args = ap.parse_args(argv)
    from triton.testing import do_bench
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    result = envelope(dev, dict(shapes=SHAPES, dtype=args.dtype, timing="triton.testing.do_bench, ms (median)"))
    for R, C in SHAPES:
        x = torch.randn(R, C, device=dev).to(dtype)
        ref = x.double().sum(0)
        row = {"R": R, "C": C, "bytes_floor_us": x.numel() * x.element_size() / 3.0e6}
        for name, fn in candidates(x).items():
            got = fn().reshape(C).double()
            row[f"{name}_max_err"] = (got - ref).abs().max().item()
            row[f"{name}_us"] = do_bench(fn, return_mode="median") * 1e3
        row["reduce_over_colsum"] = row["reduce_us"] / row["colsum_us"]
        result["rows"].append(row)
        print(f"[{R}, {C}]: " + ", ".join(f"{n} {row[n + '_us']:.1f} us (err {row[n + '_max_err']:.1e})"
                                          for n in candidates(x)), flush=True)
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
