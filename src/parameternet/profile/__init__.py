"""Profiling: parameters (experts / routers / static), MACs in the paper's convention, latency and ONNX export.

``parameternet.profile(model, img_size=None, ...)`` calls :func:`parameternet.profile.counting.profile`: this
package is callable, so the short spelling works and its submodules (``parameternet.profile.report``, which
prints the paper's table for ``parameternet profile``) stay importable under their own names.
"""

import sys
import types

from parameternet.profile.counting import ParamCounts, ProfileResult, count_macs, count_params, measure_latency, profile
from parameternet.profile.export import ExportReport, export_onnx

__all__ = [
    "ExportReport",
    "ParamCounts",
    "ProfileResult",
    "count_macs",
    "count_params",
    "export_onnx",
    "measure_latency",
    "profile",
]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs) -> ProfileResult:
        return profile(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
