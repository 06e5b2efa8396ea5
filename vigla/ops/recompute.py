"""Activation recomputation that keeps BiGLA's outputs.

``recompute(fn, x)`` runs ``y = fn(x)`` under PyTorch's selective activation checkpointing: the
output of every BiGLA call inside ``fn`` (``[B, T, H, V]`` each) is stored, everything else ``fn``
computes is dropped and recomputed in the backward, where each BiGLA call hands back its stored
output instead of running its forward kernel again (its backward kernel runs as usual). Against
checkpointing the whole block this skips the second BiGLA forward, the most expensive
recomputation of a ViG block at high resolution, for one ``[B, T, C]`` tensor per block.

The same function serves eager mode and ``torch.compile`` (selective checkpointing is understood
by both); autocast and the random state (e.g. stochastic depth inside ``fn``) are those of the
forward. As with any selective checkpointing, ``fn`` must issue the same ops when it is run again:
under autocast, do not run ``fn``'s weights through a cast earlier in the same autocast region
(autocast's cast cache would then skip a cast in the forward that the backward makes).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from . import bigla  # noqa: F401  (defines torch.ops.vigla.bigla_fwd)

__all__ = ["recompute"]


def _keep_bigla_outputs():
    return create_selective_checkpoint_contexts([torch.ops.vigla.bigla_fwd.default])


def recompute(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)``, storing for the backward only ``x`` and the outputs of the BiGLA calls in ``fn``.

    ``fn`` maps one ``[..]`` tensor to one tensor. Without gradients (inference, ``no_grad``) this
    is ``fn(x)``.
    """
    if not torch.is_grad_enabled():
        return fn(x)
    return checkpoint(fn, x, use_reentrant=False, context_fn=_keep_bigla_outputs)
