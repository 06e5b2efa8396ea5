"""The BiGLA forward kernel, two variants timed side by side in one run: the interleaved walk
(``_fwd_kernel``: both scans in one loop) against the two-pass walk (``_fwd_kernel_two_pass``:
right to left, then left to right), at every bench_bigla.py shape (bf16, the model's strided
layout, gate logits). Writes ``ab_bigla_fwd.json``:

    python benchmarks/ab_bigla_fwd.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.report import git_info, write_json  # noqa: E402
from vigla.ops.bigla import triton_kernels as tk  # noqa: E402

from bench_bigla import GATE_NORMALIZER, SHAPES, make_inputs  # noqa: E402


def main() -> int:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    result = dict(benchmark="bigla forward variants", device=torch.cuda.get_device_name(),
                  commit=git_info()["commit"], command=" ".join(["python3"] + sys.argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  timing="triton.testing.do_bench median, ms (variants alternated, 3 rounds, best)",
                  rows=[])
    for name, B, T, H, K, V in SHAPES:
        q, k, v, zf, zb = make_inputs(B, T, H, K, V)
        outs, times = {}, {}
        for _ in range(3):
            for two_pass in (False, True):
                tk.FWD_TWO_PASS = two_pass
                fn = lambda: tk.bigla_fwd_triton(q, k, v, zf, zb, K ** -0.5, gate_normalizer=GATE_NORMALIZER)  # noqa: E731
                outs[two_pass] = fn().float()
                ms = do_bench(fn, warmup=10, rep=60, return_mode="median")
                times[two_pass] = min(ms, times.get(two_pass, float("inf")))
        tk.FWD_TWO_PASS = False
        err = ((outs[False] - outs[True]).norm() / outs[True].norm()).item()
        row = dict(name=name, B=B, T=T, H=H, K=K, V=V, interleaved_ms=times[False], two_pass_ms=times[True],
                   speedup=times[True] / times[False], rel_diff=err)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(result, Path(args.out) / "ab_bigla_fwd.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
