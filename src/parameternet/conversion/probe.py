"""Example inputs of any form and the probe of the dense model that :func:`parameternet.parameterize` runs: each
layer's input positions per sample, the layers a parent bypasses, and the dimension along which the model (and
each layer) keeps the samples of a batch apart."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.toolkit import eval_mode, example_input_for, param_device_dtype


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
    device, _ = param_device_dtype(model)
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


# Parents whose fused inference fast path reads their linears' weights instead of calling them, with the switch
# that turns the fast path off for that module alone (the function is unchanged: it is the slow path's).
FAST_PATH_SWITCHES: dict[type, Any] = {
    nn.TransformerEncoderLayer: lambda m: setattr(m, "activation_relu_or_gelu", 0),
}


@dataclass
class _Probe:
    positions: dict[str, int]  # input positions per sample, smallest over calls; layers that ran
    bypassed: set[str]  # ran with grad enabled but not under no_grad: a parent reads their weights itself
    batch_dims: dict[str, int | None] | None = None  # each layer's batch dimension (None: not found)
    model_batch_dim: int | None = None
    pair: tuple[_Example, _Example, _Example] | None = None  # one sample, another, both (along model_batch_dim)
    outputs: Any = None  # the dense model's output on the first sample (eval, no_grad), else on the example
    example: _Example | None = None
    positions_rule: _PositionRule | None = None  # the model keeps positions apart: route per token
    heads: set[str] = field(default_factory=set)  # layers whose output is (a leaf of) the model's output


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
        with eval_mode(model), torch.set_grad_enabled(grad):
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


def _output_heads(model: nn.Module, layers: dict[str, nn.Module], example: _Example) -> set[str]:
    """The layers whose output tensor is itself a leaf of the model's output (the projection to classes or to a
    vocabulary that produces the logits)."""
    made: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor is held, so that its id is never reused

    def hook(name):
        def record(module, args, output):
            if isinstance(output, torch.Tensor):
                made[id(output)] = (name, output)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            out = example(model)
            return {made[id(t)][0] for t in _leaves(out) if id(t) in made and made[id(t)][1] is t}
    finally:
        for h in handles:
            h.remove()


def _probe(model: nn.Module, layers: dict[str, nn.Module], example: _Example, find_batch: bool) -> _Probe:
    out, seen = _run(model, layers, example)
    _, seen_grad = _run(model, layers, example, grad=True)
    bypassed = {n for n in seen_grad if n not in seen}
    shapes = {n: seen.get(n) or seen_grad[n] for n in seen_grad}
    probe = _Probe({}, bypassed, outputs=out, example=example)
    probe.heads = _output_heads(model, layers, example)
    if find_batch:
        _find_batch_dims(model, layers, example, probe, shapes)
        probe.positions_rule = _position_rule(model, layers, example, probe.model_batch_dim)
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


# Sequence semantics: a model that keeps the positions of a sample apart (causal attention, a padding mask, a
# position-wise network) must not see a router that pools over all of them.


def _is_mask(key: str | None, t: torch.Tensor) -> bool:
    return t.dtype == torch.bool or (key is not None and "mask" in key.lower())


def _keyed_leaves(example: _Example) -> list[tuple[str | None, torch.Tensor]]:
    out = [(None, t) for t in _leaves(example.args)]
    for k, v in example.kwargs.items():
        out += [(k, t) for t in _leaves(v)]
    return out


def _map_keyed(example: _Example, fn) -> _Example:
    """``example`` with each tensor ``t`` replaced by ``fn(key, t)`` (``key``: the keyword it sits under, or None)."""
    args = _map(example.args, lambda t: fn(None, t))
    kwargs = {k: _map(v, functools.partial(fn, k)) for k, v in example.kwargs.items()}
    return _Example(args, kwargs)


def _changed(t: torch.Tensor, where: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` with other values where ``where`` (broadcastable) holds: noise for floats, other ids for integers."""
    g = torch.Generator().manual_seed(seed)
    if t.is_floating_point():
        new = (torch.randn(t.shape, generator=g) * 2.0 + 1.0).to(device=t.device, dtype=t.dtype)
    elif t.dtype == torch.bool:
        return t
    else:
        high = max(int(t.max()) + 1, 2) if t.numel() else 2
        new = (t.cpu() + torch.randint(1, high, t.shape, generator=g)).remainder(high).to(t)
    return torch.where(where.to(t.device), new, t)


def _along(t: torch.Tensor, d: int, keep: torch.Tensor) -> torch.Tensor:
    """``keep`` ``(T,)`` shaped to broadcast along dimension ``d`` of ``t``."""
    shape = [1] * t.dim()
    shape[d] = keep.numel()
    return keep.view(shape)


def _close_leaves(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        if x.is_floating_point():
            scale = max(float(y.abs().max()) if y.numel() else 0.0, 1e-3)
            if (x.double() - y.double()).abs().max() > 1e-4 * scale:
                return False
        elif not torch.equal(x, y):
            return False
    return True


@dataclass
class _PositionRule:
    """How the dense model keeps the positions along input dimension ``dim`` apart: ``"causal"`` (an output
    position does not depend on later input positions) or ``"masked"`` (positions the mask ``mask_key`` marks as
    padding do not change the other positions' outputs). :meth:`holds` re-checks a (converted) model."""

    kind: str
    dim: int
    size: int
    example: _Example  # what the check runs
    edited: _Example  # the same with the later / padded positions changed
    kept: torch.Tensor  # (size,) bool: output positions that must not change (causal: the earlier half)
    mask_key: str | None = None
    pad_value: Any = None

    def describe(self) -> str:
        if self.kind == "causal":
            return f"its output at a position does not depend on later positions (input dimension {self.dim})"
        return (
            f"positions its mask '{self.mask_key}' marks as padding ({self.pad_value!r}) do not change the others' "
            "outputs"
        )

    def holds(self, model: nn.Module, layers: dict[str, nn.Module]) -> bool:
        a, _ = _run(model, layers, self.example)
        b, _ = _run(model, layers, self.edited)
        return _compare_positions(a, b, self.dim, self.size, self.kept, self.kind == "masked")


def _compare_positions(a: Any, b: Any, d: int, size: int, kept: torch.Tensor, whole_too: bool) -> bool | None:
    """Whether outputs ``a`` and ``b`` agree at the kept positions (leaves with ``size`` along ``d``) and, with
    ``whole_too``, on every other leaf; None when no leaf has the positions."""
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        return False
    found = False
    pairs_a, pairs_b = [], []
    for x, y in zip(la, lb):
        if x.dim() > d and x.shape[d] == size:
            found = True
            idx = kept.nonzero().flatten().to(x.device)
            pairs_a.append(x.index_select(d, idx))
            pairs_b.append(y.index_select(d, idx))
        elif whole_too:
            pairs_a.append(x)
            pairs_b.append(y)
    if not found:
        return None
    return _close_leaves(pairs_a, pairs_b)


def _position_rule(
    model: nn.Module, layers: dict[str, nn.Module], example: _Example, batch_dim: int | None
) -> _PositionRule | None:
    """Find whether the dense model keeps the positions of a sample apart, by running it: first with a padding mask
    (a ``*mask*`` keyword or a bool tensor shaped ``(batch, positions)``: pads in the last quarter, in either
    convention, the others' outputs must not change when the pads' inputs do), then causally (the first half of
    the output positions must not change when the second half of the input positions does). None: neither holds,
    or the example has no dimension of positions that the output keeps."""
    bd = 0 if batch_dim is None else batch_dim
    keyed = _keyed_leaves(example)
    data = [(k, t) for k, t in keyed if not _is_mask(k, t)]
    if not data:
        return None
    try:
        out = _leaves(_run(model, layers, example)[0])
    except Exception:  # the probe already ran this example; a failure here only means no rule is found
        return None
    for d in range(max(t.dim() for _, t in data)):
        if d == bd:
            continue
        sizes = {t.shape[d] for _, t in data if t.dim() > d}
        for size in sorted(sizes):
            if size < 2 or not any(o.dim() > d and o.shape[d] == size for o in out):
                continue
            rule = _masked_rule(model, layers, example, keyed, d, bd, size) or _causal_rule(
                model, layers, example, d, size
            )
            if rule is not None:
                return rule
    return None


def _causal_rule(model, layers, example: _Example, d: int, size: int) -> _PositionRule | None:
    later = torch.arange(size) >= size // 2
    edited = _map_keyed(
        example,
        lambda k, t: t if _is_mask(k, t) or t.dim() <= d or t.shape[d] != size else _changed(t, _along(t, d, later), 3),
    )
    rule = _PositionRule("causal", d, size, example, edited, ~later)
    try:
        ok = rule.holds(model, layers)
    except Exception:
        return None
    return rule if ok else None


def _set_mask(key: str, mask: torch.Tensor, new: torch.Tensor, k: str | None, t: torch.Tensor) -> torch.Tensor:
    return new if (k == key and t is mask) else t


def _edit_pads(pad: torch.Tensor, d: int, bd: int, k: str | None, t: torch.Tensor) -> torch.Tensor:
    """``t`` changed at the padded positions ``pad`` ``(batch, positions)``, its batch along ``bd`` and its
    positions along ``d``; masks and tensors of other shapes unchanged."""
    batch, size = pad.shape
    if _is_mask(k, t) or t.dim() <= max(d, bd) or t.shape[d] != size or t.shape[bd] != batch:
        return t
    shape = [1] * t.dim()
    shape[bd], shape[d] = batch, size
    where = pad if bd < d else pad.t()
    return _changed(t, where.reshape(shape), 4)


def _masked_rule(model, layers, example: _Example, keyed, d: int, bd: int, size: int) -> _PositionRule | None:
    for key, m in [(k, t) for k, t in keyed if _is_mask(k, t) and t.dim() == 2 and t.shape[1] == size]:
        last = torch.arange(size) >= size - max(1, size // 4)  # (T,): pads in the last quarter
        pad = last.view(1, -1).expand(m.shape[0], -1)
        conventions = ((True, False),) if m.dtype == torch.bool else ((0, 1),)  # torch's key padding / transformers'
        for pad_value, real_value in conventions:
            new = torch.where(pad, pad_value, real_value).to(m)
            masked = _map_keyed(example, functools.partial(_set_mask, key, m, new))
            edited = _map_keyed(masked, functools.partial(_edit_pads, pad, d, bd))
            rule = _PositionRule("masked", d, size, masked, edited, ~last, key, pad_value)
            try:
                if rule.holds(model, layers):
                    return rule
            except Exception:  # a mask the model refuses in this form is no padding mask
                continue
    return None
