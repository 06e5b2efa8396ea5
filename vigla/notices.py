"""vigla's warnings: a run goes on, with something its user should know (and can act on). They are Python warnings
of a :class:`ViglaWarning` category, so a library user filters them as any other; the ``vigla`` commands print each
as one ``warning: ...`` line (:func:`vigla.engine.errors.warning_lines`), without Python's file, line and source
line."""
import os
import sys

#: the packages between a user's call of a model and the layer that warns: vigla's, torch's (``Module.__call__``,
#: ``Sequential``, checkpointing, DDP) and timm's (its blocks, ``checkpoint_seq``)
_LIBRARIES = ("vigla", "torch", "timm")


class ViglaWarning(UserWarning):
    """A warning of vigla's (the base of its categories); the commands print it as one ``warning:`` line, under
    ``torchrun`` on rank 0 only (every rank meets the same data and the same model)."""

    #: under ``torchrun``, printed by each machine's first process (its local rank 0), not by rank 0 only: what it
    #: says depends on the machine
    per_machine = False


class KernelWarning(ViglaWarning):
    """A compiled CPU kernel that cannot be used (no C compiler, a failed build): the op runs its PyTorch path."""

    per_machine = True


def caller_stacklevel() -> int:
    """The ``stacklevel`` at which ``warnings.warn``, called in the caller of this function, names the first frame
    outside vigla, torch and timm (:data:`_LIBRARIES`): the user's line that called the model. A layer's ``forward``
    runs several calls of torch's ``Module.__call__`` and timm's blocks below that line, where a fixed stacklevel
    named torch's internals. The outermost frame when every frame is inside them."""
    dirs = tuple(os.path.dirname(module.__file__) + os.sep for name in _LIBRARIES
                 if getattr(module := sys.modules.get(name), "__file__", None))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(dirs):
        frame, level = frame.f_back, level + 1
    return level
