"""Pure tensor functions (no nn.Module): the math behind vigla's token mixers."""
from .bigla import bigla, available_backends

__all__ = ["bigla", "available_backends"]
