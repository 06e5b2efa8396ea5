"""Mixed precision, one way for every command: an ``--amp`` name to a dtype, and the autocast region."""
from __future__ import annotations

import contextlib

import torch

#: ``--amp`` names -> autocast dtype (None: full precision). "auto" is resolved by :func:`amp_dtype`.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None, "none": None}


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` setting: "auto" is bf16 on CUDA and full precision elsewhere;
    "off" and "none" are full precision."""
    if amp == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be auto or one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, amp: torch.dtype | str | None, cache: bool = True):
    """``torch.autocast`` on ``device``'s type for ``amp`` (a dtype, or an ``--amp`` name), or a no-op
    context for full precision. ``cache=False`` re-casts the weights at every use (what a CUDA graph
    capture needs)."""
    dtype = amp_dtype(amp, device) if isinstance(amp, str) else amp
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, cache_enabled=cache)
