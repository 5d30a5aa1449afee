"""Result rows of the experiments: appended to a CSV one by one, each flushed and fsynced as it lands."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["append_rows"]


def append_rows(csv_path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Append ``rows`` (missing columns empty) to ``csv_path``, writing the header to a new or empty file."""
    if not rows:
        return
    new = not csv_path.is_file() or csv_path.stat().st_size == 0
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in columns} for row in rows)
        f.flush()
        os.fsync(f.fileno())
