"""The experiments' worker processes: one torch thread each, and never left running without their parent.

A signal that arrives before a worker's trainer installs its own handler (which saves a checkpoint) stops the
worker at once, since nothing has been trained yet; SIGTERM also comes when the parent dies (Linux), so no
worker outlives the experiment that started it.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["init_worker"]


def _stop(signum: int, frame: Any) -> None:
    from parameternet.runs import RunInterrupted

    raise RunInterrupted(signum, None, None)


def init_worker() -> None:
    """``ProcessPoolExecutor(initializer=init_worker)``: signal handlers, death with the parent, one thread."""
    import torch

    from parameternet.runs import die_with_parent

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    die_with_parent()
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
