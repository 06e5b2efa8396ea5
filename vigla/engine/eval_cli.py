"""``vigla eval``: top-1 / top-5 of a checkpoint at one or several resolutions, as a table and a JSON file
(top-5 with more than 5 classes only: null in the JSON otherwise)."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

EPILOG = """\
examples:
  vigla eval runs/vig_tiny-fmnist/best.safetensors                 Fashion-MNIST test set, training size
  vigla eval runs/x/best.safetensors --data /data/imagenette --img-size 224 448 896
  vigla eval vig_tiny_official.pth --model vig_tiny --data /data/imagenet/val

A vigla checkpoint (.safetensors with its .json) knows its model, classes and preprocessing. Any other
checkpoint (e.g. an official ViG release) needs --model; timm loads it through the model's checkpoint filter.
--data is an ImageFolder (class sub-folders), or a folder holding val/ as for training.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": those helps say what happens instead
        return action.help if action.default is None else super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vigla.data.fmnist import DEFAULT_FMNIST_DIR

    parser.formatter_class = _HelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("checkpoint", help="weights: vigla .safetensors, or any timm-loadable file with --model")
    parser.add_argument("--model", help="timm model name (default: the one in the checkpoint's .json)")
    parser.add_argument("--data", metavar="PATH", help="ImageFolder to evaluate on (default: Fashion-MNIST test)")
    parser.add_argument("--fmnist-dir", default=DEFAULT_FMNIST_DIR, metavar="DIR",
                        help="folder with the Fashion-MNIST .gz files")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="PX",
                        help="one or more resolutions (default: the training resolution)")
    parser.add_argument("--batch-size", type=int, default=128, metavar="N", help="images per forward")
    parser.add_argument("--crop-pct", type=float, metavar="F",
                        help="resize to size / crop_pct, centre-crop (default: as trained)")
    parser.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"),
                        help="resize interpolation (default: as trained)")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="auto = bf16 on CUDA, off on CPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the forward as a CUDA graph captured at --batch-size (the last, "
                             "smaller batch is padded): no per-kernel launch cost at small images")
    parser.add_argument("--workers", type=int, default=-1, metavar="N",
                        help="data loader processes (-1: one per spare core, at most 16; 0 on CPU for Fashion-MNIST)")
    parser.add_argument("--out", metavar="FILE.json", help="where to write the results "
                        "(default: <checkpoint>.eval-<data>.json beside the checkpoint)")


def _eval_source(data: str | None, fmnist_dir: str):
    from vigla.data import load_fashion_mnist, scan_image_folder

    if data is None:
        return load_fashion_mnist(fmnist_dir, "test"), "fashion-mnist test"
    folder = os.path.join(data, "val") if os.path.isdir(os.path.join(data, "val")) else data
    return scan_image_folder(folder, require_all_classes=False), folder


def check_arguments(args: argparse.Namespace):
    """The device, once the flags fit it and the checkpoint exists (before anything is loaded)."""
    from .config import MAX_IMG_SIZE
    from .distributed import setup
    from .errors import CheckpointError, UserError

    device = setup(args.device).device
    if args.cuda_graph and device.type != "cuda":
        raise UserError(f"--cuda-graph needs a CUDA device (this run is on {device.type}); drop the flag")
    if args.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (on CPU use --amp bf16 or off)")
    if not os.path.exists(args.checkpoint):
        raise CheckpointError(f"checkpoint {args.checkpoint} does not exist")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UserError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    bad = [s for s in args.img_size or () if not 1 <= s <= MAX_IMG_SIZE]
    if bad:
        raise UserError(f"--img-size takes sizes in [1, {MAX_IMG_SIZE}], got {bad[0]}")
    if args.workers < -1:
        raise UserError(f"--workers must be -1 (automatic) or >= 0, got {args.workers}")
    return device


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from vigla.data import (BatchPrep, ShardSampler, TransformedDataset, collate, default_workers, eval_transform,
                            stop_workers)

    from .cuda_graph import CudaGraphModel
    from .errors import OutOfMemory, UserError
    from .evaluate import evaluate
    from .modeling import check_runs_at, load_for_eval, set_input_size
    from .precision import amp_dtype

    device = check_arguments(args)
    source, data_name = _eval_source(args.data, args.fmnist_dir)
    model, meta = load_for_eval(args.checkpoint, args.model, num_classes=len(source.classes))
    trained_classes = meta.get("classes")
    if trained_classes is not None and list(trained_classes) != list(source.classes):
        raise UserError(f"{args.checkpoint} was trained on classes {_short(trained_classes)}, the data has "
                        f"{_short(source.classes)}")
    dc = meta["data_config"]
    crop_pct = dc["crop_pct"] if args.crop_pct is None else args.crop_pct
    interpolation = args.interpolation or dc["interpolation"]
    dtype = amp_dtype(args.amp, device)
    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    workers = args.workers if args.workers >= 0 else (
        0 if args.data is None and device.type == "cpu" else default_workers())
    rows = []
    for size in args.img_size or [dc["img_size"]]:
        if not rows:
            model = model.to(device)
        else:  # fresh weights for each size, so position embeddings are resampled once from the original
            model = load_for_eval(args.checkpoint, args.model, num_classes=len(source.classes))[0].to(device)
        set_input_size(model, size, meta["model"])
        check_runs_at(model, meta["model"], size, device, "--img-size")
        dataset = TransformedDataset(source, eval_transform(size, crop_pct=crop_pct, interpolation=interpolation,
                                                            mean=dc["mean"], std=dc["std"]), replace_unreadable=False)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=ShardSampler(len(dataset)),
                            num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                            persistent_workers=workers > 0)
        tty = sys.stderr.isatty()  # a terminal: the bar is cleared before the row; a log: it ends as its own line
        bar = tqdm(total=len(loader), desc=f"eval {size}px", dynamic_ncols=True, leave=not tty,
                   mininterval=1.0 if tty else 30.0)  # (cleared there, it left its text before the next line)
        start = time.perf_counter()
        try:
            runner = CudaGraphModel(model, args.batch_size, dtype) if args.cuda_graph else model
            result = evaluate(runner, loader, BatchPrep(dc["mean"], dc["std"], device), dtype, progress=bar)
        except torch.OutOfMemoryError:
            result = {"error": f"CUDA out of memory at batch size {args.batch_size}; try a smaller --batch-size"}
            torch.cuda.empty_cache()
        except RuntimeError as e:
            if "out of memory" not in str(e):
                raise
            raise OutOfMemory(f"out of memory at batch size {args.batch_size}; try a smaller --batch-size") from None
        finally:
            bar.close()
            stop_workers(loader)
        if "error" not in result:
            result["img_per_s"] = result["images"] / (time.perf_counter() - start)
        if not rows and "error" not in result:  # a Castling checkpoint saved with its auxiliary branch on
            from .aux_branch import eval_switch_check
            result.update(eval_switch_check(model, meta, loader, args, result))
        rows.append({"img_size": size, **result})
        _print_row(rows[-1], header=len(rows) == 1, title=f"{args.checkpoint} ({meta['model']}) on {data_name}, "
                   f"{len(source)} images, crop_pct {crop_pct}, {interpolation}, device {device}, amp {amp}",
                   top5=len(source.classes) > 5)
        if rows[-1].get("unreadable") and len(rows) == 1:
            print(f"warning: {result['unreadable']} of the {len(source)} images could not be read and are left out "
                  f"({result['images']} evaluated): {'; '.join(result['unreadable_files'])}", file=sys.stderr,
                  flush=True)
    return {"checkpoint": args.checkpoint, "model": meta["model"], "data": data_name, "images": len(source),
            "crop_pct": crop_pct, "interpolation": interpolation, "amp": amp,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "results": rows}


def _short(names, n: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)})" if len(names) > n else "")


def _print_row(row: dict, header: bool, title: str, top5: bool = True) -> None:
    """One size's row of the table (the title and the header first); ``top5``: with its column (more than 5
    classes: with fewer every image is in the top 5)."""
    if header:
        print(title)
        print(f"{'size':>6} | {'top-1 %':>8} | " + (f"{'top-5 %':>8} | " if top5 else "") + f"{'loss':>7} | "
              f"{'img/s':>8}")
        print("-" * (50 if top5 else 39))
    if "error" in row:
        print(f"{row['img_size']:>6} | {row['error']}", flush=True)
    else:
        print(f"{row['img_size']:>6} | {row['top1']:8.2f} | " + (f"{row['top5']:8.2f} | " if top5 else "") +
              f"{row['loss']:7.4f} | {row['img_per_s']:8.1f}", flush=True)


def output_path(args: argparse.Namespace) -> str:
    """``--out``, or ``<checkpoint>.eval-<data>.json`` beside the checkpoint (one file per checkpoint and data)."""
    data_tag = "fmnist" if args.data is None else os.path.basename(os.path.normpath(args.data))
    stem = os.path.splitext(os.path.abspath(args.checkpoint))[0]
    return args.out or f"{stem}.eval-{data_tag}.json"


def main(args: argparse.Namespace) -> int:
    from .errors import run_command

    return run_command("eval", _main, args)


def _main(args: argparse.Namespace) -> int:
    from .outputs import check_writable, remove_stale_temp_files, write_text

    check_arguments(args)
    out = output_path(args)
    check_writable(out)  # before minutes of evaluation, not after
    remove_stale_temp_files(os.path.dirname(os.path.abspath(out)), glob.escape(os.path.basename(out)))
    report = evaluate_checkpoint(args)
    write_text(out, json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0
