"""Checkpoint I/O: safetensors weights + a JSON of the model name and args, and a separate training-state file.

On disk, in a run folder::

    last.safetensors  last.json  last.state.pt     written every epoch and when a run is stopped
    best.safetensors  best.json                    the weights (raw or EMA) with the best val top-1

Every file is written whole or not at all (:func:`vigla.engine.outputs.atomic_write`), so a crash, a kill
or a full disk leaves the previous version in place. The JSON description is also stored inside the
safetensors header, so weights and description cannot come from two different saves. The state file is
self-contained (it holds the model weights too), so a run killed between two files of a save still
resumes; it is written first, the best weights last (a resume writes them again where the kill came before
them). It holds only tensors and plain Python values (RNG states included), and is read with
``torch.load(weights_only=True)``: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import random
import zipfile
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .errors import CheckpointError
from .outputs import atomic_write, write_text

#: 2: the model weights are inside (``"model"``); 1 (read only): they are in last.safetensors beside it
STATE_FORMAT = 2
_META_KEY = "vigla"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------- weights
def meta_path(weights_path: str) -> str:
    return os.path.splitext(weights_path)[0] + ".json"


def save_weights(path: str, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights as safetensors (fp32 copies on CPU) and ``meta`` (model name, args, ...) as JSON beside them
    and inside the safetensors header."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    text = json.dumps(meta, indent=2)
    data = safetensors_bytes(tensors, metadata={"format": "pt", _META_KEY: text})
    atomic_write(path, lambda f: f.write(data))
    write_text(meta_path(path), text)


def read_meta(weights_path: str) -> dict[str, Any] | None:
    """The description vigla writes with its weights (from the safetensors header, else the JSON beside the
    file), or None (e.g. an official checkpoint)."""
    text = None
    if weights_path.endswith(".safetensors") and os.path.isfile(weights_path):
        try:
            with safe_open(weights_path, "pt") as f:
                text = (f.metadata() or {}).get(_META_KEY)
        except (SafetensorError, OSError):
            pass  # load_weights names the problem
    if text is None:
        path = meta_path(weights_path)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise CheckpointError(f"{path}: unreadable checkpoint description ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{weights_path}: unreadable checkpoint description ({e})") from None


def load_weights(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_state_dict(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, what: str = "checkpoint",
                     classifier_may_differ: bool = False, input_conv: str | None = None) -> None:
    """Raise :class:`CheckpointError` (a ``ValueError`` too) naming the missing, unexpected and wrongly shaped
    keys of ``state_dict`` against ``model``, in one line.

    ``classifier_may_differ``: a classifier (``head.*``) for another number of classes is accepted (timm
    drops it after a checkpoint filter when ``num_classes`` differs from the checkpoint's). ``input_conv``: the key
    of the first convolution's weight, whose input channels may differ (timm adapts a 3-channel one to the model's
    ``in_chans`` after the filter)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
        and not (classifier_may_differ and k.startswith("head.") and v.shape[1:] == expected[k].shape[1:])
        and not (k == input_conv and v.dim() == 4 and v.shape[0] == expected[k].shape[0]
                 and v.shape[2:] == expected[k].shape[2:])
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = [_listing(label, names) for label, names in (("missing", missing), ("unexpected", unexpected),
                                                         ("with a different shape", mismatched)) if names]
    raise CheckpointError(f"{what} does not fit this {type(model).__name__} (is it for another model, size or "
                          f"number of classes?): " + "; ".join(parts))


def _listing(label: str, names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit]) + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")
    return f"{len(names)} {label}: {shown}"


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    check_state_dict(state_dict, model, what)
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
    atomic_write(path, lambda f: torch.save({"format": STATE_FORMAT, **state}, f))


def load_state(path: str, mmap: bool = False) -> dict[str, Any]:
    """A training state written by :func:`save_state`; ``mmap``: its tensors mapped from the file, not read (a
    cheap look at what the state is)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"training state {path} does not exist")
    try:
        # only torch's zip format maps; any other file is read, to fail with its own error
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001  (torch.load raises pickle / runtime / zip errors)
        raise CheckpointError(f"{path}: not a vigla training-state file, or a damaged one ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") not in (1, STATE_FORMAT):
        raise CheckpointError(f"{path}: not a vigla training-state file (format {STATE_FORMAT} expected)")
    return state
