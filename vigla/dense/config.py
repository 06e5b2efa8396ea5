"""Settings of ``vigla dense train``: one dataclass, its flags, the copy saved with each run.

Precedence, lowest first: the field defaults < the saved ``config.yaml`` of the run being resumed < ``--config
FILE.yaml`` (e.g. another run's ``config.yaml``) < the flags given on the command line (only those typed count: the
parser leaves the others out).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from vigla.engine.config import NOT_SAVED, check_setting, resumed_settings
from vigla.engine.errors import UserError

from .models import DETECTORS

__all__ = ["DenseConfig", "TASKS", "add_config_arguments", "cudnn_benchmark", "resolve_config"]

TASKS = ("detect", "segment")


def _opt(default, help: str, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class DenseConfig:
    task: str = _opt("detect", "detect: boxes (and masks) with a torchvision detector; segment: per-pixel classes",
                     choices=TASKS)
    data: Optional[str] = _opt(None, "COCO-format folder: train/ and val/, each with annotations.json and images/ "
                               "(and masks/ to segment); `vigla dense data` makes one", metavar="PATH")
    detector: str = _opt("mask_rcnn", "torchvision detector (--task detect)", choices=DETECTORS)
    detector_args: str = _opt("{}", "more arguments for the torchvision detector class, as JSON (e.g. "
                              "'{\"box_batch_size_per_image\": 256}')", metavar="JSON")
    model: str = _opt("vig_h_tiny", "backbone: a timm / vigla model name (ViG-H and CNNs by their stages, "
                      "plain ViG / ViT through a ViTDet simple feature pyramid)")
    model_args: str = _opt("{}", "more timm.create_model arguments for the backbone, as JSON "
                           "(e.g. '{\"depths\": [1, 1, 3, 1]}')", metavar="JSON")
    backbone_weights: Optional[str] = _opt(None, "initialize the backbone from this checkpoint (vigla .safetensors "
                                           "from `vigla train`, or an official release); classifier dropped",
                                           metavar="FILE")
    drop_path: Optional[float] = _opt(None, "backbone stochastic depth (default: the model's own)", metavar="RATE")
    fpn_channels: int = _opt(256, "feature pyramid width", metavar="C")
    grad_checkpointing: bool = _opt(False, "recompute the backbone's blocks in the backward (less memory)")
    img_size: int = _opt(384, "shorter image side in pixels (detectors: their resize; segment: the loader's)",
                         metavar="PX")
    max_size: int = _opt(640, "longer image side at most this", metavar="PX")
    scale_min: float = _opt(0.8, "training scale jitter: the size is multiplied by a factor in "
                            "[scale-min, scale-max]", metavar="F")
    scale_max: float = _opt(1.2, "see --scale-min", metavar="F")
    hflip: float = _opt(0.5, "horizontal flip probability in training", metavar="P")
    epochs: int = _opt(12, "training epochs", metavar="N")
    batch_size: int = _opt(8, "images per step", metavar="N")
    lr: float = _opt(1e-4, "peak AdamW learning rate per 16 images: the run uses lr x batch / 16", metavar="LR")
    min_lr: float = _opt(1e-6, "learning rate at the end of the cosine, per 16 images", metavar="LR")
    warmup_epochs: float = _opt(1.0, "linear warm-up epochs (part of --epochs; left unset, a 1-epoch run warms up "
                                "for 1/12 of it, the default's share of the default 12 epochs)", metavar="N")
    weight_decay: float = _opt(0.05, "AdamW weight decay (not on norms and biases)", metavar="WD")
    clip_grad: float = _opt(1.0, "clip the gradient norm to this (0: off)", metavar="NORM")
    amp: str = _opt("auto", "autocast: bf16 on CUDA by default, off on CPU", choices=("auto", "bf16", "fp16", "off"))
    device: str = _opt("auto", "auto: CUDA when available", choices=("auto", "cpu", "cuda"))
    cudnn_benchmark: str = _opt("auto", "cuDNN's algorithm search per new input shape (torch.backends.cudnn."
                                "benchmark). auto: on to segment; off to detect, where the mask head's batch (the "
                                "positive RoIs) changes size every step and every new size would be searched again",
                                choices=("auto", "on", "off"))
    workers: int = _opt(-1, "data loader processes (-1: none on CPU, else one per spare core, at most 16)",
                        metavar="N")
    train_subset: int = _opt(0, "train on this many images, a fixed random pick (0: all)", metavar="N")
    val_subset: int = _opt(0, "validate on this many images, a fixed random pick (0: all)", metavar="N")
    eval_batch_size: int = _opt(8, "images per evaluation batch", metavar="N")
    strict_data: bool = _opt(False, "stop at the first unreadable image or mask instead of skipping it")
    seed: int = _opt(0, "seed of the initialization, the sample order and the augmentation", metavar="N")
    log_interval: int = _opt(10, "log the training loss every N steps", metavar="N")
    out: Optional[str] = _opt(None, "run folder (default: runs/<model>-<task>-<data folder name>)", metavar="DIR")
    resume: Optional[str] = _opt(None, "continue a stopped run: 'auto' (with --out, or the newest run of this "
                                 "model, task and data), a run folder or its last.state.pt", metavar="RUN")

    def backbone_kwargs(self) -> dict[str, Any]:
        """The :func:`~vigla.dense.backbone.backbone_with_fpn` model arguments of this run."""
        kwargs = parse_json_object(self.model_args, "--model-args")
        if self.drop_path is not None:
            kwargs["drop_path_rate"] = self.drop_path
        return kwargs


FIELDS = {f.name: f for f in dataclasses.fields(DenseConfig)}


def cudnn_benchmark(cfg: DenseConfig) -> bool:
    """Whether the run turns on ``torch.backends.cudnn.benchmark`` (``--cudnn-benchmark``). Detection is off by
    default: Mask R-CNN's mask head convolves the positive RoIs of the batch, a number that differs from step to
    step, and the search would run again for each new count (detectron2 leaves it off for the same reason)."""
    if cfg.cudnn_benchmark == "auto":
        return cfg.task != "detect"
    return cfg.cudnn_benchmark == "on"


def parse_json_object(text: str, flag: str) -> dict[str, Any]:
    """``--model-args`` / ``--detector-args``: a JSON object of keyword arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} must be a JSON object, e.g. '{{\"depths\": [1, 1, 3, 1]}}' ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object, got {text!r}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults are shown in the help but left out of the namespace (see the module)."""
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="read settings from a YAML file (keys are the long flag names, e.g. a run's config.yaml); "
                             "flags win")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help") + f" (default: {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"), **meta)


def config_to_yaml(cfg: DenseConfig) -> str:
    return yaml.safe_dump({k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SAVED},
                          sort_keys=False)


def saved_config(values: dict[str, Any], path: str) -> dict[str, Any]:
    """The settings of a run's config.yaml ``path`` that ``vigla dense train --resume`` takes
    (:func:`vigla.engine.config.resumed_settings`)."""
    return resumed_settings(values, FIELDS, path, "vigla dense train")


def resolve_config(flags: dict[str, Any], saved: Optional[dict[str, Any]] = None,
                   saved_path: Optional[str] = None, from_file: Optional[dict[str, Any]] = None) -> DenseConfig:
    """Defaults < ``saved`` (the settings of a resumed run's config.yaml, ``saved_path``) < ``from_file`` (the
    ``--config`` file's, checked as :func:`vigla.engine.config.read_yaml` read them) < ``flags``, checked: each value
    against its setting's type and choices where it comes from (:func:`vigla.engine.config.check_setting`; the
    ``--config`` file or a flag replaces one of the wrong type in the config.yaml), then the values together. The
    detector flags' check (a segmentation run refuses them) reads the flags alone, as a saved config.yaml may name
    the default detector.

    A warm-up that neither sets and that does not fit into ``--epochs`` (its 1 epoch in a 1-epoch run) keeps the
    default run's share instead (1/12 of it), as ``vigla train`` does with its presets' warm-ups."""
    flags = {k: v for k, v in flags.items() if k in FIELDS}
    upper = {**(from_file or {}), **flags}
    source = saved_path or "the saved config.yaml of the resumed run"
    values = {**{k: check_setting(FIELDS[k], v, source, override=True) for k, v in (saved or {}).items()
                 if k not in upper},
              **(from_file or {}), **{k: check_setting(FIELDS[k], v) for k, v in flags.items()}}
    if "warmup_epochs" not in values:
        values["warmup_epochs"] = _default_warmup(values.get("epochs", FIELDS["epochs"].default))
    cfg = DenseConfig(**values)
    _validate(cfg)
    _check_detector_flags(cfg, flags)
    return cfg


def _default_warmup(epochs: int) -> float:
    warmup, default_epochs = FIELDS["warmup_epochs"].default, FIELDS["epochs"].default
    return warmup if warmup < epochs else epochs * warmup / default_epochs


def _check_detector_flags(cfg: DenseConfig, flags: dict[str, Any]) -> None:
    """``--detector`` / ``--detector-args`` typed for a segmentation run: refused, not ignored (the defaults, and
    the detector a segmentation run saves in its config.yaml, are not the user's choice)."""
    given = [f"--{name.replace('_', '-')}" for name in ("detector", "detector_args") if name in flags]
    if cfg.task == "detect" or not given:
        return
    names = " and ".join(given)
    raise UserError(f"{names} {'applies' if len(given) == 1 else 'apply'} to --task detect only, this run is "
                    f"--task segment (a semantic FPN head): leave {names} out, or train a detector with --task detect")


def _validate(cfg: DenseConfig) -> None:
    if cfg.data is None:
        raise UserError("--data is required: a COCO-format folder (`vigla dense data` makes one)")
    for name in ("epochs", "batch_size", "img_size", "max_size", "fpn_channels", "log_interval", "eval_batch_size"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.max_size < cfg.img_size:
        raise UserError(f"--max-size ({cfg.max_size}) must be at least --img-size ({cfg.img_size})")
    if not 0 < cfg.scale_min <= cfg.scale_max:
        raise UserError(f"need 0 < --scale-min <= --scale-max, got {cfg.scale_min} and {cfg.scale_max}")
    if not 0 <= cfg.hflip <= 1:
        raise UserError(f"--hflip is a probability in [0, 1], got {cfg.hflip}")
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        raise UserError(f"--warmup-epochs must be in [0, --epochs={cfg.epochs}), got {cfg.warmup_epochs}: lower "
                        f"--warmup-epochs (e.g. --warmup-epochs 0) or raise --epochs")
    if min(cfg.train_subset, cfg.val_subset) < 0:
        raise UserError("--train-subset and --val-subset must be >= 0")
    if cfg.clip_grad < 0:
        raise UserError(f"--clip-grad must be >= 0, got {cfg.clip_grad}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {cfg.lr}")
    if not (math.isfinite(cfg.min_lr) and 0 <= cfg.min_lr <= cfg.lr):
        raise UserError(f"--min-lr must be in [0, --lr={cfg.lr}] (the cosine's end), got {cfg.min_lr}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise UserError(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    if cfg.drop_path is not None and not 0 <= cfg.drop_path < 1:
        raise UserError(f"--drop-path must be in [0, 1), got {cfg.drop_path}")
    parse_json_object(cfg.model_args, "--model-args")
    parse_json_object(cfg.detector_args, "--detector-args")
