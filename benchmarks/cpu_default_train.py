"""Time the default run (`vigla train` with no settings: ViG-T on Fashion-MNIST) on this machine's CPU.

    python benchmarks/cpu_default_train.py        # about 2 minutes on 2 cores

Runs ``python -m vigla train --out <tmp>`` (``--out`` only places the files) and writes
``benchmarks/results/cpu_default_train.json`` (wall time, test accuracy, per-epoch metrics, resolved config,
device, load average before and after, commit, command) and ``cpu_default_train.png`` (the run's curves).
"""
from __future__ import annotations

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


def main() -> int:
    import torch

    from vigla.bench.report import command_line, environment, git_info, timestamp, write_json

    results_dir = REPO / "benchmarks" / "results"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "vigla", "train", "--out", str(out)]
        git = git_info()  # the code that runs, before anything can change it
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n")
            return proc.returncode
        result = {
            "what": "`vigla train` with no settings (preset fmnist-quick), wall time of the whole command",
            "command": command_line(), "train_command": "vigla train", "git": git,
            "environment": environment(torch.device("cpu")), "finished": timestamp(),
            "wall_s": round(wall, 1), "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "results": json.load(open(out / "results.json")),
            "epochs": list(csv.DictReader(open(out / "metrics.csv"))),
            "run": json.load(open(out / "run.json")),
            "config": yaml.safe_load(open(out / "config.yaml")),
            "stdout": proc.stdout,
        }
        write_json(result, results_dir / "cpu_default_train.json")
        shutil.copy(out / "curves.png", results_dir / "cpu_default_train.png")
    test = result["results"]["test"]
    print(f"wall {wall:.0f}s, test top-1 {test['top1']:.2f}% on {test['images']} images; "
          f"wrote {results_dir}/cpu_default_train.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
