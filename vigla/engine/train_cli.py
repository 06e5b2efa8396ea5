"""``vigla train``: train a timm / vigla model on an image folder or the embedded Fashion-MNIST."""
from __future__ import annotations

import argparse
import os
import sys

from . import distributed as dist_utils
from .config import FIELDS, add_config_arguments, read_yaml, resolve_config, saved_config
from .errors import RUN_ERRORS, exit_code

EPILOG = """\
examples:
  vigla train                                   ViG-T on Fashion-MNIST, about 10 min on 2 CPU cores
  vigla train --data /data/imagenette --model deit_tiny_patch16_224 --epochs 100 --batch-size 128
  vigla train --config my.yaml --lr 5e-4        a YAML file of settings, one flag overriding it
  vigla train --resume auto --out runs/vig_tiny-fmnist     continue a stopped run where it stopped
  torchrun --nproc_per_node=8 -m vigla train --data /data/imagenet      one process per GPU (DDP)

Settings come from, lowest first: the preset (recipe = the ViG ImageNet recipe; fmnist-quick = the default
run), the saved config.yaml of a resumed run, --config FILE.yaml, then the flags. The learning rates are per
512 images and scale with the global batch (batch size x processes). Each run writes config.yaml, run.json,
metrics.csv, steps.csv, curves.png, results.json and last/best checkpoints (.safetensors + .json) into its
output folder; Ctrl-C or SIGTERM saves and stops, and --resume auto continues from the exact step.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _HelpFormatter
    parser.epilog = EPILOG
    add_config_arguments(parser)


def build_config(args: argparse.Namespace):
    """-> (resolved TrainConfig, the state file to resume from or None)."""
    from .trainer import find_resume_state

    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    from_yaml = read_yaml(args.config) if getattr(args, "config", None) else {}
    first = resolve_config(flags, from_yaml)
    if first.resume is None:
        return first, None
    state = find_resume_state(first.resume, first.out, first.model, first.data)
    saved_path = os.path.join(os.path.dirname(state), "config.yaml")
    saved = saved_config(open(saved_path).read()) if os.path.isfile(saved_path) else None
    return resolve_config(flags, from_yaml, saved), state


def main(args: argparse.Namespace) -> int:
    rank = os.environ.get("RANK")
    try:
        cfg, state = build_config(args)
        from .trainer import Trainer
        return Trainer(cfg, resume_state=state).run()
    except RUN_ERRORS as e:
        print(f"error{f' (rank {rank})' if rank not in (None, '0') else ''}: {e}", file=sys.stderr, flush=True)
        return exit_code(e)
    except KeyboardInterrupt:
        print("aborted without saving", file=sys.stderr)
        return 130
    finally:
        dist_utils.cleanup()
