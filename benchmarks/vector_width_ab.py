"""vigla's CPU kernels built with GCC's preferred vector width for this CPU against 512-bit vectors.

    python benchmarks/vector_width_ab.py --out benchmarks/results --name cpu_kernels_vector_width_ab

``vigla.ops.cpu_build`` compiles the kernels with ``-march=native`` and, on x86-64, ``-mprefer-vector-width=512``
(GCC otherwise vectorises its own loops 256 bits wide on CPUs with AVX-512). Each measurement is a fresh process
that builds the five kernels one way or the other (``default``: the flag removed; ``512``: vigla's flags) in a cache
of its own, then times each op on ViG-T's layer shapes (batch ``--batch-size`` at 224: 196 tokens, 3 heads of
``d_k = 32``, ``d_v = 64``, 192 channels, SwiGLU's 512 hidden) over ``--calls`` calls (the median); the two builds
alternate for ``--rounds`` rounds. Rows: each round's figures, then the medians and the ratio default / 512 per op.
Results: ``OUT/NAME.json`` (:func:`vigla.bench.report.envelope`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.alternating import add_round, close_ab, median_ms, worker_row  # noqa: E402

BUILDS = ("default", "512")
FLAG = "-mprefer-vector-width=512"


def ops(batch: int) -> dict:
    """The timed calls: each CPU kernel forward and backward on ViG-T's layer shapes."""
    import torch

    from vigla.ops.add_norm import cpu_kernels as add_norm
    from vigla.ops.bigla import cpu_kernels as bigla
    from vigla.ops.dwconv import cpu_kernels as dwconv
    from vigla.ops.locality_mix import cpu_kernels as mix
    from vigla.ops.swiglu import cpu_kernels as swiglu

    torch.manual_seed(0)
    T, C, K = 196, 192, 96
    proj = torch.randn(batch, T, 2 * K + C + 2 * K + C) * 0.5
    q, k, v, zf, zb, gate = proj.split([K, K, C, K, K, C], dim=-1)
    q, k, zf, zb = (t.unflatten(-1, (3, 32)) for t in (q, k, zf, zb))
    v = v.unflatten(-1, (3, 64))
    x, o, do = torch.randn(batch, T, C), torch.randn(batch, T, 3, 64), torch.randn(batch, T, 3, 64)
    w, wc, u, dy = torch.ones(64), torch.randn(C), torch.randn(batch * T, 1024), torch.randn(batch * T, 512)
    conv = torch.randn(C, 1, 3, 3)
    return {
        "bigla_fwd": lambda: bigla.bigla_fwd_cpu(q, k, v, zf, zb, 32 ** -0.5, 16.0),
        "bigla_mix_fwd": lambda: bigla.bigla_mix_fwd_cpu(q, k, v, zf, zb, x, gate, w, w, 32 ** -0.5, 16.0, 1e-6,
                                                         True),
        "bigla_bwd": lambda: bigla.bigla_bwd_cpu(q, k, v, zf, zb, do, 32 ** -0.5, 16.0),
        "locality_mix_fwd": lambda: mix.locality_mix_fwd_cpu(o, x, gate, w, w, 1e-6, True),
        "locality_mix_bwd": lambda: mix.locality_mix_bwd_cpu(x, o, x, gate, w, w, 1e-6, True),
        "swiglu_fwd": lambda: swiglu.swiglu_fwd_cpu(u),
        "swiglu_bwd": lambda: swiglu.swiglu_bwd_cpu(dy, u),
        "add_norm_fwd": lambda: add_norm.add_norm_fwd_cpu(x, x, wc, None, 1e-6, True),
        "add_norm_bwd": lambda: add_norm.add_norm_bwd_cpu(x, x, x, wc, False, 1e-6, True),
        "dwconv_fwd": lambda: dwconv.dwconv_fwd_cpu(x, conv, 14, 14, True),
        "dwconv_bwd": lambda: dwconv.dwconv_bwd_cpu(x, x, conv, 14, 14, True),
    }


def worker(build: str, batch: int, calls: int) -> dict:
    """One process: the kernels built as ``build`` says, each op's median milliseconds over ``calls`` calls."""
    import vigla.ops.cpu_build as cpu_build

    if build == "default" and FLAG in cpu_build.FLAGS:
        cpu_build.FLAGS.remove(FLAG)
    if build == "512" and FLAG not in cpu_build.FLAGS:
        cpu_build.FLAGS.append(FLAG)
    times = median_ms(ops(batch), calls)
    return {"build": build, "flags": " ".join(cpu_build.FLAGS), **{f"{k}_ms": v for k, v in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="cpu_kernels_vector_width_ab")
    ap.add_argument("--worker", metavar="BUILD", choices=BUILDS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_size, args.calls)))
        return 0
    import torch

    from vigla.bench.report import envelope

    result = envelope(torch.device("cpu"), dict(builds=list(BUILDS), batch_size=args.batch_size, img_size=224,
                                                rounds=args.rounds, calls=args.calls))
    with tempfile.TemporaryDirectory() as cache:
        for r in range(args.rounds):
            for build in BUILDS:
                add_round(result, r, worker_row(__file__, ["--worker", build, "--batch-size", str(args.batch_size),
                                                           "--calls", str(args.calls)], {"VIGLA_CACHE_DIR": cache}))
    close_ab(result, BUILDS, args.out, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
