"""Castling-ViT token mixer: linear-angular attention + depthwise conv on V (+ a training-only branch).

You et al., CVPR 2023 (the overview figure) and the official ``LinAngularAttention`` (GATECH-EIC/Castling-ViT).
Per head, with Q, K, V from one ``Linear(C, 3C)``:

    Z   = 0.5·V + (1/π)·Q̂ (K̂ᵀ V)              linear order, float32, autocast off
    Z  += (1[P > ε] ⊙ P) V                     only while the auxiliary branch is active (training)
    O   = Z / |Z|  +  DWConv(V)                 normalise per token and head, then add the local branch
    out = proj(merge_heads(O))

Inference (``eval()``) never builds an ``N×N`` tensor, and neither does training: the auxiliary branch takes the
keys in blocks (:func:`vigla.ops.linear_angular.masked_softmax_aux`), so its memory is linear in N, forward and
backward. The branch has no parameters, so the parameter set, and the state dict, is the same with it on or off.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..notices import ViglaWarning, caller_stacklevel
from ..ops.linear_angular import (
    DEFAULT_NORM_EPS,
    linear_angular_z,
    masked_softmax_aux,
    normalize_heads,
    switch_certificate,
)

__all__ = ["LinearAngularAttention", "DW_MODES"]

# leaves under torch.fx: the traced graph calls the ops (their checks and autocast guards) as they are
torch.fx.wrap("linear_angular_z")
torch.fx.wrap("normalize_heads")

DW_MODES = ("seq1d", "2d")
_DEFAULT_DW_KERNEL = {"seq1d": 9, "2d": 3}


class LinearAngularAttention(nn.Module):
    """Castling-ViT linear-angular attention, a drop-in ``attn_layer`` for timm's ``Block``.

    Args:
        dim: channels C; ``num_heads`` must divide it.
        num_heads: h; head dim d = C / h.
        qkv_bias: bias on the qkv projection (official Castling code: False; timm DeiT: True).
        proj_bias: bias on the output projection (official: True).
        proj_drop: dropout after the output projection.
        dw_mode: ``"seq1d"`` (faithful: per-head ``(k, 1)`` conv along the token sequence, shared over d,
            ``Conv2d(h, h, (k, 1), groups=h, bias=False)`` on V seen as ``[B, h, N, d]``) or ``"2d"``
            (``k×k`` depthwise conv over the patch grid, ``groups=C``; prefix tokens pass through as V).
        dw_kernel_size: k; default 9 for ``seq1d`` (official), 3 for ``2d``. Must be odd.
        num_prefix_tokens: default number of prefix (cls/reg) tokens in front of the patch tokens
            (used by ``dw_mode="2d"`` only).
        aux: start with the auxiliary masked-softmax branch switched on (it runs in training only).
        aux_eps: the mask threshold ε (official: 0.02); the mask is ``P > ε``.
        aux_lambda: weight of the L1 regulariser ``λ·mean_{b,h,i} sum_j S_ij`` (0: none, as in the
            official code).
        norm_eps: floor of the three L2 norms (q, k, output).
        qk_norm, scale_norm, attn_drop, norm_layer: accepted so that timm's ``Block`` can build this
            class; the first three must stay off / zero (the official forward never applies
            ``attn_drop``), ``norm_layer`` is unused.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[type] = None,
        dw_mode: str = "seq1d",
        dw_kernel_size: Optional[int] = None,
        num_prefix_tokens: int = 1,
        aux: bool = False,
        aux_eps: float = 0.02,
        aux_lambda: float = 0.0,
        norm_eps: float = DEFAULT_NORM_EPS,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"LinearAngularAttention: dim={dim} is not divisible by num_heads={num_heads}")
        if qk_norm or scale_norm:
            raise ValueError("LinearAngularAttention: qk_norm / scale_norm are not supported (q and k are "
                             "L2-normalised by the kernel itself)")
        if attn_drop:
            raise ValueError(f"LinearAngularAttention: attn_drop must be 0 (there is no attention matrix to "
                             f"drop at inference), got {attn_drop}")
        if dw_mode not in DW_MODES:
            raise ValueError(f"LinearAngularAttention: dw_mode must be one of {DW_MODES}, got {dw_mode!r}")
        k = _DEFAULT_DW_KERNEL[dw_mode] if dw_kernel_size is None else dw_kernel_size
        if k < 1 or k % 2 == 0:
            raise ValueError(f"LinearAngularAttention: dw_kernel_size must be a positive odd int, got {k}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.dw_mode = dw_mode
        self.num_prefix_tokens = num_prefix_tokens
        self.norm_eps = norm_eps

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        if dw_mode == "seq1d":
            self.dconv = nn.Conv2d(num_heads, num_heads, (k, 1), padding=(k // 2, 0), groups=num_heads,
                                   bias=False, **dd)
        else:
            self.dconv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False, **dd)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        self.aux_enabled = aux
        self.aux_eps = aux_eps
        self.aux_lambda = aux_lambda
        self.aux_probe = False  # set only by evaluation probes (vigla.models.castling): branch on, any mode
        self.grid_size: Optional[Tuple[int, int]] = None  # default hw, set by CastlingVisionTransformer
        self._aux_reg: Optional[torch.Tensor] = None
        self._aux_stats: Optional[dict] = None
        self._eps_warned: set = set()  # the N_keys whose aux_eps warning this layer has issued (_warn_eps)

    # ---- auxiliary-branch control ------------------------------------------------------------
    def set_aux(self, enabled: bool) -> None:
        """Switch the auxiliary branch on or off (it only ever runs in training, or under a probe)."""
        self.aux_enabled = bool(enabled)
        if not enabled:
            self._aux_reg = None
            self._aux_stats = None

    def aux_active(self) -> bool:
        """Whether the next forward runs the branch: switched on and training, or forced by a probe."""
        return (self.aux_enabled and self.training) or self.aux_probe

    def aux_loss(self) -> torch.Tensor:
        """``λ·mean_{b,h,i} sum_j S_ij`` from the last training forward; a 0-dim zero when there is none."""
        if self._aux_reg is None:
            return torch.zeros((), device=self.qkv.weight.device)
        return self._aux_reg

    def stats(self) -> dict[str, float]:
        """From the last forward that ran the branch: ``mask_density`` (mean of ``1[P > ε]``),
        ``row_mass`` (``m = max_i sum_j S_ij``), ``kept_mass`` (``mean_i sum_j S_ij``) and ``certificate`` (see
        :func:`vigla.ops.linear_angular.switch_certificate`). Empty when the branch has not run."""
        if self._aux_stats is None:
            return {}
        return {key: float(val) for key, val in self._aux_stats.items()}

    # ---- forward -----------------------------------------------------------------------------
    def dwconv(self, v: torch.Tensor, hw: Optional[Tuple[int, int]], num_prefix_tokens: int) -> torch.Tensor:
        """The local branch on V ``[B, h, N, d]`` -> ``[B, h, N, d]``.

        ``seq1d``: per-head conv along the token axis (zero padding at the sequence ends only).
        ``2d``: depthwise conv over the ``H×W`` patch grid; prefix tokens are returned as V unchanged.
        """
        if self.dw_mode == "seq1d":
            return self.dconv(v)
        b, h, n, d = v.shape
        height, width = _patch_grid(hw, n, num_prefix_tokens)
        x = v.transpose(1, 2).reshape(b, n, h * d)
        patches = x[:, num_prefix_tokens:].transpose(1, 2).reshape(b, h * d, height, width)
        patches = self.dconv(patches).flatten(2).transpose(1, 2)
        x = torch.cat([x[:, :num_prefix_tokens], patches], dim=1)
        return x.reshape(b, n, h, d).transpose(1, 2)

    def _run_aux(self, q, k, v, z_lin) -> torch.Tensor:
        n_keys = k.shape[-2]
        if self.aux_eps < 1.0 / n_keys and n_keys not in self._eps_warned:
            self._warn_eps(n_keys)
        aux = masked_softmax_aux(q, k, v, self.aux_eps, self.scale)
        self._aux_stats = {
            "mask_density": aux.density,
            "row_mass": aux.row_mass.detach().amax(),
            "kept_mass": aux.row_mass.detach().mean(),
            "certificate": switch_certificate(z_lin.detach(), v.detach(), aux.row_mass.detach()),
        }
        if self.training and self.aux_lambda > 0 and torch.is_grad_enabled():
            self._aux_reg = self.aux_lambda * aux.row_mass.mean()
        return aux.sv

    def _warn_eps(self, n_keys: int) -> None:
        """The warning that ``aux_eps`` is below ``1 / n_keys`` (:func:`_eps_message`), issued once per ``n_keys`` by
        this layer: the training forwards after it skip the message and the stack walk (an ε schedule's ramp, which
        sets a new ``aux_eps`` every step, included)."""
        self._eps_warned.add(n_keys)
        # the warning names the user's call of the model, not torch's Module.__call__; under torch.compile the
        # stack is dynamo's (its walk broke the graph once more and warned twice): the fixed level, as before
        level = 4 if torch.compiler.is_compiling() else caller_stacklevel()
        warnings.warn(_eps_message(self.aux_eps, n_keys), ViglaWarning, stacklevel=level)

    def forward(
        self,
        x: torch.Tensor,
        hw: Optional[Tuple[int, int]] = None,
        num_prefix_tokens: Optional[int] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """``x [B, N, C] -> [B, N, C]``.

        ``hw = (H, W)`` (default: :attr:`grid_size`, which the Castling model sets) and ``num_prefix_tokens``
        (default: the constructor's) locate the patch grid; only ``dw_mode="2d"`` uses them.
        ``attn_mask`` / ``is_causal`` exist for timm's ``Block`` and must be unset.
        """
        _check_input(x, self.qkv.in_features, attn_mask, is_causal)
        npt = self.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
        hw = self.grid_size if hw is None else hw
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

        z = linear_angular_z(q, k, v, eps=self.norm_eps)
        # the training-only branch keeps Python state: eager (and torch.compile / export) only, not in
        # TorchScript or torch.fx graphs (q is a Proxy there)
        if not torch.jit.is_scripting() and isinstance(q, torch.Tensor):
            if self.training:
                self._aux_reg = None
            if self.aux_active():
                z = z + self._run_aux(q, k, v, z)
        o = normalize_heads(z, eps=self.norm_eps).to(v.dtype) + self.dwconv(v, hw, npt)

        x = o.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, dw_mode={self.dw_mode!r}, aux={self.aux_enabled}, "
                f"aux_eps={self.aux_eps:g}, aux_lambda={self.aux_lambda:g}")


def _eps_message(eps: float, n_keys: int) -> str:
    """The aux_eps warning for ``eps < 1 / n_keys``: why the mask cannot empty, and a threshold that
    :class:`~vigla.models.castling.AuxSchedule` takes (below 1) and that lets it; with one key no threshold does
    (its softmax entry is 1), and it says so."""
    why = (f"LinearAngularAttention: aux_eps={eps:g} < 1/N_keys = 1/{n_keys}: every softmax row keeps at least one "
           f"entry, so the auxiliary branch can never empty its mask and the switch to inference cannot be exact "
           f"(a softmax row over N keys has an entry >= 1/N). ")
    off = "switch the branch off for this layer (vigla train: --castling-schedule none)"
    if n_keys == 1:
        return why + f"No aux_eps can empty a row of one key (aux_eps stays below 1): {off}, or give it more tokens."
    low = _inverse_rounded_up(n_keys)
    example = ", e.g. 2/N_keys" if n_keys > 2 else ""  # 2/2 is not below 1
    return why + (f"Set aux_eps >= {low:g}{example} (a Castling model: aux_schedule='eps={low:g}'; vigla train: "
                  f"--castling-schedule eps={low:g}), or {off}.")


def _inverse_rounded_up(n: int) -> float:
    """``1 / n`` rounded up to three significant digits: an ``aux_eps`` set to it is not below ``1 / n``."""
    scale = 10 ** (len(str(n)) + 2)
    return -(-scale // n) / scale


# Input checks as torch.fx leaves: traced graphs run them on the real tensors (a traced module's
# optional inputs are Proxies, whatever their default).
@torch.fx.wrap
def _check_input(x: torch.Tensor, dim: int, attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("LinearAngularAttention does not support attn_mask or is_causal")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"LinearAngularAttention: expected x of shape [B, N, {dim}], got {list(x.shape)}")


@torch.fx.wrap
def _patch_grid(hw: Optional[Tuple[int, int]], n: int, num_prefix_tokens: int) -> Tuple[int, int]:
    if hw is None:
        raise ValueError("LinearAngularAttention(dw_mode='2d') needs the patch grid: call it with hw=(H, W)")
    height, width = hw
    if height * width + num_prefix_tokens != n:
        raise ValueError(
            f"LinearAngularAttention: hw=({height}, {width}) and num_prefix_tokens={num_prefix_tokens} imply "
            f"{height * width + num_prefix_tokens} tokens, but x has N={n}"
        )
    return height, width
