"""The residual add and norm on the CPU (``cpu_kernels.c``): one compiled pass forward, one backward, float32
tensors only (others keep the reference). Built and loaded by :mod:`vigla.ops.cpu_build`; custom ops, so that
the tracers see an opaque op (its fake gives the shapes), never the kernels' raw pointers."""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from ..cpu_build import LONG, PTR, CpuLibrary, ptr, threads
from ..dispatch import cpu_op
from ..launcher import rows

__all__ = ["supports", "add_norm_fwd_cpu", "add_norm_bwd_cpu"]

BLOCK = 32  # rows per partial sum of the weight gradients (cpu_kernels.c)


def _declare(lib: ctypes.CDLL) -> None:
    lib.add_norm_fwd_f32.argtypes = [PTR] * 6 + [LONG] * 4 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.add_norm_bwd_f32.argtypes = [PTR] * 8 + [LONG] * 2 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.add_norm_fwd_f32.restype = lib.add_norm_bwd_f32.restype = None


_LIB = CpuLibrary(Path(__file__).with_name("cpu_kernels.c"), "add_norm_cpu", "add + norm", _declare)


def supports(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the kernels take these (CPU) tensors, None for an absent one: all float32; and built."""
    return all(t is None or t.dtype == torch.float32 for t in tensors) and _LIB.available()


@cpu_op("vigla::add_norm_cpu_fwd")
def add_norm_fwd_cpu(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                     bias: Optional[torch.Tensor], eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, y)`` for float32 ``x``, ``delta`` ``[..., C]`` (``delta`` may be None), ``weight``, ``bias`` ``[C]``
    (``bias`` may be None): ``s = x + delta`` (``[0]`` without ``delta``) and ``y = norm(s) * weight (+ bias)``,
    both contiguous ``[..., C]``."""
    x2 = rows(x)
    d2 = rows(delta) if delta is not None else None
    s = torch.empty(x.shape) if delta is not None else x.new_empty(0)
    y, weight = torch.empty(x.shape), weight.contiguous()  # named: alive during the call
    bias = bias.contiguous() if bias is not None else None
    _LIB.lib.add_norm_fwd_f32(x2.data_ptr(), ptr(d2), weight.data_ptr(), ptr(bias), ptr(s), y.data_ptr(),
                              x2.shape[0], x2.shape[1], x2.stride(0), d2.stride(0) if d2 is not None else 0, eps,
                              rms, threads())
    return s, y


@cpu_op("vigla::add_norm_cpu_bwd")
def add_norm_bwd_cpu(dy: torch.Tensor, ds: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor,
                     has_bias: bool, eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` of ``<dy, y> + <ds, s>`` from the residual ``s`` ``[..., C]`` (``dy``, ``ds``:
    ``[..., C]``, ``ds`` may be None); ``dbias`` ``[C]`` with ``has_bias``, else ``[0]``."""
    s2 = rows(s).contiguous()
    R, C = s2.shape
    dy, ds, weight = dy.contiguous(), ds.contiguous() if ds is not None else None, weight.contiguous()
    dx, dw = torch.empty(s.shape), torch.empty(C)
    db = torch.empty(C if has_bias else 0)
    part = torch.empty(-(-R // BLOCK), 2, C)
    _LIB.lib.add_norm_bwd_f32(dy.data_ptr(), ptr(ds), s2.data_ptr(), weight.data_ptr(), dx.data_ptr(),
                              dw.data_ptr(), db.data_ptr() if has_bias else None, part.data_ptr(), R, C, eps, rms,
                              threads())
    return dx, dw, db


@add_norm_fwd_cpu.register_fake
def _fwd_fake(x, delta, weight, bias, eps, rms):
    return x.new_empty(x.shape if delta is not None else (0,)), x.new_empty(x.shape)


@add_norm_bwd_cpu.register_fake
def _bwd_fake(dy, ds, s, weight, has_bias, eps, rms):
    return s.new_empty(s.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape if has_bias else (0,))
