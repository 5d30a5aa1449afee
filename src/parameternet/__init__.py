"""parameternet: more parameters, same FLOPs (Han et al., "ParameterNet", arXiv 2306.14525).

``import parameternet`` registers the paper's models in timm and exposes the dynamic layers.
"""

from parameternet.errors import ParameterNetError
from parameternet.layers import DynamicConv2d, DynamicLinear

__version__ = "0.1.0"

__all__ = ["DynamicConv2d", "DynamicLinear", "ParameterNetError", "__version__"]
