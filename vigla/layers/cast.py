"""Weights cast once for inference.

Under autocast every ``F.linear`` casts its fp32 weight to the compute dtype on every call: one
kernel launch per weight per forward, which at 224² is a large part of an eager ViG forward.
:func:`inference_weights` keeps the cast copies on the module until a source parameter changes
(in place, as an optimizer step does, or replaced), and is bypassed whenever autograd records
or ``torch.compile`` traces (those cast as usual).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..ops.tracing import exporting

__all__ = ["inference_weights", "caching", "transposed"]


def caching(x) -> bool:
    """Whether :func:`inference_weights` keeps copies for an input like ``x`` now: no autograd, and
    no graph being recorded (``torch.compile``, export, ``torch.jit.trace``, or ``torch.fx``, whose
    proxies are not tensors): a graph holds no cache."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling() or exporting()
                or not isinstance(x, torch.Tensor))


def inference_weights(module: nn.Module, slot: str, sources: Sequence[torch.Tensor], dtype: torch.dtype,
                      build: Callable[[], Sequence[torch.Tensor]] | None = None) -> tuple[torch.Tensor, ...]:
    """``build()`` (default: ``sources``) cast to ``dtype``, cached on ``module`` under ``slot``.

    The cache key is ``dtype`` and each source's storage and version counter, so an in-place update
    or a new parameter makes the next call rebuild. Call it only when :func:`caching` is true.
    """
    key = (dtype, *[(t.data_ptr(), t._version) for t in sources])
    cache = module.__dict__.setdefault("_inference_weights", {})
    hit = cache.get(slot)
    if hit is None or hit[0] != key:
        made = build() if build is not None else sources
        hit = (key, tuple(t.to(dtype) for t in made))
        cache[slot] = hit
    return hit[1]


def transposed(module: nn.Module, slot: str, weights: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``weights`` (a tuple :func:`inference_weights` returned for ``slot``) with each matrix as its ``.t()``
    view, kept on ``module`` until that tuple is rebuilt: the GEMMs ``x @ w^T`` of an inference path
    (``torch.mm`` / ``torch.addmm``) without a transpose op per call. Vectors (biases) are returned as they are."""
    cache = module.__dict__.setdefault("_transposed_weights", {})
    hit = cache.get(slot)
    if hit is None or hit[0] is not weights:
        hit = (weights, tuple(w.t() if w.dim() == 2 else w for w in weights))
        cache[slot] = hit
    return hit[1]
