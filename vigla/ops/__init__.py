"""Pure tensor functions (no nn.Module): the math behind vigla's token mixers."""
from .bigla import bigla, bigla_gated
from .dispatch import reference_ops

__all__ = ["bigla", "bigla_gated", "reference_ops"]
