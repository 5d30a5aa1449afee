"""`parameternet pitfall`: the grid runs end to end (smoke preset), resumes from its CSV, and reports; the mini
GhostNet / ParameterNet family it trains."""

from __future__ import annotations

import csv
import logging

import pytest
import timm
import torch

import parameternet
from parameternet.cli import main
from parameternet.experiments.pitfall import CELLS, COLUMNS, PRESETS, read_rows


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_grid_writes_rows_skips_them_on_rerun_and_reports(packaged_data, tmp_path, caplog):
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = ["pitfall", "--preset", "smoke", "--output", str(out), "--runs-dir", str(runs)]
    assert main(args) == 0
    rows = read_rows(out / "results.csv")
    assert list(_csv(out / "results.csv")[0]) == list(COLUMNS)
    got = {(r["model"], r["regime"], r["seed"]) for r in rows}
    assert got == {(m, g, 0) for m, _ in PRESETS["smoke"].grid for g in ("target-only", "pretrain-finetune")}
    for r in rows:
        assert 0 <= r["top1"] <= 100 and r["steps"] == 2 and r["img_size"] == 16 and r["preset"] == "smoke"
        assert (r["pretrain_top1"] is None) == (r["regime"] == "target-only")
    by_model = {r["model"]: r for r in rows}
    static, dynamic = by_model["ghostnet_mini_025"], by_model["parameternet_mini_025-e2"]
    assert dynamic["params"] > static["params"] and dynamic["macs"] < 1.2 * static["macs"]
    # one pretraining per (model, seed), reused by its fine-tune
    assert len(list((runs / "pretrain").iterdir())) == 2

    # a rerun trains nothing; a row lost after its run finished comes back from the run directory
    (out / "results.csv").write_text("".join((out / "results.csv").read_text().splitlines(True)[:-1]))
    (out / "table.md").unlink()
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "3 rows already" in caplog.text and "  start " not in caplog.text
    assert len(read_rows(out / "results.csv")) == 4
    table = (out / "table.md").read_text()
    assert "GhostNet-mini 0.25" in table and "ParameterNet-mini 0.25, 2 experts" in table

    (out / "pitfall.png").unlink()
    assert main(["pitfall", "--preset", "smoke", "--output", str(out), "--report-only"]) == 0
    assert (out / "pitfall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    assert main(["pitfall", "--preset", "smoke", "--models", "ghostnet_9000", "--output", str(tmp_path)]) == 2
    assert "ghostnet_9000" in capsys.readouterr().err
    assert main(["pitfall", "--preset", "smoke", "--output", str(tmp_path / "empty"), "--report-only"]) == 2


@pytest.mark.parametrize("name", timm.list_models("*_mini_*"))
def test_mini_family_takes_28px_grey_images(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_grid_models_exist_and_repconv_deploys_to_the_static_model():
    assert {c.timm_model for c in CELLS.values()} <= set(timm.list_models("*_mini_*"))
    torch.manual_seed(0)
    rep = timm.create_model("parameternet_mini_025", method="repconv").eval()
    static = timm.create_model("ghostnet_mini_025")
    merged = parameternet.deploy(rep, fold_bn=False)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(merged(x), rep(x), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in static.parameters())
    with pytest.raises(parameternet.ParameterNetError, match="takes no method"):
        timm.create_model("ghostnet_mini_025", method="repconv")
