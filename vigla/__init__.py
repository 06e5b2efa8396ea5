"""vigla: linear-complexity vision backbones for PyTorch.

``import vigla`` registers every vigla model with timm, so ``timm.create_model("vig_tiny")`` works.
"""
try:
    from . import models  # noqa: F401  (registers the model families with timm)
    from .ops import bigla  # noqa: F401
except KeyboardInterrupt:  # Ctrl-C while torch and timm load: the vigla command exits in one line
    from .cli import interrupted_while_importing

    interrupted_while_importing()
    raise

__version__ = "0.1.0"
