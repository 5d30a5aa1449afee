"""Conformance in every dtype: every dynamic-layer kind x dtype x execution mode against the per-sample fp32 reference
computed on the same weights and inputs, upcast (ParameterNet, arXiv 2306.14525, sec. 3.2).

Kinds: 1x1, depthwise and dense 3x3 ``DynamicConv2d``, ``DynamicLinear``, ``TopKMoELinear`` top-1 / top-2 with and
without a capacity; ``nn.Conv2d`` / ``nn.Linear`` as controls (what torch itself does in that dtype).
Dtypes: fp32; bf16 and fp16 weights and inputs; fp32 weights under bf16 autocast.
Modes: eager, ``torch.compile(fullgraph=True, backend="aot_eager", dynamic=True)`` forward + backward (inductor in
the slow suite), ``torch.export.export`` with a symbolic batch, run at the traced batch and another one.
Then ONNX (``export_onnx``) in fp16 and bf16, and the limits that are torch's, ONNX's or ONNX Runtime's own.
"""

from __future__ import annotations

import copy
import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parameternet
from parameternet import DynamicConv2d, DynamicLinear, ParameterNetError
from parameternet.export.onnx_export import onnx_session
from parameternet.layers import TopKMoELinear
from test_conformance import rel_err
from test_layers import reference_conv, reference_linear
from test_llama_moe import reference_moe

MOE = {"moe-top1": (1, None), "moe-top1-capacity": (1, 0.5), "moe-top2": (2, None), "moe-top2-capacity": (2, 0.6)}


def _static(layer, x):
    return layer(x)


def build(kind: str):
    """``(layer, make_input(batch), reference(layer, x))`` in fp32."""
    torch.manual_seed(0)
    if kind == "conv-1x1":
        return DynamicConv2d(16, 24, 1, num_experts=3), lambda b: torch.randn(b, 16, 5, 6), reference_conv
    if kind == "conv-depthwise":
        layer = DynamicConv2d(12, 12, 3, padding=1, groups=12, num_experts=3)
        return layer, lambda b: torch.randn(b, 12, 5, 6), reference_conv
    if kind == "conv-dense":
        return DynamicConv2d(6, 10, 3, padding=1, num_experts=3), lambda b: torch.randn(b, 6, 5, 6), reference_conv
    if kind == "linear":
        return DynamicLinear(16, 24, num_experts=3), lambda b: torch.randn(b, 5, 16), reference_linear
    if kind in MOE:
        top_k, capacity = MOE[kind]
        layer = TopKMoELinear(16, 32, bias=True, num_experts=4, top_k=top_k, capacity_factor=capacity)
        return layer, lambda b: torch.randn(b, 5, 16), reference_moe
    if kind == "static-conv":
        return nn.Conv2d(6, 10, 3, padding=1), lambda b: torch.randn(b, 6, 5, 6), _static
    if kind == "static-linear":
        return nn.Linear(16, 24), lambda b: torch.randn(b, 5, 16), _static
    raise KeyError(kind)


KINDS = ["conv-1x1", "conv-depthwise", "conv-dense", "linear", *MOE, "static-conv", "static-linear"]
# name: (weight and input dtype, autocast dtype or None, expected output dtype, tolerance relative to max |ref|)
DTYPES = {
    "fp32": (torch.float32, None, torch.float32, 1e-5),
    "bf16": (torch.bfloat16, None, torch.bfloat16, 5e-2),
    "fp16": (torch.float16, None, torch.float16, 1e-2),
    "bf16-autocast": (torch.float32, torch.bfloat16, torch.bfloat16, 5e-2),
}
# Gradients sum more rounded products than outputs do.
GRAD_TOL = {"fp32": 1e-4, "bf16": 1e-1, "fp16": 2e-2, "bf16-autocast": 1e-1}


def autocast(dtype_id: str):
    return torch.autocast("cpu", dtype=DTYPES[dtype_id][1] or torch.bfloat16, enabled=DTYPES[dtype_id][1] is not None)


def setup(kind: str, dtype_id: str, batch: int = 3):
    """The layer and input in the dtype, and the fp32 reference on the same values upcast."""
    layer, make, ref = build(kind)
    dtype = DTYPES[dtype_id][0]
    layer = layer.to(dtype).train()
    x = make(batch).to(dtype)
    return layer, x, make, ref


def reference(layer, ref, x):
    """The fp32 reference's output on ``x`` and the layer's weights, upcast."""
    with torch.no_grad():
        return ref(copy.deepcopy(layer).float(), x.float())


def reference_grads(layer, ref, x):
    """The fp32 reference's output, a fixed random output gradient, and the reference's gradients for it (input, then
    parameters)."""
    fp32 = copy.deepcopy(layer).float()
    xr = x.detach().float().requires_grad_()
    y = ref(fp32, xr)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, [xr, *fp32.parameters()], grad_out, allow_unused=True)
    return y.detach(), grad_out, grads


def forward_backward(fn, layer, x, dtype_id, grad_out):
    xg = x.clone().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    with autocast(dtype_id):
        y = fn(xg)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), [xg.grad, *(p.grad for p in layer.parameters())]


def check_grads(grads, eager_grads, ref_grads, dtype_id):
    for got, eager, want in zip(grads, eager_grads, ref_grads, strict=True):
        if want is None or not want.abs().max() > 0:  # a parameter the function does not reach here
            continue
        assert got is not None and got.dtype == eager.dtype
        assert rel_err(got, want) < GRAD_TOL[dtype_id]


def grouped_mm_in(graphs) -> bool:
    return any(n.op == "call_function" and "grouped_mm" in str(n.target) for gm in graphs for n in gm.graph.nodes)


@pytest.mark.parametrize("mode", ["eager", "compile", "export"])
@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_kind_dtype_mode(kind, dtype_id, mode):
    """The output (and, eager and compiled, every gradient) in the dtype eager gives, within the dtype's rounding
    of the fp32 reference. Compiled: one graph (``fullgraph=True``) through AOT autograd; the MoE's grouped_mm
    traced in bf16 only (torch's fake grouped_mm refuses fp32, and fp16 off CUDA): fp32 / fp16 gather every
    expert's rows. Exported: a symbolic batch, run at the traced batch (3) and at 5."""
    layer, x, make, ref = setup(kind, dtype_id)
    _, _, out_dtype, tol = DTYPES[dtype_id]
    want, grad_out, ref_grads = reference_grads(layer, ref, x)
    y_eager, eager_grads = forward_backward(layer, layer, x, dtype_id, grad_out)
    assert y_eager.dtype == out_dtype and y_eager.shape == want.shape
    if mode == "eager":
        assert rel_err(y_eager, want) < tol
        check_grads(eager_grads, eager_grads, ref_grads, dtype_id)
    elif mode == "compile":
        from torch._dynamo.testing import AotEagerAndRecordGraphs

        torch._dynamo.reset()
        backend = AotEagerAndRecordGraphs()
        compiled = torch.compile(layer, fullgraph=True, backend=backend, dynamic=True)
        y, grads = forward_backward(compiled, layer, x, dtype_id, grad_out)
        assert y.dtype == y_eager.dtype and backend.fw_graphs and backend.bw_graphs  # AOT autograd, both ways
        assert rel_err(y, want) < tol
        check_grads(grads, eager_grads, ref_grads, dtype_id)
        if kind in MOE:  # what ran: the compute dtype is the autocast dtype under autocast
            assert grouped_mm_in(backend.fw_graphs) == (out_dtype == torch.bfloat16)
    else:
        with autocast(dtype_id), torch.no_grad():
            program = torch.export.export(layer, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        if kind in MOE:
            assert grouped_mm_in([program.graph_module]) == (out_dtype == torch.bfloat16)
        run = program.module()
        for xb in (x, make(5).to(x.dtype)):
            with autocast(dtype_id), torch.no_grad():
                y = run(xb)
            assert y.dtype == y_eager.dtype
            assert rel_err(y, reference(layer, ref, xb)) < tol


@pytest.mark.parametrize("kind", [k for k in MOE if "capacity" in k])
def test_the_capacity_cases_drop_assignments(kind):
    """The capacity rows of the matrix are not the uncapped ones again: the capacity drops an assignment there."""
    layer, x, _, ref = setup(kind, "fp32")
    uncapped = copy.deepcopy(layer)
    uncapped.capacity_factor = None
    assert not torch.allclose(ref(layer, x), ref(uncapped, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_torch_cannot_trace_grouped_mm_off_bf16_on_a_cpu(dtype):
    """torch's own limit, the reason compiled fp32 / fp16 MoE gathers: eager grouped_mm runs on a CPU in fp32 and
    fp16, but its fake kernel (what torch.compile and torch.export trace with) refuses both; bf16 traces."""
    x, w = torch.randn(16, 16), torch.randn(2, 16, 16)
    offs = torch.tensor([8, 16], dtype=torch.int32)

    def f(x, w):
        return F.grouped_mm(x, w, offs=offs)

    f(x.to(dtype), w.to(dtype))  # eager: fine
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend="aot_eager")(x.bfloat16(), w.bfloat16())
    torch._dynamo.reset()
    with pytest.raises(Exception, match="grouped_mm"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(x.to(dtype), w.to(dtype))


# One inductor case per kind, the dtypes spread over them (fp32 and bf16 autocast of the conv and linear kinds are in
# tests/test_conformance.py's slow inductor test).
INDUCTOR = [
    ("conv-1x1", "fp16"),
    ("conv-depthwise", "bf16"),
    ("conv-dense", "fp16"),
    ("linear", "bf16"),
    ("moe-top1", "bf16"),
    ("moe-top1-capacity", "fp16"),
    ("moe-top2", "bf16-autocast"),
    ("moe-top2-capacity", "fp32"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype_id", INDUCTOR)
def test_inductor_forward_backward(kind, dtype_id):
    layer, x, _, ref = setup(kind, dtype_id)
    want, grad_out, ref_grads = reference_grads(layer, ref, x)
    y_eager, eager_grads = forward_backward(layer, layer, x, dtype_id, grad_out)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    y, grads = forward_backward(compiled, layer, x, dtype_id, grad_out)
    assert y.dtype == y_eager.dtype
    assert rel_err(y, want) < DTYPES[dtype_id][3]
    check_grads(grads, eager_grads, ref_grads, dtype_id)


# ---------------------------------------------------------------------------------------------------------------
# ONNX: export_onnx in the model's dtype

ONNX_KINDS = {
    "conv-1x1": lambda: DynamicConv2d(8, 8, 1, num_experts=3),
    "conv-depthwise": lambda: DynamicConv2d(8, 8, 3, padding=1, groups=8, num_experts=3),
    "conv-dense": lambda: DynamicConv2d(8, 8, 3, padding=1, num_experts=3),
    "static-conv": lambda: nn.Conv2d(8, 8, 3, padding=1),
}


def onnx_layer(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return ONNX_KINDS[kind]().to(dtype).eval()


def onnx_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fp32 = copy.deepcopy(layer).float()
    with torch.no_grad():
        return (fp32(x.float()) if isinstance(layer, nn.Conv2d) else reference_conv(fp32, x.float())).detach()


@pytest.mark.parametrize(
    "mode", [dict(), dict(exporter="dynamo"), dict(dynamic_batch=False, batch_size=2)], ids=["ts", "dynamo", "batch2"]
)
@pytest.mark.parametrize("kind", list(ONNX_KINDS))
def test_onnx_float16(kind, mode, tmp_path):
    """A model cast to fp16 exports an fp16 graph (fp16 images in, fp16 out), checked by export_onnx in ONNX Runtime
    within fp16 rounding, and equal to the fp32 reference on the same weights within that rounding."""
    layer = onnx_layer(kind, torch.float16)
    report = parameternet.export_onnx(layer, tmp_path / "m.onnx", img_size=6, in_chans=8, deploy=False, **mode)
    assert report.dtype == "float16" and max(report.max_rel_error.values()) < 1e-2
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    session = onnx_session(tmp_path / "m.onnx")
    x = torch.randn(mode.get("batch_size", 5), 8, 6, 6).half()
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert got.dtype == torch.float16
    assert rel_err(got, onnx_reference(layer, x)) < 1e-2


@pytest.mark.parametrize("batch", [None, 2], ids=["symbolic", "batch2"])
@pytest.mark.parametrize("kind", list(ONNX_KINDS))
def test_onnx_bfloat16_graph_is_valid_onnx_and_computes_the_layer(kind, batch, tmp_path):
    """bf16: the dynamo exporter at opset 22 writes a valid graph (checked by export_onnx with onnx.checker), run here
    by ONNX's reference evaluator against the fp32 reference within bf16 rounding."""
    import ml_dtypes
    import numpy as np
    from onnx.reference import ReferenceEvaluator

    layer = onnx_layer(kind, torch.bfloat16)
    fixed = {} if batch is None else dict(dynamic_batch=False, batch_size=batch)
    path = tmp_path / "m.onnx"
    report = parameternet.export_onnx(
        layer, path, img_size=6, in_chans=8, deploy=False, exporter="dynamo", opset=22, check=False, **fixed
    )
    assert report.dtype == "bfloat16" and report.max_rel_error == {}
    x = torch.randn(batch or 3, 8, 6, 6).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ReferenceEvaluator(str(path)).run(None, {"images": x.float().numpy().astype(ml_dtypes.bfloat16)})[0]
    assert out.dtype == ml_dtypes.bfloat16
    assert rel_err(torch.from_numpy(out.astype(np.float32)), onnx_reference(layer, x)) < 5e-2


@pytest.mark.parametrize("kind", ["conv-depthwise", "static-conv"])
def test_onnx_bfloat16_limits_are_onnx_and_onnx_runtime_s(kind, tmp_path):
    """ONNX's own limits, the static nn.Conv2d's as well as the dynamic layer's: Conv takes bf16 from opset 22 on
    (the TorchScript exporter stops at 20), and ONNX Runtime's CPU provider loads no bf16 Conv / ReduceMean, so
    export_onnx cannot check a bf16 graph and says so."""
    import onnxruntime as ort

    layer = onnx_layer(kind, torch.bfloat16)
    kw = dict(img_size=6, in_chans=8, deploy=False)
    with pytest.raises(ParameterNetError, match="no bfloat16 kernels"):
        parameternet.export_onnx(layer, tmp_path / "a.onnx", **kw)
    with pytest.raises(ParameterNetError, match=r"opset 18\) is not valid ONNX: .*bfloat16"):
        parameternet.export_onnx(layer, tmp_path / "b.onnx", check=False, **kw)
    assert not (tmp_path / "b.onnx").exists()
    parameternet.export_onnx(layer, tmp_path / "c.onnx", check=False, exporter="dynamo", opset=22, **kw)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])


def test_onnx_float16_model_with_deploy(tmp_path):
    """The deploy() graph of a whole small ParameterNet in fp16 (BatchNorms folded in fp16)."""
    from test_export import tiny_parameternet

    model = tiny_parameternet().half()
    report = parameternet.export_onnx(model, tmp_path / "m.onnx", img_size=32)
    assert report.dtype == "float16" and report.deployed and max(report.max_rel_error.values()) < 1e-2
