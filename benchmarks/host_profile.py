"""Where the host's time goes in an eager forward (or training step): cProfile of the calls, beside their timing.

    python benchmarks/host_profile.py --models vig_tiny deit_tiny_patch16_224 --out benchmarks/results
    python benchmarks/host_profile.py --train --name profile_host_train     # training steps instead

For each model (224 px, batch ``--batch-size``, bf16 autocast, ``eval()`` + ``torch.inference_mode``):
``synced_ms``, one forward timed to its end (CUDA synchronised); ``issue_ms``, the host's time to issue one
forward without waiting for the device (the queue drained between calls); ``pipelined_ms``, back-to-back
forwards (what a benchmark loop sees); each a median over ``--iters`` calls, in ``--rounds`` rounds that visit
the models in turn (the host's figures move between rounds); then, once per model, the kernels one forward
launches and their summed device time (torch.profiler), and the top ``--top`` Python
functions of ``--iters`` issued forwards by own time and by cumulative time (cProfile). When ``issue_ms`` is
close to ``synced_ms``, the forward is bound by the host: the profile says which Python frames to cut.
``--breakdown`` adds, per model, the issue time with vigla's Triton launches cut in two places (median of
``--iters`` calls in each of ``--rounds`` rounds, normal calls beside them): ``issue_ms_no_run``, everything
but the driver's launch itself (the compiled kernels' ``run`` replaced by a no-op: vigla's launcher keys
the call and finds the kernel), and ``issue_ms_no_launch``, no vigla launch at all (the launcher's ``launch``
a no-op); PyTorch's own kernels launch in all three. Their differences are the driver launches' and
vigla's launcher's host time; the rest is the layers' and ops' Python and PyTorch's calls. For inference it also
gives ``ops_us``: the host microseconds per forward spent in each op of the eager inference path
(:data:`vigla.ops.inference.EAGER`, launches included) and in its GEMMs (:func:`vigla.layers.cast.gemm`), with
their calls; what the forward spends outside them is the layers' own Python.
With ``--train`` each call is one training step (:func:`vigla.bench.measure.train_step`: forward, cross-entropy,
backward, fused AdamW step), ``kernel_ms`` is the device time of a step, and the cProfile pass runs with
autograd's multithreading off (``torch.autograd.set_multithreading_enabled(False)``): cProfile sees one thread,
and the engine would otherwise run the backward's Python (the ops' ``backward`` methods) on a thread of its own.
Results: ``OUT/NAME.json`` (the results envelope of :func:`vigla.bench.report.envelope`, a row per model).
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.measure import autocast, profiled_kernels, synchronize, train_step  # noqa: E402
from vigla.bench.report import envelope, write_json  # noqa: E402
from vigla.bench.cli import build_model  # noqa: E402


def _timed(fn, device: torch.device, iters: int, synced: bool) -> float:
    """Median ms of ``fn()``: to its end (``synced``), or to its return with the device idle at the start."""
    times = []
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        if synced:
            synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    synchronize(device)
    return sorted(times)[len(times) // 2]


def _top(stats: pstats.Stats, key: str, n: int) -> list[dict]:
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}:{func}", "calls": ncalls,
                     "own_ms": tottime * 1e3, "cumulative_ms": cumtime * 1e3})
    field = "own_ms" if key == "tottime" else "cumulative_ms"
    return sorted(rows, key=lambda r: -r[field])[:n]


def build(name: str, args, device: torch.device):
    """The model's call: a forward in ``eval()`` on a random batch (inference mode, autocast), or with
    ``args.train`` a training step."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(name, args.img_size).eval()
    if args.train:
        forward = train_step(model, args.batch_size, args.img_size, device, amp=args.amp)
    else:
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)

        def forward():
            with torch.inference_mode(), autocast(device, args.amp):
                return model(x)

    for _ in range(args.warmup):
        forward()
    return forward


def timings(forward, device: torch.device, iters: int) -> dict:
    """``synced_ms``, ``issue_ms`` and ``pipelined_ms`` of one forward (see the module's docstring)."""
    synced = _timed(forward, device, iters, synced=True)
    issue = _timed(forward, device, iters, synced=False)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        forward()
    synchronize(device)
    return {"synced_ms": synced, "issue_ms": issue, "pipelined_ms": (time.perf_counter() - t0) * 1e3 / iters}


def kernel_counts(forward, device: torch.device, iters: int) -> dict:
    """``kernel_launches`` and ``kernel_ms``: the device kernels one forward launches (copies and fills
    aside) and their summed time (torch.profiler's device events; CUDA only, else empty)."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            forward()
        synchronize(device)
    k = profiled_kernels(prof, iters)
    return {"kernel_launches": k["kernel_launches"], "kernel_ms": k["kernel_ms"]}


def host_profile(forward, device: torch.device, iters: int, top: int) -> dict:
    """cProfile of ``iters`` issued forwards (or training steps, the backward on the calling thread): the
    per-forward top functions by own and by cumulative time."""
    prof = cProfile.Profile()
    synchronize(device)
    with torch.autograd.set_multithreading_enabled(False):
        prof.enable()
        for _ in range(iters):
            forward()
        prof.disable()
    synchronize(device)
    stats = pstats.Stats(prof)

    def per_forward(rows):
        return [dict(r, own_ms=r["own_ms"] / iters, cumulative_ms=r["cumulative_ms"] / iters,
                     calls=r["calls"] / iters) for r in rows]

    return {"profiled_ms": stats.total_tt * 1e3 / iters, "top_own": per_forward(_top(stats, "tottime", top)),
            "top_cumulative": per_forward(_top(stats, "cumtime", top))}


class _Launches:
    """Context managers that cut vigla's Triton launches short (see ``--breakdown``); the outputs are garbage."""

    @staticmethod
    @contextlib.contextmanager
    def no_run():
        from vigla.ops import launcher

        saved = {id(f): dict(f.compiled) for f in launcher._FAST.values()}
        try:
            for f in launcher._FAST.values():
                f.compiled = {k: v._replace(run=_noop) for k, v in f.compiled.items()}
            yield
        finally:
            for f in launcher._FAST.values():
                f.compiled = saved.get(id(f), f.compiled)

    @staticmethod
    @contextlib.contextmanager
    def no_launch():
        from vigla.ops.launcher import FastKernel

        launch = FastKernel.launch
        FastKernel.launch = lambda self, grid, args, meta: None
        try:
            yield
        finally:
            FastKernel.launch = launch


def _noop(*args):
    return None


@contextlib.contextmanager
def _timed_ops(acc: dict):
    """Each eager inference op and ``gemm`` timed on the host into ``acc`` (name -> [seconds, calls])."""
    from vigla.layers import bigla_mixer, cast, mlp
    from vigla.ops import inference

    def timed(name, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = acc.setdefault(name, [0.0, 0])
                entry[0] += time.perf_counter() - t0
                entry[1] += 1
        return call

    saved = inference.EAGER, cast.gemm, bigla_mixer.gemm, mlp.gemm
    inference.EAGER = inference.InferenceOps(*(timed(n, f) for n, f in zip(inference.InferenceOps._fields, saved[0])))
    cast.gemm = bigla_mixer.gemm = mlp.gemm = timed("gemm", saved[1])
    try:
        yield
    finally:
        inference.EAGER, cast.gemm, bigla_mixer.gemm, mlp.gemm = saved


def ops_host(forward, device: torch.device, iters: int) -> dict:
    """``ops_us``: per op, host microseconds and calls per forward (see the module's docstring), with the
    forward's own issue time beside them (``forward_us``)."""
    acc: dict = {}
    with _timed_ops(acc):
        forward()
        acc.clear()
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            forward()
        total = time.perf_counter() - t0
    synchronize(device)
    ops = {name: {"us": s * 1e6 / iters, "calls": n / iters} for name, (s, n) in sorted(acc.items())}
    return {"ops_us": ops, "forward_us": total * 1e6 / iters}


def breakdown(forward, device: torch.device, iters: int, rounds: int) -> dict:
    """``issue_ms``, ``issue_ms_no_run`` and ``issue_ms_no_launch`` (see the module's docstring): medians over
    ``rounds`` rounds, the three visited in turn."""
    runs = {"issue_ms": [], "issue_ms_no_run": [], "issue_ms_no_launch": []}
    cuts = {"issue_ms": contextlib.nullcontext, "issue_ms_no_run": _Launches.no_run,
            "issue_ms_no_launch": _Launches.no_launch}
    for _ in range(rounds):
        for key, cut in cuts.items():
            with cut():
                runs[key].append(_timed(forward, device, iters, synced=False))
    return {f"breakdown_{k}": statistics.median(v) for k, v in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vig_tiny", "deit_tiny_patch16_224"])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--train", action="store_true", help="profile training steps instead of forwards")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds, the models in turn")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--breakdown", action="store_true",
                    help="issue times with vigla's launches cut short (see the module's docstring)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--name", default="profile_host", help="stem of the JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "name")}
    result = envelope(device, settings)
    forwards = {name: build(name, args, device) for name in args.models}
    rows = {name: {"model": name, "img_size": args.img_size, "batch_size": args.batch_size, "rounds": []}
            for name in args.models}
    result["rows"] = list(rows.values())
    call = "training step" if args.train else "forward"
    for r in range(args.rounds):
        for name, forward in forwards.items():
            t = timings(forward, device, args.iters)
            rows[name]["rounds"].append(t)
            print(f"round {r + 1} {name}: synced {t['synced_ms']:.2f} issue {t['issue_ms']:.2f} pipelined "
                  f"{t['pipelined_ms']:.2f} ms per {call}", flush=True)
    for name, forward in forwards.items():
        rows[name].update(kernel_counts(forward, device, 3))
        if args.breakdown:
            b = breakdown(forward, device, args.iters, args.rounds)
            rows[name].update(b)
            print(f"{name}: issue {b['breakdown_issue_ms']:.2f} ms, without the driver's launches "
                  f"{b['breakdown_issue_ms_no_run']:.2f}, without vigla's launches "
                  f"{b['breakdown_issue_ms_no_launch']:.2f}", flush=True)
            if not args.train:
                o = ops_host(forward, device, args.iters)
                rows[name].update(o)
                print(f"{name}: forward {o['forward_us']:.0f} us on the host; " + ", ".join(
                    f"{k} {v['us']:.0f} us / {v['calls']:.0f}" for k, v in o["ops_us"].items()), flush=True)
        rows[name].update(host_profile(forward, device, args.iters, args.top))
        if "kernel_launches" in rows[name]:
            print(f"{name}: {rows[name]['kernel_launches']:.0f} kernel launches, "
                  f"{rows[name]['kernel_ms']:.2f} ms of kernels per {call}", flush=True)
        print(f"{name}: own time per {call}, top 10:", flush=True)
        for f in rows[name]["top_own"][:10]:
            print(f"  {f['own_ms']:7.3f} ms {f['calls']:7.1f} calls  {f['function']}", flush=True)
        write_json(result, Path(args.out) / f"{args.name}.json")
    result["complete"] = True
    write_json(result, Path(args.out) / f"{args.name}.json")
    print(f"wrote {Path(args.out) / args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
