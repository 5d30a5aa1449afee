"""parameternet: more parameters, same FLOPs (Han et al., "ParameterNet", arXiv 2306.14525).

``import parameternet`` registers the paper's models in timm and exposes the dynamic layers.
"""

from parameternet.deploy import DeployReport, deploy
from parameternet.errors import ParameterNetError
from parameternet.layers import DynamicConv2d, DynamicLinear
from parameternet.models import create_model  # importing models registers them in timm
from parameternet.parameterize import ParameterizeReport, load, parameterize, save
from parameternet.profile import ProfileResult  # the package itself is callable: parameternet.profile(model)
from parameternet.profile.export import ExportReport, export_onnx
from parameternet.profile.ort_nchwc import optimize_for_onnxruntime

__version__ = "0.1.0"

__all__ = [
    "DeployReport",
    "DynamicConv2d",
    "DynamicLinear",
    "ExportReport",
    "ParameterNetError",
    "ParameterizeReport",
    "ProfileResult",
    "__version__",
    "create_model",
    "deploy",
    "export_onnx",
    "load",
    "optimize_for_onnxruntime",
    "parameterize",
    "profile",
    "save",
]
