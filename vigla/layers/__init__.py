from .bigla_mixer import BiGLAMixer  # noqa: F401
from .mlp import SwiGLU  # noqa: F401
from .norm import RmsNorm  # noqa: F401
from .stem import ConvDownsample, ConvStem, check_image_batch  # noqa: F401
from .linear_angular import DW_MODES, LinearAngularAttention  # noqa: F401
