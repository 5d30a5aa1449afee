"""ONNX Runtime's NCHWc kernels for dynamic convs: the rewrite of a batch-1 graph, its self-check and its CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import parameternet
from parameternet import ParameterNetError
from parameternet.cli import main
from parameternet.export import ort_nchwc
from parameternet.export.onnx_export import onnx_session
from parameternet.export.onnx_scan import scan_over_batch
from parameternet.export.ort_nchwc import NCHWC, nchwc_block_size, onnxruntime_block_size, optimize_for_onnxruntime
from test_export import IMG, assert_close_relative, build, images, tiny_parameternet

# Skipped only where ONNX Runtime itself has no NCHWc kernels; where it has them, a rewrite that fails its
# self-check fails test_the_self_check_passes_where_the_kernels_exist (and every test below), never a skip.
needs_nchwc = pytest.mark.skipif(
    onnxruntime_block_size() is None, reason="this ONNX Runtime build or CPU has no NCHWc kernels"
)


@needs_nchwc
def test_the_self_check_passes_where_the_kernels_exist():
    assert nchwc_block_size() == onnxruntime_block_size() in (8, 16)


def depthwise_graph(batch: int, c: int = 8, multiplier: int = 2, M: int = 3) -> onnx.ModelProto:
    """A fixed-batch dynamic depthwise conv as a graph holds it: the batch folded into the channels, and the kernel
    ``Reshape(MatMul(alpha, experts), (-1, 1, 3, 3))`` of ``batch * c * multiplier`` rows."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    o = c * multiplier
    inits = [
        numpy_helper.from_array(rng.standard_normal((M, o * 9)).astype(np.float32), "bank"),
        numpy_helper.from_array(np.array([-1, 1, 3, 3], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("MatMul", ["alpha", "bank"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=batch * c),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, batch * c, 6, 6]),
        helper.make_tensor_value_info("alpha", TensorProto.FLOAT, [batch, M]),
    ]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(
        helper.make_graph(nodes, "dw", inputs, [out], inits), opset_imports=[helper.make_opsetid("", 18)]
    )


@needs_nchwc
@pytest.mark.parametrize("batch,multiplier,moved", [(1, 1, 1), (2, 2, 0), (3, 2, 0), (2, 1, 0)])
def test_a_kernel_for_several_images_is_left_alone(batch, multiplier, moved):
    """Batch 2 with channel multiplier 2: the kernel reads like one image's depthwise kernel, and is not. A
    kernel is moved only when its coefficients provably have one row."""
    model = depthwise_graph(batch, multiplier=multiplier)
    rewritten, report = optimize_for_onnxruntime(model)
    assert report.convs == moved
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, batch * 8, 6, 6)).astype(np.float32)
    feed = {"x": x, "alpha": rng.random((batch, 3), np.float32)}
    got, want = (onnx_session(m, nchwc=False).run(None, feed)[0] for m in (rewritten, model))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def run(source, x: torch.Tensor) -> torch.Tensor:
    session = onnx_session(source, nchwc=False)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def generic_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ONNX-domain convs whose kernel is computed in the graph (what ONNX Runtime leaves generic)."""
    constants = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Conv" and n.domain == "" and n.input[1] not in constants]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("nchwc") / "tiny.onnx"
    report = parameternet.export_onnx(tiny_parameternet(), path, dynamic_batch=False, img_size=IMG)
    return path, report


@needs_nchwc
def test_dynamic_convs_move_to_blocked_kernels_and_match(exported):
    path, export_report = exported
    assert export_report.nchwc_rel_error is not None and export_report.nchwc_rel_error < 1e-4
    model, report = optimize_for_onnxruntime(path)
    original = onnx.load(str(path))
    # Every dynamic conv but the stem (3 input channels: ONNX Runtime's blocked input needs a multiple of 4) moves.
    assert len(generic_convs(original)) == report.candidates == report.convs + 1 == report.dynamic + 1
    assert [n.name for n in generic_convs(model)] == ["/stem/conv/Conv"] and "/stem/conv/Conv" in report.skipped
    assert sum(n.domain == NCHWC and n.op_type == "Conv" for n in model.graph.node) == report.convs
    assert report.activations_fused > 0 and report.reorders_saved > 0
    acts = [sum(n.op_type in ("HardSwish", "Relu") for n in m.graph.node) for m in (original, model)]
    assert acts[1] == acts[0] - report.activations_fused
    x = images(1)
    with torch.no_grad():
        assert_close_relative(run(model, x), tiny_parameternet()(x), rtol=1e-5)
    assert_close_relative(run(model, x), run(str(path), x), rtol=1e-5)
    # The input file is untouched; onnx_session() applies the rewrite by default.
    assert onnx.load(str(path)) == original
    assert_close_relative(run(str(path), x), torch.from_numpy(onnx_session(path).run(None, {"images": x.numpy()})[0]))


@needs_nchwc
def test_static_convs_too(tmp_path):
    model = build("ghostnet_300m").eval()
    path = tmp_path / "g.onnx"
    report = parameternet.export_onnx(model, path, dynamic_batch=False, img_size=IMG)
    assert report.nchwc_rel_error is None  # nothing dynamic to move
    assert optimize_for_onnxruntime(path)[1].convs == 0
    moved, report = optimize_for_onnxruntime(path, tmp_path / "g_nchwc.onnx", static_convs=True)
    assert report.convs > 0 and report.dynamic == 0
    assert (tmp_path / "g_nchwc.onnx").is_file()
    x = images(1)
    with torch.no_grad():
        assert_close_relative(run(moved, x), model(x), rtol=1e-5)


@needs_nchwc
@pytest.mark.parametrize("name", ["parameternet_300m", "parameternet_600m", "parameternet_swin_300m"])
def test_every_parameternet_batch1_graph_in_blocked_kernels(name, tmp_path):
    model = build(name).eval()
    report = parameternet.export_onnx(model, tmp_path / f"{name}.onnx", dynamic_batch=False, img_size=IMG)
    if name.startswith("parameternet_swin"):  # dynamic linears and a dynamic patch embedding with 3 channels
        assert report.nchwc_rel_error is None
    else:
        assert report.nchwc_rel_error is not None and report.nchwc_rel_error < 1e-4


@needs_nchwc
def test_graphs_from_the_dynamo_exporter_too(tmp_path):
    report = parameternet.export_onnx(
        tiny_parameternet(), tmp_path / "d.onnx", dynamic_batch=False, img_size=IMG, exporter="dynamo"
    )
    assert report.nchwc_rel_error is not None and report.nchwc_rel_error < 1e-4
    assert optimize_for_onnxruntime(tmp_path / "d.onnx")[1].dynamic > 0


def test_without_nchwc_kernels_the_graph_is_unchanged(exported, monkeypatch):
    path, _ = exported
    monkeypatch.setattr(ort_nchwc, "nchwc_block_size", lambda: None)
    model, report = optimize_for_onnxruntime(path)
    assert report.convs == 0 and "all" in report.skipped
    assert model == onnx.load(str(path))


@needs_nchwc
def test_the_self_check_rejects_a_wrong_kernel_layout(monkeypatch):
    assert ort_nchwc._self_check(nchwc_block_size())

    def plain(bank, shape, depthwise, c_in_pad, block):  # padded, but not blocked
        c_out, c_in = shape[:2]
        o_pad = -(-c_out // block) * block
        padded = np.zeros((bank.shape[0], o_pad, c_in if depthwise else c_in_pad, *shape[2:]), bank.dtype)
        padded[:, :c_out, :c_in] = bank.reshape(bank.shape[0], *shape)
        return padded.reshape(bank.shape[0], -1)

    monkeypatch.setattr(ort_nchwc, "_block_experts", plain)
    assert not ort_nchwc._self_check(nchwc_block_size())


def test_a_missing_or_corrupt_file_is_one_sentence(tmp_path):
    with pytest.raises(ParameterNetError, match="no ONNX file at"):
        optimize_for_onnxruntime(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ParameterNetError, match="is not a readable ONNX file"):
        optimize_for_onnxruntime(tmp_path / "bad.onnx")
    with pytest.raises(ParameterNetError, match="takes a path or an onnx.ModelProto"):
        optimize_for_onnxruntime(42)


def test_onnxruntime_cpu_graph_with_a_symbolic_batch(tmp_path):
    """runtime="onnxruntime-cpu": the batch-1 graph with blocked convs, run image by image by a Scan."""
    model = tiny_parameternet()
    path = tmp_path / "ort.onnx"
    report = parameternet.export_onnx(model, path, runtime="onnxruntime-cpu", img_size=IMG)
    assert report.runtime == "onnxruntime-cpu" and set(report.max_rel_error) == {1, 3}
    assert max(report.max_rel_error.values()) < 1e-4 and "convs" in report.nchwc
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node] == ["Scan"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = images(5)
    with torch.no_grad():
        assert_close_relative(run(str(path), x), model(x))


def test_onnxruntime_cpu_graph_for_one_image(tmp_path):
    model = tiny_parameternet()
    path = tmp_path / "ort1.onnx"
    report = parameternet.export_onnx(model, path, runtime="onnxruntime-cpu", dynamic_batch=False, img_size=IMG)
    assert set(report.max_rel_error) == {1} and report.max_rel_error[1] < 1e-4
    assert "Scan" not in {n.op_type for n in onnx.load(str(path)).graph.node}


def test_portable_per_image_graph(tmp_path):
    """per_image=True: the portable one-image graph (standard ONNX ops only, no NCHWc) in a Scan over the images."""
    model = tiny_parameternet()
    path = tmp_path / "scan.onnx"
    report = parameternet.export_onnx(model, path, per_image=True, img_size=IMG)
    assert report.per_image and report.nchwc is None and set(report.max_rel_error) == {1, 3}
    assert max(report.max_rel_error.values()) < 1e-4 and "(image by image)" in str(report)
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node] == ["Scan"]
    body = graph.node[0].attribute[0].g
    assert {n.domain for n in body.node} <= {"", "ai.onnx"} and "Conv" in {n.op_type for n in body.node}
    x = images(5)
    with torch.no_grad():
        assert_close_relative(run(str(path), x), model(x))


@pytest.mark.parametrize("opset", [11, 12, 13])
def test_per_image_graphs_below_opset_13(opset, tmp_path):
    """Before opset 13, Unsqueeze / Squeeze take their axes as an attribute; the Scan wrapper writes either form."""
    for kwargs in (dict(per_image=True), dict(runtime="onnxruntime-cpu")):
        report = parameternet.export_onnx(tiny_parameternet(), tmp_path / "o.onnx", img_size=IMG, opset=opset, **kwargs)
        assert max(report.max_rel_error.values()) < 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(runtime="tensorrt"), "unknown runtime 'tensorrt'"),
        (dict(runtime="onnxruntime-cpu", dynamic_batch=False, batch_size=2), "takes one image or any batch"),
        (dict(per_image=True, dynamic_batch=False, batch_size=2), "a per-image graph takes one image or any batch"),
        (dict(runtime="onnxruntime-cpu", per_image=False), "always runs image by image"),
        (dict(per_image="yes"), "per_image must be True, False or None"),
        (dict(opset=9), "opset must be an integer from 11 to 20 for the torchscript exporter, got 9"),
        (dict(opset=100, exporter="dynamo"), "opset must be an integer from 18 to 23 for the dynamo exporter"),
    ],
)
def test_bad_runtime_arguments(kwargs, message, tmp_path):
    with pytest.raises(ParameterNetError, match=message):
        parameternet.export_onnx(tiny_parameternet(), tmp_path / "x.onnx", img_size=IMG, **kwargs)


def test_scan_needs_a_graph_for_one_image(tmp_path):
    path = tmp_path / "b2.onnx"
    parameternet.export_onnx(tiny_parameternet(), path, dynamic_batch=False, batch_size=2, img_size=IMG)
    with pytest.raises(ParameterNetError, match="needs a graph for one image"):
        scan_over_batch(onnx.load(str(path)))


def test_export_cli_rejects_an_unknown_runtime(tmp_path, capsys):
    assert main(["export", "parameternet_300m", "--onnx", str(tmp_path / "p.onnx"), "--runtime", "trt"]) == 2
    assert "unknown runtime 'trt'" in capsys.readouterr().err


def test_export_cli_for_onnxruntime_cpu(tmp_path, capsys):
    out = tmp_path / "p.onnx"
    args = ["export", "parameternet_300m", "--onnx", str(out), "--img-size", str(IMG), "--runtime", "onnxruntime-cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "for ONNX Runtime's CPU provider:" in printed and "batch 3:" in printed
