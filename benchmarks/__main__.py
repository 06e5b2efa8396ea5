"""``python -m benchmarks``: every benchmark of vigla, by named suite; the results' index and write-up.

    python -m benchmarks SUITE [PART ...] [--out DIR] [--dry-run] [--smoke] [-- ARGS ...]
    python -m benchmarks index [--check]        # benchmarks/results/INDEX.md
    python -m benchmarks summarize [--check]    # docs/performance.md and the README's summary table

Each suite part fits one 10-minute call on one H200; with no PART every part runs, in order. On a
copied tree without its git history set ``VIGLA_COMMIT=<commit>``; optional wheels (fla-core) go in
``.whl/``. See docs/bench.md.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from . import runner
from .suites import ROOT, SUITES, Options, plan, train_data

RESULTS = ROOT / "benchmarks" / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUITE|index|summarize")
    for s in SUITES.values():
        parts = "\n".join(f"  {name:14} {what}" for name, (what, _) in s.parts.items())
        p = sub.add_parser(s.name, help=s.help, description=f"{s.help}\n\nparts:\n{parts}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("parts", nargs="*", metavar="PART",
                       help=f"parts to run: {', '.join(s.parts)} (default: all, in order)")
        p.add_argument("--out", type=Path, default=RESULTS, help="where the results go (default: %(default)s)")
        p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        p.add_argument("--tail", type=int, default=20, help="lines of each step's log to print when it ends")
        if s.smoke:
            p.add_argument("--smoke", action="store_true",
                           help="tiny sizes on the CPU: checks the code path (not a result for the record: "
                                "without --out its files go to a temporary folder)")
        if s.name in ("train", "castling"):
            p.add_argument("--imagenette", type=Path, default=None,
                           help="Imagenette: an ImageFolder root (train/, val/) or the folder of its tar "
                                "shards (default: shared/data/imagenette2-224 when present)")
            p.add_argument("--train-shards", type=int, default=1, choices=[1, 2, 3],
                           help="with the tar shards: how many train shards to unpack")
        if s.name == "train":
            p.add_argument("--fmnist-dir", type=Path, default=None,
                           help="Fashion-MNIST's four .gz files (default: /usr/share/datasets/fashion-mnist "
                                "when present)")
    for name, what in (("index", "write benchmarks/results/INDEX.md: every result file, what made it, "
                                 "its commit and device, who cites it"),
                       ("summarize", "write docs/performance.md and the README's summary table from the "
                                     "results JSON")):
        p = sub.add_parser(name, help=what, description=what)
        p.add_argument("--results", type=Path, default=RESULTS, help="the results folder (default: %(default)s)")
        p.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 when the committed file differs from what would be written")
    return parser


def _options(args) -> Options:
    opts = Options(out=args.out.resolve(), smoke=getattr(args, "smoke", False), extra=args.extra,
                   imagenette=getattr(args, "imagenette", None), fmnist_dir=getattr(args, "fmnist_dir", None),
                   train_shards=getattr(args, "train_shards", 1))
    if opts.smoke and opts.out == RESULTS.resolve():  # a smoke run is no result for the record
        opts.out = opts.tmp / "smoke"
    return opts


def run_suite(args) -> int:
    suite = SUITES[args.command]
    if args.extra and not suite.extra:
        raise runner.RunError(f"suite {suite.name} takes no arguments after `--` (got {' '.join(args.extra)})")
    unknown = [p for p in args.parts if p not in suite.parts]
    if unknown:
        raise runner.RunError(f"suite {suite.name} has no part {', '.join(unknown)} (parts: {', '.join(suite.parts)})")
    opts = _options(args)
    sha = runner.commit()
    steps = plan(suite.name, args.parts, opts)
    setup = runner.wheel_install()
    steps = ([setup] if setup else []) + steps
    if suite.name == "train" and train_data(opts) == (None, None):
        raise runner.RunError("train: no data: give --imagenette DIR (ImageFolder root or its tar shards) "
                              "and/or --fmnist-dir DIR")
    print(f"# benchmarks {suite.name} {' '.join(args.parts) or '(all parts)'} | commit {sha or 'unknown'} | "
          f"out {opts.out}")
    warning = runner.stale_commit_warning()
    if warning:
        print(warning, flush=True)
    if args.dry_run:
        print(f"export PYTHONPATH={runner.environment()['PYTHONPATH']} PYTHONUNBUFFERED=1")
        for step in steps:
            where = runner.log_path(step, opts.out)
            wrote = ", ".join(step.outputs)
            print(f"# {step.name}: cap {step.cap} s, log {where}" + (f", writes {wrote}" if wrote else "")
                  + (" (in parallel)" if step.parallel else ""))
            print(runner.shown(step.argv) + (" &" if step.parallel else ""))
        return 0
    if suite.name == "castling" and any(p.startswith("imagenette") for p in args.parts or suite.parts) \
            and train_data(opts)[0] is None:
        raise runner.RunError("castling: the imagenette parts need Imagenette: give --imagenette DIR (ImageFolder "
                              "root or its tar shards), or run only vs_deit_tiny")
    if sha is None and not opts.smoke:
        raise runner.RunError("the commit is unknown here (no usable .git): set VIGLA_COMMIT=<commit> "
                              "(git rev-parse --short HEAD in your checkout)")
    if suite.device == "cuda" and not opts.smoke and not shutil.which("nvidia-smi"):
        raise runner.RunError(f"suite {suite.name} needs a CUDA GPU (nvidia-smi not found); "
                              f"--dry-run prints its commands")
    if suite.name == "ncu" and runner.ncu_path() is None:
        raise runner.RunError("ncu: Nsight Compute (ncu) not found on PATH, in /opt/nvidia/nsight-compute "
                              "or /usr/local/cuda/bin")
    env = runner.environment()
    opts.out.mkdir(parents=True, exist_ok=True)
    outcomes = runner.run_steps(steps[:1] if setup else [], opts.out, env, sha, args.tail)
    if suite.name == "fla" and subprocess.run([sys.executable, "-c", "import fla"], env=env,
                                              capture_output=True).returncode != 0:
        raise runner.RunError("fla: fla-core is not installed (put its wheel in .whl/)")
    outcomes += runner.run_steps(steps[1:] if setup else steps, opts.out, env, sha, args.tail)
    print(f"\n{suite.name}: {sum(o.status == 'ok' for o in outcomes)}/{len(outcomes)} steps ok, "
          f"results in {opts.out}, logs in {opts.out / 'logs'}")
    print(runner.table(outcomes, opts.out))
    return 0 if all(o.status == "ok" for o in outcomes) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # what follows goes to the suite's main script, untouched
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = build_parser().parse_args(argv)
    args.extra = extra
    try:
        if args.command == "index":
            from .index import main as index_main
            return index_main(args.results, args.check)
        if args.command == "summarize":
            from .summarize import main as summarize_main
            return summarize_main(args.results, args.check)
        return run_suite(args)
    except runner.RunError as exc:
        print(f"python -m benchmarks: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
