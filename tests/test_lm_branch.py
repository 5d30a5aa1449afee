"""ExperimentLMTrainer's branch points: a trunk that stops at its midpoint, a fork that continues it exactly, branches
with a fresh AdamW (dense or upcycled), the re-warmup after a branch point and the held-out loss at the end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from parameternet.errors import ParameterNetError
from parameternet.train.lm import load_lm_config, train_lm
from parameternet.train.lm_branch import Rewarmup
from test_lm_text import make_fake_corpora
from test_lm_train import TINY

COMMON = [*TINY, "max_steps=8", "ckpt_every_steps=100", "zero_shot_items=0", "eval_every_steps=2", "heldout_loss=true",
          "router_windows=64"]  # fmt: skip
MOE = ["model.moe_projections=[down_proj]", "model.num_experts=4"]


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    make_fake_corpora(tmp_path / "cache", monkeypatch)
    return tmp_path


def _run(out, extra=(), **branch):
    """``lm train`` of the tiny recipe in ``out`` with ``extra`` overrides and ``branch.KEY=VALUE`` for ``branch``."""
    keys = [f"branch.{k}={v}" for k, v in branch.items()]
    return train_lm(load_lm_config("configs/lm-small.yaml", [*COMMON, *extra, *keys, f"output_dir={out}"]))


def _rows(out, split):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _weights(out):
    return load_file(out / "model" / "model.safetensors")


def test_a_trunk_stops_at_its_branch_point_and_a_fork_continues_it_exactly(corpora):
    whole, trunk, fork = corpora / "whole", corpora / "trunk", corpora / "fork"
    ref = _run(whole)
    assert ref["heldout"]["tokens"] > 0 and math.isfinite(ref["heldout"]["loss"])  # the end of the schedule
    assert [r["loss"] for r in _rows(whole, "heldout")] == [round(ref["heldout"]["loss"], 6)]

    got = _run(trunk, stop_step=4, snapshot_step=4)
    assert got["steps"] == 4 and "heldout" not in got  # not the end of its schedule: no held-out loss
    assert [r["step"] for r in _rows(trunk, "val")] == [2, 4]  # the branch point once, not twice
    assert (trunk / "snapshot" / "step.txt").read_text().strip() == "4"
    trunk_lr = {r["step"]: r["lr"] for r in _rows(trunk, "train")}
    whole_lr = {r["step"]: r["lr"] for r in _rows(whole, "train")}
    assert all(trunk_lr[s] == pytest.approx(whole_lr[s]) for s in trunk_lr)  # the whole run's schedule
    assert _run(trunk, ["resume=auto"], stop_step=4, snapshot_step=4)["steps"] == 4  # complete: not trained again

    # the fork: the trunk's weights, AdamW state and step, the evaluation interval its own
    _run(fork, ["eval_every_steps=1"], fork_from=trunk, start_step=4)
    assert [r["step"] for r in _rows(fork, "train")] == [5, 6, 7, 8]
    assert [r["step"] for r in _rows(fork, "val")] == [5, 6, 7, 8]
    a, b = _weights(whole), _weights(fork)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit the unbroken run
    whole_val = {r["step"]: r["loss"] for r in _rows(whole, "val")}
    fork_val = {r["step"]: r["loss"] for r in _rows(fork, "val")}
    assert (fork_val[6], fork_val[8]) == (whole_val[6], whole_val[8])
    assert _rows(fork, "heldout")[0]["loss"] == _rows(whole, "heldout")[0]["loss"]


def test_branches_reset_the_optimizer_and_rewarm_the_schedule(corpora):
    whole, trunk = corpora / "whole", corpora / "trunk"
    _run(whole)
    _run(trunk, stop_step=4, snapshot_step=4)
    whole_lr = {r["step"]: r["lr"] for r in _rows(whole, "train")}

    reset = corpora / "reset"  # dense recipe: the snapshot's weights as they are, a fresh AdamW
    _run(reset, from_snapshot=trunk / "snapshot", start_step=4)
    train = _rows(reset, "train")
    assert [r["step"] for r in train] == [5, 6, 7, 8]
    assert all(r["lr"] == pytest.approx(whole_lr[r["step"]]) for r in train)  # the dense schedule from there
    assert "model.layers.0.mlp.down_proj.router.weight" not in _weights(reset)
    assert not torch.equal(_weights(reset)["lm_head.weight"], _weights(whole)["lm_head.weight"])  # other moments

    rewarm = corpora / "rewarm"  # upcycled, the rate ramped up over 3 steps from the branch point
    _run(rewarm, MOE, from_snapshot=trunk / "snapshot", start_step=4, rewarmup_steps=3)
    lr = {r["step"]: r["lr"] for r in _rows(rewarm, "train")}
    # a row at step s logs the rate of the next step (index s): 2/3 of the schedule at 5, all of it from 6 on
    assert lr[5] == pytest.approx(whole_lr[5] * 2 / 3) and lr[6] == pytest.approx(whole_lr[6])
    assert lr[8] == pytest.approx(whole_lr[8])
    assert _weights(rewarm)["model.layers.0.mlp.down_proj.weight"].shape[0] == 4  # experts


def test_rewarmup_factor_and_state():
    class Base:
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step_update(self, n):
            for g in self.optimizer.param_groups:
                g["lr"] = 1.0 - n / 100

        def state_dict(self):
            return {"base": 1}

        def load_state_dict(self, state):
            self.loaded = state

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    r = Rewarmup(Base(opt), opt, start=10, steps=4)
    assert [r.factor(s) for s in (0, 9, 10, 11, 13, 50)] == [1.0, 1.0, 0.25, 0.5, 1.0, 1.0]
    r.step_update(11)
    r.step_update(11)  # the schedule sets the rate, the ramp scales it: not compounded
    assert opt.param_groups[0]["lr"] == pytest.approx(0.89 * 0.5)
    assert r.state_dict() == {"base": 1}
    with pytest.raises(ParameterNetError, match="rewarmup_steps=0 must be at least 1"):
        Rewarmup(Base(opt), opt, start=10, steps=0)


def test_branch_options_that_do_not_fit_are_refused_in_one_sentence(corpora):
    trunk = corpora / "trunk"
    _run(trunk, stop_step=4, snapshot_step=4)
    cases = [
        (
            dict(from_snapshot=trunk / "snapshot", fork_from=trunk, start_step=4),
            "must be null when branch.from_snapshot is set",
        ),
        (dict(fork_from=corpora / "nowhere", start_step=4), "holds no complete checkpoint"),
        (dict(fork_from=trunk, start_step=3), "ends at step 4, not at branch.start_step=3"),
        (dict(from_snapshot=corpora / "nowhere", start_step=4), "holds no saved model"),
        (dict(stop_step=9), r"stop_step=9 must be in \(0, 8\]"),
        (
            dict(from_snapshot=trunk / "snapshot", start_step=4, rewarmup_steps=0),
            "branch.rewarmup_steps=0 is invalid; it must be at least 1",
        ),
    ]
    for i, (options, message) in enumerate(cases):
        with pytest.raises(ParameterNetError, match=message):
            _run(corpora / f"bad{i}", **options)
    with pytest.raises(ParameterNetError, match=r"would change the run's recipe \(optim.lr"):
        _run(corpora / "other-lr", ["optim.lr=0.5"], fork_from=trunk, start_step=4)
    moe = corpora / "moe"
    _run(moe, MOE, snapshot_step=2, stop_step=2)
    with pytest.raises(ParameterNetError, match="holds a model with experts; branch from a dense run's snapshot"):
        _run(corpora / "from-moe", MOE, from_snapshot=moe / "snapshot", start_step=2)


def test_branch_keys_need_one_process_or_ddp():
    for key in ("router_windows=4", "heldout_loss=true", "branch.stop_step=2"):
        with pytest.raises(ParameterNetError, match="parallel='fsdp' does not take branch points"):
            load_lm_config("configs/lm-small.yaml", [*TINY, "max_steps=8", "parallel=fsdp", key])
    assert load_lm_config("configs/lm-small.yaml", [*TINY, "max_steps=2", "parallel=fsdp"]).parallel == "fsdp"
