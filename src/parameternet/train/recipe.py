"""Recipes into typed dataclasses: YAML files and dotted ``key=value`` overrides, for any recipe type.

A recipe type is a dataclass whose fields are plain values (``int``, ``float``, ``bool``, ``str``, optional
ones, lists and free-form mappings) or sections (nested dataclasses), and which has a ``validate()`` method for
the cross-field checks. The YAML mapping mirrors the fields, sections as nested mappings; overrides such as
``optim.lr=5e-4`` are applied on top and checked the same way. Every mistake is one sentence: an unknown key
names the nearest valid one, a value of the wrong type says what was expected, a bad file says what is wrong
with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from parameternet.errors import ParameterNetError

__all__ = [
    "DEVICE_WORDS",
    "PARALLEL",
    "PARALLEL_WORDS",
    "RunConfig",
    "apply_overrides",
    "check_fields",
    "coerce",
    "device_ok",
    "from_dict",
    "load_recipe",
    "recipe_keys",
    "recipe_values",
]

R = TypeVar("R")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_fields(cfg: Any, checks: list[tuple[bool, str, str]]) -> None:
    """Raise ParameterNetError ``"KEY=VALUE is invalid; it must be WHAT"`` for the first ``(ok, key, what)`` that
    is not ok (``key`` dotted, its value read from ``cfg``)."""
    for ok, key, what in checks:
        if not ok:
            raise ParameterNetError(f"{key}={_get(cfg, key)!r} is invalid; it must be {what}")


PARALLEL = ("ddp", "fsdp")  # the values of a recipe's ``parallel`` (train and lm train)
PARALLEL_WORDS = "ddp (the whole model on every process) or fsdp (sharded)"  # for check_fields' messages

DEVICE_WORDS = "auto, cpu, cuda or cuda:N"  # what :func:`device_ok` accepts, for check_fields' messages


def device_ok(device: str) -> bool:
    """Whether ``device`` is a recipe's ``device`` value: auto, cpu, cuda or cuda:N (N a device index)."""
    return device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device) is not None


@dataclasses.dataclass
class RunConfig:
    """The keys every training recipe shares (``train``'s :class:`~parameternet.train.config.TrainConfig` and ``lm
    train``'s :class:`~parameternet.train.lm_config.LMTrainConfig`): the seed, the step budget's override, where
    the run writes and resumes, on what it runs and how it reports. A recipe type may give a key another default.
    """

    seed: int = 0
    max_steps: int | None = None  # overrides the recipe's own budget (epochs, max_tokens) when set
    output_dir: str = "runs/default"
    resume: str | None = None  # auto = the last checkpoint in output_dir, or a checkpoint path
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # ddp: every process holds the whole model (DistributedDataParallel under torchrun). fsdp: FSDP2, parameters,
    # gradients and optimizer states sharded over the processes (expert banks like any parameter), sharded
    # checkpoints (torch.distributed.checkpoint) that resume on any number of processes (see each recipe type)
    parallel: str = "ddp"
    threads: int | None = None  # torch intra-op threads; None = torch's default (OMP_NUM_THREADS)
    log_every: int = 50  # steps between train rows in metrics.jsonl
    keep_last: int = 2  # step checkpoints kept; the final ones are kept besides
    progress: bool = True  # tqdm bar when stderr is a terminal
    tensorboard: bool = False  # mirror metrics.jsonl to TensorBoard when tensorboard is installed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_checks(self) -> list[tuple[bool, str, str]]:
        """The :func:`check_fields` entries of the shared keys."""
        return [
            (self.max_steps is None or self.max_steps > 0, "max_steps", "a positive integer or null"),
            (device_ok(self.device), "device", DEVICE_WORDS),
            (self.parallel in PARALLEL, "parallel", PARALLEL_WORDS),
            (self.threads is None or self.threads > 0, "threads", "a positive integer or null (torch's default)"),
            (self.log_every >= 1, "log_every", "at least 1"),
            (self.keep_last >= 1, "keep_last", "at least 1"),
        ]


def recipe_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a recipe dataclass, in field order (sections expanded)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += recipe_keys(t, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def recipe_values(cfg: Any) -> dict[str, Any]:
    """Every dotted leaf key of the recipe ``cfg`` (a recipe dataclass instance) with its value, in field order."""
    return {key: _get(cfg, key) for key in recipe_keys(type(cfg))}


def _unknown_key(cls: type, key: str, where: str) -> ParameterNetError:
    valid = recipe_keys(cls)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6) or difflib.get_close_matches(
        key.split(".")[-1], [k.split(".")[-1] for k in valid], n=1, cutoff=0.6
    )
    if close and close[0] not in valid:  # matched a leaf name: report its full dotted key
        close = [k for k in valid if k.split(".")[-1] == close[0]][:1]
    if close:
        hint = f"did you mean {close[0]!r}?"
    else:
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        names = [k for k in valid if section and k.startswith(section)]
        if not names:  # top level: plain keys, then one entry per section
            names = list(dict.fromkeys(k if "." not in k else k.split(".")[0] + ".*" for k in valid))
        hint = f"valid keys: {', '.join(names)}"
    return ParameterNetError(f"unknown recipe key {key!r}{where}; {hint}")


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (strings, as overrides give them, are parsed); a value of
    another type raises ParameterNetError ``"recipe key KEY=VALUE has the wrong type; it must be ..."``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _bad(value, tp, key)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = parsed if isinstance(parsed, list) else [parsed]
        if isinstance(value, (list, tuple)):
            return [coerce(v, item, key) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is Any:
        return value
    return _bad(value, tp, key)


# A section where a plain value belongs, or the reverse, most often means a recipe of the other trainer.
_ANOTHER_COMMAND = (
    "the file may be a recipe for another command (`parameternet train` takes image-classification recipes such "
    "as configs/smoke.yaml, `parameternet lm train` language-model recipes such as configs/lm-small.yaml)"
)


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad(value: Any, tp: Any, key: str):
    origin = typing.get_origin(tp)
    what = _TYPE_WORDS.get(tp) or ("a list" if origin is list else "a mapping" if origin is dict else str(tp))
    hint = f"; {_ANOTHER_COMMAND}" if isinstance(value, dict) else ""
    raise ParameterNetError(f"recipe key {key}={_shown(value)} has the wrong type; it must be {what}{hint}")


def _fill(root: type, obj: Any, data: dict, prefix: str, where: str) -> None:
    if not isinstance(data, dict):
        raise ParameterNetError(
            f"recipe section {prefix.rstrip('.') or 'top level'}{where} must be a mapping of its keys, not "
            f"{_shown(data)}; {_ANOTHER_COMMAND}"
        )
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown_key(root, key, where)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            _fill(root, getattr(obj, k), v or {}, key + ".", where)
        else:
            setattr(obj, k, coerce(v, tp, key))


def from_dict(cls: type[R], data: dict | None, where: str = "") -> R:
    """A ``cls`` recipe from a (possibly partial) nested mapping, defaults filling the rest; ``where`` (e.g.
    ``" in r.yaml"``) goes into the error messages. Not validated."""
    cfg = cls()
    _fill(cls, cfg, data or {}, "", where)
    return cfg


def apply_overrides(cfg: R, overrides: list[str]) -> R:
    """Apply ``key=value`` strings (dotted keys) to the recipe ``cfg`` in place and return it."""
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ParameterNetError(f"override {item!r} is not key=value; write e.g. optim.lr=5e-4")
        parts = key.split(".")
        obj = cfg
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                raise _unknown_key(type(cfg), key, " in the overrides")
            tp = typing.get_type_hints(type(obj))[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(tp):
                    raise ParameterNetError(f"override {key!r} names a section; set one of its keys, e.g. {key}.x=")
                setattr(obj, part, coerce(value, tp, key))
            elif typing.get_origin(tp) is dict:  # free-form mapping, e.g. model_kwargs.num_experts=8
                getattr(obj, part)[".".join(parts[i + 1 :])] = yaml.safe_load(value) if value else None
                break
            else:
                obj = getattr(obj, part)
    return cfg


def read_yaml(path: str | Path, example: str) -> dict:
    """The mapping in a YAML recipe file (``{}`` when empty); a missing file, a directory or bad YAML raises
    ParameterNetError naming ``example``, a recipe to pass instead."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ParameterNetError(f"recipe {str(path)!r} {what}; pass a YAML file such as {example}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise ParameterNetError(f"recipe {str(path)!r} is not valid YAML{at}; fix the syntax") from None


def load_recipe(cls: type[R], path: str | Path | None, overrides: list[str] = (), example: str = "") -> R:
    """Load a YAML recipe into ``cls`` (its defaults when ``path`` is None), apply ``overrides``, and return
    ``validate()``'s result; every mistake raises ParameterNetError in one sentence."""
    data = read_yaml(path, example) if path is not None else {}
    cfg = from_dict(cls, data, f" in {Path(path)}" if path is not None else "")
    apply_overrides(cfg, list(overrides))
    return cfg.validate()
