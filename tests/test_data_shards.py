"""Pretraining data in webdataset tar shards (``data.train=wds:PATTERN``), built here from the packaged Fashion-MNIST
with `parameternet data shard`: every sample exactly once per epoch over 2 processes x 2 loader workers, mid-epoch
resume on the same sequence, training on shards, and bad input (one sentence naming the pattern, shard or member)."""

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parameternet.cli import main
from parameternet.data.images import build_dataset
from parameternet.data.pipeline import LoaderDataset, collate
from parameternet.data.shards import ShardImages
from parameternet.errors import ParameterNetError
from parameternet.train.checkpoint import load_weights
from parameternet.train.distributed import ResumableSampler

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
SOURCE = "fashion-mnist:train:limit=96"  # 96 images -> shards of 20, 20, 20, 20, 16


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    """The shards' indices go to this test's directory, not the user's data cache."""
    monkeypatch.setattr("parameternet.data.shards._index_cache", lambda: tmp_path / "wds-index")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, packaged_data):
    out = tmp_path_factory.mktemp("shards")
    assert main(["data", "shard", SOURCE, str(out), "--shard-size", "20"]) == 0
    return out


def _pattern(out: Path) -> str:
    return f"{out}/train-{{000000..000004}}.tar"


def _fingerprint(image: torch.Tensor, label) -> tuple[bytes, int]:
    return image.numpy().tobytes(), int(label)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("L"), dtype=np.uint8).copy())  # (28, 28)


class _Grey(LoaderDataset):
    """LoaderDataset with the stored pixels as they are (no augmentation), so a sample can be recognised."""

    def __init__(self, base):
        super().__init__(base, _to_tensor)

    def __getitem__(self, key):
        index, _ = key
        img, target = self.base.load_pil(index)
        return _to_tensor(img), target


def _epoch(ds, rank: int, epoch: int, start: int = 0, world: int = 2, batch: int = 8) -> list[tuple[bytes, int]]:
    """What rank ``rank`` of ``world`` reads in ``epoch`` from sample ``start`` of its share, through the trainer's
    sampler and a DataLoader with 2 workers."""
    sampler = ResumableSampler(ds, world, rank, seed=0)
    sampler.set_position(epoch, start)
    loader = torch.utils.data.DataLoader(_Grey(ds), batch_size=batch, sampler=sampler, num_workers=2,
                                         collate_fn=collate, drop_last=True)  # fmt: skip
    return [_fingerprint(x, y) for xb, yb in loader for x, y in zip(xb, yb, strict=True)]


def test_shards_hold_the_dataset_and_every_sample_is_read_once_per_epoch_over_2_ranks_x_2_workers(shards):
    ds = build_dataset(f"wds:{_pattern(shards)}")
    assert isinstance(ds, ShardImages) and len(ds) == 96 and ds.shard_sizes == [20, 20, 20, 20, 16]
    assert ds.classes[0] == "t-shirt/top" and ds.num_classes == 10  # from _info.json
    assert json.loads((shards / "_info.json").read_text())["splits"]["train"]["num_samples"] == 96
    source = build_dataset(SOURCE)
    want = Counter(_fingerprint(source.images[i, 0], source.targets[i]) for i in range(len(source)))
    assert Counter(_fingerprint(_to_tensor(ds.load_pil(i)[0]), ds.targets[i]) for i in range(96)) == want
    orders = []
    for epoch in (0, 1):
        ranks = [_epoch(ds, rank, epoch) for rank in (0, 1)]
        assert [len(r) for r in ranks] == [48, 48]
        assert Counter(ranks[0] + ranks[1]) == want  # each sample exactly once, none repeated, none dropped
        orders.append(ranks[0])
    assert orders[0] != orders[1]  # a new permutation every epoch

    # mid-epoch resume: from batch 3 of rank 1's share, the uninterrupted run's sequence
    assert _epoch(ds, 1, 0, start=3 * 8) == _epoch(ds, 1, 0)[3 * 8 :]

    # a wildcard names the same shards; a subset option applies as to any dataset
    assert len(build_dataset(f"wds:{shards}/train-*.tar")) == 96
    assert len(build_dataset(f"wds:{_pattern(shards)}:limit=80")) == 80


def test_training_on_shards_resumes_mid_epoch_exactly(shards, tmp_path):
    """96 samples, batch 16: 6 steps an epoch; cut after step 4 (mid-epoch) and resumed: the same rows and weights."""
    args = ["train", SMOKE, f"data.train=wds:{_pattern(shards)}", "data.val=null", "batch_size=16", "max_steps=8",
            "ckpt_every_steps=4", "ckpt_every_epochs=0", "log_every=1", "progress=false",
            "data.num_workers=2"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*args, f"output_dir={full}"]) == 0
    shutil.copytree(full, cut)
    for p in (cut / "checkpoints").iterdir():
        if p.name.startswith(("final.", "step_0000008")):
            p.unlink()
    (cut / "summary.json").unlink()
    state = torch.load(cut / "checkpoints" / "step_0000004.state.pt", weights_only=True)
    assert (state["epoch"], state["pos"], state["steps_per_epoch"]) == (0, 4, 6)
    assert main([*args, f"output_dir={cut}", "resume=auto"]) == 0
    rows = [(cut / "metrics.jsonl").read_text(), (full / "metrics.jsonl").read_text()]
    strip = [[{k: v for k, v in json.loads(r).items() if k not in ("images_per_s", "data_wait_s", "step_s")}
              for r in text.splitlines()] for text in rows]  # fmt: skip
    assert strip[0] == strip[1] and [r["step"] for r in strip[0]] == list(range(1, 9))
    a = load_weights(full / "checkpoints" / "final.safetensors")[0]
    b = load_weights(cut / "checkpoints" / "final.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace member ``name`` of the tar ``path`` by ``data`` (same name, new size)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, content in members:
            content = data if m.name == name else content
            m.size = len(content)
            tar.addfile(m, io.BytesIO(content))


def test_bad_shards_are_one_sentence_naming_the_shard_and_member(shards, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in shards.glob("train-*.tar"):
        (bad / p.name).write_bytes(p.read_bytes())
    first = bad / "train-000000.tar"

    with pytest.raises(ParameterNetError, match=r"shard pattern '.*/nowhere/train-\{000000\.\.000004\}\.tar' matches "
                                                r"no file; check the directory and the braces"):  # fmt: skip
        build_dataset(f"wds:{tmp_path}/nowhere/train-{{000000..000004}}.tar")
    with pytest.raises(ParameterNetError, match=r"names 7 files and 2 do not exist \(first '.*train-000005\.tar'\)"):
        build_dataset(f"wds:{bad}/train-{{000000..000006}}.tar")

    # an image member that does not decode: named when it is read, through loader workers too (CLI: one line)
    _rewrite(first, "00000003.png", b"\x89PNG not really")
    ds = build_dataset(f"wds:{_pattern(bad)}")
    with pytest.raises(ParameterNetError, match=r"shard '.*train-000000\.tar' member '00000003\.png' could not be "
                                                r"decoded \(UnidentifiedImageError: PIL identifies no image format "
                                                r"in its 15 bytes\); rewrite the shard$"):  # fmt: skip
        ds.load_pil(3)
    args = ["train", SMOKE, f"data.train=wds:{_pattern(bad)}", "data.val=null", "batch_size=96",
            "max_steps=1", "data.num_workers=2", "progress=false", f"output_dir={tmp_path / 'run'}"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-000000.tar' member '00000003.png' could not be decoded" in err

    # a label that is not a class index; a sample without its label; a shard cut short; a file that is no tar
    cases = [
        (lambda: _rewrite(first, "00000005.cls", b"five"), "member '00000005.cls' holds b'five', not a class index"),
        (lambda: _rewrite_without(first, "00000007.cls"), "sample '00000007' has no .cls member"),
        (
            lambda: first.write_bytes(first.read_bytes()[:2000]),
            "member '00000000.png' is cut short (the file ends at byte 2000)",
        ),
        (
            lambda: first.write_bytes(first.read_bytes()[:3000]),
            "is cut short after member '00000000.png' (no end-of-archive marker at byte 2560 of 3000)",
        ),
        (lambda: first.write_bytes(b"not a tar at all" * 100), "is not a readable tar file (after member '(none)': "),
    ]
    for damage, message in cases:
        first.write_bytes((shards / "train-000000.tar").read_bytes())
        damage()
        shutil.rmtree(tmp_path / "wds-index", ignore_errors=True)  # the rewrites may keep size and mtime (clock tick)
        with pytest.raises(ParameterNetError) as e:
            build_dataset(f"wds:{_pattern(bad)}")
        assert f"shard '{first}' " in str(e.value) and message in str(e.value) and "\n" not in str(e.value)

    # a total that does not split into steps of batch_size
    capsys.readouterr()
    split = ["train", SMOKE, f"data.train=wds:{_pattern(shards)}", "data.val=null", "batch_size=20",
             f"output_dir={tmp_path / 'split'}"]  # fmt: skip
    assert main(split) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        "holds 96 samples in 5 shards, which do not split into steps of batch_size=20 (1 process(es) x 20) without "
        "leaving 16 out of every epoch; use a batch_size that divides 96 (12 or 16 or 24 fit), or add ':limit=80' to "
        "the spec to train on that many"
    )
    assert main(["data", "shard", SOURCE, str(shards)]) == 2
    assert "already holds train-*.tar shards" in capsys.readouterr().err


def _rewrite_without(path: Path, name: str) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != name]
    with tarfile.open(path, "w") as tar:
        for m, content in members:
            tar.addfile(m, io.BytesIO(content))


def test_files_are_copied_into_shards_as_stored(shards, tmp_path):
    """A folder's JPEGs (and another set of shards' PNGs) go into the shards byte for byte, not re-encoded."""
    source = build_dataset("fashion-mnist:train:limit=12")
    folder = tmp_path / "folder"
    for i in range(len(source)):
        cls = folder / source.classes[int(source.targets[i])].replace("/", "-")
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(source.images[i, 0].numpy()).save(cls / f"{i:02d}.jpg", quality=90)
    images = build_dataset(f"folder:{folder}")
    assert main(["data", "shard", f"folder:{folder}", str(tmp_path / "from-folder"), "--shard-size", "5"]) == 0
    copied = build_dataset(f"wds:{tmp_path}/from-folder/train-{{000000..000002}}.tar")
    assert [copied.key(i).rsplit(".", 1)[1] for i in range(12)] == ["jpg"] * 12
    for i in range(12):
        assert copied.encoded(i) == (Path(images.samples[i][0]).read_bytes(), "jpg")
        assert int(copied.targets[i]) == images.samples[i][1]
    assert copied.classes == images.classes

    assert main(["data", "shard", f"wds:{_pattern(shards)}", str(tmp_path / "again"), "--shard-size", "50"]) == 0
    again = build_dataset(f"wds:{tmp_path}/again/train-{{000000..000001}}.tar")
    original = build_dataset(f"wds:{_pattern(shards)}")
    assert again.shard_sizes == [50, 46]
    assert [again.encoded(i) for i in range(96)] == [original.encoded(i) for i in range(96)]
    assert torch.equal(again.targets, original.targets) and again.classes == original.classes
