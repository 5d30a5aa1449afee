"""Which checkpoint a run resumes from, and whether it may: ``resume=auto``, a checkpoint file or a directory
(:func:`discover_resume`); the refusal to write over another run's checkpoints or to resume one with another recipe
(:func:`check_resume_recipe`; :data:`RESUME_MAY_CHANGE` lists the keys that may change). The run loop
(:mod:`parameternet.train.loop`) calls both before a task builds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.train.checkpoint import CheckpointManager, recorded_metadata, state_path_for
from parameternet.train.recipe import recipe_keys

__all__ = ["RESUME_MAY_CHANGE", "check_resume_recipe", "discover_resume"]

log = logging.getLogger(__name__)


def discover_resume(resume: str | None, ckpt: CheckpointManager) -> Path | None:
    """The ``.state.pt`` a run resumes from, or None for a new run.

    ``resume`` is None (a new run), ``auto`` (the newest complete checkpoint in ``ckpt.dir``, None when there
    is none), a run or ``checkpoints/`` directory (its newest complete one), or a checkpoint's ``.state.pt`` /
    ``.safetensors``. Raises ParameterNetError for a path that does not exist or an incomplete checkpoint, and
    when a new run would write into a directory that already holds checkpoints.
    """
    found = _resume_path(resume, ckpt)
    if found is None and ckpt.steps():
        out = ckpt.dir.parent
        if resume == "auto":
            skipped = "; ".join(f"{t}: {r}" for t, r in ckpt.skipped)
            raise ParameterNetError(
                f"output_dir {str(out)!r} holds no complete checkpoint ({skipped}); choose another output_dir "
                f"or delete {str(ckpt.dir)!r} to start over"
            )
        raise ParameterNetError(
            f"output_dir {str(out)!r} already holds checkpoints; pass resume=auto to continue that run "
            f"or choose another output_dir"
        )
    return found


# The recipe keys a resumed run may change: where it writes, how often it reports, validates and checkpoints, how it
# loads data and how many threads it runs; none of them changes the weights it ends with. Any other key is the run's.
RESUME_MAY_CHANGE = frozenset(
    {
        "output_dir",
        "resume",
        "progress",
        "tensorboard",
        "log_every",
        "eval_every_steps",
        "eval_every_epochs",
        "ckpt_every_steps",
        "ckpt_every_epochs",
        "keep_last",
        "eval_batch_size",
        "data.num_workers",
        "threads",
        "router_windows",
        "heldout_loss",
    }
)


_UNSET = object()  # a key the checkpoint does not record


def check_resume_recipe(
    cfg: Any, state_path: Path, restart: str = "start a new output_dir", skip: tuple[str, ...] = ()
) -> None:
    """Refuse to resume from the checkpoint whose ``.state.pt`` is ``state_path`` with a recipe ``cfg`` (a recipe
    dataclass) that differs from the one the checkpoint records in a key outside :data:`RESUME_MAY_CHANGE`: the
    restored optimizer and scheduler would go on with the old values while ``config.yaml`` said the new ones.

    Keys the checkpoint does not record (written before they existed) and keys starting with one of ``skip`` (a
    fork's ``"branch."``) are not compared. Raises ParameterNetError
    naming each changed key with its old and new value, ending with ``restart`` (how the task starts afresh).
    """
    source, meta = recorded_metadata(state_path)
    saved = meta.get("config")
    if not saved:
        return
    changes = []
    for key in recipe_keys(type(cfg)):
        if key in RESUME_MAY_CHANGE or key.startswith(skip):
            continue
        old, new = saved, cfg
        for part in key.split("."):
            old = old.get(part, _UNSET) if isinstance(old, dict) else _UNSET
            new = getattr(new, part)
        new = json.loads(json.dumps(new))  # as the checkpoint holds it: lists, not tuples
        if old is not _UNSET and old != new:
            changes.append(f"{key} {old!r} -> {new!r}")
    if changes:
        raise ParameterNetError(
            f"resuming from {str(source)!r} would change the run's recipe ({', '.join(changes)}); resume without "
            f"changing them, or {restart}"
        )


def _resume_path(r: str | None, ckpt: CheckpointManager) -> Path | None:
    if r is None:
        return None
    if r == "auto":
        latest = ckpt.latest()
        if latest is None:
            log.info("resume=auto: no checkpoint in %s, starting a new run", ckpt.dir)
        return latest
    p = Path(r)
    if p.is_dir():
        latest = CheckpointManager(p / "checkpoints" if (p / "checkpoints").is_dir() else p).latest()
        if latest is None:
            raise ParameterNetError(f"resume={r!r}: the directory holds no checkpoint; use resume=auto or a file")
        return latest
    if p.name.endswith(".safetensors"):
        p = state_path_for(p)
    if not p.is_file():
        raise ParameterNetError(f"resume={r!r} does not exist; use resume=auto or a checkpoint's .state.pt")
    reason = CheckpointManager(p.parent).verify(p.name.removesuffix(".state.pt"))
    if reason is not None:
        raise ParameterNetError(
            f"resume={r!r} is incomplete ({reason}); use resume=auto, which takes the newest complete checkpoint"
        )
    return p
