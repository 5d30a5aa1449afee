"""Deployment: ONNX export with a symbolic batch, batch-specialised graphs, torch.compile once, the benchmark CLI."""

from __future__ import annotations

import csv
import json
import re

import onnx
import pytest
import timm
import torch
from torch import nn

import parameternet
from parameternet import DynamicConv2d, ParameterNetError
from parameternet.cli import main
from parameternet.export.onnx_export import onnx_session
from parameternet.export.ort_nchwc import nchwc_block_size
from parameternet.models import MODELS
from parameternet.models.ghostnet import GhostNet

IMG = 64


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if "swin" in name:
        kwargs.setdefault("img_size", IMG)
    return timm.create_model(name, num_classes=10, **kwargs)


def tiny_parameternet(**kwargs) -> GhostNet:
    """Two blocks with every kind of dynamic conv (dense stem, 1x1, depthwise, a shortcut) and SE."""
    torch.manual_seed(0)
    stages = (((3, 16, 16, 0.0, 1),), ((5, 48, 24, 0.25, 2),))
    model = GhostNet(stages, width=0.5, num_classes=10, num_experts=3, **kwargs)
    with torch.no_grad():  # BatchNorms with statistics of their own, so deploy() has something to fold
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(n))


def ort_outputs(path, x: torch.Tensor) -> torch.Tensor:
    session = onnx_session(path)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_every_model_exports_with_a_symbolic_batch(name, tmp_path):
    model = build(name).eval()
    path = tmp_path / f"{name}.onnx"
    report = parameternet.export_onnx(model, path, img_size=IMG)
    assert report.dynamic_batch and report.deployed
    assert set(report.max_rel_error) == {1, 3} and max(report.max_rel_error.values()) < 1e-4
    graph = onnx.load(str(path), load_external_data=False).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")
    # Independently of the report: a batch size the export never saw.
    x = images(5)
    with torch.no_grad():
        assert_close_relative(ort_outputs(path, x), model(x))


def test_the_graph_is_the_deployed_one(tmp_path):
    """BatchNorms are folded into the experts: the exported graph holds no BatchNormalization node."""
    model = tiny_parameternet()
    parameternet.export_onnx(model, tmp_path / "deployed.onnx", img_size=IMG)
    parameternet.export_onnx(model, tmp_path / "as_is.onnx", img_size=IMG, deploy=False)
    ops = {f: {n.op_type for n in onnx.load(str(tmp_path / f)).graph.node} for f in ("deployed.onnx", "as_is.onnx")}
    assert "BatchNormalization" not in ops["deployed.onnx"]
    assert "BatchNormalization" in ops["as_is.onnx"]
    # The model itself is not changed.
    assert not any(isinstance(m, DynamicConv2d) and m.static_bias is not None for m in model.modules())


@pytest.mark.parametrize("batch_size", [1, 2])
def test_graph_for_one_batch_size(batch_size, tmp_path):
    """dynamic_batch=False: the per-sample grouped conv (for one image a plain conv), exact at that batch size."""
    model = tiny_parameternet()
    path = tmp_path / "fixed.onnx"
    report = parameternet.export_onnx(model, path, dynamic_batch=False, batch_size=batch_size, img_size=IMG)
    assert report.input_shape == [batch_size, 3, IMG, IMG] and set(report.max_rel_error) == {batch_size}
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch_size
    groups = {a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"}
    dynamic = {
        batch_size * m.groups
        for m in model.modules()
        if isinstance(m, DynamicConv2d) and m.geometry.kind != "pointwise"
    }
    assert dynamic <= groups  # every dynamic conv holds its group count times the batch
    x = images(batch_size)
    with torch.no_grad():
        assert_close_relative(ort_outputs(path, x), model(x))


def test_dynamo_exporter(tmp_path):
    model = tiny_parameternet()
    report = parameternet.export_onnx(model, tmp_path / "dynamo.onnx", img_size=IMG, exporter="dynamo")
    assert report.exporter == "dynamo" and max(report.max_rel_error.values()) < 1e-4


def test_export_cli_with_a_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("parameternet_300m")
    ckpt = tmp_path / "weights.pth"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "cli.onnx"
    args = ["export", "parameternet_300m", "--onnx", str(out), "--checkpoint", str(ckpt), "--img-size", str(IMG)]
    assert main(args) == 0
    assert "batchx3x64x64" in capsys.readouterr().out
    model.eval()
    x = images(2)
    with torch.no_grad():
        assert_close_relative(ort_outputs(out, x), model(x))


def test_export_hint_for_a_checkpoint_without_metadata_names_a_flag_export_has(tmp_path, capsys):
    """A state dict that does not name its model: the error's hint names a flag of `export`, and following it works."""
    from safetensors.torch import save_file

    from parameternet.cli import build_parser

    torch.manual_seed(0)
    ckpt, out = tmp_path / "bare.safetensors", tmp_path / "bare.onnx"
    save_file(timm.create_model("parameternet_mini_025").state_dict(), str(ckpt))
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not name its architecture" in err
    export = build_parser()._subparsers._group_actions[0].choices["export"]
    flags = re.findall(r"(?<![\w-])--[a-z][a-z-]*", err.split("error: ", 1)[1])
    assert flags and all(flag in export._option_string_actions for flag in flags), flags
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(out), flags[0], "parameternet_mini_025"]) == 0
    assert "parameternet_mini_025, input batchx1x28x28" in capsys.readouterr().out
    assert main(["export", "ghostnet_mini", "--arch", "parameternet_mini_025", "--onnx", str(out)]) == 2
    assert "the model is named twice, 'ghostnet_mini' and --arch 'parameternet_mini_025'" in capsys.readouterr().err


def test_profile_and_export_take_the_same_swin_sizes(tmp_path, capsys):
    """A Swin builds its attention masks for one input size: both commands build a named one for --img-size; a
    checkpoint's model takes the size it was built for, and another --img-size is one sentence."""
    assert main(["profile", "models", "swin_300m", "--img-size", "40", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["img_size"] == [40, 40]
    assert main(["export", "swin_300m", "--onnx", str(tmp_path / "s40.onnx"), "--img-size", "40"]) == 0
    assert "swin_300m, input batchx3x40x40" in capsys.readouterr().out

    ckpt = tmp_path / "swin.pth"
    torch.save(timm.create_model("swin_300m").state_dict(), ckpt)
    args = ["export", "swin_300m", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "c.onnx"), "--img-size", "40"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--img-size 40: this checkpoint's swin_300m was built for 224x224 images" in err
    assert not (tmp_path / "c.onnx").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(exporter="jit"), "unknown exporter 'jit'"),
        (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(img_size=-3), "img_size must be a positive int"),
    ],
)
def test_bad_export_arguments(kwargs, message, tmp_path):
    with pytest.raises(ParameterNetError, match=message):
        parameternet.export_onnx(tiny_parameternet(), tmp_path / "x.onnx", **kwargs)


def test_export_path_must_be_onnx(tmp_path, capsys):
    assert main(["export", "ghostnet_300m", "--onnx", str(tmp_path / "model.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_torch_compile_once_for_every_batch_size():
    """One graph for batches 2, 3 and 5 (batch 1 is specialised by PyTorch itself), equal to eager, no breaks."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = tiny_parameternet()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True)
    with torch.no_grad():
        for n in (2, 3, 5):
            torch.testing.assert_close(compiled(images(n)), model(images(n)), rtol=1e-4, atol=1e-5)
    # Dynamo may restart its first analysis once (to specialise a Python scalar); what counts is what it kept.
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] == 1
    assert not counters["graph_break"] and not counters["recompiles"]
    # No conv of the captured graph takes a group count that depends on the batch size: inductor would specialise
    # it and compile again for every batch size (the slow test below checks with inductor itself).
    graph = counter.graphs[-1]
    for node in graph.graph.nodes:
        if node.target is torch.conv2d or node.target is torch.nn.functional.conv2d:
            groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
            assert isinstance(groups, int), node.format_node()


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    """Gradients through the compiled graph (the batch-agnostic formulations) equal eager ones."""
    torch._dynamo.reset()
    model = tiny_parameternet(drop_rate=0.0).train()
    x = images(3)
    grads = []
    for fn in (model, torch.compile(model, backend="aot_eager", dynamic=True)):
        model.zero_grad()
        fn(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_inductor_compiles_once_for_every_batch_size():
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = tiny_parameternet()
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        for n in (2, 3, 5, 8):
            torch.testing.assert_close(compiled(images(n)), model(images(n)), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_model_exports_with_the_dynamo_exporter(name, tmp_path):
    report = parameternet.export_onnx(build(name), tmp_path / f"{name}.onnx", img_size=IMG, exporter="dynamo")
    assert max(report.max_rel_error.values()) < 1e-4


def test_benchmark_cli_writes_csv_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["benchmark", "onnx", "--models", "ghostnet_300m", "parameternet_300m", "ghostnet_100", "--img-size", "64"]
    assert main([*args, "--runs", "3", "--warmup", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parameternet_300m / ghostnet_300m: ONNX Runtime" in printed and "without the NCHWc rewrite" in printed
    rows = list(csv.DictReader(open(out / "benchmark.csv")))
    assert [r["model"] for r in rows] == ["ghostnet_300m", "parameternet_300m", "ghostnet_100"]
    for r in rows:
        assert float(r["onnx_ms"]) > 0 and float(r["eager_ms"]) > 0 and float(r["onnx_p90_ms"]) >= float(r["onnx_ms"])
        # onnx_ms is the faster of ONNX Runtime's own graph and parameternet's NCHWc rewrite of it
        assert r["onnx_graph"] in ("onnxruntime", "nchwc") and float(r["onnx_generic_ms"]) >= float(r["onnx_ms"])
        assert r["top1_source"]  # every reported figure names where it comes from
    assert rows[1]["top1_reported"] == "79.1" and "Table 2" in rows[1]["top1_source"]
    if nchwc_block_size() is not None:  # the rewritten graph was timed for every model with convs to move
        assert all(float(r["onnx_nchwc_ms"]) > 0 for r in rows)
    assert json.loads((out / "benchmark.json").read_text())["ratios"][0]["dynamic"] == "parameternet_300m"
    assert (out / "latency_top1.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_modes_cli_writes_every_mode_and_the_ratios(tmp_path, capsys):
    """benchmark modes: every (model, mode, batch) timed; the ParameterNet / twin ratio per mode and batch. The compiled
    modes are slow to compile, so this runs the eager and ONNX ones; tests/test_conformance.py compiles layers."""
    out = tmp_path / "modes"
    args = ["benchmark", "modes", "eager", "onnx-portable", "onnx-per-image", "onnx-ort", "--models", "ghostnet_mini"]
    args += ["parameternet_mini", "--batch-sizes", "1", "2", "--runs", "2", "--warmup", "0", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| parameternet_mini / ghostnet_mini | onnx-portable | 2 |" in printed
    rows = list(csv.DictReader(open(out / "modes.csv")))
    modes = ("eager", "onnx-portable", "onnx-per-image", "onnx-ort")
    assert len(rows) == 2 * len(modes) * 2 and all(float(r["median_ms"]) > 0 for r in rows)
    ratios = json.loads((out / "modes.json").read_text())["ratios"]
    assert {(r["mode"], r["batch"]) for r in ratios} == {(m, b) for m in modes for b in (1, 2)}


def test_benchmark_modes_refuses_to_time_a_compile_that_fell_back_to_eager(monkeypatch):
    """A compile mode that made no graph (dynamo past its recompile limit runs the frame eagerly) is an error, not
    eager timings under a compile label."""
    from parameternet.benchmark import modes

    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # what a fallback amounts to
    with pytest.raises(ParameterNetError, match=r"torch.compile made no graph for ghostnet_mini \(compile-static\)"):
        modes.run_modes(["ghostnet_mini"], modes=["compile-static"], batch_sizes=[1], rounds=1, warmup=0)


@pytest.mark.parametrize(
    "mode, dynamic", [("compile-static", False), ("compile-dynamic", True), ("compile-auto", None)]
)
def test_benchmark_modes_compile_settings(mode, dynamic, monkeypatch):
    """Each compile mode is torch.compile with its own `dynamic` (None: PyTorch's default, automatic dynamic)."""
    from parameternet.benchmark import modes

    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    modes._runner(mode, nn.Identity(), None, "m", (8, 8), 1)
    assert seen == [{"dynamic": dynamic}]


def test_benchmark_modes_raises_dynamos_recompile_limit(monkeypatch):
    """Several models of one class in one process compile into one frame; the limit covers them all."""
    from parameternet.benchmark import modes

    seen = []
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: seen.append(torch._dynamo.config.recompile_limit) or model
    )
    with pytest.raises(ParameterNetError):
        modes.run_modes(["ghostnet_mini"] * 5, modes=["compile-static", "compile-dynamic", "compile-auto"],
                        batch_sizes=[1, 8], rounds=1, warmup=0)  # fmt: skip
    assert seen and seen[0] >= 3 * 5 * 2


@pytest.mark.parametrize(
    "args",
    [["benchmark", "modes", "--no-eager"], ["benchmark", "onnx", "--batch-sizes", "1"],
     ["benchmark", "gpu", "--models", "x"], ["benchmark", "--runs", "1"]],
)  # fmt: skip
def test_each_benchmark_takes_only_its_own_flags(args, capsys):
    """A flag of another benchmark is argparse's error: usage, one line naming it, exit 2, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["modes", "jit"], "unknown mode 'jit'"),
        (["modes", "--batch-sizes", "0"], "--batch-sizes must be an integer >= 1, got 0."),
        (["modes", "--output", __file__], "is a file; choose another path"),
        (["onnx", "--output", __file__ + "/sub"], "is a file; choose another path"),
    ],
)
def test_benchmark_modes_rejects_bad_input(args, message, capsys):
    assert main(["benchmark", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["benchmark", "modes", "--runs", "0"], "--runs must be an integer >= 1, got 0."),  # the flag, not "rounds"
        (["benchmark", "onnx", "--runs", "0"], "--runs must be an integer >= 1, got 0."),
        (["benchmark", "modes", "--warmup", "-1"], "--warmup must be an integer >= 0, got -1."),
        (["benchmark", "onnx", "--threads", "0"], "--threads must be an integer >= 1, got 0."),
        (["benchmark", "modes", "--batch-sizes", "0"], "--batch-sizes must be an integer >= 1, got 0."),
        (["benchmark", "onnx", "--img-size", "3"], "--img-size must be an integer >= 8, got 3."),
        (["benchmark", "modes", "--img-size", "3"], "--img-size must be an integer >= 8, got 3."),
        (["export", "ghostnet_mini", "--onnx", "m.onnx", "--img-size", "3"], "--img-size must be an integer >= 8"),
    ],
)
def test_cli_flags_are_checked_by_the_name_typed_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    command = " ".join(args[:2]) if args[0] == "benchmark" else args[0]
    assert len(err.splitlines()) == 1 and f"parameternet {command}: error: {message}" in err
    assert not any(tmp_path.iterdir())  # nothing written, no results directory made


def test_benchmark_rejects_an_unknown_model(capsys):
    assert main(["benchmark", "onnx", "--models", "parameternet_601m"]) == 2
    assert "unknown model 'parameternet_601m'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Fixed-batch graphs after shape-losing ops, the ONNX Runtime CPU graph, bad input


def reflect_then_dynamic() -> nn.Module:
    """A reflect pad upstream loses the conv input's shape in the exporter's shape inference."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(), DynamicConv2d(8, 8, 3, padding=1)
    ).eval()


def converted_conv2d_same() -> nn.Module:
    """timm's Conv2dSame (TF-ported EfficientNets) upstream of converted layers."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    dense = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), Conv2dSame(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
    model = parameternet.parameterize(dense, 3, init="random", example_input=(1, 3, 9, 9), count_macs=False)
    assert model.parameterize_report.converted == ["2", "4"]
    return model.eval()


@pytest.mark.parametrize(
    "mode",
    [
        dict(),
        dict(dynamic_batch=False, batch_size=1),
        dict(dynamic_batch=False, batch_size=2),
        dict(dynamic_batch=False, batch_size=3),
        dict(runtime="onnxruntime-cpu"),
        dict(dynamic_batch=False, batch_size=1, runtime="onnxruntime-cpu"),
        dict(per_image=True),
    ],
    ids=["dynamic", "batch1", "batch2", "batch3", "ort-cpu-dynamic", "ort-cpu-batch1", "per-image"],
)
@pytest.mark.parametrize("model", [reflect_then_dynamic, converted_conv2d_same], ids=["reflect", "conv2d-same"])
def test_fixed_batch_graphs_after_shape_losing_ops(model, mode, tmp_path):
    """export_onnx checks each graph in ONNX Runtime against PyTorch (and raises when it differs)."""
    report = parameternet.export_onnx(model(), tmp_path / "m.onnx", img_size=9, deploy=False, **mode)
    assert max(report.max_rel_error.values()) < 1e-4
    if "batch_size" in mode:
        assert list(report.max_rel_error) == [mode["batch_size"]]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_depthwise_multiplier_graph_runs_in_onnx_runtime_with_nchwc(batch_size, tmp_path):
    """Batch 2 equals the channel multiplier; onnx_session() applies the NCHWc rewrite by default."""
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 16, 3, padding=1, groups=8).eval()
    path = tmp_path / "dw.onnx"
    parameternet.export_onnx(layer, path, img_size=8, in_chans=8, dynamic_batch=False, batch_size=batch_size)
    x = torch.randn(batch_size, 8, 8, 8)
    got = torch.from_numpy(onnx_session(path).run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, layer(x), rtol=1e-4, atol=1e-5)


def test_bad_input_is_one_sentence(tmp_path, capsys):
    class Unexportable(nn.Module):
        def forward(self, x):
            return torch.linalg.svdvals(x)  # no ONNX operator

    with pytest.raises(ParameterNetError, match=r"ONNX export of Unexportable \(symbolic batch, input 3x8x8\) failed"):
        parameternet.export_onnx(Unexportable(), tmp_path / "u.onnx", img_size=8, deploy=False)
    with pytest.raises(ParameterNetError, match="in_chans must be a positive integer, got 0"):
        parameternet.export_onnx(reflect_then_dynamic(), tmp_path / "u.onnx", img_size=8, in_chans=0)
    for bad in ("0", "-2"):
        assert main(["export", "parameternet_mini_025", "--onnx", str(tmp_path / "z.onnx"), "--batch-size", bad]) != 0
        err = capsys.readouterr().err
        assert f"batch_size must be a positive integer, got {bad}." in err and "Traceback" not in err
    assert not (tmp_path / "z.onnx").exists()


def test_benchmark_times_a_grey_model_on_its_own_input(tmp_path):
    """The 1-channel mini models are timed on 1-channel images, not refused for the 3 channels of another model."""
    out = tmp_path / "grey"
    args = ["benchmark", "onnx", "--models", "ghostnet_mini", "parameternet_mini", "--runs", "1", "--warmup", "0"]
    assert main([*args, "--output", str(out)]) == 0
    assert [r["model"] for r in csv.DictReader(open(out / "benchmark.csv"))] == ["ghostnet_mini", "parameternet_mini"]


def test_export_cli_per_image(tmp_path, capsys):
    """--per-image: the portable one-image graph in a Scan over the images, checked at batch 1 and 3."""
    path = tmp_path / "scan.onnx"
    assert main(["export", "parameternet_mini_025", "--onnx", str(path), "--per-image"]) == 0
    printed = capsys.readouterr().out
    assert "(image by image)" in printed and "batch 3:" in printed
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["Scan"]


def test_an_image_larger_than_memory_is_one_sentence(tmp_path, capsys):
    args = ["export", "parameternet_mini_025", "--onnx", str(tmp_path / "big.onnx"), "--img-size", "1000000"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "one 1-channel float32 image needs 3725 GiB" in err and "use a smaller img_size" in err
    assert "Traceback" not in err and not (tmp_path / "big.onnx").exists()
