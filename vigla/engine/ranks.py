"""Which process of a ``torchrun`` job this is, and which process tells the user what all of them met.

The rank is read from the environment that torchrun sets (0 without torchrun): it is known from the start, before
:func:`vigla.engine.distributed.setup` joins the process group, and this module imports nothing heavy, so that even
Ctrl-C while ``import vigla`` loads torch (:func:`vigla.cli.interrupted_while_importing`) can ask it. Every
decision about the rank goes through :func:`env_rank`."""
from __future__ import annotations

import os
import sys


def env_rank(local: bool = False) -> int:
    """This process's rank (``local``: its rank on this machine) as torchrun sets it in the environment, 0 without
    torchrun."""
    return int(os.environ.get("LOCAL_RANK" if local else "RANK", "0"))


def rank_note() -> str:
    """``" (rank k)"`` in a process of a torchrun job other than rank 0, else "": what a message about this process
    alone (an error it met, a file of its shard) says after ``error`` or ``warning``."""
    rank = env_rank()
    return f" (rank {rank})" if rank else ""


def tell_once(text: str) -> None:
    """Print ``text`` on stderr in rank 0 only (in the one process without torchrun): a message about the whole run
    that every process of a torchrun job meets at once (torchrun passes Ctrl-C to each), which N processes printed N
    times."""
    if env_rank() == 0:
        print(text, file=sys.stderr, flush=True)
