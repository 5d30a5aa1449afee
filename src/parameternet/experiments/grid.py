"""One runner for every experiment's grid: each run is a subprocess of an ordinary ``parameternet`` command.

An experiment describes its runs as :class:`Job` values: the command line (``train RECIPE ...`` or ``lm train
RECIPE ... resume=auto``), the run directory, the file the command leaves there when it has finished (its
``summary.json``) and the jobs it needs first. :func:`run_jobs` starts up to ``parallel`` of them side by side,
each in its own session with one torch thread (``OMP_NUM_THREADS=1`` and the command's ``threads=1``), its output
in ``<run_dir>.log``, and calls the experiment back with each finished job so that its row lands at once.

The commands already save on SIGINT / SIGTERM and resume with ``resume=auto``, so a stop needs nothing of its
own: the runner passes a stop on to each running command as SIGTERM (they are in their own sessions, so a
terminal's Ctrl-C reaches only the runner, and a run takes a repeated SIGTERM as the same stop), waits for them to
save, and raises
:class:`~parameternet.runs.RunInterrupted`; the same experiment command resumes every run. A run whose runner
dies gets SIGTERM from Linux (the parent-death signal) and saves too. A run that fails drops the jobs that need
it; the others go on, and :class:`~parameternet.errors.ParameterNetError` names the failures at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError

__all__ = ["Job", "run_jobs"]

log = logging.getLogger(__name__)

COMMAND = [sys.executable, "-m", "parameternet"]  # a job's argv follows it


@dataclass(eq=False)
class Job:
    """One run of a grid: ``name`` (for the log), ``argv`` (the ``parameternet`` command's arguments), its
    ``run_dir``, the ``result`` file the command writes there when the run is complete (read into :attr:`summary`),
    the jobs it runs ``after`` and the experiment's own record of the run (``payload``)."""

    name: str
    argv: list[str]
    run_dir: Path
    result: str = "summary.json"
    after: list[Job] = field(default_factory=list)
    payload: Any = None
    summary: dict[str, Any] | None = None
    started: float = 0.0

    @property
    def log_path(self) -> Path:
        """Where the command's output goes: ``<run_dir>.log`` beside the run directory."""
        return self.run_dir.with_name(self.run_dir.name + ".log")

    def progress(self) -> str:
        """``name step k (s)`` from the newest row of the run's ``metrics.jsonl``."""
        step = 0
        path = self.run_dir / "metrics.jsonl"
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines()[-5:]:
                with contextlib.suppress(ValueError, AttributeError):
                    step = max(step, int(json.loads(line).get("step", 0)))
        return f"{self.name} step {step} ({time.perf_counter() - self.started:.0f} s)"


def _child_env() -> dict[str, str]:
    """The environment of a run: one thread, and this very package first on the import path."""
    import parameternet

    root = str(Path(parameternet.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    return env


def _last_line(path: Path) -> str:
    """The command's last words (its one-sentence error), from its log."""
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


def _start(job: Job, env: dict[str, str]) -> subprocess.Popen:
    from parameternet.runs import parent_death_signal

    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    job.started = time.perf_counter()
    log.info("  start %s -> %s", job.name, job.run_dir)
    with open(job.log_path, "ab") as out:
        return subprocess.Popen(
            [*COMMAND, *job.argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=parent_death_signal(),
        )  # fmt: skip


def run_jobs(
    jobs: Sequence[Job], parallel: int, on_done: Callable[[Job], None], heartbeat_s: float = 300.0, poll_s: float = 0.2
) -> None:
    """Run ``jobs`` (each after the jobs it needs), ``parallel`` at a time, calling ``on_done`` with each finished
    one (its :attr:`Job.summary` read). Logs the running jobs every ``heartbeat_s`` seconds.

    Raises RunInterrupted after SIGINT / SIGTERM (every running command saved; a second SIGINT exits at once), and
    ParameterNetError naming the failed runs (the first one's own words) once the others have finished.
    """
    from parameternet.runs import RunInterrupted, StopSignal

    pending = list(jobs)
    running: dict[int, tuple[Job, subprocess.Popen]] = {}
    failures: list[str] = []
    stopped: list[str] = []  # runs that ended after the stop without saving
    env = _child_env()
    heartbeat = time.perf_counter()
    forwarded = 0.0  # when the stop was passed on
    with StopSignal() as stop:
        try:
            while pending or running:
                if stop.requested and not forwarded:
                    forwarded = time.time()
                    pending.clear()
                    for _, proc in running.values():  # SIGTERM, the stop a run takes any number of times
                        with contextlib.suppress(OSError):
                            proc.send_signal(signal.SIGTERM)
                while len(running) < parallel and not stop.requested:
                    ready = next((j for j in pending if all(a.summary is not None for a in j.after)), None)
                    if ready is None:
                        break
                    pending.remove(ready)
                    if (ready.run_dir / ready.result).is_file():  # complete before (a crash before its row)
                        ready.summary = json.loads((ready.run_dir / ready.result).read_text())
                        on_done(ready)
                        continue
                    proc = _start(ready, env)
                    running[proc.pid] = (ready, proc)
                if not running:
                    break
                time.sleep(poll_s)
                if time.perf_counter() - heartbeat >= heartbeat_s:
                    heartbeat = time.perf_counter()
                    log.info("  running: %s", "; ".join(j.progress() for j, _ in running.values()))
                for pid, (job, proc) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del running[pid]
                    done = job.run_dir / job.result
                    if rc == 0 and done.is_file():
                        job.summary = json.loads(done.read_text())
                        on_done(job)
                    elif stop.requested:
                        if rc not in (128 + signal.SIGINT, 128 + signal.SIGTERM) and not _saved_since(job, forwarded):
                            stopped.append(job.name)
                        log.warning("  %s (exit %s): %s", job.name, rc, _last_line(job.log_path))
                    else:
                        failures.append(f"{job.name}: {_last_line(job.log_path)} (log: {job.log_path})")
                        log.error("  FAILED %s", failures[-1])
                        _drop_dependents(pending, job)
        finally:
            for _, proc in running.values():  # only on an error of the runner itself: stop the runs, let them save
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGTERM)
                proc.wait()
    if stop.requested:
        saved = "a checkpoint of every run in progress"
        if stopped:
            saved += f" except {', '.join(stopped)}, which resume from their last periodic checkpoint"
        raise RunInterrupted(stop.signum, None, saved)
    if failures:
        raise ParameterNetError(
            f"{len(failures)} run(s) failed, first: {failures[0]}; fix the cause and run the command again"
        )


def _saved_since(job: Job, when: float) -> bool:
    """Whether the run wrote a complete checkpoint (its manifest, written last) at or after ``when``."""
    with contextlib.suppress(OSError):
        return any(p.stat().st_mtime >= when for p in (job.run_dir / "checkpoints").glob("*.manifest.json"))
    return False


def _drop_dependents(pending: list[Job], failed: Job) -> None:
    dropped = {id(failed)}
    for job in list(pending):
        if any(id(a) in dropped for a in job.after):
            pending.remove(job)
            dropped.add(id(job))
