"""Turn any model into a ParameterNet: swap its convs / linears for dynamic (or re-parameterised) layers.

ParameterNet (arXiv 2306.14525, sec. 3.2) is "a general design principle": add parameters, keep FLOPs. This module
applies it to a model the user already has. :func:`parameterize` walks the module tree and replaces every selected
``nn.Conv2d`` / ``nn.Linear`` by a :class:`~parameternet.layers.DynamicConv2d` /
:class:`~parameternet.layers.DynamicLinear` with ``num_experts`` experts (``method="dynamic"``) or by a
:class:`~parameternet.layers.RepConv2d` with ``num_experts - 1`` extra branches (``method="repconv"``, Table 6).

Which layers stay static by default (``include=None``):

- the classifier: the module(s) named by timm's ``pretrained_cfg["classifier"]`` and returned by
  ``model.get_classifier()``, when the model has them;
- layers that see one position per sample: squeeze-excite and attention-gate convs, heads after global pooling.
  Mixing M experts there costs M times the layer itself, against the "keep the FLOPs" principle. They are found
  by one forward pass on an example input (``example_input``, else timm's ``pretrained_cfg["input_size"]``) that
  records each layer's input size. Without a usable example input the rule falls back to module names: a layer
  stays static when a component of its dotted name is one of :data:`GATE_NAMES`;
- layers whose class has a forward of its own (timm's ``StdConv2d`` weight standardisation, ``Conv2dSame`` with a
  stride, ``nn.MultiheadAttention``'s out projection, ...): converting them would change the function, so they
  are left out and listed in the report. Plain ``nn.Conv2d`` / ``nn.Linear``, timm's ``Linear`` and stride-1
  ``Conv2dSame`` are converted.

``include`` / ``exclude`` take ``fnmatch`` patterns over module names; a pattern selects a module when it matches
the module's name or the name of one of its parents (``"layer4"`` covers ``"layer4.1.conv2"``). With ``include``
the defaults are off: exactly the included layers, minus the excluded ones, are converted.

``init="upcycle"`` keeps the function of the dense model at conversion (eval mode, fp32 to about 1e-6): the
router's last linear is zeroed, so every sample gets the same coefficients ``a`` (1/2 for the sigmoid router, 1/M
for the softmax one), and expert ``i`` is ``W / (M a) + P_i`` with perturbations ``P_i`` that sum to zero across
experts: the mix is exactly ``W``, yet the experts differ, so the router learns to tell them apart and the experts
drift apart once trained. For RepConv the main conv keeps ``W`` and every branch starts with a zero BatchNorm
scale. ``init="random"`` draws fresh experts / branches.

The model is converted in place and returned; ``model.parameterize_report`` holds a :class:`ParameterizeReport`
(layers changed, parameters and MACs before / after, the recipe). :func:`parameternet.save` writes a converted
model with its recipe to safetensors and :func:`parameternet.load` rebuilds it (both in :mod:`parameternet.io`).

The package: :mod:`.select` chooses the layers (with :mod:`.probe`, which runs the dense model), :mod:`.rewrite`
builds and swaps in the new layers and checks the result, :mod:`.report` describes it; this module checks the
arguments and ties them together.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from parameternet.conversion.report import ParameterizeReport
from parameternet.conversion.rewrite import _convert, _verify, apply_recipe
from parameternet.conversion.select import GATE_NAMES, _as_patterns, _select, _walk
from parameternet.counting import count_macs as _count_macs_of
from parameternet.errors import ParameterNetError
from parameternet.layers import ROUTERS, check_num_experts
from parameternet.toolkit import check_memory, eval_mode, example_input_for, num_params

__all__ = [
    "GATE_NAMES",
    "INITS",
    "METHODS",
    "ParameterizeReport",
    "apply_recipe",
    "example_input_for",
    "parameterize",
]

log = logging.getLogger(__name__)

METHODS = ("dynamic", "repconv")
INITS = ("upcycle", "random")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ParameterNetError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}.")


def parameterize(
    model: nn.Module,
    num_experts: int = 4,
    *,
    method: str = "dynamic",
    init: str = "upcycle",
    router: str = "linear-sigmoid",
    router_temperature: float = 1.0,
    router_hidden: int | None = None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    example_input: Any = None,
    noise: float = 0.1,
    count_macs: bool = True,
    verify: bool = True,
) -> nn.Module:
    """Make ``model`` a ParameterNet: its convs / linears become dynamic layers (or RepConv layers).

    Args:
        model: any ``nn.Module``; converted in place (use the returned module: it is a new one only when
            ``model`` is itself a single conv / linear).
        num_experts: experts per dynamic layer; for ``"repconv"`` the number of parallel kernels (>= 2).
        method: ``"dynamic"`` (the paper's ParameterNet) or ``"repconv"`` (Table 6's comparison; convs only).
        init: ``"upcycle"`` keeps the dense function; ``"random"`` draws fresh experts.
        router: the dynamic layers' router (see ``DynamicConv2d``).
        router_temperature: the router's softmax temperature (``"mlp-softmax"``).
        router_hidden: the router's hidden width (``"mlp-softmax"``).
        include: ``fnmatch`` patterns over module names (a parent's name covers its children) of the layers to
            convert; they replace the default choice of layers. A pattern that matches nothing is an error.
        exclude: ``fnmatch`` patterns of layers to leave static, as for ``include``.
        example_input: what to run the model on, for the one-position rule, the probes and the MAC count: a
            tensor or a shape (batch included) is the one argument, a tuple the positional arguments, a list one
            argument (torchvision's detection models take a list of images), a dict keyword arguments; default:
            timm's ``pretrained_cfg["input_size"]``, if the model has one.
        noise: standard deviation of the zero-sum expert perturbations of ``"upcycle"``, relative to the dense
            weight's.
        count_macs: count MACs before and after on the example input (two traced forward passes).
        verify: probe and check the conversion on the example input (eval mode, ``no_grad``, a few forward
            passes at one and two samples): find the dimension along which the model keeps samples apart and
            each layer's batch dimension there (a linear with the batch elsewhere becomes
            ``DynamicLinear(batch_dim=...)``, a conv is left static); leave static, with the reason, layers whose
            parent reads their weight instead of calling them (a fused fast path; PyTorch's
            ``nn.TransformerEncoderLayer`` fast path is turned off instead) and layers whose weight another module
            holds (weight tying); after converting, check that every converted layer runs under ``no_grad``, that
            an upcycled model gives the dense model's output, and that with random routers a sample's output does
            not depend on the other samples of its batch. A failed check raises ``ParameterNetError``.

    Raises:
        ParameterNetError: bad arguments, a model that does not run on ``example_input``, nothing to convert, or a
            failed self-check (one sentence naming it).

    Returns the converted model; ``model.parameterize_report`` is its :class:`ParameterizeReport`.
    """
    _check_arguments(model, num_experts, method, init, router, noise, router_temperature)
    include_p, exclude_p = _as_patterns("include", include), _as_patterns("exclude", exclude)

    sel = _select(model, method, include_p, exclude_p, example_input, verify)
    selected, candidates, static, example, notes = sel.selected, sel.candidates, sel.static, sel.example, sel.notes
    probe = sel.probe
    rule = probe.positions_rule if probe is not None else None
    token_routed, batch_dims = _routing(sel, method)
    x = _single_tensor(example)
    if count_macs and example is not None and x is None:
        notes.append("MACs not counted: the counter takes one input tensor")

    params_before = num_params(model)
    converted_before = sum(num_params(candidates[n]) for n in selected)
    itemsize = max((p.element_size() for n in selected for p in candidates[n].parameters()), default=4)
    check_memory(converted_before * num_experts * itemsize,
                 f"num_experts={num_experts} on {len(selected)} converted layers",
                 "use fewer experts, or convert fewer layers with include / exclude")  # fmt: skip
    macs_before = None
    if count_macs and x is not None:
        macs_before = _try_macs(model, x, notes)
    previous = getattr(model, "parameterize_report", None)
    router_kwargs = dict(router=router, router_temperature=router_temperature, router_hidden=router_hidden)
    model = _convert(model, selected, method, num_experts, router_kwargs, init, noise, batch_dims, token_routed)
    lookup = dict(_walk(model))
    converted_after = sum(num_params(lookup[n] if n else model) for n in selected)
    macs_after = _try_macs(model, x, notes) if macs_before is not None else None
    if verify:
        _self_check(model, {n: lookup[n] if n else model for n in selected}, probe, init == "upcycle", notes)

    report = ParameterizeReport(
        method=method, num_experts=num_experts, init=init, router=router,
        router_temperature=float(router_temperature), router_hidden=router_hidden, include=include_p,
        exclude=exclude_p, converted=selected, static=dict(sorted(static.items())), rule=sel.rule,
        params_before=params_before, params_after=num_params(model), converted_params_before=converted_before,
        converted_params_after=converted_after, macs_before=macs_before, macs_after=macs_after,
        input_shape=list(example.shape) if example is not None and example.shape is not None else None,
        notes=notes, batch_dims=batch_dims, token_routed=token_routed,
        positions=None if rule is None else rule.describe(),
        history=[*previous.history, previous.recipe()] if isinstance(previous, ParameterizeReport) else [],
    )  # fmt: skip
    model.parameterize_report = report
    log.debug("%s", report)
    return model


def _check_arguments(
    model: Any, num_experts: int, method: str, init: str, router: str, noise: Any, router_temperature: float
) -> None:
    """Refuse (ParameterNetError, one sentence) what :func:`parameterize` cannot take, before it runs anything."""
    if not isinstance(model, nn.Module):
        raise ParameterNetError(f"parameterize() takes an nn.Module, got {type(model).__name__}.")
    check_num_experts(num_experts)
    _check_choice("method", method, METHODS)
    _check_choice("init", init, INITS)
    _check_choice("router", router, ROUTERS)
    if method == "repconv" and num_experts < 2:
        raise ParameterNetError(
            f"method='repconv' needs num_experts >= 2 (the conv plus num_experts - 1 branches), got {num_experts}."
        )
    if not (isinstance(noise, (int, float)) and noise >= 0 and math.isfinite(noise)):
        raise ParameterNetError(f"noise must be a finite number >= 0, got {noise!r}.")
    if router_temperature <= 0:
        raise ParameterNetError(f"router_temperature must be positive, got {router_temperature}.")


def _routing(sel: Any, method: str) -> tuple[list[str], dict[str, int]]:
    """``(token_routed, batch_dims)`` of the selected layers: with ``method="dynamic"`` in a model that keeps
    positions apart, its linears that route every position on its own (noted in ``sel.notes``); the probed batch
    dimension of each other layer whose batch is not the first dimension."""
    probe = sel.probe
    rule = probe.positions_rule if probe is not None else None
    token_routed = [n for n in sel.selected if rule is not None and sel.candidates[n].__class__ is not nn.Conv2d]
    if token_routed and method == "dynamic":
        sel.notes.append(
            f"the model keeps positions apart ({rule.describe()}): its linears route every position on its own, as "
            "top-1 mixtures of experts (TopKMoELinear); the router options do not apply to them"
        )
    else:
        token_routed = []
    dims = (probe.batch_dims or {}) if probe else {}
    batch_dims = {n: d for n in sel.selected if n not in token_routed and (d := dims.get(n))}
    return token_routed, batch_dims


def _single_tensor(example: Any) -> torch.Tensor | None:
    """The example's input when it is one tensor (what the MAC counter takes), else None."""
    if example is not None and len(example.args) == 1 and not example.kwargs:
        return example.args[0] if isinstance(example.args[0], torch.Tensor) else None
    return None


def _self_check(model: nn.Module, converted: dict[str, nn.Module], probe: Any, upcycled: bool, notes: list) -> None:
    """:func:`_verify` the ``converted`` layers on the probe's example; what could not be checked goes to ``notes``."""
    if probe is None:
        notes.append("not self-checked: no example input ran")
        return
    _verify(model, converted, probe, upcycled)
    if probe.pair is None:
        notes.append(
            "no input dimension keeps samples apart in the example: layers taken as batch-first, per-sample "
            "independence not checked"
        )


def _count_macs(model: nn.Module, x: torch.Tensor) -> int:
    with eval_mode(model):
        return _count_macs_of(model, x)


def _try_macs(model: nn.Module, x: torch.Tensor, notes: list[str]) -> int | None:
    try:
        return _count_macs(model, x)
    except Exception as e:  # counting is a courtesy: a model torchprofile cannot trace still converts
        notes.append(f"MACs not counted: torchprofile could not trace the model ({type(e).__name__})")
        log.debug("parameterize: MAC count failed: %s", e)
        return None
