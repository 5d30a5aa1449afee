"""The experiments' worker processes: one torch thread each, and never left running without their parent.

A signal that arrives before a worker's trainer installs its own handler (which saves a checkpoint) stops the
worker at once, since nothing has been trained yet; SIGTERM also comes when the parent dies (Linux), so no
worker outlives the experiment that started it. The parent passes a stop on with :func:`forward_stop`
(SIGUSR1, which a worker that is already stopping ignores) and reports it with :func:`interrupted`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["forward_stop", "init_worker", "interrupted", "worker_task"]

R = TypeVar("R")

_stopping = False
_busy = False  # a task is running in this worker
_parent: int | None = None


def _stop(signum: int, frame: Any) -> None:
    """Before a trainer's own handler: stop the worker's task at once (nothing is trained yet), once. An idle
    worker ignores the stop (its parent shuts the pool down), unless the parent is gone: then it exits."""
    global _stopping
    from parameternet.runs import RunInterrupted

    if not _busy:
        if os.getppid() != _parent:
            os._exit(128 + signum)
        return
    if _stopping:  # the parent's request and the user's signal, in either order
        return
    _stopping = True
    raise RunInterrupted(signum, None, None)


def worker_task(fn: Callable[..., R]) -> Callable[..., R]:
    """Decorate a function the pool runs: while it runs, a stop raises in it; while the worker waits for the next
    task, a stop is ignored (raising in the pool's queue read would print a traceback)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> R:
        global _busy
        _busy = True
        try:
            return fn(*args, **kwargs)
        finally:
            _busy = False

    return run


def forward_stop(pool: Any) -> None:
    """Ask every worker process of ``pool`` (a ``ProcessPoolExecutor``) to save and stop.

    It sends :data:`StopSignal.REQUEST <parameternet.runs.StopSignal.REQUEST>` (SIGUSR1), not the user's signal:
    a ``kill`` of the parent alone does not reach the workers, while a signal to the process group does, and a
    second SIGINT / SIGTERM would make a worker exit without saving. Call it once, when the parent's stop is
    first seen."""
    from parameternet.runs import StopSignal

    for proc in list(getattr(pool, "_processes", {}).values()):
        with contextlib.suppress(OSError):
            os.kill(proc.pid, StopSignal.REQUEST)


def interrupted(signum: int, unsaved: Sequence[str], fresh: Sequence[str] = ()):
    """The :class:`~parameternet.runs.RunInterrupted` a grid raises after a stop: it says a checkpoint of every
    run in progress was saved, or names the ``unsaved`` runs (a worker that ended without saving), which resume
    from their last periodic checkpoint, and the ``fresh`` ones, stopped before their first step, which start
    over."""
    from parameternet.runs import RunInterrupted

    parts = [f"{', '.join(unsaved)}, which resume from their last periodic checkpoint"] if unsaved else []
    parts += [f"{', '.join(fresh)}, stopped before their first step, which start over"] if fresh else []
    saved = "a checkpoint of every run in progress" + (f" except {'; '.join(parts)}" if parts else "")
    return RunInterrupted(signum, None, saved)


def init_worker() -> None:
    """``ProcessPoolExecutor(initializer=init_worker)``: signal handlers, death with the parent, one thread."""
    import torch

    from parameternet.runs import die_with_parent

    global _parent
    _parent = os.getppid()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGUSR1, _stop)
    die_with_parent()
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
