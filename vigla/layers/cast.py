"""Weights cast once for inference.

Under autocast every ``F.linear`` casts its fp32 weight to the compute dtype on every call: one
kernel launch per weight per forward, which at 224² is a large part of an eager ViG forward.
:func:`inference_weights` keeps the cast copies on the module until a source parameter changes
(in place, as an optimizer step does, or replaced), and is bypassed whenever autograd records
(which casts as usual). The inference paths' GEMMs take them through :func:`gemm_weights` (each matrix
prepared once: transposed, or packed for oneDNN on the CPU) and :func:`gemm`. A layer keeps what its eager
inference path reads (those weights, its norms' parameters, its choices of kernels) in one
:func:`memoized` record, so that a call checks one key instead of building each piece: at 224² an eager
ViG forward is bound by the host's time. The layers read their sublayers' weights only while those are plain
(:func:`plain_leaves`: their own type, no hook), else call them: a LoRA adapter, a quantized or pruned layer, a
forward hook see what they expect. While ``torch.compile`` traces an inference path, all of them
build their results in the graph on every call instead (a graph holds no cache): the casts and the
concatenations become kernels Inductor fuses.

A change is seen through each parameter's version counter, which every in-place PyTorch op moves, but
not the fused optimizers (``Adam(W)(fused=True)`` update their parameters without it): so importing
vigla installs a global optimizer step post-hook (:func:`_bump_versions`) that moves the counters of the
parameters an optimizer step has just updated. Without it an evaluation after fused steps reads the
casts of the weights before them. A change written through ``param.data`` is not seen either (``.data``
has a counter of its own): write under ``torch.no_grad()`` instead, or move the counters with
``torch.autograd.graph.increment_version(list(model.parameters()))``. A parameter or submodule assigned
anew is seen through PyTorch's global registration hooks (:func:`_restructured`).
"""
from __future__ import annotations

import contextlib
import functools
import operator
import weakref
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..ops.add_norm.op import scale_rows
from ..ops.tracing import exporting

__all__ = ["inference_weights", "forget_inference_weights", "casts_in_graph", "generation", "caching", "check_device",
           "memoized", "plain_call", "plain_leaves", "gemm_weights", "gemm", "gemm_swiglu", "packs", "Projection",
           "MlpProjection", "dense"]


def _bump_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After any optimizer step: move the version counters of its parameters (each changed in place).
    Not while ``torch.compile`` traces a step (its in-place updates are written back by ``copy_``, which
    moves them)."""
    if torch.compiler.is_compiling():
        return
    increment_version([p for group in optimizer.param_groups for p in group["params"]])


register_optimizer_step_post_hook(_bump_versions)

_GENERATION = [0]  # moves whenever any module anywhere registers a parameter, buffer or submodule
_FORGOTTEN = [0]  # moves with each forget_inference_weights(): every cast copy is rebuilt


def forget_inference_weights() -> None:
    """Drop every model's inference records and weight copies (casts, packed or folded matrices: :func:`memoized`,
    :func:`inference_weights`); the next eager inference forward builds them anew. Needed only after writing
    parameters in place through ``.data`` (``p.data.mul_(0.9)`` in an older EMA, weight surgery), which PyTorch does
    not version: optimizer steps, ``load_state_dict``, in-place ops under ``torch.no_grad()`` and new parameters are
    seen without it."""
    _GENERATION[0] += 1
    _FORGOTTEN[0] += 1


def _restructured(module, name, value) -> None:
    """Global registration hook (returns None: the value is kept): a parameter, buffer or submodule assigned
    anywhere invalidates every :func:`memoized` record (they hold the parameters they were built from)."""
    _GENERATION[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_restructured)
nn.modules.module.register_module_buffer_registration_hook(_restructured)
nn.modules.module.register_module_module_registration_hook(_restructured)


_IN_GRAPH = [False]  # inside casts_in_graph(): no copies kept, as while torch.compile traces


@contextlib.contextmanager
def casts_in_graph():
    """Within this block the inference paths keep no copies (cast, transposed or folded weights): each call makes
    them from the parameters, as under ``torch.compile``. What a CUDA graph of an inference forward is captured
    in (:mod:`vigla.models._graph_replay`): its replays then read the parameters where they lie, and an optimizer
    step or ``load_state_dict`` in between is seen without a new capture."""
    previous, _IN_GRAPH[0] = _IN_GRAPH[0], True
    try:
        yield
    finally:
        _IN_GRAPH[0] = previous


@torch.jit.unused
def _uncached():  # unannotated: TorchScript reads the signature of this stub (caching() is scripted)
    """Whether the copies are made in the graph being recorded, not kept: ``torch.compile`` traces, or
    :func:`casts_in_graph`."""
    return torch.compiler.is_compiling() or _IN_GRAPH[0]


def generation() -> int:
    """A number that moves whenever any module anywhere registers a parameter, buffer or submodule (and with
    :func:`forget_inference_weights`): what a record of a model's structure is checked against."""
    return _GENERATION[0]


def caching(x) -> bool:
    """Whether :func:`inference_weights` keeps copies for an input like ``x`` now: no autograd, and
    no graph being recorded (``torch.compile``, export, ``torch.jit.trace``, or ``torch.fx``, whose
    proxies are not tensors): a graph holds no cache."""
    return not (torch.is_grad_enabled() or _uncached() or exporting() or not isinstance(x, torch.Tensor))


def inference_weights(module: nn.Module, slot: str, sources: Sequence[torch.Tensor], dtype: torch.dtype,
                      build: Callable[[], Sequence[torch.Tensor]] | None = None) -> tuple[torch.Tensor, ...]:
    """``build()`` (default: ``sources``) cast to ``dtype``, cached on ``module`` under ``slot``.

    The cache key is ``dtype`` and each source's storage and version counter, so an in-place update
    or a new parameter makes the next call rebuild (a write through ``.data``, unversioned, does not:
    :func:`forget_inference_weights`). Call it only when :func:`caching` is true, or while
    ``torch.compile`` traces inference (the casts then in the graph, nothing kept).
    """
    if _uncached():
        return tuple(t.to(dtype) for t in (build() if build is not None else sources))
    key = (_FORGOTTEN[0], dtype, *[(t.data_ptr(), t._version) for t in sources])
    cache = module.__dict__.setdefault("_inference_weights", {})
    hit = cache.get(slot)
    if hit is None or hit[0] != key:
        made = build() if build is not None else sources
        hit = (key, tuple(t.to(dtype) for t in made))
        cache[slot] = hit
    return hit[1]


class _Memo(NamedTuple):
    generation: int
    key: tuple
    dicts: tuple  # where the module's parameters (recursively) live: their owners' parameter dicts ...
    names: tuple  # ... and names there
    params: tuple  # the tensors there when the value was built
    state: tuple  # their storage and version counter then
    value: object


_MEMOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(params: tuple) -> tuple:
    return tuple([(p.data_ptr(), p._version) for p in params])


def _held(memo: _Memo) -> bool:
    """Whether the parameter dicts still hold the tensors the record was built from (in C: ``functional_call``
    swaps tensors in without the registration hooks)."""
    return all(map(operator.is_, map(dict.get, memo.dicts, memo.names), memo.params))


def check_device(module: nn.Module, x: torch.Tensor) -> None:
    """``ValueError`` unless every parameter of ``module`` is on ``x``'s device: the fused paths hand the kernels
    addresses, unchecked (a layer left on the CPU under a CUDA input would fault the device, not raise)."""
    for name, p in module.named_parameters():
        if p.device != x.device:
            raise ValueError(f"{type(module).__name__}: parameter {name} is on {p.device} but the input is on "
                             f"{x.device}; move the model (model.to(device)) or the input")


def memoized(module: nn.Module, key: tuple, build: Callable[[], object]):
    """``build()``, kept for ``module`` (beside it, in a weak table: copies and pickles start without it) while
    ``key`` is the same and none of the module's parameters (its own and its submodules') has been updated in
    place, moved (new storage) or replaced, nor a submodule: a record of what an eager inference path reads
    (cast weights, choices of kernels), checked at the cost of one storage and version lookup per parameter.
    One record per module. While ``torch.compile`` traces (or :func:`casts_in_graph`), ``build()`` every call (in the
    graph)."""
    if _uncached():
        return build()
    memo = _MEMOS.get(module)
    if memo is not None and memo.generation == _GENERATION[0] and memo.key == key and _held(memo) \
            and memo.state == _state(memo.params):
        return memo.value
    generation = _GENERATION[0]
    slots = [(m._parameters, name, p) for m in module.modules() for name, p in m._parameters.items() if p is not None]
    dicts, names, params = (tuple(column) for column in zip(*slots)) if slots else ((), (), ())
    value = build()
    _MEMOS[module] = _Memo(generation, key, dicts, names, params, _state(params), value)
    return value


HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")  # a module's hook dicts
# the global hook dicts: module-level, changed in place by nn.modules.module.register_module_*_hook
GLOBAL_HOOKS = tuple(getattr(nn.modules.module, f"_global{name}", {}) for name in HOOKS)
_LEAVES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plain_call(module: nn.Module) -> bool:
    """Whether calling ``module`` may skip its ``__call__`` (the caller has checked its type): not compiled on its
    own, no hook on it or global (hooks see its input and output)."""
    d = module.__dict__
    return d.get("_compiled_call_impl") is None and not any(map(d.get, HOOKS)) and not any(GLOBAL_HOOKS)


def plain_leaves(module: nn.Module, leaves: tuple) -> bool:
    """Whether ``module`` may read its layers' parameters instead of calling them: each submodule named in
    ``leaves`` (``(dotted name, type)`` pairs; type None: any) exactly of that type (not replaced by a wrapper,
    e.g. a LoRA adapter or a quantized layer, nor given a parametrization, which subclasses it) and no hook on
    any of them, nor a global one (a user's forward hooks; pruning's and the legacy weight norm's pre-hooks,
    which recompute ``weight``). Otherwise the layer calls them one by one. While no module is assigned anew
    anywhere, one lookup and a look at the leaves' hook dicts."""
    entry = None if torch.compiler.is_compiling() else _LEAVES.get(module)  # a graph keeps no cache
    if entry is None or entry[0] != _GENERATION[0] or entry[3] is not leaves:
        entry = _leaves_entry(module, leaves)
        if not torch.compiler.is_compiling():
            _LEAVES[module] = entry
    return entry[1] and not any(entry[2]) and not any(GLOBAL_HOOKS)


def _leaves_entry(module: nn.Module, leaves: tuple) -> tuple:
    """``(generation, whether every leaf exists with its type, the leaves' hook dicts, leaves)``."""
    found = [_find(module, name) for name, _ in leaves]
    kinds = all(m is not None and (kind is None or type(m) is kind) for m, (_, kind) in zip(found, leaves))
    hooks = tuple(getattr(m, h) for m in found for h in HOOKS) if kinds else ()
    return _GENERATION[0], kinds, hooks, leaves


def _find(module: nn.Module, name: str) -> nn.Module | None:
    """The submodule at the dotted ``name``, or None."""
    for part in name.split("."):
        module = module._modules.get(part)
        if module is None:
            return None
    return module


# gemm_weights' cache, beside its modules rather than on them: oneDNN's packed weights have no storage, so a
# module holding them could not be deep-copied, pickled or scripted; copies start without a cache
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=None)
def _onednn() -> bool:
    """Whether this PyTorch runs oneDNN's prepacked linear (``torch.ops.mkldnn._linear_pointwise``, the
    op Inductor's CPU code uses); probed once on a tiny GEMM."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), 1)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), w, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(y.eq(2).all())


def _prepare(w: torch.Tensor, rows: int) -> torch.Tensor:
    """One ``[out, in]`` matrix as :func:`gemm` takes it: on the CPU in float32, packed once in oneDNN's
    blocked layout (its GEMM ran ViG-T's projections ~15% faster than ``torch.addmm`` on the ``x @ w^T``
    view on a 2-core AMD EPYC: no per-call reordering of the weight), at the cost of one more copy of the
    weight; ``torch.backends.mkldnn.flags(enabled=False)`` around the first call keeps the plain path. Else
    the ``[in, out]`` view."""
    if packs(w):
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)
    return w.t()


def packs(w: torch.Tensor) -> bool:
    """Whether :func:`gemm_weights` packs a matrix like ``w`` for oneDNN: a float32 CPU tensor, oneDNN on, not while
    ``torch.compile`` traces (a graph holds no packed weights)."""
    return (not torch.compiler.is_compiling() and w.device.type == "cpu" and w.dtype == torch.float32
            and torch.backends.mkldnn.enabled and _onednn())


def gemm_weights(module: nn.Module, slot: str, weights: tuple[torch.Tensor, ...], rows: int
                 ) -> tuple[torch.Tensor, ...]:
    """``weights`` (a tuple :func:`inference_weights` returned for ``slot``) prepared for :func:`gemm`, kept
    for ``module`` until that tuple is rebuilt (in a weak table beside it, not on it): each matrix
    ``[out, in]`` as its ``[in, out]`` view, or on the CPU in float32 packed for oneDNN; vectors (biases) as
    they are. ``rows``: the GEMMs' row count (a hint for the packing; any count works later)."""
    if _uncached():  # a graph: no cache, no oneDNN packing (compiled inference runs on CUDA)
        return tuple(w.t() if w.dim() == 2 else w for w in weights)
    cache = _PREPARED.get(module)
    if cache is None:
        cache = _PREPARED[module] = {}
    hit = cache.get(slot)
    if hit is None or hit[0] is not weights:
        hit = (weights, tuple(_prepare(w, rows) if w.dim() == 2 else w for w in weights))
        cache[slot] = hit
    return hit[1]


def gemm_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_value: torch.Tensor) -> torch.Tensor:
    """``SiLU(x @ Wg^T) * (x @ Wv^T)`` (SwiGLU's gating of fc1's two halves) for matrices packed for oneDNN by
    :func:`gemm_weights`: two GEMMs with the gating in their epilogues (a SiLU post-op, then a multiply by its
    output), while each tile is in the cache; no ``[rows, 2I]`` output is written and read again (ViG-T at 224,
    batch 8 on a 2-core Xeon: 104.0 -> 100.3 ms per inference forward, ``benchmarks/results/
    cpu_swiglu_epilogue_ab.json``). ``x``: ``[rows, in]``; returns ``[rows, I]``."""
    a = torch.ops.mkldnn._linear_pointwise(x, w_gate, None, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, a, w_value, None, "mul")


def gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a matrix ``w`` from :func:`gemm_weights`. ``x``: ``[rows, in]`` (a strided
    view is fine); returns ``[rows, out]``."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)


class Projection(NamedTuple):
    """``rows @ W^T`` not computed yet: an inference path's output projection, left for the op that takes it
    next (the residual add + norm) to run inside its own kernel. ``rows``: ``[R, K]``; ``w``: the matrix as
    :func:`gemm_weights` prepared it; ``shape``: the product's shape (``R`` rows of ``W``'s outputs)."""
    rows: torch.Tensor
    w: torch.Tensor
    shape: tuple

    def dense(self) -> torch.Tensor:
        """The product, ``shape``."""
        return gemm(self.rows, self.w).view(self.shape)


class MlpProjection(NamedTuple):
    """A SwiGLU MLP's output ``swiglu(diag(row_scale) rows @ W1^T) @ W2^T`` not computed yet: an inference path's
    MLP, left for the residual add + norm after it to run whole inside its own kernel. ``rows``: ``[R, C]``;
    ``w1``: ``[2I, C]`` and ``w2``: ``[C, I]``, the weights cast to ``rows``' dtype; ``shape``: the output's shape
    (``R`` rows of ``C``); ``ops``: the inference path's ops (:class:`vigla.ops.inference.InferenceOps`), for
    :meth:`dense`; ``row_scale``: ``[R]`` float32 or None: the reciprocal RMS of an RMSNorm whose weight ``w1``
    holds (``rows`` its input)."""
    rows: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    shape: tuple
    ops: object
    row_scale: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """The output, ``shape``: fc1 and the gating, then fc2."""
        rows = self.rows if self.row_scale is None else scale_rows(self.rows, self.row_scale)
        return torch.mm(self.ops.fc1_swiglu(rows, self.w1), self.w2.t()).view(self.shape)


def dense(t):
    """``t`` itself, or the product of a :class:`Projection` or :class:`MlpProjection`."""
    return t.dense() if isinstance(t, (Projection, MlpProjection)) else t
