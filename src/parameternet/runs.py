"""Run directories that never lose or mix a run: one atomic writer, one run lock, interrupts that save.

- :func:`atomic_path` / :func:`atomic_write`: every file the library writes goes to a temporary name in the same
  directory (``.NAME.HOST-PID.RANDOM.tmp``), is fsynced and renamed into place, so a reader sees the old file or
  the new one, never half of one. Temporaries left by a process that died (same host, pid gone) are removed
  the next time anything is written to that directory. ``ENOSPC``, ``EACCES``, ``EROFS`` (and ``EDQUOT``) become
  one :class:`~parameternet.errors.ParameterNetError` sentence naming the path and the reason.
- :class:`RunLock`: ``OUTPUT_DIR/run.lock``, created with ``O_EXCL`` and holding the pid, host and command of the
  one process that writes the directory; a second writer fails with one sentence naming the holder, a lock whose
  process is gone (same host) is taken over with a warning, and the lock is removed when the run ends.
- :class:`StopSignal`: SIGINT / SIGTERM ask the training loop to finish its step, write a checkpoint and raise
  :class:`RunInterrupted` (the CLI prints the ``resume=auto`` line and exits 130 / 143); a second SIGINT exits at
  once, a repeated SIGTERM is the same stop.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from parameternet.errors import ParameterNetError

__all__ = [
    "LOCK_NAME",
    "RunInterrupted",
    "RunLock",
    "StopSignal",
    "atomic_path",
    "atomic_write",
    "clean_stale_temps",
    "fs_error",
    "parent_death_signal",
]

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
_HOST = socket.gethostname()
_TEMP = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp(?:\.[A-Za-z0-9]+)?$")
_REASONS = {
    errno.ENOSPC: "the disk is full; free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted; free some space or write somewhere else",
    errno.EACCES: "permission is denied; choose a directory you can write to",
    errno.EPERM: "permission is denied; choose a directory you can write to",
    errno.EROFS: "the filesystem is read-only; choose a writable directory",
}
_MIN_FREE = 1 << 20  # bytes: below this a failed write is reported as a full disk


def _host_token() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", _HOST)[:32] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def fs_error(path: str | Path, exc: BaseException) -> ParameterNetError | None:
    """The one-sentence error for a failed write to ``path``, or ``None`` when ``exc`` is not a filesystem fault.

    Besides an ``OSError`` with errno ENOSPC / EDQUOT / EACCES / EPERM / EROFS, a library error raised while the
    directory has under 1 MiB free (torch.save and the ONNX exporter report a full disk as ``RuntimeError``) or
    cannot be written to is recognised, and any other ``OSError`` is given in its own words (a path under ``/proc``:
    "no such file or directory").
    """
    reason = _REASONS.get(getattr(exc, "errno", None))
    if reason is None:
        parent = Path(path).parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        try:
            usage = shutil.disk_usage(parent)
            if not os.access(parent, os.W_OK):
                reason = _REASONS[errno.EACCES]
            elif usage.total > 0 and usage.free < _MIN_FREE:  # a virtual filesystem (/proc) has no size at all
                reason = _REASONS[errno.ENOSPC]
        except OSError:
            return None
    if reason is None and isinstance(exc, OSError) and exc.strerror:  # any other OS refusal, in its own words
        reason = f"{exc.strerror[0].lower()}{exc.strerror[1:]}; choose another directory"
    if reason is None:
        return None
    return ParameterNetError(f"cannot write {str(path)!r}: {reason}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dir(directory: str | Path) -> Path:
    """Create ``directory`` (and its parents); a file in the way, or any other OS error, is one sentence."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), directory)
        raise ParameterNetError(
            f"cannot create directory {str(directory)!r}: {str(blocker)!r} is a file; choose another path"
        ) from None
    except OSError as e:
        raise (fs_error(directory / ".", e) or e) from None
    return directory


def clean_stale_temps(directory: str | Path) -> list[Path]:
    """Remove this library's temporary files in ``directory`` whose writer (same host) is gone; return them."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            m = _TEMP.match(entry.name)
            if m and m["host"] == _host_token() and not _pid_alive(int(m["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    if removed:
        log.info("removed %d temporary file(s) left by a killed process in %s", len(removed), directory)
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = False) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed to ``path``.

    ``keep_suffix``: the temporary name ends in ``path``'s suffix too (``.tmp.onnx``), for writers that look at it.

    On any error the temporary file is removed and ``path`` is unchanged. Filesystem faults raise
    ``ParameterNetError`` (see :func:`fs_error`); other errors propagate as they are.
    """
    path = Path(path)
    make_dir(path.parent)
    clean_stale_temps(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{_host_token()}-{os.getpid()}.",
            suffix=".tmp" + (path.suffix if keep_suffix else ""),
            dir=path.parent,
        )
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make results unreadable to other users
        os.close(fd)
    except OSError as e:
        raise (fs_error(path, e) or e) from None
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, ParameterNetError):
            raise
        err = fs_error(path, e) if isinstance(e, (OSError, RuntimeError)) else None
        if err is not None:
            raise err from None
        raise


def atomic_write(path: str | Path, data: bytes | str | Callable[[str], None]) -> Path:
    """Write bytes, text (UTF-8) or ``data(tmp_path)``'s output to ``path`` atomically; return ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if callable(data):
            data(tmp)
        else:
            view = memoryview(data.encode() if isinstance(data, str) else data)
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
    return path


# ----- one writer per directory ------------------------------------------------------------------------------------


class RunLock:
    """The one-writer lock of a run directory (``DIR/run.lock``); use as a context manager.

    Raises ParameterNetError when another live process holds the lock (or the directory cannot be written).
    """

    def __init__(self, directory: str | Path, what: str = "run"):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.what = what
        self.held = False

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": _HOST, "started": time.time(), "command": " ".join(sys.argv)[:500]}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> RunLock:
        make_dir(self.dir)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            except OSError as e:
                raise (fs_error(self.path, e) or e) from None
            try:
                os.write(fd, json.dumps(self._info()).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held = True
            clean_stale_temps(self.dir)
            return self
        raise ParameterNetError(f"could not take the lock {str(self.path)!r}; another process keeps replacing it")

    def _handle_existing(self) -> None:
        holder = self._read()
        if holder is None:
            with contextlib.suppress(OSError):
                if time.time() - self.path.stat().st_mtime < 5:  # being written right now
                    time.sleep(0.2)
                    return
            stale = True
        else:
            stale = holder.get("host") == _HOST and not _pid_alive(int(holder.get("pid", -1)))
        if not stale:
            where = f"pid {holder.get('pid')} on {holder.get('host')}"
            raise ParameterNetError(
                f"{self.what} directory {str(self.dir)!r} is in use by {where} ({holder.get('command', '?')!r}); "
                f"wait for it, stop it, or choose another output directory (delete {str(self.path)!r} only if "
                f"that process is gone)"
            )
        # rename first: of two processes taking over the same stale lock only one rename succeeds
        aside = self.path.with_name(f".{LOCK_NAME}.{_host_token()}-{os.getpid()}.stale.tmp")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        except OSError as e:
            raise (fs_error(self.path, e) or e) from None
        aside.unlink(missing_ok=True)
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "an unreadable lock"
        log.warning("taking over the stale lock of %s in %s (%s is gone)", self.what, self.dir, who)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == _HOST:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> RunLock:
        _LOCKS.append(self)
        try:
            return self.acquire()
        except BaseException:
            _LOCKS.remove(self)
            raise

    def __exit__(self, *exc) -> None:
        self.release()
        with contextlib.suppress(ValueError):
            _LOCKS.remove(self)


_LOCKS: list[RunLock] = []


# ----- interrupts that save -----------------------------------------------------------------------------------------


class RunInterrupted(Exception):
    """A run stopped on SIGINT / SIGTERM after saving a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, step: int | None, checkpoint: str | Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        saved = f"saved {checkpoint}" if checkpoint else "nothing to save yet"
        super().__init__(f"stopped by {name}{'' if step is None else f' at step {step}'}; {saved}")


class StopSignal:
    """Context manager: the first SIGINT / SIGTERM sets :attr:`signum` (the loop finishes its step, saves and
    raises :class:`RunInterrupted`); a second SIGINT (Ctrl-C again) exits the process at once with 130.

    A SIGTERM after the first signal is ignored: SIGTERM is the polite stop that ``kill``, coreutils' ``timeout``
    (which signals its child and then the child's process group), systemd, Slurm and an experiment's grid runner
    send, and several of them may reach the same process for one stop. Send SIGKILL to end a run without saving.
    Outside the main thread (where handlers cannot be set) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            if signum != signal.SIGINT:
                return  # the same stop again (another sender of SIGTERM)
            sys.stderr.write("\nSIGINT again: exiting now without saving\n")
            sys.stderr.flush()
            for lock in list(_LOCKS):
                lock.release()
            os._exit(128 + signum)
        self.signum = signum
        again = "press Ctrl-C again to exit at once" if signum == signal.SIGINT else "SIGKILL exits at once"
        sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint ({again})\n")
        sys.stderr.flush()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` that asks Linux to send ``sig`` to the child when this
    process dies (``PR_SET_PDEATHSIG``); None elsewhere.

    The experiments' grid runner starts each run with it, so a killed runner never leaves a training run behind;
    with SIGTERM the run saves a checkpoint before it exits. libc is loaded here, in the parent, so the child
    only makes the call between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(sig))  # 1 = PR_SET_PDEATHSIG
