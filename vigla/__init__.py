"""vigla: linear-complexity vision backbones for PyTorch.

``import vigla`` registers every vigla model with timm, so ``timm.create_model("vig_tiny")`` works.
"""
from . import models  # noqa: F401  (registers the model families with timm)
from .ops import bigla  # noqa: F401

__version__ = "0.1.0"
