"""The lm-evaluation-harness lines of docs/lm.md, run once on a saved model and the tasks `lm eval --export-tasks`
writes.

Runs only where the harness is installed (`pip install "lm_eval[hf]"`; it is not a dependency of this project).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from parameternet.data.text import Document, train_tokenizer  # noqa: E402
from parameternet.data.zero_shot import build_tasks  # noqa: E402
from parameternet.models.llama_moe import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM  # noqa: E402
from parameternet.train.lm_eval import export_tasks  # noqa: E402

WORDS = "the a river stone light house old young man woman walked found slowly under over green quiet city".split()


def _documents(n: int = 12) -> list[Document]:
    rng = random.Random(0)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."

    return [Document(f"doc{i}", " ".join(sentence() for _ in range(40))) for i in range(n)]


def test_the_readme_harness_line_scores_a_saved_model_without_importing_parameternet(tmp_path):
    docs = _documents()
    tokenizer = train_tokenizer((d.text for d in docs), 300)
    config = ParameterNetLlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, num_experts=4, moe_projections=["down_proj"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model_dir, tasks_dir = tmp_path / "model", tmp_path / "tasks"
    ParameterNetLlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    tasks = build_tasks(docs, 8)
    assert all(len(items) == 8 for items in tasks.values())
    export_tasks(tasks, tasks_dir)

    cmd = [
        sys.executable, "-m", "lm_eval", "run", "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32,trust_remote_code=True",
        "--include_path", str(tasks_dir), "--tasks", "parameternet_next_sentence,parameternet_last_word",
        "--device", "cpu", "--batch_size", "4",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for task, metric in (("parameternet_next_sentence", "acc_norm"), ("parameternet_last_word", "acc")):
        assert task in out.stdout and metric in out.stdout, out.stdout[-3000:]
