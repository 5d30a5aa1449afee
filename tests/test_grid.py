"""The experiments' grid runner: order, failures, runs complete before, stops passed on, a killed runner."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parameternet.errors import ParameterNetError
from parameternet.experiments import grid
from parameternet.experiments.grid import Job, run_jobs
from parameternet.runs import RunInterrupted
from process_helpers import sigterm_when, wait_for

# A stand-in for `parameternet ...`: `RUN_DIR ok|fail|slow`, with the real StopSignal, as train and lm train use it,
# and the CLI's end after a stop.
FAKE = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from parameternet.runs import StopSignal

    run, mode = Path(sys.argv[1]), sys.argv[2]
    run.mkdir(parents=True, exist_ok=True)
    (run / "started").write_text(str(time.time()))
    if mode == "fail":
        print("parameternet train: error: optim.lr=-1 is invalid; it must be positive", file=sys.stderr)
        sys.exit(2)
    with StopSignal() as stop:
        end = time.time() + (0.2 if mode == "ok" else 120)
        while time.time() < end and not stop.requested:
            (run / "metrics.jsonl").write_text(json.dumps({"step": 3}) + "\\n")
            time.sleep(0.02)
        if stop.requested:
            (run / "saved").write_text("yes")
    if stop.requested:  # as the CLI ends after a stop: a later SIGTERM is the same stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(128 + stop.signum)
    (run / "summary.json").write_text(json.dumps({"mode": mode, "threads": os.environ["OMP_NUM_THREADS"]}))
    """
)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    monkeypatch.setattr(grid, "COMMAND", [sys.executable, str(script)])
    return tmp_path


def _job(root: Path, name: str, mode: str, after=()) -> Job:
    return Job(name, [str(root / name), mode], root / name, after=list(after))


def test_jobs_run_after_what_they_need_and_a_failure_drops_only_its_dependents(fake):
    a, bad = _job(fake, "a", "ok"), _job(fake, "bad", "fail")
    b, c = _job(fake, "b", "ok", [a]), _job(fake, "c", "ok", [bad])
    d = _job(fake, "d", "ok", [a, b])
    done = []
    with pytest.raises(ParameterNetError) as info:
        run_jobs([d, c, b, bad, a], 2, lambda j: done.append(j.name), poll_s=0.02)
    assert "1 run(s) failed, first: bad: parameternet train: error: optim.lr=-1 is invalid" in str(info.value)
    assert str(bad.log_path) in str(info.value) and not (fake / "c").exists()  # dropped, never started
    assert done == ["a", "b", "d"] and a.summary == {"mode": "ok", "threads": "1"}
    started = {j: float((fake / j / "started").read_text()) for j in "abd"}
    assert started["a"] < started["b"] < started["d"]


def test_a_run_complete_before_is_not_started_again(fake):
    a = _job(fake, "a", "fail")
    a.run_dir.mkdir()
    (a.run_dir / "summary.json").write_text('{"mode": "earlier"}')
    done = []
    run_jobs([a], 1, done.append)
    assert done == [a] and a.summary == {"mode": "earlier"} and not a.log_path.exists()


@pytest.mark.parametrize("to", ["runner", "every process"])
def test_a_stop_reaches_every_running_run_once_or_twice_and_each_saves(fake, to):
    """``kill PID`` of the runner, or a SIGTERM to every process at once (systemd, Slurm, pkill): the runner passes
    its stop on, and a run that got its own copy too takes the second one for the same stop."""
    jobs = [_job(fake, n, "slow") for n in ("a", "b", "c")]

    def running() -> bool:
        return all((j.run_dir / "started").exists() for j in jobs[:2])

    with (
        sigterm_when(running, 60, b"fake.py" if to == "every process" else None),
        pytest.raises(RunInterrupted) as info,
    ):
        run_jobs(jobs, 2, lambda j: None, poll_s=0.02)
    assert info.value.exit_code == 128 + signal.SIGTERM and "except" not in str(info.value)
    assert all((j.run_dir / "saved").exists() for j in jobs[:2]) and not jobs[2].run_dir.exists()


def test_a_killed_runner_leaves_no_run_behind(fake, tmp_path):
    """Linux sends each run SIGTERM when its runner dies (even by SIGKILL), and the run saves."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from parameternet.experiments import grid
        grid.COMMAND = [sys.executable, {str(fake / "fake.py")!r}]
        root = Path({str(tmp_path)!r})
        grid.run_jobs([grid.Job("k", [str(root / "k"), "slow"], root / "k")], 1, lambda j: None)
        """
    )
    runner = subprocess.Popen([sys.executable, "-c", code])
    wait_for((tmp_path / "k" / "started").exists, 60)
    runner.kill()
    runner.wait()
    assert wait_for((tmp_path / "k" / "saved").exists, 30)


def test_job_progress_reads_the_newest_step(tmp_path):
    job = Job("x", [], tmp_path / "x")
    assert job.progress().startswith("x step 0")
    job.run_dir.mkdir()
    (job.run_dir / "metrics.jsonl").write_text(json.dumps({"step": 5}) + "\n" + "not json\n")
    assert job.progress().startswith("x step 5")
