"""Which layers :func:`parameternet.parameterize` converts, and why every other conv / linear stays static (see the
package docstring for the rules)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from timm.layers import Conv2dSame
from timm.layers import Linear as TimmLinear
from torch import nn

from parameternet.conversion.probe import FAST_PATH_SWITCHES, _as_example, _Example, _Probe, _probe
from parameternet.conversion.report import (
    REASON_BATCH,
    REASON_BYPASSED,
    REASON_CLASSIFIER,
    REASON_GATE_NAME,
    REASON_HEAD,
    REASON_LINEAR_REPCONV,
    REASON_NOT_INCLUDED,
    REASON_ONE_POSITION,
    REASON_POSITIONS,
    REASON_TIED,
    _reason_kind,
)
from parameternet.errors import ParameterNetError
from parameternet.layers import is_parameternet_layer
from parameternet.toolkit import first_line, walk

log = logging.getLogger("parameternet.conversion")

# Name components of squeeze-excite / gating modules; used only when no example input can be run.
GATE_NAMES = ("se", "ese", "se_layer", "se_module", "squeeze_excite", "attn_gate", "gate")


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules below ``model`` by name; parameternet layers are opaque (their routers are never converted)."""
    return walk(model, opaque=is_parameternet_layer)


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
        if reason is None and probe.positions_rule is not None and isinstance(layer, nn.Conv2d):
            reason = (
                f"{REASON_POSITIONS}: the model keeps positions apart ({probe.positions_rule.describe()}) and a "
                "dynamic conv routes on the mean over all of them; only linears route per token"
            )
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
    modules = [("", model), *_walk(model)] if not is_parameternet_layer(model) else [("", model)]
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

    _check_patterns(model, module_names, candidates, include_p, exclude_p)

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
                    f"the model does not run on example_input of shape {shape}: {first_line(e)}"
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
        rule = "classifier + one-position probe" if positions is not None else "classifier + gate names"
        if positions is not None:
            rule += f" at input {'x'.join(map(str, example.shape or ()))}"
        selected = _default_choice(model, modules, candidates, static, positions, probe)
    for n in list(selected):
        hit = next((p for p in exclude_p if _matches(n, p)), None)
        if hit is not None:
            selected.remove(n)
            static[n] = f"excluded by pattern '{hit}'"
    if probe is not None:
        _unsafe(model, selected, candidates, static, probe, names)

    if not selected:
        raise _nothing_to_convert(model, method, candidates, static)
    return _Selection(selected, candidates, static, rule, example, notes, probe)


def _check_patterns(
    model: nn.Module, module_names: list[str], candidates: dict[str, nn.Module], include_p: list[str],
    exclude_p: list[str],
) -> None:  # fmt: skip
    """ParameterNetError for an exclude pattern that matches no module, or an include pattern that matches no
    convertible layer."""
    for p in exclude_p:
        if not any(_matches(n, p) for n in module_names):
            raise ParameterNetError(f"exclude pattern {p!r} matches no module of {type(model).__name__}.")
    for p in include_p:
        if not any(n and _matches(n, p) for n in candidates):
            raise ParameterNetError(
                f"include pattern {p!r} matches no convertible layer (nn.Conv2d / nn.Linear) of "
                f"{type(model).__name__}; module names look like {module_names[:3]}."
            )


def _default_choice(
    model: nn.Module, modules: list[tuple[str, nn.Module]], candidates: dict[str, nn.Module], static: dict[str, str],
    positions: dict[str, int] | None, probe: _Probe | None,
) -> list[str]:  # fmt: skip
    """The candidates converted without include patterns; each other one goes to ``static`` with its reason: the
    classifier, a layer that sees one position (by the probe) or a gate (by its name, without a probe), the
    model's output head, a projection to the vocabulary."""
    classifier = _classifier_names(model, {id(m): n for n, m in modules})
    vocab = {(m.embedding_dim, m.num_embeddings) for _, m in modules if isinstance(m, nn.Embedding)}
    heads = probe.heads if probe is not None else set()
    selected = []
    for n, layer in candidates.items():
        if any(_matches(n, c) for c in classifier):
            static[n] = REASON_CLASSIFIER
        elif positions is not None and positions.get(n, 2) <= 1:
            static[n] = REASON_ONE_POSITION
        elif positions is None and any(part in GATE_NAMES for part in n.split(".")):
            static[n] = REASON_GATE_NAME
        elif n in heads and isinstance(layer, nn.Linear):
            static[n] = f"{REASON_HEAD}: its output is the model's output (the logits)"
        elif isinstance(layer, nn.Linear) and layer.out_features in vocab:
            static[n] = f"{REASON_HEAD}: a projection to the vocabulary ({layer.out_features} = an embedding's size)"
        else:
            selected.append(n)
    return selected


def _nothing_to_convert(
    model: nn.Module, method: str, candidates: dict[str, nn.Module], static: dict[str, str]
) -> ParameterNetError:
    what = "nn.Conv2d" if method == "repconv" else "nn.Conv2d or nn.Linear"
    done = sum(is_parameternet_layer(m) for _, m in walk(model, opaque=is_parameternet_layer))
    already = f" (it is already a ParameterNet: {done} dynamic or RepConv layers)" if done else ""
    if not candidates:
        return ParameterNetError(f"nothing to convert: {type(model).__name__} has no plain {what} layer{already}.")
    return ParameterNetError(
        f"nothing to convert{already}: all {len(candidates)} {what} layers of {type(model).__name__} stay static "
        f"({', '.join(sorted({_reason_kind(static[n]) for n in candidates}))}); choose layers with include "
        "(--include on the command line)."
    )
