"""Choosing Castling-ViT's auxiliary-branch schedule: a small Castling model on Fashion-MNIST, on the CPU.

    python benchmarks/castling_schedule_cpu.py    # hours on 1 thread: benchmarks/results/castling_schedule_cpu.json

The paper (You et al., CVPR 2023, abstract) trains with an auxiliary masked softmax whose masks "are regularized
to gradually become zeros", then drops it at inference. Its regulariser and schedule are not published, and the
official code has neither (the ``official`` schedule). This sweep trains one small Castling model per schedule
with the same data, seed and recipe and records, after every epoch, validation top-1 with the branch on and off
(both in eval mode, :func:`vigla.models.castling.evaluate_aux_switch`), the mask density and kept mass on the
validation set, and at the end top-1 on held-out test images with the branch off (what inference runs).

The model keeps DeiT's token count: 28x28 images in 2x2 patches are 196 patches + cls = 197 tokens, as DeiT at
224 px, so ε = 0.02 is 4x the uniform attention weight, as there (C 64, 4 blocks, 2 heads). Each schedule is a
:func:`vigla.models.castling.parse_aux_schedule` spec, ``none`` for a model without the branch.
Results: ``OUT/NAME.json`` (the results envelope of :func:`vigla.bench.report.envelope`, a row per schedule)
and ``OUT/NAME.png`` (on/off accuracy and density per epoch).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vigla.bench.report import envelope, write_json  # noqa: E402
from vigla.data.fmnist import DEFAULT_FMNIST_DIR, load_fashion_mnist  # noqa: E402
from vigla.models.castling import CastlingVisionTransformer, evaluate_aux_switch  # noqa: E402

SCHEDULES = ["official", "none", "official,aux_off=0.8", "lambda=0.1,aux_off=0.8", "lambda=1,aux_off=0.8",
             "lambda=1,aux_off=0.9"]
MODEL = dict(img_size=28, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=2, num_classes=10,
             qkv_bias=True)
MEAN, STD = 0.286, 0.353


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--schedules", nargs="+", default=SCHEDULES, help="schedule specs, one run each")
    p.add_argument("--fmnist-dir", default=DEFAULT_FMNIST_DIR)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train", type=int, default=4000, help="training images (a fixed pick of the train file)")
    p.add_argument("--val", type=int, default=1000, help="validation images (held out of the train file)")
    p.add_argument("--test", type=int, default=2000, help="test images (a fixed pick of the test file)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    p.add_argument("--name", default="castling_schedule_cpu", help="stem of the JSON and PNG files")
    return p.parse_args(argv)


def _tensors(source, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([source.images[i] for i in indices])).float().div(255)
    return ((images - MEAN) / STD)[:, None], torch.from_numpy(source.targets[indices])


def load_data(args) -> dict:
    rng = np.random.default_rng(args.seed)
    train_file, test_file = load_fashion_mnist(args.fmnist_dir, "train"), load_fashion_mnist(args.fmnist_dir, "test")
    pick = rng.permutation(len(train_file))[: args.train + args.val]
    return {"train": _tensors(train_file, pick[: args.train]), "val": _tensors(train_file, pick[args.train:]),
            "test": _tensors(test_file, rng.permutation(len(test_file))[: args.test])}


def batches(data: tuple[torch.Tensor, torch.Tensor], batch_size: int):
    x, y = data
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def lr_at(step: int, total: int, warmup: int, peak: float, floor: float = 1e-5) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_one(spec: str, data: dict, args) -> dict:
    torch.manual_seed(args.seed)
    model = CastlingVisionTransformer(**MODEL, aux=spec != "none",
                                      **({} if spec == "none" else dict(aux_schedule=spec)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    x_all, y_all = data["train"]
    steps_per_epoch = len(y_all) // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch // 2
    gen = torch.Generator().manual_seed(args.seed)
    epochs, step, start = [], 0, time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_all), generator=gen)
        sums = dict(loss=0.0, aux_loss=0.0, density=0.0, steps=0)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = x_all[idx], y_all[idx]
            flip = torch.rand(len(y), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            model.set_aux_progress(step / total)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, args.lr)
            ce = F.cross_entropy(model(x), y, label_smoothing=0.1)
            aux = model.aux_loss()
            opt.zero_grad(set_to_none=True)
            (ce + aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            stats = model.aux_stats()
            sums["loss"] += ce.item()
            sums["aux_loss"] += aux.item()
            sums["density"] += stats.get("mask_density_mean", 0.0)
            sums["steps"] += 1
        n = sums.pop("steps")
        row = {"epoch": epoch + 1, "progress": step / total, "aux_on": bool(model.aux_state()["aux_on"]),
               "lambda": model.aux_stats()["aux_lambda"], "train_loss": sums["loss"] / n,
               "train_aux_loss": sums["aux_loss"] / n, "train_mask_density": sums["density"] / n,
               "seconds": round(time.perf_counter() - start, 1)}
        row.update({f"val_{k}": v for k, v in evaluate_aux_switch(model, batches(data["val"], 250)).items()})
        epochs.append(row)
        print(f"  [{spec}] epoch {epoch + 1}: loss {row['train_loss']:.3f} aux {row['train_aux_loss']:.4f} "
              f"branch {'on ' if row['aux_on'] else 'off'} | val on {row['val_top1_aux_on']:.2f} off "
              f"{row['val_top1_aux_off']:.2f} density {row['val_mask_density']:.4f} kept "
              f"{row['val_kept_mass']:.4f} | {row['seconds']:.0f}s", flush=True)
    test = evaluate_aux_switch(model, batches(data["test"], 250))
    return {"schedule": spec, "schedule_fields": None if spec == "none" else model.aux_state()["schedule"],
            "epochs": epochs, "test": test, "train_seconds": round(time.perf_counter() - start, 1)}


def summary(rows: list[dict]) -> str:
    lines = [f"{'schedule':28s} {'val on@last-on':>14s} {'val off@last-on':>15s} {'density@last-on':>15s} "
             f"{'val off end':>11s} {'test off':>8s} {'test on':>7s}"]
    for r in rows:
        on_rows = [e for e in r["epochs"] if e["aux_on"]] or r["epochs"][-1:]
        last_on, end = on_rows[-1], r["epochs"][-1]
        lines.append(f"{r['schedule']:28s} {last_on['val_top1_aux_on']:14.2f} {last_on['val_top1_aux_off']:15.2f} "
                     f"{last_on['val_mask_density']:15.4f} {end['val_top1_aux_off']:11.2f} "
                     f"{r['test']['top1_aux_off']:8.2f} {r['test']['top1_aux_on']:7.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_den) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        x = [e["epoch"] for e in r["epochs"]]
        line, = ax_acc.plot(x, [e["val_top1_aux_off"] for e in r["epochs"]], "o-", ms=3, label=f"{r['schedule']}")
        ax_acc.plot(x, [e["val_top1_aux_on"] for e in r["epochs"]], "--", color=line.get_color(), lw=0.8)
        ax_den.plot(x, [e["val_mask_density"] for e in r["epochs"]], "o-", ms=3, color=line.get_color())
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="branch off (solid) and on (dashed), eval mode")
    ax_den.set(xlabel="epoch", ylabel="mask density", title="validation mask density (branch forced on)")
    ax_den.set_yscale("symlog", linthresh=1e-4)
    for ax in (ax_acc, ax_den):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    result = envelope(torch.device("cpu"), dict(settings, model=MODEL, what="schedule sweep, Fashion-MNIST"))
    result["notes"] = [f"load average at the start: {os.getloadavg()}"]
    data = load_data(args)
    for spec in args.schedules:
        print(f"schedule {spec}", flush=True)
        result["rows"].append(train_one(spec, data, args))
        write_json(result, out / f"{args.name}.json")  # partial results survive an interruption
    result["complete"] = True
    result["notes"].append(f"load average at the end: {os.getloadavg()}")
    write_json(result, out / f"{args.name}.json")
    plot(result["rows"], out / f"{args.name}.png")
    print(summary(result["rows"]))
    print(f"wrote {out / args.name}.json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
