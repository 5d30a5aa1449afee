"""Round 3 of the low-FLOPs pitfall: the verdict rule on synthetic gains and rows, the design (new seeds, the
models' sizes, the grid), the report on synthetic rows, the seed-count simulation, and the round3-smoke preset end
to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import parameternet
from parameternet.cli import main
from parameternet.experiments import pitfall, pitfall_design
from parameternet.experiments.pitfall_cells import Cell, profile_cell, scaled_head
from parameternet.experiments.pitfall_presets import PRESETS
from parameternet.experiments.pitfall_round3 import (
    FIRST_SEED,
    ROUND3,
    Round3,
    decide,
    role_gains,
    seed_slopes,
    verdict,
)
from parameternet.experiments.pitfall_tables import read_rows

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (3, 9, 27)


def _wobble(seed: int, k: int) -> float:
    """A fixed pseudo-random offset in [-0.1, 0.1] per seed (``k`` picks an independent one)."""
    return 0.1 * math.sin(seed * 12.9898 + k * 78.233)


def _gains(slopes: dict[str, float], levels: dict[str, float], seeds: int = 8, spread: float = 1.0) -> dict:
    """``{role: {epochs: {seed: gain}}}``: each role's gain rises by ``slopes[role]`` per tripling from
    ``levels[role]`` at 3 epochs, each seed with its own offset and slope wobble (``spread`` scales both)."""
    out = {}
    for role, slope in slopes.items():
        out[role] = {
            e: {
                FIRST_SEED + s: round(
                    levels[role] + spread * _wobble(s, 0) + (slope + spread * _wobble(s, 1)) * math.log(e / 3, 3), 2
                )
                for s in range(seeds)
            }
            for e in BUDGETS
        }
    return out


LEVELS = {"A": 0.2, "B": 0.6, "M": 0.3, "D": 1.2}


@pytest.mark.parametrize(
    ("slopes", "levels", "spread", "expected"),
    [
        # B's gain grows faster than A's, D gains more than A, M like A: reproduced
        ({"A": 0.3, "B": 0.9, "M": 0.3, "D": 0.3}, LEVELS, 1.0, "reproduced"),
        # B grows as A does, tightly: the remedy is excluded
        ({"A": 0.3, "B": 0.3, "M": 0.3, "D": 0.3}, LEVELS, 1.0, "refuted"),
        # a real remedy, but the static model matched to B's MACs shows it too: the control forbids reproducing
        ({"A": 0.3, "B": 0.9, "M": 0.9, "D": 0.3}, LEVELS, 1.0, "not resolved"),
        # a real remedy, but no pitfall: the larger static model gains no more than A
        ({"A": 0.3, "B": 0.9, "M": 0.3, "D": 0.3}, {**LEVELS, "D": 0.2}, 1.0, "not resolved"),
        # too noisy to tell: the remedy's interval spans 0 and +0.25
        ({"A": 0.3, "B": 0.5, "M": 0.3, "D": 0.3}, LEVELS, 8.0, "not resolved"),
        # a small remedy (interval above 0, below +0.25) that M shows as well: not reproduced, and excluded
        ({"A": 0.3, "B": 0.42, "M": 0.42, "D": 0.3}, LEVELS, 0.1, "refuted"),
        # B's gain falls behind A's as pretraining grows
        ({"A": 0.6, "B": 0.0, "M": 0.6, "D": 0.6}, LEVELS, 1.0, "refuted"),
    ],
)
def test_verdict_rule_on_synthetic_gains(slopes, levels, spread, expected):
    v = decide(_gains(slopes, levels, spread=spread))
    assert v["verdict"] == expected, v["reason"]
    assert v["remedy"].diff == pytest.approx(slopes["B"] - slopes["A"], abs=0.01)


def test_a_small_remedy_is_reproduced_and_flagged_and_one_seed_never_decides():
    v = decide(_gains({"A": 0.3, "B": 0.42, "M": 0.3, "D": 0.3}, LEVELS, seeds=8, spread=0.1))
    assert v["verdict"] == "reproduced" and v["small_remedy"] and v["remedy"].ci90[1] < 0.25
    one = decide(_gains({"A": 0.3, "B": 2.0, "M": 0.3, "D": 0.3}, LEVELS, seeds=1))
    assert one["verdict"] == "not resolved" and "fewer than two seeds" in one["reason"]
    assert decide({})["verdict"] == "not resolved"


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # every seed alike, on purpose
def test_verdict_edges_no_spread_missing_roles_and_the_largest_budget():
    flat = {role: {e: {FIRST_SEED + s: 0.5 for s in range(3)} for e in BUDGETS} for role in "ABMD"}
    v = decide(flat)  # every seed alike: the remedy is exactly 0, its interval [0, 0], below the floor
    assert v["verdict"] == "refuted" and v["remedy"].ci90 == (0.0, 0.0) and not v["pitfall"]
    # without D and M the pitfall and the control are missing: a clear remedy is still not reproduced
    gains = _gains({"A": 0.3, "B": 0.9, "M": 0.3, "D": 0.3}, LEVELS)
    v = decide({r: gains[r] for r in "AB"})
    assert v["verdict"] == "not resolved" and v["pitfall_test"] is None and v["control"] is None
    assert "pitfall does not show" in v["reason"] and "control is significant or missing" in v["reason"]
    # the pitfall is judged at the largest budget any role has, and a seed lacking a budget has no slope
    gains["A"][27].pop(FIRST_SEED)
    v = decide(gains)
    assert v["budgets"] == [3, 9, 27] and FIRST_SEED not in v["slopes"]["A"] and len(v["slopes"]["B"]) == 8


def test_seed_slopes_are_least_squares_on_log3_and_skip_incomplete_seeds():
    by_budget = {3: {1: 0.0, 2: 1.0, 3: 5.0}, 9: {1: 0.5, 2: 1.0}, 27: {1: 1.0, 2: 1.6}}
    assert seed_slopes(by_budget) == pytest.approx({1: 0.5, 2: 0.3})  # seed 3 lacks budgets
    assert seed_slopes({30000: {7: 0.0}, 60000: {7: 0.4}}, log_base=2) == pytest.approx({7: 0.4})
    assert seed_slopes({3: {1: 0.0}}) == {}


def _rows(design: Round3, preset: str, gains: dict, target: dict[int, float] | None = None) -> list[dict]:
    """Result rows that hold ``gains`` for the budget arm (plus the size and router arms at +0.5), as the runner
    writes them."""
    cells = design.cells()
    target = target or {}
    rows = []

    def add(cell: Cell, regime: str, seed: int, top1: float) -> None:
        rows.append(
            {
                "model": cell.name, "base_model": cell.base.name, "family": cell.family, "width": cell.width,
                "head_chs": cell.head_chs, "experts": cell.experts or "", "method": cell.method, "macs": 100000,
                "params": 7000, "img_size": 28, "regime": regime, "seed": seed, "top1": top1, "top5": 99.0,
                "preset": preset, "commit": "c" * 40, "dirty": False, "version": "0.1.0",
                "route_kernel_dist": 0.04 if cell.family == "parameternet" else "",
            }
        )  # fmt: skip

    for role, cell in cells.items():
        for seed in design.role_seeds(role):
            base = 85.0 + target.get(seed, 0.0)
            add(cell, "target-only", seed, base)
            for e in design.budgets:
                add(design.budget_cell(cell, e), "pretrain-finetune", seed, round(base + gains[role][e][seed], 2))
    for seed in design.seeds[: design.size_seeds]:
        for role in "AB":
            for f in design.size_fractions:
                add(design.size_cell(cells[role], f), "pretrain-finetune", seed, 85.5)
    for cell in design.router_cells():
        for seed in design.seeds[: design.router_seeds]:
            add(cell, "target-only", seed, 85.0)
            add(cell, "pretrain-finetune", seed, 85.5)
    return rows


def test_verdict_over_rows_pairs_by_seed_and_keeps_only_the_designs_seeds():
    design = Round3(seeds=tuple(range(FIRST_SEED, FIRST_SEED + 8)), static_seeds=8, size_seeds=2, router_seeds=2)
    gains = _gains({"A": 0.3, "B": 0.9, "M": 0.3, "D": 0.3}, LEVELS)
    # a seed's target-only run moves all its gains alike: slopes do not see it
    rows = _rows(design, "round3", gains, target={FIRST_SEED + s: 0.3 * s for s in range(8)})
    assert role_gains(rows, design) == {r: {e: dict(g) for e, g in v.items()} for r, v in gains.items()}
    assert verdict(rows, design)["verdict"] == decide(gains)["verdict"] == "reproduced"
    # rows of seeds outside the design (say, run with --models) do not enter
    two = Round3(seeds=(FIRST_SEED, FIRST_SEED + 1), static_seeds=2, size_seeds=0)
    stray = _rows(two, "round3", _gains({"A": 5.0, "B": -5.0, "M": 0.0, "D": 0.0}, LEVELS, seeds=2))
    for r in stray:
        r["seed"] -= FIRST_SEED - 8  # seeds 8 and 9, outside the design
    assert verdict(rows + stray, design)["remedy"].diff == pytest.approx(0.6, abs=0.01)


def test_round3_design_uses_new_seeds_and_the_models_the_issue_names():
    seen = {r["seed"] for r in read_rows(ROOT / "results/pitfall/results.csv")}
    gate = json.loads((ROOT / "results/pitfall/gate.json").read_text())
    gate_seeds = set(gate["seeds"]) | {int(s) for t in gate["tried"] for s in t["gains"]}
    assert gate["seeds"] == [0, 1, 2] and gate_seeds == {0, 1, 2}
    assert not set(ROUND3.seeds) & (seen | gate_seeds) and min(ROUND3.seeds) == FIRST_SEED > max(seen)
    with pytest.raises(parameternet.ParameterNetError, match="must be distinct and >= 100"):
        Round3(seeds=(7, 100), static_seeds=1, size_seeds=0)
    with pytest.raises(parameternet.ParameterNetError, match="recipe's 3 epochs"):
        Round3(seeds=(100, 101), static_seeds=1, size_seeds=0, budgets=(9, 27))
    cells = ROUND3.cells()
    assert cells["A"].name == "ghostnet-w0.1875-h48" and cells["B"].name == "parameternet-w0.1875-h48-e4"
    size = {role: profile_cell(c, 28) for role, c in cells.items()}  # (params, MACs)
    assert round(size["D"][1] / size["A"][1], 2) == 1.74 and abs(size["M"][1] / size["B"][1] - 1) < 0.01
    # D: the 1/16-grid width with the parameter count closest to B's (twin_width); M: the 1/64-grid width with the
    # MACs closest to B's (macs_twin_width); checked against their neighbours on the grid
    for role, step, k in (("D", 1 / 16, 0), ("M", 1 / 64, 1)):
        gap = abs(size[role][k] - size["B"][k])
        for w in (cells[role].width - step, cells[role].width + step):
            assert abs(profile_cell(Cell("ghostnet", w, scaled_head(w)), 28)[k] - size["B"][k]) >= gap


def test_round3_grid_goes_seed_by_seed_and_shares_target_only_runs():
    grid = ROUND3.grid()
    cells = {name for name, _ in grid}
    a, b = ROUND3.cells()["A"].name, ROUND3.cells()["B"].name
    assert {a, f"{a}-pe9", f"{a}-pe27", f"{b}-pe27", f"{a}-pre0.25-ps2811", f"{b}-pre0.5-ps2811"} <= cells
    assert {f"{b}-rlr10", f"{b}-rwd0"} <= cells
    assert [s for name, (s,) in grid if name == a] == list(ROUND3.seeds)  # one target-only run per seed
    assert [s for name, (s,) in grid if name == f"{b}-rlr10"] == list(ROUND3.seeds[:4])
    first_seeds = [s for _, (s,) in grid]
    assert first_seeds == sorted(first_seeds)  # a grid stopped early holds whole seeds
    runs = pitfall_design.grid_runs(ROUND3)
    pre = {(c.name, s): steps for c, s, stage, steps in runs if stage == "pretrain"}
    assert pre[(f"{a}-pe27", FIRST_SEED)] == 27 * 937 and pre[(f"{a}-pre0.25-ps2811", FIRST_SEED)] == 2811
    assert pre[(a, FIRST_SEED)] == 2811  # the size arm's whole-union point is the budget arm's 3 epochs
    with pytest.raises(parameternet.ParameterNetError, match="designed at width 0.1875"):
        ROUND3.grid(0.25)


def test_round3_preset_runs_exactly_the_designed_cells_on_the_designed_seeds():
    preset = PRESETS["round3"]
    assert preset.round3 is ROUND3 and not preset.gate and preset.width == ROUND3.width == 0.1875
    assert (len(ROUND3.seeds), ROUND3.static_seeds, ROUND3.size_seeds, ROUND3.router_seeds) == (20, 6, 6, 4)
    grid = preset.grid(preset.width)
    a, b, m, d = "ghostnet-w0.1875-h48", "parameternet-w0.1875-h48-e4", "ghostnet-w0.234375-h64", "ghostnet-w0.3125-h80"
    budget = {f"{c}{e}" for c in (a, b, m, d) for e in ("", "-pe9", "-pe27")}
    size = {f"{c}-pre{f}-ps2811" for c in (a, b) for f in ("0.25", "0.5")}
    router = {f"{b}-rlr10", f"{b}-rwd0"}
    assert {name for name, _ in grid} == budget | size | router
    seeds: dict[str, list[int]] = {}
    for name, (seed,) in grid:
        seeds.setdefault(name, []).append(seed)
    new = list(range(100, 120))
    for name, got in seeds.items():
        want = new if name.startswith((a, b)) and name not in size | router else new[:6]
        assert got == (new[:4] if name in router else want), name
    # the rows the report expects are those the runner makes: a target-only row per base cell and seed, a
    # fine-tune row per cell and seed
    made = {(c.name, "target-only" if stage == "target" else "pretrain-finetune", s)
            for c, s, stage, _ in pitfall_design.grid_runs(ROUND3) if stage != "pretrain"}  # fmt: skip
    arms = ROUND3.expected_rows()
    assert set.union(*arms.values()) == made and sum(map(len, arms.values())) == len(made) == 248
    assert len(arms["budget"]) == 20 * 2 * 4 + 6 * 2 * 4 and len(arms["size"]) == 24 and len(arms["router"]) == 16


def test_size_arm_cells_hold_the_pretraining_steps_fixed():
    cell = Cell.parse("ghostnet-w0.1875-h48-pre0.25-ps2811")
    assert cell.base.name == "ghostnet-w0.1875-h48" and cell.pretrain_overrides() == ["max_steps=2811"]
    cfg = pitfall._build_cfg("pretrain", cell, FIRST_SEED, PRESETS["round3"], [])
    assert cfg["max_steps"] == 2811 and cfg["data"]["train"].endswith("per_class=1500")
    assert Cell.parse("ghostnet-w0.1875-h48-pe27").pretrain_overrides() == ["epochs=27"]
    with pytest.raises(parameternet.ParameterNetError, match="once"):
        Cell.parse("ghostnet-w0.1875-pe9-ps100")


def _write_csv(path: Path, rows: list[dict], columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in columns} for r in rows)


def test_report_on_synthetic_rows_states_the_verdict_by_the_rule(tmp_path, capsys):
    out = tmp_path / "out"
    gains = _gains({"A": 0.3, "B": 0.3, "M": 0.3, "D": 0.3}, LEVELS, seeds=len(ROUND3.seeds))
    rows = _rows(ROUND3, "round3", gains)
    _write_csv(out / "results.csv", rows, pitfall.COLUMNS)
    routing = [
        {"model": r["model"], "regime": r["regime"], "seed": r["seed"], "layer": str(i), "experts": 4,
         "coef_mean": 0.5, "coef_std": 0.02, "kernel_dist": 0.01 * (i + 1), "commit": "c" * 40, "dirty": False}
        for r in rows if r["family"] == "parameternet" for i in range(4)
    ]  # fmt: skip
    _write_csv(out / "routing.csv", routing, pitfall.ROUTING_COLUMNS)
    assert main(["pitfall", "--preset", "round3", "--output", str(out), "--report-only"]) == 0
    text = (out / "table.md").read_text()
    assert text.strip() in capsys.readouterr().out and (out / "pitfall.png").read_bytes()[:4] == b"\x89PNG"
    assert "**Verdict (rule stated before the run): refuted**" in text
    assert "wiring check" not in text and f"seeds {FIRST_SEED}-{ROUND3.seeds[-1]}" in text
    assert "| A: ghostnet-w0.1875-h48 | 0.100M (1.00x) | 7.0k | 27 |" in text
    assert "Size arm" in text and "Router arm" in text and "router lr x10" in text and "router wd 0" in text
    # the kernel distance of a run is the median over its 4 layers, (0.02 + 0.03) / 2, everywhere it is shown
    assert "| 0.0200 | 0.0250 |" in text
    assert f"| parameternet-w0.1875-h48-e4-pe27 | pretrain-finetune | {len(ROUND3.seeds)} |" in text
    per_seed = ", ".join(f"{g:+.2f}" for g in gains["A"][27].values())
    assert per_seed in text


def test_report_on_partial_rows_states_how_far_the_grid_is(tmp_path, capsys):
    out = tmp_path / "out"
    rows = _rows(ROUND3, "round3", _gains({"A": 0.3, "B": 0.9, "M": 0.3, "D": 0.3}, LEVELS, seeds=20))
    for n in (1, 40):
        _write_csv(out / "results.csv", rows[:n], pitfall.COLUMNS)
        assert main(["pitfall", "--preset", "round3", "--output", str(out), "--report-only"]) == 0
        text = (out / "table.md").read_text()
        assert text.startswith(f"**Incomplete: {n} of the design's 248 result rows (budget arm {n} of 208")
        assert "`parameternet pitfall --preset round3` resumes the grid" in text
        assert "**Verdict so far: not resolved**" in text and "not the round's verdict" in text
        assert "| B: parameternet-w0.1875-h48-e4 | - | - | 3 |" in text  # no rows of B yet: no sizes either
    assert verdict(rows, ROUND3)["complete"] and not verdict(rows[:40], ROUND3)["complete"]
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["pitfall", "--preset", "round3", "--output", str(empty), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "holds no results; run the grid first" in err and "Traceback" not in err


def test_design_simulation_is_deterministic_and_its_record_matches_the_design(tmp_path):
    effects = pitfall_design.measured_effects(read_rows(ROOT / "results/pitfall/results.csv"))
    measured, *_, at_floor = pitfall_design.scenarios(effects)
    assert abs(measured.remedy()) < 0.05 and at_floor.remedy() == pytest.approx(0.25)
    small = Round3(seeds=(100, 101, 102, 103), static_seeds=2, size_seeds=0)
    p = pitfall_design.simulate(measured, small, 30, seed=1)
    assert p == pitfall_design.simulate(measured, small, 30, seed=1) and sum(p.values()) == pytest.approx(1)
    cost = pitfall_design.run_cost(ROUND3, pitfall_design.STEP_SECONDS)
    assert cost["rows"] == len(ROUND3.seeds) * 2 * 4 + ROUND3.static_seeds * 2 * 4 + ROUND3.size_seeds * 4 + 4 * 2 * 2
    # the committed record chose exactly the design the round3 preset runs
    with open(ROOT / "results/pitfall-round3/design.csv", newline="") as f:
        chosen = {(int(r["seeds_ab"]), int(r["seeds_static"])) for r in csv.DictReader(f) if r["chosen"] == "True"}
    assert chosen == {(len(ROUND3.seeds), ROUND3.static_seeds)} and ROUND3.size_seeds == ROUND3.static_seeds
    assert pitfall_design.main(["--sims", "4", "--seeds", "8", "--static-seeds", "4", "--output", str(tmp_path)]) == 0
    assert "## Chosen" in (tmp_path / "design.md").read_text() and (tmp_path / "design.csv").is_file()


@pytest.mark.slow  # about 40 s of two-step runs (`parameternet pitfall --preset round3-smoke` is the same check)
def test_round3_smoke_runs_end_to_end_with_provenance(packaged_data, tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = ["pitfall", "--preset", "round3-smoke", "--output", str(out), "--runs-dir", str(runs), "--jobs", "2"]
    assert main(args) == 0
    design = PRESETS["round3-smoke"].round3
    rows = read_rows(out / "results.csv")
    prov = pitfall.provenance()
    assert len(rows) == sum(stage != "pretrain" for *_, stage, _ in pitfall_design.grid_runs(design))
    assert all(r["commit"] == prov["commit"] and r["version"] == parameternet.__version__ for r in rows)
    assert {r["seed"] for r in rows} == set(design.seeds) and all(r["steps"] == 2 for r in rows)
    gate = json.loads((out / "gate.json").read_text())
    assert gate["gate"].startswith("none") and gate["seeds"] == [0, 1, 2] and gate["round3_seeds"] == [100, 101]
    assert gate["commit"] == prov["commit"]
    size_cfg = next(runs.rglob("pretrain/*pre0.5-ps2-*/config.yaml")).read_text()
    assert "per_class=1" in size_cfg and "max_steps: 2" in size_cfg
    text = (out / "table.md").read_text()
    assert text.startswith("**A wiring check, not results.** Preset round3-smoke")
    assert "**Verdict (rule stated before the run):" in text and "parameternet-w0.1875-h48-e4-rwd0" in text
    capsys.readouterr()
    assert main(["pitfall", "--preset", "round3", "--seeds", "3", "--output", str(tmp_path / "x")]) == 2
    assert "fixes its cells and seeds" in capsys.readouterr().err


def test_cli_offers_every_preset():
    import argparse

    from parameternet.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    preset = next(a for a in sub.choices["pitfall"]._actions if a.dest == "preset")
    assert set(preset.choices) == set(PRESETS)
