"""Castling-ViT's linear-angular attention as pure tensor functions (spec castling.md §1, §2.2).

Layout: ``[B, H, N, D]`` (batch, heads, tokens, head dim), the layout of timm's ``Attention``.

For one head, with ``q̂ = q / |q|`` and ``k̂ = k / |k|``, the angular kernel
``sim(q, k) = 1 - arccos(q̂·k̂) / π`` is kept to its linear part ``1/2 + q̂·k̂ / π``. Following the
official code, the constant term becomes a per-token skip ``0.5·V``, so the pre-normalisation output is

    Z = 0.5·V + (1/π)·Q̂ (K̂ᵀ V)        (K̂ᵀV: a D×D matrix per head, never an N×N one)

and the branch output is ``Z / |Z|`` per token and head. Every function here computes in float32 with
autocast disabled (``K̂ᵀV``, ``Q̂S`` and the norms would overflow in fp16 near N = 3k), whatever the
input dtype; float64 inputs stay float64 (for reference checks). Outputs are in that compute dtype.

* :func:`linear_angular_z`: Z in linear order, O(N·D²) per head. The inference path.
* :func:`linear_angular_z_quadratic`: the same Z through the explicit ``(0.5·I + Q̂K̂ᵀ/π) V``; tests only.
* :func:`masked_softmax_aux`: the training-only branch ``S·V``, ``S = 1[P > ε]·P``, quadratic.
* :func:`normalize_heads`: the output normalisation ``Z / |Z|``.
* :func:`switch_certificate`: the bound of spec §2.2 on what dropping ``S·V`` changes.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "linear_angular_z",
    "linear_angular_z_quadratic",
    "masked_softmax_aux",
    "normalize_heads",
    "switch_certificate",
    "AuxBranch",
]

DEFAULT_NORM_EPS = 1e-6


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fn: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(
                f"{fn}: {name} must be a 4-D floating-point tensor [B, H, N, D], "
                f"got shape {tuple(t.shape)} and dtype {t.dtype}"
            )
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{fn}: expected q and k of one shape [B, H, N, D] and v [B, H, N, Dv] with the same B, H, N; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def normalize_heads(z: torch.Tensor, eps: float = DEFAULT_NORM_EPS) -> torch.Tensor:
    """``z / max(|z|, eps)`` over the last dim (per token, per head), in float32 or float64."""
    if not torch.jit.is_scripting():  # TorchScript cannot compile the autocast guard (not a constant device)
        with _no_autocast(z):
            return _normalize(z, eps)
    return _normalize(z, eps)


def _normalize(z: torch.Tensor, eps: float) -> torch.Tensor:
    return F.normalize(z.to(_compute_dtype(z)), dim=-1, eps=eps)


def linear_angular_z(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_NORM_EPS
) -> torch.Tensor:
    """``Z = 0.5·V + (1/π)·Q̂ (K̂ᵀ V)`` in linear order, before the output normalisation.

    Args:
        q, k: ``[B, H, N, D]``; normalised here (per token and head, ``F.normalize`` with ``eps``).
        v: ``[B, H, N, Dv]``.
        eps: norm floor, so an all-zero q or k row gives a zero row instead of NaN.

    Returns:
        ``[B, H, N, Dv]`` in float32 (float64 for float64 inputs). Peak extra memory is O(N·D + D²)
        per head: no ``N×N`` tensor is formed.
    """
    if not torch.jit.is_scripting():  # TorchScript compiles neither the checks nor the autocast guard
        _check_qkv(q, k, v, "linear_angular_z")
        with _no_autocast(q):
            return _linear_order_z(q, k, v, eps)
    return _linear_order_z(q, k, v, eps)


def _linear_order_z(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    dt = _compute_dtype(q)
    v = v.to(dt)
    qh = F.normalize(q.to(dt), dim=-1, eps=eps)
    kh = F.normalize(k.to(dt), dim=-1, eps=eps)
    state = kh.transpose(-2, -1) @ v  # [B, H, D, Dv]
    b, h, n, dv = v.shape
    z = torch.baddbmm(v.reshape(b * h, n, dv), qh.reshape(b * h, n, -1), state.reshape(b * h, -1, dv),
                      beta=0.5, alpha=1.0 / math.pi)  # one fused pass: 0.5·V + Q̂S/π
    return z.reshape(b, h, n, dv)


def linear_angular_z_quadratic(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = DEFAULT_NORM_EPS
) -> torch.Tensor:
    """Reference for :func:`linear_angular_z`: ``(0.5·I + Q̂K̂ᵀ/π) V`` with the ``N×N`` matrix formed.

    Quadratic in N (time and memory); for tests only. Same arguments, result and dtype rules.
    """
    _check_qkv(q, k, v, "linear_angular_z_quadratic")
    dt = _compute_dtype(q)
    with _no_autocast(q):
        qh = F.normalize(q.to(dt), dim=-1, eps=eps)
        kh = F.normalize(k.to(dt), dim=-1, eps=eps)
        n = q.shape[-2]
        kernel = 0.5 * torch.eye(n, dtype=dt, device=q.device) + (qh @ kh.transpose(-2, -1)) / math.pi
        return kernel @ v.to(dt)


class AuxBranch(NamedTuple):
    """What :func:`masked_softmax_aux` returns.

    sv: ``[B, H, N, Dv]``, ``S·V``, the term added to Z before the output normalisation.
    row_mass: ``[B, H, N]``, ``sum_j S_ij`` (the kept probability mass of each query; carries grad).
    density: 0-dim, the fraction of kept entries ``mean(1[P > ε])`` (no grad).
    """

    sv: torch.Tensor
    row_mass: torch.Tensor
    density: torch.Tensor


def masked_softmax_aux(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threshold: float, scale: float | None = None
) -> AuxBranch:
    """The training-only masked softmax branch: ``S = 1[P > threshold]·P``, ``P = softmax(q kᵀ·scale)``.

    ``q`` and ``k`` are the *unnormalised* projections; ``scale`` defaults to ``D**-0.5``. ``S`` is not
    renormalised, and the comparison is strict (``>``), as in the official code. Gradient reaches ``P``
    only at kept entries (the mask is a constant). Quadratic: builds three ``[B, H, N, N]`` tensors.
    """
    _check_qkv(q, k, v, "masked_softmax_aux")
    dt = _compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with _no_autocast(q):
        p = torch.softmax((q.to(dt) * scale) @ k.to(dt).transpose(-2, -1), dim=-1)
        keep = p > threshold
        s = p * keep
        density = torch.count_nonzero(keep).to(dt) / keep.numel()
        return AuxBranch(s @ v.to(dt), s.sum(-1), density)


def switch_certificate(z_lin: torch.Tensor, v: torch.Tensor, row_mass: torch.Tensor) -> torch.Tensor:
    """Spec §2.2's bound on dropping the auxiliary branch: ``max_{b,h} m·max|v| / min|Z_lin|``.

    With ``a = Z_lin`` (row i of :func:`linear_angular_z`) and ``b = (S·V)_i``, the per-token change of the
    normalised output is ``|a/|a| - (a+b)/|a+b|| <= 2|b|/|a|`` and ``|b| <= (sum_j S_ij)·max_j |v_j|``,
    so for every token of head (b, h) the change is at most twice this ratio.

    Args:
        z_lin: ``[B, H, N, Dv]`` the linear branch before normalisation.
        v: ``[B, H, N, Dv]``.
        row_mass: ``[B, H, N]`` from :func:`masked_softmax_aux`.

    Returns:
        0-dim tensor (no grad): the largest ratio over batch and heads.
    """
    with torch.no_grad(), _no_autocast(z_lin):
        m = row_mass.amax(-1)
        v_max = v.to(z_lin.dtype).norm(dim=-1).amax(-1)
        z_min = z_lin.norm(dim=-1).amin(-1)
        return (m * v_max / z_min.clamp_min(torch.finfo(z_lin.dtype).tiny)).amax()
