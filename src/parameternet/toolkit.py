"""The module-tree toolkit every other part of parameternet builds on: walking and rewriting a model, unwrapping it
from its training wrappers, running it in eval mode, counting its parameters, naming it, making an example input and
seeding.

It imports only torch, numpy and :mod:`parameternet.errors` (the bottom of the import diagram in
docs/architecture.md), so ``parameterize``, ``deploy``, ``profile`` and ``train`` share these helpers instead of each
other's privates.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from parameternet.errors import ParameterNetError

__all__ = [
    "MIN_IMG_SIZE",
    "WRAPPER_PREFIXES",
    "check_image_batch",
    "check_memory",
    "eval_mode",
    "example_input_for",
    "first_line",
    "full_state_dict",
    "image_input_shape",
    "model_name",
    "num_params",
    "param_device_dtype",
    "references",
    "replace",
    "seed_all",
    "strip_wrapper_prefixes",
    "timm_name",
    "unwrap_model",
    "walk",
]

# Where modules are held: id(module) -> every (parent, attribute) holding it.
References = dict[int, list[tuple[nn.Module, str]]]


# ---------------------------------------------------------------------------------------------------------------
# Walking and rewriting the module tree


def walk(
    module: nn.Module,
    prefix: str = "",
    opaque: Callable[[nn.Module], bool] | None = None,
    seen: set[int] | None = None,
) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without the root: ``(dotted name, module)``, a shared module named once, and the
    children of a module for which ``opaque(module)`` is true not entered (the module itself is yielded)."""
    seen = set() if seen is None else seen
    for name, child in module.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if opaque is None or not opaque(child):
            yield from walk(child, full, opaque, seen)


def references(model: nn.Module) -> References:
    """Every ``(parent, attribute)`` that holds each module of ``model``, keyed by ``id(module)``, so that
    :func:`replace` swaps a shared module everywhere it is held."""
    refs: References = defaultdict(list)
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                refs[id(child)].append((parent, attr))
    return refs


def replace(refs: References, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is held (``refs`` from :func:`references`, taken before any replacement)."""
    for parent, attr in refs[id(old)]:
        setattr(parent, attr, new)


# ---------------------------------------------------------------------------------------------------------------
# Training wrappers: torch.compile, DistributedDataParallel / DataParallel, FSDP2

# The key prefixes wrappers put before a model's own names: DistributedDataParallel / DataParallel (``module.``) and
# torch.compile's OptimizedModule (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside its training wrappers, in any nesting: torch.compile's ``OptimizedModule`` (its
    ``_orig_mod``), ``DistributedDataParallel`` and ``DataParallel`` (their ``module``); ``model`` itself when it is
    not wrapped. An FSDP2 model (``fully_shard``) is not wrapped: it is the model, with sharded parameters (see
    :func:`full_state_dict`)."""
    while True:
        dynamo = sys.modules.get("torch._dynamo.eval_frame")  # imported by torch.compile, so present for its output
        if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def full_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """``model``'s state dict with whole tensors, and whether any was sharded: a ``DTensor`` (an FSDP2 /
    ``fully_shard`` parameter, a tensor-parallel one) is gathered with ``full_tensor()``, a collective that every
    rank of its mesh must run."""
    state = model.state_dict()
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is None or not any(isinstance(v, dtensor) for v in state.values()):
        return state, False
    return {k: v.full_tensor() if isinstance(v, dtensor) else v for k, v in state.items()}, True


def strip_wrapper_prefixes(
    state_dict: dict[str, torch.Tensor], own: Iterable[str] | None = None, source: str = "the state dict"
) -> dict[str, torch.Tensor]:
    """``state_dict`` with the prefixes of :data:`WRAPPER_PREFIXES` removed from its keys, in any order and nesting
    (``_orig_mod.module._orig_mod.x`` -> ``x``), as timm's ``clean_state_dict`` does.

    ``own``, the keys of the model the state dict goes into, keeps a key the model has as it is and stops removing
    prefixes at the first name the model has, so a model whose child is really called ``module`` keeps its names.

    Raises ParameterNetError, naming ``source``, when two keys become one (a state dict that holds a model both
    wrapped and not).
    """
    own = set(own or ())
    out: dict[str, torch.Tensor] = {}
    first: dict[str, str] = {}
    for key, value in state_dict.items():
        name = key
        while name not in own and name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in first:
            raise ParameterNetError(
                f"{source} holds both {first[name]!r} and {key!r}, the same weight with and without a wrapper "
                f"prefix; save the model itself, unwrapped, and load that."
            )
        first[name] = key
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running and describing a model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration of a ``with`` block; every module's own train / eval flag is restored after,
    also when the block raises (``model.train(mode)`` would set one flag on all of them)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def num_params(model: nn.Module) -> int:
    """The number of parameter elements of ``model``, each shared parameter counted once."""
    return sum(p.numel() for p in model.parameters())


def timm_name(model: nn.Module) -> str | None:
    """The timm architecture ``model`` was built as (its ``pretrained_cfg["architecture"]``), or None."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg.get("architecture")


def model_name(model: nn.Module) -> str:
    """A name for messages and reports: the timm architecture, else the class name."""
    return timm_name(model) or type(model).__name__


def param_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of ``model``'s first floating-point parameter (cpu / float32 without one)."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Example inputs


def _seeded_randn(shape: Sequence[int], model: nn.Module, seed: int = 0) -> torch.Tensor:
    device, dtype = param_device_dtype(model)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator).to(device=device, dtype=dtype)


def example_input_for(model: nn.Module, example_input: torch.Tensor | Sequence[int] | None) -> torch.Tensor | None:
    """The tensor to probe ``model`` with: ``example_input`` itself (moved to the model's device), a seeded random
    tensor of that shape (batch included) on the model's device and dtype, or one of timm's
    ``pretrained_cfg["input_size"]`` with batch 1; ``None`` when none is known.

    Raises ParameterNetError for a shape that is not a sequence of positive ints."""
    if isinstance(example_input, torch.Tensor):
        return example_input.to(param_device_dtype(model)[0])
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
    return _seeded_randn(shape, model)


MIN_IMG_SIZE = 8  # the smallest input height / width the commands that build an image model accept


def _physical_memory() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say (no ``os.sysconf``)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def image_input_shape(
    model: nn.Module, img_size: int | Sequence[int] | None = None, in_chans: int | None = None
) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one image for ``model``: ``in_chans``, else the model's ``in_chans``, else
    timm's ``pretrained_cfg["input_size"]``, else the image the model was converted on (its
    ``parameterize_report.input_shape``), else 3 channels; ``img_size`` (an int or ``(height, width)``), else the
    ``input_size``'s (or the conversion's), else 224 x 224.

    Raises ParameterNetError for an ``in_chans`` or ``img_size`` that is not positive, or an image larger than the
    machine's memory."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    converted = getattr(getattr(model, "parameterize_report", None), "input_shape", None)
    if not cfg.get("input_size") and isinstance(converted, (list, tuple)) and len(converted) == 4:
        cfg = {"input_size": tuple(converted[1:])}  # (B, C, H, W) of the example the conversion traced
    chans, *size = cfg.get("input_size") or (3, 224, 224)
    chans = getattr(model, "in_chans", None) or chans
    if in_chans is not None:
        if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
            raise ParameterNetError(f"in_chans must be a positive integer, got {in_chans!r}.")
        chans = in_chans
    if img_size is not None:
        size = [img_size, img_size] if isinstance(img_size, int) else list(img_size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
            raise ParameterNetError(f"img_size must be a positive int or (height, width), got {img_size!r}.")
    chans, height, width = int(chans), int(size[0]), int(size[1])
    check_memory(4 * chans * height * width, f"img_size {height}x{width}: one {chans}-channel float32 image",
                 "use a smaller img_size")  # fmt: skip
    return chans, height, width


def check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    """Raise ParameterNetError, in one sentence that says how to fix it, unless ``x`` is a batch of images
    ``(B, in_chans, H, W)``; a torch.fx proxy (tracing: no shape) passes."""
    if isinstance(x, torch.fx.Proxy):
        return
    if x.dim() != 4:
        raise ParameterNetError(
            f"expected images of shape (B, {in_chans}, H, W), got shape {tuple(x.shape)}; "
            "add the batch dimension with x.unsqueeze(0) for a single image."
        )
    if x.shape[1] != in_chans:
        raise ParameterNetError(
            f"expected {in_chans} input channels, got {x.shape[1]}; "
            f"create the model with in_chans={x.shape[1]} or convert the images."
        )


def check_memory(need: int, what: str, fix: str) -> None:
    """Raise ParameterNetError, before any allocation, when ``need`` bytes exceed this machine's physical memory:
    "``what`` needs N GiB, more than this machine's M GiB of memory; ``fix``." Nothing where the OS does not say."""
    memory = _physical_memory()
    if memory is not None and need > memory:
        raise ParameterNetError(
            f"{what} needs {need / 2**30:.0f} GiB, more than this machine's {memory / 2**30:.0f} GiB of memory; {fix}."
        )


# ---------------------------------------------------------------------------------------------------------------
# Odds and ends


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (numpy takes the seed modulo 2**32)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name for an empty one), for one-sentence errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
