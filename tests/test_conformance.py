"""Conformance: every dynamic-layer implementation path in every execution mode users run, against the per-sample
fp32 reference (ParameterNet, arXiv 2306.14525, sec. 3.2: ``y_b = f(x_b; sum_i alpha_bi W_i)``).

Paths: each DynamicConv2d path (1x1 per-sample matmul, depthwise, grouped, dense, padded), both routers,
DynamicLinear (batch-first and sequence-first), TopKMoELinear (grouped_mm and the expert loop), RepConv2d.
Modes: grad / no_grad / inference_mode, train / eval, bf16 autocast with fp32 or bf16 inputs, bf16 weights,
channels_last, batch 1 / 2 / 3 and a batch on the chunked path, torch.jit.trace at one batch run at another,
torch.fx.symbolic_trace, torch.compile(dynamic=True) (graph count; the inductor run is slow). Converted models and
ONNX are in ``tests/test_parameterize.py`` and ``tests/test_export.py``; dtype (fp32, bf16, fp16, bf16 autocast) x
eager / torch.compile(fullgraph=True) / torch.export / ONNX in ``tests/test_dtypes.py``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parameternet import DynamicConv2d, DynamicLinear
from parameternet.layers import RepConv2d, TopKMoELinear, kernels
from parameternet.layers import moe as moe_module
from test_layers import reference_conv, reference_linear

# name: builder of a layer and an input maker (batch -> input)
CONV = {
    "conv-pointwise": (16, 24, 1, {}),
    "conv-pointwise-stride2": (16, 24, 1, dict(stride=2, bias=False)),
    "conv-depthwise": (12, 12, 3, dict(padding=1, groups=12)),
    "conv-depthwise-multiplier": (8, 16, 3, dict(padding=1, groups=8)),
    "conv-grouped": (8, 12, 3, dict(padding=1, groups=4)),
    "conv-dense": (6, 10, 3, dict(padding=1)),
    "conv-reflect": (6, 8, 3, dict(padding=1, padding_mode="reflect")),
}


def build(path: str, router: str = "linear-sigmoid"):
    """``(layer, make_input(batch), reference(layer, x), batch_dim)``."""
    torch.manual_seed(0)
    if path in CONV:
        cin, cout, k, kw = CONV[path]
        layer = DynamicConv2d(cin, cout, k, num_experts=3, router=router, **kw)
        return layer, lambda b: torch.randn(b, cin, 7, 9), reference_conv, 0
    if path == "linear":
        return DynamicLinear(16, 24, router=router), lambda b: torch.randn(b, 5, 16), reference_linear, 0
    if path == "linear-2d":
        return DynamicLinear(16, 24, router=router), lambda b: torch.randn(b, 16), reference_linear, 0
    if path == "linear-seq-first":

        def ref(layer, x):
            return reference_linear(layer, x.transpose(0, 1)).transpose(0, 1)

        return DynamicLinear(16, 24, router=router, batch_dim=1), lambda b: torch.randn(5, b, 16), ref, 1
    if path == "repconv":
        layer = RepConv2d(6, 8, 3, padding=1, num_experts=3)
        with torch.no_grad():
            for branch in layer.branches:
                branch[1].running_mean.uniform_(-0.5, 0.5)
                branch[1].running_var.uniform_(0.5, 2.0)

        def ref(layer, x):  # eval: per sample; train: BatchNorm's batch statistics are the module's own function
            return torch.cat([layer(xb) for xb in x.split(1)]) if not layer.training else layer(x)

        return layer, lambda b: torch.randn(b, 6, 7, 9), ref, 0
    if path.startswith("moe"):
        layer = TopKMoELinear(16, 32, bias=True, num_experts=4)
        return layer, lambda b: torch.randn(b, 5, 16), reference_moe, 0
    raise KeyError(path)


def reference_moe(layer: TopKMoELinear, x: torch.Tensor) -> torch.Tensor:
    """Per token: the argmax expert's output scaled by its softmax probability (Switch, top-1)."""
    flat = x.reshape(-1, layer.in_features)
    rows = []
    for t in flat:
        logits = layer.router.weight @ t
        e = int(logits.argmax())
        p = torch.softmax(logits, -1)[e]
        rows.append(p * (layer.weight[e] @ t + layer.bias[e]))
    return torch.stack(rows).view(*x.shape[:-1], layer.out_features)


PATHS = [*CONV, "linear", "linear-2d", "linear-seq-first", "repconv", "moe-grouped_mm", "moe-loop"]
BATCHES = {"b1": 1, "b2": 2, "b3": 3, "chunked": 3}


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """How often F.grouped_mm ran: a path claimed to use it must have."""
    calls = []
    real = getattr(F, "grouped_mm", None)
    if real is not None:
        monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def setup(path, batch_id, monkeypatch, router="linear-sigmoid"):
    layer, make, ref, bdim = build(path, router)
    if batch_id == "chunked":  # the autograd function that builds per-sample kernels a sample at a time
        monkeypatch.setattr(kernels, "KEEP_BYTES", 0)
        monkeypatch.setattr(kernels, "CHUNK_BYTES", 1)
    if path == "moe-loop":
        monkeypatch.setattr(moe_module, "_grouped_mm_ok", lambda x, w: False)
    monkeypatch.setattr(kernels, "MEAN_MIN_NUMEL", 0)
    return layer, make(BATCHES[batch_id]), ref, bdim


def check_grouped_mm(path, calls):
    if path == "moe-grouped_mm":
        assert hasattr(F, "grouped_mm") and calls, "the grouped_mm path did not call F.grouped_mm"
    if path == "moe-loop":
        assert not calls


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


def reference_of(layer, ref, x, train: bool):
    fp32 = copy.deepcopy(layer).float().train(train)
    return ref(fp32, x.detach().float())


ROUTED = [p for p in PATHS if p.startswith(("conv", "linear"))]


@pytest.mark.parametrize("batch_id", list(BATCHES))
@pytest.mark.parametrize("mode", ["train-grad", "eval-grad", "eval-no_grad", "eval-inference_mode"])
@pytest.mark.parametrize("path", PATHS)
def test_fp32_modes(path, mode, batch_id, monkeypatch, grouped_mm_calls):
    layer, x, ref, _ = setup(path, batch_id, monkeypatch)
    train = mode.startswith("train")
    layer.train(train)
    want = reference_of(layer, ref, x, train)
    if mode.endswith("-grad"):
        x = x.requires_grad_()
        y = layer(x)
        y.backward(torch.ones_like(y))
        assert x.grad is not None and x.grad.dtype == torch.float32
    else:
        with torch.no_grad() if mode.endswith("no_grad") else torch.inference_mode():
            y = layer(x)
    assert y.dtype == torch.float32 and y.shape == want.shape
    assert rel_err(y, want) < 1e-5
    check_grouped_mm(path, grouped_mm_calls)


@pytest.mark.parametrize("batch_id", list(BATCHES))
@pytest.mark.parametrize("inputs", ["fp32-in", "bf16-in"])
@pytest.mark.parametrize("path", PATHS)
def test_bf16_autocast_forward_backward(path, inputs, batch_id, monkeypatch, grouped_mm_calls):
    """Autocast on a CPU: output in bf16 (a RepConv's and an MoE's too), fp32 gradients for fp32 parameters and
    inputs, bf16 for bf16 inputs; within bf16 rounding of the fp32 reference."""
    layer, x, ref, _ = setup(path, batch_id, monkeypatch)
    layer.train(path != "repconv")
    want = reference_of(layer, ref, x, layer.training)
    x = (x.bfloat16() if inputs == "bf16-in" else x).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert rel_err(y, want) < 5e-2
    assert x.grad.dtype == x.dtype
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in layer.parameters())
    assert any(p.grad is not None for p in layer.parameters())
    check_grouped_mm(path, grouped_mm_calls)


@pytest.mark.parametrize("batch_id", ["b1", "b3", "chunked"])
@pytest.mark.parametrize("path", PATHS)
def test_bf16_weights(path, batch_id, monkeypatch, grouped_mm_calls):
    """A model cast to bf16 with bf16 inputs, no autocast: bf16 output and gradients."""
    layer, x, ref, _ = setup(path, batch_id, monkeypatch)
    want = reference_of(layer, ref, x, True)
    layer = layer.bfloat16().train()
    x = x.bfloat16().requires_grad_()
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert rel_err(y, want) < 5e-2
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in layer.parameters())
    check_grouped_mm(path, grouped_mm_calls)


@pytest.mark.parametrize("mode", ["train-grad", "eval-no_grad", "bf16-autocast"])
@pytest.mark.parametrize("path", PATHS)
def test_an_empty_batch_gives_an_empty_output_as_the_dense_layer_does(path, mode, monkeypatch):
    layer, make, _, bdim = build(path)
    x = make(1).narrow(bdim, 0, 0).requires_grad_(mode == "train-grad")  # the same shape with no sample
    layer.train(mode == "train-grad")
    context = (
        torch.no_grad()
        if mode == "eval-no_grad"
        else torch.autocast("cpu", torch.bfloat16, enabled=mode == "bf16-autocast")
    )
    with context:
        y = layer(x)
    full = layer(make(2))
    assert y.numel() == 0 and y.shape[:bdim] + y.shape[bdim + 1 :] == full.shape[:bdim] + full.shape[bdim + 1 :]
    if mode == "train-grad":
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("batch_id", ["b2", "chunked"])
@pytest.mark.parametrize("path", [p for p in CONV] + ["repconv"])
def test_channels_last(path, batch_id, monkeypatch):
    layer, x, ref, _ = setup(path, batch_id, monkeypatch)
    layer.train(path != "repconv")
    want = reference_of(layer, ref, x, layer.training)
    y = layer(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("router", ["linear-sigmoid", "mlp-softmax"])
@pytest.mark.parametrize("path", ROUTED)
def test_mlp_router_and_autocast(path, router, monkeypatch):
    layer, x, ref, _ = setup(path, "b3", monkeypatch, router)
    want = reference_of(layer, ref, x, True)
    assert rel_err(layer(x), want) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel_err(layer(x), want) < 5e-2


def moved(x: torch.Tensor, bdim: int, batch: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[bdim] = batch
    return torch.randn(shape)


@pytest.mark.parametrize("path", [p for p in PATHS if not p.startswith("moe")])
def test_jit_trace_at_one_batch_runs_at_another(path, monkeypatch):
    layer, x, ref, bdim = setup(path, "b2", monkeypatch)
    layer.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, x)
    for b in (1, 3):
        x3 = moved(x, bdim, b)
        assert rel_err(traced(x3), reference_of(layer, ref, x3, False)) < 1e-5


@pytest.mark.parametrize("path", [p for p in PATHS if not p.startswith("moe")])
def test_fx_symbolic_trace(path, monkeypatch):
    layer, x, ref, bdim = setup(path, "b2", monkeypatch)
    layer.eval()
    gm = torch.fx.symbolic_trace(layer)
    for b in (1, 3):
        x3 = moved(x, bdim, b)
        assert rel_err(gm(x3), reference_of(layer, ref, x3, False)) < 1e-5


def compile_counted(layer):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    return torch.compile(layer, backend=counter, dynamic=True), counter


@pytest.mark.parametrize("path", ["conv-pointwise", "conv-depthwise", "conv-dense", "linear", "linear-seq-first"])
def test_compile_dynamic_one_graph_for_every_batch(path, monkeypatch):
    """dynamo with dynamic shapes: one graph serves batch 2, 3 and 5 (batch 1 is specialised by PyTorch's own
    0/1 guard: a second graph)."""
    layer, x, ref, bdim = setup(path, "b2", monkeypatch)
    compiled, counter = compile_counted(layer)
    for b in (2, 3, 5):
        xb = moved(x, bdim, b)
        assert rel_err(compiled(xb), reference_of(layer, ref, xb, True)) < 1e-5
    assert counter.frame_count == 1
    compiled(moved(x, bdim, 1))
    assert counter.frame_count <= 2


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("path", ROUTED)
def test_compile_inductor_forward_backward(path, autocast, monkeypatch):
    layer, x, ref, bdim = setup(path, "b2", monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=True)
    for b in (2, 3):
        xb = moved(x, bdim, b).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = compiled(xb)
        y.float().sum().backward()
        assert rel_err(y, reference_of(layer, ref, xb, True)) < (5e-2 if autocast else 1e-4)
        assert xb.grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch_id", ["b1", "b3", "chunked"])
@pytest.mark.parametrize("path", PATHS)
def test_cuda_autocast_forward_backward(path, batch_id, dtype, monkeypatch):
    layer, x, ref, _ = setup(path, batch_id, monkeypatch)
    if batch_id == "chunked":
        monkeypatch.setattr(kernels, "KEEP_BYTES_GPU", 0)
    layer.train(path != "repconv")
    want = reference_of(layer, ref, x, layer.training)
    layer, x = layer.cuda(), x.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == torch.float32
    assert rel_err(y.cpu(), want) < 5e-2
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in layer.parameters())


def test_the_issue_case_at_the_real_threshold():
    """DynamicLinear(512, 512) on (5, 6, 512) under bf16 autocast and no_grad: 5 MB of per-sample kernels, past
    KEEP_BYTES without any monkeypatching, so the chunked function runs (it raised a dtype error)."""
    torch.manual_seed(0)
    layer = DynamicLinear(512, 512)
    x = torch.randn(5, 6, 512)
    assert 5 * 512 * 512 * 4 > kernels.KEEP_BYTES
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and rel_err(y, reference_linear(layer, x).detach()) < 5e-2


@pytest.mark.parametrize("path", ["conv-pointwise", "conv-dense", "linear"])
def test_bf16_input_with_fp32_weights_without_autocast_is_refused_like_nn_linear(path, monkeypatch):
    layer, x, _, _ = setup(path, "b3", monkeypatch)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        nn.Linear(4, 4)(torch.randn(2, 4).bfloat16())
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        layer(x.bfloat16())


def _conv_groups(graphs) -> list:
    """The group counts of every conv2d call in dynamo's graphs."""
    out = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (torch.conv2d, F.conv2d):
                out.append(node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1))
    return out


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_uses_eager_formulas_for_a_static_batch(dynamic):
    """torch.compile(dynamic=False) knows the batch size: the depthwise layer is the eager grouped conv over the
    batch (groups = B * C). With dynamic=True the batch is symbolic: no conv of the graph holds it; the grouped conv
    runs inside the custom op parameternet::per_sample_conv2d, which computes its group count when it runs."""
    torch.manual_seed(0)
    layer = DynamicConv2d(12, 12, 3, padding=1, groups=12)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=lambda gm, example: graphs.append(gm) or gm, dynamic=dynamic)
    x = torch.randn(3, 12, 8, 8)
    assert rel_err(compiled(x), reference_conv(layer, x)) < 1e-5
    groups = _conv_groups(graphs)
    assert groups == ([36] if not dynamic else [])
    ops = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert (torch.ops.parameternet.per_sample_conv2d.default in ops) == dynamic
    compiled(x[:1])  # a batch of one is a plain conv with the mixed kernel in either mode
    assert _conv_groups(graphs[-1:]) == [12]
