"""SwiGLU's gating on the CPU (``cpu_kernels.c``): one compiled pass each way, float32 tensors only (others
keep the reference). Built and loaded by :mod:`vigla.ops.cpu_build`; custom ops, so that the tracers see
an opaque op (its fake gives the shapes), never the kernels' raw pointers."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..cpu_build import LONG, PTR, CpuLibrary, threads
from ..dispatch import cpu_op
from ..launcher import rows

__all__ = ["supports", "swiglu_fwd_cpu", "swiglu_bwd_cpu"]


def _declare(lib: ctypes.CDLL) -> None:
    lib.swiglu_fwd_f32.argtypes = [PTR, PTR, LONG, LONG, LONG, ctypes.c_int]
    lib.swiglu_bwd_f32.argtypes = [PTR, PTR, PTR, LONG, LONG, LONG, ctypes.c_int]
    lib.swiglu_fwd_f32.restype = lib.swiglu_bwd_f32.restype = None


_LIB = CpuLibrary(Path(__file__).with_name("cpu_kernels.c"), "swiglu_cpu", "SwiGLU", _declare)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these (CPU, float32) tensors, and built."""
    return all(t.dtype == torch.float32 for t in tensors) and _LIB.available()


@cpu_op("vigla::swiglu_cpu_fwd")
def swiglu_fwd_cpu(u: torch.Tensor) -> torch.Tensor:
    """``u``: ``[..., 2I]`` float32 -> ``[..., I]`` = ``SiLU(a) * b``, contiguous."""
    u2, I = rows(u), u.shape[-1] // 2
    y = torch.empty(*u.shape[:-1], I, dtype=u.dtype)
    _LIB.lib.swiglu_fwd_f32(u2.data_ptr(), y.data_ptr(), u2.shape[0], I, u2.stride(0), threads())
    return y


@cpu_op("vigla::swiglu_cpu_bwd")
def swiglu_bwd_cpu(dy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``du`` (``[..., 2I]``, contiguous) of ``<dy, SiLU(a) * b>``; ``dy``: ``[..., I]``."""
    u2, I = rows(u), u.shape[-1] // 2
    dy = dy.contiguous()
    du = torch.empty(u.shape, dtype=u.dtype)
    _LIB.lib.swiglu_bwd_f32(dy.data_ptr(), u2.data_ptr(), du.data_ptr(), u2.shape[0], I, u2.stride(0), threads())
    return du


@swiglu_fwd_cpu.register_fake
def _fwd_fake(u):
    return u.new_empty(*u.shape[:-1], u.shape[-1] // 2)


@swiglu_bwd_cpu.register_fake
def _bwd_fake(dy, u):
    return u.new_empty(u.shape)
