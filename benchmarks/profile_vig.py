"""Where ViG's time and memory go, op by op: torch.profiler over inference and training steps.

Run on a GPU:

    python benchmarks/profile_vig.py --models vig_tiny vig_small vig_h_tiny --img-size 224 1024 \
        --out benchmarks/results        # or: python -m benchmarks profile

For each model and size: ``--iters`` profiled steps after warm-up, bf16 autocast, random inputs;
``inference`` is a no-grad forward in eval mode, ``train`` a forward + backward (the gradients set to None after
each, as a training loop does); ``--compile`` profiles
``torch.compile(model)`` instead (its warm-up steps compile). The JSON holds,
per phase, the kernels' CUDA time per step grouped by kernel (top ``--top``), the share of the
step they take, the number of launches per step, the step's wall time and its peak memory; one
row per (model, size) in the results envelope of :func:`vigla.bench.report.envelope`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import vigla  # noqa: E402,F401
from vigla.bench.measure import profiled_kernels  # noqa: E402
from vigla.bench.report import envelope, write_json  # noqa: E402
from vigla.engine.modeling import create_model  # noqa: E402


def _batch(img: int) -> int:
    return 128 if img <= 512 else max(1, int(32 * (1024 / img) ** 2))


def profile_phase(model, x, train: bool, iters: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if train:
                model(x).float().mean().backward()
                model.zero_grad(set_to_none=True)  # as a training loop does: each step's gradients new, not summed
            else:
                with torch.no_grad():
                    model(x)

    model.train(train)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / iters
    k = profiled_kernels(prof, iters)
    return dict(wall_ms=wall_ms, kernel_ms=k["kernel_ms"], kernel_launches=k["kernel_launches"],
                peak_mib=torch.cuda.max_memory_allocated() / 2 ** 20, top=k["kernels"][:top])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vig_tiny", "vig_small", "vig_h_tiny"])
    ap.add_argument("--img-size", nargs="+", type=int, default=[224, 1024])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--name", default="profile_vig", help="stem of the JSON file")
    ap.add_argument("--compile", action="store_true",
                    help="profile torch.compile(model) (default mode; the warm-up steps compile)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_vig needs a CUDA GPU", file=sys.stderr)
        return 2
    out = envelope(torch.device("cuda"), dict(what="torch.profiler op table", models=args.models,
                                              img_sizes=args.img_size, iters=args.iters, top=args.top, amp="bf16",
                                              compile=args.compile))
    results = out["rows"]
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"{args.name}.json"
    for name in args.models:
        for img in args.img_size:
            # built at each size: ViTs (DeiT) take only the size they were built for
            model = create_model(name, num_classes=1000, img_size=img).cuda()
            model = torch.compile(model) if args.compile else model
            B = _batch(img)
            x = torch.randn(B, 3, img, img, device="cuda")
            entry = dict(model=name, img_size=img, batch_size=B)
            for phase in ("inference", "train"):
                try:
                    entry[phase] = profile_phase(model, x, phase == "train", args.iters, args.top)
                except torch.OutOfMemoryError:
                    entry[phase] = "OOM"
                    torch.cuda.empty_cache()
            results.append(entry)
            for phase in ("inference", "train"):
                r = entry[phase]
                if isinstance(r, dict):
                    print(f"\n{name} @{img} B={B} {phase}: wall {r['wall_ms']:.2f} ms/step, kernels "
                          f"{r['kernel_ms']:.2f} ms, {r['kernel_launches']:.0f} launches, "
                          f"peak {r['peak_mib']:.0f} MiB")
                    for row in r["top"][:12]:
                        print(f"  {row['self_cuda_ms']:8.3f} ms {100 * row['share']:5.1f}% "
                              f"x{row['calls']:<5.0f} {row['op'][:90]}")
            write_json(out, path)  # after every (model, size): a run cut short keeps its rows
            del model
            torch.cuda.empty_cache()
    out["complete"] = True
    write_json(out, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
