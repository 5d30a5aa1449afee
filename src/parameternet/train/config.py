"""Training recipes: typed dataclasses loaded from YAML, with dotted ``key=value`` overrides (paper Table 1).

A recipe is a YAML mapping whose keys mirror :class:`TrainConfig` (sections ``data``, ``aug``, ``optim`` and
``schedule`` are nested mappings). Overrides such as ``optim.lr=5e-4`` or ``data.train=folder:/data/train`` are
applied on top and checked the same way: an unknown key names the nearest valid one, a value of the wrong type
says what was expected (the loader, shared with the language-model recipes, is :mod:`parameternet.train.recipe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parameternet.train.recipe import RunConfig, apply_overrides, check_fields, from_dict, load_recipe

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
class TrainConfig(RunConfig):
    """``train``'s recipe: the model, data, augmentation, optimizer and schedule sections, with the keys every run
    shares (:class:`~parameternet.train.recipe.RunConfig`: ``max_steps`` overrides ``epochs``). ``parallel=fsdp``
    shards per stage, the EMA too; with ``amp=bf16`` the stages' weights are gathered in bf16 (routers and the
    root's stem / head in float32)."""

    model: str = "resnet10t"  # any timm model name or one of the paper's models
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    drop_path: float = 0.0  # stochastic depth rate
    num_classes: int | None = None  # default: the training set's class count
    in_chans: int = 3
    img_size: int = 224
    epochs: int = 1
    batch_size: int = 128  # global, across all ranks
    eval_batch_size: int | None = None  # default: batch_size
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: float | None = None  # EMA decay of the weights; None = off
    amp: str = "auto"  # auto (bf16/fp16 autocast on GPU, off on CPU) | none | bf16 | fp16
    channels_last: bool = False
    sync_bn: bool = False
    init_from: str | None = None  # checkpoint to start from (pretrain -> fine-tune)
    init_strict: bool = (
        True  # init_from refuses a checkpoint fitting < 90% of the model's tensors; false loads what fits
    )
    eval_every_epochs: int = 1  # 0 = only at the end
    eval_every_steps: int | None = None
    ckpt_every_epochs: int = 1
    ckpt_every_steps: int | None = None

    def validate(self) -> TrainConfig:
        """Cross-field checks that one type annotation cannot express; ParameterNetError names the first bad key,
        its value and what it must be."""
        from parameternet.data.images import parse_spec

        checks = [
            *self.run_checks(),
            (self.batch_size > 0, "batch_size", "a positive integer"),
            (self.epochs > 0 or (self.max_steps or 0) > 0, "epochs", "positive (or set max_steps)"),
            (self.img_size > 0, "img_size", "a positive integer"),
            (self.in_chans in (1, 3), "in_chans", "1 or 3"),
            (self.amp in ("auto", "none", "bf16", "fp16"), "amp", "one of auto, none, bf16, fp16"),
            (
                self.parallel != "fsdp" or self.amp != "fp16",
                "amp",
                "auto, none or bf16 with parallel=fsdp (FSDP gathers bf16 weights; fp16 needs a gradient scaler "
                "over sharded gradients, which is not wired up)",
            ),
            (self.data.pipeline in ("auto", "tensor", "pil"), "data.pipeline", "one of auto, tensor, pil"),
            (self.ema is None or 0 < self.ema < 1, "ema", "a decay in (0, 1) or null"),
            (self.ckpt_every_epochs >= 0, "ckpt_every_epochs", "0 (no periodic checkpoints) or more"),
            (self.ckpt_every_steps is None or self.ckpt_every_steps >= 0, "ckpt_every_steps", "0 (none) or more"),
            (self.eval_batch_size is None or self.eval_batch_size > 0, "eval_batch_size", "a positive integer or null"),
            (self.eval_every_epochs >= 0, "eval_every_epochs", "0 (at the end only) or more"),
            (self.eval_every_steps is None or self.eval_every_steps >= 0, "eval_every_steps", "0 (none) or more"),
            (self.data.num_workers >= 0, "data.num_workers", "0 (load in the main process) or more"),
            (0 < self.data.crop_pct <= 1, "data.crop_pct", "in (0, 1]"),
            (0 <= self.drop_path < 1, "drop_path", "in [0, 1)"),
            (0 <= self.aug.hflip <= 1, "aug.hflip", "a probability in [0, 1]"),
            (0 <= self.aug.random_erasing <= 1, "aug.random_erasing", "a probability in [0, 1]"),
            (0 <= self.aug.mixup_prob <= 1, "aug.mixup_prob", "a probability in [0, 1]"),
            (self.aug.mixup >= 0, "aug.mixup", "0 (off) or a positive alpha"),
            (self.aug.cutmix >= 0, "aug.cutmix", "0 (off) or a positive alpha"),
            (0 <= self.aug.label_smoothing < 1, "aug.label_smoothing", "in [0, 1)"),
            (self.aug.crop_padding >= 0, "aug.crop_padding", "0 or more"),
            (self.schedule.warmup_epochs >= 0, "schedule.warmup_epochs", "0 or more"),
            (
                self.schedule.warmup_steps is None or self.schedule.warmup_steps >= 0,
                "schedule.warmup_steps",
                "0 or more, or null (use warmup_epochs)",
            ),
            (self.optim.lr > 0, "optim.lr", "positive"),
            (self.num_classes is None or self.num_classes > 0, "num_classes", "a positive integer or null"),
            (len(self.aug.scale) == 2, "aug.scale", "two numbers [min, max]"),
        ]
        check_fields(self, checks)
        parse_spec(self.data.train)
        if self.data.val is not None:
            parse_spec(self.data.val)
        return self


def config_from_dict(data: dict, where: str = "") -> TrainConfig:
    """A TrainConfig from a (possibly partial) nested mapping; defaults fill the rest."""
    return from_dict(TrainConfig, data, where)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Load a YAML recipe (or defaults when ``path`` is None), apply overrides, validate."""
    return load_recipe(TrainConfig, path, overrides, example="configs/smoke.yaml")
