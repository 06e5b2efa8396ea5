"""Castling-ViT's training-only auxiliary branch in the engine.

* :func:`castling_model_args`: ``--castling-schedule`` -> the model's ``aux_schedule`` (resolved, and written back
  into the run's config so that config.yaml names every value);
* :func:`validate_aux_branch`: the epoch-end hook: while the branch is on, validation top-1 with it on as well as
  off, the gap and the mask density, for metrics.csv, curves.png and the checkpoint's record;
* :func:`checkpoint_record`: what a checkpoint's JSON says about the branch (on at the last training step?);
* :func:`eval_switch_check` and :func:`export_switch_note`: the guard of ``vigla eval`` and ``vigla export`` for a
  checkpoint saved while the branch was still on (inference always runs without it).

Models without the branch (everything but ``castling_*``) pass through every function untouched.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import torch

from vigla.models.castling import CastlingVisionTransformer, aux_forced, format_aux_schedule, parse_aux_schedule

from . import distributed as dist_utils
from .errors import UserError
from .evaluate import evaluate

NO_BRANCH = "none"
#: the metrics.csv columns of :func:`validate_aux_branch` (NaN once the branch is off)
COLUMNS = ("val_top1_aux_on", "val_top1_aux_off", "val_aux_gap", "val_aux_mask_density", "val_aux_kept_mass")


def _is_castling_name(name: str) -> bool:
    return name.startswith("castling_")


def castling_model_args(cfg) -> dict:
    """The model keyword arguments that ``cfg.castling_schedule`` asks for: ``aux_schedule`` (a dict, so that
    checkpoints can record it) or ``aux=False`` for ``none``. For a Castling model without the flag, the model's
    default (:data:`vigla.models.castling.PAPER_SCHEDULE`) is resolved and ``cfg.castling_schedule`` set to
    it, so that the run's config.yaml states the schedule it trained with. Raises :class:`UserError` for a
    bad spec or the flag on another model."""
    spec = cfg.castling_schedule
    if not _is_castling_name(cfg.model):
        if spec is not None:
            raise UserError(f"--castling-schedule applies to the castling_* models only, not {cfg.model}: "
                            f"drop the flag")
        return {}
    if spec is not None and spec.strip().lower() == NO_BRANCH:
        cfg.castling_schedule = NO_BRANCH
        return {"aux": False}
    try:
        schedule = parse_aux_schedule("paper" if spec is None else spec)
    except ValueError as e:
        raise UserError(f"--castling-schedule {spec!r}: {e}") from None
    cfg.castling_schedule = format_aux_schedule(schedule)
    return {"aux_schedule": dataclasses.asdict(schedule)}


def checkpoint_record(model: torch.nn.Module) -> dict:
    """``{"castling": model.aux_state()}`` for a Castling model (whether the branch ran in the last training
    step, the progress and the schedule), else ``{}``; merged into every checkpoint's JSON."""
    if not isinstance(model, CastlingVisionTransformer):
        return {}
    return {"castling": model.aux_state()}


class _BranchOn(torch.nn.Module):
    """``model`` with its auxiliary branch forced on in eval mode; sums each batch's mask density and kept
    mass (layer means from :meth:`~vigla.models.castling.CastlingVisionTransformer.aux_stats`) times its size."""

    def __init__(self, model: CastlingVisionTransformer):
        super().__init__()
        self.model = model
        self.sums = torch.zeros(3, dtype=torch.float64)  # density x n, kept mass x n, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with aux_forced(self.model):
            out = self.model(x)
            stats = self.model.aux_stats()
        n = x.shape[0]
        self.sums += torch.tensor([stats.get("mask_density_mean", 0.0) * n, stats.get("kept_mass_mean", 0.0) * n,
                                   float(n)], dtype=torch.float64)
        return out


def measure_branch_on(model: CastlingVisionTransformer, loader, prep, amp_dtype) -> dict:
    """Top-1 / top-5 / loss over ``loader`` with the branch forced on (eval mode), plus the mean mask density
    and kept mass per query over the images; summed across ranks."""
    wrapped = _BranchOn(model)
    result = evaluate(wrapped, loader, prep, amp_dtype)
    density, kept, n = dist_utils.all_reduce_sum(wrapped.sums.to(prep.device)).tolist()
    return dict(result, mask_density=density / max(n, 1.0), kept_mass=kept / max(n, 1.0))


def validate_aux_branch(model: torch.nn.Module, loader, prep, amp_dtype, val: dict) -> dict:
    """The epoch-end hook. ``val`` is the validation result of ``model`` in eval mode, i.e. with the branch off.
    While the branch is on in training, evaluates again with it on and returns the :data:`COLUMNS` (top-1 on
    and off, gap = on - off in points, mask density, kept mass), also stored as ``val["aux"]`` (the checkpoint
    records them); once it is off, the same columns as NaN. ``{}`` for other models."""
    if not isinstance(model, CastlingVisionTransformer):
        return {}
    if not model.aux_state()["aux_on"]:
        return dict.fromkeys(COLUMNS, math.nan)
    on = measure_branch_on(model, loader, prep, amp_dtype)
    row = {"val_top1_aux_on": on["top1"], "val_top1_aux_off": val["top1"], "val_aux_gap": on["top1"] - val["top1"],
           "val_aux_mask_density": on["mask_density"], "val_aux_kept_mass": on["kept_mass"]}
    val["aux"] = {"top1_on": on["top1"], "top1_off": val["top1"], "gap": row["val_aux_gap"],
                  "mask_density": on["mask_density"], "kept_mass": on["kept_mass"]}
    return row


# ------------------------------------------------------------------------------------------------ guard
def _saved_on(meta: dict) -> str | None:
    """Why the checkpoint's branch matters (a sentence), or None when it was off at the last training step."""
    state = meta.get("castling")
    if not state or not state.get("aux_on"):
        return None
    off = state["schedule"].get("aux_off")
    when = "its schedule never switches it off" if off is None else f"its schedule switches it off at {off:g}"
    return (f"was saved while Castling's auxiliary branch was still on (training progress {state['progress']:.2f}; "
            f"{when})")


def _amp_dtype(amp: str, device: torch.device):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def eval_switch_check(model: torch.nn.Module, meta: dict, loader, args, off: dict) -> dict:
    """``vigla eval``'s guard, at the first image size (``off``: its result, the branch off as in inference):
    for a checkpoint saved with the branch on, evaluate again with it on and print the gap. -> ``{"aux_switch":
    {...}}`` for the report, or ``{}``. A Castling checkpoint without a vigla record gets a one-line warning."""
    if not isinstance(model, CastlingVisionTransformer):
        return {}
    if "castling" not in meta:
        print(f"warning: {args.checkpoint} does not record whether Castling's auxiliary branch was on when it was "
              f"saved; the gap between the two modes is not measured", file=sys.stderr, flush=True)
        return {}
    why = _saved_on(meta)
    if why is None:
        return {}
    from vigla.data import BatchPrep

    dc = meta["data_config"]
    device = next(model.parameters()).device
    try:
        on = measure_branch_on(model, loader, BatchPrep(dc["mean"], dc["std"], device), _amp_dtype(args.amp, device))
    except (torch.OutOfMemoryError, RuntimeError) as e:
        print(f"warning: {args.checkpoint} {why}; the gap between the two modes was not measured "
              f"({str(e).splitlines()[0]})", file=sys.stderr, flush=True)
        return {"aux_switch": {"measured": False}}
    gap = on["top1"] - off["top1"]
    print(f"note: {args.checkpoint} {why}. Inference runs without it; on these {on['images']} images top-1 is "
          f"{on['top1']:.2f}% with the branch on and {off['top1']:.2f}% off ({gap:+.2f} points), mask density "
          f"{on['mask_density']:.2g}", flush=True)
    return {"aux_switch": {"measured": True, "top1_on": on["top1"], "top1_off": off["top1"], "gap": gap,
                           "mask_density": on["mask_density"], "kept_mass": on["kept_mass"]}}


def export_switch_note(model: torch.nn.Module, meta: dict, checkpoint: str) -> None:
    """``vigla export``'s guard: for a checkpoint saved with the branch on, print the gap measured on the
    validation set when it was saved, or a one-line warning that it was not measured."""
    if not isinstance(model, CastlingVisionTransformer):
        return
    why = _saved_on(meta)
    if why is None:
        return
    aux = (meta.get("val") or {}).get("aux")
    if aux is None:
        print(f"warning: {checkpoint} {why}; the exported graph runs without it and the gap between the two modes "
              f"was not measured (vigla eval {checkpoint} --data ... measures it)", file=sys.stderr, flush=True)
        return
    print(f"note: {checkpoint} {why}; the exported graph runs without it. On the validation set when it was "
          f"saved: top-1 {aux['top1_on']:.2f}% with the branch on, {aux['top1_off']:.2f}% off "
          f"({aux['gap']:+.2f} points), mask density {aux['mask_density']:.2g}", flush=True)
