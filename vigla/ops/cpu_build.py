"""Compiled CPU kernels: one C file per op, built once per machine, loaded with :mod:`ctypes`.

Each op with CPU kernels (BiGLA, the locality mix, SwiGLU, add + norm, the depthwise conv) keeps a
``cpu_kernels.c`` beside its other files and declares it as a :class:`CpuLibrary`. On the first call
that needs it the source is compiled with the system's C compiler (``$CC``, else ``cc``; a few seconds)
into ``$VIGLA_CACHE_DIR`` (default ``~/.cache/vigla``), keyed by the source, the shared header
``cpu_math.h``, the compiler, its flags and the machine, and loaded with :mod:`ctypes`, whose calls
release the GIL. Without a compiler (one warning for all the ops) or when a build fails (one warning
for that op) :meth:`CpuLibrary.available` is False and the op runs its PyTorch path.

The C side threads with OpenMP: built with ``-fopenmp`` a library links ``libgomp.so.1`` by name, which
resolves to the copy PyTorch has loaded (one thread pool); the callers pass ``torch.get_num_threads()``.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from vigla.notices import KernelWarning

__all__ = ["CpuLibrary", "FLAGS", "LONG", "PTR", "compiler", "ptr", "threads"]

PTR, LONG = ctypes.c_void_p, ctypes.c_long
_HEADER = Path(__file__).with_name("cpu_math.h")  # the elementwise maths the kernels share
# -march=native: built on the machine that runs it; the reassociation lets the compiler vectorise
# the sums over a row (the order of a float32 sum changes, nothing else)
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-Wl,-z,defs", f"-I{_HEADER.parent}"]
# x86-64: the loops the compiler vectorises itself (the gates' logarithms and exponentials, the scales of the
# state's rows, the elementwise ops) at the full width of AVX-512 where the CPU has it: GCC's -march=native
# prefers 256-bit vectors on those CPUs. On a 2-core Xeon with AVX-512 (ViG-T's layer, batch 8 at 224): BiGLA's
# backward 3.05 -> 1.82 ms, its forward with the locality mix 1.05 -> 0.93 ms, the depthwise conv's backward 0.53 ->
# 0.43 ms, the other kernels within 3% but add + norm's backward (17% off): benchmarks/results/
# cpu_kernels_vector_width_ab.json. No effect on a CPU without AVX-512.
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS.append("-mprefer-vector-width=512")


def _cache_dir() -> Path:
    root = os.environ.get("VIGLA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vigla")
    return Path(root)


def _cpu() -> str:
    """The machine and its CPU's model and instruction sets (``-march=native`` code runs on that CPU only:
    a cache shared by different machines keeps one library per CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        info = []
    return " ".join([platform.machine(), platform.processor(), *info])


@functools.lru_cache(maxsize=1)
def compiler() -> Optional[str]:
    """``$CC`` (else ``cc``) when it is on the PATH; None, with one warning per process, when it is not."""
    name = os.environ.get("CC") or "cc"
    if shutil.which(name) is None:
        warnings.warn(f"no C compiler ({name!r}) found, so vigla's fused ops on the CPU (BiGLA, the locality "
                      "mix, SwiGLU, add + norm, the depthwise conv) run their slower PyTorch paths; install one "
                      "(e.g. gcc) or set CC to use the compiled kernels", KernelWarning, stacklevel=4)
        return None
    return name


def _build(source: Path, prefix: str, cc: str) -> Path:
    """The shared library for ``source``, the compiler and this machine, compiled unless cached (written under
    a temporary name, then renamed: concurrent processes never load a half-written file)."""
    text = source.read_bytes()
    text += _HEADER.read_bytes() if b'"cpu_math.h"' in text else b""
    key = hashlib.sha256(text + " ".join([cc, *FLAGS, platform.node(), _cpu()]).encode())
    target = _cache_dir() / f"{prefix}_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(source), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class CpuLibrary:
    """One op's compiled kernels.

    Args:
        source: the C file.
        prefix: the cached library's file name starts with it (``{prefix}_{hash}.so``).
        what: the op in words, for the warning when its build fails ("BiGLA").
        declare: sets the ``argtypes`` / ``restype`` of the library's functions.
    """

    def __init__(self, source: Path, prefix: str, what: str, declare: Callable[[ctypes.CDLL], None]):
        self.source, self.prefix, self.what, self.declare = source, prefix, what, declare

    @functools.cached_property
    def lib(self) -> Optional[ctypes.CDLL]:
        """The loaded library, built on first use; None when it cannot be (warned once)."""
        cc = compiler()
        if cc is None:
            return None
        try:
            lib = ctypes.CDLL(str(_build(self.source, self.prefix, cc)))
        except (OSError, subprocess.SubprocessError) as e:
            lines = (getattr(e, "stderr", None) or str(e)).strip().splitlines() or ["?"]
            detail = next((line for line in lines if "error" in line), lines[0])
            warnings.warn(f"building {self.what}'s CPU kernel failed ({detail.strip()}); {self.what} on "
                          "the CPU runs its slower PyTorch path", KernelWarning, stacklevel=3)
            return None
        self.declare(lib)
        return lib

    def available(self) -> bool:
        """Whether the kernels can run (compiles them on the first call)."""
        return self.lib is not None


def ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    """``t``'s data pointer (None for None: a NULL pointer)."""
    return None if t is None else t.data_ptr()


def threads() -> int:
    """The thread count the kernels run with: PyTorch's."""
    return torch.get_num_threads()
