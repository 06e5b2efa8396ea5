"""Where every fused op chooses between its Triton kernels and its PyTorch reference.

Each op (``bigla``, ``locality_mix``, ``swiglu``, ``add_norm``, ``dwconv``, ``conv_norm``) is built the same
way:

* a public function: checks its inputs, then calls the op;
* a reference in plain PyTorch (any device; ``reference.py`` or ``chunked.py``);
* Triton kernels and their launchers (``triton_kernels.py``);
* one ``torch.autograd.Function``: the eager path (it calls the launchers directly, which costs
  less per call than going through the dispatcher; its backward records a graph, for a second derivative,
  through the reference: :func:`recorded_backward`; with nothing to record, as in inference, the
  op calls the Function's forward implementation without ``apply``: :func:`run_eager`); kernels
  are launched through :func:`vigla.ops.launcher.direct` (compiled kernels reused per signature);
* that forward implementation (``*_forward`` in ``op.py``) is also what a model's layers call in eager
  inference, once per block a check says nothing records or traces (:func:`eager_inference`): the
  public function's checks hold by construction inside a model, and each skipped frame is host time
  an eager forward at 224² waits on; with the backward implementation (``*_backward``) it is also what
  a layer's own Function calls in eager training (:func:`eager_training`: one autograd node for a chain
  of ops, as ``BiGLAMixer``'s);
* one custom op (``torch.library.triton_op`` when Triton is installed): what ``torch.compile``
  traces (Inductor then launches the kernels from its own code) and what a dispatch mode sees
  (the FLOP counter, selective activation checkpointing). Inductor learns what a launched kernel writes
  from its TTIR, tracing each store's address back through a ``@triton.jit`` helper's call to all of that
  call's arguments: a helper that returns offsets the kernel stores through takes no tensor pointers, and
  a kernel rebinds no scalar argument inside a runtime branch (older PyTorch lowers scalars as constexprs),
  else Inductor takes its inputs for written (``tests/test_inductor_access.py`` checks every launch).

The implementation behind both the Function and the custom op is chosen here: the kernels for
CUDA tensors when Triton is installed, compiled CPU kernels for CPU tensors where an op has them
(BiGLA, the locality mix, SwiGLU, add + norm, the depthwise conv: ``cpu_kernels.c`` beside the op,
built by :mod:`vigla.ops.cpu_build`; float32 work, while float64 keeps the reference), the reference
otherwise, and the reference on every device inside :func:`reference_ops` (to check a model's fused
paths against the plain maths).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
import torch.autograd.forward_ad as forward_ad

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # optional: every op has a PyTorch path
    HAS_TRITON = False

from .launcher import direct
from .tracing import exporting

__all__ = ["HAS_TRITON", "reference_ops", "use_kernels", "use_cpu_kernels", "via_dispatcher", "issued_eagerly",
           "eager_inference", "eager_training", "run_eager", "recorded_backward", "records", "fused_op", "cpu_op",
           "CpuOp", "wrap", "direct", "compute_dtype"]

_FORCE_REFERENCE = False


@contextlib.contextmanager
def reference_ops():
    """Within this block every fused op runs its PyTorch reference, on every device."""
    global _FORCE_REFERENCE
    previous, _FORCE_REFERENCE = _FORCE_REFERENCE, True
    try:
        yield
    finally:
        _FORCE_REFERENCE = previous


def use_kernels(t: torch.Tensor) -> bool:
    """Whether an op runs its Triton kernels for an input like ``t``."""
    return HAS_TRITON and t.is_cuda and not _FORCE_REFERENCE


def use_cpu_kernels(t: torch.Tensor) -> bool:
    """Whether an op with compiled CPU kernels runs them for an input like ``t`` (a CPU tensor, outside
    :func:`reference_ops`); the op also checks that its kernels built."""
    return t.device.type == "cpu" and not _FORCE_REFERENCE


def via_dispatcher() -> bool:
    """Whether an op must go through its custom op rather than its eager Function: while
    ``torch.compile`` or ``torch.export`` traces, or a dispatch mode is active (e.g.
    ``FlopCounterMode``, selective activation checkpointing), which must see the op."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def issued_eagerly() -> bool:
    """Whether the kernels of this call are launched by the host as it runs: not traced by ``torch.compile`` (whose
    generated code launches them with little host time) nor captured into a CUDA graph. Where a kernel choice weighs
    the host's launch time (:func:`vigla.ops.add_norm.op.mlp_fused`), through this: the capture query alone is a
    graph break under Dynamo, so the tracing check comes first."""
    return not torch.compiler.is_compiling() and not (torch.cuda.is_initialized()
                                                      and torch.cuda.is_current_stream_capturing())


@torch.jit.unused
def eager_inference(x):  # unannotated: TorchScript reads the signature of this stub
    """Whether a layer may call its ops' forward implementations (``*_forward`` in each op's ``op.py``)
    directly for an input like ``x``: eager inference (grad mode off, no forward-mode AD), nothing tracing
    or watching the ops (``torch.compile``, ``torch.export``, ``torch.jit.trace``, a dispatch mode), a real
    tensor. Inside a model the ops' input checks hold by construction, so a block then costs its launches
    and little Python: the layers check this once per block, not each op once per call."""
    return (not torch.is_grad_enabled() and forward_ad._current_level < 0 and isinstance(x, torch.Tensor)
            and not via_dispatcher() and not exporting())


def eager_training(*tensors) -> bool:
    """Whether a layer may record a chain of ops as one ``torch.autograd.Function`` of its own, which calls the ops'
    forward and backward implementations (``*_forward``, ``*_backward`` in each op's ``op.py``) directly, for inputs
    ``tensors``: grad mode on, no forward-mode AD, nothing tracing, watching or transforming the ops
    (``torch.compile``, ``torch.export``, ``torch.jit.trace``, a dispatch mode such as selective checkpointing's,
    functorch), the ops not held to their references (:func:`reference_ops`) and every tensor a plain one. Each op's
    own Function, and each PyTorch op between them, would add an autograd node's host time: at 224² an eager training
    step of ViG-T waits on its host."""
    return (torch.is_grad_enabled() and not _FORCE_REFERENCE and _PLAIN.issuperset(map(type, tensors))
            and not _transformed())


def _transformed() -> bool:
    """Whether something records or transforms the ops' calls, which must then see each op as its custom op (or
    its own Function): ``torch.compile``, ``torch.export``, ``torch.jit.trace``, a dispatch mode, functorch's
    transforms, forward-mode AD."""
    return (via_dispatcher() or exporting() or torch._C._are_functorch_transforms_active()
            or forward_ad._current_level >= 0)


def fused_op(name: str, fake: Callable) -> Callable:
    """Decorator: the custom op ``name`` (``"vigla::..."``) implemented by the decorated function.

    With Triton, a ``torch.library.triton_op``: the function launches its kernels through
    :func:`wrap`, so that ``torch.compile`` sees them. Without Triton, a plain custom op. Either
    way ``fake`` gives the output shapes without computing.
    """
    def decorate(fn: Callable):
        if HAS_TRITON:
            op = torch.library.triton_op(name, fn, mutates_args=())
        else:
            op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        if name.endswith("_bwd"):  # a backward: differentiated again only by a second derivative
            op.register_autograd(_refuse_second_derivative(name), setup_context=lambda ctx, inputs, output: None)
        return op
    return decorate


# argument types a CPU kernel's entry passes to its implementation (tensors a kernel may read through their data
# pointers, scalars); any other (a tensor subclass) sends the call through the custom op
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter, float, int, bool, str, type(None)))


class CpuOp:
    """A compiled CPU kernel's entry (:func:`cpu_op`): called like the function it wraps. Where something records
    or transforms the call (``torch.compile``, ``torch.export``, ``torch.jit.trace``, a dispatch mode such as
    ``FlopCounterMode`` or fake tensors, functorch's transforms, forward-mode AD) or an argument is a tensor subclass,
    it goes through its custom op ``op``, which they see as one opaque op; otherwise the implementation runs
    directly: the dispatcher's path to a Python custom op costs ~30 us a call, 1.5-2% of an eager ViG-T step on a
    2-core CPU."""

    def __init__(self, op, impl: Callable):
        self.op, self.impl = op, impl
        functools.update_wrapper(self, impl)

    def __call__(self, *args):
        if _transformed() or not _PLAIN.issuperset(map(type, args)):
            return self.op(*args)
        return self.impl(*args)

    def register_fake(self, fn: Callable) -> Callable:
        """The custom op's fake (shapes only), as ``CustomOpDef.register_fake``."""
        return self.op.register_fake(fn)


def cpu_op(name: str) -> Callable[[Callable], CpuOp]:
    """Decorator: the CPU kernel's custom op ``name`` (``"vigla::..."``, CPU tensors), as a :class:`CpuOp`."""
    def decorate(fn: Callable) -> CpuOp:
        return CpuOp(torch.library.custom_op(name, fn, mutates_args=(), device_types="cpu"), fn)
    return decorate


def _refuse_second_derivative(name: str) -> Callable:
    """The autograd formula of the backward op ``name``: a second derivative through it (the custom ops' path:
    gradient checkpointing, ``torch.compile``) fails with one line naming the op and the ways that have one
    (the eager Functions record their backward through the reference: :func:`recorded_backward`)."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{name}: no second derivative through vigla's custom ops (the path gradient "
                           f"checkpointing and torch.compile take); for a gradient penalty or another double backward, "
                           f"run the model eagerly with checkpointing off (model.set_grad_checkpointing(False)) or "
                           f"under vigla.ops.reference_ops()")
    return backward


def recorded_backward(backward: Callable) -> Callable:
    """Decorator for an op's ``Function.backward``: where autograd records the backward itself (``create_graph``:
    a second derivative, a gradient penalty), the op's reference backward runs, whose PyTorch ops autograd follows;
    the kernels' gradients carry no graph (the Triton launchers' would pass as constants, the CPU kernels' fail in
    the second backward). Otherwise the backward as written: kernels where the op has them. ``ctx``, ``grads``: as
    ``backward`` takes them; returns what it returns."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with reference_ops():
            return backward(ctx, *grads)
    return run


def run_eager(function: type[torch.autograd.Function], forward: Callable, *args):
    """An op's eager call: ``function.apply(*args)`` when autograd records it (:func:`records` of the tensor
    arguments), else ``forward(*args)``, the Function's forward implementation without autograd."""
    if records(*[a for a in args if isinstance(a, torch.Tensor)]):
        return function.apply(*args)
    return forward(*args)


def records(*tensors) -> bool:
    """Whether autograd records a call on ``tensors``: grad mode on and one of them needs a gradient, or
    forward-mode AD active (its dual tensors need no gradient, and ``Function.apply`` is what refuses
    them). When it does not, an op calls its Function's forward directly: ``Function.apply`` would only
    add host time (inference)."""
    if forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


if HAS_TRITON:
    from torch.library import wrap_triton as wrap  # how the custom ops launch their kernels
else:
    wrap = direct


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype products with ``t`` run in: autocast's for ``t``'s device when it is on, else ``t``'s."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype
