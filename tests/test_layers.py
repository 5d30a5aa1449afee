"""Dynamic layers against a plain reference: per sample, mix the kernels, run nn.functional, stack."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parameternet import DynamicConv2d, DynamicLinear, ParameterNetError
from parameternet.layers import ROUTERS, functional, kernels, set_implementation

DW_ONNX = functional.IMPLEMENTATIONS[functional.Context.ONNX]["depthwise"]  # chosen by measurement


def reference_conv(layer: DynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    outs = []
    for xb in x.split(1):
        alpha = layer.router(xb.mean((2, 3)))[0]  # (M,)
        w = sum(a * wi for a, wi in zip(alpha, layer.weight))
        b = None if layer.bias is None else sum(a * bi for a, bi in zip(alpha, layer.bias))
        padding = layer.padding
        if layer.padding_mode != "zeros":
            xb = F.pad(xb, layer._pad, mode=layer.padding_mode)
            padding = 0
        y = F.conv2d(xb, w, b, layer.stride, padding, layer.dilation, layer.groups)
        outs.append(y if layer.static_bias is None else y + layer.static_bias[:, None, None])
    return torch.cat(outs)


def reference_linear(layer: DynamicLinear, x: torch.Tensor) -> torch.Tensor:
    outs = []
    for xb in x.split(1):
        pooled = xb.reshape(1, -1, layer.in_features).mean(1)
        alpha = layer.router(pooled)[0]
        w = sum(a * wi for a, wi in zip(alpha, layer.weight))
        b = None if layer.bias is None else sum(a * bi for a, bi in zip(alpha, layer.bias))
        outs.append(F.linear(xb, w, b))
    return torch.cat(outs)


def assert_same_function(layer, reference, x, run=None):
    """Output and every gradient (input, experts, bias, router) equal the reference's, fp32 within 1e-5."""
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1 = layer(x1) if run is None else run(layer, x1)
    y2 = reference(layer, x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y2)
    params = [p for p in layer.parameters()]
    grads1 = torch.autograd.grad(y1, [x1, *params], g)
    grads2 = torch.autograd.grad(y2, [x2, *params], g)
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return y1


CONV_CASES = {
    # name: (in, out, kernel, kwargs, what the functional core's table picks at batch 3: eager, inductor, onnx)
    "pointwise": (16, 24, 1, {}, ("per_sample_matmul", "bmm", "bmm")),
    "pointwise-stride2": (16, 24, 1, dict(stride=2), ("per_sample_matmul", "bmm", "bmm")),
    "pointwise-nobias": (16, 24, 1, dict(bias=False), ("per_sample_matmul", "bmm", "bmm")),
    "dense3x3": (6, 10, 3, dict(padding=1), ("grouped", "grouped_op", "unfold")),
    "dense3x3-stride2-nobias": (3, 8, 3, dict(stride=2, padding=1, bias=False), ("grouped", "grouped_op", "unfold")),
    "depthwise": (12, 12, 3, dict(padding=1, groups=12), ("grouped", "grouped_op", DW_ONNX)),
    "depthwise-5x5-stride2": (
        12,
        12,
        5,
        dict(stride=2, padding=2, groups=12, bias=False),
        ("grouped", "grouped_op", DW_ONNX),
    ),
    "depthwise-multiplier": (6, 12, 3, dict(padding=1, groups=6), ("grouped", "grouped_op", DW_ONNX)),
    "grouped": (8, 12, 3, dict(padding=1, groups=4), ("grouped", "grouped_op", "unfold")),
    "grouped-pointwise": (8, 12, 1, dict(groups=2), ("grouped", "grouped_op", "unfold")),
    "dilated": (6, 6, 3, dict(padding=2, dilation=2), ("grouped", "grouped_op", "unfold")),
    "padded-pointwise": (6, 6, 1, dict(padding=1), ("grouped", "grouped_op", "unfold")),
    "same-padding": (6, 8, (3, 5), dict(padding="same"), ("grouped", "grouped_op", "unfold")),
    "reflect": (6, 8, 3, dict(padding=1, padding_mode="reflect"), ("grouped", "grouped_op", "unfold")),
    "rect-kernel": (6, 8, (1, 3), dict(padding=(0, 1), stride=(1, 2)), ("grouped", "grouped_op", "unfold")),
}


def run_implementation(name: str):
    """Run a layer by one named implementation of the functional core, with the router as torch.compile sees it."""

    def run(layer, x):
        alpha = layer.router(x.mean((2, 3)))
        bias = layer._mixed_bias(alpha, per_sample=name == "per_sample_matmul")
        return functional.dynamic_conv2d(x, alpha, layer.weight, bias, layer.geometry, name)

    return run


def applies(name: str, layer: DynamicConv2d, batch: int) -> bool:
    """Whether an implementation computes this layer (the functional core's own rule): ``single`` needs one image,
    the matmuls a pointwise layer, ``stacked`` one input channel per group, ``triton`` a depthwise layer with zero
    padding; ``grouped``, ``shifted`` and ``unfold`` take any geometry."""
    return functional.applies(name, layer.geometry, batch)


# How the layer is run: eager PyTorch (the public call), and every named implementation of the functional core
# called directly (compiling each case is slow; test_conformance.py compiles and exports whole layers).
IMPLEMENTATIONS = {"eager": lambda layer, x: layer(x)} | {
    name: run_implementation(name) for name in functional._FUNCTIONS
}


def conv_layer(case: str, static_bias: bool = False) -> DynamicConv2d:
    torch.manual_seed(0)
    cin, cout, k, kwargs, picks = CONV_CASES[case]
    layer = DynamicConv2d(cin, cout, k, num_experts=3, **kwargs)
    contexts = (functional.Context.EAGER, functional.Context.INDUCTOR, functional.Context.ONNX)
    assert tuple(functional.table_choice(c, layer.geometry) for c in contexts) == picks
    assert all(functional.table_choice(c, layer.geometry, 1) == "single" for c in contexts)
    # a plain torch.jit.trace (what FLOP counters read): the batched matmul for pointwise layers, im2col otherwise
    trace = functional.table_choice(functional.Context.TRACE, layer.geometry)
    assert trace == ("bmm" if picks[2] == "bmm" else "im2col")
    if static_bias:  # what parameternet.deploy() leaves after folding a BatchNorm
        layer.static_bias = nn.Parameter(torch.randn(cout))
    return layer


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matches_reference(case, batch, channels_last, impl):
    layer = conv_layer(case, static_bias=case.startswith(("pointwise", "depthwise-5x5", "dense3x3-stride2")))
    x = torch.randn(batch, layer.in_channels, 9, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if not applies(impl, layer, batch):
        pytest.skip(f"{impl} does not compute a {case} layer at batch {batch}")  # a fixed rule, not a failure
    assert_same_function(layer, reference_conv, x, run=IMPLEMENTATIONS[impl])


@pytest.fixture(autouse=True)
def cheap_mean_backward_everywhere(monkeypatch):
    """The router's pooling uses its own backward from a size on; test inputs are small, so from any size."""
    monkeypatch.setattr(kernels, "MEAN_MIN_NUMEL", 0)


def test_large_pointwise_keeps_no_per_sample_kernels_for_backward(monkeypatch):
    monkeypatch.setattr(kernels, "KEEP_BYTES", 0)
    layer = DynamicConv2d(64, 96, 1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        layer(torch.randn(8, 64, 4, 4, requires_grad=True))
    assert saved and (8, 96, 64) not in saved and max(math.prod(s) for s in saved) <= 96 * 64 * 4  # the experts


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["pointwise", "pointwise-stride2", "pointwise-nobias"])
def test_pointwise_in_chunks(case, channels_last, chunk, monkeypatch):
    """Large per-sample kernels are built (and rebuilt in backward) a few samples at a time: here 1 or 2 of 5."""
    layer = conv_layer(case, static_bias=case != "pointwise-nobias")
    monkeypatch.setattr(kernels, "KEEP_BYTES", 0)
    monkeypatch.setattr(kernels, "CHUNK_BYTES", chunk * layer.out_channels * layer.in_channels * 4)
    x = torch.randn(5, layer.in_channels, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_same_function(layer, reference_conv, x)


def test_pointwise_keeps_channels_last():
    layer = DynamicConv2d(8, 16, 1)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", ["eager", "plain", "chunks-of-one"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("shape", [(4, 10), (1, 10), (3, 7, 10), (2, 3, 4, 10)])
def test_linear_matches_reference(shape, router, impl, monkeypatch):
    torch.manual_seed(0)
    layer = DynamicLinear(10, 6, num_experts=4, router=router)
    if impl == "chunks-of-one":
        monkeypatch.setattr(kernels, "KEEP_BYTES", 0)
        monkeypatch.setattr(kernels, "CHUNK_BYTES", 1)
    run = (lambda layer, x: layer._forward_plain(x)) if impl == "plain" else None
    assert_same_function(layer, reference_linear, torch.randn(*shape), run=run)


def test_linear_routes_per_sample():
    """Every token of a sample shares the mixture: permuting tokens permutes outputs and nothing else."""
    torch.manual_seed(0)
    layer = DynamicLinear(10, 6)
    x = torch.randn(2, 7, 10)
    perm = torch.randperm(7)
    torch.testing.assert_close(layer(x)[:, perm], layer(x[:, perm]))


@pytest.mark.parametrize("router", ROUTERS)
def test_batch_equals_samples_one_by_one(router):
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 8, 3, padding=1, groups=8, router=router)
    x = torch.randn(5, 8, 6, 6)
    torch.testing.assert_close(layer(x), torch.cat([layer(xb) for xb in x.split(1)]), rtol=1e-5, atol=1e-6)


def test_one_expert_is_a_gated_conv():
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1, num_experts=1)
    x = torch.randn(2, 4, 5, 5)
    gate = torch.sigmoid(layer.router.fc(x.mean((2, 3))))  # (B, 1)
    expected = torch.cat(
        [F.conv2d(xb, g * layer.weight[0], g * layer.bias[0], padding=1) for xb, g in zip(x.split(1), gate)]
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_mlp_softmax_router_is_a_distribution_and_sharpens_with_temperature():
    torch.manual_seed(0)
    pooled = torch.randn(4, 16)
    soft = DynamicConv2d(16, 16, 1, router="mlp-softmax", router_temperature=1.0)
    sharp = DynamicConv2d(16, 16, 1, router="mlp-softmax", router_temperature=0.1)
    sharp.router.load_state_dict(soft.router.state_dict())
    a_soft, a_sharp = soft.router(pooled), sharp.router(pooled)
    torch.testing.assert_close(a_soft.sum(-1), torch.ones(4))
    assert (a_sharp.max(-1).values > a_soft.max(-1).values).all()


@pytest.mark.parametrize(
    "make_dynamic, make_dense",
    [
        (lambda: DynamicConv2d(32, 64, 3, num_experts=4), lambda: nn.Conv2d(32, 64, 3)),
        (lambda: DynamicLinear(96, 64, num_experts=4), lambda: nn.Linear(96, 64)),
    ],
    ids=["conv", "linear"],
)
def test_experts_initialised_like_the_dense_layer(make_dynamic, make_dense):
    torch.manual_seed(0)
    dyn, dense = make_dynamic(), make_dense()
    fan_in = dense.weight[0].numel()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) and the bias both use U(-1/sqrt(fan_in), ...)
    for expert, b in zip(dyn.weight, dyn.bias):
        assert expert.shape == dense.weight.shape
        assert expert.abs().max() <= bound and b.abs().max() <= bound
        assert abs(expert.std().item() - dense.weight.std().item()) < 0.1 * dense.weight.std().item()
    assert not torch.equal(dyn.weight[0], dyn.weight[1])


def test_parameter_count_is_experts_times_dense_plus_router():
    dense = nn.Conv2d(16, 32, 3, bias=False)
    dyn = DynamicConv2d(16, 32, 3, bias=False, num_experts=4)
    router = 16 * 4 + 4
    assert sum(p.numel() for p in dyn.parameters()) == 4 * dense.weight.numel() + router


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: DynamicConv2d(4, 4, 3, num_experts=0), "num_experts must be an integer >= 1, got 0"),
        (lambda: DynamicLinear(4, 4, num_experts=2.5), "num_experts must be an integer >= 1, got 2.5"),
        (lambda: DynamicConv2d(4, 4, 3, router="softmax"), "unknown router 'softmax'; choose one of linear-sigmoid"),
        (lambda: DynamicConv2d(4, 6, 3, groups=4), "must be divisible by groups (4)"),
        (lambda: DynamicConv2d(4, 4, 3, stride=2, padding="same"), "padding='same' needs stride 1"),
        (lambda: DynamicConv2d(4, 4, 3, router="mlp-softmax", router_temperature=0), "temperature must be positive"),
    ],
)
def test_bad_construction_says_what_is_wrong(build, message):
    with pytest.raises(ParameterNetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_bad_inputs_say_what_is_wrong():
    conv = DynamicConv2d(3, 8, 3)
    with pytest.raises(ParameterNetError, match="expected 3 input channels, got 1"):
        conv(torch.randn(2, 1, 8, 8))
    with pytest.raises(ParameterNetError, match=r"expects a 4-d input \(B, C, H, W\), got shape \(3, 8, 8\)"):
        conv(torch.randn(3, 8, 8))
    with pytest.raises(ParameterNetError, match=r"expects an input \(B, ..., 4\) with the batch in dimension 0, got"):
        DynamicLinear(4, 2)(torch.randn(2, 5))
    with pytest.raises(ParameterNetError, match="batch_dim must be an integer >= 0, got -1"):
        DynamicLinear(4, 2, batch_dim=-1)


def test_per_sample_conv2d_is_a_well_formed_custom_op():
    """The opaque op inductor runs for a symbolic batch: schema, fake tensor, autograd and dispatch checks."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 7, 9, requires_grad=True)
    weight = torch.randn(3, 6, 2, 3, 3, requires_grad=True)  # groups 3: 2 input channels per group
    torch.library.opcheck(functional.per_sample_conv2d, (x, weight, [2, 1], [1, 2], 3))
    y = functional.per_sample_conv2d(x, weight, [2, 1], [1, 2], 3)
    expected = torch.cat([F.conv2d(xb, wb, None, (2, 1), 0, (1, 2), 3) for xb, wb in zip(x.split(1), weight)])
    torch.testing.assert_close(y, expected)


def test_triton_depthwise_is_a_well_formed_custom_op():
    """The Triton kernels (run by Triton's interpreter here): schema, fake tensor (channels_last kept), autograd."""
    from parameternet.layers import triton_depthwise

    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weight = torch.randn(2, 5, 3, 3, requires_grad=True)
    bias = torch.randn(2, 5, requires_grad=True)
    args = (x, weight, bias, [2, 1], [1, 1, 1, 1], [1, 1])
    torch.library.opcheck(triton_depthwise._depthwise_op, args, test_utils=("test_schema", "test_faketensor"))
    y = triton_depthwise.per_sample_depthwise(x, weight, bias, (2, 1), (1, 1, 1, 1), (1, 1))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", ["depthwise", "depthwise-5x5-stride2"])
def test_triton_depthwise_under_bf16_autocast_matches_the_reference(case):
    """Under autocast the kernels take bf16 operands, as the conv would, and accumulate in float32."""
    layer = conv_layer(case)
    x = torch.randn(3, layer.in_channels, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        y = run_implementation("triton")(layer, x)
        ref = run_implementation("grouped")(layer, x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


def _layout_copies(fn) -> list[str]:
    """The ATen ops in ``fn`` that copy a 4-d tensor (an activation or its gradient, never a router's ``(B, M)``):
    ``contiguous``, ``clone``, ``copy_``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    copies = ("aten::contiguous", "aten::clone", "aten::copy_")
    return [f"{e.name}{e.input_shapes}" for e in prof.events() if e.name in copies and len(e.input_shapes[0]) == 4]


@pytest.mark.parametrize(
    "case,impl",
    [("pointwise", "per_sample_matmul"), ("pointwise", "bmm"), ("depthwise", "triton"),
     ("depthwise-5x5-stride2", "triton")],
)  # fmt: skip
def test_layout_preserving_implementations_keep_channels_last_without_a_copy(case, impl):
    """The CPU proxy for layout copies: with a channels_last input these implementations give a channels_last output
    and copy nothing, forward or backward."""
    layer = conv_layer(case)
    set_implementation(layer, impl)
    x = torch.randn(3, layer.in_channels, 9, 11).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)
    assert _layout_copies(lambda: layer(x)) == []
    y = layer(x)
    assert _layout_copies(lambda: torch.autograd.grad(y, [x, layer.weight], g)) == []


def test_set_implementation_forces_a_name_and_refuses_what_cannot_run():
    torch.manual_seed(0)
    model = nn.Sequential(DynamicConv2d(4, 8, 1), DynamicConv2d(8, 8, 3, padding=1, groups=8))
    x = torch.randn(3, 4, 6, 6)
    expected = model(x)
    assert set_implementation(model, "grouped") == 2
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    set_implementation(model, "bmm")  # a pointwise-only implementation on a depthwise layer: refused at forward
    with pytest.raises(ParameterNetError, match="implementation 'bmm' does not compute a depthwise layer"):
        model(x)
    with pytest.raises(ParameterNetError, match="unknown dynamic-conv implementation 'fast'; choose 'auto' or one"):
        set_implementation(model, "fast")
    set_implementation(model, "auto")
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_channels_last_conversion_keeps_the_expert_bank_and_the_function():
    """model.to(memory_format=torch.channels_last) converts 4-d and 5-d tensors, and channels_last is a 4-d format:
    the 5-d expert bank stays contiguous and the layer computes the same function, in channels_last."""
    torch.manual_seed(0)
    layer = DynamicConv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(3, 6, 8, 8)
    expected = layer(x)
    layer.weight.grad = torch.randn_like(layer.weight)
    layer.to(memory_format=torch.channels_last)
    assert layer.weight.is_contiguous() and layer.weight.shape == (4, 6, 1, 3, 3)
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.grad.shape == layer.weight.shape
    y = layer(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64 and layer.weight.is_contiguous()
