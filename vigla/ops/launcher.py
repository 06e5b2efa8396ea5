"""How the eager path launches a Triton kernel: the compiled kernel cached per argument signature.

``kernel[grid](*args, **meta)`` through Triton's ``JITFunction.run`` binds and specialises every
argument, hashes the specialisation and checks the kernel's globals on each call: about 25 us of
host time per launch, more than a small kernel takes on the GPU, and at 224² an eager ViG
forward issues ~80 of them. :func:`direct` keeps, per kernel, the ``CompiledKernel`` that Triton
returned for each signature and launches it directly after that (Triton's own
``CompiledKernel[grid](*args)`` call, with the constexprs in the signature's order), each tensor passed
by its address: Triton's launcher would otherwise call the tensor's ``data_ptr`` and ask the driver
whether the address is device memory (``cuPointerGetAttribute``), for every tensor of every launch.

The signature is what Triton specialises on: per tensor its dtype and whether its address is
16-byte aligned, per host-side TMA descriptor its dtype and block, every other argument by value
(ints: divisibility by 16, equality to 1 and the i32 / i64 choice all follow from the value), the
constexprs and launch options, the device (a compiled kernel is loaded per device) and Triton's debug
and instrumentation switches. A new signature, a callable grid, a launch hook (a profiler such as
proton), Triton's interpreter or a Triton without ``knobs`` take Triton's own path.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any, Callable, NamedTuple

import torch

__all__ = ["direct", "cdiv", "next_power_of_2", "planned", "unit_stride", "handoff_dtype", "rows", "multiprocessors",
           "persistent_programs", "FastKernel", "Compiled"]

MAX_SIGNATURES = 1024  # per kernel: beyond it the cache starts again (shapes that never repeat)

try:
    import triton
    from triton.runtime.jit import JITFunction

    try:
        from triton import knobs as _knobs  # Triton >= 3.4: where the launch hooks live
    except ImportError:  # pragma: no cover - older Triton: no fast path
        _knobs = None
    _driver = triton.runtime.driver
except ImportError:  # the package works without Triton; nothing is launched then
    JITFunction = None
    _knobs = None

try:  # what torch.cuda.current_device() returns, without its lazy-init check (tensors are on the device by then)
    from torch._C import _cuda_getDevice as _torch_device
except ImportError:  # a CPU-only build of PyTorch: Triton's own query
    _torch_device = None


def cdiv(a, b):
    """``ceil(a / b)`` for launch grids: ``triton.cdiv`` is a constexpr function in Triton >= 3.4, whose
    call from Python costs microseconds of argument unwrapping. Works on ``SymInt`` sizes too."""
    return (a + b - 1) // b


def planned(plan: Callable, *args):
    """``plan(*args)`` for a launch plan cached with ``functools.lru_cache``: through the cache, or where an
    argument cannot be hashed (a symbolic size: ``torch.compile`` tracing with dynamic shapes, e.g. a compiled
    model called at a second image size) the uncached function. Nothing is checked on the cached path."""
    try:
        return plan(*args)
    except TypeError:  # "unhashable type: non-nested SymInt" (an error of the plan itself is raised again below)
        return plan.__wrapped__(*args)


def next_power_of_2(n: int) -> int:
    """The least power of two ``>= n`` (``n >= 1``), without ``triton.next_power_of_2``'s call cost."""
    return 1 << (n - 1).bit_length()


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride in its last dimension, as the kernels (Triton and CPU) read it (a view when it
    already has it)."""
    return t if t.stride(-1) == 1 else t.contiguous()


_MULTIPROCESSORS: dict[int, int] = {}


def multiprocessors(index: int) -> int:
    """The multiprocessor count of CUDA device ``index``, asked once per device. A plain dict, not
    ``functools.lru_cache``: the inference path's op choices read it while ``torch.compile`` traces them, and Dynamo
    warns at each cached function it traces through."""
    if torch.compiler.is_compiling():  # a constant of the graph, no guard on the dict (which the trace would fill)
        return _ask_multiprocessors(index)
    n = _MULTIPROCESSORS.get(index)
    if n is None:
        n = _MULTIPROCESSORS[index] = _ask_multiprocessors(index)
    return n


@torch.compiler.assume_constant_result  # Dynamo calls it and keeps the answer as a constant of the graph
def _ask_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(t: torch.Tensor) -> int:
    """Programs of a kernel that loops over its tiles and leaves one partial sum per program (the backward kernels'
    weight gradients): four per multiprocessor of ``t``'s CUDA device, four under Triton's CPU interpreter."""
    return 4 * multiprocessors(t.device.index) if t.is_cuda else 4


def handoff_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of an intermediate one kernel writes for the next to read: bf16 for bf16 inputs (half the bytes of
    fp32, with fp32's range), fp32 otherwise (fp16's range could overflow)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` -> ``[R, C]`` with unit stride within a row (a view when it can be)."""
    return unit_stride(t.reshape(-1, t.shape[-1]))


def _installed(hook) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooked() -> bool:
    """Whether a launch hook is installed (Triton keeps them in a ``HookChain``, empty by default)."""
    runtime = _knobs.runtime
    return _installed(runtime.launch_enter_hook) or _installed(runtime.launch_exit_hook)


def _other_key(a) -> tuple:
    """Key of an argument that is neither a tensor nor an int: a host-side TMA descriptor by its dtype and
    block (what Triton specialises it on; base, shape and strides are passed at each launch), a scalar
    with its type (``True == 1 == 1.0`` in Python, not to Triton)."""
    if a.__class__.__name__ == "TensorDescriptor":
        return a.__class__, a.base.dtype, tuple(a.block_shape), getattr(a, "padding", None)
    return a.__class__, a


_VALUES = frozenset((int, float, bool, type(None)))  # arguments keyed by value (with their type: True == 1)
_data_ptr = torch.Tensor.data_ptr
_dtype = operator.attrgetter("dtype")
_misalignment = (15).__and__  # an address's offset from 16 bytes (Triton specialises on it being 0)
_LAYOUTS: dict[tuple, Any] = {}  # argument types -> (tensor getter, value getter, index), or None
_GRID_PAD = {1: (1, 1), 2: (1,), 3: ()}  # a launch grid's missing dimensions
_INDEX = itertools.count()  # each layout's own number, never reused (keys made before a clear stay apart)


def _getter(positions: list) -> Callable:
    """The items at ``positions`` (indices of a tuple, keys of a dict) as a tuple, in C (``operator.itemgetter``)."""
    if len(positions) == 1:
        return lambda args, i=positions[0]: (args[i],)
    return operator.itemgetter(*positions) if positions else (lambda args: ())


def _layout(types: tuple):
    """How to key arguments of these ``types``: ``(tensors, values, index, merge)`` (getters of the tensors and the
    plain values, the layout's number, and the getter that puts the tensors' addresses followed by the values back in
    the arguments' order), or None where one is neither a tensor nor a plain value (e.g. a TMA descriptor:
    :func:`_other_key`)."""
    layout = _LAYOUTS.get(types, _LAYOUTS)
    if layout is _LAYOUTS:
        if len(_LAYOUTS) >= MAX_SIGNATURES:
            _LAYOUTS.clear()
        tensors = [i for i, t in enumerate(types) if issubclass(t, torch.Tensor)]
        values = [i for i, t in enumerate(types) if t in _VALUES]
        plain = len(tensors) + len(values) == len(types)
        order = {i: j for j, i in enumerate(tensors + values)}  # argument position -> index in addresses + values
        layout = _LAYOUTS[types] = ((_getter(tensors), _getter(values), next(_INDEX),
                                     _getter([order[i] for i in range(len(types))])) if plain else None)
    return layout


def _signature(args: tuple, meta: dict) -> tuple[tuple, tuple]:
    """``(key, launch_args)``. The key: what Triton specialises on (see the module docstring), the arguments' types,
    each plain value, each tensor's dtype and offset from 16-byte alignment, the keywords with their values' types;
    mostly in C, the positions of the tensors and values found once per tuple of argument types (:func:`_layout`).
    ``launch_args``: ``args`` with each tensor replaced by its address, as a replayed launch passes them (the module
    docstring), or ``args`` itself for a layout of other types."""
    types = tuple(map(type, args))
    layout = _layout(types)
    if layout is None:
        return (types, tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor) else _other_key(a)
                              for a in args]), *meta.items(), *map(type, meta.values())), args
    tensors = layout[0](args)
    values = layout[1](args)
    addresses = tuple(map(_data_ptr, tensors))
    key = (layout[2], values, *map(_dtype, tensors), *map(_misalignment, addresses), *meta.items(),
           *map(type, meta.values()))
    return key, layout[3](addresses + values)


def _device_of(active) -> int:
    """The current CUDA device, as Triton's ``active`` driver would say (PyTorch's own call when the driver defers
    to it)."""
    if _torch_device is not None and active.get_current_device is torch.cuda.current_device:
        return _torch_device()
    return active.get_current_device()


class Compiled(NamedTuple):
    """A signature's compiled kernel as :class:`FastKernel` replays it: Triton's launcher ``run``, the loaded
    ``function`` and its packed metadata, the getter of the constexprs from a launch's keywords (in the kernel's
    parameter order), and the ``CompiledKernel`` itself (its registers, spills and metadata)."""
    run: Callable
    function: Any
    metadata: Any
    constexprs: Callable
    kernel: Any


class FastKernel:
    """A Triton ``JITFunction`` launched as ``FastKernel(fn)[grid](*args, **meta)``, like the
    function itself, with the compiled kernel of each signature reused (module docstring)."""

    __slots__ = ("fn", "compiled", "names")

    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict[tuple, Compiled] = {}
        self.names = tuple(fn.arg_names)

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid: tuple, args: tuple, meta: dict) -> None:
        if callable(grid) or _hooked():
            self.fn[grid](*args, **meta)
            return
        active = _driver.active
        device = _device_of(active)
        signature, launch_args = _signature(args, meta)
        # Triton's debug and instrumentation switches select other compilations, as in its own cache key
        key = (device, _knobs.runtime.debug, _knobs.compilation.instrumentation_mode, signature)
        hit = self.compiled.get(key)
        if hit is None:
            self._first(key, grid, args, meta)
            return
        run, function, metadata, constexprs, _ = hit
        run(*grid, *_GRID_PAD[len(grid)], active.get_current_stream(device), function, metadata, None, None, None,
            *launch_args, *constexprs(meta))

    def _first(self, key: tuple, grid: tuple, args: tuple, meta: dict) -> None:
        """Triton's own launch; its compiled kernel is kept (:class:`Compiled`) when the call can be replayed
        directly (every parameter after the positional ones given by keyword)."""
        kernel = self.fn[grid](*args, **meta)
        rest = self.names[len(args):]
        if kernel is None or not hasattr(kernel, "packed_metadata") or any(n not in meta for n in rest):
            return
        if len(self.compiled) >= MAX_SIGNATURES:
            self.compiled.clear()
        self.compiled[key] = Compiled(kernel.run, kernel.function, kernel.packed_metadata, _getter(list(rest)), kernel)


_FAST: dict[int, FastKernel] = {}  # by id: hashing a JITFunction hashes its source's cache key


def direct(kernel):
    """How the eager Functions launch a Triton kernel: ``direct(kernel)[grid](*args, **meta)``,
    through :class:`FastKernel` (Triton's own path under its interpreter or an older Triton)."""
    fast = _FAST.get(id(kernel))
    if fast is None:
        if _knobs is None or JITFunction is None or not isinstance(kernel, JITFunction):
            return kernel
        fast = _FAST[id(kernel)] = FastKernel(kernel)  # kernels are module globals: never freed
    return fast
