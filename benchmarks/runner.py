"""Running a suite's steps: the environment, a time cap per step, a log per step, a table at the end."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .suites import PY, ROOT, Step

WHEELS = ROOT / ".whl"  # optional wheels (fla-core, ...) the caller puts beside the tree
SITE = Path(os.environ.get("TMPDIR", "/tmp")) / "vigla_site"


class RunError(RuntimeError):
    """Something the caller must fix before a suite can run, said in one line."""


def commit() -> str | None:
    """``VIGLA_COMMIT`` when the caller set it (a copied tree has no usable .git), else the
    checkout's short commit, else None."""
    if os.environ.get("VIGLA_COMMIT"):
        return os.environ["VIGLA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def stale_commit_warning() -> str | None:
    """A line for the suite's header when the results would name a commit the tree is not: no
    ``VIGLA_COMMIT`` and tracked files that differ from it (uncommitted edits, or a copied tree whose
    ``.git`` is older than its files, as on the device machine)."""
    if os.environ.get("VIGLA_COMMIT"):
        return None
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                              ":(top,exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return (f"# warning: the tree differs from commit {commit()} ({len(out.stdout.splitlines())} tracked files): "
            "the results will name that commit; set VIGLA_COMMIT to the commit this tree is")


def wheel_install() -> Step | None:
    """The step that installs the optional wheels of .whl/ into a folder of their own (put on
    PYTHONPATH), or None when there are none."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return None
    argv = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
            "--upgrade", "--target", str(SITE), *map(str, wheels)]
    return Step("setup_wheels", argv, 300, log=SITE.parent / "vigla_wheels.log")


def environment() -> dict[str, str]:
    """The steps' environment: the tree (and the wheels' folder) on PYTHONPATH, unbuffered output."""
    paths = [str(ROOT)] + ([str(SITE)] if wheel_install() else []) + \
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)), PYTHONUNBUFFERED="1")


def device() -> str:
    """The GPU (name, driver) when nvidia-smi answers, else the CPU's model name."""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            name, _, driver = out.stdout.splitlines()[0].partition(",")
            return f"{name.strip()}, driver {driver.strip()}"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x{len(names)}" if names else "CPU"
    except OSError:
        return "CPU"


def versions() -> str:
    found = []
    for dist in ("torch", "timm", "triton", "fla-core"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def shown(argv: list[str]) -> str:
    return shlex.join(argv)


def resolved(argv: list[str]) -> list[str]:
    """``argv`` with the interpreter and Nsight Compute's path filled in."""
    out = [sys.executable if a == PY else a for a in argv]
    if out and out[0] == "ncu":
        out[0] = ncu_path() or "ncu"
    return out


def ncu_path() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda*/bin/ncu"):
        hits = sorted(Path("/").glob(pattern.lstrip("/")))
        if hits:
            return str(hits[-1])
    return None


@dataclass
class Outcome:
    step: Step
    status: str  # ok | failed | capped
    rc: int | None
    seconds: float
    log: Path


def log_path(step: Step, out: Path) -> Path:
    return step.log or out / "logs" / f"{step.name}.log"


def read_header(first_line: str) -> tuple[str, str | None] | None:
    """The commit and device (without its driver) that a log's first line names, as :func:`_header` writes it;
    None for any other line."""
    if not first_line.startswith("# commit "):
        return None
    fields = first_line[len("# commit "):].split(" | ")
    return fields[0], fields[1].split(",")[0] if len(fields) > 1 else None


def _header(step: Step, sha: str | None, where: str, env_versions: str) -> str:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (f"# commit {sha or 'unknown'} | {where} | {env_versions}\n"
            f"# started {started}, cap {step.cap} s\n# $ {shown(step.argv)}\n")


def _start(step: Step, out: Path, env: dict, head: str):
    log = log_path(step, out)
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "w")
    f.write(head)
    f.flush()
    proc = subprocess.Popen(resolved(step.argv), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=env | step.env, start_new_session=True)
    return proc, f, log, time.perf_counter()


def _finish(step: Step, proc, f, log: Path, start: float, deadline: float) -> Outcome:
    capped = False
    try:
        proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        capped = True
        _kill(proc)
    seconds = time.perf_counter() - start
    status = "capped" if capped else ("ok" if proc.returncode == 0 else "failed")
    f.write(f"\n# {status}: exit {proc.returncode} after {seconds:.0f} s\n")
    f.close()
    return Outcome(step, status, proc.returncode, seconds, log)


def _kill(proc) -> None:
    """SIGTERM to the step's process group (it may save what it has), SIGKILL 10 s later."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_steps(steps: list[Step], out: Path, env: dict, sha: str | None, tail: int) -> list[Outcome]:
    """Run ``steps`` in order (consecutive ``parallel`` steps together), each under its cap; print
    the last ``tail`` lines of each log as it ends."""
    where, env_versions = device(), versions()
    outcomes, i = [], 0
    while i < len(steps):
        group = [steps[i]]
        while steps[i].parallel and i + len(group) < len(steps) and steps[i + len(group)].parallel:
            group.append(steps[i + len(group)])
        i += len(group)
        for step in group:
            print(f"=== {step.name} (cap {step.cap} s): {shown(step.argv)}", flush=True)
        started = [(step, *_start(step, out, env, _header(step, sha, where, env_versions))) for step in group]
        for step, proc, f, log, start in started:
            outcome = _finish(step, proc, f, log, start, start + step.cap)
            outcomes.append(outcome)
            if step.plot:
                plot_if_missing(out / f"{step.name}.json")
            lines = log.read_text(errors="replace").splitlines()
            print("\n".join(lines[-tail:]) if tail > 0 else "", flush=True)
    return outcomes


def plot_if_missing(path: Path) -> None:
    """NAME.png from a `vigla bench` NAME.json when the run (cut by its cap) left none."""
    png = path.with_suffix(".png")
    if path.exists() and not png.exists():
        from vigla.bench.plot import plot_results
        plot_results(json.loads(path.read_text()), png)


def table(outcomes: list[Outcome], out: Path) -> str:
    """One line per step: status, exit code, seconds, the files it left under ``out``."""
    rows = [("step", "status", "exit", "s", "wrote")]
    for o in outcomes:
        wrote = [f for f in o.step.outputs if (out / f).exists()]
        rows.append((o.step.name, o.status, str(o.rc), f"{o.seconds:.0f}", " ".join(wrote) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)
