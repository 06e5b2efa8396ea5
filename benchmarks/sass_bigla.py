"""Static SASS of the BiGLA kernels, compiled for Hopper (sm_90) on any machine, no GPU needed.

    python benchmarks/sass_bigla.py --out benchmarks/results             # the default plans' kernels
    python benchmarks/sass_bigla.py --alt ab/old.py --lines 12           # another version beside this one
    python benchmarks/sass_bigla.py --configs steep_pass=1 bwd_regs=72   # launch configurations beside the default
    python benchmarks/sass_bigla.py --depth 1 --lines 30                 # lines inside the helpers the kernels call

Triton's NVIDIA wheel carries ptxas, nvdisasm and cuobjdump: each kernel the default launch plan picks at
a ViG-T layer (d_k = 32, d_v = 64; T = 196 and 4096) and a ViG-H-T stage-1 layer (d_k = 16, d_v = 32;
T = 3136) is compiled as the launcher would specialise it for the model's layout (bf16 tensors, 16-byte
aligned pointers and strides), with the plan's chunk length, warps and register cap. Per kernel: registers
and stack (spills) from the cubin, the SASS instruction count, its opcode histogram and the instructions
of each source line of the kernel's body (nvdisasm's line table): where the instructions go, the thing
that bounds these kernels (Nsight Compute: ``ncu_vig_t_*.txt``). Counts are static: a loop's body counts
once and code the inputs never reach (the exact path for steep decays) counts too, so compare versions
line by line, not totals against timings. Written against Triton 3.8's compiler API (``ASTSource`` with
``attrs``); the code it reads may differ in detail from what another Triton version generates.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_bigla import SHAPES, load_alt, parse_config  # noqa: E402
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.ops.bigla.triton_kernels import _options  # noqa: E402

# the bench_bigla.py shapes (name, B, T, H, d_k, d_v) whose kernels are compiled
LAYERS = [s for s in SHAPES if s[0] in ("ViG-T @224", "ViG-T @1024", "ViG-H-T s1 @224")]
# multiples of 16 in ViG's layout
STRIDES = {"sqb", "sqt", "sqh", "svb", "svt", "svh", "sgb", "sgt", "sgh", "sxb", "sxt", "szb", "szt"}
FLOATS = {"ginv", "gnorm", "half_scale", "eps"}
FP32_PTRS = {"hs", "dec", "w_o", "w_l"}  # the backward's shares (pq, pk, pv) are bf16 for bf16 inputs (handoff_dtype)
I8_PTRS = {"steep"}  # the output kernel's flags of steep chunks
PTR_NAMES = {"q", "k", "v", "do", "gf", "gb", "g", "h", "o", "dq", "dk", "dv", "dg", "pq", "pk", "pv", "x", "z",
             "tri"} | FP32_PTRS


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_kernel(fn, constexprs: dict, warps: int, maxnreg: int, stages: int = 0):
    """``fn`` compiled for sm_90 with ``constexprs``, ``maxnreg`` and ``num_stages`` (0: none, Triton's default);
    tensors bf16 (fp32 where the launchers pass fp32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else "*fp32" if n in FP32_PTRS else "*i8" if n in I8_PTRS else "*bf16"
           if n in PTR_NAMES else "fp32" if n in FLOATS else "i32" for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or n in STRIDES}
    options = {"num_warps": warps, **_options(maxnreg, stages)}  # as the launchers give them
    return triton.compile(ASTSource(fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def analyse(kernel, source: list[str], top: int, depth: int = 0) -> dict:
    """Registers, stack, instruction count, opcode histogram and the ``top`` source lines by instructions. Each
    instruction counts for one line of its inlining chain (nvdisasm's line table): the kernel body's own line
    (``depth`` 0), or the line ``depth`` calls in (1: inside the helper the body calls, e.g. ``_bwd_chunk``; the
    innermost line where the chain is shorter), lines of the kernel's own file only (Triton's library functions, such
    as ``tl.cumsum``'s scan, count for the line that calls them)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        text = subprocess.run([_tool("nvdisasm"), "-gi", "-c", f.name], capture_output=True, text=True).stdout
    res = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    ops, lines, line, chain = collections.Counter(), collections.Counter(), None, []
    for row in text.splitlines():
        if row.lstrip().startswith("//## File"):
            if line is not None:  # the first entry of a new chain: innermost first, the kernel body's line last
                chain, line = [], None
            chain.append(re.search(r'File "([^"]*)", line (\d+)', row).groups())
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", row)
        if m:
            # the chain's entries in the kernel's own file (Triton's library, e.g. tl.cumsum's scan, has its own)
            ours = [int(n) for f, n in chain if f == chain[-1][0]]
            line = ours[max(0, len(ours) - 1 - depth)] if ours else 0
            ops[m.group(1)] += 1
            lines[line] += 1
    return dict(registers=res.get("REG"), stack_bytes=res.get("STACK"), instructions=sum(ops.values()),
                ops=dict(ops.most_common(12)),
                lines=[dict(line=n, instructions=c, source=source[n - 1].strip()[:100] if n else None)
                       for n, c in lines.most_common(top)])


def kernels_of(mod, B: int, T: int, H: int, K: int, V: int, config=None):
    """``(name, fn, constexprs, warps, maxnreg, stages)`` of each kernel the plans launch for one layer, default or
    with ``config`` (a ``BiGLAConfig``; ``stages``: the walk's pipelining depth, 0 for Triton's default)."""
    out = []
    for chains in (2, 4):
        p = mod.plan(B, T, H, K, V, True, 132, chains, *([config] if config is not None else []))
        seg = p.nseg > 1
        gated = 2 if hasattr(mod, "_gated") else True  # gate logits, bf16 on a GPU (versions before _gated: a bool)
        common = dict(K=K, V=V, BT=p.BT, GATED=gated, HALF_DOTS=2, SEGMENTED=seg)
        walk = dict(common, BV=p.BVW, NV=p.NVW)
        if "MMA" in mod._bigla_walk_kernel.arg_names:  # its prefix sums' rule (versions before: cumsum only)
            walk.update(MMA=getattr(p, "walk_mma", p.mma))
        out.append((f"walk ({chains} chains)", mod._bigla_walk_kernel, walk, p.warps_walk,
                    getattr(p, "walk_regs", 0), getattr(p, "walk_stages", 0)))  # versions before them: none
        if chains == 2:
            fwd = dict(common, BV=p.BV)
            if "PASS" in mod._bigla_fwd_kernel.arg_names:  # the output kernel's first pass (all there is without
                fwd.update(PASS=1 if getattr(p, "steep_pass", False) else 0)  # a steep pass)
            if "MMA" in mod._bigla_fwd_kernel.arg_names:  # the prefix sums' rule, the plan's (before: the kernel's)
                fwd.update(MMA=p.mma)
            if "MIX" in mod._bigla_fwd_kernel.arg_names:  # the training path's output, the inference path's mix
                out.append(("forward + mix", mod._bigla_fwd_kernel, dict(fwd, MIX=True, ACT=True), p.warps_chunk,
                            p.regs, 0))
                fwd.update(MIX=False, ACT=False)
            out.append(("forward per-chunk", mod._bigla_fwd_kernel, fwd, p.warps_chunk, p.regs, 0))
        else:
            bwd = dict(common, BV=p.BV)
            if "PASS" in mod._bigla_bwd_kernel.arg_names:  # the per-chunk kernel's first pass (versions before: none)
                bwd.update(PASS=1 if p.steep_pass else 0)
            if "MMA" in mod._bigla_bwd_kernel.arg_names:  # the plan's rule (before bwd_mma: the forward's)
                bwd.update(MMA=getattr(p, "bwd_mma", p.mma))
            if "ORDER" in mod._bigla_bwd_kernel.arg_names:  # where it stores the gradients (before: at the end)
                bwd.update(ORDER=p.bwd_order)
            for upper in (0, 1):
                out.append((f"backward per-chunk (scan {upper})", mod._bigla_bwd_kernel, dict(bwd, UPPER=upper),
                            p.warps_chunk, p.regs, 0))
    return out


def load_version(path: str | None):
    if path is None:
        from vigla.ops.bigla import triton_kernels

        return triton_kernels, Path(triton_kernels.__file__)
    return load_alt(path), Path(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--name", default="sass_bigla", help="stem of the JSON file")
    ap.add_argument("--alt", default=None, metavar="FILE",
                    help="another version of vigla/ops/bigla/triton_kernels.py, analysed beside this one")
    ap.add_argument("--configs", nargs="*", default=[], metavar="CONFIG",
                    help="launch configurations of this version's kernels analysed beside its default plans, as "
                         "bench_bigla.py takes them (e.g. steep_pass=1 or chunk=32,bwd_regs=72)")
    ap.add_argument("--lines", type=int, default=8, help="source lines kept per kernel, most instructions first")
    ap.add_argument("--depth", type=int, default=0,
                    help="attribute instructions to the line this many inlined calls into the kernel body (0: the "
                         "body's line; 1: the line inside the helper it calls, e.g. _bwd_chunk's or _fwd_out's)")
    args = ap.parse_args()
    if args.depth < 0:
        ap.error(f"--depth takes 0 or more (inlined calls into the kernel body), got {args.depth}")
    try:
        import triton  # noqa: F401
    except ImportError:
        print("sass_bigla needs Triton (its NVIDIA backend carries ptxas and nvdisasm)", file=sys.stderr)
        return 2
    import torch

    result = envelope(torch.device("cpu"), settings=dict(
        what="BiGLA kernels' static SASS (sm_90), default launch plans", alt=args.alt, configs=args.configs,
        counts="static: loop bodies once, unreached code included", line_depth=args.depth))
    versions = ([("this", None, None)] + [(f"cfg:{c}", None, parse_config(c)) for c in args.configs]
                + ([("alt", args.alt, None)] if args.alt else []))
    for label, path, config in versions:
        mod, file = load_version(path)
        source = file.read_text().splitlines()
        for layer, B, T, H, K, V in LAYERS:
            for name, fn, consts, warps, regs, stages in kernels_of(mod, B, T, H, K, V, config):
                row = dict(version=label, layer=layer, kernel=name, chunk=consts["BT"], warps=warps, maxnreg=regs,
                           num_stages=stages or None,
                           **analyse(compile_kernel(fn, consts, warps, regs, stages), source, args.lines, args.depth))
                result["rows"].append(row)
                print(f"{label:4} {layer:16} {name:28} chunk {consts['BT']:2}  regs {row['registers']:3}  "
                      f"stack {row['stack_bytes']:3}  instructions {row['instructions']}", flush=True)
    path = save_complete(result, args.out, args.name)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
