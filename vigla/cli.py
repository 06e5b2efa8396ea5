"""The ``vigla`` command: ``vigla train | eval | bench | info | export``.

Thin by design: each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``main(args) -> int``; this file only parses and dispatches.
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing
import sys

COMMANDS = {
    "train": ("vigla.engine.train_cli", "train a model (default: ViG-T on the embedded Fashion-MNIST)"),
    "eval": ("vigla.engine.eval_cli", "top-1/top-5 of a checkpoint, at one or several resolutions"),
    "bench": ("vigla.bench.cli", "speed, memory and FLOPs against resolution, models side by side"),
    "info": ("vigla.info", "list the registered models, the BiGLA backends and the environment"),
    "export": ("vigla.export", "a checkpoint as ONNX, TorchScript or a torch.export program, checked against PyTorch"),
    "dense": ("vigla.engine.dense_cli", "detection and segmentation: composite data set, training, box/mask mAP, mIoU"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigla", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
        if "--debug" not in p._option_string_actions:  # a command may word its own
            p.add_argument("--debug", action="store_true",
                           help="show the full traceback of an error instead of its one-line summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the subcommand -> its exit code.

    Called as the program (``argv`` None), it also ends any worker process still alive afterwards:
    data-loader workers ignore SIGTERM (the main process owns the signal), so the ``terminate()`` that
    multiprocessing sends at exit would leave the process waiting for them forever."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    finally:
        if argv is None:
            end_worker_processes()


def end_worker_processes() -> None:
    """Kill the daemonic ``multiprocessing`` children still alive: those multiprocessing would terminate at
    exit, killed with a signal they cannot ignore. (The commands shut their loaders down themselves; this is
    the last line, for a worker some path left behind.)"""
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join(1.0)


if __name__ == "__main__":
    sys.exit(main())
