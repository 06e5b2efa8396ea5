"""vigla eval: vigla and foreign checkpoints, several resolutions, the JSON report, clear errors."""
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch

from test_data import write_fake_fmnist, write_folder
from vigla import cli
from vigla.data import BatchPrep, TransformedDataset, collate, eval_transform, scan_image_folder
from vigla.engine.checkpoint import save_weights

MEAN = STD = (0.5, 0.5, 0.5)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run best on one thread


@pytest.fixture()
def folder(tmp_path):
    write_folder(str(tmp_path / "data" / "val"), [f"c{i}" for i in range(4)], per_class=5, size=24)
    return str(tmp_path / "data")


def vigla_checkpoint(path, model_name="test_vit", num_classes=4, img_size=32, classes=None):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=num_classes, img_size=img_size)
    meta = {"model": model_name, "model_args": {"num_classes": num_classes, "img_size": img_size},
            "classes": classes or [f"c{i}" for i in range(num_classes)],
            "data_config": {"mean": list(MEAN), "std": list(STD), "img_size": img_size, "interpolation": "bilinear",
                            "crop_pct": 1.0}}
    save_weights(str(path), model.state_dict(), meta)
    return model


def reference_top1(model, folder, size):
    src = scan_image_folder(folder)
    ds = TransformedDataset(src, eval_transform(size, crop_pct=1.0, interpolation="bilinear", mean=MEAN, std=STD))
    images, targets, _ = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        logits = model.eval()(BatchPrep(MEAN, STD, "cpu")(images))
    return 100 * (logits.argmax(-1) == targets).double().mean().item()


def test_eval_vigla_checkpoint_at_several_sizes(tmp_path, folder, capsys):
    ckpt = tmp_path / "w.safetensors"
    model = vigla_checkpoint(ckpt)
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(ckpt), "--data", folder, "--img-size", "32", "64", "--batch-size", "6",
                     "--out", str(out)]) == 0
    report = json.load(open(out))
    assert [r["img_size"] for r in report["results"]] == [32, 64] and report["images"] == 20
    assert report["results"][0]["top1"] == pytest.approx(reference_top1(model, folder + "/val", 32))
    model.set_input_size(img_size=64)
    assert report["results"][1]["top1"] == pytest.approx(reference_top1(model, folder + "/val", 64))
    # 4 classes: every image is in the top 5 (it read 100%); top-5 is null and out of the table
    assert all(r["top5"] is None for r in report["results"])
    table = capsys.readouterr().out
    assert "top-1 %" in table and "\n    64 |" in table and "top-5" not in table


def test_eval_defaults_to_fmnist_test_and_writes_beside_the_checkpoint(tmp_path, capsys):
    fm = write_fake_fmnist(str(tmp_path / "fm"), n_train=10, n_test=30)
    from vigla.data import FMNIST_CLASSES
    ckpt = tmp_path / "run" / "best.safetensors"
    ckpt.parent.mkdir()
    vigla_checkpoint(ckpt, num_classes=10, classes=list(FMNIST_CLASSES))
    assert cli.main(["eval", str(ckpt), "--fmnist-dir", fm]) == 0
    report = json.load(open(tmp_path / "run" / "best.eval-fmnist.json"))
    assert report["data"] == "fashion-mnist test" and report["results"][0]["images"] == 30
    assert 0 <= report["results"][0]["top5"] <= 100 and "top-5 %" in capsys.readouterr().out  # 10 classes


def test_eval_foreign_checkpoint_through_timm(tmp_path, folder):
    torch.manual_seed(1)
    model = timm.create_model("test_vit", num_classes=4)
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)  # the layout of official ViG releases
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(path), "--model", "test_vit", "--data", folder, "--img-size", "160",
                     "--crop-pct", "1.0", "--interpolation", "bilinear", "--out", str(out)]) == 0
    got = json.load(open(out))["results"][0]["top1"]
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    src = scan_image_folder(folder + "/val")
    ds = TransformedDataset(src, eval_transform(160, crop_pct=1.0, interpolation="bilinear", mean=mean, std=std))
    images, targets, _ = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        ref = (model.eval()(BatchPrep(mean, std, "cpu")(images)).argmax(-1) == targets).double().mean().item()
    assert got == pytest.approx(100 * ref)


def test_eval_errors_are_clear(tmp_path, folder, capsys):
    ckpt = tmp_path / "w.safetensors"
    vigla_checkpoint(ckpt)
    assert cli.main(["eval", str(ckpt), "--model", "test_vit2", "--data", folder]) == 2
    err = capsys.readouterr().err
    assert "does not fit this VisionTransformer" in err and "missing:" in err and "Traceback" not in err

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": timm.create_model("test_vit", num_classes=4).state_dict(), "config": Evil()}, evil)
    assert cli.main(["eval", str(evil), "--model", "test_vit", "--data", folder]) == 2
    err = capsys.readouterr().err
    assert "pickled Python objects" in err and "unpickled!" not in capsys.readouterr().out

    plain = tmp_path / "plain.pth"
    torch.save({"model": timm.create_model("test_vit", num_classes=4).state_dict()}, plain)
    assert cli.main(["eval", str(plain), "--model", "test_vit2", "--data", folder]) == 2
    assert "does not load into test_vit2" in (err := capsys.readouterr().err) and "Missing key" in err

    assert cli.main(["eval", str(tmp_path / "none.pth"), "--model", "test_vit", "--data", folder]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a path that does not exist is said to be missing, not to lack a description (issue 14)
    assert cli.main(["eval", str(tmp_path / "none.pth"), "--data", folder]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--model" not in err
    (tmp_path / "any.pth").write_bytes(b"\x00" * 64)
    assert cli.main(["eval", str(tmp_path / "any.pth"), "--data", folder]) == 2
    assert "name its architecture with --model" in capsys.readouterr().err

    other = tmp_path / "other" / "val"
    write_folder(str(other), ["x", "y", "z", "w"])
    assert cli.main(["eval", str(ckpt), "--data", str(other.parent)]) == 2
    assert "trained on classes c0, c1, c2, c3" in capsys.readouterr().err


@pytest.mark.parametrize("content", [
    bytes(range(256)) * 8, b"not a checkpoint at all\n" * 40, b"PK\x03\x04" + bytes(500),
    os.urandom(8) + b"{" + os.urandom(3000), b"\x80\x02" + os.urandom(3000)],
    ids=["bytes", "text", "broken zip", "brace at byte 8", "pickle header"])
def test_eval_file_that_is_not_a_checkpoint_says_so(tmp_path, folder, capsys, content):
    """Issue 14: a random file named .pth was diagnosed as "pickled Python objects" with advice to unpickle it
    (weights_only=False): say it is not a checkpoint, and never suggest an unsafe load for an unknown file. Random
    bytes with a "{" at byte 8 passed for a safetensors header (CI, 1 run in 256); a pickle header on random bytes
    is a corrupt torch.save file, whatever error its unpickling raises."""
    path = tmp_path / "random.pth"
    path.write_bytes(content)
    assert cli.main(["eval", str(path), "--model", "test_vit", "--data", folder]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a checkpoint" in err and "weights_only" not in err
    assert "Traceback" not in err


def test_eval_image_size_smaller_than_the_patch_is_one_line(tmp_path, folder, capsys):
    """Issue 14: DeiT at --img-size 8 (smaller than its 16-pixel patch) printed a raw traceback."""
    ckpt = tmp_path / "deit.safetensors"
    vigla_checkpoint(ckpt, model_name="deit_tiny_patch16_224", img_size=32)
    assert cli.main(["eval", str(ckpt), "--data", folder, "--img-size", "8", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vigla eval: error: deit_tiny_patch16_224 cannot run at --img-size 8")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_eval_reports_unreadable_images_and_does_not_count_them(tmp_path, capsys):
    """Issue 14: a corrupt validation image was silently replaced by another one, and counted: 9 images
    where 8 were readable. It is left out, counted apart, and named on the console."""
    write_folder(str(tmp_path / "data" / "val"), ["c0", "c1", "c2", "c3"], per_class=2, size=24,
                 corrupt={("c2", 1)})
    (tmp_path / "data" / "val" / "c2" / "9.png").write_bytes((tmp_path / "data" / "val" / "c0" / "0.png")
                                                              .read_bytes())  # 9 files, 8 readable
    ckpt = tmp_path / "w.safetensors"
    vigla_checkpoint(ckpt)
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(ckpt), "--data", str(tmp_path / "data"), "--workers", "0", "--out", str(out)]) == 0
    row = json.load(open(out))["results"][0]
    assert (row["images"], row["unreadable"]) == (8, 1) and "c2/1.png" in row["unreadable_files"][0]
    err = capsys.readouterr().err
    assert "1 of the 9 images could not be read" in err and "(8 evaluated)" in err and "c2/1.png" in err


def test_eval_shows_progress(tmp_path, folder, capsys):
    """Issue 14: vigla eval showed nothing for 40 s; it has a progress bar per size, like training."""
    ckpt = tmp_path / "w.safetensors"
    vigla_checkpoint(ckpt)
    assert cli.main(["eval", str(ckpt), "--data", folder, "--batch-size", "4", "--workers", "0"]) == 0
    assert "eval 32px" in capsys.readouterr().err


def test_eval_into_a_pipe_starts_the_results_on_clean_lines(tmp_path, folder):
    """Into a pipe or a log (stdout and stderr together), each size's progress bar, cleared at its end, left its text
    and carriage returns at the start of the line of the table's title, then of the next size's row. The bar ends as
    a line of its own (its last state: 100%); the title and the rows start their lines."""
    ckpt = tmp_path / "w.safetensors"
    vigla_checkpoint(ckpt)
    proc = subprocess.run([sys.executable, "-m", "vigla", "eval", str(ckpt), "--data", folder, "--img-size", "32",
                           "48", "--batch-size", "4", "--workers", "0", "--out", str(tmp_path / "r.json")], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=120)
    out = proc.stdout.decode()  # bytes: text mode would turn the bar's carriage returns into newlines
    assert proc.returncode == 0, out
    title = f"{ckpt} (test_vit) on {folder}/val"
    assert out.startswith(title) or f"\n{title}" in out, repr(out)
    assert "\n    32 | " in out and "\n    48 | " in out, repr(out)
    bars = [line for line in out.split("\n") if "eval 32px" in line or "eval 48px" in line]
    assert [bar.split("\r")[-1][:15] for bar in bars] == ["eval 32px: 100%", "eval 48px: 100%"], repr(out)


def test_eval_vig_tiny_at_two_sizes(tmp_path, folder):
    ckpt = tmp_path / "vig.safetensors"
    vigla_checkpoint(ckpt, model_name="vig_tiny", img_size=32)
    out = tmp_path / "r.json"
    assert cli.main(["eval", str(ckpt), "--data", folder, "--img-size", "32", "64", "--out", str(out)]) == 0
    rows = json.load(open(out))["results"]
    assert [r["images"] for r in rows] == [20, 20] and all(0 <= r["top1"] <= 100 for r in rows)


@pytest.mark.gpu
def test_eval_cuda_graph_with_loader_workers_equals_eager(tmp_path, folder):
    """``vigla eval --cuda-graph`` with loader processes (whose pin-memory thread allocates while the forward
    is captured) reports what the eager forward does, the last batch padded (20 images, batches of 6)."""
    ckpt = tmp_path / "w.safetensors"
    vigla_checkpoint(ckpt, model_name="vig_tiny", img_size=64)
    reports = []
    for flags in ([], ["--cuda-graph"]):
        out = tmp_path / f"r{len(reports)}.json"
        assert cli.main(["eval", str(ckpt), "--data", folder, "--img-size", "64", "--batch-size", "6",
                         "--device", "cuda", "--workers", "2", "--out", str(out), *flags]) == 0
        report = json.load(open(out))
        assert report["images"] == 20
        reports.append(report["results"][0])
    eager, graphed = reports
    assert graphed["top1"] == pytest.approx(eager["top1"]) and graphed["loss"] == pytest.approx(eager["loss"], rel=1e-2)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--crop-pct", "0"], r"--crop-pct must be in \(0, 1\], got 0.0"),
    (["--crop-pct", "-1"], r"--crop-pct must be in \(0, 1\], got -1.0"),
    (["--img-size", "64", "-3"], r"--img-size takes sizes in \[1, 8192\], got -3"),
    (["--workers", "-5"], "--workers must be -1"),
])
def test_eval_checks_its_numbers_first(tmp_path, capsys, flags, message):
    """Checked before any size is evaluated: one line, exit 2, nothing written."""
    ckpt = tmp_path / "best.safetensors"
    vigla_checkpoint(ckpt, num_classes=10)
    assert cli.main(["eval", str(ckpt), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err)
    assert not list(tmp_path.glob("*.json")) or [p.name for p in tmp_path.glob("*.json")] == ["best.json"]
