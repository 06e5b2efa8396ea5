"""What a bench run writes: environment record, ratios to the baseline, terminal table, JSON, CSV."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..engine.outputs import git_info, write_text

__all__ = ["SCHEMA", "RATIO_METRICS", "add_ratios", "command_line", "envelope", "environment", "flatten_row",
           "format_table", "git_info", "run_fields", "save_complete", "write_csv", "write_json"]

SCHEMA = "vigla.bench/1"
#: the keys of every result file (``vigla bench`` and every script under benchmarks/); only the rows differ
ENVELOPE_KEYS = ("schema", "timestamp", "command", "git", "environment", "settings", "notes", "complete", "rows")

# ratio name -> where the value sits in a row (all ratios are model / baseline at the same resolution)
RATIO_METRICS = {
    "img_per_s": ("infer", "img_per_s"),
    "latency_ms": ("latency", "median_ms"),
    "peak_mib": ("infer", "peak_mib"),
    "gmacs": ("gmacs",),
    "train_img_per_s": ("train", "img_per_s"),
    "train_peak_mib": ("train", "peak_mib"),
}


def _get(row: dict, path: tuple[str, ...]):
    value = row
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


# ---------------------------------------------------------------------------------------------
# environment

def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001  (absent or broken: record it as missing)
        return None


def environment(device: torch.device) -> dict:
    """Device, driver and library versions of this run."""
    is_cuda = device.type == "cuda"
    driver = None
    if is_cuda:
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = smi.splitlines()[0] if smi else None
    import vigla
    from vigla.ops.bigla import cpu_kernels
    return {
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if is_cuda else _cpu_name(),
        "driver_version": driver,
        "cuda_version": torch.version.cuda,
        "torch": torch.__version__,
        "timm": _version("timm"),
        "triton": _version("triton"),
        "vigla": vigla.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        # which BiGLA implementation CPU tensors take: the compiled kernel, or the chunked PyTorch path
        "bigla_cpu": ("compiled kernel" if cpu_kernels.available() else "chunked PyTorch path")
        if device.type == "cpu" else None,
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, with ``python -m vigla`` for the module entry point."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(os.path.join("vigla", "__main__.py")):
        argv = ["python", "-m", "vigla"] + argv[1:]
    return shlex.join(argv)


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def envelope(device: torch.device, settings: dict | None = None, notes: list[str] | None = None,
             command: str | None = None) -> dict:
    """A new result record (:data:`ENVELOPE_KEYS`): what ran (``command``, ``git``), where
    (``environment``), how (``settings``), free ``notes``, ``complete`` (false until the producer
    sets it) and ``rows``, one dict per measurement, appended by the producer."""
    return {"schema": SCHEMA, "timestamp": timestamp(), "command": command or command_line(),
            "git": git_info(), "environment": environment(device), "settings": dict(settings or {}),
            "notes": list(notes or []), "complete": False, "rows": []}


# ---------------------------------------------------------------------------------------------
# ratios

def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_ratios(rows: list[dict], baseline: str) -> None:
    """Set ``row["ratios"]`` to model / baseline for every :data:`RATIO_METRICS` entry, against the
    baseline's row at the same resolution (``None`` where either value is missing, e.g. OOM)."""
    base = {r["img_size"]: r for r in rows if r["model"] == baseline}
    for row in rows:
        ref = base.get(row["img_size"])
        row["ratios"] = {name: _ratio(_get(row, path), _get(ref, path) if ref else None)
                         for name, path in RATIO_METRICS.items()}


# ---------------------------------------------------------------------------------------------
# table

def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _measured(m: dict | None, key: str, fmt: str) -> str:
    if m is None:
        return "-"
    if m.get("status") != "ok":
        return m.get("status", "?").upper()
    return _num(m.get(key), fmt)


def _spread(m: dict | None) -> str:
    if not m or m.get("status") != "ok":
        return "-"
    return f"{100 * (m['q75_ms'] - m['q25_ms']) / m['median_ms']:.0f}%"


def format_table(rows: list[dict], train: bool, latency: bool = True, timings: bool = True) -> str:
    """Fixed-width table, one line per model x resolution; ratios are model / baseline.
    ``timings=False``: the FLOP and parameter columns only."""
    cols = ["model", "res"]
    if timings:
        cols += ["batch", "img/s", "iqr", "ratio"]
    if latency:
        cols += ["lat ms", "ratio"]
    if timings:
        cols += ["peak MiB", "ratio"]
    cols += ["GMACs", "ratio", "params M"]
    if train:
        cols += ["train img/s", "ratio", "train MiB", "ratio"]
    lines = []
    for r in rows:
        q = r.get("ratios", {})
        cells = [r["model"] + (" (ckpt)" if r.get("grad_checkpointing") else ""), str(r["img_size"])]
        if timings:
            cells += [str(r["batch_size"]), _measured(r.get("infer"), "img_per_s", ",.1f"),
                      _spread(r.get("infer")), _num(q.get("img_per_s"), ".2f")]
        if latency:
            cells += [_measured(r.get("latency"), "median_ms", ".2f"), _num(q.get("latency_ms"), ".2f")]
        if timings:
            cells += [_measured(r.get("infer"), "peak_mib", ",.0f"), _num(q.get("peak_mib"), ".2f")]
        cells += [_num(r.get("gmacs"), ".3f"), _num(q.get("gmacs"), ".2f"), _num(r.get("params_m"), ".2f")]
        if train:
            cells += [_measured(r.get("train"), "img_per_s", ",.1f"), _num(q.get("train_img_per_s"), ".2f"),
                      _measured(r.get("train"), "peak_mib", ",.0f"), _num(q.get("train_peak_mib"), ".2f")]
        lines.append(cells)
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(cols), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines])


# ---------------------------------------------------------------------------------------------
# files

def write_json(result: dict, path: Path) -> None:
    """``result`` as indented JSON, written atomically (a run killed mid-write leaves the previous version)."""
    write_text(path, json.dumps(result, indent=2) + "\n")


def save_complete(result: dict, out: str | Path, name: str) -> Path:
    """Mark ``result`` complete and write it to ``out/name.json`` (``out`` created); the path written."""
    result["complete"] = True
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, path)
    return path


_MEASURE_KEYS = ("status", "median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms", "img_per_s",
                 "peak_mib", "first_call_ms", "error")


def flatten_row(row: dict) -> dict:
    """One CSV record: the scalar fields, each measurement's fields prefixed by its name."""
    flat = {k: row.get(k) for k in ("model", "img_size", "batch_size", "grad_checkpointing", "params",
                                    "params_m", "macs", "flops", "gmacs", "gflops")}
    for name in ("infer", "latency", "train"):
        m = row.get(name) or {}
        flat.update({f"{name}_{k}": m.get(k) for k in _MEASURE_KEYS})
    ratios = row.get("ratios") or {}
    flat.update({f"ratio_{k}": ratios.get(k) for k in RATIO_METRICS})
    return flat


def run_fields(result: dict) -> dict:
    """The run's identity, repeated on every CSV line so that CSVs of several runs can be stacked."""
    env = result.get("environment", {})
    return {"device": env.get("device"), "driver_version": env.get("driver_version"),
            "cuda_version": env.get("cuda_version"), "torch": env.get("torch"), "timm": env.get("timm"),
            "triton": env.get("triton"), "git_commit": result.get("git", {}).get("commit"),
            "timestamp": result.get("timestamp"), "command": result.get("command")}


def write_csv(result: dict, path: Path) -> None:
    """One line per row: :func:`flatten_row`, then :func:`run_fields`."""
    run = run_fields(result)
    records = [flatten_row(r) | run for r in result["rows"]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(flatten_row({}) | run))
    writer.writeheader()
    writer.writerows(records)
    write_text(path, buf.getvalue())
