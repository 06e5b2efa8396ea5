"""The ``vigla`` command: ``vigla train | eval | bench | info | export``.

Thin by design: each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``main(args) -> int``; this file only parses and dispatches.
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import re
import sys

from .engine.host_memory import keep_freed_memory
from .engine.ranks import tell_once

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


#: the exit code of a run ended by Ctrl-C (128 + SIGINT, as a shell reports a process that SIGINT ended)
INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the subcommand -> its exit code.

    Called as the program (``argv`` None), it also ends any worker process still alive afterwards:
    data-loader workers ignore SIGTERM (the main process owns the signal), so the ``terminate()`` that
    multiprocessing sends at exit would leave the process waiting for them forever. Ctrl-C anywhere in it (the
    commands' imports, the parsing) ends it with one line (from rank 0 of a ``torchrun`` job, whose processes torchrun
    passes Ctrl-C to each) and :data:`INTERRUPTED`; with ``--debug``, with its traceback."""
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        keep_freed_memory()  # CPU steps reuse the activations they free (vigla.engine.host_memory)
        try:
            return int(importlib.import_module(args._module).main(args) or 0)
        finally:
            if argv is None:
                end_worker_processes()
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        command = f" {args.command}" if getattr(args, "command", None) else ""
        tell_once(f"vigla{command}: interrupted")
        return INTERRUPTED


def interrupted_while_importing() -> None:
    """Called on Ctrl-C during ``import vigla`` (torch and timm load for seconds, longer under torchrun), which
    runs before :func:`main` can catch anything: in the ``vigla`` command (its console script, or ``python -m
    vigla`` as torchrun starts it) it prints one line (rank 0 of a torchrun job) and exits with :data:`INTERRUPTED`
    (Python printed the import's traceback); in a program that imports vigla it returns, and the
    ``KeyboardInterrupt`` goes on."""
    if started_as_the_command():
        tell_once("vigla: interrupted")
        raise SystemExit(INTERRUPTED)


def started_as_the_command() -> bool:
    """Whether this process is the ``vigla`` command: its console script (``vigla``, ``vigla.exe``,
    ``vigla-script.py``), or ``python -m vigla`` / ``-m vigla.<module>`` (while Python imports the package to find
    the module, ``sys.argv[0]`` is ``-m``; ``sys.orig_argv`` names the module)."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    if re.fullmatch(r"vigla(\.exe|-script\.pyw?)?", name):
        return True
    argv = getattr(sys, "orig_argv", [])
    module = next((b for a, b in zip(argv, argv[1:]) if a == "-m"), "")
    return name == "-m" and module.split(".")[0] == "vigla"


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
