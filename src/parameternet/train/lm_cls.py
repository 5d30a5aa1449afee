"""Fine-tuning a trained language model as a text classifier: the paper's SST-2 protocol (sec. 5.4, Table 7) on
text classification tasks built from the packaged corpora, with held-out documents.

No sentiment set ships offline, so the tasks come from :mod:`parameternet.data.text`'s documents:

- ``brown-genre`` (binary, like SST-2): a Brown passage is *informative* prose (categories A-J: press, religion,
  hobbies, lore, belles-lettres, government, learned) or *imaginative* prose (K-R: fiction, mystery, science
  fiction, adventure, romance, humour), the corpus' own top-level division.
- ``source`` (three classes): whether a passage comes from a Gutenberg book, a State of the Union address or the
  Brown corpus.

Passages are runs of consecutive sentences of ``min_chars``-``max_chars`` characters, at most ``per_doc`` per
document. The classifier trains on passages of the language model's *training* documents and is tested on
passages of its validation and held-out evaluation documents, which neither the language model nor the
classifier ever trained on. Both splits are balanced by sampling the same number of passages per class.

:func:`finetune_classifier` loads a ``model/`` directory written by ``lm train`` as
:class:`~parameternet.models.llama_moe.ParameterNetLlamaForSequenceClassification` (a new ``score`` head; the
router losses stay in the loss), fine-tunes every weight with AdamW (linear warmup over 10% of the steps, then
linear decay to 0) and reports accuracy on the test passages. Dense and MoE models get the same budget: the same
passages in the same order, steps, batch and learning rate.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parameternet.errors import ParameterNetError

__all__ = ["CLS_TASKS", "ClsTask", "build_cls_task", "finetune_classifier", "label_of"]

log = logging.getLogger(__name__)

CLS_TASKS = {
    "brown-genre": ("informative", "imaginative"),
    "source": ("gutenberg", "sotu", "brown"),
}


@dataclass(frozen=True)
class ClsTask:
    name: str
    labels: tuple[str, ...]
    train: list[tuple[str, int]]  # (passage, label)
    test: list[tuple[str, int]]


def label_of(task: str, doc_id: str) -> int | None:
    """The class of a document id (``<corpus>/<file>[#part]``) in ``task``, None when it is not part of it."""
    corpus, _, name = doc_id.partition("/")
    if task == "source":
        return CLS_TASKS["source"].index(corpus) if corpus in CLS_TASKS["source"] else None
    if task == "brown-genre":
        if corpus != "brown" or len(name) < 2 or not "a" <= name[1] <= "r":
            return None
        return 0 if name[1] <= "j" else 1  # A-J informative, K-R imaginative
    raise ParameterNetError(f"unknown classification task {task!r}; choose from {', '.join(CLS_TASKS)}")


def _passages(text: str, min_chars: int, max_chars: int, per_doc: int) -> list[str]:
    from parameternet.data.zero_shot import sentences

    out, current = [], ""
    for s in sentences(text):
        if len(s) > max_chars:
            continue
        if len(current) + len(s) + 1 > max_chars:
            if len(current) >= min_chars:
                out.append(current)
            current = ""
        current = f"{current} {s}".strip()
    if len(current) >= min_chars:
        out.append(current)
    if len(out) > per_doc:  # spread over the document
        step = len(out) / per_doc
        out = [out[int(i * step)] for i in range(per_doc)]
    return out


def _balanced(items: list[tuple[str, int]], n_labels: int, cap: int, rng: random.Random, where: str, task: str):
    by = [[x for x in items if x[1] == k] for k in range(n_labels)]
    n = min(cap, *(len(b) for b in by))
    if n == 0:
        counts = [len(b) for b in by]
        raise ParameterNetError(
            f"the {where} documents give {counts} passages per class for task {task!r}; every class needs one "
            f"(prepare the text with all corpora, or hold out more documents)"
        )
    out = [x for b in by for x in rng.sample(b, n)]
    rng.shuffle(out)
    return out


def build_cls_task(
    data,
    task: str = "brown-genre",
    *,
    min_chars: int = 200,
    max_chars: int = 500,
    per_doc: int = 20,
    train_per_class: int = 2000,
    test_per_class: int = 500,
    seed: int = 0,
) -> ClsTask:
    """The passages of ``task`` from a prepared text directory (:class:`~parameternet.data.text.TextData`)."""
    if task not in CLS_TASKS:
        raise ParameterNetError(f"unknown classification task {task!r}; choose from {', '.join(CLS_TASKS)}")
    labels = CLS_TASKS[task]
    rng = random.Random(f"{seed}-{task}")
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for split, target in (("train", "train"), ("val", "test"), ("eval", "test")):
        for doc in data.documents(split):
            label = label_of(task, doc.id)
            if label is not None:
                splits[target] += [(p, label) for p in _passages(doc.text, min_chars, max_chars, per_doc)]
    return ClsTask(
        task,
        labels,
        _balanced(splits["train"], len(labels), train_per_class, rng, "training", task),
        _balanced(splits["test"], len(labels), test_per_class, rng, "held-out", task),
    )


def _encode(tokenizer, texts: Sequence[str], max_len: int) -> torch.Tensor:
    """``(B, max_len)`` ids, right-padded with the tokenizer's pad id (the head pools the last non-pad token)."""
    pad = tokenizer.pad_token_id
    ids = torch.full((len(texts), max_len), pad, dtype=torch.long)
    for i, text in enumerate(texts):
        row = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
        ids[i, : len(row)] = torch.tensor(row)
    return ids


@torch.no_grad()
def _accuracy(model, tokenizer, items: list[tuple[str, int]], max_len: int, batch_size: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        ids = _encode(tokenizer, [t for t, _ in chunk], max_len)
        pred = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits.argmax(-1)
        correct += (pred == torch.tensor([y for _, y in chunk])).sum().item()
    return correct / len(items)


def finetune_classifier(
    model_dir: str | Path,
    task: str = "brown-genre",
    *,
    data_dir: str | None = None,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    max_len: int = 128,
    train_per_class: int = 2000,
    test_per_class: int = 500,
    seed: int = 0,
    amp: str = "bf16",
    threads: int | None = None,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune the language model in ``model_dir`` on ``task`` and return ``{"acc", "test_items", ...}``.

    ``steps`` optimizer steps of ``batch_size`` passages (each at most ``max_len`` tokens), cycling through the
    training passages in a seeded order. ``output``, when given, receives ``cls.json`` with the result (written
    last, atomically) and the fine-tuned model with its tokenizer in ``classifier/``.

    Raises ParameterNetError, before anything trains, for ``steps``, ``batch_size``, ``max_len``,
    ``train_per_class``, ``test_per_class`` or ``threads`` below 1, an ``lr`` that is not a positive number, a
    negative ``weight_decay``, an unknown ``amp`` or ``task``, a ``model_dir``
    :func:`~parameternet.train.lm_eval.check_saved_lm` refuses, or text
    :func:`~parameternet.train.lm_eval.text_data_for` refuses (another vocabulary, or other splits than the run's).
    """
    from transformers import AutoTokenizer

    import parameternet.models.llama_moe  # noqa: F401  (registers the Auto classes)
    from parameternet.train.lm_eval import check_saved_lm, text_data_for

    _check_arguments(task, lr, weight_decay, amp, steps=steps, batch_size=batch_size, max_len=max_len,
                     train_per_class=train_per_class, test_per_class=test_per_class, threads=threads)  # fmt: skip
    model_dir = check_saved_lm(model_dir)
    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = text_data_for(model_dir, data_dir, tokenizer)
    cls_task = build_cls_task(data, task, train_per_class=train_per_class, test_per_class=test_per_class, seed=0)
    torch.manual_seed(seed)
    model = _load_classifier(model_dir, tokenizer, cls_task.labels)
    start = time.perf_counter()
    losses = _finetune(model, tokenizer, cls_task.train, steps, batch_size, lr, weight_decay, max_len, amp, seed)
    wall = time.perf_counter() - start
    acc = _accuracy(model, tokenizer, cls_task.test, max_len, 32)
    tail = losses[-max(1, len(losses) // 10) :]
    result = {
        "model": str(model_dir),
        "task": task,
        "labels": list(cls_task.labels),
        "acc": round(acc, 4),
        "chance": round(1 / len(cls_task.labels), 4),
        "test_items": len(cls_task.test),
        "train_items": len(cls_task.train),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "max_len": max_len,
        "seed": seed,
        "train_loss": round(sum(tail) / len(tail), 4),
        "wall_s": round(wall, 1),
        "threads": torch.get_num_threads(),
    }
    log.info("%s on %s: accuracy %.4f on %d held-out passages", model_dir, task, acc, len(cls_task.test))
    if output is not None:
        out_dir = Path(output)
        out_dir.mkdir(parents=True, exist_ok=True)
        from parameternet.runs import atomic_write

        model.save_pretrained(out_dir / "classifier")
        tokenizer.save_pretrained(out_dir / "classifier")  # so AutoTokenizer, lm finetune-cls, ... load it
        atomic_write(out_dir / "cls.json", json.dumps(result, indent=1) + "\n")
    return result


def _check_arguments(task: str, lr: float, weight_decay: float, amp: str, **counts: int | None) -> None:
    """Refuse (ParameterNetError, one sentence) an argument :func:`finetune_classifier` cannot take: a count below
    1 (``counts``: a None count is not given), an ``lr`` that is not a positive number, a negative
    ``weight_decay``, an unknown ``amp`` or ``task``."""
    for key, value in counts.items():
        if value is not None and value < 1:
            raise ParameterNetError(f"{key}={value} is invalid; use 1 or more")
    if not (lr > 0 and math.isfinite(lr)):
        raise ParameterNetError(f"lr={lr} is invalid; use a positive learning rate such as 1e-4")
    if not weight_decay >= 0:
        raise ParameterNetError(f"weight_decay={weight_decay} is invalid; use 0 or more")
    if amp not in ("none", "bf16"):
        raise ParameterNetError(f"amp={amp!r} is invalid; use none or bf16")
    if task not in CLS_TASKS:
        raise ParameterNetError(f"unknown classification task {task!r}; choose from {', '.join(CLS_TASKS)}")


def _load_classifier(model_dir: Path, tokenizer, labels: Sequence[str]) -> torch.nn.Module:
    """The saved language model with a new classification head over ``labels`` (float32), its vocabulary
    checked against ``tokenizer``'s."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from parameternet.train.lm_eval import check_vocab

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists lm_head / score, which are expected to differ
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            pad_token_id=tokenizer.pad_token_id,
            dtype=torch.float32,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    check_vocab(model, tokenizer)
    return model


def _finetune(
    model: torch.nn.Module, tokenizer, train: Sequence[tuple[str, int]], steps: int, batch_size: int, lr: float,
    weight_decay: float, max_len: int, amp: str, seed: int,
) -> list[float]:  # fmt: skip
    """``steps`` AdamW steps (linear warmup over a tenth, then linear decay to 0; gradients clipped at 1) on
    batches of ``batch_size`` ``(passage, label)`` pairs of ``train``, cycling through them in an order seeded by
    ``seed``; the loss of each step. Raises ParameterNetError at the first non-finite loss."""
    from parameternet.train.loop import decay_groups

    opt = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    order_rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(steps):
        while len(order) < batch_size:
            perm = list(range(len(train)))
            order_rng.shuffle(perm)
            order += perm
        batch, order = [train[i] for i in order[:batch_size]], order[batch_size:]
        ids = _encode(tokenizer, [t for t, _ in batch], max_len)
        labels = torch.tensor([y for _, y in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(), labels=labels)
        out.loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if not math.isfinite(losses[-1]):
            raise ParameterNetError(f"the fine-tuning loss became {losses[-1]} at step {step + 1}; lower lr={lr}")
    return losses
