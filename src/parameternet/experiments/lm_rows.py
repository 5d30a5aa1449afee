"""The result rows of the ``lm experiment`` grids: their CSV columns, reading them back, the rows a report reads,
and the curve statistics the reports share (:mod:`parameternet.experiments.lm`, ``lm_upcycle``).

``runs.csv`` has one row per finished run (:data:`COLUMNS`), ``curves.csv`` one per validation of a run
(:data:`CURVE_COLUMNS`) and ``router.csv`` one per layer and validation of a run with experts
(:data:`ROUTER_COLUMNS`); every row carries the git commit and a dirty flag, ``runs.csv`` also the version.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.experiments.provenance import code_id
from parameternet.experiments.rows import parse_numbers, read_csv_rows

__all__ = [
    "COLUMNS",
    "CURVE_COLUMNS",
    "ROUTER_COLUMNS",
    "ReportRows",
    "check_header",
    "fit_change",
    "fmt_mean",
    "load_report_rows",
    "mean_curve",
    "parse_row",
    "read_rows",
    "seed_curves",
]

log = logging.getLogger(__name__)

COLUMNS = (
    "kind", "preset", "variant", "projection", "experts", "seed", "lr", "params", "steps", "start_step", "tokens",
    "train_loss", "val_loss", "val_ppl", "heldout_loss", "mid_val_loss", "next_sentence_acc", "last_word_acc",
    "cls_task", "cls_acc", "cls_items", "threads", "wall_s", "tokens_per_s", "recipe", "run_dir", "commit", "dirty",
    "version",
)  # fmt: skip
CURVE_COLUMNS = ("kind", "preset", "variant", "seed", "step", "tokens", "val_loss", "commit", "dirty")
ROUTER_COLUMNS = (
    "kind", "preset", "variant", "seed", "step", "tokens", "layer", "projection", "top1_prob", "max_share",
    "min_share", "shares", "commit", "dirty",
)  # fmt: skip


# ----- CSV files -----

_INTS = ("experts", "seed", "params", "steps", "start_step", "tokens", "cls_items", "threads", "step", "layer")
_FLOATS = (
    "lr", "train_loss", "val_loss", "val_ppl", "heldout_loss", "mid_val_loss", "next_sentence_acc", "last_word_acc",
    "cls_acc", "wall_s", "tokens_per_s", "top1_prob", "max_share", "min_share",
)  # fmt: skip


def parse_row(row: dict[str, Any]) -> dict[str, Any]:
    parse_numbers(row, _INTS, _FLOATS)
    if "dirty" in row:
        row["dirty"] = str(row["dirty"])
    return row


def read_rows(csv_path: str | Path) -> list[dict[str, Any]]:
    """The rows of one of the experiment's CSVs with numbers parsed (missing file: no rows)."""
    return read_csv_rows(csv_path, parse_row)


def check_header(csv_path: Path, columns: Sequence[str]) -> None:
    """A CSV that exists must have ``columns``. One written before columns were added (its columns are ``columns``
    less some, in order: ``heldout_loss`` came later) is rewritten with the new columns empty in its rows, which
    were not measured (``results/lm/runs.csv`` is such a file); any other header is a user error."""
    if not csv_path.is_file() or csv_path.stat().st_size == 0:
        return
    with open(csv_path, newline="") as f:
        header = tuple(next(csv.reader(f), ()))
    if header == tuple(columns):
        return
    if set(header) < set(columns) and [c for c in columns if c in header] == list(header):
        with open(csv_path, newline="") as f:
            old = list(csv.DictReader(f))
        fd, tmp = tempfile.mkstemp(dir=csv_path.parent, prefix=f".{csv_path.name}-")
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows({c: r.get(c, "") for c in columns} for r in old)
        os.replace(tmp, csv_path)
        added = [c for c in columns if c not in header]
        log.warning("%s: added the columns %s, empty in its %d earlier rows", csv_path, ", ".join(added), len(old))
        return
    raise ParameterNetError(
        f"{str(csv_path)!r} has other columns than this version writes; move it away or pass another --output"
    )


# ----- curves -----


def fit_change(curve: Sequence[tuple[float, float]], span: float) -> float:
    """Least-squares slope of ``(x, y)`` points times ``span``: the fitted change of ``y`` over ``span``."""
    if len(curve) < 2:
        return math.nan
    xs, ys = [c[0] for c in curve], [c[1] for c in curve]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx * span


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean over runs at the steps every run evaluated."""
    if not curves:
        return []
    common = set.intersection(*({s for s, _ in c} for c in curves))
    maps = [dict(c) for c in curves]
    return [(s, sum(m[s] for m in maps) / len(maps)) for s in sorted(common)]


def seed_curves(curve_rows: list[dict[str, Any]], kind: str, variant: str) -> list[list[tuple[int, float]]]:
    by: dict[int, list[tuple[int, float]]] = {}
    for r in curve_rows:
        if r["kind"] == kind and r["variant"] == variant:
            by.setdefault(r["seed"], []).append((r["step"], r["val_loss"]))
    return [sorted(c) for _, c in sorted(by.items())]


def fmt_mean(values: Sequence[float], digits: int = 4) -> str:
    from parameternet.experiments.stats import summary

    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    s = summary(vals)
    return f"{s.mean:.{digits}f} ± {s.se:.{digits}f} ({s.n})" if s.n > 1 else f"{s.mean:.{digits}f} (1)"


@dataclass
class ReportRows:
    """What a report reads: the ``rows`` (``runs.csv``), ``curves`` and ``router`` rows of one preset and one
    code version (or pooled), and ``note``, the sentence that says which code made them and what was left out."""

    rows: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    router: list[dict[str, Any]]
    note: str


def load_report_rows(output: str | Path, preset: str | None, pool_commits: bool = False) -> ReportRows:
    """The rows of ``preset`` (None: every preset) in ``output``'s CSVs, from the code version with the most of
    them unless ``pool_commits``. Raises ParameterNetError when ``output`` or its ``runs.csv`` does not exist, or
    when it holds no row of ``preset`` (naming the presets it holds)."""
    output = Path(output)
    csv_path = output / "runs.csv"
    if not csv_path.is_file():
        missing = output if not output.is_dir() else csv_path
        raise ParameterNetError(
            f"{str(missing)!r} does not exist; pass the --output directory an lm experiment run wrote its runs.csv to, "
            f"or run the grid first"
        )
    everything = [r for r in read_rows(csv_path) if "kind" in r]
    rows = [r for r in everything if preset is None or r["preset"] == preset]
    if not rows:
        held = sorted({r["preset"] for r in everything if r.get("preset")})
        if held:
            raise ParameterNetError(
                f"{str(csv_path)!r} holds no rows of preset {preset!r}, only of {', '.join(map(repr, held))}; pass "
                f"--preset NAME, e.g. --preset {held[0]}"
            )
        raise ParameterNetError(f"{str(csv_path)!r} holds no rows; run the grid first")
    codes: dict[str, int] = {}
    for r in rows:
        codes[code_id(r)] = codes.get(code_id(r), 0) + 1
    code = None if pool_commits else max(codes, key=codes.get)

    def keep(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rs = [r for r in rs if preset is None or r["preset"] == preset]
        return rs if code is None else [r for r in rs if code_id(r) == code]

    kept = keep(rows)
    note = (
        f"All {len(kept)} rows from code {code} (version {kept[0]['version']})."
        if code
        else f"Rows pooled across code versions {', '.join(codes)} (--pool-commits)."
    )
    if len(rows) > len(kept):
        note += f" {len(rows) - len(kept)} rows from other code were left out (`--pool-commits` pools them)."
    return ReportRows(kept, keep(read_rows(output / "curves.csv")), keep(read_rows(output / "router.csv")), note)
