"""Timing and peak memory of one model: inference throughput, batch-1 latency, training steps.

Timing: ``warmup`` untimed calls (the first one is timed separately as ``first_call_ms``: with
``torch.compile`` it holds the compilation), then ``iters`` calls timed one by one, with CUDA events
on a GPU and ``time.perf_counter`` on the CPU. :func:`summarize` reports the median and the spread.

Peak memory (:class:`MemoryMeter`):

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start of the
  window: the absolute high-water mark of tensor memory, weights and input included (what the
  anchors report). Allocator caching and the CUDA context are not in it. A CUDA graph's intermediates
  are not live tensors once it is captured, yet its private memory pool holds them through every
  replay: the timed calls' peak (after :meth:`MemoryMeter.split`) adds what the graphs' pools hold
  beyond their live tensors (:func:`graph_pool_slack`), and the window's peak is the larger of that
  and the warm-up's (which holds the captures).
* CPU: the growth of the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over the RSS measured *before the model was built*: weights, input,
  activations and allocator workspace. It reads pages the process touched, so it also holds
  allocator slack and is approximate to a few MiB. Linux only; ``None`` elsewhere.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..engine.precision import amp_dtype, autocast

__all__ = [
    "MemoryMeter", "autocast", "cuda_graph_forward", "free_memory", "graph_pool_slack", "guarded", "is_oom",
    "make_input", "measure_inference", "measure_train", "memory_kind", "profiled_kernels", "release_workspaces",
    "summarize", "synchronize", "time_calls", "train_step",
]

MiB = 2 ** 20


# ---------------------------------------------------------------------------------------------
# memory

def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Give freed memory back: Python garbage, the CUDA caching allocator, glibc's heap."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def release_workspaces(device: torch.device) -> None:
    """Drop cuBLAS's workspaces on ``device``: it keeps one for every stream a GEMM ran on, for good (a CUDA-graph
    warm-up's side stream among them), and they count as allocated memory. For the start of a row of the bench,
    where no graph of an earlier row is alive (Inductor's CUDA-graph trees clear them around every warm-up and
    recording too): a row's peak then holds the workspaces its own work makes, not the earlier rows'."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            torch._C._cuda_clearCublasWorkspaces()


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_kind(device: torch.device) -> str:
    """What :class:`MemoryMeter` measures on ``device``: ``cuda_max_memory_allocated+graph_pools``,
    ``cpu_peak_rss_growth``, or ``unavailable`` (no ``/proc``)."""
    if torch.device(device).type == "cuda":
        return "cuda_max_memory_allocated+graph_pools"
    ok = _proc_status_kib("VmRSS") is not None and os.access("/proc/self/clear_refs", os.W_OK)
    return "cpu_peak_rss_growth" if ok else "unavailable"


def graph_pool_slack(device: torch.device) -> int:
    """Bytes that CUDA graphs' private memory pools on ``device`` hold beyond their live tensors: the memory
    a captured graph's intermediates occupy at every replay, which ``max_memory_allocated`` does not count."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return sum(seg["total_size"] - seg["allocated_size"] for seg in torch.cuda.memory_snapshot()
               if seg.get("device", index) == index and tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


class MemoryMeter:
    """Peak memory of a measurement window, in MiB (see the module docstring for what it means).

    Create it before building the model (the CPU reference point; call :func:`free_memory` first),
    call :meth:`start` at the start of each window, :meth:`split` between its warm-up and its timed
    calls, and :meth:`peak_mib` at its end.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.kind = memory_kind(self.device)
        self.reference_kib = 0
        self.warmup_bytes = 0
        if self.kind == "cpu_peak_rss_growth":
            _malloc_trim()
            self.reference_kib = _proc_status_kib("VmRSS")

    def start(self) -> None:
        self.warmup_bytes = 0
        if self.is_cuda:
            free_memory(self.device)  # the pools of graphs freed since are released, not counted
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind != "unavailable":
            _malloc_trim()
            _reset_cpu_peak()

    def split(self) -> None:
        """End the window's warm-up (CUDA): its peak is kept, and the timed calls' is measured afresh, with
        the graphs captured by then counted whole (:func:`graph_pool_slack`). Nothing to do on a CPU."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            self.warmup_bytes = max(self.warmup_bytes, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            timed = torch.cuda.max_memory_allocated(self.device) + graph_pool_slack(self.device)
            return max(self.warmup_bytes, timed) / MiB
        if self.kind == "unavailable":
            return None
        return max(0, _proc_status_kib("VmHWM") - self.reference_kib) / 1024


# ---------------------------------------------------------------------------------------------
# timing

def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
               after_warmup: Callable[[], None] | None = None) -> tuple[list[float], float]:
    """Milliseconds of each of ``iters`` timed calls of ``fn`` after ``warmup >= 1`` untimed ones
    (``after_warmup`` is called between them: :meth:`MemoryMeter.split`).

    Returns ``(times_ms, first_call_ms)``: ``first_call_ms`` is the wall-clock time of the first
    warm-up call (lazy initialisation, autotuning, ``torch.compile``'s compilation).
    """
    if warmup < 1 or iters < 1:
        raise ValueError(f"time_calls: need warmup >= 1 and iters >= 1, got {warmup} and {iters}")
    is_cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup - 1):
        fn()
    if after_warmup is not None:
        after_warmup()
    if is_cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        sync()
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync()
        return [start.elapsed_time(end) for start, end in events], first_ms
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, first_ms


def summarize(times_ms: list[float], batch_size: int) -> dict:
    """Median, min/max and quartiles of per-call times, and the images/s they give."""
    q25, q75 = (statistics.quantiles(times_ms, n=4, method="inclusive")[::2]
                if len(times_ms) > 1 else (times_ms[0], times_ms[0]))
    median = statistics.median(times_ms)
    return {
        "status": "ok",
        "batch_size": batch_size,
        "n": len(times_ms),
        "median_ms": median,
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "q25_ms": q25,
        "q75_ms": q75,
        "img_per_s": batch_size * 1e3 / median,
        "img_per_s_min": batch_size * 1e3 / max(times_ms),
        "img_per_s_max": batch_size * 1e3 / min(times_ms),
    }


# ---------------------------------------------------------------------------------------------
# failures

def profiled_kernels(prof, iters: int) -> dict:
    """The device kernels a ``torch.profiler`` capture of ``iters`` steps saw (copies and fills aside), per step:
    ``kernel_launches``, ``kernel_ms`` (their summed time) and ``kernels`` (per kernel name, ``ms``, ``calls``
    and ``share`` of the time, largest first). Only the device events count: an op's row in
    ``key_averages()`` repeats the time of the kernels it launched."""
    kernels = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA
               and not ev.name.startswith(("Memcpy", "Memset"))]
    by_name: dict[str, list[float]] = {}
    for ev in kernels:
        by_name.setdefault(ev.name, []).append(ev.time_range.elapsed_us())
    total_ms = sum(sum(t) for t in by_name.values()) / 1e3 / iters
    rows = sorted(({"op": name, "self_cuda_ms": sum(t) / 1e3 / iters, "calls": len(t) / iters}
                   for name, t in by_name.items()), key=lambda r: -r["self_cuda_ms"])
    for r in rows:
        r["share"] = r["self_cuda_ms"] / total_ms if total_ms else None
    return {"kernel_launches": len(kernels) / iters, "kernel_ms": total_ms, "kernels": rows}


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors, also when a library re-raises them as RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def guarded(fn: Callable[[], dict], device: torch.device) -> dict:
    """``fn()``, or ``{"status": "oom" | "error", "error": message}`` when it raises.

    Memory is released after leaving the ``except`` block, when the traceback (which keeps the
    failed call's tensors alive) is gone.
    """
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (one failed row must not end the run)
        lines = str(exc).strip().splitlines()
        failure = {"status": "oom" if is_oom(exc) else "error",
                   "error": f"{type(exc).__name__}: {lines[0] if lines else ''}"}
    free_memory(torch.device(device))
    return failure


# ---------------------------------------------------------------------------------------------
# the measurements

def make_input(batch_size: int, img_size: int, device: torch.device, channels_last: bool,
               in_chans: int = 3) -> torch.Tensor:
    """``[batch_size, in_chans, img_size, img_size]`` standard-normal fp32 images."""
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def cuda_graph_forward(model: torch.nn.Module, x: torch.Tensor, amp: str, warmup: int = 3
                       ) -> Callable[[], torch.Tensor]:
    """A CUDA graph of ``model(x)`` (inference mode, ``amp`` autocast,
    :class:`vigla.engine.cuda_graph.CudaGraphModel`): returns its replay."""
    from ..engine.cuda_graph import CudaGraphModel

    graphed = CudaGraphModel(model, x.shape[0], amp_dtype(amp, x.device), warmup)
    graphed.capture(tuple(x.shape[1:]))
    graphed.static_input.copy_(x)
    return graphed.replay


def measure_inference(model: torch.nn.Module, batch_size: int, img_size: int, device: torch.device,
                      *, amp: str, channels_last: bool, warmup: int, iters: int,
                      meter: MemoryMeter | None = None, cuda_graph: bool = False) -> dict:
    """Forward passes in ``eval()`` + ``torch.inference_mode``: :func:`summarize`'s dict, plus
    ``first_call_ms`` and, with a ``meter``, ``peak_mib``. ``cuda_graph`` (CUDA only): time replays
    of one captured forward (:func:`cuda_graph_forward`; ``first_call_ms`` then holds the warm-up
    and the capture), which takes the CPU's launch overhead out of the figure."""
    model.eval()
    x = make_input(batch_size, img_size, device, channels_last)
    if meter is not None:
        meter.start()
    split = meter.split if meter is not None else None
    if cuda_graph:
        if device.type != "cuda":
            raise ValueError(f"measure_inference: cuda_graph needs a CUDA device, got {device}")
        t0 = time.perf_counter()
        fn = cuda_graph_forward(model, x, amp, warmup)
        torch.cuda.synchronize(device)
        capture_ms = (time.perf_counter() - t0) * 1e3
        times, _ = time_calls(fn, device, 1, iters, split)
        first_ms = capture_ms
    else:
        with torch.inference_mode(), autocast(device, amp):
            times, first_ms = time_calls(lambda: model(x), device, warmup, iters, split)
    result = summarize(times, batch_size)
    result["first_call_ms"] = first_ms
    if meter is not None:
        result["peak_mib"] = meter.peak_mib()
    return result


def train_step(model: torch.nn.Module, batch_size: int, img_size: int, device: torch.device,
               *, amp: str, channels_last: bool = False, optimizer: str = "adamw", cuda_graph: bool = False,
               graph_warmup: int = 2):
    """One training step as a callable, with ``model`` put in ``train()`` mode: forward under autocast on
    random images and labels, cross-entropy, backward, and (``optimizer="adamw"``) a fused AdamW step;
    ``optimizer="none"``: forward + backward only, as the anchors' training figures. ``cuda_graph``
    (CUDA, bf16 or full precision): the step replayed from one captured graph
    (:class:`vigla.engine.cuda_graph.CudaGraphTrainStep`: ``graph_warmup`` eager calls, then the capture)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused on every device, as vigla train steps (one pass per parameter instead of a dozen ops)
    opt = (torch.optim.AdamW(params, lr=1e-6, fused=True, capturable=cuda_graph)
           if optimizer == "adamw" else None)
    num_classes = getattr(model, "num_classes", None) or 1000
    x = make_input(batch_size, img_size, device, channels_last)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    if cuda_graph:
        from ..engine.cuda_graph import CudaGraphTrainStep
        graphed = CudaGraphTrainStep(model, opt, F.cross_entropy, amp_dtype(amp, device), warmup=graph_warmup)
        return lambda: graphed(x, y)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def step():
        with autocast(device, amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        scaler.scale(loss).backward()
        if opt is not None:
            scaler.step(opt)
            scaler.update()
        for p in params:
            p.grad = None
    return step


def measure_train(model: torch.nn.Module, batch_size: int, img_size: int, device: torch.device,
                  *, amp: str, channels_last: bool, warmup: int, iters: int, optimizer: str,
                  meter: MemoryMeter | None = None, cuda_graph: bool = False) -> dict:
    """Training steps (:func:`train_step`) timed: their throughput, and the peak memory with ``meter``.
    ``cuda_graph``: replays of one captured step (``first_call_ms`` then holds the warm-up and capture)."""
    # the eager steps and the capture inside the untimed calls (with warmup >= 3; else the first timed call
    # captures)
    step = train_step(model, batch_size, img_size, device, amp=amp, channels_last=channels_last,
                      optimizer=optimizer, cuda_graph=cuda_graph, graph_warmup=max(1, min(2, warmup - 1)))
    if meter is not None:
        meter.start()
    split = meter.split if meter is not None else None
    times, first_ms = time_calls(step, device, warmup, iters, split)
    result = summarize(times, batch_size)
    result["first_call_ms"] = first_ms
    result["optimizer"] = optimizer
    if meter is not None:
        result["peak_mib"] = meter.peak_mib()
    return result
