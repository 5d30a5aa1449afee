"""Image classification datasets named by a spec string (docs/training.md, docs/experiments/pitfall.md).

A recipe names its data with one string::

    SPEC    := SOURCE [":" SPLIT] (":" OPTION)*
    SOURCE  := fashion-mnist | mnist | union | cifar10 | cifar100 | folder:PATH | wds:PATTERN
    SPLIT   := train | test          (not for folder: the folder is the split)
    OPTION  := per_class=N           N images of every class, drawn reproducibly with the subset seed
             | limit=N               N images drawn reproducibly from the whole split (after per_class)
             | seed=N                the subset seed (default 0, independent of the training seed)
             | download=BOOL         torchvision datasets only: download when missing (default true)
             | root=DIR              torchvision datasets only: where they live (default the data cache)

Examples: ``fashion-mnist:train``, ``fashion-mnist:train:per_class=100``, ``union:train`` (alias
``mnist+fashion-mnist:train``; labels 0-9 are MNIST digits, 10-19 the Fashion-MNIST classes),
``folder:/data/imagenet/train`` (ImageNet layout: one sub-directory per class), ``cifar10:test``,
``wds:/data/in22k/train-{000000..001023}.tar`` (webdataset tar shards of images and ``.cls`` labels, read by offset:
:mod:`parameternet.data.shards`; an epoch takes every sample once, so the trainer refuses a batch that does not
split the samples evenly).

The packaged sets (Fashion-MNIST, MNIST, the union) and CIFAR live in memory as uint8 tensors ``(N, C, H, W)``
and can be batched without decoding single images; folders decode one image at a time with PIL.
"""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from parameternet.data.fetch import cache_dir, dataset_path
from parameternet.errors import ParameterNetError

__all__ = [
    "DataSpec",
    "FolderImages",
    "ImageSet",
    "TensorImages",
    "build_dataset",
    "class_balanced_indices",
    "parse_spec",
    "read_idx",
]

log = logging.getLogger(__name__)

FASHION_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
DIGIT_CLASSES = tuple(f"digit {i}" for i in range(10))
PACKAGED = ("fashion-mnist", "mnist", "union")
TORCHVISION = ("cifar10", "cifar100")
PATH_SOURCES = ("folder", "wds")  # SOURCE:PATH[:OPTION ...], the path may hold ':'
SOURCES = (*PACKAGED, *TORCHVISION, *PATH_SOURCES)
ALIASES = {"mnist+fashion-mnist": "union"}
SPLITS = ("train", "test")
_INT_OPTIONS = ("per_class", "limit", "seed")
_OPTION = re.compile(r"^([a-z_]+)=(.*)$")


@dataclass(frozen=True)
class DataSpec:
    """A parsed dataset spec; ``str(spec)`` is the text it came from."""

    source: str
    split: str | None = None
    path: str | None = None
    per_class: int | None = None
    limit: int | None = None
    seed: int = 0
    download: bool = True
    root: str | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text


def parse_spec(text: str) -> DataSpec:
    """Parse ``SOURCE[:SPLIT][:key=value ...]``; raises ParameterNetError naming the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise ParameterNetError(f"dataset spec {text!r} is empty; use e.g. 'fashion-mnist:train'")
    parts = text.strip().split(":")
    source = ALIASES.get(parts[0], parts[0])
    if source not in SOURCES:
        raise ParameterNetError(f"dataset spec {text!r} names unknown source {parts[0]!r}; use one of {SOURCES}")
    rest = parts[1:]
    kw: dict = {"source": source, "text": text}
    if source in PATH_SOURCES:
        # the path may itself contain ':'; options are the trailing key=value parts
        n = len(rest)
        while n > 0 and _OPTION.match(rest[n - 1]):
            n -= 1
        if n == 0 or not ":".join(rest[:n]):
            example = "folder:/path/to/train" if source == "folder" else "wds:shards/train-{000000..000009}.tar"
            raise ParameterNetError(f"dataset spec {text!r} has no path; use {example!r}")
        kw["path"] = ":".join(rest[:n])
        rest = rest[n:]
    elif rest and not _OPTION.match(rest[0]):
        if rest[0] not in SPLITS:
            raise ParameterNetError(f"dataset spec {text!r} has unknown split {rest[0]!r}; use 'train' or 'test'")
        kw["split"] = rest[0]
        rest = rest[1:]
    else:
        raise ParameterNetError(f"dataset spec {text!r} has no split; use '{parts[0]}:train' or '{parts[0]}:test'")
    for opt in rest:
        m = _OPTION.match(opt)
        if not m:
            raise ParameterNetError(f"dataset spec {text!r} has option {opt!r} that is not key=value")
        key, value = m.groups()
        if key in _INT_OPTIONS:
            try:
                kw[key] = int(value)
            except ValueError:
                raise ParameterNetError(f"dataset spec {text!r}: {key}={value!r} is not an integer") from None
            if key != "seed" and kw[key] <= 0:
                raise ParameterNetError(f"dataset spec {text!r}: {key}={value} must be a positive integer")
        elif key == "download" and source in TORCHVISION:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ParameterNetError(f"dataset spec {text!r}: download={value!r} is not true or false")
            kw[key] = value.lower() in ("true", "1", "yes")
        elif key == "root" and source in TORCHVISION:
            kw[key] = value
        else:
            valid = [*_INT_OPTIONS, *(("download", "root") if source in TORCHVISION else ())]
            raise ParameterNetError(f"dataset spec {text!r} has unknown option {key!r}; valid options: {valid}")
    return DataSpec(**kw)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or raw, into a numpy array of its stored dtype."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ParameterNetError(f"{path} is not an IDX file (bad magic number); fetch the dataset again")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ParameterNetError(f"{path} has unknown IDX element type {raw[2]:#x}; fetch the dataset again")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ParameterNetError(f"{path} holds {data.size} values, its header says {shape}; fetch it again")
    return data.reshape(shape)


def class_balanced_indices(targets: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` indices of every class, drawn with ``seed``, returned sorted."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        if len(idx) < per_class:
            raise ParameterNetError(f"per_class={per_class} asks for more images than class {c} has ({len(idx)})")
        out.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(out))


def _subset_indices(targets: np.ndarray, spec: DataSpec) -> np.ndarray | None:
    idx = None
    if spec.per_class is not None:
        idx = class_balanced_indices(targets, spec.per_class, spec.seed)
    if spec.limit is not None:
        pool = np.arange(len(targets)) if idx is None else idx
        if spec.limit < len(pool):
            rng = np.random.default_rng(spec.seed + 1)
            idx = np.sort(rng.choice(pool, spec.limit, replace=False))
    return idx


class ImageSet(torch.utils.data.Dataset):
    """What every image dataset here holds: ``targets`` (int64 class indices, one per image), ``classes`` (their
    names) and ``name``; images of one size in memory say so (``in_memory``, ``image_shape``), others decode one
    image at a time (``load_pil``)."""

    in_memory = False
    targets: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` of every image, or None where the images differ in size."""
        return None


class TensorImages(ImageSet):
    """Images held in memory as a uint8 tensor ``(N, C, H, W)`` with int64 targets."""

    in_memory = True

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: tuple[str, ...], name: str = ""):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ParameterNetError(f"in-memory images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        self.images, self.targets, self.classes, self.name = images, targets.long(), tuple(classes), name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.targets[idx]

    def load_pil(self, i: int) -> tuple[Image.Image, int]:
        img = self.images[i].numpy()
        pil = Image.fromarray(img[0], mode="L") if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))
        return pil, int(self.targets[i])

    def subset(self, indices: np.ndarray) -> TensorImages:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImages(self.images[idx], self.targets[idx], self.classes, self.name)


class FolderImages(ImageSet):
    """An ImageNet-layout folder (``root/<class>/<image>``), decoded with PIL one image at a time."""

    def __init__(self, root: str | Path):
        from torchvision.datasets import ImageFolder

        root = Path(root).expanduser()
        if not root.is_dir():
            raise ParameterNetError(f"image folder {str(root)!r} does not exist; point the spec at a directory")
        try:
            folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as e:
            msg = f"image folder {str(root)!r} has no class sub-directories of images ({e})"
            raise ParameterNetError(msg) from None
        self.root, self.name = root, f"folder:{root}"
        self.samples = list(folder.samples)
        self.classes = tuple(folder.classes)
        self.targets = torch.as_tensor([t for _, t in self.samples], dtype=torch.long)

    def load_pil(self, i: int) -> tuple[Image.Image, int]:
        """Image ``i`` decoded by PIL, and its class; raises :class:`ParameterNetError` naming a file that is not
        a readable image."""
        path, target = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                img.load()
        except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ParameterNetError(
                f"image {path!r} could not be decoded ({type(e).__name__}: {e}); remove or replace the file"
            ) from None
        return img, target

    def encoded(self, i: int) -> tuple[bytes, str] | None:
        """Image ``i``'s file as stored and its extension (``"jpg"``, ``"png"``, ...), lower case, for
        :func:`~parameternet.data.shards.write_shards` to copy without decoding; None for an extension a shard reader
        would not take as an image."""
        from parameternet.data.shards import IMAGE_EXTENSIONS

        path = self.samples[i][0]
        ext = Path(path).suffix[1:].lower()
        if ext not in IMAGE_EXTENSIONS:
            return None
        return Path(path).read_bytes(), ext

    def subset(self, indices: np.ndarray) -> FolderImages:
        new = object.__new__(FolderImages)
        new.root, new.name, new.classes = self.root, self.name, self.classes
        new.samples = [self.samples[i] for i in indices]
        new.targets = self.targets[torch.as_tensor(indices, dtype=torch.long)]
        return new


def _load_packaged(name: str, split: str) -> TensorImages:
    root = dataset_path(name)
    prefix = "train" if split == "train" else "t10k"
    files = sorted(root.glob(f"{prefix}-images-idx3-ubyte*")), sorted(root.glob(f"{prefix}-labels-idx1-ubyte*"))
    if not files[0] or not files[1]:
        raise ParameterNetError(f"{root} has no {prefix} IDX files; run `parameternet data fetch {name}` again")
    images = torch.from_numpy(read_idx(files[0][0]).copy()).unsqueeze(1)  # (N, 1, 28, 28)
    targets = torch.from_numpy(read_idx(files[1][0]).astype(np.int64))
    classes = FASHION_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES
    return TensorImages(images, targets, classes, f"{name}:{split}")


def _load_torchvision(spec: DataSpec) -> TensorImages:
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[spec.source]
    root = Path(spec.root).expanduser() if spec.root else cache_dir() / spec.source
    try:
        ds = cls(str(root), train=spec.split == "train", download=spec.download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise ParameterNetError(
            f"{spec.source} is not in {root} ({e}); put the torchvision archive there or allow download=true"
        ) from None
    except OSError as e:  # the download itself failed
        raise ParameterNetError(f"could not download {spec.source} into {root} ({e}); place it there by hand") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # (N, 3, 32, 32)
    return TensorImages(images, torch.as_tensor(ds.targets), tuple(ds.classes), f"{spec.source}:{spec.split}")


def build_dataset(spec: str | DataSpec) -> TensorImages | FolderImages:
    """The dataset a spec names, with its subset options applied."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.source == "folder":
        ds = FolderImages(spec.path)
    elif spec.source == "wds":
        from parameternet.data.shards import ShardImages

        ds = ShardImages(spec.path)
    elif spec.source in TORCHVISION:
        ds = _load_torchvision(spec)
    elif spec.source == "union":
        digits, fashion = _load_packaged("mnist", spec.split), _load_packaged("fashion-mnist", spec.split)
        ds = TensorImages(
            torch.cat([digits.images, fashion.images]),
            torch.cat([digits.targets, fashion.targets + len(digits.classes)]),
            digits.classes + fashion.classes,
            f"union:{spec.split}",
        )
    else:
        ds = _load_packaged(spec.source, spec.split)
    idx = _subset_indices(ds.targets.numpy(), spec)
    if idx is not None:
        ds = ds.subset(idx)
    log.debug("dataset %s: %d images, %d classes", spec, len(ds), ds.num_classes)
    return ds
