"""The Table 7 report of ``lm experiment`` (:mod:`parameternet.experiments.lm`), rebuilt from the CSVs alone:
``table7.md`` (the main table, the learning-rate check, the pre-stated verdicts on dense against the MoE and on
upcycling, router diagnostics, the fine-tuned classifiers, compute), ``loss_curves.png`` and ``router.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parameternet.experiments.lm import CRITERIA, PRESETS, Preset, verdict
from parameternet.experiments.lm_grid import DENSE, MOE8, Variant, hardware_line
from parameternet.experiments.lm_rows import fmt_mean, load_report_rows, mean_curve, seed_curves
from parameternet.runs import atomic_write

__all__ = ["crossing", "crossing_text", "gap_text", "report", "router_summary"]


def report(output: str | Path, preset: str | None = "full", pool_commits: bool = False) -> str:
    """Write ``table7.md``, ``loss_curves.png`` and ``router.png`` from the CSVs in ``output``; return the text.

    Rows made by different code are not pooled: the report uses the code version with the most rows of the
    preset and says how many it left out, unless ``pool_commits``. Raises ParameterNetError when ``output`` or its
    ``runs.csv`` does not exist, or when it holds no row of ``preset`` (naming the presets it holds). An
    upcycling-round-2 preset's report is :func:`~parameternet.experiments.lm_upcycle.report`'s.
    """
    from parameternet.experiments import lm_upcycle

    if preset in lm_upcycle.PRESETS:
        return lm_upcycle.report(output, preset, pool_commits)
    output = Path(output)
    got = load_report_rows(output, preset, pool_commits)
    rows, curves, router = got.rows, got.curves, got.router
    main = [r for r in rows if r["kind"] == "main"]
    preset_obj = PRESETS.get(rows[0]["preset"])
    compare = preset_obj.compare if preset_obj else MOE8
    parts = [
        *_main_table(rows, main, preset_obj),
        *hardware_line(output),
        *_lr_check(output / "lr.json"),
        *_main_verdict(main, curves, compare),
        *_upcycling(rows, main, curves),
    ]
    if router:
        parts += [*router_summary(router), ""]
    parts += _classifier(rows)
    parts.append(_compute(rows, got.note))
    text = "\n".join(parts) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    _plot_curves(curves, rows, output / "loss_curves.png", compare)
    if router:
        _plot_router(router, output / "router.png")
    atomic_write(output / "table7.md", text)
    return text


def _main_table(rows: list[dict[str, Any]], main: list[dict[str, Any]], p: Preset | None) -> list[str]:
    """The report's opening: the main runs' budget and the table (nothing without main runs)."""
    if not main:
        return []
    tokens = main[0]["tokens"]
    share = ""
    if p and not p.main_tokens:
        share = f" ({p.corpus_fraction:g} of the training split, each token once"
        if p.corpus_fraction < 1:
            share += "; the whole split does not fit about 3 hours of two CPU cores"
        share += ")"
    return [
        f"Dense LLaMA vs top-1 MoE on one FFN projection, {tokens:,} training tokens per run{share}, the same "
        "windows in the same order for every run. Mean ± standard error over seeds (number of seeds).",
        "",
        _table(rows),
        "",
    ]


def _lr_check(lr_path: Path) -> list[str]:
    """The learning-rate check's table from ``lr.json`` (nothing when the file is not there)."""
    if not lr_path.is_file():
        return []
    lr = json.loads(lr_path.read_text())
    head = "| learning rate | " + " | ".join(lr["variants"]) + " |"
    lrs = sorted({k for v in lr["val"].values() for k in v}, key=float)
    body = [
        f"| {k} | " + " | ".join(f"{lr['val'][v].get(k, math.nan):.4f}" for v in lr["variants"]) + " |" for k in lrs
    ]
    return [
        "Learning-rate check (final validation loss, seed 0): chosen dense "
        f"{lr['dense']:g}, MoE {lr['moe']:g}{' (shared: both agree)' if lr['shared'] else ''}.",
        "",
        head,
        "|---|" + "---|" * len(lr["variants"]),
        *body,
        "",
    ]


def _main_verdict(main: list[dict[str, Any]], curves: list[dict[str, Any]], compare: str) -> list[str]:
    """The verdict on dense against ``compare``, the crossing point and the gap at each evaluation (nothing
    without main runs of both)."""
    dense = [r for r in main if r["variant"] == DENSE]
    moe = [r for r in main if r["variant"] == compare]
    if not (dense and moe):
        return []
    gap = _gap(curves, "main", DENSE, "main", compare)
    v = verdict([r["val_loss"] for r in dense], [r["val_loss"] for r in moe], gap, dense[0]["steps"])
    per_step = dense[0]["tokens"] // dense[0]["steps"]
    return [
        *_verdict_lines(f"Verdict, dense vs {compare} (criteria stated before the runs)", v),
        f"Crossing point (MoE's mean validation loss goes below dense's for good): {crossing_text(gap, per_step)}.",
        f"Gap at each evaluation: {gap_text(gap, per_step)}.",
        "",
    ]


def _upcycling(rows: list[dict[str, Any]], main: list[dict[str, Any]], curves: list[dict[str, Any]]) -> list[str]:
    """The upcycled branches against the dense runs' own second halves, paired by seed, and their verdict."""
    up = [r for r in rows if r["kind"] == "upcycle"]
    if not up:
        return []
    dense = {r["seed"]: r for r in main if r["variant"] == DENSE}
    pairs = [(dense[r["seed"]], r) for r in sorted(up, key=lambda r: r["seed"]) if r["seed"] in dense]
    lines = [
        f"Upcycling: each dense run branched at its midpoint (step {up[0]['start_step']}) into {up[0]['variant']}"
        " with `from_dense`, trained on the second half (same windows, same order, the dense run's schedule, "
        "fresh optimizer state) against the dense run's own second half.",
        "",
        "| seed | dense at midpoint | dense at end | upcycled at end | dense - upcycled |",
        "|---|---|---|---|---|",
    ]
    for d, u in pairs:
        lines.append(
            f"| {u['seed']} | {d['mid_val_loss']} | {d['val_loss']:.4f} | {u['val_loss']:.4f} | "
            f"{d['val_loss'] - u['val_loss']:+.4f} |"
        )
    gap = _gap(curves, "main", DENSE, "upcycle", up[0]["variant"])
    v = verdict(
        [d["val_loss"] for d, _ in pairs], [u["val_loss"] for _, u in pairs], gap, up[0]["steps"],
        start_step=up[0]["start_step"], paired=True,
    )  # fmt: skip
    per_step = up[0]["tokens"] // max(1, up[0]["steps"] - up[0]["start_step"])
    return [
        *lines, "", *_verdict_lines("Verdict, upcycled vs dense (paired by seed)", v),
        f"Gap dense - upcycled at each evaluation: {gap_text(gap, per_step)}.", "",
    ]  # fmt: skip


def _classifier(rows: list[dict[str, Any]]) -> list[str]:
    """The fine-tuned classifiers' accuracy per variant (nothing without classifier rows)."""
    cls = [r for r in rows if r["kind"] == "cls"]
    if not cls:
        return []
    from parameternet.train.lm_cls import CLS_TASKS

    task = cls[0]["cls_task"]
    return [
        f"Fine-tuned classifier ({task}: {' / '.join(CLS_TASKS.get(task, ()))}; {cls[0]['cls_items']} balanced "
        f"held-out passages, chance {1 / max(1, len(CLS_TASKS.get(task, (1,)))):.2f}): "
        + "; ".join(
            f"{name} {fmt_mean([r['cls_acc'] for r in cls if r['variant'] == name])}"
            for name in sorted({r["variant"] for r in cls}, key=_variant_order)
        )
        + f", after {cls[0]['steps']} steps each (the same budget).",
        "",
    ]


def _compute(rows: list[dict[str, Any]], note: str) -> str:
    """The closing line: run time by kind, torch threads per run and the rows' provenance ``note``."""
    threads = sorted({r["threads"] for r in rows if r["threads"] is not None})
    wall = sum(r["wall_s"] or 0 for r in rows)
    kinds = dict.fromkeys(r["kind"] for r in rows)
    by_kind = ", ".join(f"{k} {sum(r['wall_s'] or 0 for r in rows if r['kind'] == k) / 3600:.1f} h" for k in kinds)
    return (
        f"Compute: {wall / 3600:.1f} h of run time over {len(rows)} runs ({by_kind}), torch threads per run: "
        f"{', '.join(str(t) for t in threads) or '-'}. Zero-shot tasks near chance (0.25) are reported, not used as a "
        f"criterion. {note}"
    )


def _variant_order(name: str) -> tuple:
    v = Variant.parse(name)
    return (v.projection is not None, ("gate_proj", "up_proj", "down_proj", None).index(v.projection), v.num_experts)


def crossing(gap: Sequence[tuple[int, float]]) -> float | None:
    """The step where ``gap`` (dense - MoE) last turns from negative to >= 0, linearly interpolated; None if it
    never ends positive after being negative."""
    out = None
    for (s0, g0), (s1, g1) in zip(gap, gap[1:]):
        if g0 < 0 <= g1:
            out = s0 + (s1 - s0) * (-g0) / (g1 - g0) if g1 != g0 else s1
        elif g0 >= 0 > g1:
            out = None
    return out


def crossing_text(gap: Sequence[tuple[int, float]], tokens_per_step: int) -> str:
    """The crossing point of ``gap`` (dense - MoE per step) in words: where the MoE goes below dense for good, in
    training tokens, or why there is none (below at every evaluation, or not below at the end)."""
    cross = crossing(gap)
    if cross is not None:
        return f"{cross * tokens_per_step:,.0f} tokens"
    if gap and all(g > 0 for _, g in gap):
        return f"none, the MoE is below dense at every evaluation (the first at {gap[0][0] * tokens_per_step:,} tokens)"
    return "none, the MoE is not below dense at the end"


def gap_text(gap: Sequence[tuple[int, float]], tokens_per_step: int) -> str:
    """``gap`` (dense - MoE per step) as ``tokens: nats`` pairs, for the report."""
    return "; ".join(f"{s * tokens_per_step:,} tokens {g:+.3f}" for s, g in gap) or "no shared evaluation"


def router_summary(
    router: Sequence[dict[str, Any]], collapsed: float = 0.9, kinds: Sequence[str] = ("main", "upcycle")
) -> list[str]:
    """One line per MoE variant of the runs of ``kinds`` (main and upcycled runs) in ``router`` rows: over its
    seeds and layers, the range of the mean top-1 router probability and of the largest and smallest expert shares
    at the first and the last evaluation; then every layer whose largest share at the last evaluation is above
    ``collapsed``."""
    lines, dead = [], []
    for kind, name in sorted({(r["kind"], r["variant"]) for r in router if r["kind"] in kinds},
                             key=lambda g: (list(kinds).index(g[0]), _variant_order(g[1]))):  # fmt: skip
        rs = [r for r in router if r["kind"] == kind and r["variant"] == name]
        first, last = min(r["step"] for r in rs), max(r["step"] for r in rs)

        def span(key: str, step: int, rs: list[dict[str, Any]] = rs) -> str:
            xs = [r[key] for r in rs if r["step"] == step]
            return f"{min(xs):.2f}-{max(xs):.2f}"

        seeds, layers = len({r["seed"] for r in rs}), len({r["layer"] for r in rs})
        at = {s: f"{rs[0]['tokens'] * s // max(1, rs[0]['step']):,}" for s in (first, last)}
        label = name if kind == "main" else f"{name} upcycled" if kind == "upcycle" else f"{name} {kind}"
        lines.append(
            f"Routers of {label} ({seeds} seed{'s' if seeds > 1 else ''} x {layers} layers; balanced share "
            f"{1 / Variant.parse(name).num_experts:.3f}): mean top-1 probability {span('top1_prob', first)} at "
            f"{at[first]} tokens, {span('top1_prob', last)} at {at[last]}; largest expert share "
            f"{span('max_share', first)} -> {span('max_share', last)}; smallest {span('min_share', first)} -> "
            f"{span('min_share', last)}."
        )
        dead += [f"{label} seed {r['seed']} layer {r['layer']} ({r['max_share']:.2f})" for r in rs
                 if r["step"] == last and r["max_share"] > collapsed]  # fmt: skip
    lines.append(
        f"Layers where one expert takes more than {collapsed:.0%} of the tokens at the last evaluation: "
        f"{', '.join(dead) or 'none'}."
    )
    return lines


def _table(rows: list[dict[str, Any]]) -> str:
    main = [r for r in rows if r["kind"] == "main"]
    cls = [r for r in rows if r["kind"] == "cls"]
    task = next((r["cls_task"] for r in cls), None)
    lines = [
        "| Model | #Expert | Parameters | Seeds | Train loss | Val loss | Val ppl | Held-out loss "
        f"| Next sentence (acc_norm) | Last word (acc) | Fine-tuned {task or 'classifier'} (acc) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted({r["variant"] for r in main}, key=_variant_order):
        rs = [r for r in main if r["variant"] == name]
        v = Variant.parse(name)
        ppl = [r["val_ppl"] for r in rs if r["val_ppl"] is not None]
        acc = [r["cls_acc"] for r in cls if r["variant"] == name]
        held = [r.get("heldout_loss") for r in rs if r.get("heldout_loss") is not None]
        lines.append(
            "| " + " | ".join([
                v.label, str(v.num_experts) if v.projection else "-", f"{rs[0]['params'] / 1e6:.2f}M", str(len(rs)),
                fmt_mean([r["train_loss"] for r in rs]), fmt_mean([r["val_loss"] for r in rs]),
                f"{sum(ppl) / len(ppl):.1f}" if ppl else "-", fmt_mean(held) if held else "not measured",
                fmt_mean([r["next_sentence_acc"] for r in rs]),
                fmt_mean([r["last_word_acc"] for r in rs]), fmt_mean(acc) if acc else "-",
            ]) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def _verdict_lines(title: str, v: dict[str, Any]) -> list[str]:
    lines = [f"**{title}: {v['verdict']}** ({v['reason']})."]
    if "gap" in v:
        lines.append(
            f"Gap dense - MoE at the end: {v['gap']:+.4f} ± {v['se']:.4f} nats (s.e. over {v['n'][0]} and "
            f"{v['n'][1]} seeds), 95% CI [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]; fitted change of the gap over the "
            f"second half: {v['change']:+.4f} nats ({v['second_half_points']} evaluations)."
        )
    if v.get("seeds_needed"):
        lines.append(
            f"About {v['seeds_needed']} seeds per model would give 80% power to see a {CRITERIA['min_gap']}-nat gap "
            f"beyond {CRITERIA['min_se']} standard errors with the spreads seen."
        )
    return lines


def _gap(curves, kind_a: str, a: str, kind_b: str, b: str) -> list[tuple[int, float]]:
    ma, mb = mean_curve(seed_curves(curves, kind_a, a)), mean_curve(seed_curves(curves, kind_b, b))
    db = dict(mb)
    return [(s, x - db[s]) for s, x in ma if s in db]


def _plot_curves(curves: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path, compare: str = MOE8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"dense": "black", "gate_proj": "tab:blue", "up_proj": "tab:orange", "down_proj": "tab:green"}
    per_step = {}
    for r in rows:
        if r["kind"] in ("main", "upcycle") and r["steps"]:
            per_step[r["kind"]] = r["tokens"] // max(1, r["steps"] - (r["start_step"] or 0))
    tok = per_step.get("main") or per_step.get("upcycle") or 1
    for kind in ("main", "upcycle"):
        for name in sorted({r["variant"] for r in curves if r["kind"] == kind}, key=_variant_order):
            v = Variant.parse(name)
            mean = mean_curve(seed_curves(curves, kind, name))
            n = len(seed_curves(curves, kind, name))
            style = dict(
                color=colors[v.projection or "dense"],
                linestyle=":" if kind == "upcycle" else ("-" if v.num_experts in (0, 8) else "--"),
                marker="o" if kind == "main" else "s", markersize=3,
                label=f"{name}{' upcycled' if kind == 'upcycle' else ''} ({n} seed{'s' if n > 1 else ''})",
            )  # fmt: skip
            ax.plot([s * tok for s, _ in mean], [x for _, x in mean], **style)
    gap = _gap(curves, "main", DENSE, "main", compare)
    if gap:
        gx.plot(
            [s * tok for s, _ in gap], [g for _, g in gap], color="tab:green", marker="o", label=f"dense - {compare}"
        )
        cross = crossing(gap)
        if cross is not None:
            for axis in (ax, gx):
                axis.axvline(cross * tok, color="red", linewidth=0.8, linestyle="--")
            gx.annotate(f"crossing\n{cross * tok:,.0f} tokens", (cross * tok, 0), fontsize=8, color="red")
    up = _gap(curves, "main", DENSE, "upcycle", compare)
    if up:
        gx.plot([s * tok for s, _ in up], [g for _, g in up], color="tab:purple", marker="s",
                label=f"dense - {compare} upcycled")  # fmt: skip
    gx.axhline(0, color="black", linewidth=0.8)
    gx.axhline(CRITERIA["min_gap"], color="gray", linewidth=0.8, linestyle="--", label="+0.02 nats (criterion)")
    ax.set(xlabel="training tokens", ylabel="validation loss (full split, nats)", title="validation loss (seed mean)")
    gx.set(xlabel="training tokens", ylabel="dense - MoE (nats; > 0: MoE better)", title="gap")
    ax.legend(fontsize=7)
    gx.legend(fontsize=7)
    ax.grid(alpha=0.3)
    gx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_router(router: list[dict[str, Any]], path: Path) -> None:
    """Per MoE variant (first seed): mean top-1 router probability and the largest / smallest expert share per
    layer against training tokens, and every expert's share per layer at the last evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["kind"], r["variant"]) for r in router if r["kind"] in ("main", "upcycle")},
                    key=lambda g: (g[0] == "upcycle", _variant_order(g[1])))  # fmt: skip
    n = max(1, len(groups))
    fig, axes = plt.subplots(3, n, figsize=(4 * n, 10), squeeze=False)
    for j, (kind, name) in enumerate(groups):
        group = [r for r in router if r["kind"] == kind and r["variant"] == name]
        seed = min(r["seed"] for r in group)
        rs = [r for r in group if r["seed"] == seed]
        m = Variant.parse(name).num_experts
        layers = sorted({r["layer"] for r in rs})
        for layer in layers:
            pts = sorted(
                (r["tokens"], r["top1_prob"], r["max_share"], r["min_share"]) for r in rs if r["layer"] == layer
            )
            xs = [p[0] for p in pts]
            axes[0][j].plot(xs, [p[1] for p in pts], marker="o", markersize=3, label=f"layer {layer}")
            line = axes[1][j].plot(xs, [p[2] for p in pts], marker="o", markersize=3, label=f"layer {layer}")
            axes[1][j].plot(xs, [p[3] for p in pts], linestyle="--", color=line[0].get_color())
        last = max(r["tokens"] for r in rs)
        bottom = [0.0] * len(layers)
        for e in range(m):
            shares = [
                float(next(r for r in rs if r["layer"] == layer and r["tokens"] == last)["shares"].split()[e])
                for layer in layers
            ]
            axes[2][j].bar(layers, shares, bottom=bottom, label=f"expert {e}")
            bottom = [b + x for b, x in zip(bottom, shares)]
        axes[2][j].set_xticks(layers)
        for row in (0, 1):
            axes[row][j].axhline(1 / m, color="gray", linewidth=0.8, linestyle=":")
            axes[row][j].grid(alpha=0.3)
            axes[row][j].set_xlabel("training tokens")
        title = f"{name}{' upcycled' if kind == 'upcycle' else ''} (seed {seed})"
        axes[0][j].set(title=title, ylabel="mean top-1 router probability")
        axes[1][j].set(ylabel="expert token share: max (solid), min (dashed)")
        axes[2][j].set(xlabel="layer", ylabel=f"expert shares at {last:,} tokens")
        axes[0][j].legend(fontsize=7)
        if j == n - 1:
            axes[2][j].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
