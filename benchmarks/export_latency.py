"""CPU latency of ONNX Runtime against PyTorch eager, for models exported with ``vigla export``.

    python benchmarks/export_latency.py --models vig_tiny deit_tiny_patch16_224 --img-size 224 512 \
        --out benchmarks/results

For each model and image size: the model (random weights, eval mode; ``set_input_size`` when the size
is not its own, as ``vigla export`` does) is exported to ONNX at that fixed size (the dynamo exporter,
:func:`vigla.export.export_model`), loaded in an ONNX Runtime CPU session with as many intra-op
threads as PyTorch uses, checked against PyTorch on one batch, then both are timed on the same input
(``--warmup`` calls, then ``--iters`` timed calls each, alternating; ``--threads`` intra-op threads for
both). Writes
``<out>/<name>.json``: the environment (device, commit, command), the settings and one row per model
and size with both latency distributions (median and quartiles, ms), ``ort_vs_torch`` (PyTorch median /
ONNX Runtime median: above 1, ONNX Runtime is faster), the parity and the export time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import timm  # noqa: E402

import vigla  # noqa: E402,F401
from vigla.bench.report import SCHEMA, command_line, environment, git_info, timestamp, write_json  # noqa: E402
from vigla.engine.modeling import set_input_size  # noqa: E402
from vigla.export import export_model, in_chans  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vig_tiny", "deit_tiny_patch16_224"])
    p.add_argument("--img-size", type=int, nargs="+", default=[224, 512])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of PyTorch and of ONNX Runtime alike (1: a shared machine's "
                        "busy cores make multi-threaded barriers stall)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="export_latency")
    p.add_argument("--note", action="append", default=[], help="free text stored in the JSON")
    return p.parse_args(argv)


def build(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    set_input_size(model, size)
    return model


def session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # no busy-waiting between calls: its spinning threads would starve PyTorch's, timed in between
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def summary(times_ms: list[float]) -> dict:
    q = statistics.quantiles(times_ms, n=4)
    return {"median_ms": statistics.median(times_ms), "q25_ms": q[0], "q75_ms": q[2],
            "min_ms": min(times_ms), "max_ms": max(times_ms), "iters": len(times_ms)}


def measure(name: str, size: int, args) -> dict:
    model = build(name, size)
    x = torch.randn(args.batch_size, in_chans(model), size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        start = time.perf_counter()
        export_model(model, "onnx", path, x)
        export_s = time.perf_counter() - start
        onnx_mib = os.path.getsize(path) / 2 ** 20
        sess = session(path)
    feed = {sess.get_inputs()[0].name: x.numpy()}

    def run_torch():
        with torch.no_grad():
            return model(x).numpy()

    def run_ort():
        return sess.run(None, feed)[0]

    ref, out = run_torch(), run_ort()
    parity = float(np.abs(out - ref).max() / np.abs(ref).max())
    for _ in range(args.warmup):
        run_torch(), run_ort()
    times = {"torch": [], "ort": []}
    for _ in range(args.iters):  # alternate, so that load on the machine hits both alike
        for key, fn in (("torch", run_torch), ("ort", run_ort)):
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1e3)
    row = {"model": name, "img_size": size, "batch_size": args.batch_size, "export_s": export_s,
           "onnx_mib": onnx_mib, "parity_rel": parity, "torch_cpu": summary(times["torch"]),
           "onnxruntime_cpu": summary(times["ort"])}
    row["ort_vs_torch"] = row["torch_cpu"]["median_ms"] / row["onnxruntime_cpu"]["median_ms"]
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    result = {
        "schema": SCHEMA, "timestamp": timestamp(), "command": command_line(["python", *sys.argv]),
        "git": git_info(), "environment": dict(environment(torch.device("cpu")),
                                               onnxruntime=onnxruntime.__version__),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "name", "note")},
        "notes": args.note, "complete": False, "rows": [],
    }
    out = Path(args.out) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for size in args.img_size:
        for name in args.models:
            row = measure(name, size, args)
            result["rows"].append(row)
            print(f"{name:24s} {size:5d}px  torch {row['torch_cpu']['median_ms']:8.1f} ms  onnxruntime "
                  f"{row['onnxruntime_cpu']['median_ms']:8.1f} ms  ({row['ort_vs_torch']:.2f}x)  parity "
                  f"{row['parity_rel']:.1e}  export {row['export_s']:.0f} s", flush=True)
            write_json(result, out)  # after every row: a stopped run keeps what it measured
    result["complete"] = True
    write_json(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
