"""``vigla bench``: speed, memory and FLOPs against resolution, models side by side.

For every model x image size: inference throughput at the batch size, latency at batch 1, peak
memory, (``--train``) training-step throughput and memory, parameters, and MACs/FLOPs per image;
ratios to a baseline model measured in the same run. Writes ``NAME.json``, ``NAME.csv`` and
``NAME.png`` under ``--out``. See docs/bench.md.
"""
from __future__ import annotations

import glob
import sys
from pathlib import Path
from typing import Callable

import torch

from ..engine.errors import UserError, run_command
from ..engine.modeling import check_model_name, create_model, enable_grad_checkpointing
from ..engine.outputs import OutputLock, check_writable, make_folder, remove_empty_folders, remove_stale_temp_files
from . import report
from .flops import count_model_flops
from .measure import (MemoryMeter, free_memory, guarded, measure_inference, measure_train, memory_kind,
                      release_workspaces)

# batch sizes of the anchor figures (docs/bench.md); other sizes scale by token count above 512
GPU_BATCH_AT_512 = 128
CPU_BATCH_DIVISOR = 16


def default_batch_size(img_size: int, device_type: str) -> int:
    """128 up to 512², then 128·(512/R)² (32 at 1024², 8 at 2048²); a 16th of that on the CPU."""
    batch = GPU_BATCH_AT_512 if img_size <= 512 else round(GPU_BATCH_AT_512 * (512 / img_size) ** 2)
    if device_type != "cuda":
        batch //= CPU_BATCH_DIVISOR
    return max(1, batch)


# an empty format of the default: keeps ArgumentDefaultsHelpFormatter from appending "(default: None)"
_NO_DEFAULT = "%(default).0s"


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME",
                        help="timm model names (vigla's are registered by `import vigla`)" + _NO_DEFAULT)
    parser.add_argument("--img-size", nargs="+", type=int, default=[224], metavar="R",
                        help="square image sizes")
    parser.add_argument("--batch-size", nargs="+", type=int, default=None, metavar="N",
                        help="one batch size for all sizes, or one per --img-size; default: 128 "
                             "up to 512, 32 at 1024, 8 at 2048 (128*(512/R)^2), a 16th of that on "
                             "CPU" + _NO_DEFAULT)
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None,
                        help="autocast dtype; default: bf16 on cuda, none on cpu" + _NO_DEFAULT)
    parser.add_argument("--compile", action="store_true",
                        help="wrap each model in torch.compile (static shapes)")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
                        default="default",
                        help="with --compile: torch.compile's mode ('reduce-overhead' adds CUDA graphs)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time inference and training steps as replays of one CUDA graph per "
                             "model and size (takes the CPU's launch overhead out; CUDA only; training "
                             "in bf16 or full precision)")
    parser.add_argument("--grad-checkpointing", nargs="*", default=None, metavar="NAME",
                        help="with --train: activation checkpointing (set_grad_checkpointing) for "
                             "the named models, or for every model when no name follows"
                             + _NO_DEFAULT)
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last model weights and inputs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, cuda:N or cpu")
    parser.add_argument("--train", action="store_true",
                        help="also time training steps (forward, backward, optimizer step)")
    parser.add_argument("--optimizer", choices=["adamw", "none"], default="adamw",
                        help="with --train: 'none' times forward+backward only (the anchors' protocol)")
    parser.add_argument("--baseline", default=None,
                        help="model the ratios are taken against (added to the run if missing); "
                             "default: the first of --models" + _NO_DEFAULT)
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (>= 1)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement (>= 1)")
    parser.add_argument("--flops-only", action="store_true",
                        help="count parameters and FLOPs only (no model is run; seconds on any machine)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="skip unregistered model names with a warning (the baseline must exist)")
    parser.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency")
    parser.add_argument("--out", default="runs/bench", help="output directory")
    parser.add_argument("--name", default="bench", help="stem of the output files")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="free text stored in the JSON 'notes' (repeatable)" + _NO_DEFAULT)


class UsageError(UserError):
    """A bad argument, reported in one line."""


def _check_models(names: list[str], skip_missing: bool) -> list[str]:
    """The registered ``names``; an unknown one is a UserError, or (``skip_missing``) a warning."""
    known = []
    for name in names:
        try:
            check_model_name(name)
        except UserError as e:
            if not skip_missing:
                raise
            print(f"vigla bench: skipping {e}", file=sys.stderr)
            continue
        known.append(name)
    return known


def _resolve(args) -> dict:
    """Validated settings of the run (raises UsageError)."""
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"--device: expected cuda, cuda:N or cpu, got {args.device!r}") from exc
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device: expected cuda, cuda:N or cpu, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but CUDA is not available here (use --device cpu)")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"got {args.device!r}")
        device = torch.device("cuda", index)
    if any(r < 1 for r in args.img_size):
        raise UsageError(f"--img-size: expected positive sizes, got {args.img_size}")
    if args.warmup < 1 or args.iters < 1:
        raise UsageError(f"--warmup and --iters must be >= 1, got {args.warmup} and {args.iters}")
    sizes = list(dict.fromkeys(args.img_size))
    if args.batch_size is None:
        batches = [default_batch_size(r, device.type) for r in sizes]
    elif len(args.batch_size) == 1:
        batches = args.batch_size * len(sizes)
    elif len(args.batch_size) == len(sizes):
        batches = list(args.batch_size)
    else:
        raise UsageError(f"--batch-size: expected one value or one per --img-size ({len(sizes)}), "
                         f"got {len(args.batch_size)}")
    if any(b < 1 for b in batches):
        raise UsageError(f"--batch-size: expected positive sizes, got {batches}")
    baseline = args.baseline or args.models[0]
    _check_models([baseline], skip_missing=False)
    models = _check_models(list(dict.fromkeys([baseline] + args.models)), args.skip_missing)
    if args.cuda_graph and device.type != "cuda":
        raise UsageError("--cuda-graph needs --device cuda")
    if args.cuda_graph and args.train and args.amp == "fp16":
        raise UsageError("--cuda-graph --train needs --amp bf16 or none (fp16's loss scaling checks on the host "
                         "at every step)")
    if args.compile_mode != "default" and not args.compile:
        raise UsageError(f"--compile-mode {args.compile_mode} needs --compile")
    checkpointed = _checkpointed(args.grad_checkpointing, models, args.train)
    return {
        "device": device,
        "models": models,
        "baseline": baseline,
        "img_sizes": sizes,
        "batch_sizes": batches,
        "amp": args.amp or ("bf16" if device.type == "cuda" else "none"),
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "channels_last": args.channels_last,
        "cuda_graph": args.cuda_graph,
        "grad_checkpointing": checkpointed,
        "flops_only": args.flops_only,
        "train": args.train and not args.flops_only,
        "optimizer": args.optimizer if args.train and not args.flops_only else None,
        "latency": not (args.no_latency or args.flops_only),
        "latency_batch_size": 1,
        "warmup": args.warmup,
        "iters": args.iters,
    }


def _checkpointed(names: list[str] | None, models: list[str], train: bool) -> list[str]:
    """The models that train with activation checkpointing (``--grad-checkpointing [NAME ...]``)."""
    if names is None:
        return []
    if not train:
        raise UsageError("--grad-checkpointing only changes training steps: add --train")
    unknown = [n for n in names if n not in models]
    if unknown:
        raise UsageError(f"--grad-checkpointing: {', '.join(unknown)} not among the benchmarked "
                         f"models ({', '.join(models)})")
    return list(names) or list(models)


def build_model(name: str, img_size: int) -> torch.nn.Module:
    """``timm.create_model(name, img_size=img_size)``, or without ``img_size`` for models that do
    not take it, on the current default device."""
    return create_model(name, img_size=img_size)


def model_stats(name: str, img_size: int) -> dict:
    """Parameters and per-image MACs/FLOPs (see :mod:`vigla.bench.flops`; no real memory used)."""
    try:
        with torch.device("meta"):
            model = build_model(name, img_size)
    except Exception:  # noqa: BLE001  (init code that needs real data: build on the CPU)
        model = build_model(name, img_size)
    params = sum(p.numel() for p in model.parameters())
    stats = {"params": params, "params_m": params / 1e6}
    try:
        counted = count_model_flops(model, img_size)
    except Exception as exc:  # noqa: BLE001  (recorded in the row; the timings still run)
        return stats | {"macs": None, "flops": None, "gmacs": None, "gflops": None,
                        "flops_by_op": None, "flops_error": f"{type(exc).__name__}: {exc}"}
    return stats | {"macs": counted["macs"], "flops": counted["flops"], "gmacs": counted["macs"] / 1e9,
                    "gflops": counted["flops"] / 1e9, "flops_by_op": counted["by_op"]}


def _drop_graphs(model: torch.nn.Module) -> None:
    """Free what the last phase's CUDA graphs hold (a ViG's replay of its features keeps its graphs while the model
    lives), so that each phase's peak memory counts its own graphs alone; the replay's setting is kept."""
    if hasattr(model, "set_cuda_graphs"):
        model.set_cuda_graphs(model.cuda_graphs, model.cuda_graph_max_pixels)


def bench_one(name: str, img_size: int, batch_size: int, s: dict) -> dict:
    """All measurements of one model at one size; failures (OOM included) are recorded, not raised."""
    device = s["device"]
    checkpointing = name in s["grad_checkpointing"]
    row = {"model": name, "img_size": img_size, "batch_size": batch_size,
           "grad_checkpointing": checkpointing}
    row.update(model_stats(name, img_size))
    row.update(infer=None, latency=None, train=None)
    if s["flops_only"]:
        return row
    common = dict(amp=s["amp"], channels_last=s["channels_last"], warmup=s["warmup"], iters=s["iters"])
    free_memory(device)  # what the previous row left
    release_workspaces(device)  # and the cuBLAS workspaces of the earlier rows' streams
    meter = MemoryMeter(device)

    def build():
        with torch.device(device):
            model = build_model(name, img_size)
        if s["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        if checkpointing:
            enable_grad_checkpointing(model, name)
        if s["compile"]:
            mode = {} if s["compile_mode"] == "default" else {"mode": s["compile_mode"]}
            model = torch.compile(model, dynamic=False, **mode)
        return {"status": "ok", "model": model}

    built = guarded(build, device)
    model = built.pop("model", None)
    if model is None:
        row["infer"] = dict(built)
        row["latency"] = dict(built) if s["latency"] else None
        row["train"] = dict(built) if s["train"] else None
        return row
    row["infer"] = guarded(lambda: measure_inference(model, batch_size, img_size, device, meter=meter,
                                                     cuda_graph=s["cuda_graph"], **common), device)
    _drop_graphs(model)
    row["latency"] = (guarded(lambda: measure_inference(model, s["latency_batch_size"], img_size,
                                                        device, cuda_graph=s["cuda_graph"], **common),
                              device)
                      if s["latency"] else None)
    _drop_graphs(model)
    row["train"] = (guarded(lambda: measure_train(model, batch_size, img_size, device, optimizer=s["optimizer"],
                                                  meter=meter, cuda_graph=s["cuda_graph"], **common),
                            device)
                    if s["train"] else None)
    if s["compile"]:
        torch._dynamo.reset()
    return row


def _progress(i: int, n: int, row: dict) -> str:
    parts = [f"[{i}/{n}] {row['model']} @{row['img_size']} b{row['batch_size']}:"]
    for name, key, unit in (("infer", "img_per_s", "img/s"), ("latency", "median_ms", "ms @b1"),
                            ("train", "img_per_s", "train img/s")):
        m = row.get(name)
        if m is not None:
            parts.append(f"{m[key]:,.1f} {unit}" if m["status"] == "ok" else f"{name} {m['status'].upper()}"
                         f" ({m.get('error', '')})")
    return " ".join(parts)


def run(s: dict, command: str, notes: list[str], on_row: Callable[[dict], None] | None = None
        ) -> dict:
    """Measure every model at every size (sizes in the given order, the baseline first at each);
    the bench JSON as a dict, handed to ``on_row`` after each row (``"complete": false`` until the
    last one)."""
    device = s["device"]
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    settings = {k: (str(v) if k == "device" else v) for k, v in s.items()}
    settings["memory"] = memory_kind(device)
    result = report.envelope(device, settings, notes, command)
    rows = result["rows"]
    plan = [(m, r, b) for r, b in zip(s["img_sizes"], s["batch_sizes"]) for m in s["models"]]
    for i, (model, img_size, batch) in enumerate(plan, 1):
        rows.append(bench_one(model, img_size, batch, s))
        print(_progress(i, len(plan), rows[-1]), file=sys.stderr, flush=True)
        report.add_ratios(rows, s["baseline"])
        result["complete"] = i == len(plan)
        if on_row is not None:
            on_row(result)
    return result


def output_paths(out: Path, name: str) -> dict[str, Path]:
    return {ext: out / f"{name}.{ext}" for ext in ("json", "csv", "png")}


def write_tables(result: dict, paths: dict[str, Path]) -> None:
    """JSON and CSV (cheap: written after every row, so an interrupted run keeps its rows)."""
    report.write_json(result, paths["json"])
    report.write_csv(result, paths["csv"])


def main(args) -> int:
    return run_command("bench", _main, args)


def _main(args) -> int:
    s = _resolve(args)
    from .plot import plot_results

    out = Path(args.out)
    paths = output_paths(out, args.name)
    created = make_folder(out, "--out")
    lock = None
    try:
        lock = OutputLock(out, f".{args.name}.lock").acquire("vigla bench", "--out")
        remove_stale_temp_files(out, f"{glob.escape(args.name)}.*")
        for path in paths.values():
            check_writable(path)
        return _bench(args, s, paths, plot_results)
    finally:
        if lock is not None:
            lock.release()
        remove_empty_folders(created)


def _bench(args, s: dict, paths: dict[str, Path], plot_results) -> int:
    result = run(s, report.command_line(), list(args.note), on_row=lambda r: write_tables(r, paths))
    plot_results(result, paths["png"])
    header = f"\nratios: model / {s['baseline']} at the same size"
    if not s["flops_only"]:
        header += (f" | {result['environment']['device']} | amp {s['amp']} | compile {s['compile']}"
                   f"{' (' + s['compile_mode'] + ')' if s['compile'] and s['compile_mode'] != 'default' else ''}"
                   f"{' | cuda graph' if s['cuda_graph'] else ''}"
                   f"{' | checkpointing ' + ','.join(s['grad_checkpointing']) if s['grad_checkpointing'] else ''}"
                   f" | memory: {result['settings']['memory']}")
    print(header)
    print(report.format_table(result["rows"], train=s["train"], latency=s["latency"],
                              timings=not s["flops_only"]))
    for path in paths.values():
        print(f"wrote {path}")
    failed = [f"{r['model']}@{r['img_size']} {k}" for r in result["rows"]
              for k in ("infer", "latency", "train") if (r.get(k) or {}).get("status") == "error"]
    if failed:
        print(f"vigla bench: {len(failed)} measurement(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
