"""GhostNet V1 baselines and their ParameterNets (ParameterNet, arXiv 2306.14525, section 4.1, Tables 2 and 4).

GhostNet: "GhostNet: More Features from Cheap Operations", https://arxiv.org/abs/1911.11907. A Ghost module makes
half of its output with a 1x1 conv and the other half with a cheap depthwise conv on that half; a bottleneck is
Ghost module -> (stride-2 depthwise conv) -> (SE) -> Ghost module, plus a shortcut.

The variants follow the authors' ParameterNet release rather than the GhostNet paper: Hardswish everywhere (SE
included), a static SE with a hard-sigmoid gate, and, in a ParameterNet, a dynamic conv (``DynamicConv2d``) for the
stem, both convs of every Ghost module, both convs of a projection shortcut and the final 1x1 conv. The stride-2
depthwise conv inside a bottleneck, the SE convs, ``conv_head`` and the classifier stay static.

- ``ghostnet_300m`` / ``parameternet_300m``: the original GhostNet stage table at width 1.45 (the paper publishes
  no table for it; this one matches every row of its Table 4).
- ``ghostnet_600m`` / ``parameternet_600m``: the release's own stage table at width 1.9.
- ``ghostnet_mini_{025,050,100,200}`` / ``parameternet_mini_{025,050,100,200}``: a five-block table for 28-32 px
  inputs (Fashion-MNIST, MNIST) with a 256-channel head, for the low-FLOPs pitfall experiment at CPU scale
  (``parameternet pitfall``); ``ghostnet_mini`` / ``parameternet_mini`` take any ``width`` and ``head_chs``.
  ``method="repconv"`` builds the RepConv alternative of the same layers (Table 6).

``import parameternet.models`` registers all four in timm; ``parameternet_*`` take ``num_experts`` (default 4) and the
router options of :class:`~parameternet.layers.DynamicConv2d`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d, make_divisible
from timm.models import adapt_input_conv, build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.layers import DynamicConv2d, RepConv2d
from parameternet.models._pretrained import (
    check_checkpoint_layout,
    check_pretrained_source,
    clean_checkpoint,
    untrained_cfg,
)
from parameternet.toolkit import check_image_batch

__all__ = [
    "GhostBottleneck",
    "GhostModule",
    "GhostNet",
    "GHOSTNET_MINI_STAGES",
    "GHOSTNET_STAGES",
    "PARAMETERNET_600M_STAGES",
]

# One block: (depthwise kernel, expansion channels, output channels, SE ratio, stride), before the width multiplier.
# Each inner tuple is a stage; the final 1x1 conv widens to the last block's expansion channels. Every model starts
# with GhostNet's first four stages (strides 1, 2, 1, 2: down to a quarter of the stem's resolution).
_FIRST_STAGES = (
    ((3, 16, 16, 0.0, 1),),
    ((3, 48, 24, 0.0, 2),),
    ((3, 72, 24, 0.0, 1),),
    ((5, 72, 40, 0.25, 2),),
)

GHOSTNET_STAGES = _FIRST_STAGES + (
    ((5, 120, 40, 0.25, 1),),
    ((3, 240, 80, 0.0, 2),),
    (
        (3, 200, 80, 0.0, 1),
        (3, 184, 80, 0.0, 1),
        (3, 184, 80, 0.0, 1),
        (3, 480, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1),
    ),
    ((5, 672, 160, 0.25, 2),),
    (
        (5, 960, 160, 0.0, 1),
        (5, 960, 160, 0.25, 1),
        (5, 960, 160, 0.0, 1),
        (5, 960, 160, 0.25, 1),
    ),
)

PARAMETERNET_600M_STAGES = _FIRST_STAGES + (
    ((3, 120, 40, 0.25, 1),) * 2,
    ((3, 240, 80, 0.0, 2),),
    ((3, 200, 80, 0.0, 1),) * 3 + ((3, 480, 112, 0.25, 1),) + ((3, 672, 112, 0.25, 1),) * 2,
    ((5, 672, 160, 0.25, 2),),
    ((3, 960, 160, 0.25, 1),) * 5,
)

# For 28-32 px images: the stem halves 28 to 14, two stride-2 stages reach 7 and 4; then one 3x3 SE block at the
# last resolution.
GHOSTNET_MINI_STAGES = _FIRST_STAGES + (((3, 120, 40, 0.25, 1),),)

ConvLayer = Callable[..., nn.Module]


class ConvBnAct(nn.Module):
    """conv (no bias, 'same' padding) -> BatchNorm -> activation (or none)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act_layer: type[nn.Module] | None = None,
        conv_layer: ConvLayer = nn.Conv2d,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv = conv_layer(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Stem(ConvBnAct):
    """The stride-2 3x3 stem; it checks the input first so a wrong image tensor fails with a clear message."""

    def __init__(self, in_chans: int, out_chs: int, act_layer: type[nn.Module], conv_layer: ConvLayer, **dd):
        super().__init__(in_chans, out_chs, 3, 2, act_layer=act_layer, conv_layer=conv_layer, **dd)
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_chans)
        return super().forward(x)


class GhostModule(nn.Module):
    """``out_chs`` channels: half from a 1x1 conv (``primary``), half from a 3x3 depthwise conv on it (``cheap``)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        act_layer: type[nn.Module] | None,
        conv_layer: ConvLayer = nn.Conv2d,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.out_chs = out_chs
        primary_chs = math.ceil(out_chs / 2)
        self.primary = ConvBnAct(in_chs, primary_chs, 1, act_layer=act_layer, conv_layer=conv_layer, **dd)
        self.cheap = ConvBnAct(
            primary_chs, primary_chs, 3, groups=primary_chs, act_layer=act_layer, conv_layer=conv_layer, **dd
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], dim=1)
        # The concatenation's width is known here, not read from the tensor: torch.fx traces it.
        return out if 2 * self.primary.conv.out_channels == self.out_chs else out[:, : self.out_chs]


class SqueezeExcite(nn.Module):
    """Static SE: mean -> 1x1 reduce (bias) -> act -> 1x1 expand (bias) -> hard sigmoid ``relu6(x + 3) / 6``."""

    def __init__(self, chs: int, rd_chs: int, act_layer: type[nn.Module], device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv_reduce = nn.Conv2d(chs, rd_chs, 1, **dd)
        self.act = act_layer()
        self.conv_expand = nn.Conv2d(rd_chs, chs, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * F.hardsigmoid(s)


class GhostBottleneck(nn.Module):
    """Ghost module (expand) -> [stride-2 depthwise conv] -> [SE] -> Ghost module (project), plus the shortcut.

    The shortcut is the identity when shape is kept, else a depthwise conv (with the stride) and a 1x1 conv.
    ``drop_path`` (stochastic depth) drops the residual branch of identity-shortcut blocks, as timm does.
    """

    def __init__(
        self,
        in_chs: int,
        mid_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        se_ratio: float = 0.0,
        act_layer: type[nn.Module] = nn.Hardswish,
        conv_layer: ConvLayer = nn.Conv2d,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.ghost1 = GhostModule(in_chs, mid_chs, act_layer, conv_layer, **dd)
        # The release keeps this strided depthwise conv static (and the SE convs): the rest of the block is dynamic.
        self.conv_dw = ConvBnAct(mid_chs, mid_chs, kernel_size, stride, groups=mid_chs, **dd) if stride > 1 else None
        rd_chs = make_divisible(mid_chs * se_ratio, 4)
        self.se = SqueezeExcite(mid_chs, rd_chs, act_layer, **dd) if se_ratio > 0 else None
        self.ghost2 = GhostModule(mid_chs, out_chs, None, conv_layer, **dd)
        self.has_identity = in_chs == out_chs and stride == 1
        if self.has_identity:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                ConvBnAct(in_chs, in_chs, kernel_size, stride, groups=in_chs, conv_layer=conv_layer, **dd),
                ConvBnAct(in_chs, out_chs, 1, conv_layer=conv_layer, **dd),
            )
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_identity else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ghost1(x)
        if self.conv_dw is not None:
            y = self.conv_dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.ghost2(y)
        return self.drop_path(y) + self.shortcut(x)


class GhostNet(nn.Module):
    """GhostNet V1 (static convs) or, with ``num_experts`` set, a ParameterNet built on it.

    Args:
        stages: the stage table, a sequence of stages of ``(kernel, expansion, out, se_ratio, stride)`` blocks.
        width: channel multiplier; channels are ``make_divisible(c * width, 4)``.
        num_experts: ``None`` for static convs, else the experts of every dynamic conv.
        method: ``"dynamic"`` (:class:`DynamicConv2d`) or ``"repconv"`` (:class:`RepConv2d` with
            ``num_experts - 1`` branches that merge into one conv for inference) for the same layers.
        router: passed to every :class:`DynamicConv2d`.
        router_temperature: passed to every :class:`DynamicConv2d`.
        router_hidden: passed to every :class:`DynamicConv2d`.
        num_classes: timm's meaning: classifier outputs (0: no classifier).
        in_chans: timm's meaning: input channels.
        global_pool: timm's meaning: the pooling before the head.
        drop_rate: timm's meaning: dropout before the classifier.
        drop_path_rate: timm's meaning: stochastic depth of the identity-shortcut bottlenecks.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[tuple[int, int, int, float, int]]] = GHOSTNET_STAGES,
        width: float = 1.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        num_experts: int | None = None,
        router: str = "linear-sigmoid",
        router_temperature: float = 1.0,
        router_hidden: int | None = None,
        method: str = "dynamic",
        head_chs: int = 1280,
        act_layer: type[nn.Module] = nn.Hardswish,
        output_stride: int = 32,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if output_stride != 32:
            raise ParameterNetError(f"GhostNet supports only output_stride=32, got {output_stride}.")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_experts = num_experts
        self.grad_checkpointing = False
        if method not in ("dynamic", "repconv"):
            raise ParameterNetError(f"method={method!r} is unknown; use 'dynamic' or 'repconv'.")
        if num_experts is None:
            conv_layer: ConvLayer = nn.Conv2d
        elif method == "repconv":
            conv_layer = partial(RepConv2d, num_experts=num_experts)
        else:
            conv_layer = partial(
                DynamicConv2d,
                num_experts=num_experts,
                router=router,
                router_temperature=router_temperature,
                router_hidden=router_hidden,
            )

        def chs(c: int) -> int:
            return make_divisible(c * width, 4)

        stem_chs = chs(16)
        self.stem = Stem(in_chans, stem_chs, act_layer, conv_layer, **dd)

        num_blocks = sum(len(stage) for stage in stages)
        block_idx = 0
        prev_chs, net_stride = stem_chs, 2
        blocks: list[nn.Module] = []
        self.feature_info: list[dict[str, Any]] = []
        for stage_idx, stage in enumerate(stages):
            layers = []
            for kernel_size, exp, out, se_ratio, stride in stage:
                dpr = drop_path_rate * block_idx / num_blocks
                layers.append(
                    GhostBottleneck(
                        prev_chs, chs(exp), chs(out), kernel_size, stride, se_ratio, act_layer, conv_layer, dpr, **dd
                    )
                )
                prev_chs, net_stride, block_idx = chs(out), net_stride * stride, block_idx + 1
            blocks.append(nn.Sequential(*layers))
            # A feature is the last stage at each resolution.
            next_stride = stages[stage_idx + 1][0][4] if stage_idx + 1 < len(stages) else 2
            if next_stride > 1:
                self.feature_info.append(dict(num_chs=prev_chs, reduction=net_stride, module=f"blocks.{stage_idx}"))
        self.num_features = chs(stages[-1][-1][1])
        blocks.append(nn.Sequential(ConvBnAct(prev_chs, self.num_features, 1, 1, 1, act_layer, conv_layer, **dd)))
        self.blocks = nn.Sequential(*blocks)
        self.stage_ends = [int(info["module"].split(".")[1]) for info in self.feature_info]

        self.head_hidden_size = head_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.conv_head = nn.Conv2d(self.num_features, head_chs, 1, **dd)
        self.act2 = act_layer()
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.classifier = nn.Linear(head_chs, num_classes, **dd) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem\.",
            blocks=[
                (r"^blocks\.(\d+)" if coarse else r"^blocks\.(\d+)\.(\d+)", None),
                (r"^conv_head", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        ref = self.conv_head.weight if isinstance(self.conv_head, nn.Conv2d) else next(self.parameters())
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.classifier = (
            nn.Linear(self.head_hidden_size, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The feature maps at ``indices`` of ``feature_info`` (timm's convention), and the final features."""
        if output_fmt != "NCHW":
            raise ParameterNetError(f"GhostNet intermediates are NCHW only, got output_fmt={output_fmt!r}.")
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_stages = {self.stage_ends[i] for i in take_indices}
        last = self.stage_ends[max_index] if stop_early else len(self.blocks) - 1
        intermediates = []
        x = self.stem(x)
        for stage_idx, stage in enumerate(self.blocks[: last + 1]):
            x = self._run_stage(stage, x)
            if stage_idx in take_stages:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last wanted feature and, with them or ``prune_head``, the head."""
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        last = self.stage_ends[max_index]
        if last < len(self.blocks) - 1:
            self.blocks = self.blocks[: last + 1]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True
        if prune_head:
            self.conv_head = nn.Identity()
            self.act2 = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x, flatten=True)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.flatten(self.act2(self.conv_head(self.global_pool(x))))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: GhostNet) -> dict[str, torch.Tensor]:
    """Fit a checkpoint's dynamic stem to the model's ``in_chans`` (timm adapts only a static first conv).

    Each expert kernel is adapted as timm adapts a conv (summed for one channel, else repeated and rescaled), and
    so is the first router layer, whose inputs are the per-channel means of the image. The keys of a wrapped model
    (``module.``, ``_orig_mod.``) are unwrapped first.

    Raises ParameterNetError for a checkpoint whose layers have another layout than the model's: a static GhostNet's
    for a ParameterNet (the message gives the ``parameternet convert`` command that upcycles it exactly), a
    ParameterNet's for a static GhostNet, or another number of experts.
    """
    state_dict = clean_checkpoint(state_dict, model)
    variant = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or ""
    static = variant.replace("parameternet", "ghostnet", 1)
    dynamic = static.replace("ghostnet", "parameternet", 1)
    # parameterize's defaults leave the release's static layers static but for the stride-2 depthwise conv
    check_checkpoint_layout(state_dict, model, static, dynamic, " --exclude '*.conv_dw'")
    stem = model.stem.conv
    if not isinstance(stem, DynamicConv2d):
        return state_dict
    out = dict(state_dict)
    own = model.state_dict()
    for key, value in state_dict.items():
        if not key.startswith("stem.conv.") or key not in own or value.shape == own[key].shape:
            continue
        base_chans = value.shape[2] if key == "stem.conv.weight" else value.shape[-1]
        if key == "stem.conv.weight":  # (E, out, in, kh, kw)
            adapted = adapt_input_conv(stem.in_channels, value.flatten(0, 1), base_chans)
            out[key] = adapted.view(*value.shape[:2], *adapted.shape[1:])
        elif value.dim() == 2:  # the router's first linear: (hidden, in)
            out[key] = adapt_input_conv(stem.in_channels, value[:, :, None, None], base_chans)[:, :, 0, 0]
    return out


def _create_ghostnet(variant: str, stages, width: float, pretrained: bool = False, **kwargs: Any) -> GhostNet:
    check_pretrained_source(variant, pretrained, kwargs)
    return build_model_with_cfg(
        GhostNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        stages=stages,
        width=width,
        **kwargs,
    )


def _static(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    for key in ("num_experts", "router", "router_temperature", "router_hidden", "method"):
        if key in kwargs:
            twin = variant.replace("ghostnet", "parameternet")
            raise ParameterNetError(f"{variant} has static convs and takes no {key}; use {twin} for experts.")
    return kwargs


_cfg = partial(untrained_cfg, crop_pct=0.875, first_conv="stem.conv", classifier="classifier")


_MINI_WIDTHS = {"025": 0.25, "050": 0.5, "100": 1.0, "200": 2.0}  # the mini family's fixed widths by name suffix
_MINI_CFG = dict(crop_pct=1.0, interpolation="bilinear", mean=(0.5,), std=(0.5,))

default_cfgs = generate_default_cfgs(
    {
        "ghostnet_300m.untrained": _cfg(),
        "ghostnet_600m.untrained": _cfg(),
        "parameternet_300m.untrained": _cfg(),
        "parameternet_600m.untrained": _cfg(),
        **{
            f"{family}_mini_{w}.untrained": _cfg(num_classes=10, input_size=(1, 28, 28), pool_size=(4, 4), **_MINI_CFG)
            for family in ("ghostnet", "parameternet")
            for w in _MINI_WIDTHS
        },
        **{
            f"{family}_mini.untrained": _cfg(num_classes=10, input_size=(1, 28, 28), pool_size=(4, 4), **_MINI_CFG)
            for family in ("ghostnet", "parameternet")
        },
    }
)


@register_model
def ghostnet_300m(pretrained: bool = False, **kwargs: Any) -> GhostNet:
    """GhostNet-300M: the original GhostNet table at width 1.45 (8.6M params, 289M MACs)."""
    return _create_ghostnet("ghostnet_300m", GHOSTNET_STAGES, 1.45, pretrained, **_static("ghostnet_300m", kwargs))


@register_model
def ghostnet_600m(pretrained: bool = False, **kwargs: Any) -> GhostNet:
    """GhostNet-600M: the ParameterNet release's table at width 1.9, static (19.8M params, 579M MACs)."""
    kwargs = _static("ghostnet_600m", kwargs)
    return _create_ghostnet("ghostnet_600m", PARAMETERNET_600M_STAGES, 1.9, pretrained, **kwargs)


@register_model
def parameternet_300m(pretrained: bool = False, num_experts: int = 4, **kwargs: Any) -> GhostNet:
    """ParameterNet-300M: GhostNet-300M with dynamic convs (4 experts: 15.7M params, 298M MACs)."""
    return _create_ghostnet("parameternet_300m", GHOSTNET_STAGES, 1.45, pretrained, num_experts=num_experts, **kwargs)


@register_model
def parameternet_600m(pretrained: bool = False, num_experts: int = 4, **kwargs: Any) -> GhostNet:
    """ParameterNet-600M: the authors' release (4 experts: 34.5M params, 599M MACs)."""
    kwargs["num_experts"] = num_experts
    return _create_ghostnet("parameternet_600m", PARAMETERNET_600M_STAGES, 1.9, pretrained, **kwargs)


def _mini(variant: str, width: float, pretrained: bool, kwargs: dict[str, Any]) -> GhostNet:
    kwargs.setdefault("head_chs", 256)
    kwargs.setdefault("in_chans", 1)
    kwargs.setdefault("num_classes", 10)
    if variant.startswith("ghostnet"):
        kwargs = _static(variant, kwargs)
    else:
        kwargs.setdefault("num_experts", 4)
    return _create_ghostnet(variant, GHOSTNET_MINI_STAGES, width, pretrained, **kwargs)


@register_model
def ghostnet_mini(pretrained: bool = False, width: float = 1.0, head_chs: int = 256, **kwargs: Any) -> GhostNet:
    """GhostNet-mini at any ``width`` and head width ``head_chs`` (the pitfall experiment's cells)."""
    if width <= 0 or head_chs < 1:
        raise ParameterNetError(f"ghostnet_mini needs width > 0 and head_chs >= 1, got {width} and {head_chs}.")
    return _mini("ghostnet_mini", width, pretrained, {**kwargs, "head_chs": head_chs})


@register_model
def parameternet_mini(pretrained: bool = False, width: float = 1.0, head_chs: int = 256, **kwargs: Any) -> GhostNet:
    """ParameterNet-mini at any ``width`` and ``head_chs``: dynamic convs (``num_experts`` default 4)."""
    if width <= 0 or head_chs < 1:
        raise ParameterNetError(f"parameternet_mini needs width > 0 and head_chs >= 1, got {width} and {head_chs}.")
    return _mini("parameternet_mini", width, pretrained, {**kwargs, "head_chs": head_chs})


def _register_mini(variant: str, width: float, doc: str) -> Callable[..., GhostNet]:
    """Register ``variant`` in timm: :func:`_mini` at the fixed ``width``, taking ``pretrained`` and the model's
    keyword arguments."""

    def create(pretrained: bool = False, **kwargs: Any) -> GhostNet:
        return _mini(variant, width, pretrained, kwargs)

    create.__name__ = create.__qualname__ = variant
    create.__doc__ = doc
    return register_model(create)


# ghostnet_mini_025 ... parameternet_mini_200: the mini family at fixed widths for 28 px grey images (the pitfall
# experiment's models).
for _w, _width in _MINI_WIDTHS.items():
    _note = " (the pitfall experiment's smallest baseline)" if _w == "025" else ""
    globals()[f"ghostnet_mini_{_w}"] = _register_mini(
        f"ghostnet_mini_{_w}", _width, f"GhostNet-mini at width {_width} for 28 px grey images{_note}."
    )
    globals()[f"parameternet_mini_{_w}"] = _register_mini(
        f"parameternet_mini_{_w}",
        _width,
        f'ParameterNet-mini at width {_width}: dynamic convs (``num_experts`` default 4; ``method="repconv"`` too).',
    )
