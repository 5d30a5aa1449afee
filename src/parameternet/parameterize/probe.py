"""Example inputs of any form and the probe of the dense model that :func:`parameternet.parameterize` runs: each
layer's input positions per sample, the layers a parent bypasses, and the dimension along which the model (and
each layer) keeps the samples of a batch apart."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass
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
