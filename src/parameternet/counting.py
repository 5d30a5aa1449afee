"""Parameters and MACs of a model (ParameterNet, arXiv 2306.14525, section 3.2 and Tables 2, 4, 5).

MACs follow the paper's convention, which is how the ``torchprofile`` package counts them: every matmul, conv,
norm, mean and elementwise ``mul`` of a traced forward pass, so a dynamic layer's router and its kernel mixing
(``M * numel`` multiply-adds per sample) are included. Two handlers differ from torchprofile's: its ``baddbmm``
handler asserts that the added tensor has the full output shape and so fails on the broadcast bias a dynamic
layer adds (ours counts ``b * n * m * p`` from the two multiplied operands, as the original does), and its ``mul``
handler counts one MAC for every product of traced Python integers (shape arithmetic such as ``H * W``), which
ours skips, so a count depends only on the tensor work (a few dozen MACs in a few hundred million).

Parameters are split into experts (the stacked weights and biases of ``DynamicConv2d`` / ``DynamicLinear``),
routers (their routers' parameters) and static (everything else).

Other counters (docs/models.md, "Other FLOP counters"; ``tests/test_flop_counters.py``). A plain ``torch.jit.trace``
records the dynamic layers' ``trace`` formulations (:mod:`parameternet.layers.functional`): a symbolic batch, and
each per-sample conv as patches times the mixed kernels, a matmul with the conv's own multiply-adds. So
``torchprofile.profile_macs`` gives the paper's count and fvcore's ``FlopCountAnalysis`` (which skips means and
elementwise ops) the static twin plus routing and mixing, with no extra setup; :class:`counting_trace` makes a
trace record the eager formulas for the input's batch size instead, which count the same.
``torch.utils.flop_counter.FlopCounterMode`` counts the eager ops and needs nothing.

It needs only :mod:`parameternet.layers` and torchprofile, so :mod:`parameternet.conversion` counts with it and
:mod:`parameternet.profiling` (latency, reports) builds on it.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torchprofile.handlers import HANDLER_MAP
from torchprofile.trace import trace

from parameternet.layers import DynamicConv2d, DynamicLinear
from parameternet.layers.kernels import counting_trace

__all__ = ["DYNAMIC_LAYERS", "ParamCounts", "count_macs", "count_params", "counting_trace"]

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
