"""vigla's warnings: a run goes on, with something its user should know (and can act on). They are Python warnings
of a :class:`ViglaWarning` category, so a library user filters them as any other; the ``vigla`` commands print each
as one ``warning: ...`` line (:func:`vigla.engine.errors.warning_lines`), without Python's file, line and source
line."""


class ViglaWarning(UserWarning):
    """A warning of vigla's (the base of its categories); the commands print it as one ``warning:`` line, under
    ``torchrun`` on rank 0 only (every rank meets the same data and the same model)."""

    #: under ``torchrun``, printed by each machine's first process (its local rank 0), not by rank 0 only: what it
    #: says depends on the machine
    per_machine = False


class KernelWarning(ViglaWarning):
    """A compiled CPU kernel that cannot be used (no C compiler, a failed build): the op runs its PyTorch path."""

    per_machine = True
