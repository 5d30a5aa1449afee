"""Building the dynamic / RepConv layers that replace the selected dense ones, upcycling their weights, swapping
them into the model, and the self-check after converting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import Conv2dSame
from torch import nn

from parameternet.conversion.probe import FAST_PATH_SWITCHES, _batched, _leaves, _Probe, _run
from parameternet.conversion.report import ParameterizeReport
from parameternet.conversion.select import _convertible, _walk
from parameternet.errors import ParameterNetError
from parameternet.layers import DynamicConv2d, DynamicLinear, RepConv2d, TopKMoELinear
from parameternet.toolkit import num_params, references, replace


def _new_layer(dense: nn.Module, kind: str, method: str, num_experts: int, router_kwargs: dict[str, Any]) -> nn.Module:
    dd = dict(device=dense.weight.device, dtype=dense.weight.dtype)
    if kind == "token":  # a linear that routes every position on its own: a top-1 mixture of experts
        return TopKMoELinear(
            dense.in_features, dense.out_features, dense.bias is not None, num_experts=num_experts, **dd
        )
    if kind == "linear":
        return DynamicLinear(
            dense.in_features,
            dense.out_features,
            dense.bias is not None,
            num_experts=num_experts,
            **router_kwargs,
            **dd,
        )
    padding = "same" if isinstance(dense, Conv2dSame) else dense.padding
    args = (dense.in_channels, dense.out_channels, dense.kernel_size, dense.stride, padding, dense.dilation)
    kw = dict(groups=dense.groups, bias=dense.bias is not None, padding_mode=dense.padding_mode, **dd)
    if method == "repconv":
        return RepConv2d(*args, **kw, num_experts=num_experts)
    return DynamicConv2d(*args, **kw, num_experts=num_experts, **router_kwargs)


@torch.no_grad()
def _fill_bank_(bank: torch.Tensor, dense: torch.Tensor, total: float, noise: float) -> None:
    """``bank[i] = dense / total + P_i`` with ``sum_i P_i = 0``; float64 arithmetic, cast once."""
    d = dense.detach().to("cpu", torch.float64)
    std = d.std().item() if d.numel() > 1 else 0.0
    if not (math.isfinite(std) and std > 0):
        # A constant (say zero-initialised) weight: perturb at the scale of a fresh init, or the experts could
        # never tell themselves apart. A constant bias needs no perturbation of its own.
        std = 1.0 / math.sqrt(d[0].numel()) if d.dim() > 1 else 0.0
    q = torch.randn((bank.shape[0], *d.shape)).double() * (noise * std)
    q -= q.mean(0, keepdim=True)
    bank.copy_((d / total + q).to(bank))


@torch.no_grad()
def _upcycle_(layer: nn.Module, dense: nn.Module, noise: float) -> None:
    if isinstance(layer, RepConv2d):
        layer.conv.weight.copy_(dense.weight)
        if dense.bias is not None:
            layer.conv.bias.copy_(dense.bias)
        for branch in layer.branches:
            nn.init.zeros_(branch[1].weight)  # every branch adds exactly zero until its scale is learned
        return
    # Zeroing the router's last linear gives every sample the same coefficients, whatever the router.
    last = [m for m in layer.router.modules() if isinstance(m, nn.Linear)][-1]
    last.weight.zero_()
    if last.bias is not None:
        last.bias.zero_()
    in_features = layer.in_channels if isinstance(layer, DynamicConv2d) else layer.in_features
    alpha = layer.router(torch.zeros(1, in_features, device=last.weight.device, dtype=last.weight.dtype))[0]
    alpha = alpha.double()
    if not torch.allclose(alpha, alpha[0].expand_as(alpha), rtol=0, atol=1e-12):
        raise RuntimeError(f"router {type(layer.router).__name__} does not give equal coefficients at zero.")
    total = alpha.sum().item()
    _fill_bank_(layer.weight, dense.weight, total, noise)
    if dense.bias is not None:
        _fill_bank_(layer.bias, dense.bias, total, noise)


def _convert(
    model: nn.Module,
    names: Sequence[str],
    method: str,
    num_experts: int,
    router_kwargs: dict[str, Any],
    init: str,
    noise: float,
    batch_dims: dict[str, int] | None = None,
    token_routed: Sequence[str] = (),
) -> nn.Module:
    """Replace the modules called ``names`` (all convertible) and return the model (a new one when the model
    itself is the layer to convert). Linears in ``token_routed`` become top-1 mixtures of experts
    (:class:`~parameternet.layers.TopKMoELinear`, upcycled by its ``from_linear``). A parent with a fused fast path
    (:data:`FAST_PATH_SWITCHES`) gets it off."""
    refs = references(model)
    lookup = dict(_walk(model))
    for name in names:
        dense = model if name == "" else lookup.get(name)
        kind, reason = _convertible(dense, method) if dense is not None else (None, "no such module")
        if kind is None:
            raise ParameterNetError(f"cannot convert module {name!r}: {reason}.")
        if name in token_routed:
            if kind != "linear":
                raise ParameterNetError(f"cannot route module {name!r} per token: only linears can ({reason}).")
            kind = "token"
        if kind == "token" and init == "upcycle":
            layer = TopKMoELinear.from_linear(dense, num_experts=num_experts)
        else:
            layer = _new_layer(dense, kind, method, num_experts, router_kwargs)
        if (batch_dims or {}).get(name) and kind != "token":
            layer.batch_dim = batch_dims[name]
        if init == "upcycle" and kind != "token":
            _upcycle_(layer, dense, noise)
        if name == "":
            return layer
        for parent, _ in refs[id(dense)]:
            switch = FAST_PATH_SWITCHES.get(type(parent))
            if switch is not None:
                switch(parent)
        replace(refs, dense, layer)
    return model


def _verify(model: nn.Module, converted: dict[str, nn.Module], probe: _Probe, upcycled: bool) -> None:
    """The checks after converting (see ``parameterize(verify=...)``); the model is left as it was."""
    first = probe.pair[0] if probe.pair else probe.example
    out, seen = _run(model, converted, first)
    missing = [n for n in converted if n in probe.positions and n not in seen]
    if missing:
        raise ParameterNetError(
            f"parameterize() self-check failed: converted layer {missing[0]!r} is not called in eval mode under "
            f"no_grad (its parent bypasses it); exclude it with exclude=[{missing[0]!r}]."
        )
    if upcycled and not _close(out, probe.outputs):
        raise ParameterNetError(
            "parameterize() self-check failed: the upcycled model's output differs from the dense model's in eval "
            "mode under no_grad; please report this model."
        )
    routers = [m.router for m in converted.values() if isinstance(m, (DynamicConv2d, DynamicLinear, TopKMoELinear))]
    if not routers or (probe.pair is None and probe.positions_rule is None):  # nothing to split
        return
    saved = {id(p): p.detach().clone() for r in routers for p in r.parameters()}
    generator = torch.Generator().manual_seed(2)
    try:
        with torch.no_grad():
            for r in routers:
                for p in r.parameters():
                    p.add_(torch.randn(p.shape, generator=generator).to(p) * 2.0 / math.sqrt(max(1, p.shape[-1])))
        outs = [_run(model, converted, ex)[0] for ex in probe.pair] if probe.pair is not None else None
        positions_hold = probe.positions_rule is None or probe.positions_rule.holds(model, converted)
    finally:
        with torch.no_grad():
            for r in routers:
                for p in r.parameters():
                    p.copy_(saved[id(p)])
    if not positions_hold:
        raise ParameterNetError(
            "parameterize() self-check failed: with random routers the converted model no longer keeps positions "
            f"apart as the dense model does ({probe.positions_rule.describe()}); please report this model."
        )
    if outs is not None and not _batched(outs[2], outs[0], outs[1]):
        raise ParameterNetError(
            "parameterize() self-check failed: with random routers a sample's output depends on the other samples "
            f"of its batch (batch dimension {probe.model_batch_dim} of the input); please report this model."
        )


def _close(a: Any, b: Any) -> bool:
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return False
        if x.is_floating_point():
            tol = (1e-3 if x.dtype in (torch.float32, torch.float64) else 5e-2) * max(float(y.abs().max()), 1e-3)
            if (x.double() - y.double()).abs().max() > tol:
                return False
        elif not torch.equal(x, y):
            return False
    return True


def apply_recipe(model: nn.Module, steps: Sequence[dict[str, Any]]) -> nn.Module:
    """Redo saved conversion steps (each a :meth:`ParameterizeReport.recipe`) on a freshly built ``model``, with
    random experts: the architecture a saved model had, ready for its weights. Returns the converted model, whose
    ``parameterize_report`` says ``init="loaded"``."""
    steps = list(steps)
    for i, step in enumerate(steps):
        router_kwargs = {k: step[k] for k in ("router", "router_temperature", "router_hidden")}
        model = _convert(
            model,
            step["modules"],
            step["method"],
            step["num_experts"],
            router_kwargs,
            "random",
            0.0,
            step.get("batch_dims"),
            step.get("token_routed", ()),
        )
        n = num_params(model)
        model.parameterize_report = ParameterizeReport(
            method=step["method"],
            num_experts=step["num_experts"],
            init="loaded",
            include=list(step.get("include", [])),
            exclude=list(step.get("exclude", [])),
            converted=list(step["modules"]),
            static={},
            rule="the saved recipe",
            params_before=n,
            params_after=n,
            converted_params_before=0,
            converted_params_after=0,
            history=list(steps[:i]),
            batch_dims=dict(step.get("batch_dims") or {}),
            token_routed=list(step.get("token_routed", [])),
            **router_kwargs,
        )
    return model
