"""vigla.data: IDX parsing, Fashion-MNIST, ImageFolder checks, corrupt files, resumable samplers, seeded transforms."""
import gzip
import os
import random
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vigla.data import (DEFAULT_FMNIST_DIR, DataError, ResumableDistributedSampler, ShardSampler, TransformedDataset,
                        collate, load_fashion_mnist, load_image_folder_pair, load_splits, read_idx,
                        scan_image_folder, train_transform)
from vigla.data.dataset import isolated_rng


def write_idx(path, array: np.ndarray) -> None:
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def write_fake_fmnist(root, n_train=120, n_test=40, seed=0):
    """Four IDX files like Fashion-MNIST's; class c is a bright bar at row 2c (learnable)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 4: 2 * c + 7, 4:24] = 255
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return root


def write_folder(root, classes, per_class=3, size=20, corrupt=()):
    for c, cls in enumerate(classes):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, cls, f"{i}.png")
            if (cls, i) in corrupt:
                with open(path, "wb") as f:
                    f.write(b"\x89PNG\r\n\x1a\n this is not an image")
            else:
                Image.fromarray(np.full((size, size, 3), 20 * c + i, np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------- IDX / FMNIST
def test_read_idx_round_trip(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    write_idx(tmp_path / "a.gz", a)
    b = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    write_idx(tmp_path / "b.gz", b)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a.gz")), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "b.gz")), b)


def test_read_idx_rejects_bad_files(tmp_path):
    with gzip.open(tmp_path / "magic.gz", "wb") as f:
        f.write(b"\x1f\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(str(tmp_path / "magic.gz"))
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 4)
    with pytest.raises(DataError, match="declares shape"):
        read_idx(str(tmp_path / "short.gz"))
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="not a readable gzip"):
        read_idx(str(tmp_path / "plain.gz"))


def test_fmnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DataError, match="--fmnist-dir"):
        load_fashion_mnist(str(tmp_path), "train")
    if not os.path.isdir(DEFAULT_FMNIST_DIR):
        with pytest.raises(DataError, match="sudo apt-get install dataset-fashion-mnist"):
            load_fashion_mnist(DEFAULT_FMNIST_DIR, "train")


def test_fake_fmnist_splits_are_disjoint_and_fixed(tmp_path):
    root = write_fake_fmnist(str(tmp_path / "fm"))
    s = load_splits(None, fmnist_dir=root, train_subset=50, val_subset=30, seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (50, 30, 40)
    assert not set(s.train.indices) & set(s.val.indices)
    again = load_splits(None, fmnist_dir=root, train_subset=50, val_subset=30, seed=3)
    np.testing.assert_array_equal(s.train.indices, again.train.indices)
    img = s.train.load(0)
    assert img.mode == "RGB" and img.size == (28, 28)
    assert s.classes[9] == "Ankle boot"
    with pytest.raises(DataError, match="leaves no"):
        load_splits(None, fmnist_dir=root, val_subset=120)


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FMNIST_DIR), reason="needs the dataset-fashion-mnist package")
def test_real_fmnist_shapes():
    test = load_fashion_mnist(DEFAULT_FMNIST_DIR, "test")
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert np.bincount(test.targets).tolist() == [1000] * 10


# ---------------------------------------------------------------------------------------------- ImageFolder
def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder_pair(str(tmp_path / "nope"))
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="missing the val/ folder"):
        load_image_folder_pair(str(tmp_path / "d"))
    (tmp_path / "d" / "val").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        load_image_folder_pair(str(tmp_path / "d"))
    (tmp_path / "d" / "train" / "cat").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_image_folder_pair(str(tmp_path / "d"))
    write_folder(str(tmp_path / "d" / "train"), ["cat"])
    with pytest.raises(DataError, match=r"train/ has one class folder \(cat\); a classifier needs at least two"):
        load_image_folder_pair(str(tmp_path / "d"))
    write_folder(str(tmp_path / "d" / "train"), ["cat", "dog"])
    write_folder(str(tmp_path / "d" / "val"), ["cat", "emu"])
    with pytest.raises(DataError, match=r"only in train/: \['dog'\]; only in val/: \['emu'\]"):
        load_image_folder_pair(str(tmp_path / "d"))


def test_folder_empty_class_in_train_is_an_error(tmp_path):
    write_folder(str(tmp_path), ["a"])
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="without images: b"):
        scan_image_folder(str(tmp_path))
    with pytest.warns(UserWarning, match="without images: b"):
        assert scan_image_folder(str(tmp_path), require_all_classes=False).classes == ["a", "b"]


def test_symlink_loop_in_an_image_folder_is_an_error(tmp_path):
    """Issue 14: ``train/a/loop -> ..`` turned 16 images into 656, class b's labelled a, without a word."""
    write_folder(str(tmp_path / "train"), ["a", "b"], per_class=8)
    os.symlink("..", tmp_path / "train" / "a" / "loop")
    with pytest.raises(DataError, match=r"a/loop is the folder .*train again \(a symbolic link back up"):
        scan_image_folder(str(tmp_path / "train"))
    os.remove(tmp_path / "train" / "a" / "loop")
    os.symlink(tmp_path / "train" / "b", tmp_path / "train" / "a" / "also_b")  # b's images labelled a too
    with pytest.raises(DataError, match="remove the link"):
        scan_image_folder(str(tmp_path / "train"))
    os.remove(tmp_path / "train" / "a" / "also_b")
    write_folder(str(tmp_path / "elsewhere"), ["c"], per_class=2)  # a link out of the tree is fine
    os.symlink(tmp_path / "elsewhere" / "c", tmp_path / "train" / "b" / "more")
    src = scan_image_folder(str(tmp_path / "train"))
    assert len(src) == 18 and np.bincount(src.targets).tolist() == [8, 10]


def test_evaluation_leaves_unreadable_images_out(tmp_path):
    write_folder(str(tmp_path), ["a", "b"], per_class=2, corrupt={("a", 1), ("b", 0), ("b", 1)})
    tf = train_transform(16, scale_min=1.0, hflip=0.0, color_jitter=0, auto_augment=None, interpolation="bilinear",
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = TransformedDataset(scan_image_folder(str(tmp_path)), tf, replace_unreadable=False)
    images, targets, errors = collate([ds[i] for i in range(len(ds))])
    assert images.shape == (1, 3, 16, 16) and targets.tolist() == [0] and len(errors) == 3
    images, targets, errors = collate([ds[i] for i in (2, 3)])  # nothing readable: an empty batch
    assert images.shape[0] == 0 and targets.shape == (0,) and len(errors) == 2


def test_corrupt_images_are_replaced_and_reported(tmp_path):
    write_folder(str(tmp_path), ["a", "b"], per_class=3, corrupt={("a", 1)})
    src = scan_image_folder(str(tmp_path))
    tf = train_transform(16, scale_min=1.0, hflip=0.0, color_jitter=0, auto_augment=None, interpolation="bilinear",
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = TransformedDataset(src, tf)
    images, targets, errors = collate([ds[i] for i in range(len(ds))])
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8
    assert len(errors) == 1 and "1.png" in errors[0]
    assert torch.equal(images[1], images[2])  # the bad file was replaced by the next one
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        mem = src.decode_all(threads=2, strict=False)
    assert len(mem) == 5
    with pytest.raises(DataError, match="1.png"):
        src.decode_all(threads=2, strict=True)


# ---------------------------------------------------------------------------------------------- samplers
def _keys(sampler):
    return [i for _, i in sampler]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resumable_sampler_matches_distributed_sampler(world):
    data = list(range(23))
    ours = [ResumableDistributedSampler(data, world, r, seed=5) for r in range(world)]
    ref = [torch.utils.data.DistributedSampler(data, world, r, seed=5) for r in range(world)]
    for s in ours + ref:
        s.set_epoch(4)
    for o, r in zip(ours, ref):
        assert _keys(o) == list(r) and len(o) == len(r)
        assert all(e == 4 for e, _ in o)


def test_resumable_sampler_skip_continues_the_same_order():
    data, world, batch, done = list(range(40)), 2, 3, 2  # two batches per rank already consumed
    full = [_keys(ResumableDistributedSampler(data, world, r, seed=1)) for r in range(world)]
    resumed = []
    for r in range(world):
        s = ResumableDistributedSampler(data, world, r, seed=1)
        s.set_epoch(0, skip=done * batch * world)
        resumed.append(_keys(s))
        assert len(s) == len(resumed[-1])
        assert full[r][done * batch:] == resumed[-1]
    # a resume on 3 processes sees the remaining samples (up to 2 trimmed for equal shares; 40 -> 42 pads
    # with 2 repeats, as DistributedSampler does)
    s = [ResumableDistributedSampler(data, 3, r, seed=1) for r in range(3)]
    for x in s:
        x.set_epoch(0, skip=done * batch * world)
    seen = [i for x in s for i in _keys(x)]
    remaining = {i for r in range(world) for i in full[r][done * batch:]}
    assert len(remaining - set(seen)) <= 2 and len(seen) - len(remaining & set(seen)) <= 2
    assert len({len(_keys(x)) for x in s}) == 1


def test_shard_sampler_covers_everything_once():
    shards = [list(ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(ShardSampler(10, 3, r)) for r in range(3)] == [len(s) for s in shards]


# ---------------------------------------------------------------------------------------------- seeded augmentation
def test_seeded_transforms_do_not_depend_on_order_and_keep_global_rng(tmp_path):
    root = write_fake_fmnist(str(tmp_path / "fm"), n_train=20, n_test=5)
    src = load_splits(None, fmnist_dir=root).train
    tf = train_transform(24, scale_min=0.3, hflip=0.5, color_jitter=0, auto_augment="rand-m9-mstd0.5-inc1",
                         interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    ds = TransformedDataset(src, tf, seed=7)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    forward = [ds[(2, i)][0] for i in range(len(ds))]
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    backward = [ds[(2, i)][0] for i in reversed(range(len(ds)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == after  # loading drew nothing
    other_epoch = [ds[(3, i)][0] for i in range(len(ds))]
    assert not all(torch.equal(a, b) for a, b in zip(forward, other_epoch))


def test_isolated_rng_restores_on_error():
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    with pytest.raises(ValueError):
        with isolated_rng(99):
            torch.rand(5)
            raise ValueError
    assert torch.equal(torch.rand(2), expected)


def test_a_samples_seeding_stays_on_the_cpu(monkeypatch):
    """Seeding a sample's augmentation touches the CPU generator only: ``torch.manual_seed`` would also queue
    a CUDA seeding in a process without CUDA (a loader worker, a CPU machine), formatting the stack each time."""
    import traceback

    from vigla.data.dataset import isolated_rng

    def no_stack(*args, **kwargs):
        raise AssertionError("the stack was formatted")

    monkeypatch.setattr(traceback, "format_stack", no_stack)
    before = torch.rand(3)
    with isolated_rng(7):
        a = torch.rand(3)
    with isolated_rng(7):
        b = torch.rand(3)
    assert torch.equal(a, b) and not torch.equal(a, before)


def test_default_loader_processes(monkeypatch):
    """One loader process per spare core, split among the processes of one machine, at least one, at most 16."""
    from vigla.data import default_workers

    for cores, processes, expected in ((2, 1, 1), (16, 1, 15), (64, 1, 16), (16, 8, 1), (128, 8, 15)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_workers(processes) == expected, (cores, processes)


def test_recipe_randaugment_keeps_zero_bits_as_black():
    """The recipe's RandAugment (rand-m9-mstd0.5-inc1) draws timm's increasing posterize at magnitude 10, 0 bits
    kept: Pillow >= 13 refuses it (a ValueError in the loader a few epochs into a run); vigla's op gives the black
    image Pillow gave before, and the other magnitudes timm's result."""
    import numpy as np
    from PIL import Image, ImageOps

    from vigla.data.transforms import _augment_ops, train_transform

    t = train_transform(32, scale_min=0.08, hflip=0.5, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                        interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    op = next(o for o in _augment_ops(t) if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude_std = 1.0, 0.0
    img = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8"))
    op.magnitude = 10
    assert not np.asarray(op(img)).any()
    op.magnitude = 5  # 2 bits kept
    assert np.array_equal(np.asarray(op(img)), np.asarray(ImageOps.posterize(img, 2)))
