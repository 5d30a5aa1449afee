"""Upcycling, round 2: five continuations of one dense snapshot per seed. ``parameternet lm experiment --preset
upcycle2`` (and ``upcycle2-smoke``, a tiny wiring check of the same code path).

Round 1 (the ``full`` preset) branched each dense run at its midpoint into 8 experts on ``down_proj`` with a fresh
AdamW and the dense run's learning-rate schedule, and compared it with the dense run's own second half. That
branch changed three things at once (the model, the optimizer state, the learning rate the MoE trains at). This
grid separates them. Per seed, the base recipe (``configs/lm-small.yaml``) with round 1's dense learning rate and
schedule (the same share of the training split, the same warmup and cosine) trains once to the midpoint of its
schedule (kind ``trunk``, ``lm train`` with ``branch.stop_step``), and five
continuations start from that one snapshot and train to the end of the schedule on the same windows in the same
order (kinds, :data:`~parameternet.experiments.lm_upcycle_rule.BRANCHES`):

- ``continue``: dense, the trunk's AdamW state kept (``branch.fork_from``): the dense run as if never stopped;
- ``reset``: dense, a fresh AdamW, the dense schedule: the optimizer reset alone (the control);
- ``upcycle``: ``from_dense`` with the preset's experts, a fresh AdamW, the dense schedule: round 1's branch;
- ``upcycle-rewarm``: as ``upcycle``, the learning rate ramped up again linearly over ``rewarmup_fraction`` of
  the schedule's steps (the recipe's own warmup length) from the branch point;
- ``upcycle-moe-lr``: as ``upcycle`` on the MoE's schedule: the peak learning rate round 1 chose for the MoE, so
  the rate at each step is the one the from-scratch MoE had there.

The continuations evaluate on the validation split every ``eval_every`` steps (a slope needs points in the second
half) and on the held-out split at the end. Rows, curves and router rows go to ``results/lm-upcycle2/`` as for
the other presets (:mod:`parameternet.experiments.lm_grid`: resumable, keyed by commit and recipe hash);
:func:`report` writes ``table.md`` and ``loss_curves.png`` with the verdicts of the rule stated before the runs
(:mod:`parameternet.experiments.lm_upcycle_rule`, ``results/lm-upcycle2/design.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.experiments.lm_grid import (
    DENSE,
    MOE8,
    SMOKE_OVERRIDES,
    Runner,
    Task,
    check_inputs,
    check_jobs,
    hardware_line,
)
from parameternet.experiments.lm_rows import fmt_mean, load_report_rows
from parameternet.experiments.lm_upcycle_rule import BRANCHES, CRITERIA, UPCYCLED, judge_rows
from parameternet.runs import atomic_write

__all__ = ["PRESETS", "Schedule", "UpcyclePreset", "estimate_text", "plan", "report", "run_upcycle", "simulation"]

log = logging.getLogger(__name__)

OPTIMIZER = {"continue": "kept", "reset": "fresh", "upcycle": "fresh", "upcycle-rewarm": "fresh",
             "upcycle-moe-lr": "fresh"}  # fmt: skip


@dataclass(frozen=True)
class UpcyclePreset:
    """The grid of an upcycling-round-2 preset (module docstring). ``dense_lr`` / ``moe_lr``: the peak learning
    rates of the dense and the MoE schedule; ``trunk_eval_every`` / ``eval_every``: validation intervals (steps)
    of the trunk and of the continuations; ``rewarmup_fraction``: the re-warmup's share of the schedule's steps."""

    name: str
    description: str
    seeds: tuple[int, ...] = (3, 4, 5)
    dense_lr: float = 4e-3
    moe_lr: float = 2e-3
    variant: str = MOE8
    corpus_fraction: float = 0.5
    main_tokens: int | None = None
    trunk_eval_every: int = 250
    eval_every: int = 100
    eval_tokens: int | None = None  # validation (and held-out) tokens per evaluation; None = the whole split
    warmup_fraction: float = 0.05
    rewarmup_fraction: float = 0.05
    overrides: tuple[str, ...] = ()
    zero_shot_items: int = 0


PRESETS = {
    # Round 1's recipe (results/lm/lr.json: its learning-rate check chose 0.004 for dense and 0.002 for the MoE on
    # the validation split) and schedule (half the training split, 5% warmup, cosine to 10%); seeds new to it.
    "upcycle2": UpcyclePreset(
        "upcycle2",
        "dense to the midpoint once per seed (3, 4, 5), then continue / reset / upcycle / upcycle-rewarm / "
        "upcycle-moe-lr to the end of round 1's schedule; validation every 100 steps, held-out at the end",
    ),
    "upcycle2-smoke": UpcyclePreset(
        "upcycle2-smoke",
        "tiny model, 16 steps, two seeds: checks the round-2 grid's code path, not the science",
        seeds=(3, 4),
        dense_lr=3e-3,
        moe_lr=1e-3,
        variant="down_proj-4",
        main_tokens=16 * 4 * 32,
        trunk_eval_every=4,
        eval_every=2,
        eval_tokens=4096,
        rewarmup_fraction=0.25,  # 4 of the 16 steps: a ramp the branch's 8 steps can show
        overrides=(*SMOKE_OVERRIDES, "ckpt_every_steps=4"),
    ),
}


@dataclass(frozen=True)
class Schedule:
    """The steps of one preset's grid: ``total`` (the schedule), ``mid`` (the branch point), ``warmup`` and
    ``rewarmup`` (steps), ``tokens`` (of the whole schedule) and the continuations' evaluation ``steps``."""

    total: int
    mid: int
    warmup: int
    rewarmup: int
    tokens: int
    per_step: int

    def eval_steps(self, every: int) -> list[int]:
        """The steps a continuation validates at: every ``every`` steps after the branch point, and the last."""
        return [s for s in range(self.mid + 1, self.total) if s % every == 0] + [self.total]


def plan(runner: Runner) -> tuple[list[Task], Schedule]:
    """The grid's tasks (a trunk and five continuations per seed, the continuations after their trunk) and its
    schedule."""
    p: UpcyclePreset = runner.preset
    split, per_step = runner.train_windows()
    tokens = p.main_tokens or int(split * p.corpus_fraction) // per_step * per_step
    total = tokens // per_step
    if total < 4:
        raise ParameterNetError(f"preset {p.name!r} has {total} steps; a branch point needs at least 4")
    sched = Schedule(total, total // 2, runner.warmup(total), max(1, round(p.rewarmup_fraction * total)), tokens,
                     per_step)  # fmt: skip
    common = [f"max_tokens={tokens}", f"schedule.warmup_steps={sched.warmup}", runner.eval_tokens]
    branch = [*common, f"eval_every_steps={p.eval_every}"]
    tasks = []
    for seed in p.seeds:
        trunk = runner.task("trunk", DENSE, seed, p.dense_lr, [*common, f"eval_every_steps={p.trunk_eval_every}"],
                            stop_step=sched.mid, snapshot_step=sched.mid)  # fmt: skip
        snapshot = str(trunk.run_dir / "snapshot")
        at = dict(start_step=sched.mid)
        runs = [
            runner.task("continue", DENSE, seed, p.dense_lr, branch, fork_from=str(trunk.run_dir), **at),
            runner.task("reset", DENSE, seed, p.dense_lr, branch, from_snapshot=snapshot, **at),
            runner.task("upcycle", p.variant, seed, p.dense_lr, branch, from_snapshot=snapshot, **at),
            runner.task(
                "upcycle-rewarm",
                p.variant,
                seed,
                p.dense_lr,
                branch,
                from_snapshot=snapshot,
                rewarmup_steps=sched.rewarmup,
                **at,
            ),  # fmt: skip
            runner.task("upcycle-moe-lr", p.variant, seed, p.moe_lr, branch, from_snapshot=snapshot, **at),
        ]
        for t in runs:
            t.after = [trunk]
        tasks += [trunk, *runs]
    return tasks, sched


def run_upcycle(
    preset: str, recipe: str, overrides: Sequence[str], runs_dir: str | Path, output: str | Path | None, jobs: int
) -> str:
    """Run the grid of ``preset`` (skipping the runs this code already made) and write and return the report;
    :func:`~parameternet.experiments.lm.run_lm_experiment` calls it (and sets the defaults) for these presets.
    Raises ParameterNetError on bad input (an unknown preset, ``jobs`` below 1, a bad override or one the grid
    sets: all checked before anything starts or the output directory is made) or on failed runs."""
    from parameternet.experiments.lm import grid_output

    if preset not in PRESETS:
        raise ParameterNetError(f"preset {preset!r} is not an upcycling preset; use one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    with grid_output(p, recipe, overrides, output, jobs) as output:
        runner = Runner(p, str(recipe), overrides, output, Path(runs_dir), jobs)
        tasks, _ = plan(runner)
        runner.execute(tasks)
    return report(output, preset)


def estimate_text(recipe: str, preset: UpcyclePreset, overrides: Sequence[str] = (), jobs: int = 2) -> str:
    """Measure 1-thread training and evaluation tokens/s here (random tokens) and estimate each run's time and the
    grid's wall time with ``jobs`` one-thread runs side by side (a lower bound: the runs may not pair up at the
    end). Raises ParameterNetError for ``jobs`` below 1 or a bad override."""
    from parameternet.experiments.lm_estimate import measure_tokens_per_s

    check_jobs(jobs)
    cfg = check_inputs(preset, recipe, overrides)
    data = cfg.data.prepare()
    val, held = len(data.tokens("val")), len(data.tokens("eval"))
    if preset.eval_tokens:
        val, held = min(val, preset.eval_tokens), min(held, preset.eval_tokens)
    per_step = cfg.batch_size * cfg.data.seq_len
    tokens = preset.main_tokens or int(int(data.manifest["tokens"]["train"]) * preset.corpus_fraction)
    total = tokens // per_step
    mid = total // 2
    sched = Schedule(total, mid, 0, 0, total * per_step, per_step)
    speed = measure_tokens_per_s(recipe, [*preset.overrides, *overrides])
    evals = len(sched.eval_steps(preset.eval_every))
    trunk_evals = len([s for s in range(1, mid) if s % preset.trunk_eval_every == 0]) + 1
    trunk = mid * per_step / speed["dense"] + trunk_evals * val / speed["dense_eval"]
    runs = {"trunk": trunk}
    for kind in BRANCHES:
        m = "moe" if kind in UPCYCLED else "dense"
        runs[kind] = (total - mid) * per_step / speed[m] + (evals * val + held) / speed[f"{m}_eval"]
    grid = len(preset.seeds) * sum(runs.values())
    return "\n".join([
        f"measured here, one torch thread: training dense {speed['dense']:.0f} tokens/s, {preset.variant} "
        f"{speed['moe']:.0f}; evaluation dense {speed['dense_eval']:.0f}, MoE {speed['moe_eval']:.0f} tokens/s",
        "per seed: " + ", ".join(f"{k} {v / 60:.0f} min" for k, v in runs.items()) + f" ({mid} steps each; "
        f"{trunk_evals} trunk evaluations, {evals} per continuation of {val:,} tokens, held-out {held:,} tokens)",
        f"preset {preset.name}: {len(preset.seeds) * 6} runs, {grid / 3600:.1f} h of run time: about "
        f"{grid / jobs / 3600:.1f} h on {jobs} core{'s' if jobs > 1 else ''} ({jobs} one-thread run"
        f"{'s' if jobs > 1 else ''} side by side), if nothing else runs",
    ])  # fmt: skip


def simulation(
    recipe: str, preset: UpcyclePreset, overrides: Sequence[str] = (), round1: str | Path = "results/lm"
) -> str:
    """The pre-stated rule's chance of each verdict with ``len(preset.seeds)`` seeds at the spreads round 1
    measured (its rows in ``round1``), on the preset's schedule and evaluation steps
    (:func:`~parameternet.experiments.lm_upcycle_rule.simulation_text`). Raises ParameterNetError for a bad
    override or missing round-1 rows."""
    from parameternet.experiments.lm_upcycle_rule import round1_spreads, simulation_text

    cfg = check_inputs(preset, recipe, overrides)
    per_step = cfg.batch_size * cfg.data.seq_len
    tokens = preset.main_tokens or int(int(cfg.data.prepare().manifest["tokens"]["train"]) * preset.corpus_fraction)
    total = tokens // per_step
    sched = Schedule(total, total // 2, 0, 0, total * per_step, per_step)
    spreads = round1_spreads(round1)
    head = (
        f"Round 1's spreads ({spreads['seeds']} seeds, {Path(round1) / 'runs.csv'}): paired final gap dense - "
        f"upcycled {spreads['gap']:+.4f} (sd {spreads['final_sd']:.4f}); its fitted change over the branch's "
        f"second half {spreads['change']:+.4f} (sd over seeds {spreads['change_sd']:.4f}); seed sd of the final "
        f"validation loss: dense {spreads['dense_sd']:.4f}, MoE {spreads['moe_sd']:.4f}. Schedule of {preset.name}: "
        f"{total} steps, branch point {sched.mid}."
    )
    steps = sched.eval_steps(preset.eval_every)
    return head + "\n\n" + simulation_text(spreads, steps, sched.mid, total, seeds=len(preset.seeds))


# ----- the report -----


LABELS = {
    "continue": ("dense", "kept", "dense schedule"),
    "reset": ("dense", "fresh", "dense schedule"),
    "upcycle": ("upcycled", "fresh", "dense schedule"),
    "upcycle-rewarm": ("upcycled", "fresh", "dense schedule, re-warmed"),
    "upcycle-moe-lr": ("upcycled", "fresh", "MoE schedule"),
}


def _ci(v: dict[str, Any]) -> str:
    if v.get("n", 0) < 2:
        return "-"
    return f"{v['mean']:+.4f} ± {v['se']:.4f} [{v['low']:+.4f}, {v['high']:+.4f}]"


def report(output: str | Path, preset: str = "upcycle2", pool_commits: bool = False) -> str:
    """Write ``table.md`` and ``loss_curves.png`` from the CSVs in ``output``; return the text. Rows of different
    code are not pooled unless ``pool_commits``. Raises ParameterNetError as
    :func:`~parameternet.experiments.lm_grid.load_report_rows` does."""
    output = Path(output)
    got = load_report_rows(output, preset, pool_commits)
    rows, curves = got.rows, got.curves
    p = PRESETS.get(preset)
    trunks = {r["seed"]: r for r in rows if r["kind"] == "trunk"}
    ends = [r for r in rows if r["kind"] in BRANCHES]
    parts = []
    expected = len(p.seeds) * (1 + len(BRANCHES)) if p else None
    if expected and len(rows) < expected:
        parts += [
            f"Incomplete: {len(rows)} of the grid's {expected} runs ({len(trunks)} trunks, {len(ends)} continuations);"
            " verdicts below are on the seeds whose runs have all finished, not the pre-stated design's. Rerun "
            f"`parameternet lm experiment --preset {preset}` from a checkout of commit "
            f"{', '.join(sorted({str(r['commit'])[:12] for r in rows}))} to continue.",
            "",
        ]
    parts += hardware_line(Path(output))
    if ends:
        parts += [*_final_losses(p, trunks, ends), *_verdicts(rows, curves)]
    router = [r for r in got.router if r["kind"] in UPCYCLED]
    if router:
        from parameternet.experiments.lm_report import router_summary

        parts += ["", *router_summary(router, kinds=UPCYCLED)]
    wall = sum(r["wall_s"] or 0 for r in rows)
    kinds = dict.fromkeys(r["kind"] for r in rows)
    by_kind = ", ".join(f"{k} {sum(r['wall_s'] or 0 for r in rows if r['kind'] == k) / 3600:.1f} h" for k in kinds)
    threads = sorted({r["threads"] for r in rows if r["threads"] is not None})
    parts += ["", f"Compute: {wall / 3600:.1f} h of run time over {len(rows)} runs ({by_kind}), torch threads per "
              f"run: {', '.join(str(t) for t in threads) or '-'}. {got.note}"]  # fmt: skip
    text = "\n".join(parts) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    _plot(curves, rows, output / "loss_curves.png")
    atomic_write(output / "table.md", text)
    return text


def _final_losses(p, trunks: dict[int, dict[str, Any]], ends: list[dict[str, Any]]) -> list[str]:
    """The report's protocol line, the table of final losses (mean ± s.e. over seeds) and the per-seed table."""
    parts: list[str] = []
    e = ends[0]
    per_step = e["tokens"] // max(1, e["steps"] - e["start_step"])
    rates = (f"peak learning rates: dense {p.dense_lr:g}, MoE {p.moe_lr:g}, the values round 1's learning-rate "
             "check chose on the validation split; " if p else "")  # fmt: skip
    parts += [
        f"Upcycling, round 2: per seed ({', '.join(str(s) for s in sorted(trunks))}), one dense trunk trained to "
        f"the midpoint of the schedule (step {e['start_step']:,} of {e['steps']:,}: {e['start_step'] * per_step:,} of "
        f"its {e['steps'] * per_step:,} training tokens), then five continuations from that snapshot to the end, "
        f"on the same windows in the same order ({rates}re-warmup over "
        f"{round(p.rewarmup_fraction * e['steps']) if p else '?'} steps). "
        "Final losses: mean ± standard error over seeds (number of seeds). Held-out: the documents neither "
        "training nor validation (nor any choice of this grid or round 1) read.",
        "",
        "| Continuation | Model | Optimizer at the branch | Learning rate after it | Train loss | Val loss | "
        "Held-out loss |",
        "|---|---|---|---|---|---|---|",
        f"| trunk (step {e['start_step']:,}) | dense | - | - | "
        f"{fmt_mean([r['train_loss'] for r in trunks.values()])} | "
        f"{fmt_mean([r['val_loss'] for r in trunks.values()])} | not measured (not a final model) |",
    ]
    for kind in BRANCHES:
        rs = [r for r in ends if r["kind"] == kind]
        held = [r["heldout_loss"] for r in rs if r.get("heldout_loss") is not None]
        parts.append(
            f"| {kind} | " + " | ".join(LABELS[kind]) + f" | {fmt_mean([r['train_loss'] for r in rs])} | "
            f"{fmt_mean([r['val_loss'] for r in rs])} | {fmt_mean(held) if held else 'not measured'} |"
        )
    parts += [
        "", "Final validation loss (held-out loss) per seed:", "",
        "| seed | trunk at the branch | " + " | ".join(BRANCHES) + " |", "|---|---|" + "---|" * len(BRANCHES),
    ]  # fmt: skip
    for seed in sorted(trunks):
        cells = []
        for kind in BRANCHES:
            r = next((r for r in ends if r["kind"] == kind and r["seed"] == seed), None)
            held = f" ({r['heldout_loss']:.4f})" if r and r.get("heldout_loss") is not None else ""
            cells.append(f"{r['val_loss']:.4f}{held}" if r else "-")
        parts.append(f"| {seed} | {trunks[seed]['val_loss']:.4f} | " + " | ".join(cells) + " |")
    return parts


def _verdicts(rows: list[dict[str, Any]], curves: list[dict[str, Any]]) -> list[str]:
    """The verdicts of the pre-stated rule on validation (and the held-out check), one table row a comparison."""
    parts: list[str] = []
    val, held = judge_rows(rows, curves), judge_rows(rows, curves, "heldout_loss")
    k = CRITERIA
    parts += [
        "",
        f"**Verdicts by the rule stated before the runs** (`results/lm-upcycle2/design.md`): gap = reference - "
        f"branch (positive: the branch is better), final validation loss, paired by seed, mean ± s.e. "
        f"[{k['level']:.0%} t interval]; fitted change of the seed-mean gap over the branch's second half. "
        f"better: interval above 0, change >= -{k['flat']}; worse: interval below 0, change <= +{k['flat']}; "
        f"same: interval within ±{k['margin']} and |change| <= {k['flat']}; else not resolved. The held-out "
        "column applies the same rule to the held-out losses (with the same validation slope): a check, not the "
        "verdict.",
        "",
        "| branch | against | gap per seed | gap [interval] | change (points) | verdict | held-out gap [interval] "
        "| held-out reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, h in zip(val, held):
        per_seed = ", ".join(f"{g:+.4f}" for g in v.get("gaps", [])) or "-"
        change = f"{v['change']:+.4f} ({v['points']})" if v.get("n", 0) >= 2 else "-"
        parts.append(
            f"| {v['branch']} | {v['reference']} | {per_seed} | {_ci(v)} | {change} | **{v['verdict']}** | "
            f"{_ci(h)} | {h['verdict']} |"
        )
    split = [f"{v['branch']} vs {v['reference']}" for v, h in zip(val, held) if v["verdict"] != h["verdict"]]
    parts += ["", "Validation and held-out readings "
              + (f"differ for: {'; '.join(split)}." if split else "agree for every comparison.")]  # fmt: skip
    return parts


def _plot(curves: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    """Per seed: validation loss of the trunk's last evaluations and the five continuations (top), and the gap of
    the kept-optimizer continuation to each other one (bottom), against training tokens; the branch point
    marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows if r["kind"] == "trunk"})
    ends = [r for r in rows if r["kind"] in BRANCHES]
    if not seeds or not ends:
        return
    start = ends[0]["start_step"]
    per_step = ends[0]["tokens"] // max(1, ends[0]["steps"] - start)
    colors = dict(zip(("trunk", *BRANCHES), ("gray", "black", "tab:blue", "tab:red", "tab:orange", "tab:green")))
    fig, axes = plt.subplots(2, len(seeds), figsize=(5 * len(seeds), 8), squeeze=False, sharex=True)
    for j, seed in enumerate(seeds):
        runs = {}
        for kind in ("trunk", *BRANCHES):
            pts = sorted((c["step"], c["val_loss"]) for c in curves if c["kind"] == kind and c["seed"] == seed)
            runs[kind] = dict(pts)
        trunk = [(s, x) for s, x in sorted(runs["trunk"].items()) if s >= start - 2 * max(1, start // 4)]
        ax, gx = axes[0][j], axes[1][j]
        ax.plot([s * per_step for s, _ in trunk], [x for _, x in trunk], color=colors["trunk"], marker="o",
                markersize=3, label="trunk")  # fmt: skip
        at = runs["trunk"].get(start)
        for kind in BRANCHES:
            pts = sorted(runs[kind].items())
            if at is not None:
                pts = [(start, at), *pts]  # every continuation starts from the trunk's loss there
            ax.plot([s * per_step for s, _ in pts], [x for _, x in pts], color=colors[kind], marker="o",
                    markersize=2.5, label=kind)  # fmt: skip
            if kind != "continue":
                ref = runs["continue"]
                gap = [(s, ref[s] - x) for s, x in sorted(runs[kind].items()) if s in ref]
                gap = [(start, 0.0), *gap] if at is not None else gap  # one trunk: no gap at the branch point
                gx.plot([s * per_step for s, _ in gap], [g for _, g in gap], color=colors[kind], marker="o",
                        markersize=2.5, label=f"continue - {kind}")  # fmt: skip
        for axis in (ax, gx):
            axis.axvline(start * per_step, color="red", linewidth=0.8, linestyle="--")
            axis.grid(alpha=0.3)
        ax.annotate("branch point", (start * per_step, ax.get_ylim()[1]), fontsize=8, color="red", va="top")
        gx.axhline(0, color="black", linewidth=0.8)
        ax.set(title=f"seed {seed}", ylabel="validation loss (nats)")
        gx.set(xlabel="training tokens", ylabel="continue - branch (nats; > 0: branch better)")
        ax.legend(fontsize=7)
        gx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
