"""What the A/B scripts that run each variant in a fresh process share: one worker's row, and the medians of rows.

``host_memory_ab.py`` and ``vector_width_ab.py`` alternate their variants process after process (a heap setting
or a kernel build is per process); each worker prints its figures as one JSON line last.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Iterable

__all__ = ["worker_row", "medians"]


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
