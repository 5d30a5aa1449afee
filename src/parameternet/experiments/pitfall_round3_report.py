"""The report of round 3 of the low-FLOPs pitfall (``parameternet pitfall --preset round3 --report-only``).

From ``results.csv`` and ``routing.csv`` alone: the gain from pretraining per model and budget (mean ± s.e., 95% t
interval, every seed), the slopes of the gain on the budget, the static gain against MACs, the verdict by the rule
stated before the run (:func:`parameternet.experiments.pitfall_round3.decide`), the size arm at fixed pretraining
steps and the router arm with its routing diagnostics; ``table.md`` and ``pitfall.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from parameternet.experiments.pitfall_cells import UNION_PER_CLASS, Cell, label
from parameternet.experiments.pitfall_round3 import CRITERIA, Round3, role_gains, seed_slopes, verdict
from parameternet.experiments.pitfall_tables import (
    check_rows,
    fmt_top1,
    gains,
    read_rows,
    routing_by_run,
    routing_table,
    rows_of_one_code,
)
from parameternet.experiments.provenance import code_id

__all__ = ["report"]

_ROLES = {"A": "A", "B": "B", "M": "M (static, B's MACs)", "D": "D (static, B's parameters)"}


def _stat(values: list[float], signed: bool = True) -> str:
    """``mean ± s.e. [95% CI]`` of ``values`` (``-`` for none, the value alone for one)."""
    from parameternet.experiments.stats import summary

    s, f = summary(values), ("{:+.2f}" if signed else "{:.2f}").format
    if s.n == 0:
        return "-"
    if s.n == 1:
        return f"{f(s.mean)} (1 seed)"
    return f"{f(s.mean)} ± {s.se:.2f} [{f(s.low)}, {f(s.high)}]"


def _welch(w: Any, unit: str = "") -> str:
    if w is None:
        return "- (fewer than two seeds on a side)"
    ci = f"90% CI [{w.ci90[0]:+.2f}, {w.ci90[1]:+.2f}]"
    return f"{w.diff:+.2f} ± {w.se:.2f}{unit}, {ci}, one-sided p = {w.p_greater:.3f}"


def _size(rows: list[dict[str, Any]], cell: Cell) -> tuple[int, int]:
    first = next((r for r in rows if r["model"] == cell.name), None)
    return (first["macs"], first["params"]) if first else (0, 0)


def _budget_table(rows: list[dict[str, Any]], design: Round3) -> str:
    cells = design.cells()
    a_macs = _size(rows, cells["A"])[0]
    lines = [
        "| model | MACs (x A) | params | pretraining epochs | target-only top-1 | pretrain → fine-tune top-1 "
        "| gain: mean ± s.e. [95% CI] | gain per seed |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for role in ("A", "B", "M", "D"):
        base, keep = cells[role], set(design.role_seeds(role))
        macs, params = _size(rows, base)
        ratio = f" ({macs / a_macs:.2f}x)" if a_macs and macs else ""
        size = f"{macs / 1e6:.3f}M{ratio} | {params / 1e3:.1f}k" if macs else "- | -"
        target = {r["seed"]: r["top1"] for r in rows if r["model"] == base.name and r["regime"] == "target-only"}
        target = {s: v for s, v in target.items() if s in keep}
        for epochs in design.budgets:
            cell = design.budget_cell(base, epochs)
            fine = {
                r["seed"]: r["top1"]
                for r in rows
                if r["model"] == cell.name and r["regime"] == "pretrain-finetune" and r["seed"] in keep
            }
            g = {s: v for s, v in gains(rows, cell.name).items() if s in keep}
            per_seed = ", ".join(f"{v:+.2f}" for v in g.values()) or "-"
            lines.append(
                f"| {_ROLES[role]}: {base.name} | {size} | {epochs} "
                f"| {fmt_top1(target)} | {fmt_top1(fine)} | {_stat(list(g.values()))} | {per_seed} |"
            )
    return "\n".join(lines)


def _slope_table(by_role: dict[str, dict[int, dict[int, float]]], design: Round3, v: dict[str, Any]) -> str:
    top = max(design.budgets)
    lines = [
        f"| model | seeds | slope: points per tripling of pretraining epochs | gain at {top} epochs | slope per seed |",
        "|---|---:|---:|---:|---|",
    ]
    for role in ("A", "B", "M", "D"):
        slopes = v["slopes"][role]
        per_seed = ", ".join(f"{x:+.2f}" for x in slopes.values()) or "-"
        at_top = list(by_role[role].get(top, {}).values())
        lines.append(
            f"| {_ROLES[role]}: {design.cells()[role].name} | {len(slopes)} | {_stat(list(slopes.values()))} "
            f"| {_stat(at_top)} | {per_seed} |"
        )
    return "\n".join(lines)


def _static_against_macs(rows: list[dict[str, Any]], by_role: dict, design: Round3) -> str:
    """Per budget, the least-squares slope of the static models' per-seed gains on log2 MACs."""
    from scipy import stats

    cells = design.cells()
    out = []
    for epochs in design.budgets:
        x, y = [], []
        for role in ("A", "M", "D"):
            macs = _size(rows, cells[role])[0]
            for g in by_role[role].get(epochs, {}).values():
                x.append(math.log2(macs))
                y.append(g)
        if len(set(x)) < 2 or len(x) < 3:
            continue
        fit = stats.linregress(x, y)
        half = stats.t.ppf(0.975, len(x) - 2) * fit.stderr
        out.append(
            f"{epochs} epochs: {fit.slope:+.2f} ± {fit.stderr:.2f} points per doubling of MACs "
            f"[{fit.slope - half:+.2f}, {fit.slope + half:+.2f}] ({len(x)} runs)"
        )
    if not out:
        return ""
    return "Static gain against MACs (A, M and D; least squares on log2 MACs, every seed a point): " + "; ".join(out)


def _verdict_text(v: dict[str, Any], design: Round3) -> str:
    top, floor = max(design.budgets), CRITERIA["remedy_min_slope"]
    if v["complete"]:
        head = f"**Verdict (rule stated before the run): {v['verdict']}** ({v['reason']})."
    else:
        head = (
            f"**Verdict so far: {v['verdict']}** ({v['reason']}): the rule stated before the run, applied to the "
            "rows so far; the budget arm is incomplete, so this is not the round's verdict."
        )
    lines = [head, ""]
    lines += [
        f"- Remedy = B's slope - A's slope: {_welch(v['remedy'], ' points per tripling')}. Reproduced needs the "
        f"90% interval above 0 (with the pitfall and the control); refuted: it ends below +{floor:g}.",
        f"- Pitfall (relative): D's gain - A's gain at {top} epochs: {_welch(v['pitfall_test'])}; "
        f"{'shows' if v['pitfall'] else 'does not show'} (90% interval above 0).",
        f"- Control: M's slope - A's slope: {_welch(v['control'])}; "
        f"{'not significant' if v['control_clear'] else 'significant or missing'} at {CRITERIA['alpha']}.",
        f"- Not judged: B's gain - A's gain at {top} epochs: {_welch(v['gap'])}.",
    ]
    if v["small_remedy"]:
        lines.append(f"- The remedy is above 0, but its 90% interval ends below +{floor:g} per tripling.")
    return "\n".join(lines)


def _size_arm(rows: list[dict[str, Any]], design: Round3) -> tuple[str, dict[str, list[tuple[float, Any]]]]:
    """The size arm's table and its points for the plot (images, gain summary) per model."""
    from parameternet.experiments.stats import summary, welch

    keep = set(design.seeds[: design.size_seeds])
    fractions = sorted({*design.size_fractions, 1.0})
    lines = [
        "| model | pretraining images | pretraining steps | gain: mean ± s.e. [95% CI] | gain per seed |",
        "|---|---:|---:|---:|---|",
    ]
    points: dict[str, list[tuple[float, Any]]] = {}
    slopes = {}
    for role in ("A", "B"):
        base = design.cells()[role]
        by_images: dict[float, dict[int, float]] = {}
        for f in fractions:
            cell = design.size_cell(base, f)
            g = {s: v for s, v in gains(rows, cell.name).items() if s in keep}
            images = round(20 * UNION_PER_CLASS * f)
            by_images[images] = g
            points.setdefault(role, []).append((images, summary(list(g.values()))))
            per_seed = ", ".join(f"{x:+.2f}" for x in g.values()) or "-"
            lines.append(
                f"| {_ROLES[role]}: {base.name} | {images:,} | {design.size_steps:,} | {_stat(list(g.values()))} "
                f"| {per_seed} |"
            )
        slopes[role] = seed_slopes(by_images, log_base=2)
    text = "\n".join(lines)
    parts = [f"{r}: {_stat(list(slopes[r].values()))}" for r in ("A", "B")]
    diff = welch(list(slopes["B"].values()), list(slopes["A"].values()))
    text += (
        "\n\nGain per doubling of the pretraining set at fixed steps (least squares on log2 images, per seed): "
        + "; ".join(parts)
        + f"; B - A: {_welch(diff)}. Described, not judged."
    )
    return text, points


def _router_table(rows: list[dict[str, Any]], routing: dict, design: Round3) -> str:
    keep = set(design.seeds[: design.router_seeds])
    lines = [
        "| model | seeds | target-only top-1 | pretrain → fine-tune top-1 | gain: mean ± s.e. [95% CI] "
        "| coefficient sd | kernel distance |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in [design.cells()["B"], *design.router_cells()]:
        top1 = {
            regime: {r["seed"]: r["top1"] for r in rows if r["model"] == cell.name and r["regime"] == regime}
            for regime in ("target-only", "pretrain-finetune")
        }
        top1 = {k: {s: x for s, x in v.items() if s in keep} for k, v in top1.items()}
        g = [x for s, x in gains(rows, cell.name).items() if s in keep]
        runs = [v for (m, _, s), v in routing.items() if m == cell.name and s in keep]
        sd = f"{sum(v['route_coef_std'] for v in runs) / len(runs):.4f}" if runs else "-"
        dist = f"{sum(v['route_kernel_dist'] for v in runs) / len(runs):.4f}" if runs else "-"
        lines.append(
            f"| {label(cell)} | {len(g)} | {fmt_top1(top1['target-only'])} | {fmt_top1(top1['pretrain-finetune'])} "
            f"| {_stat(g)} | {sd} | {dist} |"
        )
    return "\n".join(lines)


def _plot(by_role: dict, design: Round3, size_points: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from parameternet.experiments.stats import summary

    colors = {"A": "tab:blue", "B": "tab:red", "M": "tab:green", "D": "tab:purple"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    budget_points = {
        role: [(e, summary(list(by_role[role].get(e, {}).values()))) for e in design.budgets]
        for role in ("A", "B", "M", "D")
    }
    for axis, points in ((ax, budget_points), (bx, size_points)):
        for role, pts in points.items():
            pts = [(x, s) for x, s in pts if s.n]
            if pts:
                axis.errorbar(
                    [x for x, _ in pts], [s.mean for _, s in pts],
                    yerr=[0 if math.isnan(s.se) else s.se for _, s in pts],
                    marker="o", capsize=3, color=colors[role], label=f"{_ROLES[role]}: {design.cells()[role].name}",
                )  # fmt: skip
    for axis, xlabel, what in (
        (ax, "pretraining epochs on the union (log scale)", "gain against the pretraining budget"),
        (bx, f"pretraining images, {design.size_steps:,} steps each (log scale)", "gain against the set's size"),
    ):
        axis.set_xscale("log")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("gain from pretraining (top-1 points, mean ± s.e.)")
        axis.set_title(what, fontsize=10)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    images = sorted({x for pts in size_points.values() for x, _ in pts})
    for axis, ticks in ((ax, list(design.budgets)), (bx, images)):
        axis.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _progress(rows: list[dict[str, Any]], design: Round3, preset: str) -> list[str]:
    """A paragraph on how much of the grid the rows hold (none when all of it)."""
    have = {(r["model"], r["regime"], r["seed"]) for r in rows}
    arms = design.expected_rows()
    counts = {arm: (len(want & have), len(want)) for arm, want in arms.items()}
    done, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    if done == total:
        return []
    each = ", ".join(f"{arm} arm {k} of {n}" for arm, (k, n) in counts.items())
    return [
        f"**Incomplete: {done} of the design's {total} result rows ({each}).** `parameternet pitfall --preset "
        f"{preset}` resumes the grid; what follows reads the rows so far.",
        "",
    ]


def report(output: str | Path, preset: Any, pool_commits: bool = False) -> str:
    """Write ``table.md`` and ``pitfall.png`` of a round-3 ``preset`` (a
    :class:`~parameternet.experiments.pitfall_presets.Preset` with ``round3``) from ``<output>/results.csv`` and
    ``routing.csv``, and return the text. Rows of one code version only, unless ``pool_commits``; raises
    :class:`~parameternet.errors.ParameterNetError` when the CSV holds no rows of the preset."""
    output, design = Path(output), preset.round3
    csv_path = output / "results.csv"
    rows, code, note = rows_of_one_code(check_rows(read_rows(csv_path), csv_path, preset.name), pool_commits)
    routing = routing_by_run(r for r in read_rows(output / "routing.csv") if code is None or code_id(r) == code)
    by_role = role_gains(rows, design)
    v = verdict(rows, design)
    parts = []
    if preset.wiring_check:
        parts += [
            f"**A wiring check, not results.** Preset {preset.name}: {preset.description}. Its numbers show that "
            "every stage ran and was scored; they say nothing about the low-FLOPs pitfall. For results run "
            "`parameternet pitfall --preset round3`.",
            "",
        ]
    parts += _progress(rows, design, preset.name)
    seeds = design.seeds
    parts += [
        f"Round 3: the gain from pretraining against the pretraining budget, on seeds {seeds[0]}-{seeds[-1]} (none "
        f"of them used before; D and M on the first {design.static_seeds}). Width {design.width:g} was chosen by "
        "round 2's gate on round 2's seeds 0, 1, 2 (gate.json).",
        "",
        _budget_table(rows, design),
        "",
        _slope_table(by_role, design, v),
        "",
    ]
    static = _static_against_macs(rows, by_role, design)
    if static:
        parts += [static, ""]
    parts += [_verdict_text(v, design), ""]
    size_text, size_points = _size_arm(rows, design)
    parts += ["Size arm: the pretraining set's size at a fixed number of pretraining steps.", "", size_text, ""]
    parts += [
        "Router arm (described, not judged): B with its routers at 10x the learning rate (rlr10) or without weight "
        f"decay (rwd0), on the first {design.router_seeds} seeds, the recipe's pretraining; B on the same seeds for "
        "comparison. "
        "Routing columns: medians over layers per run, means over runs of both regimes.",
        "",
        _router_table(rows, routing, design),
    ]
    table = routing_table(routing)
    if table:
        parts += ["", table]
    parts += [
        "",
        "Top-1 on the Fashion-MNIST test set (10,000 images): mean ± sd over seeds (number of seeds). Gain = "
        "pretrain → fine-tune minus target-only, paired by seed (one target-only run per model and seed, shared by "
        "its budgets): mean ± standard error and 95% t interval, then each seed's value. Slope = the least-squares "
        "slope of a seed's gains on log3 of the pretraining epochs (its target-only run cancels). MACs and params "
        f"at {rows[0]['img_size']} px. {note}",
    ]
    text = "\n".join(parts) + "\n"
    title = (
        "Low-FLOPs pitfall, round 3: gain from pretraining on MNIST + Fashion-MNIST, target Fashion-MNIST 1k/class\n"
        f"(preset {preset.name}: {len(rows)} runs, code {code or 'pooled'})"
    )
    _plot(by_role, design, size_points, output / "pitfall.png", title)
    (output / "table.md").write_text(text)
    return text
