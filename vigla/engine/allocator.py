"""The host allocator of ``vigla train`` and ``vigla eval``: freed memory kept in the process.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its mmap threshold
(128 KiB at first, raised as blocks are freed) with fresh ``mmap`` pages and hands freed memory at the top
of its heap back to the system, so a training step's activations (a few MiB each at batch 8) are page-faulted
in again step after step. :func:`keep_freed_memory` raises both thresholds (``mallopt``): blocks below 1 GiB
come from the heap and up to 2 GiB of freed memory stays for the next step, whose tensors reuse those pages.
The commands call it at start; it does
nothing where the C library is not glibc or where the user set ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` (glibc's own variables for the same settings). ``vigla bench`` leaves the allocator
as it is: its CPU memory figures are growths of the peak resident size, which memory kept from one model
would hide for the next.
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD, TRIM_THRESHOLD = 1 << 30, 1 << 31
ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to 1 GiB and its trim threshold to 2 GiB for this process -> whether it did
    (False off glibc, or when the user's environment sets either)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6 / no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
