"""The host's time per call of each op of an eager ViG-T block, beside PyTorch's own ops (CUDA).

    python benchmarks/host_ops.py --out benchmarks/results --name profile_host_ops

Inputs of ViG-T's block at 224 (batch 128, 196 tokens, 192 channels, 3 heads of d_k 32 / d_v 64), bf16
under autocast, ``torch.inference_mode``. For each call: ``--calls`` issued back to back without waiting
for the device (the queue drained before each round), the median over ``--rounds`` rounds of the time per
call. That is the host's cost of the call: its Python, its allocations and its launches; an eager forward
is bound by the host when their sum over the block exceeds the block's device time. ``launches``: the
kernels the call issues (our ops; left empty for PyTorch's). Two Triton launches of an empty kernel (16
arguments) show the floor of a launch from Python: through :func:`vigla.ops.launcher.direct` (what the ops
use) and through Triton's own ``kernel[grid](...)``.
Results: ``OUT/NAME.json`` (the results envelope of :func:`vigla.bench.report.envelope`, a row per call).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.ops import bigla_gated  # noqa: E402
from vigla.ops.add_norm import add_norm  # noqa: E402
from vigla.ops.dwconv import dwconv_silu  # noqa: E402
from vigla.ops.launcher import direct  # noqa: E402
from vigla.ops.locality_mix import locality_mix  # noqa: E402
from vigla.ops.swiglu import swiglu_mlp  # noqa: E402

B, GRID, C, H, DK, DV, R, HIDDEN = 128, (14, 14), 192, 3, 32, 64, 16, 512  # ViG-T at 224


def calls(device: torch.device) -> list[tuple[str, int, object]]:
    """``(name, launches, call)`` for each op of the block and the PyTorch ops it is compared with."""
    bf = torch.bfloat16
    N = GRID[0] * GRID[1]
    K = H * DK

    def rand(*shape, dtype=bf):
        return torch.randn(*shape, device=device, dtype=dtype)

    x, x32 = rand(B, N, C), rand(B, N, C, dtype=torch.float32)
    proj = rand(B, N, 2 * K + C + R + C)  # the in-projection's output: q, k, v, decay input, gate
    q, k = proj[..., :K].unflatten(-1, (H, DK)), proj[..., K:2 * K].unflatten(-1, (H, DK))
    v = proj[..., 2 * K:2 * K + C].unflatten(-1, (H, DV))
    zf, zb = rand(B, N, H, DK), rand(B, N, H, DK)
    o = rand(B, N, H, DV)
    w_in, w_ln, b_ln = rand(proj.shape[-1], C), torch.ones(C, device=device), torch.zeros(C, device=device)
    w_in32 = w_in.float()
    w1, w2, w_conv, w_rms = rand(2 * HIDDEN, C), rand(C, HIDDEN), rand(C, 1, 3, 3), torch.ones(DV, device=device)
    return [
        ("torch.empty", 0, lambda: torch.empty(B, N, C, device=device, dtype=bf)),
        ("F.linear (bf16 weight)", None, lambda: F.linear(x, w_in)),
        ("F.linear (fp32 weight cast by autocast)", None, lambda: F.linear(x, w_in32)),
        ("F.layer_norm (autocast)", None, lambda: F.layer_norm(x, (C,), w_ln, b_ln)),
        ("vigla add_norm", 1, lambda: add_norm(x32, x, w_ln, b_ln, 1e-6, "layer", bf)),
        ("vigla dwconv_silu", 1, lambda: dwconv_silu(x, w_conv, GRID, True)),
        ("vigla bigla_gated", 2, lambda: bigla_gated(q, k, v, zf, zb, 16.0)),
        ("vigla locality_mix", 1, lambda: locality_mix(o, x, x, w_rms, w_rms, 1e-6, act=True)),
        ("vigla swiglu_mlp", 3, lambda: swiglu_mlp(x, w1, w2)),
    ]


def null_launches(device: torch.device) -> list[tuple[str, int, object]]:
    """An empty Triton kernel of 16 arguments (6 tensors, 10 ints), launched both ways."""
    @triton.jit
    def _null_kernel(a, b, c, d, e, f, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, K: tl.constexpr, V: tl.constexpr):
        pass

    args = (*[torch.empty(64, device=device) for _ in range(6)], *range(1, 11))
    fast = direct(_null_kernel)
    return [("Triton empty kernel via vigla's launcher", 1, lambda: fast[(1, 1, 1)](*args, K=32, V=64)),
            ("Triton empty kernel via kernel[grid]", 1, lambda: _null_kernel[(1, 1, 1)](*args, K=32, V=64))]


def host_us(call, device: torch.device, n: int, rounds: int, warmup: int = 20) -> float:
    """Median over ``rounds`` of the host's microseconds per call, ``n`` calls issued back to back."""
    for _ in range(warmup):
        call()
    per_call = []
    for _ in range(rounds):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        per_call.append((time.perf_counter() - t0) / n * 1e6)
    torch.cuda.synchronize(device)
    return sorted(per_call)[len(per_call) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50, help="calls issued per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="profile_host_ops")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_ops needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    result = envelope(device, settings=dict(
        what="host time per call, device idle at the start of each round", shapes="ViG-T block at 224, batch 128",
        dtype="bfloat16 (autocast)", calls=args.calls, rounds=args.rounds))
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        for name, launches, call in calls(device) + null_launches(device):
            us = host_us(call, device, args.calls, args.rounds)
            result["rows"].append({"call": name, "launches": launches, "host_us": us})
            print(f"{name:45s} {us:8.2f} us  ({launches} launches)", flush=True)
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
