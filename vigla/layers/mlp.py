"""MLPs."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from ..ops.add_norm.op import mlp_fused
from ..ops.dispatch import compute_dtype
from ..ops.inference import EAGER, InferenceOps, inference_ops
from ..ops.swiglu import swiglu, swiglu_mlp
from ..ops.swiglu.op import fc1_fused
from .cast import (MlpProjection, Projection, caching, check_device, gemm, gemm_swiglu, gemm_weights, inference_weights,
                   memoized, packs, plain_leaves)

__all__ = ["SwiGLU", "MlpInference"]

torch.fx.wrap("swiglu_mlp")  # a leaf under torch.fx: the traced graph calls the op as it is


LEAVES = (("fc1", nn.Linear), ("fc2", nn.Linear))  # the layers whose weights the fused paths read


class SwiGLU(nn.Module):
    """``fc2(SiLU(a) * b)`` with ``[a | b] = fc1(x)``, no biases (the official ViG MLP; the same
    state dict as timm's ``GluMlp(gate_last=False)``). The whole MLP is one op
    (:func:`vigla.ops.swiglu.swiglu_mlp`: fused gating; in training only the input is kept, fc1's
    output and the gating output are recomputed in the backward). ``[..., dim]`` -> ``[..., dim]``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not self._reads_leaves():  # fc1 or fc2 replaced or watched: called as modules
                return self.fc2(swiglu(self.fc1(x)))
            ops = inference_ops(x)
            if ops is not None:
                return self.forward_inference(x, compute_dtype(x), ops)
        w1, w2 = self.fc1.weight, self.fc2.weight
        if not torch.jit.is_scripting() and caching(x):  # no autograd (e.g. a dispatch mode): the weights cast once
            w1, w2 = inference_weights(self, "fc", (w1, w2), compute_dtype(x))
        return swiglu_mlp(x, w1, w2)

    @torch.jit.unused
    def _reads_leaves(self) -> bool:
        """Whether :meth:`forward` may read fc1's and fc2's weights (the fused paths) rather than call them:
        :func:`vigla.layers.cast.plain_leaves`."""
        return plain_leaves(self, LEAVES)

    @torch.jit.unused
    def inference_params(self, x: torch.Tensor, dtype: torch.dtype) -> "MlpInference":
        """What :meth:`forward_inference` reads for inputs like ``x`` (``[..., C]``) with products in ``dtype``,
        built once and kept (:func:`vigla.layers.cast.memoized`) while the parameters stay as they are."""
        rows = x.numel() // max(x.shape[-1], 1)
        return memoized(self, (dtype,), lambda: self._inference_params(x, dtype, rows))

    @torch.jit.unused
    def _inference_params(self, x: torch.Tensor, dtype: torch.dtype, rows: int) -> "MlpInference":
        check_device(self, x)
        w1, w2 = inference_weights(self, "fc", (self.fc1.weight, self.fc2.weight), dtype)
        if not packs(w1):
            return MlpInference(w1, w2, *gemm_weights(self, "fc", (w1, w2), rows))
        # oneDNN (the CPU): fc1's halves packed apart, the gating in their GEMMs' epilogues (gemm_swiglu)
        half = w1.shape[0] // 2
        gate, value, w2_gemm = gemm_weights(self, "fc", (w1[:half], w1[half:], w2), rows)
        return MlpInference(w1, w2, None, w2_gemm, (gate, value))

    @torch.jit.unused
    def forward_inference(self, x: torch.Tensor, dtype: torch.dtype, ops: InferenceOps = EAGER,
                          defer_projection: bool = False, params: "MlpInference | None" = None
                          ) -> torch.Tensor | Projection | MlpProjection:
        """:meth:`forward` on the inference path (:func:`vigla.ops.inference.inference_ops` gave ``ops``),
        products in ``dtype``: the weights from ``params`` (default :meth:`inference_params`: cast and prepared
        once in eager mode), both GEMMs on ``[rows, C]`` views (fc1 and the gating one kernel where
        :func:`vigla.ops.swiglu.op.fc1_fused`, the gating in oneDNN's GEMM epilogues on the CPU), the ops called
        without autograd. With ``defer_projection`` the output is returned not yet computed, for the next add + norm
        to run: the whole MLP
        (:class:`vigla.layers.cast.MlpProjection`) where :func:`vigla.ops.add_norm.op.mlp_fused`, else fc2
        (:class:`vigla.layers.cast.Projection`). ``[..., C]`` -> ``[..., C]``."""
        rows = x.reshape(-1, x.shape[-1])
        p = params if params is not None else self.inference_params(x, dtype)
        shape = (*x.shape[:-1], p.w2.shape[0])
        if defer_projection and mlp_fused(rows, p.w1, p.w2):  # rows in dtype already (the previous norm's output)
            return MlpProjection(rows, p.w1, p.w2, shape, ops)
        if fc1_fused(rows, dtype):
            h = ops.fc1_swiglu(rows.to(dtype), p.w1)
        elif p.fc1_halves is not None:
            h = gemm_swiglu(rows, *p.fc1_halves)
        else:
            h = ops.swiglu(gemm(rows, p.w1_gemm))
        out = Projection(h, p.w2_gemm, shape)
        return out if defer_projection else out.dense()

    @torch.jit.unused
    def folded_weights(self, x: torch.Tensor, norm_weight: torch.Tensor, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(w1, w2)`` in ``dtype`` with an RMSNorm's ``norm_weight`` (``[C]``) folded into fc1 (``W1 diag(w)``,
        multiplied in float32, cast once), where the whole MLP on ``[..., C]`` inputs like ``x`` runs in one kernel
        with the add + norm after it (:func:`vigla.ops.add_norm.op.mlp_fused`), else None: the MLP then takes the
        norm's input and its reciprocal RMS (:class:`vigla.layers.cast.MlpProjection`'s ``row_scale``)."""
        def build():
            f32 = torch.promote_types(self.fc1.weight.dtype, torch.float32)
            return self.fc1.weight.to(f32) * norm_weight.to(f32), self.fc2.weight

        plain = self.inference_params(x, dtype)
        if not mlp_fused(x.reshape(-1, x.shape[-1]), plain.w1, plain.w2):  # e.g. batch 1: no folded copy kept
            return None
        return inference_weights(self, "fc_folded", (self.fc1.weight, self.fc2.weight, norm_weight), dtype, build)


class MlpInference(NamedTuple):
    """What :meth:`SwiGLU.forward_inference` reads, prepared once for a compute dtype: ``w1`` ``[2I, C]`` and ``w2``
    ``[C, I]`` cast to it, and the same as :func:`vigla.layers.cast.gemm` takes them; with oneDNN (the CPU) fc1 as its
    two halves ``[I, C]``, the gate's and the value's (:func:`vigla.layers.cast.gemm_swiglu`), ``w1_gemm`` None."""
    w1: torch.Tensor
    w2: torch.Tensor
    w1_gemm: Optional[torch.Tensor]
    w2_gemm: torch.Tensor
    fc1_halves: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
