"""The process's heap on the CPU: freed activations kept for reuse instead of handed back to the system.

glibc's ``malloc`` gives a block of 128 KB or more its own ``mmap`` and unmaps it when it is freed, and it
returns the free top of its heap to the system once that exceeds 128 KB (both thresholds rise with the blocks
it sees freed, up to 32 MB). A training step on the CPU allocates and frees hundreds of activations of
0.1-10 MB, so each step maps fresh memory that the kernel zeroes page by page on first touch: ViG-T at 224,
batch 8 on 2 cores, about 10,000 page faults and 80 ms of system time per 400 ms step. :func:`keep_freed_memory`
sets both thresholds high (``mallopt``): freed blocks stay in the heap and the next step reuses them (about
200 page faults a step, the same peak memory). Raising one alone does not do it: a fixed mmap threshold turns
off the rising trim threshold (the heap top is trimmed at 128 KB), a fixed trim threshold the rising mmap one.

The ``vigla`` commands call it as they start; a program of one's own can call it once, before its first step.
Anything but glibc (musl, macOS, Windows) is left alone; an allocator preloaded in its place (jemalloc,
tcmalloc), which keeps freed memory already, answers ``mallopt`` itself or not at all.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 256 << 20  # a block above it still gets a mapping of its own (returned to the system when freed)
TRIM_THRESHOLD = 1 << 30  # free memory above the heap's top kept up to this


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (module docstring) -> whether they were set
    (False off Linux, without a ``mallopt``, or where the allocator refuses the values)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbol: glibc's, or a preloaded allocator's
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
