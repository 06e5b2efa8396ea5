"""Activation recomputation that keeps BiGLA's outputs.

``recompute(fn, x, params)`` runs ``y = fn(x)`` storing only ``x`` and the output of every BiGLA
call inside ``fn`` (``[B, T, H, V]`` each); everything else ``fn`` computes is dropped. The
backward runs ``fn(x)`` again with gradients on, in which each BiGLA call hands back its stored
output instead of running its forward kernel (its backward kernel runs as usual), and
back-propagates through that replay. Against checkpointing the whole block (timm's
``checkpoint``) this skips the second BiGLA forward, the most expensive recomputation of a ViG
block at high resolution, for one ``[B, T, C]`` tensor per block.

Autocast and the random state (e.g. stochastic depth inside ``fn``) are those of the forward.
Eager mode only: under ``torch.compile`` use ``torch.utils.checkpoint`` (Inductor plans its own
recomputation).
"""
from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Callable, Sequence

import torch

__all__ = ["recompute", "record_output", "replayed_output", "replaying"]

_local = threading.local()  # .recording: list | None, .replay: deque | None


def record_output(t: torch.Tensor) -> None:
    """Called by a kept op with its output: stored when inside :func:`recompute`'s forward."""
    recording = getattr(_local, "recording", None)
    if recording is not None:
        recording.append(t)


def replayed_output() -> torch.Tensor | None:
    """Called by a kept op before it computes: its stored output during a replay, else None."""
    replay = getattr(_local, "replay", None)
    return replay.popleft() if replay else None


def replaying() -> bool:
    """Whether :func:`recompute`'s backward is running ``fn`` again (what is saved now lives only
    until that backward ends, so ops may keep more than usual)."""
    return getattr(_local, "replay", None) is not None


@contextlib.contextmanager
def _set(name: str, value):
    previous = getattr(_local, name, None)
    setattr(_local, name, value)
    try:
        yield
    finally:
        setattr(_local, name, previous)


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, x, *params):
        ctx.fn, ctx.params = fn, params
        ctx.device = x.device
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.rng = _rng_state(x.device)
        kept = []
        with _set("recording", kept), _set("replay", None):
            y = fn(x)
        ctx.save_for_backward(x, *kept)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, *kept = ctx.saved_tensors
        x = x.detach().requires_grad_(ctx.needs_input_grad[1])
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=devices), _set("replay", deque(kept)), _set("recording", None):
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                y = ctx.fn(x)
            wanted = [t for t, need in zip((x, *ctx.params), ctx.needs_input_grad[1:]) if need]
            grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True))
        return (None, *(next(grads) if need else None for need in ctx.needs_input_grad[1:]))


def recompute(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``fn(x)``, storing for the backward only ``x`` and the outputs of the BiGLA calls in ``fn``.

    ``fn`` maps one tensor to one tensor; ``params``: every tensor ``fn`` reads that needs a
    gradient (e.g. ``module.parameters()``). Without gradients (inference, ``no_grad``) this is
    ``fn(x)``.
    """
    params = tuple(params)
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        return fn(x)
    return _Recompute.apply(fn, x, *params)
