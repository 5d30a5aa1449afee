"""Evaluating a causal language model: validation loss / perplexity and zero-shot multiple choice (paper Table 7).

Validation loss is the mean next-token cross-entropy over non-overlapping windows of the validation tokens
(the router losses are not part of it); perplexity is its exponential. Multiple-choice items
(:mod:`parameternet.data.zero_shot`) are scored like the lm-evaluation-harness does for ARC and HellaSwag: the
log-likelihood of each continuation given the context, ``acc`` picking the largest sum and ``acc_norm`` the
largest sum per character of the continuation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from parameternet.errors import ParameterNetError
from parameternet.train import distributed as D

__all__ = [
    "check_saved_lm",
    "check_vocab",
    "evaluate_saved_lm",
    "export_tasks",
    "score_choices",
    "text_data_for",
    "validation_loss",
]

_GET_ONE = (
    "pass the model/ directory an lm train run wrote, or save the tokenizer beside the model "
    "(tokenizer.save_pretrained(DIR))"
)


def check_saved_lm(model_dir: str | Path) -> Path:
    """``model_dir`` as a Path once it is a saved ParameterNet language model that the Auto classes and
    ``AutoTokenizer`` load (what ``lm eval`` and ``lm finetune-cls`` take): ``config.json`` present, ``model_type``
    ``parameternet_llama``, a causal LM (not a classifier ``lm finetune-cls`` wrote) and the tokenizer's files
    beside it. Raises ParameterNetError in one sentence saying what is wrong and how to get a directory that fits."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ParameterNetError(
            f"{str(model_dir)!r} does not exist or is not a directory; pass the model/ directory an lm train run wrote"
        )
    config = model_dir / "config.json"
    if not config.is_file():
        raise ParameterNetError(f"{model_dir} has no config.json; pass the model/ directory an lm train run wrote")
    try:
        fields = json.loads(config.read_text())
        model_type, architectures = fields.get("model_type"), fields.get("architectures") or []
    except (OSError, ValueError, AttributeError):
        model_type, architectures = None, []
    if model_type != "parameternet_llama":
        raise ParameterNetError(
            f"{config} has model_type {model_type!r}, not 'parameternet_llama'; pass the model/ directory an "
            f"lm train run wrote"
        )
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise ParameterNetError(
            f"{model_dir} holds a {architectures[0]} (a fine-tuned classifier), not a language model; pass the model/ "
            f"directory of the lm train run it was fine-tuned from"
        )
    if not (model_dir / "tokenizer.json").is_file():
        raise ParameterNetError(f"{model_dir} has no tokenizer (tokenizer.json); {_GET_ONE}")
    return model_dir


def check_vocab(model, tokenizer) -> None:
    """A tokenizer whose ids do not fit the model's embedding is a user error, named in one sentence."""
    if len(tokenizer) > model.config.vocab_size:
        raise ParameterNetError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {model.config.vocab_size}; "
            f"use the tokenizer the model was trained with"
        )


@torch.no_grad()
def validation_loss(
    model,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    lockstep: bool = False,
) -> dict[str, float]:
    """Mean next-token loss over windows of ``seq_len`` tokens (the first ``max_tokens``), summed over ranks;
    ``progress`` shows a bar (on a terminal). ``lockstep``: every rank runs as many forward passes as the rank with
    the most windows (one with fewer left runs one window and counts nothing), for a model whose forward is a
    collective (FSDP)."""
    was_training = model.training
    model.eval()
    n_windows = len(tokens) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    if n_windows == 0:
        raise ParameterNetError(f"the validation split has {len(tokens)} tokens, fewer than seq_len={seq_len}")
    mine = list(range(rank, n_windows, world_size))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, predicted tokens
    most = -(-n_windows // world_size) if lockstep else len(mine)  # rank 0 has the most
    starts = range(0, most, batch_size)
    for i in tqdm(starts, desc="validation loss", unit="batch", disable=None if progress and rank == 0 else True):
        if i >= len(mine):  # lockstep: this rank's windows are done; the others' forward needs this one
            model(input_ids=torch.from_numpy(tokens[:seq_len].astype(np.int64)).to(device)[None])
            continue
        rows = [tokens[w * seq_len : (w + 1) * seq_len] for w in mine[i : i + batch_size]]
        ids = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)  # (B, L)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, L-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(ids[:, 1:].numel(), dtype=torch.float64, device=device)])
    D.all_reduce_sum(total)
    model.train(was_training)
    mean = (total[0] / total[1]).item()
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": int(total[1].item())}


@torch.no_grad()
def score_choices(
    model,
    tokenizer,
    items: Sequence,
    max_len: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> dict[str, float]:
    """``acc`` and ``acc_norm`` of multiple-choice items (``context``, ``choices``, ``label``); ``progress`` names a
    bar to show (on a terminal)."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    requests = []  # (item index, choice index, ids, number of continuation tokens)
    for i, item in enumerate(items):
        ctx = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(item.choices):
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = (ctx + cont)[-max_len:]  # keep the end: the continuation and the nearest context
            requests.append((i, j, ids, min(len(cont), len(ids) - 1)))
    # Longest first, so a batch pads little.
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]))
    loglik = torch.zeros(len(items), len(items[0].choices), dtype=torch.float64)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=None if progress else True):
        batch = [requests[r] for r in order[start : start + batch_size]]
        width = max(len(ids) for _, _, ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, _, seq, _) in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, W, V)
        for row, (i, j, seq, n_cont) in enumerate(batch):
            # Only the positions that predict the continuation: log-softmax over (n_cont, V), not (W, V).
            predicting = logits[row, len(seq) - n_cont - 1 : len(seq) - 1].float()
            targets = torch.tensor(seq[len(seq) - n_cont :], device=predicting.device)
            loglik[i, j] = torch.log_softmax(predicting, -1).gather(1, targets[:, None]).double().sum().cpu()
    labels = torch.tensor([item.label for item in items])
    chars = torch.tensor([[len(c) for c in item.choices] for item in items], dtype=torch.float64)
    model.train(was_training)
    return {
        "acc": (loglik.argmax(1) == labels).double().mean().item(),
        "acc_norm": ((loglik / chars).argmax(1) == labels).double().mean().item(),
        "items": len(items),
    }


LM_EVAL_TASK = """\
# lm-evaluation-harness task over items built by parameternet from held-out text (multiple choice, 4 options).
task: parameternet_{task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context  # field names: the harness reads doc["context"], doc["choices"], doc["label"]
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""  # every choice starts with its space
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def export_tasks(tasks: dict, directory: str | Path) -> list[Path]:
    """Write every task as ``<task>.jsonl`` plus an lm-evaluation-harness ``<task>.yaml`` pointing at it."""
    from parameternet.data.zero_shot import write_items

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, items in tasks.items():
        data = (directory / f"{name}.jsonl").resolve()
        write_items(items, data)
        (directory / f"{name}.yaml").write_text(LM_EVAL_TASK.format(task=name, path=data))
        written += [data, directory / f"{name}.yaml"]
    return written


_SETTINGS = ("corpora", "vocab_size", "val_fraction", "eval_fraction")  # what decides the split and the tokenizer


def _check_data(model_dir: Path, data, tokenizer) -> None:
    """ParameterNetError unless ``data`` (a TextData passed with --data) is text the model was trained on: the
    vocabulary of ``tokenizer`` (when given) and, for a model inside an lm train run, the run's corpora, vocabulary
    and split fractions (else the held-out documents are not held out)."""
    if tokenizer is not None and data.vocab_size != len(tokenizer):
        raise ParameterNetError(
            f"the prepared text in {data.root} uses a {data.vocab_size}-token vocabulary, the model's tokenizer "
            f"{len(tokenizer)}; pass the --data directory the model was trained on"
        )
    recipe = model_dir.parent / "config.yaml"
    if not recipe.is_file():
        return
    from parameternet.train.lm_config import LMTrainConfig
    from parameternet.train.recipe import from_dict, read_yaml

    try:
        run = from_dict(LMTrainConfig, read_yaml(recipe, "config.yaml")).data
    except ParameterNetError:  # not an lm train recipe: nothing recorded to compare with
        return
    saved = data.manifest.get("settings", {})
    diffs = [
        f"{k}={saved.get(k)!r} (the run: {getattr(run, k)!r})" for k in _SETTINGS if saved.get(k) != getattr(run, k)
    ]
    if diffs:
        raise ParameterNetError(
            f"the prepared text in {data.root} has {', '.join(diffs)}, so its held-out documents are not the ones the "
            f"run in {model_dir.parent} held out; pass the --data directory the model was trained on, or leave --data "
            f"out"
        )


def text_data_for(model_dir: Path, data_dir: str | None, tokenizer=None):
    """The prepared text of ``data_dir``, else that of the lm train run holding ``model_dir`` (its
    ``config.yaml``). Raises ParameterNetError when there is neither, or when ``data_dir`` does not match the model:
    another vocabulary than ``tokenizer``'s or, for a model inside an lm train run, other corpora, vocabulary or
    split fractions than the run's."""
    from parameternet.data.text import load_text_data

    model_dir = Path(model_dir)
    if data_dir is not None:
        data = load_text_data(data_dir)
        _check_data(model_dir, data, tokenizer)
        return data
    recipe = model_dir.parent / "config.yaml"
    if not recipe.is_file():
        raise ParameterNetError(
            f"{model_dir} is not inside an lm train run directory; pass --data with the prepared text directory"
        )
    from parameternet.train.lm_config import load_lm_config

    return load_lm_config(recipe).data.prepare()


def evaluate_saved_lm(
    model_dir: str | Path,
    data_dir: str | None = None,
    items: int = 300,
    seq_len: int | None = None,
    batch_size: int = 32,
    val_tokens: int | None = None,
    export: str | Path | None = None,
) -> dict:
    """Validation loss / perplexity and zero-shot accuracy of a ``save_pretrained`` directory (with tokenizer).

    Raises ParameterNetError for a directory :func:`check_saved_lm` refuses, a negative ``items``, a
    ``val_tokens`` below 1 or below one window of ``seq_len`` tokens (whole windows are scored), or text
    :func:`text_data_for` refuses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import parameternet.models.llama_moe  # noqa: F401  (registers the model with the Auto classes)
    from parameternet.data.zero_shot import build_tasks

    if items < 0:
        raise ParameterNetError(f"--items {items} is negative; pass 0 (no zero-shot tasks) or a positive count")
    if val_tokens is not None and val_tokens < 1:
        raise ParameterNetError(f"--val-tokens {val_tokens} is not positive; pass a positive count or leave it out")
    model_dir = check_saved_lm(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = text_data_for(model_dir, data_dir, tokenizer)  # before the weights load: bad --data is refused at once
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    check_vocab(model, tokenizer)
    seq_len = seq_len or model.config.max_position_embeddings
    if val_tokens is not None and val_tokens < seq_len:
        raise ParameterNetError(
            f"--val-tokens {val_tokens} is less than one window of the model's {seq_len} tokens; pass at least "
            f"{seq_len} (whole windows are scored: the result's 'tokens' says how many)"
        )
    result = {"model": str(model_dir), "params": model.num_parameters()}
    result["val"] = validation_loss(model, data.tokens("val"), seq_len, batch_size, val_tokens, progress=True)
    tasks = build_tasks(data.documents("eval"), items) if items else {}
    if export is not None:
        export_tasks(tasks, export)
    result["zero_shot"] = {
        name: score_choices(model, tokenizer, its, seq_len, batch_size, progress=name) for name, its in tasks.items()
    }
    return result
