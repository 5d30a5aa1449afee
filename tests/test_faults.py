"""Fault injection: two writers, SIGINT / SIGTERM / SIGKILL at random steps, a full disk, a read-only directory,
truncated and bit-flipped checkpoints. After each fault the run resumes and ends with exactly the metrics and
weights of an uninterrupted run. The long subprocess cases are marked slow (`make test-slow`)."""

import contextlib
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from parameternet.cli import main
from parameternet.runs import LOCK_NAME, RunLock
from parameternet.train.checkpoint import load_weights
from parameternet.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
ARGS = ["train", SMOKE, "max_steps=12", "batch_size=16", "ckpt_every_steps=4", "log_every=1", "progress=false"]
TIMING = ("images_per_s", "data_wait_s", "step_s")
RNG = random.Random(15)  # the "random" steps are drawn from a fixed seed, so a failure reproduces


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _same_run(a: Path, b: Path) -> None:
    assert _rows(a) == _rows(b)
    wa = load_weights(a / "checkpoints" / "final.safetensors")[0]
    wb = load_weights(b / "checkpoints" / "final.safetensors")[0]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(a.rglob("*.tmp*")) and not (a / LOCK_NAME).exists()


@pytest.fixture(scope="module")
def reference(packaged_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main([*ARGS, f"output_dir={out}"]) == 0
    return out


def _signal_at(monkeypatch, plan: dict[int, int]) -> None:
    """Send ``plan[step]`` to this process right after training step ``step``."""
    step = Trainer._train_step

    def wrapped(self, x, y):
        value = step(self, x, y)
        if self.step in plan:
            os.kill(os.getpid(), plan.pop(self.step))
        return value

    monkeypatch.setattr(Trainer, "_train_step", wrapped)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----- one writer per run directory --------------------------------------------------------------------------------


def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(packaged_data, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "command": "x"}))
        assert main([*ARGS, f"output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by pid {holder.pid}" in err
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # another host's lock cannot be checked: refused as well
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "x"}))
    assert main([*ARGS, f"output_dir={out}"]) == 2 and "on elsewhere" in capsys.readouterr().err
    # a lock whose process is gone is taken over with a warning; the lock is released at the end
    (out / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "command": "x"}))
    assert main([*ARGS, "max_steps=2", f"output_dir={out}"]) == 0
    assert "taking over the stale lock" in caplog.text and not (out / LOCK_NAME).exists()


def test_lock_is_exclusive_in_one_process_too(tmp_path):
    with RunLock(tmp_path / "x"):
        with pytest.raises(ValueError, match="in use by pid"):
            RunLock(tmp_path / "x").acquire()
    with RunLock(tmp_path / "x"):  # released, so it can be taken again
        pass


# ----- interrupts that save ----------------------------------------------------------------------------------------


def test_sigint_and_sigterm_at_random_steps_save_and_resume_exactly(reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    first, second = sorted(RNG.sample([s for s in range(1, 12) if s % 4], 2))  # never on a checkpoint step
    _signal_at(monkeypatch, {first: signal.SIGINT, second: signal.SIGTERM})
    assert main([*ARGS, f"output_dir={out}"]) == 130
    err = capsys.readouterr().err
    assert f"stopped by SIGINT at step {first}" in err and "resume=auto" in err.splitlines()[-1]
    assert (out / "checkpoints" / f"step_{first:07d}.manifest.json").is_file()  # saved on the way out
    assert not (out / LOCK_NAME).exists()
    assert main([*ARGS, f"output_dir={out}", "resume=auto"]) == 143
    assert f"stopped by SIGTERM at step {second}" in capsys.readouterr().err
    assert main([*ARGS, f"output_dir={out}", "resume=auto"]) == 0
    _same_run(out, reference)


# ----- corrupt checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_resume_skips_a_damaged_latest_checkpoint(reference, tmp_path, monkeypatch, capsys, caplog, damage):
    out = tmp_path / "run"
    _signal_at(monkeypatch, {8: signal.SIGTERM})  # checkpoints at 4 and 8, then stop
    assert main([*ARGS, f"output_dir={out}"]) == 143
    victim = out / "checkpoints" / ("step_0000008.safetensors" if damage == "bitflip" else "step_0000008.state.pt")
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0x10  # one bit of one weight: safetensors still parses it
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main([*ARGS, f"output_dir={out}", "resume=auto"]) == 0
    assert "skipped step_0000008" in caplog.text and "using step_0000004" in caplog.text
    _same_run(out, reference)


# ----- a full disk and a read-only directory -----------------------------------------------------------------------


@contextlib.contextmanager
def _small_disk(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` where this process may mount one, else ENOSPC from a patched os.write once
    the files under ``path`` pass ``size``; yields a function that "frees space" (grows the disk)."""
    path.mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                   capture_output=True).returncode == 0  # fmt: skip
    if mounted:
        try:
            yield lambda: subprocess.run(["mount", "-o", "remount,size=64m", str(path)], check=True)
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
        return
    limit = [int(size.rstrip("m")) << 20]
    real = os.write

    def write(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}")
        used = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if target.startswith(str(path)) and used + len(data) > limit[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", write)
        yield lambda: limit.__setitem__(0, 1 << 40)


def test_full_disk_is_one_sentence_and_resume_loses_nothing(reference, tmp_path, capsys):
    disk = tmp_path / "disk"
    with _small_disk(disk, "7m") as free_space:  # one checkpoint is about 4.6 MB: step 4 fits, step 8 does not
        out = disk / "run"
        assert main([*ARGS, f"output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "the disk is full" in err and "step_0000008" in err
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert not [n for n in names if ".tmp" in n], names  # no half-written file left behind
        assert "step_0000004.manifest.json" in names and not (out / LOCK_NAME).exists()
        free_space()
        assert main([*ARGS, f"output_dir={out}", "resume=auto"]) == 0
        _same_run(out, reference)


@pytest.fixture
def read_only_dir(tmp_path):
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)]).returncode != 0:
        pytest.skip("root without mount: a read-only directory cannot be made here")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_directory_is_one_sentence_for_train_convert_export(packaged_data, read_only_dir, capsys):
    cases = [
        [*ARGS, f"output_dir={read_only_dir / 'run'}"],
        ["convert", "test_resnet", "--experts", "2", "-o", str(read_only_dir / "m.safetensors")],
        ["export", "test_resnet", "--onnx", str(read_only_dir / "m.onnx")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cannot write" in err, err
        assert "read-only" in err or "permission" in err
    assert list(read_only_dir.iterdir()) == []


def test_a_file_in_the_way_of_an_output_directory_is_one_sentence_for_every_writer(packaged_data, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    cases = [
        [*ARGS, f"output_dir={blocker}"],
        [*ARGS, f"output_dir={blocker / 'sub'}"],
        ["convert", "test_resnet", "--experts", "2", "-o", str(blocker / "m.safetensors")],
        ["export", "test_resnet", "--onnx", str(blocker / "m.onnx")],
        ["pitfall", "--preset", "smoke", "--output", str(blocker / "x"), "--runs-dir", str(tmp_path / "runs")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{str(blocker)!r} is a file" in err, err
    assert blocker.read_text() == "not a directory"


def test_files_written_atomically_are_readable_by_others_as_the_umask_says(tmp_path):
    from parameternet.runs import atomic_write

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "summary.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["ckpt_every_steps=-1"], "ckpt_every_steps=-1 is invalid"), (["ckpt_every_epochs=-2"], "ckpt_every_epochs=-2")],
)
def test_negative_checkpoint_intervals_are_refused(tmp_path, capsys, extra, message):
    assert main([*ARGS, f"output_dir={tmp_path / 'run'}", *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_directory_given_as_a_recipe_says_so(tmp_path, capsys):
    assert main(["train", str(tmp_path)]) == 2
    assert "is a directory; pass a YAML file" in capsys.readouterr().err


# ----- init_from another architecture --------------------------------------------------------------------------------


def test_init_from_another_architecture_is_refused_unless_not_strict(reference, tmp_path, capsys):
    args = [*ARGS, "max_steps=1", f"init_from={reference}", "model=resnet10t"]
    assert main([*args, f"output_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "of the model's tensors" in err and "strict=false" in err
    assert main([*args, "init_strict=false", f"output_dir={tmp_path / 'b'}"]) == 0
    # the same architecture still fine-tunes
    assert main([*ARGS, "max_steps=1", f"init_from={reference}", f"output_dir={tmp_path / 'c'}"]) == 0


def test_checkpoint_formats_load_everywhere(reference, tmp_path, capsys):
    import parameternet

    final = reference / "checkpoints" / "final.safetensors"
    assert type(parameternet.load(final)).__name__ == "ResNet"  # a training checkpoint loads with the library
    conv = tmp_path / "c.safetensors"
    assert main(["convert", str(final), "--experts", "2", "-o", str(conv)]) == 0
    capsys.readouterr()
    assert main(["eval", str(conv), "data=fashion-mnist:test:per_class=2", "img_size=32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 20
    # export refuses a model name the checkpoint contradicts, and takes the recorded img_size
    assert main(["export", "resnet10t", "--checkpoint", str(final), "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "holds a 'test_resnet'" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(final), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "1, 3, 32, 32" in capsys.readouterr().out or (tmp_path / "m.onnx").is_file()


# ----- subprocess faults (slow) -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_reference(packaged_data, tmp_path_factory):
    """The uninterrupted run, as a separate process like the runs it is compared with (same thread settings)."""
    out = tmp_path_factory.mktemp("cliref") / "run"
    proc = _popen(*ARGS, f"output_dir={out}")
    assert proc.wait(timeout=240) == 0, proc.stderr.read()
    return out


def _popen(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "parameternet", *args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None and time.time() < deadline, "the run ended too early"
        with contextlib.suppress(OSError, ValueError, IndexError):
            if json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] >= step:
                return
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signals_to_the_cli_process_at_random_steps(cli_reference, tmp_path, sig):
    out = tmp_path / "run"
    proc = _popen(*ARGS, "max_steps=12", f"output_dir={out}")
    _wait_for_step(out, proc, RNG.randint(1, 9))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode in (128 + sig, -sig), err
    if sig != signal.SIGKILL:
        assert "resume=auto" in err and "Traceback" not in err
    res = _popen(*ARGS, f"output_dir={out}", "resume=auto")
    assert res.wait(timeout=240) == 0, res.stderr.read()
    _same_run(out, cli_reference)


@pytest.mark.slow
def test_second_signal_exits_at_once(packaged_data, tmp_path):
    out = tmp_path / "run"
    proc = _popen(*ARGS, "max_steps=400", "batch_size=2048", f"output_dir={out}")  # steps of seconds
    _wait_for_step(out, proc, 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals sent back to back are merged by the kernel into one
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "again: exiting now" in err
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_sigkill_mid_write_leaves_a_temp_that_the_next_run_removes(cli_reference, tmp_path):
    out = tmp_path / "run"
    proc = _popen(*ARGS, "ckpt_every_steps=1", f"output_dir={out}")
    deadline = time.time() + 240
    while not list((out / "checkpoints").glob(".*.tmp")) if (out / "checkpoints").is_dir() else True:
        assert proc.poll() is None and time.time() < deadline, "no write was caught in the act"
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert list((out / "checkpoints").glob(".*.tmp")) and (out / LOCK_NAME).exists()
    res = _popen(*ARGS, "ckpt_every_steps=1", f"output_dir={out}", "resume=auto")
    _, err = res.communicate(timeout=240)
    assert res.returncode == 0 and "stale lock" in err, err
    assert not list(out.rglob(".*.tmp"))
    assert _rows(out) == _rows(cli_reference)


@pytest.mark.slow
def test_two_writers_started_together(packaged_data, tmp_path):
    out = tmp_path / "run"
    a = _popen(*ARGS, f"output_dir={out}")
    b = _popen(*ARGS, "optim.lr=1e-3", f"output_dir={out}")
    (_, ea), (_, eb) = a.communicate(timeout=240), b.communicate(timeout=240)
    assert sorted([a.returncode, b.returncode]) == [0, 2], (ea, eb)
    assert "is in use by pid" in (ea if a.returncode else eb)
    steps = [r["step"] for r in _rows(out) if r["split"] == "train"]
    assert steps == list(range(1, 13))  # one run's rows, no duplicates


# ----- bad input: one sentence, the value, the fix, exit 2 ---------------------------------------------------------


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_lm_bad_inputs_are_one_sentence(tmp_path, capsys, monkeypatch):
    lm = str(ROOT / "configs" / "lm-small.yaml")
    out = f"output_dir={tmp_path / 'run'}"
    assert main(["lm", "train", lm, "model.num_attention_heads=3", out]) == 2
    assert "model.num_attention_heads=3 does not divide model.hidden_size" in _one_line(capsys)
    missing = tmp_path / "nonexistent" / "text"
    assert main(["lm", "train", lm, f"data.dir={missing}", out]) == 2
    assert f"data.dir={str(missing)!r} does not exist" in _one_line(capsys)
    assert not missing.parent.exists() and not (tmp_path / "run").exists()  # nothing created

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert main(["lm", "eval", str(model)]) == 2
    assert "has model_type None, not 'parameternet_llama'" in _one_line(capsys)
    (model / "config.json").write_text(json.dumps({"model_type": "parameternet_llama"}))
    assert main(["lm", "eval", str(model), "--items", "-1"]) == 2
    assert "--items -1 is negative" in _one_line(capsys)
    assert main(["lm", "eval", str(model), "--val-tokens", "0"]) == 2
    assert "--val-tokens 0 is not positive" in _one_line(capsys)
    assert main(["lm", "eval", str(model)]) == 2  # a parameternet_llama config.json without its tokenizer
    assert "has no tokenizer (tokenizer.json); pass the model/ directory an lm train run wrote" in _one_line(capsys)

    monkeypatch.setenv("PARAMETERNET_DATA", str(tmp_path / "empty-cache"))
    from parameternet.data.text import load_corpus

    with pytest.raises(
        ValueError, match="text corpora gutenberg, sotu, brown are not in .*data fetch gutenberg sotu brown"
    ):
        load_corpus()


def test_lm_experiment_keeps_the_overrides(monkeypatch, tmp_path, capsys):
    import parameternet.experiments.lm as exp

    seen = {}

    def fake(preset, recipe, overrides, runs, output, jobs):
        seen.update(preset=preset, overrides=overrides, jobs=jobs)
        return "t"

    monkeypatch.setattr(exp, "run_lm_experiment", fake)
    args = ["lm", "experiment", "--output", str(tmp_path), "--preset", "quick", "--jobs", "2", "zero_shot_items=4"]
    assert main(args) == 0
    assert seen == {"preset": "quick", "overrides": ["zero_shot_items=4"], "jobs": 2}


def test_a_write_the_os_refuses_is_named_in_its_own_words(tmp_path):
    """A failed write under a virtual filesystem is not a "full disk" (its size is 0); the OS's reason is given."""
    import errno

    from parameternet.runs import fs_error

    err = fs_error("/proc/x.onnx", FileNotFoundError(errno.ENOENT, "No such file or directory"))
    assert "no such file or directory; choose another directory" in str(err) and "disk is full" not in str(err)


def test_a_repeated_sigterm_is_the_same_stop_and_a_second_sigint_exits(monkeypatch):
    """SIGTERM is the polite stop several senders may deliver (coreutils' timeout to the process and its group, an
    experiment's runner, systemd): every copy after the first is ignored; Ctrl-C again exits at once."""
    from parameternet.runs import StopSignal

    exits = []
    monkeypatch.setattr("parameternet.runs.os._exit", exits.append)
    stop = StopSignal()
    stop._handler(signal.SIGTERM, None)
    time.sleep(0.2)
    stop._handler(signal.SIGTERM, None)
    assert stop.signum == signal.SIGTERM and exits == []
    stop._handler(signal.SIGINT, None)  # a user's Ctrl-C on top
    assert exits == [128 + signal.SIGINT]
    ctrl_c = StopSignal()
    ctrl_c._handler(signal.SIGINT, None)
    ctrl_c._handler(signal.SIGTERM, None)  # the runner's copy after the user's Ctrl-C: the same stop
    assert ctrl_c.signum == signal.SIGINT and exits == [128 + signal.SIGINT]
    ctrl_c._handler(signal.SIGINT, None)
    assert exits == [128 + signal.SIGINT] * 2
