"""Norm layers."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import RmsNorm as _TimmRmsNorm
from timm.layers.fast_norm import rms_norm

from ..ops.add_norm import add_norm
from ..ops.inference import EAGER, InferenceOps
from ..ops.tracing import exporting
from .cast import MlpProjection, Projection, dense, plain_call

__all__ = ["RmsNorm", "NormParams", "add_and_norm", "add_and_norm_inference", "fused_norm", "layer_norm_dtype"]

torch.fx.wrap("add_norm")  # a leaf under torch.fx: its checks and kernels run as they are


class RmsNorm(_TimmRmsNorm):
    """timm's ``RmsNorm`` (same parameters and state dict) computed by PyTorch's fused
    ``rms_norm``, with the weight cast to the input's dtype: under autocast a bf16 input then
    takes the fused kernel (fp32 statistics, bf16 output) instead of a chain of elementwise ops
    with an fp32 result. ``[..., C]`` -> ``[..., C]``.

    Exported or traced (:func:`vigla.ops.tracing.exporting`), the formula is written out
    (timm's ``rms_norm``): ONNX has no ``RMSNormalization`` below opset 23, and the legacy exporter
    no translation of ``aten::rms_norm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        if not torch.jit.is_scripting() and exporting():
            return rms_norm(x, self.normalized_shape, weight, self.eps)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def add_and_norm(norm: nn.Module, x: torch.Tensor, delta: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, norm(x + delta))`` for an :class:`RmsNorm` or ``nn.LayerNorm`` over the last dim
    of ``[..., C]``, in one pass (:func:`vigla.ops.add_norm.add_norm`; ``delta`` None: just the
    norm). The normalized output is in ``out_dtype``, default the compute dtype (autocast's when it
    is on)."""
    fused = fused_norm(norm)
    if fused is None:
        return _unfused(norm, x, delta)
    return add_norm(x, delta, fused.weight, fused.bias, norm.eps, "rms" if fused.rms else "layer", out_dtype)


def _unfused(norm: nn.Module, x: torch.Tensor, delta: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The add and the norm one after the other (a norm :func:`add_and_norm` does not fuse)."""
    s = x if delta is None else x + delta
    return s, norm(s)


class NormParams(NamedTuple):
    """A norm :func:`add_and_norm` fuses, as its op takes it: ``weight`` ``[C]``, ``bias`` ``[C]`` or None, ``eps``,
    and ``rms`` (RMSNorm, else LayerNorm)."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    eps: float
    rms: bool


def fused_norm(norm: nn.Module) -> Optional[NormParams]:
    """The :class:`NormParams` of a norm :func:`add_and_norm` fuses (an affine ``nn.LayerNorm`` or an
    :class:`RmsNorm` with a weight), else None."""
    if not plain_call(norm):  # hooked (or compiled on its own): called
        return None
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        return NormParams(norm.weight, norm.bias, float(norm.eps), False)
    if isinstance(norm, RmsNorm) and norm.weight is not None:
        return NormParams(norm.weight, None, float(norm.eps), True)
    return None


@torch.jit.unused
def add_and_norm_inference(norm: Union[nn.Module, NormParams], x: torch.Tensor, delta: Optional[torch.Tensor],
                           out_dtype: torch.dtype, ops: InferenceOps = EAGER) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_and_norm` on an inference path (:func:`vigla.ops.inference.inference_ops` gave ``ops``): the
    op's forward implementation called directly in eager mode, its custom op when compiled (the shapes are the
    block's own), ``[..., C]`` tensors. ``norm``: the norm module, or its :class:`NormParams` found before.
    ``delta`` may be a :class:`vigla.layers.cast.Projection`, the previous layer's output projection not yet
    computed, or a :class:`vigla.layers.cast.MlpProjection`, the previous MLP not yet computed: on CUDA in half
    precision they run in the same kernel as the add and the norm. The norm's output ``y`` is in ``out_dtype``."""
    fused = norm if isinstance(norm, NormParams) else fused_norm(norm)
    if fused is not None and isinstance(delta, MlpProjection):
        return ops.mlp_add_norm(delta.rows, delta.w1, delta.w2, x, fused.weight, fused.bias, fused.eps, fused.rms,
                                out_dtype, delta.row_scale)
    if fused is not None and isinstance(delta, Projection) and not delta.w.is_mkldnn:
        # delta.w: gemm_weights' [in, out] view of [out, in]
        return ops.linear_add_norm(delta.rows, delta.w.t(), x, fused.weight, fused.bias, fused.eps, fused.rms,
                                   out_dtype)
    delta = dense(delta)
    if fused is None:
        return _unfused(norm, x, delta)
    s, y = ops.add_norm(x, delta, fused.weight, fused.bias, fused.eps, fused.rms, out_dtype)
    return (x if delta is None else s), y


def layer_norm_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.LayerNorm`` returns for ``t``: at least float32 under autocast (which runs it in float32),
    ``t``'s own otherwise (e.g. a model cast to bf16 with ``model.bfloat16()``)."""
    if not isinstance(t, torch.Tensor) or torch.is_autocast_enabled(t.device.type):  # torch.fx's proxies: as before
        return torch.promote_types(t.dtype, torch.float32)
    return t.dtype
