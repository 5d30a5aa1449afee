"""Zero-shot multiple-choice tasks built from held-out real text (stand-ins for the paper's ARC / HellaSwag, Table 7).

No benchmark set exists offline, so the tasks are built from the held-out documents of
:mod:`parameternet.data.text`, which no model trains on. Every item is a context and four continuations, one of
them true, scored by the model's log-likelihood of each continuation (the lm-evaluation-harness protocol):

- ``next_sentence`` (HellaSwag-like): up to three sentences of a document, then the true next sentence against
  three sentences of similar length taken from other held-out documents.
- ``last_word`` (LAMBADA-like cloze): a passage of consecutive sentences without its last word; the true word
  against three last words of other passages.

Continuations carry their leading space, so ``context + choice`` is the original text. Items depend only on the
documents and the seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from parameternet.errors import ParameterNetError

__all__ = ["TASKS", "Item", "build_tasks", "read_items", "sentences", "write_items"]

TASKS = ("next_sentence", "last_word")

# After . ! ? (and any closing quote or bracket), before an optional opening one and a capital.
_SENTENCE_END = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]["\')\]]))\s+(?=["\'(\[]?[A-Z])')
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})(?P<tail>[.!?;:,\"')\]]*)$", re.DOTALL)


@dataclass(frozen=True)
class Item:
    task: str
    doc_id: str
    context: str
    choices: list[str]
    label: int


def sentences(text: str) -> list[str]:
    """Sentences of a text: split after ``. ! ?`` (and closing quotes) before a capital; whitespace collapsed."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]


def _docs_sentences(docs: Sequence) -> list[tuple[str, list[str]]]:
    return [(d.id, sentences(d.text)) for d in docs]


def _next_sentence(per_doc, n_items: int, rng: random.Random) -> list[Item]:
    pool = [(doc_id, s) for doc_id, sents in per_doc for s in sents if 20 <= len(s) <= 300]
    candidates = [
        (doc_id, sents, i)
        for doc_id, sents in per_doc
        for i in range(1, len(sents))
        if 20 <= len(sents[i]) <= 300 and len(sents[i - 1]) >= 20
    ]
    rng.shuffle(candidates)
    items = []
    for doc_id, sents, i in candidates:
        true = sents[i]
        similar = [s for d, s in pool if d != doc_id and 0.67 * len(true) <= len(s) <= 1.5 * len(true)]
        if len(similar) < 3:
            continue
        choices = [" " + true] + [" " + s for s in rng.sample(similar, 3)]
        order = list(range(4))
        rng.shuffle(order)
        context = " ".join(sents[max(0, i - 3) : i])
        items.append(Item("next_sentence", doc_id, context, [choices[j] for j in order], order.index(0)))
        if len(items) == n_items:
            break
    return items


def _last_word(per_doc, n_items: int, rng: random.Random) -> list[Item]:
    passages = []
    for doc_id, sents in per_doc:
        for i in range(0, len(sents) - 2, 3):
            passage = " ".join(sents[i : i + 3])
            m = _LAST_WORD.match(passage)
            if m and len(m["context"]) >= 100:
                passages.append((doc_id, m["context"], m["word"]))
    rng.shuffle(passages)
    words = sorted({w for _, _, w in passages})
    items = []
    for doc_id, context, word in passages:
        others = [w for w in rng.sample(words, min(len(words), 12)) if w.lower() != word.lower()][:3]
        if len(others) < 3:
            continue
        choices = [" " + word] + [" " + w for w in others]
        order = list(range(4))
        rng.shuffle(order)
        items.append(Item("last_word", doc_id, context, [choices[j] for j in order], order.index(0)))
        if len(items) == n_items:
            break
    return items


def build_tasks(docs: Sequence, n_items: int = 500, seed: int = 0, tasks: Sequence[str] = TASKS) -> dict:
    """``{task: [Item, ...]}`` from held-out documents (objects with ``id`` and ``text``)."""
    for task in tasks:
        if task not in TASKS:
            raise ParameterNetError(f"unknown zero-shot task {task!r}; choose from {', '.join(TASKS)}")
    per_doc = _docs_sentences(docs)
    builders = {"next_sentence": _next_sentence, "last_word": _last_word}
    out = {task: builders[task](per_doc, n_items, random.Random(f"{seed}-{task}")) for task in tasks}
    for task, items in out.items():
        if not items:
            raise ParameterNetError(f"the held-out documents yield no {task} items; hold out more text")
    return out


def write_items(items: Sequence[Item], path: str | Path) -> None:
    """JSONL, one item per line: ``context``, ``choices``, ``label`` (the lm-evaluation-harness local format)."""
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(asdict(item)) + "\n")


def read_items(path: str | Path) -> list[Item]:
    with open(path, encoding="utf-8") as f:
        return [Item(**json.loads(line)) for line in f if line.strip()]
