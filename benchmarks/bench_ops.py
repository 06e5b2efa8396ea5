"""ViG's block ops on one GPU against their byte floors: the depthwise conv + SiLU (forward, forward +
backward), add + RMSNorm, the locality mix, the MLP's fc1 + SwiGLU gating (one kernel as the op picks
it, the per-tile kernel, and cuBLAS's GEMM then the gating kernel beside it), the inference path's BiGLA +
locality mix (BiGLA's output kernel forming the mix, and BiGLA then the mix kernel) and its MLP + the next add +
RMSNorm (one kernel where the op takes it, and fc1 + SwiGLU, fc2, add + norm), at the shapes of ViG-T's and
ViG-H-T's blocks, in one run.

    python benchmarks/bench_ops.py --out benchmarks/results                  # or: python -m benchmarks kernel ops
    python benchmarks/bench_ops.py --alt-dwconv ab/old.py                    # another dwconv version beside

Byte floor: every input read once and every output written once (bf16 activations, fp32 weight gradient
ignored) at the device-to-device copy bandwidth measured in the same run. Timing: CUDA-graph replays
(``triton.testing.do_bench_cudagraph``), median ms of a whole call. ``--alt-dwconv FILE``: a version of
``vigla/ops/dwconv/triton_kernels.py`` timed beside this one, with the largest relative difference of its
output and gradients from this version's.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_bigla import copy_bandwidth, load_alt  # noqa: E402
from vigla.bench.report import envelope, save_complete  # noqa: E402

SHAPES = [  # name, B, H, W, C, SwiGLU hidden width I
    ("ViG-T @224", 128, 14, 14, 192, 512),
    ("ViG-T @512", 128, 32, 32, 192, 512),
    ("ViG-T @1024", 32, 64, 64, 192, 512),
    ("ViG-T @2048", 8, 128, 128, 192, 512),
    ("ViG-S @224", 128, 14, 14, 384, 1024),
    ("ViG-H-T s1 @224", 128, 56, 56, 64, 192),
    ("ViG-H-T s2 @224", 128, 28, 28, 128, 352),
    ("ViG-T @224 batch 1", 1, 14, 14, 192, 512),
]


def _bench(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=100, return_mode="median")


def dwconv_calls(mod, x, w, hw, dy):
    """``(forward, forward + backward)`` through a kernels module's launchers (SiLU on, bf16 out)."""
    def fwd():
        return mod.dwconv_fwd_triton(x, w, hw, True, torch.bfloat16)

    def fwdbwd():
        return fwd(), *mod.dwconv_bwd_triton(dy, x, w, hw, True)
    return fwd, fwdbwd


def fc1_calls(x, w1):
    """``(fused, per_tile, unfused)`` fc1 + gating on ``[rows, C]`` bf16: one kernel as the op picks it, the
    per-tile kernel (one program per output tile, the op's choice before the persistent TMA kernel), and
    cuBLAS then the gating kernel."""
    from vigla.ops.swiglu.triton_kernels import fc1_swiglu_tiles, fc1_swiglu_triton, swiglu_fwd_triton

    y = x.new_empty(x.shape[0], w1.shape[0] // 2)
    return (lambda: fc1_swiglu_triton(x, w1)), (lambda: fc1_swiglu_tiles(x, w1, y) or y), \
        (lambda: swiglu_fwd_triton(torch.mm(x, w1.t())))


def bigla_mix_calls(x, nw, B: int, N: int, C: int, V: int):
    """``(fused, unfused, floor bytes)`` of the inference path's BiGLA + locality mix on the block's layout (q, k, v,
    both gates' logits and the mix gate column slices of one bf16 projection, ``d_k = d_v / 2``, ``x`` the local
    branch): BiGLA's output kernel forming the mix, and BiGLA then the mix kernel."""
    from vigla.ops.bigla.op import bigla_forward, bigla_mix_forward
    from vigla.ops.locality_mix.op import locality_mix_forward

    H, K = C // V, V // 2
    proj = torch.randn(B, N, 4 * H * K + 2 * C, device="cuda", dtype=torch.bfloat16)
    q, k, v, zf, zb, z = proj.split([H * K, H * K, C, H * K, H * K, C], -1)
    q, k, zf, zb = (t.unflatten(-1, (H, K)) for t in (q, k, zf, zb))
    v = v.unflatten(-1, (H, V))
    w = nw[:V]
    args = (q, k, v, zf, zb, K ** -0.5, 16.0)

    def fused():
        return bigla_mix_forward(*args, x, z, w, w, 1e-6, True)

    def unfused():
        return locality_mix_forward(bigla_forward(*args), x, z, w, w, 1e-6, True)
    return fused, unfused, proj.numel() * 2 + 2 * x.numel() * 2  # the projection and x read, y written


def mlp_calls(x, r, w1, w2, nw):
    """``(op, unfused)`` of the inference path's SwiGLU MLP + the next residual add + RMSNorm on ``[rows, C]`` bf16:
    the op as it routes (one kernel where :func:`vigla.ops.add_norm.op.mlp_fused`), and the kernels it replaced
    (fc1 + SwiGLU, then fc2's GEMM and the add + norm)."""
    from vigla.ops.add_norm.op import linear_add_norm_forward, mlp_add_norm_forward
    from vigla.ops.swiglu.op import fc1_swiglu_forward

    def op():
        return mlp_add_norm_forward(x, w1, w2, r, nw, None, 1e-6, True, torch.bfloat16)

    def unfused():
        return linear_add_norm_forward(fc1_swiglu_forward(x, w1), w2, r, nw, None, 1e-6, True, torch.bfloat16)
    return op, unfused


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def measure(shape, bw: float, alt) -> dict:
    from vigla.ops.add_norm import add_norm
    from vigla.ops.dwconv import triton_kernels as dw
    from vigla.ops.locality_mix import locality_mix

    name, B, H, W, C, I = shape
    N, e = H * W, 2  # bf16
    act = B * N * C * e  # bytes of one [B, N, C] bf16 activation
    x = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16)
    dy, d = torch.randn_like(x), torch.randn_like(x)
    w = torch.randn(C, 1, 3, 3, device="cuda") * 0.3
    row = dict(shape=name, B=B, H=H, W=W, C=C)
    fc1 = act + act * I // C  # x in, the gated [B, N, I] out
    floors = dict(dwconv_fwd=2 * act, dwconv_fwdbwd=2 * act + 3 * act, add_norm_fwd=4 * act, locality_mix_fwd=4 * act,
                  fc1_swiglu_fwd=fc1, fc1_tiles_fwd=fc1, fc1_then_gate_fwd=fc1)
    versions = [("", dw)] + ([("alt_", alt)] if alt is not None else [])
    for label, mod in versions:
        fwd, fwdbwd = dwconv_calls(mod, x, w, (H, W), dy)
        row[f"{label}dwconv_fwd_ms"] = _bench(fwd)
        row[f"{label}dwconv_fwdbwd_ms"] = _bench(fwdbwd)
    if alt is not None:
        ours, theirs = (dwconv_calls(m, x, w, (H, W), dy)[1]() for m in (dw, alt))
        row["alt_dwconv_rel_diff"] = max(_rel(a, b) for a, b in zip(ours, theirs))
    nw = torch.rand(C, device="cuda") + 0.5
    row["add_norm_fwd_ms"] = _bench(lambda: add_norm(x, d, nw, None, 1e-6, "rms", torch.bfloat16))
    z = torch.randn_like(x)
    o = torch.randn(B, N, 3, C // 3, device="cuda", dtype=torch.bfloat16) if C % 3 == 0 else None
    if o is not None:
        row["locality_mix_fwd_ms"] = _bench(lambda: locality_mix(o, x, z, nw[: C // 3], nw[: C // 3], 1e-6))
    mix_fused, mix_unfused, mix_bytes = bigla_mix_calls(x, nw, B, N, C, 32 if name.startswith("ViG-H") else 64)
    floors.update(bigla_mix_fwd=mix_bytes, bigla_then_mix_fwd=mix_bytes)
    row["bigla_mix_fwd_ms"], row["bigla_then_mix_fwd_ms"] = _bench(mix_fused), _bench(mix_unfused)
    row["bigla_mix_rel_diff"] = _rel(mix_fused(), mix_unfused())
    w1 = torch.randn(2 * I, C, device="cuda", dtype=torch.bfloat16) / C ** 0.5
    fused, tiles, unfused = fc1_calls(x.view(B * N, C), w1)
    row["fc1_swiglu_fwd_ms"], row["fc1_tiles_fwd_ms"] = _bench(fused), _bench(tiles)
    row["fc1_then_gate_fwd_ms"] = _bench(unfused)
    row["fc1_swiglu_rel_diff"] = _rel(fused(), unfused())
    row["fc1_tiles_rel_diff"] = _rel(tiles(), fused())
    w2 = torch.randn(C, I, device="cuda", dtype=torch.bfloat16) / I ** 0.5
    mlp, mlp_unfused = mlp_calls(x.view(B * N, C), d.view(B * N, C), w1, w2, nw)
    floors.update(mlp_add_norm_fwd=4 * act, mlp_then_add_norm_fwd=4 * act)  # x, r in; s, y out (weights aside)
    row["mlp_add_norm_fwd_ms"], row["mlp_then_add_norm_fwd_ms"] = _bench(mlp), _bench(mlp_unfused)
    row["mlp_add_norm_rel_diff"] = _rel(mlp()[1], mlp_unfused()[1])
    for op, nbytes in floors.items():
        floor_ms = nbytes / bw * 1e3
        row[f"floor_{op}_ms"] = floor_ms
        for label, _ in versions if op.startswith("dwconv") else [("", None)]:
            t = row.get(f"{label}{op}_ms")
            if t is not None:
                row[f"{label}{op}_over_floor"] = t / floor_ms
    return row


def _cell(row: dict, op: str, label: str = "") -> str:
    """``ms (ratio to the floor)`` of one op in a row, ``-`` when it was not timed."""
    t, r = row.get(f"{label}{op}_ms"), row.get(f"{label}{op}_over_floor")
    return "-" if t is None else f"{t:.3f} ({r:.1f}x)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alt-dwconv", default=None, metavar="FILE", help="another dwconv kernels file, timed beside")
    ap.add_argument("--shapes", nargs="+", default=None, help="names from SHAPES (default: all)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--name", default="kernel_ops")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_ops needs a CUDA GPU", file=sys.stderr)
        return 2
    alt = load_alt(args.alt_dwconv, "vigla.ops.dwconv") if args.alt_dwconv else None
    bw = copy_bandwidth()
    out = envelope(torch.device("cuda"), dict(
        what="block ops against their byte floors", dtype="bfloat16", timing="do_bench_cudagraph, median ms",
        copy_bandwidth_TBps=bw / 1e12, alt_dwconv=args.alt_dwconv and Path(args.alt_dwconv).name))
    shapes = [s for s in SHAPES if args.shapes is None or s[0] in args.shapes]
    print(f"{'shape':20s} {'dwconv fwd':>22s} {'dwconv f+b':>22s} {'add+norm':>14s} {'loc. mix':>14s} "
          f"{'fc1+gate':>14s} {'per tile':>14s} {'fc1, gate':>14s} {'bigla+mix':>14s} {'bigla, mix':>14s} "
          f"{'mlp+norm':>14s} {'mlp, norm':>14s}")
    for shape in shapes:
        row = measure(shape, bw, alt)
        out["rows"].append(row)
        alt_note = f"  alt: {_cell(row, 'dwconv_fwd', 'alt_')} / {_cell(row, 'dwconv_fwdbwd', 'alt_')}" if alt else ""
        print(f"{row['shape']:20s} {_cell(row, 'dwconv_fwd'):>22s} {_cell(row, 'dwconv_fwdbwd'):>22s} "
              f"{_cell(row, 'add_norm_fwd'):>14s} {_cell(row, 'locality_mix_fwd'):>14s} "
              f"{_cell(row, 'fc1_swiglu_fwd'):>14s} {_cell(row, 'fc1_tiles_fwd'):>14s} "
              f"{_cell(row, 'fc1_then_gate_fwd'):>14s} {_cell(row, 'bigla_mix_fwd'):>14s} "
              f"{_cell(row, 'bigla_then_mix_fwd'):>14s} {_cell(row, 'mlp_add_norm_fwd'):>14s} "
              f"{_cell(row, 'mlp_then_add_norm_fwd'):>14s}{alt_note}", flush=True)
    print(f"wrote {save_complete(out, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
