"""``vigla info``: what is installed and registered."""
from __future__ import annotations

import platform


def add_arguments(parser) -> None:
    parser.add_argument("--filter", default="*", help="wildcard on model names")


def main(args) -> int:
    from vigla.engine.errors import run_command

    return run_command("info", _main, args)


def _main(args) -> int:
    import timm
    import torch

    import vigla
    from vigla.ops.bigla import HAS_FLA, cpu_kernels
    from vigla.ops.dispatch import HAS_TRITON

    print(f"vigla {vigla.__version__} | torch {torch.__version__} | timm {timm.__version__} | "
          f"python {platform.python_version()}")
    print(f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    if HAS_TRITON:
        import triton
        kernels = (f"Triton {triton.__version__} kernels for CUDA tensors, compiled C kernels for float32 CPU tensors "
                   "(when a C compiler is found), PyTorch references elsewhere")
    else:
        kernels = "the PyTorch references (Triton is not installed)"
    print(f"fused ops: {kernels}; fla-core {'installed' if HAS_FLA else 'not installed'}")
    print(f"BiGLA on the CPU: {cpu_kernels.describe()}")
    print("vigla models:", ", ".join(vigla_models(args.filter)) or "(none match)")
    return 0


def vigla_models(pattern: str = "*") -> list[str]:
    """The timm names of vigla's registered models that match ``pattern`` (a wildcard)."""
    import timm
    from timm.models import model_entrypoint

    import vigla  # noqa: F401  (registers vigla's models with timm)

    return [n for n in timm.list_models(pattern) if model_entrypoint(n).__module__.startswith("vigla.")]
