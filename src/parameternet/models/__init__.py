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

__all__ = ["MODELS", "DynamicSwinTransformer", "GhostNet", "check_model_name", "create_model", "ghostnet", "swin"]

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
