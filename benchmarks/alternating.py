"""What the A/B scripts that run each variant in a fresh process share: one worker's row, the medians of rows, the
timing of a worker's calls and the closing row of medians and ratios.

``host_memory_ab.py``, ``vector_width_ab.py`` and ``cpu_source_ab.py`` alternate their variants process after process
(a heap setting or a kernel build is per process); each worker prints its figures as one JSON line last.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["worker_row", "medians", "median_ms", "add_round", "close_ab"]


def worker_row(script: str, args: list[str], env: dict | None = None) -> dict:
    """Run ``script`` with ``args`` in a fresh Python process (``env``: variables added to this one's) and return
    the JSON object its last line of output holds."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env}).stdout
    return json.loads(out.splitlines()[-1])


def medians(rows: Iterable[dict], keys: Iterable[str], **match) -> dict:
    """The median of each of ``keys`` over the ``rows`` whose fields equal ``match``'s values."""
    chosen = [row for row in rows if all(row.get(k) == v for k, v in match.items())]
    return {key: statistics.median(row[key] for row in chosen) for key in keys}


def median_ms(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 5) -> dict[str, float]:
    """Each of ``calls`` (name -> callable) timed: the median milliseconds of ``repeats`` calls after ``warmup``
    untimed ones."""
    times = {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1e3)
        times[name] = statistics.median(samples)
    return times


def add_round(result: dict, r: int, row: dict) -> None:
    """Round ``r``'s ``row`` (a worker's ``build`` and ``*_ms`` figures) appended to ``result``'s rows, and printed."""
    result["rows"].append({"round": r, **row})
    print(f"round {r} {row['build']}: " + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in row.items() if k.endswith("_ms")),
          flush=True)


def close_ab(result: dict, builds: tuple[str, str], out: str, name: str) -> Path:
    """The last row of ``result`` (rows with a ``build`` and ``*_ms`` figures): each figure's median per build and
    the ratio first / second (``{op}_{first}_over_{second}``); printed, then ``result`` saved complete
    (:func:`vigla.bench.report.save_complete`). Returns the path written."""
    from vigla.bench.report import save_complete

    a, b = builds
    names = [k for k in result["rows"][0] if k.endswith("_ms")]
    med = {build: medians(result["rows"], names, build=build) for build in builds}
    result["rows"].append({"round": "median", **{f"{build}_{k}": med[build][k] for build in builds for k in names},
                           **{f"{k[:-3]}_{a}_over_{b}": med[a][k] / med[b][k] for k in names}})
    for k in names:
        print(f"median {k[:-3]}: {med[a][k]:.3f} ms {a}, {med[b][k]:.3f} ms {b} ({med[a][k] / med[b][k]:.2f}x)")
    path = save_complete(result, out, name)
    print(f"wrote {path}")
    return path
