"""parameternet: more parameters, same FLOPs (Han et al., "ParameterNet", arXiv 2306.14525).

``import parameternet`` registers the paper's models in timm and exposes the dynamic layers and the tools below.

The root is lazy (PEP 562): each name is imported on first use, so ``import parameternet.layers`` loads no timm
and ``parameternet --help`` starts in about the time of ``import torch``. The models are registered in timm as
soon as both packages are imported, in either order (a post-import hook on ``timm``, from ``wrapt``).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "DeployReport": "parameternet.deploy",
    "deploy": "parameternet.deploy",
    "ParameterNetError": "parameternet.errors",
    "DynamicConv2d": "parameternet.layers",
    "DynamicLinear": "parameternet.layers",
    "create_model": "parameternet.models",
    "ParameterizeReport": "parameternet.parameterize",
    "load": "parameternet.io",
    "parameterize": "parameternet.parameterize",
    "save": "parameternet.io",
    "ProfileResult": "parameternet.profile",
    "ExportReport": "parameternet.profile.export",
    "export_onnx": "parameternet.profile.export",
    "optimize_for_onnxruntime": "parameternet.profile.ort_nchwc",
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
    from parameternet import profile
    from parameternet.deploy import DeployReport, deploy
    from parameternet.errors import ParameterNetError
    from parameternet.io import load, save
    from parameternet.layers import DynamicConv2d, DynamicLinear
    from parameternet.models import create_model
    from parameternet.parameterize import ParameterizeReport, parameterize
    from parameternet.profile import ProfileResult
    from parameternet.profile.export import ExportReport, export_onnx
    from parameternet.profile.ort_nchwc import optimize_for_onnxruntime


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name == "profile":  # the package itself is callable: parameternet.profile(model)
        value = importlib.import_module("parameternet.profile")
    else:
        raise AttributeError(f"module 'parameternet' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Root(types.ModuleType):
    """``parameternet.deploy`` and ``parameternet.parameterize`` are the functions, as they always were, even after
    their submodules are imported (the import system then sets the submodule on its parent; this keeps the
    function)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("deploy", "parameterize") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Root


def _register_models(_timm: Any) -> None:
    importlib.import_module("parameternet.models")


def _install_timm_hook() -> None:
    import wrapt

    wrapt.register_post_import_hook(_register_models, "timm")  # at once if timm is already imported


_install_timm_hook()
