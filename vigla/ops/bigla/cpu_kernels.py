"""BiGLA's CPU kernels (``cpu_kernels.c``): both scans as float32 recurrences, threads over (batch, head).

The C source is compiled once per machine and loaded with :mod:`ctypes` (:mod:`vigla.ops.cpu_build`).
Without a compiler, or when the build fails, :func:`available` is False (one warning says why) and BiGLA
on the CPU runs the chunked PyTorch path (``chunked.py``) instead.

float32 work for every input dtype but float64 (which keeps the chunked path, the float64 reference):
bf16 / fp16 inputs are read as float32 and the results cast back, as the chunked path computes too.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from ..cpu_build import LONG as _LONG, PTR as _PTR, CpuLibrary
from ..dispatch import cpu_op
from ..launcher import unit_stride

__all__ = ["available", "describe", "supports", "bigla_fwd_cpu", "bigla_bwd_cpu", "bigla_mix_fwd_cpu"]

MAX_V = 4096  # a token's V sums live on the threads' stacks


def _declare(lib: ctypes.CDLL) -> None:
    scalars = [_LONG] * 5 + [ctypes.POINTER(_LONG), ctypes.c_float, ctypes.c_float, ctypes.c_int]
    lib.bigla_fwd_f32.argtypes = [_PTR] * 6 + scalars + [_PTR] * 4 + [ctypes.c_float, ctypes.c_int]
    lib.bigla_bwd_f32.argtypes = [_PTR] * 11 + scalars
    lib.bigla_fwd_f32.restype = lib.bigla_bwd_f32.restype = ctypes.c_int


_LIB = CpuLibrary(Path(__file__).with_name("cpu_kernels.c"), "bigla_cpu", "BiGLA", _declare)


def _library() -> Optional[ctypes.CDLL]:
    return _LIB.lib


def available() -> bool:
    """Whether the compiled CPU kernel can run (compiles it on the first call)."""
    return _LIB.available()


def describe() -> str:
    """One line for ``vigla info``: which path BiGLA takes on the CPU (builds the kernel if needed)."""
    if not available():
        return "the chunked PyTorch path (the compiled kernel is unavailable: see the warning above)"
    return f"the compiled kernel ({_library()._name}; threads: torch.get_num_threads() = {torch.get_num_threads()})"


def supports(V: int) -> bool:
    """Whether the kernel takes ``V`` values per head (and built: :func:`available`)."""
    return V <= MAX_V and available()


def _operand(x: torch.Tensor) -> torch.Tensor:
    """float32 with unit stride in the last dimension (a view when it already is)."""
    return unit_stride(x.float() if x.dtype != torch.float32 else x)


NO_MIX = (None, None, None, None, 0.0, False)  # the forward without the locality mix


def _call(fn, inputs: list[torch.Tensor], outputs: list[torch.Tensor], half_scale: float,
          gate_normalizer: Optional[float], mix: Optional[tuple] = None) -> None:
    """``fn`` on ``inputs`` (q, k, v, gf, gb[, do]: their shapes and (b, t, h) strides) into ``outputs``. The
    forward's ``mix``: its locality mix ``(x, z, w_o, w_l, eps, act)`` (``x``, ``z`` float32 ``[B, T, H * V]``
    with unit last stride; ``w_o``, ``w_l`` contiguous float32 ``[V]``), or :data:`NO_MIX`; None for the
    backward."""
    B, T, H, K = inputs[0].shape
    V = inputs[2].shape[-1]
    strides = [s for x in inputs for s in x.stride()[:3]] + [0] * (18 - 3 * len(inputs))
    extra = []
    if mix is not None:
        x, z, w_o, w_l, eps, act = mix
        strides += [s for t in (x, z) for s in (t.stride()[:2] if t is not None else (0, 0)) + (V,)]
        extra = [None if t is None else t.data_ptr() for t in (x, z, w_o, w_l)] + [eps, int(act)]
    status = fn(*[x.data_ptr() for x in inputs], *[y.data_ptr() for y in outputs], B, T, H, K, V,
                (_LONG * 24)(*strides, *([0] * (24 - len(strides)))), half_scale, gate_normalizer or 0.0,
                torch.get_num_threads(), *extra)
    if status:
        raise MemoryError("bigla: the CPU kernel could not allocate its per-thread state")


@cpu_op("vigla::bigla_cpu_fwd")
def bigla_fwd_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gf: torch.Tensor, gb: torch.Tensor,
                  scale: float, gate_normalizer: Optional[float] = None) -> torch.Tensor:
    """BiGLA's output ``[B, T, H, V]`` in ``q.dtype`` (a custom op: opaque to the tracers, which see the
    chunked path's aten ops or this op, never the kernel's raw pointers).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        gf, gb: ``[B, T, H, K]`` log decays (finite, <= 0) of the forward and the backward scan, or gate logits
            when ``gate_normalizer`` is given (log decays ``logsigmoid(z) / gate_normalizer``, formed in the
            kernel in float32, the decays from them in float64).
        scale: readout scale.
    """
    o = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.float32)
    _call(_library().bigla_fwd_f32, [_operand(x) for x in (q, k, v, gf, gb)], [o], scale * 0.5, gate_normalizer,
          NO_MIX)
    return o.to(q.dtype)


@cpu_op("vigla::bigla_cpu_bwd")
def bigla_bwd_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gf: torch.Tensor, gb: torch.Tensor,
                  do: torch.Tensor, scale: float, gate_normalizer: Optional[float] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dgf, dgb)`` of ``<do, bigla_fwd_cpu(...)>`` in the inputs' dtypes (the gates'
    as given: the logits' with ``gate_normalizer``); ``do`` is ``[B, T, H, V]``."""
    inputs = [_operand(x) for x in (q, k, v, gf, gb, do)]
    grads = [torch.empty(x.shape, dtype=torch.float32) for x in inputs[:5]]
    _call(_library().bigla_bwd_f32, inputs, grads, scale * 0.5, gate_normalizer)
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v, gf, gb)))


@cpu_op("vigla::bigla_mix_cpu_fwd")
def bigla_mix_fwd_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gf: torch.Tensor, gb: torch.Tensor,
                      x: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor, w_l: torch.Tensor, scale: float,
                      gate_normalizer: Optional[float], eps: float, act: bool) -> torch.Tensor:
    """ViG's locality mix of BiGLA's output in one pass (the inference path's op on the CPU): ``[B, T, H * V]``
    float32: :func:`bigla_fwd_cpu` then :func:`vigla.ops.locality_mix.cpu_kernels.locality_mix_fwd_cpu` on float32
    inputs (the same formula, one row at a time; the output never stored between them). ``q`` .. ``gb`` as
    :func:`bigla_fwd_cpu`; ``x``, ``z``: ``[B, T, H * V]`` float32; ``w_o``, ``w_l``: ``[V]`` float32."""
    B, T, H, _ = q.shape
    y = torch.empty(B, T, H, v.shape[-1], dtype=torch.float32)
    mix = (unit_stride(x.reshape(B, T, -1)), unit_stride(z.reshape(B, T, -1)), w_o.contiguous(), w_l.contiguous(),
           eps, act)
    _call(_library().bigla_fwd_f32, [_operand(t) for t in (q, k, v, gf, gb)], [y], scale * 0.5, gate_normalizer,
          mix)
    return y.view(B, T, -1)


@bigla_mix_fwd_cpu.register_fake
def _mix_fake(q, k, v, gf, gb, x, z, w_o, w_l, scale, gate_normalizer, eps, act):
    return q.new_empty(*q.shape[:2], q.shape[2] * v.shape[-1], dtype=torch.float32)


@bigla_fwd_cpu.register_fake
def _fwd_fake(q, k, v, gf, gb, scale, gate_normalizer=None):
    return q.new_empty(*q.shape[:3], v.shape[-1])


@bigla_bwd_cpu.register_fake
def _bwd_fake(q, k, v, gf, gb, do, scale, gate_normalizer=None):
    return tuple(x.new_empty(x.shape) for x in (q, k, v, gf, gb))
