"""Model families, one file each; importing this package registers them with timm."""
from . import vig, vig_h  # noqa: F401
from . import castling  # noqa: F401
