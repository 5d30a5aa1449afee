"""The written record of the round-3 design search (:mod:`parameternet.experiments.pitfall_design`):
``design.md`` (the rule simulated, round 2's effects, the scenarios, the cost, every candidate and the choice) and
``design.csv`` (one row per candidate).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from parameternet.experiments.pitfall_round3 import CRITERIA

__all__ = ["command_line", "design_markdown", "pct", "write_design_csv"]


def command_line(args: argparse.Namespace) -> str:
    """The command line that reproduces this record, every choice spelled out."""
    return (
        f"python -m parameternet.experiments.pitfall_design --sims {args.sims} --seed {args.seed} "
        f"--seeds {' '.join(map(str, args.seeds))} --static-seeds {' '.join(map(str, args.static_seeds))} "
        f"--max-wall-h {args.max_wall_h:g} --jobs {args.jobs}"
        + (f" --measure-steps {args.measure_steps}" if args.measure_steps else "")
    )


def pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def write_design_csv(path: Path, results: list[dict[str, Any]], chosen: dict[str, Any] | None) -> None:
    columns = [
        "seeds_ab", "seeds_static", "runs", "rows", "core_h", "wall_h", "wall_h_round2_rates", "scenario",
        "reproduced", "refuted", "not_resolved", "score", "chosen",
    ]  # fmt: skip
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in results:
            for name, p in r["p"].items():
                writer.writerow(
                    {
                        **{k: r[k] for k in ("seeds_ab", "seeds_static", "runs", "rows")},
                        **{k: round(r[k], 2) for k in ("core_h", "wall_h", "wall_h_round2_rates")},
                        "scenario": name,
                        "reproduced": p["reproduced"],
                        "refuted": p["refuted"],
                        "not_resolved": p["not resolved"],
                        "score": r["score"],
                        "chosen": r is chosen,
                    }  # fmt: skip
                )


def design_markdown(args, effects, scens, step_s, timing, loaded, results, chosen, oc, overhead_s: float) -> str:
    """``design.md``: the rule simulated, round 2's effects, the scenarios, the cost, every candidate, the choice."""
    lines = [
        *_md_effects(args, effects),
        *_md_scenarios(scens),
        *_md_cost(args, step_s, timing, loaded, overhead_s),
        *_md_candidates(args, scens, results, chosen),
        *_md_chosen(args, chosen, oc),
    ]
    return "\n".join(lines) + "\n"


def _md_effects(args, effects) -> list[str]:
    """The verdict rule simulated and the effects round 2 measured."""
    a, b, d = effects["A"], effects["B"], effects["D"]
    trend = effects["width_trend"]
    lines = [
        "# Round 3 of the low-FLOPs pitfall: the design, chosen by simulation before the run",
        "",
        f"Written by `{command_line(args)}` from `{args.results}` before any round-3 run. The verdict rule "
        "it simulates is `parameternet.experiments.pitfall_round3.decide` itself (see "
        "docs/experiments/pitfall-round3.md): reproduced when the 90% Welch interval of B's slope minus A's slope "
        "(gain on log3 pretraining epochs, per seed) is above 0, D's gain minus A's at 27 epochs has a 90% interval "
        f"above 0 and M's slope minus A's is not significant (one-sided {CRITERIA['alpha']}); refuted when not "
        f"reproduced and the remedy's interval ends below +{CRITERIA['remedy_min_slope']} per tripling; else not "
        "resolved.",
        "",
        "## Effects measured in round 2 (results/pitfall/results.csv, seeds 0-7)",
        "",
        "| model | gain at 3 epochs (seeds) | gain at 9 epochs (seeds) | sd target-only | sd fine-tuned at 3 / 9 "
        "| correlation of a seed's fine-tunes at 3 and 9 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for role, e in (("A", a), ("B", b), ("D", d)):
        g9 = f"{e['gain'][9]:+.2f} ({e['seeds'][9]})" if 9 in e["gain"] else "not measured"
        sd9 = f" / {e['sd_fine'][9]:.2f}" if 9 in e["sd_fine"] else ""
        rho = f"{e['rho_3_9']:.2f} ({e['rho_seeds']} seeds)" if "rho_3_9" in e else "-"
        lines.append(
            f"| {role} | {e['gain'][3]:+.2f} ({e['seeds'][3]}) | {g9} | {e['sd_target']:.2f} "
            f"| {e['sd_fine'][3]:.2f}{sd9} | {rho} |"
        )
    lines += [
        "",
        f"Static gain against MACs at 3 epochs (A, w0.25, D; {trend['runs']} runs): "
        f"{trend['slope_per_doubling']:+.2f} ± {trend['se']:.2f} points per doubling of MACs (p = {trend['p']:.4f}); "
        f"M's 3-epoch gain on that line: {effects['M']['gain'][3]:+.2f}. MACs at 28 px: "
        + ", ".join(f"{r} {m:,} ({m / effects['macs']['A']:.2f}x A)" for r, m in effects["macs"].items())
        + ". Nothing was measured at 27 epochs, nor for D and M beyond 3 epochs: the scenarios below extrapolate.",
        "",
    ]
    return lines


def _md_scenarios(scens) -> list[str]:
    """The scenarios: true mean gains per pretraining budget and the verdict each should get."""
    lines = [
        "## Scenarios (true mean gains at 3 / 9 / 27 epochs)",
        "",
        "| scenario | A | B | M | D | true remedy (per tripling) | seed correlation | the rule should say |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    for sc in scens:
        cells = " | ".join(" / ".join(f"{g:+.2f}" for g in sc.gain[r]) for r in ("A", "B", "M", "D"))
        lines.append(f"| {sc.name} | {cells} | {sc.remedy():+.2f} | {sc.rho:g} | {sc.expect} |")
    lines += [""] + [f"- *{sc.name}*: {sc.note}." for sc in scens]
    lines += [
        "- sds: target-only and fine-tuned top-1 as round 2 measured them; at 27 epochs those at 9; D's at 3 for "
        "every budget; M takes A's.",
        "",
    ]
    return lines


def _md_cost(args, step_s, timing, loaded, overhead_s: float) -> list[str]:
    """Seconds per step measured here and implied by round 2's rows, and the wall-time budget."""
    return [
        "## Cost",
        "",
        f"Seconds per 1-thread step ({timing}; pretraining recipe, two runs side by side, machine otherwise quiet): "
        + ", ".join(f"{k} {v:.4f}" for k, v in step_s.items())
        + f"; plus {overhead_s:g} s per run. Round 2's rows, made while other jobs loaded the machine, imply "
        + ", ".join(f"{k} {v:.4f}" for k, v in loaded.items())
        + " (the last column below). Wall time = core-hours / "
        f"{args.jobs} + the longest run (the tail). Budget: {args.max_wall_h:g} h wall.",
        "",
    ]


def _md_candidates(args, scens, results, chosen) -> list[str]:
    """Every candidate design: its cost and its chance of each verdict in each scenario; the choice rule."""
    lines = [
        "## Candidates",
        "",
        "| seeds A, B | seeds D, M, size | runs | rows | core-h | wall h | wall h at round 2's rates "
        + "".join(f"| {sc.name}: reproduced / refuted / not resolved " for sc in scens)
        + "| score |",
        "|---:|---:|---:|---:|---:|---:|---:|" + "---|" * len(scens) + "---:|",
    ]
    for r in results:
        probs = "".join(
            f"| {pct(r['p'][sc.name]['reproduced'])} / {pct(r['p'][sc.name]['refuted'])} / "
            f"{pct(r['p'][sc.name]['not resolved'])} "
            for sc in scens
        )
        mark = " **chosen**" if r is chosen else ""
        lines.append(
            f"| {r['seeds_ab']}{mark} | {r['seeds_static']} | {r['runs']} | {r['rows']} | {r['core_h']:.1f} "
            f"| {r['wall_h']:.1f} | {r['wall_h_round2_rates']:.1f} {probs}| {pct(r['score'])} |"
        )
    lines += [
        "",
        f"{args.sims} simulated grids per cell (Monte Carlo standard error at most 1.6 points). Score = the smallest, "
        "over the scenarios, probability of the verdict the scenario implies. Choice rule: among the candidates "
        f"within {args.max_wall_h:g} h wall, the highest score; among those within 2 points of it, the cheapest.",
        "",
    ]
    return lines


def _md_chosen(args, chosen, oc) -> list[str]:
    """The chosen design and its chance of each verdict as the true remedy varies (``oc``)."""
    lines = ["## Chosen", ""]
    if chosen is None:
        return [*lines, f"No candidate fits {args.max_wall_h:g} h wall."]
    des = chosen["design"]
    lines += [
        f"A and B on {len(des.seeds)} seeds, {des.seeds[0]}-{des.seeds[-1]}; D, M and the size arm on the first "
        f"{des.static_seeds} ({des.seeds[0]}-{des.seeds[des.static_seeds - 1]}); the router arm on the first "
        f"{des.router_seeds}. {chosen['runs']} training runs, {chosen['rows']} result rows, "
        f"{chosen['core_h']:.1f} core-hours: about {chosen['wall_h']:.1f} h with {args.jobs} runs side by side on "
        f"a quiet machine ({chosen['wall_h_round2_rates']:.1f} h at round 2's loaded rates).",
        "",
        "Chance of each verdict for this design as the true remedy varies (the *measured* scenario otherwise):",
        "",
        "| true remedy (points per tripling) | reproduced | refuted | not resolved |",
        "|---:|---:|---:|---:|",
    ]
    for remedy, p in oc:
        lines.append(f"| {remedy:+.2f} | {pct(p['reproduced'])} | {pct(p['refuted'])} | {pct(p['not resolved'])} |")
    return lines
