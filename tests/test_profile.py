"""Profiling: the paper's table within 0.5%, the parameter split, the MAC convention, latency and the CLI."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import timm
import torch
from torch import nn
from torchprofile import profile_macs

import parameternet
from parameternet import DynamicConv2d, DynamicLinear, ParameterNetError
from parameternet.cli import main
from parameternet.profiling import count_macs, count_params, report
from parameternet.profiling.report import PAPER_ROWS, TOLERANCE, PaperRow, format_rows


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["profile", *argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def paper_table():
    """`parameternet profile paper --json`: every vision row of the paper, measured once for the whole file."""
    rc, out, err = run_cli("paper", "--json")
    return rc, json.loads(out)


def test_paper_table_matches_within_half_a_percent(paper_table):
    rc, rows = paper_table
    assert rc == 0
    assert [(r["label"], r["experts"]) for r in rows] == [(p.label, p.experts) for p in PAPER_ROWS]
    for r in rows:
        assert abs(r["params_diff"]) <= TOLERANCE, r
        assert abs(r["macs_diff"]) <= TOLERANCE, r
        assert r["ok"] and r["img_size"] == [224, 224] and r["batch_size"] == 1


def test_paper_table_parameter_split(paper_table):
    """docs/models.md, design notes: ParameterNet-600M has 19.41M expert, 0.12M router and 14.97M static parameters."""
    _, rows = paper_table
    for r in rows:
        assert r["expert_params"] + r["router_params"] + r["static_params"] == r["params"]
        assert (r["expert_params"] > 0) == (r["experts"] is not None)
    pn600 = next(r for r in rows if r["model"] == "parameternet_600m")
    assert round(pn600["expert_params"] / 1e6, 2) == 19.41
    assert round(pn600["router_params"] / 1e6, 2) == 0.12
    assert round(pn600["static_params"] / 1e6, 2) == 14.97


def test_paper_table_text(paper_table):
    _, rows = paper_table
    text = format_rows(rows)
    assert text.count(" ok") == len(PAPER_ROWS)
    assert "ParameterNet-Swin-300M" in text and "322.70M" in text


def test_row_off_by_more_than_tolerance_fails(monkeypatch, capsys):
    wrong = PaperRow("GhostNet-300M, wrong reference", "ghostnet_300m", None, 9.0, 288.7, "test")
    monkeypatch.setattr(report, "PAPER_ROWS", (wrong,))
    assert report.run_profile_command([]) == 1
    assert "OFF by more than 0.5%" in capsys.readouterr().out


def test_macs_include_router_and_kernel_mixing():
    """The paper's convention: conv + mixing (M * numel per sample) + router linear + pooling mean."""
    layer = nn.Sequential(DynamicConv2d(8, 16, 1, bias=False, num_experts=4))
    x = torch.randn(2, 8, 10, 10)
    per_sample = 16 * 8 * 100 + 4 * 16 * 8 + 8 * 4 + 8
    assert count_macs(layer, x) == 2 * per_sample
    # torchprofile's own entry point also counts the traced shape product H * W as one MAC
    assert profile_macs(layer, x) == 2 * per_sample + 1


def test_macs_of_layers_with_expert_biases():
    """torchprofile's own baddbmm handler rejects a broadcast bias; ours counts it as it counts bmm."""
    layer = DynamicLinear(6, 5, num_experts=3)
    x = torch.randn(2, 7, 6)
    mix = 3 * (5 * 6 + 5)  # weight and bias banks
    assert count_macs(layer, x) == 2 * (7 * 6 * 5 + mix + 6 * 3 + 6)


def test_profile_splits_parameters_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), DynamicConv2d(8, 4, 1, num_experts=2))
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = parameternet.profile(model, img_size=16, batch_size=3)
    assert [m.training for m in model] == [True, False, True]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert result.expert_params == 2 * 4 * 8 + 2 * 4
    assert result.router_params == 8 * 2 + 2
    assert result.static_params == 3 * 8 * 9 + 8 + 2 * 8
    assert result.params == sum(p.numel() for p in model.parameters())
    assert result.macs == 3 * result.macs_per_sample
    assert result.latency_ms is None


def test_static_model_has_no_experts():
    counts = count_params(timm.create_model("ghostnet_300m", num_classes=0))
    assert counts.experts == counts.routers == 0 and counts.static == counts.total


def test_latency_median_p90_and_threads_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), DynamicConv2d(4, 4, 3, padding=1))
    torch.set_num_threads(2)
    try:
        result = parameternet.profile(model, img_size=12, latency=True, threads=1, warmup=1, runs=5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert 0 < result.latency_ms <= result.latency_p90_ms
    assert result.threads == 1


def test_bad_profile_arguments():
    model = nn.Conv2d(3, 4, 1)
    with pytest.raises(ParameterNetError, match="batch_size must be a positive integer, got 0"):
        parameternet.profile(model, batch_size=0)
    with pytest.raises(ParameterNetError, match=r"img_size must be an int or \(height, width\)"):
        parameternet.profile(model, img_size=(1, 2, 3))


def test_cli_named_models_json():
    rc, out, _ = run_cli("models", "ghostnet_300m", "parameternet_swin_300m", "--img-size", "64", "--json")
    assert rc == 0
    rows = json.loads(out)
    assert [r["model"] for r in rows] == ["ghostnet_300m", "parameternet_swin_300m"]
    assert round(rows[0]["params"] / 1e6, 2) == 8.63  # parameters do not depend on the input size
    assert rows[0]["macs_per_sample"] < 288.7e6 / 8  # 64px is 12x fewer pixels than 224px; the head stays
    assert rows[1]["img_size"] == [64, 64]


def test_profile_measures_and_prints_the_models_own_input():
    grey = timm.create_model("resnet10t", in_chans=1, num_classes=3)
    result = parameternet.profile(grey)  # timm's input size for resnet10t, the model's one channel
    assert result.in_chans == 1 and result.img_size == tuple(grey.pretrained_cfg["input_size"][1:])
    assert parameternet.profile(grey, img_size=32).as_dict()["in_chans"] == 1

    rc, out, _ = run_cli("models", "ghostnet_mini", "--json")  # 1 x 28 x 28 grey images
    assert rc == 0 and [(r["in_chans"], r["img_size"]) for r in json.loads(out)] == [(1, [28, 28])]
    rc, out, _ = run_cli("models", "ghostnet_mini", "parameternet_mini", "--img-size", "32")
    assert rc == 0 and out.splitlines()[-1].startswith("input 1x1x32x32; MACs counted")
    rc, out, _ = run_cli("models", "ghostnet_mini", "resnet10t")  # different inputs: one column each
    lines = out.splitlines()
    assert lines[0].split()[-1] == "input" and lines[2].endswith(" 1x1x28x28") and lines[3].endswith(" 1x3x176x176")
    assert lines[-1].startswith("MACs counted")


def test_profile_of_a_converted_module_uses_the_conversions_input():
    """A plain nn.Module that parameterize() converted on 1-channel 16 x 16 images is profiled on that input."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    model = parameternet.parameterize(dense, 2, init="random", example_input=torch.randn(2, 1, 16, 16))
    result = parameternet.profile(model)
    assert (result.in_chans, tuple(result.img_size)) == (1, (16, 16))


def test_cli_named_model_table():
    rc, out, _ = run_cli("models", "parameternet_300m", "--img-size", "32")
    assert rc == 0
    assert out.splitlines()[2].startswith("parameternet_300m") and "15.74M" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["models", "parameternet_60m"], "unknown model 'parameternet_60m'; did you mean parameternet_600m"),
        (["models", "ghostnet_mini", "--img-size", "3"], "--img-size must be an integer >= 8, got 3."),
        (["models", "ghostnet_mini", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0."),
        (["models", "ghostnet_mini", "--threads", "2"], "--threads applies only with --latency; add --latency or drop"),
        (["table6", "--img-size", "2"], "--img-size must be an integer >= 8, got 2."),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, message):
    rc, out, err = run_cli(*argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ghostnet_mini"], "invalid choice: 'ghostnet_mini'; profile models with 'parameternet profile models "
                            "ghostnet_mini'"),
        (["--threads", "2", "ghostnet_mini"], "'parameternet profile models ghostnet_mini'"),
        (["table6", "--latency"], "unrecognized arguments: --latency"),
        (["paper", "--img-size", "128"], "unrecognized arguments: --img-size 128"),
    ],
)  # fmt: skip
def test_cli_profile_commands_are_argparse_choices(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
