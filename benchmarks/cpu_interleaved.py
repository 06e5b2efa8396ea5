"""ViG-T against DeiT-T on this machine's CPU, both models measured in one process, interleaved.

    python benchmarks/cpu_interleaved.py                       # ~3 minutes on 2 cores
    python benchmarks/cpu_interleaved.py --rounds 15 --out benchmarks/results/cpu_vig_tiny_vs_deit_tiny_224.json

The CPU is shared and noisy (other processes take turns on the same cores), so the two models are
never timed in separate stretches: each round runs one inference batch (``eval`` +
``inference_mode``) and one training step (forward, cross-entropy, backward, AdamW) of every model,
in alternating order, and the per-round ratio ``time(DeiT-T) / time(ViG-T)`` (= ViG-T's img/s over
DeiT-T's) is taken within the round. The JSON holds every round's times, the median and quartiles
of the per-round ratios, each model's median img/s, the load average before and after, the device,
commit and command.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _quartiles(values: list[float]) -> dict:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": q2, "q25": q1, "q75": q3, "min": min(values), "max": max(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs=2, default=["vig_tiny", "deit_tiny_patch16_224"], metavar="NAME",
                        help="the model and the baseline")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args(argv)

    import vigla  # noqa: F401  (registers the models)
    from vigla.bench.report import command_line, environment, git_info, timestamp, write_json
    from vigla.engine.modeling import create_model

    torch.manual_seed(0)
    names = list(args.models)
    models = {n: create_model(n, img_size=args.img_size) for n in names}
    optims = {n: torch.optim.AdamW(m.parameters(), lr=1e-6) for n, m in models.items()}
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))

    def infer(name):
        model = models[name].eval()
        with torch.inference_mode():
            model(x)

    def train(name):
        model = models[name].train()
        F.cross_entropy(model(x), y).backward()
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)

    git = git_info()
    load_before = os.getloadavg()
    times = {kind: {n: [] for n in names} for kind in ("infer", "train")}
    for r in range(args.warmup + args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for kind, fn in (("infer", infer), ("train", train)):
            for n in order:
                t0 = time.perf_counter()
                fn(n)
                if r >= args.warmup:
                    times[kind][n].append((time.perf_counter() - t0) * 1e3)
    model, base = names
    result = {
        "what": f"{model} vs {base} on CPU, interleaved rounds (inference batch and training step of "
                f"each model per round); ratio = {base} ms / {model} ms within a round = {model} img/s "
                f"/ {base} img/s",
        "command": command_line(), "git": git, "environment": environment(torch.device("cpu")),
        "finished": timestamp(), "img_size": args.img_size, "batch_size": args.batch_size,
        "rounds": args.rounds, "warmup": args.warmup, "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "ratios": {}, "img_per_s": {}, "times_ms": times,
    }
    for kind in ("infer", "train"):
        ratios = [b / m for m, b in zip(times[kind][model], times[kind][base])]
        result["ratios"][kind] = _quartiles(ratios)
        result["img_per_s"][kind] = {n: args.batch_size * 1e3 / statistics.median(times[kind][n]) for n in names}
        spread = result["ratios"][kind]
        print(f"{kind}: {model} / {base} img/s = {spread['median']:.3f} (median of {args.rounds} rounds; "
              f"quartiles {spread['q25']:.3f}-{spread['q75']:.3f}, range {spread['min']:.3f}-{spread['max']:.3f}); "
              + ", ".join(f"{n} {v:.1f} img/s" for n, v in result["img_per_s"][kind].items()))
    print(f"load average before {load_before[0]:.2f}, after {result['load_average_after'][0]:.2f}")
    if args.out:
        write_json(result, Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
