"""`parameternet train` under FSDP2 on CPU (gloo): two processes match one, sharded checkpoints (model, optimizer and
EMA shards) resume exactly and on another number of processes, the final weights are an ordinary safetensors file
that `parameternet.load` reads, and bad input is one sentence.

Two processes match one only where nothing depends on how a step's images are split over processes: the recipe
below has no augmentation (the batch transform's flips are seeded per process) and a model without BatchNorm (each
process normalises by its own half-batch statistics, under DDP as under FSDP) nor stochastic depth (drawn per
process): a tiny ParameterNet-Swin, whose dynamic linears hold (experts, out, in) banks. ParameterNet-GhostNet (5-d
expert banks, BatchNorm, channels_last) runs under FSDP in one process here, and on two against DDP in the slow
tests.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import parameternet
from parameternet.cli import main
from parameternet.errors import ParameterNetError
from parameternet.train import distributed as D
from parameternet.train.checkpoint import load_weights, resolve_weights
from parameternet.train.config import load_config
from parameternet.train.trainer import train
from torchrun_helpers import kill_and_resume, max_diff, rows, torchrun

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
TIMING = ("images_per_s", "data_wait_s", "step_s")
# 45 validation images: 23 on rank 0, 22 on rank 1, so the ranks' last batches differ (lockstep evaluation)
COMMON = ["batch_size=16", "max_steps=4", "ckpt_every_steps=2", "log_every=1", "progress=false", "ema=0.9",
          "aug.hflip=0", "aug.crop_padding=0", "data.val=fashion-mnist:test:limit=45", "eval_batch_size=4"]  # fmt: skip
SWIN = ["model=parameternet_swin_300m", "model_kwargs.img_size=32", "model_kwargs.embed_dim=16",
        "model_kwargs.depths=[1, 1]", "model_kwargs.num_heads=[1, 2]", "model_kwargs.window_size=4",
        "model_kwargs.drop_path_rate=0", *COMMON]  # fmt: skip
GHOST = ["model=parameternet_mini_025", "channels_last=true", *COMMON]


def _torchrun(*overrides: str, popen: bool = False):
    return torchrun(["train", SMOKE], *overrides, popen=popen)


def _rows(out: Path, split: str = "train") -> list[dict]:
    return rows(out, split, TIMING)


def _final(out: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    return load_weights(out / "checkpoints" / f"final{'.ema' if ema else ''}.safetensors")[0]


def _cut_after(out: Path, step: int) -> None:
    """Make ``out`` look killed right after its step-``step`` checkpoint."""
    ck = out / "checkpoints"
    for p in ck.iterdir():
        late = p.name.startswith("step_") and int(p.name[5:12]) > step
        if late or p.name.startswith(("final.", "best.")):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    (out / "summary.json").unlink()


def test_fsdp_two_processes_match_one_and_reshard_to_one(packaged_data, tmp_path):
    """2 processes under FSDP = 1 process without it (losses, validation, weights and EMA to rounding); the
    sharded step-2 checkpoint finishes on 1 process; final.safetensors loads with parameternet.load."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(SMOKE, [*SWIN, f"output_dir={one}"]))
    res = _torchrun(*SWIN, "parallel=fsdp", f"output_dir={two}")
    assert "rank 0/2 joined the gloo process group" in res.stderr and "batch 8 x 2 process(es)" in res.stderr

    ref = _rows(one)
    assert [r["step"] for r in _rows(two)] == [1, 2, 3, 4]
    for a, b in zip(ref, _rows(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for a, b in zip(_rows(one, "val"), _rows(two, "val"), strict=True):  # the model's and the EMA's
        assert a["images"] == 45 and (a["weights"], a["images"], a["top1"]) == (b["weights"], b["images"], b["top1"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert max_diff(_final(one), _final(two)) < 1e-5 and max_diff(_final(one, True), _final(two, True)) < 1e-5

    # the step checkpoints: DCP shards of both processes (model, AdamW state, EMA), the training state, a manifest
    ck = two / "checkpoints"
    listed = json.loads((ck / "step_0000004.manifest.json").read_text())["files"]
    assert {"step_0000004.dcp/.metadata", "step_0000004.dcp/__0_0.distcp", "step_0000004.dcp/__1_0.distcp",
            "step_0000004.state.pt"} <= set(listed)  # fmt: skip
    assert not (ck / "step_0000004.safetensors").exists()

    # final.safetensors is the ordinary model
    loaded = parameternet.load(two)
    assert type(loaded).__name__ == "DynamicSwinTransformer"
    assert all(type(v) is torch.Tensor and torch.equal(v, _final(two)[k]) for k, v in loaded.state_dict().items())

    # resharded 2 -> 1: one process finishes the two-process run
    _cut_after(two, 2)
    summary = train(load_config(SMOKE, [*SWIN, "parallel=fsdp", f"output_dir={two}", "resume=auto"]))
    assert summary["steps"] == 4 and summary["session_steps"] == 2
    for a, b in zip(ref, _rows(two), strict=True):
        assert b["step"] == a["step"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert max_diff(_final(one), _final(two)) < 1e-5 and max_diff(_final(one, True), _final(two, True)) < 1e-5
    assert not torch.distributed.is_initialized()  # the group of one is gone with the run


def test_fsdp_in_one_process_is_the_plain_run_and_resumes_exactly(packaged_data, tmp_path, capsys):
    """ParameterNet-GhostNet (5-d expert banks, BatchNorm, channels_last, EMA) under FSDP in one process: the plain
    run's losses and weights (channels_last: FSDP gathers the weights contiguous, so to rounding); its sharded
    checkpoint resumes bit for bit; a sharded checkpoint resumed as DDP, and a whole one as FSDP, is one sentence."""
    plain, full, cut = tmp_path / "plain", tmp_path / "full", tmp_path / "cut"
    train(load_config(SMOKE, [*GHOST, f"output_dir={plain}"]))
    train(load_config(SMOKE, [*GHOST, "parallel=fsdp", f"output_dir={full}"]))
    for a, b in zip(_rows(plain), _rows(full), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert max_diff(_final(plain), _final(full)) < 1e-5 and max_diff(_final(plain, True), _final(full, True)) < 1e-5

    shutil.copytree(full, cut)
    _cut_after(cut, 2)
    with pytest.raises(ParameterNetError, match=r"its checkpoints are sharded by FSDP\); continue it with resume=auto"):
        parameternet.load(cut)
    shards = cut / "checkpoints" / "step_0000002.dcp"
    for given in (cut, cut / "checkpoints", shards, cut / "checkpoints" / "step_0000002.state.pt"):
        with pytest.raises(ParameterNetError, match=r"step_0000002\.dcp' is sharded by FSDP .* finish the run with "):
            resolve_weights(given)
    capsys.readouterr()
    assert main(["eval", str(shards)]) == 2  # eval, init_from and export read whole weights only
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "which only that run's resume reads; finish the run with resume=auto" in err
    args = ["train", SMOKE, *GHOST, f"output_dir={cut}", "resume=auto"]
    capsys.readouterr()
    assert main(args) == 2  # parallel=ddp (the default)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        "step_0000002.dcp' holds sharded weights written with parallel=fsdp, and this run has parallel=ddp; resume "
        "it with parallel=fsdp, or start a new output_dir"
    )
    assert main([*args, "parallel=fsdp"]) == 0
    assert _rows(cut) == _rows(full) and _rows(cut, "val") == _rows(full, "val")
    assert max_diff(_final(full), _final(cut)) == 0.0 and max_diff(_final(full, True), _final(cut, True)) == 0.0

    _cut_after(plain, 2)
    capsys.readouterr()
    assert main(["train", SMOKE, *GHOST, f"output_dir={plain}", "resume=auto", "parallel=fsdp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        "step_0000002.safetensors' holds whole weights written with parallel=ddp, and this run has parallel=fsdp; "
        "resume it with parallel=ddp, or start a new output_dir"
    )


def test_expert_banks_shard_along_the_experts_and_channels_last_still_applies():
    """fully_shard per stage: every parameter a DTensor split along dim 0 (the experts of a (M, O, C/g, kh, kw) bank);
    DynamicConv2d._apply (channels_last, dtype, device) still runs on the sharded model."""
    import timm
    from torch.distributed.tensor import DTensor, Shard

    info = D.setup("cpu", group=True)
    try:
        model = timm.create_model("parameternet_mini_025", num_classes=10, in_chans=3)
        units = D.shard_units(model)
        assert units == [m for m in model.blocks]
        D.fully_shard_model(model, units, info)
        banks = {n: p for n, p in model.named_parameters() if p.dim() == 5}
        assert banks and all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in banks.values())
        model.to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        assert model(x).shape == (2, 10)
    finally:
        D.cleanup()
    with pytest.raises(ParameterNetError, match="has no sequence of blocks to shard"):
        D.shard_units(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_checkpoint_whose_batch_cannot_split_over_the_new_world_is_one_sentence(packaged_data, tmp_path):
    """batch_size stays on resume, so a number of processes that does not divide it cannot continue the run, whatever
    DCP could reshard."""
    from parameternet.train.trainer import Trainer

    out = tmp_path / "run"
    common = [*GHOST, "max_steps=2", "data.val=null", "parallel=fsdp", f"output_dir={out}"]
    train(load_config(SMOKE, common))
    (out / "summary.json").unlink()
    three = D.DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ParameterNetError) as e:  # its group is never used: the check comes first
        Trainer(load_config(SMOKE, [*common, "resume=auto"]), three)
    assert str(e.value).endswith(
        "step_0000002.dcp' was written on 1 process(es) with batch_size=16, which does not divide over 3 processes; "
        "resume it on 1, 2, 4, 8 or 16 process(es) (resuming keeps batch_size), or start a new output_dir"
    )
    with pytest.raises(ParameterNetError, match=r"batch_size=16 does not divide over 3 processes; use a multiple of 3"):
        Trainer(load_config(SMOKE, [*common[:-1], f"output_dir={tmp_path / 'new'}"]), three)


def test_fsdp_recipe_errors_are_one_sentence(packaged_data, tmp_path, capsys):
    for extra, message in [
        (["parallel=zero3"], "parallel='zero3' is invalid; it must be ddp (the whole model on every process) or fsdp"),
        (["parallel=fsdp", "amp=fp16"], "amp='fp16' is invalid; it must be auto, none or bf16 with parallel=fsdp"),
    ]:
        assert main(["train", SMOKE, f"output_dir={tmp_path / 'x'}", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


@pytest.mark.slow
def test_fsdp_matches_ddp_on_two_processes_with_expert_banks_and_batchnorm(packaged_data, tmp_path):
    """ParameterNet-GhostNet on 2 processes: FSDP (5-d banks split over the processes) trains as DDP does (each
    process normalises by its own half batch under both; rank 0's BatchNorm statistics are saved under both)."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(*GHOST, f"output_dir={ddp}")
    _torchrun(*GHOST, "parallel=fsdp", f"output_dir={fsdp}")
    for a, b in zip(_rows(ddp), _rows(fsdp), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert max_diff(_final(ddp), _final(fsdp)) < 1e-5 and max_diff(_final(ddp, True), _final(fsdp, True)) < 1e-5


@pytest.mark.slow
def test_fsdp_kill_9_mid_run_then_resume_ends_with_the_same_weights(packaged_data, tmp_path):
    """Two processes, ParameterNet-GhostNet with EMA and channels_last: SIGKILL to torchrun and both workers mid-run,
    resume=auto, the same rows, weights and EMA as an uninterrupted run, bit for bit."""
    args = [*GHOST, "parallel=fsdp", "max_steps=12", "eval_every_steps=6"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert kill_and_resume(_torchrun, args, full, cut) < 12
    assert _rows(cut) == _rows(full) and _rows(cut, "val") == _rows(full, "val")
    assert max_diff(_final(full), _final(cut)) == 0.0 and max_diff(_final(full, True), _final(cut, True)) == 0.0
