"""What ``pretrained=True`` means for models that have no published weights.

The paper's authors published no checkpoints for these models, so a default ``pretrained=True`` has nothing to
load. timm still loads a local file when the caller points the pretrained config at one
(``pretrained_cfg_overlay=dict(file=PATH)``); anything else is refused with one clear sentence instead of timm's
silent random initialisation or its generic ``RuntimeError``. So is a local file whose layers have another layout
than the model's: a static checkpoint (of the baseline) for a ParameterNet, which ``parameternet convert`` upcycles
exactly, a ParameterNet's for a static model, or another number of experts.
"""

from __future__ import annotations

import shlex
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import resolve_pretrained_cfg
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.layers import DynamicConv2d, DynamicLinear, MlpSoftmaxRouter, RepConv2d
from parameternet.toolkit import strip_wrapper_prefixes

__all__ = ["check_checkpoint_layout", "check_pretrained_source", "clean_checkpoint", "untrained_cfg"]


def untrained_cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained config (for ``generate_default_cfgs``) of a model of the paper with no published weights: no url,
    ImageNet-1K at 224 px (bicubic, ImageNet mean and std, a 7x7 final map) unless ``kwargs`` say otherwise; they
    also give the ``crop_pct``, ``first_conv`` and ``classifier`` of the architecture."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "apache-2.0",
        "paper_ids": "arXiv:2306.14525",
        **kwargs,
    }


def check_pretrained_source(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> None:
    """Raise unless ``pretrained`` is off or the resolved pretrained config names weights to load."""
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    if cfg.has_weights or cfg.state_dict is not None:
        return
    raise ParameterNetError(
        f"no pretrained weights are published for {variant}; pass pretrained_cfg_overlay=dict(file=PATH) "
        "to load a local checkpoint."
    )


def clean_checkpoint(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The state dict of a checkpoint timm loads for ``model``: under its ``model`` or ``state_dict`` key if it has
    one, with the prefixes of a wrapped model (``module.``, ``_orig_mod.``) removed."""
    for key in ("model", "state_dict"):
        state_dict = state_dict.get(key, state_dict)
    return strip_wrapper_prefixes(state_dict, model.state_dict(), _source(model))


def _file(model: nn.Module) -> str | None:
    """The local file timm loads into ``model`` (its pretrained config's ``file``), if it is one."""
    file = (getattr(model, "pretrained_cfg", None) or {}).get("file")
    return str(file) if file else None


def _source(model: nn.Module) -> str:
    file = _file(model)
    return repr(file) if file else "the checkpoint"


def check_checkpoint_layout(
    state_dict: dict[str, Any], model: nn.Module, static: str, dynamic: str, convert_flags: str = ""
) -> None:
    """Raise ParameterNetError when a layer of ``state_dict`` has another layout than ``model``'s: a static kernel
    where the model has experts or RepConv branches (a checkpoint of the baseline ``static``: ``parameternet
    convert`` with ``convert_flags`` upcycles it exactly into ``model``'s layout, and the message says how), experts
    where the model's layer is static (the message names ``dynamic``, the ParameterNet to build instead) or another
    number of experts than the model's. The state dict's keys are the model's (after :func:`clean_checkpoint`)."""
    variant = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    source = _source(model)
    for name, m in model.named_modules():
        key = f"{name}.weight"
        w = state_dict.get(key)
        if not isinstance(w, torch.Tensor):
            continue
        shape = tuple(w.shape)
        dynamic_layer = isinstance(m, (DynamicConv2d, DynamicLinear))
        if (dynamic_layer and w.dim() == m.weight.dim() - 1) or (
            isinstance(m, RepConv2d) and f"{name}.conv.weight" not in state_dict
        ):
            file = shlex.quote(_file(model) or "CHECKPOINT")
            flags = f" --method repconv{convert_flags}" if isinstance(m, RepConv2d) else convert_flags
            if dynamic_layer and isinstance(m.router, MlpSoftmaxRouter):
                flags += " --router mlp-softmax"
            raise ParameterNetError(
                f"{source} is a static checkpoint ({key!r} has shape {shape}, one kernel where {variant} has "
                f"{m.num_experts}); upcycle it exactly with `parameternet convert {file} --arch {static} --experts "
                f"{m.num_experts}{flags} --output OUT.safetensors` and load OUT.safetensors instead."
            )
        if dynamic_layer and w.dim() == m.weight.dim() and w.shape[0] != m.num_experts:
            raise ParameterNetError(
                f"{source} has {w.shape[0]} experts per dynamic layer ({key!r} has shape {shape}) but {variant} was "
                f"built with num_experts={m.num_experts}; pass num_experts={w.shape[0]} to timm.create_model."
            )
        if not dynamic_layer and isinstance(m, (nn.Conv2d, nn.Linear)) and w.dim() == m.weight.dim() + 1:
            raise ParameterNetError(
                f"{source} holds dynamic layers ({key!r} has shape {shape}: {w.shape[0]} experts) where {variant}'s "
                f"are static; build {dynamic} with num_experts={w.shape[0]} to load it."
            )
