"""Swin-300M and ParameterNet-Swin-300M (ParameterNet, arXiv 2306.14525, section 4.3 and Table 5).

Swin-300M is timm's Swin-T (``swin_tiny_patch4_window7_224``: patch 4, window 7, depths 2-2-6-2, heads 3-6-12-24)
with the token width cut from 96 to 24. The ParameterNet version swaps the four linears of every block (``qkv``,
``proj``, ``fc1``, ``fc2``) for :class:`~parameternet.layers.DynamicLinear` with 4 experts whose biases are experts
too. Both reuse timm's :class:`~timm.models.swin_transformer.SwinTransformer`; only the layer swap is written here.

Routing granularity. timm's window attention sees the windows as the batch, ``(B * windows, 49, C)``, so a dynamic
``qkv`` / ``proj`` dropped in there mixes one kernel per *window*; the MLP sees ``(B, HW, C)`` and mixes per image.
Counted the paper's way that gives 322.7M MACs at 224px, the paper's figure; routing attention per image as well
gives 317.6M (the router and the kernel mixing then run once per image instead of 64, 16 and 4 times in the first
three stages). So per-window routing (``attn_routing="window"``, the default) is what the paper measured, and
``attn_routing="image"`` offers the per-sample principle of the dynamic conv.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as _timm_filter
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.layers import DynamicLinear
from parameternet.models._pretrained import (
    check_checkpoint_layout,
    check_pretrained_source,
    clean_checkpoint,
    untrained_cfg,
)
from parameternet.toolkit import check_image_batch

__all__ = ["ATTN_ROUTINGS", "DynamicSwinTransformer", "SwinDynamicLinear"]

ATTN_ROUTINGS = ("window", "image")

# Swin-T with 24-wide tokens: 1.95M parameters, 311.1M MACs.
SWIN_300M_ARGS = dict(patch_size=4, window_size=7, embed_dim=24, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))


class CheckedPatchEmbed(PatchEmbed):
    """timm's patch embedding, with a clear error for an input of the wrong rank or channel count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.proj.in_channels)
        return super().forward(x)


class SwinDynamicLinear(DynamicLinear):
    """A :class:`DynamicLinear` initialised like timm's Swin linears, able to route window batches per image.

    With ``route_per_image`` the input ``(B * windows, N, C)`` is viewed as ``(B, windows * N, C)`` (timm orders
    windows image by image), so one image gets one mixture; ``images`` (``B``) is set by a hook on the block.
    """

    def __init__(self, *args: Any, route_per_image: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.route_per_image = route_per_image
        self.images: int | None = None

    def init_weights(self) -> None:
        # Every expert as timm initialises a Swin linear: normal with std 0.02 truncated at +-2, i.e. at 100 std,
        # which never truncates; a plain normal draws the same and skips the slow inverse-erf sampling.
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.route_per_image and self.images):
            return super().forward(x)
        y = super().forward(x.reshape(self.images, -1, x.shape[-1]))  # (B, windows * N, out)
        return y.reshape(*x.shape[:-1], self.out_features)


def _record_images(block: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    block.attn.qkv.images = block.attn.proj.images = args[0].shape[0]  # block input is (B, H, W, C)


def _forget_images(block: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    block.attn.qkv.images = block.attn.proj.images = None


class DynamicSwinTransformer(SwinTransformer):
    """timm's SwinTransformer with dynamic ``qkv``, ``proj``, ``fc1`` and ``fc2`` in every block.

    Args:
        num_experts: as for :class:`DynamicLinear`.
        router: as for :class:`DynamicLinear`.
        router_temperature: as for :class:`DynamicLinear`.
        router_hidden: as for :class:`DynamicLinear`.
        attn_routing: ``"window"`` (the paper's count: attention mixes per window) or ``"image"``.
        **kwargs: :class:`SwinTransformer`'s arguments.
    """

    def __init__(
        self,
        *,
        num_experts: int = 4,
        router: str = "linear-sigmoid",
        router_temperature: float = 1.0,
        router_hidden: int | None = None,
        attn_routing: str = "window",
        **kwargs: Any,
    ):
        if attn_routing not in ATTN_ROUTINGS:
            raise ParameterNetError(f"unknown attn_routing {attn_routing!r}; choose one of {', '.join(ATTN_ROUTINGS)}.")
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.attn_routing = attn_routing
        dynamic = partial(
            SwinDynamicLinear,
            num_experts=num_experts,
            router=router,
            router_temperature=router_temperature,
            router_hidden=router_hidden,
        )

        def swap(linear: nn.Linear, per_image: bool = False) -> SwinDynamicLinear:
            w = linear.weight
            layer = dynamic(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                device=w.device,
                dtype=w.dtype,
                route_per_image=per_image,
            )
            layer.init_weights()
            return layer

        per_image = attn_routing == "image"
        for stage in self.layers:
            for block in stage.blocks:
                block.attn.qkv = swap(block.attn.qkv, per_image)
                block.attn.proj = swap(block.attn.proj, per_image)
                block.mlp.fc1 = swap(block.mlp.fc1)
                block.mlp.fc2 = swap(block.mlp.fc2)
                if per_image:
                    block.register_forward_pre_hook(_record_images)
                    block.register_forward_hook(_forget_images)


# The ``parameternet convert`` options that turn a swin_300m into exactly parameternet_swin_300m's layout.
_CONVERT_FLAGS = " --include 'layers.*.attn.qkv' 'layers.*.attn.proj' 'layers.*.mlp.fc1' 'layers.*.mlp.fc2'"


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SwinTransformer) -> dict[str, torch.Tensor]:
    """timm's Swin checkpoint filter, after unwrapping the keys of a wrapped model (``module.``, ``_orig_mod.``).

    Raises ParameterNetError for a checkpoint whose layers have another layout than the model's: a swin_300m's for
    parameternet_swin_300m (the message gives the ``parameternet convert`` command that upcycles it exactly), a
    ParameterNet's for swin_300m, or another number of experts.
    """
    state_dict = _timm_filter(clean_checkpoint(state_dict, model), model)
    check_checkpoint_layout(state_dict, model, "swin_300m", "parameternet_swin_300m", _CONVERT_FLAGS)
    return state_dict


def _create_swin(variant: str, model_cls: type[SwinTransformer], pretrained: bool = False, **kwargs: Any):
    check_pretrained_source(variant, pretrained, kwargs)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **dict(SWIN_300M_ARGS, embed_layer=CheckedPatchEmbed, **kwargs),
    )


_cfg = partial(untrained_cfg, crop_pct=0.9, fixed_input_size=True, first_conv="patch_embed.proj", classifier="head.fc")


default_cfgs = generate_default_cfgs({"swin_300m.untrained": _cfg(), "parameternet_swin_300m.untrained": _cfg()})


@register_model
def swin_300m(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin-300M: Swin-T with embed_dim 24 (1.95M params, 311M MACs)."""
    return _create_swin("swin_300m", SwinTransformer, pretrained, **kwargs)


@register_model
def parameternet_swin_300m(pretrained: bool = False, **kwargs: Any) -> DynamicSwinTransformer:
    """ParameterNet-Swin-300M: Swin-300M with 4-expert dynamic qkv / proj / fc1 / fc2 (6.86M params, 323M MACs)."""
    return _create_swin("parameternet_swin_300m", DynamicSwinTransformer, pretrained, **kwargs)
