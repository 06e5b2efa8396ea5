"""``locality_mix``: ViG's output mix ``act(G * RMSNorm(o) + (1 - G) * RMSNorm(x))``, G = sigmoid(z).

The 2-D gating locality injection of ViG (Liao et al., AAAI 2025): one fused kernel forward and
one backward on CUDA (``triton_kernels.py``), the plain PyTorch reference elsewhere
(``reference.py``); see :mod:`vigla.ops.dispatch`.
"""
from __future__ import annotations

import torch

from ..checks import floating
from ..dispatch import run_eager, via_dispatcher
from ..tracing import exporting
from .op import LocalityMixFunction, locality_mix_forward
from .reference import locality_mix_reference, locality_mix_reference_bwd

__all__ = ["locality_mix", "locality_mix_reference", "locality_mix_reference_bwd"]


def locality_mix(o: torch.Tensor, x: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor,
                 w_l: torch.Tensor, eps: float = 1e-6, act: bool = False) -> torch.Tensor:
    """ViG's 2-D gating locality injection.

    Args:
        o: ``[..., h, d]`` global branch (the BiGLA output).
        x: ``[..., h*d]`` local branch (the depthwise-conv output).
        z: ``[..., h*d]`` gate logits (a column slice of a wider projection is fine).
        w_o, w_l: ``[d]`` weights of the two RMSNorms (shared by the heads).
        eps: RMSNorm epsilon. act: SiLU on the result.

    Returns:
        ``[..., h*d]`` in ``o.dtype``: ``act(sigmoid(z) * rms(o) * w_o + (1 - sigmoid(z)) * rms(x) * w_l)``
        per head.
    """
    # torch.export / ONNX / TorchScript / torch.jit.trace: the plain formula (vigla.ops.tracing)
    if torch.jit.is_scripting() or exporting():
        return locality_mix_reference(o, x, z, w_o, w_l, eps, act)
    floating("locality_mix", o=o, x=x, z=z, w_o=w_o, w_l=w_l)
    if o.dim() < 2 or o.shape[-1] < 1 or o.shape[-2] < 1:
        raise ValueError(f"locality_mix: o must be [..., h, d] with h, d >= 1, got {tuple(o.shape)}")
    if x.shape != z.shape or x.shape[:-1] != o.shape[:-2] \
            or x.shape[-1] != o.shape[-2] * o.shape[-1]:
        raise ValueError(f"locality_mix: expected o [..., h, d] and x, z [..., h*d] with the same "
                         f"leading dims, got o {tuple(o.shape)}, x {tuple(x.shape)}, z {tuple(z.shape)}")
    if w_o.shape != (o.shape[-1],) or w_l.shape != (o.shape[-1],):
        raise ValueError(f"locality_mix: w_o and w_l must be [{o.shape[-1]}], got "
                         f"{tuple(w_o.shape)} and {tuple(w_l.shape)}")
    if via_dispatcher():
        return torch.ops.vigla.locality_mix(o, x, z, w_o, w_l, float(eps), bool(act))
    return run_eager(LocalityMixFunction, locality_mix_forward, o, x, z, w_o, w_l, float(eps), bool(act))
