"""Reading and summarising the pitfall experiment's rows, shared by every round's report.

One definition of each reported quantity: the gain from pretraining (pretrain -> fine-tune minus target-only top-1,
paired by seed, the target-only run taken from the cell's base), and the routing diagnostics of a run (medians over
its dynamic layers, :func:`parameternet.profiling.routing.summarize_routing`), then means over runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.experiments.pitfall_cells import Cell
from parameternet.experiments.provenance import code_id
from parameternet.experiments.rows import parse_numbers, read_csv_rows

__all__ = [
    "FLOATS",
    "INTS",
    "fmt_top1",
    "gains",
    "read_rows",
    "routing_by_run",
    "routing_table",
    "rows_of_one_code",
    "summarize",
]

INTS = ("head_chs", "experts", "pretrain_epochs", "macs", "params", "img_size", "seed", "steps")
FLOATS = (
    "width", "pretrain_fraction", "top1", "top5", "epochs", "wall_s", "pretrain_top1", "pretrain_wall_s",
    "route_coef_std", "route_kernel_dist", "coef_mean", "coef_std", "kernel_dist",
)  # fmt: skip


def read_rows(csv_path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results CSV with numbers parsed (missing file: no rows)."""
    return read_csv_rows(csv_path, lambda row: parse_numbers(row, INTS, FLOATS))


def rows_of_one_code(
    rows: list[dict[str, Any]], pool_commits: bool = False
) -> tuple[list[dict[str, Any]], str | None, str]:
    """The rows of the code version with the most rows (all rows with ``pool_commits``), that code's id (None when
    pooled) and a sentence saying which rows the report uses."""
    codes: dict[str, int] = {}
    for r in rows:
        codes[code_id(r)] = codes.get(code_id(r), 0) + 1
    if pool_commits:
        return rows, None, f"Rows pooled across code versions {', '.join(codes)} (--pool-commits)."
    code = max(codes, key=codes.get)
    left_out = len(rows) - codes[code]
    rows = [r for r in rows if code_id(r) == code]
    note = f"All {len(rows)} rows from code {code} (version {rows[0]['version']})."
    if left_out:
        note += f" {left_out} rows from other code were left out (`--pool-commits` pools them)."
    return rows, code, note


def gains(rows: list[dict[str, Any]], name: str) -> dict[int, float]:
    """Pretrain -> fine-tune minus target-only top-1 of cell ``name``, paired by seed (target-only from its base)."""
    base = Cell.parse(name).base.name
    target = {r["seed"]: r["top1"] for r in rows if r["model"] == base and r["regime"] == "target-only"}
    fine = {r["seed"]: r["top1"] for r in rows if r["model"] == name and r["regime"] == "pretrain-finetune"}
    return {s: round(fine[s] - target[s], 2) for s in sorted(set(target) & set(fine))}


def routing_by_run(routing_rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, float]]:
    """Per run ``(model, regime, seed)`` of ``routing.csv``: its medians over layers (``summarize_routing``) and
    the share of its layers whose kernel distance is below 0.05 (``static_share``)."""
    from parameternet.profiling.routing import summarize_routing

    layers: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in routing_rows:
        layers.setdefault((r["model"], r["regime"], r["seed"]), []).append(r)
    out = {}
    for key, group in layers.items():
        out[key] = {
            **summarize_routing(group),
            "static_share": sum(r["kernel_dist"] < 0.05 for r in group) / len(group),
        }
    return out


def summarize(
    rows: list[dict[str, Any]], routing: dict[tuple[str, str, int], dict[str, float]] | None = None
) -> list[dict[str, Any]]:
    """Per cell: its size, the top-1 of each regime by seed, the gains paired by seed and their statistics, and
    its kernel distance (mean over its runs of :func:`routing_by_run`'s medians, from ``routing`` when given, else
    from the rows' ``route_kernel_dist``)."""
    from parameternet.experiments.stats import summary

    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        cell = Cell.parse(name)
        first = next(r for r in rows if r["model"] == name)
        entry: dict[str, Any] = {"cell": cell, "name": name, "macs": first["macs"], "params": first["params"]}
        base = cell.base.name
        entry["target-only"] = {
            r["seed"]: r["top1"] for r in rows if r["model"] == base and r["regime"] == "target-only"
        }
        entry["pretrain-finetune"] = {
            r["seed"]: r["top1"] for r in rows if r["model"] == name and r["regime"] == "pretrain-finetune"
        }
        entry["gains"] = gains(rows, name)
        entry["gain"] = summary(list(entry["gains"].values()))
        if routing is not None:
            route = [v["route_kernel_dist"] for (model, _, _), v in routing.items() if model == name]
        else:
            route = [r.get("route_kernel_dist") for r in rows if r["model"] == name]
            route = [v for v in route if v is not None]
        entry["kernel_dist"] = sum(route) / len(route) if route else None
        out.append(entry)
    out.sort(
        key=lambda e: (
            e["cell"].family != "ghostnet", e["cell"].width, e["cell"].method, e["cell"].router,
            e["cell"].experts or 0, e["cell"].pretrain_fraction, e["cell"].pretrain_epochs or 0,
            e["cell"].pretrain_steps or 0,
        )
    )  # fmt: skip
    return out


def fmt_top1(values: dict[int, float]) -> str:
    """``mean ± sd (n)`` of top-1 values by seed; ``-`` for none."""
    from parameternet.experiments.stats import summary

    if not values:
        return "-"
    s = summary(list(values.values()))
    return f"{s.mean:.2f} ± {s.sd:.2f} ({s.n})" if s.n > 1 else f"{s.mean:.2f} (1)"


def routing_table(routing: dict[tuple[str, str, int], dict[str, float]], models: Iterable[str] | None = None) -> str:
    """The routing diagnostics by (model, regime): medians over layers per run (:func:`routing_by_run`), then means
    over seeds; ``models`` keeps only these. Empty when there is nothing to show."""
    keep = None if models is None else set(models)
    by_model: dict[tuple[str, str], list[dict[str, float]]] = {}
    for (model, regime, _seed), v in routing.items():
        if keep is None or model in keep:
            by_model.setdefault((model, regime), []).append(v)
    if not by_model:
        return ""
    lines = [
        "Routing of the trained dynamic models on the Fashion-MNIST test set (medians over layers, then means over "
        "seeds): the spread of each coefficient across images, and the per-image kernel's relative distance from "
        "the mean kernel (0 = one fixed kernel).",
        "",
        "| model | regime | seeds | coefficient sd | kernel distance | layers with kernel distance < 0.05 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (model, regime), runs in sorted(by_model.items()):
        n = len(runs)
        sd = sum(v["route_coef_std"] for v in runs) / n
        dist = sum(v["route_kernel_dist"] for v in runs) / n
        static = sum(v["static_share"] for v in runs) / n
        lines.append(f"| {model} | {regime} | {n} | {sd:.4f} | {dist:.4f} | {static:.0%} |")
    return "\n".join(lines)


def check_rows(rows: list[dict[str, Any]], csv_path: Path, preset: str | None) -> list[dict[str, Any]]:
    """``rows`` of ``preset`` (all for None); raises :class:`ParameterNetError` naming the presets there are when
    none is left."""
    presets = sorted({r.get("preset") for r in rows} - {None})
    if preset is not None:
        rows = [r for r in rows if r.get("preset") == preset]
    if not rows:
        if presets:
            raise ParameterNetError(
                f"{str(csv_path)!r} holds no results for preset {preset!r}, only for {', '.join(presets)}; "
                "pass --preset accordingly"
            )
        raise ParameterNetError(f"{str(csv_path)!r} holds no results; run the grid first (or check --output)")
    return rows
