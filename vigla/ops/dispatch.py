"""Which implementation an op's ``backend="auto"`` takes.

Every fused op has a plain PyTorch reference beside its Triton kernels. ``auto`` takes the kernels
for CUDA tensors when Triton is installed and the reference everywhere else; inside
``reference_ops()`` it takes the reference on every device (to check a model's fused paths
against the plain maths, or to debug).
"""
from __future__ import annotations

import contextlib

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # optional: every op has a PyTorch path
    HAS_TRITON = False
_FORCE_REFERENCE = False


@contextlib.contextmanager
def reference_ops():
    """Within this block every ``backend="auto"`` op runs its PyTorch reference."""
    global _FORCE_REFERENCE
    previous, _FORCE_REFERENCE = _FORCE_REFERENCE, True
    try:
        yield
    finally:
        _FORCE_REFERENCE = previous


def use_kernels(t: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` runs the Triton kernels for an input like ``t``."""
    return HAS_TRITON and t.is_cuda and not _FORCE_REFERENCE


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype products with ``t`` run in: autocast's for ``t``'s device when it is on, else ``t``'s."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def resolve(backend: str, t: torch.Tensor, op: str) -> str:
    """``"auto"`` -> ``"triton"`` or ``"reference"``; checks an explicit choice."""
    if backend == "auto":
        return "triton" if use_kernels(t) else "reference"
    if backend == "triton" and not (HAS_TRITON and t.is_cuda):
        raise RuntimeError(f"{op}: backend 'triton' needs CUDA tensors and Triton (got device "
                           f"{t.device}, Triton {'found' if HAS_TRITON else 'not installed'})")
    if backend not in ("triton", "reference"):
        raise ValueError(f"{op}: unknown backend {backend!r}; use 'auto', 'triton' or 'reference'")
    return backend


def eager_function(name: str, forward, backward, num_tensors: int) -> type[torch.autograd.Function]:
    """A plain ``autograd.Function`` around fused kernels, for eager mode (a custom op costs tens
    of microseconds more per call; ``torch.compile`` traces the custom op instead).

    ``forward(*args)`` computes the output; the first ``num_tensors`` args are saved, the rest are
    non-tensor constants; ``backward(dy, *saved, *constants)`` returns the saved tensors' gradients
    (one tensor or a tuple), the constants get ``None``.
    """
    def fwd(ctx, *args):
        ctx.save_for_backward(*args[:num_tensors])
        ctx.constants = args[num_tensors:]
        return forward(*args)

    def bwd(ctx, dy):
        grads = backward(dy, *ctx.saved_tensors, *ctx.constants)
        grads = grads if isinstance(grads, tuple) else (grads,)
        return (*grads, *(None,) * len(ctx.constants))

    doc = f"``{forward.__name__}`` / ``{backward.__name__}`` as an eager ``autograd.Function``."
    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(fwd), "backward": staticmethod(bwd), "__doc__": doc})


def register_cuda(name: str, fwd_op, bwd_op, forward, backward,
                  num_tensors: int) -> type[torch.autograd.Function]:
    """Make ``forward`` / ``backward`` (the fused kernels' launchers) the CUDA implementations of
    the custom ops ``fwd_op`` / ``bwd_op``, and return them as the eager ``autograd.Function``
    :func:`eager_function` builds (same arguments)."""
    fwd_op.register_kernel("cuda")(forward)
    bwd_op.register_kernel("cuda")(backward)
    return eager_function(name, forward, backward, num_tensors)
