"""What ``pretrained=True`` means for models that have no published weights.

The paper's authors published no checkpoints for these models, so a default ``pretrained=True`` has nothing to
load. timm still loads a local file when the caller points the pretrained config at one
(``pretrained_cfg_overlay=dict(file=PATH)``); anything else is refused with one clear sentence instead of timm's
silent random initialisation or its generic ``RuntimeError``.
"""

from __future__ import annotations

from typing import Any

from timm.models import resolve_pretrained_cfg

from parameternet.errors import ParameterNetError

__all__ = ["check_pretrained_source"]


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
