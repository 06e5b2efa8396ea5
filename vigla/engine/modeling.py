"""Creating models by timm name, with clear errors, and loading weights for evaluation."""
from __future__ import annotations

import difflib

import timm
import torch

import vigla  # noqa: F401  (registers vigla's models with timm)

from .checkpoint import load_into, load_weights, read_meta
from .errors import CheckpointError, UserError


def model_args(num_classes: int, img_size: int | None = None, drop_path: float | None = None) -> dict:
    """The keyword arguments for ``timm.create_model`` (None values are left to the model)."""
    return {k: v for k, v in dict(num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path).items()
            if v is not None}


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)``; ``img_size`` is dropped for models that do not take it
    (convolutional nets run at any size)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UserError(f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                      "; `vigla info` lists vigla's models"))
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e) or "img_size" not in kwargs:
            raise
        return timm.create_model(name, **{k: v for k, v in kwargs.items() if k != "img_size"})


def enable_grad_checkpointing(model: torch.nn.Module, name: str) -> None:
    """``model.set_grad_checkpointing(True)``, or a :class:`UserError` naming ``name`` when the model
    has no such switch (or refuses it)."""
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError) as e:
        raise UserError(f"--grad-checkpointing: model {name} does not support gradient checkpointing ({e})") from None


def set_input_size(model: torch.nn.Module, img_size: int) -> None:
    """Let ``model`` run at ``img_size`` when it needs telling (timm ViTs resample their position embedding)."""
    if hasattr(model, "set_input_size"):
        try:
            model.set_input_size(img_size=img_size)
        except TypeError:
            model.set_input_size((img_size, img_size))


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
    if model_name is None:
        raise UserError(f"{path} has no vigla description beside it ({path.rsplit('.', 1)[0]}.json): "
                        f"name its architecture with --model")
    overlay = dict(file=path)
    if num_classes is not None:
        overlay["num_classes"] = num_classes
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    try:
        model = create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001  (torch.load refusing a pickled object, missing keys, a corrupt file)
        text = str(e).strip()
        if "weights_only" in text or "Unsupported global" in text:
            raise CheckpointError(
                f"{path} holds pickled Python objects besides its tensors, and vigla does not unpickle them. "
                f"If you trust the file, keep only its weights: python -c \"import torch; "
                f"c = torch.load('{path}', weights_only=False); torch.save(c.get('model', c), 'weights.pth')\""
            ) from None
        raise CheckpointError(f"{path} does not load into {model_name} ({type(e).__name__}): "
                              f"{' '.join(text.splitlines()[:3])}") from None
    cfg = model.pretrained_cfg
    return model, {"model": model_name, "model_args": kwargs, "source": "timm", "data_config": {
        "mean": list(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)),
        "std": list(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)),
        "interpolation": cfg.get("interpolation", "bicubic"), "crop_pct": cfg.get("crop_pct", 0.875),
        "img_size": cfg.get("input_size", (3, 224, 224))[-1]}}
