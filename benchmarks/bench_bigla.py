"""BiGLA operator benchmark: fused Triton kernel vs fla's bidirectional path vs chunked PyTorch.

Run on a GPU (one run per table; ratios are taken within the run):

    python benchmarks/bench_bigla.py --out benchmarks/results

Shapes: ViG-T layers (H=3, d_k=32, d_v=64) at T = 196/1024/4096/16384 with the anchors' batch
sizes, a ViG-S layer, and the four ViG-H-T stages at 224². The model's path: ``bigla_gated`` with
bf16 q, k, v and bf16 gate logits (log decays ``logsigmoid(z) / 16``: inside the kernels for
Triton; a separate op before ``chunk_gla`` for fla, as in the official code), forward and
forward+backward, median of ``triton.testing.do_bench`` (``--timing cudagraph``: of
``do_bench_cudagraph``, replays of a captured CUDA graph, which leave the host's launch time
out; forward only, the autograd backward does not capture); by default the inputs are laid out as the
model passes them (``--layout model``: column slices of one projection). The byte floor is the time to
read q, k, v and both gate logits once and write o once at the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.report import git_info, write_json  # noqa: E402
from vigla.ops.bigla import available_backends, bigla_gated  # noqa: E402

GATE_NORMALIZER = 16.0  # ViG's
SHAPES = [  # name, B, T, H, K, V
    ("ViG-T @224", 128, 196, 3, 32, 64),
    ("ViG-T @512", 48, 1024, 3, 32, 64),
    ("ViG-T @1024", 12, 4096, 3, 32, 64),
    ("ViG-T @2048", 4, 16384, 3, 32, 64),
    ("ViG-S @224", 128, 196, 6, 32, 64),
    ("ViG-H-T s1 @224", 128, 3136, 3, 16, 32),
    ("ViG-H-T s2 @224", 128, 784, 6, 16, 32),
    ("ViG-H-T s3 @224", 128, 196, 12, 16, 32),
    ("ViG-H-T s4 @224", 128, 49, 24, 16, 32),
]


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    from triton.testing import do_bench

    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def make_inputs(B, T, H, K, V, layout="model", dtype=torch.bfloat16, grad=False):
    """``(q, k, v, zf, zb)`` bf16, ``[B, T, H, D]``, with gate logits (log decays ``logsigmoid(z)/16``).

    ``layout="model"``: as BiGLAMixer passes them, q/k/v column slices of one projection output
    ``[B, T, 2HK + HV + r + HV]`` (r = 16, the decay rank) and the logits the two halves of one
    ``[B, T, 2HK]`` output; ``"contiguous"``: five separate tensors.
    """
    def r(*s):  # drawn on the CPU: a failed CUDA-graph capture leaves the CUDA generator unusable
        return torch.randn(*s, dtype=dtype).cuda().requires_grad_(grad)

    if layout == "contiguous":
        return r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), r(B, T, H, K), r(B, T, H, K)
    proj = r(B, T, 2 * H * K + H * V + 16 + H * V)
    q, k, v = proj[..., :2 * H * K + H * V].split([H * K, H * K, H * V], -1)
    zf, zb = r(B, T, 2 * H * K).unflatten(-1, (2, H, K)).unbind(2)
    return q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V)), zf, zb


def time_backend(backend, shape, train: bool, layout: str, timing: str = "do_bench"):
    from triton.testing import do_bench, do_bench_cudagraph

    _, B, T, H, K, V = shape
    if train and timing == "cudagraph":
        return None  # torch.autograd.grad inside a stream capture invalidates the capture
    x = make_inputs(B, T, H, K, V, layout, grad=train)
    if train:
        do = torch.randn(B, T, H, V, dtype=torch.bfloat16).cuda()

        def fn():
            out = bigla_gated(*x, GATE_NORMALIZER, backend=backend)
            torch.autograd.grad(out, x, do)
    else:
        def fn():
            with torch.no_grad():
                bigla_gated(*x, GATE_NORMALIZER, backend=backend)
    try:
        if timing == "cudagraph":
            return do_bench_cudagraph(fn, rep=100, return_mode="median")
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    except RuntimeError as exc:  # a backend whose calls cannot be captured in a CUDA graph
        if timing != "cudagraph":
            raise
        print(f"{backend} {shape[0]}: no CUDA-graph timing ({type(exc).__name__}: {exc})", flush=True)
        torch.cuda.synchronize()
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--backends", nargs="+", default=["triton", "fla", "chunked"])
    ap.add_argument("--shapes", nargs="*", default=None, help="names of the shapes to run (default: all)")
    ap.add_argument("--name", default="bench_bigla", help="stem of the JSON file")
    ap.add_argument("--timing", choices=["do_bench", "cudagraph"], default="do_bench",
                    help="do_bench (host launch time included) or replays of a captured CUDA graph")
    ap.add_argument("--layout", choices=["model", "contiguous"], default="model",
                    help="inputs as the model passes them (strided column slices) or as separate tensors")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_bigla needs a CUDA GPU", file=sys.stderr)
        return 2
    backends = [b for b in args.backends if b in available_backends("cuda")]
    bw = copy_bandwidth()
    versions = dict(torch=torch.__version__)
    for mod in ("triton", "fla"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    result = dict(
        benchmark="bigla operator", device=torch.cuda.get_device_name(), commit=git_info()["commit"],
        command=" ".join([os.path.basename(sys.executable)] + sys.argv), versions=versions,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        copy_bandwidth_TBps=bw / 1e12, dtype="bfloat16", layout=args.layout,
        timing=f"triton.testing.{'do_bench_cudagraph' if args.timing == 'cudagraph' else 'do_bench'} median",
        complete=False, rows=[],
    )
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"{args.name}.json"

    def ratio(a, b):
        return None if a is None or b is None else a / b

    rows = result["rows"]
    for shape in SHAPES:
        name, B, T, H, K, V = shape
        if args.shapes and name not in args.shapes:
            continue
        nbytes = 2 * B * T * H * (4 * K + 2 * V)  # bf16: q, k, gf, gb, v read; o written
        row = dict(name=name, B=B, T=T, H=H, K=K, V=V, tokens=B * T,
                   floor_ms=nbytes / bw * 1e3)
        for backend in backends:
            row[f"{backend}_fwd_ms"] = time_backend(backend, shape, False, args.layout, args.timing)
            row[f"{backend}_fwdbwd_ms"] = time_backend(backend, shape, True, args.layout, args.timing)
        row["fla_over_triton_fwd"] = ratio(row.get("fla_fwd_ms"), row.get("triton_fwd_ms"))
        row["fla_over_triton_fwdbwd"] = ratio(row.get("fla_fwdbwd_ms"), row.get("triton_fwdbwd_ms"))
        row["chunked_over_triton_fwd"] = ratio(row.get("chunked_fwd_ms"), row.get("triton_fwd_ms"))
        row["triton_fwd_over_floor"] = ratio(row.get("triton_fwd_ms"), row["floor_ms"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(result, path)  # after every row: a run cut short keeps its rows
    result["complete"] = True
    write_json(result, path)

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    print(f"\n{result['device']}  copy {bw / 1e12:.2f} TB/s  commit {result['commit']}")
    print(f"{'shape':18} {'tri fwd':>8} {'fla fwd':>8} {'x':>6} {'tri f+b':>8} {'fla f+b':>8} {'x':>6} "
          f"{'floor':>7} {'/floor':>7}")
    for r in rows:
        print(f"{r['name']:18} {fmt(r.get('triton_fwd_ms'))} {fmt(r.get('fla_fwd_ms')):>8} "
              f"{fmt(r['fla_over_triton_fwd'], '.1f'):>6} {fmt(r.get('triton_fwdbwd_ms')):>8} "
              f"{fmt(r.get('fla_fwdbwd_ms')):>8} {fmt(r['fla_over_triton_fwdbwd'], '.1f'):>6} "
              f"{fmt(r['floor_ms']):>7} {fmt(r['triton_fwd_over_floor'], '.1f'):>7}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
