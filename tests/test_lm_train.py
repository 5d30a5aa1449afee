"""lm train end to end on a tiny model and fake corpora: outputs, Auto-class loading, resume, recipes, experiment."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

import parameternet
from parameternet.cli import main
from parameternet.errors import ParameterNetError
from parameternet.train.lm import load_lm_config, train_lm
from test_lm_text import make_fake_corpora

TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_hidden_layers=2",
    "model.num_experts=4",
    "data.vocab_size=300",
    "data.val_fraction=0.2",
    "data.eval_fraction=0.2",
    "data.seq_len=32",
    "batch_size=4",
    "max_steps=4",
    "schedule.warmup_steps=1",
    "log_every=1",
    "eval_tokens=256",
    "eval_batch_size=8",
    "zero_shot_items=8",
    "threads=1",
    "progress=false",
]


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    make_fake_corpora(tmp_path / "cache", monkeypatch)
    return tmp_path


def test_lm_train_outputs_load_with_auto_classes(corpora, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = corpora / "run"
    with caplog.at_level(logging.INFO):
        summary = train_lm(
            load_lm_config("configs/lm-small.yaml", [*TINY, "model.moe_projections=[up_proj]", f"output_dir={out}"])
        )
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 4 * 32
    assert "-parameter LLaMA (4 experts on up_proj) for 4 steps" in caplog.text
    assert set(summary["zero_shot"]) == {"next_sentence", "last_word"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4] and all(r["aux_loss"] > 0.9 for r in train_rows)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.moe_projections == ["up_proj"] and len(tokenizer) == model.config.vocab_size == 300
    ids = tokenizer("The river stone", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    loaded = parameternet.load(out)  # the run directory: its model/
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_lm_train_lr_schedule_ends_at_a_tenth_of_the_peak(corpora, caplog):
    out = corpora / "run"
    with caplog.at_level(logging.INFO):
        train_lm(load_lm_config("configs/lm-small.yaml", [*TINY, "zero_shot_items=0", f"output_dir={out}"]))
    assert "-parameter LLaMA (dense) for 4 steps" in caplog.text  # the start line names what trains
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["split"] == "train"]
    peak = 1e-3  # configs/lm-small.yaml
    assert max(lrs) == pytest.approx(peak) and lrs[-1] == pytest.approx(0.1 * peak)


def test_short_lm_train_says_it_shortens_the_warmup_and_timm_stays_quiet(corpora, caplog):
    """lm-small's 13 warmup steps do not fit in a 3-step run: lm train says it warms up over 2 steps, and timm's
    warning about a one-step cosine ("will have no effect") does not reach the user."""
    out = corpora / "run"
    argv = [o for o in TINY if not o.startswith(("max_steps", "schedule.warmup_steps"))]
    with caplog.at_level(logging.INFO):
        assert (
            main(
                ["lm", "train", "configs/lm-small.yaml", *argv, "max_steps=3", "zero_shot_items=0", f"output_dir={out}"]
            )
            == 0
        )
    said = [r for r in caplog.records if "warmup" in r.getMessage()]
    assert [r.getMessage() for r in said] == [
        "schedule.warmup_steps=13 does not fit in this run's 3 steps: warming up over 2 steps instead, so that the "
        "cosine still ends at 0.1 of the peak learning rate"
    ]
    assert said[0].levelno == logging.WARNING
    assert "will have no effect" not in caplog.text and not [r for r in caplog.records if r.name.startswith("timm")]
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert lrs[-1] == pytest.approx(0.1e-3)  # the schedule the message promises

    caplog.clear()
    with caplog.at_level(logging.INFO):  # a warmup that fits: nothing said
        train_lm(load_lm_config("configs/lm-small.yaml", [*TINY, "zero_shot_items=0", f"output_dir={corpora / 'b'}"]))
    assert "warmup" not in caplog.text


def test_lm_train_resume_ends_with_the_same_weights(corpora):
    common = [*TINY, "max_steps=6", "ckpt_every_steps=3", "zero_shot_items=0", "model.moe_projections=[down_proj]"]
    a, b = corpora / "a", corpora / "b"
    train_lm(load_lm_config("configs/lm-small.yaml", [*common, f"output_dir={a}"]))
    train_lm(load_lm_config("configs/lm-small.yaml", [*common, f"output_dir={b}"]))
    # Pretend b was killed after its step-3 checkpoint: drop everything written later, resume.
    for name in ("step_0000006.safetensors", "step_0000006.state.pt"):
        (b / "checkpoints" / name).unlink()
    shutil.rmtree(b / "model")
    (b / "summary.json").unlink()
    with pytest.raises(ParameterNetError, match="resume=auto"):
        train_lm(load_lm_config("configs/lm-small.yaml", [*common, f"output_dir={b}"]))
    changed = ["optim.lr=2e-3", "max_steps=8"]  # the restored optimizer and schedule would keep the old ones
    refused = r"would change the run's recipe \(max_steps 6 -> 8, optim.lr 0.001 -> 0.002\); resume without changing"
    with pytest.raises(ParameterNetError, match=refused) as e:
        train_lm(load_lm_config("configs/lm-small.yaml", [*common, f"output_dir={b}", "resume=auto", *changed]))
    assert str(e.value).endswith("or start a new output_dir")  # no init_from=: the LM recipe has no such key
    # where and how often the run checkpoints may change: same weights and rows
    train_lm(load_lm_config("configs/lm-small.yaml", [*common, f"output_dir={b}", "resume=auto", "keep_last=3"]))
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "metrics.jsonl").read_text().count('"split": "train"') == 6
    strip = [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in (b / "metrics.jsonl").open()]
    ref = [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in (a / "metrics.jsonl").open()]
    assert strip == ref


def test_lm_recipe_errors(tmp_path):
    with pytest.raises(ParameterNetError, match="did you mean 'model.num_experts'"):
        load_lm_config("configs/lm-small.yaml", ["model.num_expert=4"])
    with pytest.raises(ParameterNetError, match="grad_accum"):
        load_lm_config("configs/lm-small.yaml", ["grad_accum=3"])
    with pytest.raises(ParameterNetError, match="unknown projection 'gate'"):
        load_lm_config("configs/lm-small.yaml", ["model.moe_projections=[gate]"])
    with pytest.raises(ParameterNetError, match="does not exist"):
        load_lm_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden: 3\n")
    with pytest.raises(ParameterNetError, match="unknown recipe key 'model.hidden'"):
        load_lm_config(bad)
    cfg = load_lm_config("configs/lm-small.yaml", ["model.moe_projections=[down_proj]", "optim.betas=[0.9,0.99]"])
    assert cfg.model.moe_projections == ["down_proj"] and cfg.optim.betas == [0.9, 0.99]
    assert load_lm_config("configs/lm-1b-moe-down.yaml").total_steps == 21457


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_tokens=-1", "max_tokens=-1 is invalid"),
        ("max_tokens=10", "max_tokens=10 is invalid; it must be at least one batch, batch_size x data.seq_len = 2048"),
        ("max_tokens=null", "max_tokens=None is invalid; it must be set (or set max_steps)"),
        ("eval_batch_size=0", "eval_batch_size=0 is invalid"),
        ("eval_tokens=0", "eval_tokens=0 is invalid; it must be null (the whole validation split) or at least"),
        ("eval_tokens=127", "data.seq_len=128"),
        ("zero_shot_items=-1", "zero_shot_items=-1 is invalid"),
        ("eval_every_steps=-1", "eval_every_steps=-1 is invalid"),
        ("ckpt_every_steps=-1", "ckpt_every_steps=-1 is invalid"),
        ("model.num_hidden_layers=0", "model.num_hidden_layers=0 is invalid"),
        ("model.intermediate_size=0", "model.intermediate_size=0 is invalid"),
        ("data.corpora=[brown,mnist]", "unknown text corpus 'mnist'; choose from gutenberg, sotu, brown"),
    ],
)
def test_lm_recipe_values_out_of_range_are_one_sentence(override, message):
    with pytest.raises(ParameterNetError) as e:
        load_lm_config("configs/lm-small.yaml", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lm_recipe_values_the_experiment_uses_stay_valid():
    ok = ["eval_tokens=null", "eval_every_steps=0", "zero_shot_items=0", "ckpt_every_steps=0", "threads=null"]
    cfg = load_lm_config("configs/lm-small.yaml", [*ok, "max_tokens=2048", "device=cuda:1"])
    assert cfg.total_steps == 1 and cfg.eval_tokens is None
    assert load_lm_config("configs/lm-small.yaml", ["max_tokens=null", "max_steps=3"]).total_steps == 3


def test_cli_lm_train_reports_bad_input_in_one_line(capsys):
    assert main(["lm", "train", "configs/lm-small.yaml", "model.num_experts_per_tok=9", "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "num_experts_per_tok=9" in err
    assert main(["lm", "train", "configs/smoke.yaml"]) == 2  # a vision recipe
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "must be a mapping of its keys, not 'test_resnet'" in err
    assert "a recipe for another command (`parameternet train` takes image-classification recipes" in err
