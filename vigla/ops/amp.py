"""Mixed precision in the eager training Functions (:class:`vigla.layers.bigla_mixer.MixerFunction`,
:class:`vigla.ops.swiglu.op.SwiGLUMLPFunction`) with fewer kernel launches.

Under autocast a training step casts each float32 weight to the compute dtype in the forward and each weight
gradient back to float32 in the backward: a kernel launch apiece, and at 224² an eager ViG-T training step waits on
its host's launches. :func:`cast_concat` writes a layer's weight casts (and concatenations) with one multi-tensor copy
(``torch._foreach_copy_``: one kernel on CUDA for all of them) into views of one new buffer, and :func:`mm_to` has
the weight-gradient GEMM write float32 itself (no cast kernel, and no rounding to bf16 before the cast).
:func:`colsum` sums a bias's gradient the same way, as a GEMM with a row of ones: PyTorch's reduction over the rows
of a narrow ``[R, C]`` half-precision tensor runs far below the memory's bandwidth (``benchmarks/colsum_ab.py``).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["cast_concat", "colsum", "mm_to"]

# torch >= 2.8: aten::mm.dtype, a GEMM of half-precision inputs writing float32 (CUDA)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
_HALF = (torch.float16, torch.bfloat16)


def cast_concat(groups: Sequence[Sequence[torch.Tensor | int]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each group's pieces cast to ``dtype`` and concatenated along dim 0, as ``torch.cat([p.to(dtype), ...])`` per
    group; a piece is a tensor (those of a group share their trailing sizes) or, in a group of 1-D pieces, an int ``n``
    (``n`` zeros). All groups are written into one new buffer, each at a multiple of 128 bytes from its start
    (contiguous views of it are returned; CUDA's blocks start 512-byte aligned): the tensors by one
    ``torch._foreach_copy_``, each run of zeros by a memset. E.g. ``[[w_q, w_g], [3, b_g]]`` -> ``[cat(w_q, w_g),
    cat(zeros(3), b_g)]``."""
    align = 128 // dtype.itemsize
    spans, total = [], 0
    for g in groups:
        n = sum(p if isinstance(p, int) else p.numel() for p in g)
        spans.append((total, n))
        total += -(-n // align) * align
    device = next(p.device for g in groups for p in g if isinstance(p, torch.Tensor))
    flat = torch.empty(total, dtype=dtype, device=device)
    dst, src, outs = [], [], []
    for g, (start, n) in zip(groups, spans):
        for p in g:
            size = p if isinstance(p, int) else p.numel()
            part = flat[start:start + size]
            if isinstance(p, int):
                part.zero_()
            else:
                dst.append(part.view(p.shape))
                src.append(p)
            start += size
        trailing = next((p.shape[1:] for p in g if isinstance(p, torch.Tensor)), ())
        outs.append(flat[start - n:start].view(-1, *trailing))
    torch._foreach_copy_(dst, src)
    return outs


def mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(a @ b).to(dtype)`` for ``[M, K]``, ``[K, N]``: with half-precision inputs on CUDA and ``dtype`` float32, one
    GEMM writing float32 (accumulated in float32 either way; the result is not rounded to the inputs' dtype first)."""
    if _MM_OUT_DTYPE and dtype == torch.float32 and a.is_cuda and a.dtype in _HALF and b.dtype == a.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # a GPU or build without this GEMM: the product and a cast from now on
            _disable_mm_out_dtype()
    return (a @ b).to(dtype)


def colsum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.sum(0, dtype=dtype)`` for ``x`` ``[R, C]`` (a bias's gradient): with half-precision ``x`` on CUDA and
    ``dtype`` float32, ``ones[1, R] @ x`` as one GEMM writing float32 (:func:`mm_to`; accumulated in float32 as the
    reduction is). The row of ones is kept per device and dtype, grown outside CUDA-graph capture (inside one, a
    row too short takes the reduction); the reduction too for a traced or subclassed ``x``."""
    R = x.shape[0]
    if not (_MM_OUT_DTYPE and dtype == torch.float32 and x.is_cuda and x.dtype in _HALF and R
            and type(x) is torch.Tensor and not torch.compiler.is_compiling()):
        return x.sum(0, dtype=dtype)
    key = (x.device, x.dtype)
    ones = _ONES.get(key)
    if ones is None or ones.shape[1] < R:
        if torch.cuda.is_current_stream_capturing():
            return x.sum(0, dtype=dtype)
        if ones is not None:  # kept: a GEMM on another stream may still read it (no record_stream of every use)
            _RETIRED.append(ones)
        ones = _ONES[key] = x.new_ones(1, max(R, 2 * ones.shape[1] if ones is not None else R))
    total = mm_to(ones[:, :R], x, dtype)
    # mm_to without its float32-output GEMM (it just failed: the product was rounded to x's dtype) -> the reduction
    return total.view(x.shape[1]) if _MM_OUT_DTYPE else x.sum(0, dtype=dtype)


_ONES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # rows of ones outgrown: at most as many elements as the ones in use


def _disable_mm_out_dtype() -> None:
    global _MM_OUT_DTYPE
    _MM_OUT_DTYPE = False
