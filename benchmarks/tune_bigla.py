"""Launch settings of the BiGLA kernels: chunk length, warps, pipeline stages and sequence segments, timed.

Run on a GPU; writes ``tune_bigla.json``:

    python benchmarks/tune_bigla.py --out benchmarks/results

For ViG-T layer shapes (bf16 q, k, v, bf16 gate logits strided as the model passes them), the
forward (summary + forward kernels) and the backward (summaries, gradient kernels, gate carries)
are timed with ``triton.testing.do_bench`` for every (chunk length, num_warps, num_stages) and for
segment counts around the default plan. Each setting's output is checked against the default setting's
(relative error recorded), so a faster setting is also a correct one. The library's defaults are
not changed by this script: it reports which settings win.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.report import git_info, write_json  # noqa: E402
from vigla.ops.bigla import triton_kernels as tk  # noqa: E402

SHAPES = [("ViG-T @224", 128, 196), ("ViG-T @512", 48, 1024), ("ViG-T @1024", 12, 4096),
          ("ViG-T @2048", 4, 16384)]
H, K, V, NORM = 3, 32, 64, 16.0


def inputs(B, T):
    qkv = torch.randn(B, T, H, 2 * K + V, device="cuda", dtype=torch.bfloat16)
    z = torch.randn(B, T, 2, H, K, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([K, K, V], -1)
    return q, k, v, z[:, :, 0], z[:, :, 1]


def with_launch(warps, stages):
    """Make the launchers use these settings (restored by the caller)."""
    base = tk._common

    def common(q, gate_normalizer):
        return base(q, gate_normalizer) | dict(num_warps=warps, num_stages=stages)
    tk._common = common
    return base


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def main() -> int:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--fwd-warps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--bwd-warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--chunks", type=int, nargs="+", default=[tk.BT],
                    help="tokens per chunk to try (the kernels take any power of two >= 16)")
    args = ap.parse_args()
    result = dict(benchmark="bigla launch settings", device=torch.cuda.get_device_name(),
                  commit=git_info()["commit"], command=" ".join(["python3"] + sys.argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  heads=dict(H=H, K=K, V=V), timing="triton.testing.do_bench median, ms", rows=[])
    path = Path(args.out) / "tune_bigla.json"
    os.makedirs(args.out, exist_ok=True)
    scale = K ** -0.5
    for name, B, T in SHAPES:
        x = inputs(B, T)
        do = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
        fwd = lambda s: tk.bigla_fwd_triton(*x, scale, segments=s, gate_normalizer=NORM)  # noqa: E731
        bwd = lambda s: tk.bigla_bwd_triton(*x, do, scale, segments=s, gate_normalizer=NORM)  # noqa: E731
        for kind, warps_list, fn in (("fwd", args.fwd_warps, fwd), ("bwd", args.bwd_warps, bwd)):
            ref = fn(None)  # the library's defaults
            ref = list(ref) if isinstance(ref, tuple) else [ref]
            for chunk, warps, stages in itertools.product(args.chunks, warps_list, args.stages):
                base, default_chunk = with_launch(warps, stages), tk.BT
                tk.BT = chunk  # the launchers read the module's chunk length at each call
                try:
                    nseg = tk._plan(x[0], V, backward=kind == "bwd")[2]
                    n_chunks = -(-T // chunk)
                    for s in sorted({max(1, min(n_chunks, s)) for s in (1, nseg // 2, nseg, 2 * nseg, 4 * nseg)}):
                        out = fn(s)
                        out = list(out) if isinstance(out, tuple) else [out]
                        ms = do_bench(lambda: fn(s), warmup=10, rep=50, return_mode="median")
                        row = dict(shape=name, B=B, T=T, kernel=kind, chunk=chunk, num_warps=warps,
                                   num_stages=stages, segments=s, default_segments=nseg, ms=ms,
                                   max_rel_err=max(rel(a, b) for a, b in zip(out, ref)))
                        result["rows"].append(row)
                        print(json.dumps(row), flush=True)
                except Exception as exc:  # noqa: BLE001  (e.g. out of shared memory: record it)
                    result["rows"].append(dict(shape=name, kernel=kind, chunk=chunk, num_warps=warps,
                                               num_stages=stages, error=f"{type(exc).__name__}: {exc}"[:300]))
                    print(f"{name} {kind} c{chunk} w{warps} s{stages}: {exc}"[:300], flush=True)
                finally:
                    tk._common, tk.BT = base, default_chunk
                write_json(result, path)
    best = {}
    for r in result["rows"]:
        if "ms" in r:
            key = (r["shape"], r["kernel"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    result["best"] = list(best.values())
    write_json(result, path)
    print("\nbest per shape and kernel:")
    for r in best.values():
        print(f"  {r['shape']:12} {r['kernel']}: {r['ms']:.3f} ms  chunk {r['chunk']} warps {r['num_warps']} stages "
              f"{r['num_stages']} segments {r['segments']} (default {r['default_segments']}), "
              f"err {r['max_rel_err']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
