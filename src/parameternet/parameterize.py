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
(layers changed, parameters and MACs before / after, the recipe). :func:`save` writes a converted model with its
recipe to safetensors and :func:`load` rebuilds it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from timm.layers import Conv2dSame
from timm.layers import Linear as TimmLinear
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.layers import ROUTERS, DynamicConv2d, DynamicLinear, RepConv2d, check_num_experts

__all__ = [
    "GATE_NAMES",
    "INITS",
    "METHODS",
    "ParameterizeReport",
    "load",
    "convert",
    "load_source_model",
    "parameterize",
    "read_recipe",
    "save",
    "timm_twin",
]

log = logging.getLogger(__name__)

METHODS = ("dynamic", "repconv")
INITS = ("upcycle", "random")
# Name components of squeeze-excite / gating modules; used only when no example input can be run.
GATE_NAMES = ("se", "ese", "se_layer", "se_module", "squeeze_excite", "attn_gate", "gate")
RECIPE_KEY = "parameternet"
RECIPE_FORMAT = 1

REASON_CLASSIFIER = "classifier"
REASON_ONE_POSITION = "one position per sample"
REASON_GATE_NAME = "squeeze-excite / gate name"
REASON_NOT_INCLUDED = "not included"
REASON_LINEAR_REPCONV = "repconv converts convolutions only"


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class ParameterizeReport:
    """What :func:`parameterize` did. ``static`` maps every convertible-looking layer left alone to the reason."""

    method: str
    num_experts: int
    init: str
    router: str
    router_temperature: float
    router_hidden: int | None
    include: list[str]
    exclude: list[str]
    converted: list[str]
    static: dict[str, str]
    rule: str
    params_before: int
    params_after: int
    converted_params_before: int
    converted_params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    input_shape: list[int] | None = None
    notes: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)  # recipes of earlier conversions of this model
    batch_dims: dict[str, int] = field(default_factory=dict)  # converted linears whose batch is not dimension 0

    def recipe(self) -> dict[str, Any]:
        """What :func:`load` needs to rebuild the architecture on the same base model."""
        return dict(
            method=self.method,
            num_experts=self.num_experts,
            router=self.router,
            router_temperature=self.router_temperature,
            router_hidden=self.router_hidden,
            include=self.include,
            exclude=self.exclude,
            modules=self.converted,
            batch_dims=self.batch_dims,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        kinds = "dynamic layers" if self.method == "dynamic" else "RepConv layers"
        lines = [
            f"parameterize: method={self.method}, experts={self.num_experts}, init={self.init}"
            + (f", router={self.router}" if self.method == "dynamic" else ""),
            f"converted {len(self.converted)} layers to {kinds}; static layers are chosen by {self.rule}",
        ]
        if self.static:
            reasons = Counter(_reason_kind(r) for r in self.static.values())
            lines.append(
                f"left static {len(self.static)}: " + "; ".join(f"{r}: {n}" for r, n in sorted(reasons.items()))
            )
        growth = self.converted_params_after / max(self.converted_params_before, 1)
        lines.append(
            f"params    {_fmt(self.params_before)} -> {_fmt(self.params_after)}"
            f"  (converted layers {_fmt(self.converted_params_before)} -> {_fmt(self.converted_params_after)},"
            f" x{growth:.2f})"
        )
        if self.macs_before is not None and self.macs_after is not None:
            shape = "x".join(str(s) for s in self.input_shape or ())
            lines.append(f"MACs      {_fmt(self.macs_before)} -> {_fmt(self.macs_after)}  (input {shape})")
        else:
            lines.append("MACs      not counted")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].split(" '", 1)[0]


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e9 else f"{n / 1e6:.3f}M"


# ---------------------------------------------------------------------------------------------------------------
# Walking the model


def _is_parameternet_layer(module: nn.Module) -> bool:
    """Our own layers are opaque: their routers and branches are never converted again."""
    return isinstance(module, (DynamicConv2d, DynamicLinear, RepConv2d)) or type(module).__module__.startswith(
        "parameternet.layers"
    )


def _walk(module: nn.Module, prefix: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` that does not enter parameternet layers; a shared module is named once."""
    seen = set() if seen is None else seen
    for name, child in module.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not _is_parameternet_layer(child):
            yield from _walk(child, full, seen)


def _references(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (parent, attribute) that holds each module, so a shared module is replaced everywhere."""
    refs: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                refs[id(child)].append((parent, attr))
    return refs


def _replace(refs: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    for parent, attr in refs[id(old)]:
        setattr(parent, attr, new)


def _matches(name: str, pattern: str) -> bool:
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _convertible(module: nn.Module, method: str) -> tuple[str | None, str | None]:
    """``(kind, None)`` for a layer we can convert, ``(None, reason)`` for one we must not, ``(None, None)``
    for a module that is no conv / linear at all."""
    t = type(module)
    if t is nn.Conv2d or (t is Conv2dSame and tuple(module.stride) == (1, 1)):
        return "conv", None
    if t is nn.Linear or t is TimmLinear:
        if method == "repconv":
            return None, REASON_LINEAR_REPCONV
        return "linear", None
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return None, f"unsupported: {t.__name__} has a forward of its own (padding, weight standardisation, ...)"
    return None, None


def _as_patterns(name: str, patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    patterns = list(patterns)
    if not all(isinstance(p, str) and p for p in patterns):
        raise ParameterNetError(f"{name} must be module-name patterns (non-empty strings), got {patterns!r}.")
    return patterns


# ---------------------------------------------------------------------------------------------------------------
# Example input and the position probe


def _param_ref(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)


def example_input_for(model: nn.Module, example_input: torch.Tensor | Sequence[int] | None) -> torch.Tensor | None:
    """The tensor to probe ``model`` with: ``example_input`` itself, a seeded random tensor of that shape, or one
    of timm's ``pretrained_cfg["input_size"]`` with batch 1; ``None`` when none is known."""
    device, dtype = _param_ref(model)
    if isinstance(example_input, torch.Tensor):
        return example_input.to(device)
    if example_input is not None:
        shape = tuple(example_input)
        if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ParameterNetError(
                f"example_input must be a tensor or a shape of positive ints (batch included), got {example_input!r}."
            )
    else:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = cfg.get("input_size")
        if not size:
            return None
        shape = (1, *size)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


class _EvalMode:
    """Eval mode for the duration of a block; every module's own train / eval flag is restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for m, training in self.modes.items():
            m.training = training


# Example inputs of any form: ``model(*args, **kwargs)``


@dataclass
class _Example:
    """What the model is called with: ``model(*args, **kwargs)``; tensors may sit in lists, tuples and dicts."""

    args: tuple
    kwargs: dict

    def __call__(self, model: nn.Module):
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return _leaves((self.args, self.kwargs))

    def map(self, fn) -> _Example:
        return _Example(_map(self.args, fn), _map(self.kwargs, fn))

    @property
    def shape(self) -> tuple[int, ...] | None:
        leaves = self.tensors()
        return tuple(leaves[0].shape) if leaves else None


def _leaves(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _leaves(item)]
    return []


def _map(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj) if type(obj) in (list, tuple) else obj
    return obj


def _is_shape(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) for s in value)


def _as_example(model: nn.Module, example_input: Any) -> _Example | None:
    """``example_input`` as a call: a tensor or a shape is the one positional argument (see
    :func:`example_input_for`), a tuple the positional arguments, a list one argument (torchvision's detection
    models take a list of images), a dict keyword arguments."""
    if example_input is None or isinstance(example_input, torch.Tensor) or _is_shape(example_input):
        x = example_input_for(model, example_input)
        return None if x is None else _Example((x,), {})
    device, _ = _param_ref(model)
    if isinstance(example_input, dict):
        if not all(isinstance(k, str) for k in example_input):
            raise ParameterNetError(f"an example_input dict holds keyword arguments; got keys {list(example_input)}.")
        example = _Example((), dict(example_input))
    elif isinstance(example_input, tuple):
        example = _Example(example_input, {})
    elif isinstance(example_input, list):
        example = _Example((example_input,), {})
    else:
        raise ParameterNetError(
            f"example_input must be a tensor, a shape, or a tuple / list / dict of tensors, got "
            f"{type(example_input).__name__}."
        )
    if not example.tensors():
        raise ParameterNetError("example_input holds no tensor; pass the tensors the model's forward takes.")
    return example.map(lambda t: t.to(device))


# ---------------------------------------------------------------------------------------------------------------
# Probing the dense model: positions, parents that bypass forward, the batch dimension of every layer

# Parents whose fused inference fast path reads their linears' weights instead of calling them, with the switch
# that turns the fast path off for that module alone (the function is unchanged: it is the slow path's).
FAST_PATH_SWITCHES: dict[type, Any] = {
    nn.TransformerEncoderLayer: lambda m: setattr(m, "activation_relu_or_gelu", 0),
}

REASON_BYPASSED = "bypassed"
REASON_TIED = "weight tied"
REASON_BATCH = "batch dimension"


@dataclass
class _Probe:
    positions: dict[str, int]  # input positions per sample, smallest over calls; layers that ran
    bypassed: set[str]  # ran with grad enabled but not under no_grad: a parent reads their weights itself
    batch_dims: dict[str, int | None] | None = None  # each layer's batch dimension (None: not found)
    model_batch_dim: int | None = None
    pair: tuple[_Example, _Example, _Example] | None = None  # one sample, another, both (along model_batch_dim)
    outputs: Any = None  # the dense model's output on the first sample (eval, no_grad), else on the example
    example: _Example | None = None


def _record_shapes(layers: dict[str, nn.Module]):
    seen: dict[str, list[tuple[int, ...]]] = defaultdict(list)

    def hook(name):
        def record(module, args):
            if args and isinstance(args[0], torch.Tensor):
                seen[name].append(tuple(args[0].shape))

        return record

    return seen, [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]


def _run(model: nn.Module, layers: dict[str, nn.Module], example: _Example, grad: bool = False):
    """``(output, input shapes of each layer per call)`` in eval mode, under no_grad unless ``grad``: then the
    inputs require grad, which turns off every fused fast path that checks for autograd."""
    seen, handles = _record_shapes(layers)
    try:
        with _EvalMode(model), torch.set_grad_enabled(grad):
            if grad:
                example = example.map(lambda t: t.detach().requires_grad_() if t.is_floating_point() else t)
            out = example(model)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _positions_of(module: nn.Module, shape: tuple[int, ...], batch_dim: int = 0) -> int:
    if isinstance(module, nn.Conv2d):
        return math.prod(shape[2:])
    return math.prod(shape[:-1]) // max(1, shape[batch_dim] if batch_dim < len(shape) - 1 else 1)


def _probe(model: nn.Module, layers: dict[str, nn.Module], example: _Example, find_batch: bool) -> _Probe:
    out, seen = _run(model, layers, example)
    _, seen_grad = _run(model, layers, example, grad=True)
    bypassed = {n for n in seen_grad if n not in seen}
    shapes = {n: seen.get(n) or seen_grad[n] for n in seen_grad}
    probe = _Probe({}, bypassed, outputs=out, example=example)
    if find_batch:
        _find_batch_dims(model, layers, example, probe, shapes)
    dims = probe.batch_dims or {}
    for n, calls in shapes.items():
        probe.positions[n] = min(_positions_of(layers[n], c, dims.get(n) or 0) for c in calls)
    return probe


def _other_sample(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t.clone()
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(t.shape, generator=generator).to(device=t.device, dtype=t.dtype)
    return noise * t.std().clamp_min(1e-3) + t.mean() if t.numel() > 1 else noise


def _batched(both: Any, first: Any, second: Any, scale: float | None = None) -> bool:
    """Whether every tensor of ``both`` is the concatenation of ``first``'s and ``second``'s along some dim."""
    lb, l1, l2 = _leaves(both), _leaves(first), _leaves(second)
    if not lb or len(lb) != len(l1) or len(lb) != len(l2):
        return False
    for b, f, s in zip(lb, l1, l2):
        if b.dim() != f.dim() or f.shape != s.shape or not b.is_floating_point():
            if not (b.shape == f.shape and torch.equal(b, f)):
                return False
            continue
        tol = 1e-4 * max(float(b.abs().max()) if b.numel() else 0.0, 1e-3 if scale is None else scale)
        ok = False
        for e in range(b.dim()):
            if b.shape[e] == f.shape[e] + s.shape[e] and all(
                b.shape[i] == f.shape[i] for i in range(b.dim()) if i != e
            ):
                if (torch.cat([f, s], e).float() - b.float()).abs().max() <= tol:
                    ok = True
                    break
        if not ok:
            return False
    return True


def _find_batch_dims(
    model: nn.Module, layers: dict[str, nn.Module], example: _Example, probe: _Probe, shapes: dict
) -> None:
    """The input dimension along which the dense model treats samples independently (the first of 0, 1, ...), and
    each layer's batch dimension: the one its input grows along when the model's batch does."""
    leaves = [t for t in example.tensors() if t.dim() > 0]
    if not leaves:
        return
    for d in range(min(t.dim() for t in leaves)):
        n = leaves[0].shape[d]
        if any(t.shape[d] != n for t in leaves):
            continue
        first = example.map(functools.partial(_sample, d=d, i=0))
        second = example.map(functools.partial(_sample, d=d, i=1))
        both = _cat_examples(first, second, d)
        try:
            o1, s1 = _run(model, layers, first)
            o2, _ = _run(model, layers, second)
            ob, sb = _run(model, layers, both)
        except Exception:  # a dimension the model cannot take another size of is no batch dimension
            continue
        if not _batched(ob, o1, o2):
            continue
        probe.model_batch_dim, probe.pair, probe.outputs = d, (first, second, both), o1
        probe.batch_dims = {n: _grown_dim(s1.get(n), sb.get(n)) for n in shapes}
        return


def _sample(t: torch.Tensor, d: int, i: int) -> torch.Tensor:
    """Sample ``i`` (0 or 1) along ``d``; a second sample that the example lacks is made up like the first."""
    if t.dim() <= d:
        return t
    if i < t.shape[d]:
        return t.narrow(d, i, 1)
    return _other_sample(t.narrow(d, 0, 1))


def _cat_examples(first: _Example, second: _Example, d: int) -> _Example:
    it = iter(second.tensors())
    return first.map(lambda t: torch.cat([t, next(it)], d) if t.dim() > d else (next(it), t)[1])


def _grown_dim(one: list | None, two: list | None) -> int | None:
    """The one dimension in which every call's input doubled from one sample to two, else None."""
    if not one or not two or len(one) != len(two):
        return None
    found = set()
    for a, b in zip(one, two):
        if len(a) != len(b):
            return None
        grown = [e for e in range(len(a)) if a[e] != b[e]]
        if len(grown) != 1 or b[grown[0]] != 2 * a[grown[0]]:
            return None
        found.add(grown[0])
    return found.pop() if len(found) == 1 else None


def _tied(model: nn.Module) -> set[int]:
    """ids of the modules one of whose parameters another module also holds (weight tying)."""
    holders: dict[int, set[int]] = defaultdict(set)
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)].add(id(m))
    return {m for ms in holders.values() if len(ms) > 1 for m in ms}


def _classifier_names(model: nn.Module, names: dict[int, str]) -> set[str]:
    out: set[str] = set()
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    clf = cfg.get("classifier")
    for name in [clf] if isinstance(clf, str) else list(clf or ()):
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        out.add(name)
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            heads = get()
        except Exception:  # a model's own helper may assume things about its state; the cfg name is enough
            heads = None
        for head in heads if isinstance(heads, (tuple, list)) else [heads]:
            if isinstance(head, nn.Module) and id(head) in names:
                out.add(names[id(head)])
    return out


def _count_macs(model: nn.Module, x: torch.Tensor) -> int:
    from parameternet.profile.counting import count_macs  # profile reads models; imported only when counting

    with _EvalMode(model):
        return count_macs(model, x)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Building the new layers


def _new_layer(dense: nn.Module, kind: str, method: str, num_experts: int, router_kwargs: dict[str, Any]) -> nn.Module:
    dd = dict(device=dense.weight.device, dtype=dense.weight.dtype)
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
) -> nn.Module:
    """Replace the modules called ``names`` (all convertible) and return the model (a new one when the model
    itself is the layer to convert). A parent with a fused fast path (:data:`FAST_PATH_SWITCHES`) gets it off."""
    refs = _references(model)
    lookup = dict(_walk(model))
    for name in names:
        dense = model if name == "" else lookup.get(name)
        kind, reason = _convertible(dense, method) if dense is not None else (None, "no such module")
        if kind is None:
            raise ParameterNetError(f"cannot convert module {name!r}: {reason}.")
        layer = _new_layer(dense, kind, method, num_experts, router_kwargs)
        if (batch_dims or {}).get(name):
            layer.batch_dim = batch_dims[name]
        if init == "upcycle":
            _upcycle_(layer, dense, noise)
        if name == "":
            return layer
        for parent, _ in refs[id(dense)]:
            switch = FAST_PATH_SWITCHES.get(type(parent))
            if switch is not None:
                switch(parent)
        _replace(refs, dense, layer)
    return model


# ---------------------------------------------------------------------------------------------------------------
# parameterize()


def _parent(model: nn.Module, name: str, names: dict[int, str]) -> tuple[str, nn.Module]:
    parent = name.rpartition(".")[0]
    return parent, model.get_submodule(parent)


def _unsafe(
    model: nn.Module,
    selected: list[str],
    candidates: dict[str, nn.Module],
    static: dict[str, str],
    probe: _Probe,
    names: dict[int, str],
) -> None:
    """Leave static, with the reason, the selected layers a dynamic layer cannot replace exactly: those whose parent
    reads their weight instead of calling them (unless the parent's fast path can be turned off), whose weight
    another module holds too, and those whose input has no batch dimension the probe could find (a conv needs it
    first; a linear takes it anywhere, as ``DynamicLinear(batch_dim=...)``)."""
    tied = _tied(model)
    for n in list(selected):
        layer = candidates[n]
        reason = None
        if n in probe.bypassed and n:
            pname, parent = _parent(model, n, names)
            if type(parent) not in FAST_PATH_SWITCHES:
                reason = (
                    f"{REASON_BYPASSED}: its parent {type(parent).__name__} '{pname}' reads its weight instead of "
                    "calling it under no_grad (a fused fast path)"
                )
        elif id(layer) in tied:
            reason = f"{REASON_TIED}: another module holds the same weight tensor"
        elif probe.batch_dims is not None and n in probe.batch_dims:
            dim = probe.batch_dims[n]
            if dim is None:
                reason = f"{REASON_BATCH}: its input did not grow along one dimension with the model's batch"
            elif dim != 0 and isinstance(layer, nn.Conv2d):
                reason = f"{REASON_BATCH}: the batch is dimension {dim} of its input, a conv needs it first"
        if reason is not None:
            selected.remove(n)
            static[n] = reason


@dataclass
class _Selection:
    selected: list[str]
    candidates: dict[str, nn.Module]
    static: dict[str, str]
    rule: str
    example: _Example | None
    notes: list[str]
    probe: _Probe | None = None


def _select(
    model: nn.Module,
    method: str,
    include_p: list[str],
    exclude_p: list[str],
    example_input: Any,
    verify: bool = True,
) -> _Selection:
    """Which layers :func:`parameterize` converts, and why each other conv / linear stays static."""
    modules = [("", model), *_walk(model)] if not _is_parameternet_layer(model) else [("", model)]
    names = {id(m): n for n, m in modules}
    candidates: dict[str, nn.Module] = {}
    static: dict[str, str] = {}
    for name, module in modules:
        kind, reason = _convertible(module, method)
        if kind is not None:
            candidates[name] = module
        elif reason is not None:
            static[name] = reason
    module_names = [n for n, _ in modules if n]

    for p in exclude_p:
        if not any(_matches(n, p) for n in module_names):
            raise ParameterNetError(f"exclude pattern {p!r} matches no module of {type(model).__name__}.")
    for p in include_p:
        if not any(n and _matches(n, p) for n in candidates):
            raise ParameterNetError(
                f"include pattern {p!r} matches no convertible layer (nn.Conv2d / nn.Linear) of "
                f"{type(model).__name__}; module names look like {module_names[:3]}."
            )

    notes: list[str] = []
    example = _as_example(model, example_input)
    probe: _Probe | None = None
    if example is not None:
        try:
            probe = _probe(model, candidates, example, find_batch=verify)
        except Exception as e:  # any failure of the user's forward only means the names rule applies
            shape = example.shape
            if example_input is not None:
                raise ParameterNetError(
                    f"the model does not run on example_input of shape {shape}: {_first_line(e)}"
                ) from e
            notes.append(f"the model did not run on a {shape} input ({type(e).__name__}); MACs not counted")
            log.debug("parameterize: probe at %s failed (%s); using module names", shape, e)
            example = None
    positions = None if probe is None or include_p else probe.positions

    if include_p:
        rule = "the include patterns"
        selected = [n for n in candidates if n and any(_matches(n, p) for p in include_p)]
        static.update({n: REASON_NOT_INCLUDED for n in candidates if n not in selected})
    else:
        classifier = _classifier_names(model, names)
        rule = "classifier + one-position probe" if positions is not None else "classifier + gate names"
        if positions is not None:
            rule += f" at input {'x'.join(map(str, example.shape or ()))}"
        selected = []
        for n in candidates:
            if any(_matches(n, c) for c in classifier):
                static[n] = REASON_CLASSIFIER
            elif positions is not None and positions.get(n, 2) <= 1:
                static[n] = REASON_ONE_POSITION
            elif positions is None and any(part in GATE_NAMES for part in n.split(".")):
                static[n] = REASON_GATE_NAME
            else:
                selected.append(n)
    for n in list(selected):
        hit = next((p for p in exclude_p if _matches(n, p)), None)
        if hit is not None:
            selected.remove(n)
            static[n] = f"excluded by pattern '{hit}'"
    if probe is not None:
        _unsafe(model, selected, candidates, static, probe, names)

    if selected:
        return _Selection(selected, candidates, static, rule, example, notes, probe)
    what = "nn.Conv2d" if method == "repconv" else "nn.Conv2d or nn.Linear"
    if not candidates:
        raise ParameterNetError(f"nothing to convert: {type(model).__name__} has no plain {what} layer.")
    raise ParameterNetError(
        f"nothing to convert: all {len(candidates)} {what} layers of {type(model).__name__} stay static "
        f"({', '.join(sorted({_reason_kind(static[n]) for n in candidates}))}); choose layers with include=[...]."
    )


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
        router, router_temperature, router_hidden: the dynamic layers' router (see ``DynamicConv2d``).
        include, exclude: ``fnmatch`` patterns over module names (a parent's name covers its children);
            ``include`` replaces the default choice of layers. A pattern that matches nothing is an error.
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
    include_p, exclude_p = _as_patterns("include", include), _as_patterns("exclude", exclude)

    sel = _select(model, method, include_p, exclude_p, example_input, verify)
    selected, candidates, static, example, notes = sel.selected, sel.candidates, sel.static, sel.example, sel.notes
    probe = sel.probe
    batch_dims = {n: d for n in selected if (d := ((probe.batch_dims or {}) if probe else {}).get(n))}
    x = None
    if example is not None and len(example.args) == 1 and not example.kwargs:
        x = example.args[0] if isinstance(example.args[0], torch.Tensor) else None
    if count_macs and example is not None and x is None:
        notes.append("MACs not counted: the counter takes one input tensor")

    params_before = _num_params(model)
    converted_before = sum(_num_params(candidates[n]) for n in selected)
    macs_before = None
    if count_macs and x is not None:
        macs_before = _try_macs(model, x, notes)
    previous = getattr(model, "parameterize_report", None)
    router_kwargs = dict(router=router, router_temperature=router_temperature, router_hidden=router_hidden)
    model = _convert(model, selected, method, num_experts, router_kwargs, init, noise, batch_dims)
    lookup = dict(_walk(model))
    converted_after = sum(_num_params(lookup[n] if n else model) for n in selected)
    macs_after = _try_macs(model, x, notes) if macs_before is not None else None
    if verify and probe is not None:
        _verify(model, {n: lookup[n] if n else model for n in selected}, probe, init == "upcycle")
        if probe.pair is None:
            notes.append(
                "no input dimension keeps samples apart in the example: layers taken as batch-first, per-sample "
                "independence not checked"
            )
    elif verify:
        notes.append("not self-checked: no example input ran")

    report = ParameterizeReport(
        method=method,
        num_experts=num_experts,
        init=init,
        router=router,
        router_temperature=float(router_temperature),
        router_hidden=router_hidden,
        include=include_p,
        exclude=exclude_p,
        converted=selected,
        static=dict(sorted(static.items())),
        rule=sel.rule,
        params_before=params_before,
        params_after=_num_params(model),
        converted_params_before=converted_before,
        converted_params_after=converted_after,
        macs_before=macs_before,
        macs_after=macs_after,
        input_shape=list(example.shape) if example is not None and example.shape is not None else None,
        notes=notes,
        batch_dims=batch_dims,
        history=[*previous.history, previous.recipe()] if isinstance(previous, ParameterizeReport) else [],
    )
    model.parameterize_report = report
    log.debug("%s", report)
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
    routers = [m.router for m in converted.values() if isinstance(m, (DynamicConv2d, DynamicLinear))]
    if not routers or probe.pair is None:  # no batch dimension found: nothing to split
        return
    saved = {id(p): p.detach().clone() for r in routers for p in r.parameters()}
    generator = torch.Generator().manual_seed(2)
    try:
        with torch.no_grad():
            for r in routers:
                for p in r.parameters():
                    p.add_(torch.randn(p.shape, generator=generator).to(p) * 2.0 / math.sqrt(max(1, p.shape[-1])))
        outs = [_run(model, converted, ex)[0] for ex in probe.pair]
    finally:
        with torch.no_grad():
            for r in routers:
                for p in r.parameters():
                    p.copy_(saved[id(p)])
    if not _batched(outs[2], outs[0], outs[1]):
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


def _try_macs(model: nn.Module, x: torch.Tensor, notes: list[str]) -> int | None:
    try:
        return _count_macs(model, x)
    except Exception as e:  # counting is a courtesy: a model torchprofile cannot trace still converts
        notes.append(f"MACs not counted: torchprofile could not trace the model ({type(e).__name__})")
        log.debug("parameterize: MAC count failed: %s", e)
        return None


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading converted models


def _model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg.get("architecture")


def save(
    model: nn.Module,
    path: str | Path,
    *,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and the recipe to rebuild it (timm name, build arguments, conversion) to a
    ``.safetensors`` file that :func:`load` reads back.

    ``model_name`` defaults to timm's ``pretrained_cfg["architecture"]``. The model's ``num_classes`` and
    ``in_chans`` are recorded; pass any other argument it was built with in ``model_kwargs``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ParameterNetError(f"the output must be a .safetensors file, got {str(path)!r}.")
    if hasattr(model, "deploy_report"):
        raise ParameterNetError("cannot save a deployed model; save it before deploy() and deploy after load().")
    name = model_name or _model_name(model)
    if not name:
        raise ParameterNetError(
            f"cannot tell which timm model {type(model).__name__} is; pass model_name= (a timm model name)."
        )
    kwargs = {k: getattr(model, k) for k in ("num_classes", "in_chans") if isinstance(getattr(model, k, None), int)}
    kwargs.update(model_kwargs or {})
    report = getattr(model, "parameterize_report", None)
    steps = [*report.history, report.recipe()] if isinstance(report, ParameterizeReport) else []
    recipe = dict(format=RECIPE_FORMAT, model=name, model_kwargs=kwargs, parameterize=steps)
    try:
        meta = json.dumps(recipe)
    except TypeError as e:
        raise ParameterNetError(f"model_kwargs must be JSON values, got {kwargs!r}.") from e
    from parameternet.train.checkpoint import save_weights

    # the one checkpoint schema (see parameternet.train.checkpoint.read_metadata) plus the recipe under its old key;
    # written atomically, and the file stays a plain state dict for timm
    info = {k: kwargs[k] for k in ("num_classes", "in_chans") if k in kwargs}
    metadata = {"kind": "convert", "model": name, "model_kwargs": kwargs, "parameterize": steps, **info}
    save_weights(path, model.state_dict(), {**metadata, RECIPE_KEY: meta})
    return path


def read_recipe(path: str | Path) -> dict[str, Any] | None:
    """The recipe :func:`save` stored in a safetensors file, or ``None`` for a file without one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[RECIPE_KEY]) if RECIPE_KEY in meta else None


def build_from_recipe(recipe: dict[str, Any]) -> nn.Module:
    """The architecture a recipe describes, with fresh weights."""
    from parameternet.models import create_model  # also registers the paper's models in timm

    model = create_model(recipe["model"], pretrained=False, **recipe.get("model_kwargs", {}))
    steps = recipe.get("parameterize") or []
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
        )
        n = _num_params(model)
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
            **router_kwargs,
        )
    return model


def load(path: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`save`, ``parameternet convert`` or ``parameternet train`` and load its
    weights; raises ParameterNetError for a missing file or one that does not name its model."""
    from safetensors.torch import load_file

    from parameternet.train.checkpoint import read_metadata

    path = Path(path)
    if not path.is_file():
        raise ParameterNetError(f"no such file: {str(path)!r}.")
    info = read_metadata(path)
    recipe = info.get(RECIPE_KEY)
    if isinstance(recipe, dict) and recipe.get("format") != RECIPE_FORMAT:
        raise ParameterNetError(f"{str(path)!r} has recipe format {recipe.get('format')!r}; expected {RECIPE_FORMAT}.")
    if not info["model"]:
        raise ParameterNetError(
            f"{str(path)!r} does not name its model; load a file written by parameternet (save, convert or train), "
            f"or build the model and load_state_dict() it."
        )
    model = build_from_recipe(info)
    _load_state(model, load_file(str(path)), str(path))
    return model


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ParameterNetError(f"the weights in {source!r} do not fit the model: {detail}") from e


# ---------------------------------------------------------------------------------------------------------------
# What `parameternet convert` starts from: a timm name or a local checkpoint

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "module")
_ARCH_KEYS = ("arch", "model_name", "architecture", "model")


def _find_state_and_arch(obj: Any) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    if not isinstance(obj, dict):
        return None, None
    arch = next((obj[k] for k in _ARCH_KEYS if isinstance(obj.get(k), str)), None)
    args = obj.get("args")
    if arch is None and args is not None:
        arch = getattr(args, "model", None) or (args.get("model") if isinstance(args, dict) else None)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, arch
    for key in _STATE_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner, arch
    return None, arch


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _check_arch(source: str, asked: str | None, recorded: str | None) -> None:
    """A checkpoint that records its model is never loaded into another one."""
    if asked and recorded and asked.split(".", 1)[0] != recorded.split(".", 1)[0]:
        raise ParameterNetError(
            f"checkpoint {source!r} holds a {recorded!r} but {asked!r} was asked for; drop the model name (the "
            f"checkpoint's is used) or pass a checkpoint of {asked!r}."
        )


def load_source_model(
    source: str, *, arch: str | None = None, pretrained: bool = False
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The model ``parameternet convert`` starts from, the timm name and the arguments it was built with.

    ``source`` is a timm model name (built with ``pretrained``) or a local checkpoint: a file written by
    :func:`save`, a ``.safetensors`` state dict, or a ``torch.save`` file holding a state dict (plain or under
    ``state_dict`` / ``model`` / ...). A checkpoint names its architecture under ``arch`` / ``model_name``
    (timm's train script does) or takes it from ``arch``; a checkpoint that names another model than ``arch``
    raises ParameterNetError.
    """
    from timm.models import get_pretrained_cfg_value

    from parameternet.models import check_model_name, create_model

    path = Path(source)
    if not path.is_file():
        if path.suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar") or "/" in source:
            raise ParameterNetError(f"no such checkpoint file: {source!r}.")
        check_model_name(source)
        return create_model(source, pretrained=pretrained), source.split(".", 1)[0], {}

    kwargs: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = {k: _json_or_str(v) for k, v in (f.metadata() or {}).items()}
            state = load_file(str(path))
        except Exception as e:
            raise ParameterNetError(f"{source!r} is not a readable safetensors file ({e}).") from e
        if RECIPE_KEY in meta:
            recipe = meta[RECIPE_KEY]
            _check_arch(source, arch, recipe["model"])
            return load(path), recipe["model"], dict(recipe.get("model_kwargs", {}))
        # parameternet's training checkpoints name the model and its build arguments in the metadata.
        found_arch = next((meta[k] for k in _ARCH_KEYS if isinstance(meta.get(k), str)), None)
        _check_arch(source, arch, found_arch)
        if isinstance(meta.get("model_kwargs"), dict):
            kwargs.update(meta["model_kwargs"])
        kwargs.update({k: meta[k] for k in ("num_classes", "in_chans") if isinstance(meta.get(k), int)})
    else:
        import argparse

        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:120]
            raise ParameterNetError(
                f"{source!r} is not a model checkpoint that torch.load can read safely ({type(e).__name__}: {first})."
            ) from e
        state, found_arch = _find_state_and_arch(obj)
        if state is None:
            raise ParameterNetError(f"{source!r} is not a model checkpoint: it holds no state dict of tensors.")
    name = arch or found_arch
    if not name:
        raise ParameterNetError(f"checkpoint {source!r} does not name its architecture; pass --arch TIMM_NAME.")
    check_model_name(name)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    clf = get_pretrained_cfg_value(name, "classifier")
    clf_weight = state.get(f"{clf}.weight") if isinstance(clf, str) else None
    if clf_weight is not None and "num_classes" not in kwargs:
        kwargs["num_classes"] = clf_weight.shape[0]
    try:
        model = create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ParameterNetError(f"model {name!r} rejects the checkpoint's build arguments {kwargs} ({e}).") from e
    _load_state(model, state, source)
    return model, name.split(".", 1)[0], kwargs


# ---------------------------------------------------------------------------------------------------------------
# `parameternet convert`


def timm_twin(model: nn.Module, model_name: str, model_kwargs: dict[str, Any] | None = None) -> str | None:
    """The registered ParameterNet whose weights have exactly ``model``'s names and shapes, if the conversion of
    ``model_name`` produced one (``ghostnet_300m`` -> ``parameternet_300m``), so timm can load the saved file."""
    import timm

    report = getattr(model, "parameterize_report", None)
    if not isinstance(report, ParameterizeReport) or report.method != "dynamic" or report.history:
        return None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    kwargs = dict(model_kwargs or {}, num_experts=report.num_experts, router=report.router)
    kwargs.update(router_temperature=report.router_temperature, router_hidden=report.router_hidden)
    for twin in dict.fromkeys([model_name.replace("ghostnet", "parameternet", 1), f"parameternet_{model_name}"]):
        if twin == model_name or not timm.is_model(twin):
            continue
        try:
            candidate = timm.create_model(twin, pretrained=False, **kwargs)
        except (TypeError, ValueError):
            continue
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return twin
    return None


def convert(
    source: str,
    num_experts: int,
    output: str | Path,
    *,
    method: str = "dynamic",
    init: str = "upcycle",
    router: str = "linear-sigmoid",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    arch: str | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
) -> tuple[nn.Module, str | None]:
    """Build ``source`` (a timm name or checkpoint), :func:`parameterize` it and :func:`save` it to ``output``.

    Returns the converted model (its report in ``parameterize_report``) and, when a registered timm model has
    exactly its layout, the ``timm.create_model(...)`` call that loads ``output`` through ``pretrained_cfg_overlay``.
    """
    if Path(output).suffix != ".safetensors":
        raise ParameterNetError(f"the output must be a .safetensors file, got {str(output)!r}.")
    check_num_experts(num_experts)
    model, name, kwargs = load_source_model(source, arch=arch, pretrained=pretrained)
    example = None
    if img_size is not None:
        if img_size < 1:
            raise ParameterNetError(f"img_size must be a positive integer, got {img_size}.")
        example = (1, int(getattr(model, "in_chans", 3)), img_size, img_size)
    model = parameterize(
        model,
        num_experts,
        method=method,
        init=init,
        router=router,
        include=include,
        exclude=exclude,
        example_input=example,
    )
    save(model, output, model_name=name, model_kwargs=kwargs)
    twin = timm_twin(model, name, kwargs)
    if twin is None:
        return model, None
    from timm.models import get_pretrained_cfg_value

    args = [repr(twin), "pretrained=True"]
    overlay = f"file={str(output)!r}"
    if model.parameterize_report.num_experts != 4:
        args.append(f"num_experts={model.parameterize_report.num_experts}")
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and num_classes != get_pretrained_cfg_value(twin, "num_classes"):
        args.append(f"num_classes={num_classes}")
        overlay += f", num_classes={num_classes}"  # else timm drops a head whose size differs from the cfg's
    return model, f"timm.create_model({', '.join(args)}, pretrained_cfg_overlay=dict({overlay}))"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
