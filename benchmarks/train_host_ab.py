"""The eager training step's host trims against the casts before them, with ViG-T and DeiT-T timed in turn (CUDA).

    python benchmarks/train_host_ab.py --out benchmarks/results --name train_host_ab

``new``: vigla as it is (:mod:`vigla.ops.amp`: a mixer's weight casts and in-projection concatenation in one fused
copy; weight gradients written in float32 by their GEMMs). ``old``: the mixer's concatenation straight into the
compute dtype, its bias padded and each other weight cast apart, the weight gradients' GEMMs in bf16 then cast (the
code before, restored here). One process builds ViG-T and DeiT-T (224, batch ``--batch-size`` (128), bf16 autocast,
fused AdamW: :func:`vigla.bench.measure.train_step`, as ``interleaved.py`` times them) and for ``--rounds`` rounds
times ``--steps`` pipelined steps of each model under each variant in turn (the order alternating by round). Rows:
one per round, then the medians, with DeiT-T's step time over ViG-T's per variant (ViG-T's relative training
throughput), and the kernel launches of one profiled step per variant (``cudaLaunchKernel`` for PyTorch's,
``cuLaunchKernelEx`` for Triton's and cuBLASLt's, memsets, copies). Results: ``OUT/NAME.json``
(:func:`vigla.bench.report.envelope`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.interleaved import pipelined_ms  # noqa: E402
from vigla.bench.cli import build_model  # noqa: E402
from vigla.bench.measure import synchronize, train_step  # noqa: E402
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.engine.host_memory import keep_freed_memory  # noqa: E402
from vigla.layers.bigla_mixer import MixerFunction  # noqa: E402
from vigla.ops import amp  # noqa: E402

NEW_CAST = MixerFunction._cast_weights
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaMemsetAsync", "cudaMemcpyAsync")


def old_cast(params: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The mixer's weights for its training node as cast before :func:`vigla.ops.amp.cast_concat` (seven launches)."""
    w_qkv, w_down, w_gate, b_gate, w_up, b_up, w_out = params
    rows = w_qkv.shape[0] + w_down.shape[0] + w_gate.shape[0]
    weight = torch.cat([w_qkv, w_down, w_gate], out=w_qkv.new_empty(rows, w_qkv.shape[1], dtype=dtype))
    return weight, F.pad(b_gate.to(dtype), (rows - b_gate.shape[0], 0)), w_up.to(dtype), b_up.to(dtype), w_out.to(dtype)


def use(variant: str) -> None:
    MixerFunction._cast_weights = staticmethod(NEW_CAST if variant == "new" else old_cast)
    amp._MM_OUT_DTYPE = variant == "new" and hasattr(torch.ops.aten.mm, "dtype")


def launches(step, device: torch.device) -> dict:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    return {e.key: e.count for e in prof.key_averages() if e.key in LAUNCHES}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cuda (what it is for); cpu only runs it through")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="train_host_ab")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    kept = keep_freed_memory()
    torch.manual_seed(0)
    steps = {name: train_step(build_model(name, 224).to(device), args.batch_size, 224, device, amp="bf16")
             for name in ("vig_tiny", "deit_tiny_patch16_224")}
    result = envelope(device, dict(models=list(steps), variants=["old", "new"], batch_size=args.batch_size,
                                   img_size=224, amp="bf16", optimizer="adamw (fused)", rounds=args.rounds,
                                   steps=args.steps,
                                   keep_freed_memory=kept))
    for variant in ("old", "new"):
        use(variant)
        for step in steps.values():
            for _ in range(3):
                step()
    counts = {}
    for variant in ("old", "new"):
        use(variant)
        counts[f"vig_tiny_{variant}"] = launches(steps["vig_tiny"], device)
    counts["deit_tiny_patch16_224"] = launches(steps["deit_tiny_patch16_224"], device)
    for r in range(args.rounds):
        row = {"round": r}
        for variant in ("old", "new") if r % 2 == 0 else ("new", "old"):
            use(variant)
            for name, step in steps.items():
                row[f"{name}_{variant}_ms"] = pipelined_ms(step, args.steps, device)
            row[f"train_ratio_{variant}"] = row[f"deit_tiny_patch16_224_{variant}_ms"] / row[f"vig_tiny_{variant}_ms"]
        result["rows"].append(row)
        print(f"round {r}: ViG-T / DeiT-T training throughput old {row['train_ratio_old']:.3f}, new "
              f"{row['train_ratio_new']:.3f} (ViG-T {row['vig_tiny_old_ms']:.1f} -> {row['vig_tiny_new_ms']:.1f} ms)",
              flush=True)
    use("new")
    keys = [k for k in result["rows"][0] if k != "round"]
    median = {k: statistics.median(row[k] for row in result["rows"]) for k in keys}
    result["rows"].append({"round": "median", **median, "launches": counts})
    print(f"median: ViG-T / DeiT-T old {median['train_ratio_old']:.3f}, new {median['train_ratio_new']:.3f}; "
          f"ViG-T step {median['vig_tiny_old_ms']:.2f} -> {median['vig_tiny_new_ms']:.2f} ms; launches {counts}")
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
