"""The training loop: timm pieces (transforms, Mixup, optimizer, cosine scheduler, ModelEmaV3), DDP, AMP,
atomic checkpoints every epoch and on SIGINT/SIGTERM, exact mid-epoch resume, clear errors.

Whatever ends a run (success, a bad setting, an exception inside a step, a signal), :meth:`Trainer.close`
shuts the loader workers down, flushes the logs, and releases the output folder (a failed run that wrote
nothing leaves no folder behind)."""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
import warnings

import numpy as np
import timm
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

from vigla.data import (BatchPrep, DataError, ResumableDistributedSampler, ShardSampler, TransformedDataset, collate,
                        eval_transform, load_splits, stop_workers, train_transform)

from . import distributed as dist_utils
from .aux_branch import castling_model_args, checkpoint_record, validate_aux_branch
from .checkpoint import (capture_rng, load_into, load_state, load_weights, read_meta, restore_rng, save_state,
                         save_weights)
from .config import TrainConfig, config_to_yaml
from .errors import CheckpointError, NonFiniteLossError, OutOfMemory, OutputError, UserError
from .evaluate import evaluate
from .metrics import MetricsLog, plot_curves
from .modeling import check_runs_at, create_model, enable_grad_checkpointing, model_args
from .outputs import OutputLock, git_info, make_folder, remove_empty_folders, remove_stale_temp_files, write_text
from .precision import amp_dtype, autocast

LAST, BEST = "last", "best"


def run_name(model: str, data: str | None) -> str:
    return f"{model}-{'fmnist' if data is None else os.path.basename(os.path.normpath(data))}"


def find_resume_state(resume: str, out: str | None, model: str, data: str | None) -> str:
    """The ``last.state.pt`` that ``--resume`` names: 'auto' (the newest run of this model and data, or the
    one in ``--out``), a run folder, or the state file itself."""
    if resume == "auto":
        if out is not None:
            candidates = [os.path.join(out, f"{LAST}.state.pt")]
        else:
            candidates = glob.glob(os.path.join("runs", run_name(model, data) + "*", f"{LAST}.state.pt"))
        candidates = [c for c in candidates if os.path.isfile(c)]
        if not candidates:
            where = out or os.path.join("runs", run_name(model, data) + "*")
            raise UserError(f"--resume auto: no checkpoint ({LAST}.state.pt) in {where}; name the run folder "
                            f"with --out, or start a new run without --resume")
        return max(candidates, key=os.path.getmtime)
    path = os.path.join(resume, f"{LAST}.state.pt") if os.path.isdir(resume) else resume
    if not path.endswith(".state.pt") or not os.path.isfile(path):
        raise UserError(f"--resume {resume}: expected a run folder holding {LAST}.state.pt, a .state.pt file or "
                        f"'auto'")
    return path


class StopRequest:
    """SIGINT / SIGTERM handler: the first signal asks the loop to finish its step, save and exit; a second
    SIGINT aborts at once."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then "
              f"stopping (Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig`; :meth:`run` trains and returns an exit code.

    ``stop_after_steps`` asks for a stop after that many optimizer steps in all, through the same path as
    a signal (used by the tests to interrupt a run mid-epoch deterministically).
    """

    def __init__(self, cfg: TrainConfig, resume_state: str | None = None, stop_after_steps: int | None = None):
        self.cfg, self.resume_state, self.stop_after_steps = cfg, resume_state, stop_after_steps
        self.stop = StopRequest()
        self.log, self._loaders, self._lock, self._created = None, [], None, []
        self.dist = dist_utils.setup(cfg.device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        _seed_everything(cfg.seed + self.dist.rank)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        self.amp_dtype, self.scaler = self._precision()
        self.out = self._prepare_out_dir()
        self._build_data()
        self._build_model()
        self._build_optimisation()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.epoch_loss = [0.0, 0]  # sum of step losses and step count in the current epoch (kept on resume)
        self._pending = []  # this epoch's step losses not read back yet (0-d device tensors, see train_step)
        self._window = []  # the read-back step losses since the last log row
        self.best = {"top1": -1.0, "epoch": 0, "weights": None}
        self.skipped_images, self._val_warned = 0, False
        if self.resume_state is not None:
            self._load_resume(self.resume_state)
        self.log = MetricsLog(self.out, resume_step=self.global_step) if self.is_main else None

    # ------------------------------------------------------------------------------------------- setup
    def _precision(self):
        if self.cfg.amp == "fp16" and self.device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA device (on CPU use --amp bf16 or off)")
        dtype = amp_dtype(self.cfg.amp, self.device)
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return dtype, scaler

    def _prepare_out_dir(self) -> str:
        """Rank 0 creates the output folder, locks it against a second run and removes the temporary files of
        a save that was killed half-way. -> the folder, on every rank."""
        cfg = self.cfg
        out = None
        if self.is_main:
            if self.resume_state is not None:
                out = cfg.out or os.path.dirname(os.path.abspath(self.resume_state))
                self._claim(out)
            elif cfg.out is not None:
                out = cfg.out
                self._claim(out)
                if os.path.isfile(os.path.join(out, f"{LAST}.state.pt")):
                    raise UserError(f"--out {out} already holds a run ({LAST}.state.pt): continue it with "
                                    f"--resume auto --out {out}, or choose another --out")
            else:  # runs/<model>-<data>, numbered: the first free (empty and unlocked) one
                base = out = os.path.join("runs", run_name(cfg.model, cfg.data))
                n = 1
                while not self._claim(out, wait_free=True):
                    n += 1
                    out = f"{base}-{n}"
            for path in remove_stale_temp_files(out):
                print(f"removed {path}: the temporary file of a save that was killed half-way", file=sys.stderr)
        return dist_utils.broadcast(out)

    def _claim(self, out: str, wait_free: bool = False) -> bool:
        """Create and lock ``out``. ``wait_free``: False (instead of an error) when it is taken or not empty."""
        if wait_free and os.path.isdir(out) and any(not n.startswith(".") for n in os.listdir(out)):
            return False
        created = make_folder(out, "--out")
        try:
            self._lock = OutputLock(out).acquire("vigla train")
        except OutputError as e:
            remove_empty_folders(created)
            if wait_free and e.errno is None:  # another run holds it
                return False
            raise
        self._created = created
        return True

    def _build_data(self):
        cfg = self.cfg
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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
            self.workers = min(8, max(1, cpus // local_procs - 1))
        self.num_classes = len(self.splits.classes)

    def _loader(self, dataset, sampler, batch_size: int, drop_last: bool) -> DataLoader:
        """A loader whose workers :meth:`close` ends, on every way out of the run."""
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                            collate_fn=collate, pin_memory=self.device.type == "cuda", drop_last=drop_last,
                            persistent_workers=self.workers > 0,
                            generator=torch.Generator().manual_seed(self.cfg.seed),
                            prefetch_factor=4 if self.workers > 0 else None, worker_init_fn=_quiet_worker)
        self._loaders.append(loader)
        return loader

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
        self.train_loader = self._loader(self.train_set, self.sampler, cfg.batch_size, drop_last=True)
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
                            self.cfg.batch_size, drop_last=False)

    def _build_optimisation(self):
        cfg, d = self.cfg, self.dist
        self.global_batch = cfg.batch_size * d.world_size
        scale = self.global_batch / 512
        self.lr = cfg.lr * scale
        self.optimizer = create_optimizer_v2(self.core, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        # one scheduler "epoch" per optimizer step: integer step counts; warm-up comes first, inside --epochs
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched="cosine", num_epochs=self.total_steps - warmup_steps, warmup_epochs=warmup_steps,
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

    # ------------------------------------------------------------------------------------------- checkpoints
    def _meta(self, weights: str, val: dict | None) -> dict:
        return {"model": self.cfg.model, "model_args": self.model_args, "classes": self.splits.classes,
                "data": self.splits.name, "data_config": self.data_config, "weights": weights,
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "val": val, "vigla_version": _version(), **checkpoint_record(self.core)}

    def save_checkpoint(self, val: dict | None = None) -> None:
        """``last.*``: training state (model weights and all ranks' RNG states included), weights + JSON, and
        the config that produced them. Collective under DDP. Only finite weights get here: every step's loss
        has been read back and checked (:meth:`_read_losses`) before any save."""
        assert not self._pending, "unchecked step losses: call _read_losses() before saving"
        self._check_weights()
        rng = dist_utils.gather(capture_rng())
        if self.is_main:
            state = {
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "global_batch": self.global_batch,
                "world_size": self.dist.world_size, "sampler_seed": self.sampler.seed, "sampler_epoch": self.epoch,
                "epoch_loss": list(self.epoch_loss), "skipped_images": self.skipped_images,
                "model_name": self.cfg.model, "model": self.core.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "ema": self.ema.state_dict() if self.ema else None,
                "best": dict(self.best), "rng": rng,
            }
            with self._saving():
                save_state(os.path.join(self.out, f"{LAST}.state.pt"), state)
                save_weights(os.path.join(self.out, f"{LAST}.safetensors"), self.core.state_dict(),
                             self._meta("model", val))
                write_text(os.path.join(self.out, "config.yaml"), config_to_yaml(self.cfg))
        dist_utils.barrier()

    @contextlib.contextmanager
    def _saving(self):
        """An :class:`OutputError` during a save, told with what was kept and how to go on."""
        try:
            yield
        except OutputError as e:
            raise OutputError(f"{e}; {self._kept()}; once it can be written, continue with: vigla train --resume "
                              f"auto --out {self.out}") from None

    def _kept(self) -> str:
        """Which checkpoint is on disk: "the last good checkpoint is ..." or "no checkpoint ... yet"."""
        last = os.path.join(self.out, f"{LAST}.safetensors")
        try:
            meta = read_meta(last) if os.path.isfile(last) else None
        except CheckpointError:
            meta = None
        if meta is None or "global_step" not in meta:
            return "no checkpoint had been saved yet"
        return (f"the last good checkpoint is kept: {last} (after {meta['epoch']} epoch(s) and "
                f"{meta['step_in_epoch']} step(s); global step {meta['global_step']})")

    def _load_resume(self, path: str) -> None:
        state = load_state(path)
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
        self.optimizer.load_state_dict(state["optimizer"])
        if state["total_steps"] == self.total_steps:
            self.scheduler.load_state_dict(state["scheduler"])
        elif self.is_main:  # e.g. --epochs raised to extend a finished run: the cosine is re-planned
            print(f"note: the schedule is re-planned for {self.total_steps} steps (the checkpoint's run planned "
                  f"{state['total_steps']})", flush=True)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema.set(self.core)
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.epoch_loss, self.best = list(state["epoch_loss"]), dict(state["best"])
        self.skipped_images = state["skipped_images"]
        self.scheduler.step_update(self.global_step)
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            restore_rng(rng[self.dist.rank])
        else:
            _seed_everything(self.cfg.seed + self.dist.rank + 1_000_003 * self.global_step)
            if self.is_main:
                warnings.warn(f"resuming {len(rng)}-process RNG states with {self.dist.world_size} processes: "
                              f"random streams are reseeded (sample order is kept)", stacklevel=2)

    def _save_best(self, val: dict, ema_val: dict | None) -> None:
        for weights, result, module in (("model", val, self.core),
                                        ("ema", ema_val, self.ema.module if self.ema else None)):
            if result is not None and result["top1"] > self.best["top1"]:  # epoch: epochs done
                self.best = {"top1": result["top1"], "epoch": self.epoch, "weights": weights}
                if self.is_main:
                    with self._saving():
                        save_weights(os.path.join(self.out, f"{BEST}.safetensors"), module.state_dict(),
                                     self._meta(weights, result))

    # ------------------------------------------------------------------------------------------- one step
    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward, backward, clip, step, schedule, EMA -> the loss, a 0-d tensor on the device.

        Nothing here waits for the device: the loss is read back (and checked for NaN / inf) every
        ``--log-interval`` steps, at the end of the epoch and before any save, by :meth:`_read_losses`."""
        core = self.core
        if hasattr(core, "set_aux_progress"):
            core.set_aux_progress(self.global_step / self.total_steps)
        with autocast(self.device, self.amp_dtype):
            loss = self.criterion(self.model(images), targets)
        if hasattr(core, "aux_loss"):
            loss = loss + core.aux_loss()
        loss = loss.float()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.cfg.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.core.parameters(), self.cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(self.core.parameters(), self.cfg.clip_grad)
            self.optimizer.step()
        self.global_step += 1
        self.scheduler.step_update(self.global_step)
        if self.ema is not None:
            self.ema.update(self.core, step=self.global_step)
        return loss.detach()

    def _read_losses(self) -> bool:
        """Read the pending step losses back (averaged over ranks), in one transfer with the ranks' stop
        requests: add them to the epoch's sum and the log window, and raise :class:`NonFiniteLossError` at
        the first NaN / inf. -> whether any rank asks to stop (a signal)."""
        flag = torch.tensor(float(bool(self.stop.signum)), device=self.device)
        status = dist_utils.all_reduce_sum(torch.stack([*self._pending, flag]))
        *losses, stop = status.tolist()
        first = self.global_step - len(losses) + 1  # global step of losses[0]
        self._pending = []
        for i, value in enumerate(losses):
            if not math.isfinite(value):
                raise NonFiniteLossError(self._nonfinite_message(value / self.dist.world_size, first + i))
            value /= self.dist.world_size
            self.epoch_loss[0] += value
            self.epoch_loss[1] += 1
            self._window.append(value)
        return stop > 0

    def _check_weights(self) -> None:
        """Raise :class:`NonFiniteLossError` if a weight is NaN or inf: a step with a finite loss can still
        leave them so (an inf gradient, an overflow in the optimizer). One read-back, before each save."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.core.parameters()]).all()):
            raise NonFiniteLossError(
                f"the weights became NaN or inf by global step {self.global_step} (the losses were finite); "
                f"stopped without saving them, {self._kept()}. Try a lower --lr, --clip-grad, or --amp off, and "
                f"resume: vigla train --resume auto --out {self.out} --lr ...")

    def _nonfinite_message(self, value: float, step: int) -> str:
        epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
        return (f"the training loss became {value} at epoch {epoch + 1}, step {in_epoch + 1}/{self.steps_per_epoch} "
                f"(global step {step}); stopped without saving the weights of that step or later, "
                f"{self._kept()}. Try a lower --lr, --clip-grad, or --amp off, and resume: "
                f"vigla train --resume auto --out {self.out} --lr ...")

    def _oom_message(self, where: str) -> str:
        device = str(self.device)
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        return (f"CUDA out of memory during {where} with --batch-size {self.cfg.batch_size} per device at "
                f"{self.cfg.img_size}px ({self.cfg.model}, {device}). Try --batch-size "
                f"{max(1, self.cfg.batch_size // 2)}: the learning rate follows the global batch automatically")

    # ------------------------------------------------------------------------------------------- loop
    def run(self) -> int:
        """Train to the end (0) or to a stop request (128 + signal); raises the errors of :mod:`.errors`.
        Always ends with :meth:`close`."""
        self.stop.install()
        try:
            return self._run()
        except torch.OutOfMemoryError:
            raise OutOfMemory(self._oom_message("training")) from None
        finally:
            self.stop.restore()
            self.close()

    def close(self) -> None:
        """End the loader workers, flush the logs and release the output folder; removes the folder when this
        run created it and nothing was written into it. Safe to call twice, and on a half-built trainer."""
        failing = sys.exc_info()[0] is not None
        for loader in self._loaders:
            stop_workers(loader)
        try:
            if self.log is not None:
                self.log.close()
                self.log = None
        except OutputError as e:
            if not failing:
                raise
            print(f"warning: {e}", file=sys.stderr)  # the error on its way out says more
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
                remove_empty_folders(self._created)

    def _run(self) -> int:
        cfg = self.cfg
        if self.is_main:
            self._write_run_files()
            self._print_header()
        while self.epoch < cfg.epochs:
            stopped = self._train_epoch()
            if stopped:
                return self._stopped()
            self._end_epoch()
            if self.stop.signum:
                return self._stopped()
        return self._finish()

    def _train_epoch(self) -> bool:
        """One epoch from ``step_in_epoch``; True when a stop was requested (the checkpoint is then saved)."""
        cfg, spe = self.cfg, self.steps_per_epoch
        self.sampler.set_epoch(self.epoch, skip=self.step_in_epoch * self.global_batch)
        self.model.train()
        bar = tqdm(total=spe, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not self.is_main, dynamic_ncols=True, leave=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        t0, n0 = time.perf_counter(), self.step_in_epoch
        self._window = []
        with bar:  # closed on every way out, so that an error message comes after the bar, not under it
            for images, targets, errors in self.train_loader:
                self._count_unreadable(errors)
                x, y = self.prep_train(images), targets.to(self.device, non_blocking=True)
                if self.mixup is not None:
                    x, y = self.mixup(x, y)
                self._pending.append(self.train_step(x, y))
                self.step_in_epoch += 1
                bar.update(1)
                # one process reacts to a signal at once; under DDP the ranks agree at the next read-back
                stop = (self.stop_after_steps is not None and self.global_step >= self.stop_after_steps) or \
                    (bool(self.stop.signum) and not self.dist.enabled)
                if self.step_in_epoch % cfg.log_interval == 0 or self.step_in_epoch == spe:
                    stop = self._read_losses() or stop
                    self._log_steps(bar, t0, n0)
                if stop:
                    if self._pending:
                        self._read_losses()
                    bar.close()
                    self.save_checkpoint()
                    return True
            if self._pending:
                self._read_losses()
        self.train_time = time.perf_counter() - t0
        self.train_ips = (self.step_in_epoch - n0) * self.global_batch / max(self.train_time, 1e-9)
        return False

    def _log_steps(self, bar, t0: float, n0: int) -> None:
        """The progress bar's numbers and a ``steps.csv`` row: the mean loss of the steps since the last row."""
        spe = self.steps_per_epoch
        lr = self.optimizer.param_groups[0]["lr"]
        ips = (self.step_in_epoch - n0) * self.global_batch / max(time.perf_counter() - t0, 1e-9)
        loss = float(np.mean(self._window)) if self._window else float("nan")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}", refresh=False)
        if self.log is not None and self._window:
            self.log.log_step({"global_step": self.global_step, "epoch": self.epoch,
                               "epoch_progress": self.epoch + self.step_in_epoch / spe, "loss": loss, "lr": lr})
        self._window = []

    def _count_unreadable(self, errors: list[str]) -> None:
        if not errors:
            return
        if self.cfg.strict_data:
            raise DataError(f"unreadable image {errors[0]} (--strict-data stops at the first bad file)")
        if self.skipped_images == 0 and self.is_main:
            warnings.warn(f"skipping unreadable image(s), replaced by the next readable one: {errors[0]}",
                          stacklevel=2)
        self.skipped_images += len(errors)

    def _evaluate(self, loader, model) -> dict:
        try:
            return evaluate(model, loader, self.prep_eval, self.amp_dtype)
        except torch.OutOfMemoryError:
            raise OutOfMemory(self._oom_message("evaluation")) from None

    def _end_epoch(self) -> None:
        self._check_weights()  # before validating and saving them
        val = self._evaluate(self.val_loader, self.core)
        ema_val = self._evaluate(self.val_loader, self.ema.module) if self.ema else None
        if val["unreadable"] and self.is_main and not self._val_warned:
            _warn_unreadable(val, "validation")
            self._val_warned = True
        row = {"epoch": self.epoch, "global_step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": self.epoch_loss[0] / max(self.epoch_loss[1], 1),
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "ema_val_top1": ema_val["top1"] if ema_val else float("nan"),
               "ema_val_top5": ema_val["top5"] if ema_val else float("nan"),
               "epoch_time_s": round(self.train_time, 2), "train_img_per_s": round(self.train_ips, 1),
               "unreadable_images": self.skipped_images}
        if hasattr(self.core, "aux_stats"):
            row.update({f"aux_{k}": float(v) for k, v in self.core.aux_stats().items()})
        row.update(validate_aux_branch(self.core, self.val_loader, self.prep_eval, self.amp_dtype, val))
        self.epoch += 1
        self.step_in_epoch, self.epoch_loss = 0, [0.0, 0]
        self._save_best(val, ema_val)
        self.save_checkpoint(val)
        if self.is_main:
            self.log.log_epoch(row)
            ema_txt = f" | EMA top-1 {ema_val['top1']:.2f}%" if ema_val else ""
            tqdm.write(f"epoch {self.epoch}/{self.cfg.epochs}: train loss {row['train_loss']:.4f} | val top-1 "
                       f"{val['top1']:.2f}% top-5 {val['top5']:.2f}%{ema_txt} | {row['train_img_per_s']:.0f} img/s")
            if self.skipped_images:
                tqdm.write(f"warning: {self.skipped_images} unreadable image(s) skipped so far "
                           f"(--strict-data makes them fatal)")

    def _stopped(self) -> int:
        signum = self.stop.signum or signal.SIGTERM
        if self.is_main:
            cmd = f"vigla train --resume auto --out {self.out}"
            print(f"\nstopped at epoch {self.epoch + 1}, step {self.step_in_epoch}/{self.steps_per_epoch} (global step "
                  f"{self.global_step}); checkpoint saved in {self.out}. Resume with:\n  {cmd}", file=sys.stderr,
                  flush=True)
            self.log.flush()
        return 128 + int(signum)

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
                _warn_unreadable(test, "test")
            split = "the Fashion-MNIST test file" if self.cfg.data is None else f"{self.cfg.data}/val"
            split = f"{test['images']} {'fixed random ' if self.cfg.test_subset else ''}images of {split}"
            results = {"test": test, "test_split": split,
                       "best": self.best, "epochs": self.cfg.epochs, "global_step": self.global_step,
                       "model": self.cfg.model, "out": self.out}
            write_text(os.path.join(self.out, "results.json"), json.dumps(results, indent=2))
            self.log.flush()
            png = plot_curves(self.out, title=f"{self.cfg.model} on {self.splits.name}")
            print(f"test top-1 {test['top1']:.2f}%  top-5 {test['top5']:.2f}% on {split} (best weights: "
                  f"{self.best['weights']} after epoch {self.best['epoch']})\n"
                  f"wrote {self.out}/: {LAST}.safetensors, {BEST}.safetensors, metrics.csv, "
                  f"{os.path.basename(png) if png else ''}, results.json", flush=True)
        return 0

    def _write_run_files(self) -> None:
        """``run.json`` (``run-resume-<step>.json`` for a resumed run) and, for a new run, ``config.yaml``; a
        resumed run rewrites its ``config.yaml`` with each checkpoint, so that it always describes the
        checkpoint beside it (a failed attempt with other flags leaves it as it was)."""
        if self.resume_state is None:
            write_text(os.path.join(self.out, "config.yaml"), config_to_yaml(self.cfg))
        git = git_info()
        info = {"command": sys.argv, "world_size": self.dist.world_size, "global_batch": self.global_batch,
                "lr_scaled": self.lr, "steps_per_epoch": self.steps_per_epoch, "workers": self.workers,
                "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "amp": str(self.amp_dtype), "n_params": self.n_params, "train_images": len(self.splits.train),
                "val_images": len(self.splits.val), "test_images": len(self.splits.test),
                "torch": torch.__version__, "timm": timm.__version__, "vigla": _version(),
                "python": platform.python_version(), "commit": git["commit"], "dirty": git["dirty"],
                "resumed_from": self.resume_state, "resumed_at_step": self.global_step if self.resume_state else None}
        name = "run.json" if self.resume_state is None else f"run-resume-{self.global_step}.json"
        write_text(os.path.join(self.out, name), json.dumps(info, indent=2))

    def _print_header(self) -> None:
        cfg, s = self.cfg, self.splits
        print(f"vigla train: {cfg.model} ({self.n_params / 1e6:.2f}M params), preset {cfg.preset}\n"
              f"  data {s.name}: {len(s.train)} train / {len(s.val)} val / {len(s.test)} test images, "
              f"{self.num_classes} classes, {cfg.img_size}px\n"
              f"  {cfg.epochs} epochs x {self.steps_per_epoch} steps, batch {cfg.batch_size} x {self.dist.world_size} "
              f"= {self.global_batch}, lr {self.lr:.3g} ({cfg.lr:g} per 512), warm-up {cfg.warmup_epochs:g} "
              f"epoch(s), {cfg.opt}, wd {cfg.weight_decay}\n"
              f"  device {self.device}, amp {self.amp_dtype or 'off'}, {self.workers} loader worker(s)\n"
              f"  output {self.out}"
              + (f"\n  resuming at epoch {self.epoch + 1}, step {self.step_in_epoch} (global step {self.global_step})"
                 if self.resume_state else ""), flush=True)


def _warn_unreadable(result: dict, split: str) -> None:
    files = "; ".join(result["unreadable_files"])
    print(f"warning: {result['unreadable']} unreadable {split} image(s) left out ({result['images']} evaluated): "
          f"{files}", file=sys.stderr, flush=True)


def _quiet_worker(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which stops the run cleanly (a Ctrl-C or a
    scheduler's SIGTERM reaches the whole process group). :meth:`Trainer.close` ends them on the way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _version() -> str:
    from vigla import __version__
    return __version__
