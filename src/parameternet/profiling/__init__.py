"""Profiling: parameters (experts / routers / static), MACs in the paper's convention, latency
(:mod:`.measure`), the paper's table for ``parameternet profile`` (:mod:`.report`) and routing diagnostics
(:mod:`.routing`). ``parameternet.profile(model)`` is :func:`parameternet.profiling.measure.profile`."""

from parameternet.profiling.measure import (
    ParamCounts,
    ProfileResult,
    count_macs,
    count_params,
    measure_latency,
    profile,
)

__all__ = ["ParamCounts", "ProfileResult", "count_macs", "count_params", "measure_latency", "profile"]
