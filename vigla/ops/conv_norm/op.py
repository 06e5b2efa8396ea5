"""The stems' first layer as one op: ``ConvNormFunction`` (eager, CUDA) and ``vigla::conv_norm`` (traced); the
fused kernel for CUDA tensors, the reference elsewhere (:mod:`vigla.ops.dispatch`). The backward recomputes the
convolution and leaves its gradients to PyTorch's convolution backward; on the GPU the LayerNorm's forward and
backward between them run as the add + norm kernels (:mod:`vigla.ops.add_norm`), elsewhere as the reference's
written-out maths. Eager on a CPU, the public function runs the reference under autograd instead (PyTorch's own
backward is faster there)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ..dispatch import HAS_TRITON, direct, fused_op, recorded_backward, use_kernels, wrap
from .reference import conv_grads, conv_norm_reference, conv_norm_reference_bwd

if HAS_TRITON:
    from ..add_norm.triton_kernels import MAX_C, add_norm_bwd_triton, add_norm_fwd_triton
    from .triton_kernels import conv_norm_fwd_triton

__all__ = ["ConvNormFunction", "conv_norm_forward", "conv_norm_backward"]


def _kernels(x: torch.Tensor, dtype: torch.dtype) -> bool:
    return use_kernels(x) and dtype in (torch.float32, torch.float16, torch.bfloat16)


def conv_norm_forward(x, weight, bias, norm_weight, norm_bias, eps: float, stride: int, padding: int, act: str,
                      dtype: torch.dtype, out_dtype: torch.dtype, launch=direct) -> torch.Tensor:
    """``[B, H', W', C]`` in ``out_dtype`` (see :func:`vigla.ops.conv_norm.conv_norm_act`), products in
    ``dtype``. Without autograd: the Function's forward, and the op itself when nothing needs a gradient."""
    if _kernels(x, dtype):
        return conv_norm_fwd_triton(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype,
                                    out_dtype, wrap=launch)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != x.dtype):
        return conv_norm_reference(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act,
                                   out_dtype).contiguous()


def conv_norm_backward(dy, x, weight, bias, norm_weight, norm_bias, eps: float, stride: int, padding: int,
                       act: str, dtype: torch.dtype, input_grad: bool, launch=direct):
    """``(dx, dweight, dbias, dnorm_weight, dnorm_bias)`` (``dx`` empty unless ``input_grad``), in the inputs'
    dtypes: :func:`_kernels_backward` on the GPU, the reference's written-out backward elsewhere."""
    if _kernels(x, dtype) and weight.shape[0] <= MAX_C:
        grads = _kernels_backward(dy, x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype,
                                  input_grad, launch)
    else:
        grads = conv_norm_reference_bwd(dy, x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype,
                                        input_grad)
    return tuple(t.contiguous() for t in grads)


def _kernels_backward(dy, x, weight, bias, norm_weight, norm_bias, eps: float, stride: int, padding: int, act: str,
                      dtype: torch.dtype, input_grad: bool, launch=direct):
    """:func:`conv_norm_reference_bwd`'s maths with fewer passes: ``x`` copied once to channels-last in ``dtype``
    (cuDNN's recomputed convolution and its backward then read it as it is, where an NCHW image costs each a
    layout conversion), the LayerNorm's output ``z`` and its backward as the add + norm kernels
    (``[B, H', W', C]`` rows in, float32 math), ``act``'s backward as PyTorch's fused one."""
    f = torch.promote_types(dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        xc, wc = x.to(dtype, memory_format=torch.channels_last), weight.to(dtype)
        u = F.conv2d(xc, wc, bias.to(dtype), stride, padding).permute(0, 2, 3, 1)
        _, z = add_norm_fwd_triton(u, None, norm_weight, norm_bias, eps, False, f, wrap=launch)
        dz = dy.to(f)
        if act == "silu":
            dz = torch.ops.aten.silu_backward(dz, z)
        elif act == "gelu":
            dz = torch.ops.aten.gelu_backward(dz, z)
        du, _, dnw, dnb = add_norm_bwd_triton(dz, None, u, norm_weight, norm_bias, eps, False, None, wrap=launch)
    return (*conv_grads(du, x, xc, weight, wc, bias, stride, padding, input_grad), dnw, dnb)


class ConvNormFunction(torch.autograd.Function):
    """Eager: ``apply(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype, out_dtype)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype, out_dtype):
        ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias)
        ctx.args = (eps, stride, padding, act, dtype)
        return conv_norm_forward(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype,
                                 out_dtype)

    @staticmethod
    @recorded_backward
    def backward(ctx, dy):
        dx, *grads = conv_norm_backward(dy, *ctx.saved_tensors, *ctx.args, ctx.needs_input_grad[0])
        return (dx if ctx.needs_input_grad[0] else None, *grads, None, None, None, None, None, None)


def _out_shape(x, weight, stride: int, padding: int) -> tuple[int, int, int, int]:
    (B, _, H, W), (C, _, kh, kw) = x.shape, weight.shape
    return B, (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1, C


def _fake(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype, out_dtype):
    return x.new_empty(_out_shape(x, weight, stride, padding), dtype=out_dtype)


def _bwd_fake(dy, x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype, input_grad):
    return (x.new_empty(x.shape if input_grad else (0,)),
            *(torch.empty_like(t, memory_format=torch.contiguous_format)
              for t in (weight, bias, norm_weight, norm_bias)))


@fused_op("vigla::conv_norm", _fake)
def conv_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
                 norm_bias: torch.Tensor, eps: float, stride: int, padding: int, act: str, dtype: torch.dtype,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """The custom op: :class:`ConvNormFunction`'s forward."""
    return conv_norm_forward(x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype, out_dtype,
                             wrap)


@fused_op("vigla::conv_norm_bwd", _bwd_fake)
def conv_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float, stride: int, padding: int,
                     act: str, dtype: torch.dtype, input_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Its backward: ``(dx, dweight, dbias, dnorm_weight, dnorm_bias)`` (``dx`` empty unless ``input_grad``)."""
    return conv_norm_backward(dy, x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype,
                              input_grad, wrap)


def _setup(ctx, inputs, output):
    x, weight, bias, norm_weight, norm_bias, eps, stride, padding, act, dtype, _ = inputs
    ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias)
    ctx.args = (eps, stride, padding, act, dtype)


def _op_backward(ctx, dy):
    dx, *grads = torch.ops.vigla.conv_norm_bwd(dy, *ctx.saved_tensors, *ctx.args, ctx.needs_input_grad[0])
    return (dx if ctx.needs_input_grad[0] else None, *grads, None, None, None, None, None, None)


conv_norm_op.register_autograd(_op_backward, setup_context=_setup)


@register_flop_formula(torch.ops.vigla.conv_norm)
def _fwd_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs):
    # the convolution's multiply-adds, as for the nn.Conv2d it replaces (the norm's are not counted)
    B, Ho, Wo, C = out_shape
    return 2 * B * Ho * Wo * C * weight_shape[1] * weight_shape[2] * weight_shape[3]


@register_flop_formula(torch.ops.vigla.conv_norm_bwd)
def _bwd_flops(dy_shape, x_shape, weight_shape, *args, out_shape=None, **kwargs):
    B, Ho, Wo, C = dy_shape
    return 2 * 2 * B * Ho * Wo * C * weight_shape[1] * weight_shape[2] * weight_shape[3]
