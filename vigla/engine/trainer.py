"""The classification training loop (``vigla train``): timm pieces (transforms, Mixup, optimizer, cosine scheduler,
ModelEmaV3), DDP and AMP on the run lifecycle of :class:`vigla.engine.run.TrainingRun` (output folder, atomic
checkpoints every epoch and on SIGINT/SIGTERM, exact mid-epoch resume, clear errors)."""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn as nn
from timm.data import Mixup, resolve_model_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from vigla.data import (BatchPrep, DataError, ResumableDistributedSampler, ShardSampler, TransformedDataset,
                        available_cpus, collate, default_workers, eval_transform, load_splits, train_transform)
from vigla.notices import ViglaWarning

from . import distributed as dist_utils
from .aux_branch import NO_BRANCH, castling_model_args, checkpoint_record, validate_aux_branch
from .checkpoint import capture_rng, load_into, load_state, load_weights, read_meta, restore_rng
from .config import config_to_yaml
from .cuda_graph import CudaGraphTrainStep
from .errors import CheckpointError, OutOfMemory, UserError
from .evaluate import evaluate, top5_text
from .metrics import plot_curves
from .modeling import check_runs_at, create_model, enable_grad_checkpointing, model_args
from .outputs import write_text
from .precision import autocast
from .ranks import rank_note
from .run import (BEST, LAST, TrainingRun, seed_everything, vigla_version, warmup_steps, warn_unreadable,
                  run_name)


class Trainer(TrainingRun):
    """Builds everything a run needs from a :class:`~vigla.engine.config.TrainConfig`; :meth:`run` trains and
    returns an exit code (see :class:`~vigla.engine.run.TrainingRun`: this class adds the data, the model, Mixup,
    EMA, DDP, one step and the epoch's validation).

    ``stop_after_steps`` asks for a stop after that many optimizer steps in all, through the same path as
    a signal (used by the tests to interrupt a run mid-epoch deterministically).
    """

    #: format 1's keys (format 2 adds the weights: :meth:`required_keys`)
    state_keys = ("epoch", "step_in_epoch", "global_step", "total_steps", "global_batch", "world_size", "epoch_loss",
                  "optimizer", "scheduler", "scaler", "ema", "best", "rng")
    prefetch_factor = 4

    def _setup_device(self) -> None:
        self.dist = dist_utils.setup(self.cfg.device)
        self.device, self.is_main, self.world_size = self.dist.device, self.dist.is_main, self.dist.world_size

    def _build(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed + self.dist.rank)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        self.amp_dtype, self.scaler = self._precision()
        if cfg.cuda_graph:
            self._check_cuda_graph()
        self.out = self._prepare_out_dir()
        self._build_data()
        self._build_model()
        self._build_optimisation()
        self.best = {"top1": -1.0, "epoch": 0, "weights": None}
        self._start()

    def _check_cuda_graph(self) -> None:
        """``--cuda-graph``'s needs that the settings alone do not show (:mod:`.config` checks the rest)."""
        cfg = self.cfg
        if self.device.type != "cuda":
            raise UserError(f"--cuda-graph needs a CUDA device, this run is on {self.device.type}: drop the flag")
        if self.dist.enabled:
            raise UserError("--cuda-graph trains on one GPU: DDP's gradient hooks run on the host; drop the flag "
                            "under torchrun")
        if cfg.model.startswith("castling_") and (cfg.castling_schedule or "").strip().lower() != NO_BRANCH:
            raise UserError(f"--cuda-graph: {cfg.model}'s auxiliary branch follows --castling-schedule on the "
                            f"host at every step, which a replayed step cannot; add --castling-schedule none or "
                            f"drop --cuda-graph")

    def _run_name(self) -> str:
        return run_name(self.cfg.model, self.cfg.data)

    def _config_yaml(self) -> str:
        return config_to_yaml(self.cfg)

    def _build_data(self):
        cfg = self.cfg
        cpus = available_cpus()
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.splits = load_splits(cfg.data, fmnist_dir=cfg.fmnist_dir, train_subset=cfg.train_subset,
                                  val_subset=cfg.val_subset, test_subset=cfg.test_subset, seed=cfg.seed,
                                  in_memory=cfg.in_memory, strict=cfg.strict_data,
                                  threads=max(1, cpus // local_procs))
        in_memory = cfg.data is None or cfg.in_memory
        if cfg.workers >= 0:
            self.workers = cfg.workers
        elif in_memory and self.device.type == "cpu":
            self.workers = 0
        else:
            self.workers = default_workers(local_procs)
        self.num_classes = len(self.splits.classes)

    def _build_model(self):
        cfg, d = self.cfg, self.dist
        self.model_args = model_args(self.num_classes, cfg.img_size, cfg.drop_path)
        self.model_args.update(castling_model_args(cfg))  # --castling-schedule (castling_* models only)
        model = create_model(cfg.model, **self.model_args)
        data_cfg = resolve_model_data_config(model)
        self.data_config = dict(mean=list(data_cfg["mean"]), std=list(data_cfg["std"]), img_size=cfg.img_size,
                                interpolation=cfg.interpolation, crop_pct=cfg.crop_pct)
        self.n_params = sum(p.numel() for p in model.parameters())
        mean, std = data_cfg["mean"], data_cfg["std"]
        self.train_set = TransformedDataset(
            self.splits.train, seed=cfg.seed,
            transform=train_transform(cfg.img_size, scale_min=cfg.scale_min, hflip=cfg.hflip,
                                      color_jitter=cfg.color_jitter,
                                      auto_augment=None if cfg.aa.lower() == "none" else cfg.aa,
                                      interpolation=cfg.interpolation, mean=mean, std=std))
        self.eval_tf = eval_transform(cfg.img_size, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                                      mean=mean, std=std)
        self.sampler = ResumableDistributedSampler(self.train_set, d.world_size, d.rank, shuffle=True, seed=cfg.seed)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {cfg.batch_size} x {d.world_size} process(es) is larger than the "
                            f"{len(self.train_set)} training images: lower --batch-size")
        self.train_loader = self._loader(self.train_set, self.sampler, cfg.batch_size, collate, drop_last=True)
        self.val_loader = self._eval_loader(self.splits.val)
        self.prep_train = BatchPrep(mean, std, self.device, re_prob=cfg.reprob)
        self.prep_eval = BatchPrep(mean, std, self.device)

        model.to(self.device)
        check_runs_at(model, cfg.model, cfg.img_size, self.device, "--img-size")
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(model, cfg.model)
        self.core = model
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None
        if d.enabled:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None)
        self.model = torch.compile(model) if cfg.compile else model

    def _eval_loader(self, source) -> DataLoader:
        dataset = TransformedDataset(source, self.eval_tf, replace_unreadable=False)
        return self._loader(dataset, ShardSampler(len(dataset), self.dist.world_size, self.dist.rank),
                            self.cfg.batch_size, collate, drop_last=False)

    def _build_optimisation(self):
        cfg, d = self.cfg, self.dist
        self.global_batch = cfg.batch_size * d.world_size
        scale = self.global_batch / 512
        self.lr = cfg.lr * scale
        # PyTorch's fused Adam(W): one pass over each parameter instead of a dozen ops (a dozen launches per
        # parameter group on a GPU); --cuda-graph: the step on the device, the lr read from a device tensor
        fused = {"fused": True} if cfg.opt.lower() in ("adam", "adamw") else {}
        if cfg.cuda_graph:
            fused["capturable"] = True
        self.optimizer = create_optimizer_v2(self.core, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay,
                                             **fused)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        warmup = warmup_steps(cfg.warmup_epochs, self.steps_per_epoch, self.total_steps)
        # one scheduler "epoch" per optimizer step: integer step counts; warm-up comes first, inside --epochs
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=self.total_steps - warmup, warmup_epochs=warmup,
            warmup_lr=cfg.warmup_lr * scale, min_lr=cfg.min_lr * scale, warmup_prefix=True, step_on_epochs=False,
            updates_per_epoch=1)
        self.mixup = None
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing,
                               num_classes=self.num_classes)
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.graph_step = None
        if cfg.cuda_graph:
            self.graph_step = CudaGraphTrainStep(self.core, self.optimizer, self.criterion, self.amp_dtype,
                                                 clip_grad=cfg.clip_grad)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _meta(self, val: dict | None, weights: str = "model") -> dict:
        return {"model": self.cfg.model, "model_args": self.model_args, "classes": self.splits.classes,
                "data": self.splits.name, "data_config": self.data_config, "weights": weights,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "val": val, "vigla_version": vigla_version(), **checkpoint_record(self.core)}

    def _train_state(self) -> dict | None:
        """The training state, with the model's weights and all ranks' RNG states. Collective under DDP."""
        rng = dist_utils.gather(capture_rng())
        if not self.is_main:
            return None
        return {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "global_batch": self.global_batch,
            "world_size": self.dist.world_size, "sampler_seed": self.sampler.seed, "sampler_epoch": self.epoch,
            "epoch_loss": list(self.epoch_loss), "step_lr": self.step_lr, "unreadable_images": sorted(self.unreadable),
            "model_name": self.cfg.model, "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "best": dict(self.best), "rng": rng,
        }

    @classmethod
    def required_keys(cls, state: dict) -> tuple:
        """Format 1's keys; format 2 (self-contained) adds the weights, ``model``, and ``model_name``."""
        return cls.state_keys + (("model_name",) if "model" in state else ())

    def _load_resume(self, path: str) -> None:
        state = load_state(path)
        self.require_state(state, path)
        folder = os.path.dirname(path)
        weights = os.path.join(folder, f"{LAST}.safetensors")
        if "model" in state:  # format 2: self-contained
            meta = {"model": state["model_name"]}
        else:  # format 1: the weights are last.safetensors, from the same save
            meta = read_meta(weights)
            if meta is None or meta.get("global_step") != state["global_step"]:
                raise CheckpointError(f"{folder}: {LAST}.safetensors / .json and {LAST}.state.pt are from different "
                                      f"steps (or missing); the run was killed while saving, resume from another "
                                      f"copy")
            state["model"] = load_weights(weights)
        if meta["model"] != self.cfg.model:
            raise CheckpointError(f"{path} is a {meta['model']} checkpoint, this run builds {self.cfg.model}")
        if state["global_batch"] != self.global_batch:
            raise CheckpointError(
                f"{path} was trained with a global batch of {state['global_batch']} ({state['world_size']} "
                f"process(es)); this run has {self.global_batch}. Keep the global batch (--batch-size x processes) "
                f"to resume: the schedule and the position inside the epoch depend on it")
        load_into(self.core, state["model"], f"checkpoint {path}")
        self._load_optimizer(state["optimizer"])
        if self.ema is not None:
            if state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema.set(self.core)
        self._restore_schedule(state)
        self.unreadable = set(state.get("unreadable_images", ()))
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            restore_rng(rng[self.dist.rank])
        else:
            seed_everything(self.cfg.seed + self.dist.rank + 1_000_003 * self.global_step)
            if self.is_main:
                warnings.warn(f"resuming {len(rng)}-process RNG states with {self.dist.world_size} process(es): "
                              f"random streams are reseeded (sample order is kept)", ViglaWarning, stacklevel=2)

    def _load_optimizer(self, saved: dict) -> None:
        """The optimizer's saved state, stepped the way this run built it: a saved run's ``fused`` /
        ``capturable`` / ``foreach`` flags (e.g. one trained without ``--cuda-graph``) would otherwise
        replace this run's, and its step counts go where this run's steps read them."""
        keys = ("fused", "capturable", "foreach")
        built = [{k: g[k] for k in keys if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved)
        for group, flags in zip(self.optimizer.param_groups, built):
            group.update(flags)
            on_device = bool(group.get("capturable") or group.get("fused"))
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(p.device if on_device else "cpu", torch.float32)

    def _update_best(self, val: dict, ema_val: dict | None) -> bool:
        """``self.best``: this epoch's raw or EMA weights where their val top-1 beats the best so far (``epoch``:
        epochs done; ``val``: their validation, for :meth:`_best_state`). -> whether it changed."""
        improved = False
        for weights, result in (("model", val), ("ema", ema_val)):
            if result is not None and result["top1"] > self.best["top1"]:
                self.best = {"top1": result["top1"], "epoch": self.epoch, "weights": weights, "val": result}
                improved = True
        return improved

    def _best_state(self) -> tuple[dict, dict] | None:
        """The weights ``self.best`` names and their description (:meth:`_save_best`); None for EMA weights in a
        run resumed without its EMA (``--no-ema``)."""
        if self.best["weights"] == "ema" and self.ema is None:
            return None
        module = self.ema.module if self.best["weights"] == "ema" else self.core
        return module.state_dict(), self._meta(self.best.get("val"), self.best["weights"])

    # ------------------------------------------------------------------------------------------- one step
    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward, backward, clip, step, schedule, EMA -> the loss, a 0-d tensor on the device.

        Nothing here waits for the device: the loss is read back (and checked for NaN / inf) every
        ``--log-interval`` steps, at the end of the epoch and before any save, by :meth:`_read_losses`."""
        core = self.core
        if self.graph_step is not None:  # --cuda-graph: forward to optimizer step in one replay
            loss = self.graph_step(images, targets)
            self._advance()
        else:
            if hasattr(core, "set_aux_progress"):
                core.set_aux_progress(self.global_step / self.total_steps)
            with autocast(self.device, self.amp_dtype):
                loss = self.criterion(self.model(images), targets)
            if hasattr(core, "aux_loss"):
                loss = loss + core.aux_loss()
            loss = loss.float()
            self._update(loss)
        if self.ema is not None:
            self.ema.update(self.core, step=self.global_step)
        return loss.detach()

    def _oom_message(self, where: str) -> str:
        device = str(self.device)
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        return (f"CUDA out of memory during {where} with --batch-size {self.cfg.batch_size} per device at "
                f"{self.cfg.img_size}px ({self.cfg.model}, {device}). Try --batch-size "
                f"{max(1, self.cfg.batch_size // 2)}: the learning rate follows the global batch automatically")

    # ------------------------------------------------------------------------------------------- loop
    def _train_on(self, batch) -> torch.Tensor:
        """One :meth:`train_step` on a loader batch ``(images, targets, unreadable files)`` -> its loss."""
        images, targets, errors = batch
        self._count_unreadable(errors)
        x, y = self.prep_train(images), targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        return self.train_step(x, y)

    def _count_unreadable(self, errors: list[str]) -> None:
        """Count a batch's unreadable training images (``errors``: "path: error"), or stop at the first with
        ``--strict-data``. The first that a process meets is named at once, under torchrun by each rank that meets one
        in its own shard (rank k's line says so): until the epoch's end joins the ranks' sets, only this rank's are
        known here."""
        if not errors:
            return
        if self.cfg.strict_data:
            raise DataError(f"unreadable image {errors[0]} (--strict-data stops at the first bad file)")
        if not self.unreadable:
            tqdm.write(f"warning{rank_note()}: skipping unreadable image(s), replaced by the next readable one: "
                       f"{errors[0]}")
        self.unreadable.update(errors)

    def _evaluate(self, loader, model) -> dict:
        try:
            return evaluate(model, loader, self.prep_eval, self.amp_dtype)
        except torch.OutOfMemoryError:
            raise OutOfMemory(self._oom_message("evaluation")) from None

    def _end_epoch(self) -> None:
        self._check_weights()  # before validating and saving them
        self.unreadable = set().union(*dist_utils.gather(self.unreadable))  # every rank's files (each its shard's)
        val = self._evaluate(self.val_loader, self.core)
        ema_val = self._evaluate(self.val_loader, self.ema.module) if self.ema else None
        if val["unreadable"] and self.is_main and not self._val_warned:
            warn_unreadable(val, "validation")
            self._val_warned = True
        row = {"epoch": self.epoch, "global_step": self.global_step, "lr": self.epoch_lr(),
               "train_loss": self.epoch_loss[0] / max(self.epoch_loss[1], 1),
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "ema_val_top1": ema_val["top1"] if ema_val else float("nan"),
               "ema_val_top5": ema_val["top5"] if ema_val else float("nan"),
               "epoch_time_s": round(self.train_time, 2), "train_img_per_s": round(self.train_ips, 1),
               "unreadable_images": len(self.unreadable)}
        if hasattr(self.core, "aux_stats"):
            row.update({f"aux_{k}": float(v) for k, v in self.core.aux_stats().items()})
        row.update(validate_aux_branch(self.core, self.val_loader, self.prep_eval, self.amp_dtype, val))
        self.epoch += 1
        self.step_in_epoch, self.epoch_loss = 0, [0.0, 0]
        self._save_epoch(val, self._update_best(val, ema_val))
        if self.is_main:
            self.log.log_epoch(row)
            ema_txt = f" | EMA top-1 {ema_val['top1']:.2f}%" if ema_val else ""
            tqdm.write(f"epoch {self.epoch}/{self.cfg.epochs}: train loss {row['train_loss']:.4f} | val top-1 "
                       f"{val['top1']:.2f}%{top5_text(val)}{ema_txt} | {row['train_img_per_s']:.0f} img/s")
            if self.unreadable:
                tqdm.write(f"warning: {len(self.unreadable)} unreadable image(s) skipped so far "
                           f"(--strict-data makes them fatal)")

    def _finish(self) -> int:
        """Test the best weights on the test split; write results.json and curves.png."""
        best_path = os.path.join(self.out, f"{BEST}.safetensors")
        model = self.core
        dist_utils.barrier()
        if os.path.isfile(best_path):
            load_into(model, load_weights(best_path), f"checkpoint {best_path}")
        test = self._evaluate(self._eval_loader(self.splits.test), model)
        if self.is_main:
            if test["unreadable"]:
                warn_unreadable(test, "test")
            split = "the Fashion-MNIST test file" if self.cfg.data is None else f"{self.cfg.data}/val"
            split = f"{test['images']} {'fixed random ' if self.cfg.test_subset else ''}images of {split}"
            results = {"test": test, "test_split": split,
                       "best": self._best_record(), "epochs": self.cfg.epochs, "global_step": self.global_step,
                       "model": self.cfg.model, "out": self.out}
            write_text(os.path.join(self.out, "results.json"), json.dumps(results, indent=2))
            self.log.flush()
            png = plot_curves(self.out, title=f"{self.cfg.model} on {self.splits.name}")
            print(f"test top-1 {test['top1']:.2f}%{top5_text(test, '  ')} on {split} (best weights: "
                  f"{self.best['weights']} after epoch {self.best['epoch']})\n"
                  f"wrote {self.out}/: {LAST}.safetensors, {BEST}.safetensors, metrics.csv, "
                  f"{os.path.basename(png) if png else ''}, results.json", flush=True)
        return 0

    def _run_info(self) -> dict:
        return {"world_size": self.dist.world_size, "global_batch": self.global_batch, "lr_scaled": self.lr,
                "steps_per_epoch": self.steps_per_epoch, "workers": self.workers, "device": self._device_name(),
                "amp": str(self.amp_dtype), "n_params": self.n_params, "train_images": len(self.splits.train),
                "val_images": len(self.splits.val), "test_images": len(self.splits.test)}

    def _describe(self) -> list[str]:
        cfg, s = self.cfg, self.splits
        return [f"vigla train: {cfg.model} ({self.n_params / 1e6:.2f}M params), preset {cfg.preset}",
                f"  data {s.name}: {len(s.train)} train / {len(s.val)} val / {len(s.test)} test images, "
                f"{self.num_classes} classes, {cfg.img_size}px",
                f"  {cfg.epochs} epochs x {self.steps_per_epoch} steps, batch {cfg.batch_size} x "
                f"{self.dist.world_size} = {self.global_batch}, lr {self.lr:.3g} ({cfg.lr:g} per 512), warm-up "
                f"{cfg.warmup_epochs:g} epoch(s), {cfg.opt}, wd {cfg.weight_decay}"
                + (", steps replayed from a CUDA graph" if cfg.cuda_graph else "")]
