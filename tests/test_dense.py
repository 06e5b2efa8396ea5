"""vigla.dense: FPN backbones for torchvision's detectors, the segmentation model, the composite data set, and
`vigla dense` training (a step, an exact resume), evaluation and errors. Tiny models and images (CPU, CI)."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import yaml
import torch
from PIL import Image

from test_data import write_fake_fmnist
from test_train import add_location_settings, damaged_configs, hyphenate, resume_copies, wrong_type_configs
from vigla import cli
from vigla.dense import BackboneFPN, backbone_with_fpn, build_detector, build_segmenter, pad_to_multiple
from vigla.dense.backbone import feature_sizes
from vigla.dense.config import cudnn_benchmark, resolve_config
from vigla.dense.data import CocoSplit, decode_segmentation
from vigla.dense.evaluate import segmentation_metrics
from vigla.dense.models import paste_masks_in_image
from vigla.dense.synth import ComposeSettings, PhotoPool, imagenette_pool, write_split
from vigla.dense.train import DenseTrainer
from vigla.engine.checkpoint import load_weights
from vigla.engine.errors import UserError
from vigla.engine.outputs import OutputLock

pytest.importorskip("pycocotools")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # pycocotools' numpy-2 notice
              pytest.mark.usefixtures("one_thread")]  # conftest.py: tiny tensors run best on one thread

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIG_H = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_heads=(1, 1, 2, 4))
VIG = dict(depth=1, embed_dim=32, num_heads=1)
BACKBONES = {"vig_h_tiny": VIG_H, "vig_tiny": VIG, "castling_deit_tiny": dict(depth=1, embed_dim=32, num_heads=1),
             "resnet18": {}}
SMALL_RCNN = dict(rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32, rpn_pre_nms_top_n_test=32,
                  rpn_post_nms_top_n_test=16, box_batch_size_per_image=16, box_detections_per_img=8)


# ------------------------------------------------------------------------------------------- backbones

@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_levels_have_the_stride_shapes_for_odd_sizes(name):
    bb = backbone_with_fpn(name, out_channels=24, **BACKBONES[name])
    assert isinstance(bb, BackboneFPN) and bb.out_channels == 24 and bb.strides == [4, 8, 16, 32, 64]
    x = torch.randn(2, 3, 45, 77)
    out = bb(x)
    assert list(out) == ["0", "1", "2", "3", "pool"]
    # padded to 64 x 96: every trunk level exactly padded size / stride, "pool" half the last
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert [tuple(v.shape[-2:]) for v in out.values()] == feature_sizes(bb, 45, 77)
    assert all(v.shape[:2] == (2, 24) and torch.isfinite(v).all() for v in out.values())


def test_retinanet_levels_and_padding():
    bb = backbone_with_fpn("vig_h_tiny", out_channels=16, strides=(8, 16, 32), extra_blocks="p6p7", **VIG_H)
    out = bb(torch.randn(1, 3, 33, 100))
    assert list(out) == ["0", "1", "2", "p6", "p7"] and bb.strides == [8, 16, 32, 64, 128]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(8, 16), (4, 8), (2, 4), (1, 2), (1, 1)]
    x = torch.randn(1, 3, 33, 100)
    padded = pad_to_multiple(x, 32)
    assert padded.shape[-2:] == (64, 128) and torch.equal(padded[..., :33, :100], x)
    assert padded[..., 33:, :].abs().sum() == 0 and padded[..., 100:].abs().sum() == 0


@pytest.mark.parametrize("name", ["vig_h_tiny", "vig_tiny"])
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(name):
    torch.manual_seed(1)
    args = dict(BACKBONES[name], drop_path_rate=0.0)  # no random stochastic depth in train()
    plain = backbone_with_fpn(name, out_channels=16, **args)
    ckpt = backbone_with_fpn(name, out_channels=16, grad_checkpointing=True, **args)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 50, 70)
    grads = []
    for bb in (plain, ckpt):
        bb.train()
        sum((v * v).mean() for v in bb(x).values()).backward()
        grads.append({k: p.grad.clone() for k, p in bb.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)


def test_backbone_weights_load_from_a_vigla_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("vig_h_tiny", num_classes=7, **VIG_H)
    path = tmp_path / "cls.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    bb = backbone_with_fpn("vig_h_tiny", out_channels=16, weights=str(path), **VIG_H)
    ours = bb.trunk.model.state_dict()
    assert ours and all(torch.equal(ours[k], src.state_dict()[k]) for k in ours)


def test_bad_backbones_are_clear_errors():
    with pytest.raises(ValueError, match="strides must be a subset"):
        backbone_with_fpn("vig_h_tiny", strides=(2, 4), **VIG_H)
    with pytest.raises(ValueError, match="extra_blocks must be one of"):
        backbone_with_fpn("vig_h_tiny", extra_blocks="p5", **VIG_H)
    with pytest.raises(ValueError, match="forward_intermediates"):
        backbone_with_fpn(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="takes no argument representation_size"):
        build_detector("faster_rcnn", "vig_h_tiny", 3, detector_kwargs={"representation_size": 8}, **VIG_H)
    with pytest.raises(ValueError, match="detector must be one of"):
        build_detector("yolo", "vig_h_tiny", 3, **VIG_H)


# ------------------------------------------------------------------------------------------- models

def _targets(sizes, masks):
    out = []
    for k, (h, w) in enumerate(sizes):
        boxes = torch.tensor([[4.0, 5.0, 30.0, 40.0], [20.0, 10.0, w - 2.0, h - 3.0]])[: 2 - k]
        t = {"boxes": boxes, "labels": torch.tensor([1, 2])[: len(boxes)]}
        if masks:
            m = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                m[i, y0:y1, x0:x1] = 1
            t["masks"] = m
        out.append(t)
    return out


def test_mask_paste_matches_torchvision():
    """vigla's paste reads the boxes back once; the pixels must be torchvision's, boxes partly or wholly outside
    the image, degenerate and sub-pixel ones included."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 1, 28, 28, generator=g)
    xy = torch.rand(40, 2, generator=g) * 55 - 10  # top-left corners inside both images, or up to 10 px out
    wh = torch.rand(40, 2, generator=g) * 90
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:4] = torch.tensor([[10.0, 10, 10, 10], [20, 5, 20.4, 8], [30, 20, 35, 18], [-40, -20, 160, 130]])
    # ^ empty, thin, inverted (inside the image: torchvision fails on inverted boxes that stick out), huge
    for shape in ((64, 96), (97, 50)):
        ours = paste_masks_in_image(masks, boxes, shape)
        assert ours.shape == (40, 1, *shape) and ours.abs().sum() > 0
        torch.testing.assert_close(ours, tv_paste(masks, boxes, shape), rtol=0, atol=0)
    assert paste_masks_in_image(masks[:0], boxes[:0], (64, 96)).shape == (0, 1, 64, 96)


def test_cudnn_benchmark_is_off_to_detect_by_default(tmp_path):
    """The mask head's batch (the positive RoIs) changes size every step: cuDNN's per-shape search would run at
    every step of a detector, so --cudnn-benchmark auto leaves it off there (on to segment)."""
    base = dict(data=str(tmp_path))
    assert not cudnn_benchmark(resolve_config(dict(base, task="detect")))
    assert cudnn_benchmark(resolve_config(dict(base, task="segment")))
    assert cudnn_benchmark(resolve_config(dict(base, task="detect", cudnn_benchmark="on")))
    assert not cudnn_benchmark(resolve_config(dict(base, task="segment", cudnn_benchmark="off")))


@pytest.mark.parametrize("kind,name", [("mask_rcnn", "vig_h_tiny"), ("faster_rcnn", "vig_tiny"),
                                       ("retinanet", "vig_h_tiny")])
def test_torchvision_detectors_train_and_eval_with_a_vigla_backbone(kind, name):
    extra = dict(detections_per_img=8, topk_candidates=32) if kind == "retinanet" else SMALL_RCNN
    model = build_detector(kind, name, 3, min_size=64, max_size=96, out_channels=16, detector_kwargs=extra,
                           **BACKBONES[name])
    sizes = [(57, 83), (64, 64)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    model.train()
    losses = model(images, _targets(sizes, kind == "mask_rcnn"))
    assert all(torch.isfinite(v) for v in losses.values())
    if kind == "mask_rcnn":
        assert "loss_mask" in losses
    sum(losses.values()).backward()
    trunk = model.backbone.trunk.model
    assert all(p.grad is not None for p in trunk.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        outs = model(images)
    for out, (h, w) in zip(outs, sizes):  # back at each image's own size
        assert out["boxes"].shape[1] == 4 and len(out["boxes"]) <= 8
        assert (out["boxes"][:, 2] <= w + 1e-3).all() and (out["boxes"][:, 3] <= h + 1e-3).all()
        if kind == "mask_rcnn":
            assert out["masks"].shape[1:] == (1, h, w)


def test_segmentation_logits_at_the_input_resolution():
    model = build_segmenter("vig_h_tiny", 5, out_channels=16, head_channels=16, **VIG_H)
    x = torch.rand(2, 3, 45, 77)
    y = model(x)
    assert y.shape == (2, 5, 45, 77)
    y.logsumexp(1).mean().backward()
    assert model.backbone.trunk.model.stem.conv1.weight.grad is not None
    plain = build_segmenter("vig_tiny", 3, out_channels=16, head_channels=16, **VIG)
    assert plain(torch.rand(1, 3, 33, 40)).shape == (1, 3, 33, 40)


def test_autocast_bf16_forward_and_backward():
    model = build_detector("faster_rcnn", "vig_h_tiny", 3, min_size=64, max_size=96, out_channels=16,
                           detector_kwargs=SMALL_RCNN, **VIG_H)
    images = [torch.rand(3, 57, 83), torch.rand(3, 64, 64)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.backbone(torch.rand(1, 3, 40, 56))
        losses = model(images, _targets([(57, 83), (64, 64)], masks=False))
    # float32 maps, so that torchvision's anchors (made in the maps' dtype) keep their precision
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in feats.values())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(model.backbone.trunk.model.stem.conv1.weight.grad).all()


def test_segmentation_metrics_by_hand():
    conf = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    m = segmentation_metrics(conf)
    iou0, iou1 = 5 / (5 + 1 + 2), 3 / (3 + 2 + 1)
    assert m["iou"][2] is None and m["miou"] == pytest.approx(100 * (iou0 + iou1) / 2, abs=1e-3)
    assert m["pixel_acc"] == pytest.approx(100 * 8 / 11, abs=1e-3)


# ------------------------------------------------------------------------------------------- data

def _pool(n=12, classes=("red", "green", "blue")):
    """Photos made here: a class-coloured gradient with noise, 64 x 48."""
    rng = np.random.default_rng(0)
    arrays, labels = [], []
    for i in range(n):
        c = i % len(classes)
        a = rng.integers(0, 80, (48, 64, 3)).astype(np.uint8)
        a[..., c] = np.linspace(120, 255, 64).astype(np.uint8)[None, :]
        arrays.append(a)
        labels.append(c)
    return PhotoPool([lambda a=a: Image.fromarray(a) for a in arrays], labels, list(classes), "test pool")


SETTINGS = ComposeSettings(canvas=64, max_objects=3, min_scale=0.25, max_scale=0.6, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_data")
    write_split(_pool(), str(root), "train", 8, SETTINGS)
    write_split(_pool(), str(root), "val", 4, SETTINGS)
    return str(root)


def test_generated_boxes_masks_and_semantic_maps_agree(dataset):
    split = CocoSplit(dataset, "train")
    assert split.classes == ["red", "green", "blue"] and len(split) == 8
    coco = split.coco
    assert coco["annotations"] and "synthetic layout, real photos" in coco["info"]["description"]
    for i, entry in enumerate(coco["images"]):
        anns = split.anns[entry["id"]]
        masks = [decode_segmentation(a, 64, 64).astype(bool) for a in anns]
        semantic = np.array(Image.open(split.mask_path(i)))
        union = np.zeros((64, 64), np.uint8)
        for a, m in zip(anns, masks):
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert a["area"] == m.sum() > 0
            assert (union[m] == 0).all()  # visible parts do not overlap
            union[m] = a["category_id"]
        assert np.array_equal(semantic, union)
        t = split.target(i, masks=True)
        assert t["boxes"].shape == (len(anns), 4) and t["masks"].shape == (len(anns), 64, 64)
        assert torch.equal(t["masks"].bool(), torch.from_numpy(np.stack(masks)) if masks else t["masks"].bool())
    labels = split.semantic(0)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}


def test_generator_is_deterministic(dataset, tmp_path):
    write_split(_pool(), str(tmp_path), "val", 4, SETTINGS)
    a = json.load(open(os.path.join(dataset, "val", "annotations.json")))
    b = json.load(open(tmp_path / "val" / "annotations.json"))
    assert a == b
    for name in ("images/000003.jpg", "masks/000003.png"):
        assert (tmp_path / "val" / name).read_bytes() == open(os.path.join(dataset, "val", name), "rb").read()
    with pytest.raises(Exception, match="already holds a data set"):
        write_split(_pool(), str(tmp_path), "val", 4, SETTINGS)


def test_imagenette_pool_reads_the_tar_shards(tmp_path):
    with tarfile.open(tmp_path / "val.tar", "w") as tar:
        for wnid, color in (("n03445777", (255, 255, 255)), ("n01440764", (0, 90, 0))):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), color).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"val/{wnid}/img_{wnid}.JPEG")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    pool = imagenette_pool(str(tmp_path), "val")
    assert len(pool) == 2 and pool.labels == [0, 8]  # sorted by path: tench (0) before golf ball (8)
    assert pool.classes[8] == "golf ball" and pool.load(1).getpixel((5, 5))[0] > 200


# ------------------------------------------------------------------------------------------- training

def _flags(data, out, **kw):
    flags = dict(data=data, out=str(out), task="segment", model="vig_h_tiny", model_args=json.dumps(VIG_H),
                 fpn_channels=16, img_size=48, max_size=64, epochs=2, batch_size=4, warmup_epochs=0.5,
                 lr=1e-3, workers=0, log_interval=1, seed=0)
    flags.update(kw)
    return flags


def test_a_stopped_run_resumes_to_the_uninterrupted_weights(dataset, tmp_path):
    ref = DenseTrainer(resolve_config(_flags(dataset, tmp_path / "ref", epochs=1)))
    assert ref.run() == 0
    results = json.load(open(tmp_path / "ref" / "results.json"))
    assert results["task"] == "segment" and 0 <= results["best"]["miou"] <= 100
    stopped = DenseTrainer(resolve_config(_flags(dataset, tmp_path / "run", epochs=1)), stop_after_steps=1)
    assert stopped.run() == 128 + 15
    assert os.path.isfile(tmp_path / "run" / "last.state.pt")
    rc = cli.main(["dense", "train", "--resume", "auto", "--out", str(tmp_path / "run")])
    assert rc == 0
    a = load_weights(str(tmp_path / "ref" / "last.safetensors"))
    b = load_weights(str(tmp_path / "run" / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    rows = open(tmp_path / "run" / "metrics.csv").read().splitlines()
    assert len(rows) == 2 and "val_miou" in rows[0]
    with pytest.raises(UserError, match="already holds a run"):
        DenseTrainer(resolve_config(_flags(dataset, tmp_path / "ref", epochs=1)))


def test_detection_run_and_eval_command(dataset, tmp_path, capsys):
    flags = _flags(dataset, tmp_path / "det", task="detect", detector="mask_rcnn", epochs=1, warmup_epochs=0,
                   detector_args=json.dumps(SMALL_RCNN), img_size=64, max_size=64)
    assert DenseTrainer(resolve_config(flags)).run() == 0
    assert json.load(open(tmp_path / "det" / "run.json"))["cudnn_benchmark"] is False
    meta = json.load(open(tmp_path / "det" / "last.json"))
    assert meta["task"] == "detect" and meta["classes"] == ["red", "green", "blue"]
    assert 0 <= meta["val"]["box_ap"] <= 100 and 0 <= meta["val"]["mask_ap"] <= 100 and meta["val"]["images"] == 4
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert cli.main(["dense", "eval", str(tmp_path / "det" / "last.safetensors"), "--data", dataset,
                     "--out", str(out)]) == 0
    assert "box_ap" in capsys.readouterr().out
    result = json.load(open(out))
    assert (result["box_ap"], result["mask_ap"]) == (meta["val"]["box_ap"], meta["val"]["mask_ap"])


def _one_line_error(capsys, argv, *fragments):
    """``vigla dense ARGV`` in this process: exit code 2, one ``vigla dense ACTION: error:`` line naming
    ``fragments`` -> what it printed on stdout."""
    capsys.readouterr()
    assert cli.main(["dense", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err
    lines = [line for line in err.strip().splitlines() if "%|" not in line]  # a progress bar may precede it
    assert len(lines) == 1 and lines[0].startswith(f"vigla dense {argv[0]}: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]
    return captured.out


def test_bad_inputs_are_one_line_errors(dataset, tmp_path, capsys):
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "nowhere")], "annotations.json not found")
    bad = tmp_path / "bad"
    (bad / "train").mkdir(parents=True)
    (bad / "train" / "annotations.json").write_text("{not json")
    _one_line_error(capsys, ["train", "--data", str(bad)], "not a readable COCO json")
    _one_line_error(capsys, ["train", "--data", dataset, "--model", "vig_h_tinyy"], "unknown model", "vig_h_tiny")
    _one_line_error(capsys, ["train", "--data", dataset, "--model-args", "[1]"], "--model-args must be a JSON object")
    _one_line_error(capsys, ["train", "--data", dataset, "--epochs", "1", "--warmup-epochs", "1"],
                    "--warmup-epochs must be in [0, --epochs=1)",
                    "lower --warmup-epochs (e.g. --warmup-epochs 0) or raise --epochs")
    _one_line_error(capsys, ["train", "--data", dataset, "--model-args", '{"depths": [1]}'],
                    "cannot be built with these settings (--model-args, --detector-args?)")
    for flags, message in ((["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
                           (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
                           (["--min-lr", "1"], "--min-lr must be in [0, --lr=0.0001] (the cosine's end), got 1.0"),
                           (["--weight-decay", "-0.5"], "--weight-decay must be a finite number >= 0, got -0.5"),
                           (["--drop-path", "1.5"], "--drop-path must be in [0, 1), got 1.5")):
        _one_line_error(capsys, ["train", "--data", dataset, *flags], message)
    boxes_only = tmp_path / "boxes"
    for split in ("train", "val"):
        os.makedirs(boxes_only / split)
        os.symlink(os.path.join(dataset, split, "images"), boxes_only / split / "images")
        coco = json.load(open(os.path.join(dataset, split, "annotations.json")))
        for a in coco["annotations"]:
            del a["segmentation"]
        (boxes_only / split / "annotations.json").write_text(json.dumps(coco))
    _one_line_error(capsys, ["train", "--data", str(boxes_only)], "mask_rcnn needs a segmentation")
    _one_line_error(capsys, ["data", "--imagenette", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                    "--imagenette", "no such folder")
    flags = ["train", "--data", dataset, "--task", "segment", "--model-args", json.dumps(VIG_H), "--img-size", "48",
             "--max-size", "64", "--batch-size", "4", "--epochs", "2", "--fpn-channels", "16", "--workers", "0"]
    os.makedirs(tmp_path / "busy")
    lock = OutputLock(str(tmp_path / "busy")).acquire("test")  # another run writing there
    _one_line_error(capsys, flags + ["--out", str(tmp_path / "busy")], "is in use by another vigla dense train")
    lock.release()
    corrupt = tmp_path / "corrupt"
    for split in ("train", "val"):
        os.makedirs(corrupt / split)
        for sub in ("images", "masks"):
            os.symlink(os.path.join(dataset, split, sub), corrupt / split / sub)
        coco = json.load(open(os.path.join(dataset, split, "annotations.json")))
        coco["images"][0]["width"] += 1  # the image no longer matches: an unreadable sample
        (corrupt / split / "annotations.json").write_text(json.dumps(coco))
    _one_line_error(capsys, flags + ["--data", str(corrupt), "--strict-data", "--out", str(tmp_path / "strict")],
                    "unreadable sample", "the json says 65x64", "--strict-data")
    not_dense = tmp_path / "x.safetensors"
    not_dense.write_bytes(b"junk")
    _one_line_error(capsys, ["eval", str(not_dense), "--data", dataset], "not a `vigla dense train` checkpoint")
    _one_line_error(capsys, ["eval", str(tmp_path / "nowhere.safetensors"), "--data", dataset],
                    f"checkpoint {tmp_path / 'nowhere.safetensors'} does not exist")
    assert cli.main(["dense"]) == 2 and "choose an action" in capsys.readouterr().err
    # as a program: the same line, no traceback
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "vigla", "dense", "train", "--data", str(bad)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"vigla dense train: error: {bad}/train/annotations.json: not a readable COCO json "
        f"(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"]


def _argv(flags):
    """``_flags(...)`` as command-line arguments."""
    return [a for k, v in flags.items() for a in ("--" + k.replace("_", "-"), str(v))]


def test_detector_flags_are_refused_to_a_segmentation_run(dataset, tmp_path, capsys):
    """--detector and --detector-args configure the detectors: a segmentation run ignored them without a word. The
    default, and the detector saved in a segmentation run's config.yaml, stay accepted."""
    assert resolve_config(_flags(dataset, tmp_path / "a")).task == "segment"
    saved = dict(task="segment", detector="retinanet", detector_args="{}")  # what a segmentation run saves
    assert resolve_config(dict(data=dataset), saved).detector == "retinanet"
    assert resolve_config(dict(data=dataset, task="detect", detector="retinanet")).detector == "retinanet"
    flags = ["train", *_argv(_flags(dataset, tmp_path / "run", epochs=1, warmup_epochs=0))]
    _one_line_error(capsys, flags + ["--detector", "retinanet"],
                    "--detector applies to --task detect only, this run is --task segment",
                    "leave --detector out, or train a detector with --task detect")
    _one_line_error(capsys, flags + ["--detector", "mask_rcnn", "--detector-args", "{}"],
                    "--detector and --detector-args apply to --task detect only")
    assert not (tmp_path / "run").exists()


def test_resuming_a_classification_run_names_its_command(dataset, tmp_path, capsys):
    """`vigla dense train --resume` on a `vigla train` run said '--data is required' (its config.yaml has no
    dense settings); now it says what the run is and which command resumes it."""
    fmnist = write_fake_fmnist(str(tmp_path / "fmnist"), n_train=32, n_test=8)
    run = tmp_path / "cls"
    assert cli.main(["train", "--fmnist-dir", fmnist, "--model", "test_vit", "--img-size", "32", "--epochs", "1",
                     "--batch-size", "8", "--train-subset", "16", "--val-subset", "8", "--test-subset", "8",
                     "--workers", "0", "--out", str(run)]) == 0
    state = run / "last.state.pt"
    for argv in (["--resume", str(run)], ["--resume", "auto", "--out", str(run)],
                 ["--resume", str(state), "--data", dataset, "--task", "segment"]):
        _one_line_error(capsys, ["train", *argv], f"{state} is the state of a `vigla train` (classification) run",
                        f"resume it with `vigla train --resume {state}`")
        assert "resuming" not in capsys.readouterr().out


def _without_masks(dataset, root, split, missing):
    """A copy of ``dataset`` (its images linked) whose ``split`` lacks the masks of the images ``missing``
    (None: its whole masks/ folder)."""
    for s in ("train", "val"):
        os.makedirs(root / s)
        os.symlink(os.path.join(dataset, s, "images"), root / s / "images")
        shutil.copy(os.path.join(dataset, s, "annotations.json"), root / s)
        if s != split or missing is not None:
            shutil.copytree(os.path.join(dataset, s, "masks"), root / s / "masks")
    for i in missing or ():
        os.remove(root / split / "masks" / f"{i:06d}.png")
    return str(root)


def test_missing_masks_are_told_before_training(dataset, tmp_path, capsys):
    """A segmentation split without masks/ failed in the first batches (train) or validated to mIoU 0 (val); a
    missing mask was skipped as an unreadable sample. Both are told up front, before the run folder is made."""
    out = tmp_path / "run"
    flags = ["train", *_argv(_flags(dataset, out, epochs=1, warmup_epochs=0))]
    data = _without_masks(dataset, tmp_path / "no_folder", "train", None)
    _one_line_error(capsys, flags + ["--data", data], f"{data}/train/masks/ not found",
                    "one mask PNG per image (masks/<image stem>.png")
    data = _without_masks(dataset, tmp_path / "no_val_folder", "val", None)
    _one_line_error(capsys, flags + ["--data", data], f"{data}/val/masks/ not found")
    data = _without_masks(dataset, tmp_path / "no_files", "val", [0, 2, 3])
    _one_line_error(capsys, flags + ["--data", data], f"3 of 4 images of {data}/val/annotations.json have no mask",
                    f"{data}/val/masks/000000.png, {data}/val/masks/000002.png, {data}/val/masks/000003.png")
    data = _without_masks(dataset, tmp_path / "many", "train", range(1, 8))
    _one_line_error(capsys, flags + ["--data", data], f"7 of 8 images of {data}/train/annotations.json",
                    f"{data}/train/masks/000003.png, ...: add the missing masks")
    assert not out.exists()


def test_the_default_warmup_fits_a_one_epoch_run(dataset, tmp_path):
    """The default warm-up (1 of the 12 default epochs) refused --epochs 1; a shorter run now keeps that share
    (1/12 of it), as `vigla train` does with its presets. A warm-up that was given is checked as before."""
    assert resolve_config(dict(data=dataset, epochs=1)).warmup_epochs == pytest.approx(1 / 12)
    assert resolve_config(dict(data=dataset, epochs=2)).warmup_epochs == 1.0
    assert resolve_config(dict(data=dataset, epochs=1), dict(warmup_epochs=0.5)).warmup_epochs == 0.5  # saved
    with pytest.raises(UserError, match=r"--warmup-epochs must be in \[0, --epochs=1\), got 1.0"):
        resolve_config(dict(data=dataset, epochs=1, warmup_epochs=1.0))
    flags = _flags(dataset, tmp_path / "run", epochs=1)
    del flags["warmup_epochs"]
    assert cli.main(["dense", "train", *_argv(flags)]) == 0


def test_dense_train_takes_a_config_file(dataset, tmp_path, capsys):
    """`vigla dense train --config FILE.yaml` (as `vigla train` takes one): a run's config.yaml runs again as it was
    (its settings between the defaults and the flags, a flag winning); a file that cannot be used is one line."""
    first = tmp_path / "first"
    assert cli.main(["dense", "train", *_argv(_flags(dataset, first, epochs=1, lr=3e-4))]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    second = tmp_path / "second"
    assert cli.main(["dense", "train", "--config", str(first / "config.yaml"), "--out", str(second),
                     "--seed", "7"]) == 0
    again = yaml.safe_load((second / "config.yaml").read_text())
    assert again == dict(saved, seed=7) and again["lr"] == 3e-4 and again["epochs"] == 1
    (tmp_path / "typo.yaml").write_text("lr: 0.001\nepoch: 3\n")
    _one_line_error(capsys, ["train", "--config", str(tmp_path / "typo.yaml"), "--out", str(tmp_path / "x")],
                    "typo.yaml: unknown setting 'epoch' (did you mean 'epochs'?)")
    (tmp_path / "bad.yaml").write_text("epochs: [1, 2\n")
    _one_line_error(capsys, ["train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x")],
                    "bad.yaml is not valid YAML")
    assert not (tmp_path / "x").exists()


def test_vigla_train_resuming_a_dense_run_names_its_command(dataset, tmp_path, capsys):
    """`vigla train --resume` on a `vigla dense train` run built a classifier from the run's config.yaml and died
    on KeyError: 'model_name'; now it says what the run is and which command resumes it, before anything is
    read from its config.yaml or written into its folder."""
    run = tmp_path / "dense"
    assert DenseTrainer(resolve_config(_flags(dataset, run, epochs=1))).run() == 0
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    state = run / "last.state.pt"
    for argv in (["--resume", str(run)], ["--resume", str(state)], ["--resume", "auto", "--out", str(run)],
                 ["--resume", str(run), "--epochs", "2"]):
        capsys.readouterr()
        assert cli.main(["train", *argv]) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in captured.err and "KeyError" not in captured.err, captured.err
        assert lines[0] == (f"vigla train: error: {state} is the state of a `vigla dense train` run, not of a "
                            f"`vigla train` (classification) one: resume it with `vigla dense train --resume "
                            f"{state}`")
        assert "resuming" not in captured.out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept


def test_a_damaged_config_yaml_of_a_resumed_run_is_one_line(dataset, tmp_path, capsys):
    """`vigla dense train --resume` of a run whose config.yaml holds a list or a scalar died on AttributeError
    ('list' object has no attribute 'items'), an empty one resumed without its settings (to '--data is required'),
    invalid YAML was told in the parser's many lines: each is one line naming the file, the problem and the ways
    on; the run's files stay as they were."""
    run = tmp_path / "run"
    assert DenseTrainer(resolve_config(_flags(dataset, run, epochs=1))).run() == 0
    config = run / "config.yaml"
    for problem in damaged_configs(config):
        _one_line_error(capsys, ["train", "--resume", str(run), "--epochs", "2"], f"{config} {problem}",
                        "the run folder's config.yaml is damaged; restore it, or remove it and give the run's "
                        "settings with --config or flags, or start a new run without --resume")


def test_unknown_settings_in_a_resumed_runs_config_yaml_are_one_warning_line(dataset, tmp_path, capsys):
    """Keys of a resumed run's config.yaml that no setting matches (a typo: `epoch: 3`) were dropped without a word:
    one warning line names the file and the keys, and the run resumes as it does without them."""
    assert DenseTrainer(resolve_config(_flags(dataset, tmp_path / "r", epochs=1))).run() == 0
    plain, typo = resume_copies(tmp_path / "r", "vigla dense train", ["dense", "train"], capsys)
    assert plain.keys() == typo.keys() and all(torch.equal(plain[k], typo[k]) for k in plain)


def test_a_resumed_runs_config_yaml_takes_the_keys_that_config_takes(dataset, tmp_path, capsys):
    """`batch-size: 4` in a resumed run's config.yaml, which `vigla train --config` takes, was an unknown setting
    there: ignored, with the default batch size in its place (which the resume then refused). Its keys are read as
    `vigla train --config` reads them: the run resumes with each of its settings, and saves them as it writes them."""
    run = tmp_path / "r"
    assert DenseTrainer(resolve_config(_flags(dataset, run, epochs=1))).run() == 0
    written = hyphenate(run / "config.yaml")
    capsys.readouterr()
    assert cli.main(["dense", "train", "--resume", str(run), "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "with the settings of its config.yaml" in captured.out
    assert (run / "config.yaml").read_text() == written.replace("\nepochs: 1\n", "\nepochs: 2\n")


def test_a_resumed_run_keeps_its_device_settings_and_not_its_location(dataset, tmp_path, capsys):
    """--device, --workers and --cudnn-benchmark were not saved with a run, and written into its config.yaml they
    were dropped on resume without a word (a run with --cudnn-benchmark off resumed with it on): they are saved and
    resumed as `vigla train`'s are (a flag still replaces them); out and resume, which no run can take from the
    config.yaml in its folder, are one warning line, as in `vigla train`."""
    import yaml

    run = tmp_path / "r"
    assert DenseTrainer(resolve_config(_flags(dataset, run, epochs=1, cudnn_benchmark="off"))).run() == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: saved.get(k) for k in ("device", "workers", "cudnn_benchmark")} == dict(device="auto", workers=0,
                                                                                        cudnn_benchmark="off")
    warning = add_location_settings(run / "config.yaml", tmp_path / "elsewhere")
    capsys.readouterr()
    assert cli.main(["dense", "train", "--resume", str(run), "--epochs", "2"]) == 0
    assert [line for line in capsys.readouterr().err.splitlines(True) if "warning" in line] == [warning]
    assert json.load(open(run / "run-resume-2.json"))["cudnn_benchmark"] is False
    assert not (tmp_path / "elsewhere").exists() and "out:" not in (run / "config.yaml").read_text()


def test_a_warmup_that_rounds_to_the_whole_run_leaves_the_cosine_a_step(dataset, tmp_path):
    """--warmup-epochs 0.9 of a 1-epoch run of 2 steps rounded to both: timm's cosine got 0 steps and the run died
    on a bare AssertionError; the warm-up now takes at most all steps but one. The default warm-up of such a run
    (1/12 of it) rounds to 0 steps, which the cosine takes cleanly: no warm-up, the first step at the peak learning
    rate (not 0, no division by the warm-up's length)."""
    run = DenseTrainer(resolve_config(_flags(dataset, tmp_path / "a", epochs=1, warmup_epochs=0.9)))
    assert (run.total_steps, run.scheduler.warmup_t, run.scheduler.t_initial) == (2, 1, 1)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(run.lr * 1e-3)  # the warm-up's first step
    assert run.run() == 0
    flags = _flags(dataset, tmp_path / "b", epochs=1)
    del flags["warmup_epochs"]
    run = DenseTrainer(resolve_config(flags))
    assert run.cfg.warmup_epochs == pytest.approx(1 / 12) and run.total_steps == 2
    assert (run.scheduler.warmup_t, run.scheduler.t_initial) == (0, 2)
    assert run.optimizer.param_groups[0]["lr"] == run.lr > 0
    run.close()


def test_a_setting_of_the_wrong_type_is_told_with_its_file(dataset, tmp_path, capsys):
    """`vigla dense train --resume` of a run whose config.yaml holds `epochs: ten` or `lr: [1]` died on "TypeError:
    '<=' not supported ... (unexpected)": one line names the file, the setting, the value, the type and the fix, and
    a flag that replaces the value resumes the run; a flag given from Python of the wrong type is told as the flag."""
    import re

    run = tmp_path / "run"
    assert DenseTrainer(resolve_config(_flags(dataset, run, epochs=1))).run() == 0
    config = run / "config.yaml"
    for problem, more in wrong_type_configs(config):
        out = _one_line_error(capsys, ["train", "--resume", str(run), *more], f"error: {config}: {problem}")
        assert "resuming" not in out  # said once the settings are checked
    assert cli.main(["dense", "train", "--resume", str(run), "--lr", "0.001", "--epochs", "2"]) == 0
    assert "lr: [1]" not in config.read_text()  # the resumed run saved the flag's value
    for name, value, message in (("epochs", "ten", "--epochs must be an integer, got 'ten'"),
                                 ("task", "boxes", "--task must be one of detect, segment, got 'boxes'"),
                                 ("drop_path", "0.1", "--drop-path must be a number or None, got '0.1'")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
            resolve_config(dict(data=dataset, **{name: value}))


def test_a_state_without_what_vigla_dense_train_saves_is_one_line(dataset, tmp_path, capsys):
    """A --resume state that has model_meta but lacks other keys `vigla dense train` saves died on a raw KeyError
    (e.g. 'batch_size'); it is refused in one line that names the missing keys, through the command and through
    DenseTrainer alike, before anything is written."""
    from vigla.engine.checkpoint import load_state, save_state
    from vigla.engine.errors import CheckpointError

    flags = _flags(dataset, tmp_path / "r", epochs=1)
    assert DenseTrainer(resolve_config(flags)).run() == 0
    full = load_state(str(tmp_path / "r" / "last.state.pt"))
    for i, drop in enumerate((("batch_size",), ("optimizer", "rng"), ("model_meta", "scheduler"))):
        path = tmp_path / f"s{i}" / "last.state.pt"
        path.parent.mkdir()
        save_state(str(path), {k: v for k, v in full.items() if k not in drop})
        shutil.copy(tmp_path / "r" / "config.yaml", path.parent)  # the run's settings: the resume gets to the state
        message = (f"{path} is not the state of a `vigla dense train` run (it lacks {', '.join(drop)}): resume a run "
                   f"folder that `vigla dense train` wrote, or start a new run without --resume")
        _one_line_error(capsys, ["train", "--resume", str(path.parent), "--epochs", "2"], f"error: {message}")
        assert "resuming" not in capsys.readouterr().out
        with pytest.raises(CheckpointError, match=f"it lacks {', '.join(drop)}"):
            DenseTrainer(resolve_config(dict(flags, epochs=2, out=None)), resume_state=str(path))
        assert sorted(os.listdir(path.parent)) == ["config.yaml", "last.state.pt"]


def test_a_state_with_a_damaged_model_meta_is_one_line(dataset, tmp_path, capsys):
    """A --resume state whose model_meta is not valid JSON, or not a JSON object with what a resume compares, died
    on a raw json.JSONDecodeError / KeyError traceback; it is refused in one line that names the state, says it is
    damaged and what is wrong with its model_meta (None or a list is not "not valid JSON") and the ways on, through the
    command and through DenseTrainer alike, and the run folder stays as it was."""
    from vigla.engine.checkpoint import load_state, save_state
    from vigla.engine.errors import CheckpointError

    flags = _flags(dataset, tmp_path / "r", epochs=1)
    assert DenseTrainer(resolve_config(flags)).run() == 0
    run, full = tmp_path / "r", load_state(str(tmp_path / "r" / "last.state.pt"))
    meta = json.loads(full["model_meta"])
    lacking = {k: v for k, v in meta.items() if k not in ("task", "classes")}
    for text, problem in (("{not json", "not valid JSON: Expecting property name enclosed in double quotes"),
                          ("", "not valid JSON: Expecting value"), ("[1, 2]", "JSON holding a list, not an object"),
                          (None, "None, neither the JSON text of an object nor a dict"),
                          ([1, 2], "a list, neither the JSON text of an object nor a dict"),
                          (json.dumps(lacking), "it lacks task, classes"), (lacking, "it lacks task, classes")):
        save_state(str(run / "last.state.pt"), dict(full, model_meta=text))
        kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        state = run / "last.state.pt"
        message = f"error: {state} is damaged: its model_meta is unreadable ({problem}"
        ways = "); resume from another checkpoint, or start a new run without --resume"
        out = _one_line_error(capsys, ["train", "--resume", str(run), "--epochs", "2"], message, ways)
        assert "resuming" not in out
        with pytest.raises(CheckpointError, match="its model_meta is unreadable"):
            DenseTrainer(resolve_config(dict(flags, epochs=2, out=None)), resume_state=str(state))
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept


def test_a_state_whose_model_meta_is_a_dict_resumes(dataset, tmp_path, capsys):
    """A state loaded and saved again with its model_meta as a dict (vigla saves the JSON text) was refused as damaged,
    'not valid JSON'; the dict is taken as its text is: the run resumes to the same weights."""
    from vigla.engine.checkpoint import load_state, save_state

    assert DenseTrainer(resolve_config(_flags(dataset, tmp_path / "r", epochs=1))).run() == 0
    shutil.copytree(tmp_path / "r", tmp_path / "d")
    full = load_state(str(tmp_path / "d" / "last.state.pt"))
    save_state(str(tmp_path / "d" / "last.state.pt"), dict(full, model_meta=json.loads(full["model_meta"])))
    for run in ("r", "d"):
        capsys.readouterr()
        assert cli.main(["dense", "train", "--resume", str(tmp_path / run), "--epochs", "2"]) == 0
        assert "resuming" in capsys.readouterr().out
    a, b = (load_weights(str(tmp_path / run / "last.safetensors")) for run in ("r", "d"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_steps_csv_logs_the_learning_rate_each_step_trained_at(dataset, tmp_path):
    """steps.csv logged the learning rate after the schedule's step, the next step's: a 2-step run with a 1-step
    warm-up showed the peak rate on step 1, which trained at the warm-up's first rate (1/1000 of it). Each row now
    holds the rate its step trained at; the curves are still drawn."""
    import csv

    out = tmp_path / "r"
    run = DenseTrainer(resolve_config(_flags(dataset, out, epochs=1, warmup_epochs=0.9)))
    assert (run.total_steps, run.scheduler.warmup_t, run.cfg.log_interval) == (2, 1, 1)
    assert run.run() == 0
    rows = list(csv.DictReader(open(out / "steps.csv")))
    assert [int(r["global_step"]) for r in rows] == [1, 2]
    assert [float(r["lr"]) for r in rows] == pytest.approx([run.lr * 1e-3, run.lr])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    epochs = list(csv.DictReader(open(out / "metrics.csv")))  # the epoch's rate: its last step's, not the next one's
    assert [float(r["lr"]) for r in epochs] == pytest.approx([run.lr])
