"""Castling-DeiT-T vs DeiT-T on one GPU: speed, peak memory, the auxiliary branch's training cost, numerics,
and both trained on Imagenette with the same recipe.

``python -m benchmarks castling`` runs every part; by hand (from the repository root):

    python benchmarks/gpu_castling.py                 # infer, train, mixer -> OUT/castling_vs_deit_tiny.json
    python benchmarks/gpu_castling.py --parts imagenette --imagenette DIR --model castling_deit_tiny \
        --name castling_imagenette_castling           # one training run (and the table, see 4.)

1. ``infer``: ``eval()`` + ``torch.inference_mode`` + bf16 autocast, at 224/512/1024/2048 with the anchors' batch
   sizes 128/128/32/8: images/s (median of 10 CUDA-event-timed calls after 3 warm-ups) and peak memory
   (``torch.cuda.max_memory_allocated`` after a reset: weights, input and activations). timm's
   ``deit_tiny_patch16_224`` (fused SDPA) vs ``castling_deit_tiny``, both built with ``img_size=R``.
2. ``train``: training steps (forward + backward, no optimizer, bf16 autocast) at 224/512/1024 (batches 128/32/8):
   DeiT-T, Castling-DeiT-T with the auxiliary masked-softmax branch off, on (the blockwise op, memory linear in N),
   and on through the ``[N, N]`` reference op (``masked_softmax_aux_quadratic``, what the branch ran before).
3. ``mixer``: one Castling mixer (C = 192, 3 heads) at N = 3136 and 16384 under bf16 and fp16 autocast against
   float32 (TF32 off): relative error of the output and whether it is finite.
4. ``imagenette``: ``vigla train`` of ``--model`` on Imagenette (the recipe preset, ``--epochs`` at 224, the
   model's default schedule for Castling, i.e. the paper's) then ``vigla eval`` of its best checkpoint at 1x, 2x
   and 4x (benchmarks/gpu_train.py's ``train_and_eval``); a run that outlives ``--slot`` is stopped and marked.
   Writes ``OUT/NAME.json`` with the per-epoch metrics, then ``OUT/NAME.md``, the table of both runs'
   JSON found in OUT (``castling_imagenette_castling``, ``castling_imagenette_deit``; the table
   ``python -m benchmarks summarize`` puts in docs/performance.md): validation top-1 with the branch on and off
   at the last validation before the switch, at the first one after it, and at the end, beside DeiT-T's.

Out-of-memory rows are recorded as ``"status": "oom"`` and the run goes on. ``--device cpu --quick`` is a tiny
smoke run of the same code (the test suite runs it). The JSON is the results envelope of
:func:`vigla.bench.report.envelope`; each row's ``part`` says which part it belongs to (``infer``, ``ratio``:
Castling / DeiT at one size, ``train``, ``mixer``, ``imagenette``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import timm  # noqa: E402

from benchmarks.summarize import CASTLING_IMAGENETTE, castling_imagenette_section  # noqa: E402
import vigla  # noqa: E402,F401  (registers castling_deit_tiny)
from vigla.bench.measure import MemoryMeter, free_memory, guarded, measure_inference, measure_train  # noqa: E402
from vigla.bench.report import envelope, write_json  # noqa: E402
from vigla.layers import LinearAngularAttention  # noqa: E402
from vigla.layers import linear_angular as mixer_module  # noqa: E402
from vigla.ops.linear_angular import masked_softmax_aux_quadratic  # noqa: E402

DEIT, CASTLING = "deit_tiny_patch16_224", "castling_deit_tiny"
FULL = dict(infer=[(224, 128), (512, 128), (1024, 32), (2048, 8)], train=[(224, 128), (512, 32), (1024, 8)],
            tokens=[3136, 16384], mixer_batch={3136: 8, 16384: 2}, warmup=3, iters=10)
QUICK = dict(infer=[(32, 1)], train=[(32, 1), (64, 1)], tokens=[64], mixer_batch={64: 1}, warmup=1, iters=1)
TRAIN_ARMS = (("deit", DEIT, None), ("castling_aux_off", CASTLING, False), ("castling_aux_on", CASTLING, True),
              ("castling_aux_on_quadratic", CASTLING, True))
PARTS = ("infer", "train", "mixer", "imagenette")


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


@contextlib.contextmanager
def quadratic_branch():
    """The mixers' auxiliary branch through the ``[N, N]`` reference op (what it ran before the blockwise op)."""
    blockwise = mixer_module.masked_softmax_aux
    mixer_module.masked_softmax_aux = masked_softmax_aux_quadratic
    try:
        yield
    finally:
        mixer_module.masked_softmax_aux = blockwise


def bench_train(cfg: dict, device: torch.device) -> list[dict]:
    rows = []
    for img_size, batch in cfg["train"]:
        for label, name, aux in TRAIN_ARMS:
            free_memory(device)
            meter = MemoryMeter(device)

            def run():
                model = build(name, img_size, device, **({} if aux is None else dict(aux=aux)))
                with quadratic_branch() if label.endswith("quadratic") else contextlib.nullcontext():
                    return measure_train(model, batch, img_size, device, amp="bf16", channels_last=False,
                                         warmup=cfg["warmup"], iters=cfg["iters"], optimizer="none", meter=meter)

            rows.append(dict(label=label, model=name, img_size=img_size, batch_size=batch,
                             train=guarded(run, device)))
            print(f"train {label:26s} {img_size:5d} b{batch:<4d} {_fmt(rows[-1]['train'])}", flush=True)
    return rows


def train_table(rows: list[dict]) -> str:
    """Each training arm against DeiT-T at the same size (speed > 1: faster; memory < 1: smaller)."""
    base = {r["img_size"]: r["train"] for r in rows if r["label"] == "deit"}
    lines = [f"{'arm':26s} {'res':>5s} {'batch':>5s} {'img/s':>10s} {'peak MiB':>9s} {'speed x':>8s} {'mem x':>6s}"]
    for r in rows:
        m, ref = r["train"], base.get(r["img_size"], {})
        speed, mem = _ratio(m, ref, "img_per_s"), _ratio(m, ref, "peak_mib")
        ok = m.get("status") == "ok"
        lines.append(f"{r['label']:26s} {r['img_size']:5d} {r['batch_size']:5d} "
                     f"{format(m['img_per_s'], ',.1f') if ok else m.get('status', '?').upper():>10s} "
                     f"{format(m['peak_mib'], ',.0f') if ok else '-':>9s} "
                     f"{'-' if speed is None else f'{speed:.2f}':>8s} "
                     f"{'-' if mem is None else f'{mem:.2f}':>6s}")
    return "\n".join(lines)


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


# ------------------------------------------------------------------------------------------- imagenette
def switch_summary(epochs: list[dict]) -> dict:
    """From a run's metrics.csv rows: validation top-1 with the branch on and off at the last validation while
    it was on (the switch point), the first one after the switch, and the end (all off, as in inference)."""
    def num(row, key):
        try:
            return float(row[key])
        except (KeyError, TypeError, ValueError):
            return math.nan

    on = [r for r in epochs if not math.isnan(num(r, "val_top1_aux_on"))]
    out = {"end": {"epoch": int(epochs[-1]["epoch"]) + 1, "top1_off": num(epochs[-1], "val_top1")}} if epochs else {}
    if on:
        last = on[-1]
        out["switch"] = {"epoch": int(last["epoch"]) + 1, "top1_on": num(last, "val_top1_aux_on"),
                         "top1_off": num(last, "val_top1"), "gap": num(last, "val_aux_gap"),
                         "mask_density": num(last, "val_aux_mask_density")}
        after = [r for r in epochs if int(r["epoch"]) > int(last["epoch"])]
        if after:
            out["after_switch"] = {"epoch": int(after[0]["epoch"]) + 1, "top1_off": num(after[0], "val_top1")}
    return out


def imagenette(args) -> list[dict]:
    """One ``vigla train`` + ``vigla eval`` run of ``args.model`` (benchmarks/gpu_train.py's helper)."""
    import gpu_train

    runs = Path(args.runs or Path(args.out) / "runs")
    ns = argparse.Namespace(runs=str(runs), out=args.out, device=args.device, workers=args.workers,
                            compile=False, extra=args.extra, eval_batch=args.eval_batch)
    flags = ["--data", args.imagenette, "--in-memory", "--preset", "recipe", "--epochs", str(args.epochs),
             "--warmup-epochs", str(args.warmup_epochs), "--img-size", str(args.img), "--batch-size", str(args.batch),
             "--lr", str(args.lr), "--log-interval", "20"]
    row = gpu_train.train_and_eval(ns, "imagenette", args.model, flags, ["--data", args.imagenette], args.img,
                                   args.slot)
    metrics = Path(row["train"]["log"]).parent / "metrics.csv"
    epochs = list(csv.DictReader(open(metrics))) if metrics.exists() else []
    row["switch"] = switch_summary(epochs)
    row["epochs"] = epochs
    return [row]


def imagenette_table(out: Path) -> str:
    """Markdown: the Imagenette runs whose JSON is in ``out`` (the table of docs/performance.md)."""
    found = [(stem, json.loads((out / f"{stem}.json").read_text())) for stem in CASTLING_IMAGENETTE
             if (out / f"{stem}.json").exists()]
    return "\n".join(castling_imagenette_section(found)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results",
                        help="output folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--name", default="castling_vs_deit_tiny", help="stem of the JSON file")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the code path")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=["infer", "train", "mixer"],
                        help="what to measure (imagenette: a training run, see --imagenette)")
    group = parser.add_argument_group("imagenette (vigla train + vigla eval of one model)")
    group.add_argument("--imagenette", help="ImageFolder root with train/ and val/")
    group.add_argument("--model", default=CASTLING, help="the model trained")
    group.add_argument("--epochs", type=int, default=30)
    group.add_argument("--warmup-epochs", type=float, default=3)
    group.add_argument("--img", type=int, default=224)
    group.add_argument("--batch", type=int, default=128, help="per GPU")
    group.add_argument("--lr", type=float, default=2e-3, help="per 512 images")
    group.add_argument("--slot", type=float, default=380, help="seconds the training may take before SIGTERM")
    group.add_argument("--workers", type=int, default=12, help="data loader processes")
    group.add_argument("--eval-batch", type=int, default=128)
    group.add_argument("--runs", help="where the training runs go (default: OUT/runs)")
    group.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                       help="more `vigla train` flags (put last)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available (use --device cpu --quick for a smoke run)")
    if "imagenette" in args.parts and not args.imagenette:
        parser.error("--parts imagenette needs --imagenette DIR (an ImageFolder root with train/ and val/)")
    cfg = QUICK if args.quick else FULL
    result = envelope(device, dict(
        what="Castling-DeiT-T vs DeiT-T", quick=args.quick, amp="bf16", warmup=cfg["warmup"], iters=cfg["iters"],
        parts=args.parts, timing="median, CUDA events",
        memory="torch.cuda.max_memory_allocated after reset (weights+input+activations)"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = []
    if "infer" in args.parts:
        infer = bench_inference(cfg, device)
        ratios, table = ratio_table(infer)
        result["rows"] += [dict(part="infer", **r) for r in infer] + [dict(part="ratio", **r) for r in ratios]
        report.append("Castling-DeiT-T / DeiT-T, inference, bf16 autocast\n" + table)
    if "train" in args.parts:
        train = bench_train(cfg, device)
        result["rows"] += [dict(part="train", **r) for r in train]
        report.append("training steps (forward + backward), bf16 autocast, against DeiT-T at each size\n"
                      + train_table(train))
    if "mixer" in args.parts:
        result["rows"] += [dict(part="mixer", **r) for r in mixer_numerics(cfg, device)]
    if "imagenette" in args.parts:
        result["settings"]["imagenette"] = {k: v for k, v in vars(args).items() if k not in ("out", "name", "runs")}
        result["rows"] += [dict(part="imagenette", **r) for r in imagenette(args)]
    result["complete"] = True
    write_json(result, out / f"{args.name}.json")
    if "imagenette" in args.parts:
        (out / f"{args.name}.md").write_text(imagenette_table(out))
        report.append(imagenette_table(out))
    print("\n" + "\n\n".join(report))
    print(f"\nwrote {out / args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
