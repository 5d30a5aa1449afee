"""Which code made a result: the git commit of the package's checkout, whether it had local changes, the version.

Every experiment row carries these, so that rows made by different code are never pooled by accident.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from pathlib import Path

__all__ = ["code_id", "provenance", "rows_of_this_code"]

log = logging.getLogger(__name__)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, str | bool]:
    """``{"commit", "dirty", "version"}`` of the imported ``parameternet`` package.

    ``commit`` is the HEAD of the git checkout that holds the imported source (``""`` for an installed wheel, which
    has none; ``$PARAMETERNET_COMMIT``, when set, names the commit of a source tree copied to another machine, and
    then ``dirty`` is ``"unknown"``);
    ``dirty`` is True when a tracked file of that checkout's ``src/`` differs from the commit (result
    files written by the run itself do not count); ``version`` is the package version.
    """
    import parameternet

    pkg = Path(parameternet.__file__).resolve().parent
    if os.environ.get("PARAMETERNET_COMMIT"):
        # A source tree copied to another machine (with no .git, or a stale one): the commit as the copier names it,
        # and "unknown" for whether it had changes, which nothing there can check.
        return {"commit": os.environ["PARAMETERNET_COMMIT"], "dirty": "unknown", "version": parameternet.__version__}
    commit = _git(["rev-parse", "HEAD"], pkg) or ""
    dirty: bool | str = False
    if commit:
        top = _git(["rev-parse", "--show-toplevel"], pkg)
        status = _git(["status", "--porcelain", "--untracked-files=no", "--", str(pkg)], Path(top or pkg))
        dirty = bool(status)
    return {"commit": commit, "dirty": dirty, "version": parameternet.__version__}


def code_id(row: dict) -> str:
    """One string per code version of a result row: the short commit, ``+dirty`` when it had local changes."""
    commit = str(row.get("commit") or "unknown")[:12]
    dirty = str(row.get("dirty", "")).lower() in ("true", "1")
    return commit + ("+dirty" if dirty else "")


def rows_of_this_code(rows: list[dict], what: str, source: object) -> tuple[list[dict], str]:
    """The rows made by the imported code, and its :func:`code_id`; logs how many rows of other code (kept in
    ``source``, never reused or pooled) there are, and whether the source tree has uncommitted changes."""
    code = code_id(provenance())
    own = [r for r in rows if code_id(r) == code]
    other = sorted({code_id(r) for r in rows} - {code})
    if other:
        log.warning(
            "%s: %d rows in %s come from other code (%s); they are kept but not reused or pooled",
            what, len(rows) - len(own), source, ", ".join(other),
        )  # fmt: skip
    if provenance()["dirty"]:
        log.warning("%s: the source tree has uncommitted changes; rows are marked dirty=True", what)
    return own, code
