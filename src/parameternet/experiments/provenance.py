"""Which code made a result: the git commit of the package's checkout, whether it had local changes, the version.

Every experiment row carries these, so that rows made by different code are never pooled by accident.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__all__ = ["code_id", "provenance"]


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
    has none); ``dirty`` is True when a tracked file of that checkout's ``src/`` differs from the commit (result
    files written by the run itself do not count); ``version`` is the package version.
    """
    import parameternet

    pkg = Path(parameternet.__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], pkg) or ""
    dirty = False
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
