"""The experiments' worker processes: one torch thread each, and never left running without their parent.

A signal that arrives before a worker's trainer installs its own handler (which saves a checkpoint) stops the
worker at once, since nothing has been trained yet; SIGTERM also comes when the parent dies (Linux), so no
worker outlives the experiment that started it. The parent passes a stop on with :func:`forward_stop`
(SIGUSR1, which a worker that is already stopping ignores) and reports it with :func:`interrupted`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from typing import Any

__all__ = ["forward_stop", "init_worker", "interrupted"]

_stopping = False


def _stop(signum: int, frame: Any) -> None:
    """Before a trainer's own handler: stop the worker's task at once (nothing is trained yet), once."""
    global _stopping
    from parameternet.runs import RunInterrupted

    if _stopping:  # the parent's request and the user's signal, in either order
        return
    _stopping = True
    raise RunInterrupted(signum, None, None)


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


def interrupted(signum: int, unsaved: Sequence[str]):
    """The :class:`~parameternet.runs.RunInterrupted` a grid raises after a stop: it says a checkpoint of every
    run in progress was saved, or names the ``unsaved`` runs (a worker that ended without saving), which resume
    from their last periodic checkpoint."""
    from parameternet.runs import RunInterrupted

    what = "a checkpoint of every run in progress"
    if unsaved:
        what += f" except {', '.join(unsaved)}, which resume from their last periodic checkpoint"
    return RunInterrupted(signum, None, what)


def init_worker() -> None:
    """``ProcessPoolExecutor(initializer=init_worker)``: signal handlers, death with the parent, one thread."""
    import torch

    from parameternet.runs import die_with_parent

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGUSR1, _stop)
    die_with_parent()
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
