"""lm train under FSDP2 on CPU (gloo): two processes match one, sharded checkpoints resume exactly (after kill -9)
and on another number of processes, the final model/ is one ordinary transformers directory, bad input is one line.

The recipe is test_lm_train's tiny LLaMA with experts on down_proj. Where runs split a step's sequences differently
(one process and two, two micro-batches or one), router_aux_loss_coef=0 makes the loss a plain token mean, whose
gradient does not depend on the split (the load-balancing loss of a micro-batch does), so they agree to rounding.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import parameternet
from parameternet.cli import main
from parameternet.errors import ParameterNetError
from parameternet.train import distributed as D
from parameternet.train.lm import LMTrainer, load_lm_config, train_lm
from test_lm_text import make_fake_corpora
from test_lm_train import TINY
from torchrun_helpers import kill_and_resume, max_diff, rows, torchrun

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "configs" / "lm-small.yaml")
SPLIT_FREE = [*TINY, "model.moe_projections=[down_proj]", "model.router_aux_loss_coef=0", "amp=none",
              "grad_accum=2", "ckpt_every_steps=2", "zero_shot_items=0", "eval_tokens=224"]  # fmt: skip


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    make_fake_corpora(tmp_path / "cache", monkeypatch)  # PARAMETERNET_DATA, which torchrun's processes inherit
    return tmp_path


def _torchrun(*overrides: str, popen: bool = False):
    return torchrun(["lm", "train", RECIPE], *overrides, popen=popen)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def _cut_after(out: Path, step: int) -> None:
    """Make ``out`` look killed right after its step-``step`` checkpoint."""
    for p in (out / "checkpoints").iterdir():
        if p.name.startswith("step_") and int(p.name[5:12]) > step:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()


def test_fsdp_two_processes_match_one_and_reshard_to_one(corpora):
    """2 processes under FSDP = 1 process without it (same losses, same weights to rounding); the sharded step-2
    checkpoint resumes on 1 process; model/ loads with parameternet.load and from_pretrained."""
    from transformers import AutoModelForCausalLM

    one, two = corpora / "one", corpora / "two"
    train_lm(load_lm_config(RECIPE, [*SPLIT_FREE, f"output_dir={one}"]))  # prepares the data for torchrun too
    # 7 validation windows, one per batch: rank 0 runs 4 forwards, rank 1 3 and one more for rank 0's (lockstep)
    res = _torchrun(*SPLIT_FREE, "parallel=fsdp", "eval_batch_size=1", f"output_dir={two}")
    assert "rank 0/2 joined the gloo process group" in res.stderr

    ref, fsdp = rows(one), rows(two)
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for a, b in zip(ref, fsdp, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-5)
    assert rows(two, "val")[0]["loss"] == pytest.approx(rows(one, "val")[0]["loss"], rel=1e-5)
    assert max_diff(_weights(one), _weights(two)) < 1e-6

    # the checkpoints: DCP shards of both processes, the training state, a manifest listing them; no weights file
    ck = two / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [
        "step_0000002.dcp", "step_0000002.manifest.json", "step_0000002.state.pt",
        "step_0000004.dcp", "step_0000004.manifest.json", "step_0000004.state.pt",
    ]  # fmt: skip
    listed = json.loads((ck / "step_0000004.manifest.json").read_text())["files"]
    assert {"step_0000004.dcp/.metadata", "step_0000004.dcp/__0_0.distcp", "step_0000004.dcp/__1_0.distcp"} <= set(
        listed
    )

    # model/ is an ordinary transformers directory
    loaded = parameternet.load(two)
    auto = AutoModelForCausalLM.from_pretrained(two / "model")
    assert type(loaded).__name__ == type(auto).__name__ == "ParameterNetLlamaForCausalLM"
    assert all(torch.equal(v, auto.state_dict()[k]) for k, v in loaded.state_dict().items())

    # an FSDP checkpoint resumed as DDP is refused in one sentence
    _cut_after(two, 2)
    with pytest.raises(ParameterNetError) as e:
        train_lm(load_lm_config(RECIPE, [*SPLIT_FREE, f"output_dir={two}", "resume=auto"]))
    assert "holds sharded weights written with parallel=fsdp, and this run has parallel=ddp; resume it with " \
           "parallel=fsdp" in str(e.value) and "\n" not in str(e.value)  # fmt: skip

    # resharded 2 -> 1: the one process finishes the two-process run
    summary = train_lm(load_lm_config(RECIPE, [*SPLIT_FREE, "parallel=fsdp", f"output_dir={two}", "resume=auto"]))
    assert summary["steps"] == 4 and summary["session_steps"] == 2
    assert [r["step"] for r in rows(two)] == [1, 2, 3, 4]
    for a, b in zip(ref, rows(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert max_diff(_weights(one), _weights(two)) < 1e-6
    assert not torch.distributed.is_initialized()  # the group of one is gone with the run


def test_fsdp_checkpoints_resume_exactly_in_one_process(corpora):
    """FSDP on one process (a group of one) is the plain model exactly; its sharded checkpoint resumes exactly."""
    common = [*TINY, "model.moe_projections=[up_proj]", "amp=none", "max_steps=4", "ckpt_every_steps=2",
              "zero_shot_items=4"]  # fmt: skip
    plain, full, cut = corpora / "plain", corpora / "full", corpora / "cut"
    train_lm(load_lm_config(RECIPE, [*common, f"output_dir={plain}"]))
    summary = train_lm(load_lm_config(RECIPE, [*common, "parallel=fsdp", f"output_dir={full}"]))
    assert max_diff(_weights(plain), _weights(full)) == 0.0
    assert summary["zero_shot"] == json.loads((plain / "summary.json").read_text())["zero_shot"]
    shutil.copytree(full, cut)
    _cut_after(cut, 2)
    (cut / "checkpoints" / "step_0000002.dcp" / "__0_0.distcp").write_bytes(b"")  # a torn shard ...
    (cut / "checkpoints" / ".step_0000004.dcp.partial").mkdir()  # ... and a write a kill cut short
    with pytest.raises(ParameterNetError, match="holds no complete checkpoint"):
        train_lm(load_lm_config(RECIPE, [*common, "parallel=fsdp", f"output_dir={cut}", "resume=auto"]))
    shutil.rmtree(cut)
    shutil.copytree(full, cut)
    _cut_after(cut, 2)
    (cut / "checkpoints" / ".step_0000004.dcp.partial").mkdir()
    train_lm(load_lm_config(RECIPE, [*common, "parallel=fsdp", f"output_dir={cut}", "resume=auto"]))
    assert max_diff(_weights(full), _weights(cut)) == 0.0 and rows(full) == rows(cut)
    assert not (cut / "checkpoints" / ".step_0000004.dcp.partial").exists()  # cleaned by the next save


def test_fsdp_accumulates_unsynced_and_activation_checkpointing_changes_nothing(corpora, monkeypatch):
    """grad_accum=2: FSDP2 reduces gradients after the last micro-batch of a step only; recomputing the decoder
    layers in the backward pass gives the same weights."""
    from torch.distributed.fsdp import FSDPModule

    calls, original = [], FSDPModule.set_requires_gradient_sync

    def spy(self, requires_gradient_sync, *, recurse=True):
        calls.append(requires_gradient_sync)
        return original(self, requires_gradient_sync, recurse=recurse)

    monkeypatch.setattr(FSDPModule, "set_requires_gradient_sync", spy)
    common = [*TINY, "model.moe_projections=[gate_proj]", "amp=none", "grad_accum=2", "max_steps=3",
              "zero_shot_items=0"]  # fmt: skip
    plain, sharded = corpora / "plain", corpora / "sharded"
    train_lm(load_lm_config(RECIPE, [*common, f"output_dir={plain}"]))
    assert calls == []
    train_lm(load_lm_config(RECIPE, [*common, "parallel=fsdp", "activation_checkpointing=true",
                                     f"output_dir={sharded}"]))  # fmt: skip
    assert calls == [False, True] * 3
    assert max_diff(_weights(plain), _weights(sharded)) == 0.0


def test_a_ddp_checkpoint_resumed_under_fsdp_is_one_sentence(corpora, capsys):
    out = corpora / "ddp"
    args = ["lm", "train", RECIPE, *TINY, "max_steps=2", "zero_shot_items=0", f"output_dir={out}"]
    assert main(args) == 0
    (out / "summary.json").unlink()
    capsys.readouterr()
    assert main([*args, "resume=auto", "parallel=fsdp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        "step_0000002.safetensors' holds whole weights written with parallel=ddp, and this run has parallel=fsdp; "
        "resume it with parallel=ddp, or start a new output_dir"
    )


def test_a_checkpoint_whose_batch_cannot_split_over_the_new_world_is_one_sentence(corpora):
    """batch_size and grad_accum stay on resume, so a world size that does not divide their quotient cannot
    continue the run, whatever DCP could reshard."""
    out = corpora / "run"
    common = [*TINY, "batch_size=6", "grad_accum=2", "max_steps=2", "zero_shot_items=0", "parallel=fsdp",
              f"output_dir={out}"]  # fmt: skip
    train_lm(load_lm_config(RECIPE, common))
    (out / "summary.json").unlink()
    cfg = load_lm_config(RECIPE, [*common, "resume=auto"])
    with pytest.raises(ParameterNetError) as e:  # two processes (their group is never used: the check comes first)
        LMTrainer(cfg, D.DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")))
    assert str(e.value).endswith(
        "step_0000002.dcp' was written on 1 process(es) with batch_size=6 and grad_accum=2, which do not split over "
        "2 processes; resume it on 1 or 3 process(es) (resuming keeps batch_size and grad_accum), or start a new "
        "output_dir"
    )
    with pytest.raises(ParameterNetError, match=r"batch_size=6 does not split into 4 process\(es\) x grad_accum=2"):
        LMTrainer(load_lm_config(RECIPE, [*common[:-1], f"output_dir={corpora / 'new'}"]),
                  D.DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu")))  # fmt: skip


@pytest.mark.slow
def test_fsdp_kill_9_mid_run_then_resume_ends_with_the_same_weights(corpora):
    """Two processes, bf16 weights gathered by FSDP, activation checkpointing, two micro-batches per step (gradient
    sync on the last only): SIGKILL to torchrun and both workers mid-run, resume=auto, same weights and
    rows as an uninterrupted run, bit for bit."""
    args = [*TINY, "model.moe_projections=[down_proj]", "amp=bf16", "activation_checkpointing=true", "grad_accum=2",
            "parallel=fsdp", "max_steps=12", "ckpt_every_steps=2", "zero_shot_items=0"]  # fmt: skip
    full, cut = corpora / "full", corpora / "cut"
    assert kill_and_resume(_torchrun, args, full, cut) < 12
    assert rows(cut) == rows(full) and rows(cut, "val") == rows(full, "val")
    assert max_diff(_weights(full), _weights(cut)) == 0.0
