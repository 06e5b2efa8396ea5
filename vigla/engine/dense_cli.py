"""``vigla dense``: detection and semantic segmentation with vigla's backbones (docs/dense.md).

* ``vigla dense data``: write the composite data set (Imagenette objects pasted onto photo backgrounds; the
  layout synthetic, the pixels real) as COCO json + PNG masks;
* ``vigla dense train``: train a torchvision detector or the segmentation model on a COCO-format folder;
* ``vigla dense eval``: box / mask mAP or mIoU of a checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError, run_command
from .ranks import env_rank, rank_note

EPILOG = """\
examples:
  vigla dense data --imagenette shared/data/imagenette2-224 --out data/composite
  vigla dense train --data data/composite --task detect --detector mask_rcnn --model vig_h_tiny
  vigla dense train --data data/composite --task segment --model convnext_tiny --epochs 24
  vigla dense train --resume auto --out runs/vig_h_tiny-detect-composite     continue a stopped run
  vigla dense eval runs/vig_h_tiny-detect-composite/best.safetensors --data data/composite
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _HelpFormatter
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="dense_command", metavar="ACTION")

    data = sub.add_parser("data", help="write the composite data set (real Imagenette photos, synthetic layout)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_argument("--imagenette", required=True, metavar="DIR",
                      help="Imagenette's tar shards (train-*.tar, val.tar) or its unpacked train/ and val/")
    data.add_argument("--out", required=True, metavar="DIR", help="where train/ and val/ are written")
    data.add_argument("--train", type=int, default=2000, metavar="N", help="training canvases")
    data.add_argument("--val", type=int, default=500, metavar="N", help="validation canvases")
    data.add_argument("--canvas", type=int, default=384, metavar="PX", help="canvas side")
    data.add_argument("--max-objects", type=int, default=4, metavar="N", help="objects per canvas, at most")
    data.add_argument("--min-scale", type=float, default=0.15, metavar="F", help="smallest object side / canvas")
    data.add_argument("--max-scale", type=float, default=0.5, metavar="F", help="largest object side / canvas")
    data.add_argument("--seed", type=int, default=0)

    from vigla.dense.config import add_config_arguments
    train = sub.add_parser("train", help="train a detector or a segmentation model",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Settings: the defaults, then the saved config.yaml of a resumed run, then "
                                       "--config FILE.yaml, then the flags. Ctrl-C or SIGTERM saves and stops; "
                                       "--resume auto continues from the exact step.")
    add_config_arguments(train)

    ev = sub.add_parser("eval", help="box / mask mAP or mIoU of a `vigla dense train` checkpoint",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("checkpoint", help="a .safetensors written by vigla dense train (its .json beside it)")
    ev.add_argument("--data", required=True, metavar="PATH", help="COCO-format folder")
    ev.add_argument("--split", default="val", help="the sub-folder to evaluate")
    ev.add_argument("--batch-size", type=int, default=8, metavar="N")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                    help="autocast: bf16 on CUDA by default, off on CPU")
    ev.add_argument("--workers", type=int, default=0, metavar="N", help="data loader processes")
    ev.add_argument("--out", metavar="FILE", help="also write the metrics as JSON here")
    for p in (data, train, ev):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error instead of its one-line summary")


def main(args: argparse.Namespace) -> int:
    actions = {"data": _data, "train": _train, "eval": _eval}
    action = getattr(args, "dense_command", None)
    if action not in actions:
        print("vigla dense: choose an action: data, train or eval (vigla dense --help)", file=sys.stderr)
        return 2
    return run_command(f"dense {action}", actions[action], args, rank_note())  # an error names its rank


def _data(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vigla.bench.report import command_line
    from vigla.dense.synth import ComposeSettings, check_free, imagenette_pool, make_dataset, split_sizes

    try:
        settings = ComposeSettings(canvas=args.canvas, max_objects=args.max_objects, min_scale=args.min_scale,
                                   max_scale=args.max_scale, seed=args.seed)
        settings.check()
        sizes = split_sizes(args.train, args.val)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_free(args.out, list(sizes))
    pools = {split: imagenette_pool(args.imagenette, split) for split in sizes}
    with tqdm(total=sum(sizes.values()), desc="canvases", mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
        counts = make_dataset(pools, args.out, sizes, settings, info={"command": command_line()},
                              progress=bar.update)
    print(f"wrote {args.out}: " + ", ".join(f"{split}/ {sizes[split]} images, {n} objects"
                                            for split, n in counts.items()))
    return 0


def _train(args: argparse.Namespace) -> int:
    from vigla.dense.config import FIELDS, resolve_config, saved_config
    from vigla.dense.train import DenseTrainer, resume_state_for
    from vigla.engine.config import read_yaml
    from vigla.engine.run import read_run_config, run_config_path

    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    from_file = read_yaml(args.config, FIELDS) if getattr(args, "config", None) else {}
    given = {**from_file, **flags}
    state, saved = None, None
    if given.get("resume"):
        state = resume_state_for(given)
        DenseTrainer.check_resume_state(state)
        values = read_run_config(state, "with --config or flags")
        saved = None if values is None else saved_config(values, run_config_path(state))
    cfg = resolve_config(flags, saved, None if state is None else run_config_path(state), from_file)
    if state is not None and env_rank() == 0:  # once its settings are checked
        print(f"resuming {state}" + (" with the settings of its config.yaml" if saved else ""), flush=True)
    return DenseTrainer(cfg, resume_state=state).run()  # Ctrl-C: one line from run_command, in rank 0 only


def _eval(args: argparse.Namespace) -> int:
    from functools import partial

    import torch
    from torch.utils.data import DataLoader

    from vigla.bench.report import write_json
    from vigla.dense.data import (CocoSplit, DetectionDataset, SegmentationDataset, collate_detection,
                                  collate_segmentation, require_pycocotools)
    from vigla.dense.evaluate import evaluate_detector, evaluate_segmenter
    from vigla.dense.train import load_dense
    from vigla.engine.precision import amp_dtype

    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    require_pycocotools()
    split = CocoSplit(args.data, args.split)
    model, meta = load_dense(args.checkpoint)
    if split.classes != meta["classes"]:
        raise UserError(f"{args.data}/{args.split} has categories {split.classes[:5]}..., the checkpoint "
                        f"{meta['classes'][:5]}...: evaluate on the data it was trained for")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    amp = amp_dtype(args.amp, device)
    model.to(device)
    if meta["task"] == "detect":
        masks = meta["detector"] == "mask_rcnn"
        loader = DataLoader(DetectionDataset(split, masks), batch_size=args.batch_size, num_workers=args.workers,
                            collate_fn=collate_detection)
        result = evaluate_detector(model, loader, split, device, amp, masks)
    else:
        loader = DataLoader(SegmentationDataset(split, meta["img_size"], meta["max_size"]),
                            batch_size=args.batch_size, num_workers=args.workers,
                            collate_fn=partial(collate_segmentation, train=False))
        result = evaluate_segmenter(model, loader, len(meta["classes"]) + 1, device, amp)
    result = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "task": meta["task"],
              "model": meta["model"], "detector": meta["detector"], **result}
    keys = ("box_ap", "box_ap50", "mask_ap", "mask_ap50") if meta["task"] == "detect" else ("miou", "pixel_acc")
    print(f"{meta['task']} {meta['model']} on {result['images']} images of {args.data}/{args.split}: "
          + ", ".join(f"{k} {result[k]:.2f}" for k in keys if result.get(k) is not None))
    if result["unreadable"]:
        print(f"warning: {result['unreadable']} unreadable sample(s) left out: {result['unreadable_files'][0]}",
              file=sys.stderr)
    if args.out:
        write_json(result, Path(args.out))
    return 0
