"""The depthwise 3x3 conv (+ SiLU) on the CPU (``cpu_kernels.c``): one compiled pass forward, one backward
(two phases: the activation's gradient, then the transposed conv), float32 tensors only (others keep
PyTorch's convolution). Built and loaded by :mod:`vigla.ops.cpu_build`; custom ops, so that the tracers see an
opaque op (its fake gives the shapes), never the kernels' raw pointers."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..cpu_build import LONG, PTR, CpuLibrary, threads
from ..dispatch import cpu_op
from ..launcher import unit_stride

__all__ = ["supports", "dwconv_fwd_cpu", "dwconv_bwd_cpu"]


def _declare(lib: ctypes.CDLL) -> None:
    lib.dwconv_fwd_f32.argtypes = [PTR] * 4 + [LONG] * 6 + [ctypes.c_int, ctypes.c_int]
    lib.dwconv_bwd_f32.argtypes = [PTR] * 8 + [LONG] * 6 + [ctypes.c_int, ctypes.c_int]
    lib.dwconv_fwd_f32.restype = lib.dwconv_bwd_f32.restype = None


_LIB = CpuLibrary(Path(__file__).with_name("cpu_kernels.c"), "dwconv_cpu", "the depthwise conv", _declare)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these (CPU) tensors: all float32; and built."""
    return all(t.dtype == torch.float32 for t in tensors) and _LIB.available()


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """``[C, 1, 3, 3]`` -> ``[9, C]`` contiguous (tap ``3 i + j``)."""
    return weight.reshape(weight.shape[0], 9).t().contiguous()


@cpu_op("vigla::dwconv_cpu_fwd")
def dwconv_fwd_cpu(x: torch.Tensor, weight: torch.Tensor, H: int, W: int, act: bool) -> torch.Tensor:
    """``x``: ``[B, H*W, C]`` float32 tokens; ``weight``: ``[C, 1, 3, 3]``. Returns ``act(DWConv3x3(x))``
    ``[B, H*W, C]``, contiguous."""
    x = unit_stride(x)
    B, _, C = x.shape
    y, taps, zero = torch.empty(x.shape), _taps(weight), torch.zeros(C)  # named: alive during the call
    _LIB.lib.dwconv_fwd_f32(x.data_ptr(), taps.data_ptr(), zero.data_ptr(), y.data_ptr(), B, H, W, C, x.stride(0),
                            x.stride(1), act, threads())
    return y


@cpu_op("vigla::dwconv_cpu_bwd")
def dwconv_bwd_cpu(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, H: int, W: int, act: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` of ``<dy, dwconv_fwd_cpu(x, weight, H, W, act)>`` (``dy``: ``[B, H*W, C]``), contiguous,
    in the shapes of ``x`` and ``weight``."""
    x, dy = unit_stride(x), dy.contiguous()
    B, _, C = x.shape
    dx, dw9 = torch.empty(x.shape), torch.empty(9, C)
    g = torch.empty(x.shape if act else (0,))
    part, taps, zero = torch.empty(B * H, 9, C), _taps(weight), torch.zeros(C)
    _LIB.lib.dwconv_bwd_f32(dy.data_ptr(), x.data_ptr(), taps.data_ptr(), zero.data_ptr(), dx.data_ptr(),
                            dw9.data_ptr(), g.data_ptr(), part.data_ptr(), B, H, W, C, x.stride(0), x.stride(1), act,
                            threads())
    return dx, dw9.t().reshape(weight.shape).contiguous()


@dwconv_fwd_cpu.register_fake
def _fwd_fake(x, weight, H, W, act):
    return x.new_empty(x.shape)


@dwconv_bwd_cpu.register_fake
def _bwd_fake(dy, x, weight, H, W, act):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)
