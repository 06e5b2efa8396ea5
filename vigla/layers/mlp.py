"""MLPs."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.dispatch import compute_dtype
from ..ops.swiglu import swiglu_mlp
from .cast import caching, inference_weights

__all__ = ["SwiGLU"]

torch.fx.wrap("swiglu_mlp")  # a leaf under torch.fx: the traced graph calls the op as it is


class SwiGLU(nn.Module):
    """``fc2(SiLU(a) * b)`` with ``[a | b] = fc1(x)``, no biases (the official ViG MLP; the same
    state dict as timm's ``GluMlp(gate_last=False)``). The whole MLP is one op
    (:func:`vigla.ops.swiglu.swiglu_mlp`: fused gating; in training only the input is kept, fc1's
    output and the gating output are recomputed in the backward). ``[..., dim]`` -> ``[..., dim]``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.fc1.weight, self.fc2.weight
        if not torch.jit.is_scripting() and caching(x):  # inference: the weights cast once
            w1, w2 = inference_weights(self, "fc", (w1, w2), compute_dtype(x))
        return swiglu_mlp(x, w1, w2)
