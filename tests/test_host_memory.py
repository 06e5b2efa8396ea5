"""vigla.engine.host_memory: freed activations kept in the heap on glibc, and the commands that set it."""
import platform
import subprocess
import sys

import pytest

from vigla import cli
from vigla.engine import host_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# In a fresh process: the page faults of ten 40 MB activations allocated, written and freed in turn (above
# glibc's highest automatic mmap threshold, 32 MB: each gets a fresh mapping, zeroed page by page), with glibc's
# defaults, then after keep_freed_memory().
_FAULTS = """
import resource, torch
from vigla.engine.host_memory import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        t = torch.empty(10 << 20)
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
kept = keep_freed_memory()
faults()  # the first block of the new regime is mapped once
print(default, kept, faults())
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt: Linux with glibc only")
def test_freed_memory_is_reused_instead_of_mapped_again():
    """With glibc's defaults each 40 MB block is a fresh mapping (~10,000 page faults each); once
    keep_freed_memory() has set the thresholds, the same blocks are reused from the heap."""
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True).stdout.split()
    default, kept, after = int(out[0]), out[1] == "True", int(out[2])
    assert kept
    assert default > 10 * 9000, default  # 10 blocks of 10,240 pages each, every one faulted in
    assert after < default / 20, (default, after)


def test_off_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    assert host_memory.keep_freed_memory() is False


def test_the_commands_keep_freed_memory(monkeypatch, capsys):
    """Every vigla command sets it before it runs (a CPU training step faults its activations in otherwise)."""
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["info", "--filter", "vig_tiny"]) == 0
    assert calls == [1]
    assert "vig_tiny" in capsys.readouterr().out
