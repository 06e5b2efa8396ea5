"""The README's performance tables, printed as markdown from the JSON under benchmarks/results.

    python benchmarks/summarize.py [RESULTS_DIR]

Every number in the tables is read from a `vigla bench` or `bench_bigla.py` JSON (each holds its
device, commit and command); nothing is typed in by hand.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SIZES = (224, 512, 1024, 2048)


def load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def row(result: dict, model: str, size: int) -> dict | None:
    return next((r for r in result["rows"] if r["model"] == model and r["img_size"] == size), None)


def value(r: dict | None, path: tuple[str, ...]):
    for key in path:
        if not isinstance(r, dict):
            return None
        r = r.get(key)
    return r


def ratio(result, model, base, size, path) -> str:
    a, b = value(row(result, model, size), path), value(row(result, base, size), path)
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def pair_table(runs: list[tuple[str, dict | None]], model: str, base: str) -> list[str]:
    """One line per (label, metric): model / base at each size, from the named runs."""
    metrics = [("inference img/s", ("infer", "img_per_s")), ("inference peak memory", ("infer", "peak_mib")),
               ("batch-1 latency (ms ÷ ms)", ("latency", "median_ms")),
               ("training img/s", ("train", "img_per_s")), ("training peak memory", ("train", "peak_mib"))]
    lines = [f"| {model} ÷ {base} | " + " | ".join(f"@{s}" for s in SIZES) + " | run |",
             "| --- | " + " | ".join("---" for _ in SIZES) + " | --- |"]
    for label, result in runs:
        if result is None:
            continue
        for name, path in metrics:
            cells = [ratio(result, model, base, s, path) for s in SIZES]
            if all(c == "-" for c in cells):
                continue
            lines.append(f"| {name}, {label} | " + " | ".join(cells) + f" | `{result['git']['commit']}` |")
    return lines


def models_table(result: dict, base: str) -> list[str]:
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    lines = ["| model | " + " | ".join(f"img/s @{s} (÷ {base.split('_')[0]}-T)" for s in SIZES)
             + " | train img/s @1024 | train MiB @1024 |",
             "| --- | " + " | ".join("---" for _ in SIZES) + " | --- | --- |"]
    for m in models:
        cells = []
        for s in SIZES:
            r = row(result, m, s)
            v = value(r, ("infer", "img_per_s"))
            cells.append("-" if v is None else f"{v:,.0f} ({ratio(result, m, base, s, ('infer', 'img_per_s'))})")
        r = row(result, m, 1024)
        t, mem = value(r, ("train", "img_per_s")), value(r, ("train", "peak_mib"))
        status = value(r, ("train", "status"))
        cells.append(f"{t:,.0f}" if t is not None else (status or "-").upper())
        cells.append(f"{mem:,.0f}" if mem is not None else (status or "-").upper())
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    return lines


def kernel_table(fla: dict | None, triton: dict | None) -> list[str]:
    """Triton-only rows from ``triton``; fla-core's times and the ratios from ``fla``, the run that
    timed both backends (its own Triton times, so each ratio comes from one run)."""
    lines = ["| shape | fwd ms | fwd+bwd ms | fwd ÷ floor | fla fwd ms | fla fwd+bwd ms | fla ÷ ours fwd, fwd+bwd (one run) | run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    if triton is None:
        return lines
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    for r in triton["rows"]:
        f = next((x for x in (fla or {}).get("rows", []) if x["name"] == r["name"]), {})
        ratios = (f"{fmt(f.get('fla_over_triton_fwd'), '.1f')}x, {fmt(f.get('fla_over_triton_fwdbwd'), '.1f')}x"
                  if f else "-")
        lines.append(f"| {r['name']} (B={r['B']}) | {fmt(r.get('triton_fwd_ms'))} | {fmt(r.get('triton_fwdbwd_ms'))} "
                     f"| {r['triton_fwd_over_floor']:.1f} | {fmt(f.get('fla_fwd_ms'))} | {fmt(f.get('fla_fwdbwd_ms'))} "
                     f"| {ratios} | `{triton['commit']}`" + (f", fla `{fla['commit']}`" if f else "") + " |")
    return lines


def main() -> int:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    eager, graph = load(results, "gpu_eager_train"), load(results, "gpu_cuda_graph")
    compiled = load(results, "gpu_compile_all_models")
    print("### ViG-T ÷ DeiT-T\n")
    print("\n".join(pair_table([("eager", eager), ("CUDA graphs", graph), ("torch.compile", compiled),
                                ("ViG-T with checkpointing", load(results, "gpu_ckpt_train"))],
                               "vig_tiny", "deit_tiny_patch16_224")))
    print("\n### ViG-S ÷ DeiT-B at 224\n")
    print("\n".join(pair_table([("eager", load(results, "gpu_vig_s_vs_deit_b_224")),
                                ("CUDA graphs", load(results, "gpu_vig_s_vs_deit_b_224_cuda_graph"))],
                               "vig_small", "deit_base_patch16_224")))
    for name, label in (("gpu_eager_train_all_models", "eager"), ("gpu_compile_all_models", "torch.compile")):
        every = load(results, name)
        if every:
            print(f"\n### Every model, {label} (`{name}.json`, commit `{every['git']['commit']}`)\n")
            print("\n".join(models_table(every, "deit_tiny_patch16_224")))
    print("\n### The BiGLA operator\n")
    print("\n".join(kernel_table(load(results, "bench_bigla"), load(results, "bench_bigla_triton"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
