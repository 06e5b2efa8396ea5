"""Training configuration: one dataclass, named presets, YAML files and command-line flags.

Precedence, lowest first: the field defaults (the ImageNet recipe of the official ViG code, hustvl/ViG's config;
preset ``recipe``) < the chosen preset < the saved config of the run being resumed < ``--config FILE.yaml`` <
explicit flags.
Every run writes the resolved config to ``<out>/config.yaml``, which ``--config`` reads back.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml

from vigla.data.fmnist import DEFAULT_FMNIST_DIR
from vigla.notices import ViglaWarning

from .errors import UserError


def _opt(default, help: str, group: str, **kw):
    return field(default=default, metadata=dict(help=help, group=group, **kw))


@dataclass
class TrainConfig:
    # data
    data: str | None = _opt(None, "ImageFolder root holding train/<class>/* and val/<class>/*; "
                            "leave out to use the embedded Fashion-MNIST", "data", metavar="PATH")
    fmnist_dir: str = _opt(DEFAULT_FMNIST_DIR, "folder with the four Fashion-MNIST .gz files", "data", metavar="DIR")
    train_subset: int = _opt(0, "train on this many images, a fixed random pick (0: all)", "data", metavar="N")
    val_subset: int = _opt(0, "validate every epoch on this many images (0: all of val/); Fashion-MNIST holds "
                           "them out of its training file (0: uses the test file)", "data", metavar="N")
    test_subset: int = _opt(0, "test at the end on this many images, a fixed random pick (0: all); the test "
                            "split is the Fashion-MNIST test file, or val/", "data", metavar="N")
    in_memory: bool = _opt(False, "decode the image folder into memory once, before training", "data")
    workers: int = _opt(-1, "data loader processes per device (-1: none for in-memory data on CPU, "
                        "else one per spare core, at most 16)", "data", metavar="N")
    strict_data: bool = _opt(False, "stop at the first unreadable image instead of skipping it", "data")
    # model
    model: str = _opt("vig_tiny", "timm model name (vigla's models are registered on import)", "model")
    img_size: int = _opt(224, "training image size (square)", "model", metavar="PX")
    drop_path: float | None = _opt(None, "stochastic depth rate (default: the model's own)", "model",
                                   metavar="RATE")
    compile: bool = _opt(False, "torch.compile the model", "model")
    cuda_graph: bool = _opt(False, "replay each training step (forward, backward, clipping, AdamW) from a CUDA "
                            "graph captured at the 4th step: the host's per-kernel launch cost gone, which "
                            "bounds small images. One CUDA device, bf16 or full precision, --opt adam/adamw, "
                            "not with --compile or --grad-checkpointing", "model")
    grad_checkpointing: bool = _opt(False, "recompute activations in the backward (set_grad_checkpointing): "
                                    "ViG keeps only each block's input and BiGLA output, 0.4x DeiT-T's memory "
                                    "at 1024 px for ~15%% of the speed", "model")
    castling_schedule: str | None = _opt(None, "castling_* models: the auxiliary masked-softmax branch's schedule. "
                                         "'paper' (the default): L1 on the kept mask mass, lambda ramped to 0.1, "
                                         "branch off for the last 20%% of training; 'official': on to the end, no "
                                         "regulariser; 'none': no branch; or key=value overrides of 'paper' "
                                         "(lambda, eps, eps_end, aux_off), e.g. 'paper,aux_off=0.9'. The run's "
                                         "config.yaml records the resolved values", "model", metavar="SPEC")
    # optimisation
    epochs: int = _opt(300, "training epochs", "optimisation", metavar="N")
    batch_size: int = _opt(128, "images per device per step", "optimisation", metavar="N")
    lr: float = _opt(1e-3, "peak learning rate per 512 images: the run uses lr x global batch / 512",
                     "optimisation", metavar="LR")
    warmup_lr: float = _opt(5e-7, "learning rate at the start of warm-up, per 512 images", "optimisation",
                           metavar="LR")
    min_lr: float = _opt(5e-6, "learning rate at the end of the cosine, per 512 images", "optimisation",
                        metavar="LR")
    warmup_epochs: float = _opt(20.0, "linear warm-up epochs (part of --epochs)", "optimisation", metavar="N")
    opt: str = _opt("adamw", "timm optimizer name (timm.optim.create_optimizer_v2)", "optimisation")
    weight_decay: float = _opt(0.05, "weight decay (not on biases and norms)", "optimisation", metavar="WD")
    clip_grad: float = _opt(5.0, "clip the global gradient L2 norm to this (0: off)", "optimisation", metavar="NORM")
    amp: str = _opt("auto", "mixed precision: auto = bf16 on CUDA, off on CPU", "optimisation",
                    choices=("auto", "bf16", "fp16", "off"))
    # augmentation
    aa: str = _opt("rand-m9-mstd0.5-inc1", "timm RandAugment spec, or 'none'", "augmentation", metavar="SPEC")
    scale_min: float = _opt(0.08, "RandomResizedCrop: smallest crop area fraction", "augmentation", metavar="F")
    hflip: float = _opt(0.5, "horizontal flip probability", "augmentation", metavar="P")
    color_jitter: float = _opt(0.4, "colour jitter strength (timm skips it when RandAugment is on; 0: off)",
                               "augmentation", metavar="F")
    reprob: float = _opt(0.25, "RandomErasing probability", "augmentation", metavar="P")
    mixup: float = _opt(0.8, "Mixup alpha (0: off)", "augmentation", metavar="ALPHA")
    cutmix: float = _opt(1.0, "CutMix alpha (0: off)", "augmentation", metavar="ALPHA")
    mixup_prob: float = _opt(1.0, "probability of mixing a batch", "augmentation", metavar="P")
    mixup_switch_prob: float = _opt(0.5, "probability of CutMix instead of Mixup", "augmentation", metavar="P")
    smoothing: float = _opt(0.1, "label smoothing", "augmentation", metavar="EPS")
    interpolation: str = _opt("bicubic", "resize interpolation", "augmentation",
                              choices=("bilinear", "bicubic", "nearest"))
    crop_pct: float = _opt(0.875, "evaluation: resize to img_size / crop_pct, then centre-crop", "augmentation",
                           metavar="F")
    # EMA
    ema: bool = _opt(True, "keep an exponential moving average of the weights (timm ModelEmaV3); "
                     "validated each epoch beside the raw weights", "EMA")
    ema_decay: float = _opt(0.9999, "EMA decay per step", "EMA", metavar="D")
    ema_warmup: bool = _opt(False, "ramp the EMA decay up over the first steps (for short runs)", "EMA")
    # run
    preset: str = _opt("auto", "named settings under the flags: auto = fmnist-quick without --data, "
                       "recipe with it", "run", choices=("auto", "fmnist-quick", "recipe"))
    out: str | None = _opt(None, "output folder (default: runs/<model>-<data>, numbered if taken)", "run",
                           metavar="DIR")
    resume: str | None = _opt(None, "continue a run: 'auto' (latest checkpoint in --out) or a checkpoint "
                              "folder / .state.pt file", "run", metavar="PATH|auto")
    seed: int = _opt(0, "random seed (rank r uses seed + r for dropout and mixing)", "run", metavar="N")
    deterministic: bool = _opt(False, "deterministic kernels (bitwise-repeatable on CPU; slower)", "run")
    device: str = _opt("auto", "auto = cuda when available (LOCAL_RANK under torchrun), else cpu", "run",
                       choices=("auto", "cpu", "cuda"))
    log_interval: int = _opt(10, "steps between progress-bar refreshes and train-loss log rows", "run",
                             metavar="N")


#: Named settings. "recipe" is the official ViG code's ImageNet recipe (hustvl/ViG's config; the field defaults).
#: "fmnist-quick" is the default run: ViG-T on a Fashion-MNIST subset, 1-2 minutes on 2 CPU cores
#: (benchmarks/cpu_default_train.py; its wall time in benchmarks/results/cpu_default_train.json).
PRESETS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "fmnist-quick": dict(
        img_size=64, epochs=2, batch_size=16, lr=1.6e-2, warmup_lr=3.2e-5, min_lr=3.2e-4, warmup_epochs=0.2,
        train_subset=4400, val_subset=400, test_subset=2000,
        aa="none", scale_min=1.0, color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1,
        interpolation="bilinear", crop_pct=1.0, ema=False,
    ),
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: not saved with a run, and not read back from its config.yaml (vigla train's and vigla dense train's): which run it
#: is and where it writes, which a resume knows before it can find the config.yaml
NOT_SAVED = ("resume", "out")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(name: str) -> str:
    base = FIELDS[name].default
    quick = PRESETS["fmnist-quick"].get(name, base)
    if quick != base:
        return f" [recipe: {base}; fmnist-quick: {quick}]"
    return "" if base is None else f" [default: {base}]"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, grouped; unset flags stay out of the namespace
    (``argparse.SUPPRESS``) so that presets and YAML files can fill them."""
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="read settings from a YAML file (keys are the long flag names); flags win")
    groups = {}
    for name, f in FIELDS.items():
        meta = dict(f.metadata)
        title = meta.pop("group")
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        kw = dict(default=argparse.SUPPRESS, help=meta.pop("help") + _default_text(name), **meta)
        if f.type in ("bool", bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = setting_type(f)[0]
        groups[title].add_argument(_flag(name), dest=name, **kw)


def setting_type(f: dataclasses.Field) -> tuple[type, bool]:
    """The type of the setting ``f`` (a field of :class:`TrainConfig` or of ``vigla.dense``'s ``DenseConfig``:
    ``int``, ``float | None``, ``Optional[str]`` ...) and whether it may be None."""
    t = str(getattr(f.type, "__name__", f.type))
    nullable = "None" in t or t.startswith("Optional[")
    base = t.replace("Optional[", "").replace("| None", "").strip(" ]")
    return {"bool": bool, "int": int, "float": float}.get(base, str), nullable


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_EXPONENT = re.compile(r"[-+]?(\d+|\d*\.\d+)[eE][-+]?\d+")  # 5e-4: a number to YAML 1.2, text to PyYAML (1.1)


def check_setting(f: dataclasses.Field, value: Any, source: str | None = None, override: bool = False) -> Any:
    """``value`` for the setting ``f`` (see :func:`setting_type`; an integer where a number is expected becomes a
    float), or a :class:`UserError` in one line naming the setting, the value, the type or choices expected, where
    it came from and the fix. ``source``: the file it came from (None: the flags); ``override``: whether a flag
    given now would take its place (a resumed run's config.yaml, under the flags)."""
    kind, nullable = setting_type(f)
    if value is None and nullable:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    choices = f.metadata.get("choices")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        null = (" or null" if source else " or None") if nullable else ""
        problem = f"must be {_TYPE_WORDS[kind]}{null}, got {value!r}"
        if kind is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):  # PyYAML: YAML 1.1
            problem += f" (YAML reads {value} as text: write {yaml.safe_dump(float(value)).split()[0]})"
    elif choices and value not in choices:
        problem = f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    else:
        return value
    if source is None:
        raise UserError(f"{_flag(f.name)} {problem}")
    flag = f"{_flag(f.name)} or --no-{f.name.replace('_', '-')}" if kind is bool else _flag(f.name)
    raise UserError(f"{source}: {f.name} {problem}; correct it there" + (f", or give {flag} to override it"
                                                                          if override else ""))


def read_yaml(path: str, fields: dict[str, dataclasses.Field] | None = None) -> dict[str, Any]:
    """A config YAML as {field: value}, checked against ``fields`` (default :class:`TrainConfig`'s; ``vigla dense
    train`` passes its own): one that does not exist, cannot be read, is not valid YAML or holds no mapping of
    setting: value (an empty file, a list, a scalar) is a :class:`UserError` in one line naming the file and the
    problem (:func:`read_settings_file`)."""
    fields = FIELDS if fields is None else fields
    if not os.path.exists(path):
        raise UserError(f"config file {path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"config file {path} is a folder: give the YAML file inside it")
    raw, problem = read_settings_file(path)
    if raw is None:
        raise UserError(f"config file {path} {problem}: write it as lines of setting: value (e.g. epochs: 10), or "
                        f"leave --config out")
    check_one_key_per_setting(raw, path)
    out = {}
    for key, value in raw.items():
        name = setting_name(key)
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            raise UserError(f"config file {path}: unknown setting {key!r}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
        out[name] = check_setting(fields[name], value, f"config file {path}")
    return out


def setting_name(key: Any) -> str:
    """The setting that the key ``key`` of a YAML file of settings names: its long flag's name, written with hyphens
    or underscores (``batch-size`` and ``batch_size`` alike) -> the field name (``batch_size``)."""
    return str(key).replace("-", "_")


def check_one_key_per_setting(values: dict[str, Any], path: str) -> None:
    """A :class:`UserError` in one line when two keys of the settings file ``path`` (its ``values``) name one setting
    (``batch-size`` and ``batch_size``: :func:`setting_name`), where the later would replace the earlier without a
    word."""
    seen: dict[str, Any] = {}
    for key in values:
        first = seen.setdefault(setting_name(key), key)
        if first != key:
            raise UserError(f"config file {path}: {first!r} and {key!r} both set {setting_name(key)}: keep one")


def read_settings_file(path: str) -> tuple[dict | None, str]:
    """The mapping of setting: value that the YAML file ``path`` holds -> (it, ""); or (None, the problem, as
    the end of a line that starts with the file): "cannot be read (UnicodeDecodeError: ...)", "is not valid YAML
    (line 2, column 3: expected ',' or ']', but got ':')", "is empty", "holds no settings" (comments only),
    "holds a list, not a mapping of setting: value". The parser's own text spans several lines."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        values = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot be read ({type(e).__name__}: {e})"
    except yaml.YAMLError as e:
        return None, f"is not valid YAML ({_yaml_problem(e)})"
    if isinstance(values, dict):
        return values, ""
    if values is None:
        return None, "holds no settings" if text.strip() else "is empty"
    kind = type(values).__name__
    return None, f"holds {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a mapping of setting: value"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``line L, column C: <problem>`` of a YAML parse error (its text spans several lines)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def resolve_config(flags: dict[str, Any], yaml_values: dict[str, Any] | None = None,
                   saved: dict[str, Any] | None = None, saved_path: str | None = None) -> TrainConfig:
    """Layer the settings (see the module docstring); the preset comes from the highest layer that names it.
    ``saved_path``: the config.yaml that ``saved`` was read from, which its errors name.

    Each setting's value is checked (:func:`check_setting`) where it comes from: one of the wrong type in the
    resumed run's config.yaml is refused in a line naming the file, unless the --config file or a flag replaces it.

    A warm-up that only the preset sets and that does not fit into ``--epochs`` (the recipe's 20 epochs in a
    short run) keeps the preset's share of the run instead (20/300 of it)."""
    layers = ((saved_path or "the saved config.yaml of the resumed run", saved or {}),
              ("the --config file", yaml_values or {}), ("the flags", flags))
    where = {k: label for label, layer in layers for k in layer}
    upper = {k: v for _, layer in layers for k, v in layer.items()}
    for name, value in upper.items():
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            raise UserError(f"unknown setting {name!r} in {where[name]}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
        source = None if where[name] == "the flags" else where[name]
        upper[name] = check_setting(FIELDS[name], value, source, override=source is not None)
    preset = upper.get("preset", "auto")
    if preset == "auto":
        preset = "fmnist-quick" if upper.get("data") is None else "recipe"
    values = {**PRESETS[preset], **upper, "preset": preset}
    if "warmup_epochs" not in upper:
        base = {**_DEFAULTS, **PRESETS[preset]}
        epochs = values.get("epochs", base["epochs"])
        if base["warmup_epochs"] >= epochs:
            values["warmup_epochs"] = epochs * base["warmup_epochs"] / base["epochs"]
    cfg = TrainConfig(**values)
    _validate(cfg, lambda name: where.get(name, f"the {preset} preset"))
    return cfg


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _validate(cfg: TrainConfig, source=lambda name: "the settings") -> None:
    positive = ("epochs", "batch_size", "img_size", "log_interval")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"{_flag(name)} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        raise UserError(f"--warmup-epochs must be in [0, --epochs={cfg.epochs}), got {cfg.warmup_epochs} (from "
                        f"{source('warmup_epochs')}; --epochs {cfg.epochs} from {source('epochs')}): "
                        f"lower --warmup-epochs or raise --epochs")
    if min(cfg.train_subset, cfg.val_subset, cfg.test_subset) < 0:
        raise UserError("--train-subset, --val-subset and --test-subset must be >= 0")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise UserError(f"Mixup/CutMix mix pairs within a batch: --batch-size must be even, got {cfg.batch_size}")
    if cfg.cuda_graph:
        _validate_cuda_graph(cfg)
    if not 0 < cfg.crop_pct <= 1:
        raise UserError(f"--crop-pct must be in (0, 1], got {cfg.crop_pct}")
    _validate_ranges(cfg)


# settings a number outside whose range has no meaning: (fields, lowest, highest, whether the highest is allowed)
_RANGES = (
    (("warmup_lr", "min_lr", "weight_decay", "clip_grad", "color_jitter", "mixup", "cutmix"), 0.0, math.inf, False),
    (("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "scale_min", "ema_decay"), 0.0, 1.0, True),
    (("smoothing", "drop_path"), 0.0, 1.0, False),
)
MAX_IMG_SIZE = 8192  # a training image side beyond it is a typo (8192 px already needs ~200 MB per RGB image)


def _validate_ranges(cfg: TrainConfig) -> None:
    """Numbers in their ranges (finite, a probability in [0, 1], ...): one line each, before anything runs."""
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {cfg.lr}")
    for names, low, high, closed in _RANGES:
        for name in names:
            value = getattr(cfg, name)
            if value is None:
                continue
            inside = low <= value <= high if closed else low <= value < high
            if not (inside and math.isfinite(value)):
                bound = f"[{low:g}, {high:g}]" if closed else f"[{low:g}, {high:g})"
                raise UserError(f"{_flag(name)} must be a finite number in {bound}, got {value}")
    if cfg.img_size > MAX_IMG_SIZE:
        raise UserError(f"--img-size must be at most {MAX_IMG_SIZE}, got {cfg.img_size}")
    if cfg.workers < -1:
        raise UserError(f"--workers must be -1 (automatic) or >= 0, got {cfg.workers}")


def _validate_cuda_graph(cfg: TrainConfig) -> None:
    """What ``--cuda-graph`` cannot replay, known from the settings alone (the device and the process
    count are checked when the run starts)."""
    if cfg.compile:
        raise UserError("--cuda-graph and --compile: pick one (torch.compile's mode 'reduce-overhead' is its own "
                        "CUDA-graph path)")
    if cfg.amp == "fp16":
        raise UserError("--cuda-graph needs --amp bf16 or off: fp16's loss scaling checks its scale on the host "
                        "at every step")
    if cfg.grad_checkpointing:
        raise UserError("--cuda-graph and --grad-checkpointing: pick one (replaying the recomputed blocks, which "
                        "save and restore the CUDA RNG state, is not supported yet)")
    if cfg.opt.lower() not in ("adam", "adamw"):
        raise UserError(f"--cuda-graph needs --opt adamw or adam (their step runs on the device with a "
                        f"scheduled learning rate), got {cfg.opt}")


def config_to_yaml(cfg: TrainConfig) -> str:
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SAVED}
    return yaml.safe_dump(values, sort_keys=False)


def saved_config(values: dict[str, Any], path: str) -> dict[str, Any]:
    """The settings of a run's config.yaml ``path`` that ``vigla train --resume`` takes (:func:`resumed_settings`)."""
    return resumed_settings(values, FIELDS, path, "vigla train")


def resumed_settings(values: dict[str, Any], fields: dict, path: str, command: str) -> dict[str, Any]:
    """The settings of a run's config.yaml ``path`` (:func:`vigla.engine.run.read_run_config`, its ``values``) that a
    resume of ``command`` takes, by field name (keys spelled as ``--config`` takes them: :func:`setting_name`): every
    one of its settings (``fields``) but :data:`NOT_SAVED`. The keys left out are told in a warning line each:
    those that no setting matches (:func:`warn_unknown_settings`) and the :data:`NOT_SAVED` ones
    (:func:`warn_not_resumed`); two keys for one setting are a :class:`UserError`
    (:func:`check_one_key_per_setting`)."""
    check_one_key_per_setting(values, path)
    warn_unknown_settings(values, fields, path, command)
    warn_not_resumed(values, path)
    named = {setting_name(k): v for k, v in values.items()}
    return {k: v for k, v in named.items() if k in fields and k not in NOT_SAVED}


def warn_unknown_settings(values: dict[str, Any], fields: dict, path: str, command: str) -> None:
    """A :class:`~vigla.notices.ViglaWarning` (one ``warning:`` line from the commands) naming the keys of the
    config.yaml ``path`` of a resumed run (its ``values``) that none of ``command``'s settings (``fields``)
    matches (keys spelled as ``--config`` takes them, :func:`setting_name`), sorted: the resume ignores them, as it
    did without a word."""
    unknown = sorted(str(key) for key in values if setting_name(key) not in fields)
    if unknown:
        warnings.warn(f"{path}: unknown setting(s) {', '.join(unknown)} ignored; the run resumes with its other "
                      f"settings (`{command} --help` lists them)", ViglaWarning, stacklevel=4)


def warn_not_resumed(values: dict[str, Any], path: str) -> None:
    """A :class:`~vigla.notices.ViglaWarning` naming the keys of the config.yaml ``path`` of a resumed run (its
    ``values``) that set one of :data:`NOT_SAVED` (vigla does not write them; a user may have), and why the resume
    ignores them, as it did without a word."""
    ignored = [str(key) for key in values if setting_name(key) in NOT_SAVED]
    if ignored:
        warnings.warn(f"{path}: {', '.join(ignored)} ignored: the run to resume and the folder it writes to come from "
                      f"--resume and --out, not from the config.yaml found in that run's folder", ViglaWarning,
                      stacklevel=4)


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """``"--lr 0.001 -> 0.0005"`` for each saved setting that ``cfg`` changes."""
    return [f"{_flag(k)} {v} -> {getattr(cfg, k)}" for k, v in saved.items() if getattr(cfg, k) != v]
