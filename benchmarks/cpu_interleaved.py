"""ViG-T against DeiT-T on this machine's CPU, the two models timed in turn, round after round.

    python benchmarks/cpu_interleaved.py --out benchmarks/results --name cpu_vig_t_interleaved

``vigla bench`` times one model, then the next: on a shared 2-core machine the load moves between those
windows, and single runs of it put ViG-T / DeiT-T between 0.7 and 1.2 for the same code. Here both models
are built once and each round times each model in turn (``--calls`` inference forwards, then ``--steps``
training steps, :func:`vigla.bench.measure.train_step`: forward, cross-entropy, backward, AdamW); a round's
ratio compares times taken seconds apart, and the result is the median of the rounds' ratios (with every
round's figures). Batch ``--batch-size`` at 224, float32, ``torch.get_num_threads()`` threads.
Results: ``OUT/NAME.json`` (the results envelope of :func:`vigla.bench.report.envelope`: a row per round, then
a row ``{"round": "median", "infer_ratio": ..., "train_ratio": ...}``; ratios are ViG-T's throughput over
DeiT-T's).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.cli import build_model  # noqa: E402
from vigla.bench.measure import train_step  # noqa: E402
from vigla.bench.report import envelope, save_complete  # noqa: E402

MODELS = ("vig_tiny", "deit_tiny_patch16_224")


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--calls", type=int, default=3, help="inference forwards per model and round")
    ap.add_argument("--steps", type=int, default=2, help="training steps per model and round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="cpu_vig_t_interleaved")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    torch.manual_seed(0)
    models = {name: build_model(name, 224) for name in MODELS}
    x = torch.randn(args.batch_size, 3, 224, 224)

    def infer(model):
        model.eval()
        with torch.inference_mode():
            model(x)

    steps = {name: train_step(m, args.batch_size, 224, device, amp="none") for name, m in models.items()}
    for name, model in models.items():  # warm-up: first calls, the CPU kernels' builds
        infer(model)
        steps[name]()
    result = envelope(device, dict(models=list(MODELS), batch_size=args.batch_size, img_size=224, dtype="float32",
                                   rounds=args.rounds, calls=args.calls, steps=args.steps,
                                   threads=torch.get_num_threads()))
    for r in range(args.rounds):
        row = {"round": r}
        for name, model in models.items():
            row[f"{name}_infer_ms"] = median_ms(lambda: infer(model), args.calls)
            model.train()
            row[f"{name}_train_ms"] = median_ms(steps[name], args.steps)
        row["infer_ratio"] = row[f"{MODELS[1]}_infer_ms"] / row[f"{MODELS[0]}_infer_ms"]
        row["train_ratio"] = row[f"{MODELS[1]}_train_ms"] / row[f"{MODELS[0]}_train_ms"]
        result["rows"].append(row)
        print(f"round {r}: ViG-T / DeiT-T throughput, inference {row['infer_ratio']:.2f}, training "
              f"{row['train_ratio']:.2f}", flush=True)
    summary = {"round": "median", **{key: statistics.median(row[key] for row in result["rows"])
                                     for key in ("infer_ratio", "train_ratio")}}
    result["rows"].append(summary)
    print(f"median over {args.rounds} rounds: inference {summary['infer_ratio']:.3f}, training "
          f"{summary['train_ratio']:.3f}")
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
