"""Result rows of the experiments: appended to a CSV one by one, each flushed and fsynced as it lands."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["append_rows", "parse_numbers", "read_csv_rows"]


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


def parse_numbers(row: dict[str, Any], ints: Sequence[str], floats: Sequence[str]) -> dict[str, Any]:
    """``row`` (a CSV row of strings) with the columns ``ints`` and ``floats`` that it has parsed in place, an empty
    cell as None; returns ``row``."""
    for k in ints:
        if k in row:
            row[k] = int(float(row[k])) if row[k] not in (None, "") else None
    for k in floats:
        if k in row:
            row[k] = float(row[k]) if row[k] not in (None, "") else None
    return row


def read_csv_rows(csv_path: str | Path, parse: Callable[[dict[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``csv_path``, each through ``parse`` (a missing file: no rows)."""
    path = Path(csv_path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [parse(dict(r)) for r in csv.DictReader(f)]
