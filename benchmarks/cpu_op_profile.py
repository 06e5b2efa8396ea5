"""Where a CPU step's time goes, op by op: torch.profiler's op table for ViG-T and DeiT-T, side by side.

    python benchmarks/cpu_op_profile.py --out benchmarks/results --name cpu_op_profile
    python -m benchmarks cpu op_profile      # the same, through the suite

For each model: ``--warmup`` untimed steps, then ``--steps`` profiled ones, of each phase: ``inference`` (an eval-mode
``torch.inference_mode`` forward) and ``train`` (forward, cross-entropy, backward, AdamW step; batch
``--batch-size`` at 224, float32, the vigla commands' heap setting :func:`vigla.engine.host_memory.keep_freed_memory`).
The ops are grouped by name and input shapes; each row of the result is one (model, phase): the profiled step's
milliseconds, the GEMMs' share of it (``gemm_ms``: every op whose name is a matrix product, ATen's and oneDNN's, self
time) and the ``--top`` ops by self time (ms and calls per step). Self times are the calling thread's wall time inside
an op, so an op's figure includes its wait for the other threads; a step's ops sum to about its time.
Results: ``OUT/NAME.json`` (:func:`vigla.bench.report.envelope`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.cli import build_model  # noqa: E402
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.engine.host_memory import keep_freed_memory  # noqa: E402

GEMMS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "mkldnn::_linear_pointwise")


def step_fn(model: torch.nn.Module, phase: str, batch: int):
    """One step of ``phase`` ("inference" or "train") of ``model`` on a random batch, as a callable."""
    x = torch.randn(batch, 3, 224, 224)
    if phase == "inference":
        model.eval()

        def infer():
            with torch.inference_mode():
                model(x)
        return infer
    model.train()
    y = torch.randint(0, 1000, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train


def op_table(step, steps: int, top: int) -> dict:
    """``steps`` profiled calls of ``step`` -> the step's ms, the GEMMs' ms and the ``top`` ops by self time, per
    step (grouped by op name and input shapes)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) * 1e3 / steps
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    ms = lambda e: e.self_cpu_time_total / 1e3 / steps  # noqa: E731
    return dict(step_ms=wall, gemm_ms=sum(ms(e) for e in events if e.key in GEMMS),
                ops=[dict(op=e.key, shapes=str(e.input_shapes), calls=e.count / steps, ms=ms(e)) for e in events[:top]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vig_tiny", "deit_tiny_patch16_224"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="cpu_op_profile")
    args = ap.parse_args(argv)
    keep_freed_memory()
    result = envelope(torch.device("cpu"), dict(models=args.models, batch_size=args.batch_size, img_size=224,
                                                warmup=args.warmup, steps=args.steps, threads=torch.get_num_threads()))
    for name in args.models:
        model = build_model(name, 224)
        for phase in ("inference", "train"):
            step = step_fn(model, phase, args.batch_size)
            for _ in range(args.warmup):
                step()
            row = dict(model=name, phase=phase, **op_table(step, args.steps, args.top))
            result["rows"].append(row)
            print(f"{name} {phase}: {row['step_ms']:.1f} ms a step, GEMMs {row['gemm_ms']:.1f} ms", flush=True)
            for op in row["ops"][:8]:
                print(f"  {op['ms']:7.2f} ms {op['calls']:5.0f}x {op['op'][:34]:34s} {op['shapes'][:70]}")
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
