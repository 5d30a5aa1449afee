"""Parameters, MACs and latency of a model (ParameterNet, arXiv 2306.14525, section 3.2 and Tables 2, 4, 5).

MACs follow the paper's convention, which is how the ``torchprofile`` package counts them: every matmul, conv,
norm, mean and elementwise ``mul`` of a traced forward pass, so a dynamic layer's router and its kernel mixing
(``M * numel`` multiply-adds per sample) are included. Two handlers differ from torchprofile's: its ``baddbmm``
handler asserts that the added tensor has the full output shape and so fails on the broadcast bias a dynamic
layer adds (ours counts ``b * n * m * p`` from the two multiplied operands, as the original does), and its ``mul``
handler counts one MAC for every product of traced Python integers (shape arithmetic such as ``H * W``), which
ours skips, so a count depends only on the tensor work (a few dozen MACs in a few hundred million).

Parameters are split into experts (the stacked weights and biases of ``DynamicConv2d`` / ``DynamicLinear``),
routers (their routers' parameters) and static (everything else).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchprofile.handlers import HANDLER_MAP
from torchprofile.trace import trace

from parameternet.errors import ParameterNetError
from parameternet.layers import DynamicConv2d, DynamicLinear
from parameternet.layers.kernels import counting_trace

__all__ = ["ParamCounts", "ProfileResult", "count_macs", "count_params", "measure_latency", "profile"]

log = logging.getLogger(__name__)

DYNAMIC_LAYERS = (DynamicConv2d, DynamicLinear)


def _baddbmm(node) -> int:
    # [b, n, p] = aten::baddbmm(bias broadcastable to [b, n, p], [b, n, m], [b, m, p], *, *)
    b, n, m = node.inputs[1].shape
    p = node.inputs[2].shape[-1]
    return b * n * m * p


def _mul(node) -> int:
    shape = node.outputs[0].shape
    return math.prod(shape) if shape else 0  # a 0-d product is shape arithmetic recorded by the tracer


_HANDLERS = {**HANDLER_MAP, "aten::baddbmm": _baddbmm, "aten::mul": _mul, "aten::mul_": _mul}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts; ``total == experts + routers + static``."""

    total: int
    experts: int
    routers: int
    static: int


@dataclass(frozen=True)
class ProfileResult:
    """What :func:`profile` measured. ``macs`` is for the whole batch; latencies are in milliseconds."""

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

    @property
    def macs_per_sample(self) -> int:
        return self.macs // self.batch_size

    def as_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        d["macs_per_sample"] = self.macs_per_sample
        return d


def count_params(model: nn.Module) -> ParamCounts:
    """Count each parameter once (shared ones too) and split it into experts / routers / static."""
    experts, routers = set(), set()
    for module in model.modules():
        if isinstance(module, DYNAMIC_LAYERS):
            experts.update(id(p) for p in (module.weight, module.bias) if p is not None)
            routers.update(id(p) for p in module.router.parameters())
    n_total = n_experts = n_routers = 0
    for p in model.parameters():
        n_total += p.numel()
        if id(p) in experts:
            n_experts += p.numel()
        elif id(p) in routers:
            n_routers += p.numel()
    return ParamCounts(n_total, n_experts, n_routers, n_total - n_experts - n_routers)


def count_macs(model: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-accumulates of ``model(inputs)`` counted as the ``torchprofile`` package counts them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: shape checks turned into constants, as intended
        with torch.no_grad(), counting_trace():  # dynamic layers trace the paper's formulas
            graph = trace(model, (inputs,))
    total, skipped = 0, set()
    for node in graph.nodes:
        if node.operator in _HANDLERS:
            handler = _HANDLERS[node.operator]
            if handler is not None:
                total += handler(node)
        else:
            skipped.add(node.operator)
    if skipped:
        log.debug("operators counted as zero MACs: %s", ", ".join(sorted(skipped)))
    return int(total)


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


def _input_channels(model: nn.Module) -> int:
    in_chans = getattr(model, "in_chans", None)
    if in_chans is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        in_chans = (cfg.get("input_size") or (3,))[0]
    return int(in_chans)


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ParameterNetError(f"{name} must be a positive integer, got {value!r}.")
    return value


def profile(
    model: nn.Module,
    img_size: int | tuple[int, int] = 224,
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
    dtype; every module's train/eval mode is restored afterwards and nothing else is changed.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2:
        raise ParameterNetError(f"img_size must be an int or (height, width), got {img_size!r}.")
    for v in size:
        _positive("img_size", v)
    _positive("batch_size", batch_size)
    _positive("threads", threads)
    _positive("runs", runs)
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    chans = in_chans or _input_channels(model)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch_size, chans, *size, generator=generator).to(device=device, dtype=dtype)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        params = count_params(model)
        macs = count_macs(model, inputs)
        median = p90 = None
        if latency:
            median, p90 = measure_latency(model, inputs, threads, warmup, runs)
    finally:
        for m, training in modes.items():
            m.training = training
    return ProfileResult(
        model=name or _model_name(model),
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
    )


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__
