"""The ``vigla`` command: ``vigla train | eval | bench | info``.

Thin by design: each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``main(args) -> int``; this file only parses and dispatches.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("vigla.engine.train_cli", "train a model (default: ViG-T on the embedded Fashion-MNIST)"),
    "eval": ("vigla.engine.eval_cli", "top-1/top-5 of a checkpoint, at one or several resolutions"),
    "bench": ("vigla.bench.cli", "speed, memory and FLOPs against resolution, models side by side"),
    "info": ("vigla.info", "list the registered models, the BiGLA backends and the environment"),
    "export": ("vigla.export", "a checkpoint as ONNX, TorchScript or a torch.export program, checked against PyTorch"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigla", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
