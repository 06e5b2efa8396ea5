"""CPU inference with SwiGLU's gating in oneDNN's GEMM epilogues against fc1's GEMM then the gating kernel.

    python benchmarks/swiglu_epilogue_ab.py --out benchmarks/results --name cpu_swiglu_epilogue_ab

One process builds ViG-T and DeiT-T (224, batch ``--batch-size``, float32, ``eval()`` and
``torch.inference_mode``, glibc keeping freed memory as the vigla commands do) and, for ``--rounds`` rounds, times
``--calls`` forwards of each in turn: ViG-T as vigla runs it (:func:`vigla.layers.cast.gemm_swiglu`: fc1's two
halves packed apart, a SiLU post-op on the gate's GEMM, a multiply on the value's), ViG-T with its MLPs' records
holding the whole fc1 packed instead (fc1's GEMM writes ``[rows, 2I]``, the gating kernel reads it: the path a CPU
without oneDNN takes), and DeiT-T. Each row is one round; the last the medians, with each ViG-T path's throughput
over DeiT-T's. Results: ``OUT/NAME.json`` (:func:`vigla.bench.report.envelope`).
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
from vigla.engine.host_memory import keep_freed_memory  # noqa: E402
from vigla.layers.cast import _MEMOS  # noqa: E402
from vigla.layers.mlp import MlpInference  # noqa: E402
from vigla.models._vig_common import ViGBlock  # noqa: E402

PATHS = ("epilogue", "gemm_then_gating", "deit")


def path_records(model: torch.nn.Module, rows: int) -> dict:
    """For each path of ViG-T, the records its blocks' eager inference reads (:func:`vigla.layers.cast.memoized`'s,
    built by one forward before): as vigla builds them (``epilogue``), and the same with each MLP's record holding
    the whole fc1 packed and no halves (``gemm_then_gating``)."""
    records = {"epilogue": {}, "gemm_then_gating": {}}
    for blk in (m for m in model.modules() if type(m) is ViGBlock):
        memo = _MEMOS[blk]
        p = memo.value.mlp
        w1_gemm = torch.ops.mkldnn._reorder_linear_weight(p.w1.contiguous(), rows)
        records["epilogue"][blk] = memo
        records["gemm_then_gating"][blk] = memo._replace(
            value=memo.value._replace(mlp=MlpInference(p.w1, p.w2, w1_gemm, p.w2_gemm)))
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="cpu_swiglu_epilogue_ab")
    args = ap.parse_args(argv)
    keep_freed_memory()
    torch.manual_seed(0)
    vig, deit = build_model("vig_tiny", 224).eval(), build_model("deit_tiny_patch16_224", 224).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    result = envelope(torch.device("cpu"), dict(models=["vig_tiny", "deit_tiny_patch16_224"], paths=list(PATHS),
                                                batch_size=args.batch_size, img_size=224, amp="none",
                                                rounds=args.rounds, calls=args.calls, threads=torch.get_num_threads()))
    with torch.inference_mode():
        expect = vig(x)  # builds the blocks' records
        records = path_records(vig, args.batch_size * (224 // 16) ** 2)
        for r in range(args.rounds):
            row = {"round": r}
            for path in PATHS:
                model = deit if path == "deit" else vig
                if path != "deit":
                    _MEMOS.update(records[path])
                    torch.testing.assert_close(model(x), expect, rtol=1e-4, atol=1e-4)
                start = time.perf_counter()
                for _ in range(args.calls):
                    model(x)
                row[f"{path}_ms"] = (time.perf_counter() - start) * 1e3 / args.calls
            result["rows"].append(row)
            print(f"round {r}: " + ", ".join(f"{p} {row[p + '_ms']:.1f} ms" for p in PATHS), flush=True)
    med = {p: statistics.median(row[f"{p}_ms"] for row in result["rows"]) for p in PATHS}
    result["rows"].append({"round": "median", **{f"{p}_ms": v for p, v in med.items()},
                           "epilogue_over_deit": med["deit"] / med["epilogue"],
                           "gemm_then_gating_over_deit": med["deit"] / med["gemm_then_gating"]})
    print(f"median: ViG-T {med['epilogue']:.1f} ms with the epilogues, {med['gemm_then_gating']:.1f} ms with fc1's "
          f"GEMM then the gating; DeiT-T {med['deit']:.1f} ms (ViG-T / DeiT-T throughput "
          f"{med['deit'] / med['epilogue']:.3f} vs {med['deit'] / med['gemm_then_gating']:.3f})")
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
