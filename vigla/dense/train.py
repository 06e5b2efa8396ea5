"""The dense training loop (``vigla dense train``): detection or segmentation on a COCO-format folder, with the
classification engine's guarantees and pieces.

* Checkpoints as ``vigla train`` writes them (:mod:`vigla.engine.checkpoint`, atomic): ``last.safetensors`` /
  ``.json`` / ``.state.pt`` every epoch and on SIGINT / SIGTERM (:class:`vigla.engine.run.StopRequest`),
  ``best.*`` at the best validation metric (box mAP, or mIoU). ``--resume`` continues from the exact step:
  the sample order (:class:`vigla.data.ResumableDistributedSampler`), each sample's augmentation (drawn from
  ``(seed, epoch, index)``), optimizer, schedule, gradient scaler and RNG states.
* A NaN / inf loss stops the run before that step touches the weights; CUDA running out of memory, bad flags,
  data or checkpoints end with one line (:mod:`vigla.engine.errors`).
* Logs: ``config.yaml``, ``run.json``, ``steps.csv``, ``metrics.csv`` (:class:`vigla.engine.metrics.MetricsLog`),
  ``curves.png``, ``results.json``.

One process, one device (CPU or one GPU); AdamW with a cosine schedule after a linear warm-up, per step. The run's
lifecycle (output folder, checkpoints, resume, loss read-back, the loop) is :class:`vigla.engine.run.TrainingRun`.
"""
from __future__ import annotations

import json
import os
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import Dataset
from tqdm import tqdm

from vigla.data import DataError, ResumableDistributedSampler, default_workers
from vigla.engine.checkpoint import capture_rng, load_into, load_state, load_weights, read_meta, restore_rng
from vigla.engine.errors import CheckpointError, OutOfMemory, UserError
from vigla.engine.modeling import check_model_name
from vigla.engine.metrics import save_curves
from vigla.engine.outputs import write_text
from vigla.engine.precision import autocast
from vigla.engine.run import (BEST, LAST, TrainingRun, seed_everything, vigla_version, warmup_steps,
                              warn_unreadable, find_resume_state, run_name)

from .config import DenseConfig, config_to_yaml, cudnn_benchmark, parse_json_object
from .data import (IGNORE, CocoSplit, DetectionDataset, SegmentationDataset, collate_detection, collate_segmentation,
                   require_pycocotools)
from .evaluate import evaluate_detector, evaluate_segmenter
from .models import build_detector, build_segmenter

__all__ = ["DenseTrainer", "build_model", "main_metric", "model_meta"]


def main_metric(task: str) -> str:
    """The validation metric that picks ``best``: box AP, or mIoU."""
    return "box_ap" if task == "detect" else "miou"


def model_meta(cfg: DenseConfig, classes: list[str]) -> dict:
    """What rebuilds the model of a run (:func:`build_model`), saved beside its weights."""
    detect = cfg.task == "detect"
    return {"task": cfg.task, "detector": cfg.detector if detect else None,
            "detector_kwargs": parse_json_object(cfg.detector_args, "--detector-args") if detect else {},
            "model": cfg.model,
            "backbone_kwargs": cfg.backbone_kwargs(), "fpn_channels": cfg.fpn_channels, "classes": classes,
            "img_size": cfg.img_size, "max_size": cfg.max_size}


def build_model(meta: dict, train_sizes: tuple[int, ...] | None = None, weights: str | None = None) -> nn.Module:
    """The detector / segmentation model that ``meta`` (:func:`model_meta`) describes; ``train_sizes``: the
    detector's shorter sides to pick from in training (the evaluation size last)."""
    check_model_name(meta["model"])
    kwargs = dict(meta["backbone_kwargs"], out_channels=meta["fpn_channels"], weights=weights)
    num_classes = len(meta["classes"]) + 1
    try:
        if meta["task"] == "detect":
            return build_detector(meta["detector"], meta["model"], num_classes,
                                  min_size=train_sizes or meta["img_size"], max_size=meta["max_size"],
                                  detector_kwargs=meta["detector_kwargs"], **kwargs)
        return build_segmenter(meta["model"], num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build a {meta['task']} model on {meta['model']}: {_first_line(e)}") from None


#: what a resume compares between the model_meta of its state and its own run
RESUME_META_KEYS = ("task", "model", "detector", "classes")


def state_meta(state: dict, path: str) -> dict:
    """The ``model_meta`` of the training state ``state`` (the file ``path``) as a dict holding
    :data:`RESUME_META_KEYS`: vigla saves it as the text of a JSON object; a dict (a state loaded and saved again) is
    taken as it is. Else a :class:`CheckpointError` in one line saying the state is damaged, what is wrong with its
    model_meta and the ways on."""
    meta, problem = _read_meta(state["model_meta"])
    if meta is not None:
        return meta
    raise CheckpointError(f"{path} is damaged: its model_meta is unreadable ({problem}); resume from another "
                          f"checkpoint, or start a new run without --resume")


def _read_meta(value) -> tuple[dict | None, str]:
    """A state's ``model_meta`` (JSON text or a dict) -> (the dict, "") when it holds :data:`RESUME_META_KEYS`, else
    (None, what is wrong: "not valid JSON: ...", "JSON holding a list, not an object", "None, neither the JSON text of
    an object nor a dict", "it lacks task, classes")."""
    text = isinstance(value, (str, bytes, bytearray))
    if text:
        try:
            value = json.loads(value)
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            return None, f"not valid JSON: {_first_line(e)}"
    if not isinstance(value, dict) and text:
        return None, f"JSON holding {_kind(value)}, not an object"
    if not isinstance(value, dict):
        return None, f"{_kind(value)}, neither the JSON text of an object nor a dict"
    missing = [key for key in RESUME_META_KEYS if key not in value]
    return (None, f"it lacks {', '.join(missing)}") if missing else (value, "")


def _kind(value) -> str:
    """``value``'s type as a message names it: "None", "a list", "an int"."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


class _Subset(Dataset):
    """``dataset`` restricted to ``indices``; keys ``(epoch, i)`` map to ``(epoch, indices[i])``."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        return self.dataset[(epoch, self.indices[i])]


def _pick(n: int, subset: int, seed: int) -> list[int]:
    if subset <= 0 or subset >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, subset, replace=False).tolist())


class DenseTrainer(TrainingRun):
    """Builds a run from a :class:`DenseConfig`; :meth:`run` trains and returns an exit code (see
    :class:`~vigla.engine.run.TrainingRun`: this class adds the COCO data, the detector / segmenter, one step
    and the epoch's validation).

    ``stop_after_steps``: stop (and save) after that many optimizer steps in all, through the signal path
    (the tests interrupt a run mid-epoch with it).
    """

    command = "vigla dense train"
    eval_command = "vigla dense eval"
    state_keys = ("model_meta", "epoch", "step_in_epoch", "global_step", "steps_per_epoch", "total_steps",
                  "batch_size", "epoch_loss", "model", "optimizer", "scheduler", "scaler", "best", "rng")
    img_s_digits = 1
    log_on_stop = True

    def _setup_device(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("vigla dense train runs in one process on one device; torchrun is not supported")
        self.device = _device(self.cfg.device)

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        torch.backends.cudnn.benchmark = cudnn_benchmark(cfg)
        self.amp_dtype, self.scaler = self._precision()
        require_pycocotools()
        self._build_data()  # before the output folder: bad data leaves nothing behind
        self.out = self._prepare_out_dir()
        self._build_model()
        self._build_optimisation()
        self.best = {main_metric(cfg.task): -1.0, "epoch": 0}
        self._start()

    def _run_name(self) -> str:
        return run_name(f"{self.cfg.model}-{self.cfg.task}", self.cfg.data)

    def _config_yaml(self) -> str:
        return config_to_yaml(self.cfg)

    def _build_data(self):
        cfg = self.cfg
        self.train_split, self.val_split = CocoSplit(cfg.data, "train"), CocoSplit(cfg.data, "val")
        if self.train_split.classes != self.val_split.classes:
            raise DataError(f"{cfg.data}: train/ and val/ have different categories "
                            f"({len(self.train_split.classes)} vs {len(self.val_split.classes)})")
        self.classes = self.train_split.classes
        self.masks = cfg.task == "detect" and cfg.detector == "mask_rcnn"
        if self.masks and not (self.train_split.has_masks() and self.val_split.has_masks()):
            raise DataError(f"{cfg.data}: mask_rcnn needs a segmentation in every annotation; train boxes only "
                            f"with --detector faster_rcnn or retinanet")
        if cfg.workers >= 0:
            self.workers = cfg.workers
        else:
            self.workers = 0 if self.device.type == "cpu" else default_workers()
        if cfg.task == "detect":
            train_set = DetectionDataset(self.train_split, self.masks, cfg.hflip, seed=cfg.seed)
            val_set = DetectionDataset(self.val_split, self.masks)
            train_collate = eval_collate = collate_detection
        else:
            train_set = SegmentationDataset(self.train_split, cfg.img_size, cfg.max_size, cfg.hflip,
                                            (cfg.scale_min, cfg.scale_max), seed=cfg.seed)
            val_set = SegmentationDataset(self.val_split, cfg.img_size, cfg.max_size)
            train_collate, eval_collate = collate_segmentation, partial(collate_segmentation, train=False)
        self.train_set = _Subset(train_set, _pick(len(train_set), cfg.train_subset, cfg.seed))
        self.val_set = _Subset(val_set, _pick(len(val_set), cfg.val_subset, cfg.seed + 1))
        self.sampler = ResumableDistributedSampler(self.train_set, 1, 0, shuffle=True, seed=cfg.seed)
        self.global_batch = cfg.batch_size
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(self.train_set)} training "
                            f"images: lower --batch-size")
        self.train_loader = self._loader(self.train_set, self.sampler, cfg.batch_size, train_collate, True)
        self.val_loader = self._loader(self.val_set, None, cfg.eval_batch_size, eval_collate, False)

    def _build_model(self):
        cfg = self.cfg
        self.meta = model_meta(cfg, self.classes)
        sizes = tuple(sorted({round(cfg.img_size * f) for f in np.linspace(cfg.scale_min, cfg.scale_max, 5)}
                             - {cfg.img_size})) + (cfg.img_size,)
        weights = cfg.backbone_weights if self.resume_state is None else None
        if weights is not None and not os.path.isfile(weights):
            raise CheckpointError(f"--backbone-weights {weights} does not exist")
        detect_sizes = sizes if cfg.task == "detect" else None
        try:
            model = build_model(self.meta, detect_sizes, weights)
        except (RuntimeError, KeyError, ValueError, TypeError, AssertionError) as e:
            if weights is None or not self._builds(detect_sizes):  # the settings, not the weights
                raise UserError(f"{cfg.model} cannot be built with these settings (--model-args, --detector-args?): "
                                f"{_first_line(e)}") from None
            raise CheckpointError(f"--backbone-weights {weights} does not load into {cfg.model}: "
                                  f"{_first_line(e)}") from None
        if cfg.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.core = self.model = model.to(self.device)

    def _builds(self, detect_sizes) -> bool:
        """Whether the model builds from the settings alone (no weights): which of the two a failure was."""
        try:
            build_model(self.meta, detect_sizes, None)
        except (RuntimeError, KeyError, ValueError, TypeError, AssertionError):
            return False
        return True

    def _build_optimisation(self):
        cfg = self.cfg
        scale = cfg.batch_size / 16
        self.lr = cfg.lr * scale
        self.optimizer = create_optimizer_v2(self.model, opt="adamw", lr=self.lr, weight_decay=cfg.weight_decay)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        warmup = warmup_steps(cfg.warmup_epochs, self.steps_per_epoch, self.total_steps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=self.total_steps - warmup, warmup_epochs=warmup,
            warmup_lr=self.lr * 1e-3, min_lr=cfg.min_lr * scale, warmup_prefix=True, step_on_epochs=False,
            updates_per_epoch=1)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _meta(self, val: dict | None) -> dict:
        return {**self.meta, "data": os.path.abspath(self.cfg.data), "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "global_step": self.global_step, "val": val,
                "vigla_version": vigla_version()}

    def _train_state(self) -> dict:
        """The training state: weights, optimizer, schedule, RNG, and the model's description."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "batch_size": self.cfg.batch_size, "epoch_loss": list(self.epoch_loss), "step_lr": self.step_lr,
                "unreadable": sorted(self.unreadable),
                "model_meta": json.dumps(self.meta), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "best": dict(self.best), "rng": capture_rng()}

    def _kept_position(self, meta: dict) -> str:
        return f"global step {meta['global_step']}"

    @classmethod
    def require_state(cls, state: dict, path: str) -> None:
        """:meth:`TrainingRun.require_state`, and a ``model_meta`` that :func:`state_meta` reads."""
        super().require_state(state, path)
        state_meta(state, path)

    def _load_resume(self, path: str) -> None:
        state = load_state(path)
        self.require_state(state, path)
        meta = state_meta(state, path)
        for key in RESUME_META_KEYS:
            if meta.get(key) != self.meta[key]:
                raise CheckpointError(f"{path} was trained with {key} {meta.get(key)!r}, this run has "
                                      f"{self.meta[key]!r}")
        if state["batch_size"] != self.cfg.batch_size or state["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(f"{path}: the run had {state['steps_per_epoch']} steps of {state['batch_size']} "
                                  f"images per epoch, this one {self.steps_per_epoch} of {self.cfg.batch_size}: "
                                  f"resume with the same --batch-size and data")
        load_into(self.model, state["model"], f"checkpoint {path}")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit this model ({e})") from None
        self._restore_schedule(state)
        self.unreadable = set(state.get("unreadable", ()))
        restore_rng(state["rng"])

    def _update_best(self, val: dict) -> bool:
        """``self.best``: this epoch's weights where their validation beats the best so far. -> whether it did."""
        key = main_metric(self.cfg.task)
        if (val.get(key) or 0.0) <= self.best[key]:
            return False
        self.best = {key: val.get(key) or 0.0, "epoch": self.epoch, "val": val}
        return True

    def _best_state(self) -> tuple[dict, dict]:
        """The best weights (this run's model at the best epoch) and their description (:meth:`_save_best`)."""
        return self.model.state_dict(), self._meta(self.best.get("val"))

    # ------------------------------------------------------------------------------------------- one step
    def _loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's loss (0-d, fp32) and, for the detectors, its parts."""
        if self.cfg.task == "detect":
            images, targets, _ = batch
            x = [img.to(self.device, non_blocking=True).float().div_(255) for img in images]
            t = [{k: v.to(self.device, non_blocking=True) for k, v in tgt.items()} for tgt in targets]
            with autocast(self.device, self.amp_dtype):
                parts = self.model(x, t)
            parts = {k: v.float() for k, v in parts.items()}
            return sum(parts.values()), parts
        images, labels, _, _ = batch
        x = images.to(self.device, non_blocking=True).float().div_(255)
        y = labels.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE, reduction="sum")
        return loss / (y != IGNORE).sum().clamp_min(1), {}

    def train_step(self, batch) -> torch.Tensor:
        """Forward, backward, clip, step, schedule -> ``[loss, *parts]``, a tensor on the device: nothing here
        waits for the device; :meth:`_read_losses` reads the losses back (and checks them) every
        ``--log-interval`` steps, at the end of the epoch and before any save."""
        loss, parts = self._loss(batch)
        self._part_names = list(parts)
        self._update(loss)
        return torch.stack([loss.detach(), *(v.detach() for v in parts.values())])

    def _oom_message(self, where: str) -> str:
        return (f"CUDA out of memory during {where} with --batch-size {self.cfg.batch_size} at --img-size "
                f"{self.cfg.img_size} ({self.cfg.model}). Try --batch-size {max(1, self.cfg.batch_size // 2)} or "
                f"--grad-checkpointing")

    # ------------------------------------------------------------------------------------------- loop
    def _train_on(self, batch) -> torch.Tensor:
        """One :meth:`train_step` on a loader batch (its last item: the unreadable files) -> its losses."""
        self._count_unreadable(batch[-1], len(batch[1]) if batch[1] is not None else 0)
        return self.train_step(batch)

    def _count_unreadable(self, errors: list[str], kept: int) -> None:
        if not errors:
            return
        if self.cfg.strict_data or kept == 0:
            why = "--strict-data stops at the first bad file" if self.cfg.strict_data else "a whole batch of them"
            raise DataError(f"unreadable sample {errors[0]} ({why})")
        if not self.unreadable:
            tqdm.write(f"warning: skipping unreadable sample(s), the batch is smaller: {errors[0]}")
        self.unreadable.update(errors)

    def evaluate(self) -> dict:
        """The validation metrics of the current weights (:mod:`vigla.dense.evaluate`)."""
        try:
            if self.cfg.task == "detect":
                return evaluate_detector(self.model, self.val_loader, self.val_split, self.device, self.amp_dtype,
                                         self.masks)
            return evaluate_segmenter(self.model, self.val_loader, len(self.classes) + 1, self.device,
                                      self.amp_dtype)
        except torch.OutOfMemoryError:
            raise OutOfMemory(self._oom_message("evaluation")) from None

    def _end_epoch(self) -> None:
        self._check_weights()  # before validating and saving them
        val = self.evaluate()
        if val["unreadable"] and not self._val_warned:
            warn_unreadable(val, "validation")
            self._val_warned = True
        key = main_metric(self.cfg.task)
        row = {"epoch": self.epoch, "global_step": self.global_step, "lr": self.epoch_lr(),
               "train_loss": self.epoch_loss[0] / max(self.epoch_loss[1], 1),
               **{f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))},
               "epoch_time_s": round(self.train_time, 2), "train_img_per_s": round(self.train_ips, 2),
               "unreadable_samples": len(self.unreadable)}
        self.epoch += 1
        self.step_in_epoch, self.epoch_loss = 0, [0.0, 0]
        self._save_epoch(val, self._update_best(val))
        self.log.log_epoch(row)
        extra = f" | mask AP {val['mask_ap']:.2f}" if val.get("mask_ap") is not None else ""
        tqdm.write(f"epoch {self.epoch}/{self.cfg.epochs}: train loss {row['train_loss']:.4f} | val {key} "
                   f"{val.get(key) or 0.0:.2f}{extra} | {row['train_img_per_s']:.1f} img/s")

    def _finish(self) -> int:
        """``results.json`` (the best validation metrics) and ``curves.png``."""
        key = main_metric(self.cfg.task)
        best_path = os.path.join(self.out, f"{BEST}.safetensors")
        best_val = read_meta(best_path)["val"] if os.path.isfile(best_path) else None
        results = {"task": self.cfg.task, "detector": self.meta["detector"], "model": self.cfg.model,
                   "best": self._best_record(), "best_val": best_val, "epochs": self.cfg.epochs,
                   "global_step": self.global_step,
                   "val_split": f"{len(self.val_set)} images of {self.cfg.data}/val", "out": self.out}
        write_text(os.path.join(self.out, "results.json"), json.dumps(results, indent=2))
        self.log.flush()
        plot_dense_curves(self.out, key, f"{self.cfg.model} {self.cfg.task}")
        print(f"best val {key} {self.best[key]:.2f} after epoch {self.best['epoch']}\n"
              f"wrote {self.out}/: {LAST}.safetensors, {BEST}.safetensors, metrics.csv, curves.png, results.json",
              flush=True)
        return 0

    def _run_info(self) -> dict:
        return {"device": self._device_name(), "amp": str(self.amp_dtype), "n_params": self.n_params,
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "lr_scaled": self.lr, "steps_per_epoch": self.steps_per_epoch, "workers": self.workers,
                "train_images": len(self.train_set), "val_images": len(self.val_set), "classes": self.classes}

    def _describe(self) -> list[str]:
        cfg = self.cfg
        what = f"{cfg.detector} on {cfg.model}" if cfg.task == "detect" else f"semantic FPN on {cfg.model}"
        return [f"vigla dense train: {cfg.task}, {what} ({self.n_params / 1e6:.2f}M params)",
                f"  data {cfg.data}: {len(self.train_set)} train / {len(self.val_set)} val images, "
                f"{len(self.classes)} classes, shorter side {cfg.img_size}px",
                f"  {cfg.epochs} epochs x {self.steps_per_epoch} steps, batch {cfg.batch_size}, lr {self.lr:.3g} "
                f"({cfg.lr:g} per 16), AdamW, wd {cfg.weight_decay}"]


def resume_state_for(cfg_flags: dict) -> str:
    """The ``last.state.pt`` that ``--resume`` names (see :func:`vigla.engine.run.find_resume_state`)."""
    model, task = cfg_flags.get("model", "vig_h_tiny"), cfg_flags.get("task", "detect")
    return find_resume_state(cfg_flags["resume"], cfg_flags.get("out"), f"{model}-{task}", cfg_flags.get("data"))


def plot_dense_curves(out_dir: str, metric: str, title: str) -> str | None:
    """``curves.png``: the training loss per logged step (left), the validation ``metric`` per epoch (right)."""
    import csv

    def rows(name):
        path = os.path.join(out_dir, name)
        return list(csv.DictReader(open(path))) if os.path.isfile(path) else []

    steps, epochs = rows("steps.csv"), rows("metrics.csv")
    if not steps and not epochs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([float(r["epoch_progress"]) for r in steps], [float(r["loss"]) for r in steps], lw=0.8)
    ax_val.plot([int(r["epoch"]) + 1 for r in epochs], [float(r.get(f"val_{metric}") or 0) for r in epochs], "o-")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_val.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    return save_curves(fig, (ax_loss, ax_val), out_dir, title)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def load_dense(path: str) -> tuple[nn.Module, dict]:
    """A dense model with the weights of ``path`` (vigla ``.safetensors`` with its ``.json``) and its meta."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    meta = read_meta(path) if path.endswith(".safetensors") else None
    if meta is None or "task" not in meta:
        raise CheckpointError(f"{path} is not a `vigla dense train` checkpoint (a .safetensors file with the "
                              f".json written beside it)")
    model = build_model(meta)
    load_into(model, load_weights(path), f"checkpoint {path}")
    return model, meta
