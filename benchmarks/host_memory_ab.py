"""CPU training steps with glibc's default heap against :func:`vigla.engine.host_memory.keep_freed_memory`.

    python benchmarks/host_memory_ab.py --out benchmarks/results --name cpu_host_memory_ab

Each measurement is a fresh process that trains one model, as ``vigla train`` does: it builds the model, takes
``--warmup`` training steps (:func:`vigla.bench.measure.train_step`: forward, cross-entropy, backward, fused
AdamW; batch ``--batch-size`` at 224, float32) and times ``--steps`` more, reading the process's minor page faults
and system CPU time around them. The two heaps alternate, model after model, for ``--rounds`` rounds; the
result is each model's per-round figures and their medians, and the ratio of the median step times (default heap
over kept memory). Results: ``OUT/NAME.json`` (:func:`vigla.bench.report.envelope`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.alternating import medians, worker_row  # noqa: E402

HEAPS = ("default", "kept")


def worker(model_name: str, heap: str, batch: int, warmup: int, steps: int) -> dict:
    """One process's figures: step times (ms), page faults and system seconds per step, peak RSS (MiB)."""
    from vigla.engine.host_memory import keep_freed_memory
    kept = keep_freed_memory() if heap == "kept" else False
    import torch

    from vigla.bench.cli import build_model
    from vigla.bench.measure import train_step

    torch.manual_seed(0)
    step = train_step(build_model(model_name, 224), batch, 224, torch.device("cpu"), amp="none")
    for _ in range(warmup):
        step()
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"model": model_name, "heap": heap, "mallopt_set": kept, "step_ms": statistics.median(times),
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "system_ms_per_step": (after.ru_stime - before.ru_stime) * 1e3 / steps,
            "peak_rss_mib": after.ru_maxrss / 1024, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vig_tiny", "deit_tiny_patch16_224"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="cpu_host_memory_ab")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "HEAP"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_size, args.warmup, args.steps)))
        return 0
    import torch

    from vigla.bench.report import envelope, save_complete

    result = envelope(torch.device("cpu"), dict(models=args.models, batch_size=args.batch_size, img_size=224,
                                                amp="none", rounds=args.rounds, warmup=args.warmup,
                                                steps=args.steps, heaps=list(HEAPS)))
    for r in range(args.rounds):
        for model in args.models:
            for heap in HEAPS:
                row = {"round": r, **worker_row(__file__, ["--worker", model, heap, "--batch-size",
                                                           str(args.batch_size), "--warmup", str(args.warmup),
                                                           "--steps", str(args.steps)])}
                result["rows"].append(row)
                print(f"round {r}: {model} {heap}: {row['step_ms']:.1f} ms/step, "
                      f"{row['page_faults_per_step']:.0f} page faults/step", flush=True)
    for model in args.models:
        med = {heap: medians(result["rows"], ("step_ms", "page_faults_per_step", "system_ms_per_step",
                                              "peak_rss_mib"), model=model, heap=heap) for heap in HEAPS}
        result["rows"].append({"round": "median", "model": model, **{f"{heap}_{k}": v for heap in HEAPS
                                                                     for k, v in med[heap].items()},
                               "default_over_kept": med["default"]["step_ms"] / med["kept"]["step_ms"]})
        print(f"median: {model}: {med['default']['step_ms']:.1f} ms/step with glibc's default heap, "
              f"{med['kept']['step_ms']:.1f} kept ({med['default']['step_ms'] / med['kept']['step_ms']:.3f}x)")
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
