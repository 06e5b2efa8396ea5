"""The life of a training run, shared by ``vigla train`` (:class:`vigla.engine.trainer.Trainer`) and ``vigla dense
train`` (:class:`vigla.dense.train.DenseTrainer`): the output folder (chosen, created, locked), atomic checkpoints
every epoch and on SIGINT / SIGTERM (:class:`StopRequest`), exact resume, step losses read back every
``--log-interval`` steps and checked for NaN / inf, one-line errors (:mod:`.errors`), and :meth:`TrainingRun.close`
on every way out.

Whatever ends a run (success, a bad setting, an exception inside a step, a signal), :meth:`TrainingRun.close`
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

import numpy as np
import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from vigla.data import stop_workers

from . import distributed as dist_utils
from .checkpoint import load_state, read_meta, save_state, save_weights
from .config import read_settings_file
from .errors import RUN_ERRORS, CheckpointError, NonFiniteLossError, OutOfMemory, OutputError, PeerEnded, UserError
from .metrics import MetricsLog
from .outputs import OutputLock, git_info, make_folder, remove_empty_folders, remove_stale_temp_files, write_text
from .precision import amp_dtype
from .ranks import tell_once

LAST, BEST = "last", "best"
# what a run writes into its folder: a folder holding any of them holds a run, which a new one must not overwrite
RUN_FILES = (f"{LAST}.state.pt", f"{LAST}.safetensors", f"{BEST}.safetensors", "results.json", "metrics.csv")


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


def read_run_config(state: str, settings: str) -> dict | None:
    """The mapping of setting: value that the run of the training state ``state`` saved in its config.yaml (beside
    the state), or None when it has none. A run writes a whole one, so one that cannot be read, is not valid YAML
    or holds no mapping (an empty file, a list, a scalar) is damaged: a :class:`UserError` naming the file, the
    problem (:func:`vigla.engine.config.read_settings_file`) and the ways on (``settings``: where the command takes
    a run's settings from without it)."""
    path = run_config_path(state)
    if not os.path.isfile(path):
        return None
    values, problem = read_settings_file(path)
    if values is not None:
        return values
    raise UserError(f"{path} {problem}: the run folder's config.yaml is damaged; restore it, or remove it and give "
                    f"the run's settings {settings}, or start a new run without --resume")


def run_config_path(state: str) -> str:
    """The config.yaml of the run of the training state ``state``: beside it."""
    return os.path.join(os.path.dirname(state), "config.yaml")


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """The warm-up's optimizer steps: ``warmup_epochs`` of ``steps_per_epoch``, rounded, and at most ``total_steps
    - 1``: timm's cosine after it needs a step (--warmup-epochs 0.9 of a 1-epoch run of 2 steps rounded to both and
    failed on its ``t_initial > 0`` assertion). One that rounds to 0 (the default 1/12 of a 1-epoch run of 6 steps
    or fewer) is none: the first step takes the peak learning rate, as timm's cosine without a warm-up does."""
    return min(round(warmup_epochs * steps_per_epoch), total_steps - 1)


class StopRequest:
    """SIGINT / SIGTERM handler: the first signal asks the loop to finish its step, save and exit; a second
    SIGINT aborts at once. Installed even where the process was started with SIGINT ignored (a script's background
    job): torchrun passes a SIGINT it is sent on to its workers, which must then save and stop, not run on until
    torchrun's shutdown timeout kills them."""

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
            raise KeyboardInterrupt("aborted without saving")
        self.signum = signum
        tell_once(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then "
                  f"stopping (Ctrl-C again aborts without saving)")  # torchrun passes the signal to every rank


#: per training command, a key that only its training states hold and how a message names its runs
STATE_MARKERS = {"vigla train": ("global_batch", "`vigla train` (classification)"),
                 "vigla dense train": ("model_meta", "`vigla dense train`")}


class TrainingRun:
    """A training run's lifecycle: :meth:`run` trains to the end (0) or to a stop request (128 + signal).

    A subclass sets the class attributes below where they differ and provides:

    * ``_setup_device()``: ``self.device`` (and ``is_main`` / ``world_size`` under DDP), before anything else;
    * ``_build()``: the data, model and optimisation, ending with :meth:`_start`. It sets ``out``
      (:meth:`_prepare_out_dir`), ``amp_dtype`` and ``scaler`` (:meth:`_precision`), ``workers``, ``sampler``
      (:class:`vigla.data.ResumableDistributedSampler`), ``train_loader`` (:meth:`_loader`), ``steps_per_epoch``,
      ``global_batch`` (images per optimizer step, all processes), ``core`` (the model module, unwrapped),
      ``model`` (what the steps call), ``n_params``, ``optimizer``, ``scheduler`` (timm, stepped per update),
      ``total_steps``, ``lr`` and ``best`` (the best validation result so far);
    * the checkpoint: ``_train_state()`` (the ``last.state.pt`` dict; None on ranks other than 0),
      ``_meta(val)`` (the description saved beside the weights), ``_load_resume(path)`` (ending with
      :meth:`_restore_schedule`), ``_config_yaml()``, ``_run_name()`` (the default output folder's name);
    * the loop: ``_train_on(batch)`` (one optimizer step on a loader batch -> its losses, a device tensor
      ``[loss, *parts]`` or a 0-d loss, read back later by :meth:`_read_losses`), ``_end_epoch()`` (validate,
      log, save), ``_finish()`` (the run's results) -> 0;
    * the words: ``_oom_message(where)``, ``_run_info()`` (``run.json``'s run-specific fields), ``_describe()``
      (the header's first lines).

    ``stop_after_steps`` asks for a stop after that many optimizer steps in all, through the same path as
    a signal (used by the tests to interrupt a run mid-epoch deterministically).
    """

    command = "vigla train"  # the CLI that the messages name; the output lock's owner
    eval_command = "vigla eval"  # the CLI that evaluates the run's checkpoints
    state_keys: tuple = ()  # what _load_resume reads from a last.state.pt (_train_state's keys)
    is_main = True  # this process writes the files (rank 0)
    world_size = 1  # processes of the run (DDP ranks)
    prefetch_factor = None  # batches a loader worker prepares ahead (None: the DataLoader's default)
    img_s_digits = 0  # decimals of the progress bar's images per second
    log_on_stop = False  # a steps.csv row for the steps before a stop request (else kept for the next row)
    _part_names = ()  # names of the loss parts that follow the loss in a step's losses (see _train_on)

    def __init__(self, cfg, resume_state: str | None = None, stop_after_steps: int | None = None):
        self.cfg, self.resume_state, self.stop_after_steps = cfg, resume_state, stop_after_steps
        self.stop = StopRequest()
        self.log, self._loaders, self._lock, self._created = None, [], None, []
        self._setup_device()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        """Step 0, or the step that ``resume_state`` saved; then the metrics log. The end of ``_build``."""
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.epoch_loss = [0.0, 0]  # sum of step losses and step count in the current epoch (kept on resume)
        self._pending = []  # this epoch's step losses not read back yet (device tensors, see _train_on)
        self.step_lr = None  # the learning rate of the last optimizer step taken (see _advance)
        self._window = []  # the read-back step losses since the last log row
        # the unreadable training images met so far (each file once: a sample's retries and later epochs meet the
        # same files again); whether validation's were warned of
        self.unreadable: set[str] = set()
        self._val_warned = False
        if self.resume_state is not None:
            self._load_resume(self.resume_state)
            self._restore_best()
        self.log = MetricsLog(self.out, resume_step=self.global_step) if self.is_main else None

    # ------------------------------------------------------------------------------------------- setup
    def _precision(self):
        """-> (the autocast dtype or None, a gradient scaler for fp16 or None)."""
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
                own = os.path.dirname(os.path.abspath(self.resume_state))
                out = cfg.out or own
                self._claim(out)
                held = _run_files(out)
                if held and os.path.abspath(out) != own:
                    raise UserError(f"--out {out} holds another run ({', '.join(held)}); resuming "
                                    f"{self.resume_state} would write over it: leave --out out (the run's own "
                                    f"folder, {own}) or choose an empty one")
            elif cfg.out is not None:
                out = cfg.out
                self._claim(out)
                held = _run_files(out)
                if held:
                    hint = f"continue it with --resume auto --out {out}, or " if f"{LAST}.state.pt" in held else ""
                    raise UserError(f"--out {out} already holds a run ({', '.join(held)}): {hint}choose another "
                                    f"--out")
            else:  # runs/<run name>, numbered: the first free (empty and unlocked) one
                base = out = os.path.join("runs", self._run_name())
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
            self._lock = OutputLock(out).acquire(self.command)
        except OutputError as e:
            remove_empty_folders(created)
            if wait_free and e.errno is None:  # another run holds it
                return False
            raise
        self._created = created
        return True

    def _loader(self, dataset, sampler, batch_size: int, collate, drop_last: bool) -> DataLoader:
        """A loader whose workers :meth:`close` ends, on every way out of the run; its own generator, not the
        global RNG (exact resume)."""
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                            collate_fn=collate, pin_memory=self.device.type == "cuda", drop_last=drop_last,
                            persistent_workers=self.workers > 0,
                            generator=torch.Generator().manual_seed(self.cfg.seed),
                            prefetch_factor=self.prefetch_factor if self.workers > 0 else None,
                            worker_init_fn=_quiet_worker)
        self._loaders.append(loader)
        return loader

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, val: dict | None = None) -> None:
        """``last.*``: the training state (:meth:`_train_state`: weights, optimizer, schedule, RNG;
        self-contained), the weights with their description (:meth:`_meta`), and the config that produced
        them. Collective under DDP. Only finite weights get here: every step's loss has been read back and
        checked (:meth:`_read_losses`) before any save, and :meth:`_check_weights` checks the weights."""
        assert not self._pending, "unchecked step losses: call _read_losses() before saving"
        self._check_weights()
        state = self._train_state()
        if self.is_main:
            with self._saving():
                save_state(os.path.join(self.out, f"{LAST}.state.pt"), state)
                save_weights(os.path.join(self.out, f"{LAST}.safetensors"), self.core.state_dict(),
                             self._meta(val))
                write_text(os.path.join(self.out, "config.yaml"), self._config_yaml())
        dist_utils.barrier()

    def _save_epoch(self, val: dict, improved: bool) -> None:
        """An epoch's saves: ``last.*`` (:meth:`save_checkpoint`, with ``val``), then, where this epoch's weights
        are the best so far (``improved``), ``best.safetensors`` (:meth:`_save_best`)."""
        self.save_checkpoint(val)
        if improved:
            self._save_best()

    def _save_best(self, best: tuple[dict, dict] | None = None) -> None:
        """``best.safetensors``: the weights and description that ``self.best`` names (``best``, else
        :meth:`_best_state`). Written after ``last.*``: a run killed between the two saves resumes with it written
        again (:meth:`_restore_best`), where the other order left a folder without a state to resume."""
        if self.is_main:
            with self._saving():
                save_weights(os.path.join(self.out, f"{BEST}.safetensors"), *(best or self._best_state()))

    def _best_record(self) -> dict:
        """``self.best`` as ``results.json`` reports it: without its validation result (``best.safetensors``' own)."""
        return {k: v for k, v in self.best.items() if k != "val"}

    def _restore_best(self) -> None:
        """After a resume: ``best.safetensors`` written again where the resumed state is the end of the best
        epoch and the file is not from that step (the run was killed between the two saves: :meth:`_save_best`)."""
        if not self.is_main or self.step_in_epoch or self.best.get("epoch") != self.epoch or not self.epoch:
            return
        path = os.path.join(self.out, f"{BEST}.safetensors")
        try:
            meta = read_meta(path) if os.path.isfile(path) else None
        except CheckpointError:
            meta = None
        if meta is not None and meta.get("global_step") == self.global_step:
            return
        best = self._best_state()
        if best is not None:
            self._save_best(best)
            print(f"wrote {path} again: the run was stopped before it was saved", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def _saving(self):
        """An :class:`OutputError` during a save, told with what was kept and how to go on."""
        try:
            yield
        except OutputError as e:
            raise OutputError(f"{e}; {self._kept()}; once it can be written, {self._go_on()}") from None

    def _kept(self) -> str:
        """Which checkpoint is on disk: "the last good checkpoint is ..." or "no checkpoint ... yet"."""
        last = os.path.join(self.out, f"{LAST}.safetensors")
        try:
            meta = read_meta(last) if os.path.isfile(last) else None
        except CheckpointError:
            meta = None
        if meta is None or "global_step" not in meta:
            return "no checkpoint had been saved yet"
        return f"the last good checkpoint is kept: {last} ({self._kept_position(meta)})"

    def _go_on(self, flags: str = "") -> str:
        """How to go on after a stop: resume from the kept state, or (none saved yet) run the command again."""
        if os.path.isfile(os.path.join(self.out, f"{LAST}.state.pt")):
            return f"continue with: {self.command} --resume auto --out {self.out}{flags}"
        return f"run the command again{flags and ' with' + flags} (there is nothing to resume yet)"

    def _kept_position(self, meta: dict) -> str:
        """Where the kept checkpoint ``meta`` (:meth:`_meta`) stands in the run, for :meth:`_kept`."""
        return (f"after {meta['epoch']} epoch(s) and {meta['step_in_epoch']} step(s); global step "
                f"{meta['global_step']}")

    def _restore_schedule(self, state: dict) -> None:
        """The schedule, the gradient scaler and the counters of a saved training state (:meth:`_train_state`);
        the end of ``_load_resume``, once the weights and the optimizer are in."""
        self._check_epochs_left(state)
        if state["total_steps"] == self.total_steps:
            self.scheduler.load_state_dict(state["scheduler"])
        elif self.is_main:  # e.g. --epochs raised to extend a finished run: the cosine is re-planned
            print(f"note: the schedule is re-planned for {self.total_steps} steps (the checkpoint's run planned "
                  f"{state['total_steps']})", flush=True)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.epoch_loss, self.best = list(state["epoch_loss"]), dict(state["best"])
        self.step_lr = state.get("step_lr")  # the last step's rate (metrics.csv's for its epoch); older states lack it
        self.scheduler.step_update(self.global_step)

    def _check_epochs_left(self, state: dict) -> None:
        """Refuse a resume whose ``--epochs`` is below what the saved run has done: nothing would train, and its
        results would describe fewer epochs than the weights saw. ``--epochs`` equal to the epochs done (no step
        into the next) finishes the run: it is tested again."""
        epochs, steps = state["epoch"], state["step_in_epoch"]
        if epochs < self.cfg.epochs or (epochs == self.cfg.epochs and steps == 0):
            return
        folder = os.path.dirname(os.path.abspath(self.resume_state))
        done = f"{epochs} epoch(s)" + (f" and {steps} step(s)" if steps else "")
        further = (f"pass --epochs {epochs} to test it again, more to train it further" if steps == 0 else
                   f"pass --epochs {epochs + 1} or more to train it further")
        raise UserError(f"--epochs {self.cfg.epochs} is fewer than the {done} that {folder} has already done "
                        f"(global step {state['global_step']}): {further}, or evaluate its weights with "
                        f"{self.eval_command} {os.path.join(folder, f'{BEST}.safetensors')}")

    # ------------------------------------------------------------------------------------------- one step
    def _update(self, loss: torch.Tensor) -> None:
        """Backward ``loss`` (0-d, fp32; through the fp16 gradient scaler if any), clip the gradients'
        norm to ``--clip-grad``, take the optimizer step and the schedule's. Waits for nothing."""
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
        self._advance()

    @classmethod
    def check_resume_state(cls, path: str) -> None:
        """Refuse a ``--resume`` state that this command did not write before the run's config.yaml is read (another
        command's settings build the wrong run and fail later, e.g. on ``KeyError``): :meth:`require_state`, the
        state's tensors mapped, not read."""
        cls.require_state(load_state(path, mmap=True), path)

    @classmethod
    def require_state(cls, state: dict, path: str) -> None:
        """A :class:`CheckpointError` in one line unless ``state`` holds :meth:`required_keys`: the state of the
        other training command (told by :data:`STATE_MARKERS`) names that command's ``--resume``, any other names
        the keys it lacks."""
        own = STATE_MARKERS[cls.command][0]
        for other, (marker, name) in STATE_MARKERS.items():
            if other != cls.command and marker in state and own not in state:
                raise CheckpointError(f"{path} is the state of a {name} run, not of a {STATE_MARKERS[cls.command][1]} "
                                      f"one: resume it with `{other} --resume {path}`")
        missing = [key for key in cls.required_keys(state) if key not in state]
        if missing:
            raise CheckpointError(f"{path} is not the state of a `{cls.command}` run (it lacks {', '.join(missing)}): "
                                  f"resume a run folder that `{cls.command}` wrote, or start a new run without "
                                  f"--resume")

    @classmethod
    def required_keys(cls, state: dict) -> tuple:
        """The keys a state must hold to be resumed (:attr:`state_keys`)."""
        return cls.state_keys

    def epoch_lr(self) -> float:
        """``metrics.csv``'s learning rate of an epoch: the one its last step trained at (the scheduler has already
        set the next step's), or the optimizer's when no step was taken yet."""
        return self.step_lr if self.step_lr is not None else self.optimizer.param_groups[0]["lr"]

    def _advance(self) -> None:
        """Count the optimizer step taken, keep the learning rate it took (``steps.csv``'s) and set the next one's."""
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        self.global_step += 1
        self.scheduler.step_update(self.global_step)

    # ------------------------------------------------------------------------------------------- losses
    def _read_losses(self) -> bool:
        """Read the pending step losses back (averaged over ranks), in one transfer with the ranks' stop
        requests: add them to the epoch's sum and the log window (rows ``[loss, *parts]``), and raise
        :class:`NonFiniteLossError` at the first NaN / inf loss. -> whether any rank asks to stop (a signal)."""
        steps = len(self._pending)
        flag = torch.tensor(float(bool(self.stop.signum)), device=self.device)
        losses = torch.stack(self._pending).reshape(steps, -1)  # (steps, 1 + parts)
        *values, stop = dist_utils.all_reduce_sum(torch.cat([losses.flatten(), flag.reshape(1)])).tolist()
        width = len(values) // steps
        first = self.global_step - steps + 1  # global step of the first row
        self._pending = []
        for i in range(steps):
            row = [value / self.world_size for value in values[i * width:(i + 1) * width]]
            if not math.isfinite(row[0]):
                raise NonFiniteLossError(self._nonfinite_message(row[0], first + i))
            self.epoch_loss[0] += row[0]
            self.epoch_loss[1] += 1
            self._window.append(row)
        return stop > 0

    def _check_weights(self) -> None:
        """Raise :class:`NonFiniteLossError` if a weight is NaN or inf: a step with a finite loss can still
        leave them so (an inf gradient, an overflow in the optimizer). One read-back, before each save."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.core.parameters()]).all()):
            raise NonFiniteLossError(
                f"the weights became NaN or inf by global step {self.global_step} (the losses were finite); "
                f"stopped without saving them, {self._kept()}. Try a lower --lr, --clip-grad, or --amp off: "
                f"{self._go_on(' --lr ...')}")

    def _nonfinite_message(self, value: float, step: int) -> str:
        epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
        return (f"the training loss became {value} at epoch {epoch + 1}, step {in_epoch + 1}/{self.steps_per_epoch} "
                f"(global step {step}); stopped without saving the weights of that step or later, "
                f"{self._kept()}. Try a lower --lr, --clip-grad, or --amp off: {self._go_on(' --lr ...')}")

    # ------------------------------------------------------------------------------------------- loop
    def run(self) -> int:
        """Train to the end (0) or to a stop request (128 + signal); raises the errors of :mod:`.errors` (under
        torchrun :class:`~.errors.PeerEnded` where another process's error ended the job first), or
        ``KeyboardInterrupt`` when a stop request met a process group that another process had already left.
        Always ends with :meth:`close`."""
        self.stop.install()
        try:
            return self._run()
        except torch.OutOfMemoryError:
            raise OutOfMemory(self._oom_message("training")) from None
        except Exception as e:
            if self._left_by_another_process(e):
                raise KeyboardInterrupt(f"another process had already ended; {self._kept()}; {self._go_on()}") from e
            if self.world_size > 1 and dist_utils.peer_gone(e):
                raise PeerEnded(f"another process of this job ended first (it printed its own error); "
                                f"{self._kept()}; {self._go_on()}") from e
            raise
        finally:
            self.stop.restore()
            self.close()

    def _left_by_another_process(self, err: Exception) -> bool:
        """Whether ``err`` is this process's stop meeting a collective that another process has left: under torchrun,
        which passes Ctrl-C to every process, one that met it before it could take a stop request (building the run)
        ends at once, and the others' next collective fails (gloo: "Connection closed by peer"). Any error but
        vigla's own (:data:`~.errors.RUN_ERRORS`: a full disk during the save is told as it is) once a stop signal
        arrived. A method, not an expression: calling it runs the handler of a signal that arrived while the failed
        collective blocked, before the check."""
        return self.world_size > 1 and bool(self.stop.signum) and not isinstance(err, RUN_ERRORS)

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
        if self.is_main:
            self._write_run_files()
            self._print_header()
        while self.epoch < self.cfg.epochs:
            if self._train_epoch():
                return self._stopped()
            self._end_epoch()
            if self._stop_requested():
                return self._stopped()
        return self._final_evaluation()

    def _final_evaluation(self) -> int:
        """:meth:`_finish` (the test of the best weights) with Ctrl-C ending it at once: training is over and its
        checkpoints are written, so a stop has nothing left to save (the stop handler's "finishing this step, saving a
        checkpoint" did not hold here, and the evaluation ran on to exit 0). -> :meth:`_finish`'s exit code."""
        self.stop.restore()
        try:
            return self._finish()
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"in the final test evaluation; training is done and its checkpoints are in "
                                    f"{self.out}") from None

    def _stop_requested(self) -> bool:
        """Whether any rank has received a stop signal (each rank's flag summed: the ranks stop together; one
        that met it during validation alone would otherwise leave the others waiting in a collective)."""
        flag = torch.tensor(float(bool(self.stop.signum)), device=self.device)
        return dist_utils.all_reduce_sum(flag).item() > 0

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
            for batch in self.train_loader:
                self._pending.append(self._train_on(batch))
                self.step_in_epoch += 1
                bar.update(1)
                # one process reacts to a signal at once; under DDP the ranks agree at the next read-back
                stop = (self.stop_after_steps is not None and self.global_step >= self.stop_after_steps) or \
                    (bool(self.stop.signum) and self.world_size == 1)
                if self.step_in_epoch % cfg.log_interval == 0 or self.step_in_epoch == spe or \
                        (stop and self.log_on_stop):
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
        """The progress bar's numbers and a ``steps.csv`` row: the mean losses (the loss, then its parts) of
        the steps since the last row, and the learning rate that the last of them took (not the next step's, which
        the schedule has set since: a warm-up's first step logged the peak rate)."""
        lr = self.step_lr
        ips = (self.step_in_epoch - n0) * self.global_batch / max(time.perf_counter() - t0, 1e-9)
        means = np.mean(self._window, axis=0).tolist() if self._window else [float("nan")]
        bar.set_postfix(loss=f"{means[0]:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.{self.img_s_digits}f}", refresh=False)
        if self.log is not None and self._window:
            self.log.log_step({"global_step": self.global_step, "epoch": self.epoch,
                               "epoch_progress": self.epoch + self.step_in_epoch / self.steps_per_epoch,
                               "loss": means[0], "lr": lr, **dict(zip(self._part_names, means[1:]))})
        self._window = []

    def _stopped(self) -> int:
        signum = self.stop.signum or signal.SIGTERM
        if self.is_main:
            print(f"\nstopped at epoch {self.epoch + 1}, step {self.step_in_epoch}/{self.steps_per_epoch} (global step "
                  f"{self.global_step}); checkpoint saved in {self.out}. Resume with:\n"
                  f"  {self.command} --resume auto --out {self.out}", file=sys.stderr, flush=True)
            self.log.flush()
        return 128 + int(signum)

    # ------------------------------------------------------------------------------------------- run files
    def _write_run_files(self) -> None:
        """``run.json`` (``run-resume-<step>.json`` for a resumed run) and, for a new run, ``config.yaml``; a
        resumed run rewrites its ``config.yaml`` with each checkpoint, so that it always describes the
        checkpoint beside it (a failed attempt with other flags leaves it as it was)."""
        if self.resume_state is None:
            write_text(os.path.join(self.out, "config.yaml"), self._config_yaml())
        git = git_info()
        info = {"command": sys.argv, **self._run_info(),
                "torch": torch.__version__, "timm": timm.__version__, "vigla": vigla_version(),
                "python": platform.python_version(), "commit": git["commit"], "dirty": git["dirty"],
                "resumed_from": self.resume_state, "resumed_at_step": self.global_step if self.resume_state else None}
        name = "run.json" if self.resume_state is None else f"run-resume-{self.global_step}.json"
        write_text(os.path.join(self.out, name), json.dumps(info, indent=2))

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def _print_header(self) -> None:
        lines = [*self._describe(),
                 f"  device {self.device}, amp {self.amp_dtype or 'off'}, {self.workers} loader worker(s)",
                 f"  output {self.out}"]
        if self.resume_state:
            lines.append(f"  resuming at epoch {self.epoch + 1}, step {self.step_in_epoch} (global step "
                         f"{self.global_step})")
        print("\n".join(lines), flush=True)


def warn_unreadable(result: dict, split: str) -> None:
    files = "; ".join(result["unreadable_files"])
    print(f"warning: {result['unreadable']} unreadable {split} image(s) left out ({result['images']} evaluated): "
          f"{files}", file=sys.stderr, flush=True)


def _quiet_worker(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM to the main process, which stops the run cleanly (a Ctrl-C or a
    scheduler's SIGTERM reaches the whole process group). :meth:`TrainingRun.close` ends them on the way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def vigla_version() -> str:
    from vigla import __version__
    return __version__


def _run_files(out: str) -> list[str]:
    """The files of a run (:data:`RUN_FILES`) in the folder ``out``."""
    return [name for name in RUN_FILES if os.path.isfile(os.path.join(out, name))]
