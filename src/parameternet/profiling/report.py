"""`parameternet profile`: the paper's vision table, measured (ParameterNet, arXiv 2306.14525, Tables 2, 4, 5).

With no model names it rebuilds every vision row of the paper at 224px and prints the paper's parameters and
MACs next to the measured ones; it fails (exit 1) when a row is off by more than :data:`TOLERANCE`. The reference
figures are the two-decimal ones of the design brief, measured on the specification the paper's rounded numbers
come from. With model names it prints their measurements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.profiling.measure import ProfileResult, profile

__all__ = ["PAPER_ROWS", "TOLERANCE", "PaperRow", "format_rows", "profile_paper_rows", "run_profile_command"]

TOLERANCE = 0.005  # relative, for parameters and MACs alike


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's tables: a registered model, its build arguments and the reference figures."""

    label: str
    model: str
    experts: int | None
    params_m: float
    macs_m: float
    source: str
    kwargs: dict[str, Any] = field(default_factory=dict)


PAPER_ROWS = (
    PaperRow("GhostNet-300M", "ghostnet_300m", None, 8.63, 288.7, "Table 2/4"),
    PaperRow("ParameterNet-300M", "parameternet_300m", 2, 11.01, 293.5, "Table 4", dict(num_experts=2)),
    PaperRow("ParameterNet-300M", "parameternet_300m", 4, 15.74, 298.2, "Table 2/4", dict(num_experts=4)),
    PaperRow("ParameterNet-300M", "parameternet_300m", 8, 25.18, 307.6, "Table 4", dict(num_experts=8)),
    PaperRow("GhostNet-600M", "ghostnet_600m", None, 19.82, 579.2, "Table 2"),
    PaperRow("ParameterNet-600M", "parameternet_600m", 4, 34.50, 598.8, "Table 2", dict(num_experts=4)),
    PaperRow("Swin-300M", "swin_300m", None, 1.95, 311.1, "Table 5"),
    PaperRow("ParameterNet-Swin-300M", "parameternet_swin_300m", 4, 6.86, 322.7, "Table 5", dict(num_experts=4)),
)


def _build(name: str, img_size: int | None, **kwargs: Any):
    from parameternet.models import create_model_for_size  # registers the paper's models in timm

    return create_model_for_size(name, img_size, **kwargs)  # e.g. a Swin builds its attention masks for one size


def _row(result: ProfileResult, **extra: Any) -> dict[str, Any]:
    row = dict(extra)
    row.update(result.as_dict())
    return row


def profile_paper_rows(
    batch_size: int = 1, latency: bool = False, threads: int = 1, rows: tuple[PaperRow, ...] | None = None
) -> list[dict[str, Any]]:
    """Measure the paper rows (default :data:`PAPER_ROWS`) at 224px; each dict has the measurement, the
    reference and ``ok``."""
    out = []
    for paper in PAPER_ROWS if rows is None else rows:
        result = profile(_build(paper.model, 224, **paper.kwargs), 224, batch_size, latency=latency, threads=threads)
        params_diff = result.params / (paper.params_m * 1e6) - 1
        macs_diff = result.macs_per_sample / (paper.macs_m * 1e6) - 1
        out.append(
            _row(
                result,
                label=paper.label,
                experts=paper.experts,
                source=paper.source,
                paper_params=round(paper.params_m * 1e6),
                paper_macs=round(paper.macs_m * 1e6),
                params_diff=params_diff,
                macs_diff=macs_diff,
                ok=abs(params_diff) <= TOLERANCE and abs(macs_diff) <= TOLERANCE,
            )
        )
    return out


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _input(row: dict[str, Any]) -> str:
    """The input a row was measured on, ``BxCxHxW``."""
    return "x".join(str(s) for s in (row["batch_size"], row.get("in_chans", 3), *row["img_size"]))


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: paper / measured / difference when the rows carry paper figures, else measurements; the
    input each row was measured on in the note below it, or in a column of its own when the rows' inputs differ."""
    paper = bool(rows) and "paper_params" in rows[0]
    timed = any(r.get("latency_ms") is not None for r in rows)
    inputs = {_input(r) for r in rows}
    if paper:
        header = ["model", "experts", "params paper", "measured", "diff", "MACs paper", "measured", "diff"]
    else:
        header = ["model", "params", "experts", "routers", "static", "MACs/sample"]
    if len(inputs) > 1:
        header.append("input")
    if timed:
        header += ["ms median", "ms p90"]
    if paper:
        header.append("")
    lines = []
    for r in rows:
        if paper:
            cells = [
                r["label"],
                str(r["experts"] or "-"),
                _m(r["paper_params"]),
                _m(r["params"]),
                f"{r['params_diff']:+.2%}",
                _m(r["paper_macs"]),
                _m(r["macs_per_sample"]),
                f"{r['macs_diff']:+.2%}",
            ]
        else:
            cells = [
                r["model"],
                _m(r["params"]),
                _m(r["expert_params"]),
                _m(r["router_params"]),
                _m(r["static_params"]),
                _m(r["macs_per_sample"]),
            ]
        if len(inputs) > 1:
            cells.append(_input(r))
        if timed:
            cells += [f"{r['latency_ms']:.2f}", f"{r['latency_p90_ms']:.2f}"]
        if paper:
            cells.append("ok" if r["ok"] else f"OFF by more than {TOLERANCE:.1%}")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    text = [fmt.format(*header).rstrip(), "  ".join("-" * w for w in widths).rstrip()]
    text += [fmt.format(*cells).rstrip() for cells in lines]
    if rows:
        note = f"input {inputs.pop()}; " if len(inputs) == 1 else ""
        note += "MACs counted as torchprofile counts them (the paper's convention)"
        if timed:
            note += f"; latency on {rows[0]['threads']} thread(s)"
        text.append(note)
    return "\n".join(text)


def run_profile_command(
    models: list[str],
    as_json: bool = False,
    img_size: int | None = None,
    batch_size: int = 1,
    latency: bool = False,
    threads: int = 1,
) -> int:
    """Print the paper table (no ``models``; at 224px) or the named models' measurements, each on its own input
    (channels and size; ``img_size`` replaces the size); 1 if a paper row is off."""
    if not models:
        if img_size not in (None, 224):
            raise ParameterNetError(
                f"the paper's table is measured at 224px, got --img-size {img_size}; "
                "name the models to profile them at another size."
            )
        rows = profile_paper_rows(batch_size, latency, threads)
    else:
        for name in models:
            _build_check(name)
        rows = [
            _row(profile(_build(name, img_size), img_size, batch_size, latency=latency, threads=threads, name=name))
            for name in models
        ]
    print(json.dumps(rows, indent=2) if as_json else format_rows(rows))
    return 0 if all(r.get("ok", True) for r in rows) else 1


def _build_check(name: str) -> None:
    """Fail on an unknown name before spending time on the known ones."""
    from parameternet.models import check_model_name

    check_model_name(name)
