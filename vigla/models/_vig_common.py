"""What plain ViG and ViG-H share: the block, its checkpointed loop, the classifier (pooling check,
``get_classifier`` / ``reset_classifier``), the timm input-size record, the official-checkpoint key
mapping and the timm registration (default cfg, model builder).

ViG: Liao et al., "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention",
AAAI 2025 (arXiv 2405.18425); official code github.com/hustvl/ViG.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg

from ..engine.checkpoint import check_state_dict
from ..layers import BiGLAMixer, SwiGLU
from ..layers.bigla_mixer import MixerInference
from ..layers.bigla_mixer import LEAVES as MIXER_LEAVES
from ..layers.mlp import LEAVES as MLP_LEAVES
from ..layers.cast import MlpProjection, Projection, check_device, dense, memoized, plain_call, plain_leaves
from ..layers.mlp import MlpInference
from ..layers.norm import NormParams, add_and_norm, add_and_norm_inference, fused_norm
from ..ops.add_norm.op import linear_fused
from ..ops.dispatch import compute_dtype, use_kernels
from ..ops.inference import EAGER, InferenceOps, inference_ops
from ..ops.recompute import recompute

try:  # timm >= 1.0.31 records the current input size in the model's traits (get_model_input_config)
    from timm.models._input import update_model_input_size
except ImportError:  # older timm keeps no such record
    update_model_input_size = None

__all__ = [
    "ViGBlock", "BlockInference", "swiglu_hidden_dim", "drop_path_schedule", "run_blocks", "checkpoint_blocks",
    "check_global_pool", "pool", "POOLS", "ClassifierMixin", "record_input_size", "MIXER_KEYS", "KeyMap",
    "unwrap_state_dict", "filter_checkpoint", "vig_cfg", "build_vig",
]


def swiglu_hidden_dim(dim: int, multiple_of: int) -> int:
    """SwiGLU width of the official code: ``8 * dim / 3`` rounded up to ``multiple_of``."""
    return multiple_of * math.ceil((8 * dim // 3) / multiple_of)


# what a block's inference path reads instead of calling: its norms (any type, no hook) and the mixer's and the
# MLP's layers (vigla.layers.cast.plain_leaves); otherwise the block calls its layers
_LEAVES = (("norm1", None), ("norm2", None), *((f"attn.{n}", k) for n, k in MIXER_LEAVES),
           *((f"mlp.{n}", k) for n, k in MLP_LEAVES))


class ViGBlock(nn.Module):
    """Pre-norm block: ``x + DropPath(mixer(norm1(x)))`` then ``x + DropPath(SwiGLU(norm2(x)))``.

    Takes and returns ``[B, N, C]`` tokens of an ``hw = (H, W)`` grid. The SwiGLU is
    ``fc2(SiLU(a) * b)`` with ``[a | b] = fc1(x)``, no biases. The first residual add and ``norm2``
    run as one op (:func:`vigla.layers.norm.add_and_norm`), whose output is already in the compute
    dtype; the second add joins the next block's ``norm1`` when the blocks run through
    :func:`run_blocks`. TorchScript runs the plain composition.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden_dim: int,
        norm_layer: type[nn.Module],
        drop_path: float = 0.0,
        **mixer_kwargs,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = BiGLAMixer(dim, num_heads, **mixer_kwargs)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = SwiGLU(dim, mlp_hidden_dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        if torch.jit.is_scripting():
            x = x + self.drop_path1(self.attn(self.norm1(x), hw))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        x, delta = self.forward_pair(x, None, hw)
        return x + dense(delta)

    @torch.jit.unused
    def forward_pair(self, x: torch.Tensor, delta: Optional[torch.Tensor], hw: Tuple[int, int]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block on ``x + delta`` (``delta``: the previous block's deferred residual branch, or None),
        returning its output as ``(r, d)``, ``r + d``, with its own closing add deferred in turn: each
        residual add runs inside the next norm's pass (:func:`vigla.layers.norm.add_and_norm`; summed in
        float32, rounded once to ``x``'s dtype, as the separate add would; in the backward, a half-precision
        residual stream gets its gradient rounded once instead of twice). ``[B, N, C]`` tensors."""
        ops = inference_ops(x)
        if ops is not None and plain_leaves(self, _LEAVES):  # else its layers are called (replaced or hooked)
            return self.forward_pair_inference(x, delta, hw, ops)
        x, y = add_and_norm(self.norm1, x, dense(delta))
        x, y = add_and_norm(self.norm2, x, self.drop_path1(self.attn(y, hw)))
        return x, self.drop_path2(self.mlp(y))

    @torch.jit.unused
    def forward_pair_inference(self, x: torch.Tensor, delta: Optional[torch.Tensor], hw: Tuple[int, int],
                               ops: InferenceOps = EAGER) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_pair` on the inference path (:func:`vigla.ops.inference.inference_ops` gave ``ops``:
        each op's forward implementation called directly in eager mode, its custom op when compiled), the
        compute dtype found once, the weights and choices from :meth:`inference_params`. In eval mode each
        branch's output projection is left to the add + norm after it (:class:`vigla.layers.cast.Projection`,
        or the whole MLP: :class:`vigla.layers.cast.MlpProjection`, with norm2's weight inside fc1 where
        :class:`BlockInference` has ``folded``; ``delta`` may be one, and so may the returned ``d``)."""
        dtype = compute_dtype(x)
        defer = not self.training  # drop path needs the branch's output
        p = self.inference_params(x, dtype)
        x, y = add_and_norm_inference(p.norm1, x, delta, dtype, ops)
        if p.attn is not None and plain_call(self.attn):
            a = self.attn.forward_inference(y, hw, dtype, ops, defer, p.attn)
        else:
            a = self.attn(y, hw)
        if defer and p.folded is not None and isinstance(a, Projection) and plain_call(self.mlp):
            # norm2 split: the add and each row's reciprocal RMS here, its weight inside fc1
            x, rstd = ops.linear_add_norm(a.rows, a.w.t(), x, None, None, p.norm2.eps, True, x.dtype)
            return x, MlpProjection(x.reshape(-1, x.shape[-1]), *p.folded, x.shape, ops, rstd.reshape(-1))
        x, y = add_and_norm_inference(p.norm2, x, a if defer else self.drop_path1(a), dtype, ops)
        if p.mlp is not None and plain_call(self.mlp):
            m = self.mlp.forward_inference(y, dtype, ops, defer, p.mlp)
        else:
            m = self.mlp(y)
        return x, (m if defer else self.drop_path2(m))

    @torch.jit.unused
    def inference_params(self, x: torch.Tensor, dtype: torch.dtype) -> "BlockInference":
        """What :meth:`forward_pair_inference` reads for a residual stream like ``x`` (``[B, N, C]``) with products
        in ``dtype``, built once and kept (:func:`vigla.layers.cast.memoized`) while the parameters stay as they
        are: a call then checks one record instead of casting and choosing piece by piece (at 224² an eager
        forward is bound by the host's time)."""
        key = (dtype, x.dtype, x.is_cuda, use_kernels(x), x.shape[0] * x.shape[1])
        return memoized(self, key, lambda: self._inference_params(x, dtype))

    @torch.jit.unused
    def _inference_params(self, x: torch.Tensor, dtype: torch.dtype) -> "BlockInference":
        check_device(self, x)
        attn = self.attn.inference_params(x, dtype) if type(self.attn) is BiGLAMixer else None
        mlp = self.mlp.inference_params(x, dtype) if type(self.mlp) is SwiGLU else None
        norm1, norm2 = fused_norm(self.norm1), fused_norm(self.norm2)
        return BlockInference(norm1 or self.norm1, norm2 or self.norm2, attn, mlp,
                              self._folded_mlp(x, dtype, norm2, attn, mlp))

    def _folded_mlp(self, x: torch.Tensor, dtype: torch.dtype, norm2: Optional[NormParams],
                    attn: Optional[MixerInference], mlp: Optional[MlpInference]
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(w1, w2)`` with norm2's weight folded into fc1 (:meth:`vigla.layers.mlp.SwiGLU.folded_weights`) where
        the block's second half can run as two kernels on the GPU: the mixer's output projection, the residual
        add and norm2's statistic in one, norm2's weight, the whole MLP and the next add + norm in the other (an
        RMSNorm with a weight, a :class:`BiGLAMixer` whose projection :func:`vigla.ops.add_norm.op.linear_fused`
        takes, a :class:`SwiGLU` whose MLP :func:`vigla.ops.add_norm.op.mlp_fused` takes); else None. ``x``: the
        residual stream."""
        if norm2 is None or not norm2.rms or attn is None or mlp is None or attn.w_out.is_mkldnn:
            return None
        w_out = attn.w_out.t()  # [C, C]; the mixer's output rows, in dtype as this weight
        if not linear_fused(x, w_out, w_out):
            return None
        return self.mlp.folded_weights(x, norm2.weight, dtype)


class BlockInference(NamedTuple):
    """What :meth:`ViGBlock.forward_pair_inference` reads: each norm's :class:`vigla.layers.norm.NormParams` (or the
    module, when not fused), the mixer's :class:`vigla.layers.bigla_mixer.MixerInference` and the MLP's
    :class:`vigla.layers.mlp.MlpInference` (None for modules of another type), and ``folded``: fc1 with norm2's
    weight folded in and fc2 (:meth:`ViGBlock._folded_mlp`), or None."""
    norm1: object
    norm2: object
    attn: Optional[MixerInference]
    mlp: Optional[MlpInference]
    folded: Optional[Tuple[torch.Tensor, torch.Tensor]]


def _deferrable(blocks: Sequence[nn.Module], x) -> bool:
    """Whether :func:`run_blocks` may skip the blocks' ``__call__``: plain :class:`ViGBlock` modules (not
    wrapped, e.g. by a checkpoint or FSDP wrapper, nor compiled one by one), no hook on them or global
    (hooks see each block's input and output), and real tensors (``torch.fx``'s proxies are not: its graph
    keeps a node per block, as timm's FX feature extraction needs)."""
    return isinstance(x, torch.Tensor) and all(type(blk) is ViGBlock and plain_call(blk) for blk in blocks)


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, hw: Tuple[int, int],
               norm: Optional[nn.Module] = None) -> torch.Tensor:
    """Apply ``blocks`` (:class:`ViGBlock`) in order to ``[B, N, C]`` tokens, each block's closing residual
    add done by the next block's first add + norm (:meth:`ViGBlock.forward_pair`): one op fewer per block;
    with a float32 residual stream (the models' under autocast) the same values and gradients as calling
    the blocks one by one. Where something watches or wraps the blocks (:func:`_deferrable`), they are
    called one by one. Eager, compiled and exported alike; scripted models call the blocks.

    In inference on a GPU, eager or compiled (:func:`vigla.ops.inference.inference_ops`), the residual
    stream is kept in the compute dtype (bf16 under bf16 autocast): each add + norm reads and writes it at
    half the bytes, and still sums in float32 and rounds once. The GPU tests hold the logits' distance to
    the float64 model's within 1.5x the float32 stream's (ViG-T and ViG-H-T, eager and compiled); training
    and the CPU keep a float32 stream.

    With ``norm``: ``norm`` of the output, in ``x``'s dtype whatever the stream's (on the GPU inference path
    the last residual add, and the last output projection, inside the norm's kernel)."""
    if not _deferrable(blocks, x):
        for blk in blocks:
            x = blk(x, hw)
        return x if norm is None else norm(x)
    dtype = x.dtype
    ops = inference_ops(x) if x.is_cuda else None
    if ops is not None:  # GPU inference: the residual stream in the compute dtype
        x = x.to(compute_dtype(x))
    delta = None
    for blk in blocks:
        x, delta = blk.forward_pair(x, delta, hw)
    if norm is not None and ops is not None:
        return add_and_norm_inference(norm, x, delta, dtype, ops)[1]
    x = x if delta is None else x + dense(delta)
    return x if norm is None else norm(x)


def drop_path_schedule(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``drop_path_rate`` over the blocks."""
    return [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def checkpoint_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Apply ``blocks`` in order with gradient checkpointing: each block keeps only its input and its
    BiGLA output for the backward and recomputes the rest (:func:`vigla.ops.recompute.recompute`,
    eager and compiled alike). Training only: the models call their blocks directly when scripted,
    traced or exported."""
    for blk in blocks:
        x = recompute(partial(blk, hw=hw), x)
    return x


POOLS = ("avg", "max", "avgmax", "")  # timm's pools that need no class token or pooling layer; "": none


def check_global_pool(global_pool: str) -> None:
    if global_pool not in POOLS:
        raise ValueError(f"global_pool must be one of 'avg', 'max', 'avgmax' or '' (no pooling), got {global_pool!r}")


def pool(x: torch.Tensor, global_pool: str, dims: List[int]) -> torch.Tensor:
    """``x`` pooled over ``dims`` as timm's ``global_pool`` names it (mean, max, their average); ``""``: as it is."""
    if global_pool == "avg":
        return x.mean(dims)
    if global_pool == "max":
        return x.amax(dims)
    if global_pool == "avgmax":
        return 0.5 * (x.mean(dims) + x.amax(dims))
    return x


class ClassifierMixin:
    """timm's classifier accessors for a model whose ``head`` (``Linear`` or ``Identity``) takes
    ``num_features`` channels after ``global_pool`` (:data:`POOLS`), as both ViGs have."""

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def record_input_size(model: nn.Module, img_size: Optional[Tuple[int, int]]) -> None:
    """Tell timm the model's nominal input size after ``set_input_size`` (``timm.models.
    get_model_input_config`` and the data config read it), as timm's own models do."""
    if update_model_input_size is not None:
        update_model_input_size(model, img_size)


# ------------------------------------------------------------------------------------------------
# Official checkpoint names (hustvl/ViG) <-> vigla names

# Mixer weights: official name -> vigla name.
MIXER_KEYS = (
    ("in_proj.0", "dwconv"),
    ("qkv_proj", "qkv"),
    ("gk_proj.0", "decay_down"),
    ("gk_proj.1", "decay_up"),
    ("g_norm", "norm_out"),
    ("l_norm", "norm_local"),
    ("g_proj", "mix_gate"),
    ("o_proj", "proj"),
)


class KeyMap:
    """Renames state-dict keys between two naming schemes, both ways.

    Built from ``(official_prefix, our_prefix[, shift])`` templates in which ``#`` stands for an
    integer index; ``shift`` is added to every index on our side (e.g. the official stage ``i``
    downsample is our stage ``i + 1``'s). A key matching no template keeps its name.
    """

    def __init__(self, templates: Iterable[tuple]):
        self._to_ours, self._to_official = [], []
        for official, ours, *shift in templates:
            shift = shift[0] if shift else 0
            self._to_ours.append(self._rule(official, ours, shift))
            self._to_official.append(self._rule(ours, official, -shift))

    @staticmethod
    def _rule(src: str, dst: str, shift: int):
        pattern = re.compile("^" + re.escape(src).replace(r"\#", r"(\d+)"))
        head, *tails = dst.split("#")

        def repl(m: re.Match) -> str:
            return head + "".join(str(int(i) + shift) + t for i, t in zip(m.groups(), tails))

        return pattern, repl

    @staticmethod
    def _apply(key: str, rules) -> str:
        for pattern, repl in rules:
            new, n = pattern.subn(repl, key, count=1)
            if n:
                return new
        return key

    def to_ours(self, key: str) -> str:
        return self._apply(key, self._to_ours)

    def to_official(self, key: str) -> str:
        return self._apply(key, self._to_official)


def unwrap_state_dict(checkpoint: dict) -> dict:
    """The weights inside a training checkpoint (``model_ema`` / ``model`` / ``state_dict``
    entry, EMA first as in timm), without DistributedDataParallel's ``module.`` prefix."""
    for name in ("state_dict_ema", "model_ema", "model", "state_dict"):
        inner = checkpoint.get(name)
        if isinstance(inner, dict) and inner:
            checkpoint = inner
            break
    return {k[7:] if k.startswith("module.") else k: v for k, v in checkpoint.items()}


def filter_checkpoint(
    checkpoint: dict, model: nn.Module, keymap: KeyMap, adapt: Optional[Callable[[dict, nn.Module], dict]] = None,
) -> dict:
    """Official hustvl/ViG (or vigla) weights -> ``model``'s state dict.

    Takes a bare state dict or a training checkpoint (:func:`unwrap_state_dict`), renames the
    official keys (``keymap``), drops the classifier if the model has none, applies ``adapt``
    (a model's own fix-ups, e.g. a resized position embedding) and raises ``ValueError`` if the
    result does not fit the model (a classifier of another size excepted).
    """
    out = {keymap.to_ours(k): v for k, v in unwrap_state_dict(checkpoint).items()}
    if isinstance(getattr(model, "head", None), nn.Identity):
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    if adapt is not None:
        out = adapt(out, model)
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    check_state_dict(out, model, classifier_may_differ=True, input_conv=f"{first}.weight" if first else None)
    return out


# ------------------------------------------------------------------------------------------------
# timm registration

def vig_cfg(**kwargs) -> dict:
    """A ViG pretrained cfg: ImageNet-1k at 224 (crop 0.875, bicubic), the ViG paper and code;
    ``kwargs`` add the model's own entries (``pool_size``, ``first_conv``) or override."""
    return {
        "num_classes": 1000, "input_size": (3, 224, 224),
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "classifier": "head",
        "paper_ids": "arXiv:2405.18425", "origin_url": "https://github.com/hustvl/ViG",
        **kwargs,
    }


def build_vig(
    model_cls: Type[nn.Module], variant: str, pretrained: bool, filter_fn: Callable[[dict, nn.Module], dict],
    default_out_indices: Union[int, Tuple[int, ...]], **kwargs,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` for a ViG model: pretrained weights through ``filter_fn``,
    ``features_only`` through ``forward_intermediates`` (``out_indices`` unless given:
    ``default_out_indices``)."""
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(out_indices=kwargs.pop("out_indices", default_out_indices), feature_cls="getter"),
        **kwargs,
    )
