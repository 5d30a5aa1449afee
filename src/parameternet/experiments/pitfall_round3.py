"""The low-FLOPs pitfall, round 3: a pretraining-budget design with fresh seeds (ParameterNet, arXiv 2306.14525,
sec. 1 and 4.1, Figure 1).

The paper's claim, in the form this design can test: a low-FLOPs static model's gain from pretraining stays small as
pretraining grows, while its ParameterNet's keeps growing. Four models (:class:`Round3`):

- A: the static baseline ``ghostnet-w0.1875-h48`` (the width round 2's gate chose on its own seeds);
- B: its ParameterNet with 4 experts, at 1.08x A's MACs;
- D: the static model with about B's parameters (round 2's D), at 1.74x A's MACs;
- M: the static model at B's MACs (a width on a 1/64 grid), so that B's extra MACs cannot explain a remedy.

Each is pretrained on the 20-class union for 3, 9 and 27 epochs (cells ``-pe9``, ``-pe27``) and fine-tuned on the
target; its target-only runs are shared by the budgets, seed by seed. Two arms are described, not judged: the
pretraining set's size at a fixed number of pretraining steps (``-pre0.25-ps2811``: a quarter of the union for as
many steps as 3 epochs of all of it), and B's routers with their own learning rate and weight decay (``-rlr10``,
``-rwd0``) with routing diagnostics.

The verdict (:func:`decide`, :data:`CRITERIA`) is stated before the runs and reads only these rows:

- *slope*: per seed and model, the least-squares slope of the gain on log3 of the pretraining epochs (top-1 points
  per tripling; the seed's target-only run cancels out); the *remedy* is B's mean slope minus A's, with a Welch
  90% interval;
- *pitfall* (the paper's relative sense): D's gain minus A's at the largest budget has a 90% interval above 0;
- *control*: M's mean slope minus A's is not significant (one-sided Welch p >= 0.05);
- **reproduced**: the pitfall, the control, and the remedy's 90% interval above 0;
- **refuted**: not reproduced, and the remedy's 90% interval ends below ``remedy_min_slope``;
- **not resolved**: anything else.

Round 3's seeds start at :data:`FIRST_SEED`; every earlier row (round 2's grid and its gate) used seeds 0-7, so
no seed that chose the width or made an earlier reading is reused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.experiments.pitfall_cells import PRETRAIN_EPOCHS, Cell, dynamic_cell, static_cell

__all__ = ["CRITERIA", "FIRST_SEED", "ROLES", "ROUND3", "Round3", "decide", "role_gains", "seed_slopes", "verdict"]

FIRST_SEED = 100  # rounds 1 and 2 (the grid, its gate, quick and head256) used seeds 0-7
ROLES = ("A", "B", "D", "M")

# The verdict, stated before the runs (docs/experiments/pitfall-round3.md); gains and slopes in top-1 points.
CRITERIA = {
    "alpha": 0.05,  # one-sided level; the intervals are two-sided 90% Welch intervals
    "remedy_min_slope": 0.25,  # refuted: the remedy's 90% interval ends below this (points per tripling)
}

Grid = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Round3:
    """The round-3 grid: the budget arm (A, B, D, M at each of ``budgets`` pretraining epochs), the size arm and
    the router arm, on seeds that start at :data:`FIRST_SEED`.

    A and B run on every one of ``seeds``; D and M on the first ``static_seeds``; the size arm (A and B pretrained
    on each of ``size_fractions`` of the union for ``size_steps`` steps, the steps of :data:`PRETRAIN_EPOCHS` epochs
    of all of it) on the first ``size_seeds``; B with each of ``router_options`` on the first ``router_seeds``.
    """

    seeds: tuple[int, ...]
    static_seeds: int
    size_seeds: int
    router_seeds: int = 4
    width: float = 0.1875
    experts: int = 4
    d_model: str = "ghostnet-w0.3125-h80"  # pitfall_cells.twin_width(B): round 2's D
    m_model: str = "ghostnet-w0.234375-h64"  # pitfall_cells.macs_twin_width(B)
    budgets: tuple[int, ...] = (3, 9, 27)
    size_fractions: tuple[float, ...] = (0.25, 0.5)
    size_steps: int = 2811  # 3 epochs of the union: 3 x 937 steps of 128 images
    router_options: tuple[str, ...] = ("rlr10", "rwd0")

    def __post_init__(self) -> None:
        if not self.seeds or min(self.seeds) < FIRST_SEED or len(set(self.seeds)) != len(self.seeds):
            raise ParameterNetError(
                f"round 3's seeds {self.seeds} must be distinct and >= {FIRST_SEED} (earlier rounds used 0-7)"
            )
        if PRETRAIN_EPOCHS not in self.budgets or len(self.budgets) < 2:
            raise ParameterNetError(
                f"budgets {self.budgets} must hold the recipe's {PRETRAIN_EPOCHS} epochs and at least one more"
            )
        for n, what in ((self.static_seeds, "static_seeds"), (self.size_seeds, "size_seeds")):
            if not 0 <= n <= len(self.seeds):
                raise ParameterNetError(f"{what}={n} must be between 0 and the {len(self.seeds)} seeds")

    def cells(self) -> dict[str, Cell]:
        """The budget arm's models by role (at the recipe's pretraining)."""
        return {
            "A": static_cell(self.width),
            "B": dynamic_cell(self.width, self.experts),
            "D": Cell.parse(self.d_model),
            "M": Cell.parse(self.m_model),
        }

    def role_seeds(self, role: str) -> tuple[int, ...]:
        return self.seeds if role in ("A", "B") else self.seeds[: self.static_seeds]

    @staticmethod
    def budget_cell(cell: Cell, epochs: int) -> Cell:
        """``cell`` pretrained for ``epochs`` on the union (the cell itself at the recipe's epochs)."""
        return cell if epochs == PRETRAIN_EPOCHS else dataclasses.replace(cell, pretrain_epochs=epochs)

    def size_cell(self, cell: Cell, fraction: float) -> Cell:
        """``cell`` pretrained on ``fraction`` of the union for :attr:`size_steps` steps (the cell itself for 1)."""
        if fraction == 1.0:
            return cell
        return dataclasses.replace(cell, pretrain_fraction=fraction, pretrain_steps=self.size_steps)

    def router_cells(self) -> list[Cell]:
        b = self.cells()["B"]
        return [Cell.parse(f"{b.name}-{option}") for option in self.router_options]

    def grid(self, width: float | None = None) -> Grid:
        """The runs, seed by seed (so that a grid stopped early holds whole seeds): A and B at every budget, then
        D and M, the size arm and the router arm where the seed is among theirs."""
        if width is not None and width != self.width:
            raise ParameterNetError(f"round 3 is designed at width {self.width:g}, not {width:g}")
        cells = self.cells()
        grid: list[tuple[str, tuple[int, ...]]] = []
        for i, seed in enumerate(self.seeds):
            roles = ("A", "B", "D", "M") if i < self.static_seeds else ("A", "B")
            grid += [(self.budget_cell(cells[r], e).name, (seed,)) for r in roles for e in self.budgets]
            if i < self.size_seeds:
                grid += [(self.size_cell(cells[r], f).name, (seed,)) for f in self.size_fractions for r in "AB"]
            if i < self.router_seeds:
                grid += [(c.name, (seed,)) for c in self.router_cells()]
        return tuple(grid)

    def expected_rows(self) -> dict[str, set[tuple[str, str, int]]]:
        """The result rows ``(model, regime, seed)`` the grid makes, by arm: ``budget`` (the roles' target-only
        runs and their fine-tunes at every budget), ``size`` and ``router``."""
        cells = self.cells()
        out: dict[str, set[tuple[str, str, int]]] = {"budget": set(), "size": set(), "router": set()}
        for role in ROLES:
            for seed in self.role_seeds(role):
                out["budget"].add((cells[role].name, "target-only", seed))
                out["budget"] |= {
                    (self.budget_cell(cells[role], e).name, "pretrain-finetune", seed) for e in self.budgets
                }
        for seed in self.seeds[: self.size_seeds]:
            out["size"] |= {
                (self.size_cell(cells[r], f).name, "pretrain-finetune", seed) for r in "AB" for f in self.size_fractions
            }
        for seed in self.seeds[: self.router_seeds]:
            for cell in self.router_cells():
                out["router"] |= {(cell.name, "target-only", seed), (cell.name, "pretrain-finetune", seed)}
        return out

    def gate_record(self) -> dict[str, Any]:
        """What ``gate.json`` says for round 3: no gate ran; the width and the seeds that chose it."""
        return {
            "gate": "none: round 3 fixes the width",
            "settled_width": self.width,
            "rule": "width chosen by round 2's gate (gain > +0.5 on every seed: go smaller) on round 2's seeds",
            "seeds": [0, 1, 2],
            "source": "results/pitfall/gate.json",
            "round3_seeds": list(self.seeds),
        }


# The design the simulation chose (pitfall_design, results/pitfall-round3/design.md).
ROUND3 = Round3(seeds=tuple(range(FIRST_SEED, FIRST_SEED + 20)), static_seeds=6, size_seeds=6)


# ----- the verdict -----


def seed_slopes(by_budget: Mapping[float, Mapping[int, float]], log_base: float = 3.0) -> dict[int, float]:
    """Per seed with a gain at every budget of ``by_budget`` (``{epochs: {seed: gain}}``): the least-squares slope
    of its gains on ``log_base(epochs)``, in points per tripling of the pretraining epochs (``log_base`` 3); any
    positive budget works, e.g. pretraining images with ``log_base`` 2 (points per doubling)."""
    budgets = sorted(by_budget)
    if len(budgets) < 2:
        return {}
    x = [math.log(b) / math.log(log_base) for b in budgets]
    mean = sum(x) / len(x)
    sxx = sum((v - mean) ** 2 for v in x)
    seeds = set.intersection(*(set(by_budget[b]) for b in budgets))
    return {s: sum((xi - mean) * by_budget[b][s] for xi, b in zip(x, budgets)) / sxx for s in sorted(seeds)}


def decide(
    gains: Mapping[str, Mapping[int, Mapping[int, float]]], criteria: Mapping[str, float] = CRITERIA
) -> dict[str, Any]:
    """The pre-stated verdict from the gains ``{role: {epochs: {seed: gain}}}`` of roles A, B, D and M.

    Returns ``{"verdict", "reason", "slopes", "remedy", "pitfall", "pitfall_test", "control", "control_clear",
    "gap", "small_remedy"}``: the Welch comparisons (:class:`~parameternet.experiments.stats.Welch` or None when a
    side has fewer than two seeds) of the slopes (remedy: B - A; control: M - A) and of the gains at the largest
    budget (pitfall_test: D - A; gap: B - A, reported, not judged).
    """
    from parameternet.experiments.stats import welch

    alpha, floor = criteria["alpha"], criteria["remedy_min_slope"]
    slopes = {role: seed_slopes(gains.get(role, {})) for role in ROLES}
    budgets = sorted({b for role in ROLES for b in gains.get(role, {})})
    top = budgets[-1] if budgets else None

    def at_top(role: str) -> list[float]:
        return list(gains.get(role, {}).get(top, {}).values())

    remedy = welch(list(slopes["B"].values()), list(slopes["A"].values()))
    control = welch(list(slopes["M"].values()), list(slopes["A"].values()))
    pitfall_test = welch(at_top("D"), at_top("A"))
    out: dict[str, Any] = {
        "budgets": budgets,
        "slopes": slopes,
        "remedy": remedy,
        "control": control,
        "control_clear": control is not None and control.p_greater >= alpha,
        "pitfall_test": pitfall_test,
        "pitfall": pitfall_test is not None and pitfall_test.ci90[0] > 0,
        "gap": welch(at_top("B"), at_top("A")),
        "small_remedy": False,
    }
    if remedy is None:
        out.update(verdict="not resolved", reason="A or B has fewer than two seeds with a gain at every budget")
        return out
    positive, below_floor = remedy.ci90[0] > 0, remedy.ci90[1] < floor
    if positive and out["pitfall"] and out["control_clear"]:
        out.update(verdict="reproduced", reason="the pitfall shows, the control does not, and the remedy is > 0")
        out["small_remedy"] = below_floor
    elif below_floor:
        out.update(verdict="refuted", reason=f"the remedy's 90% interval ends below +{floor:g} per tripling")
    else:
        missing = [
            what
            for what, ok in (
                ("the remedy's 90% interval is not above 0", positive),
                ("the pitfall does not show (D - A's 90% interval not above 0)", out["pitfall"]),
                ("the control is significant or missing (M's slope over A's)", out["control_clear"]),
            )
            if not ok
        ]
        out.update(verdict="not resolved", reason="; ".join(missing) or "the remedy is neither shown nor excluded")
    return out


def role_gains(rows: list[dict[str, Any]], design: Round3) -> dict[str, dict[int, dict[int, float]]]:
    """``{role: {epochs: {seed: gain}}}`` of the budget arm from result rows, on the design's seeds only."""
    from parameternet.experiments.pitfall_tables import gains

    cells = design.cells()
    out: dict[str, dict[int, dict[int, float]]] = {}
    for role, cell in cells.items():
        keep = set(design.role_seeds(role))
        out[role] = {}
        for epochs in design.budgets:
            by_seed = gains(rows, design.budget_cell(cell, epochs).name)
            out[role][epochs] = {s: g for s, g in by_seed.items() if s in keep}
    return out


def verdict(rows: list[dict[str, Any]], design: Round3 = ROUND3) -> dict[str, Any]:
    """The pre-stated verdict (:func:`decide`) over result rows of the round-3 grid, with ``complete``: whether
    every row of the budget arm is there (until then the verdict is that of the rows so far, not the round's)."""
    have = {(r["model"], r["regime"], r["seed"]) for r in rows}
    return {**decide(role_gains(rows, design)), "complete": design.expected_rows()["budget"] <= have}
