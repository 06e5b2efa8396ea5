"""Official hustvl/ViG checkpoints load through timm (``pretrained_cfg_overlay=dict(file=...)``).

The official files are not reachable here, so the checkpoints are written from our own weights
under the official names (the inverse key map), after checking those names and shapes against the
lists taken from the official checkpoints (``tests/data/vig_official_keys``).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import vigla  # noqa: F401
from vigla.models import vig, vig_h

KEYS_DIR = Path(__file__).resolve().parent / "data" / "vig_official_keys"
FAMILY = dict(vig_tiny=vig, vig_small=vig, vig_base=vig,
              vig_h_tiny=vig_h, vig_h_small=vig_h, vig_h_base=vig_h)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run best on one thread


def official_shapes(name: str) -> dict:
    rows = [line.split("\t") for line in (KEYS_DIR / f"{name}.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    return {k: tuple(int(d) for d in shape.strip("()").split(",") if d.strip()) for k, shape in rows}


def load(name: str, path: Path, **kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


@pytest.mark.parametrize("name", list(FAMILY))
def test_inverse_map_gives_official_names_and_shapes(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    ours = model.state_dict()
    official = FAMILY[name].to_official_state_dict(ours)
    assert {k: tuple(v.shape) for k, v in official.items()} == official_shapes(name)
    keymap = vig.VIG_KEYMAP if FAMILY[name] is vig else vig_h.VIG_H_KEYMAP
    assert [keymap.to_ours(k) for k in official] == list(ours)  # the two maps are inverse


def perturbed(name: str, **kwargs):
    """A model whose every tensor differs from a fresh init."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def save_official(model, name: str, path: Path) -> dict:
    official = FAMILY[name].to_official_state_dict(model.state_dict())
    torch.save({"model": official, "epoch": 299, "max_accuracy": 0.0}, path)
    return official


@pytest.mark.parametrize("name, config", [("vig_tiny", {}), ("vig_h_tiny", dict(depths=(1, 1, 2, 1)))])
def test_official_checkpoint_round_trip(name, config, tmp_path):
    """Full ViG-T; ViG-H-T with fewer blocks (its full key list is checked on meta above)."""
    src = perturbed(name, **config)
    official = save_official(src, name, tmp_path / "ckpt.pth")
    if not config:
        assert {k: tuple(v.shape) for k, v in official.items()} == official_shapes(name)
    model = load(name, tmp_path / "ckpt.pth", **config).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


@pytest.mark.parametrize("name, shallow, indices", [
    ("vig_tiny", dict(depth=4), 3),
    ("vig_h_tiny", dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8)), (0, 1, 2, 3)),
])
def test_pretrained_features_only_and_new_head(name, shallow, indices, tmp_path):
    src = perturbed(name, **shallow)
    save_official(src, name, tmp_path / "ckpt.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = load(name, tmp_path / "ckpt.pth", features_only=True, **shallow).eval()(x)
        ref = src.forward_intermediates(x, indices=indices, intermediates_only=True)
        assert len(feats) == len(ref) and all(torch.equal(a, b) for a, b in zip(feats, ref))
        # another number of classes: everything but the classifier is loaded
        tuned = load(name, tmp_path / "ckpt.pth", num_classes=10, **shallow).eval()
        assert tuned.head.out_features == 10
        assert torch.equal(tuned.forward_features(x), src.forward_features(x))
        headless = load(name, tmp_path / "ckpt.pth", num_classes=0, **shallow).eval()
        assert torch.equal(headless(x), src.forward_head(src.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("name, shallow, conv", [
    ("vig_tiny", dict(depth=1), "patch_embed.conv1.weight"),
    ("vig_h_tiny", dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8)), "stem.conv1.weight"),
])
@pytest.mark.parametrize("in_chans", [1, 4])
def test_pretrained_for_other_input_channels(name, shallow, conv, in_chans, tmp_path):
    """``in_chans`` 1 or 4 with 3-channel weights: timm adapts the first conv (1: the channels summed; 4: the
    RGB filters repeated and scaled) and everything else loads unchanged."""
    src = perturbed(name, **shallow)
    save_official(src, name, tmp_path / "ckpt.pth")
    model = load(name, tmp_path / "ckpt.pth", in_chans=in_chans, **shallow)
    w, w3 = model.state_dict()[conv], src.state_dict()[conv]
    assert w.shape == (w3.shape[0], in_chans, *w3.shape[2:])
    if in_chans == 1:
        torch.testing.assert_close(w, w3.sum(1, keepdim=True))
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items() if k != conv)


@pytest.mark.parametrize("wrap", ["model", "model_ema", "state_dict", "bare", "ddp"])
def test_filter_accepts_wrappers(wrap):
    with torch.device("meta"):
        model = timm.create_model("vig_tiny", depth=2)
    official = vig.to_official_state_dict(model.state_dict())
    ckpt = {
        "model": {"model": official, "optimizer": {}},
        "model_ema": {"model_ema": official, "model": {}},
        "state_dict": {"state_dict": official},
        "bare": official,
        "ddp": {"model": {f"module.{k}": v for k, v in official.items()}},
    }[wrap]
    out = vig.checkpoint_filter_fn(ckpt, model)
    assert list(out) == list(model.state_dict())
    # vigla-named weights pass through unchanged
    assert list(vig.checkpoint_filter_fn(model.state_dict(), model)) == list(model.state_dict())


def test_pos_embed_resized_on_load(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vig_tiny", depth=1).eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": vig.to_official_state_dict(src.state_dict())}, path)
    model = load("vig_tiny", path, depth=1, img_size=288).eval()
    assert model.pos_embed.shape == (1, 18 * 18, 192)
    x = torch.randn(1, 3, 288, 288)
    with torch.no_grad():  # same as the 224 model resizing on the fly
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)


def _fake_official(name: str, path: Path) -> None:
    """A file with ``name``'s official keys and shapes (stride-0 tensors: tiny on disk)."""
    torch.save({"model": {k: torch.zeros(()).expand(s) for k, s in official_shapes(name).items()}}, path)


def test_wrong_size_checkpoint_fails_clearly(tmp_path):
    path = tmp_path / "vig_small.pth"
    _fake_official("vig_small", path)
    with pytest.raises(ValueError) as err:
        load("vig_tiny", path)
    msg = str(err.value)
    assert "checkpoint does not fit this ViG" in msg
    assert "with a different shape" in msg and "pos_embed (1, 196, 384) (model: (1, 196, 192))" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_wrong_family_checkpoint_fails_clearly(tmp_path):
    path = tmp_path / "vig_h_tiny.pth"
    _fake_official("vig_h_tiny", path)
    with pytest.raises(ValueError) as err:
        load("vig_tiny", path, depth=2)
    msg = str(err.value)
    assert "missing: pos_embed, patch_embed.conv1.weight" in msg
    assert "unexpected: patch_embed.0.weight" in msg and "more)" in msg
