"""ViG-H-T against ConvNeXt-T (same size, 28M parameters) as detection or segmentation backbones, trained with the
same recipe and time budget on the composite data set (Imagenette objects on photo backgrounds).

    PYTHONPATH=. python benchmarks/dense_train.py --task detect --imagenette shared/data/imagenette2-224 \
        --data /tmp/dense_composite --out benchmarks/results --name dense_train_detect

1. The data set (``vigla dense data``: ``--train`` / ``--val`` canvases of ``--canvas`` px; the layout synthetic,
   the pixels real) is written into ``--data`` unless it is there already (it is deterministic).
2. Each of ``--models`` is trained from scratch (no pretrained weights are fetched) by ``python -m vigla dense
   train`` (``--task detect``: Mask R-CNN; ``--task segment``: the semantic FPN) for ``--epochs`` epochs or its
   time slot (``--budget`` split evenly, less a share for the data set), whichever ends first: after the slot it
   gets SIGTERM, saves, and its best checkpoint so far counts (marked "stopped").
3. ``OUT/NAME.json``: the results envelope (:func:`vigla.bench.report.envelope`) with one row per model: the
   best validation metrics (box and mask AP, or mIoU and pixel accuracy), epochs done, training img/s, the
   command; ``OUT/NAME.md`` the table.

``--smoke`` makes it a CPU code-path check (a tiny data set, 64 px, one short epoch): no result for the record.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.gpu_train import run_logged  # noqa: E402

MODELS = ("vig_h_tiny", "convnext_tiny")
METRICS = {"detect": ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50"), "segment": ("miou", "pixel_acc")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="detect", choices=("detect", "segment"))
    p.add_argument("--imagenette", help="Imagenette's tar shards or unpacked folder (to write the data set)")
    p.add_argument("--data", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "vigla_dense_composite"),
                   help="the data set folder (written when it holds no data set)")
    p.add_argument("--train", type=int, default=2000, help="training canvases")
    p.add_argument("--val", type=int, default=500, help="validation canvases")
    p.add_argument("--canvas", type=int, default=384)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4, help="per 16 images")
    p.add_argument("--img-size", type=int, default=384)
    p.add_argument("--budget", type=float, default=520, help="seconds for everything: data and every run")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--name", default=None, help="stem of the JSON and markdown (default: dense_train_TASK)")
    p.add_argument("--runs", default=None, help="where the runs go (default: OUT/runs)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: checks the code path only")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more `vigla dense train` flags for every run (put last)")
    args = p.parse_args(argv)
    if args.smoke:
        args.train, args.val, args.canvas, args.img_size, args.epochs, args.batch_size = 8, 4, 64, 64, 1, 4
        args.device, args.workers = "cpu", 0
        args.extra = ["--warmup-epochs", "0", "--max-size", "64", "--detector-args",
                      '{"rpn_post_nms_top_n_train": 64, "box_batch_size_per_image": 32}', *args.extra]
    args.name = args.name or f"dense_train_{args.task}"
    args.stamp = f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # this invocation's runs folder
    return args


def ensure_data(args) -> tuple[dict, float]:
    """Write the data set unless ``--data`` holds one -> (its description, seconds spent)."""
    start = time.perf_counter()
    ann = Path(args.data) / "val" / "annotations.json"
    if not ann.exists():
        if not args.imagenette:
            raise SystemExit(f"{args.data} holds no data set and no --imagenette was given to write one")
        cmd = [sys.executable, "-m", "vigla", "dense", "data", "--imagenette", args.imagenette, "--out", args.data,
               "--train", str(args.train), "--val", str(args.val), "--canvas", str(args.canvas)]
        done = run_logged(cmd, Path(args.runs or Path(args.out) / "runs") / f"{args.name}_data.log")
        if done["returncode"] != 0:
            raise SystemExit(f"writing the data set failed; see {done['log']}")
    info = json.load(open(ann))["info"]
    return info, time.perf_counter() - start


def train(args, model: str, slot: float) -> dict:
    out = Path(args.runs or Path(args.out) / "runs") / args.stamp / model
    cmd = [sys.executable, "-m", "vigla", "dense", "train", "--task", args.task, "--data", args.data, "--model", model,
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--img-size",
           str(args.img_size), "--device", args.device, "--workers", str(args.workers), "--out", str(out),
           *args.extra]
    print(f"[{args.task}] training {model} (slot {slot:.0f} s)", flush=True)
    run = run_logged(cmd, out / "train.log", slot)
    row = {"task": args.task, "model": model, "run": run, "slot_s": round(slot), "command": " ".join(cmd[1:])}
    best = out / "best.json"
    if not best.exists():
        row["error"] = f"no checkpoint written; see {run['log']}"
        return row
    epochs = list(csv.DictReader(open(out / "metrics.csv")))
    row["epochs_done"] = len(epochs)
    row["train_img_per_s"] = max(float(r["train_img_per_s"]) for r in epochs)
    meta = json.load(open(best))
    row["best_epoch"] = meta["epoch"]
    row["best"] = {k: meta["val"].get(k) for k in METRICS[args.task]}
    row["params_m"] = json.load(open(out / "run.json"))["n_params"] / 1e6
    return row


def markdown(rows: list[dict], meta: dict, task: str) -> str:
    keys = METRICS[task]
    lines = [f"# {task}: backbones trained from scratch on the composite data set ({meta['environment']['device']})",
             "", f"commit `{meta['git']['commit'][:12]}`, command `{meta['command']}`", "",
             "| model | params M | epochs | train img/s | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | - | - | {r['error']} |")
            continue
        cells = " | ".join("-" if r["best"][k] is None else f"{r['best'][k]:.2f}" for k in keys)
        stopped = " (stopped)" if r["run"]["stopped"] else ""
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['epochs_done']}{stopped} | "
                     f"{r['train_img_per_s']:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import torch

    from vigla.bench.report import envelope, write_json

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    info, data_s = ensure_data(args)
    meta = envelope(device, {k: v for k, v in vars(args).items() if k not in ("out", "runs", "name", "stamp")},
                    notes=["trained from scratch (no pretrained weights); the data set's layout is synthetic, its "
                           "pixels real (vigla.dense.synth)", f"data set: {info.get('description')}",
                           f"data set written in {data_s:.0f} s (0: it was there)"])
    rows = meta["rows"]
    for i, model in enumerate(args.models):
        left = args.budget - (time.perf_counter() - start)
        rows.append(train(args, model, max(30.0, left / (len(args.models) - i))))
        write_json(meta, Path(args.out) / f"{args.name}.json")
    meta["settings"]["seconds"] = round(time.perf_counter() - start, 1)
    meta["complete"] = True
    write_json(meta, Path(args.out) / f"{args.name}.json")
    text = markdown(rows, meta, args.task)
    (Path(args.out) / f"{args.name}.md").write_text(text)
    print(text)
    ok = all("error" not in r and r["run"]["returncode"] in (0, 128 + signal.SIGTERM) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
