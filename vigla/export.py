"""``vigla export``: a checkpoint as an ONNX model, a TorchScript module or a ``torch.export`` program,
then run once on a random batch and compared with PyTorch.

The Python API is :func:`export_model` (write the file) and :func:`run_exported` (run it); the command
adds loading, the parity check and one-line errors. Every vigla model exports as it is: its ops switch
to plain PyTorch formulas while exported, traced or scripted (:mod:`vigla.ops.tracing`), so the files
hold ordinary operators and run without vigla installed.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from typing import Optional, Sequence, Tuple

FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}
DEFAULT_OPSET = 18
MIN_DYNAMO_OPSET = 18  # the torch.export-based ONNX exporter writes this or newer (older: --legacy)
PARITY_RTOL = 1e-4  # max |exported - PyTorch| / max |PyTorch| accepted in float32

EPILOG = """\
examples:
  vigla export runs/vig_tiny-fmnist/best.safetensors                       ONNX at the training size
  vigla export best.safetensors --format onnx --dynamic --img-size 224     any batch, height and width
  vigla export best.safetensors --format exported-program --dynamic        torch.export program (.pt2)
  vigla export best.safetensors --format torchscript                       torch.jit.script module (.ts)
  vigla export vig_tiny_official.pth --model vig_tiny --img-size 512       an official ViG checkpoint

The file is written beside the checkpoint (or to --out), loaded back, run on a random batch (with
--dynamic also on a second batch and image size) and compared with the PyTorch model: the command fails
if they differ by more than 1e-4 of the output's magnitude. ONNX needs the export extra:
pip install 'vigla[export]' (onnx, onnxscript, onnxruntime).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .engine.eval_cli import _HelpFormatter  # the same help layout as vigla eval

    parser.formatter_class = _HelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("checkpoint", help="weights: vigla .safetensors, or any timm-loadable file with --model")
    parser.add_argument("--model", help="timm model name (default: the one in the checkpoint's .json)")
    parser.add_argument("--format", choices=tuple(FORMATS), default="onnx", help="what to write")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="PX",
                        help="image size traced (and checked): one side or H W (default: the training size)")
    parser.add_argument("--dynamic", action="store_true",
                        help="any batch, height and width (onnx, exported-program; a TorchScript module "
                             "takes any size anyway)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="images in the checked batch")
    parser.add_argument("--opset", type=int, metavar="N", help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--legacy", action="store_true",
                        help="ONNX through the TorchScript-based exporter (fixed size only)")
    parser.add_argument("--out", metavar="FILE", help="where to write (default: beside the checkpoint, "
                        "named after it: .onnx, .ts or .pt2)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failed export")


# ------------------------------------------------------------------------------------------------ API
def in_chans(model) -> int:
    """Input channels: those of the model's first convolution (timm's ``first_conv``)."""
    first = model.pretrained_cfg["first_conv"]
    return model.get_submodule(first if isinstance(first, str) else first[0]).in_channels


def export_model(model, fmt: str, path: str, example, dynamic: bool = False,
                 opset: int = DEFAULT_OPSET, legacy: bool = False):
    """Write ``model`` (eval mode) to ``path`` as ``fmt``, traced at ``example`` (``[B, C, H, W]``).

    ``dynamic``: batch, height and width stay symbolic (ONNX dims ``batch``, ``height``, ``width``;
    ``torch.export`` infers their ranges, see :func:`dynamic_ranges`). ``legacy``: the
    TorchScript-based ONNX exporter (one image size). TorchScript modules take any size;
    ``dynamic`` does not apply. Returns the ``torch.export`` program behind the file
    (``exported-program``, dynamo ONNX), else None.
    """
    import torch

    model.eval()
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), path)
        return None
    if fmt == "exported-program":
        program = _torch_export(model, example, dynamic)
        torch.export.save(program, path)
        return program
    if fmt == "onnx" and legacy:
        torch.onnx.export(model, (example,), path, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["output"])
        return None
    if fmt == "onnx":
        shapes = ({0: "batch", 2: "height", 3: "width"},) if dynamic else None  # named ONNX dims
        onnx_program = torch.onnx.export(model, (example,), path, dynamo=True, opset_version=opset,
                                         dynamic_shapes=shapes, input_names=["images"],
                                         output_names=["output"], external_data=False, verbose=False)
        return onnx_program.exported_program
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def _torch_export(model, example, dynamic: bool):
    import torch
    from torch.export import Dim

    shapes = ({0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},) if dynamic else None  # ranges inferred
    return torch.export.export(model, (example,), dynamic_shapes=shapes)


def dynamic_ranges(program) -> dict:
    """``{"height": (lo, hi), "width": (lo, hi)}`` of an exported program's image input as
    ``torch.export`` inferred them (``hi`` None: unbounded); a dim missing was fixed at export."""
    from torch.utils._sympy.numbers import int_oo

    image = next(n for n in program.graph.nodes
                 if n.op == "placeholder" and n.name in program.graph_signature.user_inputs)
    out = {}
    for name, dim in (("height", 2), ("width", 3)):
        size = image.meta["val"].shape[dim]
        if hasattr(size, "node"):  # a SymInt
            vr = program.range_constraints[size.node.expr]
            out[name] = (int(vr.lower), None if vr.upper == int_oo else int(vr.upper))
    return out


def run_exported(path: str, fmt: str, x):
    """Load the file written by :func:`export_model` and run it on ``x`` (a CPU tensor) -> numpy array."""
    import torch

    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: a failure is raised (and told in one line), not also logged
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    module = torch.jit.load(path) if fmt == "torchscript" else torch.export.load(path).module()
    with torch.no_grad():
        return module(x).numpy()


# ------------------------------------------------------------------------------------------------ CLI
def _fail_early(args) -> Optional[str]:
    """The message for a combination of flags that cannot work, or None."""
    if args.legacy and args.format != "onnx":
        return "--legacy applies to --format onnx only"
    if args.legacy and args.dynamic:
        return ("the legacy ONNX exporter records one image size (its shape arithmetic becomes constants); "
                "drop --legacy for a dynamic ONNX graph")
    if args.format == "torchscript" and args.dynamic:
        return ("a TorchScript module runs at any batch and image size already; --dynamic applies to "
                "--format onnx and exported-program")
    if args.opset is not None and args.format != "onnx":
        return "--opset applies to --format onnx only"
    if args.opset is not None and args.opset < MIN_DYNAMO_OPSET and not args.legacy:
        return (f"--opset {args.opset}: the ONNX exporter writes opset {MIN_DYNAMO_OPSET} or newer; "
                f"--legacy writes older opsets (one image size)")
    if args.opset is not None and args.opset < 7:
        return f"--opset must be >= 7 (ONNX's oldest opset PyTorch exports to), got {args.opset}"
    if args.img_size is not None and len(args.img_size) > 2:
        return f"--img-size takes one side or H W, got {len(args.img_size)} numbers"
    if not os.path.exists(args.checkpoint):
        return f"checkpoint {args.checkpoint} does not exist"
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if args.format == "onnx":
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]
        if missing:
            return (f"ONNX export needs {', '.join(missing)}: pip install 'vigla[export]' "
                    f"(or pip install onnx onnxscript onnxruntime)")
    return None


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _load(args) -> Tuple[object, str, Tuple[int, int]]:
    """The model to export (weights loaded, eval mode), its name and the traced image size."""
    from timm.models import VisionTransformer

    from .engine.aux_branch import export_switch_note
    from .engine.errors import UserError
    from .engine.modeling import create_model, load_for_eval, set_input_size

    model, meta = load_for_eval(args.checkpoint, args.model)
    export_switch_note(model, meta, args.checkpoint)  # a Castling checkpoint saved with its auxiliary branch on
    size = args.img_size or [meta["data_config"]["img_size"]]
    hw = (size[0], size[-1])
    if isinstance(model, VisionTransformer) and args.dynamic and not model.dynamic_img_size:
        # timm ViTs (Castling-DeiT) check the image size unless built with dynamic_img_size
        dynamic = create_model(meta["model"], **dict(meta["model_args"], dynamic_img_size=True))
        dynamic.load_state_dict(model.state_dict())
        model = dynamic
    if not args.dynamic and hw != _model_size(model):
        try:  # a ViT's position embedding laid out for this size, once
            set_input_size(model, hw)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise UserError(f"{meta['model']} cannot run at {hw[0]}x{hw[1]}: {str(e).splitlines()[0]}") from None
    return model.eval(), meta["model"], hw


def _model_size(model) -> Optional[Tuple[int, int]]:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or getattr(model, "img_size", None)
    return None if size is None else (size[0], size[1])


def _check_shapes(batch: int, chans: int, hw: Tuple[int, int], dynamic: bool) -> Sequence[Tuple[int, ...]]:
    shapes = [(batch, chans, *hw)]
    if dynamic:  # another batch and another (non-square) size; multiples of 16 keep ViT patch grids whole
        shapes.append((batch + 2, chans, hw[0] + 32, hw[1] + 64))
    return shapes


def _size_note(model, program, fmt: str, dynamic: bool, hw: Tuple[int, int]) -> str:
    """What sizes the written file takes, as far as the export says."""
    from timm.models import VisionTransformer

    if fmt == "torchscript":  # the model's own code: a timm ViT checks its size unless built dynamic
        fixed = isinstance(model, VisionTransformer) and not model.dynamic_img_size
        return f"any batch at {hw[0]}x{hw[1]}" if fixed else "any batch and size"
    if not dynamic:
        return "fixed batch and size"
    ranges = dynamic_ranges(program)
    note = ", ".join(f"{k} >= {lo}" for k, (lo, _) in ranges.items())
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return f"any batch; {note}" + (f" (multiples of the patch size {patch[0]})" if patch else "")


def _check_unbounded(program, hw: Tuple[int, int], name: str) -> None:
    """A dynamic graph traced at too small a size has an upper bound (a feature map of one position
    there, which the export specializes on): refuse it."""
    bounded = {k: hi for k, (lo, hi) in dynamic_ranges(program).items() if hi is not None}
    if bounded:
        from .engine.errors import UserError

        raise UserError(f"traced at {hw[0]}x{hw[1]}, the {name} graph takes sizes only up to "
                        f"{', '.join(f'{k} {hi}' for k, hi in bounded.items())} (a feature map shrinks to "
                        f"one position there): trace at a larger --img-size, e.g. 64 or the training size")


def _parity(model, path: str, fmt: str, shapes) -> float:
    """Run the file and the model on random batches of ``shapes``; print and return the worst
    ``max |exported - PyTorch| / max |PyTorch|``."""
    import numpy as np
    import torch

    worst = 0.0
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x).numpy()
        diff = float(np.abs(run_exported(path, fmt, x) - ref).max())
        rel = diff / max(float(np.abs(ref).max()), 1e-30)
        worst = max(worst, rel)
        print(f"  input {list(shape)}: max |exported - PyTorch| = {diff:.2e} (relative {rel:.2e})")
    return worst


def export_checkpoint(args: argparse.Namespace) -> int:
    model, name, hw = _load(args)
    chans = in_chans(model)
    out = args.out or os.path.splitext(args.checkpoint)[0] + FORMATS[args.format]
    base, ext = os.path.splitext(out)
    partial = f"{base}.partial{ext}"  # renamed to out once checked: a failed export leaves out as it was
    try:
        return _export_checked(args, model, name, hw, chans, partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _opset_of(path: str) -> int:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _export_checked(args, model, name: str, hw: Tuple[int, int], chans: int, partial: str, out: str) -> int:
    """Export to ``partial``, check it (sizes, opset, parity) and move it to ``out``; 0, or 1 on a parity miss."""
    import torch

    from .engine.errors import UserError

    example = torch.randn(2 if args.dynamic else args.batch_size, chans, *hw)  # 2: no size-1 specialization
    with torch.no_grad():
        try:
            model(example)
        except (ValueError, TypeError, RuntimeError, AssertionError) as e:
            raise UserError(f"{name} cannot run at {hw[0]}x{hw[1]}: {str(e).splitlines()[0]}") from None
    start = time.perf_counter()
    try:
        program = export_model(model, args.format, partial, example, args.dynamic, args.opset or DEFAULT_OPSET,
                               args.legacy)
    except Exception as e:  # noqa: BLE001  (torch.export / ONNX / TorchScript errors: one line, --debug for more)
        if args.debug:
            raise
        raise UserError(f"{args.format} export of {name} failed ({type(e).__name__}): "
                        f"{str(e).strip().splitlines()[0]} (--debug shows the traceback)") from None
    if args.dynamic:
        _check_unbounded(program, hw, name)
    if args.format == "onnx" and args.opset is not None and _opset_of(partial) != args.opset:
        raise UserError(f"--opset {args.opset}: the exporter wrote opset {_opset_of(partial)} (it converts to "
                        f"{MIN_DYNAMO_OPSET} and the versions its converter knows); choose one of those")
    print(f"exported {out} ({args.format}{' legacy' if args.legacy else ''}, {name}, traced at {hw[0]}x{hw[1]}, "
          f"{os.path.getsize(partial) / 2 ** 20:.1f} MiB) in {time.perf_counter() - start:.1f} s; takes "
          f"{_size_note(model, program, args.format, args.dynamic, hw)}")
    try:
        worst = _parity(model, partial, args.format, _check_shapes(args.batch_size, chans, hw, args.dynamic))
    except Exception as e:  # noqa: BLE001  (the written file failing on a valid input: one line)
        if args.debug:
            raise
        raise UserError(f"the written {args.format} fails on a random batch ({type(e).__name__}): "
                        f"{str(e).strip().splitlines()[0]}") from None
    if worst > PARITY_RTOL:
        print(f"vigla export: error: the exported {args.format} differs from PyTorch by {worst:.2e} of the output's "
              f"magnitude (more than {PARITY_RTOL:g}); {out} not written", file=sys.stderr)
        return 1
    os.replace(partial, out)
    print(f"wrote {out}")
    return 0


def main(args: argparse.Namespace) -> int:
    """``vigla export`` -> its exit code: errors in one line, vigla's warnings as one ``warning:`` line each (as the
    other commands, :func:`~vigla.engine.errors.run_command`)."""
    from .engine.errors import run_command

    return run_command("export", _export, args)


def _export(args: argparse.Namespace) -> int:
    """The command's work for :func:`main`: the flags checked, the checkpoint exported and checked -> 0, or 1 when
    the file differs from PyTorch; raises :class:`~vigla.engine.errors.UserError` for flags that cannot work."""
    from .engine.errors import UserError

    problem = _fail_early(args)
    if problem:
        raise UserError(problem)
    with _quiet_exporters(args.debug):
        return export_checkpoint(args)


@contextlib.contextmanager
def _quiet_exporters(debug: bool):
    """Inside, unless ``debug``: torch's warnings (TorchScript's deprecation, the tracer's) and the exporters' logged
    tracebacks (e.g. an opset conversion), which are not the user's to act on, are hidden; vigla's own
    (:class:`~vigla.notices.ViglaWarning`: a missing C compiler, a model's) are shown."""
    from .notices import ViglaWarning

    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")
            warnings.simplefilter("default", ViglaWarning)  # first in the list: it wins for vigla's
            for logger in ("onnxscript", "torch.onnx"):
                logging.getLogger(logger).setLevel(logging.CRITICAL)
        yield
