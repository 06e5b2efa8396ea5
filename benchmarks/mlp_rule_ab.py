"""When a small eager forward runs the MLP + add + norm kernel: its rule now against the rule before (CUDA).

    python benchmarks/mlp_rule_ab.py --out benchmarks/results --name models_vig_t_mlp_rule_ab

``new``: :func:`vigla.ops.add_norm.op.mlp_fused` as it is (issued eagerly: one kernel for a ViG block's SwiGLU MLP
and the add + norm after it at any row count). ``old``: only from one 128-row tile per multiprocessor (fewer rows,
e.g. batch 1: fc1 + SwiGLU, then fc2 inside the next add + norm: one launch more per block). Two ViG-T models with
the same weights (bf16 autocast, ``eval()``, ``torch.inference_mode``), each built and warmed up under its own
rule (the rule decides which weights a block prepares), and DeiT-T; for ``--rounds`` rounds, in an order
alternating by round: each variant's batch-1 latency (median of ``--calls`` forwards each waited for) and its
batch-8 and batch-32 forwards issued back to back (ms per forward), then DeiT-T's batch-1 latency. Rows: one per
round, then the medians, with ViG-T's batch-1 latency over DeiT-T's per variant. Results: ``OUT/NAME.json``
(:func:`vigla.bench.report.envelope`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from vigla.bench.cli import build_model  # noqa: E402
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.layers import mlp as mlp_layer  # noqa: E402
from vigla.ops.add_norm import op as add_norm_op  # noqa: E402

NEW_RULE = add_norm_op.mlp_fused


def old_rule(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """:func:`mlp_fused` before: the one kernel only from one 128-row tile per multiprocessor."""
    return (add_norm_op.use_kernels(x) and x.dtype in (torch.float16, torch.bfloat16)
            and w1.dtype == w2.dtype == x.dtype and w2.shape[0] <= add_norm_op.MLP_MAX_C
            and add_norm_op.mlp_fills_device(x.numel() // max(x.shape[-1], 1), x.device.index))


RULES = {"old": old_rule, "new": NEW_RULE}
_ACTIVE = {"rule": NEW_RULE}


def _switch(x, w1, w2) -> bool:
    return _ACTIVE["rule"](x, w1, w2)


def use(variant: str) -> None:
    _ACTIVE["rule"] = RULES[variant]


def run(model, x) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        return model(x)


def latency_ms(model, x, calls: int) -> float:
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(model, x)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pipelined_ms(model, x, calls: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        run(model, x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=30, help="batch-1 forwards per latency (20 per pipelined figure)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="models_vig_t_mlp_rule_ab")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("mlp_rule_ab: needs a CUDA GPU", file=sys.stderr)
        return 2
    add_norm_op.mlp_fused = mlp_layer.mlp_fused = _switch  # the layers and the op consult the active rule
    torch.manual_seed(0)
    models = {name: build_model("vig_tiny", 224).cuda().eval() for name in RULES}
    models["new"].load_state_dict(models["old"].state_dict())
    deit = build_model("deit_tiny_patch16_224", 224).cuda().eval()
    xs = {b: torch.randn(b, 3, 224, 224, device="cuda") for b in (1, 8, 32)}
    for name, model in models.items():  # each model's prepared weights built under its own rule
        use(name)
        for x in xs.values():
            for _ in range(3):
                run(model, x)
    for _ in range(3):
        run(deit, xs[1])
    result = envelope(torch.device("cuda"), dict(model="vig_tiny", baseline="deit_tiny_patch16_224", amp="bf16",
                                                 img_size=224, rounds=args.rounds, calls=args.calls))
    for r in range(args.rounds):
        row = {"round": r}
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            use(name)
            row[f"{name}_b1_ms"] = latency_ms(models[name], xs[1], args.calls)
            row[f"{name}_b8_ms"] = pipelined_ms(models[name], xs[8], 20)
            row[f"{name}_b32_ms"] = pipelined_ms(models[name], xs[32], 20)
        row["deit_b1_ms"] = latency_ms(deit, xs[1], args.calls)
        result["rows"].append(row)
        print(r, {k: round(v, 3) for k, v in row.items()}, flush=True)
    median = {k: statistics.median(row[k] for row in result["rows"]) for k in result["rows"][0] if k != "round"}
    for name in RULES:
        median[f"{name}_latency_ratio"] = median[f"{name}_b1_ms"] / median["deit_b1_ms"]
    result["rows"].append({"round": "median", **median})
    print("median", {k: round(v, 3) for k, v in median.items()})
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
