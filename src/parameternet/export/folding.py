"""deploy(): the inference graph of a ParameterNet, a RepConv model or any conv net (ParameterNet, arXiv
2306.14525, sec. 3.2 and Table 6).

Three rewrites, each exact in eval mode:

- every :class:`~parameternet.layers.RepConv2d` becomes the one ``nn.Conv2d`` its branches sum to;
- a BatchNorm that directly follows a conv is folded into it. Its eval-mode map ``s * y + t`` (``s = gamma /
  sqrt(var + eps)``, ``t = beta - s * mu``) is per output channel, so it commutes with the mixing of a dynamic
  conv: every expert kernel and expert bias is scaled by ``s``. The shift ``t`` must be added once, not mixed: the
  sigmoid router's coefficients do not sum to one. It goes into the layer's ``static_bias``, added after mixing;
- for a plain conv the scale goes into its kernel and the shift into its bias, as usual.

"Directly follows" means the BatchNorm's input is the conv's output and nothing else reads that output. With an
example input (``example_input``, else timm's ``pretrained_cfg["input_size"]``) deploy runs the model once and
follows the autograd graph of that run, which handles any Python in ``forward``; it then checks that the deployed
model gives the same output on that input. Without one it traces the model with ``torch.fx`` (conv, norm and
parameternet layers as leaves), which needs a traceable ``forward``.

With ``fold_bn=False`` BatchNorms stay, and RepConv layers return to exactly the dense model's architecture: a
merged branch shift goes into the following BatchNorm's running mean rather than into a new conv bias.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import timm.layers._fx as timm_fx
import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from parameternet.errors import ParameterNetError
from parameternet.layers import DynamicConv2d, RepConv2d, is_parameternet_layer
from parameternet.toolkit import eval_mode, example_input_for, first_line, num_params, references, replace, walk

__all__ = ["DeployReport", "deploy"]

log = logging.getLogger(__name__)

CONVS = (nn.Conv2d, Conv2dSame, DynamicConv2d, RepConv2d)  # exact types: a subclass may transform its weight
NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, BatchNormAct2d)


@dataclass
class DeployReport:
    """What :func:`deploy` did; ``kept`` names each BatchNorm left in place and why."""

    merged: list[str]
    folded: list[tuple[str, str]]
    kept: dict[str, str]
    found_by: str
    params_before: int
    params_after: int
    max_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"deploy: merged {len(self.merged)} RepConv layers, folded {len(self.folded)} BatchNorms into convs "
            f"(pairs found by {self.found_by}), kept {len(self.kept)} BatchNorms",
            f"params    {self.params_before / 1e6:.3f}M -> {self.params_after / 1e6:.3f}M",
        ]
        if self.max_rel_error is not None:
            lines.append(f"checked   max relative output change {self.max_rel_error:.1e} on the example input")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _is_conv(m: nn.Module) -> bool:
    return type(m) in CONVS


def _is_norm(m: nn.Module) -> bool:
    return type(m) in NORMS


# ---------------------------------------------------------------------------------------------------------------
# Which BatchNorm follows which conv


def _pairs_by_run(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, str]], Any]:
    """Run ``model(x)`` with autograd on and pair a conv with a norm when the norm's input is the conv's output
    tensor and no other operation of the graph reads it. Returns the pairs and the (eval-mode) output."""
    modules = dict(walk(model, opaque=is_parameternet_layer))
    convs = {n: m for n, m in modules.items() if _is_conv(m)}
    norms = {n: m for n, m in modules.items() if _is_norm(m)}
    calls: Counter[str] = Counter()
    produced: dict[str, Any] = {}
    consumed: dict[str, Any] = {}

    def after_conv(name):
        def hook(module, args, out):
            calls[name] += 1
            produced[name] = out.grad_fn if isinstance(out, torch.Tensor) else None

        return hook

    def before_norm(name):
        def hook(module, args):
            calls[name] += 1
            consumed[name] = args[0].grad_fn if args and isinstance(args[0], torch.Tensor) else None

        return hook

    handles = [m.register_forward_hook(after_conv(n)) for n, m in convs.items()]
    handles += [m.register_forward_pre_hook(before_norm(n)) for n, m in norms.items()]
    try:
        with eval_mode(model), torch.enable_grad():
            out = model(x.detach().clone().requires_grad_(x.is_floating_point()))
    finally:
        for h in handles:
            h.remove()

    # How many graph edges (and outputs) read each autograd node.
    readers: Counter[Any] = Counter()
    roots = [t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    readers.update(roots)
    stack, seen = list(roots), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                readers[nxt] += 1
                stack.append(nxt)

    by_node = {fn: n for n, fn in produced.items() if fn is not None and calls[n] == 1}
    pairs = []
    for norm_name, fn in consumed.items():
        conv_name = by_node.get(fn)
        if conv_name is not None and calls[norm_name] == 1 and readers[fn] == 1:
            pairs.append((conv_name, norm_name))
    return pairs, _detached(out)


def _detached(out: Any) -> list[torch.Tensor]:
    return [t.detach() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


class _Tracer(fx.Tracer):
    """torch.fx with convs, norms, parameternet layers and timm's untraceable modules kept whole."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
        self._leaves = tuple(timm_fx.get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            _is_conv(m)
            or isinstance(m, nn.modules.batchnorm._BatchNorm)
            or is_parameternet_layer(m)
            or isinstance(m, self._leaves)
            or super().is_leaf_module(m, qualname)
        )


def _pairs_by_fx(model: nn.Module) -> list[tuple[str, str]]:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise ParameterNetError(
            f"deploy() could not trace {type(model).__name__} with torch.fx ({type(e).__name__}); "
            "pass example_input= (a tensor or shape) so it can follow one forward pass instead."
        ) from e
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_norm(model.get_submodule(node.target)):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and _is_conv(model.get_submodule(src.target))
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# The rewrites


def _norm_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``norm(y) == s * y + t`` per channel in eval mode, in float64."""
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -scale * norm.running_mean.double()
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    return scale, shift


@torch.no_grad()
def _fold(conv: nn.Module, norm: nn.Module) -> None:
    scale, shift = _norm_affine(norm)
    if isinstance(conv, DynamicConv2d):
        conv.weight.copy_(conv.weight.double() * scale.view(1, -1, 1, 1, 1))
        if conv.bias is not None:
            conv.bias.copy_(conv.bias.double() * scale)
        static = shift if conv.static_bias is None else shift + scale * conv.static_bias.double()
        conv.static_bias = nn.Parameter(static.to(conv.weight))
        return
    conv.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
    bias = shift if conv.bias is None else shift + scale * conv.bias.double()
    conv.bias = nn.Parameter(bias.to(conv.weight))


def _without_norm(norm: nn.Module) -> nn.Module:
    """What is left of a folded norm: nothing, or timm's activation after it (its dropout is off in eval)."""
    if isinstance(norm, BatchNormAct2d):
        return norm.act
    return nn.Identity()


def _foldable(conv: nn.Module, norm: nn.Module) -> str | None:
    """Why this pair cannot be folded, or None."""
    if norm.running_mean is None or norm.running_var is None:
        return "BatchNorm without running statistics (track_running_stats=False)"
    if norm.num_features != conv.out_channels:
        return f"BatchNorm has {norm.num_features} channels, the conv {conv.out_channels}"
    return None


def deploy(
    model: nn.Module,
    *,
    fold_bn: bool = True,
    example_input: torch.Tensor | tuple[int, ...] | None = None,
    inplace: bool = False,
    verify: bool = True,
) -> nn.Module:
    """The inference graph of ``model``, in eval mode, computing what ``model`` computes in eval mode.

    Merges every RepConv layer and (``fold_bn``) folds each BatchNorm that directly follows a conv, dynamic or
    not, into it. Returns a copy unless ``inplace``; ``result.deploy_report`` is a :class:`DeployReport`. With an
    example input (given, or timm's ``pretrained_cfg["input_size"]``) the result is checked against the original
    on it (``verify``). The deployed graph is for inference: in training mode it no longer normalises.
    """
    if not isinstance(model, nn.Module):
        raise ParameterNetError(f"deploy() takes an nn.Module, got {type(model).__name__}.")
    if not inplace:
        model = copy.deepcopy(model)
    params_before = num_params(model)
    x = example_input_for(model, example_input)
    notes: list[str] = []
    reference = None
    if x is not None:
        try:
            pairs, reference = _pairs_by_run(model, x)
            found_by = f"one forward pass at {'x'.join(map(str, x.shape))}"
        except Exception as e:
            if example_input is not None:
                raise ParameterNetError(
                    f"the model does not run on example_input of shape {tuple(x.shape)}: {first_line(e)}"
                ) from e
            notes.append(f"the model did not run on a {tuple(x.shape)} input ({type(e).__name__}); used torch.fx")
            x = None
    if x is None:
        pairs = _pairs_by_fx(model)
        found_by = "torch.fx tracing"
        notes.append("no example input: the deployed model was not checked against the original")

    modules = dict(walk(model, opaque=is_parameternet_layer))
    refs = references(model)
    paired = {conv: norm for conv, norm in pairs}
    kept: dict[str, str] = {}
    folded: list[tuple[str, str]] = []
    merged = _merge_repconvs(modules, refs, paired, fold_bn)
    for name, module in modules.items():
        if _is_norm(module) and name not in paired.values():
            kept[name] = "does not directly follow a conv" if fold_bn else "fold_bn=False"
    for conv_name, norm_name in pairs:
        conv, norm = modules[conv_name], modules[norm_name]
        why = "fold_bn=False" if not fold_bn else _foldable(conv, norm)
        if why is not None:
            kept[norm_name] = why
            continue
        _fold(conv, norm)
        replace(refs, norm, _without_norm(norm))
        folded.append((conv_name, norm_name))
    model.eval()

    report = DeployReport(
        merged=merged, folded=folded, kept=dict(sorted(kept.items())), found_by=found_by,
        params_before=params_before, params_after=num_params(model), notes=notes,
    )  # fmt: skip
    if x is not None and verify and reference is not None:
        report.max_rel_error = _check(model, x, reference)
    model.deploy_report = report
    log.debug("%s", report)
    return model


def _merge_repconvs(modules: dict[str, nn.Module], refs, paired: dict[str, str], fold_bn: bool) -> list[str]:
    """Replace every RepConv layer of ``modules`` (updated in place) by its merged conv; the names merged. Without
    ``fold_bn`` the branches' shift moves into the running mean of a foldable norm after the layer."""
    merged = []
    for name, module in list(modules.items()):
        if not isinstance(module, RepConv2d):
            continue
        conv = module.merge()
        norm = modules.get(paired.get(name, ""))
        if not fold_bn and norm is not None and _foldable(conv, norm) is None:
            # The branches' shift goes into the norm's running mean: norm(z + c) == norm'(z) with mean - c.
            with torch.no_grad():
                _, shift = module.merged_kernel()
                norm.running_mean.sub_(shift.to(norm.running_mean))
                conv.bias = None if module.conv.bias is None else nn.Parameter(module.conv.bias.detach().clone())
        replace(refs, module, conv)
        modules[name] = conv
        merged.append(name)
    return merged


def _check(model: nn.Module, x: torch.Tensor, reference: list[torch.Tensor]) -> float:
    with torch.no_grad():
        out = _detached(model(x))
    worst = 0.0
    for a, b in zip(out, reference, strict=True):
        if not b.is_floating_point():
            continue
        scale = b.abs().max().double().clamp_min(1e-12)
        worst = max(worst, ((a.double() - b.double()).abs().max() / scale).item())
    tol = 1e-3 if reference and reference[0].dtype in (torch.float32, torch.float64) else 5e-2
    if worst > tol:
        raise RuntimeError(
            f"deploy() changed the model's output by {worst:.2e} (relative) on the example input; "
            "please report this model, and use the original meanwhile."
        )
    return worst
