"""``vigla info``: what is installed and registered."""
from __future__ import annotations

import platform


def add_arguments(parser) -> None:
    parser.add_argument("--filter", default="*", help="wildcard on model names")


def main(args) -> int:
    import timm
    import torch

    import vigla
    from vigla.ops.bigla import available_backends

    print(f"vigla {vigla.__version__} | torch {torch.__version__} | timm {timm.__version__} | "
          f"python {platform.python_version()}")
    print(f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print(f"BiGLA backends (cpu): {', '.join(available_backends('cpu'))}")
    if torch.cuda.is_available():
        print(f"BiGLA backends (cuda): {', '.join(available_backends('cuda'))}")
    names = [n for n in timm.list_models(args.filter) if timm.get_pretrained_cfg(n, allow_unregistered=True)
             and getattr(timm.models.get_model_entrypoint(n), "__module__", "").startswith("vigla")]
    print("vigla models:", ", ".join(names) if names else "(none match)")
    return 0
