"""parameterize(): any model becomes a ParameterNet that computes what it computed, then learns on its own.

Families: timm's ResNet, MobileNetV3, EfficientNet, ConvNeXt, RegNet, ViT, GhostNet and the project's GhostNet-300M,
plus a plain nn.Sequential; all at 32-64px so each conversion takes a fraction of a second.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Conv2dSame, StdConv2d
from torch import nn

import parameternet
from parameternet import DynamicConv2d, DynamicLinear, ParameterNetError, parameterize
from parameternet.cli import main
from parameternet.layers import RepConv2d

# name: (timm kwargs, image size)
FAMILIES = {
    "resnet10t": ({}, 64),
    "mobilenetv3_small_050": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "convnext_atto": ({}, 64),
    "regnetx_002": ({}, 64),
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=8, depth=4), 32),
    "ghostnet_050": ({}, 64),
}


def build(name: str) -> tuple[nn.Module, int]:
    kwargs, size = FAMILIES[name]
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval(), size


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to ``rel`` relative to the largest expected magnitude (fp32)."""
    err = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def dense_numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def expected_dynamic_numel(dense: nn.Module, m: int) -> int:
    """M experts of the weight and bias plus a Linear(C_in, M) sigmoid router."""
    cin = dense.in_channels if isinstance(dense, nn.Conv2d) else dense.in_features
    return m * dense_numel(dense) + cin * m + m


@pytest.mark.parametrize("name", list(FAMILIES))
def test_upcycled_model_computes_the_dense_function(name):
    dense, size = build(name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y_dense = dense(x)
    originals = {n: copy.deepcopy(m) for n, m in dense.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    classifier = next(n for n, m in dense.named_modules() if m is dense.get_classifier())

    model = parameterize(dense, 4, example_input=(1, 3, size, size), count_macs=False)
    report = model.parameterize_report
    with torch.no_grad():
        close(model.eval()(x), y_dense)

    # Parameters grow by M on every converted layer, plus its router, and nowhere else.
    modules = dict(model.named_modules())
    assert report.converted and set(report.converted) <= set(originals)
    for n in report.converted:
        assert isinstance(modules[n], (DynamicConv2d, DynamicLinear)) and modules[n].num_experts == 4
    growth = sum(expected_dynamic_numel(originals[n], 4) - dense_numel(originals[n]) for n in report.converted)
    assert report.params_after - report.params_before == growth == dense_numel(model) - report.params_before
    assert report.converted_params_after == sum(expected_dynamic_numel(originals[n], 4) for n in report.converted)
    # The classifier stays static by default.
    assert report.static[classifier] == "classifier"


def train_a_little(model: nn.Module, size: int) -> torch.Tensor:
    """Three AdamW steps; returns what they did to the first dynamic layer's experts, (M, ...)."""
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, (DynamicConv2d, DynamicLinear)))
    start = layer.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    torch.manual_seed(1)
    for _ in range(3):
        x, target = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
        loss = nn.functional.cross_entropy(model(x), target)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.weight.detach() - start


def spread(step: torch.Tensor) -> float:
    return max((step[i] - step[0]).abs().max().item() for i in range(1, step.shape[0]))


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050", "vit_tiny_patch16_224"])
def test_a_training_step_works_and_the_experts_drift_apart(name):
    model, size = build(name)
    step = train_a_little(parameterize(model, 4, example_input=(1, 3, size, size), count_macs=False), size)
    assert step.abs().max() > 0
    # The experts start as W/(M a) + zero-sum noise: the router tells them apart, so their updates differ.
    assert spread(step) > 1e-4 * step.abs().max().item()


def test_without_the_zero_sum_noise_upcycled_experts_would_never_differ():
    model, size = build("resnet10t")
    step = train_a_little(parameterize(model, 4, noise=0.0, example_input=(1, 3, size, size), count_macs=False), size)
    assert step.abs().max() > 0 and spread(step) == 0.0


def test_converting_ghostnet_300m_like_the_release_gives_parameternet_300m():
    dense = timm.create_model("ghostnet_300m")
    model = parameterize(dense, 4, exclude="*.conv_dw", example_input=(1, 3, 64, 64), count_macs=False)
    twin = timm.create_model("parameternet_300m")
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    assert round(model.parameterize_report.params_after / 1e4) == 1574  # Table 2/4: 15.7M
    # The defaults left exactly the release's static layers: SE convs, conv_head, classifier (and conv_dw here).
    reasons = set(model.parameterize_report.static.values())
    assert reasons == {"classifier", "one position per sample", "excluded by pattern '*.conv_dw'"}


def test_converting_swin_300m_like_the_paper_gives_parameternet_swin_300m():
    torch.manual_seed(0)
    dense = timm.create_model("swin_300m", img_size=64, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = dense(x)
    blocks = ["layers.*.attn.qkv", "layers.*.attn.proj", "layers.*.mlp.fc1", "layers.*.mlp.fc2"]
    model = parameterize(dense, 4, include=blocks, count_macs=False)
    with torch.no_grad():
        close(model(x), y)
    twin = timm.create_model("parameternet_swin_300m", img_size=64, num_classes=10)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}


def test_train_mode_is_unchanged_too_for_both_methods():
    dense, _ = build("resnet10t")
    x = torch.randn(4, 3, 48, 48)
    dense.train()
    with torch.no_grad():
        y = dense(x)
    for method in ("dynamic", "repconv"):
        model = parameterize(copy.deepcopy(dense), 3, method=method, example_input=(1, 3, 48, 48), count_macs=False)
        with torch.no_grad():
            close(model.train()(x), y)


def user_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32, padding_mode="reflect"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


@pytest.mark.parametrize("router", ["linear-sigmoid", "mlp-softmax"])
@pytest.mark.parametrize("experts", [1, 2, 3, 8])
def test_plain_sequential_upcycles_exactly_for_every_router_and_expert_count(router, experts):
    dense = user_model()
    x = torch.randn(3, 3, 20, 20)
    with torch.no_grad():
        y = dense(x)
    model = parameterize(dense, experts, router=router, example_input=x, count_macs=False)
    with torch.no_grad():
        close(model(x), y)
    # With an example input, the Linear on pooled features (one position per sample) stays static.
    assert model.parameterize_report.converted == ["0", "3", "5"]
    assert model.parameterize_report.static == {"8": "one position per sample"}


def test_without_an_example_input_the_names_rule_applies():
    model = parameterize(user_model(), 2, count_macs=False)
    assert model.parameterize_report.converted == ["0", "3", "5", "8"]
    assert "gate names" in model.parameterize_report.rule

    class WithSE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.se = nn.Sequential(nn.Conv2d(8, 2, 1), nn.ReLU(), nn.Conv2d(2, 8, 1))

        def forward(self, x):
            x = self.conv(x)
            return x * self.se(x.mean((2, 3), keepdim=True)).sigmoid()

    model = parameterize(WithSE(), 2, count_macs=False)
    assert model.parameterize_report.converted == ["conv"]
    assert model.parameterize_report.static == {
        "se.0": "squeeze-excite / gate name",
        "se.2": "squeeze-excite / gate name",
    }


def test_random_init_draws_fresh_experts():
    dense = user_model()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = dense(x)
    model = parameterize(dense, 4, init="random", example_input=x, count_macs=False)
    with torch.no_grad():
        assert not torch.allclose(model(x), y, rtol=1e-2, atol=1e-2)
    w = model[3].weight
    assert not torch.allclose(w[0], w[1])


def test_include_and_exclude_take_patterns_over_module_names_and_parents():
    dense, _ = build("resnet10t")
    model = parameterize(copy.deepcopy(dense), 2, include=["layer4", "fc"], count_macs=False)
    report = model.parameterize_report
    assert report.converted == ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.1", "fc"]
    assert report.static["layer1.0.conv1"] == "not included"
    assert isinstance(model.fc, DynamicLinear)  # include overrides the classifier default

    model = parameterize(copy.deepcopy(dense), 2, exclude=["layer[23]", "conv1.*"], count_macs=False)
    converted = model.parameterize_report.converted
    assert converted and not any(n.startswith(("layer2", "layer3", "conv1.")) for n in converted)
    assert model.parameterize_report.static["layer2.0.conv1"] == "excluded by pattern 'layer[23]'"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=0), "num_experts must be an integer >= 1, got 0"),
        (dict(num_experts=2.5), "got 2.5"),
        (dict(method="moe"), "unknown method 'moe'"),
        (dict(init="zeros"), "unknown init 'zeros'"),
        (dict(router="mlp"), "unknown router 'mlp'"),
        (dict(method="repconv", num_experts=1), "method='repconv' needs num_experts >= 2"),
        (dict(include=["blocks.*"]), "include pattern 'blocks.*' matches no convertible layer"),
        (dict(include=["1"]), "include pattern '1' matches no convertible layer"),  # a BatchNorm
        (dict(exclude=["head"]), "exclude pattern 'head' matches no module"),
        (dict(exclude=["*"]), "nothing to convert: all 4 nn.Conv2d or nn.Linear layers"),
        (dict(example_input=(1, 5, 8, 8)), "does not run on example_input of shape (1, 5, 8, 8)"),
        (dict(noise=-1.0), "noise must be a finite number >= 0"),
    ],
)
def test_bad_arguments_say_what_is_wrong_and_leave_the_model_alone(kwargs, message):
    model = user_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ParameterNetError, match=None) as info:
        parameterize(model, **{"num_experts": 4, "count_macs": False, **kwargs})
    assert message in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, (DynamicConv2d, DynamicLinear)) for m in model.modules())


def test_nothing_to_convert_is_an_error():
    with pytest.raises(ParameterNetError, match="has no plain nn.Conv2d or nn.Linear layer"):
        parameterize(nn.Sequential(nn.ReLU(), nn.Flatten()))
    with pytest.raises(ParameterNetError, match="has no plain nn.Conv2d layer"):
        parameterize(nn.Sequential(nn.Linear(4, 4)), method="repconv")
    with pytest.raises(ParameterNetError, match="takes an nn.Module"):
        parameterize("resnet18")


class Mixed(nn.Module):
    """Conv subclasses with forwards of their own, and one conv module used twice."""

    def __init__(self):
        super().__init__()
        self.same = Conv2dSame(3, 8, 4)  # stride 1: fixed 'same' padding, convertible
        self.same_strided = Conv2dSame(8, 8, 3, stride=2)  # padding depends on the input size
        self.std = StdConv2d(8, 8, 3, padding=1)  # weight standardisation
        self.shared = nn.Conv2d(8, 8, 1)
        self.pair = nn.ModuleList([self.shared])

    def forward(self, x):
        x = self.std(self.same_strided(self.same(x)))
        return self.pair[0](self.shared(x))


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")
def test_subclasses_with_their_own_forward_are_reported_and_shared_layers_stay_shared():
    torch.manual_seed(0)
    dense = Mixed().eval()
    x = torch.randn(2, 3, 15, 15)
    with torch.no_grad():
        y = dense(x)
    model = parameterize(dense, 3, example_input=x, count_macs=False)
    report = model.parameterize_report
    assert report.converted == ["same", "shared"]
    assert report.static["same_strided"].startswith("unsupported: Conv2dSame")
    assert report.static["std"].startswith("unsupported: StdConv2d")
    assert model.pair[0] is model.shared and isinstance(model.shared, DynamicConv2d)
    assert model.same.padding == "same"
    with torch.no_grad():
        close(model(x), y)


def test_parameterized_layers_are_never_converted_again_and_a_second_call_adds_to_the_first():
    model = parameterize(user_model(), 2, include=["0"], count_macs=False)
    model = parameterize(model, 3, method="repconv", include=["3"], count_macs=False)
    assert isinstance(model[0], DynamicConv2d) and model[0].num_experts == 2
    assert isinstance(model[3], RepConv2d)
    assert not any(type(m) is DynamicLinear for m in model[0].modules())  # its router's Linear was left alone
    assert [step["modules"] for step in model.parameterize_report.history] == [["0"]]


def test_repconv_branches_merge_back_to_the_dense_shape():
    dense, _ = build("resnet10t")
    n = dense_numel(dense)
    model = parameterize(dense, 4, method="repconv", example_input=(1, 3, 48, 48), count_macs=False)
    report = model.parameterize_report
    rep = model.layer1[0].conv1
    assert isinstance(rep, RepConv2d) and len(rep.branches) == 3
    # training parameters: three more bias-free kernels, each with a BatchNorm affine
    assert dense_numel(rep) == dense_numel(rep.conv) + 3 * (rep.conv.weight.numel() + 2 * rep.out_channels)
    assert report.params_before == n and report.params_after > 3.9 * report.converted_params_before
    assert isinstance(model.fc, nn.Linear)  # linears are not RepConv'd
    assert report.static["fc"] == "repconv converts convolutions only"


def test_report_counts_macs_with_the_profiler_and_prints_a_summary():
    dense, _ = build("resnet10t")
    model = parameterize(dense, 4, example_input=(1, 3, 64, 64))
    report = model.parameterize_report
    from parameternet.profiling import count_macs

    with torch.no_grad():
        assert report.macs_after == count_macs(model.eval(), torch.randn(1, 3, 64, 64))
    assert report.macs_before < report.macs_after < 1.3 * report.macs_before
    text = str(report)
    assert "converted 14 layers" in text and "MACs" in text and "classifier: 1" in text
    assert report.recipe()["modules"] == report.converted


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading and the CLI


def test_save_and_load_round_trip_and_timm_loads_the_registered_twin(tmp_path):
    model = parameterize(
        timm.create_model("ghostnet_300m", num_classes=10),
        4,
        exclude="*.conv_dw",
        example_input=(1, 3, 64, 64),
        count_macs=False,
    )
    path = parameternet.save(model, tmp_path / "p300.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = model.eval()(x)
        assert torch.equal(parameternet.load(path).eval()(x), y)
        twin = timm.create_model(
            "parameternet_300m",
            pretrained=True,
            num_classes=10,
            pretrained_cfg_overlay=dict(file=str(path), num_classes=10),  # else timm drops a 10-class head
        )
        assert torch.equal(twin.eval()(x), y)


def test_convert_cli_round_trip(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    args = ["convert", "resnet10t", "--experts", "2", "--img-size", "48", "--exclude", "layer4", "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "converted 11 layers" in printed and "MACs" in printed and "parameternet.load" in printed
    model = parameternet.load(out)
    assert sum(isinstance(m, DynamicConv2d) for m in model.modules()) == 11
    assert model.parameterize_report.recipe()["exclude"] == ["layer4"]

    # A torch checkpoint with its architecture named, as timm's train script writes it, converts too; the
    # classifier size comes from the weights.
    torch.manual_seed(0)
    dense = timm.create_model("resnet10t", num_classes=7).eval()
    ckpt = tmp_path / "dense.pth"
    torch.save({"arch": "resnet10t", "state_dict": {f"module.{k}": v for k, v in dense.state_dict().items()}}, ckpt)
    out2 = tmp_path / "r2.safetensors"
    assert (
        main(["convert", str(ckpt), "--experts", "3", "--method", "repconv", "--img-size", "32", "-o", str(out2)]) == 0
    )
    loaded = parameternet.load(out2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(loaded(x), dense(x))


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod."])
def test_convert_reads_state_dicts_saved_from_wrapped_models(tmp_path, capsys, prefix):
    """torch.compile (``_orig_mod.``) and DDP around it (``module._orig_mod.``), from torch.save and safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    dense = timm.create_model("resnet10t", num_classes=7).eval()
    wrapped = {prefix + k: v.contiguous() for k, v in dense.state_dict().items()}
    pth, st = tmp_path / "dense.pth", tmp_path / "dense.safetensors"
    torch.save({"arch": "resnet10t", "state_dict": wrapped}, pth)
    save_file(wrapped, str(st))
    x = torch.randn(2, 3, 32, 32)
    for source, arch in ((pth, []), (st, ["--arch", "resnet10t"])):
        out = tmp_path / f"{source.suffix[1:]}.safetensors"
        assert main(["convert", str(source), *arch, "--experts", "2", "--img-size", "32", "-o", str(out)]) == 0
        with torch.no_grad():
            close(parameternet.load(out).eval()(x), dense(x))


def test_convert_cli_reads_training_checkpoints(tmp_path, capsys):
    from parameternet.train.checkpoint import save_weights

    torch.manual_seed(0)
    dense = timm.create_model("regnetx_002", num_classes=5).eval()
    ckpt = tmp_path / "final.safetensors"
    save_weights(ckpt, dense.state_dict(), {"model": "regnetx_002", "num_classes": 5, "in_chans": 3})
    out = tmp_path / "p.safetensors"
    assert main(["convert", str(ckpt), "--experts", "2", "--img-size", "32", "-o", str(out)]) == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        close(parameternet.load(out).eval()(x), dense(x))


@pytest.mark.parametrize(
    "args, message",
    [
        (["resnet10t", "--experts", "0"], "num_experts must be an integer >= 1, got 0."),
        (["resnet10t", "--experts", "4", "--exclude", "nope*"], "exclude pattern 'nope*' matches no module"),
        (["resnet10t", "--experts", "4", "--include", "bn1"], "include pattern 'bn1' matches no convertible layer"),
        (["resnet10q", "--experts", "4"], "unknown model 'resnet10q'"),
        (["missing.pth", "--experts", "4"], "no such checkpoint file"),
        (
            ["NOTMODEL", "--experts", "4"],
            "is not a model checkpoint: neither safetensors nor a file torch.load reads safely",
        ),
        (["NODICT", "--experts", "4"], "is not a model checkpoint: it holds no state dict of tensors."),
        (["NOARCH", "--experts", "4"], "does not name its architecture; pass --arch TIMM_NAME."),
        (["resnet10t", "--experts", "4", "--img-size", "3"], "--img-size must be an integer >= 8, got 3."),
    ],
)
def test_convert_cli_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys, args, message):
    files = {"NOTMODEL": tmp_path / "notes.pt", "NODICT": tmp_path / "opt.pt", "NOARCH": tmp_path / "sd.pt"}
    files["NOTMODEL"].write_text("not a checkpoint")
    torch.save({"epoch": 3, "lr": 0.1}, files["NODICT"])
    torch.save(nn.Conv2d(1, 1, 1).state_dict(), files["NOARCH"])
    args = [str(files.get(a, a)) for a in args]
    out = tmp_path / "out.safetensors"
    assert main(["convert", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--method", "prune"), ("--init", "zeros"), ("--router", "softmax")])
def test_convert_cli_refuses_an_unknown_choice_by_argparse(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["convert", "resnet10t", "--experts", "4", flag, value])
    assert e.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err


def test_convert_refuses_an_output_that_is_not_safetensors(tmp_path, capsys):
    assert main(["convert", "resnet10t", "--experts", "2", "-o", str(tmp_path / "x.pt")]) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Execution modes after conversion: fused fast paths, sequence-first inputs, weight tying, structured inputs


def randomize_routers(model: nn.Module) -> None:
    """Routers that differ per sample (an upcycled model's give every sample the same coefficients)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (DynamicConv2d, DynamicLinear)):
                for p in m.router.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_transformer_encoder_converts_and_keeps_samples_apart_in_every_grad_mode(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    dense = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    d = 0 if batch_first else 1
    x = torch.randn(5, 6, 16) if batch_first else torch.randn(6, 5, 16)
    with torch.no_grad():
        want = dense(x)
    model = parameterize(copy.deepcopy(dense), 4, example_input=x.narrow(d, 0, 1), count_macs=False)
    report = model.parameterize_report
    assert report.converted == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"]
    assert report.batch_dims == ({} if batch_first else dict.fromkeys(report.converted, 1))
    model.eval()
    with torch.no_grad():  # the fused fast path read linear1.weight: "2d weights expected"
        close(model(x), want, 1e-4)
    with torch.inference_mode():
        close(model(x), want, 1e-4)
    randomize_routers(model)
    with torch.no_grad():
        batch = model(x)
        for i in (0, 2):  # a sample alone gives what it gives in the batch of 5
            close(model(x.narrow(d, i, 1)), batch.narrow(d, i, 1), 1e-4)
    y = model(x.requires_grad_())  # grad enabled, and the gradient flows
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.layers[0].linear1.parameters())


class Bypassing(nn.Module):
    """A parent that, like PyTorch's fused fast paths, reads its linear's weight under no_grad."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.fc.weight, self.fc.bias) if not torch.is_grad_enabled() else self.fc(x)
        return self.out(h.relu()).log_softmax(-1)  # the linear's own output is not the model's: no output head


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.mid(self.embed(tokens))).log_softmax(-1)


def test_layers_a_parent_bypasses_or_whose_weight_is_tied_stay_static_with_the_reason():
    model = parameterize(Bypassing(), 4, example_input=torch.randn(3, 5, 8), count_macs=False)
    report = model.parameterize_report
    assert report.converted == ["out"]
    assert report.static["fc"].startswith("bypassed: its parent Bypassing '' reads its weight instead of calling it")
    with torch.no_grad():
        assert model(torch.randn(2, 5, 8)).shape == (2, 5, 4)
    model = parameterize(Tied(), 4, example_input=torch.randint(0, 10, (2, 7)), count_macs=False)
    assert model.parameterize_report.converted == ["mid"]
    assert model.parameterize_report.static["head"].startswith("weight tied")
    assert model.head.weight is model.embed.weight
    # the same head giving the model's output: static as the output head, whatever else it is
    plain = Tied()
    plain.forward = lambda tokens: plain.head(plain.mid(plain.embed(tokens)))
    model = parameterize(plain, 4, example_input=torch.randint(0, 10, (2, 7)), count_macs=False)
    assert model.parameterize_report.static["head"].startswith("output head")


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Linear(4, 8)

    def forward(self, images, extra, scale=1.0):
        return self.a(images).mean((2, 3)) * scale + self.b(extra).mean(1)


@pytest.mark.parametrize(
    "example",
    [
        (torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4)),
        {"images": torch.randn(1, 3, 8, 8), "extra": torch.randn(1, 5, 4), "scale": 2.0},
    ],
    ids=["tuple", "dict"],
)
def test_example_input_takes_what_forward_takes(example):
    model = parameterize(TwoInputs(), 4, example_input=example)
    report = model.parameterize_report
    assert report.converted == ["a", "b"] and report.input_shape[1:] == [3, 8, 8]
    assert "MACs not counted: the counter takes one input tensor" in report.notes


def test_example_input_as_a_list_of_images():
    class Detector(nn.Module):  # torchvision's detection models take a list of (C, H, W) images
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, images):
            return [self.conv(img.unsqueeze(0))[0] for img in images]

    model = parameterize(Detector(), 4, example_input=[torch.randn(3, 8, 8), torch.randn(3, 6, 6)])
    assert model.parameterize_report.converted == ["conv"]
    with pytest.raises(ParameterNetError, match="example_input holds no tensor"):
        parameterize(Detector(), 4, example_input={"images": []})


def converted(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A converted model with routers that differ per sample, and a batch of 3 inputs."""
    if name == "user-sequential":
        dense, size = user_model(), 16
    else:
        dense, size = build(name)
    model = parameterize(dense, 3, example_input=(1, 3, size, size), count_macs=False)
    randomize_routers(model)
    return model.eval(), torch.randn(3, 3, size, size)


MODE_MODELS = ["resnet10t", "mobilenetv3_small_050", "vit_tiny_patch16_224", "user-sequential"]


@pytest.mark.parametrize("name", MODE_MODELS)
def test_converted_models_in_every_mode(name):
    """Per-sample reference: each sample alone, fp32, grad enabled. Then no_grad, inference_mode, bf16 autocast
    forward and backward, channels_last, torch.jit.trace at batch 2 run at 3, torch.fx, deploy()."""
    model, x = converted(name)
    ref = torch.cat([model(xb) for xb in x.split(1)]).detach()
    with torch.no_grad():
        close(model(x), ref, 1e-4)
    with torch.inference_mode():
        close(model(x), ref, 1e-4)
    close(model(x.contiguous(memory_format=torch.channels_last)).detach(), ref, 1e-4)
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(xg)
    y.float().sum().backward()
    close(y.float().detach(), ref, 6e-2)
    assert xg.grad.dtype == torch.float32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        traced = torch.jit.trace(model, x[:2], check_trace=False)
        close(traced(x), ref, 1e-4)
        if name != "vit_tiny_patch16_224":  # timm's ViT is not torch.fx-traceable by plain symbolic_trace
            close(torch.fx.symbolic_trace(model)(x), ref, 1e-4)
        close(parameternet.deploy(model, example_input=x[:1])(x), ref, 1e-4)


def test_timm_feature_extractor_on_a_parameternet():
    """timm's create_feature_extractor (torch.fx) with the dynamic layers as leaf modules, at two batch sizes."""
    from timm.models import create_feature_extractor

    torch.manual_seed(0)
    model = timm.create_model("parameternet_mini_025", num_classes=10).eval()
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "mid", "global_pool": "pool"})
    leaves = {n.target for n in extractor.graph.nodes if n.op == "call_module"}
    assert "stem.conv" in leaves and isinstance(model.get_submodule("stem.conv"), DynamicConv2d)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 28, 28)
        out = extractor(x)
        with torch.no_grad():
            features = model.forward_features(x)
        assert out["mid"].shape[0] == batch and out["pool"].shape[:2] == (batch, features.shape[1])


def test_the_self_check_catches_samples_leaking_into_each_other(monkeypatch):
    """Were the sequence-first batch dimension missed (every layer taken as batch-first), the check must say so."""
    import importlib

    monkeypatch.setattr(importlib.import_module("parameternet.conversion.probe"), "_grown_dim", lambda one, two: 0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False)
    dense = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    with pytest.raises(ParameterNetError, match="a sample's output depends on the other samples of its batch"):
        parameterize(dense, 4, example_input=torch.randn(6, 2, 16), count_macs=False)


def test_more_experts_than_memory_holds_and_a_second_conversion_are_one_sentence(monkeypatch):
    """Refused before anything is allocated (not killed by the OOM killer); a ParameterNet is not converted twice."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    monkeypatch.setattr("parameternet.toolkit._physical_memory", lambda: 2**30)  # a 1 GiB machine
    with pytest.raises(ParameterNetError, match=r"num_experts=1000000 on 2 converted layers needs 3 GiB, more than "
                                                r"this machine's 1 GiB of memory; use fewer experts"):  # fmt: skip
        parameterize(net, 1_000_000, example_input=(1, 3, 8, 8), count_macs=False)
    parameterize(net, 2, example_input=(1, 3, 8, 8), count_macs=False)
    with pytest.raises(ParameterNetError, match=r"it is already a ParameterNet: 2 dynamic or RepConv layers"):
        parameterize(net, 2, example_input=(1, 3, 8, 8), count_macs=False)


def test_a_command_name_of_the_first_version_names_the_new_one(capsys):
    with pytest.raises(SystemExit) as e:
        main(["lm-train", "configs/lm-small.yaml"])
    assert (
        e.value.code == 2 and "the language-model commands are 'parameternet lm train' now" in capsys.readouterr().err
    )
