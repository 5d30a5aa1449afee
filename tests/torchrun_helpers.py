"""What the multi-process tests share: torchrun on 2 CPU processes, SIGKILL of the agent and its workers mid-run,
a killed run resumed, metrics rows without their timings, the largest difference between two state dicts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    # one thread per process: reproducible reductions, and two processes share the 2 cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(command: list[str], *overrides: str, popen: bool = False):
    """``parameternet COMMAND... OVERRIDES...`` on 2 processes; the finished run (asserted to succeed), or the
    running ``Popen`` with ``popen``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "parameternet",
           *command, *overrides]  # fmt: skip
    if popen:
        return subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def kill_9(agent: subprocess.Popen) -> None:
    """SIGKILL a torchrun agent and its workers (each in a session of its own, so not in the agent's group)."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == agent.pid:  # the parent pid
            workers.append(int(stat.parent.name))
    assert workers, "torchrun has no worker processes"
    agent.kill()
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    agent.wait()
    for pid in workers:
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]:
            time.sleep(0.01)


def kill_after_first_checkpoint(victim: subprocess.Popen, out: Path) -> int:
    """SIGKILL the run ``victim`` writes into ``out`` once its step-2 checkpoint exists; the last step it
    checkpointed (asserted to be before the end)."""
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_0000002.manifest.json").exists():
        assert victim.poll() is None and time.time() < deadline, victim.stderr.read()[-3000:]
        time.sleep(0.01)
    kill_9(victim)
    assert not (out / "summary.json").exists(), "killed too late to test anything"
    return max(int(p.name[5:12]) for p in (out / "checkpoints").glob("step_*.manifest.json"))


def kill_and_resume(run, args: list[str], full: Path, cut: Path) -> int:
    """``run(*args, output_dir=...)`` (a :func:`torchrun` of one command) three times: into ``cut``, SIGKILLed after
    its first checkpoint; into ``full``, uninterrupted; into ``cut`` again with ``resume=auto``, asserted to resume
    from the last checkpoint of the first. Returns the step of that checkpoint."""
    last = kill_after_first_checkpoint(run(*args, f"output_dir={cut}", popen=True), cut)
    run(*args, f"output_dir={full}")
    res = run(*args, f"output_dir={cut}", "resume=auto")
    assert f"resumed from {cut / 'checkpoints' / f'step_{last:07d}.state.pt'} at step {last}" in res.stderr
    return last


def rows(out: Path, split: str = "train", timing: tuple[str, ...] = ("tokens_per_s",)) -> list[dict]:
    """The ``split`` rows of ``out/metrics.jsonl`` without the ``timing`` keys, which differ between runs."""
    found = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in timing} for r in found if r["split"] == split]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
