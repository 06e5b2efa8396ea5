"""ViG: plain (isotropic) vision backbone on bidirectional gated linear attention.

"ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention", Liao et al., AAAI 2025
(arXiv 2405.18425), section "Architecture"; official code github.com/hustvl/ViG.

Model: conv stem (stride 16) + learned absolute position embedding (14x14 at 224, bicubically
resized for other input sizes) -> ``depth`` x [x + BiGLAMixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))]
-> RMSNorm -> global average pool -> Linear.

Scriptable (``torch.jit.script``), traceable (``torch.fx``, ``torch.jit.trace``) and exportable
(``torch.export`` with dynamic batch, height and width; ONNX) as it is: the ops switch to plain
PyTorch formulas there (:mod:`vigla.ops.tracing`).
"""
import math
from functools import partial
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers import BiGLAMixer, ConvStem, RmsNorm
from ._graph_replay import GraphReplayMixin
from ._vig_common import (
    MIXER_KEYS, ClassifierMixin, KeyMap, ViGBlock, build_vig, check_global_pool, checkpoint_blocks, pool, run_blocks,
    drop_path_schedule, filter_checkpoint, record_input_size, swiglu_hidden_dim, vig_cfg,
)

__all__ = ["ViG", "checkpoint_filter_fn", "to_official_state_dict"]

# a leaf under torch.fx: it compares the (symbolic) grid with the stored one
torch.fx.wrap("resample_abs_pos_embed")


class ViG(ClassifierMixin, GraphReplayMixin, nn.Module):
    """Plain ViG (``get_classifier`` / ``reset_classifier``: :class:`ClassifierMixin`; ``set_cuda_graphs``:
    :class:`GraphReplayMixin`).

    Args:
        img_size: size the learned position embedding is laid out for (other sizes resize it on
            the fly; :meth:`set_input_size` lays it out anew).
        in_chans, num_classes: input channels, classes (0: no classifier).
        global_pool: ``"avg"`` (mean over tokens), ``"max"``, ``"avgmax"`` (their average) or ``""`` (classifier
            applied per token).
        embed_dim, depth, num_heads: width ``C``, blocks, heads (``d_v = C / num_heads``).
        expand_k: key width ``K = expand_k * C``.
        conv_act, out_act: SiLU after the mixer's DWConv / before its output projection (ViG-T).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing to this value over the blocks.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        expand_k: float = 0.5,
        conv_act: bool = False,
        out_act: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        check_global_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        self.patch_embed = ConvStem(in_chans, embed_dim, kernel_size=9, stride=8, act_layer=nn.SiLU)
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.patch_embed.grid_size(self.img_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))

        dpr = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.ModuleList([
            ViGBlock(
                embed_dim, num_heads, swiglu_hidden_dim(embed_dim, 256),
                norm_layer=partial(RmsNorm, eps=1e-6), drop_path=dpr[i],
                expand_k=expand_k, conv_act=conv_act, out_act=out_act,
            )
            for i in range(depth)
        ])
        self.norm = RmsNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=16) for i in range(depth)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: every Linear N(0, 0.02) with zero bias, then the mixers' own Xavier
        init (gain 2**-2.5); pos_embed trunc-normal 0.02; convs keep PyTorch's default."""
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BiGLAMixer):
                m.reset_parameters()

    # -- timm interface --------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Lay the position embedding out for ``img_size`` (resampled bicubically from the current
        grid, as a checkpoint loaded at that size is). The model runs at any size either way; at
        this one it no longer resizes the embedding per forward."""
        if img_size is None:
            return
        grid = self.patch_embed.grid_size(to_2tuple(img_size))
        if min(grid) < 1:
            raise ValueError(f"img_size {img_size} is too small: the stem needs at least "
                             f"{self.patch_embed.min_input_size} pixels a side")
        self.img_size = to_2tuple(img_size)
        if grid != self.grid_size:
            with torch.no_grad():
                pos_embed = resample_abs_pos_embed(
                    self.pos_embed, new_size=grid, old_size=self.grid_size, num_prefix_tokens=0,
                    interpolation="bicubic", antialias=False,
                )
            self.pos_embed = nn.Parameter(pos_embed, requires_grad=self.pos_embed.requires_grad)
            self.grid_size = grid
        record_input_size(self, self.img_size)

    # -- forward ---------------------------------------------------------------------------------
    def _pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        """The position embedding ``[1, H*W, C]`` for an ``hw`` grid: bicubically resized (as the
        official code does) unless it already fits; always under ``torch.export``, so that the
        exported graph takes any size."""
        return resample_abs_pos_embed(
            self.pos_embed, new_size=[hw[0], hw[1]], old_size=[self.grid_size[0], self.grid_size[1]],
            num_prefix_tokens=0, interpolation="bicubic", antialias=False,
        )

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``[B, in_chans, H, W]`` -> tokens ``[B, N, C]`` (+ position), grid ``(H/16, W/16)``."""
        x = self.patch_embed(x)
        hw = (x.shape[1], x.shape[2])
        return x.flatten(1, 2) + self._pos_embed(hw), hw

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> normalized tokens ``[B, N, C]``, N = (H/16) * (W/16). Eager CUDA calls
        replay it from CUDA graphs (:meth:`set_cuda_graphs`)."""
        if torch.jit.is_scripting():
            return self._forward_features(x)
        return self._features_replayed(x)

    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, hw = self._embed(x)
        if torch.jit.is_scripting():
            for blk in self.blocks:
                x = blk(x, hw)
        elif self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_blocks(self.blocks, x, hw)
        else:
            return run_blocks(self.blocks, x, hw, self.norm)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, num_classes]`` (``[B, C]`` if ``pre_logits``); with
        ``global_pool=""`` per token, ``[B, N, num_classes]`` (``[B, N, C]``)."""
        x = self.head_drop(pool(x, self.global_pool, [1]))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Block outputs (stride 16) as ``[B, C, H/16, W/16]`` (``NCHW``) or ``[B, N, C]`` (``NLC``).

        Args:
            indices: last n blocks if int, all if None, else these block indices.
            norm: apply the final norm to every intermediate.
            stop_early: stop after the last block asked for.
            intermediates_only: return only the list of intermediates.
        Returns:
            ``intermediates`` or ``(forward_features output, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, hw = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        intermediates = []
        for i, blk in enumerate(blocks):
            x = checkpoint_blocks([blk], x, hw) if checkpointed else blk(x, hw)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y.unflatten(1, hw).permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last one in ``indices`` (and the norm / head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


VIG_KEYMAP = KeyMap([
    ("patch_embed.proj.0.", "patch_embed.conv1."),
    ("patch_embed.proj.1.", "patch_embed.norm1."),
    ("patch_embed.proj.3.", "patch_embed.conv2."),
    ("patch_embed.proj.4.", "patch_embed.norm2."),
    ("blocks.#.attn_norm.", "blocks.#.norm1."),
    ("blocks.#.mlp_norm.", "blocks.#.norm2."),
    ("blocks.#.mlp.gate_proj.", "blocks.#.mlp.fc1."),
    ("blocks.#.mlp.down_proj.", "blocks.#.mlp.fc2."),
    *((f"blocks.#.attn.{o}.", f"blocks.#.attn.{v}.") for o, v in MIXER_KEYS),
])


def _resize_pos_embed(state_dict: dict, model: ViG) -> dict:
    """A checkpoint's square ``pos_embed`` grid resampled (bicubic) to the model's grid."""
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape and pos.shape[-1] == model.embed_dim:
        side = math.isqrt(pos.shape[1])
        if side * side != pos.shape[1]:
            raise ValueError(f"checkpoint pos_embed {tuple(pos.shape)} is not a square grid")
        state_dict["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=model.grid_size, old_size=(side, side), num_prefix_tokens=0,
            interpolation="bicubic", antialias=False,
        )
    return state_dict


def checkpoint_filter_fn(state_dict: dict, model: ViG) -> dict:
    """Official hustvl/ViG (or vigla) weights -> this model's state dict (:func:`filter_checkpoint`),
    ``pos_embed`` resized to the model's grid."""
    return filter_checkpoint(state_dict, model, VIG_KEYMAP, adapt=_resize_pos_embed)


def to_official_state_dict(state_dict: dict) -> dict:
    """A vigla ``ViG`` state dict under the official hustvl/ViG key names."""
    return {VIG_KEYMAP.to_official(k): v for k, v in state_dict.items()}


def _create_vig(variant: str, pretrained: bool = False, **kwargs) -> ViG:
    return build_vig(ViG, variant, pretrained, checkpoint_filter_fn, default_out_indices=3, **kwargs)


def _cfg(**kwargs) -> dict:
    return vig_cfg(pool_size=(14, 14), first_conv="patch_embed.conv1", **kwargs)


default_cfgs = generate_default_cfgs({
    "vig_tiny.in1k": _cfg(),
    "vig_small.in1k": _cfg(),
    "vig_base.in1k": _cfg(),
})


@register_model
def vig_tiny(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-T (5.83M): C 192, 3 heads; SiLU after the DWConv and before o_proj; drop path 0."""
    args = dict(embed_dim=192, depth=12, num_heads=3, conv_act=True, out_act=True, drop_path_rate=0.0)
    return _create_vig("vig_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vig_small(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-S (22.62M): C 384, 6 heads; drop path 0.2."""
    args = dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.2)
    return _create_vig("vig_small", pretrained, **dict(args, **kwargs))


@register_model
def vig_base(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-B (89.02M): C 768, 12 heads; drop path 0.5."""
    args = dict(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.5)
    return _create_vig("vig_base", pretrained, **dict(args, **kwargs))
