"""Castling-ViT on DeiT: timm's VisionTransformer with its attention swapped for linear-angular attention.

Castling-ViT: You et al., "Castling-ViT: Compressing Self-Attention via Switching Towards Linear-Angular
Attention at Vision Transformer Inference", CVPR 2023 (arXiv 2211.10526); official attention block
github.com/GATECH-EIC/Castling-ViT. ``castling_deit_{tiny,small,base}`` keep DeiT-T/S/B unchanged (patch 16,
224², depth 12, ``qkv_bias=True`` so that a DeiT checkpoint loads exactly) and replace each block's
``Attention`` by :class:`vigla.layers.LinearAngularAttention`: the only new weights are one depthwise conv
per block (``blocks.{i}.attn.dconv.weight``).

The paper's training-only auxiliary masked softmax branch: on in ``train()``, dropped in ``eval()`` (and
absent from TorchScript and torch.fx graphs, which keep no Python state). The model exposes the
hooks the training engine calls when present:

* ``set_aux(enabled)``: the explicit master switch;
* ``set_aux_progress(p)``: training progress ``p ∈ [0, 1]`` drives :class:`AuxSchedule` (λ and ε ramps, and the
  ``aux_off`` point after which the branch is off);
* ``aux_loss()``: the summed L1 regulariser of the last training forward (0-dim zero when off);
* ``aux_stats()``: per-layer mask density, row mass, kept mass and switch certificate, plus aggregates;
* ``aux_state()``: whether the branch ran in the last training step, the progress and the schedule (what a
  checkpoint records).

The schedule defaults to :data:`PAPER_SCHEDULE` (the regulariser ramped, the branch off for the end of training,
as the paper's abstract describes); :data:`OFFICIAL_SCHEDULE` is the released code's behaviour.

Evaluation helpers: :func:`probe_aux` (the statistics on a held-out batch, in eval mode) and
:func:`evaluate_aux_switch` (top-1 with the branch on vs off over a loader).
"""
from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn

from ..layers.linear_angular import LinearAngularAttention

__all__ = [
    "AuxSchedule",
    "OFFICIAL_SCHEDULE",
    "PAPER_SCHEDULE",
    "parse_aux_schedule",
    "format_aux_schedule",
    "CastlingVisionTransformer",
    "checkpoint_filter_fn",
    "load_deit_weights",
    "probe_aux",
    "evaluate_aux_switch",
    "aux_forced",
]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuxSchedule:
    """Schedule of the auxiliary branch over training progress ``p ∈ [0, 1]`` (vigla's own design).

    With ``r = min(p / aux_off, 1)`` (``aux_off = None`` counts as 1):

    * ``λ(p) = lambda_max · r``: weight of the L1 regulariser on the kept mass (0: none, the official code);
    * ``ε(p) = eps + (eps_end - eps) · r`` (``eps_end = None``: constant ``eps``; official ``eps = 0.02``);
    * the branch is off for ``p > aux_off`` (``None``: never switched off by the schedule).
    """

    lambda_max: float = 0.0
    eps: float = 0.02
    eps_end: Optional[float] = None
    aux_off: Optional[float] = None

    def __post_init__(self) -> None:
        if self.lambda_max < 0:
            raise ValueError(f"AuxSchedule: lambda_max must be >= 0, got {self.lambda_max}")
        for name in ("eps", "eps_end"):
            val = getattr(self, name)
            if val is not None and not 0 <= val < 1:
                raise ValueError(f"AuxSchedule: {name} must be in [0, 1), got {val}")
        if self.aux_off is not None and not 0 <= self.aux_off <= 1:
            raise ValueError(f"AuxSchedule: aux_off must be a progress in [0, 1] or None, got {self.aux_off}")

    def at(self, progress: float) -> Tuple[bool, float, float]:
        """``(branch on, λ, ε)`` at training progress ``progress ∈ [0, 1]``."""
        if not 0 <= progress <= 1:
            raise ValueError(f"AuxSchedule: progress must be in [0, 1], got {progress}")
        span = 1.0 if self.aux_off is None else self.aux_off
        ramp = min(progress / span, 1.0) if span > 0 else 1.0
        eps = self.eps if self.eps_end is None else self.eps + (self.eps_end - self.eps) * ramp
        on = self.aux_off is None or progress <= self.aux_off
        return on, self.lambda_max * ramp, eps


#: The official code's behaviour (GATECH-EIC/Castling-ViT ``attention.py``): the branch on for the whole of
#: training at ε = 0.02, no regulariser; ``eval()`` then drops a branch the network still relies on.
OFFICIAL_SCHEDULE = AuxSchedule()

#: vigla's default, following the paper's abstract (You et al., CVPR 2023): the softmax masks "are regularized
#: to gradually become zeros", so that the switch to linear-angular attention alone costs nothing. λ ramps
#: linearly to ``lambda_max`` at ``aux_off``; after it the branch is off and the network trains without it.
#: The values come from a Fashion-MNIST sweep on CPU (benchmarks/castling_schedule_cpu.py,
#: benchmarks/results/castling_schedule_cpu.json); docs/castling.md gives the numbers.
PAPER_SCHEDULE = AuxSchedule(lambda_max=0.1, eps=0.02, aux_off=0.8)

SCHEDULE_PRESETS = {"paper": PAPER_SCHEDULE, "official": OFFICIAL_SCHEDULE}
_SPEC_KEYS = {"lambda": "lambda_max", "lambda_max": "lambda_max", "eps": "eps", "eps_end": "eps_end",
              "aux_off": "aux_off"}


def parse_aux_schedule(spec: str) -> AuxSchedule:
    """An :class:`AuxSchedule` from a text spec: a preset name (``paper``, the default; ``official``),
    optionally followed by ``key=value`` overrides, comma-separated; ``key=value`` items alone start from
    ``paper``. Keys: ``lambda``, ``eps``, ``eps_end``, ``aux_off`` (``none`` for the last two: no ε ramp,
    never switched off). Examples: ``official``, ``paper,aux_off=0.9``, ``lambda=0.05,eps_end=0.04``.
    Raises ``ValueError`` naming the bad item."""
    items = [item.strip() for item in str(spec).split(",") if item.strip()]
    if not items:
        raise ValueError("empty Castling schedule: use 'paper', 'official' or key=value items")
    base = PAPER_SCHEDULE
    if "=" not in items[0]:
        name = items.pop(0).lower()
        if name not in SCHEDULE_PRESETS:
            raise ValueError(f"unknown Castling schedule {name!r}: the presets are {', '.join(SCHEDULE_PRESETS)} "
                             f"(or key=value items)")
        base = SCHEDULE_PRESETS[name]
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in _SPEC_KEYS:
            raise ValueError(f"bad Castling schedule item {item!r}: expected key=value with key one of "
                             f"lambda, eps, eps_end, aux_off (a preset name may only come first)")
        text = text.strip().lower()
        if text in ("none", "null") and key in ("eps_end", "aux_off"):
            values[_SPEC_KEYS[key]] = None
            continue
        try:
            values[_SPEC_KEYS[key]] = float(text)
        except ValueError:
            raise ValueError(f"bad Castling schedule item {item!r}: {text!r} is not a number") from None
    return dataclasses.replace(base, **values)


def format_aux_schedule(schedule: AuxSchedule) -> str:
    """The spec of every field of ``schedule``, which :func:`parse_aux_schedule` reads back exactly."""
    def text(value: Optional[float]) -> str:
        return "none" if value is None else repr(float(value))
    return (f"lambda={text(schedule.lambda_max)},eps={text(schedule.eps)},eps_end={text(schedule.eps_end)},"
            f"aux_off={text(schedule.aux_off)}")


def _mixer_class(**config: Any) -> type:
    """``LinearAngularAttention`` with ``config`` as constructor defaults.

    timm's ``Block`` builds ``attn_layer(dim, num_heads=..., qkv_bias=..., ...)`` and checks it with
    ``issubclass``, so a ``functools.partial`` cannot be passed; a subclass can (only for building: the model
    gives its layers the plain class back).
    """

    class _ConfiguredLinearAngularAttention(LinearAngularAttention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**config, **kwargs})

    _ConfiguredLinearAngularAttention.__name__ = LinearAngularAttention.__name__
    return _ConfiguredLinearAngularAttention


class CastlingVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks use :class:`LinearAngularAttention`.

    Args:
        dw_mode: ``"seq1d"`` (faithful per-head k=9 conv along the token sequence) or ``"2d"`` (k×k depthwise
            conv over the patch grid; prefix tokens pass through).
        dw_kernel_size: the conv's k (default 9 for ``seq1d``, 3 for ``2d``).
        aux: master switch of the training-only masked softmax branch.
        aux_schedule: an :class:`AuxSchedule`, a dict of its fields or a spec for :func:`parse_aux_schedule`
            (default :data:`PAPER_SCHEDULE`: λ ramped to 0.1, branch off for the last 20% of training;
            ``"official"``: constant ε = 0.02, no regulariser, never switched off, as the official code).
        norm_eps: floor of the q, k and output L2 norms.
        **kwargs: ``VisionTransformer`` arguments (``img_size``, ``embed_dim``, ``dynamic_img_size``, ...).
    """

    def __init__(
        self,
        dw_mode: str = "seq1d",
        dw_kernel_size: Optional[int] = None,
        aux: bool = True,
        aux_schedule: Union[AuxSchedule, Dict[str, Any], str, None] = None,
        norm_eps: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        if "attn_layer" in kwargs:
            raise ValueError("CastlingVisionTransformer sets attn_layer itself; do not pass it")
        if dw_mode == "2d" and kwargs.get("patch_drop_rate", 0.0):
            raise ValueError("dw_mode='2d' needs the full patch grid, so patch_drop_rate must be 0")
        if isinstance(aux_schedule, dict):
            aux_schedule = AuxSchedule(**aux_schedule)
        elif isinstance(aux_schedule, str):
            aux_schedule = parse_aux_schedule(aux_schedule)
        schedule = aux_schedule or PAPER_SCHEDULE
        num_prefix_tokens = int(kwargs.get("class_token", True)) + kwargs.get("reg_tokens", 0)
        attn_layer = _mixer_class(
            dw_mode=dw_mode,
            dw_kernel_size=dw_kernel_size,
            num_prefix_tokens=num_prefix_tokens,
            aux=aux,
            aux_eps=schedule.eps,
            norm_eps=norm_eps,
        )
        super().__init__(attn_layer=attn_layer, **kwargs)
        for block in self.blocks:  # built: the plain class again (a local class cannot be pickled: torch.save(model))
            if type(block.attn) is attn_layer:
                block.attn.__class__ = LinearAngularAttention
        self.dw_mode = dw_mode
        self.aux_schedule = schedule
        self._aux_switch = bool(aux)
        self._aux_progress = 0.0
        self._apply_aux()
        self._set_grid(self.patch_embed.grid_size)
        if dw_mode == "2d" and self.dynamic_img_size:
            self.__class__ = _DynamicGridCastling  # see there

    # ---- token grid for the 2-D DWConv ---------------------------------------------------------
    def _set_grid(self, grid: Optional[Tuple[int, int]]) -> None:
        for mixer in self.mixers():
            mixer.grid_size = None if grid is None else (grid[0], grid[1])

    def set_input_size(self, img_size: Optional[Tuple[int, int]] = None,
                       patch_size: Optional[Tuple[int, int]] = None) -> None:
        """timm's ``set_input_size`` (position embedding resampled to the new grid); the mixers get the grid."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self._set_grid(self.patch_embed.grid_size)

    # ---- auxiliary branch API (the engine contract) --------------------------------------------
    def mixers(self) -> List[LinearAngularAttention]:
        return [blk.attn for blk in self.blocks]

    def _apply_aux(self) -> None:
        on, lam, eps = self.aux_schedule.at(self._aux_progress)
        for mixer in self.mixers():
            mixer.aux_eps = eps
            mixer.aux_lambda = lam
            mixer.set_aux(self._aux_switch and on)

    def set_aux(self, enabled: bool) -> None:
        """Master switch of the auxiliary branch (the schedule's ``aux_off`` can only switch it off further)."""
        self._aux_switch = bool(enabled)
        self._apply_aux()

    def set_aux_progress(self, progress: float) -> None:
        """Training progress ``p ∈ [0, 1]``: sets every mixer's λ, ε and on/off from :attr:`aux_schedule`."""
        self._aux_progress = float(progress)
        self._apply_aux()

    def aux_loss(self) -> torch.Tensor:
        """Sum over blocks of ``λ·mean_{b,h,i} sum_j S_ij`` from the last training forward (0-dim)."""
        total = torch.zeros((), device=self.patch_embed.proj.weight.device)
        for mixer in self.mixers():
            total = total + mixer.aux_loss()
        return total

    def aux_state(self) -> Dict[str, Any]:
        """What a checkpoint records about the branch: ``aux_on`` (it ran in training at the current progress,
        i.e. in the last training step), ``progress`` and the ``schedule`` (its fields)."""
        return {"aux_on": any(m.aux_enabled for m in self.mixers()), "progress": self._aux_progress,
                "schedule": dataclasses.asdict(self.aux_schedule)}

    def aux_stats(self) -> Dict[str, float]:
        """``blocks.{i}.{mask_density,row_mass,kept_mass,certificate}`` for every block whose branch ran in
        the last forward, their aggregates (``mask_density_mean``, ``row_mass_mean``, ``kept_mass_mean``,
        ``certificate_max``), and the schedule state (``aux_enabled``, ``aux_lambda``, ``aux_eps``)."""
        out: Dict[str, float] = {}
        per_layer = [(i, m.stats()) for i, m in enumerate(self.mixers())]
        per_layer = [(i, s) for i, s in per_layer if s]
        for i, stats in per_layer:
            out.update({f"blocks.{i}.{key}": val for key, val in stats.items()})
        if per_layer:
            for key in ("mask_density", "row_mass", "kept_mass"):
                out[f"{key}_mean"] = sum(s[key] for _, s in per_layer) / len(per_layer)
            out["certificate_max"] = max(s["certificate"] for _, s in per_layer)
        mixers = self.mixers()
        out["aux_enabled"] = float(any(m.aux_enabled for m in mixers))
        out["aux_lambda"] = mixers[0].aux_lambda if mixers else 0.0
        out["aux_eps"] = mixers[0].aux_eps if mixers else 0.0
        return out


class _DynamicGridCastling(CastlingVisionTransformer):
    """A :class:`CastlingVisionTransformer` with ``dw_mode="2d"`` and ``dynamic_img_size``, whose patch grid
    changes with the input: ``_pos_embed`` (x ``[B, H, W, C]`` there; ``forward_features`` and
    ``forward_intermediates`` both pass through it) hands it to the 2-D DWConvs first. The constructor
    switches to this class: the override calls ``super()``, which TorchScript cannot compile, so only this
    configuration is not scriptable."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        self._set_grid((x.shape[1], x.shape[2]))
        return super()._pos_embed(x)


# ---- evaluation helpers ----------------------------------------------------------------------------
@contextmanager
def aux_forced(model: CastlingVisionTransformer) -> Iterator[None]:
    """Run the auxiliary branch in every mixer whatever the mode and switch (no regulariser outside
    training); restores the mixers' flags and previous statistics on exit."""
    mixers = model.mixers()
    saved = [(m.aux_probe, m._aux_stats) for m in mixers]
    for m in mixers:
        m.aux_probe = True
    try:
        yield
    finally:
        for m, (probe, stats) in zip(mixers, saved):
            m.aux_probe, m._aux_stats = probe, stats


def _check_castling(model: nn.Module, fn: str) -> None:
    if not isinstance(model, CastlingVisionTransformer):
        raise TypeError(f"{fn}: expected a CastlingVisionTransformer, got {type(model).__name__}")


@torch.no_grad()
def probe_aux(model: CastlingVisionTransformer, images: torch.Tensor) -> Dict[str, float]:
    """Auxiliary-branch statistics of ``model`` on one held-out batch ``images [B, 3, H, W]``, in eval mode.

    Returns :meth:`CastlingVisionTransformer.aux_stats` of a forward with the branch forced on (at the
    schedule's current ε), so ``certificate_max`` is the bound ``m·max|v| / min|Z_lin|`` of
    :func:`vigla.ops.linear_angular.switch_certificate` for the worst layer:
    dropping the branch changes each head's normalised output by at most twice a layer's certificate.
    The model's mode, switch and statistics are left as they were.
    """
    _check_castling(model, "probe_aux")
    was_training = model.training
    model.eval()
    try:
        with aux_forced(model):
            model(images)
            return model.aux_stats()
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_aux_switch(
    model: CastlingVisionTransformer,
    loader: Iterable,
    device: Union[torch.device, str, None] = None,
    max_batches: Optional[int] = None,
) -> Dict[str, float]:
    """Top-1 (%) of ``model`` over ``loader`` (``(images, targets)`` batches) with the auxiliary branch on and
    off, both in eval mode (no dropout), plus the fraction of identical predictions, the largest switch
    certificate seen, and the mean mask density and kept mass per query (averaged over layers and
    samples). ``device`` defaults to the model's."""
    _check_castling(model, "evaluate_aux_switch")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct_on = correct_off = same = total = 0
    certificate = density = kept = 0.0
    try:
        for step, (images, targets) in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            images, targets = images.to(device), targets.to(device)
            pred_off = model(images).argmax(-1)
            with aux_forced(model):
                pred_on = model(images).argmax(-1)
                stats = model.aux_stats()
            certificate = max(certificate, stats.get("certificate_max", 0.0))
            density += stats.get("mask_density_mean", 0.0) * targets.numel()
            kept += stats.get("kept_mass_mean", 0.0) * targets.numel()
            correct_on += int((pred_on == targets).sum())
            correct_off += int((pred_off == targets).sum())
            same += int((pred_on == pred_off).sum())
            total += targets.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate_aux_switch: the loader gave no samples")
    return {
        "top1_aux_on": 100.0 * correct_on / total,
        "top1_aux_off": 100.0 * correct_off / total,
        "top1_delta": 100.0 * (correct_on - correct_off) / total,
        "prediction_agreement": same / total,
        "certificate_max": certificate,
        "mask_density": density / total,
        "kept_mass": kept / total,
        "samples": float(total),
    }


# ---- warm start from DeiT ----------------------------------------------------------------------------
def _is_dwconv_key(key: str) -> bool:
    return key.startswith("blocks.") and key.endswith(".attn.dconv.weight")


def _filter_and_fill(state_dict: Dict[str, torch.Tensor], model: CastlingVisionTransformer):
    """timm's ViT/DeiT filter, then fill what the checkpoint lacks from the model's own (initial) weights.

    Only the DWConv weights may be missing (and the classifier, when its shape differs from the model's);
    anything else missing or left over is an error. Returns ``(state_dict, new_keys)``.
    """
    out = _vit_checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)
    own = model.state_dict()
    if not any(k.startswith("head.") for k in own):  # no classifier (num_classes=0): the checkpoint's is not used
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    unexpected = sorted(set(out) - set(own))
    if unexpected:
        raise KeyError(
            f"checkpoint keys the Castling model has no place for: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} (qkv biases need qkv_bias=True; distilled DeiT checkpoints "
            f"with dist_token/head_dist are not supported)"
        )
    head = {k for k in own if k.startswith("head.") and k in out and out[k].shape != own[k].shape}
    for k in head:
        del out[k]
    new_keys = [k for k in own if k not in out]
    missing = [k for k in new_keys if not (_is_dwconv_key(k) or k in head)]
    if missing:
        raise KeyError(f"checkpoint lacks weights the Castling model needs (only attn.dconv.weight may be new): "
                       f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for k in new_keys:
        out[k] = own[k]
    if new_keys:
        _logger.info("Castling warm start: %d tensors not in the checkpoint keep their initial values: %s",
                     len(new_keys), ", ".join(new_keys))
    return out, new_keys


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: CastlingVisionTransformer) -> Dict[str, Any]:
    """timm ``pretrained_filter_fn``: a DeiT/ViT or Castling checkpoint -> this model's state dict.

    DeiT checkpoints lack the DWConv weights; they are filled in from the model's initialisation and logged.
    """
    return _filter_and_fill(state_dict, model)[0]


def load_deit_weights(model: CastlingVisionTransformer, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Warm-start ``model`` from a timm DeiT state dict (e.g. ``deit_tiny_patch16_224``'s), in place.

    Everything loads exactly (qkv, proj, MLPs, norms, embeddings; the position embedding is resampled for
    another image size) except the per-block DWConv weights, which keep their initial values. Returns those new
    keys (also logged). Raises ``KeyError`` if the checkpoint misses anything else or has keys the model lacks.
    """
    _check_castling(model, "load_deit_weights")
    filtered, new_keys = _filter_and_fill(state_dict, model)
    model.load_state_dict(filtered, strict=True)
    return new_keys


# ---- registry ---------------------------------------------------------------------------------------
def _create_castling(variant: str, pretrained: bool = False, **kwargs: Any) -> CastlingVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        CastlingVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (14, 14),
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "castling_deit_tiny": _cfg(),
    "castling_deit_small": _cfg(),
    "castling_deit_base": _cfg(),
})


@register_model
def castling_deit_tiny(pretrained: bool = False, **kwargs: Any) -> CastlingVisionTransformer:
    """Castling-DeiT-T: DeiT-T (patch 16, C 192, depth 12, 3 heads) with linear-angular attention."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, qkv_bias=True)
    return _create_castling("castling_deit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def castling_deit_small(pretrained: bool = False, **kwargs: Any) -> CastlingVisionTransformer:
    """Castling-DeiT-S: DeiT-S (patch 16, C 384, depth 12, 6 heads) with linear-angular attention."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, qkv_bias=True)
    return _create_castling("castling_deit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def castling_deit_base(pretrained: bool = False, **kwargs: Any) -> CastlingVisionTransformer:
    """Castling-DeiT-B: DeiT-B (patch 16, C 768, depth 12, 12 heads) with linear-angular attention."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, qkv_bias=True)
    return _create_castling("castling_deit_base", pretrained=pretrained, **dict(model_args, **kwargs))
