"""Inference and training replayed from CUDA graphs: the kernels launched by the GPU itself.

At small inputs (224² and below) an eager forward, and still more an eager training step, is bound by
the host's launch rate, not by the GPU; replaying a captured graph removes the host from the path.

* ``CudaGraphModel(model, batch_size)`` captures ``model``'s inference forward at one batch size and
  image size (at its first call) and then takes any batch: smaller ones are padded to the captured size,
  larger ones run in pieces.
* ``CudaGraphTrainStep(model, optimizer, loss_fn)`` captures a whole training step (forward, loss,
  backward, optimizer step), PyTorch's whole-network capture, for one batch shape.

    graphed = CudaGraphModel(model.cuda(), batch_size=128, amp_dtype=torch.bfloat16)
    logits = graphed(images)  # [B, 3, 224, 224] -> [B, num_classes]; captured at the first call

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    step = CudaGraphTrainStep(model, opt, F.cross_entropy, amp_dtype=torch.bfloat16, clip_grad=5.0)
    loss = step(images, labels)  # one optimizer step; [] loss on the device
    opt.param_groups[0]["lr"] = 5e-4  # a scheduler's change: the next replay reads it

``vigla train --cuda-graph`` trains with it.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
from torch.autograd.graph import increment_version

from .precision import autocast

__all__ = ["CudaGraphModel", "CudaGraphTrainStep", "side_stream"]


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


@contextlib.contextmanager
def side_stream(device: torch.device):
    """The block on ``device``'s side stream, after the current stream's work and before its later work: the eager
    calls before a capture (lazy state made off the stream that captures, as PyTorch's whole-network capture does).
    One stream per device for the process: cuBLAS keeps a workspace for each stream it ran on, for good (a fresh
    stream per capture left one more each time)."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    side = _SIDE_STREAMS.get(index)
    if side is None:
        side = _SIDE_STREAMS.setdefault(index, torch.cuda.Stream(index))
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)


class CudaGraphModel(nn.Module):
    """``model``'s inference forward captured once as a CUDA graph and replayed on every call.

    Args:
        model: on a CUDA device; it is put in eval mode (no gradients are recorded). A ViG's replay of its own
            ``forward_features`` (``set_cuda_graphs``) is turned off: the whole forward is one graph.
        batch_size: images per replay; calls with fewer are padded (with zeros), more are split.
        amp_dtype: autocast dtype inside the graph (``None``: full precision).
        warmup: eager calls before the capture (compilation, autotuning, lazy state).

    The graph is captured at the first call, for that call's image shape ``[C, H, W]``; calls take
    ``[B, C, H, W]`` of that shape and return the model's output for those ``B`` images (a fresh
    tensor, not the graph's buffer). A replay reads the weights where they lie, but ViG's inference path
    reads copies cast once (:mod:`vigla.layers.cast`), which a replay does not renew: a call after any
    parameter or buffer changed in place (an optimizer step, ``load_state_dict``) captures again.
    """

    def __init__(self, model: nn.Module, batch_size: int, amp_dtype: torch.dtype | None = None,
                 warmup: int = 3):
        super().__init__()
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CudaGraphModel needs the model on a CUDA device, it is on {device}")
        if hasattr(model, "set_cuda_graphs"):  # a ViG's own replay of its features: the whole forward is one graph
            model.set_cuda_graphs(False)
        self.model = model.eval()
        self.batch_size, self.amp_dtype, self.warmup = batch_size, amp_dtype, warmup
        self.shape = self.graph = self.static_input = self.static_output = self.versions = None

    def _versions(self) -> tuple[int, ...]:
        """The version counters of the model's parameters and buffers (bumped by every in-place change)."""
        return tuple(t._version for t in (*self.model.parameters(), *self.model.buffers()))

    def capture(self, shape: tuple[int, ...]) -> None:
        """Capture the graph for ``[batch_size, *shape]`` inputs. Other threads keep their CUDA calls
        (``capture_error_mode="thread_local"``): a data loader's pin-memory thread allocates pinned
        memory while this one captures."""
        device = next(self.model.parameters()).device
        self.shape = tuple(shape)
        self.static_input = torch.zeros(self.batch_size, *self.shape, device=device)
        with side_stream(device), torch.inference_mode(), autocast(device, self.amp_dtype):
            for _ in range(self.warmup):
                self.model(self.static_input)
        self.graph = torch.cuda.CUDAGraph()
        # autocast's own weight cache lives only as long as one autocast region: not in a graph
        with torch.inference_mode(), autocast(device, self.amp_dtype, cache=False), \
                torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_output = self.model(self.static_input)
        self.versions = self._versions()

    def replay(self) -> torch.Tensor:
        """Run the graph on what :attr:`static_input` holds; returns the graph's output buffer."""
        self.graph.replay()
        return self.static_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph is None or (tuple(x.shape[1:]) == self.shape and self._versions() != self.versions):
            self.capture(tuple(x.shape[1:]))
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"CudaGraphModel was captured for [B, {', '.join(map(str, self.shape))}] inputs, "
                             f"got {list(x.shape)}: make another one for this size")
        outputs = []
        for piece in x.split(self.batch_size):
            n = piece.shape[0]
            self.static_input[:n].copy_(piece)
            if n < self.batch_size:
                self.static_input[n:].zero_()
            outputs.append(self.replay()[:n].clone())
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


class CudaGraphTrainStep:
    """One training step of ``model`` captured as a CUDA graph and replayed at every call.

    Each call ``step(x, y)`` (``x``: ``[B, ...]`` inputs, ``y``: targets, both of the first call's
    shapes) is one training step on that batch: forward under autocast, ``loss_fn(out.float(), y)``,
    backward, the gradients' global norm clipped to ``clip_grad`` (if > 0), ``optimizer.step()`` (none
    with ``optimizer=None``). It returns the loss (a ``[]`` tensor on the device: reading it waits for
    the step). The first ``warmup`` calls run eagerly on a side stream (lazy state: kernels, cuBLAS, the
    optimizer's moments); the next one captures the step and every later one replays it: the batch is
    copied into the graph's inputs and the GPU runs the whole step without the host. The parameters'
    ``.grad`` hold the last step's gradients.

    Args:
        model: on a CUDA device, in train mode (put there); no hooks that need the host. A ViG's replay of its
            own ``forward_features`` (``set_cuda_graphs``) is turned off: the whole step is one graph.
        optimizer: over ``model``'s parameters (``None``: forward and backward only), built with
            ``capturable=True`` where it has the option (Adam, AdamW: its state then lives on the device).
            A learning rate that is a Python number may change between calls (a scheduler's): every step
            reads it from a device tensor that the call refreshes. Other hyperparameters are read at
            capture.
        loss_fn: ``(logits, targets) -> [] loss``.
        amp_dtype: autocast dtype (``None``: full precision; bf16 rather than fp16, whose loss scaling
            needs the host at every step).
        warmup: eager calls before the capture (each one step on its own batch).
        clip_grad: clip the gradients' global L2 norm to this before the optimizer step (0: off).

    The replayed optimizer step changes the parameters without the autograd version counters the host
    sees; each call bumps them, so that caches keyed on them (ViG's inference weight casts,
    :class:`CudaGraphModel`) see the new weights. The graph reads and writes the tensors that exist at
    its capture: load a model's weights in place at any time, but an optimizer's state (its
    ``load_state_dict`` makes new tensors) before the capture.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 amp_dtype: torch.dtype | None = None, warmup: int = 3, clip_grad: float = 0.0):
        if optimizer is not None and "capturable" in optimizer.defaults and not all(
                g.get("capturable") for g in optimizer.param_groups):
            raise ValueError(f"CudaGraphTrainStep needs {type(optimizer).__name__}(..., capturable=True): "
                             "its step must run on the device")
        if amp_dtype == torch.float16:
            raise ValueError("CudaGraphTrainStep: fp16 needs a GradScaler, which checks its scale on the host "
                             "at every step; use bf16")
        if warmup < 1:
            raise ValueError(f"CudaGraphTrainStep needs warmup >= 1 (lazy state must exist before the capture), "
                             f"got {warmup}")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CudaGraphTrainStep needs the model on a CUDA device, it is on {device}")
        if hasattr(model, "set_cuda_graphs"):  # a ViG's own replay of its features: the whole step is one graph here
            model.set_cuda_graphs(False)
        self.model, self.optimizer, self.loss_fn = model.train(), optimizer, loss_fn
        self.amp_dtype, self.warmup, self.clip_grad, self.device = amp_dtype, warmup, clip_grad, device
        self.calls = 0
        self.graph = self.static_x = self.static_y = self.static_loss = None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.written = [*model.parameters(), *model.buffers()]  # what a step may change in place
        groups = optimizer.param_groups if optimizer is not None else []
        # Adam-family optimizers take a tensor lr when capturable; others read a number at capture
        mirror = optimizer is not None and "capturable" in optimizer.defaults
        # per param group: None for a tensor lr, else [the device tensor the steps read (None: the number
        # is read at capture), the number it holds]
        self.lrs = [None if isinstance(g["lr"], torch.Tensor) else
                    [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) if mirror else None,
                     float(g["lr"])]
                    for g in groups]

    def _refresh_lrs(self) -> None:
        """Copy each float learning rate that changed since the last call into its device tensor."""
        for group, slot in zip(self.optimizer.param_groups if self.optimizer is not None else [], self.lrs):
            if slot is None:
                continue
            value = group["lr"]
            if isinstance(value, torch.Tensor):
                raise ValueError("CudaGraphTrainStep: a param group's float learning rate was replaced by a "
                                 "tensor after the first call; set floats, or give a tensor lr from the start "
                                 "and update it in place")
            if value == slot[1]:
                continue
            if slot[0] is None:
                raise ValueError(f"CudaGraphTrainStep: {type(self.optimizer).__name__} reads its learning rate "
                                 "when the step is captured, so it cannot change; use Adam(W) with "
                                 "capturable=True for a schedule")
            slot[0].fill_(value)
            slot[1] = value

    def _step(self) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype, cache=False):
            out = self.model(self.static_x)
        loss = self.loss_fn(out.float(), self.static_y)
        loss.backward()
        if self.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.params, self.clip_grad, foreach=True)
        if self.optimizer is not None:
            groups = self.optimizer.param_groups
            floats = [g["lr"] for g in groups]
            for group, slot in zip(groups, self.lrs):  # the step reads the device tensors
                if slot is not None and slot[0] is not None:
                    group["lr"] = slot[0]
            try:
                self.optimizer.step()
            finally:
                for group, value in zip(groups, floats):
                    group["lr"] = value
        return loss.detach()

    def _clear_grads(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def _eager(self) -> torch.Tensor:
        """One step on a side stream (what PyTorch's whole-network capture does before capturing)."""
        with side_stream(self.device):
            self._clear_grads()
            return self._step()

    def capture(self) -> None:
        """Capture one step on what :attr:`static_x` and :attr:`static_y` hold (nothing runs yet; other
        threads, e.g. a data loader's pin-memory thread, keep their CUDA calls)."""
        self._clear_grads()  # the captured backward writes the gradients afresh
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_loss = self._step()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.static_x is None:
            self.static_x, self.static_y = x.detach().clone(), y.detach().clone()
        elif x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            raise ValueError(f"CudaGraphTrainStep was captured for inputs {list(self.static_x.shape)} and targets "
                             f"{list(self.static_y.shape)}, got {list(x.shape)} and {list(y.shape)}: pad or drop "
                             "the odd batch, or make another one")
        self._refresh_lrs()
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.calls += 1
        if self.calls <= self.warmup:
            return self._eager().clone()
        if self.graph is None:
            self.capture()
        self.graph.replay()
        increment_version(self.written)
        return self.static_loss.clone()
