"""Export: BiGLA's static formulation (vigla.ops.bigla.export_path), the ops' switch to plain formulas
(vigla.ops.tracing), ONNX with onnxruntime parity, and the ``vigla export`` command."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import vigla  # noqa: F401  (registers the models)
from vigla.cli import main as cli
from vigla.engine.checkpoint import save_weights
from vigla.export import export_model, run_exported
from vigla.layers import BiGLAMixer
from vigla.ops import bigla, bigla_gated
from vigla.ops.bigla.export_path import bigla_gated_static, bigla_static
from vigla.ops.bigla.naive import bigla_naive

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ONNX_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(ONNX_MISSING), reason=f"needs {', '.join(ONNX_MISSING)} "
                                "(pip install 'vigla[export]')")

# tiny members of each family: the same code as the registered models, exported in seconds
TINY = {
    "vig_tiny": dict(depth=1, embed_dim=64, num_heads=2),
    "vig_h_tiny": dict(depths=(1, 1), dims=(32, 64), num_heads=(1, 2)),
    "castling_deit_tiny": dict(depth=1, embed_dim=64, num_heads=2, img_size=64),
}


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, **dict(TINY[name], **kwargs))
    with torch.no_grad():  # away from the init (zero biases, unit norms)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def qkv_gates(T: int, steep: bool, dtype=torch.float64, B: int = 2, H: int = 2, K: int = 8, V: int = 6):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, H, V, dtype=dtype)
    if steep:  # down to -20 per token: chunks whose decay spans far more than exp() can factor
        gates = [-20 * torch.rand(B, T, H, K, dtype=dtype) for _ in range(2)]
    else:  # ViG's gates: logsigmoid(z) / 16
        gates = [F.logsigmoid(torch.randn(B, T, H, K, dtype=dtype)) / 16 for _ in range(2)]
    return q, k, v, *gates


# ------------------------------------------------------------------------------------------------
# the static formulation

@pytest.mark.parametrize("steep", [False, True])
@pytest.mark.parametrize("T", [1, 31, 32, 33, 100])
def test_static_bigla_matches_float64_reference(T, steep):
    inputs = qkv_gates(T, steep)
    ref = bigla_naive(*inputs, 0.3)
    assert rel_err(bigla_static(*inputs, 0.3), ref) < 1e-12
    assert rel_err(bigla_static(*(t.float() for t in inputs), 0.3), ref) < 1e-5


def test_static_gated_matches_the_op_and_scripts():
    q, k, v, _, _ = qkv_gates(70, False, torch.float32)
    zf, zb = torch.randn(2, 70, 2, 8), torch.randn(2, 70, 2, 8)
    eager = bigla_gated(q, k, v, zf, zb, 16.0)  # the custom op (chunked reference on CPU)
    static = bigla_gated_static(q, k, v, zf, zb, 16.0, 8 ** -0.5)
    assert rel_err(static, eager) < 1e-5
    scripted = torch.jit.script(bigla_gated_static)
    assert torch.equal(scripted(q, k, v, zf, zb, 16.0, 8 ** -0.5), static)


class _Both(torch.nn.Module):
    """bigla and bigla_gated side by side, as a model would call them."""

    def forward(self, q, k, v, gf, gb):
        return bigla(q, k, v, gf, gb) + bigla_gated(q, k, v, gf, gb, 16.0)


def test_export_records_plain_ops_at_any_length():
    from torch.export import Dim

    inputs = qkv_gates(40, False, torch.float32)
    T = Dim("T", min=1, max=4096)
    program = torch.export.export(_Both(), inputs, dynamic_shapes=[{1: T}] * 5)
    assert not [n for n in program.graph.nodes if str(n.target).startswith("vigla.")]
    for length in (1, 32, 77):
        other = qkv_gates(length, False, torch.float32)
        assert rel_err(program.module()(*other), _Both()(*other)) < 1e-5


def test_torch_compile_keeps_the_custom_op(monkeypatch):
    """Before PyTorch 2.14, Dynamo reads torch.compiler.is_exporting() as True in every compiled
    region (pytorch#176347): compiled models must still get the custom op (the Triton kernels)."""
    def is_exporting_before_2_14():  # True inside whatever Dynamo traces, False in eager
        return torch.compiler.is_compiling()

    # Dynamo keeps the functions it folds (torch.compiler.is_exporting among them) in a table built once per
    # process, at its first trace: build it now, with the real function, so that the stand-in below is not
    # what the rest of the process gets (later compiles would then fail on the real one).
    torch.compile(lambda t: t + int(torch.compiler.is_exporting()), backend="eager", fullgraph=True)(torch.zeros(1))
    monkeypatch.setattr(torch.compiler, "is_exporting", is_exporting_before_2_14)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    mixer = BiGLAMixer(32, num_heads=2).eval()
    x = torch.randn(1, 16, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(mixer, backend=backend, fullgraph=True)(x, (4, 4))
        assert torch.allclose(out, mixer(x, (4, 4)), atol=1e-6)
    torch._dynamo.reset()
    targets = [str(n.target) for g in graphs for n in g.graph.nodes]
    assert "vigla.bigla_fwd" in targets


# ------------------------------------------------------------------------------------------------
# ONNX

@needs_onnx
@pytest.mark.parametrize("name", list(TINY))
def test_onnx_dynamic_shapes_match_pytorch(name, tmp_path):
    model = tiny(name, **(dict(dynamic_img_size=True) if name.startswith("castling") else {}))
    path = str(tmp_path / "model.onnx")
    export_model(model, "onnx", path, torch.randn(2, 3, 64, 64), dynamic=True)
    for shape in [(1, 3, 64, 64), (3, 3, 96, 160)]:  # other batch, height and width than traced
        x = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(run_exported(path, "onnx", x), model(x)) < 1e-4


@needs_onnx
@pytest.mark.parametrize("name", list(TINY))
def test_onnx_legacy_exporter_fixed_size(name, tmp_path):
    model = tiny(name)
    path = str(tmp_path / "model.onnx")
    x = torch.randn(2, 3, 64, 64)
    export_model(model, "onnx", path, x, legacy=True)
    import onnx

    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert not any(op.startswith("vigla") for op in ops)
    with torch.no_grad():
        assert rel_err(run_exported(path, "onnx", x), model(x)) < 1e-4


# ------------------------------------------------------------------------------------------------
# vigla export

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A vigla checkpoint (.safetensors + .json) of a tiny ViG at 64 px."""
    args = dict(TINY["vig_tiny"], num_classes=5)
    torch.manual_seed(0)
    model = timm.create_model("vig_tiny", **args)
    path = str(tmp_path_factory.mktemp("ckpt") / "best.safetensors")
    save_weights(path, model.state_dict(), {"model": "vig_tiny", "model_args": args, "data_config": {
        "mean": [0.5] * 3, "std": [0.5] * 3, "img_size": 64, "crop_pct": 1.0, "interpolation": "bicubic"}})
    return path


def _runs_without_vigla(path: str, fmt: str) -> None:
    """The written file loads and runs in a fresh Python that never imports vigla."""
    load = "torch.jit.load(p)" if fmt == "torchscript" else "torch.export.load(p).module()"
    code = (f"import sys, torch; p = sys.argv[1]; m = {load}; y = m(torch.randn(2, 3, 80, 96)); "
            f"assert y.shape == (2, 5), y.shape; assert 'vigla' not in sys.modules; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env,
                         cwd="/", timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("fmt, flags", [("exported-program", ["--dynamic"]), ("torchscript", [])])
def test_cli_writes_checks_and_runs_anywhere(checkpoint, tmp_path, capsys, fmt, flags):
    out = str(tmp_path / f"model.{fmt}")
    assert cli(["export", checkpoint, "--format", fmt, "--out", out, "--img-size", "64", *flags]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and os.path.isfile(out)
    diffs = [float(line.split("relative ")[1].rstrip(")")) for line in printed.splitlines() if "relative" in line]
    assert len(diffs) == (2 if flags else 1) and max(diffs) < 1e-4
    if fmt == "exported-program":
        assert "height >= " in printed
    _runs_without_vigla(out, fmt)


@needs_onnx
def test_cli_onnx_legacy(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "model.onnx")
    assert cli(["export", checkpoint, "--legacy", "--img-size", "64", "96", "--out", out]) == 0
    assert "input [1, 3, 64, 96]" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--format", "torchscript", "--dynamic"], "runs at any batch and image size already"),
    (["--format", "torchscript", "--legacy"], "--legacy applies to --format onnx only"),
    (["--legacy", "--dynamic"], "legacy ONNX exporter records one image size"),
    (["--format", "exported-program", "--opset", "17"], "--opset applies to --format onnx only"),
    (["--img-size", "64", "64", "64"], "one side or H W"),
    (["--format", "torchscript", "--img-size", "4"], "cannot run at 4x4"),
    (["--format", "exported-program", "--dynamic", "--img-size", "16"], "trace at a larger --img-size"),
    (["--opset", "17"], "--opset 17: the ONNX exporter writes opset 18 or newer; --legacy writes older"),
])
def test_cli_rejects_unsupported_combinations(checkpoint, capsys, flags, message):
    assert cli(["export", checkpoint, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vigla export: error: ") and message in err and len(err.splitlines()) == 1


def test_cli_failed_export_keeps_the_file_there(checkpoint, tmp_path, capsys):
    """An export refused after writing (a dynamic graph traced too small) leaves an earlier file at --out as it
    was, and no partial file beside it."""
    out = tmp_path / "model.pt2"
    out.write_bytes(b"an earlier export")
    assert cli(["export", checkpoint, "--format", "exported-program", "--dynamic", "--img-size", "16",
                "--out", str(out)]) == 2
    assert out.read_bytes() == b"an earlier export" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]
    assert "trace at a larger --img-size" in capsys.readouterr().err


@needs_onnx
def test_cli_onnx_opset_is_the_one_asked_for(checkpoint, tmp_path, capsys):
    """The file has the requested opset, or the command fails in one line (no logged traceback) writing nothing."""
    import onnx

    out = tmp_path / "model.onnx"
    assert cli(["export", checkpoint, "--img-size", "64", "--opset", "20", "--out", str(out)]) == 0
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [20]
    capsys.readouterr()
    bad = tmp_path / "bad.onnx"
    assert cli(["export", checkpoint, "--img-size", "64", "--opset", "99", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vigla export: error: --opset 99: the exporter wrote opset ") and len(err.splitlines()) == 1
    assert not bad.exists() and not (tmp_path / "bad.partial.onnx").exists()


@pytest.mark.parametrize("debug", [False, True])
def test_cli_shows_viglas_warnings_as_the_other_commands_do(checkpoint, tmp_path, capsys, monkeypatch, recwarn,
                                                           debug):
    """vigla export hid every Python warning unless --debug, vigla's own too (a missing C compiler, a model's note):
    each is one 'warning:' line, as in the other commands; torch's tracer noise stays hidden without --debug (and
    goes to Python's warnings, here pytest's record of them, with it)."""
    import warnings

    import vigla.export as export
    from vigla.notices import ViglaWarning

    def noisy_export(*args, **kwargs):
        warnings.warn("a note from vigla", ViglaWarning)
        warnings.warn("tracer noise", torch.jit.TracerWarning)
        return export_model(*args, **kwargs)

    monkeypatch.setattr(export, "export_model", noisy_export)
    out = str(tmp_path / "model.ts")
    assert cli(["export", checkpoint, "--format", "torchscript", "--out", out, *(["--debug"] if debug else [])]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "a note from vigla" in line] == ["warning: a note from vigla"], err
    assert "tracer noise" not in err
    assert any("tracer noise" in str(w.message) for w in recwarn) == debug


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
