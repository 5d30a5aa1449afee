"""Choosing round 3's seed count by simulating its whole verdict rule, before the run.

    python -m parameternet.experiments.pitfall_design                   # writes results/pitfall-round3/design.{md,csv}
    python -m parameternet.experiments.pitfall_design --measure-steps 600   # time 1-thread steps here first

For each candidate design (seeds of A and B; seeds of D, M and the size arm) and each scenario of true effects, the
simulation draws every run's top-1 from a model fitted to round 2's rows (``results/pitfall/results.csv``), computes
the gains as the report does and applies :func:`~parameternet.experiments.pitfall_round3.decide` itself, so the
probabilities are those of the rule the report applies. The noise model, per model and seed: target-only top-1
``T = mu + sd_T z``, pretrain -> fine-tune top-1 at budget ``E`` ``F_E = mu + g_E + sd_F,E (sqrt(rho) u +
sqrt(1 - rho) z_E)``, with ``u`` a seed effect shared by the budgets (correlation ``rho`` between a seed's fine-tunes
at two budgets), every top-1 rounded to 0.01 as the CSV holds it.

The cost of a candidate is its runs' steps (from the recipes) times the 1-thread seconds per step of each model,
measured with :func:`measure_step_seconds` (two runs side by side, as the grid runs them), plus a fixed overhead per
run; the wall time assumes ``jobs`` runs side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parameternet.experiments.pitfall_cells import PRETRAIN_EPOCHS, UNION_PER_CLASS, Cell
from parameternet.experiments.pitfall_design_report import design_markdown, pct, write_design_csv
from parameternet.experiments.pitfall_round3 import CRITERIA, FIRST_SEED, ROLES, Round3, decide
from parameternet.experiments.pitfall_tables import read_rows

__all__ = [
    "Scenario",
    "grid_runs",
    "measure_step_seconds",
    "measured_effects",
    "run_cost",
    "scenarios",
    "simulate",
]

BATCH = 128  # the recipes' batch size
TARGET_STEPS = 30 * (1000 * 10 // BATCH)  # pitfall-target.yaml: 30 epochs of 10,000 images
FINETUNE_STEPS = 15 * (1000 * 10 // BATCH)  # pitfall-finetune.yaml: 15 epochs of the same images

# 1-thread seconds per step (pretraining recipe, two runs side by side on this 2-core machine, otherwise quiet),
# measured by `python -m parameternet.experiments.pitfall_design --measure-steps 600`; see design.md.
STEP_SECONDS = {
    "ghostnet-w0.1875-h48": 0.0309,
    "parameternet-w0.1875-h48-e4": 0.0301,
    "ghostnet-w0.234375-h64": 0.0312,
    "ghostnet-w0.3125-h80": 0.0364,
}
RUN_OVERHEAD_S = 10.0  # per run: start, data, the final evaluation on 10,000 images, routing diagnostics


# ----- effects measured in round 2 -----


def measured_effects(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Round 2's estimates (``results/pitfall/results.csv``) that the scenarios start from.

    Per model (A, B, D; M is interpolated): mean gains at the measured budgets, the sd over seeds of the target-only
    and of the pretrain -> fine-tune top-1 at each measured budget, and the correlation of a seed's fine-tunes at
    3 and 9 epochs; the static gain against log2 MACs at 3 epochs (A, w0.25, D) and M's gain on that line.
    """
    from scipy import stats

    def top1(model: str, regime: str) -> dict[int, float]:
        return {r["seed"]: r["top1"] for r in rows if r["model"] == model and r["regime"] == regime}

    def sd(values: dict[int, float]) -> float:
        return statistics.stdev(values.values())

    out: dict[str, Any] = {}
    design = Round3(seeds=(FIRST_SEED,), static_seeds=1, size_seeds=0)
    cells = design.cells()
    for role in ("A", "B", "D"):
        base = cells[role].name
        t = top1(base, "target-only")
        f3, f9 = top1(base, "pretrain-finetune"), top1(f"{base}-pe9", "pretrain-finetune")
        both = sorted(set(f3) & set(f9))
        entry = {
            "seeds_target": len(t),
            "sd_target": sd(t),
            "gain": {3: statistics.mean(f3[s] - t[s] for s in f3)},
            "sd_fine": {3: sd(f3)},
            "seeds": {3: len(f3)},
        }
        if f9:
            entry["gain"][9] = statistics.mean(f9[s] - t[s] for s in f9)
            entry["sd_fine"][9] = sd(f9)
            entry["seeds"][9] = len(f9)
            entry["rho_3_9"] = float(stats.pearsonr([f3[s] for s in both], [f9[s] for s in both])[0])
            entry["rho_seeds"] = len(both)
        out[role] = entry
    x, y = [], []
    for r in rows:
        cell = Cell.parse(r["model"])
        if cell.family == "ghostnet" and cell.base == cell and r["regime"] == "pretrain-finetune":
            target = top1(r["model"], "target-only")
            if r["seed"] in target:
                x.append(math.log2(r["macs"]))
                y.append(r["top1"] - target[r["seed"]])
    fit = stats.linregress(x, y)
    macs = {r["model"]: r["macs"] for r in rows}
    m_macs = _m_macs(cells["M"])
    out["width_trend"] = {"slope_per_doubling": fit.slope, "se": fit.stderr, "p": fit.pvalue, "runs": len(x)}
    out["M"] = {"gain": {3: out["A"]["gain"][3] + float(fit.slope) * math.log2(m_macs / macs[cells["A"].name])}}
    out["macs"] = {role: macs.get(c.name) or m_macs for role, c in cells.items()}
    return out


def _m_macs(cell: Cell) -> int:
    from parameternet.experiments.pitfall_cells import profile_cell

    return profile_cell(cell, 28)[1]


# ----- scenarios -----


@dataclass(frozen=True)
class Scenario:
    """True effects for the simulation: per role the mean gain at each budget, the sd of its target-only top-1,
    the sd of its fine-tuned top-1 at each budget, and the seed correlation ``rho``; ``expect`` is the verdict
    the rule should reach under these effects."""

    name: str
    note: str
    gain: dict[str, tuple[float, ...]]
    sd_target: dict[str, float]
    sd_fine: dict[str, tuple[float, ...]]
    rho: float
    expect: str

    def remedy(self) -> float:
        """The true remedy: B's least-squares slope of mean gain on log3 budget minus A's (budgets 3, 9, 27)."""
        return ((self.gain["B"][-1] - self.gain["B"][0]) - (self.gain["A"][-1] - self.gain["A"][0])) / 2


def scenarios(effects: dict[str, Any], rho: float = 0.5) -> list[Scenario]:
    """The scenarios the seed count is chosen on, from round 2's estimates (budgets 3, 9, 27 epochs).

    - ``measured``: A's and B's measured gains at 3 and 9 epochs; at 27, where nothing is measured, each gains half
      of its 3 -> 9 increment again (diminishing returns); D rises from its 3-epoch gain at half A's rate (the
      pitfall's gap shrinks: the conservative side for it); M (3-epoch gain on round 2's line of static gain against
      log MACs) runs parallel to A (the control's null); the seed correlation ``rho`` (0.5, below the 0.70 and 0.92
      round 2 measured on 4 seeds); the 27-epoch sds those at 9 epochs, D's and M's their 3-epoch ones (M: A's).
      Its true remedy is about 0: the rule should refute.
    - ``measured, rho 0``: the same without a seed effect (the worst case for the paired slopes).
    - ``paper``: A's and M's gains stop growing after 9 epochs, B's keeps its 3 -> 9 rate, D keeps A's 3 -> 9 rate:
      a remedy of about +0.3 per tripling; the rule should reproduce.
    - ``measured, remedy +0.25``: ``measured`` with B's 27-epoch gain raised until the remedy is the rule's floor,
      with the pitfall's gap as small as in ``measured``; the rule should reproduce.
    """
    a, b, d = effects["A"], effects["B"], effects["D"]
    ga, gb = a["gain"], b["gain"]
    inc_a, inc_b = ga[9] - ga[3], gb[9] - gb[3]
    sd_target = {"A": a["sd_target"], "B": b["sd_target"], "D": d["sd_target"], "M": a["sd_target"]}
    sd_fine = {
        "A": (a["sd_fine"][3], a["sd_fine"][9], a["sd_fine"][9]),
        "B": (b["sd_fine"][3], b["sd_fine"][9], b["sd_fine"][9]),
        "D": (d["sd_fine"][3],) * 3,
        "M": (a["sd_fine"][3],) * 3,
    }
    d3, m3 = d["gain"][3], effects["M"]["gain"][3]
    a_shape = (0.0, inc_a, inc_a * 3 / 2)
    measured = {
        "A": (ga[3], ga[9], ga[9] + inc_a / 2),
        "B": (gb[3], gb[9], gb[9] + inc_b / 2),
        "D": (d3, d3 + inc_a / 2, d3 + inc_a * 3 / 4),
        "M": tuple(m3 + x for x in a_shape),
    }
    paper = {
        "A": (ga[3], ga[9], ga[9]),
        "B": (gb[3], gb[9], gb[9] + inc_b),
        "D": (d3, d3 + inc_a, d3 + 2 * inc_a),
        "M": (m3, m3 + inc_a, m3 + inc_a),
    }
    note = (
        "round 2's gains at 3 and 9 epochs; at 27 half the 3 -> 9 increment again; D at half A's rate, M parallel to A"
    )
    base = Scenario("measured", note, measured, sd_target, sd_fine, rho, "refuted")
    floor = CRITERIA["remedy_min_slope"]
    return [
        base,
        dataclasses.replace(base, name="measured, rho 0", note=note + "; no seed effect", rho=0.0),
        Scenario(
            "paper",
            "A and M flat after 9 epochs, B and D keep their 3 -> 9 rates",
            paper,
            sd_target,
            sd_fine,
            rho,
            "reproduced",
        ),  # fmt: skip
        dataclasses.replace(
            with_remedy(base, floor),
            name=f"measured, remedy +{floor:g}",
            expect="reproduced",
            note=f"measured, with B's 27-epoch gain raised to a remedy of +{floor:g} per tripling (the rule's floor)",
        ),  # fmt: skip
    ]


def with_remedy(scenario: Scenario, remedy: float) -> Scenario:
    """``scenario`` with B's 27-epoch gain moved so that the true remedy is ``remedy`` points per tripling."""
    gb = scenario.gain["B"]
    ga = scenario.gain["A"]
    g27 = gb[0] + 2 * remedy + (ga[-1] - ga[0])
    gain = {**scenario.gain, "B": (*gb[:-1], g27)}
    return dataclasses.replace(scenario, name=f"remedy {remedy:+.2f}", gain=gain)


# ----- the simulation -----


def simulate(scenario: Scenario, design: Round3, sims: int, seed: int) -> dict[str, float]:
    """The share of ``sims`` simulated round-3 grids of ``design`` for which :func:`decide` says each verdict."""
    import numpy as np

    rng = np.random.default_rng(seed)
    budgets = design.budgets
    counts = {"reproduced": 0, "refuted": 0, "not resolved": 0}
    for _ in range(sims):
        gains: dict[str, dict[int, dict[int, float]]] = {}
        for role in ROLES:
            seeds = design.role_seeds(role)
            n = len(seeds)
            z = rng.standard_normal((n, len(budgets) + 2))
            target = np.round(86.0 + scenario.sd_target[role] * z[:, 0], 2)
            shared, own = math.sqrt(scenario.rho), math.sqrt(1 - scenario.rho)
            gains[role] = {}
            for j, epochs in enumerate(budgets):
                fine = (
                    86.0 + scenario.gain[role][j] + scenario.sd_fine[role][j] * (shared * z[:, 1] + own * z[:, j + 2])
                )
                gains[role][epochs] = dict(zip(seeds, np.round(np.round(fine, 2) - target, 2).tolist()))
        counts[decide(gains)["verdict"]] += 1
    return {k: v / sims for k, v in counts.items()}


# ----- cost -----


def grid_runs(design: Round3) -> list[tuple[Cell, int, str, int]]:
    """Every training run of ``design``'s grid: (cell, seed, stage, steps), as the runner plans them."""
    runs = []
    for name, seeds in design.grid():
        cell = Cell.parse(name)
        for seed in seeds:
            if cell.base == cell:
                runs.append((cell, seed, "target", TARGET_STEPS))
            runs += [(cell, seed, "pretrain", cell.pretrain_step_count), (cell, seed, "finetune", FINETUNE_STEPS)]
    return runs


def run_cost(design: Round3, step_s: dict[str, float], overhead_s: float = RUN_OVERHEAD_S) -> dict[str, float]:
    """``{"runs", "rows", "core_h", "longest_h"}`` of ``design``: the runs' 1-thread hours (a router or size cell
    costs what its model's steps cost)."""
    runs = grid_runs(design)

    def seconds(cell: Cell, steps: int) -> float:
        return steps * step_s[_model_of(cell)] + overhead_s

    each = [seconds(c, steps) for c, _, _, steps in runs]
    return {
        "runs": len(runs),
        "rows": sum(stage != "pretrain" for _, _, stage, _ in runs),
        "core_h": sum(each) / 3600,
        "longest_h": max(each) / 3600,
    }


def _model_of(cell: Cell) -> str:
    """The model whose step time a cell's runs take: its base, with the routers' optimiser options reset."""
    return dataclasses.replace(cell.base, router_lr_scale=1.0, router_weight_decay=None).name


def measure_step_seconds(steps: int = 600, jobs: int = 2) -> dict[str, float]:
    """1-thread seconds per step of round 3's four models on the pretraining recipe: ``steps`` steps each, ``jobs``
    runs side by side in worker processes of one thread (as the grid runs them); each run's wall time (with its
    data loading and final evaluation) over its steps. The runs go to a temporary directory."""
    import tempfile
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from parameternet.experiments.pitfall import _build_cfg
    from parameternet.experiments.pitfall_presets import PRESETS
    from parameternet.experiments.workers import init_worker

    design = Round3(seeds=(FIRST_SEED,), static_seeds=1, size_seeds=0)
    with (
        tempfile.TemporaryDirectory(prefix="pitfall-step-time-") as out,
        ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=init_worker) as pool,
    ):
        futures = {}
        for cell in design.cells().values():
            extra = [f"max_steps={steps}", "ckpt_every_epochs=0", f"output_dir={Path(out) / cell.name}"]
            cfg = _build_cfg("pretrain", cell, FIRST_SEED, PRESETS["round3"], extra)
            futures[cell.name] = pool.submit(_time_one, cfg)
        return {name: round(f.result() / steps, 4) for name, f in futures.items()}


def _time_one(cfg: dict[str, Any]) -> float:
    from parameternet.train.config import config_from_dict
    from parameternet.train.trainer import train

    return float(train(config_from_dict(cfg).validate())["wall_s"])


# ----- choosing, and the record -----


def candidates(seed_counts: Sequence[int], static_counts: Sequence[int]) -> list[Round3]:
    """Designs with ``n`` seeds of A and B and ``k`` of D, M and the size arm (4 of the router arm)."""
    return [
        Round3(seeds=tuple(range(FIRST_SEED, FIRST_SEED + n)), static_seeds=k, size_seeds=k)
        for n in seed_counts
        for k in static_counts
        if k <= n
    ]


def choose(results: list[dict[str, Any]], max_wall_h: float) -> dict[str, Any] | None:
    """The affordable candidate (``wall_h <= max_wall_h``) with the highest ``score`` (the smallest, over the
    scenarios, probability of the verdict that scenario implies); among those within 0.02 of it, the cheapest."""
    affordable = [r for r in results if r["wall_h"] <= max_wall_h]
    if not affordable:
        return None
    best = max(r["score"] for r in affordable)
    return min((r for r in affordable if r["score"] >= best - 0.02), key=lambda r: r["core_h"])


def round2_step_seconds(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per step of A, B and D in round 2's rows (runs made while the machine was loaded), medians over the
    rows' target-only, fine-tune and pretraining runs; M, not in round 2, takes A's."""
    design = Round3(seeds=(FIRST_SEED,), static_seeds=1, size_seeds=0)
    out = {}
    for role, cell in design.cells().items():
        name = design.cells()["A" if role == "M" else role].name
        rates = [r["wall_s"] / r["steps"] for r in rows if r["model"] == name and r["steps"]]
        per_epoch = 20 * UNION_PER_CLASS // BATCH
        rates += [r["pretrain_wall_s"] / (PRETRAIN_EPOCHS * per_epoch) for r in rows if r["model"] == name and
                  r["pretrain_wall_s"]]  # fmt: skip
        out[cell.name] = round(statistics.median(rates), 4)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parameternet.experiments.pitfall_design",
        description="Simulate round 3's verdict rule at round 2's measured effects for candidate seed counts, choose "
        "the design within the compute budget, and write OUTPUT/design.md and OUTPUT/design.csv.",
    )
    parser.add_argument("--results", default="results/pitfall/results.csv", help="round 2's rows")
    parser.add_argument("--output", default="results/pitfall-round3", help="where design.md and design.csv go")
    parser.add_argument("--sims", type=int, default=1000, help="simulated grids per candidate and scenario")
    parser.add_argument("--seed", type=int, default=0, help="the simulation's random seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[8, 12, 16, 20, 24], help="candidate seeds of A and B")
    parser.add_argument("--static-seeds", type=int, nargs="+", default=[4, 6, 8], help="candidate seeds of D, M, size")
    parser.add_argument("--max-wall-h", type=float, default=12.0, help="the budget: hours of wall time")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--measure-steps", type=int, help="first time this many 1-thread steps of each model here")
    args = parser.parse_args(argv)
    rows = read_rows(args.results)
    if not rows:
        print(f"error: {args.results!r} holds no rows; pass round 2's results.csv with --results", file=sys.stderr)
        return 2
    if args.sims < 1 or args.jobs < 1:
        print("error: --sims and --jobs must be 1 or more", file=sys.stderr)
        return 2
    if args.measure_steps:
        step_s, timing = (
            measure_step_seconds(args.measure_steps, args.jobs),
            f"measured now, {args.measure_steps} steps",
        )
    else:
        step_s, timing = STEP_SECONDS, "STEP_SECONDS, measured earlier"
    loaded = round2_step_seconds(rows)
    effects = measured_effects(rows)
    scens = scenarios(effects)
    results = []
    for i, design in enumerate(candidates(args.seeds, args.static_seeds)):
        cost = run_cost(design, step_s)
        slow = run_cost(design, loaded)
        entry: dict[str, Any] = {
            "seeds_ab": len(design.seeds), "seeds_static": design.static_seeds, **cost,
            "wall_h": cost["core_h"] / args.jobs + cost["longest_h"],
            "wall_h_round2_rates": slow["core_h"] / args.jobs + slow["longest_h"], "design": design, "p": {},
        }  # fmt: skip
        for j, sc in enumerate(scens):
            entry["p"][sc.name] = simulate(sc, design, args.sims, seed=args.seed * 1_000_003 + 1000 * i + j)
        entry["score"] = min(entry["p"][sc.name][sc.expect] for sc in scens)
        results.append(entry)
        print(
            f"A,B {entry['seeds_ab']:2d} seeds, D,M,size {entry['seeds_static']}: {entry['runs']} runs, "
            f"{entry['core_h']:.1f} core-h, {entry['wall_h']:.1f} h wall; "
            + "; ".join(f"{n}: {', '.join(f'{k} {pct(v)}' for k, v in p.items())}" for n, p in entry["p"].items()),
            file=sys.stderr,
        )
    chosen = choose(results, args.max_wall_h)
    oc = []
    if chosen is not None:
        for k, remedy in enumerate((-0.1, 0.0, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)):
            sc = with_remedy(scens[0], remedy)
            oc.append((remedy, simulate(sc, chosen["design"], args.sims, seed=args.seed * 1_000_003 + 900_000 + k)))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_design_csv(out / "design.csv", results, chosen)
    text = design_markdown(args, effects, scens, step_s, timing, loaded, results, chosen, oc, RUN_OVERHEAD_S)
    (out / "design.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
