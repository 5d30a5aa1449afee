"""transformers' Trainer with fsdp=True on 2 processes (examples/trainer_fsdp.py): the loss it logs is the next-token
loss plus router_aux_loss_coef times the load-balancing loss (weighted as in one process, not once per process and
micro-batch), and the saved model loads with from_pretrained.

On CPUs the installed accelerate (1.15.0) does not shard: its AcceleratorState turns an FSDP plugin into
DistributedType.FSDP only for the multi-accelerator types (MULTI_GPU, MULTI_XPU, ...), not MULTI_CPU, so the Trainer
wraps the model in DistributedDataParallel over gloo instead, without a word. The test says which wrapper ran (FSDP
where CUDA is visible); the router-loss weighting and the saved model are checked under either.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_lm_text import make_fake_corpora

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "trainer_fsdp.py"
TINY = ["--vocab-size", "300", "--val-fraction", "0.2", "--eval-fraction", "0.2", "--seq-len", "16",
        "--hidden-size", "32", "--intermediate-size", "64", "--layers", "2", "--heads", "2", "--experts", "4",
        "--aux-coef", "0.5", "--batch-size", "2", "--grad-accum", "2", "--windows", "8",
        "--max-steps", "3"]  # fmt: skip


def test_trainer_on_two_processes_weighs_the_router_loss_once_and_saves_an_ordinary_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import parameternet.models.llama_moe  # noqa: F401  (registers the Auto classes)
    from parameternet.data.text import prepare_text_data
    from parameternet.models.llama_moe import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM

    make_fake_corpora(tmp_path / "cache", monkeypatch)  # PARAMETERNET_DATA, which torchrun's processes inherit
    # prepared here, so that the two processes find it ready
    data = prepare_text_data(vocab_size=300, val_fraction=0.2, eval_fraction=0.2)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), str(out),
           *TINY]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    wrapper = "FSDPParameterNetLlamaForCausalLM" if torch.cuda.is_available() else "DistributedDataParallel"
    assert f"trained {wrapper} on 2 process(es)" in res.stdout

    # step 1 sees all 8 windows (2 processes x 2 micro-batches x 2): its loss is the initial model's next-token loss
    # over them plus 0.5 x the logged load-balancing loss, whichever way they were split
    logs = [row for row in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in row]
    first = logs[0]
    config = ParameterNetLlamaConfig.from_pretrained(out / "final")
    torch.manual_seed(0)
    initial = ParameterNetLlamaForCausalLM(config)
    ids = torch.stack([torch.from_numpy(data.tokens("train")[i * 16 : (i + 1) * 16].astype("int64")) for i in range(8)])
    with torch.no_grad():
        logits = initial(input_ids=ids).logits
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert first["aux_loss"] > 0.5  # about 1 for balanced top-1 routing
    assert first["loss"] == pytest.approx(lm + 0.5 * first["aux_loss"], abs=2e-3)
    assert len(logs) == 3 and all("aux_loss" in row and "z_loss" in row for row in logs)

    # one ordinary directory: config, weights, tokenizer
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model).__name__ == "ParameterNetLlamaForCausalLM"
    trained = model.state_dict()
    assert all(type(v) is torch.Tensor for v in trained.values())
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in trained.items())  # it trained
