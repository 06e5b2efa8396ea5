"""The named suites of ``python -m benchmarks``: what each part runs, under which time cap, and what it writes.

A suite is a set of parts; a part is a list of steps; a step is one command. A step's name is the
stem of what it writes, ``<suite>_<what>``: ``OUT/<name>.json`` (plus ``.csv``/``.png`` for
``vigla bench``, ``.txt`` for Nsight Compute) and its log ``OUT/logs/<name>.log``. Every part
fits one 10-minute call on one H200 from a cold Triton cache (its steps' caps add up to less).
"""
from __future__ import annotations

import importlib.util
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PY = "python"  # replaced by the running interpreter when a step runs

ALL_MODELS = ["vig_tiny", "vig_small", "vig_base", "vig_h_tiny", "castling_deit_tiny",
              "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
SIZES = ["224", "512", "1024", "2048"]
VIG_T_PAIR = ["--models", "vig_tiny", "deit_tiny_patch16_224", "--baseline", "deit_tiny_patch16_224"]
VIG_S_PAIR = ["--models", "vig_small", "deit_base_patch16_224", "--baseline", "deit_base_patch16_224"]
VIGLA_BENCH = [PY, "-m", "vigla", "bench"]
# the anchors' protocol: bf16 autocast, 3 untimed calls, median of 10 CUDA-event-timed calls
GPU_BENCH = VIGLA_BENCH + ["--device", "cuda", "--amp", "bf16", "--warmup", "3", "--iters", "10"]
# the operator at the shapes where fla-core is compared (its cold autotuning takes minutes per shape)
FLA_SHAPES = ["ViG-T @224", "ViG-T @512", "ViG-T @1024", "ViG-T @2048", "ViG-S @224"]
# Nsight Compute: (step name, B, T, H, d_k, d_v) of the BiGLA calls it profiles (ViG-T layers; the last at
# the model's batch of 128 at 512, the shape of the operator's byte-floor figures)
NCU_SHAPES = [("ncu_vig_t_224", 128, 196, 3, 32, 64), ("ncu_vig_t_1024", 12, 4096, 3, 32, 64),
              ("ncu_vig_t_512_b128", 128, 1024, 3, 32, 64)]
NCU_SECTIONS = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats",
                "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis"]
IMAGENETTE = ROOT / "shared" / "data" / "imagenette2-224"  # where the lead's checkout keeps it
FMNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Options:
    """What a suite's steps depend on besides the suite and part."""
    out: Path
    smoke: bool = False  # tiny sizes: checks the code path, not a result for the record
    extra: list[str] = field(default_factory=list)  # appended to the suite's main command
    imagenette: Path | None = None
    fmnist_dir: Path | None = None
    train_shards: int = 1
    tmp: Path = Path(os.environ.get("TMPDIR", "/tmp")) / "vigla_benchmarks"


@dataclass
class Step:
    name: str
    argv: list[str]
    cap: int  # seconds; the step is killed after it
    outputs: list[str] = field(default_factory=list)  # files under --out, besides the log
    log: Path | None = None  # default: OUT/logs/<name>.log
    env: dict[str, str] = field(default_factory=dict)  # set for this step only
    parallel: bool = False  # run together with the neighbouring parallel steps
    plot: bool = False  # a `vigla bench` run: draw NAME.png from NAME.json when a cap cut it short


@dataclass
class Suite:
    name: str
    help: str
    device: str  # "cuda" or "cpu": where its numbers mean something
    parts: dict[str, tuple[str, Callable[[Options], list[Step]]]]
    extra: str | None = None  # what arguments after `--` go to, when the suite takes any
    smoke: bool = False  # has a tiny-size variant (--smoke)


def _bench(name: str, opts: Options, args: list[str], cap: int, base: list[str] = GPU_BENCH) -> Step:
    argv = base + args + ["--out", str(opts.out), "--name", name]
    return Step(name, argv, cap, [f"{name}.json", f"{name}.csv", f"{name}.png"], plot=True)


# ----------------------------------------------------------------------------------------- tests

# the GPU tests (`@pytest.mark.gpu`) by part: every test file that has one is in exactly one part
TEST_PARTS = {
    "kernels": ("the BiGLA Triton kernels against a float64 recurrence on random shapes, gated and "
                "plain, opcheck, torch.compile, determinism", ["tests/test_bigla_triton.py"]),
    "ops": ("the locality-mix, SwiGLU (and fc1 + SwiGLU), add+norm (and projection + add + norm), depthwise-conv "
            "and stem conv+norm kernels, whole models on their fused paths against reference_ops(), the bf16 "
            "inference stream, gradient checkpointing, the eager launcher's replays, the blocks' deferred residual "
            "adds, the mixer's training node and its fp32-output weight-gradient GEMMs, the public ops' device check, "
            "what Inductor's analysis takes each kernel to write",
            ["tests/test_fused_ops.py", "tests/test_recompute.py", "tests/test_fused_block_ops.py",
             "tests/test_launcher.py", "tests/test_models_vig.py", "tests/test_conv_norm.py",
             "tests/test_op_inputs.py", "tests/test_amp.py", "tests/test_inductor_access.py"]),
    "models": ("vigla bench on CUDA: a real OOM, torch.compile, CUDA-graph replays; CudaGraphModel, "
               "CudaGraphTrainStep, vigla train and vigla eval --cuda-graph against eager; a training step "
               "without a host sync; ViG's features replayed from CUDA graphs in eager training against the replay off",
               ["tests/test_bench.py", "tests/test_cuda_graph.py", "tests/test_train.py", "tests/test_eval.py",
                "tests/test_graph_replay.py"]),
}


def _pytest_plugins() -> list[str]:
    """Parallel workers and a per-test timeout, when the plugins are installed."""
    args = []
    if importlib.util.find_spec("xdist") is not None:
        args += ["-n", str(min(16, os.cpu_count() or 1))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["--timeout", "300"]
    return args


def _tests(part: str) -> Callable[[Options], list[Step]]:
    def steps(opts: Options) -> list[Step]:
        argv = [PY, "-m", "pytest", *TEST_PARTS[part][1], "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE",
                "-W", "ignore::DeprecationWarning", "--durations=15", *_pytest_plugins(), *opts.extra]
        return [Step(f"tests_{part}", argv, 560)]
    return steps


# ---------------------------------------------------------------------------------------- kernel

def _kernel_stem(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/bench_stem.py", "--out", str(opts.out), "--name", "kernel_stem"]
    return [Step("kernel_stem", argv, 120, ["kernel_stem.json"])]


def _kernel_colsum(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/colsum_ab.py", "--out", str(opts.out), "--name", "kernel_colsum_ab", *opts.extra]
    return [Step("kernel_colsum_ab", argv, 120, ["kernel_colsum_ab.json"])]


def _kernel_ops(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/bench_ops.py", "--out", str(opts.out), "--name", "kernel_ops", *opts.extra]
    return [Step("kernel_ops", argv, 300, ["kernel_ops.json"])]


# launch configurations timed beside the automatic plan (chunk length, warps and register cap of the
# per-chunk kernels; each applies to both passes)
TUNE_CONFIGS = ["chunk=64,regs=168", "chunk=64,warps_chunk=4", "chunk=32,warps_chunk=4", "chunk=16,warps_chunk=4",
                "chunk=32,warps_chunk=4,regs=128", "chunk=64,warps_chunk=4,regs=168"]


def _bench_bigla(name: str, args: list[str], cap: int, impls: tuple[str, ...] = ("vigla",)):
    """A part that runs ``benchmarks/bench_bigla.py`` once with ``args`` (plus the caller's after ``--``),
    writing ``<name>.json``."""
    def steps(opts: Options) -> list[Step]:
        argv = [PY, "benchmarks/bench_bigla.py", "--out", str(opts.out), "--name", name, "--impls", *impls, *args,
                *opts.extra]
        return [Step(name, argv, cap, [f"{name}.json"])]
    return steps


# ViG-T's layer as the model runs it at the benchmark batches of 512 / 1024 / 2048 (the table's rows hold fewer tokens)
MODEL_SHAPES = ["ViG-T @512 b128=128,1024,3,32,64", "ViG-T @1024 b32=32,4096,3,32,64", "ViG-T @2048 b8=8,16384,3,32,64"]
_kernel = _bench_bigla("kernel_bigla", [arg for shape in MODEL_SHAPES for arg in ("--shape", shape)], 300)
_kernel_tune = _bench_bigla("kernel_bigla_tune", ["--configs", *TUNE_CONFIGS], 560)

# fewer warps per per-chunk program (more programs resident per multiprocessor), at every shape
WARPS_CONFIGS = ["chunk=16,warps_chunk=1", "chunk=16,warps_chunk=2", "chunk=32,warps_chunk=2", "chunk=64,warps_chunk=2"]
_kernel_tune_warps = _bench_bigla("kernel_bigla_tune_warps", ["--configs", *WARPS_CONFIGS], 560)

# the walk kernel's warps, the value block and the walks' segments, at the shapes where they could matter
WALK_CONFIGS = ["warps_walk=1", "warps_walk=2", "warps_walk=8", "bv=32", "segments=2", "segments=4"]
WALK_SHAPES = ["ViG-T @224", "ViG-T @1024", "ViG-S @224", "ViG-H-T s1 @224", "ViG-H-T s1 @512", "ViG-H-T s2 @224",
               "ViG-H-T s3 @224"]
_kernel_tune_walk = _bench_bigla("kernel_bigla_tune_walk", ["--configs", *WALK_CONFIGS, "--shapes", *WALK_SHAPES], 300)

# the backward per-chunk kernel's register cap (the forward's unchanged), at the short sequences where its
# programs are many and small
REGS_CONFIGS = ["bwd_regs=0", "bwd_regs=128", "bwd_regs=96", "bwd_regs=80", "bwd_regs=64"]
REGS_SHAPES = ["ViG-T @224", "ViG-S @224", "ViG-H-T s1 @224", "ViG-H-T s2 @224", "ViG-H-T s3 @224", "ViG-H-T s4 @224"]
_kernel_tune_regs = _bench_bigla("kernel_bigla_tune_regs", ["--configs", *REGS_CONFIGS, "--shapes", *REGS_SHAPES], 300)

_fla = _bench_bigla("fla_bigla", ["--shapes", *FLA_SHAPES], 570, impls=("vigla", "fla"))


def _official(name: str, model: str, *defaults: str):
    """One model as vigla runs it against the official composition on fla's kernels (benchmarks/official_design.py);
    ``defaults``: its arguments before the user's (which override them)."""
    def steps(opts: Options) -> list[Step]:
        argv = [PY, "benchmarks/official_design.py", "--models", model, "--out", str(opts.out), "--name", name,
                *defaults, *opts.extra]
        return [Step(name, argv, 560, [f"{name}.json"])]
    return steps


# ---------------------------------------------------------------------------------------- models

def _models_vig_t(opts: Options) -> list[Step]:
    return [_bench("models_vig_t_eager", opts, VIG_T_PAIR + ["--img-size", *SIZES, "--train"], 200),
            _bench("models_vig_t_ckpt", opts, VIG_T_PAIR + ["--img-size", "512", "1024", "2048", "--train",
                                                            "--grad-checkpointing", "vig_tiny"], 150),
            _bench("models_vig_t_cuda_graph", opts, VIG_T_PAIR + ["--img-size", *SIZES, "--cuda-graph", "--train"],
                   240)]


def _models_vig_s(opts: Options) -> list[Step]:
    return [_bench("models_vig_s_eager", opts, VIG_S_PAIR + ["--img-size", "224", "--train", "--no-latency"], 150),
            _bench("models_vig_s_cuda_graph", opts, VIG_S_PAIR + ["--img-size", "224", "--cuda-graph", "--train"],
                   150)]


def _models_interleaved(opts: Options) -> list[Step]:
    """Eager ViG against DeiT at 224 timed in turn, round after round (the host's speed drifts between calls)."""
    steps = []
    for name, pair, flags in (("models_vig_t_interleaved", ["vig_tiny", "deit_tiny_patch16_224"], []),
                              ("models_vig_s_interleaved", ["vig_small", "deit_base_patch16_224"], []),
                              ("models_vig_t_interleaved_eager_features", ["vig_tiny", "deit_tiny_patch16_224"],
                               ["--eager-features"])):
        argv = [PY, "benchmarks/interleaved.py", "--device", "cuda", "--models", *pair, *flags, "--out",
                str(opts.out), "--name", name, *opts.extra]
        steps.append(Step(name, argv, 150, [f"{name}.json"]))
    return steps


def _models_all(opts: Options) -> list[Step]:
    args = ["--models", *ALL_MODELS, "--baseline", "deit_tiny_patch16_224", "--img-size", *SIZES, "--train"]
    return [_bench("models_all_eager", opts, args, 450)]


# --------------------------------------------------------------------------------------- compile

COMPILE = ["--compile", "--train", "--no-latency"]


def _compile_warm(opts: Options) -> list[Step]:
    """One untimed call per (model, size), a process per model: fills Inductor's and AOTAutograd's
    caches (they live as long as the machine), so that `compile measure` measures, not compiles."""
    warm = opts.tmp / "compile_warm"
    steps = []
    for model in ALL_MODELS:
        name = f"compile_warm_{model}"
        argv = VIGLA_BENCH + ["--device", "cuda", "--amp", "bf16", *COMPILE, "--warmup", "1", "--iters", "1",
                              "--models", model, "--img-size", *SIZES, "--out", str(warm), "--name", name]
        steps.append(Step(name, argv, 570, log=warm / f"{name}.log", parallel=True,
                          env={"TORCHINDUCTOR_COMPILE_THREADS": "4"}))
    return steps


def _compile_vig_t(opts: Options) -> list[Step]:
    """ViG-T against DeiT-T at 224 and 512 alone, compiled within the run (the warm-up compiles): one call."""
    return [_bench("compile_vig_t", opts, COMPILE + VIG_T_PAIR + ["--img-size", "224", "512"], 570)]


def _compile_inference(opts: Options) -> list[Step]:
    """ViG-T against DeiT-T at 224 and 512, inference alone (no training step to compile), compiled within the run."""
    args = ["--compile", "--no-latency"] + VIG_T_PAIR + ["--img-size", "224", "512"]
    return [_bench("compile_vig_t_inference", opts, args, 400)]


def _compile_reduce_overhead(opts: Options) -> list[Step]:
    """ViG-T against DeiT-T at 224 and 512, both under ``torch.compile(mode="reduce-overhead")`` (Inductor's code
    replayed from CUDA graphs: the compiled models without the host's launch time), compiling in the run."""
    args = ["--compile-mode", "reduce-overhead"] + COMPILE + VIG_T_PAIR + ["--img-size", "224", "512"]
    return [_bench("compile_vig_t_reduce_overhead", opts, args, 570)]


def _compile_interleaved(opts: Options, mode: str | None = None) -> list[Step]:
    """Compiled ViG-T against compiled DeiT-T at 224 timed in turn, round after round (inference, training, batch 1),
    in torch.compile's default mode or ``mode``."""
    name = "compile_vig_t_interleaved" + (f"_{mode.replace('-', '_')}" if mode else "")
    argv = [PY, "benchmarks/interleaved.py", "--device", "cuda", "--compile",
            *(["--compile-mode", mode, "--rounds", "6"] if mode else []), "--out", str(opts.out), "--name", name,
            *opts.extra]
    return [Step(name, argv, 540, [f"{name}.json"])]


def _compile_interleaved_reduce_overhead(opts: Options) -> list[Step]:
    return _compile_interleaved(opts, "reduce-overhead")


def _compile_measure(opts: Options) -> list[Step]:
    args = COMPILE + ["--models", *ALL_MODELS, "--baseline", "deit_tiny_patch16_224", "--img-size", *SIZES]
    return [_bench("compile_all_models", opts, args, 570)]


# --------------------------------------------------------------------------------- profile, ncu

def _profile(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/profile_vig.py", "--models", "vig_tiny", "vig_small", "vig_h_tiny", "--img-size",
            "224", "1024", "--iters", "2", "--out", str(opts.out), "--name", "profile_vig"]
    return [Step("profile_vig", argv, 400, ["profile_vig.json"])]


def _profile_compiled(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/profile_vig.py", "--models", "vig_tiny", "deit_tiny_patch16_224", "--img-size", "224",
            "--iters", "3", "--compile", "--out", str(opts.out), "--name", "profile_compiled"]
    return [Step("profile_compiled", argv, 500, ["profile_compiled.json"])]


def _host_profile(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/host_profile.py", "--models", "vig_tiny", "deit_tiny_patch16_224", "vig_small",
            "--rounds", "3", "--breakdown", "--out", str(opts.out), "--name", "profile_host"]
    return [Step("profile_host", argv, 180, ["profile_host.json"])]


def _host_profile_train(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/host_profile.py", "--train", "--models", "vig_tiny", "deit_tiny_patch16_224",
            "--rounds", "3", "--breakdown", "--out", str(opts.out), "--name", "profile_host_train"]
    return [Step("profile_host_train", argv, 180, ["profile_host_train.json"])]


def _host_ops(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/host_ops.py", "--out", str(opts.out), "--name", "profile_host_ops"]
    return [Step("profile_host_ops", argv, 120, ["profile_host_ops.json"])]


def _ncu(opts: Options) -> list[Step]:
    """Nsight Compute's sections of every kernel launched by one BiGLA forward + backward (the
    NVTX range ``bigla`` of benchmarks/ncu_bigla.py, after warm-up calls)."""
    steps = []
    for name, *shape in NCU_SHAPES:
        sections = [arg for s in NCU_SECTIONS for arg in ("--section", s)]
        argv = ["ncu", "--clock-control", "none", "--nvtx", "--nvtx-include", "bigla", *sections,
                "--log-file", str(opts.out / f"{name}.txt"), PY, "benchmarks/ncu_bigla.py",
                "--shape", *map(str, shape)]
        steps.append(Step(name, argv, 180, [f"{name}.txt"]))
    return steps


def _ncu_source(opts: Options) -> list[Step]:
    """The source view (SASS, executed counts and stall samples) of the same kernels, summarised per kernel
    by benchmarks/ncu_source.py."""
    steps = []
    for name, *shape in NCU_SHAPES:
        stem = name.replace("ncu_", "ncu_source_")
        report = opts.out / f"{stem}_report"
        argv = ["ncu", "--clock-control", "none", "--nvtx", "--nvtx-include", "bigla", "--set", "full",
                "--import-source", "yes", "-f", "-o", str(report), PY, "benchmarks/ncu_bigla.py",
                "--shape", *map(str, shape)]
        steps.append(Step(f"{stem}_report", argv, 150, [f"{stem}_report.ncu-rep"]))
        steps.append(Step(stem, [PY, "benchmarks/ncu_source.py", "--report", f"{report}.ncu-rep", "--out",
                                 str(opts.out), "--name", stem], 40, [f"{stem}.json"]))
    return steps


# ------------------------------------------------------------------------------- train, castling

def _train(opts: Options) -> list[Step]:
    """ViG-T vs DeiT-T, same recipe and budget (benchmarks/gpu_train.py), on Imagenette when its
    folder (or its tar shards) is given or in shared/data, and on Fashion-MNIST when present."""
    steps, args = [], []
    inette, fmnist = train_data(opts)
    if inette is not None:
        unpack, inette = _imagenette_folder(inette, opts)
        steps += unpack
        args += ["--imagenette", str(inette)]
    if fmnist is not None:
        args += ["--fmnist-dir", str(fmnist)]
    name = "train_compare"
    argv = [PY, "benchmarks/gpu_train.py", *args, "--out", str(opts.out), "--name", name,
            "--runs", str(opts.tmp / "train_runs"), *opts.extra]
    return steps + [Step(name, argv, 570, [f"{name}.json", f"{name}.md"])]


def _train_cuda_graph(opts: Options) -> list[Step]:
    """``vigla train`` eager against ``--cuda-graph`` (benchmarks/train_throughput.py) on Fashion-MNIST."""
    _, fmnist = train_data(opts)
    name = "train_cuda_graph"
    argv = [PY, "benchmarks/train_throughput.py", "--fmnist-dir", str(fmnist or FMNIST), "--out", str(opts.out),
            "--name", name, *opts.extra]
    return [Step(name, argv, 400, [f"{name}.json"])]


def _imagenette_folder(inette: Path, opts: Options) -> tuple[list[Step], Path]:
    """The step that unpacks the tar shards (val and the first ``--train-shards``) into a folder, if
    ``inette`` holds shards, and the ImageFolder root to train on."""
    if not sorted(inette.glob("*.tar")):
        return [], inette
    dest = opts.tmp / "imagenette"
    tars = " ".join(shlex.quote(str(inette / f"train-{i}.tar")) for i in range(1, opts.train_shards + 1))
    script = (f"mkdir -p {shlex.quote(str(dest))} && for t in {shlex.quote(str(inette / 'val.tar'))} "
              f"{tars}; do tar -xf $t -C {shlex.quote(str(dest))}; done")
    return [Step("train_unpack", ["sh", "-c", script], 120, log=opts.tmp / "train_unpack.log")], dest


def train_data(opts: Options) -> tuple[Path | None, Path | None]:
    """The Imagenette folder (ImageFolder root or its tar shards) and the Fashion-MNIST folder the
    train suite uses: the given ones, else the default places when they exist."""
    inette = opts.imagenette or (IMAGENETTE if IMAGENETTE.is_dir() else None)
    fmnist = opts.fmnist_dir or (FMNIST if FMNIST.is_dir() else None)
    return (Path(inette) if inette else None), (Path(fmnist) if fmnist else None)


def _castling(opts: Options) -> list[Step]:
    name = "castling_vs_deit_tiny"
    argv = [PY, "benchmarks/gpu_castling.py", "--out", str(opts.out), "--name", name]
    return [Step(name, argv + (["--device", "cpu", "--quick"] if opts.smoke else []), 480, [f"{name}.json"])]


def _castling_imagenette(model: str) -> Callable[[Options], list[Step]]:
    """One Imagenette training run of ``model`` (benchmarks/gpu_castling.py --parts imagenette, the same recipe
    for both models): ``castling_imagenette_<castling|deit>.json``, and ``.md``, the table of every such JSON in
    the output folder. Imagenette: ``--imagenette`` or shared/data (its tar shards are unpacked first)."""
    def steps(opts: Options) -> list[Step]:
        name = f"castling_imagenette_{model.split('_')[0]}"
        unpack, inette = _imagenette_folder(train_data(opts)[0] or IMAGENETTE, opts)
        argv = [PY, "benchmarks/gpu_castling.py", "--parts", "imagenette", "--imagenette", str(inette), "--model",
                model, "--out", str(opts.out), "--name", name, "--runs", str(opts.tmp / "castling_runs")]
        if opts.smoke:
            argv += ["--device", "cpu", "--epochs", "2", "--warmup-epochs", "0", "--img", "32", "--batch", "4",
                     "--workers", "0", "--slot", "300", "--extra", "--train-subset", "8", "--val-subset", "8"]
        return unpack + [Step(name, argv, 470, [f"{name}.json", f"{name}.md"])]
    return steps


# ------------------------------------------------------------------------------------- cpu, flops

CPU_NOTES = ["CPU: the fused ops run their compiled float32 CPU kernels (vigla/ops/*/cpu_kernels.c; BiGLA's "
             "recurrences, the locality mix, SwiGLU, add + norm, the depthwise conv; environment.bigla_cpu names "
             "BiGLA's path); not representative of GPU speed; absolute times "
             "move with the machine's load, compare the ratios",
             "peak MiB on CPU = growth of the process's peak RSS over the RSS before the model was built "
             "(weights, input, activations, allocator slack)"]


def _cpu_models(opts: Options) -> list[Step]:
    size = ["--img-size", "32", "--batch-size", "1", "--warmup", "1", "--iters", "1"] if opts.smoke else \
        ["--img-size", "224", "--batch-size", "8", "--warmup", "3", "--iters", "15"]
    args = VIG_T_PAIR + size + ["--device", "cpu", "--train"] + [a for n in CPU_NOTES for a in ("--note", n)]
    return [_bench("cpu_vig_t_224", opts, args, 560, base=VIGLA_BENCH)]


def _cpu_interleaved(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/interleaved.py", "--device", "cpu", "--out", str(opts.out), "--name",
            "cpu_vig_t_interleaved"]
    if opts.smoke:
        argv += ["--rounds", "1", "--calls", "1", "--steps", "1", "--batch-size", "1"]
    return [Step("cpu_vig_t_interleaved", argv, 400, ["cpu_vig_t_interleaved.json"])]


def _cpu_host_memory(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/host_memory_ab.py", "--out", str(opts.out), "--name", "cpu_host_memory_ab"]
    if opts.smoke:
        argv += ["--rounds", "1", "--warmup", "1", "--steps", "1", "--batch-size", "1"]
    return [Step("cpu_host_memory_ab", argv, 400, ["cpu_host_memory_ab.json"])]


def _cpu_swiglu_epilogue(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/swiglu_epilogue_ab.py", "--out", str(opts.out), "--name", "cpu_swiglu_epilogue_ab"]
    if opts.smoke:
        argv += ["--rounds", "1", "--calls", "1", "--batch-size", "1"]
    return [Step("cpu_swiglu_epilogue_ab", argv, 300, ["cpu_swiglu_epilogue_ab.json"])]


def _cpu_vector_width(opts: Options) -> list[Step]:
    name = "cpu_kernels_vector_width_ab"
    argv = [PY, "benchmarks/vector_width_ab.py", "--out", str(opts.out), "--name", name]
    if opts.smoke:
        argv += ["--rounds", "1", "--calls", "1", "--batch-size", "1"]
    return [Step(name, argv, 300, [f"{name}.json"])]


def _cpu_source_ab(opts: Options) -> list[Step]:
    name = "cpu_kernels_source_ab"
    argv = [PY, "benchmarks/cpu_source_ab.py", "--base", "HEAD~1", "--out", str(opts.out), "--name", name, *opts.extra]
    if opts.smoke:
        argv += ["--rounds", "1", "--calls", "1", "--batch-size", "1"]
    return [Step(name, argv, 540, [f"{name}.json"])]


def _cpu_op_profile(opts: Options) -> list[Step]:
    argv = [PY, "benchmarks/cpu_op_profile.py", "--out", str(opts.out), "--name", "cpu_op_profile"]
    if opts.smoke:
        argv += ["--warmup", "1", "--steps", "1", "--batch-size", "1", "--top", "5"]
    return [Step("cpu_op_profile", argv, 300, ["cpu_op_profile.json"])]


def _cpu_default_train(opts: Options) -> list[Step]:
    name = "cpu_default_train"
    argv = [PY, "benchmarks/cpu_default_train.py", "--out", str(opts.out), "--name", name]
    if opts.smoke:
        argv += ["--", "--epochs", "1", "--train-subset", "32", "--val-subset", "16", "--test-subset", "16",
                 "--img-size", "32", "--batch-size", "8"]
    return [Step(name, argv, 560, [f"{name}.json", f"{name}.png"])]


def _flops(opts: Options) -> list[Step]:
    models, sizes = (["vig_tiny", "deit_tiny_patch16_224"], ["224"]) if opts.smoke else (ALL_MODELS, SIZES)
    args = ["--flops-only", "--models", *models, "--baseline", "deit_tiny_patch16_224", "--img-size", *sizes,
            "--device", "cpu", "--note", "FLOP counts are exact shape arithmetic (FakeTensorMode), "
            "independent of the machine"]
    return [_bench("flops_all_models", opts, args, 300, base=VIGLA_BENCH)]


def _export_latency(opts: Options) -> list[Step]:
    name = "export_latency"
    argv = [PY, "benchmarks/export_latency.py", "--models", "vig_tiny", "deit_tiny_patch16_224",
            "--img-size", "224", "512", "--out", str(opts.out), "--name", name]
    return [Step(name, argv, 560, [f"{name}.json"])]


def _sass(name: str, args: list[str]) -> Callable[[Options], list[Step]]:
    """A part running ``benchmarks/sass_bigla.py`` with ``args``, writing ``name.json``."""
    def steps(opts: Options) -> list[Step]:
        argv = [PY, "benchmarks/sass_bigla.py", *args, "--out", str(opts.out), "--name", name, *opts.extra]
        return [Step(name, argv, 300, [f"{name}.json"])]
    return steps


_sass_bigla = _sass("sass_bigla", [])
# the same kernels' instructions on the lines inside the helpers their bodies call
_sass_bigla_lines = _sass("sass_bigla_lines", ["--depth", "1", "--lines", "30"])


# ----------------------------------------------------------------------------------------- dense

DENSE_TMP = "dense"  # under Options.tmp: the composite data set and the training runs


def _dense_highres(opts: Options) -> list[Step]:
    """Backbone + FPN forward and forward+backward at 512-4096 (benchmarks/dense_bench.py), two steps so that a
    slow large size cannot take the small ones' results with it."""
    base = [PY, "benchmarks/dense_bench.py", "--baseline", "swin_tiny_patch4_window7_224", "--out", str(opts.out)]
    if opts.smoke:
        argv = base + ["--device", "cpu", "--amp", "none", "--img-size", "64", "--batch-size", "1", "--warmup", "1",
                       "--iters", "1", "--name", "dense_highres_smoke"]
        return [Step("dense_highres_smoke", argv, 300, ["dense_highres_smoke.json", "dense_highres_smoke.png"])]
    steps = []
    for name, sizes, batches, cap in (("dense_highres_low", ["512", "1024"], ["8", "2"], 240),
                                      ("dense_highres_high", ["2048", "4096"], ["1", "1"], 330)):
        argv = base + ["--img-size", *sizes, "--batch-size", *batches, "--name", name]
        steps.append(Step(name, argv, cap, [f"{name}.json", f"{name}.png"]))
    return steps


def _dense_train(task: str) -> Callable[[Options], list[Step]]:
    def steps(opts: Options) -> list[Step]:
        name = f"dense_train_{task}"
        inette, _ = train_data(opts)
        tmp = opts.tmp / DENSE_TMP
        argv = [PY, "benchmarks/dense_train.py", "--task", task, "--data",
                str(tmp / ("composite_smoke" if opts.smoke else "composite")), "--runs", str(tmp / "runs"),
                "--out", str(opts.out), "--name", name]
        argv += (["--imagenette", str(inette)] if inette else []) + (["--smoke"] if opts.smoke else [])
        return [Step(name, argv + opts.extra, 570, [f"{name}.json", f"{name}.md"])]
    return steps


SUITES = {s.name: s for s in [
    Suite("tests", "the GPU test suite (pytest -m gpu), by part", "cuda",
          {part: (what, _tests(part)) for part, (what, _) in TEST_PARTS.items()}, extra="pytest"),
    Suite("kernel", "the BiGLA operator alone, vigla's kernels at every bench_bigla.py shape (do_bench and "
          "CUDA-graph replays)", "cuda",
          {"bigla": ("the automatic launch plan: forward and forward+backward", _kernel),
           "tune": ("the automatic plan beside other launch configurations", _kernel_tune),
           "tune_walk": ("the same for the walk kernel's warps, the value block and the segments",
                         _kernel_tune_walk),
           "tune_warps": ("the same for one and two warps per per-chunk program", _kernel_tune_warps),
           "tune_regs": ("the same for the backward per-chunk kernel's register cap", _kernel_tune_regs),
           "stem": ("the stems' fused path (conv + LayerNorm + act in one kernel) against their layers one by one",
                    _kernel_stem),
           "ops": ("the block ops (depthwise conv + SiLU forward and backward, add + norm, locality mix, fc1 + "
                   "SwiGLU) against their byte floors at ViG-T and ViG-H-T shapes", _kernel_ops),
           "colsum": ("a bias gradient's column sums (bf16 rows into float32): PyTorch's reduction against the GEMM "
                      "with a row of ones that vigla.ops.amp.colsum runs", _kernel_colsum)},
          extra="benchmarks/bench_bigla.py (its launch configurations, shapes, ...)"),
    Suite("fla", "the BiGLA operator against fla-core's chunk_gla on [x; flip(x)] in one run (needs the "
          "fla-core wheel in .whl/; its cold autotuning takes minutes)", "cuda",
          {"bigla": ("ViG-T and ViG-S layer shapes, forward and forward+backward", _fla),
           "official": ("ViG-T against the official code's composition on fla's kernels (chunk_gla on [x; flip(x)], "
                        "fused RMSNorm, swiglu), eager inference and training at 224 and 512",
                        _official("fla_official_design", "vig_tiny")),
           "official_h": ("the same for ViG-H-T (channel-first, chunk_gla in stages 1-2, fused_recurrent_gla in "
                          "3-4), inference at 224 (fla's cold autotuning took 4.8 minutes of one call for the "
                          "forward alone; `-- --phases inference train` adds training)",
                          _official("fla_official_design_h", "vig_h_tiny", "--img-size", "224", "--phases",
                                    "inference"))},
          extra="benchmarks/bench_bigla.py, benchmarks/official_design.py"),
    Suite("models", "vigla bench on one GPU: ViG against DeiT, ratios taken in the same run", "cuda",
          {"vig_t": ("ViG-T vs DeiT-T at 224-2048: eager with training steps, ViG-T with gradient "
                     "checkpointing, CUDA-graph replays", _models_vig_t),
           "vig_s": ("ViG-S vs DeiT-B at 224: eager with training steps, CUDA-graph replays", _models_vig_s),
           "interleaved": ("ViG-T vs DeiT-T and ViG-S vs DeiT-B at 224, eager, timed in turn round after round: "
                           "inference, training steps, batch-1 latency; ViG-T again with its CUDA-graph replay of "
                           "forward_features off", _models_interleaved),
           "all": ("every model at 224-2048, eager, with training steps, ratios to DeiT-T", _models_all)}),
    Suite("compile", "torch.compile (default mode, static shapes) of every model, inference and training; "
          "run `warm`, then `measure` in a second call on the same machine", "cuda",
          {"warm": ("compile every (model, size) once, a process per model (caches only, no result)",
                    _compile_warm),
           "measure": ("the recorded run, ratios to DeiT-T", _compile_measure),
           "vig_t": ("ViG-T vs DeiT-T at 224 and 512 only, compiling in the run itself (one call, cold "
                     "caches)", _compile_vig_t),
           "inference": ("the same, inference alone (a third of the compile time)", _compile_inference),
           "reduce_overhead": ("ViG-T vs DeiT-T at 224 and 512, both compiled with mode='reduce-overhead' (CUDA "
                               "graphs inside), compiling in the run itself (one call)", _compile_reduce_overhead),
           "interleaved": ("ViG-T vs DeiT-T at 224, both compiled, timed in turn round after round: inference, "
                           "training steps, batch-1 latency", _compile_interleaved),
           "interleaved_reduce_overhead": ("the same, both compiled with mode='reduce-overhead', 6 rounds",
                                           _compile_interleaved_reduce_overhead)}),
    Suite("profile", "torch.profiler op table of ViG-T, ViG-S and ViG-H-T at 224 and 1024; the host's time in "
          "eager forwards", "cuda",
          {"vig": ("inference and training steps, kernels grouped by op", _profile),
           "compiled": ("ViG-T and DeiT-T at 224 under torch.compile: wall time against kernel time and launches "
                        "per step (is the compiled model bound by the host)", _profile_compiled),
           "host": ("the host's time in an eager forward at 224: synced, issue-only and pipelined timings, "
                    "cProfile of the Python frames", _host_profile),
           "host_train": ("the same for a training step at 224 (forward, backward, fused AdamW): is it bound "
                          "by the host or the device", _host_profile_train),
           "host_ops": ("the host's time per call of each op of a ViG-T block beside PyTorch's ops and an empty "
                        "Triton launch", _host_ops)}),
    Suite("ncu", "Nsight Compute sections of the BiGLA kernels at three ViG-T shapes", "cuda",
          {"bigla": ("one forward + backward per shape, every kernel in it", _ncu),
           "source": ("the same kernels' SASS: instructions per warp, opcode mix by executed instructions "
                      "and by stall samples, the hottest instructions", _ncu_source)}),
    Suite("train", "ViG-T vs DeiT-T trained with the same recipe and budget, evaluated at 1x, 2x and 4x the "
          "training size; `vigla train` eager against --cuda-graph", "cuda",
          {"compare": ("Imagenette and/or Fashion-MNIST", _train),
           "cuda_graph": ("`vigla train` eager against --cuda-graph: the loop's img/s, ViG-T and DeiT-T on "
                          "Fashion-MNIST at 224", _train_cuda_graph)},
          extra="benchmarks/gpu_train.py"),
    Suite("castling", "Castling-DeiT-T vs DeiT-T: speed, memory, the auxiliary branch's cost, numerics; both "
          "trained on Imagenette with the same recipe", "cuda",
          {"vs_deit_tiny": ("inference at 224-2048, training at 224/512/1024 (branch off, on, on through the "
                            "[N, N] op), mixer numerics", _castling),
           "imagenette_castling": ("Castling-DeiT-T on Imagenette, the paper's schedule: top-1 with the branch on "
                                   "and off at the switch, after it, at the end", _castling_imagenette(
                                       "castling_deit_tiny")),
           "imagenette_deit": ("DeiT-T on Imagenette, the same recipe", _castling_imagenette("deit_tiny_patch16_224"))},
          smoke=True),
    Suite("cpu", "this CPU: ViG-T vs DeiT-T at 224 and the default run (`vigla train`) timed", "cpu",
          {"models": ("vigla bench at 224, batch 8, with training steps", _cpu_models),
           "interleaved": ("ViG-T and DeiT-T timed in turn, round after round (ratios of times seconds apart)",
                           _cpu_interleaved),
           "host_memory": ("ViG-T and DeiT-T training steps, one model per process, with glibc's default heap "
                           "and with vigla.engine.host_memory's", _cpu_host_memory),
           "swiglu_epilogue": ("ViG-T inference with SwiGLU's gating in oneDNN's GEMM epilogues and with fc1's GEMM "
                               "then the gating kernel, DeiT-T in turn", _cpu_swiglu_epilogue),
           "vector_width": ("the CPU kernels built with GCC's preferred vector width and with 512-bit vectors, "
                            "each op on ViG-T's layer shapes", _cpu_vector_width),
           "source_ab": ("the CPU kernels built from an earlier commit's sources (after --: --base COMMIT; default "
                         "HEAD~1) and from this tree's, each op on ViG-T's layer shapes", _cpu_source_ab),
           "op_profile": ("torch.profiler's op table of ViG-T and DeiT-T, inference and training steps",
                          _cpu_op_profile),
           "default_train": ("`vigla train` with no settings, wall time and accuracy", _cpu_default_train)},
          extra="benchmarks/cpu_source_ab.py (--base COMMIT)", smoke=True),
    Suite("export", "this CPU: ONNX Runtime against PyTorch, the same models exported by vigla export", "cpu",
          {"latency": ("ViG-T and DeiT-T at 224 and 512, one intra-op thread each", _export_latency)}),
    Suite("sass", "the BiGLA kernels' static SASS for sm_90, compiled on this machine (no GPU): registers, "
          "spills, instructions per source line", "cpu",
          {"bigla": ("the default plans' kernels at ViG-T and ViG-H-T layers", _sass_bigla),
           "lines": ("the same, instructions on the lines inside the helpers the kernels call", _sass_bigla_lines)},
          extra="benchmarks/sass_bigla.py (--alt FILE, --lines N, --depth N)"),
    Suite("flops", "parameters and MACs of every model at 224-2048 (no model is run)", "cpu",
          {"all_models": ("vigla bench --flops-only", _flops)}, smoke=True),
    Suite("dense", "ViG-H-T and ViG-T as detection / segmentation backbones: backbone + FPN speed and memory at "
          "512-4096 against ConvNeXt-T, Swin-T, ResNet-50, DeiT-S; Mask R-CNN and semantic FPN trained on the "
          "composite data set (Imagenette objects, shared/data/imagenette2-224 or --imagenette after --)", "cuda",
          {"highres": ("forward and forward+backward img/s and peak memory, 512-1024 and 2048-4096", _dense_highres),
           "detect": ("Mask R-CNN, ViG-H-T vs ConvNeXt-T from scratch, same budget: box / mask AP",
                      _dense_train("detect")),
           "segment": ("semantic FPN, ViG-H-T vs ConvNeXt-T from scratch, same budget: mIoU",
                       _dense_train("segment"))},
          extra="benchmarks/dense_train.py (the detect and segment parts)", smoke=True),
]}


def plan(suite: str, parts: list[str], opts: Options) -> list[Step]:
    """The steps of ``parts`` (all parts when empty) of ``suite``, in order."""
    s = SUITES[suite]
    return [step for part in (parts or list(s.parts)) for step in s.parts[part][1](opts)]


def producers(out: Path) -> dict[str, str]:
    """Step name -> the command that makes it today (``python -m benchmarks SUITE PART``)."""
    opts = Options(out=out)
    return {step.name: f"python -m benchmarks {s.name} {part}"
            for s in SUITES.values() for part, (_, make) in s.parts.items() for step in make(opts)}
