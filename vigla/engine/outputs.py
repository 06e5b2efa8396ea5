"""What the commands write, and how: atomic files, one run per output folder, the commit that ran.

* :func:`atomic_write` writes a file whole or not at all: to ``<path>.tmp-<pid>`` in the same folder,
  flushed to disk, then renamed over ``path``. A full disk, a read-only folder or a missing parent
  becomes one :class:`OutputError` naming the file, the cause and the fix; the previous version of
  ``path`` is kept. :func:`remove_stale_temp_files` deletes what a process killed mid-write left.
* :class:`OutputLock` keeps a second process out of a folder a run is writing (``flock``: the kernel
  drops the lock when its process dies, even by ``kill -9``).
* :func:`git_info` is the commit the code runs at (``VIGLA_COMMIT`` names it when the tree has no
  usable ``.git``).
"""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import subprocess
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import OutputError

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "no permission to write there: choose a writable folder",
    errno.EPERM: "no permission to write there: choose a writable folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "that path is a folder: name a file",
    errno.ENOENT: "its folder does not exist",
}


def describe_os_error(err: OSError) -> str:
    """``"<strerror> (<ERRNO>): <what to do>"`` for the errors a write can meet."""
    name = errno.errorcode.get(err.errno, "") if err.errno else ""
    hint = _HINTS.get(err.errno)
    return f"{err.strerror or err}{f' ({name})' if name else ''}" + (f"; {hint}" if hint else "")


def _temp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


_TEMP_RE = re.compile(r"\.tmp-(\d+)$")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file beside ``path`` (a binary file object), flush it to disk, then rename
    it over ``path`` (same folder, so the rename is atomic). The temporary file is removed on any failure;
    an ``OSError`` becomes :class:`OutputError`."""
    path = os.fspath(path)
    tmp = _temp_name(path)
    f = None
    try:
        with open(tmp, "wb") as raw:
            f = _Recording(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except Exception as e:
        cause = e if isinstance(e, OSError) else getattr(f, "error", None)
        if cause is None:
            raise
        raise OutputError(f"cannot write {path}: {describe_os_error(cause)}", cause=cause) from None
    finally:
        if os.path.lexists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


class _Recording:
    """A file object that keeps the ``OSError`` of a failed ``write``: ``torch.save`` reports a full disk as a
    ``RuntimeError`` of its zip writer, and the cause would be lost."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) to ``path``, atomically."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def check_writable(path: str | os.PathLike) -> None:
    """Create and remove ``path``'s temporary file, so that a long computation does not end in a
    write error. Raises :class:`OutputError`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: it is a folder; name a file")
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb"):
            pass
        os.remove(tmp)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {describe_os_error(e)}", cause=e) from None


def remove_stale_temp_files(folder: str | os.PathLike, pattern: str = "*") -> list[str]:
    """Delete ``folder/<pattern>.tmp-<pid>`` files whose process is gone (a write killed half-way);
    -> the paths removed. Files of a live process are left alone."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(os.fspath(folder)), f"{pattern}.tmp-*")):
        m = _TEMP_RE.search(path)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def make_folder(path: str | os.PathLike, flag: str) -> list[str]:
    """``os.makedirs(path)`` with an :class:`OutputError` naming ``flag`` on failure; -> the folders it
    created, deepest last (what :func:`remove_empty_folders` may take away again)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{flag} {path} is a file, not a folder: choose another {flag}")
    created, p = [], path
    while not os.path.exists(p):
        created.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot create the folder: {describe_os_error(e)}",
                          cause=e) from None
    return created[::-1]


def remove_empty_folders(created: list[str]) -> None:
    """Remove the folders :func:`make_folder` created, deepest first, as long as they are empty."""
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:
            return


class OutputLock:
    """An exclusive ``flock`` on ``<folder>/<name>``, held until :meth:`release` or the process ends.

    ``acquire`` raises :class:`OutputError` naming the process that holds it (its pid and command
    are written into the lock file)."""

    def __init__(self, folder: str | os.PathLike, name: str = ".vigla.lock"):
        self.path = os.path.join(os.fspath(folder), name)
        self._fd: int | None = None

    def acquire(self, what: str, flag: str = "--out") -> "OutputLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(f"{flag} {os.path.dirname(self.path)}: cannot write there: "
                                  f"{describe_os_error(e)}", cause=e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise OutputError(f"{flag} {os.path.dirname(self.path)} is in use by another {what} "
                                  f"({holder or 'a live process'}): wait for it to finish, or choose another "
                                  f"{flag}") from None
            # the holder before us may have removed the file between our open and our lock: lock the new one
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {' '.join(_command())}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _command() -> list[str]:
    import sys
    return [os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]]


def git_info(cwd: str | os.PathLike | None = None) -> dict:
    """``{"commit": sha, "dirty": bool | None}`` of the checkout holding vigla (or ``cwd``); ``dirty``: tracked
    files differ from the commit, leaving aside ``benchmarks/results/`` (the record a benchmark is writing).

    ``VIGLA_COMMIT``, when set, names the commit (a tree copied without its history). Without it and
    without a usable repository (no git, no ``.git``, a repository without commits): ``"unknown"``."""
    if os.environ.get("VIGLA_COMMIT"):
        return {"commit": os.environ["VIGLA_COMMIT"], "dirty": None}
    here = os.fspath(cwd) if cwd is not None else str(Path(__file__).resolve().parent)
    commit = _git(["rev-parse", "--verify", "HEAD"], here)
    if commit is None or not re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", commit):
        return {"commit": "unknown", "dirty": None}
    # tracked files that differ from the commit, the results being recorded under benchmarks/results aside
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                   ":(top,exclude)benchmarks/results"], here)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _git(args: list[str], cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
