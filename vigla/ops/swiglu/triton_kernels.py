"""SwiGLU's gating ``SiLU(a) * b`` (``[a | b] = u``) fused: one read of ``u`` and one write of
``y`` forward, one read of ``u`` and ``dy`` and one write of ``du`` backward (the activation is
recomputed, not stored; optionally the output too, for :func:`vigla.ops.swiglu.swiglu_mlp`).

And fc1 with the gating in its epilogue (:func:`fc1_swiglu_triton`, half precision): each program
multiplies a ``[BM, C]`` row block of ``x`` by the matching ``BN`` columns of both halves of fc1's
weight on tensor cores (fp32 accumulators) and writes only ``SiLU(a) * b``: fc1's ``[rows, 2I]``
output is never written or read back, and the gating's launch is gone. On Hopper and newer the programs
are persistent and move the tiles by TMA: one program per multiprocessor walks the output tiles, its next
tile's loads in flight while it gates and stores the current one."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor  # host-side TMA descriptors (Triton >= 3.4)
except ImportError:  # pragma: no cover - older Triton: the pointer kernel only
    TensorDescriptor = None

from ..dispatch import direct
from ..launcher import cdiv, multiprocessors, rows as _rows

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(u, y, N, I, su, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    row = idx // I
    col = idx - row * I
    a = tl.load(u + row * su + col, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(u + row * su + I + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(y + idx, (a * tl.sigmoid(a) * b).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy, u, du, y, N, I, su, BLOCK: tl.constexpr, STORE_Y: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    row = idx // I
    col = idx - row * I
    a = tl.load(u + row * su + col, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(u + row * su + I + col, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy + idx, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    out = du + row * 2 * I + col
    tl.store(out, (g * b * s * (1 + a * (1 - s))).to(du.dtype.element_ty), mask=mask)
    tl.store(out + I, (g * a * s).to(du.dtype.element_ty), mask=mask)
    if STORE_Y:  # the forward's output, recomputed (for the next layer's weight gradient)
        tl.store(y + idx, (a * s * b).to(y.dtype.element_ty), mask=mask)


# fc1 + gating tiles of the pointer kernel (rows x hidden columns x inner dim), chosen on an H200 over 28
# tilings at ViG-T (C = 192, batch 1 to 128, 224² to 2048²), ViG-S (C = 384) and ViG-H-T stages 1-2 (C = 64,
# 128): the small tile was within 11% of each shape's best below C = 384, the large one best at ViG-S. It runs
# where the persistent kernel below does not (fewer tiles than multiprocessors, e.g. batch 1; no TMA).
FC1_NARROW = dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=2)
FC1_WIDE = dict(BM=128, BN=128, BK=32, num_warps=8, num_stages=4)  # C >= 384


@triton.jit
def _fc1_swiglu_kernel(x, w, y, M, C, I, sx, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n_tiles = tl.cdiv(I, BN)
    pid_m = tl.program_id(0) // n_tiles  # the column tiles of one row block run side by side: x read once
    pid_n = tl.program_id(0) - pid_m * n_tiles
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    xp = x + rm[:, None] * sx + rk[None, :]
    wa = w + rn[None, :].to(tl.int64) * C + rk[:, None]  # [BK, BN] of fc1's rows rn (the SiLU half)
    row_ok, col_ok = rm[:, None] < M, rn[None, :] < I
    acc_a = tl.zeros((BM, BN), dtype=tl.float32)
    acc_b = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, C, BK):
        k_ok = (k0 + rk) < C
        xt = tl.load(xp + k0, mask=row_ok & k_ok[None, :], other=0.0)
        at = tl.load(wa + k0, mask=k_ok[:, None] & col_ok, other=0.0)
        bt = tl.load(wa + I * C + k0, mask=k_ok[:, None] & col_ok, other=0.0)  # rows I + rn: the linear half
        acc_a = tl.dot(xt, at, acc_a)
        acc_b = tl.dot(xt, bt, acc_b)
    h = acc_a * tl.sigmoid(acc_a) * acc_b
    tl.store(y + rm[:, None] * I + rn[None, :], h.to(y.dtype.element_ty), mask=row_ok & col_ok)


@triton.jit
def _tile_of(t, m_tiles, n_tiles, GROUP: tl.constexpr):
    """Tile ``t``'s ``(row block, column block)``: groups of ``GROUP`` row blocks, column-major inside a
    group, so that the programs running at once share their rows of ``x`` and columns of ``w`` in L2."""
    per_group = GROUP * n_tiles
    first = (t // per_group) * GROUP
    rows = tl.minimum(m_tiles - first, GROUP)
    return first + (t % per_group) % rows, (t % per_group) // rows


@triton.jit
def _fc1_swiglu_tma_kernel(x_desc, w_desc, y_desc, M, I, C, BM: tl.constexpr, BN: tl.constexpr,
                           BK: tl.constexpr, GROUP: tl.constexpr, PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr):
    """Persistent: ``PROGRAMS`` programs take the ``[BM, BN]`` output tiles in turn, the tiles read and written
    by TMA; with ``FLATTEN`` the tile loop and the inner-dim loop are pipelined as one, so that the next
    tile's loads are in flight during this tile's gating and store. ``w_desc`` reads fc1's rows of both
    halves (``n`` and ``I + n``); where ``I`` is not a multiple of ``BN`` the last SiLU-half tile reads rows of
    the linear half, whose columns fall past ``I`` and are clipped by the store."""
    m_tiles = tl.cdiv(M, BM)
    n_tiles = tl.cdiv(I, BN)
    out = tl.program_id(0) - PROGRAMS  # the stored tile, counted apart from the loop's index (the same tile: the
    # pipeliner issues the loop's next loads ahead of this epilogue under FLATTEN)
    for t in tl.range(tl.program_id(0), m_tiles * n_tiles, PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_of(t, m_tiles, n_tiles, GROUP)
        acc_a = tl.zeros((BM, BN), dtype=tl.float32)
        acc_b = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, C, BK):
            xt = x_desc.load([pid_m * BM, k0])
            acc_a = tl.dot(xt, w_desc.load([pid_n * BN, k0]).T, acc_a)
            acc_b = tl.dot(xt, w_desc.load([I + pid_n * BN, k0]).T, acc_b)
        out += PROGRAMS
        out_m, out_n = _tile_of(out, m_tiles, n_tiles, GROUP)
        h = acc_a * tl.sigmoid(acc_a) * acc_b
        y_desc.store([out_m * BM, out_n * BN], h.to(y_desc.dtype))


# persistent kernel: (BM, BN, BK, warps, stages, FLATTEN) by the inner dim C, from A/Bs of tilings on an H200
# (benchmarks/results/kernel_fc1_tiles_ab.json): 128 x 128 tiles (two fp32 accumulators) at 8 warps, the
# loops flattened but at C >= 384 (unflattened 3% faster at ViG-S, 11% at ViG-B); a single 64-wide inner step
# (ViG-H-T stage 1, C = 64) takes 256 x 64 tiles.
def _tma_tiles(C: int) -> tuple[int, int, int, int, int, bool]:
    if C <= 64:
        return 256, 64, 64, 8, 3, True
    return 128, 128, 64, 8, 3, C < 384


def _fills_device(M: int, C: int, I: int, sms: int) -> bool:
    """Whether the persistent kernel's output tiles for ``[M, C] x [C, 2I]`` are at least ``sms``, one per
    multiprocessor (fewer: the per-tile kernel's smaller tiles spread the work wider)."""
    BM, BN = _tma_tiles(C)[:2]
    return cdiv(M, BM) * cdiv(I, BN) >= sms


@functools.lru_cache(maxsize=None)
def _has_tma(index: int) -> bool:
    """Whether CUDA device ``index`` has TMA: Hopper (sm_90) or newer, with a Triton that has host-side tensor
    descriptors. Read on the eager path only (``torch.compile`` traces the per-tile kernel)."""
    return TensorDescriptor is not None and torch.cuda.get_device_capability(index)[0] >= 9


def _tma_fits(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """Whether TMA can address ``x`` (``[M, C]``, unit last stride) and ``w1`` (``[2I, C]`` contiguous), half
    precision: 16-byte aligned bases and row strides (``C`` and ``I`` multiples of 8)."""
    I2, C = w1.shape
    return (not x.data_ptr() % 16 and not w1.data_ptr() % 16 and not x.stride(0) % 8 and not C % 8
            and not I2 % 16)


# Eager calls with less work than this (rows x hidden width) take the per-tile kernel unless a CUDA graph is
# being captured: a launch of the persistent kernel costs the host ~11 us more (Triton encodes its three TMA
# descriptors at every launch; 23 against 12 us on the H200's host), more than it saves on the device below
# ~2^24.5 (it saves ~19% of the per-tile kernel's ~2.8 us per 2^20), and at 224² an eager ViG-T is bound by
# the host (benchmarks/results/kernel_fc1_tiles_ab.json).
TMA_MIN_WORK = 1 << 25


def fc1_swiglu_triton(x: torch.Tensor, w1: torch.Tensor, wrap=direct) -> torch.Tensor:
    """``swiglu(x @ w1^T)`` in one kernel: ``x``: ``[..., C]``, ``w1``: ``[2I, C]``, both fp16 or both bf16 ->
    ``[..., I]`` in their dtype. The products are accumulated in float32 and gated before the one rounding
    (the unfused path rounds fc1's output first). The persistent TMA kernel (:func:`fc1_swiglu_tma`) on
    Hopper and newer, for eager calls (``wrap`` the direct launcher; ``torch.compile`` traces the other) with
    at least as many output tiles as multiprocessors and :data:`TMA_MIN_WORK` or under CUDA-graph capture;
    else one program per tile (:func:`fc1_swiglu_tiles`)."""
    rows = _rows(x)
    w1 = w1.contiguous()
    M, C = rows.shape
    I = w1.shape[0] // 2
    y = torch.empty(*x.shape[:-1], I, dtype=x.dtype, device=x.device)
    if not M:
        return y
    if wrap is direct and x.is_cuda and (M * I >= TMA_MIN_WORK or torch.cuda.is_current_stream_capturing()):
        sms = multiprocessors(x.device.index)
        if _has_tma(x.device.index) and _fills_device(M, C, I, sms) and _tma_fits(rows, w1):
            fc1_swiglu_tma(rows, w1, y.view(M, I), sms, wrap)
            return y
    fc1_swiglu_tiles(rows, w1, y, wrap)
    return y


def fc1_swiglu_tiles(x: torch.Tensor, w1: torch.Tensor, y: torch.Tensor, wrap=direct) -> None:
    """The per-tile kernel of :func:`fc1_swiglu_triton` on ``x`` ``[M, C]`` (unit last stride), ``w1``
    ``[2I, C]`` (contiguous), writing ``y`` (``M * I`` contiguous elements)."""
    M, C = x.shape
    I = w1.shape[0] // 2
    cfg = FC1_WIDE if C >= 384 else FC1_NARROW
    grid = (cdiv(M, cfg["BM"]) * cdiv(I, cfg["BN"]),)
    wrap(_fc1_swiglu_kernel)[grid](x, w1, y, M, C, I, x.stride(0), **cfg)


def fc1_swiglu_tma(x: torch.Tensor, w1: torch.Tensor, y: torch.Tensor, programs: int, wrap=direct) -> None:
    """The persistent TMA kernel of :func:`fc1_swiglu_triton` on ``x`` ``[M, C]``, ``w1`` ``[2I, C]``, writing
    ``y`` ``[M, I]`` (contiguous), with at most ``programs`` programs."""
    M, C = x.shape
    I = y.shape[1]
    BM, BN, BK, warps, stages, flatten = _tma_tiles(C)
    programs = min(programs, cdiv(M, BM) * cdiv(I, BN))
    wrap(_fc1_swiglu_tma_kernel)[(programs,)](
        TensorDescriptor.from_tensor(x, [BM, BK]), TensorDescriptor.from_tensor(w1, [BN, BK]),
        TensorDescriptor.from_tensor(y, [BM, BN]), M, I, C, BM=BM, BN=BN, BK=BK, GROUP=8, PROGRAMS=programs,
        FLATTEN=flatten, num_warps=warps, num_stages=stages)


def swiglu_fwd_triton(u: torch.Tensor, wrap=direct) -> torch.Tensor:
    u2 = _rows(u)
    I = u.shape[-1] // 2
    y = torch.empty(*u.shape[:-1], I, dtype=u.dtype, device=u.device)
    n = u2.shape[0] * I
    wrap(_swiglu_fwd_kernel)[(cdiv(n, BLOCK),)](u2, y, n, I, u2.stride(0), BLOCK=BLOCK, num_warps=4)
    return y


def swiglu_bwd_triton(dy: torch.Tensor, u: torch.Tensor, recompute: bool = False, wrap=direct):
    """``du`` (``u``'s shape) of ``<dy, swiglu(u)>``; ``recompute``: ``(du, swiglu(u))`` from the
    same pass over ``u``."""
    u2 = _rows(u)
    I = u.shape[-1] // 2
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    y = torch.empty(*u.shape[:-1], I, dtype=u.dtype, device=u.device) if recompute else du
    n = u2.shape[0] * I
    wrap(_swiglu_bwd_kernel)[(cdiv(n, BLOCK),)](dy.contiguous(), u2, du, y, n, I, u2.stride(0), BLOCK=BLOCK,
                                          STORE_Y=recompute, num_warps=4)
    return (du, y) if recompute else du
