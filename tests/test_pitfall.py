"""`parameternet pitfall`: the grid runs end to end (smoke preset) with its gate, resumes from its CSV without
crediting other code, and reports; the cell grammar, the pre-stated verdict and the mini GhostNet family."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import timm
import torch

import parameternet
from parameternet.cli import main
from parameternet.experiments import pitfall
from parameternet.experiments.pitfall import COLUMNS, Cell, read_rows, summarize, verdict


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_grid_gates_writes_rows_with_provenance_skips_them_on_rerun_and_reports(packaged_data, tmp_path, caplog):
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = ["pitfall", "--preset", "smoke", "--output", str(out), "--runs-dir", str(runs), "--jobs", "2"]
    assert main(args) == 0
    assert list(_csv(out / "results.csv")[0]) == list(COLUMNS)
    rows = read_rows(out / "results.csv")
    gate = json.loads((out / "gate.json").read_text())
    width = gate["settled_width"]
    assert gate["tried"][0]["model"] == "ghostnet-w0.25-h64" and width in (0.25, 0.125)
    assert gate["seeds"] == [0] and all(set(t["gains"]) == {"0"} for t in gate["tried"])  # what the gate decided on
    a = pitfall.static_cell(width)
    expected = {
        (a.name, "target-only"),
        (a.name, "pretrain-finetune"),
        (pitfall.dynamic_cell(width, 2).name, "target-only"),
        (pitfall.dynamic_cell(width, 2).name, "pretrain-finetune"),
        (f"{a.name}-pre0.5", "pretrain-finetune"),  # shares A's target-only run
    }
    assert expected <= {(r["model"], r["regime"]) for r in rows}
    prov = pitfall.provenance()
    for r in rows:
        assert 0 <= r["top1"] <= 100 and r["steps"] == 2 and r["img_size"] == 16 and r["preset"] == "smoke"
        assert (r["pretrain_top1"] is None) == (r["regime"] == "target-only")
        assert r["commit"] == prov["commit"] and r["version"] == parameternet.__version__
    dyn = [r for r in rows if r["method"] == "dynamic"]
    assert dyn and all(r["route_kernel_dist"] is not None for r in dyn)
    routing = read_rows(out / "routing.csv")
    assert {r["model"] for r in routing} == {r["model"] for r in dyn} and all(r["kernel_dist"] >= 0 for r in routing)
    # the half-size pretraining really used half the images (per_class=2 -> 1)
    pre = [p for p in (runs).rglob("pretrain/*pre0.5*/config.yaml")]
    assert pre and "per_class=1" in pre[0].read_text()

    # a rerun trains nothing; a row lost after its run finished comes back from the run directory
    (out / "results.csv").write_text("".join((out / "results.csv").read_text().splitlines(True)[:-1]))
    (out / "table.md").unlink()
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "  start " not in caplog.text
    assert len(read_rows(out / "results.csv")) == len(rows)
    table = (out / "table.md").read_text()
    assert "GhostNet-mini 0.25 (head 64)" in table and "2 experts" in table and "One seed per model" in table

    (out / "pitfall.png").unlink()
    assert main(["pitfall", "--preset", "smoke", "--output", str(out), "--report-only"]) == 0
    assert (out / "pitfall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_of_other_code_are_neither_reused_nor_pooled(tmp_path, caplog):
    out = tmp_path / "out"
    rows = _synthetic_rows({"ghostnet-w0.25-h64": [0.1, 0.0], "parameternet-w0.25-h64-e4": [1.0, 1.2]})
    for r in rows[:2]:
        r["commit"] = "0" * 40
    _write(out / "results.csv", rows)
    text = pitfall.report(out, preset="full")
    assert "2 rows from other code were left out" in text
    pooled = pitfall.report(out, preset="full", pool_commits=True)
    assert "pooled across code versions" in pooled

    with caplog.at_level(logging.WARNING):
        runner = pitfall._Runner(pitfall.PRESETS["full"], out, tmp_path / "runs", 1, 60.0)
    assert "come from other code" in caplog.text and len(runner.rows) == 0  # all synthetic rows are foreign here


def _synthetic_rows(gains: dict[str, list[float]], base_top1: float = 85.0) -> list[dict]:
    rows = []
    for name, values in gains.items():
        cell = Cell.parse(name)
        for seed, g in enumerate(values):
            for regime, top1 in (("target-only", base_top1), ("pretrain-finetune", base_top1 + g)):
                if regime == "target-only" and cell.base != cell:
                    continue
                rows.append(
                    {
                        "model": name, "base_model": cell.base.name, "family": cell.family, "width": cell.width,
                        "head_chs": cell.head_chs, "experts": cell.experts, "method": cell.method, "macs": 100000,
                        "params": 7000, "img_size": 28, "regime": regime, "seed": seed, "top1": top1, "top5": 99.0,
                        "preset": "full", "commit": "a" * 40, "dirty": False, "version": "0.1.0",
                    }
                )  # fmt: skip
    return rows


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in COLUMNS} for r in rows)


A, B, C = "ghostnet-w0.25-h64", "parameternet-w0.25-h64-e4", "parameternet-w0.25-h64-e4-repconv"


@pytest.mark.parametrize(
    ("gains", "expected"),
    [
        # A in the pitfall, B gains much more, RepConv does not: reproduced
        ({A: [0.0, 0.1, -0.1, 0.2], B: [0.9, 1.0, 1.1, 0.8], C: [0.1, 0.0, 0.2, -0.1]}, "reproduced"),
        # RepConv gains as much as B: the parameters, not the dynamics, did it
        ({A: [0.0, 0.1, -0.1, 0.2], B: [0.9, 1.0, 1.1, 0.8], C: [0.9, 1.0, 1.1, 0.8]}, "not resolved"),
        # A in the pitfall and B no better, tightly: refuted
        ({A: [0.0, 0.1, -0.1, 0.2], B: [0.0, 0.1, -0.1, 0.1], C: [0.0, 0.1, 0.0, 0.1]}, "refuted"),
        # too noisy to say
        ({A: [0.0, 1.0, -1.0, 0.2], B: [0.9, -0.5, 1.5, 0.0]}, "not resolved"),
        # one seed: never resolved
        ({A: [0.0], B: [2.0]}, "not resolved"),
    ],
)
def test_verdict_follows_the_pre_stated_criteria(gains, expected):
    v = verdict(summarize(_synthetic_rows(gains)), 0.25)
    assert v["verdict"] == expected
    assert "seeds_needed" not in v  # one test's power is not the rule's: no seed count comes with a verdict


def test_committed_round2_report_regenerates_byte_for_byte(tmp_path):
    """results/pitfall/table.md is what the report makes of the committed CSVs; it names no seed count and the
    size sweep's confound (fewer steps with fewer images at fixed epochs)."""
    import shutil

    root = Path(__file__).resolve().parents[1] / "results" / "pitfall"
    for name in ("results.csv", "routing.csv", "gate.json"):
        shutil.copy(root / name, tmp_path / name)
    text = pitfall.report(tmp_path, preset="full")
    assert text == (root / "table.md").read_text()
    assert "seeds per model would" not in text and "No seed count is given" in text
    assert "| GhostNet-mini 0.1875 (head 48) | 30,000 | 3 | 702 |" in text and "fewer steps" in text


def test_sweep_cells_pair_with_their_base_cells_target_only_runs():
    rows = _synthetic_rows({A: [0.5, 0.7], f"{A}-pre0.25": [0.1, 0.3]})
    entries = {e["name"]: e for e in summarize(rows)}
    assert entries[f"{A}-pre0.25"]["gains"] == {0: 0.1, 1: 0.3}
    assert entries[f"{A}-pre0.25"]["target-only"] == entries[A]["target-only"]


def test_cell_grammar_round_trips_and_rejects_bad_names():
    for name in (A, B, C, "parameternet-w0.1875-h48-e8-softmax-pre0.5-pe9", "ghostnet-w1-h256", f"{B}-rlr10-rwd0"):
        assert Cell.parse(name).name == name
    assert Cell.parse("ghostnet-w0.25").head_chs == 64 and Cell.parse("parameternet-w0.5").experts == 4
    cell = Cell.parse("parameternet-w0.25-h64-e2-pre0.5")
    assert cell.base.name == "parameternet-w0.25-h64-e2"
    assert cell.overrides() == [
        "model=parameternet_mini", "model_kwargs.width=0.25", "model_kwargs.head_chs=64", "model_kwargs.num_experts=2",
    ]  # fmt: skip
    assert Cell.parse(f"{B}-rlr10-rwd0").overrides()[-2:] == [
        "optim.router_lr_scale=10.0",
        "optim.router_weight_decay=0.0",
    ]
    for bad, match in [
        ("resnet-w0.25", "must start with"),
        ("ghostnet-h64", "names no width"),
        ("ghostnet-w0.25-e4", "static convs"),
        ("ghostnet-w0.25-x3", "unknown part"),
        ("ghostnet-w0.25-pre2", "0 < pre <= 1"),
        ("ghostnet-w0.25-rlr10", "static convs"),
    ]:
        with pytest.raises(parameternet.ParameterNetError, match=match):
            Cell.parse(bad)


def test_full_design_has_every_cell_of_the_issue_and_a_static_twin_of_bs_size():
    grid = pitfall.design(0.25)
    seeds: dict[str, set] = {}
    for name, s in grid:
        seeds.setdefault(name, set()).update(s)
    assert seeds[A] == seeds[B] == set(range(8))
    assert seeds[C] == set(range(4))
    assert {f"{A}-pre0.25", f"{A}-pre0.5", f"{A}-pe9", f"{B}-pre0.25", f"{B}-pre0.5", f"{B}-pe9"} <= set(seeds)
    assert {"parameternet-w0.25-h64-e4-softmax", "parameternet-w0.25-h64-e1", "parameternet-w0.25-h64-e8"} <= set(seeds)
    twin = [n for n in seeds if n.startswith("ghostnet") and Cell.parse(n).width > 0.25]
    assert len(twin) == 1
    b_params, b_macs = pitfall._profile_cell(Cell.parse(B), 28)
    d_params, d_macs = pitfall._profile_cell(Cell.parse(twin[0]), 28)
    assert abs(d_params - b_params) / b_params < 0.15 and 1.5 < d_macs / b_macs < 2.5


def test_gate_rule():
    assert pitfall.gate_decision({0: 0.3, 1: 0.9, 2: 0.7})  # one seed at or below +0.5: in the pitfall
    assert not pitfall.gate_decision({0: 0.6, 1: 0.9, 2: 0.7})


def _rows_of_this_code(preset: str, cells: list[str]) -> list[dict]:
    """A finished grid of ``cells`` at seed 0 made by the imported code, as if ``preset`` had run it."""
    rows = _synthetic_rows({name: [0.5] for name in cells})
    for r in rows:
        r.update(pitfall.provenance(), preset=preset)
    return rows


def test_demo_says_where_its_table_and_plot_went(tmp_path, capsys):
    """`make demo` (pitfall --preset quick --jobs 2) ends with the paths of the table, the plot and the CSV; here
    every run of the grid is in the CSV already, so nothing trains."""
    out = tmp_path / "out"
    width = pitfall.PRESETS["quick"].width
    _write(
        out / "results.csv",
        _rows_of_this_code("quick", [pitfall.static_cell(width).name, pitfall.dynamic_cell(width).name]),
    )
    args = ["pitfall", "--preset", "quick", "--jobs", "2", "--output", str(out), "--runs-dir", str(tmp_path / "runs")]
    for argv in (args, [*args, "--report-only"]):
        assert main(argv) == 0
        printed = capsys.readouterr().out
        last = printed.strip().splitlines()[-1]
        assert (
            last == f"Table: {out / 'table.md'}; plot: {out / 'pitfall.png'}; every run's row: {out / 'results.csv'}."
        )
        assert (out / "table.md").read_text().strip() in printed and (out / "pitfall.png").is_file()
        assert "wiring check" not in printed
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_smoke_report_says_it_is_a_wiring_check_not_results(tmp_path, capsys):
    out = tmp_path / "out"
    _write(out / "results.csv", _rows_of_this_code("smoke", [A, "parameternet-w0.25-h64-e2"]))
    assert main(["pitfall", "--preset", "smoke", "--output", str(out), "--report-only"]) == 0
    printed = capsys.readouterr().out
    first = "**A wiring check, not results.** Preset smoke: a gate and three cells, two steps each, 16 px"
    assert printed.startswith(first) and (out / "table.md").read_text().startswith(first)
    assert "they say nothing about the low-FLOPs pitfall" in printed
    assert printed.strip().splitlines()[-1].endswith("(preset smoke: a wiring check, not results).")


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    assert main(["pitfall", "--preset", "smoke", "--models", "ghostnet_9000", "--output", str(tmp_path)]) == 2
    assert "ghostnet_9000" in capsys.readouterr().err
    assert main(["pitfall", "--preset", "smoke", "--output", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "holds no results; run the grid first" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()  # a report reads; it creates nothing
    assert main(["pitfall", "--models", "not-a-cell", "--output", str(tmp_path)]) == 2
    assert "must start with ghostnet- or parameternet-" in capsys.readouterr().err
    assert main(["pitfall", "--jobs", "0", "--output", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "--jobs must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("name", [m for f in ("ghostnet", "parameternet") for m in timm.list_models(f"{f}_mini*")])
def test_mini_family_takes_28px_grey_images(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_generic_mini_takes_width_and_head_and_repconv_deploys_to_the_static_model():
    torch.manual_seed(0)
    rep = timm.create_model("parameternet_mini", width=0.25, head_chs=64, method="repconv").eval()
    static = timm.create_model("ghostnet_mini", width=0.25, head_chs=64)
    assert static.conv_head.out_channels == 64 and static.stem.conv.out_channels == 4
    merged = parameternet.deploy(rep, fold_bn=False)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(merged(x), rep(x), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in static.parameters())
    with pytest.raises(parameternet.ParameterNetError, match="takes no method"):
        timm.create_model("ghostnet_mini_025", method="repconv")
    with pytest.raises(parameternet.ParameterNetError, match="width > 0"):
        timm.create_model("ghostnet_mini", width=0)


def _last_step(metrics) -> int:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return max((r.get("step", 0) for r in rows), default=0)


@pytest.mark.parametrize("to", ["parent", "every process"])
def test_sigterm_stops_the_grid_after_the_running_runs_save_and_the_same_command_resumes(
    packaged_data, tmp_path, capfd, to
):
    """``kill PID`` reaches the runner alone, which passes the stop on; a SIGTERM to every process (systemd, Slurm,
    pkill) reaches the runs too, and the runner's copy is the same stop for them."""
    import dataclasses
    import signal

    from parameternet.runs import RunInterrupted
    from process_helpers import sigterm_when

    long = dataclasses.replace(
        pitfall.PRESETS["smoke"],
        overrides=(*pitfall.PRESETS["smoke"].overrides, "max_steps=4000", "ckpt_every_steps=0"),
    )
    runner = pitfall._Runner(long, tmp_path / "out", tmp_path / "runs", 2, 60.0)

    def training() -> bool:  # both runs past step 100, as a user's kill would come
        steps = [_last_step(p) for p in (tmp_path / "runs").rglob("metrics.jsonl")]
        return len(steps) == 2 and min(steps) >= 100

    runs = b"parameternet\x00train" if to == "every process" else None
    with sigterm_when(training, 300, runs), pytest.raises(RunInterrupted) as info:
        runner.run(((pitfall.static_cell(0.25).name, (0,)),))
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert "a checkpoint of every run in progress" in str(info.value) and "except" not in str(info.value)
    saved = sorted(p.name for p in (tmp_path / "runs").rglob("step_*.safetensors"))
    assert len(saved) == 2, f"the interrupted runs saved {saved}"
    assert "exiting now without saving" not in capfd.readouterr().err
    assert not list((tmp_path / "runs").rglob("*.tmp")) and not read_rows(tmp_path / "out" / "results.csv")
