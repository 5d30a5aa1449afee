"""Upcycling, round 2 (`lm experiment --preset upcycle2`): the pre-stated rule literally as stated, on synthetic
rows; its simulation; the grid's plan; the report; the smoke grid end to end (slow)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import shutil

import numpy as np
import pytest

from parameternet.cli import main
from parameternet.experiments import lm, lm_grid, lm_report, lm_rows, lm_upcycle
from parameternet.experiments.lm_upcycle_rule import (
    COMPARISONS,
    VERDICTS,
    _verdicts,
    compare,
    decide,
    judge_rows,
    round1_spreads,
    simulate,
)
from parameternet.experiments.provenance import code_id, provenance
from parameternet.experiments.rows import append_rows
from test_lm_text import make_fake_corpora

START, TOTAL = 1000, 2000  # the second half of the branch: steps 1500-2000


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    make_fake_corpora(tmp_path / "cache", monkeypatch)
    return tmp_path


def _line(end: float, change: float) -> list[tuple[int, float]]:
    """A gap curve ending at ``end`` after changing by ``change`` over steps 1500-2000, evaluated every 100."""
    return [(s, end - change * (TOTAL - s) / 500) for s in range(1100, TOTAL + 1, 100)]


def _compare(gaps, change=0.0):
    ref = {seed: 4.5 for seed in range(len(gaps))}
    branch = {seed: 4.5 - g for seed, g in enumerate(gaps)}
    return compare(ref, branch, {seed: _line(g, change) for seed, g in enumerate(gaps)}, START, TOTAL)


# ----- the rule, literally as stated -----


def test_worse_and_better_need_an_interval_off_zero_and_a_gap_that_does_not_move_against_them():
    v = _compare([-0.075, -0.076, -0.073])  # round 1's upcycled gaps
    assert v["verdict"] == "worse" and v["high"] < 0 and v["n"] == 3 and v["points"] == 6
    assert v["mean"] == pytest.approx(-0.0747, abs=1e-4) and v["change"] == pytest.approx(0.0, abs=1e-12)
    assert _compare([-0.075, -0.076, -0.073], change=-0.02)["verdict"] == "worse"  # still growing for the reference
    closing = _compare([-0.075, -0.076, -0.073], change=+0.02)  # behind at the end but catching up
    assert closing["verdict"] == "not resolved" and "moves against it" in closing["reason"]
    assert _compare([-0.075, -0.076, -0.073], change=+0.0099)["verdict"] == "worse"  # within the flat tolerance
    assert _compare([0.03, 0.031, 0.029])["verdict"] == "better"
    assert _compare([0.03, 0.031, 0.029], change=-0.015)["verdict"] == "not resolved"  # shrinking
    # a tiny but consistent gap: the sign is resolved, and the report gives its size
    assert _compare([0.004, 0.005, 0.006])["verdict"] == "better"


def test_same_needs_the_whole_interval_within_the_margin_and_a_flat_gap():
    assert _compare([0.002, -0.003, 0.001])["verdict"] == "same"
    assert _compare([0.002, -0.003, 0.001], change=0.015)["verdict"] == "not resolved"  # not flat
    wide = _compare([0.03, -0.03, 0.0])  # across 0 and past +-0.02 nats
    assert wide["verdict"] == "not resolved" and wide["low"] < -0.02
    assert _compare([0.5])["verdict"] == "not resolved"  # one seed decides nothing
    assert decide(-0.01, 0.01, math.nan, 3)[0] == "not resolved"


def test_the_array_rule_of_the_simulation_is_the_rule():
    g = np.random.default_rng(1)
    low = g.normal(0, 0.02, 5000)
    high = low + g.uniform(0, 0.04, 5000)
    change = g.normal(0, 0.012, 5000)
    got = _verdicts(low, high, change)
    assert [VERDICTS[i] for i in got] == [decide(a, b, c, 3)[0] for a, b, c in zip(low, high, change)]


def _rows_and_curves(final: dict[str, list[float]], held: dict[str, list[float]] | None = None, change=0.0):
    rows, curves = [], []
    for kind, losses in final.items():
        for seed, loss in enumerate(losses):
            rows.append(dict(kind=kind, seed=seed, val_loss=loss, start_step=START, steps=TOTAL,
                             heldout_loss=held[kind][seed] if held else None))  # fmt: skip
            drift = 0.0 if kind == "continue" else change
            for step in range(1100, TOTAL + 1, 100):
                curves.append(dict(kind=kind, seed=seed, step=step, val_loss=loss + drift * (TOTAL - step) / 500))
    return rows, curves


def test_judge_rows_pairs_each_branch_with_both_references():
    final = {
        "continue": [4.44, 4.46, 4.45],
        "reset": [4.45, 4.47, 4.46],  # the reset alone costs 0.01
        "upcycle": [4.52, 4.54, 4.53],
        "upcycle-rewarm": [4.441, 4.459, 4.452],
        "upcycle-moe-lr": [4.40, 4.43, 4.41],
    }
    rows, curves = _rows_and_curves(final)
    got = {(v["branch"], v["reference"]): v for v in judge_rows(rows, curves)}
    assert list(got) == list(COMPARISONS)
    assert got["upcycle", "continue"]["verdict"] == "worse" and got["upcycle", "reset"]["verdict"] == "worse"
    assert got["upcycle-rewarm", "continue"]["verdict"] == "same"
    assert got["upcycle-rewarm", "reset"]["verdict"] == "better"  # 0.009 below the reset, consistently
    assert got["upcycle-moe-lr", "continue"]["verdict"] == "better"
    assert got["reset", "continue"]["verdict"] == "worse"
    assert got["upcycle", "continue"]["gaps"] == pytest.approx([-0.08, -0.08, -0.08])
    # the held-out losses go through the same rule; rows without them leave it unresolved
    held = {k: [x + 0.01 for x in v] for k, v in final.items()}
    rows, curves = _rows_and_curves(final, held)
    assert [v["verdict"] for v in judge_rows(rows, curves, "heldout_loss")] == [
        v["verdict"] for v in judge_rows(rows, curves)
    ]
    rows = [r for r in rows if r["kind"] != "upcycle-moe-lr"]
    missing = {(v["branch"], v["reference"]): v for v in judge_rows(rows, curves)}
    assert missing["upcycle-moe-lr", "reset"]["verdict"] == "not resolved"


def test_a_closing_gap_on_the_curves_leaves_worse_unresolved():
    final = {k: [4.45, 4.46, 4.47] for k in ("continue", "reset", "upcycle-rewarm", "upcycle-moe-lr")}
    final["upcycle"] = [4.50, 4.51, 4.52]
    rows, curves = _rows_and_curves(final, change=0.03)  # every branch was 0.03 further behind at step 1500
    got = {(v["branch"], v["reference"]): v for v in judge_rows(rows, curves)}
    assert got["upcycle", "continue"]["change"] == pytest.approx(0.03)
    assert got["upcycle", "continue"]["verdict"] == "not resolved"


# ----- the simulation -----


def test_simulation_gives_the_chances_of_the_rule():
    steps = list(range(1100, TOTAL, 100)) + [TOTAL]
    kw = dict(point_sd=0.005, change_sd=0.004, steps=steps, start_step=START, total_steps=TOTAL, sims=4000)
    assert simulate(-0.075, 0.0, 0.0022, **kw)["worse"] > 0.95
    assert simulate(0.0, 0.0, 0.0022, **kw)["same"] > 0.85
    noisy = simulate(-0.02, 0.0, 0.03, **kw)
    assert noisy["not resolved"] > 0.7 and sum(noisy.values()) == pytest.approx(1.0)
    assert simulate(-0.075, 0.0, 0.0022, **kw) == simulate(-0.075, 0.0, 0.0022, **kw)  # seeded
    with pytest.raises(ValueError, match="give 1 points in the second half"):
        simulate(0.0, 0.0, 0.01, 0.005, 0.004, [1100, 2000], START, TOTAL)


def test_round1_spreads_come_from_the_committed_rows(tmp_path):
    got = round1_spreads("results/lm")
    assert got["seeds"] == 3 and got["gap"] == pytest.approx(-0.0753, abs=1e-4)
    assert got["final_sd"] == pytest.approx(0.0022, abs=1e-4) and got["dense_sd"] == pytest.approx(0.0078, abs=1e-4)
    with pytest.raises(ValueError, match="holds no round-1 upcycling rows"):
        round1_spreads(tmp_path)


# ----- the grid and its report -----


def test_the_plan_has_a_trunk_and_five_continuations_per_seed(corpora, tmp_path):
    p = lm_upcycle.PRESETS["upcycle2-smoke"]
    runner = lm_grid.Runner(p, "configs/lm-small.yaml", [], tmp_path / "out", tmp_path / "runs", 1)
    tasks, sched = lm_upcycle.plan(runner)
    assert (sched.total, sched.mid, sched.rewarmup) == (16, 8, 4) and sched.eval_steps(2) == [10, 12, 14, 16]
    assert [t.kind for t in tasks[:6]] == ["trunk", "continue", "reset", "upcycle", "upcycle-rewarm",
                                           "upcycle-moe-lr"]  # fmt: skip
    assert len(tasks) == 6 * len(p.seeds) and {t.seed for t in tasks} == set(p.seeds)
    trunk, cont, reset, up, rewarm, moe_lr = tasks[:6]
    assert trunk.options == {"stop_step": 8, "snapshot_step": 8}
    assert cont.options == {"fork_from": str(trunk.run_dir), "start_step": 8} and cont.after == [trunk]
    assert reset.options["from_snapshot"] == up.options["from_snapshot"] == str(trunk.run_dir / "snapshot")
    assert rewarm.options["rewarmup_steps"] == 4 and (up.lr, moe_lr.lr) == (p.dense_lr, p.moe_lr)
    assert up.variant == rewarm.variant == moe_lr.variant == "down_proj-4" and reset.variant == "dense"
    assert "eval_every_steps=4" in trunk.overrides and "eval_every_steps=2" in cont.overrides
    # the recipe hashes do not depend on where the run directories are
    elsewhere = lm_grid.Runner(p, "configs/lm-small.yaml", [], tmp_path / "out", tmp_path / "other", 1)
    assert [t.recipe for t in lm_upcycle.plan(elsewhere)[0]] == [t.recipe for t in tasks]


def _write_grid(out, final, held):
    prov = {"commit": "a" * 40, "dirty": "False", "version": "0.1.0"}
    rows, curves = [], []
    for seed in (3, 4, 5):
        rows.append({c: "" for c in lm_rows.COLUMNS} | prov | dict(
            kind="trunk", preset="upcycle2", variant="dense", seed=seed, steps=8, start_step=0, tokens=8 * 64,
            val_loss=5.0, train_loss=5.1, threads=1, wall_s=60))  # fmt: skip
        curves += [dict(kind="trunk", preset="upcycle2", variant="dense", seed=seed, step=s, tokens=s * 64,
                        val_loss=5.5 - 0.05 * s, **prov) for s in (4, 8)]  # fmt: skip
        for kind, loss in final.items():
            variant = "dense" if kind in ("continue", "reset") else "down_proj-8"
            end = loss + 0.001 * seed
            rows.append({c: "" for c in lm_rows.COLUMNS} | prov | dict(
                kind=kind, preset="upcycle2", variant=variant, seed=seed, steps=16, start_step=8, tokens=8 * 64,
                val_loss=end, heldout_loss=held.get(kind, end + 0.01) if held is not None else "", train_loss=end,
                threads=1, wall_s=120))  # fmt: skip
            curves += [dict(kind=kind, preset="upcycle2", variant=variant, seed=seed, step=s, tokens=s * 64,
                            val_loss=end + 0.02 * (16 - s), **prov) for s in (10, 12, 14, 16)]  # fmt: skip
    append_rows(out / "runs.csv", rows, lm_rows.COLUMNS)
    append_rows(out / "curves.csv", curves, lm_rows.CURVE_COLUMNS)


def test_report_gives_the_table_the_verdicts_and_the_plot(tmp_path):
    out = tmp_path / "out"
    final = {"continue": 4.45, "reset": 4.46, "upcycle": 4.53, "upcycle-rewarm": 4.47, "upcycle-moe-lr": 4.44}
    _write_grid(out, final, {"upcycle": 4.30})
    text = lm_report.report(out, preset="upcycle2")  # lm experiment's report hands the preset to lm_upcycle
    assert (out / "table.md").read_text() == text and (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| trunk (step 8) | dense | - | - | 5.1000 ± 0.0000 (3) | 5.0000 ± 0.0000 (3) | not measured" in text
    assert "| upcycle-moe-lr | upcycled | fresh | MoE schedule |" in text
    assert "| upcycle | continue | -0.0800, -0.0800, -0.0800 | -0.0800 ± 0.0000 [-0.0800, -0.0800] |" in text
    assert "| **worse** |" in text and "| **better** |" in text
    assert "peak learning rates: dense 0.004, MoE 0.002, the values round 1's learning-rate check chose on " \
           "the validation split" in text  # fmt: skip
    assert "Validation and held-out readings differ for: upcycle vs continue; upcycle vs reset." in text
    assert "All 18 rows from code aaaaaaaaaaaa (version 0.1.0)." in text
    assert main(["lm", "experiment", "--preset", "upcycle2", "--output", str(out), "--report-only"]) == 0
    out2 = tmp_path / "old"  # rows without held-out losses say so
    _write_grid(out2, final, None)
    assert (
        "| continue | dense | kept | dense schedule | 4.4540 ± 0.0006 (3) | 4.4540 ± 0.0006 (3) | not measured |"
        in (lm_upcycle.report(out2))
    )


def test_a_partial_grid_says_it_is_incomplete_and_how_to_continue(tmp_path):
    out = tmp_path / "out"
    _write_grid(out, {"continue": 4.45}, None)  # 3 trunks and one kind of continuation: 6 of 18 runs
    text = lm_upcycle.report(out)
    assert text.startswith("Incomplete: 6 of the grid's 18 runs (3 trunks, 3 continuations);")
    assert "from a checkout of commit aaaaaaaaaaaa to continue." in text
    _write_grid(tmp_path / "all", dict.fromkeys(("continue", "reset", "upcycle", "upcycle-rewarm", "upcycle-moe-lr"),
                                                4.45), None)  # fmt: skip
    assert "Incomplete" not in lm_upcycle.report(tmp_path / "all")


def test_upcycle2_command_refuses_what_does_not_apply_in_one_line(capsys, tmp_path):
    assert main(["lm", "experiment", "--preset", "full", "--simulate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--simulate applies to the upcycling presets" in err
    assert main(["lm", "experiment", "--preset", "upcycle2", "--report-only", "--output", str(tmp_path / "no")]) == 2
    assert "does not exist" in capsys.readouterr().err
    args = ["lm", "experiment", "--preset", "upcycle2-smoke", "--output", str(tmp_path / "o"), "--runs", str(tmp_path)]
    assert main([*args, "eval_every_steps=3"]) == 2
    assert "sets eval_every_steps, which lm experiment sets for each run" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert lm.default_output("upcycle2") == lm.Path("results/lm-upcycle2")
    with pytest.raises(ValueError, match="use one of full, quick, gpu, smoke, upcycle2, upcycle2-smoke"):
        lm.run_lm_experiment("upcycle3")


def _smoke(corpora, seeds):
    out, runs = corpora / "out", corpora / "runs"
    args = ["lm", "experiment", "--preset", "upcycle2-smoke", "--output", str(out), "--runs", str(runs), "--jobs", "2"]
    assert main(args) == 0
    rows = lm.read_rows(out / "runs.csv")
    with open(out / "runs.csv", newline="") as f:
        assert list(next(csv.reader(f))) == list(lm.COLUMNS)
    kinds = ["trunk", "continue", "reset", "upcycle", "upcycle-rewarm", "upcycle-moe-lr"]
    assert sorted((r["kind"], r["seed"]) for r in rows) == sorted((k, s) for k in kinds for s in seeds)
    prov = provenance()
    assert all(r["commit"] == prov["commit"] and r["threads"] == 1 for r in rows)
    assert all(r["steps"] == 8 and r["heldout_loss"] is None for r in rows if r["kind"] == "trunk")
    ends = [r for r in rows if r["kind"] != "trunk"]
    assert all(r["steps"] == 16 and r["start_step"] == 8 and r["heldout_loss"] > 0 for r in ends)
    assert {r["lr"] for r in ends if r["kind"] == "upcycle-moe-lr"} == {1e-3}
    curves = lm.read_rows(out / "curves.csv")
    assert sorted({c["step"] for c in curves if c["kind"] == "reset"}) == [10, 12, 14, 16]
    assert sorted({c["step"] for c in curves if c["kind"] == "trunk"}) == [4, 8]
    # the continuation trains from the trunk's step on, with the trunk's optimizer: only steps 9-16 in its run
    found = sorted((runs / code_id(prov) / "continue").rglob("metrics.jsonl"))
    assert len(found) == len(seeds)
    for metrics in found:
        train = [json.loads(x) for x in metrics.read_text().splitlines() if '"train"' in x]
        assert [r["step"] for r in train] == list(range(9, 17))
    table = (out / "table.md").read_text()
    for text in ("| continue | dense | kept |", "**Verdicts by the rule stated before the runs**", "Routers of "):
        assert text in table
    return args


def test_upcycle2_smoke_grid_with_one_seed(corpora, monkeypatch, caplog, capsys):
    """The whole code path of the grid (trunk, fork, branches, rows, report) on one seed of the smoke preset; then a
    branch still to run whose trunk's run directory is gone: the trunk runs again, must end where its row says, and
    keeps its one row."""
    p = lm_upcycle.PRESETS["upcycle2-smoke"]
    monkeypatch.setitem(lm_upcycle.PRESETS, "upcycle2-smoke", dataclasses.replace(p, seeds=(3,)))
    args = _smoke(corpora, (3,))
    out, runs = corpora / "out", corpora / "runs" / code_id(provenance())
    rows = (out / "runs.csv").read_text().splitlines()
    keep = [r for r in rows if not r.startswith("reset,")]
    (out / "runs.csv").write_text("\n".join(keep) + "\n")
    for d in (runs / "trunk", runs / "reset"):
        shutil.rmtree(d)
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "trunk dense seed 3: its row is here but not its run directory" in caplog.text
    assert "trunk dense seed 3 ran again and ends where its row says" in caplog.text
    again = lm.read_rows(out / "runs.csv")
    assert sorted(r["kind"] for r in again) == sorted(r.split(",")[0] for r in rows[1:])  # one trunk row, reset back

    # a trunk that would not end where its row says stops the grid before anything starts from it
    with open(out / "runs.csv", newline="") as f:
        table = list(csv.DictReader(f))
    table = [{**r, "val_loss": "9.5"} if r["kind"] == "trunk" else r for r in table if r["kind"] != "reset"]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lm.COLUMNS))
        writer.writeheader()
        writer.writerows(table)
    for d in (runs / "trunk", runs / "reset"):
        shutil.rmtree(d)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "trunk dense seed 3 ran again (its run directory" in err and "its row says {'steps': 8, 'val_loss': 9.5}" in err
    )
    assert err.count("\n") == 1 and not (runs / "reset").exists()


@pytest.mark.slow
def test_upcycle2_smoke_grid_runs_resumes_and_reports(corpora, caplog):
    args = _smoke(corpora, (3, 4))
    with caplog.at_level(logging.INFO):
        assert main(args) == 0  # a rerun trains nothing
    assert "  start " not in caplog.text
