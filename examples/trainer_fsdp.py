"""Train a ParameterNet LLaMA-MoE (``ParameterNetLlamaForCausalLM``) with transformers' Trainer under FSDP2.

Run it with torchrun, one process per GPU (or, on CPUs, per core group with the gloo backend); the paper's
LLaMA-1B with 8 ``down_proj`` experts (``configs/lm-1b-moe-down.yaml``'s sizes)::

    torchrun --nproc_per_node=8 examples/trainer_fsdp.py runs/trainer-fsdp --bf16 \\
        --hidden-size 2048 --intermediate-size 8192 --layers 12 --heads 16 --experts 8 \\
        --seq-len 2048 --vocab-size 32000 --max-steps 10000

The data are the text corpora ``parameternet lm train`` uses (``parameternet lm data`` prepares them; the BPE
tokenizer is trained on first use). The loss is the next-token loss plus the weighted router losses, with their
weight kept on any number of processes (``RouterLossTrainer``); ``aux_loss`` and ``z_loss`` are logged beside it
(``OUT/trainer_state.json`` keeps the rows).
The model is sharded per decoder layer (``FSDP_CONFIG``); the end writes one ordinary transformers directory,
``OUT/final``, which ``AutoModelForCausalLM.from_pretrained`` loads after ``import parameternet.models.llama_moe``.
"""

import argparse

import torch
from transformers import TrainingArguments

from parameternet.data.text import prepare_text_data
from parameternet.models.llama_moe import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM
from parameternet.train.hf import FSDP_CONFIG, RouterLossTrainer, token_windows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output_dir")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained on the corpora")
    p.add_argument("--val-fraction", type=float, default=0.05, help="of the documents, held out (lm data's split)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="of the documents, for zero-shot tasks")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--moe", nargs="+", default=["down_proj"], help="projections made mixtures of experts")
    p.add_argument("--aux-coef", type=float, default=0.01, help="router_aux_loss_coef")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process and step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--windows", type=int, default=None, help="train on the first N windows only")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (FSDP gathers bf16 weights)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    data = prepare_text_data(
        vocab_size=args.vocab_size, val_fraction=args.val_fraction, eval_fraction=args.eval_fraction
    )
    tokenizer = data.tokenizer()
    config = ParameterNetLlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq_len,
        num_experts=args.experts,
        moe_projections=args.moe,
        router_aux_loss_coef=args.aux_coef,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)  # every process builds the same initial weights
    model = ParameterNetLlamaForCausalLM(config)
    training = TrainingArguments(
        args.output_dir,
        fsdp=True,
        fsdp_config=FSDP_CONFIG,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        weight_decay=0.1,
        adam_beta2=0.95,
        bf16=args.bf16,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),  # the gloo backend: without it the Trainer sees no distributed run
    )
    trainer = RouterLossTrainer(
        model=model, args=training, train_dataset=token_windows(data.tokens("train"), args.seq_len, args.windows)
    )
    trainer.train()
    if trainer.is_world_process_zero():  # the logged rows (loss, aux_loss, z_loss, ...) as JSON
        trainer.state.save_to_json(f"{args.output_dir}/trainer_state.json")
        sharded = type(trainer.model_wrapped).__name__
        print(f"trained {sharded} on {trainer.accelerator.num_processes} process(es)")
    trainer.save_model(f"{args.output_dir}/final")
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(f"{args.output_dir}/final")


if __name__ == "__main__":
    main()
