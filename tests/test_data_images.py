"""Dataset specs, subsets, the union, folders and the two input pipelines."""

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from parameternet.data.images import build_dataset, parse_spec, read_idx
from parameternet.data.pipeline import BatchTransform, LoaderDataset, collate, pil_transform
from parameternet.errors import ParameterNetError


def test_spec_grammar():
    s = parse_spec("fashion-mnist:train:per_class=100:seed=3")
    assert (s.source, s.split, s.per_class, s.seed, s.limit) == ("fashion-mnist", "train", 100, 3, None)
    assert parse_spec("mnist+fashion-mnist:test").source == "union"
    f = parse_spec("folder:/data/in:1k/train:limit=50")
    assert (f.source, f.path, f.limit) == ("folder", "/data/in:1k/train", 50)
    c = parse_spec("cifar10:train:download=false:root=/tmp/c")
    assert (c.download, c.root) == (False, "/tmp/c")


@pytest.mark.parametrize(
    "spec, words",
    [
        ("imagenet:train", "unknown source"),
        ("mnist", "no split"),
        ("mnist:val", "unknown split"),
        ("mnist:train:per_class=ten", "not an integer"),
        ("mnist:train:per_class=0", "positive"),
        ("mnist:train:download=true", "unknown option"),
        ("folder:", "no path"),
    ],
)
def test_bad_specs_name_the_problem(spec, words):
    with pytest.raises(ParameterNetError, match=words):
        parse_spec(spec)


def test_idx_gzip_and_raw_read_the_same(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape) + data.tobytes()
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(tmp_path / "a"), data) and np.array_equal(read_idx(tmp_path / "a.gz"), data)
    (tmp_path / "bad").write_bytes(raw[:-1])
    with pytest.raises(ParameterNetError, match="header says"):
        read_idx(tmp_path / "bad")


def test_class_balanced_subsets_are_reproducible(packaged_data):
    a = build_dataset("fashion-mnist:train:per_class=30")
    b = build_dataset("fashion-mnist:train:per_class=30")
    c = build_dataset("fashion-mnist:train:per_class=30:seed=1")
    assert len(a) == 300 and torch.bincount(a.targets).tolist() == [30] * 10
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert len(build_dataset("mnist:test:limit=77")) == 77


def test_union_has_twenty_classes_mnist_first(packaged_data):
    u = build_dataset("union:test")
    digits, fashion = build_dataset("mnist:test"), build_dataset("fashion-mnist:test")
    assert len(u) == 20000 and u.num_classes == 20 and u.classes[10] == "t-shirt/top"
    assert torch.equal(u.images[:10000], digits.images) and torch.equal(u.targets[10000:], fashion.targets + 10)
    sub = build_dataset("union:train:per_class=5")
    assert torch.bincount(sub.targets).tolist() == [5] * 20


def test_tensor_pipeline_batches_without_per_image_work(packaged_data):
    ds = build_dataset("fashion-mnist:test:per_class=4")
    loader = torch.utils.data.DataLoader(LoaderDataset(ds), batch_size=8, sampler=range(40), collate_fn=collate)
    x, y = next(iter(loader))
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 28, 28) and torch.equal(y, ds.targets[:8])
    eval_tf = BatchTransform(False, 32, 3, [0.5], [0.5])
    out = eval_tf(x)
    assert out.shape == (8, 3, 32, 32) and torch.equal(out[:, 0], out[:, 2])  # grey replicated to RGB
    assert -1.0 - 1e-6 <= out.min() and out.max() <= 1.0 + 1e-6
    grey = BatchTransform(False, 28, 1, [0.5], [0.5])(x)
    assert torch.allclose(grey, x.float() / 127.5 - 1, atol=1e-6)  # no resize, no augmentation at eval
    torch.manual_seed(0)
    a = BatchTransform(True, 28, 1, [0.5], [0.5], hflip=1.0)(x)
    assert torch.allclose(a, grey.flip(-1), atol=1e-6)


def test_folder_dataset_and_pil_pipeline_are_seeded_per_image(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = build_dataset(f"folder:{tmp_path}:per_class=2")
    assert len(ds) == 6 and ds.classes == ("cat", "dog", "eel") and ds.num_classes == 3
    tf = pil_transform(True, 16, [0.5], [0.5], randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.5)
    data = LoaderDataset(ds, tf)
    x1, y1 = data[(1, 123)]
    x2, _ = data[(1, 123)]
    x3, _ = data[(1, 124)]
    assert x1.shape == (3, 16, 16) and y1 == 0
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    with pytest.raises(ParameterNetError, match="needs the 'pil' pipeline"):
        LoaderDataset(ds)
    with pytest.raises(ParameterNetError, match="does not exist"):
        build_dataset(f"folder:{tmp_path / 'missing'}")


def test_missing_cifar_without_download_says_what_to_do(tmp_path):
    with pytest.raises(ParameterNetError, match="cifar10 is not in"):
        build_dataset(f"cifar10:train:download=false:root={tmp_path}")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_corrupt_image_is_one_sentence_naming_the_file(tmp_path, capsys, num_workers):
    root, tmp_path = tmp_path / "data", tmp_path  # the images, and where the run writes
    from parameternet.cli import main

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ParameterNetError, match=r"dog/2.png' could not be decoded"):
        build_dataset(f"folder:{root}").load_pil(6)
    args = [
        "train", "configs/smoke.yaml", f"data.train=folder:{root}", f"data.val=folder:{root}", "img_size=16",
        "batch_size=8", "max_steps=2", f"data.num_workers={num_workers}", f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2.png' could not be decoded" in err[0] and "Traceback" not in err[0]
