"""The report of round 2 of the low-FLOPs pitfall (``parameternet pitfall --preset full --report-only``).

Statistics, the pre-stated verdict (:data:`CRITERIA`), the table and the figure, from ``results.csv`` and
``routing.csv`` alone; a round-3 preset is reported by
:func:`parameternet.experiments.pitfall_round3_report.report`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from parameternet.experiments.pitfall_cells import PRETRAIN_EPOCHS, UNION_PER_CLASS, dynamic_cell, static_cell
from parameternet.experiments.pitfall_cells import label as cell_label
from parameternet.experiments.pitfall_presets import PRESETS
from parameternet.experiments.pitfall_tables import (
    check_rows,
    fmt_top1,
    read_rows,
    routing_by_run,
    routing_table,
    rows_of_one_code,
    summarize,
)
from parameternet.experiments.provenance import code_id

__all__ = ["CRITERIA", "markdown_table", "report", "verdict"]

# The verdict, stated before the runs (docs/experiments/pitfall.md); gains in top-1 points.
CRITERIA = {
    "pitfall_max_gain": 0.2,  # the pitfall exists when A's mean gain <= this
    "remedy_min": 0.5,  # reproduced: gain(B) - gain(A) >= this, Welch one-sided p < alpha, gain(B) > 0, ...
    "alpha": 0.05,  # ... and RepConv's gain(C) - gain(A) not significant at alpha
    "refute_upper90": 0.3,  # refuted: the pitfall exists and the 90% interval of the remedy ends below this
}


def verdict(entries: list[dict[str, Any]], width: float) -> dict[str, Any]:
    """The pre-stated reading (:data:`CRITERIA`) for A = ``ghostnet-w<width>``, B its 4-expert ParameterNet and C
    its RepConv x4: ``{"pitfall", "remedy", "repconv", "verdict", ...}``.

    No seed count comes with "not resolved": the power of the Welch test alone is not this rule's chance of
    resolving (reproduction also needs the observed remedy at or above ``remedy_min``); round 3 chose its seeds by
    simulating its whole rule (:mod:`parameternet.experiments.pitfall_design`)."""
    from parameternet.experiments.stats import welch

    by = {e["name"]: e for e in entries}
    a, b = by.get(static_cell(width).name), by.get(dynamic_cell(width).name)
    c = by.get(dynamic_cell(width, method="repconv").name)
    out: dict[str, Any] = {"A": static_cell(width).name, "B": dynamic_cell(width).name}
    if a is None or b is None or a["gain"].n < 2 or b["gain"].n < 2:
        out.update(verdict="not resolved", reason="A or B has fewer than two seeds with both regimes")
        return out
    ga, gb = list(a["gains"].values()), list(b["gains"].values())
    remedy = welch(gb, ga)
    rep = welch(list(c["gains"].values()), ga) if c is not None else None
    k = CRITERIA
    pitfall = a["gain"].mean <= k["pitfall_max_gain"]
    rep_significant = rep is not None and rep.p_greater < k["alpha"]
    reproduced = (
        remedy.diff >= k["remedy_min"] and remedy.p_greater < k["alpha"] and b["gain"].mean > 0 and not rep_significant
    )
    refuted = pitfall and remedy.ci90[1] < k["refute_upper90"]
    out.update(
        pitfall=pitfall,
        gain_a=a["gain"],
        gain_b=b["gain"],
        remedy=remedy,
        repconv=rep,
        repconv_significant=rep_significant,
        verdict="reproduced" if reproduced else "refuted" if refuted else "not resolved",
    )
    return out


def markdown_table(entries: list[dict[str, Any]]) -> str:
    lines = [
        "| model | MACs | params | target-only top-1 | pretrain → fine-tune top-1 | gain: mean ± s.e. [95% CI] "
        "| gain per seed | kernel dist. |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for e in entries:
        g = e["gain"]
        if g.n > 1:
            gain = f"{g.mean:+.2f} ± {g.se:.2f} [{g.low:+.2f}, {g.high:+.2f}]"
        else:
            gain = f"{g.mean:+.2f}" if g.n else "-"
        per_seed = ", ".join(f"{v:+.2f}" for v in e["gains"].values()) or "-"
        dist = f"{e['kernel_dist']:.3f}" if e["kernel_dist"] is not None else "-"
        lines.append(
            f"| {cell_label(e['cell'])} | {e['macs'] / 1e6:.3f}M | {e['params'] / 1e3:.1f}k "
            f"| {fmt_top1(e['target-only'])} | {fmt_top1(e['pretrain-finetune'])} | {gain} | {per_seed} | {dist} |"
        )
    return "\n".join(lines)


def _verdict_text(v: dict[str, Any]) -> str:
    k = CRITERIA
    lines = [f"**Verdict (criteria stated before the runs): {v['verdict']}.**", ""]
    if "remedy" not in v:
        return "\n".join([*lines, f"- {v['reason']}."])
    ga, gb, r = v["gain_a"], v["gain_b"], v["remedy"]
    lines += [
        f"- Pitfall (A = {v['A']}): gain {ga.mean:+.2f} ± {ga.se:.2f} over {ga.n} seeds, 95% CI [{ga.low:+.2f}, "
        f"{ga.high:+.2f}]; it {'exists' if v['pitfall'] else 'does not exist'} by the criterion "
        f"(mean gain <= +{k['pitfall_max_gain']}).",
        f"- B = {v['B']}: gain {gb.mean:+.2f} ± {gb.se:.2f} over {gb.n} seeds.",
        f"- Remedy = gain(B) - gain(A) = {r.diff:+.2f} ± {r.se:.2f}; 90% CI [{r.ci90[0]:+.2f}, {r.ci90[1]:+.2f}], "
        f"95% CI [{r.ci95[0]:+.2f}, {r.ci95[1]:+.2f}]; one-sided Welch p = {r.p_greater:.3f}.",
    ]
    rep = v["repconv"]
    if rep is None:
        lines.append("- RepConv control: fewer than two seeds, so not significant by construction.")
    else:
        lines.append(
            f"- RepConv control: gain(C) - gain(A) = {rep.diff:+.2f} ± {rep.se:.2f}, one-sided Welch p = "
            f"{rep.p_greater:.3f} ({'significant' if v['repconv_significant'] else 'not significant'} at "
            f"{k['alpha']})."
        )
    if v["verdict"] == "not resolved":
        lines.append(
            "- Not resolved. No seed count is given: one test's power is not this rule's chance of resolving "
            f"(reproduction also needs the observed remedy >= +{k['remedy_min']}); round 3 chose its seeds by "
            "simulating its whole rule (results/pitfall-round3/design.md)."
        )
    return "\n".join(lines)


def _sweep_text(entries: list[dict[str, Any]], width: float) -> str:
    rows = []
    for base in (static_cell(width), dynamic_cell(width)):
        variants = [e for e in entries if e["cell"].base == base]
        for e in sorted(variants, key=lambda e: (e["cell"].pretrain_fraction, e["cell"].pretrain_epochs or 3)):
            c, g = e["cell"], e["gain"]
            gain = f"{g.mean:+.2f} ± {g.se:.2f} ({g.n})" if g.n > 1 else (f"{g.mean:+.2f} (1)" if g.n else "-")
            epochs = c.pretrain_epochs or PRETRAIN_EPOCHS
            rows.append(
                f"| {cell_label(base)} | {c.pretrain_images:,} | {epochs} | {c.pretrain_step_count:,} | {gain} |"
            )
    if len(rows) <= 2:
        return ""
    head = (
        "| model | pretraining images | pretraining epochs | pretraining steps | gain (mean ± s.e., seeds) |\n"
        "|---|---:|---:|---:|---:|"
    )
    confound = (
        "At a fixed number of epochs a smaller pretraining set also gets fewer steps: this sweep changes the set's "
        "size and the length of pretraining together (round 3's size arm holds the steps fixed)."
    )
    return "Pretraining-size sweep:\n\n" + head + "\n" + "\n".join(rows) + "\n\n" + confound


def _plot(entries: list[dict[str, Any]], path: Path, title: str, width: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw=dict(width_ratios=[1.2, 1]))
    main = [e for e in entries if e["gain"].n and e["cell"].base == e["cell"]]

    def errorbars(axis, points, **kw):
        if points:
            x, m, se = zip(*sorted(points))
            axis.errorbar(x, m, yerr=[0 if math.isnan(s) else s for s in se], capsize=3, **kw)

    static = [(e["macs"] / 1e6, e["gain"].mean, e["gain"].se) for e in main if e["cell"].family == "ghostnet"]
    dyn = [e for e in main if e["cell"].family == "parameternet"]
    four = [
        e for e in dyn if e["cell"].method == "dynamic" and e["cell"].experts == 4 and e["cell"].router != "mlp-softmax"
    ]
    errorbars(ax, static, marker="o", color="tab:blue", label="GhostNet-mini (static)")
    errorbars(
        ax, [(e["macs"] / 1e6, e["gain"].mean, e["gain"].se) for e in four], marker="*", markersize=12,
        color="tab:red", label="ParameterNet-mini, 4 experts",
    )  # fmt: skip
    for e in dyn:
        if e in four:
            continue
        c = e["cell"]
        label = "RepConv x4" if c.method == "repconv" else ("softmax router" if c.router == "mlp-softmax" else None)
        label = label or f"{c.experts} experts"
        ax.errorbar(e["macs"] / 1e6, e["gain"].mean, yerr=0 if math.isnan(e["gain"].se) else e["gain"].se,
                    marker="D", linestyle="none", capsize=3, label=f"{label} (w {c.width:g})")  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(CRITERIA["pitfall_max_gain"], color="gray", linewidth=0.8, linestyle="--", label="pitfall threshold")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted({e["macs"] / 1e6 for e in main})))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("MACs per image (millions, log scale)")
    ax.set_ylabel("gain from pretraining (top-1 points)")
    ax.set_title("pretrain → fine-tune minus target-only\n(paired by seed: mean ± s.e.)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    if width is not None:
        for base, color in ((static_cell(width), "tab:blue"), (dynamic_cell(width), "tab:red")):
            pts = [
                (20 * UNION_PER_CLASS * e["cell"].pretrain_fraction, e["gain"].mean, e["gain"].se)
                for e in entries
                if e["cell"].base == base and e["cell"].pretrain_epochs is None and e["gain"].n
            ]
            errorbars(bx, pts, marker="o", color=color, label=f"{cell_label(base)}")
            longer = [e for e in entries if e["cell"].base == base and e["cell"].pretrain_epochs and e["gain"].n]
            for e in longer:
                x = 20 * UNION_PER_CLASS * e["cell"].pretrain_fraction * 1.08
                se = 0 if math.isnan(e["gain"].se) else e["gain"].se
                label = f"{cell_label(base)}, {e['cell'].pretrain_epochs} epochs"
                bx.errorbar(x, e["gain"].mean, yerr=se, color=color, marker="^", capsize=3, label=label)
        bx.set_xscale("log")
        bx.axhline(0, color="black", linewidth=0.8)
        bx.set_xlabel("pretraining images (log scale)")
        bx.set_ylabel("gain from pretraining (top-1 points)")
        bx.set_title("gain against the size of the pretraining set", fontsize=10)
        bx.grid(alpha=0.3)
        bx.legend(fontsize=7)
    else:
        bx.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(output: str | Path, preset: str | None = None, pool_commits: bool = False) -> str:
    """Write ``table.md`` and ``pitfall.png`` from ``<output>/results.csv`` (and ``routing.csv``) and return the text.

    Rows of one preset made by different code are not pooled: the report uses the code version with the most
    rows and says how many rows it left out, unless ``pool_commits``. A round-3 preset is reported by its own rule
    (:func:`parameternet.experiments.pitfall_round3_report.report`). Raises :class:`ParameterNetError` when the
    CSV holds no rows of ``preset``.
    """
    output = Path(output)
    if preset in PRESETS and PRESETS[preset].round3 is not None:
        from parameternet.experiments import pitfall_round3_report

        return pitfall_round3_report.report(output, PRESETS[preset], pool_commits)
    csv_path = output / "results.csv"
    rows, code, note = rows_of_one_code(check_rows(read_rows(csv_path), csv_path, preset), pool_commits)
    routing = routing_by_run(r for r in read_rows(output / "routing.csv") if code is None or code_id(r) == code)
    entries = summarize(rows, routing)
    gate_path = output / "gate.json"
    gate = json.loads(gate_path.read_text()) if gate_path.is_file() else None
    width = gate["settled_width"] if gate and gate.get("preset") == rows[0]["preset"] else None
    if width is None and preset in PRESETS and not PRESETS[preset].gate:
        width = PRESETS[preset].width
    parts = [markdown_table(entries), ""]
    for shown in (PRESETS[n] for n in sorted({r.get("preset") for r in rows} & set(PRESETS))):
        if not shown.wiring_check:
            continue
        parts[:0] = [
            f"**A wiring check, not results.** Preset {shown.name}: {shown.description}. Its top-1 and gains show "
            "that every stage ran and was scored; they say nothing about the low-FLOPs pitfall. For results run "
            "`parameternet pitfall --preset quick` (one seed) or `--preset full`.",
            "",
        ]
    parts.append(
        "Top-1 on the Fashion-MNIST test set (10,000 images): mean ± sd over seeds (number of seeds). Gain = "
        "pretrain → fine-tune minus target-only, paired by seed: mean ± standard error and 95% t interval, then each "
        "seed's value. Kernel dist. = the per-image kernel's distance from the mean kernel (median over layers, mean "
        f"over runs). MACs and params at {rows[0]['img_size']} px; RepConv MACs after merging. {note}"
    )
    if gate and width is not None:
        tried = "; ".join(f"{t['model']}: {', '.join(f'{g:+.2f}' for g in t['gains'].values())}" for t in gate["tried"])
        on = f"seeds {', '.join(map(str, gate['seeds']))}; " if "seeds" in gate else ""
        parts += ["", f"Gate ({on}rule: {gate['rule']}): {tried}; settled on width {width:g}."]
    names = {e["name"] for e in entries}
    if width is not None and {static_cell(width).name, dynamic_cell(width).name} <= names:
        parts += ["", _verdict_text(verdict(entries, width))]
        sweep = _sweep_text(entries, width)
        if sweep:
            parts += ["", sweep]
    if max(e["gain"].n for e in entries) <= 1:
        parts += [
            "",
            "One seed per model: this shows that the pipeline runs and gives one paired gain per model; it cannot "
            "tell a remedy from seed-to-seed noise, which the full preset measures with 8 seeds of A and B "
            "(`parameternet pitfall --preset full`).",
        ]
    table = routing_table(routing)
    if table:
        parts += ["", table]
    text = "\n".join(parts) + "\n"
    seeds = sorted({r["seed"] for r in rows})
    title = (
        "Low-FLOPs pitfall at CPU scale: target Fashion-MNIST 1k/class, pretraining MNIST + Fashion-MNIST\n"
        f"(preset {rows[0]['preset']}: {len(rows)} runs, seeds {seeds[0]}-{seeds[-1]}, code {code or 'pooled'})"
    )
    _plot(entries, output / "pitfall.png", title, width)
    (output / "table.md").write_text(text)
    return text
