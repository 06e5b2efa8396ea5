"""The ViG token mixer: BiGLA with direction-wise gates and 2D gating locality injection.

ViG (Liao et al., AAAI 2025, Sec. 3.2), as the official code (hustvl/ViG) builds it: one module serves
plain ViG and ViG-H; the per-config differences are constructor arguments (``conv_act``, ``out_act``).
Weight names are vigla's; the official names map onto them in ``vigla.models.vig`` (``in_proj.0`` ->
``dwconv``, ``qkv_proj`` -> ``qkv``, ``gk_proj.0/1`` -> ``decay_down/up``, ``g_norm`` -> ``norm_out``,
``l_norm`` -> ``norm_local``, ``g_proj`` -> ``mix_gate``, ``o_proj`` -> ``proj``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from ..ops import bigla_gated
from ..ops.amp import cast_concat, colsum, mm_to
from ..ops.bigla.op import bigla_backward, bigla_forward
from ..ops.dispatch import compute_dtype, eager_training
from ..ops.dwconv import dwconv_silu
from ..ops.dwconv.op import dwconv_backward, dwconv_forward
from ..ops.inference import EAGER, InferenceOps, inference_ops
from ..ops.locality_mix import locality_mix
from ..ops.locality_mix.op import locality_mix_backward, locality_mix_forward
from .cast import Projection, caching, check_device, gemm, gemm_weights, inference_weights, memoized, plain_leaves
from .norm import RmsNorm

__all__ = ["BiGLAMixer", "MixerFunction", "MixerInference"]

# leaves under torch.fx: the traced graph calls the ops (their checks, kernels and custom ops) as they are
torch.fx.wrap("bigla_gated")
torch.fx.wrap("locality_mix")
torch.fx.wrap("dwconv_silu")


@torch.fx.wrap
def _check_tokens(x: torch.Tensor, dim: int, hw: tuple[int, int]) -> None:
    """``x`` must be ``[B, N, dim]`` tokens of the ``hw`` grid: the fused paths read the parameters with ``x``'s
    sizes, unchecked (a wider ``x`` would read past the depthwise conv's weight)."""
    if x.dim() != 3 or x.shape[2] != dim:
        raise ValueError(f"BiGLAMixer: expected x of shape [B, N, {dim}] (tokens of the layer's width), "
                         f"got {x.shape}")
    if x.shape[1] != hw[0] * hw[1]:
        raise ValueError(f"BiGLAMixer: {x.shape[1]} tokens do not form the given {hw[0]}x{hw[1]} grid")


@torch.fx.wrap
def _check_device(x: torch.Tensor, weight: torch.Tensor) -> None:
    """``x`` on the layer's device (``weight``'s): the fused paths hand the kernels addresses, unchecked (a CUDA ``x``
    with the layer left on the CPU would fault the device)."""
    if x.device != weight.device:
        raise ValueError(f"BiGLAMixer: x is on {x.device} but the layer's parameters are on {weight.device}; move the "
                         f"layer (.to(device)) or the input")


# the layers whose parameters the fused paths read, with the type they must have for that
LEAVES = (("dwconv", nn.Conv2d), ("qkv", nn.Linear), ("decay_down", nn.Linear), ("decay_up", nn.Linear),
           ("mix_gate", nn.Linear), ("norm_out", RmsNorm), ("norm_local", RmsNorm), ("proj", nn.Linear))


class BiGLAMixer(nn.Module):
    """Bidirectional gated linear attention over a 2-D token grid.

    With ``x_c = DWConv3x3(x)`` (SiLU after it if ``conv_act``), ``h`` heads, ``K = expand_k * C``
    key channels and ``V = C`` value channels:

    * ``q, k, v = split(x_c W_qkv)``; direction-wise log decays
      ``log_gf, log_gb = split(logsigmoid((x_c W_1) W_2 + b_2) / gate_logit_normalizer)``;
    * ``o = bigla(q, k, v, log_gf, log_gb)`` (:func:`vigla.ops.bigla_gated`, which forms the log
      decays from the logits inside the kernels; mean of the forward and backward scans, readout
      scale ``(K/h) ** -0.5``);
    * ``G = sigmoid(x_c W_g + b_g)``; ``y = G * RMSNorm(o) + (1 - G) * RMSNorm(x_c)`` per head
      (each RMSNorm has one ``d_v``-sized weight shared by the heads);
    * output ``(SiLU(y) if out_act else y) W_o``.

    The depthwise conv and its SiLU are one fused op on the channels-last tokens
    (:func:`vigla.ops.dwconv.dwconv_silu`); ``W_qkv``, ``W_1`` and ``W_g`` run as one GEMM over
    ``x_c``; BiGLA reads q, k, v as column slices of its output; the mix (both norms, the gate, the
    SiLU) is one fused op (:func:`vigla.ops.locality_mix.locality_mix`). In eager training the whole
    chain is one autograd node (:class:`MixerFunction`).

    Args:
        dim: channels ``C`` (also the value width: the local branch needs ``V = C``).
        num_heads: heads ``h``; ``C`` and ``K`` must be divisible by it.
        expand_k: key width ``K = expand_k * C``.
        gate_low_rank_dim: rank of the decay projection ``C -> r -> 2K``.
        gate_logit_normalizer: divides ``logsigmoid`` of the decay logits.
        conv_act: SiLU after the depthwise conv (ViG-T).
        out_act: SiLU before the output projection (ViG-T).
        norm_eps: eps of the two per-head RMSNorms.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        expand_k: float = 0.5,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        conv_act: bool = False,
        out_act: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        key_dim = int(dim * expand_k)
        if dim % num_heads or key_dim % num_heads:
            raise ValueError(
                f"BiGLAMixer: dim ({dim}) and key dim ({key_dim} = {expand_k} * dim) must be "
                f"divisible by num_heads ({num_heads})"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.head_k = key_dim // num_heads
        self.head_v = dim // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer

        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)  # its weight
        self.conv_act = conv_act
        self.qkv = nn.Linear(dim, 2 * key_dim + dim, bias=False)
        self.decay_down = nn.Linear(dim, gate_low_rank_dim, bias=False)
        self.decay_up = nn.Linear(gate_low_rank_dim, 2 * key_dim, bias=True)
        self.mix_gate = nn.Linear(dim, dim, bias=True)
        self.norm_out = RmsNorm(self.head_v, eps=norm_eps)  # weights of the fused mix
        self.norm_local = RmsNorm(self.head_v, eps=norm_eps)
        self.out_act = out_act
        self.proj = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: Xavier-uniform with gain ``2 ** -2.5`` on every weight, zero biases."""
        for layer in (self.dwconv, self.qkv, self.decay_down, self.decay_up, self.mix_gate, self.proj):
            nn.init.xavier_uniform_(layer.weight, gain=2 ** -2.5)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        self.norm_out.reset_parameters()
        self.norm_local.reset_parameters()

    def _weights(self, x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w_in, b_in, w_up, b_up, w_out)`` for inputs like ``x``: one in-projection for everything that reads
        ``x_c`` (q, k, v, the decay projection's input and the mix gate's logits; weight
        ``[2K + C + r + C, C]`` and bias, zero but for the mix gate's, concatenated from the separate
        parameters of the official layout), the decay up-projection and the output projection.
        For inference they are cast once to the compute dtype and kept
        (:func:`vigla.layers.cast.inference_weights`): no concatenation or cast kernels per call."""
        parts = (self.qkv.weight, self.decay_down.weight, self.mix_gate.weight, self.mix_gate.bias)
        if torch.jit.is_scripting() or not caching(x):
            w_in, b_in = self._concat(parts)
            return w_in, b_in, self.decay_up.weight, self.decay_up.bias, self.proj.weight
        return self._cached_weights(compute_dtype(x))

    @torch.jit.unused
    def _cached_weights(self, dtype: torch.dtype, rows: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_weights` cast to ``dtype`` once; with ``rows`` (the GEMMs' row count) the matrices
        prepared for :func:`vigla.layers.cast.gemm`."""
        parts = (self.qkv.weight, self.decay_down.weight, self.mix_gate.weight, self.mix_gate.bias)
        w_in = inference_weights(self, "in_proj", parts, dtype, lambda: self._concat(parts))
        out = inference_weights(self, "out", (self.decay_up.weight, self.decay_up.bias, self.proj.weight), dtype)
        if rows is not None:
            w_in, out = gemm_weights(self, "in_proj", w_in, rows), gemm_weights(self, "out", out, rows)
        return (*w_in, *out)

    @torch.jit.unused
    def _folded_weights(self, dtype: torch.dtype, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w_in, b_in, w_out)`` for :func:`vigla.layers.cast.gemm`, cast to ``dtype`` once, with the low-rank
        decay projection folded into the in-projection: the rows ``W_2 W_1`` (``[2K, C]``, multiplied in float32)
        and the bias ``b_2`` give the decay logits ``(x_c W_1) W_2 + b_2`` in the same GEMM as q, k, v and the mix
        gate's logits (weight ``[2K + C + 2K + C, C]``). Equal up to the rounding of the product."""
        parts = (self.qkv.weight, self.decay_down.weight, self.decay_up.weight, self.decay_up.bias,
                 self.mix_gate.weight, self.mix_gate.bias, self.proj.weight)

        def build():
            w_qkv, w_down, w_up, b_up, w_gate, b_gate, w_out = parts
            f32 = torch.promote_types(w_up.dtype, torch.float32)
            weight = torch.cat([w_qkv, (w_up.to(f32) @ w_down.to(f32)).to(w_qkv.dtype), w_gate])
            bias = torch.cat([b_up.new_zeros(w_qkv.shape[0]), b_up, b_gate])
            return weight, bias, w_out

        return gemm_weights(self, "folded", inference_weights(self, "folded", parts, dtype, build), rows)

    @staticmethod
    def _concat(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The in-projection's ``(weight, bias)`` from ``(W_qkv, W_1, W_g, b_g)``."""
        w_qkv, w_down, w_gate, b_gate = parts
        weight = torch.cat([w_qkv, w_down, w_gate])
        return weight, F.pad(b_gate, (weight.shape[0] - b_gate.shape[0], 0))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """``x``: ``[B, N, C]`` tokens of an ``H x W`` grid in row-major order (``N = H * W``).
        Returns ``[B, N, C]``."""
        _check_tokens(x, self.dim, hw)
        if not torch.jit.is_scripting():
            if not self._reads_leaves():
                return self.forward_layers(x, hw)
            _check_device(x, self.dwconv.weight)
            ops = inference_ops(x)
            if ops is not None:
                return self.forward_inference(x, hw, compute_dtype(x), ops)
            params = self.fused_params()
            if eager_training(x, *params):
                return MixerFunction.apply(x, *params, self, hw)
        w_in, b_in, w_up, b_up, w_out = self._weights(x)
        return self.forward_ops(x, hw, self.dwconv.weight, w_in, b_in, w_up, b_up, self.norm_out.weight,
                                self.norm_local.weight, w_out)

    def forward_ops(self, x: torch.Tensor, hw: tuple[int, int], conv: torch.Tensor, w_in: torch.Tensor,
                    b_in: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, w_o: torch.Tensor, w_l: torch.Tensor,
                    w_out: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` as a chain of ops, each recorded by autograd on its own (or seen by a tracer or dispatch
        mode), with the given weights: the depthwise conv's ``[C, 1, 3, 3]``, the in-projection ``w_in``
        ``[2K + C + r + C, C]`` and ``b_in`` (:meth:`_weights`), the decay up-projection ``w_up`` ``[2K, r]`` and
        ``b_up``, the RMSNorm weights ``w_o``, ``w_l`` ``[d_v]``, the output projection ``w_out`` ``[C, C]``.
        ``[B, N, C]`` -> ``[B, N, C]``."""
        N, C = x.shape[1], x.shape[2]
        h, K = self.num_heads, self.key_dim
        x_c = dwconv_silu(x, conv, hw, self.conv_act)
        q, k, v, z, gate = F.linear(x_c, w_in, b_in).split([K, K, C, w_up.shape[1], C], dim=-1)
        # Gate logits; the op forms the log decays logsigmoid(z) / normalizer in float32 (inside
        # the kernels on the GPU: they are summed over up to N tokens in the scan). z is a column
        # slice: as [B*N, r] rows (a view) it is one GEMM with the bias in its epilogue; a 3-D
        # non-contiguous input would take a GEMM and a separate bias add.
        logits = F.linear(z.flatten(0, 1), w_up, b_up)  # [B*N, 2K]
        zf, zb = logits.view(x.shape[0], N, 2, h, self.head_k).unbind(dim=2)
        o = bigla_gated(q.unflatten(-1, (h, self.head_k)), k.unflatten(-1, (h, self.head_k)),
                        v.unflatten(-1, (h, self.head_v)), zf, zb,
                        self.gate_logit_normalizer)  # [B, N, h, d_v]
        y = locality_mix(o, x_c, gate, w_o, w_l, self.norm_out.eps, act=self.out_act)
        return F.linear(y, w_out)

    @torch.jit.unused
    def fused_params(self) -> tuple[torch.Tensor, ...]:
        """The parameters :class:`MixerFunction` takes, in its order: the depthwise conv's weight, ``W_qkv``,
        ``W_1``, ``W_g``, ``b_g``, ``W_2``, ``b_2``, the two RMSNorm weights, ``W_o``."""
        return (self.dwconv.weight, self.qkv.weight, self.decay_down.weight, self.mix_gate.weight,
                self.mix_gate.bias, self.decay_up.weight, self.decay_up.bias, self.norm_out.weight,
                self.norm_local.weight, self.proj.weight)

    @torch.jit.unused
    def _reads_leaves(self) -> bool:
        """Whether :meth:`forward` may read its layers' parameters (the fused paths) rather than call them
        (:meth:`forward_layers`): :func:`vigla.layers.cast.plain_leaves`."""
        return plain_leaves(self, LEAVES)

    @torch.jit.unused
    def forward_layers(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """:meth:`forward` with each layer called as a module, for layers replaced or watched (a LoRA adapter, a
        quantized or pruned layer, a forward hook): the official formulation, the same function. ``[B, N, C]``
        -> ``[B, N, C]``."""
        B, N, C = x.shape
        h, dk, dv = self.num_heads, self.head_k, self.head_v
        x_c = self.dwconv(x.transpose(1, 2).reshape(B, C, hw[0], hw[1])).flatten(2).transpose(1, 2)
        if self.conv_act:
            x_c = F.silu(x_c)
        q, k, v = self.qkv(x_c).split([self.key_dim, self.key_dim, C], dim=-1)
        zf, zb = self.decay_up(self.decay_down(x_c)).view(B, N, 2, h, dk).unbind(dim=2)
        o = bigla_gated(q.unflatten(-1, (h, dk)), k.unflatten(-1, (h, dk)), v.unflatten(-1, (h, dv)), zf, zb,
                        self.gate_logit_normalizer)
        gate = torch.sigmoid(self.mix_gate(x_c)).unflatten(-1, (h, dv))
        y = (gate * self.norm_out(o) + (1 - gate) * self.norm_local(x_c.unflatten(-1, (h, dv)))).flatten(-2)
        return self.proj(F.silu(y) if self.out_act else y)

    @torch.jit.unused
    def inference_params(self, x: torch.Tensor, dtype: torch.dtype) -> "MixerInference":
        """What :meth:`forward_inference` reads for inputs like ``x`` (``[B, N, C]``) with products in ``dtype``,
        built once and kept (:func:`vigla.layers.cast.memoized`) while the parameters stay as they are."""
        rows = x.shape[0] * x.shape[1]
        return memoized(self, (dtype, x.is_cuda), lambda: self._inference_params(x, dtype, rows))

    @torch.jit.unused
    def _inference_params(self, x: torch.Tensor, dtype: torch.dtype, rows: int) -> "MixerInference":
        check_device(self, x)
        if x.is_cuda:  # the decay projection folded into the in-projection: one GEMM launch instead of two
            w_in, b_in, w_out = self._folded_weights(dtype, rows)
            w_up = b_up = None
        else:  # the CPU's GEMMs are bound by arithmetic: the low-rank pair costs less there
            w_in, b_in, w_up, b_up, w_out = self._cached_weights(dtype, rows)
        return MixerInference(self.dwconv.weight, w_in, b_in, w_up, b_up, w_out, self.norm_out.weight,
                              self.norm_local.weight, float(self.norm_out.eps), float(self.gate_logit_normalizer),
                              self.decay_down.out_features)

    @torch.jit.unused
    def forward_inference(self, x: torch.Tensor, hw: tuple[int, int], dtype: torch.dtype,
                          ops: InferenceOps = EAGER, defer_projection: bool = False,
                          params: "MixerInference | None" = None) -> torch.Tensor | Projection:
        """:meth:`forward` on the inference path (:func:`vigla.ops.inference.inference_ops` gave ``ops``; the
        grid already checked), products in ``dtype``: the ops called without autograd (BiGLA and the locality mix
        as one, :func:`vigla.ops.bigla.op.bigla_mix_forward`), the projections as GEMMs on ``[B*N, .]`` views
        (on CUDA the decay projection inside the in-projection: :meth:`_folded_weights`), the weights from
        ``params`` (default :meth:`inference_params`). ``[B, N, C]`` -> ``[B, N, C]``; with ``defer_projection``
        the output projection is returned not yet computed (:class:`vigla.layers.cast.Projection`), for the
        block's add + norm to run it."""
        B, N, C = x.shape
        h, K, dk, dv = self.num_heads, self.key_dim, self.head_k, self.head_v
        p = params if params is not None else self.inference_params(x, dtype)
        x_c = ops.dwconv(x, p.conv, hw[0], hw[1], self.conv_act, dtype)
        if p.w_up is None:
            q, k, v, logits, gate = gemm(x_c.reshape(B * N, C), p.w_in, p.b_in).split([K, K, C, 2 * K, C], dim=-1)
        else:
            q, k, v, z, gate = gemm(x_c.reshape(B * N, C), p.w_in, p.b_in).split(
                [K, K, C, p.rank, C], dim=-1)
            logits = gemm(z, p.w_up, p.b_up)
        zf, zb = logits.view(B, N, 2, h, dk).unbind(dim=2)
        y = ops.bigla_mix(q.view(B, N, h, dk), k.view(B, N, h, dk), v.view(B, N, h, dv), zf, zb, dk ** -0.5,
                          p.normalizer, x_c, gate.view(B, N, C), p.norm_out, p.norm_local, p.eps,
                          bool(self.out_act))
        out = Projection(y.reshape(B * N, C), p.w_out, (B, N, C))
        return out if defer_projection else out.dense()


class MixerFunction(torch.autograd.Function):
    """:class:`BiGLAMixer`'s forward as one autograd node, its eager training path
    (:func:`vigla.ops.dispatch.eager_training`): ``apply(x, *mixer.fused_params(), mixer, hw)`` -> ``[B, N, C]``
    (``x``: ``[B, N, C]`` tokens of an ``hw`` grid; ``mixer`` gives the configuration).

    The forward runs what the per-op path runs, the ops' forward implementations and the same GEMMs on the same
    operands in the compute dtype, without recording each (about twenty autograd nodes otherwise: three ops, three
    projections, the weights' concatenation and casts, the splits and views); it keeps the tensors the per-op path
    keeps. The backward calls the ops' backward implementations and the projections' gradient GEMMs in turn (the
    in-projection's input gradient added to the mix's in the GEMM). Where autograd records the backward (a second
    derivative), it recomputes the mixer through the per-op path and differentiates that."""

    @staticmethod
    def forward(ctx, x, conv, w_qkv, w_down, w_gate, b_gate, w_up, b_up, w_o, w_l, w_out, mixer, hw):
        B, N, C = x.shape
        h, K, dk, dv = mixer.num_heads, mixer.key_dim, mixer.head_k, mixer.head_v
        dtype = compute_dtype(x)
        w_in, b_in, w_up_c, b_up_c, w_out_c = MixerFunction._cast_weights(
            (w_qkv, w_down, w_gate, b_gate, w_up, b_up, w_out), dtype)
        x_c = dwconv_forward(x, conv, hw[0], hw[1], mixer.conv_act, dtype)
        u = F.linear(x_c, w_in, b_in)
        q, k, v, z, gate = u.split([K, K, C, w_down.shape[0], C], dim=-1)
        logits = F.linear(z.flatten(0, 1), w_up_c, b_up_c)
        zf, zb = logits.view(B, N, 2, h, dk).unbind(dim=2)
        o = bigla_forward(q.unflatten(-1, (h, dk)), k.unflatten(-1, (h, dk)), v.unflatten(-1, (h, dv)), zf, zb,
                          dk ** -0.5, float(mixer.gate_logit_normalizer))
        y = locality_mix_forward(o, x_c, gate, w_o, w_l, float(mixer.norm_out.eps), bool(mixer.out_act))
        ctx.save_for_backward(x, conv, w_qkv, w_down, w_gate, b_gate, w_up, b_up, w_o, w_l, w_out,
                              x_c, u, logits, o, y, w_in, w_up_c, w_out_c)
        ctx.mixer, ctx.hw = mixer, hw
        ctx.autocast = dtype if torch.is_autocast_enabled(x.device.type) else None
        return F.linear(y, w_out_c)

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():
            return MixerFunction._recorded_backward(ctx, dout)
        (x, conv, w_qkv, w_down, w_gate, b_gate, w_up, b_up, w_o, w_l, w_out,
         x_c, u, logits, o, y, w_in, w_up_c, w_out_c) = ctx.saved_tensors
        m, (H, W) = ctx.mixer, ctx.hw
        B, N, C = x.shape
        h, K, dk, dv, r = m.num_heads, m.key_dim, m.head_k, m.head_v, w_down.shape[0]
        dout = dout.to(y.dtype).reshape(B * N, C)
        q, k, v, z, gate = u.split([K, K, C, r, C], dim=-1)
        do, dx_c, dgate, dw_o, dw_l = locality_mix_backward((dout @ w_out_c).view(B, N, C), o, x_c, gate, w_o, w_l,
                                                            float(m.norm_out.eps), bool(m.out_act))
        zf, zb = logits.view(B, N, 2, h, dk).unbind(dim=2)
        dq, dk_, dv_, dzf, dzb = bigla_backward(do, q.unflatten(-1, (h, dk)), k.unflatten(-1, (h, dk)),
                                                v.unflatten(-1, (h, dv)), zf, zb, dk ** -0.5,
                                                float(m.gate_logit_normalizer))
        dlogits = torch.stack((dzf, dzb), dim=2).view(B * N, 2 * K)
        dgate = dgate.reshape(B * N, C)
        du = torch.cat([dq.view(B * N, K), dk_.view(B * N, K), dv_.view(B * N, C), dlogits @ w_up_c, dgate], dim=1)
        dx_c = dx_c.reshape(B * N, C).addmm_(du, w_in)  # in place: addmm would copy dx_c into a new tensor first
        dx, dconv = dwconv_backward(dx_c.view(B, N, C), x, conv, H, W, m.conv_act)
        # the weight gradients written in the parameters' dtypes by their GEMMs (mm_to), the in-projection's split;
        # the bias gradients summed into their dtypes (colsum); the ops' gradients are in their inputs' dtypes already
        dw_qkv, dw_down, dw_gate = mm_to(du.t(), x_c.reshape(B * N, C), w_qkv.dtype).split([2 * K + C, r, C])
        return (dx, dconv, dw_qkv, dw_down, dw_gate, colsum(dgate, b_gate.dtype),
                mm_to(dlogits.t(), z.reshape(B * N, r), w_up.dtype), colsum(dlogits, b_up.dtype), dw_o, dw_l,
                mm_to(dout.t(), y.reshape(B * N, C), w_out.dtype), None, None)

    @staticmethod
    def _cast_weights(params: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(w_in, b_in, w_up, b_up, w_out)`` in ``dtype`` from ``(W_qkv, W_1, W_g, b_g, W_2, b_2, W_o)``: the
        in-projection concatenated, the rest cast: all written by one fused copy (:func:`vigla.ops.amp.cast_concat`),
        or where every parameter is in ``dtype`` already (float32 training) the concatenation
        (:meth:`BiGLAMixer._concat`) and the parameters themselves."""
        w_qkv, w_down, w_gate, b_gate, w_up, b_up, w_out = params
        if all(p.dtype == dtype for p in params):
            return (*BiGLAMixer._concat((w_qkv, w_down, w_gate, b_gate)), w_up, b_up, w_out)
        rows = w_qkv.shape[0] + w_down.shape[0] + w_gate.shape[0]
        return tuple(cast_concat([[w_qkv, w_down, w_gate], [rows - b_gate.shape[0], b_gate], [w_up], [b_up], [w_out]],
                                 dtype))

    @staticmethod
    def _recorded_backward(ctx, dout: torch.Tensor) -> tuple:
        """The gradients as ops autograd records (a second derivative): the mixer's per-op path recomputed from the
        saved inputs, under the forward's autocast, and differentiated with ``create_graph``; each op's backward then
        records its reference's ops (:func:`vigla.ops.dispatch.recorded_backward`)."""
        inputs = ctx.saved_tensors[:11]
        x, conv, w_qkv, w_down, w_gate, b_gate, w_up, b_up, w_o, w_l, w_out = inputs
        device = x.device.type
        with torch.autocast(device, dtype=ctx.autocast or torch.get_autocast_dtype(device),
                            enabled=ctx.autocast is not None):
            out = ctx.mixer.forward_ops(x, ctx.hw, conv, *BiGLAMixer._concat((w_qkv, w_down, w_gate, b_gate)), w_up,
                                        b_up, w_o, w_l, w_out)
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
        grads = iter(torch.autograd.grad(out, wanted, dout, create_graph=True, allow_unused=True))
        return (*(next(grads) if need else None for need in ctx.needs_input_grad[:11]), None, None)


class MixerInference(NamedTuple):
    """What :meth:`BiGLAMixer.forward_inference` reads, prepared once for a compute dtype and device: the
    depthwise conv's weight ``[C, 1, 3, 3]``; the in-projection ``w_in``, ``b_in`` (on CUDA with the decay
    projection folded in, ``w_up`` and ``b_up`` then None), the output projection ``w_out``, as
    :func:`vigla.layers.cast.gemm` takes them; the two per-head RMSNorm weights ``[d_v]``, their eps and the gate
    logits' normalizer; the decay projection's rank ``r``."""
    conv: torch.Tensor
    w_in: torch.Tensor
    b_in: torch.Tensor
    w_up: Optional[torch.Tensor]
    b_up: Optional[torch.Tensor]
    w_out: torch.Tensor
    norm_out: torch.Tensor
    norm_local: torch.Tensor
    eps: float
    normalizer: float
    rank: int
