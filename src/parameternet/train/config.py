"""Training recipes: typed dataclasses loaded from YAML, with dotted ``key=value`` overrides (paper Table 1).

A recipe is a YAML mapping whose keys mirror :class:`TrainConfig` (sections ``data``, ``aug``, ``optim`` and
``schedule`` are nested mappings). Overrides such as ``optim.lr=5e-4`` or ``data.train=folder:/data/train`` are
applied on top and checked the same way: an unknown key names the nearest valid one, a value of the wrong type
says what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from parameternet.errors import ParameterNetError

__all__ = [
    "AugConfig",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
]


@dataclass
class DataConfig:
    train: str = "fashion-mnist:train"  # dataset spec, grammar in parameternet.data.images
    val: str | None = "fashion-mnist:test"
    pipeline: str = "auto"  # auto | tensor | pil (see parameternet.data.pipeline)
    num_workers: int = 0
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    crop_pct: float = 0.875  # evaluation resize + centre crop (pil pipeline)
    interpolation: str = "bilinear"


@dataclass
class AugConfig:
    randaugment: str | None = None  # timm policy string, e.g. rand-m9-mstd0.5-inc1 (pil pipeline)
    color_jitter: float = 0.0  # pil pipeline, ignored when randaugment is set
    hflip: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area (pil pipeline)
    crop_padding: int = 0  # random crop with zero padding at the native size (tensor pipeline)
    random_erasing: float = 0.0
    mixup: float = 0.0  # mixup alpha; 0 = off
    cutmix: float = 0.0  # cutmix alpha; 0 = off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # any timm optimizer name (adamw, sgd = SGD with Nesterov momentum, lamb, ...)
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: list[float] | None = None
    eps: float | None = None
    layer_decay: float | None = None
    clip_grad: float | None = None  # max global gradient norm
    router_lr_scale: float = 1.0  # the dynamic layers' routers learn at lr x this (timm's per-group lr_scale)
    router_weight_decay: float | None = None  # the routers' weight decay; None: weight_decay, like other weights


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # timm scheduler name, updated every step
    warmup_epochs: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6


@dataclass
class TrainConfig:
    model: str = "resnet10t"  # any timm model name; `import parameternet` registers the paper's models
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    drop_path: float = 0.0  # stochastic depth rate
    num_classes: int | None = None  # default: the training set's class count
    in_chans: int = 3
    img_size: int = 224
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 128  # global, across all ranks
    eval_batch_size: int | None = None  # default: batch_size
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: float | None = None  # EMA decay of the weights; None = off
    amp: str = "auto"  # auto (bf16/fp16 autocast on GPU, off on CPU) | none | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    channels_last: bool = False
    sync_bn: bool = False
    output_dir: str = "runs/default"
    init_from: str | None = None  # checkpoint to start from (pretrain -> fine-tune)
    init_strict: bool = (
        True  # init_from refuses a checkpoint fitting < 90% of the model's tensors; false loads what fits
    )
    resume: str | None = None  # auto = last checkpoint in output_dir, or a checkpoint path
    log_every: int = 50  # steps between train rows in metrics.jsonl
    eval_every_epochs: int = 1  # 0 = only at the end
    eval_every_steps: int | None = None
    ckpt_every_epochs: int = 1
    ckpt_every_steps: int | None = None
    keep_last: int = 2  # step checkpoints kept; best and final are kept besides
    progress: bool = True  # tqdm bar when stderr is a terminal
    tensorboard: bool = False  # write TensorBoard events when tensorboard is installed

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["init_strict"]:  # the default is left out, so recipes (and run hashes) from before it stay the same
            del d["init_strict"]
        return d

    def validate(self) -> TrainConfig:
        """Cross-field checks that one type annotation cannot express."""
        from parameternet.data.images import parse_spec

        checks = [
            (self.batch_size > 0, "batch_size", "a positive integer"),
            (self.epochs > 0 or (self.max_steps or 0) > 0, "epochs", "positive (or set max_steps)"),
            (self.max_steps is None or self.max_steps > 0, "max_steps", "a positive integer"),
            (self.img_size > 0, "img_size", "a positive integer"),
            (self.in_chans in (1, 3), "in_chans", "1 or 3"),
            (self.amp in ("auto", "none", "bf16", "fp16"), "amp", "one of auto, none, bf16, fp16"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", "auto, cpu or cuda"),
            (self.data.pipeline in ("auto", "tensor", "pil"), "data.pipeline", "one of auto, tensor, pil"),
            (self.ema is None or 0 < self.ema < 1, "ema", "a decay in (0, 1) or null"),
            (self.keep_last >= 1, "keep_last", "at least 1"),
            (self.ckpt_every_epochs >= 0, "ckpt_every_epochs", "0 (no periodic checkpoints) or more"),
            (self.ckpt_every_steps is None or self.ckpt_every_steps >= 0, "ckpt_every_steps", "0 (none) or more"),
            (self.log_every >= 1, "log_every", "at least 1"),
            (self.optim.lr > 0, "optim.lr", "positive"),
            (self.num_classes is None or self.num_classes > 0, "num_classes", "a positive integer or null"),
            (len(self.aug.scale) == 2, "aug.scale", "two numbers [min, max]"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ParameterNetError(f"{key}={_get(self, key)!r} is invalid; it must be {what}")
        parse_spec(self.data.train)
        if self.data.val is not None:
            parse_spec(self.data.val)
        return self


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += _keys(t, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _unknown_key(key: str, where: str) -> ParameterNetError:
    valid = _keys(TrainConfig)
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


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; strings (from overrides) are parsed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
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
            return [_coerce(v, item, key) for v in value]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is Any:
        return value
    return _bad(value, tp, key)


def _bad(value: Any, tp: Any, key: str):
    origin = typing.get_origin(tp)
    what = _TYPE_WORDS.get(tp) or ("a list" if origin is list else "a mapping" if origin is dict else str(tp))
    raise ParameterNetError(f"recipe key {key}={value!r} has the wrong type; it must be {what}")


def _fill(obj: Any, data: dict, prefix: str, where: str) -> None:
    if not isinstance(data, dict):
        raise ParameterNetError(f"recipe section {prefix.rstrip('.') or 'top level'}{where} must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown_key(key, where)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            _fill(getattr(obj, k), v or {}, key + ".", where)
        else:
            setattr(obj, k, _coerce(v, tp, key))


def config_from_dict(data: dict, where: str = "") -> TrainConfig:
    """A TrainConfig from a (possibly partial) nested mapping; defaults fill the rest."""
    cfg = TrainConfig()
    _fill(cfg, data or {}, "", where)
    return cfg


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings (dotted keys) to ``cfg`` in place and return it."""
    for item in overrides:
        if "=" not in item:
            raise ParameterNetError(f"override {item!r} is not key=value; write e.g. optim.lr=5e-4")
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        obj = cfg
        for i, part in enumerate(parts):
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                raise _unknown_key(key, " in the overrides")
            tp = typing.get_type_hints(type(obj))[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(tp):
                    raise ParameterNetError(f"override {key!r} names a section; set one of its keys, e.g. {key}.x=")
                setattr(obj, part, _coerce(value, tp, key))
            elif typing.get_origin(tp) is dict:  # free-form mapping, e.g. model_kwargs.num_experts=8
                getattr(obj, part)[".".join(parts[i + 1 :])] = yaml.safe_load(value) if value else None
                break
            else:
                obj = getattr(obj, part)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Load a YAML recipe (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ParameterNetError(f"recipe {str(path)!r} {what}; pass a YAML file such as configs/smoke.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            at = f" at line {line + 1}" if line is not None else ""
            raise ParameterNetError(f"recipe {str(path)!r} is not valid YAML{at}; fix the syntax") from None
        where = f" in {path}"
    cfg = config_from_dict(data, where)
    apply_overrides(cfg, list(overrides))
    return cfg.validate()
