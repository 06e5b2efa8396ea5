"""ViG-H: hierarchical ViG (four stages, strides 4 / 8 / 16 / 32).

"ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention", Liao et al., AAAI 2025
(arXiv 2405.18425), section "Architecture" (hierarchical variant); official code
github.com/hustvl/ViG (``HierViG``).

Model: conv stem (stride 4, GELU) -> 4 stages [conv 3x3/2 + LayerNorm downsample (stages 2-4),
blocks x + BiGLAMixer(LN(x)); x + SwiGLU(LN(x))] -> LayerNorm -> global average pool -> Linear.
No position embedding. Stages take and return ``[B, C, H, W]`` maps (channels-first views of
channels-last memory: the blocks run on ``[B, H*W, C]`` tokens, LayerNorm normalizes channels
either way, as in the official channels-first code).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers import ConvDownsample, ConvStem
from ..layers.norm import add_and_norm, layer_norm_dtype
from ._graph_replay import GraphReplayMixin
from ._vig_common import (
    MIXER_KEYS, ClassifierMixin, KeyMap, ViGBlock, build_vig, check_global_pool, checkpoint_blocks, pool, run_blocks,
    drop_path_schedule, filter_checkpoint, record_input_size, swiglu_hidden_dim, vig_cfg,
)

__all__ = ["HierViG", "ViGStage", "checkpoint_filter_fn", "to_official_state_dict"]


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-5)


class ViGStage(nn.Module):
    """``[B, in_dim, H, W]`` -> (downsample, if any) -> ``depth`` ViG blocks -> ``[B, dim, H', W']``."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        downsample: bool,
        drop_path: Sequence[float],
    ):
        super().__init__()
        self.downsample = ConvDownsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            ViGBlock(dim, num_heads, swiglu_hidden_dim(dim, 32), norm_layer=_layer_norm,
                     drop_path=drop_path[i])
            for i in range(depth)
        ])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        hw = (x.shape[2], x.shape[3])
        x = x.permute(0, 2, 3, 1).flatten(1, 2)  # [B, H*W, C] tokens
        if torch.jit.is_scripting():
            for blk in self.blocks:
                x = blk(x, hw)
        elif self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_blocks(self.blocks, x, hw)
        else:
            x = run_blocks(self.blocks, x, hw)
        return x.unflatten(1, hw).permute(0, 3, 1, 2)


class HierViG(ClassifierMixin, GraphReplayMixin, nn.Module):
    """ViG-H (``get_classifier`` / ``reset_classifier``: :class:`ClassifierMixin`; ``set_cuda_graphs``:
    :class:`GraphReplayMixin`).

    Args:
        img_size: nominal input size (recorded for timm's data config; ViG-H has no position
            embedding and runs at any size).
        in_chans, num_classes: input channels, classes (0: no classifier).
        global_pool: ``"avg"``, ``"max"``, ``"avgmax"`` or ``""`` (classifier applied per position,
            ``[B, classes, h, w]``).
        depths, dims, num_heads: per stage (``d_v = dim / heads``, 32 in every shipped config).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing to this value over all blocks.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 5, 2),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not len(depths) == len(dims) == len(num_heads):
            raise ValueError(
                f"depths, dims and num_heads need one entry per stage, got {len(depths)}, "
                f"{len(dims)}, {len(num_heads)}"
            )
        check_global_pool(global_pool)
        self.img_size = to_2tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = ConvStem(in_chans, dims[0], kernel_size=3, stride=2, act_layer=nn.GELU)
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.Sequential(*[
            ViGStage(dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], downsample=i > 0,
                     drop_path=dpr[starts[i]:starts[i] + depths[i]])
            for i in range(len(depths))
        ])
        self.feature_info = [
            dict(module=f"stages.{i}", num_chs=dims[i], reduction=4 * 2 ** i) for i in range(len(dims))
        ]
        self.norm = _layer_norm(dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: trunc-normal 0.02 / zero bias on every Linear, the mixers' included
        (this overrides their Xavier init; only the DWConv keeps it); convs keep PyTorch's
        default; norms 1 / 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- timm interface --------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Record ``img_size`` as the nominal input size (nothing in ViG-H depends on it)."""
        if img_size is not None:
            self.img_size = to_2tuple(img_size)
            record_input_size(self, self.img_size)

    # -- forward ---------------------------------------------------------------------------------
    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm over the channels of ``[B, C, h, w]`` (the fused kernel when not scripted)."""
        if torch.jit.is_scripting() or not isinstance(self.norm, nn.LayerNorm):
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._fused_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @torch.jit.unused
    def _fused_norm(self, t: torch.Tensor) -> torch.Tensor:
        return add_and_norm(self.norm, t, out_dtype=layer_norm_dtype(t))[1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W]`` -> normalized ``[B, C, H/32, W/32]`` (a channels-last view). Eager CUDA calls
        replay it from CUDA graphs (:meth:`set_cuda_graphs`)."""
        if torch.jit.is_scripting():
            return self._forward_features(x)
        return self._features_replayed(x)

    def _forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x).permute(0, 3, 1, 2))
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, C, h, w]`` -> ``[B, num_classes]`` (``[B, C]`` if ``pre_logits``); with
        ``global_pool=""`` per position, ``[B, num_classes, h, w]`` (``[B, C, h, w]``)."""
        x = self.head_drop(pool(x, self.global_pool, [2, 3]))
        if pre_logits:
            return x
        if self.global_pool:
            return self.head(x)
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

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
        """Stage outputs (strides 4, 8, 16, 32) as ``NCHW`` or ``NHWC`` maps.

        Args:
            indices: last n stages if int, all if None, else these stage indices.
            norm: apply the final norm to the last stage's output (the only one it fits).
            stop_early: stop after the last stage asked for.
            intermediates_only: return only the list of intermediates.
        Returns:
            ``intermediates`` or ``(forward_features output, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        x = self.stem(x).permute(0, 3, 1, 2)
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self._final_norm(x) if norm and i == last else x
                intermediates.append(y if output_fmt == "NCHW" else y.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        if i == last:
            x = self._final_norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last one in ``indices`` (and the norm / head if asked; the norm,
        which fits the last stage's width only, also goes with that stage)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if prune_norm or max_index < len(self.stages) - 1:
            self.norm = nn.Identity()
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


VIG_H_KEYMAP = KeyMap([
    ("patch_embed.0.", "stem.conv1."),
    ("patch_embed.2.", "stem.norm1."),
    ("patch_embed.5.", "stem.conv2."),
    ("patch_embed.7.", "stem.norm2."),
    ("layers.#.downsample.1.", "stages.#.downsample.conv.", 1),
    ("layers.#.downsample.3.", "stages.#.downsample.norm.", 1),
    ("layers.#.blocks.#.norm.", "stages.#.blocks.#.norm1."),
    ("layers.#.blocks.#.norm2.", "stages.#.blocks.#.norm2."),
    ("layers.#.blocks.#.mlp.", "stages.#.blocks.#.mlp."),
    *((f"layers.#.blocks.#.op.{o}.", f"stages.#.blocks.#.attn.{v}.") for o, v in MIXER_KEYS),
    ("classifier.norm.", "norm."),
    ("classifier.head.", "head."),
])


def checkpoint_filter_fn(state_dict: dict, model: HierViG) -> dict:
    """Official hustvl/ViG ``HierViG`` (or vigla) weights -> this model's state dict
    (:func:`filter_checkpoint`)."""
    return filter_checkpoint(state_dict, model, VIG_H_KEYMAP)


def to_official_state_dict(state_dict: dict) -> dict:
    """A vigla ``HierViG`` state dict under the official hustvl/ViG key names."""
    return {VIG_H_KEYMAP.to_official(k): v for k, v in state_dict.items()}


def _create_vig_h(variant: str, pretrained: bool = False, **kwargs) -> HierViG:
    return build_vig(HierViG, variant, pretrained, checkpoint_filter_fn, default_out_indices=(0, 1, 2, 3), **kwargs)


def _cfg(**kwargs) -> dict:
    return vig_cfg(pool_size=(7, 7), first_conv="stem.conv1", **kwargs)


default_cfgs = generate_default_cfgs({
    "vig_h_tiny.in1k": _cfg(),
    "vig_h_small.in1k": _cfg(),
    "vig_h_base.in1k": _cfg(),
})


@register_model
def vig_h_tiny(pretrained: bool = False, **kwargs) -> HierViG:
    """ViG-H-T (28.60M): depths 2-2-5-2, dims 96-768; drop path 0.2."""
    args = dict(depths=(2, 2, 5, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24),
                drop_path_rate=0.2)
    return _create_vig_h("vig_h_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vig_h_small(pretrained: bool = False, **kwargs) -> HierViG:
    """ViG-H-S (50.05M): depths 2-2-17-2, dims 96-768; drop path 0.3."""
    args = dict(depths=(2, 2, 17, 2), dims=(96, 192, 384, 768), num_heads=(3, 6, 12, 24),
                drop_path_rate=0.3)
    return _create_vig_h("vig_h_small", pretrained, **dict(args, **kwargs))


@register_model
def vig_h_base(pretrained: bool = False, **kwargs) -> HierViG:
    """ViG-H-B (88.90M): depths 2-2-17-2, dims 128-1024; drop path 0.6."""
    args = dict(depths=(2, 2, 17, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32),
                drop_path_rate=0.6)
    return _create_vig_h("vig_h_base", pretrained, **dict(args, **kwargs))
