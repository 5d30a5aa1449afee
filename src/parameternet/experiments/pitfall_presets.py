"""The presets of ``parameternet pitfall``: which cells run at which seeds, with which recipe overrides.

``full`` (round 2) first runs a gate for the smallest in-pitfall baseline, then :func:`design`'s grid around it;
``round3`` runs :data:`~parameternet.experiments.pitfall_round3.ROUND3` (no gate: the width is round 2's, chosen on
round 2's seeds, none of which round 3 reuses); ``quick``, ``head256``, and the wiring checks ``smoke`` and
``round3-smoke`` (the same code paths at 16 px, two steps a run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parameternet.experiments.pitfall_cells import dynamic_cell, static_cell, twin_width
from parameternet.experiments.pitfall_round3 import FIRST_SEED, ROUND3, Round3

__all__ = ["GATE_MAX_GAIN", "PRESETS", "Grid", "Preset", "default_output", "design", "gate_decision"]

GATE_MAX_GAIN = 0.5  # a baseline whose gain exceeds this on every gate seed is not in the pitfall

Grid = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Preset:
    """A grid (cell name, seeds) in run order, made by ``grid(width)`` for the smallest baseline's width.

    ``gate`` lists candidate widths for that baseline, largest first; with ``gate_seeds`` each candidate is run
    in both regimes and kept unless its gain exceeds :data:`GATE_MAX_GAIN` on every seed. Without a gate the
    width is ``width`` and ``gate_record`` (if any) is written to ``gate.json`` as it is. ``overrides`` apply to
    every stage, then ``pretrain_overrides`` or ``target_overrides`` (target-only and fine-tune). A preset with
    ``round3`` runs that design and reports it by its own rule; its seeds are fixed (no ``--seeds``).
    """

    name: str
    grid: Callable[[float], Grid]
    width: float = 0.25
    gate: tuple[float, ...] = ()
    gate_seeds: tuple[int, ...] = (0, 1, 2)
    overrides: tuple[str, ...] = ()
    pretrain_overrides: tuple[str, ...] = ()
    target_overrides: tuple[str, ...] = ()
    description: str = ""
    # a grid that checks the command runs, not the science: its report says so first
    wiring_check: bool = False
    round3: Round3 | None = None
    gate_record: dict[str, Any] | None = None


def design(width: float) -> Grid:
    """Round 2's grid around the smallest in-pitfall baseline A (``ghostnet-w<width>``), in run order.

    A and its ParameterNet B (4 experts) at 8 seeds; RepConv x4 at A's size (C, the paper's Table 6 control); a
    static model D with about B's parameters (:func:`twin_width`; at width 0.1875 it runs at 1.74x A's MACs); the
    pretraining-size sweep for A and B (a quarter and half of the union, and 3x the epochs); the paper text's router
    (``mlp-softmax``) as a variant of B; 1, 2 and 8 experts. 4 seeds for all but A and B. The essential cells come
    first, seed by seed.
    """
    a, b = static_cell(width), dynamic_cell(width)
    c = dynamic_cell(width, method="repconv")
    d = static_cell(twin_width(b))
    grid: list[tuple[str, tuple[int, ...]]] = []
    grid += [(cell.name, (s,)) for s in range(4) for cell in (a, b)]
    grid += [(cell.name, (s,)) for s in range(4) for cell in (c, d)]
    grid += [(cell.name, (s,)) for s in range(4, 8) for cell in (a, b)]
    for variant in ({"pretrain_fraction": 0.25}, {"pretrain_fraction": 0.5}, {"pretrain_epochs": 9}):
        grid += [(dataclasses.replace(cell, **variant).name, (0, 1, 2, 3)) for cell in (a, b)]
    grid.append((dynamic_cell(width, router="mlp-softmax").name, (0, 1, 2, 3)))
    grid += [(dynamic_cell(width, e).name, (0, 1, 2, 3)) for e in (1, 2, 8)]
    return tuple(grid)


def _quick(width: float) -> Grid:
    return ((static_cell(width).name, (0,)), (dynamic_cell(width).name, (0,)))


def _smoke(width: float) -> Grid:
    return (
        (static_cell(width).name, (0,)),
        (dynamic_cell(width, 2).name, (0,)),
        (dataclasses.replace(static_cell(width), pretrain_fraction=0.5).name, (0,)),
    )


def _head256(width: float) -> Grid:
    """The first version's grid (head 256 at every width), rerun at the current code for comparison."""
    cells = [static_cell(w, 256) for w in (0.25, 0.5, 1.0)] + [dynamic_cell(0.25, 4, 256)]
    return tuple((c.name, (s,)) for s in (0, 1, 2) for c in cells)


_TINY = ("img_size=16", "batch_size=8", "eval_batch_size=50", "max_steps=2", "ckpt_every_epochs=0")
_TINY_PRETRAIN = ("data.train=union:train:per_class=2", "data.val=union:test:per_class=1")
_TINY_TARGET = ("data.train=fashion-mnist:train:per_class=4", "data.val=fashion-mnist:test:per_class=5")

# round 3 at wiring-check size: two seeds of A and B, one of D and M, at two budgets; one seed of one size cell
# and of the router options; every run takes two steps (max_steps=2, so the size arm holds 2 steps too)
ROUND3_SMOKE = Round3(
    seeds=(FIRST_SEED, FIRST_SEED + 1), static_seeds=1, size_seeds=1, router_seeds=1, budgets=(3, 9),
    size_fractions=(0.5,), size_steps=2,
)  # fmt: skip


def _round3(design: Round3, **kw: Any) -> Preset:
    return Preset(grid=design.grid, width=design.width, round3=design, gate_record=design.gate_record(), **kw)


PRESETS = {
    "full": Preset(
        "full",
        design,
        gate=(0.25, 0.1875, 0.125),
        description="gate for the smallest in-pitfall GhostNet-mini, then A/B at 8 seeds, RepConv, a static twin "
        "of B's size, the pretraining-size sweep, the softmax router and 1/2/8 experts at 4 seeds",
    ),
    "round3": _round3(
        ROUND3,
        name="round3",
        description=f"A, B, D and M at {', '.join(map(str, ROUND3.budgets))} pretraining epochs on "
        f"{len(ROUND3.seeds)} new seeds ({ROUND3.static_seeds} for D and M), the size arm at fixed steps and the "
        "router options, by the verdict rule stated before the run",
    ),
    "quick": Preset(
        "quick",
        _quick,
        width=0.1875,  # the width the full preset's gate settled on (results/pitfall/gate.json)
        description="A (GhostNet-mini 0.1875) vs B (its ParameterNet), one seed, the full recipes",
    ),
    "head256": Preset(
        "head256", _head256, description="the first version's family (a 256-channel head at every width), 3 seeds"
    ),
    # A wiring check for tests and CI: a gate and three cells, two steps each on a few tiny images.
    "smoke": Preset(
        "smoke",
        _smoke,
        gate=(0.25, 0.125),
        gate_seeds=(0,),
        overrides=_TINY,
        pretrain_overrides=_TINY_PRETRAIN,
        target_overrides=_TINY_TARGET,
        description="a gate and three cells, two steps each, 16 px: checks the command, not the science",
        wiring_check=True,
    ),
    "round3-smoke": _round3(
        ROUND3_SMOKE,
        name="round3-smoke",
        overrides=_TINY,
        pretrain_overrides=_TINY_PRETRAIN,
        target_overrides=_TINY_TARGET,
        description="round 3's arms at two seeds (one for D, M, the size and the router arms) and two budgets, "
        "two steps each, 16 px: checks the command, not the science",
        wiring_check=True,
    ),
}


def gate_decision(gains: dict[int, float]) -> bool:
    """True when a baseline is in the pitfall: its gain is not above :data:`GATE_MAX_GAIN` on every seed."""
    return not gains or not all(g > GATE_MAX_GAIN for g in gains.values())


def default_output(preset: str) -> Path:
    """``results/pitfall`` for the full preset and ``results/pitfall-round3`` for round3 (both committed),
    ``runs/pitfall-<preset>`` for the others."""
    return {"full": Path("results/pitfall"), "round3": Path("results/pitfall-round3")}.get(
        preset, Path(f"runs/pitfall-{preset}")
    )
