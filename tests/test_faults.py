"""Fault injection for `vigla train`, `vigla eval` and `vigla bench` (issue 14).

Each failure class is injected into a real command: an exception inside a step with loader workers, an output
that is read-only, full, missing or in the way, inputs that are corrupt, looped or missing, `kill -9` at a random
point and in the middle of a save, and two runs on one folder. For each the test asserts what a user gets:

* a non-zero exit code;
* one line, ``vigla <command>: error: ...``, that names the problem and the fix, and no traceback (``--debug``
  shows it);
* no checkpoint lost or damaged: what was saved before still loads, and the run resumes from it;
* nothing left behind: no process, no temporary file, no lock file, no empty output folder.

Most cases run in-process through ``vigla.cli.main`` (fast); the three that are about processes (a hang at exit,
``kill -9``, a second process on the same folder) run ``python -m vigla``-equivalents in their own process group.
Everything uses Fashion-MNIST-shaped fake data or a tiny image folder, ``test_vit`` at 32 px and a few steps.

Read-only folders: ``chmod 0555`` stops a normal user, but these tests may run as root (CI containers do), where
permissions are not checked. The ``read_only`` fixture detects that and then makes every write into the folder
fail as on a read-only mount (EROFS), by patching ``os.mkdir`` / ``os.open`` / ``open``. A full disk is simulated
the same way (``open`` in :mod:`vigla.engine.outputs` returns a file whose writes fail with ENOSPC half-way),
rather than by filling a disk.
"""
import builtins
import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_data import write_fake_fmnist, write_folder
from test_eval import vigla_checkpoint
from vigla import cli
from vigla.bench import cli as bench_cli
from vigla.engine.checkpoint import load_state, load_weights, read_meta
from vigla.ops.bigla import cpu_kernels

import vigla  # noqa: E402  (the subprocesses run the same vigla as the tests)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(vigla.__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)

# the subprocess entry: `python INJECT <vigla args>`, with a fault chosen by VIGLA_TEST_FAULT
INJECT = r'''
import os, sys, time
fault, mark = os.environ.get("VIGLA_TEST_FAULT", ""), os.environ.get("VIGLA_TEST_MARK", "")

def touch(text, path=mark):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)

import vigla.engine.trainer as trainer
real_step = trainer.Trainer.train_step

def step(self, x, y):
    if fault.startswith("raise-at-step:") and self.global_step + 1 == int(fault.split(":")[1]):
        touch(str(time.time()))
        raise RuntimeError(f"injected failure in step {self.global_step + 1}")
    if fault == "mark-first-step" and not os.path.exists(mark):
        touch(str(time.time()))
    if fault.startswith("late:") and not os.path.exists(mark + "-step"):  # a process not late is in its steps
        touch(str(time.time()), mark + "-step")
    return real_step(self, x, y)

trainer.Trainer.train_step = step

if fault.startswith("late:"):  # late:<rank>:<Trainer method>: that process of a torchrun job stops in the method
    _, late, name = fault.split(":")
    real_method = getattr(trainer.Trainer, name)

    def late_method(self, *args):
        if os.environ.get("RANK") == late:
            touch(name)
            time.sleep(600)
        return real_method(self, *args)

    setattr(trainer.Trainer, name, late_method)

if fault.startswith("hang-in-save:"):  # hang-in-save:<file name>:<n>: the n-th write of that file stops half-way
    import io
    import vigla.engine.checkpoint as checkpoint
    import vigla.engine.outputs as outputs
    _, name, nth = fault.split(":")
    real_write, count = outputs.atomic_write, [0]

    def atomic_write(path, write):
        if os.path.basename(path) == name:
            count[0] += 1
            if count[0] == int(nth):
                def half(f):
                    buf = io.BytesIO()
                    write(buf)
                    f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                    f.flush()
                    touch(os.fspath(path))
                    time.sleep(600)
                return real_write(path, half)
        return real_write(path, write)

    checkpoint.atomic_write = outputs.atomic_write = atomic_write

from vigla.cli import main
sys.argv[0] = "vigla"
sys.exit(main())
'''


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return write_fake_fmnist(str(tmp_path_factory.mktemp("fmnist")), n_train=80, n_test=16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_folder(str(root / "train"), ["a", "b"], per_class=8, size=24)
    write_folder(str(root / "val"), ["a", "b"], per_class=4, size=24)
    return root


def train_args(fmnist, out, **kw):
    flags = dict(fmnist_dir=fmnist, model="test_vit", img_size=32, epochs=2, batch_size=8, train_subset=16,
                 val_subset=8, test_subset=8, workers=0, log_interval=1, warmup_epochs=0, out=str(out))
    flags.update(kw)
    args = ["train"]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def error_line(err: str, command: str, *needles: str) -> str:
    """The one ``vigla <command>: error: ...`` line of ``err``; no traceback; the line holds every needle."""
    lines = [line for line in err.splitlines() if line.startswith(f"vigla {command}: error")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and 'File "' not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def leftovers(folder) -> list[str]:
    """Temporary and lock files under ``folder``: none may stay behind."""
    return sorted(glob.glob(os.path.join(folder, "**", "*.tmp-*"), recursive=True)
                  + glob.glob(os.path.join(folder, "**", ".*.lock"), recursive=True))


def no_workers_left():
    import multiprocessing
    assert [p for p in multiprocessing.active_children() if p.is_alive()] == []


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def assert_checkpoint_whole(out) -> dict:
    """The checkpoint in ``out`` loads: state, last weights and their description (from one save), best."""
    state = load_state(str(out / "last.state.pt"))
    weights = load_weights(str(out / "last.safetensors"))
    meta = read_meta(str(out / "last.safetensors"))
    assert weights.keys() == state["model"].keys()
    assert meta["global_step"] <= state["global_step"]  # a kill between two files leaves the weights one save behind
    if meta["global_step"] == state["global_step"]:
        assert all(torch.equal(weights[k], state["model"][k]) for k in weights)
    if (out / "best.safetensors").exists():
        load_weights(str(out / "best.safetensors"))
        assert read_meta(str(out / "best.safetensors"))["val"] is not None
    return state


# ---------------------------------------------------------------------------------------------- fixtures: faults
@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nothing can be written into (see the module docstring for root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        (folder / "probe").touch()
        (folder / "probe").unlink()
        ignored = True  # root: permissions are not checked
    except PermissionError:
        ignored = False
    if ignored:
        root = str(folder) + os.sep
        real_mkdir, real_os_open, real_open = os.mkdir, os.open, builtins.open

        def inside(path) -> bool:
            return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(root)

        def erofs(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

        def mkdir(path, *args, **kwargs):
            return erofs(path) if inside(path) else real_mkdir(path, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            return erofs(path) if writes and inside(path) else real_os_open(path, flags, *args, **kwargs)

        def open_(path, mode="r", *args, **kwargs):
            writes = set(mode) & set("wax+")
            return erofs(path) if writes and inside(path) else real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
    yield folder
    monkeypatch.undo()
    os.chmod(folder, 0o755)


@pytest.fixture
def disk_full(monkeypatch):
    """``disk_full(name, nth)``: the ``nth`` write of a file called ``name`` (``*`` for any) through
    :func:`vigla.engine.outputs.atomic_write` fails with ENOSPC after 64 bytes, as a disk filling up."""
    from vigla.engine import outputs

    real_open = builtins.open

    class Filling:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > 64:
                self.f.write(bytes(data)[:max(0, 64 - self.written)])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def arm(name: str, nth: int = 1):
        seen = [0]

        def open_(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            base = os.path.basename(os.fspath(path)).split(".tmp-")[0]
            if "w" in mode and (name == "*" or base == name):
                seen[0] += 1
                if seen[0] == nth:
                    return Filling(f)
            return f

        monkeypatch.setattr(outputs, "open", open_, raising=False)
    return arm


# ---------------------------------------------------------------------------------------------- an exception in a step
def _spawn(args, fault, mark, cwd=REPO):
    env = dict(ENV, VIGLA_TEST_FAULT=fault, VIGLA_TEST_MARK=str(mark))
    return subprocess.Popen([sys.executable, "-c", INJECT, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _wait_for(mark, proc, timeout: float = 120) -> None:
    """Until the injected fault writes ``mark`` (fails with the process's stderr if it ends first)."""
    deadline = time.time() + timeout
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert mark.exists(), _finish(proc, 5)[1][-3000:]


def _kill_9(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _finish(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{err[-3000:]}")


def test_failing_step_with_a_loader_worker_exits_within_seconds(fmnist, tmp_path):
    """Issue 14 (severe): an exception inside a step with a loader worker printed a traceback and then hung
    forever (the worker ignores SIGTERM; multiprocessing waited for it at exit)."""
    out, mark = tmp_path / "run", tmp_path / "mark"
    proc = _spawn(train_args(fmnist, out, workers=1), "raise-at-step:2", mark)
    _, err = _finish(proc, timeout=120)
    exited = time.time()
    assert proc.returncode == 1, err
    assert exited - float(mark.read_text()) < 15  # seconds from the failure to the exit (10 minutes+ before)
    error_line(err, "train", "RuntimeError: injected failure in step 2", "--debug")
    assert _group_gone(proc.pid, 10), "a loader worker outlived the run"
    assert leftovers(out) == [] and not (out / "last.state.pt").exists()


def test_failing_step_in_process_leaves_no_worker_and_debug_shows_the_traceback(fmnist, tmp_path, capsys,
                                                                                monkeypatch):
    from vigla.engine.trainer import Trainer

    def boom(self, x, y):
        raise RuntimeError("injected")

    monkeypatch.setattr(Trainer, "train_step", boom)
    assert cli.main(train_args(fmnist, tmp_path / "a", workers=1)) == 1
    error_line(capsys.readouterr().err, "train", "RuntimeError: injected")
    no_workers_left()
    with pytest.raises(RuntimeError, match="injected"):  # --debug: the exception, with its traceback
        cli.main(train_args(fmnist, tmp_path / "b", workers=1) + ["--debug"])
    no_workers_left()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["train", "eval"])
def test_exception_inside_a_loader_worker(command, fmnist, folder, tmp_path, capsys, monkeypatch):
    """A worker that raises (a decoder bug, say): one line naming it, the other workers ended."""
    from vigla.data import TransformedDataset

    def broken(self, key):
        raise RuntimeError("decoder exploded")

    if command == "train":
        args = train_args(fmnist, tmp_path / "run", workers=1)
    else:
        ckpt = tmp_path / "w.safetensors"
        vigla_checkpoint(ckpt, num_classes=2, classes=["a", "b"])
        args = ["eval", str(ckpt), "--data", str(folder), "--workers", "1"]
    monkeypatch.setattr(TransformedDataset, "__getitem__", broken)
    assert cli.main(args) == 1
    line = error_line(capsys.readouterr().err, command, "in DataLoader worker", "decoder exploded", "--debug")
    assert "cannot run" not in line  # not taken for a model / image size problem
    no_workers_left()
    assert leftovers(tmp_path) == []


def test_bench_measurement_that_raises_is_recorded(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench_cli, "measure_inference", broken)
    argv = ["bench", "--models", "test_vit", "--img-size", "32", "--device", "cpu", "--batch-size", "2",
            "--warmup", "1", "--iters", "1", "--no-latency", "--out", str(tmp_path / "b")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "vigla bench: 1 measurement(s) failed: test_vit@32 infer" in err and "Traceback" not in err
    row = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"][0]
    assert row["infer"] == {"status": "error", "error": "RuntimeError: kernel exploded"}
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- outputs
def _command(command, out, fmnist, tmp_path):
    """``vigla <command>`` writing to ``out`` (a folder for train and bench, a file for eval)."""
    if command == "train":
        return train_args(fmnist, out, epochs=1)
    if command == "eval":
        ckpt = tmp_path / "w.safetensors"
        vigla_checkpoint(ckpt, num_classes=10, classes=__import__("vigla.data").data.FMNIST_CLASSES)
        return ["eval", str(ckpt), "--fmnist-dir", fmnist, "--out", str(out)]
    return ["bench", "--models", "test_vit", "--img-size", "32", "--device", "cpu", "--batch-size", "2",
            "--warmup", "1", "--iters", "1", "--no-latency", "--out", str(out)]


@pytest.mark.parametrize("command", ["train", "eval", "bench"])
def test_read_only_output(command, read_only, fmnist, tmp_path, capsys):
    """Issue 14: --out on a read-only file system was a raw OSError [Errno 30]."""
    target = read_only / ("r.json" if command == "eval" else "run")
    assert cli.main(_command(command, target, fmnist, tmp_path)) == 2
    error_line(capsys.readouterr().err, command, str(target), "choose a writable folder")
    assert os.listdir(read_only) == []
    if command == "train":  # the folder itself, existing but not writable
        assert cli.main(_command(command, read_only, fmnist, tmp_path)) == 2
        error_line(capsys.readouterr().err, command, str(read_only), "choose a writable folder")
        assert os.listdir(read_only) == []


@pytest.mark.parametrize("command", ["train", "eval", "bench"])
@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_output_in_the_way(command, where, fmnist, tmp_path, capsys):
    """Issue 14: --out that is a file, or lies under a file: FileExistsError / NotADirectoryError tracebacks."""
    (tmp_path / "file").write_text("keep me")
    target = tmp_path / "file" if where == "a file" else tmp_path / "file" / "sub"
    if command == "eval" and where == "a file":
        target = tmp_path  # eval writes a file: a folder is what is in the way
    assert cli.main(_command(command, target, fmnist, tmp_path)) == 2
    line = error_line(capsys.readouterr().err, command, str(target))
    assert any(fix in line for fix in ("choose another", "name a file"))
    assert (tmp_path / "file").read_text() == "keep me" and leftovers(tmp_path) == []


def test_eval_output_folder_missing_is_found_before_evaluating(fmnist, tmp_path, capsys, monkeypatch):
    import vigla.engine.eval_cli as eval_cli

    monkeypatch.setattr(eval_cli, "evaluate_checkpoint", lambda args: pytest.fail("evaluated first"))
    target = tmp_path / "no" / "such" / "r.json"
    assert cli.main(_command("eval", target, fmnist, tmp_path)) == 2
    error_line(capsys.readouterr().err, "eval", str(target), "its folder does not exist")


def test_disk_full_during_a_checkpoint_save(fmnist, tmp_path, capsys, disk_full, monkeypatch):
    """Issue 14: ENOSPC during a save printed four chained tracebacks (the previous checkpoint survived). Now
    one line; the previous checkpoint is whole and the run resumes from it once there is space."""
    out = tmp_path / "run"
    disk_full("last.state.pt", nth=2)  # epoch 1 saves, epoch 2's save meets a full disk
    assert cli.main(train_args(fmnist, out)) == 2
    error_line(capsys.readouterr().err, "train", "last.state.pt", "No space left on device (ENOSPC)",
               "free some space", "the last good checkpoint is kept", "global step 2)",
               f"continue with: vigla train --resume auto --out {out}")
    assert leftovers(out) == []
    assert assert_checkpoint_whole(out)["global_step"] == 2
    monkeypatch.delattr("vigla.engine.outputs.open")  # space again
    assert cli.main(["train", "--resume", "auto", "--out", str(out)]) == 0
    assert assert_checkpoint_whole(out)["global_step"] == 4 and leftovers(out) == []


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_disk_full_while_writing_results(command, fmnist, tmp_path, capsys, disk_full):
    target = tmp_path / ("r.json" if command == "eval" else "b")
    if command == "bench":
        target.mkdir()
        (target / "bench.json").write_text('{"old": true}')
    disk_full("r.json" if command == "eval" else "bench.json", nth=2)  # the first open is the writability probe
    capsys.readouterr()
    args = _command(command, target, fmnist, tmp_path)
    assert cli.main(args) == 2
    error_line(capsys.readouterr().err, command, "No space left on device (ENOSPC)", "free some space")
    assert leftovers(tmp_path) == []
    if command == "bench":
        assert json.loads((target / "bench.json").read_text()) == {"old": True}  # the previous file is whole


# ---------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("fault, needles", [
    ("missing data", ("no such folder",)),
    ("looped data", ("symbolic link", "remove the link")),
    ("corrupt config", ("not valid YAML",)),
    ("corrupt Fashion-MNIST", ("not a readable gzip file",)),
    ("image smaller than the patch", ("cannot run at --img-size 8", "Choose another --img-size")),
])
def test_train_bad_input(fault, needles, folder, fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(fmnist, out, epochs=1)
    if fault == "missing data":
        args += ["--data", str(tmp_path / "nope")]
    elif fault == "looped data":
        looped = tmp_path / "looped"
        write_folder(str(looped / "train"), ["a", "b"], per_class=2)
        write_folder(str(looped / "val"), ["a", "b"], per_class=1)
        os.symlink("..", looped / "train" / "a" / "loop")
        args += ["--data", str(looped)]
    elif fault == "corrupt config":
        (tmp_path / "c.yaml").write_text("epochs: [1, 2\n")
        args += ["--config", str(tmp_path / "c.yaml")]
    elif fault == "corrupt Fashion-MNIST":
        bad = tmp_path / "fm"
        bad.mkdir()
        for name in os.listdir(fmnist):
            (bad / name).write_bytes(b"not gzip")
        args += ["--fmnist-dir", str(bad)]
    else:
        args += ["--data", str(folder), "--model", "deit_tiny_patch16_224", "--img-size", "8"]
    assert cli.main(args) == 2
    error_line(capsys.readouterr().err, "train", *needles)
    assert not out.exists()  # issue 14: a failed run left an empty --out folder behind


def test_train_resume_from_a_damaged_state(fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(train_args(fmnist, out, epochs=1)) == 0
    state = out / "last.state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # copied half-way
    before = load_weights(str(out / "last.safetensors"))
    assert cli.main(["train", "--resume", "auto", "--out", str(out), "--epochs", "2"]) == 2
    error_line(capsys.readouterr().err, "train", str(state), "damaged")
    after = load_weights(str(out / "last.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before) and leftovers(out) == []


@pytest.mark.parametrize("fault, needles", [
    ("missing checkpoint", ("does not exist",)),
    ("truncated safetensors", ("not a readable safetensors file",)),
    ("random .pth", ("is not a checkpoint",)),
    ("missing data", ("does not exist",)),
    ("looped data", ("symbolic link",)),
])
def test_eval_bad_input(fault, needles, folder, tmp_path, capsys):
    ckpt = tmp_path / "w.safetensors"
    vigla_checkpoint(ckpt, num_classes=2, classes=["a", "b"])
    args = ["eval", str(ckpt), "--data", str(folder), "--workers", "0"]
    if fault == "missing checkpoint":
        args[1] = str(tmp_path / "gone.safetensors")
    elif fault == "truncated safetensors":
        ckpt.write_bytes(ckpt.read_bytes()[:5000])
    elif fault == "random .pth":
        (tmp_path / "x.pth").write_bytes(os.urandom(3000))
        args[1:2] = [str(tmp_path / "x.pth"), "--model", "test_vit"]
    elif fault == "missing data":
        args[3] = str(tmp_path / "nope")
    else:
        write_folder(str(tmp_path / "looped" / "val"), ["a", "b"], per_class=1)
        os.symlink("../..", tmp_path / "looped" / "val" / "b" / "up")
        args[3] = str(tmp_path / "looped")
    assert cli.main(args) == 2
    error_line(capsys.readouterr().err, "eval", *needles)
    assert not list(tmp_path.rglob("*eval-*.json"))


def test_bench_unknown_model(tmp_path, capsys):
    argv = _command("bench", tmp_path / "b", None, tmp_path)
    argv[argv.index("test_vit")] = "vig_tinyy"
    assert cli.main(argv) == 2
    error_line(capsys.readouterr().err, "bench", "unknown model 'vig_tinyy'", "did you mean vig_tiny")
    assert not (tmp_path / "b").exists()


def test_bench_writes_under_runs_by_default(tmp_path, capsys, monkeypatch):
    """Issue 14: `vigla bench` wrote bench_out/ into the current folder (not ignored by git)."""
    monkeypatch.chdir(tmp_path)
    argv = _command("bench", "x", None, tmp_path)
    del argv[-2:]  # no --out
    assert cli.main(argv + ["--flops-only"]) == 0
    assert (tmp_path / "runs" / "bench" / "bench.json").is_file() and not (tmp_path / "bench_out").exists()
    assert "wrote runs/bench/bench.json" in capsys.readouterr().out


def test_vigla_info_runs(capsys):
    """Issue 14 (severe): `vigla info` always crashed (a timm function that does not exist in timm 1.0), and
    `vigla bench` sends users there for model names."""
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("vigla models:"))
    assert {"vig_tiny", "vig_h_small", "castling_deit_tiny"} <= set(line.split(": ")[1].split(", "))
    assert "deit_tiny_patch16_224" not in line  # timm's own models are not listed as vigla's
    cpu = next(line for line in out.splitlines() if line.startswith("BiGLA on the CPU: "))
    assert ("compiled kernel" in cpu) == cpu_kernels.available()
    assert cli.main(["info", "--filter", "vig_h*"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "vigla models: vig_h_base, vig_h_small, vig_h_tiny"


@pytest.mark.parametrize("rank, told", [(None, "vigla: interrupted\n"), ("0", "vigla: interrupted\n"), ("1", "")])
def test_ctrl_c_before_a_command_runs_is_one_line(capsys, monkeypatch, rank, told):
    """Ctrl-C while the command modules were imported (build_parser) or the flags parsed escaped as a
    KeyboardInterrupt traceback: the commands' own handler is installed later. It is one line and exit code 130;
    under torchrun, which passes Ctrl-C to every process, rank 0's alone (N processes printed it N times)."""
    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupt)
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    try:
        code = cli.main(["info"])
    except KeyboardInterrupt:  # not raised on: pytest would take it for the user's and stop the session
        pytest.fail("the KeyboardInterrupt escaped vigla.cli.main")
    assert code == 130
    assert capsys.readouterr().err == told


# the interpreter's start of a subprocess: a KeyboardInterrupt when ``import vigla`` imports timm, as Ctrl-C does
# while torch and timm load (seconds; more under torchrun)
INTERRUPT_IMPORT = """import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "timm":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
"""

# what pip writes for the ``vigla`` console script (pyproject.toml's [project.scripts])
CONSOLE_SCRIPT = """import re
import sys
from vigla.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


def test_ctrl_c_while_vigla_imports_is_one_line(tmp_path):
    """Ctrl-C while the package imported torch and timm, before the command's code ran (the whole of the first
    seconds, longer under torchrun), printed a KeyboardInterrupt traceback through the import machinery. The vigla
    command (the console script, python -m vigla as torchrun starts it) prints one line and exits with 130; a
    program that imports vigla still gets its KeyboardInterrupt."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(INTERRUPT_IMPORT)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "vigla").write_text(CONSOLE_SCRIPT)
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), REPO]))
    for cmd in ([str(tmp_path / "bin" / "vigla"), "info"], ["-m", "vigla", "info"], ["-u", "-m", "vigla", "train"]):
        proc = subprocess.run([sys.executable, *cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert (proc.returncode, proc.stderr, proc.stdout) == (130, "vigla: interrupted\n", ""), (cmd, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "vigla", "train"], cwd=tmp_path, env=dict(env, RANK="1"),
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (130, ""), proc.stderr  # a torchrun job's other ranks: rank 0 tells it
    proc = subprocess.run([sys.executable, "-c", "import vigla"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.rstrip().endswith("KeyboardInterrupt"), proc.stderr


SIGINT_TOLD = "SIGINT received: finishing this step, saving a checkpoint, then stopping"


@pytest.mark.slow
@pytest.mark.parametrize("fault, marks, told", [
    ("mark-first-step", [""], [SIGINT_TOLD, "stopped at epoch "]),  # both processes in their steps
    ("late:0:_build_data", [""], ["vigla train: interrupted"]),  # neither can take a stop request yet
    # rank 1 ends at once, rank 0 (waiting for it in a step's all-reduce) meets a closed connection
    ("late:1:_start", ["", "-step"], [SIGINT_TOLD, "vigla train: interrupted: another process had already ended; "
                                                   "no checkpoint had been saved yet; run the command again"]),
])
def test_ctrl_c_under_torchrun_is_told_once(fmnist, tmp_path, fault, marks, told):
    """Ctrl-C under torchrun (2 processes, gloo), which passes SIGINT to each process: every rank printed 'SIGINT
    received' or 'aborted without saving', and a rank still building the run ended at once, so that the other,
    stopping, met a closed connection and printed gloo's error as an unexpected one. The run's lines come once,
    from rank 0, whatever each process was doing; the exit is non-zero; the checkpoint saved on the way loads."""
    out, mark = tmp_path / "run", tmp_path / "mark"
    (tmp_path / "inject.py").write_text(INJECT)
    args = train_args(fmnist, out, epochs=50, train_subset=64, batch_size=4)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(tmp_path / "inject.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(ENV, VIGLA_TEST_FAULT=fault, VIGLA_TEST_MARK=str(mark)))
    for suffix in marks:
        _wait_for(tmp_path / f"mark{suffix}", proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: torchrun's process group (each worker has its own)
    _, err = _finish(proc, timeout=120)
    lines = [line.strip() for line in err.splitlines() if line.startswith(("vigla", "SIGINT", "SIGTERM", "stopped"))
             or "aborted" in line]
    assert proc.returncode != 0 and len(lines) == len(told), err[-3000:]
    assert all(line.startswith(start) for line, start in zip(lines, told)), err[-3000:]
    assert "gloo" not in err and "unexpected" not in err, err[-3000:]
    if fault == "mark-first-step":
        assert assert_checkpoint_whole(out)["global_step"] >= 1
    assert leftovers(tmp_path) == [] and _group_gone(proc.pid, 10)


@pytest.mark.slow
def test_an_error_in_one_process_of_a_torchrun_job_is_told_once(fmnist, tmp_path):
    """Under torchrun (2 processes, gloo) the process that meets a bad image (--strict-data) tells it; the other,
    whose next all-reduce then fails, printed gloo's "Connection closed by peer" as an unexpected error; now it says
    that another process ended first. Non-zero exit, no process or folder left behind."""
    data = tmp_path / "data"
    write_folder(str(data / "train"), ["a", "b"], per_class=8, size=24, corrupt=[("b", 5)])
    write_folder(str(data / "val"), ["a", "b"], per_class=4, size=24)
    out = tmp_path / "run"
    args = train_args(fmnist, out, epochs=1, batch_size=4, train_subset=16) + ["--data", str(data), "--strict-data"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "vigla", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=ENV)
    _, err = _finish(proc, timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("vigla train: error")]
    assert proc.returncode != 0 and len(lines) == 2, err[-3000:]
    bad, other = sorted(lines, key=lambda line: "ended first" in line)  # the image's rank, then the other
    assert "unreadable image" in bad and "--strict-data" in bad, err[-3000:]
    assert "another process of this job ended first (it printed its own error)" in other, err[-3000:]
    assert "gloo" not in err and "unexpected" not in err, err[-3000:]
    assert leftovers(tmp_path) == [] and _group_gone(proc.pid, 10)


# ---------------------------------------------------------------------------------------------- kill -9, two runs
def test_kill_9_in_the_middle_of_a_save(fmnist, tmp_path):
    """kill -9 after epoch 2's state is written and while its weights are half-written (the worst moment: the
    old state + weights pair would have been mismatched and unresumable). The temporary file is removed on the
    next start (issue 14: it stayed forever) and the run resumes from the newer, self-contained state."""
    out, mark = tmp_path / "run", tmp_path / "mark"
    proc = _spawn(train_args(fmnist, out, epochs=3), "hang-in-save:last.safetensors:2", mark)
    _wait_for(mark, proc)
    _kill_9(proc)
    assert glob.glob(str(out / "last.safetensors.tmp-*"))  # what the kill left
    state = assert_checkpoint_whole(out)
    assert state["global_step"] == 4 and read_meta(str(out / "last.safetensors"))["global_step"] == 2
    assert cli.main(["train", "--resume", "auto", "--out", str(out)]) == 0
    assert leftovers(out) == [] and assert_checkpoint_whole(out)["global_step"] == 6
    assert _group_gone(proc.pid, 10)


def test_kill_9_between_the_checkpoint_and_the_best_weights(fmnist, tmp_path, capsys):
    """kill -9 while epoch 1's best weights are half-written. They were written before ``last.*``, and a kill there
    (met once by the random kill below) left best.safetensors and no state: a folder neither resumable nor free
    for a new run. Now the state comes first, and resuming it writes the best weights again."""
    out, mark = tmp_path / "run", tmp_path / "mark"
    proc = _spawn(train_args(fmnist, out), "hang-in-save:best.safetensors:1", mark)
    _wait_for(mark, proc)
    _kill_9(proc)
    assert not (out / "best.safetensors").exists()
    state = assert_checkpoint_whole(out)
    assert state["global_step"] == 2 and state["best"]["epoch"] == 1
    assert cli.main(["train", "--resume", "auto", "--out", str(out), "--epochs", "1"]) == 0  # tests it, no step
    assert f"wrote {out / 'best.safetensors'} again" in capsys.readouterr().err
    meta = read_meta(str(out / "best.safetensors"))
    assert meta["global_step"] == 2 and meta["val"]["top1"] == state["best"]["top1"]
    assert leftovers(out) == [] and _group_gone(proc.pid, 10)


def test_best_weights_not_rewritten_from_an_ema_the_resumed_run_lacks():
    """The rewrite above needs the weights the state names as best: EMA weights resumed with ``--no-ema`` have none
    to write them from (None, where an AttributeError would have ended the resume); the raw weights always do."""
    from types import SimpleNamespace

    from vigla.engine.trainer import Trainer

    run = SimpleNamespace(best={"weights": "ema", "val": None}, ema=None)
    assert Trainer._best_state(run) is None
    core = torch.nn.Linear(2, 2)
    run = SimpleNamespace(best={"weights": "model", "val": {"top1": 1.0}}, ema=None, core=core,
                          _meta=lambda val, weights: {"val": val, "weights": weights})
    weights, meta = Trainer._best_state(run)
    assert weights.keys() == core.state_dict().keys() and meta == {"val": {"top1": 1.0}, "weights": "model"}


def test_kill_9_at_a_random_point_and_a_second_run_on_the_same_folder(fmnist, tmp_path, capsys):
    """A run with a loader worker is killed (-9) at a random moment of its training (saves every 2 steps, so
    some kills land inside one). Meanwhile a second run into the same --out is refused. Afterwards: no process
    left, the checkpoint on disk is whole, and the run resumes (or, killed before its first save, starts)."""
    seed = int(os.environ.get("VIGLA_FAULT_SEED", time.time_ns() % 2**31))
    delay = random.Random(seed).uniform(0.0, 2.5)
    out, mark = tmp_path / "run", tmp_path / "mark"
    args = train_args(fmnist, out, epochs=40, workers=1)
    proc = _spawn(args, "mark-first-step", mark)
    _wait_for(mark, proc)
    assert cli.main(args) == 2  # issue 14: two runs into one --out both ran and mixed their files
    error_line(capsys.readouterr().err, "train", f"--out {out} is in use by another vigla train (pid {proc.pid}",
               "wait for it to finish, or choose another --out")
    time.sleep(delay)
    _kill_9(proc)
    assert _group_gone(proc.pid, 10), f"a process outlived kill -9 (seed {seed})"
    if (out / "last.state.pt").exists():
        # killed between the first save's state and its weights: the state is self-contained and resumes alone
        first = not (out / "last.safetensors").exists()
        state = load_state(str(out / "last.state.pt")) if first else assert_checkpoint_whole(out)
        resume = ["train", "--resume", "auto", "--out", str(out), "--epochs", str(state["epoch"] + 1)]
        assert cli.main(resume) == 0, f"seed {seed}"
        assert assert_checkpoint_whole(out)["global_step"] == 2 * (state["epoch"] + 1)
    else:  # killed before the first save: the folder holds no run, a new one may start there
        assert cli.main(train_args(fmnist, out, epochs=1)) == 0, f"seed {seed}"
    assert leftovers(out) == [], f"seed {seed}"
    no_workers_left()


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_kill_9_while_writing_results(command, fmnist, tmp_path):
    """kill -9 while eval writes its JSON, or while bench rewrites its JSON after the second of two rows: the
    previous file (bench: the first row's) is whole, and the next run removes the temporary file."""
    mark = tmp_path / "mark"
    if command == "eval":
        target, name, nth = tmp_path / "r.json", "r.json", 1
        args = _command("eval", target, fmnist, tmp_path)
    else:
        target, name, nth = tmp_path / "b", "bench.json", 2
        args = _command("bench", target, None, tmp_path) + ["--img-size", "32", "48"]
    proc = _spawn(args, f"hang-in-save:{name}:{nth}", mark)
    _wait_for(mark, proc)
    _kill_9(proc)
    assert _group_gone(proc.pid, 10)
    folder = tmp_path if command == "eval" else target
    assert glob.glob(str(folder / f"{name}.tmp-*"))  # what the kill left
    if command == "eval":
        assert not target.exists()
    else:
        first = json.loads((target / "bench.json").read_text())
        assert first["complete"] is False and len(first["rows"]) == 1
    assert cli.main(args) == 0
    assert leftovers(tmp_path) == []
    if command == "bench":
        assert json.loads((target / "bench.json").read_text())["complete"] is True


def test_bench_refuses_a_second_run_and_cleans_up_after_a_killed_one(tmp_path, capsys):
    from vigla.engine.outputs import OutputLock

    out = tmp_path / "b"
    out.mkdir()
    stale = out / f"bench.json.tmp-{dead_pid()}"  # what a bench killed mid-write leaves
    stale.write_text("{")
    lock = OutputLock(out, ".bench.lock").acquire("vigla bench")
    try:
        assert cli.main(_command("bench", out, None, tmp_path)) == 2
        error_line(capsys.readouterr().err, "bench", "is in use by another vigla bench", "choose another --out")
    finally:
        lock.release()
    assert cli.main(_command("bench", out, None, tmp_path)) == 0
    assert not stale.exists() and leftovers(tmp_path) == []
    assert json.loads((out / "bench.json").read_text())["complete"] is True


def test_eval_cleans_up_after_a_killed_one(fmnist, tmp_path):
    """An eval killed while writing its JSON leaves <out>.tmp-<pid>: the next eval to that file removes it.
    (Eval only reads checkpoints and writes one file atomically: two evals at once need no lock.)"""
    out = tmp_path / "r.json"
    stale = tmp_path / f"r.json.tmp-{dead_pid()}"
    stale.write_text("{")
    live = tmp_path / f"r.json.tmp-{os.getppid()}"  # a live process's file is not touched
    live.write_text("{")
    assert cli.main(_command("eval", out, fmnist, tmp_path)) == 0
    assert not stale.exists() and live.exists() and json.loads(out.read_text())["results"]
