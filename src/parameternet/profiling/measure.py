"""Latency and the one-call profile of a model (ParameterNet, arXiv 2306.14525, section 3.2 and Tables 2, 4, 5).

Parameters and MACs are counted by :mod:`parameternet.counting` (the paper's MAC convention is described there);
its names are re-exported here, where they lived before.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from parameternet.counting import ParamCounts, count_macs, count_params
from parameternet.errors import ParameterNetError
from parameternet.toolkit import eval_mode, image_input_shape, model_name, param_device_dtype

__all__ = ["ParamCounts", "ProfileResult", "count_macs", "count_params", "measure_latency", "profile"]


@dataclass(frozen=True)
class ProfileResult:
    """What :func:`profile` measured, on an input of ``(batch_size, in_chans, *img_size)``. ``macs`` is for the whole
    batch; latencies are in milliseconds."""

    model: str
    img_size: tuple[int, int]
    batch_size: int
    params: int
    expert_params: int
    router_params: int
    static_params: int
    macs: int
    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    threads: int | None = None
    in_chans: int = 3

    @property
    def macs_per_sample(self) -> int:
        return self.macs // self.batch_size

    def as_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        d["macs_per_sample"] = self.macs_per_sample
        return d


def measure_latency(
    model: nn.Module, inputs: torch.Tensor, threads: int = 1, warmup: int = 10, runs: int = 50
) -> tuple[float, float]:
    """Median and 90th-percentile wall time of ``model(inputs)`` in ms, with ``threads`` torch threads."""
    prev_threads = torch.get_num_threads()
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + runs):
                sync()
                start = time.perf_counter()
                model(inputs)
                sync()
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(prev_threads)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 else times[0]
    return statistics.median(times), p90


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ParameterNetError(f"{name} must be a positive integer, got {value!r}.")
    return value


def profile(
    model: nn.Module,
    img_size: int | tuple[int, int] | None = None,
    batch_size: int = 1,
    latency: bool = False,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    in_chans: int | None = None,
    name: str | None = None,
) -> ProfileResult:
    """Parameters, MACs (the paper's convention) and, with ``latency``, the forward time of ``model``.

    The model runs in eval mode on a seeded random batch ``(batch_size, in_chans, H, W)`` on its own device and
    dtype; every module's train/eval mode is restored afterwards and nothing else is changed. ``in_chans`` and
    ``img_size`` (an int or ``(H, W)``) default to the model's own input: its ``in_chans`` and timm's
    ``pretrained_cfg["input_size"]``, else the image a converted module was traced on, else 3 x 224 x 224
    (:func:`parameternet.toolkit.image_input_shape`).
    """
    size = None
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2:
            raise ParameterNetError(f"img_size must be an int or (height, width), got {img_size!r}.")
        for v in size:
            _positive("img_size", v)
    _positive("batch_size", batch_size)
    _positive("threads", threads)
    _positive("runs", runs)
    device, dtype = param_device_dtype(model)
    chans, *size = image_input_shape(model, size, in_chans or None)
    size = tuple(size)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch_size, chans, *size, generator=generator).to(device=device, dtype=dtype)

    with eval_mode(model):
        params = count_params(model)
        macs = count_macs(model, inputs)
        median = p90 = None
        if latency:
            median, p90 = measure_latency(model, inputs, threads, warmup, runs)
    return ProfileResult(
        model=name or model_name(model),
        img_size=size,
        batch_size=batch_size,
        params=params.total,
        expert_params=params.experts,
        router_params=params.routers,
        static_params=params.static,
        macs=macs,
        latency_ms=median,
        latency_p90_ms=p90,
        threads=threads if latency else None,
        in_chans=chans,
    )
