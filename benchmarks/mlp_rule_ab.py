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

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.interleaved import latency_ms, pipelined_ms  # noqa: E402
from vigla.bench.cli import build_model  # noqa: E402
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.ops.add_norm import op as add_norm_op  # noqa: E402

ISSUED_EAGERLY = add_norm_op.issued_eagerly  # as op.py imported it
CUDA = torch.device("cuda")


def use(variant: str) -> None:
    """``new``: :func:`mlp_fused` as it is; ``old``: the same with its eager branch off (the rule before: one
    128-row tile per multiprocessor)."""
    add_norm_op.issued_eagerly = ISSUED_EAGERLY if variant == "new" else (lambda: False)


def run(model, x) -> torch.Tensor:
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        return model(x)


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
    torch.manual_seed(0)
    models = {name: build_model("vig_tiny", 224).cuda().eval() for name in ("old", "new")}
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
    result = envelope(CUDA, dict(model="vig_tiny", baseline="deit_tiny_patch16_224", amp="bf16",
                                                 img_size=224, rounds=args.rounds, calls=args.calls))
    for r in range(args.rounds):
        row = {"round": r}
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            use(name)
            model = models[name]
            row[f"{name}_b1_ms"] = latency_ms(lambda: run(model, xs[1]), args.calls, CUDA)
            row[f"{name}_b8_ms"] = pipelined_ms(lambda: run(model, xs[8]), 20, CUDA)
            row[f"{name}_b32_ms"] = pipelined_ms(lambda: run(model, xs[32]), 20, CUDA)
        row["deit_b1_ms"] = latency_ms(lambda: run(deit, xs[1]), args.calls, CUDA)
        result["rows"].append(row)
        print(r, {k: round(v, 3) for k, v in row.items()}, flush=True)
    median = {k: statistics.median(row[k] for row in result["rows"]) for k in result["rows"][0] if k != "round"}
    for name in ("old", "new"):
        median[f"{name}_latency_ratio"] = median[f"{name}_b1_ms"] / median["deit_b1_ms"]
    result["rows"].append({"round": "median", **median})
    print("median", {k: round(v, 3) for k, v in median.items()})
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
