"""Other FLOP counters on every registered model (docs/models.md, "Other FLOP counters"): what torchprofile, fvcore and
``torch.utils.flop_counter.FlopCounterMode`` see, and a plain ``torch.jit.trace`` that stays batch-agnostic.

A ParameterNet must cost, in each counter's own convention, what its static twin costs plus the routing and the
kernel mixing, which are computed here from the dynamic layers' shapes, independently of every counter:
per sample, ``M * (numel(W_i) + numel(b_i))`` multiply-adds to mix the experts, ``C_in * M`` for the router's linear
layer and (for torchprofile, which counts means) ``C_in`` for its pooling. MACs scale with the image size, so each
pair is compared on the same input, a small one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import pytest
import timm
import torch
from fvcore.nn import FlopCountAnalysis
from torch.utils.flop_counter import FlopCounterMode
from torchprofile import profile_macs

from parameternet.counting import count_macs, counting_trace
from parameternet.layers import DynamicConv2d, DynamicLinear, LinearSigmoidRouter
from parameternet.models import MODELS

IMG = 32
TWINS = {
    "parameternet_300m": "ghostnet_300m",
    "parameternet_600m": "ghostnet_600m",
    "parameternet_swin_300m": "swin_300m",
}
TOLERANCE = 0.005  # of the ParameterNet's total

logging.getLogger("fvcore").setLevel(logging.ERROR)  # fvcore logs every operator it skips


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    built = {}
    for name in MODELS:
        kwargs = {"img_size": IMG} if "swin" in name else {}  # a Swin builds its attention masks for one size
        built[name] = timm.create_model(name, **kwargs).eval()
    return built


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(n))


def dynamic_calls(model, x) -> list[tuple[torch.nn.Module, torch.Size, torch.Size]]:
    """``(layer, input shape, output shape)`` of every dynamic layer call in an eager forward of ``x``."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0].shape, out.shape)))
        for m in model.modules()
        if isinstance(m, (DynamicConv2d, DynamicLinear))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def routing_and_mixing(model, x) -> tuple[int, int, int]:
    """``(mixing, routing, pooling)`` multiply-adds of ``model(x)``'s dynamic layers."""
    mixing = routing = pooling = 0
    for layer, shape, _ in dynamic_calls(model, x):
        assert isinstance(layer.router, LinearSigmoidRouter) and not getattr(layer, "route_per_image", False)
        conv = isinstance(layer, DynamicConv2d)
        samples = shape[0] if conv else shape[layer.batch_dim]  # a Swin's qkv / proj: one per window
        c_in, M = (layer.in_channels if conv else layer.in_features), layer.num_experts
        per_expert = layer.weight[0].numel() + (0 if layer.bias is None else layer.bias.shape[1])
        mixing += samples * M * per_expert
        routing += samples * c_in * M
        pooling += samples * c_in  # the mean the router reads: one value per sample and channel
    return mixing, routing, pooling


def flop_counter_mode(model, x, backward: bool = False) -> int:
    counter = FlopCounterMode(display=False)
    with counter, contextlib.nullcontext() if backward else torch.no_grad():
        y = model(x)
        if backward:
            y.sum().backward()
    return counter.get_total_flops()


def fvcore(model, x, paper_formulas: bool = False) -> tuple[int, dict[str, int]]:
    """fvcore's total and the operators it skipped; ``paper_formulas``: traced inside :class:`counting_trace`."""
    with counting_trace() if paper_formulas else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total()), dict(analysis.unsupported_ops())


def torchprofile_macs(model, x) -> tuple[int, int]:
    """``torchprofile.profile_macs``: its total, and the total without its one MAC per traced product of Python
    integers (shape arithmetic, a 0-d ``mul``), which :func:`count_macs` skips."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchprofile warns for every operator it has no handler for
        per_node = profile_macs(model, x, reduction=None)
    shapes = sum(
        v for node, v in per_node.items() if node.operator.startswith("aten::mul") and not node.outputs[0].shape
    )
    total = sum(per_node.values())
    return total, total - shapes


def assert_twin_plus(pn: int, twin: int, expected_extra: int) -> None:
    assert abs(pn - twin - expected_extra) <= TOLERANCE * pn, (pn, twin, expected_extra, (pn - twin) / expected_extra)


def test_every_registered_model_is_a_parameternet_or_its_twin():
    assert set(TWINS) | set(TWINS.values()) == set(MODELS)


@pytest.mark.parametrize("name", TWINS)
def test_flop_counter_mode_sees_the_twin_plus_routing_and_mixing(models, name):
    """FlopCounterMode counts 2 FLOPs per multiply-add of mm / bmm / addmm / conv (groups included) in the eager
    ops: a batch of one (one conv with the mixed kernel) and of two (per-sample matmul, grouped conv over the batch)."""
    pn, twin = models[name], models[TWINS[name]]
    for n in (1, 2):
        x = images(n)
        mixing, routing, _ = routing_and_mixing(pn, x)
        assert_twin_plus(flop_counter_mode(pn, x), flop_counter_mode(twin, x), 2 * (mixing + routing))
    # training: forward and backward count without a crash (the chunked per-sample matmul's backward too)
    trained = copy.deepcopy(pn).train()
    assert flop_counter_mode(trained, images(2), backward=True) > 2 * flop_counter_mode(pn, images(2))


@pytest.mark.parametrize("name", TWINS)
def test_fvcore_sees_the_twin_plus_routing_and_mixing(models, name):
    """fvcore counts one per multiply-add of conv / matmul / linear and skips means and elementwise ops: a plain
    FlopCountAnalysis sees a ParameterNet as its twin plus mixing and the router's linear layer, and so does one
    traced inside counting_trace() (the paper's formulas for the traced batch size)."""
    pn, twin, x = models[name], models[TWINS[name]], images(2)
    mixing, routing, _ = routing_and_mixing(pn, x)
    twin_total = fvcore(twin, x)[0]
    for paper_formulas in (False, True):
        total, skipped = fvcore(pn, x, paper_formulas)
        assert not {"aten::bmm", "aten::baddbmm", "aten::matmul", "aten::mm"} & set(skipped), skipped
        assert_twin_plus(total, twin_total, mixing + routing)


@pytest.mark.parametrize("name", TWINS)
def test_torchprofile_gives_the_paper_count(models, name):
    """torchprofile's profile_macs, plainly and inside counting_trace(): a static model as count_macs counts it, a
    ParameterNet as its twin plus routing, pooling and mixing (count_macs's count, the paper's at 224 px)."""
    pn, twin, x = models[name], models[TWINS[name]], images(2)
    mixing, routing, pooling = routing_and_mixing(pn, x)
    twin_macs = torchprofile_macs(twin, x)[1]
    assert twin_macs == count_macs(twin, x)
    for context in (contextlib.nullcontext, counting_trace):
        with context():
            raw, paper = torchprofile_macs(pn, x)
        assert_twin_plus(paper, twin_macs, mixing + routing + pooling)
        assert abs(paper - count_macs(pn, x)) <= TOLERANCE * paper
        assert 0 <= raw - paper <= TOLERANCE * paper  # a few dozen shape products


@pytest.mark.parametrize("name", TWINS)
def test_plain_jit_trace_stays_batch_agnostic(models, name):
    """A plain torch.jit.trace at batch 2 runs at batch 3 with eager's outputs (the counters' context is off)."""
    model, x = models[name], images(3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings on shape-dependent Python values
        traced = torch.jit.trace(model, x[:2], check_trace=False)
        expected, got = model(x), traced(x)
    assert got.shape == expected.shape == (3, 1000)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_fvcore_counts_a_dynamic_linear_exactly():
    """A DynamicLinear traced plainly: its product (x @ W_b^T), the mixing of weights and biases, the router."""
    layer = DynamicLinear(6, 5, num_experts=3).eval()
    x = torch.randn(2, 7, 6)
    total, skipped = fvcore(layer, x)
    assert not {"aten::bmm", "aten::baddbmm"} & set(skipped)
    assert total == 2 * 7 * 6 * 5 + 2 * 3 * (5 * 6 + 5) + 2 * 6 * 3  # product + mixing (weights, biases) + router
