"""The pre-stated reading of upcycling, round 2 (``lm experiment --preset upcycle2``), and its simulation.

Every seed has one dense trunk trained to the midpoint of the schedule and five continuations from that one snapshot
(:data:`BRANCHES`). Each comparison puts a *branch* against a *reference* continuation of the same seed, with
``gap = reference - branch`` in nats of validation loss (positive: the branch is better):

- the final gap of each seed, their mean and its two-sided Student-t interval at :data:`CRITERIA` ``level`` over
  the seeds (paired by seed: the two runs share the trunk, the data order and the seed);
- the *fitted change* of the gap over the second half of the branch (the evaluations at or after
  ``start + (total - start) / 2``): the least-squares slope of the seed-mean gap against the step, times the span.

The verdict (:func:`decide`), in this order:

- **better**: the interval lies above 0 and the gap is not shrinking: fitted change >= -``flat``;
- **worse**: the interval lies below 0 and the gap is not closing: fitted change <= +``flat``;
- **same**: the interval lies inside (-``margin``, +``margin``) and the fitted change within +-``flat``;
- **not resolved**: anything else (an interval across 0 reaching past the margin, a gap that closes or shrinks by
  more than ``flat``, fewer than two seeds).

:data:`COMPARISONS` lists what is judged: each upcycled branch against both dense continuations (the optimizer
kept, and the optimizer reset alone), and the reset against the kept optimizer (what the reset alone costs).
:func:`simulate` draws the verdict's chances at given true effects and spreads, so the seed count can be judged
before the runs; :func:`round1_spreads` takes the spreads from round 1's rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parameternet.errors import ParameterNetError
from parameternet.experiments.lm_rows import fit_change, mean_curve

__all__ = [
    "BRANCHES",
    "COMPARISONS",
    "CRITERIA",
    "REFERENCES",
    "UPCYCLED",
    "VERDICTS",
    "compare",
    "decide",
    "judge_rows",
    "round1_spreads",
    "second_half",
    "simulate",
    "simulation_text",
]

# The five continuations of one trunk, in the order the report shows them.
BRANCHES = ("continue", "reset", "upcycle", "upcycle-rewarm", "upcycle-moe-lr")
REFERENCES = ("continue", "reset")  # the two dense continuations
UPCYCLED = ("upcycle", "upcycle-rewarm", "upcycle-moe-lr")
COMPARISONS = (*((b, r) for b in UPCYCLED for r in REFERENCES), ("reset", "continue"))

CRITERIA = {
    "level": 0.95,  # two-sided t interval of the mean final gap over seeds
    "margin": 0.02,  # nats: "same" needs the whole interval within +-margin
    "flat": 0.01,  # nats: the most the gap may move against a verdict over the branch's second half
}


def second_half(start_step: int, total_steps: int) -> float:
    """The first step of the branch's second half: ``start + (total - start) / 2``."""
    return start_step + (total_steps - start_step) / 2


def decide(low: float, high: float, change: float, n: int) -> tuple[str, str]:
    """``(verdict, reason)`` from the interval ``[low, high]`` of the mean final gap over ``n`` seeds and the
    fitted change of the gap over the branch's second half (nats; positive: the gap grows in the branch's
    favour)."""
    k = CRITERIA
    if n < 2 or not all(math.isfinite(x) for x in (low, high, change)):
        return "not resolved", "fewer than two seeds, or no fitted change"
    if low > 0 and change >= -k["flat"]:
        return "better", "the interval lies above 0 and the gap is not shrinking"
    if high < 0 and change <= k["flat"]:
        return "worse", "the interval lies below 0 and the gap is not closing"
    if -k["margin"] < low and high < k["margin"] and abs(change) <= k["flat"]:
        return "same", f"the interval lies within +-{k['margin']} nats and the gap is flat"
    if low > 0 or high < 0:
        return "not resolved", "the sign is resolved but the gap moves against it over the second half"
    return "not resolved", f"the interval crosses 0 and reaches past +-{k['margin']} nats, or the gap is not flat"


def compare(
    reference: dict[int, float],
    branch: dict[int, float],
    gap_curves: dict[int, Sequence[tuple[int, float]]],
    start_step: int,
    total_steps: int,
) -> dict[str, Any]:
    """The verdict of one comparison.

    ``reference`` / ``branch``: final losses by seed; ``gap_curves``: per seed, ``(step, reference - branch)`` at
    the evaluations after the branch point. Seeds present on both sides are paired. Returns ``{"verdict",
    "reason", "n", "gaps", "mean", "se", "low", "high", "change", "points"}``.
    """
    from parameternet.experiments.stats import summary

    seeds = sorted(set(reference) & set(branch))
    gaps = [reference[s] - branch[s] for s in seeds]
    s = summary(gaps, CRITERIA["level"])
    half = second_half(start_step, total_steps)
    curve = mean_curve([gap_curves[seed] for seed in seeds if seed in gap_curves])
    late = [(step, g) for step, g in curve if step >= half]
    change = fit_change(late, total_steps - half)
    verdict, reason = decide(s.low, s.high, change, s.n)
    return {
        "verdict": verdict, "reason": reason, "n": s.n, "seeds": seeds, "gaps": gaps, "mean": s.mean, "se": s.se,
        "low": s.low, "high": s.high, "change": change, "points": len(late),
    }  # fmt: skip


def judge_rows(
    rows: Sequence[dict[str, Any]], curves: Sequence[dict[str, Any]], loss: str = "val_loss"
) -> list[dict[str, Any]]:
    """Every comparison of :data:`COMPARISONS` over the rows of one grid: the final ``loss`` (``val_loss``, or
    ``heldout_loss`` for the check on the held-out split) of each branch's rows by seed, and the validation
    curves' gaps (``curves`` rows with ``kind`` = the branch). Returns one :func:`compare` result per comparison,
    with ``branch`` and ``reference`` added; one whose rows are missing comes back not resolved."""
    final: dict[str, dict[int, float]] = {b: {} for b in BRANCHES}
    start = total = None
    for r in rows:
        if r["kind"] in final and r.get(loss) is not None:
            final[r["kind"]][r["seed"]] = r[loss]
            start, total = r["start_step"], r["steps"]
    by: dict[tuple[str, int], dict[int, float]] = {}
    for c in curves:
        if c["kind"] in final:
            by.setdefault((c["kind"], c["seed"]), {})[c["step"]] = c["val_loss"]
    out = []
    for branch, ref in COMPARISONS:
        gaps = {}
        for seed in final[branch].keys() & final[ref].keys():
            a, b = by.get((ref, seed), {}), by.get((branch, seed), {})
            gaps[seed] = [(step, a[step] - b[step]) for step in sorted(a.keys() & b.keys())]
        if start is None:
            got = {"verdict": "not resolved", "reason": "no rows", "n": 0}
        else:
            got = compare(final[ref], final[branch], gaps, start, total)
        out.append({"branch": branch, "reference": ref, **got})
    return out


# ----- the simulation -----


def round1_spreads(output: str | Path = "results/lm") -> dict[str, float]:
    """The spreads round 1 measured (the ``full`` preset's ``runs.csv`` and ``curves.csv`` in ``output``), for
    :func:`simulate`: ``final_sd`` (sd over seeds of the paired final gap dense - upcycled), ``point_sd`` (sd of
    each seed's gap curve about its own straight line over the branch's evaluations, pooled), ``change_sd`` (sd
    over seeds of that line's change over the branch's second half), ``gap`` and ``change`` (their means), and the
    seed sd of the final validation loss of the dense and MoE main runs. Raises ParameterNetError when the rows
    are missing."""
    from parameternet.experiments.lm_rows import read_rows
    from parameternet.experiments.stats import summary

    output = Path(output)
    rows = [r for r in read_rows(output / "runs.csv") if r.get("preset") == "full"]
    curves = [r for r in read_rows(output / "curves.csv") if r.get("preset") == "full"]
    dense = {r["seed"]: r for r in rows if r["kind"] == "main" and r["variant"] == "dense"}
    up = {r["seed"]: r for r in rows if r["kind"] == "upcycle"}
    seeds = sorted(dense.keys() & up.keys())
    if len(seeds) < 2:
        raise ParameterNetError(
            f"{str(output / 'runs.csv')!r} holds no round-1 upcycling rows of two or more seeds; pass the output "
            f"directory of the full preset (results/lm)"
        )
    start, total = up[seeds[0]]["start_step"], up[seeds[0]]["steps"]
    half = second_half(start, total)
    residuals, changes, df = [], [], 0
    for seed in seeds:
        d = {c["step"]: c["val_loss"] for c in curves if c["kind"] == "main" and c["variant"] == "dense"
             and c["seed"] == seed}  # fmt: skip
        u = {c["step"]: c["val_loss"] for c in curves if c["kind"] == "upcycle" and c["seed"] == seed}
        pts = np.array([(s, d[s] - u[s]) for s in sorted(d.keys() & u.keys()) if s > start], dtype=float)
        slope, icept = np.polyfit(pts[:, 0], pts[:, 1], 1)
        residuals += list(pts[:, 1] - (slope * pts[:, 0] + icept))
        df += len(pts) - 2
        changes.append(slope * (total - half))
    finals = [dense[s]["val_loss"] - up[s]["val_loss"] for s in seeds]
    moe = [r["val_loss"] for r in rows if r["kind"] == "main" and r["variant"] == "down_proj-8"]
    return {
        "seeds": len(seeds), "gap": float(np.mean(finals)), "final_sd": summary(finals).sd,
        "point_sd": math.sqrt(sum(x * x for x in residuals) / max(1, df)), "change": float(np.mean(changes)),
        "change_sd": summary(changes).sd, "dense_sd": summary([r["val_loss"] for r in dense.values()]).sd,
        "moe_sd": summary(moe).sd if len(moe) > 1 else math.nan,
    }  # fmt: skip


def simulate(
    gap: float,
    change: float,
    final_sd: float,
    point_sd: float,
    change_sd: float,
    steps: Sequence[int],
    start_step: int,
    total_steps: int,
    seeds: int = 3,
    sims: int = 20_000,
    rng: int = 0,
) -> dict[str, float]:
    """The chance of each verdict of :func:`decide` when the true mean final gap is ``gap`` and its true change
    over the branch's second half is ``change`` (nats).

    Each of ``sims`` replicate grids has ``seeds`` seeds; a seed's final gap is drawn from N(``gap``,
    ``final_sd``^2), its change from N(``change``, ``change_sd``^2), and its gap at each evaluation step of
    ``steps`` before the last lies on the straight line through the final gap with that change, plus
    N(0, ``point_sd``^2) noise. The rule then sees what the report would: the seeds' interval and the fitted
    change of the seed-mean curve. Returns ``{verdict: share of the replicates}``.
    """
    from scipy import stats

    g = np.random.default_rng(rng)
    steps_arr = np.asarray(sorted(steps), dtype=float)
    half = second_half(start_step, total_steps)
    late = steps_arr[steps_arr >= half]
    if len(late) < 2 or late[-1] != total_steps:
        raise ParameterNetError(
            f"the evaluation steps {list(steps)} give {len(late)} points in the second half (from step {half:g}) or "
            f"miss the last step {total_steps}; evaluate at least twice there and at the end"
        )
    final = g.normal(gap, final_sd, (sims, seeds))
    per_change = g.normal(change, change_sd, (sims, seeds))
    slope = per_change / (total_steps - half)
    curve = final[..., None] - slope[..., None] * (total_steps - late)  # (sims, seeds, points)
    noise = g.normal(0.0, point_sd, curve.shape)
    noise[..., -1] = 0.0  # the last point is the final gap itself
    mean = (curve + noise).mean(1)  # (sims, points)
    x = late - late.mean()
    fitted = (mean * x).sum(1) / (x * x).sum() * (total_steps - half)
    m, sd = final.mean(1), final.std(1, ddof=1)
    half_width = stats.t.ppf(0.5 + CRITERIA["level"] / 2, seeds - 1) * sd / math.sqrt(seeds)
    verdicts = _verdicts(m - half_width, m + half_width, fitted)
    return {v: float(np.mean(verdicts == i)) for i, v in enumerate(VERDICTS)}


VERDICTS = ("better", "worse", "same", "not resolved")


def _verdicts(low: np.ndarray, high: np.ndarray, change: np.ndarray) -> np.ndarray:
    """:func:`decide` over arrays (two or more seeds, finite values): the index in :data:`VERDICTS` of each."""
    k = CRITERIA
    out = np.full(low.shape, 3)
    same = (-k["margin"] < low) & (high < k["margin"]) & (np.abs(change) <= k["flat"])
    out[same] = 2
    out[(high < 0) & (change <= k["flat"])] = 1
    out[(low > 0) & (change >= -k["flat"])] = 0
    return out


def simulation_text(
    spreads: dict[str, float],
    steps: Sequence[int],
    start_step: int,
    total_steps: int,
    seeds: int = 3,
    sims: int = 20_000,
    gaps: Sequence[float] = (-0.075, -0.04, -0.02, -0.01, -0.005, 0.0, 0.005, 0.01, 0.02, 0.04),
) -> str:
    """Markdown: the chance of each verdict at each true final gap in ``gaps`` (change 0) for five spreads of the
    paired final gap: round 1's measured sd of the paired gap dense - upcycled, and the gap of two runs whose seed
    variation does not cancel at all (sd x sqrt 2) at a per-run sd of 0.005, round 1's dense seed sd, 0.013 and
    round 1's MoE seed sd; then at round 1's measured gap and change, and the smallest |gap| each spread resolves
    (the right sign with a chance of at least 0.8), on the evaluation ``steps`` of the grid."""
    sds = [
        (spreads["final_sd"], "round 1's paired gap"),
        (0.005 * math.sqrt(2), "unpaired, 0.005 per run"),
        (spreads["dense_sd"] * math.sqrt(2), f"unpaired, dense's {spreads['dense_sd']:.4f} per run"),
        (0.013 * math.sqrt(2), "unpaired, 0.013 per run"),
        (spreads["moe_sd"] * math.sqrt(2), f"unpaired, the MoE's {spreads['moe_sd']:.4f} per run"),
    ]
    common = dict(point_sd=spreads["point_sd"], change_sd=spreads["change_sd"], steps=steps, start_step=start_step,
                  total_steps=total_steps, seeds=seeds, sims=sims)  # fmt: skip
    half = second_half(start_step, total_steps)
    lines = [
        f"{sims:,} simulated grids of {seeds} seeds per cell; the gap's points about their line: sd "
        f"{spreads['point_sd']:.4f}; the seeds' change over the second half: sd {spreads['change_sd']:.4f} "
        f"(both round 1's); {sum(1 for s in steps if s >= half)} evaluations in the branch's second half (steps "
        f"{', '.join(str(s) for s in steps if s >= half)}). Each cell: chance of better / worse / same / not "
        "resolved.",
        "",
        "| true final gap (nats) | " + " | ".join(f"sd {sd:.4f} ({why})" for sd, why in sds) + " |",
        "|---|" + "---|" * len(sds),
    ]
    for gap in gaps:
        cells = []
        for sd, _ in sds:
            p = simulate(gap, 0.0, sd, **common)
            cells.append(" / ".join(f"{p[v]:.2f}" for v in ("better", "worse", "same", "not resolved")))
        lines.append(f"| {gap:+.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"At round 1's measured gap {spreads['gap']:+.4f} and change {spreads['change']:+.4f} nats:"]
    for sd, why in sds:
        p = simulate(spreads["gap"], spreads["change"], sd, **common)
        lines.append(f"- sd {sd:.4f} ({why}): " + ", ".join(f"{v} {p[v]:.2f}" for v in p) + ".")
    lines += ["", "Smallest |true gap| whose sign the rule gives with a chance of at least 0.8 (change 0):"]
    for sd, why in sds:
        found = {}
        for sign, verdict in ((-1, "worse"), (1, "better")):
            lo, hi = 0, 120  # thousandths of a nat; the chance grows with |gap|: bisect for the first >= 0.8
            if simulate(sign * hi / 1000, 0.0, sd, **common)[verdict] < 0.8:
                found[verdict] = None
                continue
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if simulate(sign * mid / 1000, 0.0, sd, **common)[verdict] >= 0.8 else (mid, hi)
            found[verdict] = hi / 1000
        lines.append(
            f"- sd {sd:.4f} ({why}): "
            + ", ".join(f"{v} from {x:.3f} nats" if x is not None else f"{v}: not within 0.12 nats"
                        for v, x in found.items()) + "."
        )  # fmt: skip
    return "\n".join(lines)
