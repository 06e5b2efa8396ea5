"""BiGLA: bidirectional gated linear attention (ViG, Liao et al., AAAI 2025; arXiv 2405.18425).

``bigla(q, k, v, log_gf, log_gb)`` takes per-key-channel log decays; ``bigla_gated`` takes ViG's
gate logits and forms the log decays ``logsigmoid(z) / normalizer`` inside the op. Both run the
fused Triton kernels on CUDA tensors and the chunked PyTorch reference elsewhere (or inside
:func:`vigla.ops.dispatch.reference_ops`). Plain functions for tests and benchmarks:
``bigla_naive`` (the token-by-token recurrence, float64-capable: the ground truth),
``bigla_chunked`` and, when fla-core is installed, ``bigla_fla`` (the official training path).
"""
from __future__ import annotations

import functools
import numbers

import torch

from ..dispatch import run_eager, via_dispatcher
from ..tracing import exporting
from .chunked import bigla_chunked, bigla_chunked_bwd
from .export_path import bigla_gated_static, bigla_static
from .fla import HAS_FLA, bigla_fla
from .naive import bigla_naive
from .op import BiGLAFunction, bigla_macs, bigla_forward, log_decays

__all__ = ["bigla", "bigla_gated", "log_decays", "bigla_naive", "bigla_chunked", "bigla_chunked_bwd",
           "bigla_macs", "bigla_fla", "HAS_FLA"]

_FP32_TINY, _FP32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


@functools.lru_cache(maxsize=256)
def _check_shapes(op: str, gates: tuple[str, str], shapes: tuple, dtypes: tuple, devices: tuple) -> None:
    """Clear errors for inputs that do not fit (cached: runs once per combination of shapes)."""
    names = ("q", "k", "v", *gates)
    for name, shape, dtype, device in zip(names, shapes, dtypes, devices):
        if len(shape) != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, T, H, D], got shape {tuple(shape)}")
        if not dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {dtype}")
        if device != devices[0]:
            raise ValueError(f"{op}: {name} is on {device} but q is on {devices[0]}")
    for name, shape in zip(names, shapes):
        if name in ("k", *gates) and shape != shapes[0]:
            raise ValueError(f"{op}: {name} must have q's shape {tuple(shapes[0])} [B, T, H, K], "
                             f"got {tuple(shape)}")
    if shapes[2][:3] != shapes[0][:3]:
        raise ValueError(f"{op}: v must be [B, T, H, V] with B, T, H = {tuple(shapes[0][:3])}, "
                         f"got {tuple(shapes[2])}")
    if shapes[0][-1] < 1 or shapes[2][-1] < 1:
        raise ValueError(f"{op}: heads need d_k >= 1 and d_v >= 1, got q {tuple(shapes[0])}, v {tuple(shapes[2])}")
    if not dtypes[0] == dtypes[1] == dtypes[2]:
        raise TypeError(f"{op}: q, k, v must share a dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}")


def _check(op: str, tensors: tuple, gates: tuple[str, str]) -> None:
    if not all([isinstance(t, torch.Tensor) for t in tensors]):
        for name, t in zip(("q", "k", "v", *gates), tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check = _check_shapes.__wrapped__ if torch.compiler.is_compiling() else _check_shapes  # Dynamo skips caches
    check(op, gates, tuple([t.shape for t in tensors]), tuple([t.dtype for t in tensors]),
          tuple([t.device for t in tensors]))


def _run(q, k, v, gf, gb, scale, gate_normalizer):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if via_dispatcher():
        return torch.ops.vigla.bigla_fwd(q, k, v, gf, gb, scale, gate_normalizer)
    return run_eager(BiGLAFunction, bigla_forward, q, k, v, gf, gb, scale, gate_normalizer)


def bigla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gf: torch.Tensor,
    log_gb: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Bidirectional gated linear attention.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (no feature map is applied).
        v: ``[B, T, H, V]`` values.
        log_gf, log_gb: ``[B, T, H, K]`` per-key-channel log decays (finite, <= 0) of the
            forward and the backward scan. Positive values are refused on the CPU, and on CUDA
            when ``torch.autograd.set_detect_anomaly`` is on (the check would cost a
            synchronisation otherwise).
        scale: readout scale, default ``K ** -0.5``.

    Returns:
        ``[B, T, H, V]`` in ``q.dtype``: ``o_t = scale/2 * (q_t^T S^f_t + q_t^T S^b_t)`` with
        ``S^f_t = diag(exp(log_gf_t)) S^f_{t-1} + k_t v_t^T`` and
        ``S^b_t = diag(exp(log_gb_t)) S^b_{t+1} + k_t v_t^T``; both scans include token t itself.
    """
    # torch.export / ONNX / TorchScript / torch.jit.trace: plain aten ops with static control flow
    # instead of the custom op (vigla.ops.tracing, bigla.export_path)
    if torch.jit.is_scripting() or exporting():
        return bigla_static(q, k, v, log_gf, log_gb, q.shape[-1] ** -0.5 if scale is None else scale)
    _check("bigla", (q, k, v, log_gf, log_gb), ("log_gf", "log_gb"))
    if not torch.compiler.is_compiling() and (not q.is_cuda or torch.is_anomaly_enabled()):
        for name, g in (("log_gf", log_gf), ("log_gb", log_gb)):
            if bool((g > 0).any() | ~torch.isfinite(g).all()):
                raise ValueError(f"bigla: {name} must hold finite log decays <= 0 (decays in (0, 1]); "
                                 f"got values outside that range (pass gate logits to bigla_gated instead)")
    return _run(q, k, v, log_gf, log_gb, scale, None)


def bigla_gated(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    zf: torch.Tensor,
    zb: torch.Tensor,
    gate_normalizer: float,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`bigla` with log decays ``logsigmoid(z) / gate_normalizer`` of gate logits (ViG's gates).

    The Triton kernels form the log decays in fp32 inside the kernel from ``zf``, ``zb`` in their
    own dtype (e.g. the bf16 output of a projection under autocast) and return the logits'
    gradients: no fp32 ``[B, T, H, K]`` gate tensor is written, read back or kept for the
    backward. The reference computes :func:`log_decays` first (same function).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        zf, zb: ``[B, T, H, K]`` gate logits of the forward and the backward scan.
        gate_normalizer: ``> 0`` (within float32's normal range); divides ``logsigmoid(z)``.
        scale: as in :func:`bigla`.

    Returns:
        ``[B, T, H, V]`` in ``q.dtype``.
    """
    if torch.jit.is_scripting() or exporting():  # as in bigla
        return bigla_gated_static(q, k, v, zf, zb, gate_normalizer,
                                  q.shape[-1] ** -0.5 if scale is None else scale)
    _check("bigla_gated", (q, k, v, zf, zb), ("zf", "zb"))
    _check_normalizer(gate_normalizer)
    return _run(q, k, v, zf, zb, scale, float(gate_normalizer))


@torch.jit.unused
def _check_normalizer(gate_normalizer) -> None:  # unannotated: TorchScript reads the signature of this stub
    """A real number within float32's normal range: the kernels take its reciprocal in float32 (1e-50 would be
    held as 0, 1 / 1e-40 as inf)."""
    if not (isinstance(gate_normalizer, numbers.Real) and not isinstance(gate_normalizer, bool)
            and _FP32_TINY <= gate_normalizer <= _FP32_MAX):
        raise ValueError(f"bigla_gated: gate_normalizer must be a number in [{_FP32_TINY:.3g}, {_FP32_MAX:.3g}] "
                         f"(float32's normal range: the kernels divide by it in float32), got {repr(gate_normalizer)}")
