"""Two models timed in turn, round after round: their throughput ratio where the host's speed drifts.

    python benchmarks/interleaved.py --device cpu --out benchmarks/results --name cpu_vig_t_interleaved
    python benchmarks/interleaved.py --device cuda --out benchmarks/results --name models_vig_t_interleaved
    python benchmarks/interleaved.py --device cuda --models vig_small deit_base_patch16_224 \
        --name models_vig_s_interleaved
    python benchmarks/interleaved.py --device cuda --compile --name compile_vig_t_interleaved
    python benchmarks/interleaved.py --device cuda --compile --compile-mode reduce-overhead \
        --name compile_vig_t_reduce_overhead_interleaved

``vigla bench`` times one model, then the next. Where the figure depends on the host (a shared 2-core CPU; an
eager forward on the GPU, which waits on Python and kernel launches) the host's speed moves between those
windows: single runs put ViG-T / DeiT-T on this CPU between 0.7 and 1.2 for the same code, and on the GPU
machine DeiT-T's eager forward took 3.9 ms in one call and 6.4 ms in another. Here both models are built once
and each round times each in turn: ``--calls`` inference forwards issued back to back (the time per call when
they are pipelined, as a data loader feeds them), ``--steps`` training steps in train mode
(:func:`vigla.bench.measure.train_step`: forward, cross-entropy, backward, AdamW), and with ``--latency N``
N batch-1 forwards each waited for (the median); before the timed forwards one untimed forward (the training
steps before it change the weights, whose cast and packed copies an inference path then prepares once). A round's
ratio compares times taken seconds apart; the result is the median of the rounds' ratios, with every round's
figures. Batch ``--batch-size`` at 224,
``--amp`` autocast (bf16 by default on CUDA, none on the CPU), eval-mode ``torch.inference_mode`` forwards.
Results: ``OUT/NAME.json`` (the results envelope of :func:`vigla.bench.report.envelope`: a row per round, then
a row ``{"round": "median", ...}``; ``infer_ratio`` and ``train_ratio`` are the first model's throughput over
the second's, ``latency_ratio`` the first model's batch-1 latency over the second's). With ``--compile`` each
model is ``torch.compile``d (static shapes; ``--compile-mode``, default Inductor's default) before the warm-up,
which compiles its inference, training and batch-1 graphs; every timed call then runs compiled code (with
``reduce-overhead``, replayed CUDA graphs).
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
from vigla.bench.measure import autocast, synchronize, train_step  # noqa: E402
from vigla.bench.report import envelope, save_complete  # noqa: E402
from vigla.engine.host_memory import keep_freed_memory  # noqa: E402

RATIOS = ("infer_ratio", "train_ratio", "latency_ratio")


def pipelined_ms(fn, calls: int, device: torch.device) -> float:
    """Milliseconds per call of ``calls`` calls issued back to back, the device idle at the start."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / calls


def latency_ms(fn, calls: int, device: torch.device) -> float:
    """Median milliseconds of one call waited for, over ``calls`` calls."""
    times = []
    for _ in range(calls):
        times.append(pipelined_ms(fn, 1, device))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", nargs=2, default=["vig_tiny", "deit_tiny_patch16_224"], metavar=("MODEL", "BASELINE"))
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--calls", type=int, default=None, help="inference forwards per model and round (3 CPU, 10 CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model and round (2 CPU, 3 CUDA)")
    ap.add_argument("--latency", type=int, default=None, help="batch-1 forwards per model and round (0 CPU, 10 CUDA)")
    ap.add_argument("--batch-size", type=int, default=None, help="8 on the CPU, 128 on CUDA")
    ap.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"], help="none on the CPU, bf16 on CUDA")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model (static shapes)")
    ap.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                            "max-autotune-no-cudagraphs"],
                    help="torch.compile's mode (with --compile; default: Inductor's default)")
    ap.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="glibc keeps freed activations for reuse, as the vigla commands set it "
                         "(vigla.engine.host_memory); --no-keep-freed-memory: glibc's defaults")
    ap.add_argument("--eager-features", action="store_true",
                    help="the first model (a ViG) with its CUDA-graph replay of forward_features off "
                         "(set_cuda_graphs(False)): every kernel of its calls issued by the host")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="cpu_vig_t_interleaved")
    args = ap.parse_args(argv)
    if args.compile_mode and not args.compile:
        print("interleaved: --compile-mode needs --compile", file=sys.stderr)
        return 2
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("interleaved: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    calls = args.calls if args.calls is not None else (10 if cuda else 3)
    steps = args.steps if args.steps is not None else (3 if cuda else 2)
    latency = args.latency if args.latency is not None else (10 if cuda else 0)
    batch = args.batch_size or (128 if cuda else 8)
    amp = args.amp or ("bf16" if cuda else "none")
    device = torch.device(args.device)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    torch.manual_seed(0)
    models = {name: build_model(name, 224).to(device) for name in args.models}
    if args.eager_features:
        models[args.models[0]].set_cuda_graphs(False)
    if args.compile:
        models = {name: torch.compile(model, dynamic=False, mode=args.compile_mode) for name, model in models.items()}
    x, x1 = torch.randn(batch, 3, 224, 224, device=device), torch.randn(1, 3, 224, 224, device=device)

    def infer(model, inp):
        model.eval()
        with torch.inference_mode(), autocast(device, amp):
            model(inp)

    steps_of = {name: train_step(m, batch, 224, device, amp=amp) for name, m in models.items()}

    def trainer(name):
        """``steps_of[name]`` in train mode (the inference calls between put the model in eval mode)."""
        def run():
            models[name].train()
            steps_of[name]()
        return run

    train = {name: trainer(name) for name in models}
    for name, model in models.items():  # warm-up: first calls, kernel compilation, the CPU kernels' builds
        for _ in range(3):
            infer(model, x)
            infer(model, x1)
            train[name]()
    result = envelope(device, dict(models=list(args.models), batch_size=batch, img_size=224, amp=amp,
                                   rounds=args.rounds, calls=calls, steps=steps, latency=latency,
                                   threads=torch.get_num_threads(), compile=args.compile,
                                   compile_mode=args.compile_mode if args.compile else None,
                                   keep_freed_memory=kept, eager_features=args.eager_features))
    first, second = args.models
    for r in range(args.rounds):
        row = {"round": r}
        for name, model in models.items():
            # untimed: the first forward after the previous round's training steps (which changed the weights), in
            # which an inference path re-prepares its cast and packed weights (vigla.layers.cast: once per change)
            infer(model, x)
            row[f"{name}_infer_ms"] = pipelined_ms(lambda: infer(model, x), calls, device)
            row[f"{name}_train_ms"] = pipelined_ms(train[name], steps, device)
            if latency:
                row[f"{name}_latency_ms"] = latency_ms(lambda: infer(model, x1), latency, device)
        row["infer_ratio"] = row[f"{second}_infer_ms"] / row[f"{first}_infer_ms"]
        row["train_ratio"] = row[f"{second}_train_ms"] / row[f"{first}_train_ms"]
        if latency:
            row["latency_ratio"] = row[f"{first}_latency_ms"] / row[f"{second}_latency_ms"]
        result["rows"].append(row)
        print(f"round {r}: {first} / {second}: throughput inference {row['infer_ratio']:.2f}, training "
              f"{row['train_ratio']:.2f}" + (f"; batch-1 latency {row['latency_ratio']:.2f}" if latency else ""),
              flush=True)
    keys = [k for k in RATIOS if k in result["rows"][0]]
    keys += [k for k in result["rows"][0] if k.endswith("_ms")]
    summary = {"round": "median", **{key: statistics.median(row[key] for row in result["rows"]) for key in keys}}
    result["rows"].append(summary)
    print(f"median over {args.rounds} rounds: " + ", ".join(f"{k} {summary[k]:.3f}" for k in keys if k in RATIOS))
    print(f"wrote {save_complete(result, args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
