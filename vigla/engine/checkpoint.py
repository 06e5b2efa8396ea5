"""Checkpoint I/O: safetensors weights + a JSON of the model name and args, and a separate training-state file.

On disk, in a run folder::

    last.safetensors  last.json  last.state.pt     written every epoch and when a run is stopped
    best.safetensors  best.json                    the weights (raw or EMA) with the best val top-1

Every file is written to a temporary name in the same folder and moved into place with ``os.replace``,
so a crash leaves the previous version whole. The state file holds only tensors and plain Python values
(RNG states included), and is read with ``torch.load(weights_only=True)``: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

STATE_FORMAT = 1


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)``, flush it to disk, then rename over ``path`` (same folder, so the rename is atomic)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------- weights
def meta_path(weights_path: str) -> str:
    return os.path.splitext(weights_path)[0] + ".json"


def save_weights(path: str, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights as safetensors (fp32 copies on CPU) and ``meta`` (model name, args, ...) as JSON beside them."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(meta_path(path), lambda tmp: write_text(tmp, json.dumps(meta, indent=2)))


def read_meta(weights_path: str) -> dict[str, Any] | None:
    """The JSON written beside vigla weights, or None (e.g. an official checkpoint)."""
    path = meta_path(weights_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint description ({e})") from None


def load_weights(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _names(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_compatible(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys: {_names(missing)}" if missing else "",
                 f"unexpected keys: {_names(unexpected)}" if unexpected else "",
                 f"shape mismatches (checkpoint vs model): {_names(shapes, 4)}" if shapes else ""]
        raise CheckpointError(f"{what} does not fit model {type(model).__name__}: "
                              + "; ".join(p for p in parts if p)
                              + ". Is it a checkpoint of another model or number of classes?")


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    check_compatible(model, state_dict, what)
    model.load_state_dict(state_dict)


# ----------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states as tensors and plain values."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- training state
def save_state(path: str, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save({"format": STATE_FORMAT, **state}, tmp))


def load_state(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"training state {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch.load raises pickle / runtime / zip errors)
        raise CheckpointError(f"{path}: not a vigla training-state file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a vigla training-state file (format {STATE_FORMAT} expected)")
    return state


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
