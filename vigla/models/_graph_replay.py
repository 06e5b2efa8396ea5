"""Eager CUDA calls with the host out of the way: a ViG's ``forward_features`` (and in training its backward)
replayed from CUDA graphs, inside ordinary eager PyTorch.

At 224² an eager ViG-T forward, and still more a training step, is bound by its host, not its GPU: some 650
kernel launches a step, each behind Python (``benchmarks/results/profile_host_train.json``). So in eager CUDA
calls a ViG's ``forward_features`` is captured once per input layout and then replayed:

* training (grad mode on, train mode): two graphs, the forward and the backward (the gradients of the
  parameters and, when it needs one, of the input), as PyTorch's ``torch.cuda.make_graphed_callables`` builds
  them, replayed inside one autograd node. ``model(x)``, ``loss.backward()`` and the optimizer stay the user's:
  the head, the loss and the optimizer run as always, the parameters' ``.grad`` fill as usual (hooks on them,
  DDP's included, fire) with the eager path's values (the same kernels, the same drop-path draws);
* inference (grad mode off): one graph of the forward, its weight casts inside it
  (:func:`vigla.layers.cast.casts_in_graph`), so that a replay reads the parameters as they are.

Each replay returns a fresh tensor. It happens only where it gives what the eager path would
(:func:`replay_features`): plain CUDA tensors on the current device (``torch.cuda.set_device``, as ``torchrun``
scripts do) and the fused kernels (not :func:`vigla.ops.reference_ops`); not under ``torch.compile``,
``torch.export``, ``torch.jit``, a dispatch mode, functorch, forward-mode AD or an enclosing CUDA-graph capture; no
gradient checkpointing and no module hook anywhere in the model (a replay calls no Python). Inside a
``DistributedDataParallel`` forward it replays too: DDP's hooks are on the parameters, whose gradients the replay's
backward hands over as eager autograd does (the capture differentiates aliases of them: :func:`_aliased`).
The graphs are keyed by the grad and inference modes, the input's shape, strides, dtype and ``requires_grad``, the
autocast and matmul-precision settings, the storage of every parameter and buffer (steps
write them in place and the graphs read them where they lie; a new tensor captures again) and every module's plain
settings (``training``, drop-path rates, grid sizes, ...). A model keeps its two most recent layouts of each kind
(training, forward alone); after 12 captures (shapes or parameters that keep changing) it stops capturing and says
so once; ``.to()`` / ``.cuda()`` / ``.half()`` drop its graphs. A training forward while the last one's backward is
still due (two forwards, one backward) runs eagerly; grad mode with nothing to differentiate (a frozen backbone, a
linear probe's) replays the forward alone; calls from several threads or streams take turns.

The cost: the first call of each layout runs two eager warm-up passes and the capture (about a second); the
graphs keep their activations (and a copy of the input) allocated while the model lives. So only calls of at most
:data:`MAX_PIXELS` input pixels (batch x height x width) replay: above that the GPU's work outlasts the host's
launches and a replay gains nothing. ViG-T at 512² batch 128 (33.5M pixels) ran at 0.95x the img/s of eager
calls with the replay, with 1.8x the inference and 1.27x the training peak memory
(``benchmarks/results/models_vig_t_eager_replay_all_sizes.json``); at 224² batch 128 (6.4M) the replay is
1.6-3.3x the img/s in inference and 2.3-4.3x in training, with the host's speed (``models_vig_t_interleaved*``);
a batch-1 forward at 1024² took 1.15 ms replayed against 8.0 eager. ``model.set_cuda_graphs(True,
max_pixels=None)`` replays every size; ``model.set_cuda_graphs(False)`` turns the replay off and frees the graphs.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.cuda import current_device

from ..engine.cuda_graph import side_stream
from ..layers.cast import GLOBAL_HOOKS, HOOKS, casts_in_graph, generation
from ..ops.dispatch import eager_inference, eager_training, issued_eagerly, use_kernels

__all__ = ["GraphReplayMixin", "replay_features", "replay_stats"]

WARMUP = 2  # eager passes before a capture (kernels compiled, cuBLAS and cuDNN state made)
KEEP = 2  # layouts a model keeps captured, of each kind (a training step's, a forward's): e.g. a full batch and an
# epoch's last, smaller one
MAX_CAPTURES = 12  # captures per model before it stops capturing
MAX_PIXELS = 2 ** 24  # the largest call that replays, in input pixels (batch x height x width): the module's docstring
_SCALARS = frozenset((bool, int, float, str, type(None)))


def _plain(v) -> bool:
    """A setting the key reads: a scalar, or a tuple of them (a grid size)."""
    return type(v) in _SCALARS or (type(v) is tuple and all(type(e) in _SCALARS for e in v))


class _Layout(NamedTuple):
    """What a model's key reads, found once per module structure (:func:`vigla.layers.cast.generation`)."""
    generation: int
    params: tuple  # (the dict a parameter lives in, its name): read anew each call (``functional_call`` swaps)
    buffers: tuple  # likewise for the buffers
    hooks: tuple  # every module's hook dicts
    settings: tuple  # (a module's ``__dict__``, the name of one of its plain attributes)
    checkpointing: tuple  # the ``__dict__`` of each module with a ``grad_checkpointing`` flag


class _Graphs:
    """One layout's captured forward (and backward: ``bwd`` None for a forward alone), their static buffers and the
    inputs they differentiate. Calls from several threads or streams take turns: a lock around each replay, and a
    stream that replays after another waits for the other's work (the static buffers are shared)."""

    def __init__(self, fn, fwd, bwd, static_in, static_out, static_dout, grads, params, buffers):
        # fn (the model's bound method) weakly: the model's state, held beside it in a weak table, must not keep it
        self.fn = weakref.WeakMethod(fn) if hasattr(fn, "__self__") else lambda: fn
        self.fwd, self.bwd, self.params, self.buffers = fwd, bwd, params, buffers  # held: the graphs read them
        self.static_in, self.static_out, self.static_dout, self.grads = static_in, static_out, static_dout, grads
        self.replays = 0
        self.pending: Optional[weakref.ref] = None  # the last forward's token while its backward is due
        self.lock = threading.Lock()
        self.stream: Optional[torch.cuda.Stream] = None  # where the last replay ran

    def busy(self) -> bool:
        """Whether the last replay's activations still wait for its backward (its autograd node is alive)."""
        return self.pending is not None and self.pending() is not None

    def follow(self, device: torch.device) -> None:
        """Order this call's replay after the last one's work when it runs on another stream."""
        stream = torch.cuda.current_stream(device)
        if self.stream is not None and self.stream != stream:
            stream.wait_stream(self.stream)
        self.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Replay the forward on ``x``: a fresh copy of its output (call with :attr:`lock` held)."""
        self.follow(x.device)
        self.static_in.copy_(x)
        self.fwd.replay()
        self.replays += 1
        return self.static_out.clone()


class _State:
    """A model's graphs (most recent last), how many it has captured, and why it stopped, if it did."""

    def __init__(self):
        self.graphs: OrderedDict = OrderedDict()
        self.captures = self.replays = 0
        self.off: Optional[str] = None
        self.layout: Optional[_Layout] = None
        self.lock = threading.Lock()  # one thread at a time looks up or captures


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # beside the model: copies start without any


class _CaptureFailed(Exception):
    """A capture failed (its first line says why); the model then trains eagerly."""


class _Token:
    """Held by a replay's autograd node: alive while its backward may still run."""


class _Replay(torch.autograd.Function):
    """``forward_features`` as one autograd node: the forward graph's output (a fresh tensor), then the backward
    graph's gradients for the input (None unless it needs one) and the parameters. Where autograd records the
    backward itself (``create_graph``: a gradient penalty), the features are computed again eagerly, with the
    forward's random state and autocast, and differentiated with their graph (:func:`_recorded_grads`)."""

    @staticmethod
    def forward(ctx, graphs: _Graphs, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.rng = torch.cuda.get_rng_state(x.device)
        ctx.amp = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        ctx.save_for_backward(x)
        out = graphs.forward(x)
        ctx.graphs, ctx.replay = graphs, graphs.replays
        ctx.token = _Token()
        graphs.pending = weakref.ref(ctx.token)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        graphs = ctx.graphs
        if torch.is_grad_enabled():
            return (None, *_recorded_grads(ctx, dout))
        with graphs.lock:
            if graphs.replays != ctx.replay:
                raise RuntimeError("forward_features was replayed again from its CUDA graph before this backward "
                                   "(retain_graph=True, then a new forward): run each backward before the next "
                                   "forward, or turn the replay off with model.set_cuda_graphs(False)")
            graphs.follow(dout.device)
            graphs.static_dout.copy_(dout)
            graphs.bwd.replay()
            graphs.pending = None
            return (None, *graphs.grads)


def _recorded_grads(ctx, dout: torch.Tensor) -> tuple:
    """The gradients of :class:`_Replay` (input, then parameters) with autograd recording them: ``fn`` run again
    eagerly on the saved input (same random state, same autocast) and differentiated with ``create_graph``."""
    (x,) = ctx.saved_tensors
    graphs = ctx.graphs
    xi = x.detach().requires_grad_(x.requires_grad)
    fn = graphs.fn()
    if fn is None:
        raise RuntimeError("a second derivative through forward_features after its model was deleted: keep the model "
                           "until the backward, or turn the replay off with model.set_cuda_graphs(False)")
    with torch.random.fork_rng(devices=[x.device]):
        torch.cuda.set_rng_state(ctx.rng, x.device)
        with torch.autocast("cuda", dtype=ctx.amp[1], enabled=ctx.amp[0]):
            out = fn(xi)
    return _gradients(out, xi, graphs.params, dout, create_graph=True)


def _gradients(out: torch.Tensor, x: torch.Tensor, params: tuple | list, dout: torch.Tensor,
               create_graph: bool = False) -> tuple:
    """``(d x, *d params)`` of ``out`` against ``dout``: None for ``x`` unless it needs a gradient, and for each
    parameter that needs none or that ``out`` does not use."""
    want = [p for p in params if p.requires_grad]
    grads = list(torch.autograd.grad(out, ([x] if x.requires_grad else []) + want, dout, create_graph=create_graph,
                                     allow_unused=True))
    dx = grads.pop(0) if x.requires_grad else None
    by_param = dict(zip(map(id, want), grads))
    return (dx, *[by_param.get(id(p)) for p in params])


def _layout(model: nn.Module) -> _Layout:
    modules = list(model.modules())
    params = tuple((m._parameters, n) for m in modules for n, p in m._parameters.items() if p is not None)
    buffers = tuple((m._buffers, n) for m in modules for n, b in m._buffers.items() if b is not None)
    hooks = tuple(getattr(m, h) for m in modules for h in HOOKS)
    settings = tuple((m.__dict__, k) for m in modules for k, v in m.__dict__.items() if _plain(v))
    checkpointing = tuple(m.__dict__ for m in modules if "grad_checkpointing" in m.__dict__)
    return _Layout(generation(), params, buffers, hooks, settings, checkpointing)


def _key(layout: _Layout, x: torch.Tensor, params: list, buffers: list) -> tuple:
    """Everything a capture depends on that a later call could change (see the module's docstring)."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad,
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled(),
            tuple([(p.data_ptr(), p.dtype, p.requires_grad) for p in params]),
            tuple([(b.data_ptr(), b.dtype) for b in buffers]),
            tuple([d.get(k) for d, k in layout.settings]))


def _autocast_without_cache():
    """The caller's CUDA autocast, without its weight-cast cache (a cache entry outlives no graph)."""
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)


@contextlib.contextmanager
def _as_before(buffers: list, device: torch.device):
    """On exit, the model's buffers (batch-norm statistics) and the CUDA random state as on entry: warm-up and
    capture leave no trace, the first replay is the call's only pass."""
    kept = [b.clone() for b in buffers]
    rng = torch.cuda.get_rng_state(device)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, k in zip(buffers, kept):
                b.copy_(k)
        torch.cuda.set_rng_state(rng, device)


@contextlib.contextmanager
def _aliased(slots: tuple, params: list):
    """Inside, each parameter slot (``(module._parameters, name)``) holds a new leaf on the same storage (a
    parameter tied to several slots, one leaf), yielded in ``params``' order: a capture differentiates those, so
    that no gradient accumulator of the model's own parameters is in its graph. Such an accumulator lives as long as
    anything holds it (DDP's hooks, an earlier step's graph kept alive) and runs on the stream it was made on, which
    a capture on another stream may not reach. The replay's backward hands the gradients to the parameters
    themselves (their hooks, DDP's included, fire then)."""
    made: dict[int, nn.Parameter] = {}
    aliases = [made.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=p.requires_grad)) for p in params]
    try:
        for (d, n), a in zip(slots, aliases):
            d[n] = a
        yield aliases
    finally:
        for (d, n), p in zip(slots, params):
            d[n] = p


def _warm_up(step: Callable[[], None], device: torch.device) -> None:
    """``step()`` :data:`WARMUP` times on a side stream (kernels compiled, cuBLAS and cuDNN state made). An error
    there is the eager path's own: it propagates."""
    with side_stream(device):
        for _ in range(WARMUP):
            step()


@contextlib.contextmanager
def _capturing():
    """An error inside (an op that needs the host, out of memory: not capturable) as :class:`_CaptureFailed`."""
    try:
        yield
    except Exception as e:
        raise _CaptureFailed(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def _capture(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list, buffers: list
             ) -> Optional[_Graphs]:
    """Warm ``fn`` up on ``x`` and capture its forward and its backward (the backward outside autocast, as
    ``loss.backward()`` usually runs); None where its output needs no gradient (the parameters that train are
    outside it: a linear probe's head)."""
    static_in = x.detach().clone().requires_grad_(x.requires_grad)
    differentiable = []

    def step():
        with _autocast_without_cache():
            out = fn(static_in)
        differentiable.append(out.requires_grad)
        if out.requires_grad:
            with torch.autocast("cuda", enabled=False):
                _gradients(out, static_in, params, torch.zeros_like(out))

    with _as_before(buffers, x.device):
        _warm_up(step, x.device)
        if not differentiable[-1]:
            return None
        with _capturing():
            fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with _autocast_without_cache(), torch.cuda.graph(fwd, capture_error_mode="thread_local"):
                out = fn(static_in)
            static_dout = torch.zeros_like(out)
            with torch.autocast("cuda", enabled=False), \
                    torch.cuda.graph(bwd, pool=fwd.pool(), capture_error_mode="thread_local"):
                grads = _gradients(out, static_in, params, static_dout)
    return _Graphs(fn, fwd, bwd, static_in, out.detach(), static_dout, grads, tuple(params), tuple(buffers))


def _capture_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list,
                     buffers: list) -> _Graphs:
    """Warm ``fn`` up on ``x`` and capture its forward, which nothing differentiates (inference; or grad mode with
    every parameter frozen and ``x`` needing no gradient), the weights cast inside the graph
    (:func:`vigla.layers.cast.casts_in_graph`): a replay reads the parameters as they are then."""
    static_in = x.clone()

    def step():
        with _autocast_without_cache(), casts_in_graph():
            fn(static_in)

    with _as_before(buffers, x.device):
        _warm_up(step, x.device)
        with _capturing():
            fwd = torch.cuda.CUDAGraph()
            with _autocast_without_cache(), casts_in_graph(), \
                    torch.cuda.graph(fwd, capture_error_mode="thread_local"):
                out = fn(static_in)
    return _Graphs(fn, fwd, None, static_in, out, None, (), tuple(params), tuple(buffers))


def _stop(model: nn.Module, state: _State, why: str) -> None:
    state.off, state.graphs = why, OrderedDict()
    warnings.warn(f"{type(model).__name__}: CUDA-graph replay of forward_features is off for this model ({why}); it "
                  f"runs eagerly (model.set_cuda_graphs(False) says so without this warning)", stacklevel=5)


def _within_limit(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``x`` (``[B, C, H, W]``) has at most the model's ``max_pixels`` (``B * H * W``; None: no limit)."""
    limit = model.__dict__.get("cuda_graph_max_pixels", MAX_PIXELS)
    return limit is None or (x.ndim == 4 and x.shape[0] * x.shape[2] * x.shape[3] <= limit)


def _eligible(model: nn.Module, x) -> bool:
    """The conditions of the module's docstring that need no layout: a plain CUDA tensor on the current device (a
    graph is captured and replayed on the current device's streams) of at most the model's ``max_pixels``, the fused
    kernels (not :func:`vigla.ops.reference_ops`), nothing tracing, watching or capturing; eager training in train
    mode, or eager inference; the replay on, and the model no ``DataParallel`` replica."""
    if not (type(x) is torch.Tensor and x.is_cuda and use_kernels(x) and model.__dict__.get("cuda_graphs", True)
            and _within_limit(model, x) and not model.__dict__.get("_is_replica")
            and x.get_device() == current_device() and issued_eagerly()):
        return False
    return model.training and eager_training(x) if torch.is_grad_enabled() else eager_inference(x)


def replay_features(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x) -> Optional[torch.Tensor]:
    """``fn(x)`` (the model's eager ``forward_features``, ``x`` ``[B, C, H, W]``) replayed from CUDA graphs where the
    module's docstring says it may be, capturing it first for a new layout; None where it may not (the caller runs
    ``fn`` itself)."""
    if not _eligible(model, x):
        return None
    found = _graphs_for(model, fn, x)
    if found is None:
        return None
    state, graphs, params = found
    with graphs.lock:
        if graphs.bwd is None:  # nothing to differentiate
            state.replays += 1
            return graphs.forward(x)
        if graphs.busy():
            return None
        state.replays += 1
        return _Replay.apply(graphs, x, *params)


def _graphs_for(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
                ) -> Optional[tuple[_State, _Graphs, list]]:
    """``(the model's state, the graphs of x's layout, the parameters)``, captured first if new; None where the
    model runs eagerly (replay off, a hook, checkpointing, a failed or one capture too many)."""
    state = _STATES.get(model)
    if state is None:
        state = _STATES.setdefault(model, _State())
    with state.lock:
        if state.off is not None:
            return None
        if state.layout is None or state.layout.generation != generation():
            state.layout = _layout(model)
        layout = state.layout
        if any(GLOBAL_HOOKS) or any(layout.hooks) or any(d.get("grad_checkpointing") for d in layout.checkpointing):
            return None
        params = [d[n] for d, n in layout.params]
        buffers = [d[n] for d, n in layout.buffers]
        key = _key(layout, x, params, buffers)
        graphs = state.graphs.get(key)
        if graphs is None:
            graphs = _new_graphs(model, state, key, fn, x, params, buffers)
            if graphs is None:
                return None
        else:
            state.graphs.move_to_end(key)
        return state, graphs, params


def _new_graphs(model: nn.Module, state: _State, key: tuple, fn: Callable[[torch.Tensor], torch.Tensor],
                x: torch.Tensor, params: list, buffers: list) -> Optional[_Graphs]:
    """Capture ``fn`` for ``key``'s layout and keep it, dropping the oldest layout of its kind beyond :data:`KEEP`
    (a pending backward holds its graphs itself); None, the replay then off for the model, after
    :data:`MAX_CAPTURES` captures or a failed one."""
    if state.captures >= MAX_CAPTURES:
        _stop(model, state, f"{MAX_CAPTURES} captures: its input shapes or parameters keep changing")
        return None
    differentiates = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    try:
        with _aliased(state.layout.params, params) as aliases:
            graphs = _capture(fn, x, aliases, buffers) if differentiates else None
            graphs = graphs or _capture_forward(fn, x, aliases, buffers)
        graphs.params = tuple(params)  # the replay node differentiates the model's own parameters, not the aliases
    except _CaptureFailed as e:
        _stop(model, state, f"the capture failed: {e}")
        return None
    state.captures += 1
    state.graphs[key] = graphs
    kind = [k for k, g in state.graphs.items() if (g.bwd is None) == (graphs.bwd is None)]
    for k in kind[:-KEEP]:
        del state.graphs[k]
    return graphs


def replay_stats(model: nn.Module) -> dict:
    """``{"captures": ..., "replays": ..., "off": reason or None}`` of ``model``'s graphs (what the tests and
    benchmarks read)."""
    state = _STATES.get(model)
    if state is None:
        return {"captures": 0, "replays": 0, "off": None}
    return {"captures": state.captures, "replays": state.replays, "off": state.off}


class GraphReplayMixin:
    """``set_cuda_graphs``: eager CUDA calls replay ``forward_features`` from CUDA graphs
    (:mod:`vigla.models._graph_replay`); on by default."""

    cuda_graphs = True
    cuda_graph_max_pixels = MAX_PIXELS  # or None: set_cuda_graphs

    @torch.jit.ignore
    def set_cuda_graphs(self, enable: bool = True, max_pixels: Optional[int] = MAX_PIXELS) -> None:
        """Replay ``forward_features`` (and in training its backward) from CUDA graphs in eager CUDA calls of at most
        ``max_pixels`` input pixels (batch x height x width; None: any size), the default; or not (``enable``
        False): that frees the graphs' memory and issues every kernel from the host, as plain eager PyTorch does.
        Either way the graphs captured so far are dropped."""
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                       or max_pixels < 1):
            raise ValueError(f"set_cuda_graphs: max_pixels must be a positive int or None, got {max_pixels!r}")
        self.cuda_graphs = bool(enable)
        self.cuda_graph_max_pixels = max_pixels
        _STATES.pop(self, None)

    def _apply(self, fn, *args, **kwargs):
        """``nn.Module._apply`` (``.to``, ``.cuda``, ``.half``, ...), the graphs dropped first: they hold the
        parameters they read, which a move replaces."""
        _STATES.pop(self, None)
        return super()._apply(fn, *args, **kwargs)

    @torch.jit.unused
    def _features_replayed(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features(x)``: from its CUDA graphs where :func:`replay_features` may, else ``_forward_features``
        (the model's eager body)."""
        replayed = replay_features(self, self._forward_features, x)
        return self._forward_features(x) if replayed is None else replayed
