"""Pure tensor functions (no nn.Module): the math behind vigla's token mixers."""
from .bigla import bigla, bigla_gated, available_backends

__all__ = ["bigla", "bigla_gated", "available_backends"]
