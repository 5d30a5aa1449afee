"""`parameternet lm experiment` (Table 7 at CPU scale): the pre-stated verdict on synthetic rows, the learning-rate
choice, upcycled branches, thread-count determinism, the classifier command, and the smoke grid end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import signal

import pytest
import torch
from safetensors.torch import load_file

from parameternet.cli import main
from parameternet.experiments import lm, lm_estimate, lm_grid, lm_report, lm_rows
from parameternet.experiments.lm import choose_lrs, verdict
from parameternet.experiments.lm_report import crossing, crossing_text
from parameternet.experiments.provenance import provenance
from parameternet.experiments.rows import append_rows
from parameternet.train.lm import load_lm_config, train_lm
from parameternet.train.lm_config import LMDataConfig
from test_lm_text import make_fake_corpora
from test_lm_train import TINY


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    make_fake_corpora(tmp_path / "cache", monkeypatch)
    return tmp_path


def _gap(start: float, end: float, steps=(1000, 1250, 1500, 1750, 2000)) -> list[tuple[int, float]]:
    """A straight gap curve from ``start`` at step 1000 to ``end`` at step 2000 (the second half of 2000 steps)."""
    return [(s, start + (end - start) * (s - steps[0]) / (steps[-1] - steps[0])) for s in steps]


# ----- the verdict, literally as stated -----


def test_verdict_reproduced_needs_the_margin_the_standard_errors_and_a_gap_that_does_not_shrink():
    dense, moe = [5.00, 5.01, 5.02], [4.95, 4.96, 4.97]  # gap 0.05, s.e. ~0.008
    v = verdict(dense, moe, _gap(0.04, 0.05), 2000)
    assert v["verdict"] == "reproduced" and v["gap"] == pytest.approx(0.05) and v["gap"] > 2.5 * v["se"]
    assert v["change"] == pytest.approx(0.01)
    # the same end, but the gap shrank by 0.03 over the second half: not resolved
    assert verdict(dense, moe, _gap(0.08, 0.05), 2000)["verdict"] == "not resolved"
    # a shrink within the flat tolerance (0.01 nats) still counts as not shrinking
    assert verdict(dense, moe, _gap(0.055, 0.05), 2000)["verdict"] == "reproduced"


def test_verdict_not_resolved_below_the_margin_or_within_the_noise():
    # 0.015 nats better, tight: below the 0.02 margin
    assert verdict([5.0, 5.001, 5.002], [4.985, 4.986, 4.987], _gap(0.01, 0.015), 2000)["verdict"] == "not resolved"
    # 0.05 nats better on average but the seeds scatter: under 2.5 standard errors
    noisy = verdict([5.0, 5.2, 4.9], [4.95, 5.15, 4.85], _gap(0.05, 0.05), 2000)
    assert noisy["verdict"] == "not resolved" and noisy["gap"] < 2.5 * noisy["se"]
    assert noisy["seeds_needed"] > 3  # the power calculation says how many seeds would resolve it
    # one seed a side decides nothing
    one = verdict([5.0], [4.5], _gap(0.5, 0.5), 2000)
    assert one["verdict"] == "not resolved" and "fewer than two seeds" in one["reason"]


def test_verdict_refuted_when_moe_ends_worse_with_the_gap_flat_or_growing_for_dense():
    dense, moe = [5.00, 5.01, 5.02], [5.05, 5.06, 5.07]
    assert verdict(dense, moe, _gap(-0.05, -0.05), 2000)["verdict"] == "refuted"  # flat
    assert verdict(dense, moe, _gap(-0.02, -0.05), 2000)["verdict"] == "refuted"  # growing for dense
    # MoE worse at the end but catching up fast: not resolved (the curves may still cross)
    assert verdict(dense, moe, _gap(-0.20, -0.05), 2000)["verdict"] == "not resolved"
    # equal at the end and flat: MoE >= dense, refuted
    assert verdict([5.0, 5.1], [5.0, 5.1], _gap(0.0, 0.0), 2000)["verdict"] == "refuted"


def test_verdict_second_half_and_paired_seeds():
    # only evaluations in the second half count: an early collapse of the gap does not matter
    curve = [(250, 0.5), (500, 0.3), *_gap(0.05, 0.05)]
    v = verdict([5.00, 5.01, 5.02], [4.95, 4.96, 4.97], curve, 2000)
    assert v["verdict"] == "reproduced" and v["second_half_points"] == 5
    # a branch from step 1000 of 2000: its second half starts at 1500
    v = verdict([5.0, 5.1, 5.2], [4.95, 5.05, 5.15], _gap(0.2, 0.05), 2000, start_step=1000, paired=True)
    assert v["second_half_points"] == 3 and v["se"] == pytest.approx(0.0, abs=1e-9)  # identical differences
    assert v["change"] == pytest.approx(-0.075) and v["verdict"] == "not resolved"  # shrinking over 1500-2000
    assert verdict([5.0, 5.1, 5.2], [4.95, 5.05, 5.15], _gap(0.05, 0.05), 2000, 1000, True)["verdict"] == "reproduced"


def test_learning_rate_choice_per_model_or_shared():
    rows = [
        {"kind": "lr", "variant": v, "lr": lr, "val_loss": loss}
        for v, losses in (("dense", (5.9, 5.8, 5.85)), ("down_proj-8", (6.0, 5.9, 5.7)))
        for lr, loss in zip((1e-3, 2e-3, 4e-3), losses)
    ]
    got = choose_lrs(rows)
    assert (got["dense"], got["moe"], got["shared"]) == (2e-3, 4e-3, False)
    assert got["val"]["dense"] == {"0.001": 5.9, "0.002": 5.8, "0.004": 5.85}
    rows[-1]["val_loss"] = 6.1
    assert choose_lrs(rows)["shared"] and choose_lrs(rows)["moe"] == 2e-3
    with pytest.raises(ValueError, match="no row for 'up_proj-8'"):
        choose_lrs(rows, ("dense", "up_proj-8"))


def test_crossing_point_is_where_moe_goes_below_dense_for_good():
    assert crossing([(0, -0.1), (100, -0.02), (200, 0.02), (300, 0.05)]) == pytest.approx(150)
    assert crossing([(0, -0.1), (100, 0.02), (200, -0.01)]) is None  # crossed back
    assert crossing([(0, 0.1), (100, 0.2)]) is None  # never behind


def test_crossing_text_says_why_there_is_no_crossing():
    assert crossing_text([(0, -0.1), (100, -0.02), (200, 0.02), (300, 0.05)], 10) == "1,500 tokens"
    assert crossing_text([(250, 0.04), (500, 0.1)], 2048) == (
        "none, the MoE is below dense at every evaluation (the first at 512,000 tokens)"
    )
    assert crossing_text([(0, 0.1), (100, -0.02)], 10) == "none, the MoE is not below dense at the end"
    assert crossing_text([], 10) == "none, the MoE is not below dense at the end"


# ----- runs -----


def test_upcycled_branch_continues_the_dense_run_from_its_snapshot(corpora):
    common = [
        *TINY,
        "max_steps=6",
        "ckpt_every_steps=100",
        "zero_shot_items=0",
        "eval_every_steps=2",
        "router_windows=64",
    ]
    dense_dir, branch_dir = corpora / "dense", corpora / "branch"
    dense = train_lm(
        load_lm_config("configs/lm-small.yaml", [*common, f"output_dir={dense_dir}", "branch.snapshot_step=3"])
    )
    assert (dense_dir / "snapshot" / "step.txt").read_text().strip() == "3" and dense["threads"] == 1
    rows = [json.loads(x) for x in (dense_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "val"] == [2, 3, 4, 6]  # 3: the branch point

    moe = [*common, "model.moe_projections=[down_proj]", "model.num_experts=4", f"output_dir={branch_dir}"]
    train_lm(
        load_lm_config(
            "configs/lm-small.yaml", [*moe, f"branch.from_snapshot={dense_dir / 'snapshot'}", "branch.start_step=3"]
        )
    )
    rows = [json.loads(x) for x in (branch_dir / "metrics.jsonl").read_text().splitlines()]
    dense_rows = [json.loads(x) for x in (dense_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 5, 6]  # the second half only
    dense_lr = {r["step"]: r["lr"] for r in dense_rows if r["split"] == "train"}
    assert all(r["lr"] == pytest.approx(dense_lr[r["step"]]) for r in train)  # the dense run's schedule
    router = [r for r in rows if r["split"] == "router"]
    assert [r["step"] for r in router] == [4, 6] and len(router[0]["routers"]) == 2  # two layers
    for s in router[-1]["routers"]:
        assert s["projection"] == "down_proj" and sum(s["share"]) == pytest.approx(1.0, abs=1e-3)
        assert 0.25 <= s["top1_prob"] <= 1.0
    weights = load_file(branch_dir / "model" / "model.safetensors")
    assert weights["model.layers.0.mlp.down_proj.weight"].shape[0] == 4  # experts


def test_moe_training_gives_the_same_weights_with_one_or_two_threads(corpora):
    """Determinism across torch thread counts (issue 13): same seed, same weights, bit for bit."""
    size = ["model.hidden_size=128", "model.intermediate_size=512", "model.num_experts=8"]
    common = [*TINY, *size, "model.moe_projections=[down_proj]", "max_steps=3", "zero_shot_items=0"]
    out = {}
    try:
        for threads in (1, 2):
            cfg = load_lm_config(
                "configs/lm-small.yaml", [*common, f"threads={threads}", f"output_dir={corpora}/t{threads}"]
            )
            train_lm(cfg)
            out[threads] = load_file(corpora / f"t{threads}" / "model" / "model.safetensors")
    finally:
        torch.set_num_threads(1)
    assert out[1].keys() == out[2].keys() and all(torch.equal(out[1][k], out[2][k]) for k in out[1])


def test_lm_finetune_cls_command(corpora, capsys):
    run = corpora / "run"
    train_lm(load_lm_config("configs/lm-small.yaml", [*TINY, "max_steps=2", "zero_shot_items=0",
                                                                 f"output_dir={run}"]))  # fmt: skip
    args = ["lm", "finetune-cls", str(run / "model"), "--task", "source", "--steps", "2", "--batch-size", "4",
            "--max-len", "32", "--output", str(corpora / "cls")]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["labels"] == ["gutenberg", "sotu", "brown"] and 0 <= result["acc"] <= 1 and result["steps"] == 2
    assert result["test_items"] % 3 == 0  # balanced
    assert json.loads((corpora / "cls" / "summary.json").read_text())["acc"] == result["acc"]
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(corpora / "cls" / "classifier")) == 300  # saved beside the classifier
    with pytest.raises(SystemExit) as e:  # argparse's choices
        main(["lm", "finetune-cls", str(run / "model"), "--task", "sentiment"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "invalid choice: 'sentiment'" in err and "brown-genre" in err
    for flags, message in (
        (["--lr", "-1"], "lr=-1.0 is invalid"),
        (["--lr", "0"], "lr=0.0 is invalid"),
        (["--lr", "nan"], "lr=nan is invalid"),
        (["--threads", "0"], "threads=0 is invalid"),
        (["--threads", "-1"], "threads=-1 is invalid"),
    ):
        assert main(["lm", "finetune-cls", str(run / "model"), "--steps", "1", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err

    # the classifier/ it wrote is not a language model: lm eval and lm finetune-cls say so in one line
    for command in (["lm", "eval"], ["lm", "finetune-cls", "--steps", "1"]):
        assert main([*command, str(corpora / "cls" / "classifier"), "--data", str(run / "model")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "(a fine-tuned classifier), not a language model" in err


def test_finetune_cls_is_a_run_that_resumes_exactly_and_holds_its_lock(corpora, monkeypatch):
    """Stopped at step 3 (it saves there), the fine-tune resumes to the uninterrupted run's classifier and result;
    a finished run returns its result; a second process on the same directory is refused."""
    from parameternet.errors import ParameterNetError
    from parameternet.runs import RunInterrupted, RunLock
    from parameternet.train import lm_cls

    run = corpora / "run"
    train_lm(load_lm_config("configs/lm-small.yaml", [*TINY, "max_steps=2", "zero_shot_items=0",
                                                      f"output_dir={run}"]))  # fmt: skip
    kw = dict(task="source", steps=4, batch_size=4, max_len=32, train_per_class=8, test_per_class=4, threads=1)
    whole = lm_cls.finetune_classifier(run / "model", output=corpora / "whole", **kw)
    assert json.loads((corpora / "whole" / "summary.json").read_text()) == whole

    class StopAtStep3(lm_cls.ClassifierTask):
        def train_step(self, batch):
            values = super().train_step(batch)
            if self.step == 3:
                self.stop.signum = signal.SIGTERM
            return values

    monkeypatch.setattr(lm_cls, "ClassifierTask", StopAtStep3)
    with pytest.raises(RunInterrupted, match="at step 3"):
        lm_cls.finetune_classifier(run / "model", output=corpora / "cut", **kw)
    monkeypatch.setattr(lm_cls, "ClassifierTask", StopAtStep3.__base__)
    resumed = lm_cls.finetune_classifier(run / "model", output=corpora / "cut", **kw)
    same = ("acc", "train_loss", "steps", "test_items")
    assert {k: resumed[k] for k in same} == {k: whole[k] for k in same}
    a, b = (load_file(corpora / d / "classifier" / "model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert lm_cls.finetune_classifier(run / "model", output=corpora / "cut", **kw)["wall_s"] == resumed["wall_s"]
    with RunLock(corpora / "held"), pytest.raises(ParameterNetError, match="run.lock"):
        lm_cls.finetune_classifier(run / "model", output=corpora / "held", **kw)


def test_lm_eval_and_finetune_cls_refuse_models_and_data_they_cannot_use(corpora, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from parameternet.data.text import prepare_text_data
    from parameternet.models.llama_moe import ParameterNetLlamaForCausalLM

    run = corpora / "run"
    train_lm(load_lm_config("configs/lm-small.yaml", [*TINY, "max_steps=1", "zero_shot_items=0",
                                                                 f"output_dir={run}"]))  # fmt: skip
    data = load_lm_config("configs/lm-small.yaml", TINY).data.prepare().root
    api = corpora / "api"  # a ParameterNet model saved through the Python API: no tokenizer
    ParameterNetLlamaForCausalLM.from_pretrained(run / "model").save_pretrained(api)
    llama = corpora / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(llama)  # fmt: skip
    vision = corpora / "vision"
    vision.mkdir()
    (vision / "final.safetensors").write_bytes(b"")
    cases = [
        (api, "has no tokenizer (tokenizer.json); pass the model/ directory an lm train run wrote, or save the "
              "tokenizer beside the model"),
        (llama, "has model_type 'llama', not 'parameternet_llama'"),
        (vision, "has no config.json"),
        (corpora / "nowhere", "does not exist or is not a directory"),
    ]  # fmt: skip
    assert main(["lm", "eval", str(run / "model"), "--data", str(data), "--items", "0", "--val-tokens", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["val"]["tokens"] == 2 * 31  # the run's own text passes the checks
    assert main(["lm", "eval", str(run / "model"), "--data", str(data), "--items", "0", "--val-tokens", "5"]) == 2
    assert "--val-tokens 5 is less than one window of the model's" in capsys.readouterr().err
    for model, message in cases:
        for command in (["lm", "eval", "--items", "0"], ["lm", "finetune-cls", "--steps", "1"]):
            assert main([*command, str(model), "--data", str(data)]) == 2
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and message in err, (command, model, err)

    # prepared text other than the run's: another vocabulary, or other splits (held-out documents it trained on)
    other_vocab = prepare_text_data(corpora / "v320", vocab_size=320, val_fraction=0.2, eval_fraction=0.2).root
    other_split = prepare_text_data(corpora / "split", vocab_size=300, val_fraction=0.1, eval_fraction=0.2).root
    capsys.readouterr()
    for other, message in (
        (other_vocab, "uses a 320-token vocabulary"),
        (other_split, "val_fraction=0.1 (the run: 0.2)"),
    ):
        for command in (["lm", "eval", "--items", "0"], ["lm", "finetune-cls", "--steps", "1"]):
            assert main([*command, str(run / "model"), "--data", str(other)]) == 2
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and message in err, (command, other, err)


def test_report_lines_for_the_gap_and_the_routers():
    assert lm_report.gap_text([(250, 0.0164), (500, -0.1)], 2048) == "512,000 tokens +0.016; 1,024,000 tokens -0.100"
    assert lm_report.gap_text([], 2048) == "no shared evaluation"

    def row(kind, variant, seed, step, layer, top1, hi, lo):
        return dict(kind=kind, variant=variant, seed=seed, step=step, tokens=step * 10, layer=layer,
                    top1_prob=top1, max_share=hi, min_share=lo)  # fmt: skip

    router = [
        row("main", "down_proj-4", 0, 5, 0, 0.4, 0.5, 0.1), row("main", "down_proj-4", 0, 5, 1, 0.6, 0.4, 0.2),
        row("main", "down_proj-4", 0, 9, 0, 0.99, 0.97, 0.0), row("main", "down_proj-4", 0, 9, 1, 0.7, 0.3, 0.2),
        row("lr", "down_proj-4", 0, 9, 0, 0.1, 0.99, 0.0),  # learning-rate runs are left out
    ]  # fmt: skip
    first, dead = lm_report.router_summary(router)
    assert first == (
        "Routers of down_proj-4 (1 seed x 2 layers; balanced share 0.250): mean top-1 probability 0.40-0.60 at 50 "
        "tokens, 0.70-0.99 at 90; largest expert share 0.40-0.50 -> 0.30-0.97; smallest 0.10-0.20 -> 0.00-0.20."
    )
    assert dead.endswith(": down_proj-4 seed 0 layer 0 (0.97).")
    assert lm_report.router_summary(router[:2])[-1].endswith(": none.")


def test_preset_eval_tokens_cap_the_validation_and_the_estimate(tmp_path):
    # the full preset validates on the whole split (the committed grid's recipe); smoke on a few windows
    assert lm.PRESETS["full"].eval_tokens is None and lm.PRESETS["smoke"].eval_tokens == 4096
    speed = {"dense": 1000.0, "moe": 1000.0}
    smoke = lm.PRESETS["smoke"]
    capped = lm_estimate.estimate_wall_s(smoke, speed, train_tokens=10**6, val_tokens=10**7, per_step=128)
    assert capped == lm_estimate.estimate_wall_s(smoke, speed, train_tokens=10**6, val_tokens=4096, per_step=128)
    uncapped = lm_estimate.estimate_wall_s(
        dataclasses.replace(smoke, eval_tokens=None), speed, train_tokens=10**6, val_tokens=10**7, per_step=128
    )
    assert uncapped["total"] > 10 * capped["total"]
    task = lm_grid.Task("lr", "dense", 0, 0.004, [], tmp_path, "r")
    assert task.name == "lr dense seed 0 lr 0.004"
    assert dataclasses.replace(task, kind="main").name == "main dense seed 0"


def test_brown_genre_labels():
    from parameternet.train.lm_cls import label_of

    assert label_of("brown-genre", "brown/ca01") == 0 and label_of("brown-genre", "brown/cj80") == 0
    assert label_of("brown-genre", "brown/ck01") == 1 and label_of("brown-genre", "brown/cr09") == 1
    assert label_of("brown-genre", "sotu/1790_washington") is None
    assert label_of("source", "gutenberg/austen-emma.txt#003") == 0


def test_rows_without_the_later_columns_gain_them_and_a_foreign_csv_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # rows written before heldout_loss existed: the column is added, empty (not measured), the rows kept
    before = [c for c in lm.COLUMNS if c != "heldout_loss"]
    old = {c: "" for c in before} | {"kind": "main", "preset": "full", "variant": "dense", "val_loss": "4.5"}
    append_rows(out / "runs.csv", [old], before)
    lm_rows.check_header(out / "runs.csv", lm.COLUMNS)
    assert list(_csv(out / "runs.csv")[0]) == list(lm.COLUMNS)
    (row,) = lm.read_rows(out / "runs.csv")
    assert row["val_loss"] == 4.5 and row["heldout_loss"] is None and row["variant"] == "dense"
    (out / "curves.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other columns.*--output"):
        lm_rows.check_header(out / "curves.csv", lm_rows.CURVE_COLUMNS)


def test_lm_experiment_bad_input_in_one_line(capsys, tmp_path):
    for extra in ([], ["--estimate"], ["--report-only"]):
        assert main(["lm", "experiment", "--preset", "smoke", "--jobs", "0", *extra]) == 2
        assert "--jobs must be an integer >= 1, got 0" in capsys.readouterr().err
    out = tmp_path / "out"
    for override, message in (
        ("max_steps=-1", "max_steps=-1 is invalid"),
        ("eval_batch_size=0", "eval_batch_size=0 is invalid"),
        ("max_steps=5", "override 'max_steps=5' sets max_steps, which lm experiment sets for each run"),
        ("optim.lr=1", "sets optim.lr"),
        ("threads=2", "sets threads"),
    ):
        args = ["lm", "experiment", "--preset", "smoke", "--output", str(out), "--runs", str(tmp_path / "runs")]
        assert main([*args, override]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err
        assert not out.exists() and not (tmp_path / "runs").exists()  # refused before anything was made
    with pytest.raises(ValueError, match="variant 'down-8' is unknown"):
        lm.Variant.parse("down-8")


def test_a_grid_of_another_base_recipe_is_refused_in_the_same_output(tmp_path):
    small = lm.check_inputs(lm.PRESETS["smoke"], "configs/lm-small.yaml")
    lm.check_grid(tmp_path, "smoke", small)
    lm.check_grid(tmp_path, "smoke", small)  # the same grid resumes
    wider = lm.check_inputs(lm.PRESETS["smoke"], "configs/lm-small.yaml", ["model.hidden_size=64"])
    with pytest.raises(ValueError, match=r"holds the smoke grid of another base recipe \(model.hidden_size=32 there"):
        lm.check_grid(tmp_path, "smoke", wider)
    lm.check_grid(tmp_path, "quick", wider)  # each preset records its own
    assert set(json.loads((tmp_path / "grid.json").read_text())) == {"smoke", "quick"}
    (tmp_path / "grid.json").write_text("{not json")
    with pytest.raises(ValueError, match="grid.json' is not valid JSON; delete it"):
        lm.check_grid(tmp_path, "smoke", small)


def test_a_grid_records_the_device_it_trains_on_and_refuses_another(tmp_path, monkeypatch, capsys):
    h200 = {"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0"}
    lm_grid.check_hardware(tmp_path, h200)
    lm_grid.check_hardware(tmp_path, dict(h200, torch="2.12.0"))  # the same GPU resumes
    with pytest.raises(ValueError, match=r"trained on 'NVIDIA H200'; this run would train on 'cpu'; pass another"):
        lm_grid.check_hardware(tmp_path, lm_grid.hardware("cpu"))
    assert lm_grid.hardware_line(tmp_path) == ["Trained on one NVIDIA H200 (torch 2.11.0, CUDA 13.0).", ""]
    cpu = tmp_path / "cpu"
    lm_grid.check_hardware(cpu, lm_grid.hardware("cpu"))
    assert lm_grid.hardware_line(cpu) == [] and lm_grid.hardware_line(tmp_path / "none") == []
    for bad in ("[]", "null", "{}", '{"device": null}', '"NVIDIA H200"', '{"device":'):
        (cpu / "hardware.json").write_text(bad)
        for call in (lambda: lm_grid.check_hardware(cpu, h200), lambda: lm_grid.hardware_line(cpu)):
            with pytest.raises(ValueError, match=r"hardware.json' is not a device record .* delete it"):
                call()
    (cpu / "hardware.json").write_text('{"device": "NVIDIA H200"}')  # versions are optional in the report
    assert lm_grid.hardware_line(cpu) == ["Trained on one NVIDIA H200.", ""]

    # The gpu preset on a machine without CUDA: one sentence and exit 2 before any directory is made.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda:1' but no CUDA device is visible; use device=cpu"):
        lm_grid.hardware("cuda:1")
    assert lm_grid.hardware("auto") == {"device": "cpu"}
    out, runs = tmp_path / "gpu", tmp_path / "runs"
    assert main(["lm", "experiment", "--preset", "gpu", "--output", str(out), "--runs", str(runs)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device is visible; use device=cpu" in err
    assert not out.exists() and not runs.exists()
    assert main(["lm", "experiment", "--preset", "gpu", "--estimate"]) == 2  # no GPU here: the same sentence
    assert "no CUDA device is visible; use device=cpu" in capsys.readouterr().err
    monkeypatch.setattr(lm_grid, "hardware", lambda device: {"device": "NVIDIA H200"})
    monkeypatch.setattr(lm_estimate, "hardware", lambda device: {"device": "NVIDIA H200"})
    assert main(["lm", "experiment", "--preset", "gpu", "--estimate"]) == 2
    assert "--estimate times one-thread CPU steps, and preset 'gpu' trains on a GPU" in capsys.readouterr().err


def test_a_grid_on_another_device_is_refused_before_the_data_or_the_grid_record(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "hardware.json").write_text('{"device": "NVIDIA H200"}')
    monkeypatch.setattr(LMDataConfig, "prepare", lambda self: pytest.fail("the data was prepared"))
    args = ["lm", "experiment", "--preset", "smoke", "--output", str(out), "--runs", str(tmp_path / "runs")]
    assert main(args) == 2
    assert "holds a grid trained on 'NVIDIA H200'; this run would train on 'cpu'" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["hardware.json"] and not (tmp_path / "runs").exists()


def test_the_gpu_preset_is_the_main_comparison_at_hidden_512():
    p = lm.PRESETS["gpu"]
    cfg = lm.check_inputs(p, "configs/lm-small.yaml")
    assert (cfg.device, cfg.batch_size, cfg.model.hidden_size, cfg.model.num_hidden_layers) == ("cuda", 64, 512, 8)
    assert dict(p.main) == {lm.DENSE: (0, 1, 2), lm.MOE8: (0, 1, 2)} and p.corpus_fraction == 1.0
    assert not p.upcycle_seeds and not p.cls_variants
    assert lm.default_output("gpu").as_posix() == "results/lm-gpu"


def test_estimate_uses_the_jobs_given(corpora, monkeypatch):
    monkeypatch.setattr(lm_estimate, "measure_tokens_per_s", lambda *a, **k: {"dense": 1000.0, "moe": 800.0})
    one = lm_estimate.estimate_text("configs/lm-small.yaml", lm.PRESETS["smoke"], jobs=1)
    assert "on 1 core (one one-thread run at a time)" in one
    three = lm_estimate.estimate_text("configs/lm-small.yaml", lm.PRESETS["smoke"], jobs=3)
    assert "on 3 cores (3 one-thread runs side by side)" in three


def test_report_only_names_what_the_output_directory_holds(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert main(["lm", "experiment", "--report-only", "--output", str(missing)]) == 2
    assert f"'{missing}' does not exist" in capsys.readouterr().err and not missing.exists()
    out = tmp_path / "out"
    out.mkdir()
    assert main(["lm", "experiment", "--report-only", "--output", str(out)]) == 2
    assert f"'{out / 'runs.csv'}' does not exist" in capsys.readouterr().err
    row = {c: "" for c in lm.COLUMNS} | {"kind": "main", "preset": "smoke", "variant": "dense", "seed": "0"}
    append_rows(out / "runs.csv", [row], lm.COLUMNS)
    assert main(["lm", "experiment", "--report-only", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no rows of preset 'full', only of 'smoke'; pass --preset NAME, e.g. --preset smoke" in err
    assert err.count("\n") == 0


# ----- the grid end to end -----


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_smoke_grid_runs_resumes_and_reports(corpora, caplog):
    out, runs = corpora / "out", corpora / "runs"
    args = ["lm", "experiment", "--preset", "smoke", "--output", str(out), "--runs", str(runs), "--jobs", "2"]
    assert main(args) == 0
    rows = lm.read_rows(out / "runs.csv")
    assert list(_csv(out / "runs.csv")[0]) == list(lm.COLUMNS)
    kinds = sorted((r["kind"], r["variant"], r["seed"]) for r in rows)
    p = lm.PRESETS["smoke"]
    assert len(kinds) == len(p.lrs) * 2 + 5 + len(p.upcycle_seeds) + 2
    prov = provenance()
    assert all(r["commit"] == prov["commit"] and r["threads"] == 1 for r in rows)
    chosen = json.loads((out / "lr.json").read_text())
    main_lrs = {r["variant"]: r["lr"] for r in rows if r["kind"] == "main"}
    assert main_lrs["dense"] == chosen["dense"] and main_lrs["down_proj-4"] == chosen["moe"]
    up = [r for r in rows if r["kind"] == "upcycle"]
    assert all(r["start_step"] == 4 and r["tokens"] == 4 * 4 * 32 for r in up)
    assert {r["kind"] for r in lm.read_rows(out / "router.csv")} >= {"main", "upcycle"}
    table = (out / "table7.md").read_text()
    for text in ("| LLaMA (dense) | - |", "| MoE on down | 4 |", "Verdict, dense vs down_proj-4", "Upcycling",
                 "Fine-tuned classifier (source", "Learning-rate check", "runs (lr ", ", main ", ", cls "):  # fmt: skip
        assert text in table

    # a rerun trains nothing; the report-only path redraws the plots from the CSVs alone
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    assert "  start " not in caplog.text
    (out / "loss_curves.png").unlink()
    assert main(["lm", "experiment", "--preset", "smoke", "--output", str(out), "--report-only"]) == 0
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG" and (out / "router.png").is_file()

    # rows of other code are neither reused nor pooled
    text = (out / "runs.csv").read_text().splitlines(True)
    other = text[1].replace(prov["commit"], "0" * 40)
    (out / "runs.csv").write_text("".join([*text, other]))
    assert "1 rows from other code were left out" in lm_report.report(out, preset="smoke")
