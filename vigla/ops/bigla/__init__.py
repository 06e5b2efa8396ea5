"""BiGLA: bidirectional gated linear attention (spec §2.1), with interchangeable backends.

``bigla(q, k, v, log_gf, log_gb)`` is the public entry point; ``bigla_gated`` is the same with
the log decays ``logsigmoid(z) / normalizer`` formed from gate logits inside the op. Backends:

* ``naive``: the token-by-token recurrence; any dtype (float64 too). Ground truth.
* ``chunked``: chunk-parallel PyTorch; any device, autograd. The CPU default.
* ``triton``: the fused bidirectional kernel (CUDA, needs Triton), forward and backward.
* ``fla``: fla-core's ``chunk_gla`` run the way the official ViG code trains (on ``[x; flip(x)]``),
  only when ``fla-core`` is installed; for benchmarks and cross-checks.

``backend="auto"`` picks the fastest one available for the inputs' device.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..dispatch import use_kernels
from ..recompute import record_output, replayed_output
from ..tracing import exporting
from . import op
from .chunked import bigla_chunked, bigla_chunked_bwd
from .export_path import bigla_gated_static, bigla_static
from .naive import bigla_naive
from .fla import HAS_FLA, bigla_fla
from .op import bigla_macs, log_decays

__all__ = ["bigla", "bigla_gated", "log_decays", "bigla_naive", "bigla_chunked", "bigla_chunked_bwd", "bigla_macs",
           "available_backends"]


def _bigla_op(q, k, v, gf, gb, scale, gate_normalizer=None):
    if torch.compiler.is_compiling():
        return torch.ops.vigla.bigla_fwd(q, k, v, gf, gb, scale, gate_normalizer)
    kept = replayed_output()  # inside vigla.ops.recompute's backward: the stored output
    if kept is not None:
        return op.KeptOutputFunction.apply(kept, q, k, v, gf, gb, scale, gate_normalizer)
    if op.HAS_TRITON and q.is_cuda:
        # eager mode on CUDA: the same kernels without the custom op's dispatch cost
        o = op.BiGLAFunction.apply(q, k, v, gf, gb, scale, gate_normalizer)
    else:
        o = torch.ops.vigla.bigla_fwd(q, k, v, gf, gb, scale, gate_normalizer)
    record_output(o)
    return o


def _bigla_triton(q, k, v, gf, gb, scale, gate_normalizer=None):
    if not (op.HAS_TRITON and q.is_cuda):
        raise RuntimeError(f"bigla: backend 'triton' needs CUDA tensors and Triton (got device {q.device}, "
                           f"Triton {'found' if op.HAS_TRITON else 'not installed'})")
    return _bigla_op(q, k, v, gf, gb, scale, gate_normalizer)


def _log_decays_first(fn: Callable) -> Callable:
    """A backend that takes log decays, given gate logits: ``logsigmoid`` in autograd first."""
    def run(q, k, v, gf, gb, scale, gate_normalizer=None):
        if gate_normalizer is not None:
            gf, gb = log_decays(gf, gate_normalizer), log_decays(gb, gate_normalizer)
        return fn(q, k, v, gf, gb, scale)
    return run


_BACKENDS: dict[str, Callable] = {
    "naive": _log_decays_first(bigla_naive), "chunked": _log_decays_first(bigla_chunked),
    "op": _bigla_op, "triton": _bigla_triton, "fla": _log_decays_first(bigla_fla),
}


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (any device when None).

    ``op`` is the custom op (Triton kernels on CUDA, the chunked reference elsewhere); ``triton``
    is the same op, but refuses to run anything else.
    """
    dev = torch.device(device).type if device is not None else None
    names = ["naive", "chunked", "op"]
    if op.HAS_TRITON and dev in (None, "cuda"):
        names.append("triton")
    if HAS_FLA and dev in (None, "cuda"):
        names.append("fla")
    return names


def _check(op, q, k, v, gf, gb, gates=("log_gf", "log_gb")):
    """Clear errors for bad inputs of ``op`` (the gates named as the caller calls them)."""
    tensors = dict(zip(("q", "k", "v", *gates), (q, k, v, gf, gb)))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, T, H, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    for name in ("k", *gates):
        if tensors[name].shape != q.shape:
            raise ValueError(
                f"{op}: {name} must have q's shape {tuple(q.shape)} [B, T, H, K], "
                f"got {tuple(tensors[name].shape)}"
            )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{op}: v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])}, got {tuple(v.shape)}"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _auto_backend(q: torch.Tensor, v: torch.Tensor) -> str:
    # The custom op runs the Triton kernels on CUDA when they are registered, and the chunked
    # reference (with a hand-written backward) everywhere else; inside
    # ``vigla.ops.dispatch.reference_ops()``, and for head sizes the kernels do not take, the
    # chunked reference itself.
    if not use_kernels(q):
        return "op" if not q.is_cuda else "chunked"
    return "op" if op.supports(q.shape[-1], v.shape[-1]) else "chunked"


def _run(q, k, v, gf, gb, scale, backend, gate_normalizer):
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "auto":
        backend = _auto_backend(q, v)
    try:
        fn = _BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"bigla: unknown backend {backend!r}; available here: {available_backends(q.device)}"
        ) from None
    return fn(q, k, v, gf, gb, float(scale), gate_normalizer)


def bigla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gf: torch.Tensor,
    log_gb: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Bidirectional gated linear attention.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (no feature map is applied).
        v: ``[B, T, H, V]`` values.
        log_gf, log_gb: ``[B, T, H, K]`` per-key-channel log decays (finite, <= 0) of the
            forward and the backward scan.
        scale: readout scale, default ``K ** -0.5``.
        backend: ``"auto"``, or one of :func:`available_backends`.

    Returns:
        ``[B, T, H, V]`` in ``q.dtype``: ``o_t = scale/2 * (q_t^T S^f_t + q_t^T S^b_t)`` with
        ``S^f_t = diag(exp(log_gf_t)) S^f_{t-1} + k_t v_t^T`` and
        ``S^b_t = diag(exp(log_gb_t)) S^b_{t+1} + k_t v_t^T``; both scans include token t itself.
    """
    # torch.export / ONNX / TorchScript / torch.jit.trace: plain aten ops with static control flow
    # instead of the custom op, whatever the backend (vigla.ops.tracing, bigla.export_path)
    if torch.jit.is_scripting() or exporting():
        return bigla_static(q, k, v, log_gf, log_gb, q.shape[-1] ** -0.5 if scale is None else scale)
    _check("bigla", q, k, v, log_gf, log_gb)
    return _run(q, k, v, log_gf, log_gb, scale, backend, None)


def bigla_gated(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    zf: torch.Tensor,
    zb: torch.Tensor,
    gate_normalizer: float,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`bigla` with log decays ``logsigmoid(z) / gate_normalizer`` of gate logits (ViG's gates).

    The Triton kernels form the log decays in fp32 inside the kernel from ``zf``, ``zb`` in their
    own dtype (e.g. the bf16 output of a projection under autocast) and return the logits'
    gradients: no fp32 ``[B, T, H, K]`` gate tensor is written, read back or kept for the
    backward. The other backends compute :func:`log_decays` first (same function).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        zf, zb: ``[B, T, H, K]`` gate logits of the forward and the backward scan.
        gate_normalizer: ``> 0``; divides ``logsigmoid(z)``.
        scale, backend: as in :func:`bigla`.

    Returns:
        ``[B, T, H, V]`` in ``q.dtype``.
    """
    # torch.export / ONNX / TorchScript / torch.jit.trace: plain aten ops with static control flow
    # instead of the custom op, whatever the backend (vigla.ops.tracing, bigla.export_path)
    if torch.jit.is_scripting() or exporting():
        return bigla_gated_static(q, k, v, zf, zb, gate_normalizer,
                                  q.shape[-1] ** -0.5 if scale is None else scale)
    _check("bigla_gated", q, k, v, zf, zb, gates=("zf", "zb"))
    if not (isinstance(gate_normalizer, (int, float)) and gate_normalizer > 0):
        raise ValueError(f"bigla_gated: gate_normalizer must be a number > 0, got {repr(gate_normalizer)}")
    return _run(q, k, v, zf, zb, scale, backend, float(gate_normalizer))
