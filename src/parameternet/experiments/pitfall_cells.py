"""The models of the low-FLOPs pitfall experiment (``parameternet pitfall``): a small grammar of cells and their sizes.

A :class:`Cell` is one model and its pretraining variant, named like ``ghostnet-w0.25-h64`` or
``parameternet-w0.1875-h48-e4-rlr10-pe27``; every round of the experiment (``pitfall``, ``pitfall_round3``) builds
its grid from these names, and every report reads them back from the CSV.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from parameternet.errors import ParameterNetError

__all__ = [
    "PRETRAIN_BATCH",
    "PRETRAIN_EPOCHS",
    "UNION_PER_CLASS",
    "Cell",
    "dynamic_cell",
    "label",
    "macs_twin_width",
    "profile_cell",
    "scaled_head",
    "static_cell",
    "twin_width",
]

UNION_PER_CLASS = 6000  # the union's training split: 20 classes x 6,000 images
PRETRAIN_EPOCHS = 3  # pitfall-pretrain.yaml's epochs: a cell without -pe pretrains this long
PRETRAIN_BATCH = 128  # pitfall-pretrain.yaml's batch size: an epoch is the set's whole batches

_TOKEN = re.compile(r"^(w|h|e|pre|pe|ps|rlr|rwd)(\d+(?:\.\d+)?)$")
_KEYS = {
    "w": "width", "h": "head_chs", "e": "experts", "pre": "pretrain_fraction", "pe": "pretrain_epochs",
    "ps": "pretrain_steps", "rlr": "router_lr_scale", "rwd": "router_weight_decay",
}  # fmt: skip
_INT_KEYS = ("head_chs", "experts", "pretrain_epochs", "pretrain_steps")


def scaled_head(width: float) -> int:
    """The head width that scales with the network: 256 x width, a multiple of 8 (about GhostNet-300M's share)."""
    return max(8, round(256 * width / 8) * 8)


@dataclass(frozen=True)
class Cell:
    """One model of the grid and its pretraining variant.

    ``family`` is ``ghostnet`` (static convs) or ``parameternet`` (``method`` dynamic or repconv with ``experts``);
    ``router`` is the dynamic convs' router; ``pretrain_fraction`` of the union's images per class,
    ``pretrain_epochs`` (None: the recipe's :data:`PRETRAIN_EPOCHS`) and ``pretrain_steps`` (None: as many as the
    epochs give; set: exactly this many, whatever the set's size) change the pretraining only.
    """

    family: str
    width: float
    head_chs: int
    experts: int | None = None
    method: str = "static"
    router: str = "linear-sigmoid"
    pretrain_fraction: float = 1.0
    pretrain_epochs: int | None = None
    router_lr_scale: float = 1.0
    router_weight_decay: float | None = None
    pretrain_steps: int | None = None

    @classmethod
    def parse(cls, name: str) -> Cell:
        """The cell a name describes, e.g. ``parameternet-w0.25-h64-e4-softmax-pre0.5``; raises on a bad name.

        The head width defaults to :func:`scaled_head` and the experts to 4; :attr:`name` is the canonical spelling.
        """
        family, *tokens = name.split("-")
        if family not in ("ghostnet", "parameternet"):
            raise ParameterNetError(f"model {name!r} must start with ghostnet- or parameternet-")
        fields: dict[str, Any] = {"family": family}
        for token in tokens:
            if token in ("repconv", "softmax"):
                fields["method" if token == "repconv" else "router"] = (
                    "repconv" if token == "repconv" else "mlp-softmax"
                )
                continue
            m = _TOKEN.match(token)
            if m is None:
                raise ParameterNetError(
                    f"model {name!r} has an unknown part {token!r}; write e.g. ghostnet-w0.25-h64 or "
                    "parameternet-w0.25-h64-e4 (options: -repconv, -softmax, -pre0.5, -pe9, -ps2811, -rlr10, -rwd0)"
                )
            key, value = _KEYS[m.group(1)], float(m.group(2))
            fields[key] = int(value) if key in _INT_KEYS else value
        if "width" not in fields:
            raise ParameterNetError(f"model {name!r} names no width; add e.g. -w0.25")
        fields.setdefault("head_chs", scaled_head(fields["width"]))
        if family == "parameternet":
            fields.setdefault("experts", 4)
            fields.setdefault("method", "dynamic")
        elif any(k in fields for k in ("experts", "method", "router", "router_lr_scale", "router_weight_decay")):
            raise ParameterNetError(f"model {name!r}: a ghostnet cell has static convs; use parameternet- for experts")
        cell = cls(**fields)
        if (
            not 0 < cell.pretrain_fraction <= 1
            or cell.width <= 0
            or (cell.pretrain_epochs or 1) < 1
            or (cell.pretrain_steps or 1) < 1
        ):
            raise ParameterNetError(f"model {name!r}: width > 0, 0 < pre <= 1, pe >= 1 and ps >= 1 are required")
        if cell.pretrain_epochs is not None and cell.pretrain_steps is not None:
            raise ParameterNetError(f"model {name!r}: give the pretraining's length once, as -pe (epochs) or -ps")
        return cell

    @property
    def name(self) -> str:
        parts = [self.family, f"w{self.width:g}", f"h{self.head_chs}"]
        if self.family == "parameternet":
            parts.append(f"e{self.experts}")
            if self.method == "repconv":
                parts.append("repconv")
            if self.router == "mlp-softmax":
                parts.append("softmax")
            if self.router_lr_scale != 1.0:
                parts.append(f"rlr{self.router_lr_scale:g}")
            if self.router_weight_decay is not None:
                parts.append(f"rwd{self.router_weight_decay:g}")
        if self.pretrain_fraction != 1.0:
            parts.append(f"pre{self.pretrain_fraction:g}")
        if self.pretrain_epochs is not None:
            parts.append(f"pe{self.pretrain_epochs}")
        if self.pretrain_steps is not None:
            parts.append(f"ps{self.pretrain_steps}")
        return "-".join(parts)

    @property
    def base(self) -> Cell:
        """The same model with the default pretraining (whose target-only runs this cell shares)."""
        return dataclasses.replace(self, pretrain_fraction=1.0, pretrain_epochs=None, pretrain_steps=None)

    @property
    def timm_model(self) -> str:
        return f"{self.family}_mini"

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"width": self.width, "head_chs": self.head_chs}
        if self.family == "parameternet":
            kwargs["num_experts"] = self.experts
            if self.method == "repconv":
                kwargs["method"] = "repconv"
            if self.router != "linear-sigmoid":
                kwargs["router"] = self.router
        return kwargs

    def overrides(self) -> list[str]:
        out = [f"model={self.timm_model}", *(f"model_kwargs.{k}={v}" for k, v in self.model_kwargs().items())]
        if self.router_lr_scale != 1.0:
            out.append(f"optim.router_lr_scale={self.router_lr_scale}")
        if self.router_weight_decay is not None:
            out.append(f"optim.router_weight_decay={self.router_weight_decay}")
        return out

    @property
    def pretrain_images(self) -> int:
        """The images of this cell's pretraining set: its class-balanced fraction of the union."""
        return 20 * round(UNION_PER_CLASS * self.pretrain_fraction)

    @property
    def pretrain_step_count(self) -> int:
        """The optimiser steps of this cell's pretraining: ``-ps`` if set, else its epochs of whole batches."""
        per_epoch = self.pretrain_images // PRETRAIN_BATCH
        return self.pretrain_steps or (self.pretrain_epochs or PRETRAIN_EPOCHS) * per_epoch

    def pretrain_overrides(self) -> list[str]:
        """The recipe overrides of this cell's pretraining length (its set's size is applied to the data spec)."""
        if self.pretrain_epochs is not None:
            return [f"epochs={self.pretrain_epochs}"]
        if self.pretrain_steps is not None:
            return [f"max_steps={self.pretrain_steps}"]
        return []


def static_cell(width: float, head_chs: int | None = None) -> Cell:
    return Cell("ghostnet", width, head_chs or scaled_head(width))


def dynamic_cell(width: float, experts: int = 4, head_chs: int | None = None, **kw: Any) -> Cell:
    return Cell("parameternet", width, head_chs or scaled_head(width), experts, kw.pop("method", "dynamic"), **kw)


def profile_cell(cell: Cell, img_size: int) -> tuple[int, int]:
    """(training parameters, inference MACs) at ``img_size``; RepConv merges into the static twin for inference."""
    import timm

    import parameternet.models  # noqa: F401
    from parameternet.profiling.measure import profile

    result = profile(timm.create_model(cell.timm_model, **cell.model_kwargs()), img_size=img_size)
    if cell.method == "repconv":
        static = static_cell(cell.width, cell.head_chs)
        return result.params, profile_cell(static, img_size)[1]
    return result.params, result.macs


def twin_width(cell: Cell, img_size: int = 28) -> float:
    """The static width (a multiple of 1/16, scaled head) whose parameter count is closest to ``cell``'s."""
    target = profile_cell(cell, img_size)[0]
    widths = [k / 16 for k in range(max(1, round(cell.width * 16)), round(cell.width * 16) * 4 + 1)]
    return min(widths, key=lambda w: abs(profile_cell(static_cell(w), img_size)[0] - target))


def macs_twin_width(cell: Cell, img_size: int = 28, grid: int = 64) -> float:
    """The static width (a multiple of ``1/grid``, scaled head) whose MACs are closest to ``cell``'s, at or above
    ``cell``'s width: the static model at a ParameterNet's FLOPs."""
    target = profile_cell(cell, img_size)[1]
    widths = [k / grid for k in range(max(1, round(cell.width * grid)), round(cell.width * grid) * 2 + 1)]
    return min(widths, key=lambda w: abs(profile_cell(static_cell(w), img_size)[1] - target))


def label(cell: Cell) -> str:
    """The cell in words, e.g. ``ParameterNet-mini 0.1875 (head 48), 4 experts; pretrain 9 epochs``."""
    if cell.family == "ghostnet":
        text = f"GhostNet-mini {cell.width:g} (head {cell.head_chs})"
    else:
        kind = f"RepConv x{cell.experts}" if cell.method == "repconv" else f"{cell.experts} experts"
        if cell.router == "mlp-softmax":
            kind += ", softmax router"
        if cell.router_lr_scale != 1.0:
            kind += f", router lr x{cell.router_lr_scale:g}"
        if cell.router_weight_decay is not None:
            kind += f", router wd {cell.router_weight_decay:g}"
        text = f"ParameterNet-mini {cell.width:g} (head {cell.head_chs}), {kind}"
    if cell.pretrain_fraction != 1.0:
        text += f"; pretrain on {cell.pretrain_fraction:g} of the union"
    if cell.pretrain_epochs is not None:
        text += f"; pretrain {cell.pretrain_epochs} epochs"
    if cell.pretrain_steps is not None:
        text += f"; pretrain {cell.pretrain_steps:,} steps"
    return text
