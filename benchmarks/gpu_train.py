"""ViG-T vs DeiT-T trained with the same recipe and budget, then evaluated at 1x, 2x and 4x the training size.

One command on one GPU (under 8 minutes on an H100 with the defaults), from the repository root
(``python -m benchmarks train`` runs it with the data it finds):

    PYTHONPATH=. python benchmarks/gpu_train.py --imagenette /data/imagenette --fmnist-dir /data/fmnist

* Imagenette (ImageFolder with train/ and val/, 10 classes): decoded into memory once per run, the official
  ViG ImageNet recipe (hustvl/ViG's configs: AdamW, cosine with warm-up, RandAugment, Mixup/CutMix,
  RandomErasing, label smoothing, EMA) shortened to ``--in-epochs`` epochs at ``--in-img`` px.
* Fashion-MNIST (the four .gz files in ``--fmnist-dir``): the ``fmnist-quick`` preset's light augmentation on
  55000 training images (5000 held out for validation) for ``--fm-epochs`` epochs at ``--fm-img`` px, with a
  learning rate for its larger batch; tested on all 10000 test images.

Each run is ``python -m vigla train`` (log, metrics.csv, curves.png, checkpoints under ``RUNS/<data>/<model>/``),
then ``python -m vigla eval`` of its best checkpoint at 1x, 2x and 4x. Each training run gets a time slot
(``--in-slot`` / ``--fm-slot``, shrunk in proportion when needed so that everything fits in ``--budget``); a run
that outlives it gets SIGTERM, saves, and its best checkpoint so far is evaluated (marked "stopped").
Results: ``OUT/NAME.json`` (the results envelope of :func:`vigla.bench.report.envelope`, a row per training
run) and ``OUT/NAME.md``, curves side by side in ``OUT/NAME_<data>.png``. Scale with ``--in-epochs``,
``--fm-epochs``, the image sizes and ``--budget``.

DDP smoke test on the 2-GPU machine (about a minute; logs, run folder and ``ddp_smoke.json`` under
``RUNS/ddp_smoke``)::

    PYTHONPATH=. python benchmarks/gpu_train.py --ddp-smoke --fmnist-dir /data/fmnist

It runs ``torchrun --standalone --nproc_per_node=2 -m vigla train`` (ViG-T, 20000 Fashion-MNIST images, 2 epochs),
then ``--resume auto --epochs 3`` under torchrun again, and checks the world size and that the resumed run
continued to epoch 3 (``ddp_smoke.json``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = ("vig_tiny", "deit_tiny_patch16_224")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--imagenette", help="ImageFolder root with train/ and val/ (skipped when not given)")
    p.add_argument("--fmnist-dir", help="folder with the four Fashion-MNIST .gz files (skipped when not given)")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_train_out"), help="output folder ($OUT)")
    p.add_argument("--name", default="train_compare", help="stem of the JSON, markdown and PNG files")
    p.add_argument("--runs", default=None, help="where the training runs go (checkpoints, logs); default: OUT/runs")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="(--ddp-smoke trains the first)")
    p.add_argument("--in-epochs", type=int, default=20)
    p.add_argument("--in-warmup", type=float, default=2)
    p.add_argument("--in-img", type=int, default=224)
    p.add_argument("--in-batch", type=int, default=256, help="per GPU")
    p.add_argument("--in-lr", type=float, default=2e-3, help="per 512 images")
    p.add_argument("--in-slot", type=float, default=150, help="seconds a training run may take before SIGTERM")
    p.add_argument("--fm-epochs", type=int, default=6)
    p.add_argument("--fm-img", type=int, default=64)
    p.add_argument("--fm-batch", type=int, default=256, help="per GPU")
    p.add_argument("--fm-lr", type=float, default=2e-3, help="per 512 images")
    p.add_argument("--fm-slot", type=float, default=60, help="seconds a training run may take before SIGTERM")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole script: the training slots "
                   "shrink (in proportion) so that all runs and evaluations fit")
    p.add_argument("--eval-reserve", type=float, default=35, help="seconds kept for each evaluation")
    p.add_argument("--workers", type=int, default=12, help="data loader processes")
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more `vigla train` flags for every run (put last)")
    p.add_argument("--ddp-smoke", action="store_true", help="only the 2-process torchrun smoke test")
    return p.parse_args(argv)


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")


def run_logged(cmd: list[str], log: Path, slot: float | None = None) -> dict:
    """Run ``cmd`` with its output in ``log``; SIGTERM it after ``slot`` seconds (it saves and exits)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=_env())
        stopped = False
        try:
            proc.wait(timeout=slot)
        except subprocess.TimeoutExpired:
            stopped = True
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    seconds = time.perf_counter() - start
    print(f"  {'stopped' if stopped else 'done'} in {seconds:.0f}s (exit {proc.returncode}): {log}", flush=True)
    return {"seconds": round(seconds, 1), "returncode": proc.returncode, "stopped": stopped, "log": str(log)}


def train_and_eval(args, data: str, model: str, train_flags: list[str], eval_data: list[str], img: int,
                   slot: float) -> dict:
    out = Path(args.runs or Path(args.out) / "runs") / data / model
    if (out / "last.state.pt").exists():
        raise SystemExit(f"{out} already holds a run: choose another --out")
    cmd = [sys.executable, "-m", "vigla", "train", "--model", model, "--out", str(out), "--device", args.device,
           "--workers", str(args.workers), *train_flags, *(["--compile"] if args.compile else []), *args.extra]
    print(f"[{data}] training {model}", flush=True)
    train = run_logged(cmd, out / "train.log", slot)
    row = {"data": data, "model": model, "train": train, "slot_s": round(slot), "train_cmd": " ".join(cmd[1:])}
    best = out / "best.safetensors"
    if not best.exists():
        row["error"] = f"no checkpoint written; see {train['log']}"
        return row
    metrics = list(csv.DictReader(open(out / "metrics.csv")))
    row["epochs_done"] = len(metrics)
    row["val_top1_per_epoch"] = [round(float(r["val_top1"]), 2) for r in metrics]
    row["ema_val_top1_per_epoch"] = [round(float(r["ema_val_top1"]), 2) for r in metrics
                                     if r["ema_val_top1"] != "nan"]
    row["train_img_per_s"] = max(float(r["train_img_per_s"]) for r in metrics)
    row["best"] = json.load(open(out / "best.json"))["val"]
    if (out / "results.json").exists():
        row["test"] = json.load(open(out / "results.json"))["test"]
    sizes = [img, 2 * img, 4 * img]
    ecmd = [sys.executable, "-m", "vigla", "eval", str(best), *eval_data, "--img-size", *map(str, sizes),
            "--batch-size", str(args.eval_batch), "--device", args.device, "--workers", str(args.workers),
            "--out", str(out / "eval.json")]
    print(f"[{data}] evaluating {model} at {sizes}", flush=True)
    row["eval_run"] = run_logged(ecmd, out / "eval.log")
    if (out / "eval.json").exists():
        row["eval"] = json.load(open(out / "eval.json"))["results"]
    return row


def plot_pair(rows: list[dict], data: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        out = Path(row["train"]["log"]).parent
        if not (out / "metrics.csv").exists():
            continue
        steps = list(csv.DictReader(open(out / "steps.csv"))) if (out / "steps.csv").exists() else []
        epochs = list(csv.DictReader(open(out / "metrics.csv")))
        ax_loss.plot([float(r["epoch_progress"]) for r in steps], [float(r["loss"]) for r in steps], lw=0.8,
                     label=row["model"])
        x = [int(r["epoch"]) + 1 for r in epochs]
        line, = ax_acc.plot(x, [float(r["val_top1"]) for r in epochs], "o-", label=f"{row['model']}")
        ema = [float(r["ema_val_top1"]) for r in epochs]
        if all(v == v for v in ema):  # not NaN: EMA on
            ax_acc.plot(x, ema, "--", color=line.get_color(), label=f"{row['model']} EMA")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"{data}: training loss")
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title=f"{data}: validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# ViG-T vs DeiT-T, same recipe and budget ({meta['environment']['device']})", "",
             f"commit `{meta['git']['commit'][:12]}`, command `{meta['command']}`", "",
             "| data | model | epochs | train s | train img/s | best val top-1 | test top-1 "
             "| eval top-1 @1x / 2x / 4x |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['data']} | {r['model']} | - | {r['train']['seconds']} | - | - | - | {r['error']} |")
            continue
        ev = " / ".join(f"{e['top1']:.2f} ({e['img_size']})" if "top1" in e else f"{e.get('error', '?')} "
                        f"({e['img_size']})" for e in r.get("eval", []))
        test = f"{r['test']['top1']:.2f}" if "test" in r else "-"
        stopped = " (stopped)" if r["train"]["stopped"] else ""
        lines.append(f"| {r['data']} | {r['model']} | {r['epochs_done']}{stopped} | {r['train']['seconds']} | "
                     f"{r['train_img_per_s']:.0f} | {r['best']['top1']:.2f} | {test} | {ev} |")
    return "\n".join(lines) + "\n"


def ddp_smoke(args) -> int:
    out = Path(args.runs or Path(args.out) / "runs") / "ddp_smoke"
    run_dir = out / "run"
    common = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vigla",
              "train", "--fmnist-dir", args.fmnist_dir, "--out", str(run_dir), "--device", args.device]
    first = run_logged(common + ["--model", args.models[0], "--epochs", "2", "--train-subset", "20000",
                                 "--val-subset", "2000", "--batch-size", "128", "--img-size", "64", "--workers", "4",
                                 *args.extra], out / "ddp_first.log", slot=None)
    state_after_first = _state_summary(run_dir)
    # the first run trains 2 epochs; resuming with --epochs 3 must continue from its last step under torchrun
    second = run_logged(common + ["--resume", "auto", "--epochs", "3"], out / "ddp_resume.log", slot=None)
    result = {"first": first, "resume": second, "state_after_first": state_after_first,
              "state_after_resume": _state_summary(run_dir)}
    run_info = json.load(open(run_dir / "run.json")) if (run_dir / "run.json").exists() else {}
    result["ok"] = (first["returncode"] == 0 and second["returncode"] == 0 and run_info.get("world_size") == 2
                    and result["state_after_resume"].get("epoch") == 3)
    (out / "ddp_smoke.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def _state_summary(run_dir: Path) -> dict:
    from vigla.engine.checkpoint import load_state
    path = run_dir / "last.state.pt"
    if not path.exists():
        return {}
    s = load_state(str(path))
    return {k: s[k] for k in ("epoch", "step_in_epoch", "global_step", "world_size", "global_batch")}


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.ddp_smoke:
        if not args.fmnist_dir:
            raise SystemExit("--ddp-smoke needs --fmnist-dir")
        return ddp_smoke(args)
    import torch

    from vigla.bench.report import envelope, write_json

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    meta = envelope(device, {k: v for k, v in vars(args).items() if k not in ("out", "runs", "name")})
    start, rows = time.perf_counter(), meta["rows"]
    plans = []
    if args.imagenette:
        flags = ["--data", args.imagenette, "--in-memory", "--preset", "recipe", "--epochs", str(args.in_epochs),
                 "--warmup-epochs", str(args.in_warmup), "--img-size", str(args.in_img), "--batch-size",
                 str(args.in_batch), "--lr", str(args.in_lr), "--ema-decay", "0.999", "--ema-warmup",
                 "--log-interval", "20"]
        plans.append(("imagenette", flags, ["--data", args.imagenette], args.in_img, args.in_slot))
    if args.fmnist_dir:
        flags = ["--fmnist-dir", args.fmnist_dir, "--preset", "fmnist-quick", "--train-subset", "0",
                 "--val-subset", "5000", "--test-subset", "0", "--epochs", str(args.fm_epochs), "--warmup-epochs",
                 "0.5", "--img-size", str(args.fm_img), "--batch-size", str(args.fm_batch), "--lr", str(args.fm_lr),
                 "--warmup-lr", "1e-5", "--min-lr", "1e-5", "--log-interval", "20"]
        plans.append(("fashion-mnist", flags, ["--fmnist-dir", args.fmnist_dir], args.fm_img, args.fm_slot))
    if not plans:
        raise SystemExit("nothing to do: give --imagenette and/or --fmnist-dir")
    slots_left = [slot for *_, slot in plans for _ in args.models]
    for data, flags, eval_data, img, slot in plans:
        pair = []
        for model in args.models:
            remaining = args.budget - (time.perf_counter() - start) - args.eval_reserve * len(slots_left)
            fitted = max(30.0, min(slot, remaining * slot / sum(slots_left)))
            slots_left.pop(0)
            pair.append(train_and_eval(args, data, model, flags, eval_data, img, fitted))
        rows += pair
        plot_pair(pair, data, Path(args.out) / f"{args.name}_{data}.png")
    meta["settings"]["seconds"] = round(time.perf_counter() - start, 1)
    meta["complete"] = True
    write_json(meta, Path(args.out) / f"{args.name}.json")
    (Path(args.out) / f"{args.name}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    print(f"total {meta['settings']['seconds']:.0f}s; wrote {args.out}/{args.name}.json, .md, _*.png")
    return 0 if all("error" not in r and r["train"]["returncode"] in (0, 128 + signal.SIGTERM) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
