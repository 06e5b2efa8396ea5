"""The locality mix on the CPU (``cpu_kernels.c``): one compiled pass forward, one backward, float32 tensors
only (others keep the reference). Built and loaded by :mod:`vigla.ops.cpu_build`; custom ops, so that the
tracers see an opaque op (its fake gives the shapes), never the kernels' raw pointers."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..cpu_build import LONG, PTR, CpuLibrary, threads
from ..dispatch import cpu_op
from ..launcher import rows

__all__ = ["supports", "locality_mix_fwd_cpu", "locality_mix_bwd_cpu"]

BLOCK = 32  # tokens per partial sum of the weight gradients (cpu_kernels.c)


def _declare(lib: ctypes.CDLL) -> None:
    scalars = [LONG] * 5 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.locality_mix_fwd_f32.argtypes = [PTR] * 6 + scalars
    lib.locality_mix_bwd_f32.argtypes = [PTR] * 12 + scalars
    lib.locality_mix_fwd_f32.restype = None
    lib.locality_mix_bwd_f32.restype = ctypes.c_int


_LIB = CpuLibrary(Path(__file__).with_name("cpu_kernels.c"), "locality_mix_cpu", "the locality mix", _declare)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these (CPU) tensors: all float32; and built."""
    return all(t.dtype == torch.float32 for t in tensors) and _LIB.available()


def _flat(o: torch.Tensor, x: torch.Tensor, z: torch.Tensor):
    """``(o2, x2, z2, h, d)``: ``o`` as contiguous ``[T, h*d]``, ``x``, ``z`` as ``[T, h*d]`` with unit stride
    within a token (views when they can be)."""
    h, d = o.shape[-2:]
    return o.reshape(-1, h * d).contiguous(), rows(x), rows(z), h, d


@cpu_op("vigla::locality_mix_cpu_fwd")
def locality_mix_fwd_cpu(o: torch.Tensor, x: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor, w_l: torch.Tensor,
                         eps: float, act: bool) -> torch.Tensor:
    """``o``: ``[..., h, d]``; ``x``, ``z``: ``[..., h*d]``; ``w_o``, ``w_l``: ``[d]`` (float32).
    Returns ``[..., h*d]``, contiguous (see :func:`vigla.ops.locality_mix.locality_mix`)."""
    o2, x2, z2, h, d = _flat(o, x, z)
    w_o, w_l = w_o.contiguous(), w_l.contiguous()
    y = torch.empty(x.shape, dtype=o.dtype)
    _LIB.lib.locality_mix_fwd_f32(o2.data_ptr(), x2.data_ptr(), z2.data_ptr(), w_o.data_ptr(), w_l.data_ptr(),
                                  y.data_ptr(), o2.shape[0], h, d, x2.stride(0),
                                  z2.stride(0), eps, act, threads())
    return y


@cpu_op("vigla::locality_mix_cpu_bwd")
def locality_mix_bwd_cpu(dy: torch.Tensor, o: torch.Tensor, x: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor,
                         w_l: torch.Tensor, eps: float, act: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(do, dx, dz, dw_o, dw_l)`` of ``<dy, locality_mix_fwd_cpu(...)>`` (``dy``: ``[..., h*d]``), contiguous,
    in the shapes of ``o``, ``x``, ``z``, ``w_o``, ``w_l``."""
    o2, x2, z2, h, d = _flat(o, x, z)
    T = o2.shape[0]
    dy, w_o, w_l = dy.contiguous(), w_o.contiguous(), w_l.contiguous()
    do, dx, dz = torch.empty(o.shape), torch.empty(x.shape), torch.empty(z.shape)
    dw_o, dw_l = torch.empty(d), torch.empty(d)
    part = torch.empty(-(-T // BLOCK), 2, d)
    status = _LIB.lib.locality_mix_bwd_f32(
        dy.data_ptr(), o2.data_ptr(), x2.data_ptr(), z2.data_ptr(), w_o.data_ptr(), w_l.data_ptr(), do.data_ptr(),
        dx.data_ptr(), dz.data_ptr(), dw_o.data_ptr(), dw_l.data_ptr(), part.data_ptr(), T, h, d, x2.stride(0),
        z2.stride(0), eps, act, threads())
    if status:
        raise MemoryError("locality_mix: the CPU kernel could not allocate its per-thread rows")
    return do, dx, dz, dw_o, dw_l


@locality_mix_fwd_cpu.register_fake
def _fwd_fake(o, x, z, w_o, w_l, eps, act):
    return x.new_empty(x.shape)


@locality_mix_bwd_cpu.register_fake
def _bwd_fake(dy, o, x, z, w_o, w_l, eps, act):
    return o.new_empty(o.shape), x.new_empty(x.shape), z.new_empty(z.shape), w_o.new_empty(w_o.shape), \
        w_l.new_empty(w_l.shape)
