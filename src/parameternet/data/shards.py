"""Images in webdataset tar shards: the ``wds:PATTERN`` dataset spec, and :func:`write_shards` to make them.

A shard is a plain (uncompressed) tar file holding samples in the webdataset layout: consecutive members that share
a key (the name up to its first dot), one image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ...) and one class index
(``.cls``, an integer as text) each. ``PATTERN`` names the shards with braces, as webdataset and timm write them
(``shards/train-{000000..000099}.tar``), with shell wildcards (``shards/train-*.tar``), or both; ``::`` joins
several patterns. An ``_info.json`` beside the shards (timm's layout, which :func:`write_shards` writes) may name the
classes under ``"classes"``; without it the classes are ``"0"`` ... ``"K-1"``, K the largest index plus one.

Reading is by offset, not by streaming: on first use every shard's members are indexed (names, data offsets and
labels; a pass over the tar headers, kept in the data cache keyed by the shard's path, size and modification time),
and each image is then read with one seek. So :class:`ShardImages` is an ordinary map-style dataset: the training
sampler's per-epoch permutation covers every sample once, split over processes and data-loader workers like any
other dataset's, and a run resumes mid-epoch at the exact sample. (timm's ``ReaderWds`` and webdataset's own
pipelines stream the shards instead: each worker takes whole shards, so an epoch repeats or drops samples when the
shards do not split evenly, and a stream cannot start mid-epoch.) Random reads want the shards on a local or
parallel file system, not behind HTTP.

Errors are one sentence naming the shard and member: a pattern that matches no file, a shard that is not a readable
plain tar, a member cut short, a sample without an image or a label, a label that is not an integer, an image that
does not decode.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from parameternet.data.images import ImageSet
from parameternet.errors import ParameterNetError

__all__ = ["IMAGE_EXTENSIONS", "ShardImages", "expand_pattern", "write_shards"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
INDEX_FORMAT = 1  # of the cached shard indices; a new layout gets new cache keys
_GLOB = set("*?[")


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise ParameterNetError(
            "wds: datasets need the webdataset package; pip install 'parameternet[shards]'"
        ) from None
    return webdataset


def expand_pattern(pattern: str) -> list[Path]:
    """The shard files ``pattern`` names: braces expanded as webdataset does (``::`` joins patterns), then shell
    wildcards matched (sorted). Raises ParameterNetError when it names no file, or a file that does not exist."""
    from webdataset.shardlists import expand_urls

    _webdataset()
    paths: list[Path] = []
    for name in expand_urls(pattern):
        if _GLOB & set(name):
            paths.extend(Path(p) for p in sorted(glob.glob(os.path.expanduser(name))))
        else:
            paths.append(Path(name).expanduser())
    found = [p for p in paths if p.is_file()]
    if not found:
        raise ParameterNetError(
            f"shard pattern {pattern!r} matches no file; check the directory and the braces (e.g. "
            f"'shards/train-{{000000..000009}}.tar'), or write shards with `parameternet data shard`"
        )
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ParameterNetError(
            f"shard pattern {pattern!r} names {len(paths)} files and {len(missing)} do not exist (first "
            f"{str(missing[0])!r}); fix the range in the braces or write the missing shards"
        )
    return found


def _cache_key(path: Path) -> str:
    st = path.stat()
    raw = f"{INDEX_FORMAT}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _index_cache() -> Path:
    from parameternet.data.fetch import cache_dir

    return cache_dir() / "wds-index"


def _split_name(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _scan(path: Path) -> dict[str, np.ndarray]:
    """Index one shard: per sample the image member's name, data offset and size, and the label. Raises
    ParameterNetError naming the shard (and member) for anything that is not a well-formed webdataset shard."""
    size = path.stat().st_size
    names, offsets, sizes, labels = [], [], [], []
    current: dict[str, Any] = {}
    last = "'(none)'"

    def close() -> None:
        if not current:
            return
        key = current["key"]
        if "image" not in current:
            raise ParameterNetError(
                f"shard {str(path)!r} sample {key!r} has no image member (.{', .'.join(IMAGE_EXTENSIONS[:4])}, ...); "
                f"rewrite the shard with an image for every key"
            )
        if "label" not in current:
            raise ParameterNetError(
                f"shard {str(path)!r} sample {key!r} has no .cls member (the class index); rewrite the shard with a "
                f"label for every key"
            )
        names.append(current["image"][0])
        offsets.append(current["image"][1])
        sizes.append(current["image"][2])
        labels.append(current["label"])

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                last = repr(member.name)
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError("unexpected end of data")
                key, ext = _split_name(member.name)
                if key is None or key.rsplit("/", 1)[-1].startswith("__"):
                    continue  # webdataset's metadata members
                if current and key != current["key"]:
                    close()
                    current = {}
                current.setdefault("key", key)
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS and "image" not in current:
                    current["image"] = (member.name, member.offset_data, member.size)
                elif ext == "cls":
                    current["label"] = _read_label(path, member.name, tar.extractfile(member).read())
            close()
            end = tar.offset  # where tarfile stopped: the end-of-archive blocks, or a header it could not read
        _check_end(path, end, size, last)
    except tarfile.CompressionError:
        raise ParameterNetError(
            f"shard {str(path)!r} is compressed; random access needs plain .tar shards (tar without -z)"
        ) from None
    except (tarfile.TarError, EOFError, OSError) as e:
        if "unexpected end of data" in str(e):  # tarfile's word for a member whose data the file does not hold
            raise ParameterNetError(
                f"shard {str(path)!r} member {last} is cut short (the file ends at byte {size}); rewrite the shard"
            ) from None
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise ParameterNetError(
            f"shard {str(path)!r} is not a readable tar file (after member {last}: {why}); rewrite the shard or leave "
            f"it out of the pattern"
        ) from None
    if not names:
        raise ParameterNetError(f"shard {str(path)!r} holds no samples; rewrite it or leave it out of the pattern")
    return {
        "names": np.asarray(names, dtype=np.str_),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "sizes": np.asarray(sizes, dtype=np.int64),
        "labels": np.asarray(labels, dtype=np.int64),
    }


def _read_label(path: Path, member: str, raw: bytes) -> int:
    """The class index a ``.cls`` member holds; ParameterNetError naming the shard and member unless it is an
    integer from 0."""
    try:
        label = int(raw.strip())
    except ValueError:
        raise ParameterNetError(
            f"shard {str(path)!r} member {member!r} holds {raw[:20]!r}, not a class index; write the label as an "
            f"integer"
        ) from None
    if label < 0:
        raise ParameterNetError(
            f"shard {str(path)!r} member {member!r} holds the negative class index {label}; write class indices from 0"
        )
    return label


def _check_end(path: Path, end: int, size: int, last: str) -> None:
    """ParameterNetError unless the shard ends with tar's end-of-archive blocks (zeros) where tarfile stopped."""
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read()
    if len(tail) < 1024 or tail.strip(b"\0"):
        raise ParameterNetError(
            f"shard {str(path)!r} is cut short after member {last} (no end-of-archive marker at byte {end} of "
            f"{size}); rewrite the shard"
        )


def _index(path: Path) -> dict[str, np.ndarray]:
    """The shard's index from the data cache, or scanned (:func:`_scan`) and cached when the cache is writable."""
    cached = _index_cache() / f"{_cache_key(path)}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as f:
                return {k: f[k] for k in ("names", "offsets", "sizes", "labels")}
        except (OSError, ValueError, KeyError):
            pass  # a torn cache file: scanned again below
    index = _scan(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **index)
        os.replace(tmp, cached)
    except OSError as e:  # a read-only cache: the next run scans again
        log.debug("could not cache the index of %s (%s)", path, e)
    return index


def _read_classes(shards: list[Path], count: int) -> tuple[str, ...]:
    for info in sorted({p.parent / "_info.json" for p in shards}):
        if info.is_file():
            try:
                classes = json.loads(info.read_text()).get("classes")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(classes, list) and len(classes) >= count:
                return tuple(str(c) for c in classes)
    return tuple(str(i) for i in range(count))


class ShardImages(ImageSet):
    """The samples of webdataset tar shards (see the module docstring), decoded with PIL one image at a time.

    Args:
        pattern: the shards (braces, wildcards, ``::``); see :func:`expand_pattern`.

    ``len`` is the number of samples over all shards, in pattern order; ``targets`` their class indices ``(N,)``.
    Raises ParameterNetError (one sentence, naming the shard and member) for a pattern that names no file or a
    malformed shard, and from :meth:`load_pil` for an image that does not decode.
    """

    exact_epochs = True  # the trainer refuses a split that would leave samples out of an epoch

    def __init__(self, pattern: str):
        self.pattern, self.name = pattern, f"wds:{pattern}"
        self.shards = expand_pattern(pattern)
        indices = [_index(p) for p in self.shards]
        self.shard_sizes = [len(i["labels"]) for i in indices]
        self._shard = np.repeat(np.arange(len(self.shards), dtype=np.int64), self.shard_sizes)
        self._names = np.concatenate([i["names"] for i in indices])
        self._offsets = np.concatenate([i["offsets"] for i in indices])
        self._sizes = np.concatenate([i["sizes"] for i in indices])
        self.targets = torch.from_numpy(np.concatenate([i["labels"] for i in indices]))
        self.classes = _read_classes(self.shards, int(self.targets.max()) + 1)
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:  # data-loader workers open their own files
        return {**self.__dict__, "_files": {}}

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked worker: the parent's file positions are not ours
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 (kept open for the next read)
        return f

    def load_pil(self, i: int) -> tuple[Image.Image, int]:
        """Sample ``i``'s image decoded by PIL, and its class; raises ParameterNetError naming the shard and member
        when the image does not decode."""
        shard = int(self._shard[i])
        f = self._file(shard)
        f.seek(int(self._offsets[i]))
        data = f.read(int(self._sizes[i]))
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            if isinstance(e, UnidentifiedImageError):  # its message names a BytesIO object's address
                why = f"PIL identifies no image format in its {len(data)} bytes"
            else:
                why = (str(e).splitlines() or [""])[0][:120]
            raise ParameterNetError(
                f"shard {str(self.shards[shard])!r} member {str(self._names[i])!r} could not be decoded "
                f"({type(e).__name__}: {why}); rewrite the shard"
            ) from None
        return img, int(self.targets[i])

    def encoded(self, i: int) -> tuple[bytes, str]:
        """Sample ``i``'s image member as stored and its extension, for :func:`write_shards` to copy."""
        f = self._file(int(self._shard[i]))
        f.seek(int(self._offsets[i]))
        return f.read(int(self._sizes[i])), str(self._names[i]).rsplit(".", 1)[-1].lower()

    def key(self, i: int) -> str:
        """``"SHARD/MEMBER"`` of sample ``i``'s image."""
        return f"{self.shards[int(self._shard[i])].name}/{self._names[i]}"

    def subset(self, indices: np.ndarray) -> ShardImages:
        new = object.__new__(ShardImages)
        new.__dict__.update(self.__getstate__())
        idx = np.asarray(indices, dtype=np.int64)
        new._shard, new._names = self._shard[idx], self._names[idx]
        new._offsets, new._sizes = self._offsets[idx], self._sizes[idx]
        new.targets = self.targets[torch.as_tensor(idx)]
        new._pid = os.getpid()
        return new


def write_shards(dataset, out: str | Path, shard_size: int, prefix: str = "train") -> dict[str, Any]:
    """Write ``dataset`` (a :func:`~parameternet.data.images.build_dataset` dataset: ``len``, ``load_pil``,
    ``classes``) as webdataset shards ``OUT/PREFIX-000000.tar``, ... of ``shard_size`` samples each (the last may
    hold fewer), in the dataset's order: the image and ``KEY.cls`` per sample, KEY the sample's index, no
    timestamps (the same data give the same bytes). Images kept as files (a folder's, another set of shards') are
    copied as they are stored (``KEY.jpg`` stays JPEG, not decoded); in-memory ones are encoded as ``KEY.png``.
    Writes ``OUT/_info.json`` in timm's layout (``splits.PREFIX``: ``num_samples``, ``filenames``,
    ``shard_lengths``) plus the ``classes``, so timm's ``wds/`` reader takes the shards too.

    Returns ``{"shards": [paths], "samples": N, "spec": "wds:OUT/PREFIX-{000000..K}.tar"}``. Raises
    ParameterNetError for a shard size below 1 or an ``OUT`` that holds shards of this prefix already.
    """
    wds = _webdataset()
    if shard_size < 1:
        raise ParameterNetError(f"--shard-size {shard_size} must be at least 1 sample per shard")
    out = Path(out).expanduser()
    if any(out.glob(f"{prefix}-*.tar")):
        raise ParameterNetError(
            f"{str(out)!r} already holds {prefix}-*.tar shards; choose another directory or --prefix, or delete them"
        )
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    width = max(8, len(str(n)))
    written: list[tuple[str, int]] = []  # (path, samples) of each shard, as the writer closes it

    def post(path: str) -> None:
        written.append((path, sink.count))

    pattern = str(out / f"{prefix}-%06d.tar")
    stored = getattr(dataset, "encoded", None)
    with wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0, post=post, mtime=0) as sink:
        for i in range(n):
            raw = stored(i) if stored is not None else None
            if raw is not None:  # the file's own bytes (JPEGs stay JPEGs), decoded when trained on
                sample = {raw[1]: raw[0], "cls": int(dataset.targets[i])}
            else:
                img, target = dataset.load_pil(i)
                sample = {"png": img, "cls": int(target)}
            sink.write({"__key__": f"{i:0{width}d}", **sample})
    names, lengths = [Path(p).name for p, _ in written], [c for _, c in written]
    info = {
        "name": getattr(dataset, "name", prefix),
        "splits": {prefix: {"name": prefix, "num_samples": n, "filenames": names, "shard_lengths": lengths}},
        "classes": list(dataset.classes),
    }
    (out / "_info.json").write_text(json.dumps(info, indent=1) + "\n")
    last = len(written) - 1
    spec = f"wds:{out}/{prefix}-{{000000..{last:06d}}}.tar" if last else f"wds:{out}/{prefix}-000000.tar"
    return {"shards": [str(out / name) for name in names], "samples": n, "spec": spec}
