"""vigla train: config layering, a full tiny run, exact resume after a stop, signals, DDP, bad input, aux losses."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import register_model

from test_data import write_fake_fmnist, write_folder
from vigla import cli
from vigla.data import DataWarning, ResumableDistributedSampler
from vigla.engine import train_cli
from vigla.engine.checkpoint import load_state, load_weights, read_meta, save_state
from vigla.engine.config import read_yaml, resolve_config
from vigla.engine.errors import CheckpointError, NonFiniteLossError, UserError, warning_lines
from vigla.engine.trainer import Trainer
from vigla.notices import KernelWarning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run best on one thread


ENV_1T = dict(os.environ, OMP_NUM_THREADS="1")


def run_group(cmd, timeout, env=None):
    """subprocess.run in its own process group, all of which is killed on a timeout (torchrun's workers too);
    ``env``: variables set on top of :data:`ENV_1T`."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV_1T, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return write_fake_fmnist(str(tmp_path_factory.mktemp("fmnist")), n_train=120, n_test=40)


def tiny_flags(fmnist, out, **kw):
    flags = dict(fmnist_dir=fmnist, model="test_vit", img_size=32, epochs=2, batch_size=8, train_subset=48,
                 val_subset=16, out=str(out), workers=0, log_interval=2, lr=2e-3, warmup_epochs=0.5)
    flags.update(kw)
    return flags


def parse(argv):
    return cli.build_parser().parse_args(["train", *argv])


def argv_of(flags):
    out = []
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)])
    return out


# ---------------------------------------------------------------------------------------------- config
def test_help_is_readable(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for needle in ("--resume PATH|auto", "per 512 images", "fmnist-quick", "--strict-data", "examples:",
                   "torchrun --nproc_per_node", "--debug"):
        assert needle in text
    # one figure for the default run, the measured one (issue 14: "about 10 min" here, "1.5 minutes" elsewhere)
    measured = json.load(open(os.path.join(REPO, "benchmarks", "results", "cpu_default_train.json")))
    wall = measured["rows"][0]["wall_s"]
    assert f"Fashion-MNIST: {wall / 60:.1f} min on 2 idle CPU cores (measured)" in text


def test_precedence_preset_yaml_flags(tmp_path):
    cfg = resolve_config({})
    assert cfg.preset == "fmnist-quick" and cfg.model == "vig_tiny" and cfg.img_size == 64 and cfg.aa == "none"
    cfg = resolve_config({"data": "/x"})
    assert cfg.preset == "recipe" and cfg.aa == "rand-m9-mstd0.5-inc1" and cfg.mixup == 0.8 and cfg.ema
    assert (cfg.weight_decay, cfg.clip_grad, cfg.smoothing, cfg.reprob) == (0.05, 5.0, 0.1, 0.25)
    (tmp_path / "c.yaml").write_text("epochs: 7\nwarmup-epochs: 1\nbatch-size: 16\nlr: 0.004\npreset: recipe\n")
    from_yaml = read_yaml(str(tmp_path / "c.yaml"))
    cfg = resolve_config({"lr": 1e-4}, from_yaml)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.preset, cfg.img_size) == (7, 16, 1e-4, "recipe", 224)
    # the flags parser leaves unset options out, so YAML values are not overwritten by flag defaults
    args = parse(["--config", str(tmp_path / "c.yaml"), "--epochs", "3"])
    cfg, state = train_cli.build_config(args)
    assert (cfg.epochs, cfg.batch_size, state) == (3, 16, None)


def test_bad_settings_are_clear(tmp_path):
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    with pytest.raises(UserError, match="unknown setting 'epoch' \\(did you mean 'epochs'\\?\\)"):
        read_yaml(str(tmp_path / "bad.yaml"))
    (tmp_path / "bad2.yaml").write_text("epochs: three\n")
    with pytest.raises(UserError, match="epochs must be an integer, got 'three'; correct it there$"):
        read_yaml(str(tmp_path / "bad2.yaml"))
    with pytest.raises(UserError, match="--batch-size must be even"):
        resolve_config({"data": "/x", "batch_size": 7})
    with pytest.raises(UserError, match="does not exist"):
        read_yaml(str(tmp_path / "none.yaml"))
    with pytest.raises(UserError, match="is a folder: give the YAML file inside it"):
        read_yaml(str(tmp_path))


def test_two_keys_for_one_setting_are_refused(fmnist, tmp_path, capsys):
    """`batch-size` and `batch_size` in one settings file both name --batch-size: the later replaced the earlier without
    a word, in --config and in a resumed run's config.yaml. One error line naming both keys; the run resumes once the
    file holds one."""
    (tmp_path / "c.yaml").write_text("batch-size: 8\nepochs: 2\nbatch_size: 16\n")
    with pytest.raises(UserError, match=r"config file .*c\.yaml: 'batch-size' and 'batch_size' both set batch_size: "
                                        r"keep one$"):
        read_yaml(str(tmp_path / "c.yaml"))
    out = tmp_path / "r"
    assert Trainer(resolve_config(tiny_flags(fmnist, out, epochs=1))).run() == 0
    config = out / "config.yaml"
    kept = config.read_text()
    config.write_text(kept + "batch-size: 16\n")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vigla train: error: config file {config}: 'batch_size' and 'batch-size' both set batch_size: "
                   f"keep one"]
    config.write_text(kept)
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 0


@pytest.mark.parametrize("setting, value, message", [
    ("lr", -1.0, r"--lr must be a finite number > 0, got -1.0"),
    ("lr", float("nan"), r"--lr must be a finite number > 0, got nan"),
    ("lr", float("inf"), r"--lr must be a finite number > 0, got inf"),
    ("drop_path", 2.0, r"--drop-path must be a finite number in \[0, 1\), got 2.0"),
    ("hflip", 3.0, r"--hflip must be a finite number in \[0, 1\], got 3.0"),
    ("smoothing", 1.5, r"--smoothing must be a finite number in \[0, 1\), got 1.5"),
    ("weight_decay", -1.0, r"--weight-decay must be a finite number in \[0, inf\), got -1.0"),
    ("img_size", 100000, r"--img-size must be at most 8192, got 100000"),
    ("workers", -5, r"--workers must be -1 \(automatic\) or >= 0, got -5"),
])
def test_numbers_out_of_range_are_refused(setting, value, message):
    """Before anything runs (a negative --lr reached the optimizer, --drop-path 2 the first forward, a huge
    --img-size the allocator; --hflip 3 and --smoothing 1.5 trained)."""
    with pytest.raises(UserError, match=message):
        resolve_config({"data": "/x", setting: value})


# ---------------------------------------------------------------------------------------------- a full run
def test_tiny_run_writes_everything(fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", *argv_of(tiny_flags(fmnist, out, ema=True, ema_warmup=True))])
    assert code == 0
    for name in ("config.yaml", "run.json", "metrics.csv", "steps.csv", "curves.png", "results.json",
                 "last.safetensors", "last.json", "last.state.pt", "best.safetensors", "best.json"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = read_yaml(str(out / "config.yaml"))  # the resolved config reads back as a --config file
    assert saved["epochs"] == 2 and saved["preset"] == "fmnist-quick" and "out" not in saved
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and [int(r["global_step"]) for r in rows] == [6, 12]
    assert all(0 <= float(r["val_top1"]) <= 100 and r["ema_val_top1"] != "nan" for r in rows)
    results = json.load(open(out / "results.json"))
    assert results["test"]["images"] == 40 and results["best"]["weights"] in ("model", "ema")
    assert read_meta(str(out / "last.safetensors"))["global_step"] == 12
    assert "test top-1" in capsys.readouterr().out
    run = json.load(open(out / "run.json"))
    assert run["global_batch"] == 8 and run["lr_scaled"] == pytest.approx(2e-3 * 8 / 512)
    # a second run into the same folder must not clobber it
    assert cli.main(["train", *argv_of(tiny_flags(fmnist, out))]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_runs_never_write_over_another_run(fmnist, tmp_path, capsys):
    """A folder holding any run file is refused to a new run (also with last.state.pt deleted to save space), and
    to a resumed run from elsewhere; the files stay as they were."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", *argv_of(tiny_flags(fmnist, a, epochs=1))]) == 0
    assert cli.main(["train", *argv_of(tiny_flags(fmnist, b, epochs=1))]) == 0
    kept = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(a / "last.state.pt"), "--epochs", "2", "--out", str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {b} holds another run" in err and len(err.splitlines()) == 1
    (b / "last.state.pt").unlink()
    del kept["last.state.pt"]
    assert cli.main(["train", *argv_of(tiny_flags(fmnist, b, epochs=1))]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {b} already holds a run (last.safetensors, best.safetensors" in err and "--resume" not in err
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == kept


def test_grad_checkpointing_trains_to_the_same_weights(fmnist, tmp_path):
    """--grad-checkpointing (ViG: blocks replayed in the backward, BiGLA's output kept) changes
    memory, not the run: same weights as without it (deterministic mode, drop path on)."""
    weights = []
    for ckpt in (False, True):
        flags = tiny_flags(fmnist, tmp_path / str(ckpt), model="vig_tiny", epochs=1, train_subset=16,
                           val_subset=8, test_subset=8, deterministic=True, drop_path=0.1, ema=False,
                           grad_checkpointing=ckpt)
        trainer = Trainer(resolve_config(flags))
        assert trainer.core.grad_checkpointing is ckpt
        assert trainer.run() == 0
        weights.append(load_weights(str(tmp_path / str(ckpt) / "last.safetensors")))
    a, b = weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("stop_at", [9, 6])  # mid-epoch 2, and exactly at the epoch boundary
def test_stop_and_resume_gives_the_same_weights(fmnist, tmp_path, stop_at):
    flags = tiny_flags(fmnist, tmp_path / "a", deterministic=True, ema=True, ema_warmup=True, mixup=0.8,
                       cutmix=1.0, reprob=0.25, aa="rand-m9-mstd0.5-inc1", drop_path=0.1, scale_min=0.3)
    assert Trainer(resolve_config(flags)).run() == 0
    flags_b = dict(flags, out=str(tmp_path / "b"))
    stopped = Trainer(resolve_config(flags_b), stop_after_steps=stop_at)
    assert stopped.run() == 128 + signal.SIGTERM
    state = load_state(str(tmp_path / "b" / "last.state.pt"))
    # a stop on the last step of an epoch saves before that epoch's validation, which the resumed run then does
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == {9: (1, 3, 9), 6: (0, 6, 6)}[stop_at]
    # resume through the CLI with only --resume and --out: the rest comes from the run's saved config.yaml
    cfg, state_path = train_cli.build_config(parse(["--resume", "auto", "--out", str(tmp_path / "b")]))
    assert cfg.mixup == 0.8 and cfg.fmnist_dir == fmnist and state_path.endswith("last.state.pt")
    assert Trainer(cfg, resume_state=state_path).run() == 0
    a, b = (load_weights(str(tmp_path / d / "last.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_state(str(tmp_path / "a" / "last.state.pt")), load_state(str(tmp_path / "b" / "last.state.pt"))
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])
    assert sa["optimizer"]["state"][0]["step"] == sb["optimizer"]["state"][0]["step"] == 12
    ra, rb = (list(csv.DictReader(open(tmp_path / d / "metrics.csv"))) for d in "ab")
    for x, y in zip(ra, rb, strict=True):
        for key in ("global_step", "train_loss", "val_top1", "val_loss", "ema_val_top1", "lr"):
            assert x[key] == y[key], key


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raising KeyboardInterrupt in this process, as in a terminal's foreground job: a test run started in
    the background by a non-interactive shell (``pytest &`` in a script) inherits SIGINT ignored, and Python keeps
    it so (the handler a run restores is then SIG_IGN)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_the_stop_handler_takes_sigint_even_when_started_ignored():
    """A run started with SIGINT ignored (a script's background job, torchrun's workers under one) still takes
    SIGINT as a stop request: torchrun passes the signal on, and a worker ignoring it would be killed unsaved."""
    from vigla.engine.run import StopRequest

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop = StopRequest()
        stop.install()
        assert signal.getsignal(signal.SIGINT) == stop._handle
        stop.restore()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_the_final_test_evaluation_ends_it(fmnist, tmp_path, monkeypatch, capsys, ctrl_c_raises):
    """Ctrl-C once training is over: the test evaluation ends at once with one line saying where the checkpoints are
    (was: "SIGINT received: finishing this step, saving a checkpoint", then the evaluation ran on to exit 0)."""
    out = tmp_path / "run"
    trainer = Trainer(resolve_config(tiny_flags(fmnist, out)))
    evaluate = trainer._evaluate

    def interrupted_test(loader, model):
        if trainer.epoch == trainer.cfg.epochs:  # after the last epoch: the test split
            os.kill(os.getpid(), signal.SIGINT)
            # the evaluation's work, which the signal cuts short: Python code between short waits, as an evaluation
            # runs between batches (a sleep is cut short only where the signal lands on this thread)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.01)
            raise AssertionError(f"the final evaluation ran on after Ctrl-C (SIGINT's handler: "
                                 f"{signal.getsignal(signal.SIGINT)})")
        return evaluate(loader, model)

    monkeypatch.setattr(trainer, "_evaluate", interrupted_test)
    with pytest.raises(KeyboardInterrupt, match=f"^in the final test evaluation; training is done and its "
                                                f"checkpoints are in {out}$"):
        trainer.run()
    assert "SIGINT received" not in capsys.readouterr().err
    assert (out / "best.safetensors").is_file() and (out / "last.state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the stop handler taken away


@pytest.mark.slow
def test_sigterm_saves_and_tells_how_to_resume(fmnist, tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "vigla", "train",
           *argv_of(tiny_flags(fmnist, out, epochs=50, train_subset=100, batch_size=4))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV_1T,
                            start_new_session=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # the header's last line is printed once the handler is installed
        if line.strip().startswith("output") or time.time() > deadline:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received" in err and f"vigla train --resume auto --out {out}" in err
    state = load_state(str(out / "last.state.pt"))
    assert 0 < state["global_step"] < 50 * 25
    resumed = run_group([sys.executable, "-m", "vigla", "train", "--resume", "auto", "--out", str(out),
                         "--epochs", str(state["epoch"] + 1)], timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"global step {state['global_step']}" in resumed.stdout


@pytest.mark.slow
def test_ddp_two_processes_gloo(fmnist, tmp_path):
    out = tmp_path / "ddp"
    flags = tiny_flags(fmnist, out, epochs=1, train_subset=32, batch_size=8)
    proc = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      "-m", "vigla", "train", *argv_of(flags)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.load(open(out / "run.json"))
    assert (run["world_size"], run["global_batch"], run["steps_per_epoch"]) == (2, 16, 2)
    state = load_state(str(out / "last.state.pt"))
    assert state["global_step"] == 2 and len(state["rng"]) == 2  # both ranks' RNG states are kept
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert proc.stdout.count("test top-1") == 1  # only rank 0 reports


def first_unreadable_lines(train, bad: set, procs: int) -> list[str]:
    """The start of the line naming the first unreadable training image of each rank's shard of epoch 1 that holds
    one (the sampler's order, over the files sorted as the image folder lists them)."""
    files = sorted(str(p) for p in train.glob("*/*.png"))
    lines = []
    for rank in range(procs):
        shard = [files[i] for _, i in ResumableDistributedSampler(files, procs, rank, seed=0)]
        first = next((f for f in shard if f in bad), None)
        if first is not None:
            lines.append(f"warning{f' (rank {rank})' if rank else ''}: skipping unreadable image(s), replaced by the "
                         f"next readable one: {first}: ")
    return lines


@pytest.mark.slow
def test_ddp_counts_every_ranks_unreadable_images(tmp_path):
    """Each rank meets the bad files of its own shard: the run's count is all of them, as one process gives. Rank 0
    alone named the first it met, and the validation and test lines named rank 0's files only (here none: 'left out
    (3 evaluated): ' and nothing after). Each rank names the first of its shard (rank k's line says so), and the
    validation and test lines name every rank's."""
    train, val = tmp_path / "d" / "train", tmp_path / "d" / "val"
    corrupt = {("a", 1), ("a", 5), ("b", 2)}
    write_folder(str(train), ["a", "b"], per_class=8, corrupt=corrupt)
    write_folder(str(val), ["a", "b"], per_class=2, corrupt={("a", 1)})  # in rank 1's shard of 2
    bad = {str(train / c / f"{i}.png") for c, i in corrupt}
    counts = []
    for procs in (1, 2):
        out = tmp_path / f"o{procs}"
        flags = dict(data=str(tmp_path / "d"), model="test_vit", img_size=32, epochs=1, batch_size=8 // procs,
                     workers=0, out=str(out), aa="none", mixup=0.0, cutmix=0.0, ema=False, warmup_epochs=0)
        proc = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                          "-m", "vigla", "train", *argv_of(flags)], timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts.append(list(csv.DictReader(open(out / "metrics.csv")))[0]["unreadable_images"])
        named = sorted(line for line in proc.stdout.splitlines() if "skipping unreadable" in line)
        expected = first_unreadable_lines(train, bad, procs)
        assert len(named) == len(expected) and all(n.startswith(e) for n, e in zip(named, expected)), proc.stdout
        for split in ("validation", "test"):
            line = next(line for line in proc.stderr.splitlines() if f"unreadable {split} image(s)" in line)
            assert line.startswith(f"warning: 1 unreadable {split} image(s) left out (3 evaluated): "
                                   f"{val / 'a' / '1.png'}: "), line
    assert counts == ["3", "3"]
    assert any("(rank 1)" in line for line in first_unreadable_lines(train, bad, 2))  # what the data is for


def test_each_rank_names_the_first_unreadable_image_it_meets(monkeypatch, capsys):
    """Under torchrun only rank 0 named the first unreadable training image it met; a rank meeting one in its own
    shard said nothing. It names its first, with its rank; later ones are counted."""
    monkeypatch.setenv("RANK", "1")
    run = SimpleNamespace(cfg=SimpleNamespace(strict_data=False), unreadable=set(), is_main=False)
    Trainer._count_unreadable(run, ["d/b/2.png: UnidentifiedImageError: cannot identify"])
    Trainer._count_unreadable(run, ["d/a/5.png: UnidentifiedImageError: cannot identify"])
    assert capsys.readouterr().out == ("warning (rank 1): skipping unreadable image(s), replaced by the next readable "
                                       "one: d/b/2.png: UnidentifiedImageError: cannot identify\n")
    assert len(run.unreadable) == 2


@pytest.mark.slow
def test_ddp_with_grad_checkpointing_matches_without(fmnist, tmp_path):
    """DistributedDataParallel over ViG blocks replayed in the backward (vigla.ops.recompute): the
    reducer gets every gradient once, and the run ends with the weights of the same run without
    checkpointing (deterministic mode, 2 processes, gloo)."""
    weights = []
    for ckpt in (False, True):
        out = tmp_path / f"ddp-{ckpt}"
        flags = tiny_flags(fmnist, out, model="vig_tiny", epochs=1, train_subset=32, batch_size=8, val_subset=8,
                           test_subset=8, deterministic=True, drop_path=0.1, grad_checkpointing=ckpt)
        proc = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "vigla", "train", *argv_of(flags)], timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert load_state(str(out / "last.state.pt"))["global_step"] == 2
        weights.append(load_weights(str(out / "last.safetensors")))
    a, b = weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_top5_is_left_out_with_five_classes_or_fewer(tmp_path, capsys):
    """With 5 classes or fewer every image is in the top 5: the epoch and test lines said "top-5 100.00%" and the
    files recorded it. The lines leave top-5 out; results.json has null, metrics.csv empty cells."""
    from vigla.data import BatchPrep
    from vigla.engine.evaluate import evaluate

    write_folder(str(tmp_path / "d" / "train"), ["a", "b", "c"], per_class=4, size=24)
    write_folder(str(tmp_path / "d" / "val"), ["a", "b", "c"], per_class=2, size=24)
    out = tmp_path / "r"
    flags = dict(data=str(tmp_path / "d"), model="test_vit", img_size=32, epochs=1, warmup_epochs=0, batch_size=4,
                 workers=0, aa="none", mixup=0, cutmix=0, reprob=0, ema=True, out=str(out))
    assert cli.main(["train", *argv_of(flags)]) == 0
    printed = capsys.readouterr().out
    assert "val top-1" in printed and "test top-1" in printed and "top-5" not in printed
    results = json.load(open(out / "results.json"))
    assert results["test"]["top5"] is None and 0 <= results["test"]["top1"] <= 100
    row = next(csv.DictReader(open(out / "metrics.csv")))
    assert row["val_top5"] == row["ema_val_top5"] == "" and row["val_top1"] != ""
    assert read_meta(str(out / "best.safetensors"))["val"]["top5"] is None
    # more than 5 classes: top-5 is measured (a model whose top 5 are classes 0-4, for targets 0-3 and 5)
    loader = [(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 5]), [])]
    prep = BatchPrep((0.5,) * 3, (0.5,) * 3, "cpu")
    assert evaluate(_FixedLogits([9.0, 8, 7, 6, 5, 4]), loader, prep)["top5"] == 80.0
    loader = [(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 4]), [])]
    assert evaluate(_FixedLogits([9.0, 8, 7, 6, 5]), loader, prep)["top5"] is None


class _FixedLogits(nn.Module):
    """The same logits for every image."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits.expand(len(x), -1)


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_and_mismatched_data_exit_cleanly(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vigla train: error: --data") and "no such folder" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # a run that failed before writing anything leaves no folder
    write_folder(str(tmp_path / "d" / "train"), ["a", "b"])
    write_folder(str(tmp_path / "d" / "val"), ["a", "c"])
    assert cli.main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
    assert "class folders differ" in capsys.readouterr().err


def test_a_val_class_without_images_is_one_warning_line(tmp_path):
    """A class folder of val/ without images (the class has training images) printed Python's raw warning, its
    file, line and source line, in vigla train and vigla eval. It is one 'warning:' line naming the folder."""
    data = tmp_path / "d"
    write_folder(str(data / "train"), ["a", "b", "c"], per_class=4, size=24)
    write_folder(str(data / "val"), ["a", "b"], per_class=2, size=24)
    (data / "val" / "c").mkdir()
    out = tmp_path / "r"
    flags = dict(data=str(data), model="test_vit", img_size=32, epochs=1, warmup_epochs=0, batch_size=4, workers=0,
                 aa="none", mixup=0, cutmix=0, reprob=0, ema=False, out=str(out))
    trained = run_group([sys.executable, "-m", "vigla", "train", *argv_of(flags)], timeout=120)
    evaluated = run_group([sys.executable, "-m", "vigla", "eval", str(out / "best.safetensors"), "--data", str(data),
                           "--workers", "0"], timeout=120)
    for proc in (trained, evaluated):
        assert proc.returncode == 0, proc.stderr
        warning = f"warning: {data / 'val'}: class folder(s) without images: c; the accuracy covers the other"
        lines = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
        assert len(lines) == 1 and lines[0].startswith(warning), proc.stderr
        assert "UserWarning" not in proc.stderr and "Warning:" not in proc.stderr and "sources.py" not in proc.stderr


def test_vigla_warnings_are_one_line_each(fmnist, tmp_path):
    """A resume with another number of processes (its RNG states reseeded), a Castling model on images too small for
    its auxiliary branch's eps, and a machine without a C compiler printed Python's raw UserWarning, its file, line
    and source line (the layer's pointed into torch, in the middle of the progress bar). Each is one 'warning:'
    line of its own."""
    out = tmp_path / "r"
    flags = tiny_flags(fmnist, out, model="castling_deit_tiny", epochs=1, train_subset=16, val_subset=8,
                       test_subset=8)
    aux = "warning: LinearAngularAttention: aux_eps=0.02 < 1/N_keys = 1/5: every softmax row keeps"
    trained = run_group([sys.executable, "-m", "vigla", "train", *argv_of(flags)], timeout=120)
    state = load_state(str(out / "last.state.pt"))
    save_state(str(out / "last.state.pt"), dict(state, rng=state["rng"] * 2, world_size=2))  # as 2 processes saved
    resumed = run_group([sys.executable, "-m", "vigla", "train", "--resume", "auto", "--out", str(out),
                         "--epochs", "2"], timeout=120)
    reseeded = "warning: resuming 2-process RNG states with 1 process(es): random streams are reseeded"
    no_cc = {"CC": "no-such-compiler", "VIGLA_CACHE_DIR": str(tmp_path / "cache")}
    info = run_group([sys.executable, "-m", "vigla", "info"], timeout=120, env=no_cc)
    compiler = "warning: no C compiler ('no-such-compiler') found, so vigla's fused ops on the CPU"
    for proc, expected in ((trained, [aux]), (resumed, [reseeded, aux]), (info, [compiler])):
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]  # \r: the bar's redraws
        assert len(lines) == len(expected), proc.stderr
        for start in expected:
            assert sum(line.startswith(start) for line in lines) == 1, proc.stderr
        assert "UserWarning" not in proc.stderr and "Warning:" not in proc.stderr and ".py:" not in proc.stderr


@pytest.mark.parametrize("rank, local_rank, printed", [
    (None, None, ["data", "kernel"]),  # no torchrun
    ("0", "0", ["data", "kernel"]),
    ("1", "1", []),
    ("5", "0", ["kernel"]),  # the first process of a second machine: its compiler, not the data again
])
def test_under_torchrun_a_warning_is_printed_by_one_process(monkeypatch, capsys, rank, local_rank, printed):
    """Under torchrun every rank printed the data's warning lines (N processes: N copies, each '(rank k)'). Rank 0
    prints them; a warning about what the machine has (its C compiler) is printed by each machine's first process."""
    for var, value in (("RANK", rank), ("LOCAL_RANK", local_rank)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    with warning_lines():
        warnings.warn("the data", DataWarning)
        warnings.warn("the machine", KernelWarning)
    lines = capsys.readouterr().err.splitlines()
    expected = {"data": "warning: the data", "kernel": "warning: the machine"}
    assert lines == [expected[name] for name in printed]


@pytest.mark.slow
def test_ddp_prints_the_data_warning_once(tmp_path):
    """Two processes met the same class folder without images: the line came twice, the second '(rank 1)'."""
    data = tmp_path / "d"
    write_folder(str(data / "train"), ["a", "b", "c"], per_class=4, size=24)
    write_folder(str(data / "val"), ["a", "b"], per_class=2, size=24)
    (data / "val" / "c").mkdir()
    flags = dict(data=str(data), model="test_vit", img_size=32, epochs=1, warmup_epochs=0, batch_size=2, workers=0,
                 aa="none", mixup=0, cutmix=0, reprob=0, ema=False, out=str(tmp_path / "r"))
    proc = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      "-m", "vigla", "train", *argv_of(flags)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "class folder(s) without images" in line]
    assert lines == [f"warning: {data / 'val'}: class folder(s) without images: c; the accuracy covers the other "
                     f"classes only (add images to measure these too)"], proc.stderr[-3000:]


@pytest.mark.parametrize("flags, message", [
    ({"compile": True}, "--cuda-graph and --compile: pick one"),
    ({"amp": "fp16"}, "--cuda-graph needs --amp bf16 or off"),
    ({"opt": "sgd"}, "--cuda-graph needs --opt adamw or adam"),
    ({"grad_checkpointing": True}, "--cuda-graph and --grad-checkpointing: pick one"),
    ({"device": "cpu"}, "--cuda-graph needs a CUDA device, this run is on cpu: drop the flag"),
])
def test_cuda_graph_settings_it_cannot_replay_are_one_line_errors(fmnist, tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    argv = argv_of({**tiny_flags(fmnist, out, cuda_graph=True, device="cpu"), **flags})
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vigla train: error:") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_resumed_optimizer_steps_the_way_this_run_built_it():
    """An optimizer state saved by a run stepped otherwise (a --cuda-graph run's capturable AdamW, say) loads
    with this run's fused / capturable / foreach flags, its step counts where this run's steps read them."""
    from types import SimpleNamespace
    model = nn.Linear(4, 3)
    saved_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.randn(2, 4)).sum().backward()
    saved_opt.step()
    saved = saved_opt.state_dict()
    for group in saved["param_groups"]:
        group.update(capturable=True, fused=None, foreach=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    Trainer._load_optimizer(SimpleNamespace(optimizer=opt), saved)
    group = opt.param_groups[0]
    assert (group["fused"], group["capturable"], group["foreach"]) == (True, False, None)
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())
    opt.step()
    assert all(opt.state[p]["step"].item() == 2 for p in model.parameters())


def _cuda_graph_flags(fmnist, out, **kw):
    """ViG-T at 64 px, full precision, --deterministic (the stem's cuDNN weight gradient is otherwise free
    to sum in any order, noise that AdamW amplifies), a learning rate large enough that a schedule the
    replays did not follow would show in the weights."""
    return tiny_flags(fmnist, out, model="vig_tiny", img_size=64, device="cuda", amp="off", ema=True,
                      lr=0.5, warmup_epochs=0.5, clip_grad=1.0, val_subset=8, test_subset=8, deterministic=True,
                      **kw)


@pytest.mark.gpu
def test_cuda_graph_training_follows_the_eager_run(fmnist, tmp_path):
    """``--cuda-graph`` (three eager steps, then replays) trains as the eager loop does: the warm-up and
    cosine learning rates, clipping, EMA; the same losses and weights after 12 steps. A run resumed with
    ``--cuda-graph`` from an eager run's mid-epoch checkpoint ends where the eager run ends. Both loops step
    with fused AdamW and ViG's kernels are deterministic: the weights agree to float32 rounding."""
    assert Trainer(resolve_config(_cuda_graph_flags(fmnist, tmp_path / "eager"))).run() == 0
    graphed = Trainer(resolve_config(_cuda_graph_flags(fmnist, tmp_path / "graph", cuda_graph=True)))
    assert graphed.run() == 0 and graphed.graph_step.graph is not None
    stopped = Trainer(resolve_config(_cuda_graph_flags(fmnist, tmp_path / "resumed")), stop_after_steps=8)
    assert stopped.run() == 128 + signal.SIGTERM
    resumed = Trainer(resolve_config(_cuda_graph_flags(fmnist, tmp_path / "resumed", cuda_graph=True)),
                      resume_state=str(tmp_path / "resumed" / "last.state.pt"))
    assert resumed.run() == 0
    eager = load_weights(str(tmp_path / "eager" / "last.safetensors"))
    for run in ("graph", "resumed"):
        weights = load_weights(str(tmp_path / run / "last.safetensors"))
        for k in eager:
            torch.testing.assert_close(weights[k], eager[k], rtol=1e-3, atol=1e-4)
        rows = [list(csv.DictReader(open(tmp_path / d / "steps.csv"))) for d in ("eager", run)]
        assert [r["global_step"] for r in rows[1]] == [r["global_step"] for r in rows[0]]
        assert [float(r["loss"]) for r in rows[1]] == pytest.approx([float(r["loss"]) for r in rows[0]], rel=1e-3)
        assert [float(r["lr"]) for r in rows[1]] == pytest.approx([float(r["lr"]) for r in rows[0]], rel=1e-6)


@pytest.mark.parametrize("strict", [False, True])
def test_corrupt_images_skipped_or_fatal(tmp_path, capsys, strict):
    # two bad files in a row: a sample's retries meet the second again; each file is counted once
    write_folder(str(tmp_path / "d" / "train"), ["a", "b"], per_class=4, corrupt={("b", 1), ("b", 2)})
    write_folder(str(tmp_path / "d" / "val"), ["a", "b"], per_class=2, corrupt={("a", 1)})
    flags = dict(data=str(tmp_path / "d"), model="test_vit", img_size=32, epochs=1, batch_size=4, workers=0,
                 out=str(tmp_path / "o"), aa="none", mixup=0.0, cutmix=0.0, ema=False, warmup_epochs=0,
                 strict_data=strict)
    code = cli.main(["train", *argv_of(flags)])
    if strict:
        err = capsys.readouterr().err
        assert code == 2 and ("b/1.png" in err or "b/2.png" in err)
    else:
        assert code == 0
        rows = list(csv.DictReader(open(tmp_path / "o" / "metrics.csv")))
        assert rows[0]["unreadable_images"] == "2"
        captured = capsys.readouterr()
        assert "warning: skipping unreadable image(s), replaced by the next readable one: " in captured.out
        assert "warning: 2 unreadable image(s) skipped so far" in captured.out
        # issue 14: unreadable validation / test images are named on the console, and not counted as images
        err = captured.err
        assert "1 unreadable validation image(s) left out (3 evaluated)" in err and "a/1.png" in err
        assert "1 unreadable test image(s) left out" in err
        assert json.load(open(tmp_path / "o" / "results.json"))["test"]["images"] == 3


@pytest.mark.parametrize("bad_step, log_interval, kept_step", [(7, 2, 6), (8, 2, 6), (5, 10, None)])
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(fmnist, tmp_path, bad_step, log_interval,
                                                                 kept_step):
    """The loss is read back every --log-interval steps and at the end of each epoch (before any save), not at
    every step: a NaN is found at the next read-back, named by its own step, and no weights after it are saved
    (step 7: found at step 8; step 5 with --log-interval 10: found at the end of epoch 1, before its save)."""
    trainer = Trainer(resolve_config(tiny_flags(fmnist, tmp_path / "nan", log_interval=log_interval)))
    calls = {"n": 0}
    criterion = trainer.criterion

    def poisoned(out, y):
        calls["n"] += 1
        loss = criterion(out, y)
        return loss * float("nan") if calls["n"] == bad_step else loss

    trainer.criterion = poisoned
    with pytest.raises(NonFiniteLossError) as e:
        trainer.run()
    msg = str(e.value)
    epoch, step = divmod(bad_step - 1, 6)
    assert f"became nan at epoch {epoch + 1}, step {step + 1}/6 (global step {bad_step})" in msg
    last = tmp_path / "nan" / "last.safetensors"
    if kept_step is None:
        assert "no checkpoint had been saved yet" in msg and not last.exists()
        assert "run the command again with --lr ... (there is nothing to resume yet)" in msg and "--resume" not in msg
        assert not (tmp_path / "nan" / "best.safetensors").exists()
        return
    assert "the last good checkpoint is kept" in msg and f"global step {kept_step})" in msg
    assert f"continue with: vigla train --resume auto --out {tmp_path / 'nan'} --lr ..." in msg
    assert read_meta(str(last))["global_step"] == kept_step
    assert load_state(str(tmp_path / "nan" / "last.state.pt"))["global_step"] == kept_step
    assert all(torch.isfinite(v).all() for v in load_weights(str(last)).values())
    assert all(torch.isfinite(v).all() for v in load_weights(str(tmp_path / "nan" / "best.safetensors")).values())


def test_nonfinite_weights_after_a_finite_loss_are_not_saved(fmnist, tmp_path):
    """The last step of epoch 2 has a finite loss but leaves a NaN weight (as an inf gradient can): the check
    before the epoch's save stops the run; the checkpoint of epoch 1 stays."""
    trainer = Trainer(resolve_config(tiny_flags(fmnist, tmp_path / "w")))
    real_step = trainer.train_step

    def step(x, y):
        loss = real_step(x, y)
        if trainer.global_step == 12:
            with torch.no_grad():
                trainer.core.head.weight[0, 0] = float("nan")
        return loss

    trainer.train_step = step
    with pytest.raises(NonFiniteLossError, match="weights became NaN or inf by global step 12") as e:
        trainer.run()
    assert "the last good checkpoint is kept" in str(e.value) and "global step 6)" in str(e.value)
    assert load_state(str(tmp_path / "w" / "last.state.pt"))["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in load_weights(str(tmp_path / "w" / "best.safetensors")).values())


def test_train_step_does_not_read_tensors_back(fmnist, tmp_path, monkeypatch):
    """Trainer.train_step waits for nothing: no .item() / .tolist() / float() / bool() of a tensor in vigla's
    code between two read-backs (on a GPU each would stall the launch queue; see test_train_step_no_cuda_sync)."""
    trainer = Trainer(resolve_config(tiny_flags(fmnist, tmp_path / "sync", log_interval=100)))
    reads = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("vigla"):
                reads.append(f"{caller}: {name}")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    images, targets, _ = next(iter(trainer.train_loader))
    x, y = trainer.prep_train(images), targets
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "numpy"):
        spy(name)
    losses = [trainer.train_step(x, y) for _ in range(3)]
    monkeypatch.undo()
    assert reads == [] and all(loss.shape == () for loss in losses)
    trainer._pending = losses
    trainer._read_losses()
    assert trainer.epoch_loss[1] == 3 and len(trainer._window) == 3
    trainer.close()


@pytest.mark.gpu
def test_train_step_no_cuda_sync(fmnist, tmp_path):
    """On CUDA, train_step launches work and returns: torch's sync debug mode raises at any synchronizing
    call (a read-back, a blocking copy) during three steps."""
    trainer = Trainer(resolve_config(tiny_flags(fmnist, tmp_path / "cuda", device="cuda", log_interval=100)))
    images, targets, _ = next(iter(trainer.train_loader))
    x, y = trainer.prep_train(images), targets.to(trainer.device, non_blocking=True)
    trainer.train_step(x, y)  # the first step allocates optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [trainer.train_step(x, y) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer._pending = losses
    trainer._read_losses()
    assert trainer.epoch_loss[1] == 3
    trainer.close()


def test_a_failed_resume_with_a_bad_flag_keeps_the_run_settings(fmnist, tmp_path, capsys, monkeypatch):
    """Issue 14: a resume with --lr 1e6 stopped on NaN but left config.yaml holding the bad lr, so a plain
    --resume auto failed again. config.yaml is rewritten with each checkpoint only: it always describes the
    checkpoint beside it. A resume says which settings it takes and which flags change them."""
    out = tmp_path / "r"
    assert cli.main(["train", *argv_of(tiny_flags(fmnist, out, epochs=1))]) == 0
    saved = (out / "config.yaml").read_text()
    real_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, x, y: real_step(self, x, y) * float("nan"))
    capsys.readouterr()
    assert cli.main(["train", "--resume", "auto", "--out", str(out), "--epochs", "2", "--lr", "1e6"]) == 3
    captured = capsys.readouterr()
    assert "changed by this command: --epochs 1 -> 2, --lr 0.002 -> 1000000.0" in captured.out
    assert captured.err.count("vigla train: error: the training loss became nan") == 1
    assert f"vigla train --resume auto --out {out} --lr" in captured.err
    assert (out / "config.yaml").read_text() == saved
    monkeypatch.undo()
    assert cli.main(["train", "--resume", "auto", "--out", str(out), "--epochs", "2"]) == 0
    assert "changed by this command: --epochs 1 -> 2\n" in capsys.readouterr().out
    assert read_yaml(str(out / "config.yaml"))["epochs"] == 2  # and now it describes the new checkpoint


def test_short_run_on_an_image_folder_fits_the_recipe_warmup():
    """Issue 14: `vigla train --data DIR --epochs 1` failed with "--warmup-epochs must be in [0, 1), got 20.0",
    the 20 coming from the recipe preset. A warm-up the preset sets keeps its share of the run (20/300);
    one the user sets is checked, and the message says where each number came from."""
    cfg = resolve_config({"data": "/x", "epochs": 1})
    assert cfg.preset == "recipe" and cfg.warmup_epochs == pytest.approx(1 / 15)
    assert resolve_config({"data": "/x", "epochs": 100}).warmup_epochs == 20  # fits: the recipe's own
    with pytest.raises(UserError, match=r"got 20.0 \(from the --config file; --epochs 1 from the flags\)"):
        resolve_config({"data": "/x", "epochs": 1}, {"warmup_epochs": 20.0})


def test_run_json_records_the_commit(fmnist, tmp_path, monkeypatch):
    """Issue 15: run.json recorded "commit": "HEAD" (git's output in a repository without commits, with a
    non-zero exit that nobody checked). One helper, honouring VIGLA_COMMIT."""
    from vigla.engine.outputs import git_info

    monkeypatch.setenv("VIGLA_COMMIT", "0123abc")
    assert Trainer(resolve_config(tiny_flags(fmnist, tmp_path / "c", epochs=1))).run() == 0
    run = json.load(open(tmp_path / "c" / "run.json"))
    assert run["commit"] == "0123abc"
    monkeypatch.delenv("VIGLA_COMMIT")
    empty = tmp_path / "repo"
    empty.mkdir()
    subprocess.run(["git", "init", "-q", str(empty)], check=True)
    assert git_info(empty) == {"commit": "unknown", "dirty": None}  # not "HEAD"
    assert git_info(tmp_path) == {"commit": "unknown", "dirty": None}  # no repository at all
    here = git_info()
    assert here["commit"] == "unknown" or len(here["commit"]) == 40


def test_out_of_memory_suggests_a_smaller_batch(fmnist, tmp_path, capsys, monkeypatch):
    def oom(self, x, y):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    code = cli.main(["train", *argv_of(tiny_flags(fmnist, tmp_path / "oom"))])
    err = capsys.readouterr().err
    assert code == 4 and "out of memory" in err and "Try --batch-size 4" in err and "Traceback" not in err


def test_resume_refuses_another_model_or_batch(fmnist, tmp_path):
    flags = tiny_flags(fmnist, tmp_path / "r", epochs=1)
    assert Trainer(resolve_config(flags)).run() == 0
    state = str(tmp_path / "r" / "last.state.pt")
    with pytest.raises(CheckpointError, match="is a test_vit checkpoint, this run builds test_vit2"):
        Trainer(resolve_config(dict(flags, model="test_vit2")), resume_state=state)
    with pytest.raises(CheckpointError, match="global batch of 8"):
        Trainer(resolve_config(dict(flags, batch_size=4)), resume_state=state)
    with pytest.raises(UserError, match="no checkpoint"):
        train_cli.build_config(parse(["--resume", "auto", "--out", str(tmp_path / "empty")]))


def test_resume_with_fewer_epochs_than_done_is_refused(fmnist, tmp_path, capsys):
    """`--resume RUN --epochs 1` on a run that did 2 epochs tested the 2-epoch weights again and wrote a
    results.json saying 1 epoch with the steps of 2. It is refused in one line that says how many epochs the run
    did and what to pass; the run's files stay as they were. --epochs 2 (the epochs done) tests it again."""
    out = tmp_path / "r"
    assert cli.main(["train", *argv_of(tiny_flags(fmnist, out, epochs=2))]) == 0
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vigla train: error: --epochs 1 is fewer than the 2 epoch(s) that") and err.count("\n") == 1
    assert "pass --epochs 2 to test it again, more to train it further" in err
    assert f"vigla eval {out}/best.safetensors" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")} == kept
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 0  # the epochs done: tested again
    results = json.load(open(out / "results.json"))
    assert (results["epochs"], results["global_step"]) == (2, 12)
    # stopped inside its 2nd epoch (1 epoch and 3 steps done): --epochs 1 is refused too, 2 would finish it
    mid = tmp_path / "m"
    assert Trainer(resolve_config(tiny_flags(fmnist, mid)), stop_after_steps=9).run() == 128 + signal.SIGTERM
    with pytest.raises(UserError, match=r"--epochs 1 is fewer than the 1 epoch\(s\) and 3 step\(s\) that .* "
                                        r"\(global step 9\): pass --epochs 2 or more to train it further"):
        Trainer(resolve_config(tiny_flags(fmnist, mid, epochs=1)), resume_state=str(mid / "last.state.pt"))


# ---------------------------------------------------------------------------------------------- aux-loss contract
class AuxNet(nn.Module):
    """Tiny classifier with a Castling-style auxiliary loss on a parameter the main loss never sees."""

    def __init__(self, num_classes=10, img_size=32, **kwargs):
        super().__init__()
        self.pretrained_cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, num_classes))
        self.aux_param = nn.Parameter(torch.ones(3))
        self.progress = []

    def forward(self, x):
        return self.body(x)

    def set_aux_progress(self, p: float) -> None:
        self.progress.append(p)

    def aux_loss(self) -> torch.Tensor:
        return (self.aux_param ** 2).sum() * 0.1

    def aux_stats(self) -> dict:
        return {"aux_norm": self.aux_param.norm().item()}


@register_model
def vigla_test_auxnet(pretrained=False, **kwargs):
    return AuxNet(**kwargs)


def test_aux_loss_contract(fmnist, tmp_path):
    trainer = Trainer(resolve_config(tiny_flags(fmnist, tmp_path / "aux2", model="vigla_test_auxnet", lr=0.5)))
    assert trainer.run() == 0
    core = trainer.core
    assert core.progress[0] == 0.0 and core.progress == sorted(core.progress) and max(core.progress) < 1
    assert len(core.progress) == 12
    assert core.aux_param.norm() < torch.ones(3).norm()  # only the aux loss can have moved it
    rows = list(csv.DictReader(open(tmp_path / "aux2" / "metrics.csv")))
    assert float(rows[1]["aux_aux_norm"]) < float(rows[0]["aux_aux_norm"]) < 3 ** 0.5


# ---------------------------------------------------------------------------------------------- the GPU script
@pytest.mark.slow
def test_gpu_train_script_runs_on_cpu(fmnist, tmp_path):
    """benchmarks/gpu_train.py end to end with a tiny model, so the GPU session does not find its bugs."""
    for split, n in (("train", 6), ("val", 2)):
        write_folder(str(tmp_path / "inette" / split), ["n0", "n1", "n2"], per_class=n, size=40)
    out = tmp_path / "out"
    proc = run_group([sys.executable, "benchmarks/gpu_train.py", "--device", "cpu", "--models", "test_vit",
                      "--imagenette", str(tmp_path / "inette"), "--fmnist-dir", fmnist, "--in-epochs", "1",
                      "--in-warmup", "0", "--in-img", "32", "--in-batch", "6", "--fm-epochs", "1", "--fm-img", "32",
                      "--fm-batch", "8", "--workers", "0", "--out", str(out), "--extra", "--val-subset", "16"],
                     timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.load(open(out / "train_compare.json"))
    assert [(r["data"], r["model"]) for r in result["rows"]] == [("imagenette", "test_vit"),
                                                                 ("fashion-mnist", "test_vit")]
    for r in result["rows"]:
        assert [e["img_size"] for e in r["eval"]] == [32, 64, 128] and r["epochs_done"] == 1
    assert result["git"]["commit"] and result["command"].startswith("benchmarks/gpu_train.py")
    assert (out / "train_compare.md").read_text().count("| test_vit |") == 2
    assert (out / "train_compare_imagenette.png").is_file()


def test_git_info_dirty_ignores_the_results_being_recorded(tmp_path, monkeypatch):
    """A benchmark writes its log and JSON under benchmarks/results (tracked) while it runs: that is the record,
    not a change to the code, so it does not make the commit "dirty"; any other tracked change does."""
    from vigla.engine.outputs import git_info

    monkeypatch.delenv("VIGLA_COMMIT", raising=False)
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "results" / "a.json").write_text("{}\n")
    (repo / "code.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], check=True)
    assert git_info(repo)["dirty"] is False
    (repo / "benchmarks" / "results" / "a.json").write_text('{"rows": []}\n')
    assert git_info(repo)["dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    assert git_info(repo)["dirty"] is True


def test_vit_sizes_must_be_whole_patches():
    """A timm ViT runs at a size its patch size does not divide (the strided conv drops the remainder): refused
    for training and evaluation, with the two nearest sizes that work; ViG takes any size."""
    from vigla.engine.modeling import check_runs_at

    vit = timm.create_model("test_vit", img_size=32)
    patch = vit.patch_embed.patch_size[0]
    with pytest.raises(UserError, match=rf"not a multiple of its patch size {patch} .* choose {2 * patch} or "
                                        rf"{3 * patch}"):
        check_runs_at(vit, "test_vit", 2 * patch + 1, torch.device("cpu"), "--img-size")
    check_runs_at(timm.create_model("vig_tiny", depth=1), "vig_tiny", 33, torch.device("cpu"), "--img-size")


def test_a_state_without_what_vigla_train_saves_is_one_line(fmnist, tmp_path, capsys):
    """A --resume state that lacks keys `vigla train` saves died on a raw KeyError (e.g. 'model_name'); it is
    refused in one line that names the missing keys, through the command and through Trainer alike."""
    from vigla.engine.checkpoint import save_state

    flags = tiny_flags(fmnist, tmp_path / "r", epochs=1)
    assert Trainer(resolve_config(flags)).run() == 0
    full = load_state(str(tmp_path / "r" / "last.state.pt"))
    for i, (drop, named) in enumerate(((("model_name",), "model_name"),
                                       (("global_batch", "rng"), "global_batch, rng"),
                                       (("model", "scheduler"), "scheduler"))):  # format 1: the weights beside it
        path = tmp_path / f"s{i}" / "last.state.pt"
        path.parent.mkdir()
        save_state(str(path), {k: v for k, v in full.items() if k not in drop and k != "format"})
        message = f"{path} is not the state of a `vigla train` run (it lacks {named}): resume a run folder"
        capsys.readouterr()
        assert cli.main(["train", "--resume", str(path.parent), "--epochs", "2"]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"vigla train: error: {message}") and captured.err.count("\n") == 1
        assert "Traceback" not in captured.err and "KeyError" not in captured.err and "resuming" not in captured.out
        with pytest.raises(CheckpointError, match="it lacks " + named):
            Trainer(resolve_config(dict(flags, epochs=2, out=None)), resume_state=str(path))
        assert sorted(os.listdir(path.parent)) == ["last.state.pt"]


#: a run's config.yaml, damaged: its text -> the problem the error line names (test_dense.py's test too)
DAMAGED_CONFIGS = {"- a\n- b\n": "holds a list, not a mapping of setting: value", "5\n": "holds an int, not a mapping",
                   "": "is empty", "# nothing\n": "holds no settings",
                   "epochs: [1\nlr: 2\n": "is not valid YAML (line 2, column 3: expected ',' or ']', but got ':')",
                   b"\xff\xfe": "cannot be read (UnicodeDecodeError: "}


def damaged_configs(config):
    """Each :data:`DAMAGED_CONFIGS` text written in turn as the run's ``config`` -> the problem its error names; when
    the caller's resume has been refused, the run folder's files are checked to be as they were."""
    files = lambda: {p.name: p.read_bytes() for p in config.parent.iterdir() if p.is_file()}  # noqa: E731
    for text, problem in DAMAGED_CONFIGS.items():
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
        kept = files()
        yield problem
        assert files() == kept


def test_a_damaged_config_yaml_of_a_resumed_run_is_one_line(fmnist, tmp_path, capsys):
    """An empty config.yaml resumed the run with the preset's settings (to 'is a test_vit checkpoint, this run
    builds vig_tiny'); invalid YAML was told in the parser's many lines and a list or a scalar as 'unreadable', both
    with 'repair it, or give the run's settings with --config or flags', which the error came back to anyway: each
    is one line naming the file, the problem and the ways on; the run's files stay as they were."""
    out = tmp_path / "r"
    assert Trainer(resolve_config(tiny_flags(fmnist, out, epochs=1))).run() == 0
    config = out / "config.yaml"
    for problem in damaged_configs(config):
        capsys.readouterr()
        assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"vigla train: error: {config} {problem}")
        assert captured.err.endswith(": the run folder's config.yaml is damaged; restore it, or remove it and give "
                                     "the run's settings with --config or flags, or start a new run without "
                                     "--resume\n") and captured.err.count("\n") == 1 and "resuming" not in captured.out
    config.unlink()  # the way on that the line names: the run's settings from the flags
    assert cli.main(["train", "--resume", str(out), *argv_of(tiny_flags(fmnist, out, epochs=2))]) == 0
    assert "no config.yaml beside it" in capsys.readouterr().out


def test_a_warmup_that_rounds_to_the_whole_run_leaves_the_cosine_a_step(fmnist, tmp_path):
    """--warmup-epochs 0.95 of a 1-epoch run of 6 steps rounded to all 6: timm's cosine got 0 steps and the run
    died on a bare AssertionError; the warm-up now takes at most all steps but one (a warm-up rounding to 0 steps
    is none: the cosine starts at the peak)."""
    from vigla.engine.run import warmup_steps

    trainer = Trainer(resolve_config(tiny_flags(fmnist, tmp_path / "r", epochs=1, warmup_epochs=0.95)))
    assert (trainer.total_steps, trainer.scheduler.warmup_t, trainer.scheduler.t_initial) == (6, 5, 1)
    assert trainer.run() == 0
    assert json.load(open(tmp_path / "r" / "results.json"))["global_step"] == 6
    assert [warmup_steps(w, 6, 6) for w in (0.95, 0.9, 0.5, 0.05, 0)] == [5, 5, 3, 0, 0]
    assert warmup_steps(1.0, 6, 12) == 6 and warmup_steps(0.5, 1, 1) == 0


#: a setting of the wrong type in a run's config.yaml: the line it replaces -> the text the error line names
#: (test_dense.py's test too)
WRONG_TYPES = {"epochs: ten": "epochs must be an integer, got 'ten'; correct it there, or give --epochs to override it",
               "lr: [1]": "lr must be a number, got [1]; correct it there, or give --lr to override it"}


def wrong_type_configs(config):
    """Each :data:`WRONG_TYPES` line written in turn into the run's ``config`` (its other lines as they were) ->
    (the error's end, the flags a resume adds: a flag given for the setting itself would replace it)."""
    import re

    good = config.read_text()
    for line, problem in WRONG_TYPES.items():
        key = line.split(":")[0]
        config.write_text(re.sub(rf"(?m)^{key}: .*$", line, good))
        yield problem, [] if key == "epochs" else ["--epochs", "2"]


def test_a_setting_of_the_wrong_type_is_told_with_its_file(fmnist, tmp_path, capsys):
    """A resumed run's config.yaml with `epochs: ten` said 'settings: epochs must be int, got 'ten'' without the
    file it came from: one line names the file, the setting, the value, the type and the fix, and a flag that
    replaces the value resumes the run. A --config file's is told with its file, a flag's from Python as the flag."""
    out = tmp_path / "r"
    assert Trainer(resolve_config(tiny_flags(fmnist, out, epochs=1))).run() == 0
    config = out / "config.yaml"
    for problem, more in wrong_type_configs(config):
        capsys.readouterr()
        assert cli.main(["train", "--resume", str(out), *more]) == 2
        captured = capsys.readouterr()
        assert captured.err == f"vigla train: error: {config}: {problem}\n"
    assert cli.main(["train", "--resume", str(out), "--lr", "0.002", "--epochs", "2"]) == 0  # the flag replaces it
    assert read_yaml(str(config))["lr"] == 0.002  # and the resumed run saved it
    (tmp_path / "c.yaml").write_text("epochs: ten\n")
    capsys.readouterr()
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "2"]) == 2
    assert capsys.readouterr().err == (f"vigla train: error: config file {tmp_path / 'c.yaml'}: epochs must be an "
                                       f"integer, got 'ten'; correct it there\n")
    (tmp_path / "c.yaml").write_text("lr: 5e-4\n")
    with pytest.raises(UserError, match=r"lr must be a number, got '5e-4' \(YAML reads 5e-4 as text: write 0.0005\)"):
        read_yaml(str(tmp_path / "c.yaml"))
    with pytest.raises(UserError, match=r"^--epochs must be an integer, got 'ten'$"):
        resolve_config(tiny_flags(fmnist, out, epochs="ten"))
    with pytest.raises(UserError, match=r"^saved.yaml: amp must be one of auto, bf16, fp16, off, got 'x'; correct"):
        resolve_config({}, saved={"amp": "x"}, saved_path="saved.yaml")


def add_unknown_settings(config, command):
    """Keys that no setting of ``command`` matches (a typo of epochs among them), added to a run's ``config`` -> the
    warning line that a resume prints (test_dense.py's test too)."""
    with open(config, "a") as fh:
        fh.write("zeta: 1\nepoch: 3\n")
    return (f"warning: {config}: unknown setting(s) epoch, zeta ignored; the run resumes with its other settings "
            f"(`{command} --help` lists them)\n")


def resume_copies(plain, command, argv, capsys):
    """Resume the run folder ``plain`` and a copy of it whose config.yaml holds unknown settings with ``argv``
    (:func:`vigla.cli.main`'s) -> their last weights, once each resume has printed the copy's warning line alone."""
    typo = plain.parent / f"{plain.name}-typo"
    shutil.copytree(plain, typo)
    warning = add_unknown_settings(typo / "config.yaml", command)
    for out in (plain, typo):
        capsys.readouterr()
        assert cli.main([*argv, "--resume", str(out), "--epochs", "2"]) == 0
        captured = capsys.readouterr()
        assert [line for line in captured.err.splitlines(True) if "warning" in line] == ([warning] if out == typo
                                                                                          else [])
        assert f"resuming {out / 'last.state.pt'} with the settings of its config.yaml" in captured.out
    assert "zeta" not in (typo / "config.yaml").read_text()  # the resumed run rewrote it
    return [load_weights(str(out / "last.safetensors")) for out in (plain, typo)]


def test_unknown_settings_in_a_resumed_runs_config_yaml_are_one_warning_line(fmnist, tmp_path, capsys):
    """Keys of a resumed run's config.yaml that no setting matches (a typo: `epoch: 3`) were dropped without a word:
    one warning line names the file and the keys, and the run resumes as it does without them."""
    assert Trainer(resolve_config(tiny_flags(fmnist, tmp_path / "r", epochs=1))).run() == 0
    plain, typo = resume_copies(tmp_path / "r", "vigla train", ["train"], capsys)
    assert plain.keys() == typo.keys() and all(torch.equal(plain[k], typo[k]) for k in plain)


def hyphenate(config):
    """Each key of a run's ``config`` rewritten as its long flag's name (``batch-size: 8``), as ``--config`` takes it
    (test_dense.py's test too) -> the text it held."""
    import re

    text = config.read_text()
    config.write_text(re.sub(r"(?m)^(\w+):", lambda m: m[1].replace("_", "-") + ":", text))
    assert "batch-size: " in config.read_text()
    return text


def test_a_resumed_runs_config_yaml_takes_the_keys_that_config_takes(fmnist, tmp_path, capsys):
    """`batch-size: 8` in a resumed run's config.yaml, which --config takes, was an unknown setting there: ignored,
    with the preset's batch size in its place (which the resume then refused). Its keys are read as --config reads
    them: the run resumes with each of its settings, and saves them as it writes them."""
    out = tmp_path / "r"
    assert Trainer(resolve_config(tiny_flags(fmnist, out, epochs=1))).run() == 0
    written = hyphenate(out / "config.yaml")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "changed by this command: --epochs 1 -> 2\n" in captured.out
    assert (out / "config.yaml").read_text() == written.replace("\nepochs: 1\n", "\nepochs: 2\n")


def add_location_settings(config, elsewhere):
    """``out`` (another folder, ``elsewhere``) and ``resume``, which a run does not save, added to a run's ``config``
    -> the warning line that a resume prints (test_dense.py's test too)."""
    with open(config, "a") as fh:
        fh.write(f"out: {elsewhere}\nresume: auto\n")
    return (f"warning: {config}: out, resume ignored: the run to resume and the folder it writes to come from --resume "
            f"and --out, not from the config.yaml found in that run's folder\n")


def test_a_resumed_runs_config_yaml_does_not_move_the_run(fmnist, tmp_path, capsys):
    """`out:` and `resume:` written into a resumed run's config.yaml (a run saves neither: which run it is and where it
    writes are known before its config.yaml is found) were dropped without a word: one warning line names them and
    says why; the run resumes in its own folder with its other settings."""
    out = tmp_path / "r"
    assert Trainer(resolve_config(tiny_flags(fmnist, out, epochs=1))).run() == 0
    warning = add_location_settings(out / "config.yaml", tmp_path / "elsewhere")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines(True) if "warning" in line] == [warning]
    assert "changed by this command: --epochs 1 -> 2\n" in captured.out
    assert not (tmp_path / "elsewhere").exists() and "out:" not in (out / "config.yaml").read_text()
    assert json.load(open(out / "results.json"))["global_step"] == 12


def test_a_config_file_that_holds_no_settings_is_one_line(tmp_path, capsys):
    """A --config file that is not valid YAML was told in the parser's lines squeezed into one long one ('while
    parsing a flow sequence in "<file>", line 1, column 9 expected ...'), an empty one was taken as no settings: each
    is one line naming the file, the problem (for YAML its line, column and the parser's short problem) and the
    fix, as a resumed run's damaged config.yaml is told."""
    path = tmp_path / "c.yaml"
    for problem in damaged_configs(path):
        capsys.readouterr()
        assert cli.main(["train", "--config", str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"vigla train: error: config file {path} {problem}"), captured.err
        assert captured.err.endswith(": write it as lines of setting: value (e.g. epochs: 10), or leave --config "
                                     "out\n"), captured.err
        assert captured.err.count("\n") == 1 and "while parsing" not in captured.err and not captured.out


def test_steps_csv_logs_the_learning_rate_each_step_trained_at(fmnist, tmp_path):
    """steps.csv logged the learning rate after the schedule's step, the next step's: a 2-step run with a 1-step
    warm-up showed the peak rate on step 1, which trained at the warm-up's first rate, and the cosine's end on step
    2, which trained at the peak. Each row now holds the rate its step trained at; the curves are still drawn."""
    out = tmp_path / "r"
    run = Trainer(resolve_config(tiny_flags(fmnist, out, epochs=1, train_subset=16, log_interval=1)))
    assert (run.total_steps, run.scheduler.warmup_t) == (2, 1)
    assert run.run() == 0
    rows = list(csv.DictReader(open(out / "steps.csv")))
    scale = run.global_batch / 512
    assert [int(r["global_step"]) for r in rows] == [1, 2]
    assert [float(r["lr"]) for r in rows] == pytest.approx([run.cfg.warmup_lr * scale, run.cfg.lr * scale])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    epochs = list(csv.DictReader(open(out / "metrics.csv")))  # the epoch's rate: its last step's, not the next one's
    assert [float(r["lr"]) for r in epochs] == pytest.approx([run.cfg.lr * scale])
