"""Castling-ViT's linear-angular attention as pure tensor functions (You et al., CVPR 2023: the linear-angular
attention and the auxiliary masked softmax of its overview figure; the official ``attention.py``).

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
* :func:`masked_softmax_aux`: the training-only branch ``S·V``, ``S = 1[P > ε]·P``, memory linear in N
  (keys in blocks, two passes, a recomputing backward); :func:`masked_softmax_aux_quadratic`, its reference.
* :func:`normalize_heads`: the output normalisation ``Z / |Z|``.
* :func:`switch_certificate`: a bound on what dropping ``S·V`` changes (vigla's, derived below).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "linear_angular_z",
    "linear_angular_z_quadratic",
    "masked_softmax_aux",
    "masked_softmax_aux_quadratic",
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
    d = qh.shape[-1]
    z = torch.baddbmm(v.reshape(b * h, n, dv), qh.reshape(b * h, n, d), state.reshape(b * h, d, dv),
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


#: keys per block of :func:`masked_softmax_aux`: a block's logits are ``[B, H, N, 256]`` (linear in N)
DEFAULT_AUX_BLOCK = 256


def masked_softmax_aux(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    threshold: float,
    scale: float | None = None,
    block_size: int = DEFAULT_AUX_BLOCK,
) -> AuxBranch:
    """The training-only masked softmax branch: ``S = 1[P > threshold]·P``, ``P = softmax(q kᵀ·scale)``.

    ``q`` and ``k`` are the *unnormalised* projections ``[B, H, N, D]``, ``v`` is ``[B, H, N, Dv]``;
    ``scale`` defaults to ``D**-0.5``. ``S`` is not renormalised, and the comparison is strict (``>``), as in
    the official code. Gradient reaches ``P`` only at kept entries (the mask is a constant).

    Memory linear in N, forward and backward: no ``[N, N]`` tensor is formed. Keys are taken ``block_size``
    at a time, twice: first each query's softmax normaliser (running max and sum, as in FlashAttention),
    then the masked probabilities of the block times its values. The backward recomputes each block's
    probabilities from the saved normaliser (:class:`_BlockwiseMaskedSoftmax`). Computes in float32 with
    autocast off (float64 for float64 inputs). :func:`masked_softmax_aux_quadratic` is its reference.
    """
    _check_qkv(q, k, v, "masked_softmax_aux")
    if block_size < 1:
        raise ValueError(f"masked_softmax_aux: block_size must be >= 1, got {block_size}")
    dt = _compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with _no_autocast(q):
        sv, row_mass, kept = _BlockwiseMaskedSoftmax.apply(q.to(dt), k.to(dt), v.to(dt), float(threshold),
                                                           float(scale), int(block_size))
    b, h, n, _ = q.shape
    return AuxBranch(sv, row_mass, kept.to(dt) / max(1, b * h * n * k.shape[-2]))  # the density (0 when empty)


def masked_softmax_aux_quadratic(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threshold: float, scale: float | None = None
) -> AuxBranch:
    """Reference for :func:`masked_softmax_aux`: the ``[B, H, N, N]`` probabilities formed, autograd through
    them (three ``N×N`` tensors per call). Same arguments (no block size), result and dtype rules; tests only."""
    _check_qkv(q, k, v, "masked_softmax_aux_quadratic")
    dt = _compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with _no_autocast(q):
        p = torch.softmax((q.to(dt) * scale) @ k.to(dt).transpose(-2, -1), dim=-1)
        keep = p > threshold
        s = p * keep
        density = torch.count_nonzero(keep).to(dt) / max(1, keep.numel())
        return AuxBranch(s @ v.to(dt), s.sum(-1), density)


def _key_blocks(n: int, block: int):
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def _row_normaliser(qs: torch.Tensor, k: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: per query ``[B, H, N]``, the row max ``m`` of the logits ``qs·k_j`` and ``log sum_j exp(qs·k_j - m)``,
    keys ``block`` at a time (running max). Kept apart, not as ``m + log(...)``: ``P = exp((x - m) - log l)`` then
    carries no rounding of a large ``|m|`` (fp32 probabilities as accurate as ``torch.softmax``'s)."""
    m = l = None
    for start, stop in _key_blocks(k.shape[-2], block):
        logits = qs @ k[..., start:stop, :].transpose(-2, -1)  # [B, H, N, block]
        block_max = logits.amax(-1)
        new = block_max if m is None else torch.maximum(m, block_max)
        block_sum = logits.sub_(new[..., None]).exp_().sum(-1)
        l = block_sum if l is None else l * torch.exp(m - new) + block_sum
        m = new
    if m is None:  # no keys (N = 0): no rows either
        m = l = qs.new_empty(qs.shape[:-1])
    return m, torch.log(l)


def _probs(qs: torch.Tensor, k_block: torch.Tensor, m: torch.Tensor, log_l: torch.Tensor) -> torch.Tensor:
    """One key block's softmax probabilities ``P`` ``[B, H, N, block]`` from the row normaliser."""
    return (qs @ k_block.transpose(-2, -1)).sub_(m[..., None]).sub_(log_l[..., None]).exp_()


class _BlockwiseMaskedSoftmax(torch.autograd.Function):
    """``(S·V, sum_j S_ij, number of kept entries)`` from ``q, k [B, H, N, D]``, ``v [B, H, N, Dv]`` (one
    dtype), keys in blocks. Saves q, k, v, the row normaliser and the two outputs: O(N) memory; the
    passes hold a few ``[B, H, N, block]`` tensors at a time.

    Backward, with ``S = M⊙P`` (``M`` constant) and upstream grads ``dO`` (of ``S·V``) and ``dm`` (of the row
    mass): ``dS = dO·Vᵀ + dm``, ``dV = Sᵀ·dO``, and through the softmax ``dL = S⊙dS - P⊙δ`` with
    ``δ_i = sum_j S_ij dS_ij = dO_i·(S·V)_i + dm_i·m_i`` (known before the pass, from the outputs), then
    ``dq = scale·dL·K``, ``dk = scale·dLᵀ·q``; each block's ``P`` is recomputed.
    """

    @staticmethod
    def forward(ctx, q, k, v, threshold: float, scale: float, block: int):
        qs = q * scale
        m, log_l = _row_normaliser(qs, k, block)
        sv = torch.zeros_like(v)
        row_mass = torch.zeros_like(m)
        kept = torch.zeros((), dtype=torch.int64, device=q.device)
        for start, stop in _key_blocks(k.shape[-2], block):
            s = _probs(qs, k[..., start:stop, :], m, log_l)
            s.masked_fill_(s <= threshold, 0.0)  # S = 1[P > threshold]·P, in place
            sv.add_(s @ v[..., start:stop, :])
            row_mass.add_(s.sum(-1))
            kept.add_(torch.count_nonzero(s))
        ctx.save_for_backward(q, k, v, m, log_l, sv, row_mass)
        ctx.threshold, ctx.scale, ctx.block = threshold, scale, block
        ctx.mark_non_differentiable(kept)
        return sv, row_mass, kept

    @staticmethod
    @once_differentiable  # its row normaliser is saved as a constant and its passes work in place: no second derivative
    def backward(ctx, d_sv, d_mass, _):
        q, k, v, m, log_l, sv, row_mass = ctx.saved_tensors
        scale = ctx.scale
        qs = q * scale
        delta = (d_sv * sv).sum(-1) + d_mass * row_mass  # [B, H, N]
        dq = torch.zeros_like(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        for start, stop in _key_blocks(k.shape[-2], ctx.block):
            k_blk, v_blk = k[..., start:stop, :], v[..., start:stop, :]
            p = _probs(qs, k_blk, m, log_l)
            s = p * (p > ctx.threshold)
            dv[..., start:stop, :] = s.transpose(-2, -1) @ d_sv
            dl = (d_sv @ v_blk.transpose(-2, -1)).add_(d_mass[..., None]).mul_(s)  # S⊙dS
            del s
            dl.sub_(p.mul_(delta[..., None]))  # - P⊙δ
            del p
            dq.add_(dl @ k_blk)
            dk[..., start:stop, :] = dl.transpose(-2, -1) @ q
        return dq.mul_(scale), dk.mul_(scale), dv, None, None, None


def switch_certificate(z_lin: torch.Tensor, v: torch.Tensor, row_mass: torch.Tensor) -> torch.Tensor:
    """A bound on dropping the auxiliary branch: ``max_{b,h} m·max|v| / min|Z_lin|``.

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
