"""Where the BiGLA kernels' instructions go: Nsight Compute's source view, summarised per kernel (``ncu source``).

    ncu --set full --import-source yes -o REPORT ... python benchmarks/ncu_bigla.py --shape B T H K V
    python benchmarks/ncu_source.py --report REPORT.ncu-rep --out benchmarks/results --name ncu_source_vig_t_224

Reads the report's SASS view (``ncu --import REPORT --page source --csv --print-source sass``: one row per
instruction with its executed count and warp-stall samples) and writes, for each profiled kernel launch: the
warps launched (the entry instruction runs once per warp), the instructions one warp executes, the opcode mix by
executed instructions and by stall samples, and the instructions with the most stall samples. These kernels are
bound by instruction issue, not by memory (``ncu_vig_t_*.txt``), so this is the profile that says what to cut.
The report is deleted afterwards unless ``--keep`` (tens of MB).
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.runner import ncu_path  # noqa: E402
from vigla.bench.report import envelope, save_complete  # noqa: E402

EXECUTED = "Instructions Executed"
SAMPLES = "Warp Stall Sampling (All Samples)"


def parse(text: str) -> list[tuple[str, list[dict]]]:
    """``(kernel name, instruction rows)`` per launch, in order, from the CSV export of the source page."""
    launches, header = [], None
    for row in csv.reader(io.StringIO(text)):
        if not row:
            continue
        if row[0] == "Kernel Name":
            launches.append((row[1], []))
            header = None
        elif row[0] == "Address":
            header = row
        elif header and launches:
            launches[-1][1].append(dict(zip(header, row)))
    return launches


def opcode(sass: str) -> str:
    """The mnemonic of one SASS line, without predicate or modifiers (``@!P0 FMUL.FTZ R1, ...`` -> ``FMUL``)."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def _count(row: dict, key: str) -> int:
    value = row.get(key, "0").replace(",", "")
    return int(value) if value.isdigit() else 0


def summarize(kernel: str, rows: list[dict], top: int = 12) -> dict:
    """One launch's figures (module docstring); shares in percent."""
    executed = [_count(r, EXECUTED) for r in rows]
    samples = [_count(r, SAMPLES) for r in rows]
    warps = executed[0] if executed else 0
    by_exec, by_stall = collections.Counter(), collections.Counter()
    for r, e, s in zip(rows, executed, samples):
        by_exec[opcode(r["Source"])] += e
        by_stall[opcode(r["Source"])] += s
    total, stalls = sum(executed), sum(samples)

    def shares(counter: collections.Counter, whole: int) -> dict:
        return {op: round(100 * n / whole, 1) for op, n in counter.most_common(top)} if whole else {}

    hottest = sorted(range(len(rows)), key=lambda i: -samples[i])[:top]
    return dict(kernel=kernel, warps=warps, instructions_per_warp=round(total / warps, 1) if warps else None,
                instructions_executed=total, static_instructions=len(rows), stall_samples=stalls,
                opcodes_executed_pct=shares(by_exec, total), opcodes_stalled_pct=shares(by_stall, stalls),
                hottest=[dict(sass=rows[i]["Source"].strip(), stall_samples=samples[i],
                              executed_per_warp=round(executed[i] / warps, 2) if warps else None) for i in hottest])


def export(report: Path) -> str:
    """The source page of ``report`` as CSV (SASS), through Nsight Compute."""
    ncu = ncu_path()
    if ncu is None:
        raise SystemExit("ncu_source: Nsight Compute (ncu) not found on PATH or in /opt/nvidia/nsight-compute")
    proc = subprocess.run([ncu, "--import", str(report), "--page", "source", "--csv", "--print-source", "sass"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ncu_source: ncu could not read {report}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", required=True, type=Path, help="the .ncu-rep file (ncu -o, with --import-source yes)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--name", required=True, help="stem of the JSON file")
    ap.add_argument("--top", type=int, default=12, help="opcodes and instructions kept per kernel")
    ap.add_argument("--keep", action="store_true", help="keep the report")
    args = ap.parse_args(argv)
    if not args.report.is_file():
        print(f"ncu_source: no report at {args.report} (the ncu step before this one failed?)", file=sys.stderr)
        return 2
    import torch

    launches = parse(export(args.report))
    if not launches:
        print(f"ncu_source: {args.report} has no source view (profile with --set full --import-source yes)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the profile ran
    result = envelope(device, settings=dict(report=args.report.name, view="SASS, all samples"))
    for i, (kernel, rows) in enumerate(launches):
        row = dict(launch=i, **summarize(kernel, rows, args.top))
        result["rows"].append(row)
        print(f"{i}: {kernel}: {row['warps']} warps, {row['instructions_per_warp']} instructions per warp; "
              f"executed: {', '.join(f'{k} {v}%' for k, v in list(row['opcodes_executed_pct'].items())[:6])}")
    path = save_complete(result, args.out, args.name)
    if not args.keep:
        args.report.unlink()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
