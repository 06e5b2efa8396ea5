"""Backbone + FPN at high resolution: forward and forward+backward img/s and peak memory against image size.

    PYTHONPATH=. python benchmarks/dense_bench.py --device cuda --amp bf16 --img-size 512 1024 2048 4096 \
        --batch-size 8 2 1 1 --out benchmarks/results --name dense_highres

Each model is wrapped as a detection backbone (:func:`vigla.dense.backbone_with_fpn`: trunk strides 4-32, a
256-channel FPN with its stride-64 "pool" level, as Faster / Mask R-CNN use it): ViG-H-T and ConvNeXt-T, Swin-T
and ResNet-50 by their stages, ViG-T and DeiT-S (``dynamic_img_size``) through the ViTDet simple feature
pyramid. Where the model takes it, it is built for the measured size (``img_size``: ViG's and DeiT's position
embedding laid out for it, Swin's attention windows), with random weights.

Per model and size, on ``[batch, 3, S, S]`` standard-normal images, under ``--amp`` autocast:

* ``infer``: ``eval()`` + ``torch.inference_mode``, ``--warmup`` untimed calls then ``--iters`` timed ones
  (CUDA events; :func:`vigla.bench.measure.time_calls`): median img/s, quartiles, peak memory
  (:class:`vigla.bench.measure.MemoryMeter`: ``max_memory_allocated`` on CUDA, weights and input included);
* ``train``: ``train()``, forward, the mean of every FPN level summed as the loss, backward (no optimizer
  step): img/s and peak memory; ``--grad-checkpointing`` recomputes the trunks' blocks
  (``set_grad_checkpointing``).

An out-of-memory or an error is recorded in its row (``status``) and the run goes on. The results envelope
(:func:`vigla.bench.report.envelope`) is rewritten after every row (``complete`` false until the end), so a
run cut short keeps what it measured; ``OUT/NAME.png`` plots img/s and memory against size.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.measure import MemoryMeter, autocast, free_memory, guarded, summarize, time_calls  # noqa: E402
from vigla.bench.plot import plot_results  # noqa: E402
from vigla.bench.report import add_ratios, envelope, write_json  # noqa: E402
from vigla.dense import backbone_with_fpn  # noqa: E402

MODELS = ["vig_h_tiny", "vig_tiny", "convnext_tiny", "swin_tiny_patch4_window7_224", "resnet50",
          "deit_small_patch16_224"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--img-size", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--batch-size", type=int, nargs="+", default=[8, 2, 1, 1],
                   help="one per --img-size (or one for all)")
    p.add_argument("--baseline", default=None, help="ratios of every model to this one, size by size")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "none"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-train", action="store_true", help="forward only")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the trunks' blocks in training")
    p.add_argument("--fpn-channels", type=int, default=256)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--name", default="dense_highres")
    p.add_argument("--note", action="append", default=[], help="free text stored in the JSON")
    args = p.parse_args(argv)
    if len(args.batch_size) not in (1, len(args.img_size)):
        p.error("--batch-size takes one value, or one per --img-size")
    return args


def build(name: str, size: int, channels: int, grad_checkpointing: bool) -> torch.nn.Module:
    """The backbone + FPN of ``name``, laid out for ``size`` when the model takes an ``img_size``."""
    torch.manual_seed(0)
    try:
        return backbone_with_fpn(name, out_channels=channels, grad_checkpointing=grad_checkpointing, img_size=size)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    return backbone_with_fpn(name, out_channels=channels, grad_checkpointing=grad_checkpointing)


def measure(backbone: torch.nn.Module, x: torch.Tensor, device: torch.device, amp: str, train: bool,
            warmup: int, iters: int, meter: MemoryMeter) -> dict:
    """img/s (:func:`summarize`) and ``peak_mib`` of forward passes, or of forward + backward when ``train``."""
    params = [p for p in backbone.parameters() if p.requires_grad]

    def infer():
        with torch.inference_mode(), autocast(device, amp):
            backbone(x)

    def step():
        with autocast(device, amp):
            out = backbone(x)
        sum(v.float().mean() for v in out.values()).backward()
        for p in params:
            p.grad = None

    backbone.train(train)
    meter.start()
    times, first_ms = time_calls(step if train else infer, device, warmup, iters)
    return {**summarize(times, x.shape[0]), "first_call_ms": first_ms, "peak_mib": meter.peak_mib()}


def run_row(name: str, size: int, batch: int, args, device: torch.device) -> dict:
    free_memory(device)
    meter = MemoryMeter(device)
    row = {"model": name, "img_size": size, "batch_size": batch, "grad_checkpointing": args.grad_checkpointing}
    built = {}

    def make():
        built["bb"] = build(name, size, args.fpn_channels, args.grad_checkpointing).to(device)
        return {"status": "ok"}

    row["build"] = guarded(make, device)
    if "bb" not in built:
        return row
    bb = built["bb"]
    trunk = bb.trunk
    row.update(params_m=sum(p.numel() for p in bb.parameters()) / 1e6,
               trunk="plain + simple pyramid" if trunk.plain else "hierarchical", fpn_channels=bb.out_channels)
    x = torch.randn(batch, 3, size, size, device=device)
    row["infer"] = guarded(lambda: measure(bb, x, device, args.amp, False, args.warmup, args.iters, meter), device)
    if not args.no_train:
        row["train"] = guarded(lambda: measure(bb, x, device, args.amp, True, args.warmup, args.iters, meter),
                               device)
    del bb, built, x
    free_memory(device)
    return row


def _show(row: dict) -> str:
    def cell(m):
        if not m:
            return "-"
        if m.get("status") != "ok":
            return m.get("status", "?").upper()
        return f"{m['img_per_s']:8.2f} img/s {m['peak_mib'] or 0:9.0f} MiB"
    return (f"{row['model']:32} {row['img_size']:5} x{row['batch_size']:<2} infer {cell(row.get('infer'))} | "
            f"train {cell(row.get('train'))}" + ("" if row["build"]["status"] == "ok" else
                                                 f" | build {row['build'].get('error')}"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name", "note")}
    settings.update(compile=False, channels_last=False, task="backbone + FPN (vigla.dense.backbone_with_fpn)")
    result = envelope(device, settings, notes=args.note)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    batches = args.batch_size * len(args.img_size) if len(args.batch_size) == 1 else args.batch_size
    for size, batch in zip(args.img_size, batches):
        for name in args.models:
            row = run_row(name, size, batch, args, device)
            result["rows"].append(row)
            print(_show(row), flush=True)
            if args.baseline:
                add_ratios(result["rows"], args.baseline)
            write_json(result, path)
    result["complete"] = True
    write_json(result, path)
    plot_results(result, out / f"{args.name}.png")
    print(f"wrote {path} and {args.name}.png")
    failed = [r for r in result["rows"] if r["build"]["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
