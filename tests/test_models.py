"""The paper's six vision models as timm models: conventions, exactness per sample, weights, bad input."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import DropPath
from timm.models import group_parameters
from torch import nn

import parameternet
from parameternet import DynamicConv2d, DynamicLinear, ParameterNetError
from parameternet.layers import MlpSoftmaxRouter
from parameternet.models import MODELS, create_model

IMG = 64
NUM_CLASSES = 10


def small_kwargs(name: str, **kwargs):
    """Tiny inputs keep the tests fast; Swin builds its attention masks for one input size."""
    kw = dict(num_classes=NUM_CLASSES, **kwargs)
    if "swin" in name:
        kw.setdefault("img_size", IMG)
    return kw


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **small_kwargs(name, **kwargs))


_SHARED: dict[str, nn.Module] = {}


def shared(name: str) -> nn.Module:
    """One instance per model for the whole file, in eval mode; tests that change a model take a deep copy."""
    if name not in _SHARED:
        _SHARED[name] = build(name)
    return _SHARED[name].eval()


@pytest.fixture(params=MODELS)
def name(request) -> str:
    return request.param


@pytest.fixture
def model(name) -> nn.Module:
    return shared(name)


def images(n: int = 2, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_registered_in_timm_on_import(name):
    assert timm.is_model(name)
    assert name in timm.list_models("*300m") + timm.list_models("*600m")
    assert timm.get_pretrained_cfg(name).architecture == name


def test_forward_backward_with_and_without_grad_checkpointing(model):
    """Every parameter (experts and routers included) gets a gradient; checkpointing does not change it."""
    plain, ckpt = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    ckpt.set_grad_checkpointing(True)
    x = images()
    for m in (plain, ckpt):
        torch.manual_seed(0)  # the same dropout / drop-path masks in both
        out = m(x)
        assert out.shape == (2, NUM_CLASSES)
        out.square().mean().backward()
    missing = [n for n, p in plain.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_batch_equals_samples_one_by_one(model):
    x = images(3)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_channels_last_model_computes_the_same_function(model):
    """timm's --channels-last: model.to(memory_format=channels_last) works on every model (the 5-d expert banks
    included) and computes what the NCHW model computes, forward and backward."""
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = images(3)
    with torch.no_grad():
        expected = model(x)
        got = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    cl.train()(x.contiguous(memory_format=torch.channels_last)).square().mean().backward()
    assert all(p.grad is not None for p in cl.parameters() if p.requires_grad)


def test_features_only(name):
    m = build(name, features_only=True).eval()
    with torch.no_grad():
        feats = m(images())
    info = m.feature_info
    assert len(feats) == len(info.channels()) >= 4
    for f, chs, red in zip(feats, info.channels(), info.reduction()):
        size = -(-IMG // red)
        shape = (2, size, size, chs) if "swin" in name else (2, chs, size, size)  # timm's Swin features are NHWC
        assert tuple(f.shape) == shape


def test_forward_intermediates(model):
    x = images()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        features = model.forward_features(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    torch.testing.assert_close(final, features)
    assert [t.shape[1] for t in inter] == [info["num_chs"] for info in model.feature_info]
    assert len(last_two) == 2
    torch.testing.assert_close(last_two[-1], inter[-1])


def test_prune_intermediate_layers_keeps_early_features(model):
    m = copy.deepcopy(model)
    x = images()
    with torch.no_grad():
        _, inter = m.forward_intermediates(x)
        kept = m.prune_intermediate_layers(indices=[0, 1])
        pruned = m.forward_intermediates(x, indices=kept, intermediates_only=True)
    for a, b in zip(pruned, inter[:2]):
        torch.testing.assert_close(a, b)


def test_reset_classifier(model):
    m = copy.deepcopy(model)
    m.reset_classifier(5)
    with torch.no_grad():
        assert m(images()).shape == (2, 5)
    m.reset_classifier(0)
    with torch.no_grad():
        assert m(images()).shape == (2, m.head_hidden_size)
    assert m.get_classifier() is not None


def test_group_matcher_covers_every_parameter(model):
    groups = group_parameters(model, model.group_matcher())
    grouped = {n for names in groups.values() for n in names}
    assert grouped == {n for n, _ in model.named_parameters()}
    assert len(groups) > 3


def test_pretrained_true_says_there_are_no_weights(name):
    with pytest.raises(ParameterNetError, match=f"no pretrained weights are published for {name}; pass "):
        timm.create_model(name, pretrained=True)


def test_pretrained_cfg_overlay_loads_a_local_file(model, name, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = build(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), atol=0, rtol=0)


def test_pretrained_cfg_overlay_loads_a_torch_checkpoint(tmp_path):
    """A .pth state_dict, and a checkpoint with a 1000-class head loaded into a 10-class model (head dropped)."""
    src = shared("parameternet_300m")
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    loaded = build("parameternet_300m", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    torch.testing.assert_close(loaded.state_dict(), src.state_dict(), atol=0, rtol=0)
    wide = timm.create_model("parameternet_300m")  # 1000 classes
    torch.save(wide.state_dict(), path)
    narrow = build("parameternet_300m", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(narrow.stem.conv.weight, wide.stem.conv.weight, atol=0, rtol=0)
    assert narrow.classifier.out_features == NUM_CLASSES


def test_pretrained_cfg_overlay_loads_the_weights_of_a_wrapped_model(tmp_path):
    """Keys under nested wrapper prefixes (DDP around torch.compile around DDP), which timm's own cleaning leaves."""
    src = shared("parameternet_300m")
    path = tmp_path / "wrapped.pth"
    torch.save({f"module._orig_mod.module.{k}": v for k, v in src.state_dict().items()}, path)
    loaded = build("parameternet_300m", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    torch.testing.assert_close(loaded.state_dict(), src.state_dict(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "static, dynamic", [("ghostnet_300m", "parameternet_300m"), ("swin_300m", "parameternet_swin_300m")]
)
def test_a_static_checkpoint_for_a_parameternet_names_the_convert_command(static, dynamic, tmp_path):
    path = tmp_path / f"{static}.safetensors"
    save_file({k: v.contiguous() for k, v in shared(static).state_dict().items()}, path)
    overlay = dict(file=str(path), num_classes=NUM_CLASSES)
    with pytest.raises(ParameterNetError) as e:
        build(dynamic, pretrained=True, pretrained_cfg_overlay=overlay)
    message = str(e.value)
    assert message.startswith(f"{str(path)!r} is a static checkpoint (") and message.count(". ") == 0
    assert f"`parameternet convert {path} --arch {static} --experts 4 " in message


def test_the_named_convert_command_upcycles_a_static_ghostnet_exactly(tmp_path):
    """Following the message: the ParameterNet timm then loads computes the static model's logits."""
    import re
    import shlex

    from parameternet.cli import main

    static = shared("ghostnet_300m")
    path = tmp_path / "ghostnet_300m.pth"
    torch.save(static.state_dict(), path)
    with pytest.raises(ParameterNetError) as e:
        build("parameternet_300m", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    args = shlex.split(re.search(r"`parameternet (convert [^`]+)`", str(e.value)).group(1))
    out = tmp_path / "p300.safetensors"
    args[args.index("OUT.safetensors")] = str(out)
    assert main([*args, "--img-size", str(IMG)]) == 0
    upcycled = build("parameternet_300m", pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=10))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(upcycled.eval()(x), static(x), atol=1e-5, rtol=0)


def test_a_checkpoint_of_another_layout_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "p300.pth"
    torch.save(shared("parameternet_300m").state_dict(), path)
    overlay = dict(file=str(path), num_classes=NUM_CLASSES)
    with pytest.raises(ParameterNetError, match=r"has 4 experts per dynamic layer .* pass num_experts=4 to timm"):
        build("parameternet_300m", num_experts=2, pretrained=True, pretrained_cfg_overlay=overlay)
    with pytest.raises(ParameterNetError, match=r"holds dynamic layers .* build parameternet_300m with num_experts=4"):
        build("ghostnet_300m", pretrained=True, pretrained_cfg_overlay=overlay)


@pytest.mark.parametrize("router", ["linear-sigmoid", "mlp-softmax"])
def test_rgb_checkpoint_into_a_one_channel_parameternet(router, tmp_path):
    """The dynamic stem's experts and router are adapted as timm adapts a static stem: channels summed."""
    rgb = build("parameternet_300m", router=router).eval()
    path = tmp_path / "rgb.pth"
    torch.save(rgb.state_dict(), path)
    grey = build(
        "parameternet_300m",
        router=router,
        in_chans=1,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES),
    ).eval()
    x = images(2, chans=1)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_in_chans_one(name):
    m = build(name, in_chans=1).eval()
    with torch.no_grad():
        assert m(images(1, chans=1)).shape == (1, NUM_CLASSES)


def test_wrong_input_says_what_was_expected(model):
    with pytest.raises(ParameterNetError, match="expected 3 input channels, got 1"):
        model(images(1, chans=1))
    with pytest.raises(ParameterNetError, match=r"expected images of shape \(B, 3, H, W\), got shape \(3, 64, 64\)"):
        model(images(1)[0])


def test_wrong_channels_in_features_only_model():
    m = build("parameternet_300m", features_only=True)
    with pytest.raises(ParameterNetError, match="expected 3 input channels, got 4"):
        m(images(1, chans=4))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ParameterNetError, match="unknown model 'parameternet_60m'; did you mean parameternet_600m"):
        create_model("parameternet_60m")
    assert parameternet.create_model("ghostnet_300m", num_classes=3).num_classes == 3


@pytest.mark.parametrize(
    "name, expected",
    [("parameternet_300m", 76), ("parameternet_600m", 88), ("parameternet_swin_300m", 48)],
)
def test_which_layers_are_dynamic(name, expected):
    """docs/models.md, design notes: 88 dynamic convs in ParameterNet-600M; the strided depthwise and SE convs stay
    static."""
    m = shared(name)
    layers = [mod for mod in m.modules() if isinstance(mod, (DynamicConv2d, DynamicLinear))]
    assert len(layers) == expected
    assert all(mod.num_experts == 4 for mod in layers)
    if "swin" not in name:
        static = shared(name.replace("parameternet", "ghostnet"))
        assert not any(isinstance(mod, DynamicConv2d) for mod in static.modules())
        dynamic_names = {n for n, mod in m.named_modules() if isinstance(mod, DynamicConv2d)}
        static_convs = {n for n, mod in static.named_modules() if isinstance(mod, nn.Conv2d)}
        assert dynamic_names < static_convs  # same network, only the conv type differs
        assert all(".conv_dw." in n or ".se." in n or n == "conv_head" for n in static_convs - dynamic_names)


def test_experts_and_router_options_pass_through():
    m = build("parameternet_600m", num_experts=2, router="mlp-softmax", router_temperature=0.5)
    conv = m.stem.conv
    assert conv.num_experts == 2 and conv.weight.shape[0] == 2
    assert isinstance(conv.router, MlpSoftmaxRouter) and conv.router.temperature == 0.5
    s = build("parameternet_swin_300m", num_experts=3)
    assert s.layers[0].blocks[0].mlp.fc1.weight.shape[0] == 3


def test_bad_options_raise():
    with pytest.raises(ParameterNetError, match="num_experts must be an integer >= 1, got 0"):
        build("parameternet_300m", num_experts=0)
    with pytest.raises(ParameterNetError, match="unknown router 'softmax'"):
        build("parameternet_300m", router="softmax")
    with pytest.raises(ParameterNetError, match="ghostnet_600m has static convs and takes no num_experts"):
        build("ghostnet_600m", num_experts=4)
    with pytest.raises(ParameterNetError, match="unknown attn_routing 'token'"):
        build("parameternet_swin_300m", attn_routing="token")


def test_drop_path_on_identity_blocks_only():
    m = build("parameternet_300m", drop_path_rate=0.2)
    blocks = [b for stage in m.blocks[:-1] for b in stage]
    assert isinstance(blocks[0].drop_path, nn.Identity)  # rate 0 at the first block
    dropped = [b for b in blocks if isinstance(b.drop_path, DropPath)]
    assert dropped and all(b.has_identity for b in dropped)
    assert dropped[-1].drop_path.drop_prob == pytest.approx(0.2 * (len(blocks) - 1) / len(blocks))


def test_swin_attention_routes_per_window_or_per_image():
    """timm's window attention sees (B * windows, N, C); 'image' routing mixes once per image instead."""
    seen = {}
    for routing in ("window", "image"):
        m = build("parameternet_swin_300m", attn_routing=routing).eval()

        def record(module, args, alpha, routing=routing):
            seen.setdefault(routing, tuple(alpha.shape))  # the first call: the batch of images

        handle = m.layers[0].blocks[0].attn.qkv.router.register_forward_hook(record)
        x = images(2)
        with torch.no_grad():
            batched = m(x)
            single = torch.cat([m(x[i : i + 1]) for i in range(2)])
        handle.remove()
        torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    windows = 9  # 16x16 tokens padded to 21x21: 3x3 windows of 7x7
    assert seen == {"window": (2 * windows, 4), "image": (2, 4)}
