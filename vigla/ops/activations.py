"""Derivatives the references' written-out backwards share."""
import torch

__all__ = ["silu_slope"]


def silu_slope(u: torch.Tensor) -> torch.Tensor:
    """``SiLU'(u) = s (1 + u (1 - s))``, ``s = sigmoid(u)``, elementwise in ``u``'s dtype."""
    s = torch.sigmoid(u)
    return s * (1 + u * (1 - s))
