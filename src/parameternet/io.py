"""Persistence: every safetensors file parameternet writes or reads, with ONE metadata schema.

A weights file (``parameternet.save``, ``parameternet convert``, a training or LM checkpoint) is a plain
safetensors state dict, so timm and ``safetensors.torch.load_file`` read it as is, whose string metadata holds the
keys below, each JSON-encoded (:data:`FORMAT` names the schema):

- ``format``: :data:`FORMAT` (as read: what the file says; a foreign file's own, or none);
- ``kind``: ``"convert"`` (:func:`save`), ``"train"`` (a vision run), ``"lm"`` (a language-model run) or
  ``"plain"`` (any other file);
- ``model``: the timm name (None when unknown); ``model_kwargs``: its build arguments, ``num_classes`` and
  ``in_chans`` included; ``num_classes``, ``in_chans``, ``img_size`` (int or None);
- ``parameterize``: the conversion steps (:meth:`ParameterizeReport.recipe`, oldest first; [] for none);
- ``config``: the training recipe (a dict) or None;
- any other key the writer adds (``step``, ``classes``, ``weights``: ``"ema"``, ...).

:func:`load_source_model` also reads foreign checkpoints (timm's, ``torch.save`` files) for
``parameternet convert``. A file whose ``format`` names a parameternet schema this version does not know, or whose
conversion steps hold a key, method or router it does not know (a file of a newer version), is refused with
ParameterNetError instead of being read as something else.

:func:`save` writes a wrapped model (torch.compile, DDP, FSDP2) under its own names; every reader here (and
``train``'s) removes the ``module.`` / ``_orig_mod.`` prefixes such wrappers add, as timm does.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from parameternet.conversion import METHODS, ParameterizeReport, apply_recipe
from parameternet.errors import ParameterNetError
from parameternet.layers import ROUTERS
from parameternet.models import check_model_name, create_model
from parameternet.runs import atomic_write
from parameternet.toolkit import full_state_dict, strip_wrapper_prefixes, timm_name, unwrap_model

__all__ = [
    "FORMAT",
    "build_from_recipe",
    "load",
    "load_source_model",
    "load_weights",
    "read_metadata",
    "read_recipe",
    "save",
    "save_weights",
]

FORMAT = "parameternet-2"
KINDS = ("convert", "train", "lm", "plain")


# ---------------------------------------------------------------------------------------------------------------
# The schema


def _normalize(meta: dict[str, Any], source: str) -> dict[str, Any]:
    """Decoded metadata, parameternet's or a foreign file's, as the one schema (see the module docstring).

    Raises ParameterNetError for a parameternet format or a conversion step this version does not know (a file
    written by a newer one), rather than loading it as something else."""
    meta = dict(meta)
    fmt = meta.get("format")
    if isinstance(fmt, str) and fmt.startswith("parameternet") and fmt != FORMAT:
        raise ParameterNetError(
            f"{source!r} has metadata format {fmt!r}, which this version of parameternet does not read (it reads "
            f"{FORMAT!r}); use the version of parameternet that wrote the file."
        )
    kwargs = dict(meta.get("model_kwargs") or {})
    for k in ("num_classes", "in_chans"):
        if isinstance(meta.get(k), int):
            kwargs.setdefault(k, meta[k])
        elif isinstance(kwargs.get(k), int):
            meta[k] = kwargs[k]
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else None
    meta["model_kwargs"] = kwargs
    meta.setdefault("model", None)
    meta.setdefault("num_classes", None)
    meta.setdefault("in_chans", None)
    meta.setdefault("img_size", (cfg or {}).get("img_size"))
    meta["parameterize"] = meta.get("parameterize") or []
    _check_steps(meta["parameterize"], source)
    meta["config"] = cfg
    kind = meta.get("kind")
    meta["kind"] = kind if kind in KINDS else "train" if cfg else "plain"
    return meta


_STEP_REQUIRED = ("method", "num_experts", "router", "router_temperature", "router_hidden", "modules")


@functools.cache
def _step_keys() -> frozenset[str]:
    """The keys a conversion step may have: those :meth:`ParameterizeReport.recipe` writes."""
    missing = dataclasses.MISSING
    fields = dataclasses.fields(ParameterizeReport)
    blank = {f.name: None for f in fields if f.default is missing and f.default_factory is missing}
    return frozenset(ParameterizeReport(**blank).recipe())


def _check_steps(steps: Any, source: str) -> None:
    """Raise ParameterNetError, naming it, for a conversion step that :func:`apply_recipe` cannot redo as written:
    one that is not a dict, lacks a key every step has (:data:`_STEP_REQUIRED`; files of older versions may lack
    the others) or has a key, method or router this version does not know."""
    for i, step in enumerate(steps if isinstance(steps, list) else [steps], 1):
        what = None
        if not isinstance(steps, list) or not isinstance(step, dict):
            what = f"{step!r}, not a recipe dict"
        elif unknown := sorted(set(step) - _step_keys()):
            what = f"the key {unknown[0]!r}"
        elif missing := [k for k in _STEP_REQUIRED if k not in step]:
            what = f"no {missing[0]!r}"
        elif step["method"] not in METHODS:
            what = f"the method {step['method']!r}; this version knows {', '.join(METHODS)}"
        elif step["router"] not in ROUTERS:
            what = f"the router {step['router']!r}; this version knows {', '.join(ROUTERS)}"
        if what is not None:
            raise ParameterNetError(
                f"{source!r} records a conversion step this version of parameternet cannot redo (step {i}: "
                f"{what}); upgrade parameternet to the version that wrote the file, or convert the model again."
            )


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v
    return meta


def _safetensors_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], source: str) -> bytes:
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share storage (tied weights)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {**_normalize(metadata, source), "format": FORMAT}
    try:
        encoded = {k: json.dumps(v) for k, v in meta.items()}
    except TypeError as e:
        raise ParameterNetError(
            f"checkpoint metadata must be JSON values ({e}); got model_kwargs {meta['model_kwargs']!r}."
        ) from e
    return save(tensors, metadata=encoded)


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
    """Write a state dict as safetensors, atomically, with ``metadata`` brought to the one schema (keys it lacks
    get their defaults; values must be JSON values).

    Returns ``{"bytes": size, "sha256": hex digest}`` of what was written; a full disk or unwritable directory, or
    metadata that is not JSON, raises ParameterNetError.
    """
    data = _safetensors_bytes(state_dict, metadata, str(path))
    atomic_write(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _not_a_checkpoint(path: Path, e: BaseException) -> ParameterNetError:
    why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
    return ParameterNetError(
        f"{str(path)!r} is not a readable safetensors checkpoint ({why}); "
        f"pass a .safetensors file written by parameternet (or a run directory)"
    )


def _run_model(run: Path) -> Path:
    """The final model of a run directory: an lm train run's ``model/`` (or that directory itself), a train run's
    ``checkpoints/final.safetensors`` (or that of a ``checkpoints/`` directory)."""
    for hf in (run, run / "model"):
        if (hf / "config.json").is_file():
            return hf
    for final in (run / "checkpoints" / "final.safetensors", run / "final.safetensors"):
        if final.is_file():
            return final
    steps = sorted((run / "checkpoints").glob("step_*.safetensors")) or sorted(run.glob("step_*.safetensors"))
    steps = [p for p in steps if not p.name.endswith(".ema.safetensors")]
    if steps:
        raise ParameterNetError(
            f"run directory {str(run)!r} holds no final model (the run has not finished); continue it with "
            f"resume=auto, or load its newest step checkpoint, {str(steps[-1])!r}."
        )
    if any((run / "checkpoints").glob("step_*.dcp")) or any(run.glob("step_*.dcp")):
        raise ParameterNetError(
            f"run directory {str(run)!r} holds no final model (the run has not finished, and its checkpoints are "
            f"sharded by FSDP); continue it with resume=auto, which writes the whole model at the end (model/ for "
            f"lm train, checkpoints/final.safetensors for train)."
        )
    raise ParameterNetError(
        f"{str(run)!r} holds no model; pass a .safetensors file or a run directory of parameternet train or lm train."
    )


def _run_weights(path: Path) -> Path:
    """``path``, or for a directory the final weights file of the train run it is (see :func:`_run_model`)."""
    if not path.is_dir():
        return path
    found = _run_model(path)
    if found.is_dir():
        raise ParameterNetError(
            f"{str(path)!r} holds a language model saved by lm train, not safetensors weights; load it with "
            f"parameternet.load() or transformers' from_pretrained()."
        )
    return found


def _read(path: str | Path, tensors: bool) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _run_weights(Path(path))
    if not path.is_file():
        raise ParameterNetError(f"checkpoint {str(path)!r} does not exist; pass a .safetensors file or a run directory")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        state = load_file(str(path)) if tensors else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _not_a_checkpoint(path, e) from None
    return state, _normalize(_decode(raw), str(path))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a safetensors file (or of a train run directory's final weights) and its metadata in the
    one schema (:func:`read_metadata`).

    Raises ParameterNetError for a missing, truncated or foreign file and a run directory without final weights.
    """
    state, meta = _read(path, tensors=True)
    return state, meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of any safetensors file (or of a train run directory's final weights), parameternet's of any
    schema or a foreign one, in the one schema (see the module docstring; every key is there, with None / [] / {}
    where the file does not say). Raises ParameterNetError for a missing file or one that is not safetensors."""
    return _read(path, tensors=False)[1]


# ---------------------------------------------------------------------------------------------------------------
# Converted models: save and load


def save(
    model: nn.Module,
    path: str | Path,
    *,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and what rebuilds it (timm name, build arguments, conversion steps) to a
    ``.safetensors`` file that :func:`load` reads back; atomically. Returns the path.

    ``model`` is any ``nn.Module``. A wrapped model is saved as the model inside it, under its own names:
    ``torch.compile``'s output, ``DistributedDataParallel`` / ``DataParallel`` (see
    :func:`parameternet.toolkit.unwrap_model`); an FSDP2 (``fully_shard``) model's sharded tensors are gathered
    whole, so every rank calls ``save`` and rank 0 writes the file. ``model_name`` defaults to timm's
    ``pretrained_cfg["architecture"]``; a model timm did not build is saved without one, and :func:`load` then
    takes the model to load into (``model=``). The model's ``num_classes`` and ``in_chans`` are recorded; pass any
    other argument it was built with in ``model_kwargs``. Raises ParameterNetError for another suffix, a deployed
    model or arguments that are not JSON.
    """
    if not isinstance(model, nn.Module):
        raise ParameterNetError(f"save() takes an nn.Module, got {type(model).__name__}.")
    model = unwrap_model(model)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ParameterNetError(f"the output must be a .safetensors file, got {str(path)!r}.")
    if hasattr(model, "deploy_report"):
        raise ParameterNetError("cannot save a deployed model; save it before deploy() and deploy after load().")
    name = model_name or timm_name(model)  # None: not a timm model, load() needs it rebuilt (model=)
    kwargs = {k: getattr(model, k) for k in ("num_classes", "in_chans") if isinstance(getattr(model, k, None), int)}
    kwargs.update(model_kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise ParameterNetError(f"model_kwargs must be JSON values, got {kwargs!r}.") from e
    meta = {"kind": "convert", "model": name, "model_kwargs": kwargs, "parameterize": _steps_of(model)}
    state, gathered = full_state_dict(model)
    if gathered and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return path  # every rank gathered the shards; rank 0 writes
    save_weights(path, state, meta)
    return path


def _steps_of(model: nn.Module) -> list[dict[str, Any]]:
    """The conversion steps ``model`` went through (oldest first), as JSON values; [] for an unconverted model."""
    report = getattr(model, "parameterize_report", None)
    steps = [*report.history, report.recipe()] if isinstance(report, ParameterizeReport) else []
    return json.loads(json.dumps(steps))


def read_recipe(path: str | Path) -> dict[str, Any] | None:
    """What :func:`save` stored to rebuild a model (``model``, ``model_kwargs``, ``parameterize``), or ``None`` for
    a file it did not write."""
    meta = read_metadata(path)
    if meta["kind"] != "convert":
        return None
    return dict(model=meta["model"], model_kwargs=meta["model_kwargs"], parameterize=meta["parameterize"])


def build_from_recipe(recipe: dict[str, Any]) -> nn.Module:
    """The architecture that metadata (or a :func:`read_recipe` dict) describes, with fresh weights: the timm model
    built with ``model_kwargs``, then the conversion steps redone (:func:`parameternet.conversion.apply_recipe`)."""
    model = create_model(recipe["model"], pretrained=False, **recipe.get("model_kwargs", {}))
    return apply_recipe(model, recipe.get("parameterize") or [])


def load(path: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save`, ``parameternet convert``, ``parameternet train`` or
    ``parameternet lm train`` and load its weights.

    ``path`` is a ``.safetensors`` file or a run directory: a ``train`` run's final weights
    (``checkpoints/final.safetensors``; pass ``checkpoints/final.ema.safetensors`` for the EMA's) or an
    ``lm train`` run's ``model/`` (transformers' ``save_pretrained`` output, loaded with its Auto classes). A file
    that names its timm model is rebuilt from it. For a model timm did not build (an ``nn.Module`` of your own),
    pass ``model``: that model built as it was before ``parameterize()``; the conversion steps the file records are
    redone on it (steps it has already been through are not), its weights are loaded and it is returned (a wrapped
    ``model``, ``torch.compile``'s output or ``DistributedDataParallel``, is unwrapped: the model inside it is
    loaded and returned). Weights saved from a wrapped model (keys under ``module.`` / ``_orig_mod.``) load too.

    Raises ParameterNetError for a missing file, a run directory without a final model (a run that has not
    finished), a file of a metadata format or with a conversion step this version does not know, a file that does
    not name its model when no ``model`` is given, a ``model`` converted with other steps than the file's, or
    weights that do not fit.
    """
    if model is not None and not isinstance(model, nn.Module):
        what = (
            f"the class {model.__name__}; pass an instance, {model.__name__}()"
            if isinstance(model, type)
            else (f"{type(model).__name__}; pass the nn.Module as you built it")
        )
        raise ParameterNetError(f"load(model=) takes an nn.Module, got {what}.")
    if model is not None:
        model = unwrap_model(model)
    path = Path(path)
    if path.is_dir():
        found = _run_model(path)
        if found.is_dir():
            if model is not None:
                raise ParameterNetError(
                    f"{str(found)!r} is a language model saved by lm train; drop model=, it is rebuilt from its "
                    f"config.json."
                )
            return _load_pretrained(found)
        path = found
    if not path.is_file():
        raise ParameterNetError(f"no such file: {str(path)!r}; pass a .safetensors file or a run directory.")
    state, info = load_weights(path)
    if model is not None:
        steps = _steps_to_redo(model, info["parameterize"], str(path))
        model = apply_recipe(model, steps)
    elif not info["model"]:
        raise ParameterNetError(
            f"{str(path)!r} does not name its model; build the model (a converted one as it was before "
            f"parameterize()) and pass it: parameternet.load(path, model=...)."
        )
    else:
        model = build_from_recipe(info)
    _load_state(model, state, str(path))
    return model


def _load_pretrained(directory: Path) -> nn.Module:
    """The language model an lm train run saved in ``directory`` (``save_pretrained`` output), float32, eval mode."""
    try:
        from transformers import AutoModelForCausalLM

        import parameternet.models.llama_moe  # noqa: F401  (registers parameternet_llama with the Auto classes)
    except ImportError as e:
        raise ParameterNetError(
            f"{str(directory)!r} holds a language model, which needs transformers; install it with "
            f"`pip install parameternet[lm]`."
        ) from e
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _steps_to_redo(model: nn.Module, steps: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """The conversion steps of ``steps`` that ``model`` has not been through yet."""
    done = _steps_of(model)
    if json.loads(json.dumps(steps[: len(done)])) != done:
        raise ParameterNetError(
            f"the model passed as model= was converted with other steps than {source!r} records; pass it as it was "
            f"built, before parameterize()."
        )
    return steps[len(done) :]


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly, wrapper prefixes (``module.``, ``_orig_mod.``) removed."""
    state = strip_wrapper_prefixes(state, model.state_dict(), repr(source))
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
    :func:`save` or ``parameternet train`` (or a train run directory: its final weights), a ``.safetensors`` state
    dict, or a ``torch.save`` file holding a state dict (plain or under ``state_dict`` / ``model`` / ...); the keys
    of a wrapped model (under ``module.`` / ``_orig_mod.``: DDP, torch.compile) are unwrapped. A checkpoint names its
    architecture under ``arch`` / ``model_name`` (timm's train script does) or takes it from ``arch``; a checkpoint
    that names another model than ``arch`` raises ParameterNetError, as do a missing or unreadable file, a file of
    a metadata format or with a conversion step this version does not know, and an unknown model.
    """
    from timm.models import get_pretrained_cfg_value

    path = _run_weights(Path(source))  # a train run directory: its final weights
    if not path.is_file():
        if path.suffix in (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar") or "/" in source:
            raise ParameterNetError(f"no such checkpoint file: {source!r}.")
        check_model_name(source)
        return create_model(source, pretrained=pretrained), source.split(".", 1)[0], {}

    kwargs: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        state, meta = load_weights(path)
        if meta["kind"] == "convert" or meta["parameterize"]:  # rebuilt with its conversion steps
            _check_arch(source, arch, meta["model"])
            return load(path), meta["model"], dict(meta["model_kwargs"])
        # parameternet's training checkpoints name the model and its build arguments in the metadata.
        found_arch = next((meta[k] for k in _ARCH_KEYS if isinstance(meta.get(k), str)), None)
        _check_arch(source, arch, found_arch)
        kwargs.update(meta["model_kwargs"])
    else:
        import argparse

        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:120]
            raise ParameterNetError(
                f"{source!r} is not a model checkpoint: neither safetensors nor a file torch.load reads safely "
                f"({type(e).__name__}: {first}); pass a .safetensors file written by parameternet or a torch.save "
                "state dict."
            ) from e
        state, found_arch = _find_state_and_arch(obj)
        if state is None:
            raise ParameterNetError(f"{source!r} is not a model checkpoint: it holds no state dict of tensors.")
    name = arch or found_arch
    if not name:
        raise ParameterNetError(f"checkpoint {source!r} does not name its architecture; pass --arch TIMM_NAME.")
    check_model_name(name)
    state = strip_wrapper_prefixes(state, source=repr(source))  # saved from torch.compile / DDP: module., _orig_mod.
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
