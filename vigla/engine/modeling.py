"""Creating models by timm name, with clear errors, and loading weights for evaluation."""
from __future__ import annotations

import difflib
import os

import timm
import torch

import vigla  # noqa: F401  (registers vigla's models with timm)

from .checkpoint import load_into, load_weights, read_meta
from .errors import CheckpointError, UserError


def model_args(num_classes: int, img_size: int | None = None, drop_path: float | None = None) -> dict:
    """The keyword arguments for ``timm.create_model`` (None values are left to the model)."""
    return {k: v for k, v in dict(num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path).items()
            if v is not None}


def check_model_name(name: str) -> None:
    """Raise :class:`UserError` for a name timm does not know (vigla's models included), with the closest
    registered names."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    raise UserError(f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                    + f" (`vigla info --filter '*{name.split('_')[0]}*'` lists vigla's models; "
                    f"timm.list_models() all of them)")


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)``; ``img_size`` is dropped for models that do not take it
    (convolutional nets run at any size)."""
    check_model_name(name)
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e) or "img_size" not in kwargs:
            raise
        return timm.create_model(name, **{k: v for k, v in kwargs.items() if k != "img_size"})


def check_runs_at(model: torch.nn.Module, name: str, img_size: int, device: torch.device, flag: str) -> None:
    """One forward of a ``[1, 3, img_size, img_size]`` batch (eval mode, no gradients) so that a size the model
    cannot take (smaller than a patch, not a multiple of its stride...) is a :class:`UserError` naming
    ``flag`` before any data is loaded."""
    from timm.models import VisionTransformer

    patch = model.patch_embed.patch_size[0] if isinstance(model, VisionTransformer) else 1
    if img_size > patch and img_size % patch:  # timm's ViTs run there, their patch conv never seeing the last pixels
        lower, upper = img_size - img_size % patch, img_size - img_size % patch + patch
        raise UserError(f"{name} cannot use {flag} {img_size}: not a multiple of its patch size {patch} (the last "
                        f"{img_size % patch} pixels of each side would never be seen); choose {lower} or {upper}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError) as e:
        raise UserError(f"{name} cannot run at {flag} {img_size}: {_first_line(e)}. Choose another {flag} "
                        f"(ViTs need at least one patch, and a multiple of the patch size)") from None
    finally:
        model.train(was_training)


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def enable_grad_checkpointing(model: torch.nn.Module, name: str) -> None:
    """``model.set_grad_checkpointing(True)``, or a :class:`UserError` naming ``name`` when the model
    has no such switch (or refuses it)."""
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError) as e:
        raise UserError(f"--grad-checkpointing: model {name} does not support gradient checkpointing ({e})") from None


def set_input_size(model: torch.nn.Module, img_size: int, name: str = "the model") -> None:
    """Let ``model`` run at ``img_size`` when it needs telling (timm ViTs resample their position embedding);
    a size it cannot take is a :class:`UserError`."""
    if not hasattr(model, "set_input_size"):
        return
    try:
        try:
            model.set_input_size(img_size=img_size)
        except TypeError:
            model.set_input_size((img_size, img_size))
    except (RuntimeError, ValueError, AssertionError) as e:
        raise UserError(f"{name} cannot run at --img-size {img_size}: {_first_line(e)}. Choose another --img-size "
                        f"(ViTs need at least one patch, and a multiple of the patch size)") from None


def _load_error(path: str, model_name: str, err: Exception) -> CheckpointError:
    """What went wrong loading a foreign checkpoint, and what to do; never advice to unpickle a file that
    was not identified as a PyTorch checkpoint."""
    text = str(err).strip()
    if "Unsupported global" in text:  # a torch.save file whose pickle names Python classes
        return CheckpointError(
            f"{path} holds pickled Python objects besides its tensors, and vigla does not unpickle them. "
            f"If you trust the file, keep only its weights: python -c \"import torch; "
            f"c = torch.load('{path}', weights_only=False); torch.save(c.get('model', c), 'weights.pth')\"")
    if isinstance(err, CheckpointError):  # the model's checkpoint filter: keys that do not fit
        return CheckpointError(f"{path} does not load into {model_name}: {text}")
    if not _looks_like_a_checkpoint(path):
        return CheckpointError(f"{path} is not a checkpoint: neither safetensors nor a PyTorch (torch.save) file. "
                               f"Is it the right file, and was it copied whole?")
    if _raised_by_torch_load(err):  # the file's bytes, not its fit to the model
        return CheckpointError(f"{path} is not a checkpoint vigla can read: it starts as a PyTorch (torch.save) file "
                               f"but does not unpickle. Is it the right file, and was it copied whole?")
    return CheckpointError(f"{path} does not load into {model_name} ({type(err).__name__}): "
                           f"{' '.join(text.splitlines()[:3])}")


def _raised_by_torch_load(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, came out of ``torch.load`` (a corrupt pickle stream
    raises anything from UnpicklingError to IndexError, and timm rewraps it as a RuntimeError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == torch.serialization.__file__:
                return True
            tb = tb.tb_next
        err = err.__cause__ or err.__context__
    return False


def _looks_like_a_checkpoint(path: str) -> bool:
    """A safetensors header, a zip archive (torch.save since PyTorch 1.6) or a pickle stream (older
    torch.save) at the start of ``path``."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    if zipfile.is_zipfile(path):
        return True
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON object that fits
        return 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # pickle protocol 2-5


def load_for_eval(path: str, model_name: str | None = None,
                  num_classes: int | None = None) -> tuple[torch.nn.Module, dict]:
    """A model with the weights of ``path`` and a description of them.

    * vigla weights (``.safetensors`` with the ``.json`` written beside it): the model is rebuilt from the JSON.
    * any other checkpoint, e.g. an official ViG release: ``model_name`` is needed; timm loads the file through
      the model's own checkpoint filter (``pretrained_cfg_overlay=dict(file=path)``), refusing to unpickle
      Python objects.
    """
    meta = read_meta(path) if path.endswith(".safetensors") else None
    if meta is not None:
        name = model_name or meta["model"]
        args = dict(meta["model_args"])
        if num_classes is not None and num_classes != args["num_classes"]:
            raise CheckpointError(f"{path} has a {args['num_classes']}-class head but the data has {num_classes} "
                                  f"classes")
        model = create_model(name, **args)
        load_into(model, load_weights(path), f"checkpoint {path} (trained as {meta['model']})")
        return model, meta
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist" + (" (it is a folder: name a weights file in it)"
                                                                    if os.path.isdir(path) else ""))
    if model_name is None:
        raise UserError(f"{path} has no vigla description beside it ({path.rsplit('.', 1)[0]}.json): "
                        f"name its architecture with --model")
    overlay = dict(file=path)
    if num_classes is not None:
        overlay["num_classes"] = num_classes
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    check_model_name(model_name)
    try:
        model = create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as e:  # noqa: BLE001  (torch.load refusing a pickled object, missing keys, a corrupt file)
        raise _load_error(path, model_name, e) from None
    cfg = model.pretrained_cfg
    return model, {"model": model_name, "model_args": kwargs, "source": "timm", "data_config": {
        "mean": list(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)),
        "std": list(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)),
        "interpolation": cfg.get("interpolation", "bicubic"), "crop_pct": cfg.get("crop_pct", 0.875),
        "img_size": cfg.get("input_size", (3, 224, 224))[-1]}}
