"""BiGLA operator benchmark: vigla's chunk-parallel Triton kernels against fla's bidirectional path.

Run on a GPU (one run per table; every ratio is taken within the run):

    python benchmarks/bench_bigla.py --out benchmarks/results
    python benchmarks/bench_bigla.py --configs chunk=32 chunk=64,warps_chunk=8   # tuning
    python benchmarks/bench_bigla.py --profile-once "ViG-T @512"                 # one call, for ncu
    python benchmarks/bench_bigla.py --alt ab/a.py ab/b.py                        # A/B against other versions
    python benchmarks/bench_bigla.py --shape "ViG-T @512 b128=128,1024,3,32,64"   # a shape outside the table

Shapes: ViG-T layers (H=3, d_k=32, d_v=64) at T = 196/1024/4096/16384 with the anchors' batch
sizes, a ViG-S layer, and the four ViG-H-T stages at 224². The model's path: ``bigla_gated`` with
bf16 q, k, v as column slices of one projection and bf16 gate logits (log decays
``logsigmoid(z) / 16``: inside the kernels for vigla; a separate op before ``chunk_gla`` for fla, as
in the official code). Timings, each a median of CUDA-event-timed whole calls:

* ``do_bench``: ``triton.testing.do_bench``, which includes the host's time to launch a call;
* ``graph``: ``triton.testing.do_bench_cudagraph``, replays of a captured CUDA graph (the host left
  out). A backward through autograd does not capture, so vigla's forward+backward graph timing
  replays the two launchers autograd calls (forward, then backward, default plans): the device time
  of the op's forward and backward. fla's forward+backward has none.

``--alt FILE [FILE ...]``: other versions of ``vigla/ops/bigla/triton_kernels.py`` (branches', carried as
files) timed in the same run, their launchers called directly with their default plans beside this
version's (``cfg:default``), each as ``alt:<file stem>`` with the largest relative difference of its output
and five gradients from this version's (``alt:<stem>_rel_diff``): an A/B of kernel changes in one call, same
device, same inputs.

Where the time goes (``vigla`` rows): ``vigla_kernel_ms``, each kernel's device time per call of the default
plan (``torch.profiler``), forward and forward+backward; ``settings.compiled_kernels``, the registers and spilled
registers of every BiGLA kernel the default plans launched in the run (not the ``--configs`` variants).

Byte floors: the time to read every input once and write every output once at the copy bandwidth
measured in the same run (forward: q, k, v, two gates, o; backward: those inputs and do, then dq,
dk, dv and two gate gradients).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.report import envelope, write_json  # noqa: E402
from vigla.ops.bigla import HAS_FLA, bigla_fla, bigla_gated, log_decays  # noqa: E402

GATE_NORMALIZER = 16.0  # ViG's
SHAPES = [  # name, B, T, H, K, V
    ("ViG-T @224", 128, 196, 3, 32, 64),
    ("ViG-T @512", 48, 1024, 3, 32, 64),
    ("ViG-T @1024", 12, 4096, 3, 32, 64),
    ("ViG-T @2048", 4, 16384, 3, 32, 64),
    ("ViG-S @224", 128, 196, 6, 32, 64),
    ("ViG-H-T s1 @224", 128, 3136, 3, 16, 32),
    ("ViG-H-T s1 @512", 16, 16384, 3, 16, 32),
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


def make_inputs(B, T, H, K, V, dtype=torch.bfloat16, grad=False):
    """``(q, k, v, zf, zb)`` laid out as BiGLAMixer passes them: q, k, v column slices of one
    projection output ``[B, T, 2HK + HV + 16 + HV]``, the logits the halves of one ``[B, T, 2HK]``."""
    def r(*s):  # drawn on the CPU: a failed CUDA-graph capture leaves the CUDA generator unusable
        return torch.randn(*s, dtype=dtype).cuda().requires_grad_(grad)

    proj = r(B, T, 2 * H * K + H * V + 16 + H * V)
    q, k, v = proj[..., :2 * H * K + H * V].split([H * K, H * K, H * V], -1)
    zf, zb = r(B, T, 2 * H * K).unflatten(-1, (2, H, K)).unbind(2)
    return q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V)), zf, zb


def parse_config(text: str):
    """``"chunk=32,warps_chunk=8"`` -> BiGLAConfig (``"default"``: the automatic plan)."""
    from vigla.ops.bigla.triton_kernels import BiGLAConfig

    if text == "default":
        return BiGLAConfig()
    fields = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        fields[key] = value if key == "state_dtype" else int(value)
    return BiGLAConfig(**fields)


def parse_shape(text: str) -> tuple:
    """``"NAME=B,T,H,K,V"`` -> a :data:`SHAPES` row (e.g. the model's own layer at its benchmark batch)."""
    name, sep, dims = text.rpartition("=")
    try:
        B, T, H, K, V = (int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape takes NAME=B,T,H,K,V (five integers), got {text!r}") from None
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--shape takes NAME=B,T,H,K,V with a name, got {text!r}")
    return name, B, T, H, K, V


def _sha256(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


ALT_PREFIX = "vigla.ops.bigla._alt_"  # the modules of --alt versions


def load_alt(path: str, package: str = "vigla.ops.bigla"):
    """The module at ``path``, a version of ``package``'s ``triton_kernels.py``, imported inside ``package`` (its
    relative imports resolve there) under a name of its own (``<package>._alt_<file stem>``)."""
    import importlib.util

    name = f"{package}._alt_" + "".join(c if c.isalnum() else "_" for c in Path(path).stem)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    sys.modules[spec.name] = module  # Triton reads the kernels' source through their module
    spec.loader.exec_module(module)
    return module


def alt_rel_diff(x, do, alt) -> float:
    """The largest relative difference (norm of the difference over the norm) of ``alt``'s output and five
    gradients from this version's, default plans both."""
    ours, theirs = ([t.double() for t in _calls("kernels", x, do, None, kernels)[1]()] for kernels in (None, alt))
    return max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(theirs, ours))


def _calls(impl: str, x, do, config, kernels=None):
    """``(forward, forward_and_backward)`` callables for one implementation; ``"kernels"``: the launchers of
    the module ``kernels`` (default: this version's ``triton_kernels``), whose calls return the output
    and the five gradients."""
    if kernels is None:
        from vigla.ops.bigla import triton_kernels as kernels
    scale = x[0].shape[-1] ** -0.5
    if impl == "vigla":  # the public op: what the model calls
        def fwd():
            with torch.no_grad():
                bigla_gated(*x, GATE_NORMALIZER)

        def fwdbwd():
            torch.autograd.grad(bigla_gated(*x, GATE_NORMALIZER), x, do)
    elif impl == "kernels":  # the launchers themselves, with a launch configuration
        plain = [t.detach() for t in x]

        def fwd():
            return kernels.bigla_fwd_triton(*plain, scale, GATE_NORMALIZER, config=config)

        def fwdbwd():
            return fwd(), *kernels.bigla_bwd_triton(*plain, do, scale, GATE_NORMALIZER, config=config)
    else:  # fla on [x; flip(x)], log decays formed first
        def run():
            return bigla_fla(*x[:3], log_decays(x[3], GATE_NORMALIZER), log_decays(x[4], GATE_NORMALIZER), scale)

        def fwd():
            with torch.no_grad():
                run()

        def fwdbwd():
            torch.autograd.grad(run(), x, do)
    return fwd, fwdbwd


def _time(fn, graph: bool):
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        if graph:
            return do_bench_cudagraph(fn, rep=100, return_mode="median")
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    except RuntimeError as exc:  # a call that cannot be captured in a CUDA graph
        if not graph:
            raise
        print(f"no CUDA-graph timing ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
        torch.cuda.synchronize()
        return None


def measure(shape, impls, configs, alts=(), launches: set | None = None) -> dict:
    """One row: every implementation's timings at ``shape``; ``alts``: ``(label, module)`` pairs; ``launches``
    collects the ``(id, key)`` pairs of the default plans' launches (:func:`launched_keys`)."""
    name, B, T, H, K, V = shape
    x = make_inputs(B, T, H, K, V, grad=True)
    do = torch.randn(B, T, H, V, dtype=torch.bfloat16).cuda()
    row = dict(name=name, B=B, T=T, H=H, K=K, V=V, tokens=B * T)
    for label, module in alts:
        row[f"{label}_rel_diff"] = alt_rel_diff(x, do, module)
    runs = [(impl, impl, None, None) for impl in impls if impl != "kernels"]
    runs += [("kernels", label, cfg, None) for label, cfg in configs]
    runs += [("kernels", label, None, module) for label, module in alts]
    for impl, label, cfg, module in runs:
        before = launched_keys() if impl == "vigla" and launches is not None else None
        fwd, fwdbwd = _calls(impl, x, do, cfg, module)
        row[f"{label}_fwd_ms"] = _time(fwd, graph=False)
        row[f"{label}_fwdbwd_ms"] = _time(fwdbwd, graph=False)
        row[f"{label}_fwd_graph_ms"] = _time(fwd, graph=True)
        if impl == "vigla":  # autograd's backward does not capture: the launchers it calls
            fwdbwd = _calls("kernels", x, do, None)[1]
        if impl != "fla":
            row[f"{label}_fwdbwd_graph_ms"] = _time(fwdbwd, graph=True)
        if before is not None:  # the launches of this shape's default plans (ints are keyed by value: new keys)
            launches.update(launched_keys() - before)
    if "vigla" in impls:
        row["vigla_kernel_ms"] = kernel_times(x, do)
    return row


def kernel_times(x, do, calls: int = 5) -> dict:
    """Device time per call of each kernel the default plan launches (ms, ``torch.profiler``'s CUDA events,
    mean of ``calls``, largest first: :func:`vigla.bench.measure.profiled_kernels`), forward and
    forward+backward: where the op's time goes."""
    from torch.profiler import ProfilerActivity, profile

    from vigla.bench.measure import profiled_kernels

    out = {}
    for mode, fn in zip(("fwd", "fwdbwd"), _calls("kernels", x, do, None)):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        out[mode] = {k["op"]: k["self_cuda_ms"] for k in profiled_kernels(prof, calls)["kernels"]}
    return out


def launch_keywords(key: tuple) -> dict:
    """The keyword arguments (constexprs, ``num_warps``) of a launch from its key in the launcher's cache
    (``(device, debug, instrumentation, signature)``, the signature holding them as ``(name, value)`` pairs)."""
    return dict(x for x in key[-1] if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str))


def launched_keys() -> set:
    """``(id of the kernel, key)`` of every launch signature in the eager launcher's cache."""
    from vigla.ops.launcher import _FAST

    return {(id(fast), key) for fast in _FAST.values() for key in fast.compiled}


def compiled_kernels(only: set | None = None) -> list[dict]:
    """Registers and spilled registers of every BiGLA kernel of this version compiled in this run (Triton's
    metadata, None where a Triton version lacks a field; ``--alt`` versions' kernels left out), per chunk length,
    scan (backward), pass (forward) and ``num_warps``: the launcher's cache of compiled kernels, with ``only`` those
    of its ``(id, key)`` pairs (what :func:`measure` collected: the default plans' kernels, not ``--configs``')."""
    from vigla.ops.launcher import _FAST

    rows = []
    for fast in _FAST.values():
        module = getattr(getattr(fast.fn, "fn", None), "__module__", "")
        if not fast.fn.__name__.startswith("_bigla") or module.startswith(ALT_PREFIX):  # --alt versions' own
            continue
        for key, kernel in ((k, e.kernel) for k, e in fast.compiled.items() if only is None or (id(fast), k) in only):
            meta = launch_keywords(key)
            rows.append(dict(kernel=fast.fn.__name__, K=meta.get("K"), V=meta.get("V"), BT=meta.get("BT"),
                             UPPER=meta.get("UPPER"), PASS=meta.get("PASS"),
                             num_warps=getattr(kernel.metadata, "num_warps", None),
                             registers=getattr(kernel, "n_regs", None), spills=getattr(kernel, "n_spills", None)))
    unique = {tuple(r.items()): r for r in rows}
    return sorted(unique.values(), key=lambda r: (r["kernel"], r["K"], r["BT"], r["UPPER"] or 0, r["PASS"] or 0))


def _ratio(a, b):
    return None if a is None or b is None else a / b


def add_ratios(row: dict, bw: float) -> None:
    B, T, H, K, V = (row[k] for k in "BTHKV")
    row["floor_fwd_ms"] = 2 * B * T * H * (4 * K + 2 * V) / bw * 1e3  # bf16 in and out
    row["floor_fwdbwd_ms"] = row["floor_fwd_ms"] + 2 * B * T * H * (8 * K + 3 * V) / bw * 1e3
    for mode in ("fwd", "fwdbwd"):
        row[f"fla_over_vigla_{mode}"] = _ratio(row.get(f"fla_{mode}_ms"), row.get(f"vigla_{mode}_ms"))
        row[f"vigla_{mode}_over_floor"] = _ratio(row.get(f"vigla_{mode}_ms"), row[f"floor_{mode}_ms"])
        row[f"vigla_{mode}_graph_over_floor"] = _ratio(row.get(f"vigla_{mode}_graph_ms"), row[f"floor_{mode}_ms"])
    row["fla_graph_over_vigla_graph_fwd"] = _ratio(row.get("fla_fwd_graph_ms"), row.get("vigla_fwd_graph_ms"))


def profile_once(name: str) -> int:
    """One forward and one backward at shape ``name`` after a warm-up (for ``ncu``)."""
    shape = next(s for s in SHAPES if s[0] == name)
    x = make_inputs(*shape[1:], grad=True)
    do = torch.randn(*shape[1:4], shape[5], dtype=torch.bfloat16).cuda()
    for _ in range(2):
        torch.autograd.grad(bigla_gated(*x, GATE_NORMALIZER), x, do)
    torch.cuda.synchronize()
    return 0


def print_table(result: dict) -> None:
    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    env, settings = result["environment"], result["settings"]
    print(f"\n{env['device']}  copy {settings['copy_bandwidth_TBps']:.2f} TB/s  commit {result['git']['commit']}")
    print(f"{'shape':16} {'fwd':>7} {'graph':>7} {'fla':>7} {'x':>5} {'f+b':>7} {'graph':>7} {'fla':>7} "
          f"{'x':>5} {'fwd/fl':>6} {'f+b/fl':>6}")
    for r in result["rows"]:
        print(f"{r['name']:16} {fmt(r.get('vigla_fwd_ms')):>7} {fmt(r.get('vigla_fwd_graph_ms')):>7} "
              f"{fmt(r.get('fla_fwd_ms')):>7} {fmt(r.get('fla_over_vigla_fwd'), '.1f'):>5} "
              f"{fmt(r.get('vigla_fwdbwd_ms')):>7} {fmt(r.get('vigla_fwdbwd_graph_ms')):>7} "
              f"{fmt(r.get('fla_fwdbwd_ms')):>7} {fmt(r.get('fla_over_vigla_fwdbwd'), '.1f'):>5} "
              f"{fmt(r.get('vigla_fwd_graph_over_floor'), '.1f'):>6} "
              f"{fmt(r.get('vigla_fwdbwd_graph_over_floor'), '.1f'):>6}")
        tuned = [k[:-len("_fwd_graph_ms")] for k in r if (k.startswith("cfg:") or k.startswith("alt:"))
                 and k.endswith("_fwd_graph_ms")]
        for label in tuned:
            diff = r.get(label + "_rel_diff")
            print(f"  {label.removeprefix('cfg:'):30} fwd graph {fmt(r.get(label + '_fwd_graph_ms'))}  "
                  f"f+b graph {fmt(r.get(label + '_fwdbwd_graph_ms'))}"
                  + ("" if diff is None else f"  largest relative difference from this version {diff:.2e}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--impls", nargs="+", default=["vigla", "fla"], choices=["vigla", "fla"],
                    help="vigla's op, fla-core's chunk_gla on [x; flip(x)] (when installed)")
    ap.add_argument("--configs", nargs="*", default=[],
                    help="launch configurations of the kernels to time beside the default, e.g. "
                         "chunk=32 or chunk=64,warps_chunk=8,segments=4,state_dtype=fp32")
    ap.add_argument("--shapes", nargs="*", default=None, help="names of the shapes to run (default: all)")
    ap.add_argument("--shape", dest="extra", action="append", type=parse_shape, default=[], metavar="NAME=B,T,H,K,V",
                    help="a shape outside the table, run after the table's (repeatable; --shapes may name it)")
    ap.add_argument("--alt", nargs="+", default=[], metavar="FILE",
                    help="other versions of vigla/ops/bigla/triton_kernels.py to time in the same run "
                         "(module docstring)")
    ap.add_argument("--name", default="bench_bigla", help="stem of the JSON file")
    ap.add_argument("--profile-once", metavar="SHAPE", help="run one forward+backward at SHAPE and exit")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_bigla needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.profile_once:
        return profile_once(args.profile_once)
    impls = [i for i in args.impls if i != "fla" or HAS_FLA]
    configs = [(f"cfg:{c}", parse_config(c)) for c in args.configs]
    alts = [(f"alt:{Path(f).stem}", load_alt(f)) for f in args.alt]
    if alts and not configs:  # this version's launchers beside the others', default plans all
        configs = [("cfg:default", parse_config("default"))]
    if configs:
        impls.append("kernels")
    bw = copy_bandwidth()
    result = envelope(torch.device("cuda"), settings=dict(
        what="BiGLA operator", dtype="bfloat16", layout="model (q, k, v strided column slices of one projection)",
        timing="CUDA events, median of whole calls; *_ms: triton.testing.do_bench (host launch included); "
               "*_graph_ms: triton.testing.do_bench_cudagraph (replays of a captured graph)",
        copy_bandwidth_TBps=bw / 1e12, impls=impls, configs=[c for c, _ in configs],
        alt=[{"label": label, "file": f, "sha256": _sha256(f)} for (label, _), f in zip(alts, args.alt)]))
    if "fla" in args.impls and not HAS_FLA:  # said, not silently dropped: the fla columns stay empty
        result["notes"].append("fla was asked for but is not installed here (pip install fla-core, or its wheel in "
                               ".whl/ through `python -m benchmarks fla`): vigla only")
        print(f"bench_bigla: {result['notes'][-1]}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"{args.name}.json"
    launches: set = set()  # the default plans' launches, for compiled_kernels
    for shape in SHAPES + args.extra:
        if args.shapes and shape[0] not in args.shapes:
            continue
        row = measure(shape, impls, configs, alts, launches)
        add_ratios(row, bw)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(result, path)  # after every row: a run cut short keeps its rows
    if "vigla" in impls:
        result["settings"]["compiled_kernels"] = compiled_kernels(launches)
    result["complete"] = True
    write_json(result, path)
    print_table(result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
