"""vigla.engine.checkpoint: atomic writes, safetensors + JSON weights, RNG capture, weights_only training state."""
import errno
import os
import random

import numpy as np
import pytest
import timm
import torch

from vigla.engine.checkpoint import (capture_rng, check_state_dict, load_into, load_state, load_weights, read_meta,
                                     restore_rng, save_state, save_weights, unwrap)
from vigla.engine.errors import CheckpointError, OutputError
from vigla.engine.outputs import atomic_write, write_text


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "f.txt")
    write_text(path, "old")

    def broken(f):
        f.write(b"half")
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write .*f.txt: No space left on device \(ENOSPC\); the disk is"):
        atomic_write(path, broken)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temporary file left behind

    def other(f):
        f.write(b"x")
        raise RuntimeError("not an OSError")

    with pytest.raises(RuntimeError, match="not an OSError"):  # passes through, and is cleaned up too
        atomic_write(path, other)
    assert os.listdir(tmp_path) == ["f.txt"] and open(path).read() == "old"


def test_weights_round_trip_with_meta(tmp_path):
    model = timm.create_model("test_vit", num_classes=7, img_size=32)
    path = str(tmp_path / "w.safetensors")
    save_weights(path, model.state_dict(), {"model": "test_vit", "model_args": {"num_classes": 7}})
    assert read_meta(path)["model"] == "test_vit"
    os.remove(tmp_path / "w.json")  # the description travels inside the weights file too
    assert read_meta(path)["model_args"] == {"num_classes": 7}
    # written like every other output (0666 less the umask), not 0600 as safetensors' own writer does
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
    other = timm.create_model("test_vit", num_classes=7, img_size=32)
    load_into(other, load_weights(path), "w")
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert read_meta(str(tmp_path / "none.safetensors")) is None


def test_incompatible_weights_name_the_keys(tmp_path):
    model = timm.create_model("test_vit", num_classes=7, img_size=32)
    sd = model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["norm.bias"]
    sd["head.weight"] = torch.zeros(3, sd["head.weight"].shape[1])
    with pytest.raises(CheckpointError) as e:
        check_state_dict(sd, model, "ckpt")
    msg = str(e.value)
    assert msg.startswith("ckpt does not fit this VisionTransformer") and "\n" not in msg
    assert "1 missing: norm.bias" in msg and "1 unexpected: extra.weight" in msg
    assert "head.weight (3, 64) (model: (7, 64))" in msg
    assert isinstance(e.value, ValueError)  # what timm's checkpoint filters raise
    fixed = {k: v for k, v in sd.items() if k != "extra.weight"} | {"norm.bias": model.state_dict()["norm.bias"]}
    check_state_dict(fixed, model, classifier_may_differ=True)  # only the head differs, in its class count
    with pytest.raises(CheckpointError, match="with a different shape: head.weight"):
        check_state_dict(fixed, model)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        (tmp_path / "bad.safetensors").write_bytes(b"garbage")
        load_weights(str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(str(tmp_path / "missing.safetensors"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_rng_capture_restores_every_stream_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    path = str(tmp_path / "s.state.pt")
    save_state(path, {"rng": [capture_rng()], "step": 5})
    expected = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    state = load_state(path)  # torch.load(weights_only=True) inside
    assert state["step"] == 5
    restore_rng(state["rng"][0])
    assert (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


def test_state_files_never_unpickle_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = str(tmp_path / "evil.state.pt")
    torch.save({"format": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a vigla training-state file"):
        load_state(path)
    torch.save({"format": 99}, path)
    with pytest.raises(CheckpointError, match="format 2 expected"):
        load_state(path)


def test_optimizer_and_scheduler_state_survive_weights_only(tmp_path):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    model = timm.create_model("test_vit", num_classes=3, img_size=32)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=10, warmup_epochs=2, step_on_epochs=False,
                                   updates_per_epoch=1, warmup_prefix=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step_update(3)
    path = str(tmp_path / "o.state.pt")
    save_state(path, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    state = load_state(path)
    opt2 = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    opt2.load_state_dict(state["optimizer"])
    sched2, _ = create_scheduler_v2(opt2, "cosine", num_epochs=10, warmup_epochs=2, step_on_epochs=False,
                                    updates_per_epoch=1, warmup_prefix=True)
    sched2.load_state_dict(state["scheduler"])
    sched2.step_update(3)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    p = next(iter(opt.state))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state[p]["exp_avg"])


def test_unwrap_sees_through_compile_and_ddp_style_wrappers():
    model = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert unwrap(Wrapper(model)) is model
    assert unwrap(torch.compile(model)) is model
