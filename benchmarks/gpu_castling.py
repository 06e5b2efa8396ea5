"""Castling-DeiT-T vs DeiT-T on one GPU: speed, peak memory, the auxiliary branch's training cost, numerics.

One command (about a minute on an H100; or ``python -m benchmarks castling``):

    python benchmarks/gpu_castling.py         # writes benchmarks/results/castling_vs_deit_tiny.json

1. Inference, ``eval()`` + ``torch.inference_mode`` + bf16 autocast, at 224/512/1024/2048 with the anchors'
   batch sizes 128/128/32/8: images/s (median of 10 CUDA-event-timed calls after 3 warm-ups) and peak memory
   (``torch.cuda.max_memory_allocated`` after a reset: weights, input and activations). timm's
   ``deit_tiny_patch16_224`` (fused SDPA) vs ``castling_deit_tiny``, both built with ``img_size=R``.
2. Training steps (forward + backward, no optimizer, bf16 autocast) at 224, batch 128: DeiT-T, Castling-DeiT-T
   with the auxiliary masked-softmax branch off, and on (the training-only quadratic cost).
3. Mixer numerics on the GPU: one Castling mixer (C = 192, 3 heads) at N = 3136 and 16384 under bf16 and fp16
   autocast against float32 (TF32 off): relative error of the output and whether it is finite.

Out-of-memory rows are recorded as ``"status": "oom"`` and the run goes on. ``--device cpu --quick`` is a tiny
smoke run of the same code (the test suite runs it). The JSON is the results envelope of
:func:`vigla.bench.report.envelope`; each row's ``part`` says which of the three it belongs to (``infer``,
``ratio``: Castling / DeiT at one size, ``train``, ``mixer``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import timm  # noqa: E402

import vigla  # noqa: E402,F401  (registers castling_deit_tiny)
from vigla.bench.measure import MemoryMeter, free_memory, guarded, measure_inference, measure_train  # noqa: E402
from vigla.bench.report import envelope, write_json  # noqa: E402
from vigla.layers import LinearAngularAttention  # noqa: E402

DEIT, CASTLING = "deit_tiny_patch16_224", "castling_deit_tiny"
FULL = dict(infer=[(224, 128), (512, 128), (1024, 32), (2048, 8)], train=(224, 128), tokens=[3136, 16384],
            mixer_batch={3136: 8, 16384: 2}, warmup=3, iters=10)
QUICK = dict(infer=[(32, 1)], train=(32, 1), tokens=[64], mixer_batch={64: 1}, warmup=1, iters=1)


def build(name: str, img_size: int, device: torch.device, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, img_size=img_size, **kwargs).to(device)


def bench_inference(cfg: dict, device: torch.device) -> list[dict]:
    rows = []
    for img_size, batch in cfg["infer"]:
        for name in (DEIT, CASTLING):
            free_memory(device)
            meter = MemoryMeter(device)

            def run():
                model = build(name, img_size, device)
                return measure_inference(model, batch, img_size, device, amp="bf16", channels_last=False,
                                         warmup=cfg["warmup"], iters=cfg["iters"], meter=meter)

            rows.append(dict(model=name, img_size=img_size, batch_size=batch, infer=guarded(run, device)))
            print(f"infer {name:24s} {img_size:5d} b{batch:<4d} {_fmt(rows[-1]['infer'])}", flush=True)
    return rows


def bench_train(cfg: dict, device: torch.device) -> list[dict]:
    img_size, batch = cfg["train"]
    rows = []
    for label, name, aux in (("deit", DEIT, None), ("castling_aux_off", CASTLING, False),
                             ("castling_aux_on", CASTLING, True)):
        free_memory(device)
        meter = MemoryMeter(device)

        def run():
            model = build(name, img_size, device, **({} if aux is None else dict(aux=aux)))
            return measure_train(model, batch, img_size, device, amp="bf16", channels_last=False,
                                 warmup=cfg["warmup"], iters=cfg["iters"], optimizer="none", meter=meter)

        rows.append(dict(label=label, model=name, img_size=img_size, batch_size=batch, train=guarded(run, device)))
        print(f"train {label:24s} {img_size:5d} b{batch:<4d} {_fmt(rows[-1]['train'])}", flush=True)
    return rows


@torch.no_grad()
def mixer_numerics(cfg: dict, device: torch.device) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    mixer = LinearAngularAttention(192, num_heads=3).to(device).eval()
    rows = []
    for n in cfg["tokens"]:
        b = cfg["mixer_batch"][n]
        # a shared direction makes keys align, so the unnormalised sum Z = V/2 + Q^K^T V / pi grows with N
        # (its squared norm leaves fp16's range near N = 3k)
        x = torch.randn(b, n, 192, device=device) + 2.0 * torch.randn(192, device=device)
        ref = mixer(x).double()
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(device.type, dtype=dtype):
                y = mixer(x)
            rows.append(dict(tokens=n, batch_size=b, dtype=str(dtype).removeprefix("torch."),
                             finite=bool(torch.isfinite(y).all()),
                             rel_err=float((y.double() - ref).norm() / ref.norm())))
            print(f"mixer N={n:6d} {rows[-1]['dtype']:9s} finite={rows[-1]['finite']} "
                  f"rel_err={rows[-1]['rel_err']:.2e}", flush=True)
    return rows


def _fmt(m: dict) -> str:
    if m.get("status") != "ok":
        return f"{m['status'].upper()} {m.get('error', '')}"
    return f"{m['img_per_s']:10,.1f} img/s  {m['peak_mib']:9,.0f} MiB"


def _ratio(a: dict, b: dict, key: str):
    if a.get("status") != "ok" or b.get("status") != "ok":
        return None
    return a[key] / b[key]


def ratio_table(infer_rows: list[dict]) -> tuple[list[dict], str]:
    """Castling / DeiT per resolution (speed > 1: Castling faster; memory < 1: Castling smaller)."""
    by_key = {(r["model"], r["img_size"]): r for r in infer_rows}
    ratios, lines = [], [f"{'res':>5} {'batch':>5} {'DeiT img/s':>11} {'Castl img/s':>11} {'speed x':>8} "
                         f"{'DeiT MiB':>9} {'Castl MiB':>9} {'mem x':>6}"]

    def cell(m, key, fmt):
        return format(m[key], fmt) if m.get("status") == "ok" else m.get("status", "?").upper()

    for (name, img_size), row in by_key.items():
        if name != CASTLING:
            continue
        c, d = row["infer"], by_key[(DEIT, img_size)]["infer"]
        speed, mem = _ratio(c, d, "img_per_s"), _ratio(c, d, "peak_mib")
        ratios.append(dict(img_size=img_size, batch_size=row["batch_size"], speed_ratio=speed, memory_ratio=mem))
        lines.append(f"{img_size:5d} {row['batch_size']:5d} {cell(d, 'img_per_s', ',.1f'):>11} "
                     f"{cell(c, 'img_per_s', ',.1f'):>11} {'-' if speed is None else f'{speed:.2f}':>8} "
                     f"{cell(d, 'peak_mib', ',.0f'):>9} {cell(c, 'peak_mib', ',.0f'):>9} "
                     f"{'-' if mem is None else f'{mem:.2f}':>6}")
    return ratios, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results",
                        help="output folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--name", default="castling_vs_deit_tiny", help="stem of the JSON file")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the code path")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available (use --device cpu --quick for a smoke run)")
    cfg = QUICK if args.quick else FULL
    result = envelope(device, dict(
        what="Castling-DeiT-T vs DeiT-T", quick=args.quick, amp="bf16", warmup=cfg["warmup"], iters=cfg["iters"],
        timing="median, CUDA events", memory="torch.cuda.max_memory_allocated after reset (weights+input+activations)"))
    infer = bench_inference(cfg, device)
    ratios, table = ratio_table(infer)
    train = bench_train(cfg, device)
    numerics = mixer_numerics(cfg, device)
    for part, rows in (("infer", infer), ("ratio", ratios), ("train", train), ("mixer", numerics)):
        result["rows"] += [dict(part=part, **r) for r in rows]
    result["complete"] = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / f"{args.name}.json")
    print("\nCastling-DeiT-T / DeiT-T, inference, bf16 autocast\n" + table)
    base = next((r["train"] for r in train if r["label"] == "deit"), {})
    for r in train:
        speed, mem = _ratio(r["train"], base, "img_per_s"), _ratio(r["train"], base, "peak_mib")
        print(f"train {r['label']:18s} {_fmt(r['train'])}  vs DeiT: speed "
              f"{'-' if speed is None else f'{speed:.2f}'}x, memory {'-' if mem is None else f'{mem:.2f}'}x")
    print(f"\nwrote {out / args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
