"""The paper's vision models, registered in timm on import (ParameterNet, arXiv 2306.14525, Tables 2, 4 and 5).

``ghostnet_300m``, ``ghostnet_600m`` and ``swin_300m`` are the static baselines; ``parameternet_300m``,
``parameternet_600m`` and ``parameternet_swin_300m`` their dynamic versions. Build them with
``timm.create_model(name, ...)`` or :func:`create_model`, which also names close matches for a mistyped name.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.layers import DynamicConv2d, DynamicLinear, TopKMoELinear
from parameternet.models import ghostnet, swin
from parameternet.models.ghostnet import GhostNet
from parameternet.models.swin import DynamicSwinTransformer

__all__ = [
    "MODELS", "DynamicSwinTransformer", "GhostNet", "check_model_name", "create_model", "create_model_for_size",
    "fixed_input_size", "ghostnet", "swin",
]  # fmt: skip

# timm's torch.fx feature extraction (create_feature_extractor) keeps these as single call_module nodes, as it does
# its own CondConv2d: the graph then runs their eager dispatch, whatever the batch size.
for _leaf in (DynamicConv2d, DynamicLinear, TopKMoELinear):
    timm.layers.register_notrace_module(_leaf)

MODELS = (
    "ghostnet_300m",
    "parameternet_300m",
    "ghostnet_600m",
    "parameternet_600m",
    "swin_300m",
    "parameternet_swin_300m",
)


def check_model_name(name: str) -> None:
    """Raise :class:`ParameterNetError`, naming close matches, unless timm knows the model ``name``."""
    arch = name.split(".", 1)[0]
    if ":" in name or timm.is_model(arch):  # "hf-hub:..." and "local-dir:..." names are timm's to resolve
        return
    close = difflib.get_close_matches(arch, list(MODELS), n=3, cutoff=0.5)
    close += [c for c in difflib.get_close_matches(arch, timm.list_models(), n=3) if c not in close]
    hint = f"did you mean {', '.join(close[:3])}?" if close else "see timm.list_models() for the names."
    raise ParameterNetError(f"unknown model {name!r}; {hint}")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with a :class:`ParameterNetError` naming close matches for an
    unknown name instead of timm's ``RuntimeError``."""
    check_model_name(name)
    return timm.create_model(name, **kwargs)


def create_model_for_size(name: str, img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """:func:`create_model` for images of ``img_size`` x ``img_size``: a model timm marks as taking one input size
    (``fixed_input_size``: a Swin builds its attention masks for it) is built for ``img_size``; any other takes any
    size as built. ``parameternet profile``, ``export`` and ``benchmark`` build named models with it, so they take
    the same sizes. Raises :class:`ParameterNetError` for an image larger than the machine's memory (checked before
    building, which for a Swin allocates masks in proportion to the image)."""
    check_model_name(name)
    cfg = timm.models.get_pretrained_cfg(name.split(".", 1)[0])
    if img_size is not None and cfg is not None and cfg.fixed_input_size:
        from parameternet.toolkit import image_input_shape

        image_input_shape(nn.Module(), img_size, kwargs.get("in_chans") or cfg.input_size[0])  # the memory check
        kwargs.setdefault("img_size", img_size)
    return create_model(name, **kwargs)


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """``(height, width)`` of the only images ``model`` takes (a timm model with ``fixed_input_size`` whose patch
    embedding checks the size, e.g. a Swin, as built), or None when it takes any size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if not cfg.get("fixed_input_size") or size is None or not getattr(embed, "strict_img_size", True):
        return None
    return int(size[0]), int(size[1])
