"""A stem's first layer in plain PyTorch: the ground truth of the fused kernel.

``y = act(LayerNorm_C(conv2d(x, W, b, stride, padding)))`` with the LayerNorm over the conv's output
channels at every pixel, returned channels-last ``[B, H', W', C]`` (the stems of ViG and ViG-H, Liao et
al., AAAI 2025: "patch embed v2" and ViG-H's stem, whose first conv is followed by LayerNorm2d and SiLU
or GELU). Under autocast the conv runs in autocast's dtype and the LayerNorm in float32, as ``nn.Conv2d``
and ``nn.LayerNorm`` would.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..activations import silu_slope

ACTS = ("none", "silu", "gelu")  # gelu: the exact (erf) form, nn.GELU's default


def activate(y: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(y)
    if act == "gelu":
        return F.gelu(y)
    return y


def conv_norm_reference(x, weight, bias, norm_weight, norm_bias, eps: float, stride: int, padding: int, act: str,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """``x``: ``[B, C_in, H, W]``; ``weight``: ``[C, C_in, kh, kw]``; ``bias``, ``norm_weight``, ``norm_bias``:
    ``[C]``. Returns ``[B, H', W', C]`` in ``out_dtype`` (a channels-last view, as the conv left it).

    The convolution in ``x``'s dtype (the parameters cast to it; autocast's when it is on), the norm and the
    activation in at least float32."""
    y = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), stride, padding).permute(0, 2, 3, 1)
    f = torch.promote_types(y.dtype, torch.float32)
    y = F.layer_norm(y.to(f), y.shape[-1:], norm_weight.to(f), norm_bias.to(f), eps)
    return activate(y, act).to(out_dtype)


def _act_slope(z: torch.Tensor, act: str) -> torch.Tensor:
    """``act'(z)``."""
    if act == "silu":
        return silu_slope(z)
    if act == "gelu":
        return 0.5 * (1 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return torch.ones_like(z)


def conv_norm_reference_bwd(dy, x, weight, bias, norm_weight, norm_bias, eps: float, stride: int, padding: int,
                            act: str, dtype: torch.dtype, input_grad: bool):
    """``(dx, dweight, dbias, dnorm_weight, dnorm_bias)`` of ``<dy, conv_norm_reference(...)>`` with the
    convolution in ``dtype`` (``dx`` empty unless ``input_grad``), written out: the activation's and the
    LayerNorm's backward in at least float32, then PyTorch's convolution backward (in ``dtype``) of
    ``du = rstd (g - mean(g) - x_hat mean(g x_hat))``, ``g = dy act'(z) norm_weight``. Dtypes follow the inputs."""
    xc, wc, bc = x.to(dtype), weight.to(dtype), bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        u = F.conv2d(xc, wc, bc, stride, padding).permute(0, 2, 3, 1)
    f = torch.promote_types(dtype, torch.float32)
    u = u.to(f)
    d = u - u.mean(-1, keepdim=True)
    rstd = torch.rsqrt((d * d).mean(-1, keepdim=True) + eps)
    x_hat = d * rstd
    nw = norm_weight.to(f)
    dz = dy.to(f) * _act_slope(x_hat * nw + norm_bias.to(f), act)
    g = dz * nw
    du = rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))
    return (*conv_grads(du.to(dtype), x, xc, weight, wc, bias, stride, padding, input_grad),
            (dz * x_hat).sum((0, 1, 2)).to(norm_weight.dtype), dz.sum((0, 1, 2)).to(norm_bias.dtype))


def conv_grads(du, x, xc, weight, wc, bias, stride: int, padding: int, input_grad: bool):
    """``(dx, dweight, dbias)`` in ``x``'s, ``weight``'s and ``bias``'s dtypes (``dx`` empty unless
    ``input_grad``): PyTorch's convolution backward of ``du`` (``[B, H', W', C]``) with ``xc``, ``wc`` the
    input and weight as the forward's convolution took them."""
    with torch.autocast(x.device.type, enabled=False):
        dx, dw, db = torch.ops.aten.convolution_backward(
            du.permute(0, 3, 1, 2), xc, wc, [wc.shape[0]], [stride, stride], [padding, padding], [1, 1], False,
            [0, 0], 1, [input_grad, True, True])
    return dx.to(x.dtype) if input_grad else x.new_empty(0), dw.to(weight.dtype), db.to(bias.dtype)
