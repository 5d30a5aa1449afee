"""The pieces of an image-classification run, built from its recipe (:class:`~parameternet.train.config.TrainConfig`):
the timm model (:func:`create_model`, :func:`init_from_checkpoint`), the per-image and batch transforms, the
optimizer and scheduler (the routers of the dynamic layers in groups of their own), the mixup / loss pair and mixed
precision. :class:`~parameternet.train.trainer.Trainer` and :mod:`parameternet.train.image_eval` build from them.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from typing import Any

import torch
import torch.nn as nn

from parameternet.data.pipeline import BatchTransform, pil_transform
from parameternet.errors import ParameterNetError
from parameternet.toolkit import strip_wrapper_prefixes
from parameternet.train.checkpoint import (
    MIN_MATCH,
    load_into,
    load_weights,
    resolve_weights,
)
from parameternet.train.config import TrainConfig

__all__ = [
    "AMP",
    "build_loss",
    "build_optimizer",
    "build_transforms",
    "classifier_classes",
    "create_model",
    "init_from_checkpoint",
    "router_param_groups",
]

log = logging.getLogger(__name__)


def create_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """``timm.create_model`` with the recipe's model, class count, input channels and extra arguments."""
    import timm

    import parameternet.models  # noqa: F401  (registers the paper's models in timm)

    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path > 0:
        kwargs["drop_path_rate"] = cfg.drop_path
    if not timm.is_model(cfg.model):
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see timm.list_models()"
        raise ParameterNetError(f"model {cfg.model!r} is not a timm model; {hint}")
    try:
        return timm.create_model(cfg.model, pretrained=False, num_classes=num_classes, in_chans=cfg.in_chans, **kwargs)
    except TypeError as e:
        raise ParameterNetError(f"model {cfg.model!r} rejects model_kwargs {kwargs} ({e}); fix model_kwargs") from None


def router_param_groups(
    model: nn.Module, weight_decay: float, router_lr_scale: float = 1.0, router_weight_decay: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: timm's weight-decay split (no decay on 1-d tensors), with the routers of the
    dynamic layers in groups of their own, learning at ``lr x router_lr_scale`` (timm's schedulers honour
    ``lr_scale``) with ``router_weight_decay`` (default: the others')."""
    from parameternet.layers import DynamicConv2d, DynamicLinear

    if router_lr_scale <= 0 or (router_weight_decay is not None and router_weight_decay < 0):
        raise ParameterNetError(
            f"optim.router_lr_scale={router_lr_scale} must be positive and optim.router_weight_decay="
            f"{router_weight_decay} not negative"
        )
    routers = {
        id(p) for m in model.modules() if isinstance(m, (DynamicConv2d, DynamicLinear)) for p in m.router.parameters()
    }
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = p.ndim > 1 and name not in skip
            groups.setdefault((id(p) in routers, decays), []).append(p)
    out = []
    for (router, decays), params in groups.items():
        wd = weight_decay if decays else 0.0
        if router and router_weight_decay is not None:
            wd = router_weight_decay if decays else 0.0
        out.append({"params": params, "weight_decay": wd, "lr_scale": router_lr_scale if router else 1.0})
    return out


def classifier_classes(model: nn.Module, state_dict: dict) -> int | None:
    """The class count of ``state_dict``'s classifier, named by the timm model's ``pretrained_cfg`` (None when it
    names none or the state dict lacks it)."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    w = strip_wrapper_prefixes(state_dict, model.state_dict()).get(f"{name}.weight") if name else None
    return int(w.shape[0]) if w is not None else None


def init_from_checkpoint(model: nn.Module, path: str, num_classes: int, strict: bool = True) -> None:
    """Load pretrained weights; a checkpoint with another class count gets a fresh classifier.

    With ``strict`` a checkpoint that fits fewer than 90% of the model's tensors (another architecture) raises
    ParameterNetError; without it whatever fits is loaded and the rest logged.
    """
    weights = resolve_weights(path)
    sd, meta = load_weights(weights)
    sd = strip_wrapper_prefixes(sd, model.state_dict(), f"checkpoint {weights}")  # saved from DDP / torch.compile
    min_match = MIN_MATCH if strict else 0.0
    if not strict:  # load what fits: tensors of another shape are left as initialised
        own = model.state_dict()
        misfit = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
        if misfit:
            log.warning("init from %s: %d tensors of another shape left as initialised: %s", weights, len(misfit),
                        misfit[:8])  # fmt: skip
            sd = {k: v for k, v in sd.items() if k not in misfit}
    src_classes = meta.get("num_classes") or classifier_classes(model, sd) or num_classes
    if src_classes != num_classes:
        model.reset_classifier(src_classes)  # shape the head like the checkpoint's, load, then replace it
        load_into(model, sd, str(weights), strict=False, min_match=min_match)
        model.reset_classifier(num_classes)
        log.info("init from %s: classifier re-initialised (%d -> %d classes)", weights, src_classes, num_classes)
    else:
        load_into(model, sd, str(weights), strict=False, min_match=min_match)
        log.info("init from %s (model %s, %d classes)", weights, meta.get("model", "?"), num_classes)


def build_transforms(cfg: TrainConfig, ds, train: bool, device: torch.device):
    """((per-image PIL transform or None, batch transform on the device), pipeline name) for a dataset."""
    in_memory = getattr(ds, "in_memory", False)
    pipeline = cfg.data.pipeline
    if pipeline == "auto":
        pipeline = "tensor" if in_memory and not (train and cfg.aug.randaugment) else "pil"
    if pipeline == "tensor" and not in_memory:
        raise ParameterNetError(f"data.pipeline=tensor needs an in-memory dataset; {ds.name!r} is read from disk")
    if pipeline == "tensor" and train and cfg.aug.randaugment:
        raise ParameterNetError(f"aug.randaugment={cfg.aug.randaugment!r} needs data.pipeline=pil (or auto)")
    a = cfg.aug
    if pipeline == "pil":
        per_image = pil_transform(
            train,
            cfg.img_size,
            cfg.data.mean,
            cfg.data.std,
            randaugment=a.randaugment,
            color_jitter=a.color_jitter,
            hflip=a.hflip,
            scale=tuple(a.scale),
            random_erasing=a.random_erasing,
            crop_pct=cfg.data.crop_pct,
            interpolation=cfg.data.interpolation,
        )
        # the PIL transform already normalised 3 channels; the batch transform only adapts them to in_chans
        batch = BatchTransform(False, cfg.img_size, cfg.in_chans, [0.0], [1.0])
    else:
        per_image = None
        batch = BatchTransform(
            train,
            cfg.img_size,
            cfg.in_chans,
            cfg.data.mean,
            cfg.data.std,
            hflip=a.hflip,
            crop_padding=a.crop_padding,
            random_erasing=a.random_erasing,
        )
    return (per_image, batch.to(device)), pipeline


class AMP:
    """Autocast context and (fp16 only) gradient scaler for the recipe's ``amp`` setting."""

    def __init__(self, mode: str, device: torch.device):
        if mode == "auto":
            mode = "none" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        if mode == "fp16" and device.type != "cuda":
            raise ParameterNetError("amp='fp16' needs a CUDA device; use amp=bf16 or amp=none on CPU")
        self.mode, self.device = mode, device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None

    def __call__(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def build_optimizer(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int, total_steps: int):
    """``(optimizer, scheduler)`` of the recipe: timm's ``create_optimizer_v2`` (the routers in groups of their own,
    :func:`router_param_groups`, when ``optim.router_lr_scale`` / ``router_weight_decay`` are set) and
    ``create_scheduler_v2`` stepped every update over ``total_steps`` (``scheduler.step_update(0)`` done; None when
    timm makes none). Raises ParameterNetError for an optimizer or schedule timm cannot make.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    o, s = cfg.optim, cfg.schedule
    extra = {k: v for k, v in (("betas", tuple(o.betas) if o.betas else None), ("eps", o.eps)) if v is not None}
    if o.router_lr_scale != 1.0 or o.router_weight_decay is not None:
        if o.layer_decay is not None:
            raise ParameterNetError(
                "optim.layer_decay cannot be combined with optim.router_lr_scale / optim.router_weight_decay; "
                "drop one of them"
            )
        groups = router_param_groups(model, o.weight_decay, o.router_lr_scale, o.router_weight_decay)
        extra["param_group_fn"] = lambda model: groups
    try:
        optimizer = create_optimizer_v2(
            model,
            opt=o.name,
            lr=o.lr,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
            layer_decay=o.layer_decay,
            **extra,
        )
    except (ValueError, AssertionError, KeyError) as e:
        raise ParameterNetError(f"optim.name={o.name!r} could not be created ({e}); use adamw or sgd") from None
    warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_epochs * steps_per_epoch)
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=s.name,
            num_epochs=total_steps,
            warmup_epochs=min(warmup, total_steps),
            warmup_lr=s.warmup_lr,
            min_lr=s.min_lr,
            step_on_epochs=False,
            updates_per_epoch=1,
        )
    except (ValueError, AssertionError) as e:
        raise ParameterNetError(f"schedule.name={s.name!r} could not be created ({e}); use e.g. cosine") from None
    if scheduler is not None:
        scheduler.step_update(0)
    return optimizer, scheduler


def build_loss(cfg: TrainConfig, num_classes: int) -> tuple[Any, nn.Module]:
    """``(mixup, criterion)`` of the recipe's ``aug`` section: timm's ``Mixup`` (None without mixup / cutmix) with
    soft-target cross-entropy, else label-smoothing or plain cross-entropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    a = cfg.aug
    if a.mixup > 0 or a.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
            label_smoothing=a.label_smoothing, num_classes=num_classes,
        )  # fmt: skip
        return mixup, SoftTargetCrossEntropy()
    if a.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=a.label_smoothing)
    return None, nn.CrossEntropyLoss()
