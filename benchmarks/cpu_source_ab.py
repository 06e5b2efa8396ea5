"""vigla's CPU kernels built from an earlier commit's C sources against the working tree's.

    python benchmarks/cpu_source_ab.py --base 65727a3 --out benchmarks/results --name cpu_kernels_source_ab

Each measurement is a fresh process that builds the five kernels (BiGLA, the locality mix, SwiGLU, add + norm, the
depthwise conv) in a cache of its own, either from the working tree (``head``) or from ``--base``'s
``cpu_kernels.c`` files and ``cpu_math.h`` (``base``, read with ``git show``, built with this tree's flags), then
times each op on ViG-T's layer shapes (:func:`benchmarks.vector_width_ab.ops`: batch ``--batch-size`` at 224) over
``--calls`` calls (the median); the two builds alternate for ``--rounds`` rounds, each
first in every other round. Rows: each round's figures, then
the medians and the ratio base / head per op. Results: ``OUT/NAME.json`` (:func:`vigla.bench.report.envelope`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.alternating import add_round, close_ab, median_ms, worker_row  # noqa: E402

BUILDS = ("base", "head")
OPS = ("add_norm", "bigla", "dwconv", "locality_mix", "swiglu")  # the packages under vigla/ops with a C kernel
ROOT = Path(__file__).resolve().parent.parent


def base_sources(commit: str, folder: Path) -> None:
    """``commit``'s ``cpu_kernels.c`` of each op (``folder/OP.c``) and its ``cpu_math.h``, which their
    ``#include "cpu_math.h"`` finds beside them before the tree's."""
    for name, path in [(f"{op}.c", f"vigla/ops/{op}/cpu_kernels.c") for op in OPS] + [("cpu_math.h",
                                                                                      "vigla/ops/cpu_math.h")]:
        text = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        (folder / name).write_text(text)


def worker(build: str, batch: int, calls: int, base_dir: str) -> dict:
    """One process: the kernels built from ``build``'s sources, each op's median milliseconds over ``calls`` calls."""
    import importlib

    if build == "base":
        for op in OPS:
            importlib.import_module(f"vigla.ops.{op}.cpu_kernels")._LIB.source = Path(base_dir) / f"{op}.c"
    from benchmarks.vector_width_ab import ops

    times = median_ms(ops(batch), calls)
    return {"build": build, **{f"{k}_ms": v for k, v in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="the commit whose kernel sources are the baseline (required)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="cpu_kernels_source_ab")
    ap.add_argument("--worker", metavar="BUILD", choices=BUILDS, help=argparse.SUPPRESS)
    ap.add_argument("--base-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_size, args.calls, args.base_dir)))
        return 0
    if not args.base:
        ap.error("--base is required: the commit whose kernel sources are the baseline")
    import torch

    from vigla.bench.report import envelope

    base = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    result = envelope(torch.device("cpu"), dict(builds=list(BUILDS), base=base, batch_size=args.batch_size,
                                                img_size=224, rounds=args.rounds, calls=args.calls))
    # work/sources: base's files; a kernel cache per build (a cached library's key hashes the tree's header)
    with tempfile.TemporaryDirectory() as work:
        sources = os.path.join(work, "sources")
        os.mkdir(sources)
        base_sources(base, Path(sources))
        for r in range(args.rounds):
            for build in BUILDS if r % 2 == 0 else BUILDS[::-1]:  # each build first in every other round
                add_round(result, r, worker_row(__file__, ["--worker", build, "--batch-size", str(args.batch_size),
                                                           "--calls", str(args.calls), "--base-dir", sources],
                                                {"VIGLA_CACHE_DIR": os.path.join(work, build)}))
    close_ab(result, BUILDS, args.out, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
