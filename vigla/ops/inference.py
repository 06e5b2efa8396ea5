"""The ops a ViG layer's inference path calls: eager, or traced by ``torch.compile``.

In eager inference (:func:`vigla.ops.dispatch.eager_inference`) a layer calls each op's forward
implementation (``*_forward`` in the op's ``op.py``) directly: no autograd, no dispatcher, the kernels
launched by vigla's launcher (:data:`EAGER`). While ``torch.compile`` traces inference on a GPU (grad mode
off: :func:`graph_inference`), the same layer code calls the ops' custom ops instead, with the same
arguments and kernels (:data:`TRACED`): Inductor launches them from its generated code, and the compiled
graph gets the inference path's fusions, which the recording path (each op with its backward) does not
have: the residual stream in the compute dtype, the decay projection folded into the in-projection, each
output projection inside the next add + norm's kernel (``vigla::linear_add_norm``), BiGLA's output kernel
forming the locality mix (``vigla::bigla_mix``), fc1 and the gating as one kernel, and on a GPU with enough rows
the whole MLP inside the next add + norm's kernel (``vigla::mlp_add_norm``). :func:`inference_ops` picks
one of the two, or None (the recording path).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as forward_ad

from .add_norm.op import add_norm_forward, linear_add_norm_forward, mlp_add_norm_forward
from .bigla.op import bigla_mix_forward
from .dispatch import eager_inference
from .dwconv.op import dwconv_forward
from .swiglu.op import fc1_swiglu_forward, swiglu_forward
from .tracing import exporting

__all__ = ["InferenceOps", "EAGER", "TRACED", "graph_inference", "inference_ops"]


class InferenceOps(NamedTuple):
    """One callable per op, each taking the arguments of the op's forward implementation (``launch`` aside)."""
    add_norm: Callable  # (x, delta, weight, bias, eps, rms, out_dtype) -> (s, y)
    linear_add_norm: Callable  # (h, wl, x, weight, bias, eps, rms, out_dtype) -> (s, y)
    mlp_add_norm: Callable  # (x, w1, w2, r, weight, bias, eps, rms, out_dtype, row_scale) -> (s, y)
    dwconv: Callable  # (x, weight, H, W, act, out_dtype) -> x_c
    bigla_mix: Callable  # (q, k, v, zf, zb, scale, gate_normalizer, x, z, w_o, w_l, eps, act) -> y
    fc1_swiglu: Callable  # (x, w1) -> h
    swiglu: Callable  # (u) -> h


EAGER = InferenceOps(add_norm_forward, linear_add_norm_forward, mlp_add_norm_forward, dwconv_forward,
                     bigla_mix_forward, fc1_swiglu_forward, swiglu_forward)
TRACED = InferenceOps(torch.ops.vigla.add_norm, torch.ops.vigla.linear_add_norm, torch.ops.vigla.mlp_add_norm,
                      torch.ops.vigla.dwconv, torch.ops.vigla.bigla_mix, torch.ops.vigla.fc1_swiglu,
                      torch.ops.vigla.swiglu)


def _graph_device(x: torch.Tensor) -> bool:
    """Where compiled inference takes :data:`TRACED`: CUDA (the CPU's compiled graphs keep the recording path's
    ops, whose float32 kernels the inference path shares there)."""
    return x.is_cuda


@torch.jit.unused
def graph_inference(x) -> bool:
    """Whether ``torch.compile`` traces inference (grad mode off, no forward-mode AD) of a real tensor ``x`` on
    a device that takes :data:`TRACED`, not for an export."""
    return (torch.compiler.is_compiling() and not torch.is_grad_enabled() and isinstance(x, torch.Tensor)
            and forward_ad._current_level < 0 and _graph_device(x) and not exporting())


@torch.jit.unused
def inference_ops(x) -> Optional[InferenceOps]:
    """The ops of the inference path for an input like ``x``: :data:`EAGER` in eager inference, :data:`TRACED`
    while ``torch.compile`` traces inference (:func:`graph_inference`), else None."""
    if eager_inference(x):
        return EAGER
    return TRACED if graph_inference(x) else None
