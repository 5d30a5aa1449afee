"""parameternet: more parameters, same FLOPs (Han et al., "ParameterNet", arXiv 2306.14525).

The names below are re-exported from the modules that define them, each imported on first use (PEP 562), so
``import parameternet.layers`` loads no timm and ``parameternet --help`` starts in about the time of
``import torch``. The paper's models are registered in timm when :mod:`parameternet.models` is imported
(``import parameternet.models``, or the first use of ``parameternet.create_model``), the way timm registers its own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "DeployReport": "parameternet.export.folding",
    "deploy": "parameternet.export.folding",
    "ParameterNetError": "parameternet.errors",
    "DynamicConv2d": "parameternet.layers",
    "DynamicLinear": "parameternet.layers",
    "create_model": "parameternet.models",
    "ParameterizeReport": "parameternet.conversion",
    "load": "parameternet.io",
    "parameterize": "parameternet.conversion",
    "save": "parameternet.io",
    "ProfileResult": "parameternet.profiling.measure",
    "profile": "parameternet.profiling.measure",
    "ExportReport": "parameternet.export.onnx_export",
    "export_onnx": "parameternet.export.onnx_export",
    "optimize_for_onnxruntime": "parameternet.export.ort_nchwc",
}

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

if TYPE_CHECKING:
    from parameternet.conversion import ParameterizeReport, parameterize
    from parameternet.errors import ParameterNetError
    from parameternet.export.folding import DeployReport, deploy
    from parameternet.export.onnx_export import ExportReport, export_onnx
    from parameternet.export.ort_nchwc import optimize_for_onnxruntime
    from parameternet.io import load, save
    from parameternet.layers import DynamicConv2d, DynamicLinear
    from parameternet.models import create_model
    from parameternet.profiling.measure import ProfileResult, profile


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parameternet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
