"""The run loop both trainers share, on a tiny fake task: cadence, the train rows' window and its timing,
the NaN guard, interrupts that save, resume discovery and resuming to the same rows."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from parameternet.errors import ParameterNetError
from parameternet.runs import RunInterrupted
from parameternet.train import distributed as D
from parameternet.train import loop
from parameternet.train.checkpoint import load_state
from parameternet.train.loop import Cadence, Timing, TrainTask, Window
from parameternet.train.recipe import RunConfig
from parameternet.train.resume import discover_resume

CPU = D.DistInfo(0, 1, 0, torch.device("cpu"))


@dataclass
class FakeConfig(RunConfig):
    """A recipe of the shared keys plus the fake task's own cadence."""

    total_steps: int = 10
    log_every: int = 3
    eval_steps: int = 4
    ckpt_steps: int = 2
    progress: bool = False


class FakeStop:
    """A StopSignal stand-in that is requested once ``task.step`` reaches ``at``."""

    def __init__(self, task_step, at: int):
        self.task_step, self.at, self.signum = task_step, at, 15

    @property
    def requested(self) -> bool:
        return self.task_step() >= self.at


class FakeTask(TrainTask):
    """Loss ``1 / step`` (``nan`` at the steps in ``nan_at``), one weight that counts the steps; each fetch
    takes 0.5 s and each step 2 s of a fake clock."""

    clock = [0.0]

    def __init__(self, cfg: FakeConfig, stop=None, nan_at=()):
        self.nan_at = set(nan_at)
        super().__init__(cfg, CPU, stop, Window(("loss", "half")))

    def build(self) -> None:
        self.total_steps = self.cfg.total_steps
        self.ddp = torch.nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.ddp.parameters(), lr=0.1)
        self.cadence = Cadence(self.cfg.log_every, self.cfg.eval_steps, self.cfg.ckpt_steps)
        self.weight = torch.zeros(1)

    def next_batch(self):
        self.clock[0] += 0.5
        return self.step + 1

    def train_step(self, batch):
        self.clock[0] += 2.0
        self.step = batch
        self.weight += 1
        loss = math.nan if self.step in self.nan_at else 1 / self.step
        return {"loss": loss, "half": loss / 2}

    def validate(self):
        self.metrics.write({"step": self.step, "split": "val", "weight": self.weight.item()})

    def save_checkpoint(self):
        state = {"step": self.step, "log_window": self.window.saved()}
        self.ckpt.save_step(
            self.step, {"weight": self.weight}, None, state, {"kind": "fake", "config": self.cfg.to_dict()}
        )

    def load_checkpoint(self, state_path: Path):
        state = load_state(state_path)
        self.step = state["step"]
        self.weight = torch.full((1,), float(self.step))
        self.window.restore(state["log_window"])

    def train_row(self, window):
        t = window.timing
        return {"step": self.step, "split": "train", "loss": window.mean("loss"), "half": window.mean("half"),
                "wait": t.data_wait, "compute": t.compute, "timed": t.steps}  # fmt: skip

    def finish(self, wall, timing):
        return {"steps": self.step, "session_steps": timing.steps, "data_wait": timing.data_wait}


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch):
    FakeTask.clock[0] = 0.0
    monkeypatch.setattr(loop.time, "perf_counter", lambda: FakeTask.clock[0])


def _rows(out: Path, split: str | None = None, drop=("wait", "compute", "timed")) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows if split in (None, r["split"])]


def test_cadence_rows_validations_and_checkpoints(tmp_path):
    summary = FakeTask(FakeConfig(output_dir=str(tmp_path))).run()
    assert [r["step"] for r in _rows(tmp_path, "train")] == [3, 6, 9, 10]  # every 3 steps and the last
    assert [r["step"] for r in _rows(tmp_path, "val")] == [4, 8, 10]  # every 4 steps and the last
    assert FakeTask(FakeConfig(output_dir=str(tmp_path), resume="auto")).ckpt.steps() == [8, 10]  # keep_last=2
    assert summary == {"steps": 10, "session_steps": 10, "data_wait": 5.0}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "config.yaml").is_file() and not list(tmp_path.rglob("*.tmp*"))


def test_cadence_by_epochs_and_never():
    c = Cadence(log_every=5, eval_steps=None, ckpt_steps=0, eval_epochs=2, ckpt_epochs=0)
    assert not c.eval_due(7, epoch=1, epoch_end=True, finished=False)
    assert c.eval_due(7, epoch=2, epoch_end=True, finished=False)
    assert not c.eval_due(8, epoch=2, epoch_end=False, finished=False)  # only at the end of the epoch
    assert not c.ckpt_due(8, epoch=2, epoch_end=True, finished=False) and c.ckpt_due(9, 2, False, finished=True)
    assert c.log_due(10, False) and not c.log_due(11, False) and c.log_due(11, True)


def test_window_averages_saves_and_times():
    w = Window(("loss", "aux"))
    w.add({"loss": 1.0, "aux": 0.5}, data_wait=0.25, compute=1.0)
    w.add({"loss": 3.0, "aux": 1.5}, data_wait=0.75, compute=1.0)
    assert w.mean("loss") == 2.0 and w.mean("aux") == 1.0 and w.saved() == [4.0, 2.0, 2]
    assert w.timing == Timing(1.0, 2.0, 2) and w.timing.busy == 3.0
    resumed = Window(("loss", "aux"))
    resumed.restore(w.saved())  # the sums and steps travel with a checkpoint; the timing does not
    assert resumed.sums == w.sums and resumed.steps == 2 and resumed.timing == Timing()
    w.reset()
    assert w.saved() == [0.0, 0.0, 0] and w.timing == Timing()


def test_train_rows_carry_the_window_timing(tmp_path):
    FakeTask(FakeConfig(output_dir=str(tmp_path))).run()
    rows = _rows(tmp_path, "train", drop=())
    assert [(r["wait"], r["compute"], r["timed"]) for r in rows] == [(1.5, 6.0, 3)] * 3 + [(0.5, 2.0, 1)]
    assert rows[0]["loss"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3) and rows[0]["half"] == rows[0]["loss"] / 2


def test_nan_guard_names_the_last_good_checkpoint(tmp_path):
    with pytest.raises(ParameterNetError) as e:
        FakeTask(FakeConfig(output_dir=str(tmp_path)), nan_at={5}).run()
    last = tmp_path / "checkpoints" / "step_0000004.state.pt"
    assert str(e.value) == (
        f"training loss became nan at step 5; stopped and the last good checkpoint is {last}; "
        f"lower optim.lr or set optim.clip_grad"
    )
    with pytest.raises(ParameterNetError, match="at step 1; stopped and no checkpoint was written"):
        FakeTask(FakeConfig(output_dir=str(tmp_path / "b")), nan_at={1}).run()


def test_interrupt_saves_and_resume_gives_the_same_rows(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    FakeTask(FakeConfig(output_dir=str(ref))).run()
    task = FakeTask(FakeConfig(output_dir=str(out)))
    task.stop = FakeStop(lambda: task.step, at=5)  # not a checkpoint step: the interrupt writes one
    with pytest.raises(RunInterrupted) as e:
        task.run()
    assert e.value.step == 5 and Path(e.value.checkpoint).name == "step_0000005.safetensors"
    assert task.ckpt.steps() == [4, 5]
    # the row at step 6 averages steps 4 to 6, two of them before the interrupt
    summary = FakeTask(FakeConfig(output_dir=str(out), resume="auto")).run()
    assert summary["steps"] == 10 and summary["session_steps"] == 5
    assert _rows(out) == _rows(ref)
    # a complete run returns its summary without training
    assert FakeTask(FakeConfig(output_dir=str(out), resume="auto")).run() == summary


def test_resume_discovery_and_refusals(tmp_path):
    FakeTask(FakeConfig(output_dir=str(tmp_path), total_steps=4)).run()
    ckpt = FakeTask(FakeConfig(output_dir=str(tmp_path), total_steps=4, resume="auto")).ckpt
    latest = ckpt.dir / "step_0000004.state.pt"
    assert discover_resume("auto", ckpt) == latest
    assert discover_resume(str(tmp_path), ckpt) == latest  # a run directory
    assert discover_resume(str(ckpt.dir / "step_0000002.safetensors"), ckpt) == ckpt.dir / "step_0000002.state.pt"
    with pytest.raises(ParameterNetError, match="already holds checkpoints; pass resume=auto"):
        discover_resume(None, ckpt)
    with pytest.raises(ParameterNetError, match="does not exist; use resume=auto"):
        discover_resume(str(tmp_path / "nope.state.pt"), ckpt)
    for step in (2, 4):
        (ckpt.dir / f"step_{step:07d}.safetensors").write_bytes(b"damaged")
    with pytest.raises(ParameterNetError, match="holds no complete checkpoint"):
        discover_resume("auto", ckpt)
    with pytest.raises(ParameterNetError, match="is incomplete"):
        discover_resume(str(latest), ckpt)


def test_resume_refuses_another_recipe_but_not_another_cadence(tmp_path):
    FakeTask(FakeConfig(output_dir=str(tmp_path), total_steps=4)).run()
    config = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ParameterNetError) as e:
        FakeTask(FakeConfig(output_dir=str(tmp_path), total_steps=8, resume="auto"))
    latest = tmp_path / "checkpoints" / "step_0000004.safetensors"
    assert str(e.value) == (
        f"resuming from {str(latest)!r} would change the run's recipe (total_steps 4 -> 8); "
        f"resume without changing them, or start a new output_dir"
    )  # the task's own restart_hint: the vision trainer adds init_from=, which the LM recipe does not have
    assert (tmp_path / "config.yaml").read_text() == config  # the refused recipe is not recorded
    # where and how often it reports may change (RESUME_MAY_CHANGE)
    assert (
        FakeTask(FakeConfig(output_dir=str(tmp_path), total_steps=4, log_every=1, keep_last=3, resume="auto")).step == 4
    )
