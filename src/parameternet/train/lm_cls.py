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

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parameternet.errors import ParameterNetError
from parameternet.train.loop import Cadence, Timing, TrainTask, Window, peak_lr
from parameternet.train.recipe import RunConfig, check_fields

__all__ = ["CLS_TASKS", "ClassifierTask", "ClsConfig", "ClsTask", "build_cls_task", "finetune_classifier", "label_of"]

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
def _accuracy(model, tokenizer, items: list[tuple[str, int]], max_len: int, batch_size: int, device=None) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        ids = _encode(tokenizer, [t for t, _ in chunk], max_len).to(device)
        pred = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits.argmax(-1)
        correct += (pred.cpu() == torch.tensor([y for _, y in chunk])).sum().item()
    return correct / len(items)


@dataclass
class ClsConfig(RunConfig):
    """The recipe of a classifier fine-tune (:func:`finetune_classifier`; the run keys are
    :class:`~parameternet.train.recipe.RunConfig`'s, ``max_steps`` the number of optimizer steps)."""

    model: str = ""  # an ``lm train`` model/ directory
    task: str = "brown-genre"
    data_dir: str | None = None  # prepared text; None: the one the model's run names
    max_steps: int | None = 300
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    max_len: int = 128
    train_per_class: int = 2000
    test_per_class: int = 500
    amp: str = "bf16"  # bf16 | none
    ckpt_every_steps: int = 100
    output_dir: str = "runs/cls"
    log_every: int = 10

    def validate(self) -> ClsConfig:
        check_fields(self, self.run_checks())
        _check_arguments(
            self.task, self.lr, self.weight_decay, self.amp, steps=self.max_steps, batch_size=self.batch_size,
            max_len=self.max_len, train_per_class=self.train_per_class, test_per_class=self.test_per_class,
        )  # fmt: skip
        return self


class ClassifierTask(TrainTask):
    """The classifier fine-tune as a task of the run loop (:class:`~parameternet.train.loop.RunLoop`): checkpoints
    with exact resume, the run lock, ``metrics.jsonl``; the test accuracy at the end, the classifier in
    ``classifier/`` (``save_pretrained`` with its tokenizer) and the result in ``summary.json``."""

    progress_desc = "cls"
    nan_hint = "lower lr"

    def __init__(self, cfg: ClsConfig, dist, stop=None):
        super().__init__(cfg, dist, stop, Window(("loss",)))

    def build(self) -> None:
        from transformers import AutoTokenizer

        import parameternet.models.llama_moe  # noqa: F401  (registers the Auto classes)
        from parameternet.train.lm_eval import check_saved_lm, text_data_for
        from parameternet.train.loop import decay_groups

        cfg = self.cfg
        self.model_dir = check_saved_lm(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        data = text_data_for(self.model_dir, cfg.data_dir, self.tokenizer)
        self.cls_task = build_cls_task(
            data, cfg.task, train_per_class=cfg.train_per_class, test_per_class=cfg.test_per_class, seed=0
        )
        torch.manual_seed(cfg.seed)  # the new head's initialisation
        self.model = _load_classifier(self.model_dir, self.tokenizer, self.cls_task.labels).to(self.device)
        self.ddp = self.model
        self.total_steps = cfg.max_steps
        self.optimizer = torch.optim.AdamW(decay_groups(self.model, cfg.weight_decay), lr=cfg.lr)
        warmup, steps = max(1, self.total_steps // 10), self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
        )
        self.order = _passage_order(len(self.cls_task.train), cfg.seed, self.total_steps * cfg.batch_size)
        self.losses: list[float] = []
        self.acc: float | None = None
        self.cadence = Cadence(cfg.log_every, None, cfg.ckpt_every_steps)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.cfg.batch_size
        batch = [self.cls_task.train[i] for i in self.order[self.step * b : (self.step + 1) * b]]
        ids = _encode(self.tokenizer, [t for t, _ in batch], self.cfg.max_len)
        return ids.to(self.device), torch.tensor([y for _, y in batch], device=self.device)

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """One AdamW step on ``batch_size`` passages (gradients clipped at 1): ``{"loss"}``."""
        ids, labels = batch
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16"):
            out = self.model(input_ids=ids, attention_mask=(ids != self.tokenizer.pad_token_id).long(), labels=labels)
        out.loss.float().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(out.loss.item())
        return {"loss": self.losses[-1]}

    def validate(self) -> None:
        """The accuracy on the test passages (after the last step)."""
        self.acc = _accuracy(self.model, self.tokenizer, self.cls_task.test, self.cfg.max_len, 32, self.device)
        self.metrics.write({"step": self.step, "split": "test", "acc": round(self.acc, 6)})

    def train_row(self, window: Window) -> dict[str, Any]:
        return {
            "step": self.step,
            "split": "train",
            "loss": round(window.mean("loss"), 6),
            "lr": peak_lr(self.optimizer),
        }

    def save_checkpoint(self) -> None:
        state = {
            "step": self.step, "total_steps": self.total_steps, "batch_size": self.cfg.batch_size,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "losses": self.losses,
            "log_window": self.window.saved(),
        }  # fmt: skip
        meta = {"kind": "lm", "step": self.step, "world_size": 1, "config": self.cfg.to_dict()}
        self.ckpt.save_step(self.step, self.model.state_dict(), None, state, meta)

    def load_checkpoint(self, state_path: Path) -> None:
        from parameternet.train.checkpoint import load_into, load_state, load_weights

        state = load_state(state_path)
        weights = state_path.with_name(state_path.name.replace(".state.pt", ".safetensors"))
        load_into(self.model, load_weights(weights)[0], str(weights), strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.losses = state["step"], list(state["losses"])
        self.window.restore(state["log_window"])
        log.info("resumed from %s at step %d", state_path, self.step)

    def finish(self, wall: float, timing: Timing) -> dict[str, Any]:
        """Save ``classifier/`` and return the result: accuracy, chance, items, the last tenth's mean loss."""
        from parameternet.train.lm import save_pretrained_dir

        cfg = self.cfg
        save_pretrained_dir(self.out / "classifier", self.model, self.tokenizer)  # AutoTokenizer loads it too
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return {
            "model": str(self.model_dir), "task": cfg.task, "labels": list(self.cls_task.labels),
            "acc": round(self.acc, 4), "chance": round(1 / len(self.cls_task.labels), 4),
            "test_items": len(self.cls_task.test), "train_items": len(self.cls_task.train), "steps": self.step,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "max_len": cfg.max_len, "seed": cfg.seed,
            "train_loss": round(sum(tail) / len(tail), 4), "wall_s": round(wall, 1), "threads": torch.get_num_threads(),
        }  # fmt: skip

    def log_done(self, summary: dict[str, Any]) -> None:
        log.info("%s on %s: accuracy %.4f on %d held-out passages", summary["model"], summary["task"],
                 summary["acc"], summary["test_items"])  # fmt: skip


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
    resume: str | None = "auto",
    device: str = "auto",
) -> dict[str, Any]:
    """Fine-tune the language model in ``model_dir`` on ``task`` and return ``{"acc", "test_items", ...}``.

    ``steps`` optimizer steps of ``batch_size`` passages (each at most ``max_len`` tokens), cycling through the
    training passages in a seeded order, as a task of the run loop (:class:`ClassifierTask`). ``output``, when
    given, is the run directory: checkpoints every 100 steps that ``resume="auto"`` continues exactly (a complete
    run returns its result), the run lock, ``metrics.jsonl``, ``summary.json`` with the result and the fine-tuned
    model with its tokenizer in ``classifier/``; without it the run goes to a temporary directory that is removed.

    Raises ParameterNetError, before anything trains, for ``steps``, ``batch_size``, ``max_len``,
    ``train_per_class``, ``test_per_class`` or ``threads`` below 1, an ``lr`` that is not a positive number, a
    negative ``weight_decay``, an unknown ``amp`` or ``task``, a ``model_dir``
    :func:`~parameternet.train.lm_eval.check_saved_lm` refuses, or text
    :func:`~parameternet.train.lm_eval.text_data_for` refuses (another vocabulary, or other splits than the run's);
    ParameterNetError when another live process holds the run's lock, RunInterrupted after SIGINT / SIGTERM (a
    checkpoint saved).
    """
    import tempfile

    from parameternet.train.loop import run_locked

    with tempfile.TemporaryDirectory(prefix="parameternet-cls-") if output is None else _nothing() as tmp:
        cfg = ClsConfig(
            model=str(model_dir), task=task, data_dir=data_dir, max_steps=steps, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, max_len=max_len, train_per_class=train_per_class,
            test_per_class=test_per_class, amp=amp, seed=seed, threads=threads, output_dir=str(output or tmp),
            resume=resume if output is not None else None, device=device, progress=False,
        ).validate()  # fmt: skip
        return run_locked(cfg.device, cfg.output_dir, lambda dist, stop: ClassifierTask(cfg, dist, stop))


def _nothing():
    import contextlib

    return contextlib.nullcontext(None)


def _passage_order(n: int, seed: int, length: int) -> list[int]:
    """The first ``length`` passage indices of the training order: shuffles of ``range(n)`` one after another, from
    ``random.Random(seed)``; the same at every resume."""
    rng, order = random.Random(seed), []
    while len(order) < length:
        perm = list(range(n))
        rng.shuffle(perm)
        order += perm
    return order[:length]


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
