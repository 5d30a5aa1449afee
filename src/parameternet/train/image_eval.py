"""Evaluating an image classifier: loss, top-1 and top-5 over a loader (:func:`evaluate`, in lockstep under FSDP)
and of a saved checkpoint on a dataset (:func:`evaluate_checkpoint`, ``parameternet eval``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from parameternet.data.images import build_dataset
from parameternet.data.pipeline import LoaderDataset, collate
from parameternet.errors import ParameterNetError
from parameternet.train import distributed as D
from parameternet.train.checkpoint import (
    load_into,
    load_weights,
    read_metadata,
    resolve_weights,
)
from parameternet.train.config import apply_overrides, config_from_dict
from parameternet.train.image_build import AMP, build_transforms, classifier_classes, create_model
from parameternet.train.loop import seed_all

__all__ = ["evaluate", "evaluate_checkpoint"]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, transform: nn.Module, device: torch.device, amp: AMP, lockstep: bool = False
) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over a loader, summed over ranks. ``lockstep``: every rank runs as many
    forward passes as the rank with the most batches (one with fewer repeats its first batch and counts nothing),
    for a model whose forward is a collective (FSDP)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, images
    extra = 0
    if lockstep:
        extra = int(D.all_reduce_max(torch.tensor([len(loader)], device=device)).item()) - len(loader)
    first = None
    for x, y in loader:
        x, y = transform(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        first = x[:1] if first is None else first
        with amp():
            out = model(x)
        out = out.float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        sums += torch.stack(
            [
                F.cross_entropy(out, y, reduction="sum").double(),
                (top[:, 0] == y).sum().double(),
                (top == y[:, None]).any(dim=1).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=device),
            ]
        )
    for _ in range(extra):  # lockstep: the others' forward passes need this rank's share of the weights
        with amp():
            model(first if first is not None else _first_batch(loader, transform, device))
    D.all_reduce_sum(sums)
    n = max(sums[3].item(), 1.0)
    return {
        "loss": sums[0].item() / n,
        "top1": 100 * sums[1].item() / n,
        "top5": 100 * sums[2].item() / n,
        "images": int(sums[3].item()),
    }


def _first_batch(loader, transform: nn.Module, device: torch.device) -> torch.Tensor:
    """One image of the loader's dataset as a batch (lockstep evaluation on a rank whose shard is empty)."""
    x, _ = collate([loader.dataset[0]])
    return transform(x.to(device))


def evaluate_checkpoint(path: str, overrides: list[str]) -> dict[str, Any]:
    """Top-1 / top-5 / loss of a checkpoint on ``data=SPEC`` (the recipe comes from the checkpoint)."""
    weights = resolve_weights(path)
    meta = read_metadata(weights)
    if not meta["model"]:
        raise ParameterNetError(
            f"{str(weights)!r} does not name its model (no parameternet metadata); evaluate a file written by "
            f"parameternet train or convert"
        )
    sd, _ = load_weights(weights)
    if meta["config"]:
        cfg = config_from_dict(meta["config"])
    else:  # a convert / parameterize.save output: the model's own input size and channels
        cfg = config_from_dict({"model": meta["model"]})
        cfg.model_kwargs = {k: v for k, v in meta["model_kwargs"].items() if k not in ("num_classes", "in_chans")}
        cfg.in_chans = meta["in_chans"] or cfg.in_chans
        cfg.img_size = meta["img_size"] or cfg.img_size
    cfg.resume = cfg.init_from = None
    overrides = [f"data.val={o.split('=', 1)[1]}" if o.startswith("data=") else o for o in overrides]
    apply_overrides(cfg, overrides)
    if not cfg.data.val:
        raise ParameterNetError("no dataset to evaluate on; pass data=SPEC, e.g. data=fashion-mnist:test")
    cfg.validate()
    dist = D.setup(cfg.device)
    try:
        seed_all(cfg.seed)
        if meta["parameterize"]:  # a converted model: rebuilt from its recipe
            from parameternet.io import build_from_recipe

            model = build_from_recipe(meta)
            num_classes = int(meta["num_classes"] or model.num_classes)
        else:
            num_classes = int(meta["num_classes"] or classifier_classes(create_model(cfg, 1), sd) or 1000)
            model = create_model(cfg, num_classes)
        load_into(model, sd, str(weights), strict=True)
        model.to(dist.device)
        ds = build_dataset(cfg.data.val)
        if ds.num_classes > num_classes:
            raise ParameterNetError(
                f"data={cfg.data.val!r} has {ds.num_classes} classes but checkpoint predicts {num_classes}"
            )
        (per_image, batch_tf), _ = build_transforms(cfg, ds, False, dist.device)
        batch = (cfg.eval_batch_size or cfg.batch_size) // dist.world_size or 1
        loader = torch.utils.data.DataLoader(
            LoaderDataset(ds, per_image),
            batch_size=batch,
            sampler=D.ShardSampler(len(ds), dist.world_size, dist.rank),
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
        )
        result = evaluate(model, loader, batch_tf, dist.device, AMP(cfg.amp, dist.device))
    finally:
        D.cleanup()
    return {"checkpoint": str(weights), "data": cfg.data.val, **result}
