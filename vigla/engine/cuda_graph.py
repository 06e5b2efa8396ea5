"""Inference replayed from a CUDA graph: the forward's kernels launched by the GPU itself.

At small inputs (224² and below) an eager forward is bound by the host's launch rate, not by the GPU;
replaying a captured graph removes the host from the path. ``CudaGraphModel(model, batch_size)``
captures ``model`` at one batch size and image size (at its first call) and then takes any batch:
smaller ones are padded to the captured size, larger ones run in pieces.

    graphed = CudaGraphModel(model.cuda(), batch_size=128, amp_dtype=torch.bfloat16)
    logits = graphed(images)  # [B, 3, 224, 224] -> [B, num_classes]; captured at the first call
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .precision import autocast

__all__ = ["CudaGraphModel"]


class CudaGraphModel(nn.Module):
    """``model``'s inference forward captured once as a CUDA graph and replayed on every call.

    Args:
        model: on a CUDA device; it is put in eval mode (no gradients are recorded).
        batch_size: images per replay; calls with fewer are padded (with zeros), more are split.
        amp_dtype: autocast dtype inside the graph (``None``: full precision).
        warmup: eager calls before the capture (compilation, autotuning, lazy state).

    The graph is captured at the first call, for that call's image shape ``[C, H, W]``; calls take
    ``[B, C, H, W]`` of that shape and return the model's output for those ``B`` images (a fresh
    tensor, not the graph's buffer).
    """

    def __init__(self, model: nn.Module, batch_size: int, amp_dtype: torch.dtype | None = None,
                 warmup: int = 3):
        super().__init__()
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CudaGraphModel needs the model on a CUDA device, it is on {device}")
        self.model = model.eval()
        self.batch_size, self.amp_dtype, self.warmup = batch_size, amp_dtype, warmup
        self.shape = self.graph = self.static_input = self.static_output = None

    def capture(self, shape: tuple[int, ...]) -> None:
        """Capture the graph for ``[batch_size, *shape]`` inputs."""
        device = next(self.model.parameters()).device
        self.shape = tuple(shape)
        self.static_input = torch.zeros(self.batch_size, *self.shape, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.inference_mode(), autocast(device, self.amp_dtype):
            for _ in range(self.warmup):
                self.model(self.static_input)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # autocast's own weight cache lives only as long as one autocast region: not in a graph
        with torch.inference_mode(), autocast(device, self.amp_dtype, cache=False), \
                torch.cuda.graph(self.graph):
            self.static_output = self.model(self.static_input)

    def replay(self) -> torch.Tensor:
        """Run the graph on what :attr:`static_input` holds; returns the graph's output buffer."""
        self.graph.replay()
        return self.static_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
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
