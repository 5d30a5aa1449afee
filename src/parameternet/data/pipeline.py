"""The input pipeline: from a dataset to normalised batches at the model's input size (paper Table 1 augmentation).

Two paths, chosen per recipe:

- **tensor**: for in-memory datasets without PIL augmentation. The loader hands out uint8 batches
  ``(B, C, h, w)`` gathered with one indexing op; :class:`BatchTransform` then runs on the training device:
  random crop with padding and horizontal flip at the native size, resize to ``img_size``, grey -> RGB
  replication, normalisation, and timm's ``RandomErasing`` on the whole batch. Nothing is decoded per image.
- **pil**: timm's ``create_transform`` per image (RandomResizedCrop, flip, RandAugment or colour jitter,
  random erasing; resize + centre crop for evaluation). Folders always take this path, and so does any recipe
  that asks for RandAugment, because timm's RandAugment operates on PIL images.

Reproducibility: the training sampler yields ``(index, sample_seed)`` keys; a PIL transform runs after seeding
the python, numpy and torch CPU generators with that sample's seed, so an image's augmentation depends only on
(seed, epoch, index), whichever worker or resumed process draws it.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from parameternet.errors import ParameterNetError

__all__ = ["BatchTransform", "LoaderDataset", "collate", "pil_transform", "resolve_mean_std"]


def resolve_mean_std(mean, std, chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean / std for ``chans`` channels; a single value is broadcast."""
    out = []
    for name, v in (("mean", mean), ("std", std)):
        v = tuple(float(x) for x in v)
        if len(v) == 1:
            v = v * chans
        if len(v) != chans:
            raise ParameterNetError(f"data.{name}={list(v)} has {len(v)} values for {chans} input channels")
        if name == "std" and min(v) <= 0:
            raise ParameterNetError(f"data.std={list(v)} must be positive")
        out.append(v)
    return out[0], out[1]


def pil_transform(
    train: bool,
    img_size: int,
    mean,
    std,
    *,
    randaugment: str | None = None,
    color_jitter: float = 0.4,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    random_erasing: float = 0.0,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
):
    """timm's ImageNet-style transform producing normalised 3-channel float tensors."""
    from timm.data import create_transform

    mean, std = resolve_mean_std(mean, std, 3)
    if train:
        return create_transform(
            img_size,
            is_training=True,
            scale=tuple(scale),
            hflip=hflip,
            color_jitter=color_jitter,
            auto_augment=randaugment or None,
            interpolation=interpolation,
            mean=mean,
            std=std,
            re_prob=random_erasing,
            re_mode="pixel",
        )
    return create_transform(img_size, interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct)


class BatchTransform(torch.nn.Module):
    """Batch-level preprocessing on the training device (see the module docstring, tensor path).

    A float batch (already normalised by a PIL transform) only has its channels adapted to ``in_chans``.
    """

    def __init__(
        self,
        train: bool,
        img_size: int,
        in_chans: int,
        mean,
        std,
        *,
        hflip: float = 0.0,
        crop_padding: int = 0,
        random_erasing: float = 0.0,
    ):
        super().__init__()
        self.train_mode, self.img_size, self.in_chans = train, img_size, in_chans
        self.hflip, self.crop_padding = (hflip, crop_padding) if train else (0.0, 0)
        mean, std = resolve_mean_std(mean, std, in_chans)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)
        self.erase = None
        if train and random_erasing > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(random_erasing, mode="pixel", device="cpu")

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.in_chans:
            return x
        if c == 1:
            return x.expand(-1, self.in_chans, -1, -1)
        if self.in_chans == 1 and c == 3:
            return x.mean(dim=1, keepdim=True)
        raise ParameterNetError(f"images have {c} channels and the model takes in_chans={self.in_chans}")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return self._channels(x)
        x = x.float()  # (B, C, h, w) in [0, 255]
        if self.crop_padding > 0:
            x = self._random_crop(x, self.crop_padding)
        if self.hflip > 0:
            flip = torch.rand(x.shape[0]) < self.hflip
            x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = (self._channels(x) - self.mean) / self.std
        if self.erase is not None:
            self.erase.device = x.device
            x = self.erase(x)
        return x.contiguous()

    @staticmethod
    def _random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
        b, _, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,)).tolist()
        dx = torch.randint(0, 2 * pad + 1, (b,)).tolist()
        return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def _seed_sample(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.random.default_generator.manual_seed(seed)


class LoaderDataset(torch.utils.data.Dataset):
    """What the DataLoader indexes: a dataset plus an optional per-image PIL transform.

    Keys are indices or ``(index, sample_seed)`` pairs. Without a transform an in-memory dataset answers a whole
    batch with one gather (``__getitems__``), returning uint8 images for :class:`BatchTransform`.
    """

    def __init__(self, base, transform=None):
        if transform is None and not getattr(base, "in_memory", False):
            raise ParameterNetError(f"dataset {base.name!r} is read from disk and needs the 'pil' pipeline")
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if self.transform is None:
            img, target = self.base.batch([index])
            return img[0], target[0]
        if seed is not None:
            _seed_sample(seed)
        img, target = self.base.load_pil(index)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return self.transform(img), target

    def __getitems__(self, keys):
        if self.transform is None:
            return self.base.batch([k[0] if isinstance(k, tuple) else k for k in keys])
        return [self[k] for k in keys]


def collate(batch):
    """Batches from ``__getitems__`` arrive already stacked; per-image samples go through default_collate."""
    if isinstance(batch, tuple):
        return batch
    return default_collate(batch)
