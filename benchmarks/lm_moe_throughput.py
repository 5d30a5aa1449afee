"""Training throughput of a small dense LLaMA against the same model with M experts on one FFN projection.

Top-1 routing keeps the FLOPs per token equal (plus the router's ``in_features * M`` MACs), so the ratio measures
what the dispatch costs: routing, sorting tokens by expert, the grouped matmul and the way back. Timings on a
shared machine are noisy: the two models run interleaved (dense, MoE, dense, MoE, ...) in one process, each
round times ``--steps`` training steps (forward + backward + AdamW step) and we report the median tokens/s of each
and the ratio of the medians, plus the median of the per-round ratios (steadier when the load changes during
the run). The target from issue 6 is MoE >= 0.85x dense.

    python benchmarks/lm_moe_throughput.py                          # 8 experts on down_proj, 2 threads
    python benchmarks/lm_moe_throughput.py --projection gate_proj --experts 4 --rounds 7
    python benchmarks/lm_moe_throughput.py --threads 1 --clock cpu       # per CPU-second: for a busy machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from parameternet.models.llama_moe import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM


def build(args: argparse.Namespace, moe: bool) -> ParameterNetLlamaForCausalLM:
    torch.manual_seed(0)
    config = ParameterNetLlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq_len,
        num_experts=args.experts,
        moe_projections=[args.projection] if moe else [],
        attn_implementation="sdpa",
    )
    return ParameterNetLlamaForCausalLM(config).train()


def step_fn(model: ParameterNetLlamaForCausalLM, args: argparse.Namespace):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)

    def run() -> None:
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--projection", default="down_proj", choices=["gate_proj", "up_proj", "down_proj"])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: tokens per second; cpu: tokens per CPU-second of this process (steadier on a busy machine)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    models = {"dense": build(args, moe=False), f"moe{args.experts}-{args.projection}": build(args, moe=True)}
    fns = {name: step_fn(model, args) for name, model in models.items()}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    tokens = args.batch * args.seq_len * args.steps
    rates: dict[str, list[float]] = {name: [] for name in fns}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            rates[name].append(tokens / (clock() - t0))

    names = list(fns)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    ratio = medians[names[1]] / medians[names[0]]
    # The same round's two timings share the machine's load: their ratio is steadier than the ratio of medians.
    paired = statistics.median(m / d for d, m in zip(rates[names[0]], rates[names[1]]))
    params = {name: m.num_parameters() for name, m in models.items()}
    if args.json:
        print(
            json.dumps(
                {
                    "args": vars(args),
                    "tokens_per_s": rates,
                    "median": medians,
                    "params": params,
                    "ratio": ratio,
                    "paired_ratio": paired,
                }
            )
        )
        return
    print(
        f"torch {torch.__version__}, {args.threads} threads; batch {args.batch} x {args.seq_len} tokens, "
        f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}; "
        f"{args.rounds} rounds x {args.steps} steps, interleaved, {args.clock} clock"
    )
    for name in names:
        spread = ", ".join(f"{r:.0f}" for r in rates[name])
        print(f"{name:>20}: {params[name] / 1e6:7.2f}M params, median {medians[name]:8.0f} tokens/s  ({spread})")
    print(f"ratio {names[1]} / dense: {ratio:.3f}x (ratio of medians), {paired:.3f}x (median of per-round ratios)")


if __name__ == "__main__":
    main()
