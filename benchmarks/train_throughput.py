"""``vigla train`` eager against ``vigla train --cuda-graph``: the training loop's img/s, ViG-T and DeiT-T.

    python benchmarks/train_throughput.py --fmnist-dir /usr/share/datasets/fashion-mnist --out OUT

``vigla bench --cuda-graph --train`` times one training step alone; this times the whole loop a user
runs: the data loader, augmentation, the step, the schedule and the loss read-backs, as ``vigla train``
reports them. Each (model, mode) is one ``python -m vigla train`` on Fashion-MNIST (its ``fmnist-quick``
preset's light augmentation; the 28 px images resized to ``--img-size``) for two epochs of
``--train-subset`` images; the second epoch's ``train_img_per_s`` (metrics.csv) is the figure, so that
kernel compilation, the first steps and the capture stay out of it. Results: ``OUT/NAME.json`` (the
results envelope: a row per model and mode, the run's top-1 on ``--test-subset`` test images as a
check that it trained, and ``graph_speedup``: --cuda-graph's img/s over eager's for that model).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

from vigla.bench.report import envelope, save_complete  # noqa: E402

MODES = {"eager": [], "cuda_graph": ["--cuda-graph"]}


def train(model: str, mode: str, args, runs: str) -> dict:
    """One ``vigla train`` run -> its row (second epoch's img/s, test top-1, wall seconds)."""
    out = os.path.join(runs, f"{model}-{mode}")
    argv = [sys.executable, "-m", "vigla", "train", "--fmnist-dir", args.fmnist_dir, "--model", model,
            "--img-size", str(args.img_size), "--batch-size", str(args.batch_size), "--epochs", "2",
            "--warmup-epochs", "0.5", "--train-subset", str(args.train_subset), "--val-subset", "512",
            "--test-subset", str(args.test_subset), "--log-interval", "50", "--out", out, *MODES[mode],
            *(["--workers", str(args.workers)] if args.workers is not None else [])]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"train_throughput: {' '.join(argv[2:])} failed ({proc.returncode}): "
                         f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    results = json.load(open(os.path.join(out, "results.json")))
    return {"model": model, "mode": mode, "img_size": args.img_size, "batch_size": args.batch_size,
            "steps_per_epoch": int(rows[-1]["global_step"]) // 2,
            "img_per_s": float(rows[-1]["train_img_per_s"]), "first_epoch_img_per_s": float(rows[0]["train_img_per_s"]),
            "test_top1": results["test"]["top1"], "wall_s": round(wall, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmnist-dir", required=True, help="folder with the four Fashion-MNIST .gz files")
    ap.add_argument("--models", nargs="+", default=["vig_tiny", "deit_tiny_patch16_224"])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-subset", type=int, default=25600, help="images per epoch")
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=None, help="loader processes (default: vigla train's)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="train_cuda_graph")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("train_throughput: needs a CUDA GPU (--cuda-graph replays on one)", file=sys.stderr)
        return 2
    result = envelope(torch.device("cuda"), {k: v for k, v in vars(args).items() if k not in ("out", "name")})
    with tempfile.TemporaryDirectory() as runs:
        for model in args.models:
            rows = {mode: train(model, mode, args, runs) for mode in MODES}
            rows["cuda_graph"]["graph_speedup"] = rows["cuda_graph"]["img_per_s"] / rows["eager"]["img_per_s"]
            for row in rows.values():
                print(f"{model} {row['mode']}: {row['img_per_s']:,.0f} img/s (2nd epoch), test top-1 "
                      f"{row['test_top1']:.1f}%", flush=True)
                result["rows"].append(row)
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
