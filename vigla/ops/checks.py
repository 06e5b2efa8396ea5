"""Input checks shared by the public ops: each failure is one line naming the op, the argument and what it
must be (the ops' own shape checks sit beside them)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["floating", "channels"]


def floating(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """``TypeError`` unless every given tensor (None skipped) is a floating-point ``torch.Tensor``, ``ValueError``
    unless they are on one device (a kernel reads them all through their addresses)."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if first is None:
            first = name, t.device
        elif t.device != first[1]:
            raise ValueError(f"{op}: {name} is on {t.device} but {first[0]} is on {first[1]}; move them to one device")


def channels(op: str, name: str, t: torch.Tensor, least: int = 1) -> None:
    """``ValueError`` unless ``t`` has a last dim of at least ``least`` (rows of zero width have no norm or
    gating; zero rows are fine)."""
    if t.dim() < 1 or t.shape[-1] < least:
        raise ValueError(f"{op}: {name} needs a last dim of at least {least}, got shape {tuple(t.shape)}")
