"""Time the default run (`vigla train` with no settings: ViG-T on Fashion-MNIST) on this machine's CPU.

    python benchmarks/cpu_default_train.py        # about 2 minutes on 2 cores; or python -m benchmarks cpu

Runs ``python -m vigla train --out <tmp>`` (``--out`` only places the files; arguments after ``--``
are added, for a smoke run) and writes ``OUT/NAME.json``, the results envelope of
:func:`vigla.bench.report.envelope` with one row (wall time, load average before and after, test
accuracy, per-epoch metrics, the run's record and resolved config, its output), and ``OUT/NAME.png``
(the run's curves).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import torch

    from vigla.bench.report import envelope, write_json

    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder")
    parser.add_argument("--name", default="cpu_default_train", help="stem of the JSON and PNG files")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train_command = " ".join(["vigla train", *train_args])
    result = envelope(torch.device("cpu"), {"what": "wall time of the whole command", "train_command": train_command})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "vigla", "train", "--out", str(out), *train_args]
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n")
            return proc.returncode
        result["rows"].append({
            "wall_s": round(wall, 1), "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "results": json.loads((out / "results.json").read_text()),
            "epochs": list(csv.DictReader(open(out / "metrics.csv"))),
            "run": json.loads((out / "run.json").read_text()),
            "config": yaml.safe_load((out / "config.yaml").read_text()),
            "stdout": proc.stdout,
        })
        result["complete"] = True
        write_json(result, args.out / f"{args.name}.json")
        shutil.copy(out / "curves.png", args.out / f"{args.name}.png")
    test = result["rows"][0]["results"]["test"]
    print(f"wall {wall:.0f}s, test top-1 {test['top1']:.2f}% on {test['images']} images; "
          f"wrote {args.out / args.name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
