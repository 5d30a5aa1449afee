"""``parameternet benchmark gpu``: its code on a CPU at tiny sizes (``--smoke``), its CSV and its bad input."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parameternet.benchmark.gpu import run_gpu_benchmark
from parameternet.cli import main
from parameternet.errors import ParameterNetError


def test_smoke_runs_every_row_and_appends_the_csv(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["benchmark", "gpu", "--smoke", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "smoke: tiny sizes on a CPU, not a measurement" in printed
    rows = list(csv.DictReader((out / "gpu_smoke.csv").open()))
    expected = ["train_fp32", "train_bf16", "train_bf16_cl", "infer_b1_eager", "infer_b1_graphs",
                "infer_b256_bf16", "moe_h512", "moe_h2048"]  # fmt: skip
    assert [r["row"] for r in rows] == expected  # memory needs CUDA's statistics: skipped on a CPU
    for r in rows:
        assert float(r["baseline_value"]) > 0 and float(r["candidate_value"]) > 0 and float(r["ratio"]) > 0
        assert r["smoke"] == "True" and r["version"] and "commit" in r and r["torch"]
    # a second run appends under the same header
    assert main(["benchmark", "gpu", "--smoke", "--rows", "moe_h512", "--output", str(out)]) == 0
    assert len(list(csv.DictReader((out / "gpu_smoke.csv").open()))) == len(expected) + 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--smoke", "--rows", "train_fp64"], "unknown benchmark row(s) train_fp64; choose from train_fp32"),
    ],
)
def test_bad_flags_exit_2_with_one_sentence(tmp_path, capsys, args, message):
    assert main(["benchmark", "gpu", *args, "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_without_a_gpu_the_full_benchmark_says_so(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ParameterNetError, match="needs a CUDA device; --smoke runs the same code on a CPU"):
        run_gpu_benchmark()


def test_the_gpu_script_says_in_one_line_when_there_is_no_gpu(tmp_path):
    """benchmarks/gpu_all.sh runs every GPU measurement; without a CUDA device it stops at once, exit 2."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(["bash", str(root / "benchmarks" / "gpu_all.sh"), str(tmp_path / "out")], cwd=root,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "gpu_all.sh: no CUDA device here; 'parameternet benchmark gpu --smoke' runs the benchmark's code on a CPU"
    ]
    assert not (tmp_path / "out").exists()
