"""deploy(): BatchNorm folded into (dynamic) convs and RepConv branches merged, with the function unchanged.

BatchNorm statistics and affines are randomised so a fold that is off anywhere shows; the dynamic models are
given random routers, as training leaves them: coefficients that vary per sample and do not sum to one.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from parameternet import DynamicConv2d, ParameterNetError, deploy, parameterize
from parameternet.cli import main
from parameternet.layers import RepConv2d


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    err = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def deploys_exactly(model: nn.Module, x: torch.Tensor, **kwargs) -> nn.Module:
    """``deploy(model, example_input=x, **kwargs)``, checked to compute ``model``'s output on ``x`` (:func:`close`)."""
    kwargs.setdefault("example_input", x)
    with torch.no_grad():
        y = model(x)
    deployed = deploy(model, **kwargs)
    with torch.no_grad():
        close(deployed(x), y)
    return deployed


def numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def norms(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def randomise_norms_(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for bn in norms(model):
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=g) * 0.3)


@torch.no_grad()
def randomise_routers_(model: nn.Module, seed: int = 0) -> None:
    """What training does to an upcycled router: coefficients that vary per sample and per expert."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, DynamicConv2d):
            fc = layer.router.fc
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) * 3 / fc.in_features**0.5)
            fc.bias.copy_(torch.randn(fc.bias.shape, generator=g))


def test_dynamic_model_with_trained_batchnorm_deploys_exactly():
    torch.manual_seed(0)
    model = parameterize(timm.create_model("resnet10t", num_classes=10), 4, example_input=(1, 3, 48, 48))
    randomise_routers_(model)
    randomise_norms_(model)
    model.eval()
    x = torch.randn(3, 3, 48, 48)
    seen = []
    hook = model.layer1[0].conv1.router.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        y = model(x)
    hook.remove()
    # The test means something only if the coefficients vary and do not sum to one.
    alpha = seen[0]
    assert (alpha.sum(1) - 1).abs().min() > 0.1 and alpha.std(1).min() > 0.1 and (alpha - alpha[0]).abs().max() > 1e-3

    deployed = deploy(model, example_input=(1, 3, 48, 48))
    with torch.no_grad():
        close(deployed(x), y)
    report = deployed.deploy_report
    assert len(report.folded) == 14 and not report.kept and not norms(deployed)
    assert all(isinstance(m, DynamicConv2d) and m.static_bias is not None for m in [deployed.layer1[0].conv1])
    assert report.max_rel_error is not None and report.max_rel_error < 1e-5
    assert report.params_after == numel(model) - sum(2 * bn.num_features for bn in norms(model)) + sum(
        bn.num_features for bn in norms(model)
    )  # each BatchNorm's two affines become one static bias
    assert norms(model), "deploy() must not change the original unless inplace=True"


def test_registered_parameternet_deploys_exactly():
    torch.manual_seed(0)
    model = timm.create_model("parameternet_300m", num_experts=2, num_classes=10)
    randomise_routers_(model, seed=1)
    randomise_norms_(model, seed=1)
    model.eval()
    deployed = deploys_exactly(model, torch.randn(2, 3, 64, 64))
    assert not norms(deployed)  # every BatchNorm of GhostNet follows a conv


def test_repconv_model_merges_back_to_the_dense_model():
    torch.manual_seed(0)
    dense = timm.create_model("resnet10t", num_classes=10)
    model = parameterize(copy.deepcopy(dense), 4, method="repconv", example_input=(1, 3, 48, 48), count_macs=False)
    randomise_norms_(model, seed=2)  # what training does: branch scales leave zero, statistics move
    model.eval()
    assert model.layer1[0].conv1.branches[0][1].weight.abs().min() > 0
    x = torch.randn(3, 3, 48, 48)
    folded = deploys_exactly(model, x)
    assert numel(folded) == numel(deploy(dense, example_input=x))
    assert not any(isinstance(m, RepConv2d) for m in folded.modules()) and len(folded.deploy_report.merged) == 14

    # With fold_bn=False the merged model is the dense architecture itself: same names, shapes and count.
    merged = deploys_exactly(model, x, fold_bn=False)
    assert numel(merged) == numel(dense)
    fresh = timm.create_model("resnet10t", num_classes=10).eval()
    fresh.load_state_dict(merged.state_dict())
    with torch.no_grad():
        close(fresh(x), model(x))


def test_dense_timm_model_with_batchnorm_act_folds():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10)
    randomise_norms_(model)
    model.eval()
    deployed = deploys_exactly(model, torch.randn(2, 3, 64, 64))
    assert not any(isinstance(m, BatchNormAct2d) for m in deployed.modules())
    assert isinstance(deployed.conv_stem, nn.Conv2d) and deployed.conv_stem.bias is not None


class Branchy(nn.Module):
    """A conv whose output feeds its BatchNorm and a skip: folding that BatchNorm would change the skip."""

    def __init__(self, control_flow: bool = False):
        super().__init__()
        self.control_flow = control_flow
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.bn_in = nn.BatchNorm2d(8)

    def forward(self, x):
        if self.control_flow and x.shape[-1] % 2:  # symbolic tracing cannot follow this
            x = x[..., :-1]
        a = self.a(x)
        h = self.bn_a(a).relu()
        return self.bn_b(self.b(self.bn_in(h))) + a


@pytest.mark.parametrize("by", ["run", "fx"])
def test_only_a_batchnorm_that_alone_reads_the_conv_output_is_folded(by):
    torch.manual_seed(0)
    model = Branchy()
    randomise_norms_(model)
    model = parameterize(model, 3, include=["b"], count_macs=False).eval()
    x = torch.randn(2, 3, 10, 10)
    deployed = deploys_exactly(model, x, example_input=x if by == "run" else None)
    report = deployed.deploy_report
    assert report.folded == [("b", "bn_b")]
    assert set(report.kept) == {"bn_a", "bn_in"}
    assert ("torch.fx" in report.found_by) == (by == "fx")


def test_untraceable_model_without_example_input_asks_for_one():
    model = Branchy(control_flow=True).eval()
    with pytest.raises(ParameterNetError, match="pass example_input="):
        deploy(model)
    deployed = deploy(model, example_input=(1, 3, 9, 9))
    assert deployed.deploy_report.folded == [("b", "bn_b")]


def test_models_without_batchnorm_deploy_unchanged():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    model = parameterize(vit, 2, example_input=(1, 3, 32, 32), count_macs=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    deployed = deploy(model, example_input=x)
    with torch.no_grad():
        assert torch.equal(deployed(x), y)
    assert numel(deployed) == numel(model) and not deployed.deploy_report.folded


def test_table6_counts_training_and_inference_parameters():
    from parameternet.experiments.table6 import table6

    rows = {r["method"]: r for r in table6(img_size=64)}
    ghostnet = numel(timm.create_model("ghostnet_300m"))
    parameternet = numel(timm.create_model("parameternet_300m"))
    # Table 6: RepConv 15.7M train / 8.6M inference, DynamicConv 15.7M / 15.7M.
    assert rows["repconv"]["inference_params"] == ghostnet
    assert rows["dynamic"]["train_params"] == rows["dynamic"]["inference_params"] == parameternet
    assert round(rows["repconv"]["train_params"] / 1e5) == round(rows["dynamic"]["train_params"] / 1e5) == 157
    assert rows["repconv"]["inference_macs"] < rows["dynamic"]["inference_macs"]


@pytest.mark.slow
def test_table6_cli_at_224(capsys):
    assert main(["profile", "table6"]) == 0
    out = capsys.readouterr().out
    assert "RepConv" in out and "DynamicConv" in out and "8.63M" in out and "15.74M" in out
