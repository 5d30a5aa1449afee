"""Stopping an experiment from a test as a user would: SIGTERM to this process (the grid runner) and, as systemd,
Slurm or ``pkill`` would send it, to each of its runs too."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def wait_for(ready: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    """Poll ``ready`` until it is true or ``timeout`` seconds passed; its last value."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        time.sleep(poll)
    return ready()


def children(marker: bytes) -> list[int]:
    """This process's children whose command line (NUL-separated) holds ``marker``."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids += [int(x) for x in (task / "children").read_text().split()]
    return [p for p in pids if marker in Path(f"/proc/{p}/cmdline").read_bytes()]


@contextlib.contextmanager
def sigterm_when(ready: Callable[[], bool], timeout: float, runs: bytes | None = None) -> Iterator[None]:
    """While the body runs: once ``ready()`` (or after ``timeout`` seconds), SIGTERM to this process and, with
    ``runs``, to each child whose command line holds it."""

    def stop() -> None:
        wait_for(ready, timeout)
        os.kill(os.getpid(), signal.SIGTERM)
        for pid in children(runs) if runs is not None else ():
            os.kill(pid, signal.SIGTERM)

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
