"""One BiGLA forward and backward at a ViG-T layer shape: a target for ``ncu``, and each compiled
kernel's registers, spills and shared memory (what ptxas gave Triton).

    python benchmarks/probe_bigla.py --shape "ViG-T @1024" --out results/probe
    ncu --clock-control none -k regex:'_fwd_kernel|_bwd_kernel' --launch-skip 2 --launch-count 2 \
        python benchmarks/probe_bigla.py --shape "ViG-T @1024"

Inputs as the model passes them (bf16, q/k/v column slices of one projection, bf16 gate logits).
The first call of each pass compiles; the second one is the one to profile (hence ``--launch-skip``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.report import git_info, write_json  # noqa: E402
from vigla.ops.bigla import triton_kernels as tk  # noqa: E402

from tune_bigla import H, K, NORM, SHAPES, V, inputs  # noqa: E402


def compiled_kernels():
    """``{kernel name: {n_regs, n_spills, shared_bytes, num_warps}}`` for every compiled variant."""
    found = {}
    for name in ("_summary_kernel", "_fwd_kernel", "_grad_summary_kernel", "_bwd_kernel", "_gate_carry_kernel"):
        fn = getattr(tk, name)
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for i, kern in enumerate(kernels.values()):
                try:
                    kern._init_handles()
                    found[f"{name}[{i}]"] = dict(n_regs=kern.n_regs, n_spills=kern.n_spills,
                                                 shared_bytes=kern.metadata.shared,
                                                 num_warps=kern.metadata.num_warps)
                except AttributeError as exc:  # another Triton's layout of its compiled kernels
                    found[f"{name}[{i}]"] = dict(error=str(exc))
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="ViG-T @1024", choices=[s[0] for s in SHAPES])
    ap.add_argument("--chunk", type=int, default=tk.BT, help="tokens per chunk (a power of two >= 16)")
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--name", default="probe_bigla", help="stem of the JSON file")
    args = ap.parse_args()
    tk.BT = args.chunk  # the launchers read the module's chunk length at each call
    _, B, T = next(s for s in SHAPES if s[0] == args.shape)
    x = inputs(B, T)
    do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # compile, then the profiled launches
        tk.bigla_fwd_triton(*x, K ** -0.5, gate_normalizer=NORM)
        tk.bigla_bwd_triton(*x, do, K ** -0.5, gate_normalizer=NORM)
    torch.cuda.synchronize()
    _, _, nseg, seg_len = tk._plan(x[0], V)
    result = dict(shape=args.shape, chunk=tk.BT, B=B, T=T, H=H, K=K, V=V, segments=nseg, segment_tokens=seg_len,
                  device=torch.cuda.get_device_name(), commit=git_info()["commit"],
                  command=" ".join(["python3"] + sys.argv), kernels=compiled_kernels())
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(result, Path(args.out) / f"{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
