"""``add_norm``: a block's residual add fused with the next pre-norm (RMSNorm or LayerNorm).

ViG's blocks are pre-norm (Liao et al., AAAI 2025; RMSNorm in ViG, LayerNorm in ViG-H):
``x + mixer(norm1(x))`` then ``x + mlp(norm2(x))``. Each residual add and the norm that follows
it read and write the same rows; this op does both in one pass on CUDA (``triton_kernels.py``) and for
float32 CPU tensors (``cpu_kernels.c``); elsewhere PyTorch's own ``rms_norm`` / ``layer_norm`` after the
add, with autograd (``reference.py`` is the written-out form behind the custom op); see
:mod:`vigla.ops.dispatch`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

import torch.nn.functional as F
from timm.layers.fast_norm import rms_norm

from ..checks import channels, floating
from ..dispatch import compute_dtype, run_eager, use_kernels, via_dispatcher
from ..tracing import exporting
from .op import AddNormFunction, add_norm_forward, cpu_forward
from .reference import add_norm_reference, add_norm_reference_bwd

__all__ = ["add_norm", "add_norm_reference", "add_norm_reference_bwd"]

KINDS = ("rms", "layer")


def add_norm(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
             bias: Optional[torch.Tensor] = None, eps: float = 1e-6, kind: str = "rms",
             out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + delta`` and ``y = norm(s)``.

    Args:
        x: ``[..., C]`` the residual stream.
        delta: ``[..., C]`` the branch output added to it (any float dtype), or None (just the norm).
        weight: ``[C]``. bias: ``[C]`` for ``kind="layer"`` (or None); None for ``"rms"``.
        eps: the norm's epsilon.
        kind: ``"rms"`` (timm's ``RmsNorm``: ``s / sqrt(mean(s^2) + eps) * weight``) or ``"layer"``
            (``nn.LayerNorm``).
        out_dtype: dtype of ``y``; None: the compute dtype (autocast's for ``x``'s device when it
            is on, else ``x.dtype``), what the next layer multiplies in.

    Returns:
        ``(s, y)``: ``s`` ``[..., C]`` in ``x.dtype`` (summed in float32, rounded once; ``x``
        itself when ``delta`` is None), ``y`` ``[..., C]`` in ``out_dtype``, the norm of ``s`` as
        stored, with float32 statistics. Gradients flow to ``x`` and ``delta`` (the same values,
        ``delta``'s in its dtype), ``weight`` and ``bias``.
    """
    if torch.jit.is_scripting() or exporting():  # the plain formula (vigla.ops.tracing)
        return _plain(x, delta, weight, bias, eps, kind == "layer", True)
    _check(x, delta, weight, bias, kind)
    out_dtype = out_dtype or compute_dtype(x)
    if not (use_kernels(x) or via_dispatcher() or cpu_forward(x, delta, weight, bias, out_dtype)):
        s, y = _plain(x, delta, weight, bias, eps, kind == "layer", False)
        return s, y.to(out_dtype)
    return _fused(x, delta, weight, bias, float(eps), kind == "rms", out_dtype)


def _check(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
           kind: str) -> None:
    floating("add_norm", x=x, delta=delta, weight=weight, bias=bias)
    C = x.shape[-1] if x.dim() else 0
    if kind not in KINDS:
        raise ValueError(f"add_norm: kind must be one of {KINDS}, got {repr(kind)}")
    if x.dim() < 1 or weight.shape != (C,):
        raise ValueError(f"add_norm: expected x [..., C] and weight [C], got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    channels("add_norm", "x", x)
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_norm: delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    if bias is not None and (kind == "rms" or bias.shape != (C,)):
        raise ValueError(f"add_norm: bias must be None for kind='rms' and [{C}] for kind='layer', got "
                         f"{tuple(bias.shape)} with kind={repr(kind)}")


def _fused(x, delta, weight, bias, eps: float, rms: bool, out_dtype: torch.dtype):
    """The custom op (traced, or under a dispatch mode) or the eager Function."""
    if via_dispatcher():
        s, y = torch.ops.vigla.add_norm(x, delta, weight, bias, eps, rms, out_dtype)
    else:
        s, y = run_eager(AddNormFunction, add_norm_forward, x, delta, weight, bias, eps, rms, out_dtype)
    return (s if delta is not None else x), y


def _plain(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
           eps: float, layer: bool, written_out: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The add, then PyTorch's norm, with autograd; ``written_out``: the RMS formula in elementary
    ops (ONNX has no RMSNorm below opset 23, the legacy exporter no ``aten::rms_norm``). Scriptable."""
    s = x if delta is None else (x + delta).to(x.dtype)  # in x's dtype, rounded once (delta's may differ)
    shape = [s.shape[-1]]
    if layer:
        y = F.layer_norm(s, shape, weight, bias, eps)
    elif written_out:
        y = rms_norm(s, shape, weight.to(s.dtype), eps)
    else:
        y = F.rms_norm(s, shape, weight.to(s.dtype), eps)
    return s, y
