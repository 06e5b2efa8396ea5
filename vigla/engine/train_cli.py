"""``vigla train``: train a timm / vigla model on an image folder or the embedded Fashion-MNIST."""
from __future__ import annotations

import argparse

from . import distributed as dist_utils
from .config import FIELDS, add_config_arguments, config_changes, read_yaml, resolve_config, saved_config
from .errors import run_command
from .ranks import env_rank, rank_note

EPILOG = """\
examples:
  vigla train                                   ViG-T on Fashion-MNIST: 1.3 min on 2 idle CPU cores (measured)
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
    cfg, state, _ = _build_config(args)
    return cfg, state


def _build_config(args: argparse.Namespace):
    """-> (config, state file or None, the saved settings of the resumed run or None)."""
    from .run import find_resume_state, read_run_config, run_config_path
    from .trainer import Trainer

    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    from_yaml = read_yaml(args.config) if getattr(args, "config", None) else {}
    first = resolve_config(flags, from_yaml)
    if first.resume is None:
        return first, None, None
    state = find_resume_state(first.resume, first.out, first.model, first.data)
    Trainer.check_resume_state(state)
    values = read_run_config(state, "with --config or flags")
    saved = None if values is None else saved_config(values, run_config_path(state))
    return resolve_config(flags, from_yaml, saved, saved_path=run_config_path(state)), state, saved


def main(args: argparse.Namespace) -> int:
    try:
        return run_command("train", _train, args, rank_note())  # an error names the rank that met it
    finally:
        dist_utils.cleanup()


def _train(args: argparse.Namespace) -> int:
    cfg, state, saved = _build_config(args)
    if state is not None and env_rank() == 0:
        if saved is None:
            print(f"resuming {state} (no config.yaml beside it: the settings come from the presets and flags)")
        else:
            changes = config_changes(saved, cfg)
            print(f"resuming {state} with the settings of its config.yaml"
                  + (f"; changed by this command: {', '.join(changes)}" if changes else ""), flush=True)
    from .trainer import Trainer
    return Trainer(cfg, resume_state=state).run()  # Ctrl-C: one line from run_command, in rank 0 only
